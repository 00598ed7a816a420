"""Open any image file as ComfyUI's LoadImage does, fixing and saying what it gets wrong on real files.

LoadImage (ComfyUI ``nodes.py``) opens with Pillow, applies the EXIF orientation (``ImageOps.exif_transpose``),
divides mode ``I`` by 255, converts every frame to RGB and returns alpha as a separate MASK. `load_image` does the
same for one photo and differs where that goes wrong, saying so in `ImageInfo.notes`:

- 16-bit grayscale PNGs open as ``I;16``, which ``convert("RGB")`` clips to white: scaled by 255/65535 instead.
- 16-bit RGB/RGBA PNGs: Pillow keeps only the high byte of each sample; both bytes are decoded here and rounded
  the same way as gray (round(v * 255 / 65535), the PNG specification's rescaling; at most one level apart).
- Truncated files: LoadImage retries with ``LOAD_TRUNCATED_IMAGES`` and returns a partly gray photo; refused here.
- Animated files (GIF, WebP, APNG) and multi-page TIFFs: LoadImage returns a batch of frames; here frame 1, and
  the frame count in the record. MPO (a camera's multi-picture JPEG) is a still photo, as LoadImage treats it.
- Size: a caller's megapixel limit is checked from the header before decoding, and Pillow's own
  decompression-bomb limit becomes a message instead of a traceback.
Colour profiles are ignored, as LoadImage ignores them (CMYK is converted by Pillow's plain formula).
"""

from __future__ import annotations

import io
import os
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageOps

from .errors import DamagedImageError, ImageReadError, ImageTooLargeError, KeyFaceError, NotAnImageError

DEFAULT_MAX_MEGAPIXELS = 64.0
MIN_FACE_PX = 64  # smaller faces are not found reliably, and a crop from them is mostly upsampling
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}
_STILL_MULTI = {"MPO"}  # several pictures, one photo (LoadImage excludes MPO from batching too)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_POSSIBLY_16 = {"RGB", "RGBA"}  # Pillow's modes for 16-bit PNG colour types 2 and 6 (the high byte)

Source = Union[str, os.PathLike, bytes, bytearray, memoryview]


@dataclass(frozen=True)
class ImageInfo:
    """What `load_image` found in a file and did to it (all public; `notes` are user-facing sentences)."""

    name: str
    format: str                   # Pillow's format name: PNG, JPEG, GIF, WEBP, MPO, TIFF, ...
    mode: str                     # Pillow's mode as stored: RGB, RGBA, L, LA, P, CMYK, I;16, ...
    size: tuple                   # (W, H) of the returned pixels (upright)
    bit_depth: int                # bits per sample as stored (1, 8, 16 or 32)
    frames: int                   # frames or pages in the file (1 for a still photo)
    animated: bool                # frames > 1 and not a still multi-picture format: frame 1 was used
    orientation: Optional[int]    # the EXIF orientation tag (None when absent)
    orientation_applied: bool     # the pixels were turned upright (tags 2-8)
    notes: tuple                  # everything converted, dropped or doubtful, in words


