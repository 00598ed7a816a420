"""Mask math: latent-grid masks, feathering, bit-exact compositing and square face crops.

Conventions (ComfyUI): IMAGE is float32 [B,H,W,C] in 0..1, MASK is float32 [B,H,W] or [H,W]
in 0..1, LATENT samples are [B,C,h,w]. Pure torch; no ComfyUI and no dlib.
"""

import math

import torch
import torch.nn.functional as F

from .errors import InputMismatchError


def _as_b1hw(mask: torch.Tensor, what: str = "mask") -> torch.Tensor:
    """View a [H,W], [B,H,W] or [B,1,H,W] mask as float32 [B,1,H,W]."""
    if mask.ndim == 2:
        return mask[None, None].float()
    if mask.ndim == 3:
        return mask[:, None].float()
    if mask.ndim == 4 and mask.shape[1] == 1:
        return mask.float()
    raise InputMismatchError(
        f"The {what} has shape {tuple(mask.shape)}; expected [H,W], [B,H,W] or [B,1,H,W]. "
        "Pass a MASK, not an IMAGE (convert it with an 'Image To Mask' node)."
    )


def _covers(pixels: int, cells: int, scale: float) -> bool:
    """True if `pixels` rounded down by `scale` gives `cells`."""
    return cells * scale <= pixels < (cells + 1) * scale


def latent_mask(mask: torch.Tensor, latent_hw, threshold: float = 0.5, dilate: int = 0) -> torch.Tensor:
    """Downsample a pixel mask to the latent grid as a 0/1 float32 tensor [B,1,h,w]."""
    m = _as_b1hw(mask)
    H, W = m.shape[-2:]
    h, w = int(latent_hw[0]), int(latent_hw[1])
    if (H, W) != (h, w):
        if H < h or W < w or not (
            # Some scale s must round both sides down to the grid: s in (H/(h+1), H/h] and in (W/(w+1), W/w].
            max(H / (h + 1), W / (w + 1)) < min(H / h, W / w)
        ):
            raise InputMismatchError(
                f"The mask is {W}x{H} pixels but the latent grid is {w}x{h} cells; their aspect ratios "
                "differ. Use the mask that belongs to the image this latent was encoded from "
                "(same width and height), or resize the mask to that image size first."
            )
        f = next((f for f in (8, 16) if _covers(H, h, f) and _covers(W, w, f)), None)
        if f is not None:
            # Match the VAE encoder, which centre-crops pixel sizes down to a multiple of the factor.
            oy, ox = (H - h * f) // 2, (W - w * f) // 2
            m = F.avg_pool2d(m[..., oy : oy + h * f, ox : ox + w * f], kernel_size=f)
        else:
            m = F.interpolate(m, size=(h, w), mode="area")
    out = (m >= threshold).float()
    if dilate > 0:
        out = F.max_pool2d(out, kernel_size=2 * dilate + 1, stride=1, padding=dilate)
    return out


def _pool_separable(x: torch.Tensor, r: int, op) -> torch.Tensor:
    """Apply a (2r+1)-wide pooling op along H then W (square window, O(r) per pixel)."""
    k = 2 * r + 1
    x = op(x, kernel_size=(k, 1), stride=1, padding=(r, 0))
    return op(x, kernel_size=(1, k), stride=1, padding=(0, r))


