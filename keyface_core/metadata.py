"""KeyFace metadata: the versioned record an anonymized PNG carries, and safe PNG write/read.

The record holds everything restore needs except the key itself: the inversion settings, the
per-face nonces, key check values, crop boxes, masks and payload arrays. It travels as JSON in
one PNG text chunk (keyword ``keyface``). Decoding treats the text as hostile: every field is
checked, and decompression is capped so a crafted file cannot exhaust memory.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
import re
import struct
import tempfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

from . import images
from .errors import DamagedImageError, InputMismatchError, KeyFaceError, MetadataError, NotAnImageError

FORMAT_NAME = "keyface"
FORMAT_VERSION = 1
PNG_KEYWORD = "keyface"
ARRAY_CODEC = "zlib+base64"

# Caps on what decoding accepts (a crafted file must not exhaust memory). Encoding enforces the
# same caps, so whatever KeyFace writes it can read back.
MAX_DECODED_BYTES = 512 * 2**20  # all arrays of one record together, decompressed
MAX_TEXT_BYTES = 768 * 2**20  # the record's JSON text (base64 of MAX_DECODED_BYTES fits)
MAX_FACES = 4096
MAX_NDIM = 8
MAX_SCRYPT_MEMORY = 2**30  # 128 * n * r bytes

_DAMAGED_ADVICE = (
    "restore needs the original anonymized PNG exactly as KeyFace saved it "
    "(not a re-saved, converted, resized or edited copy)"
)
_DTYPES = {
    name: np.dtype(name).newbyteorder("<")
    for name in (
        "uint8", "int8", "uint16", "int16", "uint32", "int32",
        "uint64", "int64", "float16", "float32", "float64",
    )
}
_HEX = re.compile(r"[0-9a-fA-F]+")
_NONCE_HEX = re.compile(r"[0-9a-f]{32}")
_SECRET_WORDS = frozenset(
    {"key", "keys", "secret", "secrets", "passphrase", "passphrases",
     "password", "passwords", "passwd"}
)
_WORD = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|[0-9]+")
_RECORD_FIELDS = frozenset({"format", "version", "image_size", "settings", "kdf", "faces"})
_FACE_FIELDS = frozenset({"index", "nonce", "key_check", "box", "mask", "payload"})
_ARRAY_FIELDS = frozenset({"dtype", "shape", "codec", "data"})
_KDF_FIELDS = frozenset({"name", "n", "r", "p"})
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TEXT_CHUNK_TYPES = (b"tEXt", b"zTXt", b"iTXt")
_KEYWORD_PREFIX = PNG_KEYWORD.encode("latin-1") + b"\0"
_LOSSY_FORMATS = frozenset({"JPEG", "MPO", "AVIF", "HEIF", "JPEG2000"})
_I32 = 2**31


@dataclass(eq=False)
class FaceRecord:
    """One anonymized face: its nonce, key check, crop box (None = whole image), mask, payload."""

    index: int
    nonce: bytes
    key_check: str
    box: tuple[int, int, int] | None
    mask: np.ndarray | None
    payload: dict[str, np.ndarray]

    def __post_init__(self) -> None:
        if isinstance(self.box, list):
            self.box = tuple(self.box)

    def __eq__(self, other: object) -> bool:
        # Arrays compare bit-exactly (dtype, shape, bytes), so NaN payloads compare equal too.
        if not isinstance(other, FaceRecord):
            return NotImplemented
        return (
            self.index == other.index
            and self.nonce == other.nonce
            and self.key_check == other.key_check
            and self.box == other.box
            and _same_array(self.mask, other.mask)
            and isinstance(self.payload, dict)
            and isinstance(other.payload, dict)
            and self.payload.keys() == other.payload.keys()
            and all(_same_array(v, other.payload[k]) for k, v in self.payload.items())
        )


@dataclass
class AnonymizationRecord:
    """What restore needs besides the key: image size (W, H), settings, faces, KDF parameters."""

    image_size: tuple[int, int]
    settings: dict
    faces: list[FaceRecord]
    kdf: dict | None = None
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.image_size, list):
            self.image_size = tuple(self.image_size)


@dataclass
class ReadInfo:
    """What read_png found: source format and mode, size (W, H), the chunk, lossiness, warnings."""

    format: str
    mode: str
    size: tuple[int, int]
    has_keyface_chunk: bool
    lossy: bool
    warnings: list[str] = field(default_factory=list)
    resized: bool = False


class _Invalid(Exception):
    """A field breaks the format; the boundary turns it into a MetadataError with advice."""


# ----------------------------------------------------------------------------- record codec


def encode_record(record: AnonymizationRecord) -> str:
    """Serialize a record to the compact JSON text stored in the PNG; raises MetadataError."""
    if not isinstance(record, AnonymizationRecord):
        raise MetadataError(
            f"encode_record needs an AnonymizationRecord, not {type(record).__name__}"
        )
    try:
        doc = _record_to_doc(record)
    except _Invalid as err:
        raise MetadataError(f"cannot store this KeyFace record: {err}") from None
    return json.dumps(doc, ensure_ascii=True, allow_nan=False, separators=(",", ":"))


def decode_record(text: str | bytes) -> AnonymizationRecord:
    """Parse and strictly validate stored record text; any defect raises MetadataError."""
    try:
        return _doc_to_record(_parse_json(text))
    except _Invalid as err:
        raise MetadataError(
            f"the KeyFace metadata in this image is damaged ({err}); {_DAMAGED_ADVICE}"
        ) from None


def record_from_png_text(text_chunks: Mapping) -> AnonymizationRecord | None:
    """Decode the record from PNG text chunks (e.g. PIL's ``img.info``); None if there is none."""
    if not isinstance(text_chunks, Mapping):
        raise MetadataError(
            "record_from_png_text needs the image's text chunks as a dict (like PIL's img.info), "
            f"not {type(text_chunks).__name__}"
        )
    value = text_chunks.get(PNG_KEYWORD)
    if value is None:
        return None
    if isinstance(value, (str, bytes, bytearray)):
        return decode_record(value)
    raise MetadataError(
        f"the KeyFace metadata in this image is damaged (the '{PNG_KEYWORD}' entry is a "
        f"{type(value).__name__}, not text); {_DAMAGED_ADVICE}"
    )


def _record_to_doc(record: AnonymizationRecord) -> dict:
    if record.version != FORMAT_VERSION:
        raise _Invalid(
            f"version is {_short(record.version)}, but this KeyFace writes format version "
            f"{FORMAT_VERSION} only"
        )
    if not isinstance(record.faces, list):
        raise _Invalid(f"faces must be a list, not {type(record.faces).__name__}")
    if len(record.faces) > MAX_FACES:
        raise _Invalid(f"{len(record.faces)} faces is more than the {MAX_FACES} KeyFace stores")
    budget = [MAX_DECODED_BYTES]
    faces = [_face_to_doc(face, f"faces[{i}]", budget) for i, face in enumerate(record.faces)]
    _check_unique_indices(faces)
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "image_size": list(_check_size_pair(record.image_size, "image_size")),
        "settings": _settings_to_doc(record.settings),
        "kdf": _check_kdf(record.kdf, "kdf"),
        "faces": faces,
    }


