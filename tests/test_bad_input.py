"""Bad input, one test per kind: a clear error that says what to do (or a warning where the work can go
on), no key material in the message, and no file written. Each test registers its row of the README's
bad-input table (same id, same words), and the last test checks that the table and the tests agree.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch
from PIL import Image, PngImagePlugin

from conftest import KEY_NAME, REPO

STEPS = 4
CROP = 64
CASES: dict[str, tuple[str, str]] = {}


def case(case_id: str, kind: str, says: str):
    """Register a README table row: `says` must appear both in the README row and in what the test checks."""
    def register(fn):
        assert case_id not in CASES, case_id
        CASES[case_id] = (kind, says)
        fn.case = (case_id, says)
        return fn
    return register


def key_forms() -> list[str]:
    raw = bytes.fromhex((Path(os.environ["KEYFACE_KEYS_DIR"]) / KEY_NAME).read_text().strip())
    return [raw.hex(), raw.hex().upper(), base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode().rstrip("=")]


def files_in(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def expect(error_type, says: str, fn, *args, **kwargs) -> str:
    """Run fn, which must raise error_type whose text contains `says` and no key material; returns the text."""
    with pytest.raises(error_type) as caught:
        fn(*args, **kwargs)
    text = str(caught.value)
    assert says in text, text
    for form in key_forms():
        assert form not in text
    return text


def as_image(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels.astype(np.float32) / 255.0)[None]


@pytest.fixture(scope="module")
def photo(host):
    _, work = host
    return as_image(np.array(Image.open(work / "input" / "keyface_sample_face.jpg").convert("RGB")))


@pytest.fixture(scope="module")
def made(host, tiny, kf, key_pair, photo):
    """One anonymization of the sample photo, through the node functions, saved by Save Anonymized."""
    _, work = host
    models, vae, clip = tiny
    F, C = kf.face_nodes, kf.core_nodes
    with torch.inference_mode():
        _, faces = F.detect(photo, crop_size=CROP)
        crops, masks, faces = F.crop(photo, faces)
        latent = {"samples": vae.encode(crops)}
        noise, _ = C.invert_latent(models["eps"], latent, STEPS, "normal", "exact", 1.0, mask=masks)
        flipped = C.flip_latent(noise, key_pair[0])
        anon, _ = C.regenerate_latent(models["eps"], flipped, steps=STEPS)
        image = F.paste(photo, vae.decode(anon["samples"]), faces)
        F.SaveAnonymized.execute(image, faces, anon, "badinput/anon")
    saved = max((work / "output" / "badinput").glob("anon_*.png"), key=lambda p: p.stat().st_mtime_ns)
    shutil.copy(saved, work / "input" / "bi_anon.png")
    return SimpleNamespace(faces=faces, crops=crops, masks=masks, latent=latent, noise=noise, flipped=flipped,
                           anon=anon, image=image, saved=saved, input=work / "input", output=work / "output")


def load(kf, name, **kwargs):
    return kf.face_nodes.LoadAnonymized.execute(name, **kwargs)


def put(made, name: str, data: bytes) -> str:
    (made.input / name).write_bytes(data)
    return name


# ------------------------------------------------------------------------------------ the saved file

def chunk_of(data: bytes) -> tuple[int, int]:
    """(start, end) of the v2 record chunk kfRC in a PNG's bytes."""
    at = data.index(b"kfRC") - 4
    length = int.from_bytes(data[at:at + 4], "big")
    return at, at + 12 + length


def with_chunk(pixels_png: bytes, chunk: bytes) -> bytes:
    """A PNG's bytes with `chunk` (a whole chunk: length, type, data, CRC) inserted before IEND."""
    end = pixels_png.rindex(b"IEND") - 4
    return pixels_png[:end] + chunk + pixels_png[end:]


def png_bytes(image: Image.Image) -> bytes:
    import io
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def record_chunk(payload: bytes) -> bytes:
    import struct
    import zlib
    return struct.pack(">I", len(payload)) + b"kfRC" + payload + struct.pack(">I", zlib.crc32(b"kfRC" + payload))


def rewrite(kf, made, name: str, change) -> str:
    """The saved file with its record decoded, changed by `change(raw_json_doc, arrays)`, re-encoded (valid CRC)."""
    import json
    import struct
    import zlib
    from safetensors.numpy import load as load_st, save as save_st
    data = made.saved.read_bytes()
    start, end = chunk_of(data)
    raw = zlib.decompress(data[start + 8:end - 4])
    n = struct.unpack(">I", raw[8:12])[0]
    doc, arrays = json.loads(raw[12:12 + n]), dict(load_st(raw[12 + n:]))
    change(doc, arrays)
    text = json.dumps(doc).encode()
    payload = zlib.compress(raw[:8] + struct.pack(">I", len(text)) + text + save_st(arrays))
    return put(made, name, data[:start] + record_chunk(payload) + data[end:])


@case("B01", "PNG without KeyFace data (an original photo, or a file from Save Image)",
      "was not made by Save Anonymized")
def test_png_without_metadata(kf, made):
    buffer = Image.open(made.saved).convert("RGB")
    buffer.save(made.input / "bi_plain.png")
    text = expect(kf.errors.MetadataError, "was not made by Save Anonymized", load, kf, "bi_plain.png")
    assert "lossy" not in text and "copy" not in text          # not a JPEG: no lossy-copy hint
    expect(kf.errors.MetadataError, "was not made by Save Anonymized", load, kf, "keyface_sample_group.jpg"
           if False else "bi_plain.png")


