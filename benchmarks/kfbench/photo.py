"""The whole-photo path, built from the pack's own functions (nodes/face_nodes.py, nodes/core_nodes.py):

anonymize: Face Mask (dlib) -> Crop Faces -> VAE Encode -> Invert to Noise (mask) -> Apply Key Flip
           -> Regenerate -> VAE Decode -> Paste Faces
save/load: Save Anonymized's record (with or without the latent payload) -> PNG -> Load Anonymized
restore:   Restore -> VAE Decode -> Paste Faces (into the anonymized photo)

Also: one face in a ~12 MP photo vs the same face given as a 512² crop.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .common import FACES_DIR, Models, compare, new_key, pack, timed_clone


def load_image(path: Path) -> torch.Tensor:
    """A ComfyUI IMAGE [1,H,W,3] float32 in 0..1, as LoadImage makes it."""
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).astype(np.float32) / 255.0)[None]


def to_uint8(image: torch.Tensor) -> np.ndarray:
    return np.clip(np.round(image[0, ..., :3].cpu().numpy() * 255.0), 0, 255).astype(np.uint8)


def as_saved(image: torch.Tensor) -> torch.Tensor:
    """The IMAGE as an 8-bit PNG holds it."""
    return torch.from_numpy(to_uint8(image).astype(np.float32) / 255.0)[None]


def anonymize_photo(models: Models, image: torch.Tensor, key, steps: int, mode: str, crop_size: int,
                    stages: dict | None = None):
    """-> (anonymized IMAGE, FaceSet, anonymized LATENT (Regenerate's output), model calls)."""
    FN = pack("nodes.face_nodes")
    cn = pack("nodes.core_nodes")
    cond = models.cond
    mark = [time.perf_counter()]

    def stage(name):
        now = time.perf_counter()
        if stages is not None:
            stages[name] = stages.get(name, 0.0) + now - mark[0]
        mark[0] = now

    _, faces = FN.detect(image, crop_size)
    stage("detect")
    crops, masks, faces = FN.crop(image, faces)
    stage("crop")
    with torch.no_grad():
        latent = {"samples": models.vae.encode(crops[..., :3]).detach()}
    stage("vae_encode")
    noise, inv = cn.invert_latent(models.model, latent, steps, "normal", mode, 1.0, cond, cond, mask=masks,
                                  face_indices=[r.index for r in faces.faces])
    anon, reg = cn.regenerate_latent(models.model, cn.flip_latent(noise, key), cond, cond)
    stage("diffusion")
    with torch.no_grad():
        decoded = models.vae.decode(anon["samples"]).detach()
    stage("vae_decode")
    out = FN.paste(image, decoded, faces)
    stage("paste")
    return out, faces, anon, inv.model_calls + reg.model_calls


def save_and_load(models: Models, anon_image: torch.Tensor, faces, anon_latent: dict, store_payload: bool,
                  folder: Path, name: str):
    """Write the anonymized PNG (Save Anonymized's writer), read it back (Load Anonymized's reader).

    -> (IMAGE as loaded, anonymized LATENT for Restore, FaceSet, exact payload?, file size in bytes)."""
    FN = pack("nodes.face_nodes")
    LI = pack("nodes.latent_info")
    meta = pack("keyface_core.metadata")
    record = FN.build_record(faces, LI.info_of(anon_latent), store_payload)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    meta.write_png_atomic(path, to_uint8(anon_image), record, overwrite=True)
    pixels, loaded, _ = meta.read_png(path)
    image = torch.from_numpy(pixels.astype(np.float32) / 255.0)[None]
    with torch.no_grad():
        latent, faces2, exact = FN.record_to_inputs(loaded, image, None if store_payload else models.vae)
    size = path.stat().st_size
    return image, latent, faces2, exact, size


def restore_photo(models: Models, image: torch.Tensor, latent: dict, faces, key, allow_wrong_key: bool = False):
    """-> (restored IMAGE, restored LATENT, model calls)."""
    FN = pack("nodes.face_nodes")
    cn = pack("nodes.core_nodes")
    restored, calls = cn.restore_latent(models.model, latent, key, models.cond, models.cond,
                                        allow_wrong_key=allow_wrong_key)
    with torch.no_grad():
        decoded = models.vae.decode(restored["samples"]).detach()
    return FN.paste(image, decoded, faces), restored, calls["invert_calls"] + calls["regenerate_calls"]


def upscale_to(image_path: Path, megapixels: float) -> torch.Tensor:
    """The photo upscaled (bicubic) to about `megapixels`, as a ComfyUI IMAGE."""
    img = Image.open(image_path).convert("RGB")
    factor = math.sqrt(megapixels * 1e6 / (img.width * img.height))
    big = img.resize((round(img.width * factor), round(img.height * factor)), Image.BICUBIC)
    return torch.from_numpy(np.asarray(big).astype(np.float32) / 255.0)[None]


def photo_vs_crop(models: Models, steps: int, reps: int, progress, megapixels: float = 12.0,
                  crop_size: int = 512, photo: str = "obama.jpg") -> dict:
    """Anonymize one face in a ~12 MP photo vs the same face handed in as a crop_size² image.

    Both go through the same pipeline (detect, crop, encode, invert, flip, regenerate, decode, paste);
    the crop's face is simply detected in the small image. The model work is identical (one
    crop_size² face); the difference is what a large photo costs around it.
    """
    FN = pack("nodes.face_nodes")
    masks = pack("keyface_core.masks")
    key = new_key()
    big = upscale_to(FACES_DIR / photo, megapixels)
    _, faces = FN.detect(big, crop_size)
    region = faces.faces[0]
    small = masks.crop_square(big[0], region.box, crop_size)[None].contiguous()
    timed, timer = timed_clone(models.model)
    run_models = Models(models.name, timed, models.cond, models.vae)
    stages = {"photo": {}, "crop": {}}
    out = {}

    def run(kind, image):
        def go():
            result = anonymize_photo(run_models, image, key, steps, "exact", crop_size, stages[kind])
            out[kind] = result
        return go

    run("crop", small)()  # warm-up: first 512² VAE and 64×64 UNet calls
    stages["crop"].clear()
    timings = compare({"photo": run("photo", big), "crop": run("crop", small)}, reps, timer, progress, warmup=False)
    runs = reps
    return {"model": models.name, "photo": photo, "photo_size": [int(big.shape[2]), int(big.shape[1])],
            "megapixels": big.shape[1] * big.shape[2] / 1e6, "crop_size": crop_size, "steps": steps, "reps": reps,
            "faces_found": {"photo": len(out["photo"][1].faces), "crop": len(out["crop"][1].faces)},
            "timings": {k: v.as_dict() for k, v in timings.items()},
            "ratio photo / crop": timings["photo"].median / timings["crop"].median,
            "extra_s": timings["photo"].median - timings["crop"].median,
            "stages_mean_s": {k: {s: v / runs for s, v in st.items()} for k, st in stages.items()}}
