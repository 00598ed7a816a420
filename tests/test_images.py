"""Inputs that are not plain RGB photos (issue 13 item 4): `keyface_core.images.load_image`, one generated file per
case, and the same files through the `keyface` command line, where each bad one is reported with a clear reason
while the good photos complete. Bad-input rows B59-B66 (docs/notes/images.md) name the test that covers each.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, faces_dir

from keyface_core import images
from keyface_core.errors import DamagedImageError, ImageTooLargeError, KeyFaceError, NotAnImageError


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png16(values: np.ndarray) -> bytes:
    """A 16-bit RGB (HxWx3) or RGBA (HxWx4) PNG, which Pillow cannot write; rows use filters None, Sub, Up, Paeth-free
    so the decoder's row filters are exercised on 6- and 8-byte pixels."""
    h, w, c = values.shape
    raw = values.astype(">u2").reshape(h, w * c).view(np.uint8).reshape(h, w * c * 2).astype(np.int16)
    bpp = c * 2
    rows = []
    for y in range(h):
        kind = y % 3
        if kind == 0:
            line = raw[y]
        elif kind == 1:   # Sub: minus the byte one pixel to the left
            line = raw[y] - np.concatenate([np.zeros(bpp, np.int16), raw[y][:-bpp]])
        else:             # Up: minus the byte above
            line = raw[y] - raw[y - 1]
        rows.append(bytes([kind]) + (line % 256).astype(np.uint8).tobytes())
    ctype = {3: 2, 4: 6}[c]
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, ctype, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))


def expected8(values: np.ndarray) -> np.ndarray:
    """The PNG specification's rescaling, round(v * 255 / 65535) (no ties occur: 257 is odd)."""
    return np.floor(values.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)


def pattern(w: int = 12, h: int = 8) -> np.ndarray:
    """An asymmetric RGB image: every pixel differs, so any turn or flip shows."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 20, y * 30, (x * 7 + y * 13) % 256], axis=2).astype(np.uint8)


# Rows of the README's bad-input table (text in docs/notes/images.md): id -> (kind, what the row quotes, the tests that
# check exactly that text). `test_rows_match_the_notes` keeps the notes and these in step.
ROWS = {
    "B59": ("16-bit PNG, gray or RGB", "reduced to 8 bits",
            ["test_16_bit_gray_png_scaled_not_white", "test_16_bit_rgb_png_both_bytes_rounded",
             "test_cli_odd_inputs_each_reported_good_ones_complete"]),
    "B60": ("Palette image (with transparency), RGBA or LA", "image was palette-based (P); converted to RGB",
            ["test_palette_with_transparency", "test_rgba_alpha_dropped_not_composited", "test_gray_with_alpha",
             "test_cli_odd_inputs_each_reported_good_ones_complete"]),
    "B61": ("CMYK JPEG", "converted to RGB without its colour profile",
            ["test_cmyk_jpeg", "test_cli_odd_inputs_each_reported_good_ones_complete"]),
    "B62": ("Animated GIF, WebP or APNG", "3 frames (animated GIF)",
            ["test_animated_first_frame_and_count", "test_cli_odd_inputs_each_reported_good_ones_complete"]),
    "B63": ("Very small photo", "too small to hold a face of 64 px",
            ["test_too_small_for_a_face_is_noted", "test_cli_odd_inputs_each_reported_good_ones_complete"]),
    "B64": ("Very large photo, or a decompression bomb", "over the limit of 40 MP; raise --max-megapixels",
            ["test_huge_photo_over_the_limit_before_decoding", "test_decompression_bomb_gives_a_message",
             "test_cli_odd_inputs_each_reported_good_ones_complete"]),
    "B65": ("Truncated photo", "is damaged or truncated (",
            ["test_truncated_png", "test_cli_odd_inputs_each_reported_good_ones_complete"]),
    "B66": ("Not an image", "is not an image Pillow can read",
            ["test_text_file_named_png", "test_cli_odd_inputs_each_reported_good_ones_complete"]),
}


def test_rows_match_the_notes():
    """docs/notes/images.md holds exactly these rows, each quoting what its tests check."""
    import re
    text = (REPO / "docs" / "notes" / "images.md").read_text()
    rows = dict(re.findall(r"^\| (B\d\d) \| (.+) \|$", text, flags=re.M))
    assert set(rows) == set(ROWS)
    for row_id, (kind, says, tests) in ROWS.items():
        assert says in rows[row_id], f"{row_id} should quote {says!r}"
        assert kind.split()[0].lower() in rows[row_id].lower()
        assert all(callable(globals().get(name)) for name in tests), tests


# ------------------------------------------------------------------------------------------ one file per case

def test_16_bit_gray_png_scaled_not_white(tmp_path):
    """B59: ComfyUI's LoadImage turns an I;16 PNG white (convert("RGB") clips); here it keeps its tones."""
    values = np.array([[0, 257, 1000, 32768, 32896, 65280, 65535, 128]], dtype=np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).convert("RGB").getpixel((2, 0)) == (255, 255, 255)  # what LoadImage would see
    pixels, info = images.load_image(path)
    assert pixels.shape == (1, 8, 3) and pixels.dtype == np.uint8
    assert pixels[0, :, 0].tolist() == expected8(values)[0].tolist() == [0, 1, 4, 128, 128, 254, 255, 0]
    assert all(np.array_equal(pixels[..., c], pixels[..., 0]) for c in range(3))
    assert info.bit_depth == 16 and info.mode == "I;16" and info.format == "PNG"
    assert "image was 16-bit (I;16); reduced to 8 bits" in info.notes


