"""KeyFace: secure, reversible face anonymization with diffusion models (ComfyUI custom nodes).

Importing registers nothing beyond ComfyUI's V3 entry point: no downloads, no model loads.
"""

WEB_DIRECTORY = "./web"   # one small extension: shows a KeyFace node's report text on the node

try:
    from .nodes import comfy_entrypoint  # noqa: F401  (ComfyUI >= 0.3.48: V3 schema)
except ImportError as err:  # pragma: no cover - older ComfyUI or imported outside ComfyUI
    import logging

    if "comfy" in str(err):
        logging.getLogger("keyface").error("KeyFace needs ComfyUI 0.3.48 or newer (V3 node schema): %s", err)
        NODE_CLASS_MAPPINGS = {}
    else:
        raise
