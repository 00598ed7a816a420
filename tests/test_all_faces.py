"""Every photo in ../shared/faces: each detected face anonymized, saved, loaded, restored, and compared with the
original photo (format v2): the face latents bit for bit, the restored photo within 1 gray level of the ideal
everywhere (the feather band included), and in lossless mode the original pixels bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import faces_dir

PHOTOS = sorted(p for p in faces_dir().glob("*") if p.suffix.lower() in (".jpg", ".png")) if faces_dir().is_dir() else []
STEPS = 6


def anonymize_to_png(kf, tiny, key, image, path, lossless=False, sampler=None):
    """Face path as the shipped workflow runs it: detect, crop, invert, flip, draw, paste, save; then load."""
    models, vae, _ = tiny
    F, C = kf.face_nodes, kf.core_nodes
    _, faces = F.detect(image, crop_size=64)
    crops, masks, faces = F.crop(image, faces)
    latent = {"samples": vae.encode(crops)}
    noise, _ = C.invert_latent(models["eps"], latent, STEPS, "normal", "exact", 1.0, mask=masks)
    anon, _ = C.regenerate_latent(models["eps"], C.flip_latent(noise, key), sampler=sampler, steps=STEPS)
    anonymized = F.paste(image, vae.decode(anon["samples"]), faces)
    pixels = F._to_uint8(anonymized[0])
    sealed = F._seal_pixels(anon["keyface"], faces, pixels, image, vae, key) if lossless else None
    kf.pngio.write_png_atomic(path, pixels, F.build_record(faces, anon["keyface"], pixels, sealed))
    loaded, loaded_latent, loaded_faces, warnings = F.load_anonymized(path)
    assert not warnings
    return latent, faces, pixels, loaded, loaded_latent, loaded_faces


def ideal_photo(kf, vae, image, latent, faces) -> np.ndarray:
    """The original photo with VAE decode(original latent) pasted through the same masks, 8-bit."""
    F = kf.face_nodes
    with torch.inference_mode():
        return F._to_uint8(F.paste(image, F.decode_crops(vae, latent["samples"]), faces)[0])


def load_photo(path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB")).astype(np.float32) / 255.0)[None]


@pytest.mark.skipif(not PHOTOS, reason="../shared/faces not found (set KEYFACE_FACES_DIR)")
@pytest.mark.parametrize("photo", PHOTOS, ids=lambda p: p.name)
def test_photo_round_trip(tiny, kf, key_pair, tmp_path, photo):
    models, vae, _ = tiny
    F, C = kf.face_nodes, kf.core_nodes
    image = load_photo(photo)
    with torch.inference_mode():
        latent, faces, pixels, loaded, stored, stored_faces = anonymize_to_png(kf, tiny, key_pair[0], image,
                                                                            tmp_path / "anon.png")
        restored, stats = C.restore_latent(models["eps"], stored, key_pair[0])
        out, report = F.restore_photo_from(loaded, stored_faces, restored, vae)
    assert len(stored_faces.faces) == len(faces.faces) >= 1
    assert torch.equal(restored["samples"], latent["samples"])          # measured: error 0
    assert stats["model_calls"] == STEPS and report.startswith("verified exact")
    # The restored photo equals the ideal within 1 gray level everywhere, the feather band included.
    diff = np.abs(F._to_uint8(out[0]).astype(int) - ideal_photo(kf, vae, image, latent, faces).astype(int))
    assert diff.max() <= 1, f"max {diff.max()}, mean {diff.mean():.3f}"
    # Background: every pixel outside all soft crop masks is bit-identical to the input photo.
    original = F._to_uint8(image[0])
    untouched = np.ones(original.shape[:2], bool)
    for region in faces.faces:
        x, y, size = region.box
        soft = torch.nn.functional.interpolate(region.mask[None, None], size=(size, size), mode="bilinear", antialias=True)[0, 0]
        untouched[y:y + size, x:x + size] &= (soft == 0).numpy()
    assert np.array_equal(pixels[untouched], original[untouched])
    assert not np.array_equal(pixels, original)


@pytest.mark.skipif(not PHOTOS, reason="../shared/faces not found (set KEYFACE_FACES_DIR)")
@pytest.mark.parametrize("photo", PHOTOS[:3] + [p for p in PHOTOS if "and" in p.name or "two" in p.name],
                         ids=lambda p: p.name)
def test_lossless_mode_gives_back_the_original_photo(tiny, kf, key_pair, tmp_path, photo):
    models, vae, _ = tiny
    F, C = kf.face_nodes, kf.core_nodes
    image = load_photo(photo)
    with torch.inference_mode():
        _, _, _, loaded, stored, stored_faces = anonymize_to_png(kf, tiny, key_pair[0], image, tmp_path / "anon.png",
                                                                 lossless=True)
        restored, _ = C.restore_latent(models["eps"], stored, key_pair[0])
        out, report = F.restore_photo_from(loaded, stored_faces, restored, vae, key_pair[0])
        # Without the key the lossless residual stays closed, and Restore Photo says how to open it.
        _, report_nokey = F.restore_photo_from(loaded, stored_faces, restored, vae)
    assert np.array_equal(F._to_uint8(out[0]), F._to_uint8(image[0]))      # the original pixels, bit for bit
    assert "lossless, the original pixels bit for bit (keyed digest verified)" in report
    assert "connect the key to Restore Photo" in report_nokey


@pytest.mark.parametrize("sampler_name", ["euler", "dpmpp_2m", "euler_ancestral"])
def test_restored_photo_is_the_ideal_for_every_sampler(tiny, kf, key_pair, tmp_path, sampler_name):
    import comfy.samplers
    models, vae, _ = tiny
    F, C = kf.face_nodes, kf.core_nodes
    photo = PHOTOS[0] if PHOTOS else "assets/sample_face.jpg"
    image = load_photo(photo)
    with torch.inference_mode():
        latent, faces, _, loaded, stored, stored_faces = anonymize_to_png(
            kf, tiny, key_pair[0], image, tmp_path / "anon.png", sampler=comfy.samplers.sampler_object(sampler_name))
        restored, _ = C.restore_latent(models["eps"], stored, key_pair[0])
        out, _ = F.restore_photo_from(loaded, stored_faces, restored, vae)
    diff = np.abs(F._to_uint8(out[0]).astype(int) - ideal_photo(kf, vae, image, latent, faces).astype(int))
    assert diff.max() <= 1