@pytest.mark.parametrize("channels", [3, 4])
def test_16_bit_rgb_png_both_bytes_rounded(tmp_path, channels):
    """B59: Pillow keeps only the high byte of a 48/64-bit PNG (1000 -> 3); both bytes are used (1000 -> 4)."""
    rng = np.random.default_rng(channels)
    values = rng.integers(0, 65536, size=(7, 9, channels), dtype=np.uint32)
    values[0, 0, :3] = (1000, 32768, 65535)
    path = tmp_path / "rgb16.png"
    path.write_bytes(png16(values))
    high = np.asarray(Image.open(path))[..., :3]
    assert np.array_equal(high, (values[..., :3] >> 8).astype(np.uint8))   # Pillow's own reading
    pixels, info = images.load_image(path)
    assert np.array_equal(pixels, expected8(values[..., :3]))
    assert pixels[0, 0].tolist() == [4, 128, 255]
    assert int((pixels != high).sum()) > 0 and int(np.abs(pixels.astype(int) - high).max()) == 1
    assert info.bit_depth == 16
    assert "image has 16 bits per channel; it was reduced to 8 bits per channel" in info.notes
    assert (channels == 4) == ("image was RGBA; alpha channel ignored" in info.notes)


def test_palette_with_transparency(tmp_path):
    """B60: a palette PNG whose index 0 is transparent: the palette colours, alpha dropped, both said."""
    index = (np.arange(48).reshape(6, 8) % 4).astype(np.uint8)
    img = Image.fromarray(index, mode="L").convert("P")
    colours = [(10, 20, 30), (200, 0, 0), (0, 200, 0), (0, 0, 200)]
    img.putpalette([v for c in colours for v in c])
    path = tmp_path / "palette.png"
    img.save(path, transparency=0)
    pixels, info = images.load_image(path)
    assert np.array_equal(pixels, np.array(colours, dtype=np.uint8)[index])
    assert info.mode == "P"
    assert "image was P; alpha channel ignored" in info.notes
    assert "image was palette-based (P); converted to RGB" in info.notes


def test_cmyk_jpeg(tmp_path):
    """B61: a CMYK JPEG (print workflows) converts to RGB as LoadImage's convert("RGB") does, and says so."""
    cmyk = np.zeros((16, 32, 4), dtype=np.uint8)
    cmyk[:, :16] = (0, 255, 255, 0)      # red
    cmyk[:, 16:] = (255, 255, 0, 0)      # blue
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(cmyk, mode="CMYK").save(path, quality=95)
    pixels, info = images.load_image(path)
    assert info.mode == "CMYK" and info.format == "JPEG"
    assert np.array_equal(pixels, np.asarray(Image.open(path).convert("RGB")))
    assert np.abs(pixels[4:12, 2:12].astype(int) - (255, 0, 0)).max() <= 12
    assert np.abs(pixels[4:12, 20:30].astype(int) - (0, 0, 255)).max() <= 12
    assert any("image was CMYK; converted to RGB without its colour profile" in n for n in info.notes)