@case("B02", "Record chunk damaged (bytes changed, checksum broken)", "is damaged")
def test_damaged_metadata_chunk(kf, made):
    data = bytearray(made.saved.read_bytes())
    start, _ = chunk_of(bytes(data))
    data[start + 40] ^= 0xFF
    name = put(made, "bi_damaged.png", bytes(data))
    expect(kf.errors.MetadataError, "is damaged", load, kf, name)


@case("B03", "Record altered with a valid checksum (fields, arrays or compressed bytes)", "is damaged")
def test_altered_metadata_with_valid_crc(kf, made):
    data = made.saved.read_bytes()
    start, end = chunk_of(data)
    for name, payload in (("bi_garbage.png", b"not zlib at all"), ("bi_truncz.png", data[start + 8:end - 40])):
        put(made, name, data[:start] + record_chunk(payload) + data[end:])
        expect(kf.errors.MetadataError, "is damaged", load, kf, name)
    name = rewrite(kf, made, "bi_field.png", lambda doc, arrays: doc["faces"][0].update(nonce="zz"))
    expect(kf.errors.MetadataError, "faces.0.nonce", load, kf, name)
    name = rewrite(kf, made, "bi_array.png", lambda doc, arrays: arrays.pop("faces.0.keyed_noise"))
    expect(kf.errors.MetadataError, "faces.0.keyed_noise' is missing", load, kf, name)
    name = rewrite(kf, made, "bi_extra.png", lambda doc, arrays: arrays.update({"faces.0.secret": np.zeros(3)}))
    expect(kf.errors.MetadataError, "unexpected array", load, kf, name)


@case("B04", "Record from a newer KeyFace (unknown format version)", "Update the KeyFace node pack")
def test_newer_format_version(kf, made):
    name = rewrite(kf, made, "bi_newer.png", lambda doc, arrays: doc.update(version=99))
    expect(kf.errors.MetadataError, "Update the KeyFace node pack", load, kf, name)


@case("B05", "Stored settings edited (steps no longer match the stored noise schedule)", "the metadata was edited")
def test_edited_settings(kf, made):
    name = rewrite(kf, made, "bi_steps.png", lambda doc, arrays: doc["inversion"].update(steps=STEPS + 3))
    expect(kf.errors.MetadataError, "the metadata was edited", load, kf, name)


