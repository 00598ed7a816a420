"""Every photo in ../shared/faces: each detected face anonymized, saved, loaded and restored."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import faces_dir

PHOTOS = sorted(p for p in faces_dir().glob("*") if p.suffix.lower() in (".jpg", ".png")) if faces_dir().is_dir() else []


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def anonymize_to_png(kf, tiny, key, image, path, store_payload):
    """Face path as the shipped workflow runs it: detect, crop, invert, flip, regenerate, paste, save, load."""
    models, vae, _ = tiny
    F, C, M = kf.face_nodes, kf.core_nodes, kf.metadata
    _, faces = F.detect(image, crop_size=64)
    crops, masks, faces = F.crop(image, faces)
    latent = {"samples": vae.encode(crops)}
    noise, _ = C.invert_latent(models["eps"], latent, 6, "normal", "exact", 1.0, mask=masks)
    anon, _ = C.regenerate_latent(models["eps"], C.flip_latent(noise, key))
    anonymized = F.paste(image, vae.decode(anon["samples"]), faces)
    M.write_png_atomic(path, F._to_uint8(anonymized[0]), F.build_record(faces, anon["keyface"], store_payload))
    pixels, record, _ = M.read_png(path)
    loaded = torch.from_numpy(pixels.astype(np.float32) / 255.0)[None]
    return latent, faces, pixels, record, loaded


@pytest.mark.skipif(not PHOTOS, reason="../shared/faces not found (set KEYFACE_FACES_DIR)")
@pytest.mark.parametrize("photo", PHOTOS, ids=lambda p: p.name)
def test_photo_round_trip(tiny, kf, key_pair, tmp_path, photo):
    models, vae, _ = tiny
    F, C = kf.face_nodes, kf.core_nodes
    image = torch.from_numpy(np.array(Image.open(photo).convert("RGB")).astype(np.float32) / 255.0)[None]
    with torch.inference_mode():
        latent, faces, pixels, record, loaded = anonymize_to_png(kf, tiny, key_pair[0], image, tmp_path / "anon.png", True)
        stored, stored_faces, exact = F.record_to_inputs(record, loaded)
        restored, _ = C.restore_latent(models["eps"], stored, key_pair[0])
    assert exact and len(record.faces) == len(faces.faces) >= 1
    assert rel(restored["samples"], latent["samples"]) <= 1e-4
    # Background: every pixel outside all soft crop masks is bit-identical to the input photo.
    original = F._to_uint8(image[0])
    untouched = np.ones(original.shape[:2], bool)
    for region in faces.faces:
        x, y, size = region.box
        soft = torch.nn.functional.interpolate(region.mask[None, None], size=(size, size), mode="bilinear", antialias=True)[0, 0]
        untouched[y:y + size, x:x + size] &= (soft == 0).numpy()
    assert np.array_equal(pixels[untouched], original[untouched])
    assert not np.array_equal(pixels, original)


def test_restore_without_payload_is_approximate_and_says_so(tiny, kf, key_pair, tmp_path, caplog):
    models, vae, _ = tiny
    F, C = kf.face_nodes, kf.core_nodes
    image = torch.from_numpy(np.array(Image.open(PHOTOS[0] if PHOTOS else "assets/sample_face.jpg").convert("RGB")).astype(np.float32) / 255.0)[None]
    with torch.inference_mode():
        latent, _, _, record, loaded = anonymize_to_png(kf, tiny, key_pair[0], image, tmp_path / "anon.png", False)
        with pytest.raises(kf.errors.MetadataError, match="connect a VAE"):
            F.record_to_inputs(record, loaded)
        with caplog.at_level(logging.WARNING):
            stored, _, exact = F.record_to_inputs(record, loaded, vae)
        restored, _ = C.restore_latent(models["eps"], stored, key_pair[0])
    assert not exact and "APPROXIMATE" in caplog.text
    error = rel(restored["samples"], latent["samples"])
    print(f"\nrestore without payload (re-encoded 8-bit pixels, random tiny model): relative error {error:.3g}")
    assert torch.isfinite(restored["samples"]).all()