def test_rgba_alpha_dropped_not_composited(tmp_path):
    """B60: alpha is dropped, never composited: colours under transparent pixels are kept exactly."""
    rgba = np.concatenate([pattern(), np.zeros((8, 12, 1), np.uint8)], axis=2)
    rgba[:4, :, 3] = 255
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba).save(path)
    pixels, info = images.load_image(path)
    assert np.array_equal(pixels, rgba[..., :3])
    assert "image was RGBA; alpha channel ignored" in info.notes


def test_gray_with_alpha(tmp_path):
    la = np.stack([np.arange(96, dtype=np.uint8).reshape(8, 12) * 2, np.full((8, 12), 100, np.uint8)], axis=2)
    path = tmp_path / "la.png"
    Image.fromarray(la, mode="LA").save(path)
    pixels, info = images.load_image(path)
    assert all(np.array_equal(pixels[..., c], la[..., 0]) for c in range(3))
    assert "image was LA; alpha channel ignored" in info.notes and "image converted from grayscale" in info.notes


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animated_first_frame_and_count(tmp_path, fmt):
    """B62: an animated GIF, WebP or APNG: frame 1 is returned, and the record says there were 3 frames."""
    frames = [Image.fromarray(np.full((10, 14, 3), v, np.uint8)) for v in (40, 120, 200)]
    path = tmp_path / f"animated.{fmt.lower()}"
    extra = {"lossless": True} if fmt == "WEBP" else {}
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **extra)
    pixels, info = images.load_image(path)
    assert info.frames == 3 and info.animated and info.format == fmt
    assert np.array_equal(pixels, np.asarray(frames[0]))
    assert f"image has 3 frames (animated {fmt}); only the first is used" in info.notes


def test_too_small_for_a_face_is_noted(tmp_path):
    """B63: a 40x40 image loads, with a note that it cannot hold a face of 64 px."""
    path = tmp_path / "tiny.png"
    Image.fromarray(pattern(40, 40)).save(path)
    pixels, info = images.load_image(path)
    assert pixels.shape == (40, 40, 3)
    assert any("40x40 pixels, too small to hold a face of 64 px" in n for n in info.notes)
    _, big = images.load_image(_png_bytes(pattern(64, 64)))
    assert not any("too small" in n for n in big.notes)


def _png_bytes(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def huge(tmp_path_factory) -> Path:
    """8000x6000 (48 MP) of one colour: 0.6 MB on disk."""
    path = tmp_path_factory.mktemp("huge") / "huge.png"
    Image.new("RGB", (8000, 6000), (90, 120, 150)).save(path, compress_level=1)
    return path


def test_huge_photo_over_the_limit_before_decoding(huge):
    """B64: over max_megapixels: refused from the header (no 144 MB decode), the size and the limit named."""
    with pytest.raises(ImageTooLargeError) as caught:
        images.load_image(huge, max_megapixels=40, limit_name="--max-megapixels")
    assert str(caught.value) == ("huge.png is 8000x6000 (48.0 MP), over the limit of 40 MP; raise --max-megapixels "
                                 "to process it, or downscale the photo.")
    pixels, info = images.load_image(huge)        # the default limit (64 MP) lets a 48 MP photo through
    assert pixels.shape == (6000, 8000, 3) and info.size == (8000, 6000) and (pixels[-1, -1] == (90, 120, 150)).all()


def test_decompression_bomb_gives_a_message(tmp_path):
    """B64: a 25-byte header claiming 40000x40000 pixels (1600 MP): Pillow's limit, as a sentence, no traceback."""
    head = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))
    path = tmp_path / "bomb.png"
    path.write_bytes(head)
    with pytest.raises(ImageTooLargeError) as caught:
        images.load_image(path, max_megapixels=None)
    text = str(caught.value)
    assert text.startswith("bomb.png is too large to decode safely: 1600 MP, over Pillow's decompression-bomb limit "
                           f"of {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} MP"), text
    assert "downscale it first" in text