@case("B06", "Truncated or non-image file", "damaged or truncated")
def test_truncated_file(kf, made):
    data = made.saved.read_bytes()
    name = put(made, "bi_truncated.png", data[: len(data) // 3])
    expect(kf.errors.KeyFaceError, "damaged or truncated", load, kf, name)
    name = put(made, "bi_text.png", b"this is not an image at all")
    expect(kf.errors.KeyFaceError, "not an image file", load, kf, name)


@case("B46", "Image or metadata file named outside ComfyUI's folders (API prompt with a path)",
      "outside ComfyUI's input, output and temp folders")
def test_file_outside_comfy_folders(kf, made):
    L = kf.face_nodes.LoadAnonymized
    for name in ("../../etc/passwd", "/etc/hostname", "../keys/my_keyface.key"):
        message = L.validate_inputs(name)
        assert isinstance(message, str) and "outside ComfyUI's input, output and temp folders" in message
        expect(kf.errors.InputMismatchError, "outside ComfyUI's input, output and temp folders", load, kf, name)
    assert "outside" in L.validate_inputs("bi_anon.png", metadata="../../etc/passwd")
    assert "was not found" in L.validate_inputs("no_such_file.png")
    assert L.validate_inputs("bi_anon.png") is True


@case("B07", "JPEG copy (record lost) given alone", "lossy formats drop it")
def test_jpeg_copy_alone(kf, made):
    Image.open(made.saved).convert("RGB").save(made.input / "bi_copy.jpg", quality=90)
    text = expect(kf.errors.MetadataError, "lossy formats drop it", load, kf, "bi_copy.jpg")
    assert "JPEG" in text and "metadata" in text


@case("B08", "JPEG copy with the original PNG chosen as metadata: restores, warns", "recompressed with losses")
def test_jpeg_copy_with_metadata_restores_with_a_warning(kf, tiny, key_pair, made, caplog):
    models, _, _ = tiny
    Image.open(made.saved).convert("RGB").save(made.input / "bi_copy.jpg", quality=90)
    with caplog.at_level(logging.WARNING):
        image, latent, faces = load(kf, "bi_copy.jpg", metadata="bi_anon.png").args
    assert "recompressed with losses" in caplog.text and "pixels differ" in caplog.text
    assert "faces themselves restore exactly" in caplog.text
    restored, _ = kf.core_nodes.restore_latent(models["eps"], latent, key_pair[0])
    assert torch.equal(restored["samples"], made.latent["samples"])


@case("B09", "Resized copy (record kept): resampled back, warns", "was resampled back")
def test_resized_copy_is_resampled_with_a_warning(kf, made, caplog):
    data = made.saved.read_bytes()
    start, end = chunk_of(data)
    with Image.open(made.saved) as im:
        small = im.convert("RGB").resize((im.width // 2, im.height // 2))
    put(made, "bi_small.png", with_chunk(png_bytes(small), data[start:end]))
    with caplog.at_level(logging.WARNING):
        image, latent, faces = load(kf, "bi_small.png").args
    assert "was resampled back" in caplog.text
    assert tuple(image.shape[1:3]) == tuple(faces.image_hw) == tuple(made.faces.image_hw)


@case("B10", "RGBA or grayscale copy of the PNG: alpha dropped, warns; gray refused as edited",
      "alpha channel ignored")
def test_rgba_and_grayscale_files(kf, made, caplog):
    data = made.saved.read_bytes()
    start, end = chunk_of(data)
    with Image.open(made.saved) as im:
        put(made, "bi_rgba.png", with_chunk(png_bytes(im.convert("RGBA")), data[start:end]))
        put(made, "bi_gray.png", with_chunk(png_bytes(im.convert("L")), data[start:end]))
    with caplog.at_level(logging.WARNING):
        image, _, _ = load(kf, "bi_rgba.png").args
    assert "alpha channel ignored" in caplog.text and "pixels differ" not in caplog.text
    assert torch.equal(image, as_image(np.array(Image.open(made.saved).convert("RGB"))))
    expect(kf.errors.InputMismatchError, "were edited after it was saved", load, kf, "bi_gray.png")


@case("B11", "Format-v1 file saved without the latent payload and no VAE connected", "connect a VAE")
def test_no_payload_no_vae(kf, made):
    from conftest import REPO as repo
    record = kf.metadata.read_png(repo / "tests" / "fixtures" / "v1" / "anonymized.png")[1]
    for face in record.faces:
        face.payload.clear()
    pixels = kf.metadata.read_png(repo / "tests" / "fixtures" / "v1" / "anonymized.png")[0]
    path = made.input / "bi_nopayload.png"
    kf.metadata.write_png_atomic(path, pixels, record, overwrite=True)
    expect(kf.errors.MetadataError, "connect a VAE", load, kf, path.name)


@case("B47", "The record of one image placed into the pixels of another", "belongs to another image")
def test_record_on_other_pixels(kf, made, host):
    _, work = host
    data = made.saved.read_bytes()
    start, end = chunk_of(data)
    other = Image.open(work / "input" / "keyface_sample_group.jpg").convert("RGB").resize(
        Image.open(made.saved).size)
    put(made, "bi_mixed.png", with_chunk(png_bytes(other), data[start:end]))
    expect(kf.errors.InputMismatchError, "belongs to another image", load, kf, "bi_mixed.png")
    expect(kf.errors.InputMismatchError, "belongs to another image", load, kf, "bi_mixed.png", allow_altered=True)


@case("B48", "Pixels edited after saving (a face or the background retouched)", "enable allow_altered")
def test_pixels_edited_after_saving(kf, made, caplog):
    data = made.saved.read_bytes()
    start, end = chunk_of(data)
    pixels = np.array(Image.open(made.saved).convert("RGB"))
    x, y, size = made.faces.faces[0].box
    pixels[y + size // 2, x + size // 2] ^= 0x10                      # one retouched pixel in the face
    put(made, "bi_edited.png", with_chunk(png_bytes(Image.fromarray(pixels)), data[start:end]))
    text = expect(kf.errors.InputMismatchError, "enable allow_altered", load, kf, "bi_edited.png")
    assert "face(s) [0]" in text
    with caplog.at_level(logging.WARNING):
        load(kf, "bi_edited.png", allow_altered=True)
    assert "pixels differ" in caplog.text


@case("B49", "Restore run on an already restored latent (a second Restore chained after the first)",
      "already restored")
def test_restore_twice(kf, tiny, key_pair, made):
    models, _, _ = tiny
    latent = load(kf, "bi_anon.png").args[1]
    restored, _ = kf.core_nodes.restore_latent(models["eps"], latent, key_pair[0])
    expect(kf.errors.InputMismatchError, "already restored", kf.core_nodes.restore_latent, models["eps"], restored,
           key_pair[0])


@case("B50", "Lossless mode without the original photo, VAE or key connected to Save Anonymized",
      "lossless mode needs")
def test_lossless_without_inputs(kf, made):
    before = files_in(made.output)
    expect(kf.errors.InputMismatchError, "lossless mode needs original, vae, key", kf.face_nodes.SaveAnonymized.execute,
           made.image, made.faces, made.anon, "badinput/anon", True)
    assert files_in(made.output) == before


@pytest.fixture(scope="module")
def lossless(host, tiny, kf, key_pair, made, photo):
    """The same anonymization saved in lossless mode, loaded and restored to the latent."""
    _, work = host
    models, vae, _ = tiny
    F = kf.face_nodes
    with torch.inference_mode():
        F.SaveAnonymized.execute(made.image, made.faces, made.anon, "badinput/lossless", True, photo, vae, key_pair[0])
    saved = max((work / "output" / "badinput").glob("lossless_*.png"), key=lambda p: p.stat().st_mtime_ns)
    shutil.copy(saved, work / "input" / "bi_lossless.png")
    return saved


@case("B51", "Tampered sealed pixel residual (lossless file)", "tampered")
def test_tampered_lossless_residual(kf, tiny, key_pair, made, lossless):
    models, vae, _ = tiny
    import shutil as _shutil
    _shutil.copy(lossless, made.saved.parent / "lossless_src.png")
    made_lossless = SimpleNamespace(saved=lossless, input=made.input)

    def flip_a_byte(doc, arrays):
        sealed = arrays["faces.0.sealed_pixels"].copy()
        sealed[20] ^= 1
        arrays["faces.0.sealed_pixels"] = sealed
    name = rewrite(kf, made_lossless, "bi_tampered.png", flip_a_byte)
    image, latent, faces = load(kf, name).args
    with torch.inference_mode():
        restored, _ = kf.core_nodes.restore_latent(models["eps"], latent, key_pair[0])
        expect(kf.errors.KeyFaceError, "tampered", kf.face_nodes.restore_photo_from, image, faces, restored, vae,
               key_pair[0])


@case("B52", "Wrong key given to Restore Photo for a lossless file", "wrong key")
def test_wrong_key_for_lossless_pixels(kf, tiny, key_pair, made, lossless):
    models, vae, _ = tiny
    image, latent, faces = load(kf, "bi_lossless.png").args
    with torch.inference_mode():
        restored, _ = kf.core_nodes.restore_latent(models["eps"], latent, key_pair[0])
        expect(kf.errors.KeyFaceError, "wrong key", kf.face_nodes.restore_photo_from, image, faces, restored, vae,
               key_pair[1])


# ------------------------------------------------------------------------------------ images and masks

@case("B12", "RGBA or grayscale IMAGE into the face nodes: used as RGB", "3 channels")
def test_rgba_and_grayscale_images_into_face_nodes(kf, made, photo):
    F = kf.face_nodes
    gray = photo.mean(dim=-1, keepdim=True)
    rgba = torch.cat([photo, torch.ones_like(photo[..., :1])], dim=-1)
    for image in (gray, rgba):
        _, faces = F.detect(image, crop_size=CROP)
        crops, _, faces = F.crop(image, faces)
        assert crops.shape[-1] == 3
        assert F.paste(image, crops, faces).shape[-1] == 3
    expect(kf.errors.InputMismatchError, "channels", F.detect, photo[..., :2], crop_size=CROP)


@case("B13", "A batch of several photos into Face Mask", "one photo at a time")
def test_photo_batch_into_face_mask(kf, photo):
    expect(kf.errors.InputMismatchError, "one photo at a time", kf.face_nodes.detect, photo.repeat(2, 1, 1, 1))


@case("B14", "No face found in the photo", "no face was found")
def test_no_face_found(kf):
    blank = torch.full((1, 200, 300, 3), 0.5)
    text = expect(kf.errors.NoFaceError, "no face was found", kf.face_nodes.detect, blank)
    assert "MASK" in text


def test_animated_gif_names_its_frames(kf, host):
    """Issue 13: an animated GIF loads through LoadImage as a batch of its frames; the error names the frame count
    and how to pick one."""
    from PIL import Image
    import nodes as comfy_nodes
    from conftest import faces_dir
    _, work = host
    face = Image.open(faces_dir() / "obama.jpg").convert("RGB").resize((160, 160))
    frames = [face, face.transpose(Image.Transpose.FLIP_LEFT_RIGHT), face.rotate(5)]
    frames[0].save(work / "input" / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    try:
        photo = comfy_nodes.LoadImage().load_image("animated.gif")[0]
        assert photo.shape[0] == 3
        text = expect(kf.errors.InputMismatchError, "one photo at a time", kf.face_nodes.detect, photo)
        assert "its 3 frames" in text and "Image From Batch" in text
    finally:
        (work / "input" / "animated.gif").unlink()


@pytest.mark.parametrize("mode", ["I;16", "RGB16"])
def test_sixteen_bit_png_says_why_no_face(kf, host, mode):
    """Issue 13: a 16-bit PNG (gray or RGB) of a real face comes out of ComfyUI's LoadImage white; Face Mask must say
    that, not only "no face was found"."""
    from PIL import Image
    import nodes as comfy_nodes
    from conftest import faces_dir
    _, work = host
    face = np.asarray(Image.open(faces_dir() / "alex-lacamoire.png").convert("L"), dtype=np.uint16) * 257
    name = f"sixteen_{mode.replace(';', '')}.png"
    if mode == "I;16":
        Image.fromarray(face).save(work / "input" / name)   # uint16 -> a 16-bit grayscale PNG
    else:   # Pillow cannot write 16-bit RGB: build the PNG with its own encoder from a 48-bit buffer
        import zlib, struct
        rgb = np.repeat(face[..., None], 3, axis=-1).astype(">u2")
        h, w = face.shape
        raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))
        def chunk(kind, data):
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
               + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
        (work / "input" / name).write_bytes(png)
    photo = comfy_nodes.LoadImage().load_image(name)[0]
    try:
        # Which one happens depends on the Pillow under LoadImage; either way the user is not misled.
        if float((photo >= 250 / 255).all(dim=-1).float().mean()) > 0.98:
            text = expect(kf.errors.NoFaceError, "no face was found", kf.face_nodes.detect, photo)
            assert "16-bit" in text and "8-bit" in text
        else:
            _, faces = kf.face_nodes.detect(photo)
            assert len(faces.faces) >= 1
    finally:
        (work / "input" / name).unlink()


def test_white_image_says_it_is_white(kf):
    """The hint itself, independent of the Pillow version: an all-white photo (what a 16-bit PNG became) is named."""
    white = torch.ones(1, 200, 300, 3)
    text = expect(kf.errors.NoFaceError, "no face was found", kf.face_nodes.detect, white)
    assert "100% white" in text and "16-bit" in text


@case("B15", "All-zero mask given to Crop Faces", "every face mask is empty")
def test_all_zero_mask_at_crop(kf, made, photo):
    empty = torch.zeros(1, *photo.shape[1:3])
    expect(kf.errors.NoFaceError, "every face mask is empty", kf.face_nodes.crop, photo, made.faces, empty)


@case("B16", "All-zero mask (or one that vanishes at 1/8 size) at Invert to Noise or Apply Key Flip",
      "empty on the latent grid")
def test_all_zero_mask_at_invert_and_flip(kf, tiny, key_pair, made):
    models, _, _ = tiny
    C = kf.core_nodes
    empty = torch.zeros(1, CROP, CROP)
    expect(kf.errors.NoFaceError, "empty on the latent grid", C.invert_latent, models["eps"], made.latent, STEPS,
           "normal", "exact", 1.0, mask=empty)
    speck = torch.zeros(1, CROP, CROP)
    speck[:, 10:13, 10:13] = 1.0  # 3x3 pixels: no 8x8 cell reaches 0.5
    expect(kf.errors.NoFaceError, "empty on the latent grid", C.flip_latent, made.noise, key_pair[0], speck)


@case("B17", "Mask of another size than the image (Crop Faces)", "give a mask of the image's size")
def test_mask_of_another_size(kf, made, photo):
    wrong = torch.ones(1, photo.shape[1] // 2, photo.shape[2])
    expect(kf.errors.InputMismatchError, "give a mask of the image's size", kf.face_nodes.crop, photo, made.faces, wrong)


@case("B18", "Mask whose aspect ratio differs from the latent (Invert to Noise)", "aspect ratios differ")
def test_mask_latent_aspect_mismatch(kf, tiny, made):
    models, _, _ = tiny
    expect(kf.errors.InputMismatchError, "aspect ratios differ", kf.core_nodes.invert_latent, models["eps"],
           made.latent, STEPS, "normal", "exact", 1.0, mask=torch.ones(1, CROP, CROP * 2))


@case("B19", "Image other than (or resized from) the one the faces were found in", "use the same image (not resized)")
def test_other_image_for_faces(kf, made, photo):
    smaller = photo[:, :-8]
    expect(kf.errors.InputMismatchError, "use the same image (not resized)", kf.face_nodes.crop, smaller, made.faces)
    expect(kf.errors.InputMismatchError, "use the same image (not resized)", kf.face_nodes.paste, smaller,
           made.crops, made.faces)


@case("B20", "Number of crops differs from the number of faces (Paste Faces)", "connect the decoded crops")
def test_crop_count_mismatch(kf, made, photo):
    expect(kf.errors.InputMismatchError, "connect the decoded crops", kf.face_nodes.paste, photo,
           made.crops.repeat(2, 1, 1, 1), made.faces)


@case("B21", "Mask batch differs from the latent batch", "give one mask for all")
def test_mask_batch_mismatch(kf, tiny):
    models, vae, _ = tiny
    latent = {"samples": torch.randn(2, 4, CROP // 8, CROP // 8)}
    expect(kf.errors.InputMismatchError, "give one mask for all", kf.core_nodes.invert_latent, models["eps"],
           latent, STEPS, "normal", "exact", 1.0, mask=torch.ones(3, CROP, CROP))


@case("B22", "Latent that is not an image latent (video/audio shape)", "image latents")
def test_latent_of_wrong_rank(kf, tiny):
    models, _, _ = tiny
    latent = {"samples": torch.randn(1, 4, 2, 8, 8)}
    expect(kf.errors.InputMismatchError, "image latents", kf.core_nodes.invert_latent, models["eps"], latent,
           STEPS, "normal", "exact", 1.0)


# ------------------------------------------------------------------------------------ node wiring and settings

@case("B23", "Latent for other faces at Save Anonymized (count differs)", "connect the latent of the same crops")
def test_save_latent_of_other_faces(kf, made, host):
    F = kf.face_nodes
    before = files_in(made.output)
    from dataclasses import replace
    info = made.anon["keyface"]
    doubled = kf.core_nodes.make_latent(made.anon, torch.cat([made.anon["samples"]] * 2),
                                        replace(info, keyed=replace(info.keyed, x=torch.cat([info.keyed.x] * 2))))
    expect(kf.errors.InputMismatchError, "connect the latent of the same crops", F.SaveAnonymized.execute,
           made.image, made.faces, doubled, "badinput/anon")
    assert files_in(made.output) == before


@case("B24", "Latent never key-flipped at Save Anonymized", "never key-flipped")
def test_save_unflipped(kf, tiny, made):
    models, _, _ = tiny
    before = files_in(made.output)
    with torch.inference_mode():
        plain, _ = kf.core_nodes.regenerate_latent(models["eps"], made.noise, steps=STEPS)
    expect(kf.errors.InputMismatchError, "never key-flipped", kf.face_nodes.SaveAnonymized.execute,
           made.image, made.faces, plain, "badinput/anon")
    assert files_in(made.output) == before


@case("B25", "Noise edited by another node, or not from Invert to Noise, at Regenerate / Apply Key Flip",
      "unchanged")
def test_edited_noise(kf, tiny, key_pair, made):
    models, _, _ = tiny
    edited = dict(made.flipped, samples=made.flipped["samples"] * 1.01)
    expect(kf.errors.InputMismatchError, "unchanged", kf.core_nodes.regenerate_latent, models["eps"], edited)
    expect(kf.errors.InputMismatchError, "unchanged", kf.core_nodes.flip_latent, {"samples": torch.randn(1, 4, 8, 8)},
           key_pair[0])


@case("B26", "Latent without KeyFace info at Restore", "Restore needs the anonymized LATENT")
def test_restore_plain_latent(kf, tiny, key_pair):
    models, _, _ = tiny
    expect(kf.errors.InputMismatchError, "Restore needs the anonymized LATENT", kf.core_nodes.restore_latent,
           models["eps"], {"samples": torch.randn(1, 4, 8, 8)}, key_pair[0])


@case("B27", "Other model, LoRA or patches at Restore (stored model fingerprint)", "different model")
def test_restore_with_other_model(kf, tiny, key_pair, made):
    models, _, _ = tiny
    latent = load(kf, "bi_anon.png").args[1]
    expect(kf.errors.InputMismatchError, "different model", kf.core_nodes.restore_latent, models["v"], latent,
           key_pair[0])


@case("B28", "Other prompt or CLIP at Restore (stored conditioning fingerprint)", "conditioning differs")
def test_restore_with_other_prompt(kf, tiny, key_pair, made):
    models, _, clip = tiny
    latent = load(kf, "bi_anon.png").args[1]
    other = clip.encode_from_tokens_scheduled(clip.tokenize("a different prompt"))
    expect(kf.errors.InputMismatchError, "conditioning differs", kf.core_nodes.restore_latent, models["eps"],
           latent, key_pair[0], positive=other)


@case("B45", "SDXL/SD3/Flux conditioning without its pooled text embedding, or other Flux guidance at Restore",
      "pooled text embedding")
def test_conditioning_for_another_model(kf, key_pair):
    from keyface_dev import tiny_models
    model, positive = tiny_models.flux_model(0), tiny_models.conditioning("flux", 0)
    (cross, extra), = positive
    latent = {"samples": torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))}
    bare = [[cross, {k: v for k, v in extra.items() if k != "pooled_output"}]]
    expect(kf.errors.InputMismatchError, "pooled text embedding", kf.core_nodes.invert_latent, model, latent, 2,
           "normal", "exact", 1.0, positive=bare)
    noise, _ = kf.core_nodes.invert_latent(model, latent, 2, "normal", "exact", 1.0, positive=positive)
    anon, _ = kf.core_nodes.regenerate_latent(model, kf.core_nodes.flip_latent(noise, key_pair[0]), positive=positive)
    expect(kf.errors.InputMismatchError, "conditioning differs", kf.core_nodes.restore_latent, model, anon,
           key_pair[0], positive=[[cross, dict(extra, guidance=1.0)]])


@case("B29", "cfg above 1 without a negative conditioning", "connect one or set cfg to 1.0")
def test_cfg_without_negative(kf, tiny, made):
    models, _, clip = tiny
    positive = clip.encode_from_tokens_scheduled(clip.tokenize("a face"))
    expect(kf.errors.InputMismatchError, "connect one or set cfg to 1.0", kf.core_nodes.invert_latent,
           models["eps"], made.latent, STEPS, "normal", "exact", 3.0, positive=positive)


# ------------------------------------------------------------------------------------ keys

@case("B30", "Wrong key at Restore (stored key check)", "does not match")
def test_wrong_key(kf, tiny, key_pair, made):
    models, _, _ = tiny
    latent = load(kf, "bi_anon.png").args[1]
    text = expect(kf.errors.WrongKeyError, "does not match", kf.core_nodes.restore_latent, models["eps"], latent,
                  key_pair[1])
    assert "allow_wrong_key" in text


@case("B31", "Key file missing (e.g. a shared workflow names a key this server lacks)", "is not in")
def test_missing_key_file(kf):
    L = kf.key_nodes.LoadKey
    message = L.validate_inputs("key file", "colleague.key")
    assert isinstance(message, str) and "is not in" in message and "keygen" in message
    expect(kf.errors.KeyMaterialError, "was not found", L.execute, "key file", "colleague.key", "KEYFACE_KEY", "key")
    assert L.validate_inputs("key file", KEY_NAME) is True


@case("B32", "No key file selected, or a path instead of a file name", "no key file selected")
def test_no_key_file_selected(kf):
    L = kf.key_nodes.LoadKey
    for name in (kf.key_nodes.NO_KEYS, "../my_keyface.key", ""):
        expect(kf.errors.KeyMaterialError, "no key file selected", L.execute, "key file", name, "KEYFACE_KEY", "key")


@case("B33", "Key file of the wrong length or content (never echoed)", "64 hex digits")
def test_key_file_wrong_length(kf):
    folder = Path(os.environ["KEYFACE_KEYS_DIR"])
    secret = "ab" * 31  # 62 hex digits: one byte short
    (folder / "short.key").write_text(secret)
    os.chmod(folder / "short.key", 0o600)
    try:
        text = expect(kf.errors.KeyMaterialError, "64 hex digits", kf.key_nodes.LoadKey.execute, "key file",
                      "short.key", "KEYFACE_KEY", "key")
        assert secret not in text
    finally:
        (folder / "short.key").unlink()


@case("B34", "Key file readable by other users: loads, warns", "chmod 600")
def test_key_file_too_open(kf, caplog):
    folder = Path(os.environ["KEYFACE_KEYS_DIR"])
    shutil.copy(folder / KEY_NAME, folder / "open.key")
    os.chmod(folder / "open.key", 0o644)
    try:
        with caplog.at_level(logging.WARNING):
            key = kf.key_nodes.LoadKey.execute("key file", "open.key", "KEYFACE_KEY", "key").args[0]
        assert "chmod 600" in caplog.text and key.source
        for form in key_forms():
            assert form not in caplog.text
    finally:
        (folder / "open.key").unlink()


@case("B35", "Environment variable unset, empty, or not a valid name", "is not set")
def test_env_variable_unset(kf, monkeypatch):
    monkeypatch.delenv("KEYFACE_TEST_UNSET", raising=False)
    L = kf.key_nodes.LoadKey
    expect(kf.errors.KeyMaterialError, "is not set", L.execute, "environment variable", "", "KEYFACE_TEST_UNSET", "key")
    expect(kf.errors.KeyMaterialError, "variable name", L.execute, "environment variable", "", "not a name!", "key")


@case("B36", "Environment variable holding something that is not a key (never echoed)", "not hex digits")
def test_env_variable_unreadable(kf, monkeypatch):
    monkeypatch.setenv("KEYFACE_TEST_BAD", "zz" * 32)
    text = expect(kf.errors.KeyMaterialError, "not hex digits", kf.key_nodes.LoadKey.execute, "environment variable",
                  "", "KEYFACE_TEST_BAD", "key")
    assert "zz" * 32 not in text


@case("B37", "Passphrase shorter than 12 characters", "too short")
def test_short_passphrase(kf, monkeypatch):
    monkeypatch.setenv("KEYFACE_TEST_PASS", "hunter2")
    text = expect(kf.errors.KeyMaterialError, "too short", kf.key_nodes.LoadKey.execute, "environment variable", "",
                  "KEYFACE_TEST_PASS", "passphrase")
    assert "hunter2" not in text


@case("B38", "No key connected to Apply Key Flip", "connect a KEYFACE_KEY")
def test_no_key_connected(kf, made):
    expect(kf.errors.KeyMaterialError, "connect a KEYFACE_KEY", kf.core_nodes.flip_latent, made.noise, None)


# ------------------------------------------------------------------------------------ writing

@case("B39", "Output folder cannot be created (a file is in the way, read-only disk)", "nothing was written")
def test_output_folder_not_creatable(kf, made):
    (made.output / "blocked").write_text("a file where the folder should be")
    before = files_in(made.output)
    text = expect(kf.errors.KeyFaceError, "nothing was written", kf.face_nodes.SaveAnonymized.execute,
                  made.image, made.faces, made.anon, "blocked/anon")
    assert "output folder" in text
    assert files_in(made.output) == before


@case("B43", "filename_prefix leading outside the output folder, or empty", "inside ComfyUI's output folder")
def test_prefix_outside_output(kf, made):
    before = files_in(made.output.parent)
    for prefix in ("../escaped/anon", "/anon", "  "):
        expect(kf.errors.KeyFaceError, "inside ComfyUI's output folder", kf.face_nodes.SaveAnonymized.execute,
               made.image, made.faces, made.anon, prefix)
    assert files_in(made.output.parent) == before


@case("B40", "Output folder not writable or disk full while saving", "is writable and has free space")
def test_output_not_writable(kf, made, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
    before = files_in(made.output)
    expect(kf.errors.KeyFaceError, "is writable and has free space", kf.face_nodes.SaveAnonymized.execute,
           made.image, made.faces, made.anon, "badinput/anon")
    assert files_in(made.output) == before


@case("B41", "Run stopped while saving (Ctrl-C, server shutdown)", "no partial file")
def test_interrupt_while_saving(kf, made, monkeypatch):
    def save_then_stop(self, fp, *args, **kwargs):
        if hasattr(fp, "write"):
            fp.write(b"\x89PNG partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(Image.Image, "save", save_then_stop)
    before = files_in(made.output)
    with pytest.raises(KeyboardInterrupt):
        kf.face_nodes.SaveAnonymized.execute(made.image, made.faces, made.anon, "badinput/anon")
    monkeypatch.undo()
    assert files_in(made.output) == before  # "no partial file": neither the target nor the temporary file


@case("B42", "Run interrupted while sampling (through ComfyUI's executor)", "execution_interrupted")
def test_interrupt_while_sampling_writes_nothing(host, kf):
    import comfy.model_management
    import comfy.utils
    from test_workflows import load_api, run
    _, work = host
    before = files_in(work / "output")
    ticks = []
    previous = comfy.utils.PROGRESS_BAR_HOOK

    def interrupt_midway(value, total, preview, node_id=None):
        ticks.append(value)
        if len(ticks) == 5:
            comfy.model_management.interrupt_current_processing(True)
        if previous is not None:
            previous(value, total, preview, node_id)
    comfy.utils.set_progress_bar_global_hook(interrupt_midway)
    try:
        executor, server = run(load_api("keyface_anonymize"))
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
        comfy.model_management.interrupt_current_processing(False)
    events = [event for event, _ in executor.status_messages]
    assert not executor.success and "execution_interrupted" in events, events
    assert files_in(work / "output") == before


@case("B44", "filename_prefix repeating a word of the source file name ('obama_anon' for obama.jpg)",
      "repeats a word of the source image's file name")
def test_revealing_prefix_is_refused(host, kf):
    from test_workflows import load_api, run
    _, work = host
    prompt = load_api("keyface_anonymize")
    shutil.copy(work / "input" / "keyface_sample_face.jpg", work / "input" / "Jane_Doe-2024.jpg")
    for node in prompt.values():
        if node["class_type"] == "LoadImage":
            node["inputs"]["image"] = "Jane_Doe-2024.jpg"
        if node["class_type"] == "KeyFaceSaveAnonymized":
            node["inputs"]["filename_prefix"] = "keyface/jane_anon"
    before = files_in(work / "output")
    executor, _ = run(prompt)
    errors = [data for event, data in executor.status_messages if event == "execution_error"]
    assert errors and "repeats a word of the source image's file name" in errors[0]["exception_message"]
    assert errors[0]["node_type"] == "KeyFaceSaveAnonymized"
    assert files_in(work / "output") == before
    check = kf.face_nodes.prefix_repeats_source_name
    assert not check("keyface/anonymized", prompt) and not check("people/anon", prompt)
    assert check("DOE", prompt) and not check("keyface/jane", {"1": {"inputs": {"text": "jane"}}})


def test_readme_table_matches_the_tests():
    """The README's bad-input table has exactly these rows, each stating what its test checks."""
    text = (REPO / "README.md").read_text()
    rows = dict(re.findall(r"^\| (B\d\d) \| (.+) \|$", text, flags=re.M))
    cases = dict(CASES)
    # Rows whose tests live beside their feature: each module keeps {id: (kind, says, ...)}.
    import importlib
    for module_name, table in (("test_images", "ROWS"), ("test_detection", "BAD_INPUT_ROWS"),
                               ("test_hints", "BAD_INPUT_ROWS")):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            continue
        cases.update({k: tuple(v[:2]) for k, v in getattr(module, table, {}).items()})
    assert set(rows) == set(cases), sorted(set(rows) ^ set(cases))
    for case_id, (kind, says) in cases.items():
        assert says in rows[case_id], f"{case_id}: README row should quote {says!r}"
    assert len(cases) >= 20


INVERSION_FIELDS = ["steps", "scheduler", "method", "cfg", "sigmas", "model_id", "cond_id", "scramble"]
RECORD_FIELDS = ["image_size", "pixels_sha256", "look", "crop_size", "render", "latent", "masked", "kdf", "faces"]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8)


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(where=st.sampled_from(["inversion", "record", "face"]), index=st.integers(0, 8), value=JSON_VALUES,
       drop=st.booleans())
def test_fuzz_stored_settings_only_give_keyface_errors(kf, tiny, key_pair, made, where, index, value, drop):
    """Any value (or none) in any stored field: Load Anonymized and Restore either work or raise a KeyFaceError."""
    models, _, _ = tiny

    def change(doc, arrays):
        target = {"inversion": doc["inversion"], "record": doc, "face": doc["faces"][0]}[where]
        names = {"inversion": INVERSION_FIELDS, "record": RECORD_FIELDS, "face": sorted(doc["faces"][0])}[where]
        name = names[index % len(names)]
        if drop:
            target.pop(name, None)
        else:
            target[name] = value
    try:
        name = rewrite(kf, made, "bi_fuzz.png", change)
        with torch.inference_mode():
            _, latent, _ = load(kf, name).args
            kf.core_nodes.restore_latent(models["eps"], latent, key_pair[0])
    except kf.errors.KeyFaceError as err:
        for form in key_forms():
            assert form not in str(err)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_phone_copy_with_exif_orientation_loads_upright(kf, made, orientation):
    """Issue 13: a photo app re-saves the anonymized PNG with its pixels stored turned and an EXIF orientation tag
    (1-8). Load Anonymized shows it upright as ComfyUI's LoadImage does, so with the original PNG as metadata the
    pixels are exactly the saved ones (no sideways, squashed resample)."""
    from PIL import Image
    saved = made.saved
    original = np.asarray(Image.open(saved).convert("RGB"))
    # Stored = the inverse of what exif_transpose applies for this tag, so the displayed image is the original.
    inverse = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
               5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
               8: Image.Transpose.ROTATE_270}
    stored = Image.fromarray(original)
    if orientation in inverse:
        stored = stored.transpose(inverse[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    copy = saved.parent / f"phone_copy_{orientation}.png"
    stored.save(copy, exif=exif.tobytes())
    try:
        image, _, _, warnings = kf.face_nodes.load_anonymized(copy, metadata_path=saved)
        pixels = np.round(image[0].numpy() * 255).astype(np.uint8)
        assert pixels.shape == original.shape and np.array_equal(pixels, original)
        assert not any("resampled" in w for w in warnings), warnings
        if orientation != 1:
            assert any(f"EXIF orientation {orientation}" in w for w in warnings), warnings
    finally:
        copy.unlink()
