"""The restored photo: the original with the restored faces pasted, with no anonymized face left in the feather band.

Save pasted each anonymized crop A_i through its soft mask m_i, in face order:
``I_i = I_{i-1} (1 - m_i) + m_i A_i``. The ideal restore pastes the restored crops R_i the same way into the
original. Both differ only through the crops, so the ideal follows from the saved photo algebraically, last face
first: ``J = I_N + sum_i m_i (R_i - A_i) prod_{j>i} (1 - m_j)``. With 8-bit rounding of the saved photo that is the
ideal within half a gray level before rounding (<= 1 level after). The lossless mode adds a sealed residual that
turns it into the original photo bit for bit.
"""

from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np
import torch

from .errors import InputMismatchError, MetadataError
from .masks import _check_box, _resize_hwc

MAX_RESIDUAL_BYTES = 64 * 2**20


def to_u8(image: torch.Tensor) -> np.ndarray:
    """[H,W,3] float 0..1 -> uint8, rounding (LoadImage's v/255 floats map back to v exactly)."""
    return torch.round(image.detach().cpu().to(torch.float32) * 255.0).clamp_(0, 255).to(torch.uint8).numpy()


def from_u8(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(pixels).astype(np.float32) / 255.0)


def _patch(crop: torch.Tensor, crop_mask: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The crop and its mask at box size, resized exactly as `masks.paste_square` does."""
    return _resize_hwc(crop, size, "bicubic"), _resize_hwc(crop_mask[..., None], size, "bilinear")[..., 0]


def restore_photo(saved: torch.Tensor, boxes: Sequence, crop_masks: Sequence[torch.Tensor],
                  restored_crops: torch.Tensor, anonymized_crops: torch.Tensor) -> torch.Tensor:
    """The ideal restored photo [H,W,3] (float, unrounded) from the saved anonymized photo [H,W,3] and the crops.

    Pixels outside every box (and where every mask is 0) stay bit-identical to `saved`."""
    if not (len(boxes) == len(crop_masks) == restored_crops.shape[0] == anonymized_crops.shape[0]):
        raise InputMismatchError(f"{len(boxes)} faces, {restored_crops.shape[0]} restored and "
                                 f"{anonymized_crops.shape[0]} anonymized crops; connect the crops of the same faces.")
    out = saved.to(torch.float32).clone()
    H, W = out.shape[:2]
    coverage = None  # prod_{j>i} (1 - m_j), only where later faces overlap earlier ones
    for i in range(len(boxes) - 1, -1, -1):
        x, y, size = _check_box((H, W), boxes[i])
        r, m = _patch(restored_crops[i].to(torch.float32), crop_masks[i].to(torch.float32), size)
        a, _ = _patch(anonymized_crops[i].to(torch.float32), crop_masks[i].to(torch.float32), size)
        weight = m if coverage is None else m * coverage[y:y + size, x:x + size]
        region = out[y:y + size, x:x + size]
        corrected = region + weight[..., None] * (r - a)
        out[y:y + size, x:x + size] = torch.where(weight[..., None] == 0, region, corrected.clamp(0.0, 1.0))
        if i > 0:
            if coverage is None:
                coverage = torch.ones(H, W)
            coverage[y:y + size, x:x + size] *= (1.0 - m)
    return out


def box_pixels(pixels: np.ndarray, box) -> np.ndarray:
    x, y, size = (int(v) for v in box)
    return np.ascontiguousarray(pixels[y:y + size, x:x + size])


def pixel_residual(original: np.ndarray, predicted: np.ndarray, boxes: Sequence) -> list[np.ndarray]:
    """Per face box, original - predicted as int16 [size,size,3] (what lossless mode seals)."""
    out = []
    for box in boxes:
        x, y, size = (int(v) for v in box)
        out.append(original[y:y + size, x:x + size].astype(np.int16) - predicted[y:y + size, x:x + size].astype(np.int16))
    return out


def pack_residual(residual: np.ndarray) -> bytes:
    """int16 [s,s,3] -> compressed bytes (mostly zeros and small values: deflate does well)."""
    raw = np.ascontiguousarray(residual, dtype="<i2")
    header = np.asarray(raw.shape, dtype="<u4").tobytes()
    return header + zlib.compress(raw.tobytes(), 9)


def unpack_residual(data: bytes, size: int) -> np.ndarray:
    if len(data) < 12:
        raise MetadataError("the sealed pixel residual in this image is damaged (too short).")
    shape = tuple(int(v) for v in np.frombuffer(data[:12], dtype="<u4"))
    if shape != (size, size, 3):
        raise MetadataError(f"the sealed pixel residual is {shape}, not the face box {size}x{size}x3: damaged.")
    inflater = zlib.decompressobj()
    raw = inflater.decompress(data[12:], MAX_RESIDUAL_BYTES)
    if inflater.unconsumed_tail or len(raw) != 2 * size * size * 3:
        raise MetadataError("the sealed pixel residual in this image is damaged (wrong length).")
    return np.frombuffer(raw, dtype="<i2").reshape(shape).astype(np.int16)


def apply_residual(predicted: np.ndarray, residuals: Sequence[np.ndarray], boxes: Sequence) -> np.ndarray:
    """The original photo: predicted uint8 photo + each face box's residual (later faces win where boxes overlap,
    which is consistent: every residual was taken against the same full predicted photo)."""
    out = predicted.astype(np.int16).copy()
    for residual, box in zip(residuals, boxes):
        x, y, size = (int(v) for v in box)
        out[y:y + size, x:x + size] = predicted[y:y + size, x:x + size].astype(np.int16) + residual
    if out.min() < 0 or out.max() > 255:
        raise MetadataError("the pixel residual does not fit this photo: it belongs to another image or is damaged.")
    return out.astype(np.uint8)