def test_truncated_png(tmp_path):
    """B65: a PNG cut short is refused (LoadImage would fill the rest with gray), with what to do."""
    data = _png_bytes(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DamagedImageError) as caught:
        images.load_image(path)
    assert str(caught.value).startswith("cut.png is damaged or truncated (")
    assert "copy or export the photo again" in str(caught.value)


def test_text_file_named_png(tmp_path):
    """B66: a text file named .png is not an image; an empty file and a HEIC photo get their own words."""
    path = tmp_path / "notes.png"
    path.write_text("shopping list\n")
    with pytest.raises(NotAnImageError) as caught:
        images.load_image(path)
    assert str(caught.value) == ("notes.png is not an image Pillow can read (PNG, JPEG, WebP, TIFF, BMP, GIF...). "
                                 "Convert it to PNG or JPEG, or remove it from the input.")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(NotAnImageError, match="is empty"):
        images.load_image(tmp_path / "empty.png")
    (tmp_path / "phone.heic").write_bytes(b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 64)
    with pytest.raises(NotAnImageError, match="HEIC/HEIF photo"):
        images.load_image(tmp_path / "phone.heic")
    with pytest.raises(KeyFaceError, match="does not exist"):
        images.load_image(tmp_path / "missing.png")


# The stored pixels for each EXIF orientation, from the tag's meaning (TIFF/EXIF: where row 0 and column 0 of the
# stored image are shown), written with numpy so the test does not reuse Pillow's own table.
STORED = {
    1: lambda u: u,
    2: lambda u: u[:, ::-1],                       # mirrored left-right
    3: lambda u: u[::-1, ::-1],                    # turned 180
    4: lambda u: u[::-1, :],                       # mirrored top-bottom
    5: lambda u: u.transpose(1, 0, 2),             # mirrored along the main diagonal
    6: lambda u: np.rot90(u, 1),                   # shown after turning 90 clockwise
    7: lambda u: np.rot90(u, 2).transpose(1, 0, 2),  # mirrored along the other diagonal
    8: lambda u: np.rot90(u, -1),                  # shown after turning 90 counter-clockwise
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_gives_the_upright_pixels(tmp_path, orientation):
    """Each EXIF orientation 1-8 gives exactly the upright pixels, and the record says whether it was applied."""
    upright = pattern()
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.png"
    Image.fromarray(np.ascontiguousarray(STORED[orientation](upright))).save(path, exif=exif.tobytes())
    pixels, info = images.load_image(path)
    assert np.array_equal(pixels, upright)
    assert info.orientation == orientation and info.orientation_applied == (orientation != 1)
    assert info.size == (12, 8)
    assert (orientation != 1) == any(f"EXIF orientation {orientation}" in n for n in info.notes)


def test_16_bit_rgb_png_with_orientation(tmp_path):
    """Both bytes of a 16-bit PNG are turned upright together (the low bytes are decoded separately)."""
    rng = np.random.default_rng(5)
    upright = rng.integers(0, 65536, size=(5, 8, 3), dtype=np.uint32)
    data = png16(np.ascontiguousarray(STORED[6](upright)))
    exif = Image.Exif()
    exif[0x0112] = 6
    tiff = exif.tobytes().removeprefix(b"Exif\0\0")
    data = data[:33] + chunk(b"eXIf", tiff) + data[33:]     # after IHDR (8 + 25 bytes), before IDAT
    pixels, info = images.load_image(data, name="turned16.png")
    assert info.orientation_applied and np.array_equal(pixels, expected8(upright))


# ------------------------------------------------------------------------------------------ through the CLI

def _face() -> Image.Image:
    return Image.open(faces_dir() / "alex-lacamoire.png").convert("RGB")


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory, huge) -> Path:
    """Real face photos in every odd form, and the bad files, in one folder."""
    root = tmp_path_factory.mktemp("odd") / "in"
    root.mkdir()
    face = _face()
    rgb = np.asarray(face)
    face.save(root / "plain.png")
    gray = np.asarray(face.convert("L")).astype(np.uint16) * 257
    Image.fromarray(gray).save(root / "gray16.png")                                  # I;16
    (root / "rgb16.png").write_bytes(png16(rgb.astype(np.uint32) * 257 + 128))       # 48-bit RGB
    face.convert("P", palette=Image.Palette.ADAPTIVE, colors=255).save(root / "palette.png", transparency=0)
    face.convert("CMYK").save(root / "cmyk.jpg", quality=95)
    rgba = face.copy()
    rgba.putalpha(200)
    rgba.save(root / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(STORED[6](rgb))).save(root / "phone.jpg", exif=exif.tobytes(), quality=95)
    frames = [face, face.transpose(Image.Transpose.FLIP_LEFT_RIGHT), face.rotate(5)]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    face.resize((40, 40)).save(root / "tiny.png")
    os.link(huge, root / "huge.png") if huge.stat().st_dev == root.stat().st_dev else shutil.copy(huge, root / "huge.png")
    data = (root / "plain.png").read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "notes.png").write_text("not a photo\n")
    return root


