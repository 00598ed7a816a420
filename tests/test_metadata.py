"""Tests for keyface_core.metadata: record codec, strict decoding, atomic write, tolerant read."""

import base64
import copy
import json
import os
import stat
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from keyface_core import metadata
from keyface_core.errors import InputMismatchError, KeyFaceError, MetadataError
from keyface_core.metadata import (
    FORMAT_VERSION,
    PNG_KEYWORD,
    AnonymizationRecord,
    FaceRecord,
    ReadInfo,
    decode_record,
    encode_record,
    read_png,
    record_from_png_text,
    write_png_atomic,
)

FUZZ = settings(
    max_examples=300, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
KDF = {"name": "scrypt", "n": 2**15, "r": 8, "p": 1}
SETTINGS = {"steps": 20, "scheduler": "karras", "mode": "ddim_inversion", "cfg": 1.0,
            "sampler": "euler", "model_hash": "ab12", "latent_shape": [1, 4, 8, 8],
            "nested": {"list": [1, 2.5, None, True, "x"]}}


def soft_mask(h, w):
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot(yy - h / 2, xx - w / 2) / (min(h, w) / 2)
    return (np.clip((1.0 - r) * 4, 0, 1) * 255).round().astype(np.uint8)


def make_face(index, seed=0, latent=(1, 4, 8, 8), mask=(16, 16), box=(2, 3, 16)):
    rng = np.random.default_rng(seed)
    return FaceRecord(
        index=index,
        nonce=rng.bytes(16),
        key_check=rng.bytes(8).hex(),
        box=box,
        mask=None if mask is None else soft_mask(*mask),
        payload={"z_inv": rng.standard_normal(latent), "z_noise": rng.standard_normal(latent)},
    )


def make_record(n_faces=1, kdf=KDF, size=(32, 24), **face_kw):
    faces = [make_face(i, seed=i, **face_kw) for i in range(n_faces)]
    return AnonymizationRecord(image_size=size, settings=copy.deepcopy(SETTINGS), faces=faces,
                               kdf=kdf)


def make_pixels(w=32, h=24, channels=3, seed=1):
    rng = np.random.default_rng(seed)
    shape = (h, w) if channels == 1 else (h, w, channels)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def png_chunks(data):
    """Independent PNG chunk walker: list of (type, body) with CRCs verified."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        ctype, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(ctype + body) == crc
        out.append((ctype.decode("latin-1"), body))
        pos += 12 + length
    return out


def doc_of(record):
    return json.loads(encode_record(record))


def encode_doc(doc):
    return json.dumps(doc)


def chunk(ctype, body):
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def insert_chunk_before_idat(png, extra):
    pos = png.index(b"IDAT") - 4
    return png[:pos] + extra + png[pos:]


def listing(directory):
    return sorted(p.name for p in Path(directory).iterdir())


# ------------------------------------------------------------------------- record round trip


@pytest.mark.parametrize("kdf", [KDF, None])
@pytest.mark.parametrize("n_faces", [0, 1, 3])
def test_record_round_trip(kdf, n_faces):
    record = make_record(n_faces, kdf=kdf)
    decoded = decode_record(encode_record(record))
    assert decoded == record
    assert decoded.kdf == kdf
    assert decoded.version == FORMAT_VERSION
    assert decoded.settings == SETTINGS
    assert isinstance(decoded.image_size, tuple)


def test_float64_payload_is_bit_exact_including_special_values():
    special = np.array([np.nan, -np.nan, np.inf, -np.inf, -0.0, 0.0, 5e-324, 1.7976931348623157e308,
                        np.pi, 1 / 3], dtype=np.float64)
    odd_nan = np.frombuffer(struct.pack("<Q", 0x7FF0000000000123), dtype=np.float64)
    latent = np.concatenate([special, odd_nan]).reshape(1, 11)
    face = make_face(0)
    face.payload = {"z": latent, "big": np.random.default_rng(5).standard_normal((1, 4, 64, 64))}
    record = AnonymizationRecord((32, 24), {}, [face])
    out = decode_record(encode_record(record)).faces[0]
    for name, arr in face.payload.items():
        assert out.payload[name].dtype == np.float64
        assert out.payload[name].shape == arr.shape
        assert out.payload[name].tobytes() == arr.tobytes()
    assert out.mask.dtype == np.uint8 and np.array_equal(out.mask, face.mask)
    assert out == face


@pytest.mark.parametrize("dtype", ["uint8", "int8", "uint16", "int16", "uint32", "int32",
                                   "uint64", "int64", "float16", "float32", "float64",
                                   ">f8", ">i4"])
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (2, 3, 4)])
def test_array_dtypes_and_shapes_round_trip(dtype, shape):
    rng = np.random.default_rng(3)
    arr = np.asarray(rng.standard_normal(shape) * 100).astype(dtype)
    face = make_face(0)
    face.payload = {"a": arr}
    out = decode_record(encode_record(AnonymizationRecord((32, 24), {}, [face]))).faces[0]
    got = out.payload["a"]
    assert got.shape == arr.shape and got.dtype == arr.dtype.newbyteorder("=")
    assert np.array_equal(got, arr, equal_nan=True)
    assert got.flags.writeable and got.flags.c_contiguous


def test_encoded_layout_matches_the_documented_format():
    doc = doc_of(make_record(2))
    assert doc["format"] == "keyface" and doc["version"] == 1
    assert doc["image_size"] == [32, 24] and doc["kdf"] == KDF
    face = doc["faces"][1]
    assert face["index"] == 1 and len(bytes.fromhex(face["nonce"])) == 16
    assert face["box"] == [2, 3, 16]
    assert face["mask"]["dtype"] == "uint8" and face["mask"]["shape"] == [16, 16]
    latent = face["payload"]["z_inv"]
    assert latent["dtype"] == "float64" and latent["codec"] == "zlib+base64"
    raw = zlib.decompress(base64.b64decode(latent["data"]))
    assert np.array_equal(np.frombuffer(raw, "<f8").reshape(1, 4, 8, 8),
                          make_face(1, seed=1).payload["z_inv"])


def test_box_none_and_mask_none_round_trip():
    record = make_record(1, box=None, mask=None)
    out = decode_record(encode_record(record))
    assert out.faces[0].box is None and out.faces[0].mask is None and out == record


def test_decode_accepts_bytes():
    record = make_record(1)
    assert decode_record(encode_record(record).encode()) == record


def test_record_equality_notices_any_bit_change():
    a, b = make_record(1), make_record(1)
    assert a == b
    latent = b.faces[0].payload["z_inv"]
    latent[0, 0, 0, 0] = np.nextafter(latent[0, 0, 0, 0], 9)
    assert a != b


def test_typical_record_size_is_reported_and_fits_pillow_text_limit():
    # One 512x512 face, two float64 latents (1,4,64,64): the size quoted in the docs.
    face = make_face(0, latent=(1, 4, 64, 64), mask=(512, 512), box=None)
    text = encode_record(AnonymizationRecord((512, 512), dict(SETTINGS), [face], kdf=KDF))
    assert 300_000 < len(text) < PngImagePlugin.MAX_TEXT_CHUNK


# ------------------------------------------------------------------------ encode refusals


@pytest.mark.parametrize("name", ["key", "Key", "KEY", "passphrase", "password", "passwd",
                                  "secret", "api_key", "apiKey", "passPhrase", "pass_phrase",
                                  "user-password", "keys", "SECRET_TOKEN"])
@pytest.mark.parametrize("where", ["top", "nested", "in_list"])
def test_secret_named_settings_are_refused(name, where):
    value = {name: "hunter2"}
    settings_ = {"top": value, "nested": {"a": {"b": value}}, "in_list": {"l": [1, value]}}[where]
    if where == "top":
        settings_ = value
    record = AnonymizationRecord((32, 24), settings_, [make_face(0)])
    with pytest.raises(MetadataError, match="key material") as err:
        encode_record(record)
    assert "hunter2" not in str(err.value)


@pytest.mark.parametrize("name", ["keyframes", "monkey", "hotkey", "steps", "keyed_noise",
                                  "turkey", "check_len"])
def test_innocent_names_are_allowed(name):
    record = AnonymizationRecord((32, 24), {name: 1}, [make_face(0)])
    assert decode_record(encode_record(record)).settings == {name: 1}


def test_secret_named_payload_is_refused():
    face = make_face(0)
    face.payload["secret"] = np.zeros(3)
    with pytest.raises(MetadataError, match="key material"):
        encode_record(AnonymizationRecord((32, 24), {}, [face]))


@pytest.mark.parametrize("mutate, match", [
    (lambda r: r.settings.update(steps=np.int64(3)), "JSON"),
    (lambda r: r.settings.update({1: "x"}), "non-string key"),
    (lambda r: r.settings.update(cfg=float("nan")), "finite"),
    (lambda r: setattr(r, "settings", [1]), "settings must be a dict"),
    (lambda r: setattr(r, "image_size", (0, 24)), "width"),
    (lambda r: setattr(r, "version", 2), "format version 1"),
    (lambda r: setattr(r, "kdf", {"name": "argon2", "n": 2, "r": 1, "p": 1}), "unknown key der"),
    (lambda r: setattr(r, "kdf", {"name": "scrypt", "n": 1000, "r": 8, "p": 1}), "power of two"),
    (lambda r: setattr(r.faces[0], "nonce", b"short"), "16 bytes"),
    (lambda r: setattr(r.faces[0], "key_check", "not hex!"), "hex"),
    (lambda r: setattr(r.faces[0], "box", (1, 2)), "x, y, size"),
    (lambda r: setattr(r.faces[0], "mask", np.ones((4, 4), np.float32)), "uint8"),
    (lambda r: setattr(r.faces[0], "index", -1), "index"),
    (lambda r: r.faces[0].payload.update(c=np.ones(2, np.complex128)), "dtype"),
    (lambda r: r.faces[0].payload.update(l=[1.0, 2.0]), "numpy array"),
    (lambda r: r.faces.append(make_face(0)), "same index"),
    (lambda r: r.faces.append("face"), "FaceRecord"),
])
def test_encode_refuses_invalid_records(mutate, match):
    record = make_record(1)
    mutate(record)
    with pytest.raises(MetadataError, match=match):
        encode_record(record)


def test_encode_refuses_non_records():
    with pytest.raises(MetadataError, match="AnonymizationRecord"):
        encode_record({"faces": []})


# ------------------------------------------------------------------------- decode refusals


def assert_damaged(text, match=None):
    with pytest.raises(MetadataError) as err:
        decode_record(text)
    message = str(err.value)
    assert "damaged" in message and "original anonymized PNG" in message
    if match:
        assert match in message, message
    return message


def test_newer_version_says_update():
    doc = doc_of(make_record(1))
    doc["version"] = 7
    doc["something_new"] = {"x": 1}  # a newer format may have any layout
    with pytest.raises(MetadataError) as err:
        decode_record(encode_doc(doc))
    assert "newer KeyFace" in str(err.value) and "version 7" in str(err.value)
    assert "Update" in str(err.value)


@pytest.mark.parametrize("text, match", [
    ("", "not valid JSON"),
    ("{not json", "not valid JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    ("[]", "not a KeyFace record"),
    ('{"format": "other", "version": 1}', "not a KeyFace record"),
    ('{"format": "keyface", "version": "1"}', "format version"),
    ('{"format": "keyface", "version": 0}', "format version"),
    ('{"format": "keyface", "version": 1}', "missing field"),
    ('{"format": "keyface", "format": "keyface", "version": 1}', "repeats"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"format": "keyface", "version": 1, "x": NaN}', "NaN"),
    ('{"format": "keyface", "version": 1, "x": 1e999}', "out of range"),
    ('{"format": "keyface", "version": ' + "9" * 5000 + "}", "not valid JSON"),
])
def test_malformed_text_is_refused(text, match):
    assert_damaged(text, match)


def face_doc_case(mutate):
    doc = doc_of(make_record(2))
    mutate(doc)
    return encode_doc(doc)


def _set_array(doc, **changes):
    doc["faces"][0]["payload"]["z_inv"].update(changes)


@pytest.mark.parametrize("mutate, match", [
    (lambda d: _set_array(d, data=d["faces"][0]["payload"]["z_inv"]["data"][:-7]), "base64"),
    (lambda d: _set_array(d, data="!!!!" + d["faces"][0]["payload"]["z_inv"]["data"]), "base64"),
    (lambda d: _set_array(d, data=base64.b64encode(b"not zlib at all").decode()), "decompress"),
    (lambda d: _set_array(d, dtype="float32"), "more than"),
    (lambda d: _set_array(d, dtype="float128"), "unknown dtype"),
    (lambda d: _set_array(d, dtype="object"), "unknown dtype"),
    (lambda d: _set_array(d, shape=[1, 4, 8, 9]), "fewer than"),
    (lambda d: _set_array(d, shape=[1, 4, 8, -8]), "shape"),
    (lambda d: _set_array(d, shape=[1] * 9), "shape"),
    (lambda d: _set_array(d, shape="1,4,8,8"), "shape"),
    (lambda d: _set_array(d, codec="gzip+hex"), "codec"),
    (lambda d: _set_array(d, extra=1), "unexpected field"),
    (lambda d: d["faces"][0]["payload"]["z_inv"].pop("dtype"), "missing field"),
    (lambda d: d["faces"][0].update(nonce="00" * 15), "nonce"),
    (lambda d: d["faces"][0].update(nonce="ZZ" * 16), "nonce"),
    (lambda d: d["faces"][0].update(key_check=""), "key_check"),
    (lambda d: d["faces"][0].update(index=True), "index"),
    (lambda d: d["faces"][1].update(index=0), "same index"),
    (lambda d: d["faces"][0].update(box=[1, 2, 0]), "size"),
    (lambda d: d["faces"][0].update(box=[1, 2]), "x, y, size"),
    (lambda d: d["faces"][0].update(payload=[]), "payload"),
    (lambda d: d["faces"][0]["mask"].update(dtype="int8"), "uint8"),
    (lambda d: d.update(faces={}), "faces"),
    (lambda d: d.update(settings=[]), "settings"),
    (lambda d: d.update(image_size=[32]), "image_size"),
    (lambda d: d.update(kdf={"name": "scrypt", "n": 2**20, "r": 2**10, "p": 1}), "memory"),
    (lambda d: d.update(kdf={"name": "scrypt", "n": 16}), "missing field"),
])
def test_damaged_fields_are_refused(mutate, match):
    assert_damaged(face_doc_case(mutate), match)


def test_zip_bomb_declared_huge_is_refused_before_decompressing():
    bomb = zlib.compressobj(9)
    data = b"".join(bomb.compress(bytes(2**20)) for _ in range(64)) + bomb.flush()  # 64 MiB of 0
    doc = doc_of(make_record(1))
    doc["faces"][0]["payload"]["z_inv"] = {"dtype": "uint8", "shape": [2**30],
                                           "codec": "zlib+base64",
                                           "data": base64.b64encode(data).decode()}
    assert_damaged(encode_doc(doc), "limit on decoded arrays")


def test_zip_bomb_behind_a_small_shape_stops_early():
    bomb = zlib.compressobj(9)
    data = b"".join(bomb.compress(bytes(2**20)) for _ in range(64)) + bomb.flush()
    doc = doc_of(make_record(1))
    doc["faces"][0]["payload"]["z_inv"] = {"dtype": "uint8", "shape": [16],
                                           "codec": "zlib+base64",
                                           "data": base64.b64encode(data).decode()}
    assert_damaged(encode_doc(doc), "more than the 16 bytes")


def test_decoded_bytes_are_capped_across_the_whole_record(monkeypatch):
    record = make_record(3)  # each face: 2 x 2048 B latents + 256 B mask
    text = encode_record(record)
    monkeypatch.setattr(metadata, "MAX_DECODED_BYTES", 2 * 4352 + 100)
    assert_damaged(text, "faces[2]")
    with pytest.raises(MetadataError, match="limit"):
        encode_record(record)


def test_record_from_png_text():
    record = make_record(1)
    assert record_from_png_text({}) is None
    assert record_from_png_text({"parameters": "x", "dpi": (72, 72)}) is None
    assert record_from_png_text({PNG_KEYWORD: encode_record(record)}) == record
    assert record_from_png_text({PNG_KEYWORD: encode_record(record).encode()}) == record
    with pytest.raises(MetadataError, match="damaged"):
        record_from_png_text({PNG_KEYWORD: 42})
    with pytest.raises(MetadataError, match="damaged"):
        record_from_png_text({PNG_KEYWORD: "{}"})
    with pytest.raises(MetadataError, match="img.info"):
        record_from_png_text("keyface")


# ------------------------------------------------------------------------------ PNG write


def test_png_round_trip_is_exact_and_holds_only_expected_chunks(tmp_path):
    pixels, record = make_pixels(), make_record(2)
    text = {"Software": "KeyFace", "Comment": "anonymized – ünïcödé"}
    out = write_png_atomic(tmp_path / "a.png", pixels, record, text=text)
    assert out == tmp_path / "a.png" and listing(tmp_path) == ["a.png"]

    chunks = png_chunks(out.read_bytes())
    types = [t for t, _ in chunks]
    assert types[0] == "IHDR" and types[-1] == "IEND"
    assert set(types) == {"IHDR", "iTXt", "tEXt", "IDAT", "IEND"}
    texts = [body for t, body in chunks if t in ("tEXt", "iTXt", "zTXt")]
    keywords = sorted(body.split(b"\0", 1)[0].decode("latin-1") for body in texts)
    assert keywords == sorted([PNG_KEYWORD, "Software", "Comment"])
    keyface_body = next(b for b in texts if b.startswith(b"keyface\0"))
    assert keyface_body[len(b"keyface\0")] == 1, "the record chunk must be compressed"
    first_idat = types.index("IDAT")
    assert all(t == "IDAT" for t in types[first_idat:-1])

    got, got_record, info = read_png(out)
    assert got.dtype == np.uint8 and got.shape == pixels.shape and np.array_equal(got, pixels)
    assert got_record == record
    assert info == ReadInfo("PNG", "RGB", (32, 24), True, False, [])

    with Image.open(out) as img:  # the path ComfyUI's LoadImage takes
        assert record_from_png_text(img.info) == record
        assert img.info["Software"] == "KeyFace" and img.info["Comment"] == text["Comment"]


@pytest.mark.parametrize("channels, mode", [(1, "L"), (4, "RGBA")])
def test_png_write_accepts_gray_and_rgba(tmp_path, channels, mode):
    pixels = make_pixels(channels=channels)
    out = write_png_atomic(tmp_path / "x.png", pixels, make_record(1))
    with Image.open(out) as img:
        assert img.mode == mode and np.array_equal(np.asarray(img), pixels)
    _, record, info = read_png(out)
    assert record == make_record(1) and info.mode == mode and info.warnings


def test_png_without_record(tmp_path):
    out = write_png_atomic(tmp_path / "plain.png", make_pixels(), None)
    assert [t for t, _ in png_chunks(out.read_bytes())] == ["IHDR", "IDAT", "IEND"]
    pixels, record, info = read_png(out)
    assert record is None and not info.has_keyface_chunk and info.warnings == []


def test_source_exif_and_icc_never_reach_the_output(tmp_path):
    src = tmp_path / "src.png"
    exif = Image.Exif()
    exif[0x010F] = "CameraMaker"
    exif[0x8825] = {1: "N"}
    Image.fromarray(make_pixels()).save(src, exif=exif, icc_profile=b"fake-icc" * 10,
                                        dpi=(300, 300))
    assert {"eXIf", "iCCP", "pHYs"} <= {t for t, _ in png_chunks(src.read_bytes())}
    pixels, _, _ = read_png(src)
    out = write_png_atomic(tmp_path / "out.png", pixels, make_record(1))
    types = {t for t, _ in png_chunks(out.read_bytes())}
    assert types == {"IHDR", "iTXt", "IDAT", "IEND"}
    assert b"CameraMaker" not in out.read_bytes()


def test_icc_profile_only_when_passed(tmp_path):
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    out = write_png_atomic(tmp_path / "icc.png", make_pixels(), None, icc_profile=icc)
    assert "iCCP" in {t for t, _ in png_chunks(out.read_bytes())}


def test_large_record_is_stored_uncompressed_so_pillow_can_still_read_it(tmp_path):
    face = make_face(0, latent=(1, 4, 128, 128), mask=None)  # ~1.4 MB of JSON
    record = AnonymizationRecord((32, 24), {}, [face])
    assert len(encode_record(record)) > PngImagePlugin.MAX_TEXT_CHUNK
    out = write_png_atomic(tmp_path / "big.png", make_pixels(), record)
    body = next(b for t, b in png_chunks(out.read_bytes()) if b.startswith(b"keyface\0"))
    assert body[len(b"keyface\0")] == 0
    with Image.open(out) as img:
        assert record_from_png_text(img.info) == record
    assert read_png(out)[1] == record


def test_write_refuses_bad_inputs(tmp_path):
    target = tmp_path / "x.png"
    for bad in (make_pixels().astype(np.float32), np.zeros((4, 4, 2), np.uint8),
                np.zeros((0, 4, 3), np.uint8), [[0]]):
        with pytest.raises(InputMismatchError, match="uint8"):
            write_png_atomic(target, bad, None)
    with pytest.raises(InputMismatchError, match="40x24"):
        write_png_atomic(target, make_pixels(w=40), make_record(1))
    with pytest.raises(InputMismatchError, match="reserved"):
        write_png_atomic(target, make_pixels(), None, text={"KeyFace": "x"})
    with pytest.raises(InputMismatchError, match="key material"):
        write_png_atomic(target, make_pixels(), None, text={"passphrase": "x"})
    with pytest.raises(MetadataError, match="key material"):
        write_png_atomic(target, make_pixels(), AnonymizationRecord((32, 24), {"key": "k"}, []))
    assert listing(tmp_path) == []


def test_existing_file_is_not_overwritten_unless_asked(tmp_path):
    target = tmp_path / "a.png"
    target.write_bytes(b"precious")
    with pytest.raises(KeyFaceError, match="already exists.*overwrite=True"):
        write_png_atomic(target, make_pixels(), make_record(1))
    assert target.read_bytes() == b"precious" and listing(tmp_path) == ["a.png"]
    write_png_atomic(target, make_pixels(), make_record(1), overwrite=True)
    assert read_png(target)[1] == make_record(1) and listing(tmp_path) == ["a.png"]


def test_file_created_during_the_write_is_not_clobbered(tmp_path, monkeypatch):
    target = tmp_path / "race.png"
    real = tempfile.NamedTemporaryFile

    def racing(*args, **kwargs):
        target.write_bytes(b"written by someone else")
        return real(*args, **kwargs)

    monkeypatch.setattr(metadata.tempfile, "NamedTemporaryFile", racing)
    with pytest.raises(KeyFaceError, match="already exists"):
        write_png_atomic(target, make_pixels(), None)
    assert target.read_bytes() == b"written by someone else"
    assert listing(tmp_path) == ["race.png"]


def test_filesystem_without_hard_links_still_refuses_to_clobber(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(metadata.os, "link", no_links)
    target = tmp_path / "a.png"
    write_png_atomic(target, make_pixels(), make_record(1))
    assert read_png(target)[1] == make_record(1) and listing(tmp_path) == ["a.png"]

    real = tempfile.NamedTemporaryFile
    other = tmp_path / "b.png"

    def racing(*args, **kwargs):
        other.write_bytes(b"theirs")
        return real(*args, **kwargs)

    monkeypatch.setattr(metadata.tempfile, "NamedTemporaryFile", racing)
    with pytest.raises(KeyFaceError, match="already exists"):
        write_png_atomic(other, make_pixels(), None)
    assert other.read_bytes() == b"theirs" and listing(tmp_path) == ["a.png", "b.png"]


@pytest.mark.parametrize("existing", [False, True])
def test_failure_mid_write_leaves_nothing_behind(tmp_path, monkeypatch, existing):
    target = tmp_path / "a.png"
    if existing:
        target.write_bytes(b"precious")

    def failing_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 1000)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(KeyFaceError, match="No space left on device.*nothing was written"):
        write_png_atomic(target, make_pixels(), make_record(1), overwrite=True)
    assert listing(tmp_path) == (["a.png"] if existing else [])
    if existing:
        assert target.read_bytes() == b"precious"


def test_encoder_error_is_wrapped_and_cleaned_up(tmp_path, monkeypatch):
    def failing_save(self, fp, *args, **kwargs):
        fp.write(b"partial")
        raise ValueError("encoder exploded")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(KeyFaceError, match="could not encode a.png as PNG"):
        write_png_atomic(tmp_path / "a.png", make_pixels(), None)
    assert listing(tmp_path) == []


def test_interrupt_during_write_cleans_up_and_propagates(tmp_path, monkeypatch):
    def interrupted(self, fp, *args, **kwargs):
        fp.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_png_atomic(tmp_path / "a.png", make_pixels(), None)
    assert listing(tmp_path) == []


def test_unwritable_directory_is_reported(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(metadata.tempfile, "NamedTemporaryFile", denied)
    with pytest.raises(KeyFaceError, match="Permission denied.*writable"):
        write_png_atomic(tmp_path / "a.png", make_pixels(), None)
    assert listing(tmp_path) == []


def test_read_only_directory_really_refuses(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        try:
            (ro / "probe").write_bytes(b"")
        except PermissionError:
            pass
        else:
            (ro / "probe").unlink()
            pytest.skip("running with privileges that ignore directory permissions (root)")
        with pytest.raises(KeyFaceError, match="writable"):
            write_png_atomic(ro / "a.png", make_pixels(), make_record(1))
        assert listing(ro) == []
    finally:
        ro.chmod(0o700)


def test_filesystem_refusing_chmod_does_not_fail_the_save(tmp_path, monkeypatch):
    def no_chmod(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(metadata.os, "chmod", no_chmod)
    out = write_png_atomic(tmp_path / "a.png", make_pixels(), make_record(1))
    assert read_png(out)[1] == make_record(1) and listing(tmp_path) == ["a.png"]


def test_text_must_be_a_dict(tmp_path):
    with pytest.raises(InputMismatchError, match="text must be a dict"):
        write_png_atomic(tmp_path / "a.png", make_pixels(), None, text=[("a", "b")])


def test_missing_directory_is_reported(tmp_path):
    with pytest.raises(KeyFaceError, match="exists, is writable"):
        write_png_atomic(tmp_path / "nope" / "a.png", make_pixels(), None)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_written_file_gets_normal_permissions_not_temp_file_ones(tmp_path):
    out = write_png_atomic(tmp_path / "a.png", make_pixels(), None)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask
    out.chmod(0o640)
    write_png_atomic(out, make_pixels(), None, overwrite=True)
    assert stat.S_IMODE(out.stat().st_mode) == 0o640


# ------------------------------------------------------------------------------- PNG read


def save_with_pil(path, image, **kwargs):
    image.save(path, **kwargs)
    return path


def test_read_jpeg_is_flagged_lossy(tmp_path):
    path = save_with_pil(tmp_path / "a.jpg", Image.fromarray(make_pixels()), quality=90)
    pixels, record, info = read_png(path)
    assert pixels.shape == (24, 32, 3) and pixels.dtype == np.uint8 and record is None
    assert info.format == "JPEG" and info.lossy and not info.has_keyface_chunk
    assert any("JPEG" in w and "metadata cannot be present" in w and "approximate" in w
               for w in info.warnings)


def test_read_jpeg_renamed_to_png(tmp_path):
    path = save_with_pil(tmp_path / "a.png", Image.fromarray(make_pixels()), format="JPEG")
    _, record, info = read_png(path)
    assert record is None and info.format == "JPEG" and info.lossy


@pytest.mark.parametrize("lossless", [False, True])
def test_read_webp(tmp_path, lossless):
    path = save_with_pil(tmp_path / "a.webp", Image.fromarray(make_pixels()), lossless=lossless)
    pixels, _, info = read_png(path)
    assert info.format == "WEBP" and info.lossy is (not lossless)
    if lossless:
        assert np.array_equal(pixels, make_pixels())
        assert any("not PNG" in w for w in info.warnings)
    else:
        assert any("WebP (lossy)" in w for w in info.warnings)


def test_read_rgba_drops_alpha_without_compositing(tmp_path):
    rgba = make_pixels(channels=4)
    rgba[..., 3] = 0  # fully transparent: compositing would destroy the colours
    path = save_with_pil(tmp_path / "a.png", Image.fromarray(rgba))
    pixels, _, info = read_png(path)
    assert np.array_equal(pixels, rgba[..., :3]) and info.mode == "RGBA"
    assert "image was RGBA; alpha channel ignored" in info.warnings


def test_read_grayscale(tmp_path):
    gray = make_pixels(channels=1)
    pixels, _, info = read_png(save_with_pil(tmp_path / "g.png", Image.fromarray(gray)))
    assert pixels.shape == (24, 32, 3)
    assert all(np.array_equal(pixels[..., c], gray) for c in range(3))
    assert info.mode == "L" and "image converted from grayscale" in info.warnings


def test_read_grayscale_with_alpha(tmp_path):
    la = Image.fromarray(make_pixels(channels=1)).convert("LA")
    _, _, info = read_png(save_with_pil(tmp_path / "la.png", la))
    assert info.mode == "LA"
    assert "image was LA; alpha channel ignored" in info.warnings
    assert "image converted from grayscale" in info.warnings


def test_read_16_bit_grayscale_scales_to_8_bit(tmp_path):
    values = np.array([[0, 257, 65535, 32896, 128, 65280]], dtype=np.uint16)
    path = save_with_pil(tmp_path / "g16.png", Image.fromarray(values))
    pixels, _, info = read_png(path)
    assert info.mode.startswith("I")
    assert pixels.dtype == np.uint8 and pixels.shape == (1, 6, 3)
    assert pixels[0, :, 0].tolist() == [0, 1, 255, 128, 0, 254]
    assert any("16-bit" in w for w in info.warnings)
    assert "image converted from grayscale" in info.warnings


def test_read_16_bit_rgb_png_is_flagged(tmp_path):
    # Pillow cannot write 48-bit PNGs, so build one: IHDR depth 16, colour type 2.
    h, w = 2, 3
    rows = np.arange(h * w * 3, dtype=">u2").reshape(h, w * 3) * 1000
    raw = b"".join(b"\0" + row.tobytes() for row in rows)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    path = tmp_path / "rgb16.png"
    path.write_bytes(png)
    pixels, _, info = read_png(path)
    assert pixels.shape == (2, 3, 3) and pixels.dtype == np.uint8
    assert any("16 bits per channel" in w for w in info.warnings)


def test_read_palette_image(tmp_path):
    pal = Image.fromarray(make_pixels()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    path = save_with_pil(tmp_path / "p.png", pal)
    pixels, _, info = read_png(path)
    assert info.mode == "P" and np.array_equal(pixels, np.asarray(pal.convert("RGB")))
    assert any("palette" in w for w in info.warnings)


def test_read_warns_when_image_was_resized(tmp_path):
    record = make_record(1, size=(16, 12))
    out = write_png_atomic(tmp_path / "a.png", make_pixels(16, 12), record)
    with Image.open(out) as img:
        img.resize((32, 24)).save(tmp_path / "big.png", pnginfo=_pnginfo_from(img.info))
    _, got, info = read_png(tmp_path / "big.png")
    assert got == record and any("resized" in w for w in info.warnings)


def _pnginfo_from(info):
    out = PngImagePlugin.PngInfo()
    out.add_itxt(PNG_KEYWORD, info[PNG_KEYWORD], zip=True)
    return out


@pytest.mark.parametrize("ctype", [b"tEXt", b"zTXt", b"iTXt"])
def test_read_record_from_any_text_chunk_type(tmp_path, ctype):
    text = encode_record(make_record(1)).encode()
    body = {b"tEXt": b"keyface\0" + text,
            b"zTXt": b"keyface\0\0" + zlib.compress(text),
            b"iTXt": b"keyface\0\1\0en\0\0" + zlib.compress(text)}[ctype]
    plain = write_png_atomic(tmp_path / "p.png", make_pixels(), None).read_bytes()
    path = tmp_path / "t.png"
    path.write_bytes(insert_chunk_before_idat(plain, chunk(ctype, body)))
    assert read_png(path)[1] == make_record(1)


def test_corrupt_record_chunk_raises_metadata_error(tmp_path):
    out = write_png_atomic(tmp_path / "a.png", make_pixels(), make_record(1))
    data = bytearray(out.read_bytes())
    pos = data.index(b"keyface\0") + 40
    data[pos] ^= 0x55
    bad = tmp_path / "bad.png"
    bad.write_bytes(bytes(data))
    with pytest.raises(MetadataError, match="bad.png.*checksum.*original anonymized PNG"):
        read_png(bad)


def test_corrupt_record_text_with_valid_crc_raises_metadata_error(tmp_path):
    plain = write_png_atomic(tmp_path / "p.png", make_pixels(), None).read_bytes()
    path = tmp_path / "t.png"
    path.write_bytes(insert_chunk_before_idat(plain, chunk(b"tEXt", b"keyface\0{broken")))
    with pytest.raises(MetadataError, match="not valid JSON"):
        read_png(path)
    bomb = zlib.compressobj(9)
    data = b"".join(bomb.compress(bytes(2**20)) for _ in range(8)) + bomb.flush()
    path.write_bytes(insert_chunk_before_idat(plain, chunk(b"zTXt", b"keyface\0\0" + data)))
    with pytest.raises(MetadataError, match="damaged"):
        read_png(path)


def test_two_record_chunks_are_refused(tmp_path):
    out = write_png_atomic(tmp_path / "a.png", make_pixels(), make_record(1))
    extra = chunk(b"tEXt", b"keyface\0" + encode_record(make_record(2)).encode())
    path = tmp_path / "two.png"
    path.write_bytes(insert_chunk_before_idat(out.read_bytes(), extra))
    with pytest.raises(MetadataError, match="2 KeyFace metadata chunks"):
        read_png(path)


def test_newer_version_in_png_says_update(tmp_path):
    doc = doc_of(make_record(1))
    doc["version"] = FORMAT_VERSION + 1
    plain = write_png_atomic(tmp_path / "p.png", make_pixels(), None).read_bytes()
    path = tmp_path / "new.png"
    path.write_bytes(insert_chunk_before_idat(
        plain, chunk(b"tEXt", b"keyface\0" + json.dumps(doc).encode())))
    with pytest.raises(MetadataError, match="newer KeyFace.*Update"):
        read_png(path)


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(KeyFaceError, match="not found.*missing.png"):
        read_png(tmp_path / "missing.png")
    with pytest.raises(KeyFaceError, match="folder"):
        read_png(tmp_path)
    (tmp_path / "text.png").write_text("hello, I am not an image")
    with pytest.raises(KeyFaceError, match="text.png is not an image"):
        read_png(tmp_path / "text.png")
    good = write_png_atomic(tmp_path / "a.png", make_pixels(), None).read_bytes()
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(KeyFaceError, match="cut.png could not be decoded"):
        read_png(tmp_path / "cut.png")


# ------------------------------------------------------------------------------------ fuzz

_VALID_RECORD = make_record(2, latent=(1, 2, 2, 2), mask=(3, 3))
_VALID_TEXT = encode_record(_VALID_RECORD).encode()
_VALID_DOC = json.loads(_VALID_TEXT)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


_DOC_PATHS = [p for p in _paths(_VALID_DOC) if p]
_json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
                 | st.text(max_size=20))
_json_values = st.recursive(
    _json_scalars,
    lambda inner: (st.lists(inner, max_size=4)
                   | st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
_edge_values = st.sampled_from([
    None, True, False, 0, -1, 1, 2, 16, 2**31, 2**63, 2**64, -(2**63), 1.5, "", "0" * 32, "zz",
    "float64", "uint8", "bool", "object", "V8", [], {}, [0], [2**31] * 4, [2**20] * 3,
    [1, 2, 3], "AAAA", "eJw=", "====", ["a"], {"x": 1},
])


def _only_metadata_errors(value):
    for call in (decode_record, lambda v: record_from_png_text({PNG_KEYWORD: v})):
        try:
            call(value)
        except MetadataError as err:
            assert str(err)


def _mutate(data, ops):
    data = bytearray(data)
    for kind, where, byte in ops:
        pos = where % (len(data) + 1)
        if kind == "flip" and data:
            data[pos % len(data)] ^= byte or 1
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = bytes([byte])
        elif kind == "delete" and data:
            del data[pos % len(data)]
    return bytes(data)


_mutations = st.lists(
    st.tuples(st.sampled_from(["flip", "truncate", "insert", "delete"]),
              st.integers(0, 2**20), st.integers(0, 255)),
    min_size=1, max_size=4,
)


@FUZZ
@given(st.binary(max_size=4096))
def test_fuzz_arbitrary_bytes_only_raise_metadata_error(data):
    _only_metadata_errors(data)


@FUZZ
@given(st.one_of(st.text(max_size=200), _json_values.map(json.dumps)))
def test_fuzz_arbitrary_text_only_raises_metadata_error(text):
    _only_metadata_errors(text)


@FUZZ
@given(st.sampled_from(_DOC_PATHS), st.one_of(_edge_values, _json_values), st.booleans())
def test_fuzz_field_substitutions_only_raise_metadata_error(path, value, delete):
    doc = copy.deepcopy(_VALID_DOC)
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    text = json.dumps(doc)
    _only_metadata_errors(text)
    _only_metadata_errors(text.encode())


@FUZZ
@given(_mutations)
def test_fuzz_mutated_record_only_raises_metadata_error(ops):
    data = _mutate(_VALID_TEXT, ops)
    _only_metadata_errors(data)
    _only_metadata_errors(data.decode("latin-1"))


@pytest.fixture(scope="module")
def valid_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("png") / "valid.png"
    record = make_record(1, size=(8, 6), latent=(1, 2, 2, 2), mask=(4, 4))
    return write_png_atomic(path, make_pixels(8, 6), record).read_bytes()


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _only_keyface_errors(path, data):
    path.write_bytes(data)
    try:
        pixels, _, info = read_png(path)
    except KeyFaceError as err:
        assert str(err)
    else:
        assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
        assert isinstance(info, ReadInfo)


@FUZZ
@given(st.one_of(st.binary(max_size=2048),
                 st.binary(max_size=2048).map(lambda b: b"\x89PNG\r\n\x1a\n" + b)))
def test_fuzz_arbitrary_files_only_raise_keyface_errors(fuzz_dir, data):
    _only_keyface_errors(fuzz_dir / "f.png", data)


@FUZZ
@given(_mutations)
def test_fuzz_mutated_png_only_raises_keyface_errors(fuzz_dir, valid_png, ops):
    _only_keyface_errors(fuzz_dir / "m.png", _mutate(valid_png, ops))


@FUZZ
@given(st.sampled_from(_DOC_PATHS), st.one_of(_edge_values, _json_values))
def test_fuzz_png_with_valid_crc_but_altered_record(fuzz_dir, valid_png, path, value):
    # Mutations above mostly break the CRC; this reaches the decoder through read_png.
    doc = copy.deepcopy(_VALID_DOC)
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = value
    pos = valid_png.index(b"keyface\0") - 8
    (length,) = struct.unpack(">I", valid_png[pos:pos + 4])
    stripped = valid_png[:pos] + valid_png[pos + 12 + length:]
    extra = chunk(b"iTXt", b"keyface\0\1\0\0\0" + zlib.compress(json.dumps(doc).encode()))
    _only_keyface_errors(fuzz_dir / "r.png", insert_chunk_before_idat(stripped, extra))