def _face_to_doc(face: FaceRecord, where: str, budget: list[int]) -> dict:
    if not isinstance(face, FaceRecord):
        raise _Invalid(f"{where} must be a FaceRecord, not {type(face).__name__}")
    if not isinstance(face.nonce, bytes) or len(face.nonce) != 16:
        raise _Invalid(f"{where}.nonce must be 16 bytes")
    if face.mask is not None and (
        not isinstance(face.mask, np.ndarray) or face.mask.dtype != np.uint8 or face.mask.ndim != 2
    ):
        raise _Invalid(f"{where}.mask must be None or a 2-D uint8 array (0..255 soft mask)")
    if not isinstance(face.payload, dict):
        raise _Invalid(f"{where}.payload must be a dict of name -> numpy array")
    payload = {}
    for name, arr in face.payload.items():
        _check_payload_name(name, where)
        if _names_a_secret(name):
            raise _Invalid(
                f"{where}.payload name {name!r} looks like key material; the key is never stored"
            )
        payload[name] = _encode_array(arr, f"{where}.payload[{name!r}]", budget)
    return {
        "index": _check_int(face.index, f"{where}.index", 0, _I32 - 1),
        "nonce": face.nonce.hex(),
        "key_check": _check_key_check(face.key_check, f"{where}.key_check"),
        "box": _check_box(face.box, f"{where}.box"),
        "mask": None if face.mask is None else _encode_array(face.mask, f"{where}.mask", budget),
        "payload": payload,
    }


