"""KeyFace's ComfyUI nodes (V3 schema), listed in one ComfyExtension."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .core_nodes import NODES as CORE_NODES
from .key_nodes import NODES as KEY_NODES


class KeyFaceExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        nodes = list(KEY_NODES) + list(CORE_NODES)
        try:
            from .face_nodes import NODES as FACE_NODES
            from .hint_nodes import NODES as HINT_NODES
        except ImportError:  # face nodes need optional packages; the latent nodes work without them
            FACE_NODES, HINT_NODES = [], []
        return nodes + list(FACE_NODES) + list(HINT_NODES)


async def comfy_entrypoint() -> KeyFaceExtension:
    return KeyFaceExtension()
