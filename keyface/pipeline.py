"""One photo through the protocol: the per-image functions both engines (local, Ray) run.

anonymize: read -> detect faces (keyface_core.faces) -> square crops + soft masks (keyface_core.masks) -> encode ->
``protocol.invert`` -> ``protocol.lock`` -> ``protocol.render`` -> decode -> paste -> the v2 record
(``keyface_core.anonymized.build``) -> atomic PNG. restore: read the record -> ``protocol.unlock`` ->
``protocol.retrace`` -> ``protocol.verify`` -> ``keyface_core.photo.restore_photo`` -> plain PNG.
Nothing here knows about batches, progress or reports; failures are raised as KeyFaceErrors with a user message.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from keyface_core import anonymized as anon
from keyface_core import faces as face_core
from keyface_core import masks as mask_core
from keyface_core import images, photo, protocol
from keyface_core import sampling
from keyface_core.errors import ImageReadError, InputMismatchError, MetadataError, NoFaceError

from . import store
from .models import latent_scale

NONCE_MODES = ("random", "derived")
# The derived-nonce subkey comes from the user key through its own public 16-byte label (never a real nonce:
# random nonces collide with it with probability 2^-128).
_DERIVED_LABEL = hashlib.sha256(b"keyface/cli/derived-nonce/v1").digest()[:16]


@dataclass(frozen=True)
class Settings:
    """What an anonymize run does to every photo (all public; none of it is secret)."""

    steps: int = 30
    scheduler: str = "karras"
    method: str = "exact"
    cfg: float = 1.0
    prompt: str = ""
    negative: str = ""
    sampler: str = "dpmpp_2m"
    render_steps: Optional[int] = None      # default: steps
    render_cfg: Optional[float] = None      # default: cfg
    render_prompt: Optional[str] = None     # default: prompt
    scramble: str = protocol.DEFAULT_SCRAMBLE
    crop_size: int = 512
    context: float = 2.0
    feather: float = 0.06
    max_faces: int = 16
    min_face_px: int = 0
    detector: str = "hog"                   # hog (fast) | auto (+ 90/270 turns, then the CNN) | cnn
    coverage: str = "face"                  # face | face+ears+neck | head
    faces: str = "all"                      # all | largest N | face numbers as `keyface inspect`/the preview count
    threshold: float = 0.0                  # detector score a face must reach (0 = dlib's default)
    max_megapixels: float = 64.0
    nonce: str = "random"
    store_landmarks: bool = False           # per-face 68 landmarks in the record (crop pixels; public)

    def check(self) -> None:
        if self.steps < 1 or (self.render_steps is not None and self.render_steps < 1):
            raise InputMismatchError("--steps must be at least 1.")
        if self.method not in sampling.METHODS:
            raise InputMismatchError(f"unknown --method {self.method!r}; choose one of {', '.join(sampling.METHODS)}.")
        if self.sampler not in protocol.RENDER_SAMPLERS:
            raise InputMismatchError(f"unknown --sampler {self.sampler!r}; choose one of "
                                     f"{', '.join(protocol.RENDER_SAMPLERS)}.")
        if self.nonce not in NONCE_MODES:
            raise InputMismatchError(f"unknown --nonce {self.nonce!r}; choose random or derived.")
        if self.crop_size < 8 or self.crop_size % 8:
            raise InputMismatchError(f"--crop-size {self.crop_size} must be a multiple of 8 (the latent grid), >= 8.")


@dataclass
class ImageResult:
    """What happened to one input: one row of the report."""

    source: str                     # the input path as walked
    output: Optional[str]           # relative to the output folder (None when nothing was written)
    status: str                     # "ok" | "skipped" | "failed" | "no_face"
    faces: Optional[int] = None
    reason: str = ""
    seconds: float = 0.0
    model_seconds: float = 0.0      # inside model calls (denoise, encode, decode)
    model_calls: int = 0
    verified: Optional[bool] = None  # restore: the keyed digest of every face latent matched
    max_abs_error: Optional[float] = None
    extra: dict = field(default_factory=dict)

    def row(self) -> dict:
        out = {k: getattr(self, k) for k in ("source", "output", "status", "faces", "reason", "seconds",
                                               "model_seconds", "model_calls", "verified", "max_abs_error")}
        out.update(self.extra)
        return out


class _Timed:
    """Wraps a model's calls to measure the time spent inside them (the CLI's overhead is everything else)."""

    def __init__(self, model):
        self.model, self.seconds, self.calls = model, 0.0, 0

    def _run(self, fn, *args):
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds += time.perf_counter() - start

    def denoise(self, x, sigma):
        self.calls += 1
        return self._run(self.model.denoise, x, sigma)

    def encode(self, pixels):
        return self._run(self.model.encode, pixels)

    def decode(self, latent):
        return self._run(self.model.decode, latent)


# ----------------------------------------------------------------------------------------------
# Reading photos
# ----------------------------------------------------------------------------------------------

def read_image(path: Path, max_megapixels: float) -> tuple[np.ndarray, images.ImageInfo]:
    """RGB uint8 [H,W,3] of any photo Pillow reads, upright, as ComfyUI's LoadImage opens it (keyface_core.images),
    with what was converted or dropped on the way (`ImageInfo.notes`)."""
    pixels, info = images.load_image(path, max_megapixels=max_megapixels, limit_name="--max-megapixels")
    if info.animated:
        # Only one frame could be anonymized and written: say so rather than drop frames silently.
        raise ImageReadError(f"{info.name} has {info.frames} frames (animated {info.format}); KeyFace anonymizes still "
                             "photos. Extract the frames first (e.g. ffmpeg -i in.gif frame_%03d.png).")
    if min(pixels.shape[:2]) < 16:
        raise ImageReadError(f"{info.name} is {pixels.shape[1]}x{pixels.shape[0]} pixels, too small to hold a face.")
    return pixels, info


# ----------------------------------------------------------------------------------------------
# Faces (the same composition of core functions as the Face Mask node, with its defaults)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Faces:
    boxes: tuple            # (x, y, size) per face
    masks: torch.Tensor     # [N,S,S] soft crop masks, quantised to 1/255 (what the file stores)
    landmarks: tuple = ()   # float32 [68,2] per face in crop pixels, as the Face Mask node gives them


def find_faces(pixels: np.ndarray, settings: Settings) -> Faces:
    """The core's detection, face choice, crop boxes and coverage masks, as Face Mask does them."""
    found = face_core.detect_faces(pixels, detector=settings.detector, min_face_px=settings.min_face_px,
                                   threshold=settings.threshold)
    if not found:
        raise NoFaceError("no face was found, so nothing was anonymized and nothing written (the photo is never "
                          "copied un-anonymized)." + ("" if settings.detector != "hog" else
                                                      " --detector auto also tries the photo turned and dlib's CNN."))
    chosen = face_core.select_faces(found, settings.faces)
    # max_faces keeps the most confident of the chosen faces; crops stay in detection order (left to right).
    chosen = sorted(sorted(chosen, key=lambda i: -found[i].score)[:settings.max_faces])
    if not chosen:
        raise NoFaceError(f"--faces '{settings.faces}' chose none of the {len(found)} faces found, so nothing was "
                          "anonymized and nothing written.")
    H, W = pixels.shape[:2]
    S = settings.crop_size
    boxes, masks, landmarks = [], [], []
    for det in (found[i] for i in chosen):
        box = face_core.crop_box(det, (H, W), settings.context, settings.coverage)
        landmarks.append(((det.landmarks.astype(np.float64) - np.asarray(box[:2], np.float64))
                          * (S / float(box[2]))).astype(np.float32))
        hard = torch.from_numpy(face_core.face_mask_in_box(det.landmarks, box, S, coverage=settings.coverage))
        soft = mask_core.feather(hard, max(1.0, settings.feather * S))
        boxes.append(tuple(int(v) for v in box))
        masks.append(torch.round(soft.clamp(0, 1) * 255.0) / 255.0)
    return Faces(tuple(boxes), torch.stack(masks), tuple(landmarks))