def _settings_to_doc(settings: Any) -> dict:
    if not isinstance(settings, dict):
        raise _Invalid(f"settings must be a dict, not {type(settings).__name__}")
    try:
        # A JSON round trip proves the settings are plain JSON and gives a private copy.
        text = json.dumps(settings, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as err:
        raise _Invalid(
            f"settings must hold only dict/list/str/int/float/bool/None with finite numbers "
            f"({err}); convert numpy values with .item() or .tolist()"
        ) from None
    # json.dumps accepted it, so it has no cycles and this walk terminates.
    stack: list[tuple[Any, str]] = [(settings, "settings")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, dict):
            for name, item in value.items():
                if not isinstance(name, str):
                    raise _Invalid(f"{where} has a non-string key {name!r}; JSON keys are strings")
                if _names_a_secret(name):
                    raise _Invalid(
                        f"{where}[{name!r}] looks like key material (key/secret/passphrase/"
                        "password); the key must never be stored in the image, remove that field"
                    )
                stack.append((item, f"{where}[{name!r}]"))
        elif isinstance(value, (list, tuple)):
            stack.extend((item, f"{where}[{i}]") for i, item in enumerate(value))
    return json.loads(text)


def _encode_array(arr: Any, where: str, budget: list[int]) -> dict:
    if not isinstance(arr, np.ndarray):
        raise _Invalid(f"{where} must be a numpy array, not {type(arr).__name__}")
    if arr.dtype.name not in _DTYPES:
        raise _Invalid(f"{where} has dtype {arr.dtype}; KeyFace stores {', '.join(_DTYPES)}")
    if arr.ndim > MAX_NDIM:
        raise _Invalid(f"{where} has {arr.ndim} dimensions; KeyFace stores at most {MAX_NDIM}")
    for dim in arr.shape:  # decoding accepts no larger sizes
        _check_int(dim, f"{where}.shape", 0, _I32 - 1)
    raw = np.ascontiguousarray(arr, dtype=_DTYPES[arr.dtype.name]).tobytes()
    _spend(budget, len(raw), where)
    return {
        "dtype": arr.dtype.name,
        "shape": list(arr.shape),
        "codec": ARRAY_CODEC,
        "data": base64.b64encode(zlib.compress(raw, 6)).decode("ascii"),
    }


def _parse_json(text: Any) -> Any:
    if isinstance(text, (bytes, bytearray)):
        if len(text) > MAX_TEXT_BYTES:
            raise _Invalid(f"it is {len(text)} bytes, more than the {MAX_TEXT_BYTES} KeyFace reads")
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            raise _Invalid("it is not UTF-8 text") from None
    if not isinstance(text, str):
        raise _Invalid(f"expected JSON text, got {type(text).__name__}")
    if len(text) > MAX_TEXT_BYTES:
        raise _Invalid(f"it is {len(text)} characters, over the {MAX_TEXT_BYTES} KeyFace reads")
    try:
        return json.loads(
            text,
            object_pairs_hook=_unique_object,
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
        )
    except RecursionError:
        raise _Invalid("it is nested too deeply to be KeyFace metadata") from None
    except ValueError as err:  # JSONDecodeError, and int() refusing a thousands-digit number
        raise _Invalid(f"it is not valid JSON: {err}") from None


def _unique_object(pairs: list[tuple[str, Any]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _Invalid("a JSON object repeats a field name")
    return obj


def _refuse_constant(name: str) -> Any:
    raise _Invalid(f"it contains {name}, which is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Invalid(f"number {text[:40]} is out of range")
    return value


def _doc_to_record(doc: Any) -> AnonymizationRecord:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise _Invalid("it is not a KeyFace record: the 'format' field is not 'keyface'")
    version = doc.get("version")
    if not _is_int(version) or version < 1:
        raise _Invalid(f"its format version {_short(version)} is not a positive integer")
    if version > FORMAT_VERSION:
        raise MetadataError(
            f"this image was anonymized by a newer KeyFace (metadata format version {version}); "
            f"this KeyFace reads format version {FORMAT_VERSION}. Update the KeyFace node pack "
            "to restore it."
        )
    _check_fields(doc, _RECORD_FIELDS, "the record")
    if not isinstance(doc["settings"], dict):
        raise _Invalid("settings is not a JSON object")
    faces_doc = doc["faces"]
    if not isinstance(faces_doc, list):
        raise _Invalid("faces is not a list")
    if len(faces_doc) > MAX_FACES:
        raise _Invalid(f"it lists {len(faces_doc)} faces, more than the {MAX_FACES} KeyFace reads")
    budget = [MAX_DECODED_BYTES]
    faces = [_doc_to_face(f, f"faces[{i}]", budget) for i, f in enumerate(faces_doc)]
    _check_unique_indices(faces)
    return AnonymizationRecord(
        image_size=_check_size_pair(doc["image_size"], "image_size"),
        settings=doc["settings"],
        faces=faces,
        kdf=_check_kdf(doc["kdf"], "kdf"),
        version=version,
    )


def _doc_to_face(doc: Any, where: str, budget: list[int]) -> FaceRecord:
    _check_fields(doc, _FACE_FIELDS, where)
    nonce = doc["nonce"]
    if not isinstance(nonce, str) or not _NONCE_HEX.fullmatch(nonce):
        raise _Invalid(f"{where}.nonce is not 32 lowercase hex digits")
    mask = None
    if doc["mask"] is not None:
        mask = _decode_array(doc["mask"], f"{where}.mask", budget)
        if mask.dtype != np.uint8 or mask.ndim != 2:
            raise _Invalid(f"{where}.mask is not a 2-D uint8 array")
    payload_doc = doc["payload"]
    if not isinstance(payload_doc, dict):
        raise _Invalid(f"{where}.payload is not a JSON object")
    payload = {}
    for name, arr in payload_doc.items():
        _check_payload_name(name, where)
        payload[name] = _decode_array(arr, f"{where}.payload[{name!r}]", budget)
    return FaceRecord(
        index=_check_int(doc["index"], f"{where}.index", 0, _I32 - 1),
        nonce=bytes.fromhex(nonce),
        key_check=_check_key_check(doc["key_check"], f"{where}.key_check"),
        box=_check_box(doc["box"], f"{where}.box"),
        mask=mask,
        payload=payload,
    )


def _decode_array(doc: Any, where: str, budget: list[int]) -> np.ndarray:
    _check_fields(doc, _ARRAY_FIELDS, where)
    dtype_name, shape, data = doc["dtype"], doc["shape"], doc["data"]
    if not isinstance(dtype_name, str) or dtype_name not in _DTYPES:
        raise _Invalid(f"{where} has unknown dtype {_short(dtype_name)}")
    if doc["codec"] != ARRAY_CODEC:
        raise _Invalid(f"{where} uses unknown codec {_short(doc['codec'])}")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise _Invalid(f"{where}.shape is not a list of at most {MAX_NDIM} sizes")
    for dim in shape:
        _check_int(dim, f"{where}.shape", 0, _I32 - 1)
    if not isinstance(data, str):
        raise _Invalid(f"{where}.data is not a string")
    dtype = _DTYPES[dtype_name]
    nbytes = math.prod(shape) * dtype.itemsize
    _spend(budget, nbytes, where)
    try:
        compressed = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _Invalid(f"{where}.data is not valid base64 (truncated or altered)") from None
    inflater = zlib.decompressobj()
    try:
        # max_length stops a zip bomb after one byte more than the shape needs.
        raw = inflater.decompress(compressed, nbytes + 1)
    except zlib.error:
        raise _Invalid(f"{where}.data does not decompress (truncated or altered)") from None
    if len(raw) > nbytes or inflater.unconsumed_tail:
        raise _Invalid(f"{where}.data holds more than the {nbytes} bytes its dtype and shape need")
    if len(raw) < nbytes or not inflater.eof:
        raise _Invalid(f"{where}.data holds fewer than the {nbytes} bytes its dtype and shape need")
    if inflater.unused_data:
        raise _Invalid(f"{where}.data has trailing bytes after the compressed array")
    # astype copies into a writable array in native byte order.
    return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


# ------------------------------------------------------------------- field checks (shared)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(value: Any, where: str, lo: int, hi: int) -> int:
    if not _is_int(value) or not lo <= value <= hi:
        raise _Invalid(f"{where} must be an integer in [{lo}, {hi}], got {_short(value)}")
    return int(value)


def _short(value: Any) -> str:
    """A bounded repr for error messages (values may be huge or hostile)."""
    if _is_int(value) and abs(value) >= 10**40:
        return "a huge integer"
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        return f"a {type(value).__name__}"
    return text if len(text) <= 40 else text[:37] + "..."


def _check_size_pair(value: Any, where: str) -> tuple[int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise _Invalid(f"{where} must be [width, height]")
    return (_check_int(value[0], f"{where} width", 1, _I32 - 1),
            _check_int(value[1], f"{where} height", 1, _I32 - 1))


def _check_box(value: Any, where: str) -> tuple[int, int, int] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise _Invalid(f"{where} must be None or [x, y, size]")
    x = _check_int(value[0], f"{where} x", -_I32, _I32 - 1)
    y = _check_int(value[1], f"{where} y", -_I32, _I32 - 1)
    size = _check_int(value[2], f"{where} size", 1, _I32 - 1)
    return (x, y, size)


def _check_key_check(value: Any, where: str) -> str:
    if not isinstance(value, str) or len(value) > 512 or not _HEX.fullmatch(value):
        raise _Invalid(f"{where} must be a string of 1 to 512 hex digits")
    return value


def _check_payload_name(name: Any, where: str) -> None:
    if not isinstance(name, str) or not 1 <= len(name) <= 256:
        raise _Invalid(f"{where}.payload names must be strings of 1 to 256 characters")


def _check_kdf(value: Any, where: str) -> dict | None:
    if value is None:
        return None
    _check_fields(value, _KDF_FIELDS, where)
    if value["name"] != "scrypt":
        raise _Invalid(f"{where} names unknown key derivation {_short(value['name'])}")
    n = _check_int(value["n"], f"{where}.n", 2, 2**30)
    r = _check_int(value["r"], f"{where}.r", 1, 1024)
    p = _check_int(value["p"], f"{where}.p", 1, 1024)
    if n & (n - 1):
        raise _Invalid(f"{where}.n must be a power of two, got {n}")
    if 128 * n * r > MAX_SCRYPT_MEMORY:
        raise _Invalid(f"{where} needs {128 * n * r} bytes of memory, over {MAX_SCRYPT_MEMORY}")
    return {"name": "scrypt", "n": n, "r": r, "p": p}


def _check_fields(doc: Any, expected: frozenset, where: str) -> None:
    if not isinstance(doc, dict):
        raise _Invalid(f"{where} is not a JSON object")
    missing, extra = expected - doc.keys(), doc.keys() - expected
    if missing:
        raise _Invalid(f"{where} is missing field(s) {', '.join(sorted(missing))}")
    if extra:
        names = ", ".join(_short(name) for name in sorted(map(str, extra))[:5])
        raise _Invalid(f"{where} has unexpected field(s) {names}")


def _check_unique_indices(faces: list) -> None:
    indices = [f["index"] if isinstance(f, dict) else f.index for f in faces]
    if len(set(indices)) != len(indices):
        raise _Invalid("two faces share the same index")


def _spend(budget: list[int], nbytes: int, where: str) -> None:
    if nbytes > budget[0]:
        raise _Invalid(
            f"{where} needs {nbytes} bytes, which takes the record over the "
            f"{MAX_DECODED_BYTES}-byte limit on decoded arrays"
        )
    budget[0] -= nbytes


def _names_a_secret(name: str) -> bool:
    """True if a field name reads as key material (api_key, passPhrase, SECRET, ...)."""
    compact = re.sub(r"[^a-z0-9]", "", name.lower())
    return compact in _SECRET_WORDS or any(
        word.lower() in _SECRET_WORDS for word in _WORD.findall(name)
    )


def _same_array(a: Any, b: Any) -> bool:
    if not isinstance(a, np.ndarray) or not isinstance(b, np.ndarray):
        return a is b
    if a.shape != b.shape or a.dtype.name != b.dtype.name or a.dtype.name not in _DTYPES:
        return a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(a, b))
    little = _DTYPES[a.dtype.name]
    return (np.ascontiguousarray(a, dtype=little).tobytes()
            == np.ascontiguousarray(b, dtype=little).tobytes())


# ----------------------------------------------------------------------------- PNG writing


def write_png_atomic(
    path: str | os.PathLike,
    image: np.ndarray,
    record: AnonymizationRecord | None,
    *,
    text: dict[str, str] | None = None,
    overwrite: bool = False,
    icc_profile: bytes | None = None,
) -> Path:
    """Atomically write a PNG holding only the pixels, the KeyFace chunk and the given text."""
    target = Path(path)
    pil = _image_from_array(image)
    info = PngImagePlugin.PngInfo()
    if record is not None:
        payload = encode_record(record)  # validates the record, image_size included
        if tuple(record.image_size) != pil.size:
            raise InputMismatchError(
                f"the record describes a {record.image_size[0]}x{record.image_size[1]} image "
                f"but the pixels are {pil.size[0]}x{pil.size[1]}; save the image the record "
                "was made for"
            )
        # Pillow refuses compressed text chunks over MAX_TEXT_CHUNK (1 MiB) when reading, which
        # would break ComfyUI's LoadImage; larger records go uncompressed so it can still read them.
        limit = getattr(PngImagePlugin, "MAX_TEXT_CHUNK", 2**20)
        info.add_itxt(PNG_KEYWORD, payload, zip=len(payload) < limit)
    if text is not None and not isinstance(text, Mapping):
        raise InputMismatchError(f"text must be a dict of str -> str, not {type(text).__name__}")
    for key, value in (text or {}).items():
        _check_text_entry(key, value)
        info.add_text(key, value)
    if not overwrite and os.path.lexists(target):
        raise KeyFaceError(_exists_message(target))

    tmp_name = None
    try:
        with tempfile.NamedTemporaryFile(
            delete=False, dir=target.parent, prefix=".keyface-", suffix=".png.tmp"
        ) as handle:
            tmp_name = handle.name
            options = {"icc_profile": icc_profile} if icc_profile else {}
            pil.save(handle, format="PNG", pnginfo=info, **options)
            handle.flush()
            os.fsync(handle.fileno())
        _set_mode(tmp_name, _final_mode(target, overwrite))
        _publish(tmp_name, target, overwrite)
    except BaseException as err:
        if tmp_name is not None:
            _remove_quietly(tmp_name)
        if isinstance(err, KeyFaceError) or not isinstance(err, Exception):
            raise
        if isinstance(err, OSError):
            raise KeyFaceError(
                f"could not save {target}: {err.strerror or err}. Check that the folder "
                f"{target.parent} exists, is writable and has free space; nothing was written."
            ) from err
        raise KeyFaceError(
            f"could not encode {target.name} as PNG ({type(err).__name__}: {err}); "
            "nothing was written"
        ) from err
    _fsync_dir(target.parent)
    return target


def _image_from_array(image: Any) -> Image.Image:
    if (
        not isinstance(image, np.ndarray)
        or image.dtype != np.uint8
        or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4)))
        or image.shape[0] == 0
        or image.shape[1] == 0
    ):
        what = (f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray)
                else type(image).__name__)
        raise InputMismatchError(
            f"write_png_atomic needs a uint8 array of shape HxW, HxWx3 or HxWx4, got {what}; "
            "convert the image to 8-bit first"
        )
    return Image.fromarray(np.ascontiguousarray(image))


