"""Shared fixtures: a headless CPU ComfyUI with KeyFace loaded, seeded tiny models, a key."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KEY_NAME = "my_keyface.key"


def faces_dir() -> Path:
    return Path(os.environ.get("KEYFACE_FACES_DIR", REPO.parent / "shared" / "faces"))


def keyface_cli(*args, env: dict | None = None, timeout: int = 600):
    """`python -m keyface ARGS` as a user runs it (a subprocess from the repo root, offline), captured."""
    import subprocess
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "keyface", *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=REPO, timeout=timeout)


def photo_folder(folder: Path, names) -> Path:
    """A folder holding copies of these shared face photos."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(faces_dir() / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def host(tmp_path_factory):
    """(nodes module, workdir) of a booted ComfyUI; input/output folders and the keys folder are temporary."""
    work = tmp_path_factory.mktemp("comfy")
    keys = work / "keys"
    keys.mkdir()
    os.environ["KEYFACE_KEYS_DIR"] = str(keys)
    from keyface_core.keys import write_key_file
    write_key_file(keys / KEY_NAME)
    write_key_file(keys / "other.key")
    from keyface_dev import comfy_host, tiny_models
    nodes = comfy_host.boot()
    tiny_models.register_test_nodes()
    import folder_paths
    for name in ("input", "output", "temp"):
        (work / name).mkdir()
    folder_paths.set_input_directory(str(work / "input"))
    folder_paths.set_output_directory(str(work / "output"))
    folder_paths.set_temp_directory(str(work / "temp"))
    for sample in (REPO / "assets").glob("sample_*.jpg"):
        shutil.copy(sample, work / "input" / f"keyface_{sample.name}")
    return nodes, work


@pytest.fixture(scope="session")
def kf(host):
    """KeyFace's modules as ComfyUI loaded them (class identity matters for isinstance checks)."""
    from keyface_dev import comfy_host

    class Modules:
        core_nodes = comfy_host.pack_module("nodes.core_nodes")
        key_nodes = comfy_host.pack_module("nodes.key_nodes")
        conditioning = comfy_host.pack_module("nodes.conditioning")
        face_nodes = comfy_host.pack_module("nodes.face_nodes")
        keys = comfy_host.pack_module("keyface_core.keys")
        errors = comfy_host.pack_module("keyface_core.errors")
        metadata = comfy_host.pack_module("keyface_core.metadata")
        sampling = comfy_host.pack_module("keyface_core.sampling")
        protocol = comfy_host.pack_module("keyface_core.protocol")
        pngio = comfy_host.pack_module("keyface_core.pngio")
        record = comfy_host.pack_module("keyface_core.record")
    return Modules


@pytest.fixture(scope="session")
def tiny(host):
    from keyface_dev import tiny_models
    models = {p: tiny_models.unet_model(0, p) for p in ("eps", "v", "flow")}
    return models, tiny_models.vae_model(0), tiny_models.clip_model(0)


@pytest.fixture(scope="session")
def key_pair(host, kf):
    keys_dir = Path(os.environ["KEYFACE_KEYS_DIR"])
    return kf.keys.load_key_file(keys_dir / KEY_NAME), kf.keys.load_key_file(keys_dir / "other.key")