def _crops(image: torch.Tensor, faces: Faces, size: int) -> torch.Tensor:
    """[N,3,S,S] crops in 0..1 from an [H,W,3] image."""
    return torch.stack([mask_core.crop_square(image, box, size) for box in faces.boxes]).permute(0, 3, 1, 2)


def _derived_nonces(key, pixels: np.ndarray, count: int) -> tuple:
    """Reproducible nonces: HMAC(subkey of the user key, SHA-256 of the photo, face index). Same photo and key ->
    same file; different photos never share one (the nonce is public; it reveals only whether two inputs were equal)."""
    subkey = key.image_key(_DERIVED_LABEL)
    digest = hashlib.sha256(f"{pixels.shape}".encode() + np.ascontiguousarray(pixels).tobytes()).digest()
    return tuple(hmac.new(subkey, digest + i.to_bytes(4, "big"), hashlib.sha256).digest()[:16] for i in range(count))


# ----------------------------------------------------------------------------------------------
# Anonymize one photo
# ----------------------------------------------------------------------------------------------

def _released(fn):
    """Call the model's optional `release()` after each image (a backend holding per-image resources frees them)."""
    import functools

    @functools.wraps(fn)
    def wrapper(source, target, settings, model, key):
        try:
            return fn(source, target, settings, model, key)
        finally:
            release = getattr(model, "release", None)
            if release is not None:
                release()
    return wrapper