def _check_text_entry(key: Any, value: Any) -> None:
    if not isinstance(key, str) or not isinstance(value, str):
        raise InputMismatchError("PNG text entries must map str keys to str values")
    try:
        key.encode("latin-1")
    except UnicodeEncodeError:
        raise InputMismatchError(f"PNG text key {key!r} must be Latin-1") from None
    if not 1 <= len(key) <= 79 or "\0" in key:
        raise InputMismatchError(f"PNG text key {key!r} must be 1 to 79 characters without NUL")
    if key.lower() == PNG_KEYWORD:
        raise InputMismatchError(f"the PNG text key {key!r} is reserved for the KeyFace record")
    if _names_a_secret(key):
        raise InputMismatchError(
            f"PNG text key {key!r} looks like key material; the key must never be stored "
            "in the image"
        )


def _exists_message(target: Path) -> str:
    return (f"{target} already exists; KeyFace does not overwrite files. Choose another file "
            "name, or pass overwrite=True to replace it.")


def _publish(tmp_name: str, target: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp_name, target)
        return
    try:
        # link() fails if the target exists, so a file created meanwhile is never clobbered.
        os.link(tmp_name, target)
    except FileExistsError:
        raise KeyFaceError(_exists_message(target)) from None
    except OSError:
        # No hard links on this filesystem (FAT, some shares): reserve the name, then replace it.
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise KeyFaceError(_exists_message(target)) from None
        os.close(fd)
        try:
            os.replace(tmp_name, target)
        except BaseException:
            _remove_quietly(target)
            raise
        return
    _remove_quietly(tmp_name)


