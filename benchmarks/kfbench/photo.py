"""The whole-photo path (format v2), built from the pack's own functions (nodes/face_nodes.py, nodes/core_nodes.py):

anonymize: Face Mask (dlib) -> Crop Faces -> VAE Encode -> Invert to Noise (mask) -> Apply Key Flip
           -> Regenerate -> VAE Decode -> Paste Faces
save/load: Save Anonymized's record (keyed noise; lossless mode adds the sealed pixel residual) -> PNG
           -> Load Anonymized (the record bound to its pixels)
restore:   Restore (unscramble + retrace) -> Restore Photo (anonymized face removed from the feather band;
           lossless files: the original pixels)

Also: one face in a ~12 MP photo vs the same face given as a 512² crop, and the bytes lossless mode adds.
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


def anonymize_photo(models: Models, image: torch.Tensor, key, steps: int, mode: str, crop_size: int,
                    stages: dict | None = None, sampler=None, coverage: str = "face"):
    """-> (anonymized IMAGE, FaceSet, anonymized LATENT (Regenerate's output), original face LATENT, model calls).

    Regenerate draws with `sampler` (default: the node's, dpmpp_2m) at the same steps as the inversion."""
    FN = pack("nodes.face_nodes")
    cn = pack("nodes.core_nodes")
    cond = models.cond
    mark = [time.perf_counter()]

    def stage(name):
        now = time.perf_counter()
        if stages is not None:
            stages[name] = stages.get(name, 0.0) + now - mark[0]
        mark[0] = now

    _, faces = FN.detect(image, crop_size, coverage=coverage)
    stage("detect")
    crops, masks, faces = FN.crop(image, faces)
    stage("crop")
    with torch.no_grad():
        latent = {"samples": models.vae.encode(crops[..., :3]).detach()}
    stage("vae_encode")
    noise, inv = cn.invert_latent(models.model, latent, steps, "normal", mode, 1.0, cond, cond, mask=masks)
    noise = cn.with_face_indices(noise, [r.index for r in faces.faces])
    anon, reg = cn.regenerate_latent(models.model, cn.flip_latent(noise, key), cond, cond, sampler, "normal", steps)
    stage("diffusion")
    with torch.no_grad():
        decoded = FN.decode_crops(models.vae, anon["samples"])
    stage("vae_decode")
    out = FN.paste(image, decoded, faces)
    stage("paste")
    return out, faces, anon, latent, inv.model_calls + reg.model_calls


def save_and_load(models: Models, anon_image: torch.Tensor, faces, anon_latent: dict, folder: Path, name: str,
                  lossless: bool = False, original: torch.Tensor | None = None, key=None):
    """Write the anonymized PNG as Save Anonymized does (lossless: with the sealed pixel residual), read it back
    as Load Anonymized does. -> (IMAGE as loaded, anonymized LATENT for Restore, FaceSet, file bytes,
    sealed residual bytes per face (lossless) or None, Load Anonymized's warnings)."""
    FN = pack("nodes.face_nodes")
    LI = pack("nodes.latent_info")
    pngio = pack("keyface_core.pngio")
    info = LI.info_of(anon_latent)
    pixels = FN._to_uint8(anon_image[0])
    sealed = FN._seal_pixels(info, faces, pixels, original, models.vae, key) if lossless else None
    record = FN.build_record(faces, info, pixels, sealed)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    path.unlink(missing_ok=True)          # the writer never overwrites; the harness reruns into the same folder
    pngio.write_png_atomic(path, pixels, record)
    image, latent, faces2, warnings = FN.load_anonymized(path)
    return (image, latent, faces2, path.stat().st_size,
            None if sealed is None else [len(sp.sealed) for sp in sealed], list(warnings))


def restore_photo(models: Models, image: torch.Tensor, latent: dict, faces, key, allow_wrong_key: bool = False,
                  lossless_key=None):
    """Restore -> Restore Photo. -> (restored IMAGE, restored LATENT, Restore's stats, Restore Photo's report)."""
    FN = pack("nodes.face_nodes")
    cn = pack("nodes.core_nodes")
    restored, stats = cn.restore_latent(models.model, latent, key, models.cond, models.cond,
                                        allow_wrong_key=allow_wrong_key)
    with torch.no_grad():
        out, report = FN.restore_photo_from(image, faces, restored, models.vae, lossless_key)
    return out, restored, stats, report


def ideal_photo(models: Models, image: torch.Tensor, latent: dict, faces) -> np.ndarray:
    """The ideal restored photo: the original with VAE decode(original latent) pasted through the same masks."""
    FN = pack("nodes.face_nodes")
    with torch.no_grad():
        return FN._to_uint8(FN.paste(image, FN.decode_crops(models.vae, latent["samples"]), faces)[0])


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


def lossless_sizes(models: Models, folder: Path, steps: int, crop_size: int, out_dir: Path, progress,
                   limit: int | None = None) -> dict:
    """Issue 11 item 3: the bytes lossless mode adds per face at `crop_size`² crops, on every photo of `folder`.

    Each photo is anonymized once and saved twice (lossless off / on); the lossless file is restored with the key
    and must give the original pixels back bit for bit. The residual is the original box pixels minus what Restore
    Photo gives without it, so its size depends on how far VAE decode(original latent) is from the original pixels:
    with the random tiny VAE that is the whole face (a worst case); a real VAE leaves a much smaller residual."""
    from .identity import photo_files
    F = pack("keyface_core.faces")
    key = new_key("lossless")
    rows = []
    files = [p for p in photo_files(folder)]
    if limit:
        files = files[:limit]
    for path in files:
        image = load_image(path)
        if not F.detect_faces(to_uint8(image)):
            progress.update(1)
            continue
        anon, faces, anon_latent, _, _ = anonymize_photo(models, image, key, steps, "exact", crop_size)
        _, _, _, plain_bytes, _, _ = save_and_load(models, anon, faces, anon_latent, out_dir, path.stem + "_plain")
        loaded, latent, faces_l, lossless_bytes, sealed, _ = save_and_load(
            models, anon, faces, anon_latent, out_dir, path.stem + "_lossless", lossless=True, original=image, key=key)
        out, _, _, report = restore_photo(models, loaded, latent, faces_l, key, lossless_key=key)
        near, _, _, _ = restore_photo(models, loaded, latent, faces_l, key)
        original = to_uint8(image)
        residual = np.abs(to_uint8(near).astype(np.int16) - original.astype(np.int16))
        box_pixels = sum(int(r.box[2]) ** 2 for r in faces.faces)
        proxy = {str(sd): [_proxy_residual_bytes(r, sd, seed) for seed, r in enumerate(faces.faces)]
                 for sd in PROXY_SD}
        rows.append({"photo": path.name, "faces": len(faces.faces), "boxes": [list(r.box) for r in faces.faces],
                     "sealed_bytes_per_face": sealed, "png_bytes_plain": plain_bytes,
                     "png_bytes_lossless": lossless_bytes, "png_bytes_added": lossless_bytes - plain_bytes,
                     "residual_nonzero_pixels": int((residual.max(axis=-1) > 0).sum()), "box_pixels": box_pixels,
                     "residual_max": int(residual.max()), "proxy_sealed_bytes_per_face": proxy,
                     "bit_exact": bool(np.array_equal(to_uint8(out), original)), "report": report})
        progress.update(1)
    per_face = [b for r in rows for b in r["sealed_bytes_per_face"]]
    per_box_px = [b / int(box[2]) ** 2 for r in rows for b, box in zip(r["sealed_bytes_per_face"], r["boxes"])]
    return {"model": models.name, "crop_size": crop_size, "steps": steps, "photos": len(rows),
            "faces": len(per_face), "rows": rows,
            "sealed_bytes_per_face": {"min": min(per_face), "median": float(np.median(per_face)),
                                      "mean": float(np.mean(per_face)), "max": max(per_face)} if per_face else None,
            "bytes_per_box_pixel_median": float(np.median(per_box_px)) if per_box_px else None,
            "proxy_sd": list(PROXY_SD),
            "proxy_sealed_bytes_per_face_median": {str(sd): float(np.median(
                [b for r in rows for b in r["proxy_sealed_bytes_per_face"][str(sd)]])) for sd in PROXY_SD} if rows else None,
            "all_bit_exact": all(r["bit_exact"] for r in rows)}


PROXY_SD = (2.0, 4.0, 8.0)     # gray levels: white reconstruction error of PSNR 42, 36 and 30 dB inside the mask
AEAD_OVERHEAD = 12 + 16        # ChaCha20-Poly1305 nonce + tag (keyface_core.secure)


def _proxy_residual_bytes(region, sd: float, seed: int) -> int:
    """Sealed bytes of a stand-in residual: white Gaussian error of `sd` gray levels (rounded) on every pixel the soft
    mask touches, zero elsewhere, packed as lossless mode packs it. A real VAE's error is spatially correlated and
    compresses better than white noise of the same size, so this is an upper side for a VAE of that PSNR."""
    photo_core = pack("keyface_core.photo")
    size = int(region.box[2])
    soft = torch.nn.functional.interpolate(region.mask[None, None], size=(size, size), mode="bilinear",
                                           antialias=True)[0, 0].numpy()
    gen = np.random.default_rng(seed)
    residual = np.rint(gen.normal(0.0, sd, (size, size, 3))).astype(np.int16) * (soft > 0)[..., None]
    return len(photo_core.pack_residual(residual)) + AEAD_OVERHEAD
