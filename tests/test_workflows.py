"""The shipped workflows, run through ComfyUI's own validator and executor (checkpoint loader swapped
for a seeded tiny model). The key-material scan of everything they write is in test_leaks.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO

CROP = 128  # the tiny model's working size; shipped workflows use 512


def workflow_paths(workflow_id: str) -> tuple[Path, Path]:
    """(UI file, API file) of a shipped workflow by its id ("anonymize", "restore", "anonymize_group"; the old
    file stems "keyface_anonymize"... still work, so tests written against them keep running)."""
    sys.path.insert(0, str(REPO / "scripts"))
    import make_workflows
    return make_workflows.paths(workflow_id.removeprefix("keyface_"))


def load_api(name: str) -> dict:
    """A shipped workflow's API twin with the checkpoint loader swapped for the in-process tiny model."""
    prompt = json.loads(workflow_paths(name)[1].read_text())
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["class_type"] = "KeyFaceDevTinyCheckpoint"
            node["inputs"] = {"ckpt_name": "tiny", "prediction": "eps", "seed": 0}
        if node["class_type"] == "KeyFaceFaceMask":
            node["inputs"]["crop_size"] = CROP
    return prompt


def run(prompt):
    from keyface_dev import comfy_host
    executor, server = comfy_host.run_prompt(prompt)
    return executor, server


def newest(folder: Path, pattern: str) -> Path:
    return max(folder.glob(pattern), key=lambda p: p.stat().st_mtime_ns)


def test_workflow_files_are_generated_from_one_definition():
    result = subprocess.run([sys.executable, "scripts/make_workflows.py", "--check"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def anonymized(host, kf):
    nodes, work = host
    executor, server = run(load_api("keyface_anonymize"))
    assert executor.success, server.messages
    out = newest(work / "output" / "keyface", "anonymized_*.png")
    return out, executor, server


def test_anonymize_workflow_writes_only_pixels_and_keyface_metadata(host, kf, anonymized):
    nodes, work = host
    path, _, _ = anonymized
    with Image.open(path) as im:
        assert set(im.info) <= {"keyface"}, im.info.keys()
        assert "exif" not in im.info and not im.getexif()
    assert "sample" not in path.name and "obama" not in path.name
    pixels, record, info = kf.pngio.read_png(path)
    assert record is not None and len(record.faces) == 1 and record.render.sampler == "dpmpp_2m"
    assert record.keyed.lock.scramble == "pairswap" and record.inversion.steps == 20
    original = np.array(Image.open(work / "input" / "keyface_sample_face.jpg").convert("RGB"))
    changed = np.any(pixels != original, axis=-1)
    # Every pixel outside the stored face crop mask is bit-identical to the input.
    face = record.faces[0]
    x, y, size = face.box
    assert not changed[:y].any() and not changed[y + size:].any()
    assert not changed[:, :x].any() and not changed[:, x + size:].any()
    assert changed[y:y + size, x:x + size].mean() > 0.05


def test_restore_workflow_gives_back_the_original_photo_and_wrong_key_refuses(host, kf, anonymized):
    """Run as shipped; compare the restored photo with the original photo: identical outside the face box, and
    inside it within 1 gray level of the ideal (the original with VAE decode(original latent) pasted alike)."""
    import torch
    from keyface_dev import tiny_models
    nodes, work = host
    path, _, _ = anonymized
    shutil.copy(path, work / "input" / "keyface_anonymized.png")
    executor, server = run(load_api("keyface_restore"))
    assert executor.success, server.messages
    restored = np.array(Image.open(newest(work / "output" / "keyface", "restored_*.png")).convert("RGB"))
    original = np.array(Image.open(work / "input" / "keyface_sample_face.jpg").convert("RGB"))
    anon, record, _ = kf.pngio.read_png(path)
    x, y, size = record.faces[0].box
    outside = np.ones(anon.shape[:2], bool)
    outside[y:y + size, x:x + size] = False
    assert np.array_equal(restored[outside], original[outside])
    assert np.any(restored[y:y + size, x:x + size] != anon[y:y + size, x:x + size])
    F = kf.face_nodes
    vae = tiny_models.vae_model(0)
    image = torch.from_numpy(original.astype(np.float32) / 255.0)[None]
    _, faces = F.detect(image, crop_size=CROP)
    crops, _, faces = F.crop(image, faces)
    with torch.inference_mode():
        ideal = F._to_uint8(F.paste(image, F.decode_crops(vae, vae.encode(crops)), faces)[0])
    assert int(np.abs(restored.astype(int) - ideal.astype(int)).max()) <= 1
    shown = str(executor.history_result["outputs"])       # what /history and the node's UI text show
    assert "verified exact" in shown, shown

    wrong = load_api("keyface_restore")
    next(n for n in wrong.values() if n["class_type"] == "KeyFaceLoadKey")["inputs"]["key_file"] = "other.key"
    executor, server = run(wrong)
    assert not executor.success
    errors = [data for event, data in executor.status_messages if event == "execution_error"]
    assert errors and "does not match" in errors[0]["exception_message"]


def test_group_workflow_anonymizes_every_face(host, kf):
    nodes, work = host
    executor, server = run(load_api("keyface_anonymize_group"))
    assert executor.success, server.messages
    record = kf.pngio.read_png(newest(work / "output" / "keyface", "anonymized_*.png"))[1]
    assert len(record.faces) >= 2
    assert len(set(record.keyed.faces.nonces)) == len(record.faces)


# ------------------------------------------------------------------------------------ Create Key (issue 15, item 6)

def create_key_prompt(name: str) -> dict:
    return {"1": {"class_type": "KeyFaceCreateKey", "inputs": {"name": name}}}


def test_create_key_writes_a_new_owner_only_key_and_says_where(host, kf):
    import os
    import stat
    keys = Path(os.environ["KEYFACE_KEYS_DIR"])
    executor, server = run(create_key_prompt("made_in_the_editor"))
    assert executor.success, server.messages
    path = keys / "made_in_the_editor.key"
    content = path.read_text().strip()
    assert len(content) == 64 and int(content, 16) >= 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    shown = json.dumps(executor.history_result["outputs"])
    assert str(path) in shown and "BACK IT UP" in shown and "nothing anonymized with this key can ever be restored" in shown
    assert content not in shown and content.upper() not in shown
    loaded = kf.key_nodes.LoadKey.execute("key file", path.name, "KEYFACE_KEY", "key").args[0]
    assert "made_in_the_editor.key" in str(loaded) and content not in repr(loaded)


def test_create_key_never_overwrites_an_existing_key(host, kf):
    import os
    keys = Path(os.environ["KEYFACE_KEYS_DIR"])
    before = (keys / "my_keyface.key").read_bytes()
    executor, server = run(create_key_prompt("my_keyface"))
    assert executor.success, server.messages
    assert (keys / "my_keyface.key").read_bytes() == before
    shown = json.dumps(executor.history_result["outputs"])
    assert "already exists" in shown and "NOT overwritten" in shown


@pytest.mark.parametrize("name", ["../escape", "sub/dir", "", ".hidden", "x" * 80, "a..b"])
def test_create_key_refuses_names_that_are_not_plain_file_names(host, kf, name):
    import os
    keys = Path(os.environ["KEYFACE_KEYS_DIR"])
    before = sorted(p.name for p in keys.iterdir())
    executor, _ = run(create_key_prompt(name))
    errors = [data for event, data in executor.status_messages if event == "execution_error"]
    assert not executor.success and "plain file name" in errors[0]["exception_message"]
    assert sorted(p.name for p in keys.iterdir()) == before
    assert not (keys.parent / "escape.key").exists()