def _set_mode(name: str, mode: int) -> None:
    # Temp files are created 0600; give the image the mode any other saved file gets. Cosmetic,
    # so a filesystem that refuses chmod (some network shares) does not fail the save.
    try:
        os.chmod(name, mode)
    except OSError:
        pass


def _final_mode(target: Path, overwrite: bool) -> int:
    if overwrite:
        try:
            return os.stat(target).st_mode & 0o777
        except OSError:
            pass
    umask = 0o022
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                umask = int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass  # not Linux: assume the common 022
    return 0o666 & ~umask


def _remove_quietly(name: str | os.PathLike) -> None:
    try:
        os.unlink(name)
    except OSError:
        pass


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; best effort, and not possible on Windows.
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- PNG reading


def read_png(path: str | os.PathLike) -> tuple[np.ndarray, AnonymizationRecord | None, ReadInfo]:
    """Read an image as RGB uint8 HxWx3 with its KeyFace record (None if absent) and notes."""
    source = Path(path)
    try:
        data = source.read_bytes()
    except FileNotFoundError:
        raise KeyFaceError(f"image file not found: {source}; check the path") from None
    except IsADirectoryError:
        raise KeyFaceError(f"{source} is a folder, not an image; pass the PNG itself") from None
    except OSError as err:
        raise KeyFaceError(
            f"cannot read {source}: {err.strerror or err}; check its permissions"
        ) from None
    return read_png_bytes(source, data)


