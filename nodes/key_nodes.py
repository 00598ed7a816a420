"""Key nodes: Create Key writes a new key file on the server, Load Key reads one; only a file or variable
*name* ever enters a workflow, an output or a message."""

from __future__ import annotations

import hmac
import logging
import os
import re
import secrets
from pathlib import Path

import folder_paths
from comfy_api.latest import io, ui

from ..keyface_core.errors import KeyMaterialError
from ..keyface_core.keys import KEY_FILE_SUFFIX, key_from_env, load_key_file, write_key_file

log = logging.getLogger("keyface")

KeyFaceKey = io.Custom("KEYFACE_KEY")
CATEGORY = "KeyFace"
KEYS_FOLDER = "keyface_keys"
NO_KEYS = "(no key files: run a Create Key node, then press R)"
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
                               tooltip="A file in models/keyface_keys. No key yet? Run a Create Key node once (or "
                                       "python -m keyface_core.keygen NAME), then press R to refresh this list."),
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
        # Re-run whenever the file's content changes, even at equal size and mtime (a backup restored with
        # `cp -p`, a sync tool): a digest of the content keyed with a per-process random salt, so the cache
        # key says nothing about the key, even in memory. Key files are tiny; reading one per queue is free.
        if source == "key file":
            path = keys_dir() / key_file
            try:
                content = path.read_bytes()
            except OSError:
                return f"{path}:missing"
            return f"{path}:{hmac.new(_FINGERPRINT_SALT, content, 'sha256').hexdigest()}"
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
        return (f"no key file selected; make one with a Create Key node (or python -m keyface_core.keygen NAME), "
                f"which writes it to {keys_dir()}, then refresh the node list (press R) and pick it.")
    if check_exists and not (keys_dir() / key_file).is_file():
        return (f"key file '{key_file}' is not in {keys_dir()}: copy the key file there (or create a new key with "
                f"`python -m keyface_core.keygen {Path(key_file).stem}`; a new key cannot restore old images), "
                "then press R to refresh.")
    return None


_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def key_file_name(name: str) -> str:
    """NAME -> NAME.key, refusing anything but a plain file name (no folders, no hidden files)."""
    name = (name or "").strip()
    base = name[: -len(KEY_FILE_SUFFIX)] if name.endswith(KEY_FILE_SUFFIX) else name
    if not _KEY_NAME.fullmatch(base) or ".." in base:
        raise KeyMaterialError("the key name must be a plain file name: letters, digits, '-', '_' or '.', starting "
                               "with a letter or digit, at most 64 characters (e.g. my_keyface); no folders.")
    return base + KEY_FILE_SUFFIX


def create_key(name: str) -> tuple[Path, bool]:
    """Write a new 256-bit key file (mode 600) in the keys folder; (path, created). Never overwrites."""
    path = keys_dir() / key_file_name(name)
    if path.exists():
        return path, False
    try:
        return write_key_file(path), True
    except KeyMaterialError:
        if path.exists():   # made by someone else between the check and the write: still never overwritten
            return path, False
        raise
    except OSError as err:
        raise KeyMaterialError(f"could not write the key file in {path.parent}: {err.strerror or type(err).__name__}. "
                               "Check that the folder exists and is writable.") from None


class CreateKey(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KeyFaceCreateKey", display_name="Create Key", category=CATEGORY, is_output_node=True,
            description="Makes a new secret key without a terminal: writes a 256-bit key file to "
                        "models/keyface_keys on the ComfyUI server (owner-only, mode 600) and never overwrites one. "
                        "Run it once, press R, and pick the file in Load Key. Back the file up: without it, nothing "
                        "anonymized with it can be restored.",
            inputs=[io.String.Input("name", default="my_keyface",
                                    tooltip="Name of the new key file (NAME.key). If it exists already it is kept as "
                                            "it is, never overwritten.")],
            outputs=[io.String.Output(display_name="key_file", tooltip="The key file's name (never its content): "
                                                                       "the value to pick in Load Key.")],
        )

    @classmethod
    def fingerprint_inputs(cls, name):
        # Runs again when the file appears or disappears (never reads it).
        try:
            path = keys_dir() / key_file_name(name)
        except KeyMaterialError:
            return f"invalid:{name}"
        return f"{path}:{path.exists()}"

    @classmethod
    def execute(cls, name) -> io.NodeOutput:
        path, created = create_key(name)
        if created:
            text = (f"Created the key file {path} (256-bit, readable only by the server's user). BACK IT UP NOW: "
                    "without a backup, nothing anonymized with this key can ever be restored, by anyone. "
                    "Press R, then pick it in Load Key.")
            log.info("KeyFace: created key file %s", path)
        else:
            text = (f"The key file {path} already exists: it was NOT overwritten (KeyFace never replaces a key). "
                    "Pick it in Load Key, or enter another name to make a new key.")
            log.warning("KeyFace: Create Key left the existing key file %s as it is", path)
        return io.NodeOutput(path.name, ui=ui.PreviewText(text))


NODES = [CreateKey, LoadKey]