def load_image(source: Source, *, name: Optional[str] = None,
               max_megapixels: Optional[float] = DEFAULT_MAX_MEGAPIXELS, limit_name: str = "max_megapixels",
               min_face_px: Optional[int] = MIN_FACE_PX) -> tuple[np.ndarray, ImageInfo]:
    """(uint8 RGB [H,W,3] upright, ImageInfo) of a file path or its bytes; raises an ImageReadError subclass.

    `max_megapixels` (None: only Pillow's decompression-bomb limit) is checked before decoding; `limit_name` is how
    the caller's user raises it (``--max-megapixels`` on the command line). `min_face_px` adds a note when the
    image is too small to hold a face that large (None: no note)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), name or "the image"
    else:
        path = Path(source)
        name = name or path.name
        data = _read(path, name)
    if not data:
        raise NotAnImageError(f"{name} is empty (0 bytes), not an image; copy the photo again.")
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            pixels, info = _decode(data, name, max_megapixels, limit_name, notes)
        except KeyFaceError:
            raise
        except Image.DecompressionBombError as err:
            raise ImageTooLargeError(_bomb_message(name, str(err))) from None
        except Image.UnidentifiedImageError:
            raise NotAnImageError(_not_an_image(name, data)) from None
        except MemoryError:
            raise
        except Exception as err:  # Pillow's decoders raise OSError, SyntaxError, ValueError, struct.error, ...
            detail = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
            error = DamagedImageError(f"{name} is damaged or truncated ({str(err) or type(err).__name__}); copy or "
                                      "export the photo again from its source.")
            error.detail = detail
            raise error from None
    for warning in caught:
        if issubclass(warning.category, Image.DecompressionBombWarning):
            notes.append(f"image is {info.size[0]}x{info.size[1]}, above Pillow's decompression-bomb warning level; "
                         "decoded because it is within the limit set")
        elif "Palette images with Transparency" not in str(warning.message):  # handled: alpha is dropped below
            notes.append(f"Pillow warned: {warning.message}")
    W, H = info.size
    if min_face_px is not None and min(W, H) < min_face_px:
        notes.append(f"image is {W}x{H} pixels, too small to hold a face of {min_face_px} px or more: no face may be "
                     "found in it; use a larger photo")
    return pixels, replace(info, notes=tuple(notes))


def _read(path: Path, name: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageReadError(f"cannot read {name}: the file does not exist (or is a broken link).") from None
    except IsADirectoryError:
        raise ImageReadError(f"cannot read {name}: it is a folder, not an image file.") from None
    except OSError as err:
        raise ImageReadError(f"cannot read {name}: {err.strerror or err}; check its permissions.") from None


def _decode(data: bytes, name: str, max_megapixels: Optional[float], limit_name: str,
            notes: list) -> tuple[np.ndarray, ImageInfo]:
    with Image.open(io.BytesIO(data)) as img:
        fmt, mode = img.format or "unknown", img.mode
        W, H = img.size
        megapixels = W * H / 1e6
        if max_megapixels is not None and megapixels > max_megapixels:
            raise ImageTooLargeError(f"{name} is {W}x{H} ({megapixels:.1f} MP), over the limit of {max_megapixels:g} "
                                     f"MP; raise {limit_name} to process it, or downscale the photo.")
        frames = int(getattr(img, "n_frames", 1) or 1)
        animated = frames > 1 and fmt not in _STILL_MULTI
        if animated:
            notes.append(f"image has {frames} frames (animated {fmt}); only the first is used")
        elif frames > 1:
            notes.append(f"image is an {fmt} file with {frames} pictures; the first (the main photo) is used")
        depth = _bit_depth(data, fmt, mode)
        tile = list(img.tile)  # before getexif(), which loads a PNG and empties its tile list
        orientation = _exif_orientation(img)
        img.load()
        applied = orientation in range(2, 9)
        upright = _upright(img, orientation, notes)
        pixels = to_rgb8(upright, notes)
        if depth == 16 and fmt == "PNG" and mode in _POSSIBLY_16:
            low = _png16_low_bytes(data, tile, orientation)
            if low is None:
                notes.append("image has 16 bits per channel; it was reduced to 8 bits per channel (high byte kept)")
            else:
                full = pixels.astype(np.uint32) * 256 + low
                pixels = np.rint(full * (255.0 / 65535.0)).astype(np.uint8)
                notes.append("image has 16 bits per channel; it was reduced to 8 bits per channel")
        elif depth == 16 and not mode.startswith("I"):
            notes.append("image has 16 bits per channel; it was reduced to 8 bits per channel (high byte kept)")
    info = ImageInfo(name, fmt, mode, (pixels.shape[1], pixels.shape[0]), depth, frames, animated, orientation,
                     applied, ())
    return pixels, info


def _upright(img: Image.Image, orientation: Optional[int], notes: list) -> Image.Image:
    if orientation not in range(2, 9):
        return img
    # As ComfyUI's LoadImage does: a phone or photo app stored the pixels turned, with a tag saying how to show them.
    upright = ImageOps.exif_transpose(img)
    notes.append(f"image has EXIF orientation {orientation}; turned upright as ComfyUI's LoadImage does")
    return upright


def _exif_orientation(img: Image.Image) -> Optional[int]:
    try:
        value = img.getexif().get(0x0112)
    except Exception:  # malformed EXIF only costs the orientation
        return None
    return int(value) if isinstance(value, int) else None


def _bit_depth(data: bytes, fmt: str, mode: str) -> int:
    if fmt == "PNG" and data.startswith(_PNG_SIGNATURE) and data[12:16] == b"IHDR" and len(data) > 24:
        return int(data[24])
    if mode == "1":
        return 1
    if mode.startswith("I;16"):
        return 16
    if mode in ("I", "F"):
        return 32
    return 8


def _png16_low_bytes(data: bytes, tile: list, orientation: Optional[int]) -> Optional[np.ndarray]:
    """The low byte of each 16-bit RGB sample, [H,W,3], upright; None where Pillow's tile is not the plain layout.

    Pillow decodes a 16-bit colour PNG to its high bytes (raw mode ``RGB;16B``); decoding the same data again with the
    little-endian raw mode takes the other byte of each sample, through the same zlib and row-filter code."""
    if len(tile) != 1 or not isinstance(tile[0].args, str) or tile[0].args not in ("RGB;16B", "RGBA;16B"):
        return None
    try:
        with Image.open(io.BytesIO(data)) as low:
            low.tile = [low.tile[0]._replace(args=tile[0].args.replace("16B", "16L"))]
            low.load()
            low = ImageOps.exif_transpose(low) if orientation in range(2, 9) else low
            return np.asarray(low)[:, :, :3].astype(np.uint32)
    except Exception:  # a layout this trick does not cover: keep the high bytes, and say so
        return None


def to_rgb8(img: Image.Image, notes: list) -> np.ndarray:
    """uint8 [H,W,3] of a decoded Pillow image of any mode; appends what was converted to `notes`."""
    mode = img.mode
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in img.info):
        notes.append(f"image was {mode}; alpha channel ignored")
    if mode in ("L", "LA", "La", "1", "F") or mode.startswith("I"):
        notes.append("image converted from grayscale")
    if mode.startswith("I") or mode == "F":
        values = np.asarray(img).astype(np.float64)
        if mode == "F":
            gray = np.clip(np.rint(values), 0, 255)
            notes.append("image was 32-bit float (F); values clipped to 0..255")
        else:
            # LoadImage's `i * (1 / 255)` for mode I: 16-bit sample values, whatever the container.
            gray = np.rint(np.clip(values, 0, 65535) * (255 / 65535))
            notes.append(f"image was 16-bit ({mode}); reduced to 8 bits")
        rgb = np.repeat(gray.astype(np.uint8)[:, :, None], 3, axis=2)
    elif mode in ("L", "LA", "La", "1"):
        rgb = np.repeat(np.asarray(img.convert("L"))[:, :, None], 3, axis=2)
        if mode == "1":
            notes.append("image was 1-bit black and white")
    elif mode in ("RGB", "RGBA"):
        # Dropping alpha (not compositing) keeps the stored colour values exact, as LoadImage's convert("RGB").
        rgb = np.asarray(img)[:, :, :3]
    elif mode in ("P", "PA"):
        rgb = np.asarray(img.convert("RGBA"))[:, :, :3]
        notes.append(f"image was palette-based ({mode}); converted to RGB")
    else:
        rgb = np.asarray(img.convert("RGB"))
        extra = " without its colour profile, as ComfyUI's LoadImage does" if mode == "CMYK" else ""
        notes.append(f"image was {mode}; converted to RGB{extra}")
    return np.array(rgb, dtype=np.uint8, order="C", copy=True)


def _not_an_image(name: str, data: bytes) -> str:
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        return (f"{name} is a HEIC/HEIF photo (an iPhone's default format), which Pillow cannot read; convert it to "
                "JPEG or PNG first (on the iPhone: Settings > Camera > Formats > Most Compatible).")
    return (f"{name} is not an image Pillow can read (PNG, JPEG, WebP, TIFF, BMP, GIF...). Convert it to PNG or "
            "JPEG, or remove it from the input.")


def _bomb_message(name: str, pillow_text: str) -> str:
    numbers = [int(n) for n in re.findall(r"\((\d+) pixels\)|limit of (\d+) pixels", pillow_text) for n in n if n]
    size = (f": {numbers[0] / 1e6:.0f} MP, over Pillow's decompression-bomb limit of {numbers[1] / 1e6:.0f} MP"
            if len(numbers) == 2 else " (over Pillow's decompression-bomb limit)")
    return (f"{name} is too large to decode safely{size} (a small file can expand into an image that exhausts "
            "memory). If it is a genuine photo, downscale it first.")


__all__ = ["DEFAULT_MAX_MEGAPIXELS", "MIN_FACE_PX", "ImageInfo", "load_image", "to_rgb8"]
