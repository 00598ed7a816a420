"""KeyFace core: keyed, invertible face anonymization math. Imports no ComfyUI module."""