def read_png_bytes(source: Path, data: bytes, drop: tuple = ()) -> tuple[np.ndarray, AnonymizationRecord | None, ReadInfo]:
    """`read_png` on bytes already read; chunks listed in `drop` (other KeyFace records) are hidden from Pillow."""
    chunks = _png_chunks(data) if data.startswith(_PNG_SIGNATURE) else []
    keyface = [c for c in chunks if c[0] in _TEXT_CHUNK_TYPES and _is_keyface_chunk(data, c)]
    # Pillow never sees the record chunk: it could exceed Pillow's text-chunk limits.
    pixels, fmt, mode, notes = _decode_pixels(source, _without_chunks(data, sorted([*keyface, *drop], key=lambda c: c[1])))

    if len(keyface) > 1:
        raise MetadataError(
            f"{source.name} holds {len(keyface)} KeyFace metadata chunks, so it was edited after "
            f"KeyFace saved it; {_DAMAGED_ADVICE}"
        )
    record = None
    if keyface:
        try:
            record = decode_record(_keyface_text(data, keyface[0]))
        except MetadataError as err:
            raise MetadataError(f"{source.name}: {err}") from None

    size = (pixels.shape[1], pixels.shape[0])
    lossy = fmt in _LOSSY_FORMATS or (fmt == "WEBP" and _webp_is_lossy(data))
    if lossy:
        label = "WebP (lossy)" if fmt == "WEBP" else fmt
        notes.append(
            f"image is {label}: the KeyFace metadata cannot be present and pixels were "
            "recompressed; restore will be approximate"
        )
    elif fmt != "PNG":
        notes.append(f"image is {fmt}, not PNG: it cannot carry the KeyFace metadata")
    if record is not None and tuple(record.image_size) != size:
        notes.append(
            f"image is {size[0]}x{size[1]} but its KeyFace metadata describes "
            f"{record.image_size[0]}x{record.image_size[1]}: it was resized after anonymization"
        )
    info = ReadInfo(format=fmt, mode=mode, size=size, has_keyface_chunk=bool(keyface),
                    lossy=lossy, warnings=notes)
    return pixels, record, info