@_released
def anonymize_image(source: Path, target: Path, settings: Settings, model, key) -> ImageResult:
    """Anonymize `source` into the PNG `target` (atomic; raises KeyFaceError with a user message on failure)."""
    start = time.perf_counter()
    timed = _Timed(model)
    pixels, info = read_image(source, settings.max_megapixels)
    try:
        faces = find_faces(pixels, settings)
    except NoFaceError as err:
        if not info.notes:
            raise
        raise NoFaceError(f"{err} ({'; '.join(info.notes)})") from None
    image = photo.from_u8(pixels)
    S = settings.crop_size
    count = len(faces.boxes)
    with torch.no_grad():
        clean = timed.encode(_crops(image, faces, S)).to(torch.float64)
        lmask = mask_core.latent_mask(faces.masks, tuple(clean.shape[-2:]))
        nonces = protocol.new_nonces(count) if settings.nonce == "random" else _derived_nonces(key, pixels, count)
        batch = protocol.FaceBatch(nonces, tuple(range(count)), lmask, protocol.public_background(clean, lmask))
        protocol.check_mask_not_empty(lmask, "face mask")
        sigmas = model.sigmas(settings.steps, settings.scheduler)
        cond_id = model.set_conditioning(settings.prompt, settings.negative, settings.cfg)
        noise = protocol.invert(timed.denoise, clean, sigmas, batch, method=settings.method, add_noise=model.add_noise)
        keyed = protocol.lock(noise, clean, batch, key, method_scramble=settings.scramble)
        render_steps = settings.render_steps or settings.steps
        render_sigmas = sigmas if render_steps == settings.steps else model.sigmas(render_steps, settings.scheduler)
        if not math.isclose(float(render_sigmas[0]), float(sigmas[0]), rel_tol=1e-4):
            raise InputMismatchError("the render schedule does not start at the inversion's noise level; use the "
                                     "same --scheduler for both.")
        render_cfg = settings.cfg if settings.render_cfg is None else settings.render_cfg
        render_prompt = settings.prompt if settings.render_prompt is None else settings.render_prompt
        if (render_cfg, render_prompt) != (settings.cfg, settings.prompt):
            model.set_conditioning(render_prompt, settings.negative, render_cfg)
        try:
            drawn = protocol.render(timed.denoise, keyed, render_sigmas, sampler=settings.sampler,
                                    add_noise=model.add_noise)
        finally:
            if (render_cfg, render_prompt) != (settings.cfg, settings.prompt):
                model.set_conditioning(settings.prompt, settings.negative, settings.cfg)
        decoded = torch.cat([timed.decode(drawn[i:i + 1]) for i in range(count)]).to(torch.float32)
    out = image
    for box, crop, soft in zip(faces.boxes, decoded.permute(0, 2, 3, 1), faces.masks):
        out = mask_core.paste_square(out, crop, box, soft)
    saved = photo.to_u8(out)
    scale, shift = latent_scale(model)
    fmt = anon.LatentFormat(int(clean.shape[1]), scale, shift)
    inversion = protocol.InversionSettings(settings.steps, settings.scheduler, settings.method, float(settings.cfg),
                                           model.model_id, cond_id, sigmas.to(torch.float32))
    render = protocol.RenderSettings(settings.sampler, settings.scheduler, int(render_steps), float(render_cfg), 0)
    record = anon.build(saved, faces.boxes, [m.numpy() for m in faces.masks], S, keyed, inversion, render, fmt,
                        fmt.process_out(drawn.to(torch.float64)).to(torch.float32),
                        landmarks=faces.landmarks if settings.store_landmarks else None)
    store.write(target, saved, record)
    return ImageResult(str(source), None, "ok", count, "; ".join(info.notes), time.perf_counter() - start,
                       timed.seconds, timed.calls)


