"""Interchange (issue 12 item 3, the CLI half): a file the CLI anonymizes restores in the ComfyUI nodes, and a file
the nodes anonymize restores in the CLI, for the same checkpoint (here the seeded tiny ComfyUI UNet, which the CLI
reaches through `dev:comfy-tiny`). Within one host the error is 0 both ways."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import KEY_NAME, faces_dir

STEPS, CROP = 6, 64


@pytest.fixture(scope="module")
def cli_model(host):
    from keyface_dev import comfy_backend
    model = comfy_backend.load("dev:comfy-tiny")
    yield model
    model.close()


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("interchange")
    shutil.copy(faces_dir() / "two_people.jpg", folder / "two.jpg")
    return folder / "two.jpg"


def test_cli_file_restores_in_the_nodes(host, kf, tiny, key_pair, cli_model, photo, tmp_path):
    from keyface import pipeline
    key, _ = key_pair
    settings = pipeline.Settings(steps=STEPS, crop_size=CROP)
    target = tmp_path / "anon.png"
    result = pipeline.anonymize_image(photo, target, settings, cli_model, key)
    assert result.status == "ok" and result.faces == 2
    clean = pipeline.clean_latents(photo, settings, cli_model)          # model space, float64
    F, C = kf.face_nodes, kf.core_nodes
    models, vae, _ = tiny
    image, latent, faces, warnings = F.load_anonymized(target)
    assert not warnings
    restored, stats = C.restore_latent(models["eps"], latent, key)
    assert stats["verification"].exact is True, stats["verification"].message()
    expected = (clean / cli_model.scale_factor).to(torch.float32)       # VAE space, as the node's LATENT
    error = float((restored["samples"] - expected).abs().max())
    assert error == 0.0


def test_node_file_restores_in_the_cli(host, kf, tiny, key_pair, cli_model, photo, tmp_path):
    from keyface import pipeline
    from PIL import Image
    key, _ = key_pair
    F, C = kf.face_nodes, kf.core_nodes
    models, vae, _ = tiny
    model = models["eps"]
    pixels = np.array(Image.open(photo).convert("RGB"))
    image = torch.from_numpy(pixels.astype(np.float32) / 255.0)[None]
    mask, faces = F.detect(image, crop_size=CROP)
    crops, masks, faces = F.crop(image, faces)
    with torch.inference_mode():
        clean = {"samples": vae.encode(crops)}
    noise, _ = C.invert_latent(model, clean, STEPS, "karras", "exact", 1.0, mask=masks)
    noise = C.with_face_indices(noise, [r.index for r in faces.faces])
    keyed = C.flip_latent(noise, key)
    drawn, _ = C.regenerate_latent(model, keyed, scheduler="karras", steps=STEPS)
    with torch.inference_mode():
        pasted = F.paste(image, F.decode_crops(vae, drawn["samples"]), faces)
    saved = F._to_uint8(pasted[0])
    info = C.info_of(drawn) if hasattr(C, "info_of") else drawn[kf.face_nodes.INFO_KEY]
    record = F.build_record(faces, info, saved)
    target = tmp_path / "node.png"
    kf.pngio.write_png_atomic(target, saved, record)
    result = pipeline.restore_image(target, tmp_path / "restored.png", pipeline.RestoreSettings(), cli_model, key)
    assert result.status == "ok" and result.verified is True and result.max_abs_error == 0.0, result.reason
    restored = pipeline.restored_latents(target, cli_model, key)
    expected = cli_model.encode(crops.permute(0, 3, 1, 2)).to(torch.float32)
    assert float((restored.to(torch.float32) - expected).abs().max()) == 0.0