def _decode_pixels(source: Path, data: bytes) -> tuple[np.ndarray, str, str, list[str]]:
    # Decoding (orientation, 16-bit, palette, alpha, frames) is keyface_core.images'; the wording here is Load
    # Anonymized's: what to pass instead is the PNG KeyFace saved.
    try:
        pixels, info = images.load_image(data, name=source.name, max_megapixels=None, min_face_px=None)
    except NotAnImageError:
        raise KeyFaceError(
            f"{source.name} is not an image file KeyFace can read; pass the PNG KeyFace saved"
        ) from None
    except DamagedImageError as err:
        raise KeyFaceError(
            f"{source.name} could not be decoded as an image ({getattr(err, 'detail', err)}); "
            "the file is damaged or truncated, pass the PNG KeyFace saved"
        ) from None
    return pixels, info.format, info.mode, list(info.notes)


def _png_chunks(data: bytes) -> list[tuple[bytes, int, int]]:
    """(type, start, end) of each whole chunk; stops at IEND or truncation (Pillow reports it)."""
    chunks, pos = [], len(_PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, ctype = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        if length > 0x7FFFFFFF or end > len(data):
            break
        chunks.append((ctype, pos, end))
        pos = end
        if ctype == b"IEND":
            break
    return chunks


def _is_keyface_chunk(data: bytes, chunk: tuple[bytes, int, int]) -> bool:
    _, start, end = chunk
    body = start + 8
    return data[body:min(body + len(_KEYWORD_PREFIX), end - 4)] == _KEYWORD_PREFIX


def _without_chunks(data: bytes, drop: list[tuple[bytes, int, int]]) -> bytes:
    if not drop:
        return data
    parts, pos = [], 0
    for _, start, end in drop:
        parts.append(data[pos:start])
        pos = end
    parts.append(data[pos:])
    return b"".join(parts)


def _keyface_text(data: bytes, chunk: tuple[bytes, int, int]) -> str:
    ctype, start, end = chunk
    (crc,) = struct.unpack_from(">I", data, end - 4)
    if zlib.crc32(data[start + 4:end - 4]) != crc:
        raise MetadataError(
            "the KeyFace metadata in this image is damaged (its PNG chunk checksum does not "
            f"match); {_DAMAGED_ADVICE}"
        )
    rest = data[start + 8 + len(_KEYWORD_PREFIX):end - 4]
    try:
        if ctype == b"tEXt":
            return rest.decode("latin-1")
        if ctype == b"zTXt":
            if rest[:1] != b"\0":
                raise _Invalid("its zTXt chunk uses an unknown compression method")
            return _inflate_text(rest[1:]).decode("latin-1")
        # iTXt: compression flag, method, language tag, translated keyword, then UTF-8 text
        if len(rest) < 2 or rest[0] not in (0, 1) or rest[1] != 0:
            raise _Invalid("its iTXt chunk header is invalid")
        compressed, rest = rest[0] == 1, rest[2:]
        parts = rest.split(b"\0", 2)
        if len(parts) != 3:
            raise _Invalid("its iTXt chunk header is truncated")
        body = _inflate_text(parts[2]) if compressed else parts[2]
        return body.decode("utf-8")
    except UnicodeDecodeError:
        problem = "its text is not valid UTF-8"
    except _Invalid as err:
        problem = str(err)
    raise MetadataError(
        f"the KeyFace metadata in this image is damaged ({problem}); {_DAMAGED_ADVICE}"
    )


def _inflate_text(compressed: bytes) -> bytes:
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(compressed, MAX_TEXT_BYTES + 1)
    except zlib.error:
        raise _Invalid("its compressed text does not decompress") from None
    if len(text) > MAX_TEXT_BYTES or inflater.unconsumed_tail:
        raise _Invalid(f"its text is larger than the {MAX_TEXT_BYTES} bytes KeyFace reads")
    if not inflater.eof:
        raise _Invalid("its compressed text is truncated")
    return text


def _webp_is_lossy(data: bytes) -> bool:
    """True unless the WebP's image data is a lossless VP8L bitstream."""
    pos = 12
    while data[:4] == b"RIFF" and pos + 8 <= len(data):
        fourcc, size = data[pos:pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        if fourcc == b"VP8L":
            return False
        if fourcc in (b"VP8 ", b"ANMF"):
            return True  # animated files are treated as lossy, which is the safe assumption
        pos += 8 + size + (size & 1)
    return True
