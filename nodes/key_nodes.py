"""Key nodes: Load Key reads a secret on the server; only a file or variable *name* enters a workflow."""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

import folder_paths
from comfy_api.latest import io

from ..keyface_core.errors import KeyMaterialError
from ..keyface_core.keys import key_from_env, load_key_file

KeyFaceKey = io.Custom("KEYFACE_KEY")
CATEGORY = "KeyFace"
KEYS_FOLDER = "keyface_keys"
NO_KEYS = "(no key files: run python -m keyface_core.keygen NAME)"
_FINGERPRINT_SALT = secrets.token_bytes(32)


def keys_dir() -> Path:
    """ComfyUI/models/keyface_keys (extra_model_paths can relocate it), or $KEYFACE_KEYS_DIR."""
    if os.environ.get("KEYFACE_KEYS_DIR"):
        return Path(os.environ["KEYFACE_KEYS_DIR"])
    if KEYS_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(KEYS_FOLDER, os.path.join(folder_paths.models_dir, KEYS_FOLDER))
    return Path(folder_paths.get_folder_paths(KEYS_FOLDER)[0])


def key_file_names() -> list[str]:
    folder = keys_dir()
    names = sorted(p.name for p in folder.glob("*") if p.is_file() and not p.name.startswith(".")) if folder.is_dir() else []
    return names or [NO_KEYS]


class LoadKey(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KeyFaceLoadKey", display_name="Load Key", category=CATEGORY,
            description="Loads a secret key on the server, from a key file in models/keyface_keys or an environment "
                        "variable. Only the file or variable *name* is stored in workflows; never the key.",
            inputs=[
                io.Combo.Input("source", options=["key file", "environment variable"], default="key file",
                               tooltip="Where the secret lives, on the machine running ComfyUI."),
                io.Combo.Input("key_file", options=key_file_names(),
                               tooltip="A file in models/keyface_keys (create one: python -m keyface_core.keygen NAME)."),
                io.String.Input("variable", default="KEYFACE_KEY",
                                tooltip="Name (not value) of an environment variable of the ComfyUI server."),
                io.Combo.Input("kind", options=["key", "passphrase"], default="key",
                               tooltip="key: 64 hex digits (256-bit, recommended). passphrase: any text of 12+ characters, "
                                       "stretched with scrypt and a per-image salt."),
            ],
            outputs=[KeyFaceKey.Output(display_name="key", tooltip="The secret, kept on the server; it prints only as its source name and is never stored in LATENTs, images or workflows.")],
        )

    @classmethod
    def fingerprint_inputs(cls, source, key_file, variable, kind):
        # Re-run when the file changes; the fingerprint holds metadata, never the content.
        if source == "key file":
            path = keys_dir() / key_file
            try:
                st = path.stat()
                return f"{path}:{st.st_mtime_ns}:{st.st_size}"
            except OSError:
                return f"{path}:missing"
        # Keyed with a per-process random salt: even in memory, the cache key says nothing about the value.
        return f"env:{variable}:{hmac.new(_FINGERPRINT_SALT, os.environ.get(variable, '').encode(), 'sha256').hexdigest()}"

    @classmethod
    def validate_inputs(cls, source, key_file):
        # Replaces ComfyUI's "Value not in list" (a shared workflow names a key this server lacks) with what to do.
        if source == "key file":
            problem = _key_file_problem(key_file)
            if problem:
                return problem
        return True

    @classmethod
    def execute(cls, source, key_file, variable, kind) -> io.NodeOutput:
        if source == "key file":
            problem = _key_file_problem(key_file, check_exists=False)
            if problem:
                raise KeyMaterialError(problem)
            return io.NodeOutput(load_key_file(keys_dir() / key_file, kind))
        return io.NodeOutput(key_from_env(variable, kind))


def _key_file_problem(key_file: str, check_exists: bool = True) -> str | None:
    """Why the chosen key file cannot be used, or None. Names only the file, never its content."""
    if key_file == NO_KEYS or not key_file or Path(key_file).name != key_file:
        return (f"no key file selected; put one in {keys_dir()} (python -m keyface_core.keygen NAME) "
                "and refresh the node list (press R).")
    if check_exists and not (keys_dir() / key_file).is_file():
        return (f"key file '{key_file}' is not in {keys_dir()}: copy the key file there (or create a new key with "
                f"`python -m keyface_core.keygen {Path(key_file).stem}`; a new key cannot restore old images), "
                "then press R to refresh.")
    return None


NODES = [LoadKey]