# ----------------------------------------------------------------------------------------------
# Restore one photo
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RestoreSettings:
    prompt: str = ""
    negative: str = ""
    allow_wrong_key: bool = False


@_released
def restore_image(source: Path, target: Path, settings: RestoreSettings, model, key) -> ImageResult:
    """Restore an anonymized PNG into the plain PNG `target`; verifies every face against its keyed digest."""
    start = time.perf_counter()
    timed = _Timed(model)
    pixels, file = store.read(source)
    if file is None:
        raise MetadataError(f"{Path(source).name} carries no KeyFace record, so it cannot be restored: use the PNG "
                            "exactly as keyface anonymize wrote it (a JPEG or edited copy lost the record).")
    if (pixels.shape[1], pixels.shape[0]) != tuple(file.image_size):
        raise InputMismatchError("the image was resized after anonymization; restore needs the PNG as written.")
    inv = file.inversion
    if inv.model_id != model.model_id:
        raise InputMismatchError("this photo was anonymized with a different model (its fingerprint differs from "
                                 "--model's); restore with exactly the same checkpoint.")
    cond_id = model.set_conditioning(settings.prompt, settings.negative, inv.cfg)
    if cond_id != inv.cond_id:
        raise InputMismatchError("the prompt or cfg differs from the anonymizing run's; pass the same --prompt and "
                                 "--negative (cfg is taken from the file).")
    altered = anon.altered_regions(file, pixels)
    keyed = file.keyed
    with torch.no_grad():
        noise = protocol.unlock(keyed, key, allow_wrong_key=settings.allow_wrong_key)
        restored = protocol.retrace(timed.denoise, noise, inv.sigmas, keyed.faces, method=inv.method,
                                    add_noise=model.add_noise)
        verification = protocol.verify(restored, keyed, key)
        count = keyed.faces.size
        fmt = file.latent_format
        restored_crops = torch.cat([timed.decode(restored[i:i + 1]) for i in range(count)])
        anonymized_crops = torch.cat([timed.decode(fmt.process_in(file.anonymized[i:i + 1].to(torch.float64)))
                                      for i in range(count)])
    masks = [torch.from_numpy(f.crop_mask.astype(np.float32) / 255.0) for f in file.faces]
    out = photo.restore_photo(photo.from_u8(pixels), [f.box for f in file.faces], masks,
                              restored_crops.permute(0, 2, 3, 1).to(torch.float32),
                              anonymized_crops.permute(0, 2, 3, 1).to(torch.float32))
    store.write(target, photo.to_u8(out), None)
    reason = verification.message()
    if altered:
        reason += f"; face region(s) {altered} of the saved pixels were altered after anonymization"
    return ImageResult(str(source), None, "ok", count, reason, time.perf_counter() - start, timed.seconds, timed.calls,
                       verified=bool(verification.exact), max_abs_error=verification.max_abs_error,
                       extra={"wrong_key": verification.wrong_key})


def restored_latents(source: Path, model, key, settings: RestoreSettings = RestoreSettings()) -> torch.Tensor:
    """The restored model-space face latents of an anonymized PNG (for tests and benchmarks)."""
    _, file = store.read(source)
    model.set_conditioning(settings.prompt, settings.negative, file.inversion.cfg)
    noise = protocol.unlock(file.keyed, key, allow_wrong_key=settings.allow_wrong_key)
    with torch.no_grad():
        return protocol.retrace(model.denoise, noise, file.inversion.sigmas, file.keyed.faces,
                                method=file.inversion.method, add_noise=model.add_noise)


def clean_latents(source: Path, settings: Settings, model) -> torch.Tensor:
    """The original model-space face latents the anonymization of `source` started from (tests, benchmarks)."""
    pixels, _ = read_image(source, settings.max_megapixels)
    faces = find_faces(pixels, settings)
    with torch.no_grad():
        return model.encode(_crops(photo.from_u8(pixels), faces, settings.crop_size)).to(torch.float64)
