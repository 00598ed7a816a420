"""A headless, CPU-only ComfyUI for tests, the demo and benchmarks (never imported by the pack).

ComfyUI lives in an ignored folder (`.cache/comfyui`, made by scripts/setup_env.sh) or wherever
$KEYFACE_COMFYUI_DIR points. `boot()` forces the CPU, loads comfy_extras and this pack (linked
into ComfyUI's custom_nodes), once per process. `run_prompt()` executes an API-format prompt
through ComfyUI's own validator and executor, as the server would.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACK_LINK_NAME = "KeyFace"
_booted = None


def comfy_dir() -> Path:
    path = Path(os.environ.get("KEYFACE_COMFYUI_DIR", REPO / ".cache" / "comfyui"))
    if not (path / "comfy" / "samplers.py").is_file():
        raise RuntimeError(f"ComfyUI not found at {path}; run `bash scripts/setup_env.sh` first "
                           "(or set KEYFACE_COMFYUI_DIR to a ComfyUI checkout).")
    return path


class _HeadlessServer:
    """What PromptExecutor needs from PromptServer; collects the messages it would send."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages: list[tuple[str, dict]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))


class _QuietMissingExtras(logging.Filter):
    """ComfyUI reports each optional comfy_extras module whose dependency is not installed here (audio,
    upscale models, kornia...) with a full traceback; KeyFace needs none of them, so keep one line."""

    def __init__(self):
        super().__init__()
        self.skipped: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        failed = re.search(r"Cannot import (\S+) module for custom nodes", message)
        if failed and "comfy_extras" in failed.group(1):
            self.skipped.append(Path(failed.group(1)).stem)
            return False
        if message.startswith("Traceback") and "comfy_extras" in message:
            return False
        if message.startswith("IMPORT FAILED: ") and Path(message[15:]).stem in self.skipped:
            return False
        if self.skipped and (message in ("", "\nThis issue might be caused by new missing dependencies added the last "
                                             "time you updated ComfyUI.")
                             or message.startswith(("Please do a: pip install", "Please run the update script",
                                                     "WARNING: some comfy_extras/ nodes did not import"))):
            return False
        return True


def boot():
    """Start ComfyUI in this process (CPU, PyTorch attention) with KeyFace loaded; returns the nodes module."""
    global _booted
    if _booted is not None:
        return _booted
    root = comfy_dir()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    link = root / "custom_nodes" / PACK_LINK_NAME
    # A copied or moved ComfyUI folder keeps a link to the old checkout: repoint it, or the host would load that
    # checkout's nodes instead of this one's.
    if link.is_symlink() and Path(os.readlink(link)).resolve() != REPO.resolve():
        link.unlink()
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.use_pytorch_cross_attention = True
    import utils.extra_config  # noqa: F401  (before `nodes`, as main.py does)
    import nodes
    quiet = _QuietMissingExtras()
    logging.getLogger().addFilter(quiet)
    try:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    finally:
        logging.getLogger().removeFilter(quiet)
    if quiet.skipped:
        logging.info("ComfyUI extras not loaded (optional dependencies not installed; KeyFace needs none): %s",
                     ", ".join(sorted(quiet.skipped)))
    _booted = nodes
    return nodes


def run_prompt(prompt: dict, *, prompt_id: str | None = None, extra_data: dict | None = None):
    """Validate and execute an API-format prompt; returns (executor, server) for inspection.

    Raises RuntimeError with ComfyUI's own validation text when the prompt does not validate.
    """
    boot()
    import execution
    prompt_id = prompt_id or str(uuid.uuid4())
    valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid[0]:
        raise RuntimeError(f"prompt did not validate: {valid[1]} {valid[3]}")
    server = _HeadlessServer()
    import inspect
    from comfy.cli_args import args
    if "cache_args" in inspect.signature(execution.PromptExecutor).parameters:   # 0.3.7x
        executor = execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC,
                                            cache_args={"lru": args.cache_lru, "ram": args.cache_ram})
    else:                                                                          # 0.3.6x: cache_size
        executor = execution.PromptExecutor(server)
    executor.execute(prompt, prompt_id, extra_data or {}, valid[2])
    return executor, server


def pack_module(submodule: str = ""):
    """The KeyFace package as ComfyUI loaded it (its sys.modules name is derived from its path)."""
    import importlib
    boot()
    suffix = f"custom_nodes/{PACK_LINK_NAME}"
    names = [name for name in sys.modules if name.endswith(suffix)]
    if not names:
        raise RuntimeError("KeyFace was not loaded by ComfyUI; see the import errors above")
    return importlib.import_module(names[0] + ("." + submodule if submodule else ""))
