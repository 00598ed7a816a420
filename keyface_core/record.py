"""Format v2 on disk: an `AnonymizedFile` as one validated JSON document plus one safetensors blob.

The chunk payload is ``MAGIC | u32 JSON length | JSON | safetensors``, zlib-compressed. The JSON part is checked
by pydantic models (strict types, no unknown fields, caps on every size), the arrays by safetensors (a bounds-checked
tensor format, no pickle) and then against the shapes the JSON implies. Reading treats the bytes as hostile: a
crafted file gets a `MetadataError` that says what is wrong, never another exception.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from typing import Annotated, Literal, Optional

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from .anonymized import AnonymizedFile, FaceEntry, LatentFormat
from .errors import MetadataError
from .protocol import FaceBatch, InversionSettings, KeyedNoise, Lock, RenderSettings, SealedPixels
from .sampling import METHODS
from .scramble import SCRAMBLES

FORMAT_NAME = "keyface"
FORMAT_VERSION = 2
MAGIC = b"KEYFACE2"
MAX_PAYLOAD_BYTES = 512 * 2**20        # decompressed, all faces together
MAX_JSON_BYTES = 16 * 2**20
MAX_FACES = 4096
MAX_STEPS = 1000
MAX_LATENT_SIDE = 1024
MAX_CHANNELS = 64
MAX_CROP = 8192
MAX_IMAGE_SIDE = 2**16
LANDMARKS_SHAPE = (68, 2)              # dlib's 68 points, crop pixels, float32 (optional per face)

Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]+$", max_length=128)]
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.+-]{1,64}$")]
_DAMAGED = "restore needs the PNG exactly as Save Anonymized wrote it (not a re-saved, converted or edited copy)"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class InversionDoc(_Strict):
    steps: int = Field(ge=1, le=MAX_STEPS)
    scheduler: Name
    method: Literal[METHODS]  # type: ignore[valid-type]
    cfg: float = Field(ge=0.0, le=1000.0)
    sigmas: list[float] = Field(min_length=2, max_length=MAX_STEPS + 1)
    model_id: Annotated[str, StringConstraints(pattern=r"^[0-9a-zA-Z_-]{1,64}$")]
    cond_id: Annotated[str, StringConstraints(pattern=r"^[0-9a-zA-Z_-]{0,64}$")]
    scramble: Literal[SCRAMBLES]  # type: ignore[valid-type]

    @field_validator("sigmas")
    @classmethod
    def _schedule(cls, sigmas):
        if not all(math.isfinite(s) and s >= 0 for s in sigmas) or sigmas[-1] != 0.0 \
                or any(a < b for a, b in zip(sigmas, sigmas[1:])):
            raise ValueError("the noise schedule must descend to 0 with finite values")
        return sigmas


class RenderDoc(_Strict):
    sampler: Name
    scheduler: Name
    steps: int = Field(ge=1, le=MAX_STEPS)
    cfg: float = Field(ge=0.0, le=1000.0)
    seed: int = Field(ge=0, le=2**64 - 1)


class LatentDoc(_Strict):
    channels: int = Field(ge=1, le=MAX_CHANNELS)
    height: int = Field(ge=1, le=MAX_LATENT_SIDE)
    width: int = Field(ge=1, le=MAX_LATENT_SIDE)
    scale_factor: float = Field(gt=0.0, le=1e6)
    shift_factor: float = Field(ge=-1e6, le=1e6)


class KdfDoc(_Strict):
    name: Literal["scrypt"]
    n: int = Field(ge=2, le=2**20)
    r: int = Field(ge=1, le=64)
    p: int = Field(ge=1, le=16)


class FaceDoc(_Strict):
    index: int = Field(ge=0, le=MAX_FACES)
    nonce: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
    key_check: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")]
    box: tuple[int, int, int]
    original_digest: Hex
    region_digest: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    pixels_digest: Optional[Hex] = None          # lossless mode only

    @field_validator("box")
    @classmethod
    def _box(cls, box):
        if box[0] < 0 or box[1] < 0 or not 1 <= box[2] <= MAX_IMAGE_SIDE:
            raise ValueError("a face box is (x >= 0, y >= 0, size >= 1)")
        return box


class RecordDoc(_Strict):
    format: Literal["keyface"]
    version: Literal[2]
    image_size: tuple[int, int]
    pixels_sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    look: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{0,128}$")]
    crop_size: int = Field(ge=8, le=MAX_CROP)
    inversion: InversionDoc
    render: Optional[RenderDoc]
    latent: LatentDoc
    masked: bool
    kdf: Optional[KdfDoc]
    faces: list[FaceDoc] = Field(min_length=1, max_length=MAX_FACES)

    @field_validator("image_size")
    @classmethod
    def _size(cls, size):
        if not all(1 <= v <= MAX_IMAGE_SIDE for v in size):
            raise ValueError(f"image sides must be 1..{MAX_IMAGE_SIDE}")
        return size


# ----------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------

def encode(file: AnonymizedFile) -> bytes:
    """The chunk payload of a v2 file (deterministic for the same content)."""
    from safetensors.numpy import save
    keyed, faces = file.keyed, file.keyed.faces
    lock = keyed.lock
    channels, height, width = (int(v) for v in keyed.x.shape[1:])
    face_docs, arrays = [], {}
    for i, entry in enumerate(file.faces):
        sealed_pixels = file.sealed_pixels[i] if file.sealed_pixels is not None else None
        face_docs.append(FaceDoc(index=int(faces.face_indices[i]), nonce=bytes(faces.nonces[i]).hex(),
                                 key_check=str(lock.key_checks[i]), box=tuple(int(v) for v in entry.box),
                                 original_digest=str(lock.original_digests[i]), region_digest=entry.region_digest,
                                 pixels_digest=None if sealed_pixels is None else sealed_pixels.digest))
        p = f"faces.{i}."
        arrays[p + "keyed_noise"] = keyed.x[i].detach().cpu().to(torch.float64).numpy()
        arrays[p + "anonymized"] = file.anonymized[i].detach().cpu().to(torch.float32).numpy()
        arrays[p + "crop_mask"] = np.asarray(entry.crop_mask, dtype=np.uint8)
        arrays[p + "reference"] = np.frombuffer(bytes(lock.references[i]), dtype=np.uint8)
        if lock.sealed_residuals[i] is not None:
            arrays[p + "sealed_residual"] = np.asarray(lock.sealed_residuals[i], dtype=np.uint8).reshape(-1)
        if faces.mask is not None:
            arrays[p + "latent_mask"] = (faces.mask[i].detach().cpu() >= 0.5).to(torch.uint8).numpy()
            arrays[p + "background"] = faces.background[i].detach().cpu().to(torch.float64).numpy()
        if sealed_pixels is not None:
            arrays[p + "sealed_pixels"] = np.frombuffer(bytes(sealed_pixels.sealed), dtype=np.uint8)
        if entry.landmarks is not None:   # optional: files without it encode exactly as before
            arrays[p + "landmarks"] = np.asarray(entry.landmarks, dtype=np.float32).reshape(LANDMARKS_SHAPE)
    inv, render, fmt = file.inversion, file.render, file.latent_format
    doc = RecordDoc(
        format=FORMAT_NAME, version=FORMAT_VERSION, image_size=tuple(int(v) for v in file.image_size),
        pixels_sha256=file.pixels_sha256, look=file.look, crop_size=int(file.crop_size),
        inversion=InversionDoc(steps=int(inv.steps), scheduler=inv.scheduler, method=inv.method, cfg=float(inv.cfg),
                               sigmas=[float(s) for s in inv.sigmas.to(torch.float32)], model_id=inv.model_id,
                               cond_id=inv.cond_id, scramble=lock.scramble),
        render=None if render is None else RenderDoc(sampler=render.sampler, scheduler=render.scheduler,
                                                     steps=int(render.steps), cfg=float(render.cfg), seed=int(render.seed)),
        latent=LatentDoc(channels=channels, height=height, width=width, scale_factor=float(fmt.scale_factor),
                         shift_factor=float(fmt.shift_factor)),
        masked=faces.mask is not None, kdf=None if lock.kdf is None else KdfDoc(**lock.kdf), faces=face_docs)
    text = json.dumps(doc.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()
    blob = save({k: np.ascontiguousarray(v) for k, v in sorted(arrays.items())})
    raw = MAGIC + struct.pack(">I", len(text)) + text + blob
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise MetadataError(f"the KeyFace record would be {len(raw) >> 20} MiB, over the {MAX_PAYLOAD_BYTES >> 20} MiB "
                            "a reader accepts; anonymize fewer or smaller faces per image.")
    return zlib.compress(raw, 6)


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------

def decode(payload: bytes) -> AnonymizedFile:
    """An `AnonymizedFile` from a chunk payload, or `MetadataError` saying what is damaged."""
    raw = _inflate(payload)
    if not raw.startswith(MAGIC) or len(raw) < len(MAGIC) + 4:
        raise MetadataError(f"the KeyFace record is damaged (it does not start like a v2 record); {_DAMAGED}.")
    (length,) = struct.unpack_from(">I", raw, len(MAGIC))
    start = len(MAGIC) + 4
    if length > MAX_JSON_BYTES or start + length > len(raw):
        raise MetadataError(f"the KeyFace record is damaged (its header length is wrong); {_DAMAGED}.")
    try:
        doc = RecordDoc.model_validate(json.loads(raw[start:start + length].decode("utf-8")), strict=False)
    except (ValueError, UnicodeDecodeError) as err:
        raise MetadataError(f"the KeyFace record is damaged ({_first_problem(err)}); {_DAMAGED}.") from None
    arrays = _load_arrays(raw[start + length:])
    return _to_file(doc, arrays)


def peek_version(payload: bytes) -> Optional[int]:
    """The format version a payload claims, when readable (for 'made by a newer KeyFace' messages)."""
    try:
        raw = _inflate(payload)
        (length,) = struct.unpack_from(">I", raw, len(MAGIC))
        version = json.loads(raw[len(MAGIC) + 4:len(MAGIC) + 4 + length]).get("version")
        return version if isinstance(version, int) else None
    except Exception:
        return None


def _inflate(payload: bytes) -> bytes:
    try:
        inflater = zlib.decompressobj()
        raw = inflater.decompress(bytes(payload), MAX_PAYLOAD_BYTES)
        if inflater.unconsumed_tail:
            raise MetadataError(f"the KeyFace record is larger than the {MAX_PAYLOAD_BYTES >> 20} MiB a reader "
                                f"accepts; {_DAMAGED}.")
        if not inflater.eof:
            raise zlib.error("truncated")
    except zlib.error:
        raise MetadataError(f"the KeyFace record is damaged (its compressed data is corrupt); {_DAMAGED}.") from None
    return raw


def _first_problem(err) -> str:
    if isinstance(err, ValidationError):
        first = err.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "record"
        return f"{where}: {first.get('msg', 'invalid')}"
    return "its JSON part is not valid"


def _load_arrays(blob: bytes) -> dict:
    from safetensors.numpy import load
    try:
        return load(blob)
    except Exception as err:  # safetensors raises its own SafetensorError (and others) on crafted headers
        raise MetadataError(f"the KeyFace record is damaged (its arrays cannot be read: {type(err).__name__}); "
                            f"{_DAMAGED}.") from None


def _array(arrays: dict, name: str, dtype, shape=None, used: Optional[set] = None) -> np.ndarray:
    if name not in arrays:
        raise MetadataError(f"the KeyFace record is damaged (array '{name}' is missing); {_DAMAGED}.")
    value = arrays[name]
    if value.dtype != np.dtype(dtype) or (shape is not None and tuple(value.shape) != tuple(shape)):
        raise MetadataError(f"the KeyFace record is damaged (array '{name}' is {value.dtype} {tuple(value.shape)}, "
                            f"expected {np.dtype(dtype)} {tuple(shape) if shape else ''}); {_DAMAGED}.")
    if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
        raise MetadataError(f"the KeyFace record is damaged (array '{name}' holds non-finite values); {_DAMAGED}.")
    if used is not None:
        used.add(name)
    return value


def _to_file(doc: RecordDoc, arrays: dict) -> AnonymizedFile:
    lat = doc.latent
    shape = (lat.channels, lat.height, lat.width)
    if len(doc.inversion.sigmas) != doc.inversion.steps + 1:
        raise MetadataError("the KeyFace settings in this image are inconsistent (steps and noise schedule do not "
                            f"agree): the metadata was edited; {_DAMAGED}.")
    if len({f.index for f in doc.faces}) != len(doc.faces):
        raise MetadataError(f"the KeyFace record is damaged (two faces share an index); {_DAMAGED}.")
    used: set = set()
    xs, anons, masks, backgrounds, residuals, references, entries, sealed_pixels = [], [], [], [], [], [], [], []
    for i, face in enumerate(doc.faces):
        p = f"faces.{i}."
        x, y, size = face.box
        if x + size > doc.image_size[0] or y + size > doc.image_size[1]:
            raise MetadataError(f"the KeyFace record is damaged (face {i}'s box leaves the image); {_DAMAGED}.")
        xs.append(torch.from_numpy(_array(arrays, p + "keyed_noise", np.float64, shape, used).copy()))
        anons.append(torch.from_numpy(_array(arrays, p + "anonymized", np.float32, shape, used).copy()))
        crop_mask = _array(arrays, p + "crop_mask", np.uint8, (doc.crop_size, doc.crop_size), used).copy()
        references.append(_array(arrays, p + "reference", np.uint8, None, used).tobytes())
        if p + "sealed_residual" in arrays:
            residuals.append(_array(arrays, p + "sealed_residual", np.uint8, (8 * int(np.prod(shape)),), used).copy())
        else:
            residuals.append(None)
        if doc.masked:
            masks.append(torch.from_numpy(_array(arrays, p + "latent_mask", np.uint8, (1, *shape[1:]), used)
                                          .astype(np.float32)))
            backgrounds.append(torch.from_numpy(_array(arrays, p + "background", np.float64, shape, used).copy()))
        if face.pixels_digest is not None:
            sealed = _array(arrays, p + "sealed_pixels", np.uint8, None, used).tobytes()
            sealed_pixels.append(SealedPixels(sealed, face.pixels_digest))
        landmarks = None
        if p + "landmarks" in arrays:
            landmarks = _array(arrays, p + "landmarks", np.float32, LANDMARKS_SHAPE, used).copy()
            if np.abs(landmarks).max() > 16 * doc.crop_size:
                raise MetadataError(f"the KeyFace record is damaged (face {i}'s landmarks lie far outside its crop); "
                                    f"{_DAMAGED}.")
        entries.append(FaceEntry(tuple(face.box), crop_mask, face.region_digest, landmarks))
    if doc.inversion.method == "exact" and any(r is None for r in residuals):
        raise MetadataError(f"the KeyFace record is damaged (a sealed second state is missing); {_DAMAGED}.")
    unknown = set(arrays) - used
    if unknown:
        raise MetadataError(f"the KeyFace record is damaged (unexpected array '{sorted(unknown)[0]}'); {_DAMAGED}.")
    if sealed_pixels and len(sealed_pixels) != len(doc.faces):
        raise MetadataError(f"the KeyFace record is damaged (lossless data for only some faces); {_DAMAGED}.")
    inv = doc.inversion
    faces = FaceBatch(tuple(bytes.fromhex(f.nonce) for f in doc.faces), tuple(f.index for f in doc.faces),
                      torch.stack(masks) if doc.masked else None, torch.stack(backgrounds) if doc.masked else None)
    lock = Lock(inv.scramble, tuple(f.key_check for f in doc.faces), tuple(residuals),
                tuple(f.original_digest for f in doc.faces), tuple(references),
                None if doc.kdf is None else doc.kdf.model_dump())
    settings = InversionSettings(inv.steps, inv.scheduler, inv.method, float(inv.cfg), inv.model_id, inv.cond_id,
                                 torch.tensor(inv.sigmas, dtype=torch.float32))
    render = None if doc.render is None else RenderSettings(**doc.render.model_dump())
    return AnonymizedFile(tuple(doc.image_size), doc.pixels_sha256, settings, render,
                          LatentFormat(lat.channels, lat.scale_factor, lat.shift_factor), doc.crop_size,
                          KeyedNoise(torch.stack(xs), faces, lock), torch.stack(anons), tuple(entries),
                          tuple(sealed_pixels) if sealed_pixels else None, doc.look)