def feather(mask: torch.Tensor, radius_px: float) -> torch.Tensor:
    """Soften a mask's edge outward: 1 where the mask is 1, falling to 0 about radius_px outside it."""
    if radius_px <= 0:
        return mask
    shape, dtype = mask.shape, mask.dtype
    m = _as_b1hw(mask)
    r = max(1, round(radius_px))
    # Grow by half the radius, then box-blur twice (a smooth ramp) over the other half:
    # the ramp then runs from the hard edge (value 1) to about radius_px outside it (value 0).
    grow, rest = math.ceil(r / 2), r // 2
    soft = _pool_separable(m, grow, F.max_pool2d)
    for b in (rest - rest // 2, rest // 2):
        if b > 0:
            soft = _pool_separable(soft, b, F.avg_pool2d)
    soft = torch.maximum(soft.clamp(0.0, 1.0), m)
    return soft.reshape(shape).to(dtype)


def composite(background: torch.Tensor, foreground: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Blend foreground over background by mask; where mask == 0 the background is kept bit for bit."""
    if background.shape != foreground.shape:
        raise InputMismatchError(
            f"Background {tuple(background.shape)} and foreground {tuple(foreground.shape)} differ in "
            "shape; resize or crop one of them so both have the same batch, height, width and channels."
        )
    if background.ndim not in (3, 4):
        raise InputMismatchError(
            f"Images must be [H,W,C] or [B,H,W,C]; got shape {tuple(background.shape)}."
        )
    spatial = background.shape[-3:-1]
    m = mask
    if m.ndim == background.ndim and m.shape[-1] == 1:
        m = m[..., 0]
    if m.ndim == 2 and background.ndim == 4:
        m = m[None]
    if tuple(m.shape[-2:]) != tuple(spatial) or m.ndim != background.ndim - 1 or (
        m.ndim == 3 and m.shape[0] not in (1, background.shape[0])
    ):
        raise InputMismatchError(
            f"The mask has shape {tuple(mask.shape)} but the images are {tuple(background.shape)}; "
            f"the mask must be {tuple(spatial)} in height and width with batch 1 or "
            f"{background.shape[0] if background.ndim == 4 else 1}. Resize the mask to the image."
        )
    m = m[..., None].to(device=background.device, dtype=background.dtype)
    blended = m * foreground + (1 - m) * background
    # torch.where, not arithmetic alone: untouched pixels must not pick up rounding changes.
    return torch.where(m == 0, background, blended)


def square_crop_box(face_box, image_hw, context: float = 2.0):
    """Square (x, y, size) around a face box, `context` times its larger side, kept inside the image."""
    x0, y0, x1, y1 = (float(v) for v in face_box)
    H, W = int(image_hw[0]), int(image_hw[1])
    if x1 <= x0 or y1 <= y0 or H < 1 or W < 1:
        raise InputMismatchError(
            f"Face box {tuple(face_box)} or image size {W}x{H} is empty; "
            "pass a box as (x0, y0, x1, y1) with x1 > x0 and y1 > y0."
        )
    size = max(1, min(round(context * max(x1 - x0, y1 - y0)), H, W))
    # Shift (never shrink) the square to keep it inside the image.
    x = min(max(round((x0 + x1) / 2 - size / 2), 0), W - size)
    y = min(max(round((y0 + y1) / 2 - size / 2), 0), H - size)
    return int(x), int(y), int(size)


def _check_box(image_hw, box) -> tuple:
    x, y, size = (int(v) for v in box)
    H, W = image_hw
    if size < 1 or x < 0 or y < 0 or x + size > W or y + size > H:
        raise InputMismatchError(
            f"Crop box (x={x}, y={y}, size={size}) does not fit in the {W}x{H} image; "
            "compute it with square_crop_box for this image."
        )
    return x, y, size


def _resize_hwc(t: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Resize [h,w,C] to [size,size,C] with antialiasing, clamped to 0..1."""
    if tuple(t.shape[:2]) == (size, size):
        return t.float()
    x = t.permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(size, size), mode=mode, antialias=True, align_corners=False)
    return x[0].permute(1, 2, 0).clamp(0.0, 1.0)


def crop_square(image_hw_c: torch.Tensor, box, out_size: int) -> torch.Tensor:
    """Cut the square `box` = (x, y, size) out of an [H,W,C] image, resized to [out_size,out_size,C]."""
    if image_hw_c.ndim != 3:
        raise InputMismatchError(
            f"crop_square takes one image [H,W,C]; got shape {tuple(image_hw_c.shape)}. "
            "Index the batch first (image[i])."
        )
    x, y, size = _check_box(image_hw_c.shape[:2], box)
    # Slice first so the cost depends on the crop, not on the image.
    return _resize_hwc(image_hw_c[y : y + size, x : x + size], int(out_size), "bicubic")


def _check_paste(image: torch.Tensor, crop: torch.Tensor, crop_mask: torch.Tensor) -> None:
    if image.ndim != 3 or crop.ndim != 3 or crop.shape[-1] != image.shape[-1]:
        raise InputMismatchError(
            f"paste_square takes an image [H,W,C] and a crop [S,S,C] with the same C; got "
            f"{tuple(image.shape)} and {tuple(crop.shape)}."
        )
    if crop_mask.shape != crop.shape[:2]:
        raise InputMismatchError(
            f"The crop mask {tuple(crop_mask.shape)} must match the crop's height and width "
            f"{tuple(crop.shape[:2])}; build it with face_mask_in_box at the crop's out_size."
        )


def paste_square_(out: torch.Tensor, crop: torch.Tensor, box, crop_mask: torch.Tensor) -> torch.Tensor:
    """In place: paste a square crop into `out` [H,W,C] through its soft mask; only the box is read or written.

    Exactly `paste_square`'s pixels, without copying the photo: the caller owns `out` (one copy for all faces)."""
    _check_paste(out, crop, crop_mask)
    x, y, size = _check_box(out.shape[:2], box)
    soft = _resize_hwc(crop_mask[..., None], size, "bilinear")[..., 0]
    rows = torch.nonzero(soft.amax(dim=1) > 0).flatten()
    if rows.numel() == 0:
        return out
    cols = torch.nonzero(soft.amax(dim=0) > 0).flatten()
    # Only the mask's support changes; composite keeps everything else bit for bit anyway.
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    patch = _resize_hwc(crop, size, "bicubic")[r0:r1, c0:c1].to(out.dtype)
    region = out[y + r0 : y + r1, x + c0 : x + c1]
    region.copy_(composite(region, patch.to(region.device), soft[r0:r1, c0:c1]))
    return out


def paste_square(image: torch.Tensor, crop: torch.Tensor, box, crop_mask: torch.Tensor) -> torch.Tensor:
    """Paste a processed square crop back into a copy of an [H,W,C] image through its soft mask."""
    _check_paste(image, crop, crop_mask)
    return paste_square_(image.clone(), crop, box, crop_mask)


def paste_squares(image: torch.Tensor, crops, boxes, crop_masks) -> torch.Tensor:
    """All faces pasted into ONE copy of the [H,W,C] image, in order (same pixels as chained paste_square)."""
    out = image.clone()
    for crop, box, crop_mask in zip(crops, boxes, crop_masks):
        paste_square_(out, crop, box, crop_mask)
    return out
