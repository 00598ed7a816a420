"""A PNG written by KeyFace file format v1 (tests/fixtures/v1, made by make_fixture.py with the v1 code)
must keep restoring bit-exact through every later format change."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import REPO

FIXTURE = REPO / "tests" / "fixtures" / "v1"


def _sha(samples: torch.Tensor) -> str:
    return hashlib.sha256(samples.detach().cpu().to(torch.float32).contiguous().numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def expected():
    return json.loads((FIXTURE / "expected.json").read_text())


@pytest.fixture(scope="module")
def fixture_key(kf, tmp_path_factory):
    # A copy with owner-only permissions (git does not keep file modes): no "readable by others" warning.
    path = tmp_path_factory.mktemp("v1key") / "test.key"
    shutil.copyfile(FIXTURE / "test.key", path)
    path.chmod(0o600)
    return kf.keys.load_key_file(path)


@pytest.fixture(scope="module")
def positive(tiny, expected):
    import nodes as comfy_nodes
    return comfy_nodes.CLIPTextEncode().encode(tiny[2], expected["settings"]["prompt"])[0]


def test_v1_fixture_file_is_the_committed_one(expected):
    data = (FIXTURE / "anonymized.png").read_bytes()
    assert hashlib.sha256(data).hexdigest() == expected["png_sha256"]
    assert len(data) == expected["png_bytes"] < 1_000_000


def test_v1_fixture_restores_bit_exact(host, kf, tiny, fixture_key, positive, expected):
    models, vae, _ = tiny
    image, latent, faces, warnings = kf.face_nodes.load_anonymized(str(FIXTURE / "anonymized.png"))
    assert warnings == []
    assert len(faces.faces) == expected["faces"]
    restored, calls = kf.core_nodes.restore_latent(models["eps"], latent, fixture_key, positive)
    assert list(restored["samples"].shape) == expected["latent_shape"]

    # The original crop latent, recomputed from the photo the fixture was made from and the stored box.
    import nodes as comfy_nodes
    photo = comfy_nodes.LoadImage().load_image("keyface_sample_face.jpg")[0]
    crops, _, _ = kf.face_nodes.crop(photo, faces)
    original = vae.encode(crops[..., :3])
    error = float((restored["samples"].detach().double() - original.detach().double()).abs().max())
    assert _sha(original) == expected["original_latent_sha256"], "the tiny VAE or the crop changed"
    assert error == 0, f"v1 restore differs from the original crop latent by {error:.3g} (max abs)"
    assert torch.equal(restored["samples"], original)
    assert _sha(restored["samples"]) == expected["restored_latent_sha256"] == expected["original_latent_sha256"]


def test_v1_fixture_refuses_another_key(host, kf, tiny, key_pair, positive):
    models, _, _ = tiny
    _, latent, _, _ = kf.face_nodes.load_anonymized(str(FIXTURE / "anonymized.png"))
    with pytest.raises(kf.errors.WrongKeyError, match="does not match"):
        kf.core_nodes.restore_latent(models["eps"], latent, key_pair[0], positive)
