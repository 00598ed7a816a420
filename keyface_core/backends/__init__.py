"""Model backends outside ComfyUI (each imports its library lazily)."""