GOOD = {  # file -> a note its report row carries
    "plain.png": None, "gray16.png": "16-bit", "rgb16.png": "16 bits per channel", "palette.png": "palette-based",
    "cmyk.jpg": "CMYK", "rgba.png": "alpha channel ignored", "phone.jpg": "EXIF orientation 6",
}
BAD = {  # file -> (status, what the reason says)
    "animated.gif": ("failed", "animated.gif has 3 frames (animated GIF); KeyFace anonymizes still photos"),
    "tiny.png": ("no_face", "too small to hold a face of 64 px"),
    "huge.png": ("failed", "huge.png is 8000x6000 (48.0 MP), over the limit of 40 MP; raise --max-megapixels"),
    "truncated.png": ("failed", "truncated.png is damaged or truncated ("),
    "notes.png": ("failed", "notes.png is not an image Pillow can read"),
}


def test_cli_odd_inputs_each_reported_good_ones_complete(odd_folder, tmp_path):
    """B59-B66 through `keyface anonymize` (a subprocess, as users run it): every odd-but-valid photo is anonymized
    (one face found; 16-bit gray no longer whitened into 'no face'), every bad file has its reason, nothing is
    written for it, and the batch goes on (exit code 1)."""
    work = tmp_path
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "keyface", *map(str, a)], capture_output=True, text=True,
                                    env=env, cwd=REPO, timeout=600)
    assert run("keygen", work / "k.key").returncode == 0
    done = run("anonymize", odd_folder, "--out", work / "out", "--key", work / "k.key", "--model", "dev:tiny",
               "--steps", "3", "--crop-size", "64", "--max-megapixels", "40")
    assert done.returncode == 1, done.stderr
    rows = {Path(r["source"]).name: r for r in json.loads((work / "out.keyface-report.json").read_text())["images"]}
    assert set(rows) == set(GOOD) | set(BAD)
    for name, note in GOOD.items():
        row = rows[name]
        assert row["status"] == "ok" and row["faces"] == 1, row
        assert (note is None and row["reason"] == "") or (note is not None and note in row["reason"]), row
        assert (work / "out" / name).with_suffix(".png").is_file()
    for name, (status, says) in BAD.items():
        row = rows[name]
        assert row["status"] == status and says in row["reason"], row
        assert row["output"] is None and not (work / "out" / name).with_suffix(".png").exists()
        assert name in done.stderr
    # The phone copy was anonymized upright: same size as the plain photo, not turned sideways.
    with Image.open(work / "out" / "phone.png") as turned, Image.open(work / "out" / "plain.png") as plain:
        assert turned.size == plain.size


def test_mpo_camera_jpeg_is_a_still_photo(tmp_path):
    """Phones and cameras save MPO (a JPEG with a second, preview or depth picture): a still photo, not an animation
    (the command line refused it as 'frames' before)."""
    pictures = [Image.fromarray(pattern(32, 24)), Image.fromarray(pattern(16, 12))]
    path = tmp_path / "camera.jpg"
    pictures[0].save(path, format="MPO", save_all=True, append_images=pictures[1:], quality=95)
    pixels, info = images.load_image(path)
    assert info.format == "MPO" and info.frames == 2 and not info.animated
    assert pixels.shape == (24, 32, 3)
    assert "image is an MPO file with 2 pictures; the first (the main photo) is used" in info.notes
