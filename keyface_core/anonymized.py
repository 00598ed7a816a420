"""What one anonymized photo carries (format v2), in protocol terms: built by every adapter, stored by `record`.

`AnonymizedFile` is the in-memory form; `keyface_core.record` turns it into the PNG chunk and back. The nodes
(Save/Load Anonymized) and the CLI both go through `build` and the record, so their files are the same.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from .errors import InputMismatchError
from .protocol import InversionSettings, KeyedNoise, RenderSettings, SealedPixels


@dataclass(frozen=True)
class FaceEntry:
    """Where a face sits in the photo and how it was pasted (public)."""

    box: tuple                 # (x, y, size) square crop box in image pixels
    crop_mask: np.ndarray      # uint8 [S,S] soft paste mask x 255
    region_digest: str         # SHA-256 of the saved anonymized pixels inside the box: binds record and pixels
    # float32 [68,2] dlib landmarks in crop pixels, stored only when asked (Save Anonymized `store_landmarks`) so
    # Restore can redraw the identical ControlNet hint. Public, in the clear: the original face's geometry.
    landmarks: Optional[np.ndarray] = None


@dataclass(frozen=True)
class LatentFormat:
    """The model's latent scale/shift (VAE space <-> model space)."""

    channels: int
    scale_factor: float
    shift_factor: float = 0.0

    def process_in(self, latent):
        return (latent - self.shift_factor) * self.scale_factor

    def process_out(self, latent):
        return latent / self.scale_factor + self.shift_factor


@dataclass(frozen=True)
class AnonymizedFile:
    image_size: tuple          # (width, height)
    pixels_sha256: str         # the saved 8-bit RGB pixels
    inversion: InversionSettings
    render: Optional[RenderSettings]
    latent_format: LatentFormat
    crop_size: int
    keyed: KeyedNoise          # the keyed noise, its mask, background, nonces, key checks, sealed residuals, digests
    anonymized: torch.Tensor   # [B,C,h,w] float32 VAE-space drawn latent (removes the anonymized face from the band)
    faces: tuple               # FaceEntry per batch item, in batch order
    sealed_pixels: Optional[tuple] = None  # lossless mode: SealedPixels per face
    look: str = ""             # `look_hash` of the saved pixels: tells a re-encoded copy from another image


def pixels_digest(pixels: np.ndarray) -> str:
    """SHA-256 of 8-bit RGB pixels and their size: tells a reader whether the file was altered."""
    digest = hashlib.sha256(f"{pixels.shape[1]}x{pixels.shape[0]}:".encode())
    digest.update(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes())
    return digest.hexdigest()


def look_hash(pixels: np.ndarray) -> str:
    """A 256-bit average hash of the (public) anonymized photo: survives JPEG/resizing, differs between photos."""
    from PIL import Image
    gray = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).convert("L").resize((16, 16), Image.Resampling.BOX)
    values = np.asarray(gray, dtype=np.float32).reshape(-1)
    return np.packbits(values > values.mean()).tobytes().hex()


def look_distance(a: str, b: str) -> float:
    """Share of differing bits between two look hashes (0 = same look; unrelated photos ~0.5)."""
    if not a or not b or len(a) != len(b):
        return 1.0
    x = np.frombuffer(bytes.fromhex(a), dtype=np.uint8) ^ np.frombuffer(bytes.fromhex(b), dtype=np.uint8)
    return float(np.unpackbits(x).mean())


# Measured on ../shared/faces (14 photos): a JPEG q75 copy or a 0.5x resize differs by <= 0.004; two different
# photos by >= 0.199 (mean 0.446).
SAME_LOOK = 0.1


def region_digest(pixels: np.ndarray, box) -> str:
    x, y, size = (int(v) for v in box)
    return pixels_digest(pixels[y:y + size, x:x + size])


def build(pixels: np.ndarray, boxes: Sequence, crop_masks: Sequence, crop_size: int, keyed: KeyedNoise,
          inversion: InversionSettings, render: Optional[RenderSettings], latent_format: LatentFormat,
          anonymized: torch.Tensor, sealed_pixels: Optional[Sequence[SealedPixels]] = None,
          landmarks: Optional[Sequence] = None) -> AnonymizedFile:
    """The file's content for an anonymized photo (8-bit RGB `pixels`, as saved). `landmarks`: per face a
    float32 [68,2] array in crop pixels (or None for that face), or None to store none."""
    if keyed.lock is None:
        raise InputMismatchError("this latent was never key-flipped, so it is not anonymized; run Apply Key Flip "
                                 "before Regenerate.")
    count = keyed.faces.size
    if not (len(boxes) == len(crop_masks) == count == anonymized.shape[0]):
        raise InputMismatchError(f"the latent holds {count} faces but {len(boxes)} were cropped; connect the latent "
                                 "of the same crops.")
    if landmarks is not None and len(landmarks) != count:
        raise InputMismatchError(f"{len(landmarks)} landmark sets for {count} faces; give one per face (or none).")
    entries = []
    for i, (box, mask) in enumerate(zip(boxes, crop_masks)):
        mask = np.asarray(mask)
        if mask.dtype != np.uint8:
            mask = np.round(np.clip(mask, 0, 1) * 255.0).astype(np.uint8)
        points = None if landmarks is None or landmarks[i] is None else _landmarks(landmarks[i])
        entries.append(FaceEntry(tuple(int(v) for v in box), mask, region_digest(pixels, box), points))
    height, width = pixels.shape[:2]
    return AnonymizedFile((int(width), int(height)), pixels_digest(pixels), inversion, render, latent_format,
                          int(crop_size), keyed, anonymized.detach().cpu().to(torch.float32), tuple(entries),
                          None if sealed_pixels is None else tuple(sealed_pixels), look_hash(pixels))


def _landmarks(points) -> np.ndarray:
    points = np.asarray(points)
    if points.shape != (68, 2) or not np.isfinite(points).all():
        raise InputMismatchError(f"face landmarks must be 68 finite (x, y) points; got shape {points.shape}.")
    return np.ascontiguousarray(points, dtype=np.float32)


def altered_regions(file: AnonymizedFile, pixels: np.ndarray) -> list:
    """Indices of the faces whose saved pixels (inside the box) differ from the ones the record was made with."""
    return [i for i, face in enumerate(file.faces) if region_digest(pixels, face.box) != face.region_digest]
