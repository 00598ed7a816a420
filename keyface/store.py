"""Reading and writing anonymized PNGs for the CLI: pixels + the record of `keyface_core.anonymized.AnonymizedFile`.

INTERIM: until the `record` branch lands `keyface_core/record.py` + `pngio.py` (the v2 record as one binary PNG
chunk), this module carries its own codec with the same content (a JSON part + one safetensors blob) in a private
chunk ``kfIv``. On merge, `write`/`read` become calls to `pngio.write_png_atomic` / `pngio.read_png` and the codec
below goes away; the CLI above this module does not change. Everything written is public (no key, no source name,
no EXIF/ICC); atomic: temp file in the target folder, fsync, then link (never overwrites).
"""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from keyface_core import anonymized as anon
from keyface_core import protocol
from keyface_core.errors import KeyFaceError, MetadataError

CHUNK = b"kfIv"            # ancillary (k), private (f), reserved (I), unsafe to copy (v): editors drop it
FORMAT = "keyface-cli-interim"
VERSION = 2
MAX_CHUNK = 256 * 2**20
TEMP_PREFIX = ".keyface-tmp-"


# ----------------------------------------------------------------------------------------------
# Atomic files
# ----------------------------------------------------------------------------------------------

def temp_name(target: Path) -> str:
    """`.keyface-tmp-<host>-<pid>-<random>.part` beside the target: resume removes those of dead processes."""
    return f"{TEMP_PREFIX}{socket.gethostname()}-{os.getpid()}-"


def write_atomic(target: Path, data: bytes) -> None:
    """Write bytes to `target` atomically; refuse to replace an existing file (KeyFaceError)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_name(target), suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        try:
            os.link(tmp, target)      # fails if the target exists: a file made meanwhile is never clobbered
        except FileExistsError:
            raise KeyFaceError(f"{target} already exists; KeyFace never overwrites a file.") from None
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def remove_stale_temps(folder: Path) -> int:
    """Delete temp files that killed runs of this host left in `folder` (recursively); returns how many."""
    host = socket.gethostname()
    removed = 0
    if not folder.is_dir():
        return 0
    for path in folder.rglob(f"{TEMP_PREFIX}*.part"):
        rest = path.name[len(TEMP_PREFIX):]
        owner, _, pid = rest.rpartition("-")[0].rpartition("-")
        if owner != host or not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            path.unlink()
            removed += 1
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------------------------
# PNG bytes
# ----------------------------------------------------------------------------------------------

def png_bytes(pixels: np.ndarray, file: anon.AnonymizedFile | None) -> bytes:
    """A PNG holding only the 8-bit RGB pixels (and the record chunk, when given)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), "RGB").save(buffer, format="PNG", compress_level=6)
    data = buffer.getvalue()
    if file is None:
        return data
    payload = zlib.compress(_encode(file), 6)
    chunk = struct.pack(">I", len(payload)) + CHUNK + payload + struct.pack(">I", zlib.crc32(CHUNK + payload))
    iend = data.rindex(b"IEND") - 4
    return data[:iend] + chunk + data[iend:]


def write(target: Path, pixels: np.ndarray, file: anon.AnonymizedFile | None) -> None:
    write_atomic(target, png_bytes(pixels, file))


def read(path: Path) -> tuple[np.ndarray, anon.AnonymizedFile | None]:
    """(RGB uint8 pixels, the record or None) of a PNG the CLI wrote."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise KeyFaceError(f"cannot read {Path(path).name}: {err.strerror or err}.") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            pixels = np.asarray(image.convert("RGB")).copy()
    except Exception:
        raise MetadataError(f"{Path(path).name} is not a readable image.") from None
    payload = _find_chunk(data)
    if payload is None:
        return pixels, None
    try:
        raw = zlib.decompressobj().decompress(payload, MAX_CHUNK)
        return pixels, _decode(raw)
    except MetadataError:
        raise
    except Exception as err:
        raise MetadataError(f"the KeyFace record in {Path(path).name} is damaged ({type(err).__name__}); use the PNG "
                            "exactly as keyface anonymize wrote it.") from None


def _find_chunk(data: bytes):
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    pos, found = 8, None
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == CHUNK:
            if found is not None:
                raise MetadataError("this PNG holds two KeyFace records: it was edited after KeyFace saved it.")
            found = data[pos + 8:pos + 8 + length]
        if kind == b"IEND":
            break
        pos += 12 + length
    return found


# ----------------------------------------------------------------------------------------------
# The interim codec (JSON + one safetensors blob)
# ----------------------------------------------------------------------------------------------

def _t(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().cpu().numpy())


def _encode(file: anon.AnonymizedFile) -> bytes:
    from safetensors.numpy import save
    k, inv = file.keyed, file.inversion
    arrays = {"keyed_noise": _t(k.x), "anonymized": _t(file.anonymized)}
    if k.faces.mask is not None:
        arrays["latent_mask"] = _t(k.faces.mask.to(torch.uint8))
        arrays["background"] = _t(k.faces.background.to(torch.float64))
    faces = []
    for i, entry in enumerate(file.faces):
        arrays[f"faces.{i}.crop_mask"] = np.ascontiguousarray(entry.crop_mask, dtype=np.uint8)
        sealed = k.lock.sealed_residuals[i]
        if sealed is not None:
            arrays[f"faces.{i}.sealed_residual"] = np.ascontiguousarray(np.asarray(sealed), dtype=np.uint8)
        reference = k.lock.references[i]
        if reference is not None:
            arrays[f"faces.{i}.reference"] = np.frombuffer(bytes(reference), dtype=np.uint8).copy()
        faces.append({"index": int(k.faces.face_indices[i]), "nonce": bytes(k.faces.nonces[i]).hex(),
                      "key_check": k.lock.key_checks[i], "original_digest": k.lock.original_digests[i],
                      "box": list(entry.box), "region_digest": entry.region_digest})
    doc = {
        "format": FORMAT, "version": VERSION, "image_size": list(file.image_size),
        "pixels_sha256": file.pixels_sha256, "look": file.look, "crop_size": file.crop_size,
        "inversion": {"steps": inv.steps, "scheduler": inv.scheduler, "method": inv.method, "cfg": inv.cfg,
                      "model_id": inv.model_id, "cond_id": inv.cond_id,
                      "sigmas": [float(s) for s in inv.sigmas.to(torch.float32)]},
        "render": None if file.render is None else {"sampler": file.render.sampler, "scheduler": file.render.scheduler,
                                                    "steps": file.render.steps, "cfg": file.render.cfg,
                                                    "seed": file.render.seed},
        "latent": {"channels": file.latent_format.channels, "scale_factor": file.latent_format.scale_factor,
                   "shift_factor": file.latent_format.shift_factor},
        "scramble": k.lock.scramble, "kdf": k.lock.kdf, "faces": faces,
    }
    text = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    blob = save(arrays)
    return struct.pack(">I", len(text)) + text + blob


def _decode(raw: bytes) -> anon.AnonymizedFile:
    from safetensors.numpy import load
    (n,) = struct.unpack(">I", raw[:4])
    doc = json.loads(raw[4:4 + n])
    if doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise MetadataError("this PNG carries a KeyFace record of another format or version than this CLI reads.")
    arrays = load(raw[4 + n:])
    inv = doc["inversion"]
    inversion = protocol.InversionSettings(int(inv["steps"]), str(inv["scheduler"]), str(inv["method"]),
                                           float(inv["cfg"]), str(inv["model_id"]), str(inv["cond_id"]),
                                           torch.tensor(inv["sigmas"], dtype=torch.float32))
    r = doc["render"]
    render = None if r is None else protocol.RenderSettings(r["sampler"], r["scheduler"], int(r["steps"]),
                                                            float(r["cfg"]), int(r["seed"]))
    faces_doc = doc["faces"]
    count = len(faces_doc)
    mask = torch.from_numpy(arrays["latent_mask"]).to(torch.float32) if "latent_mask" in arrays else None
    background = torch.from_numpy(arrays["background"]) if "background" in arrays else None
    batch = protocol.FaceBatch(tuple(bytes.fromhex(f["nonce"]) for f in faces_doc),
                               tuple(int(f["index"]) for f in faces_doc), mask, background)
    sealed = tuple(arrays.get(f"faces.{i}.sealed_residual") for i in range(count))
    references = tuple(arrays[f"faces.{i}.reference"].tobytes() if f"faces.{i}.reference" in arrays else None
                       for i in range(count))
    lock = protocol.Lock(str(doc["scramble"]), tuple(f["key_check"] for f in faces_doc), sealed,
                         tuple(f["original_digest"] for f in faces_doc), references, doc["kdf"])
    keyed = protocol.KeyedNoise(torch.from_numpy(arrays["keyed_noise"]), batch, lock)
    entries = tuple(anon.FaceEntry(tuple(int(v) for v in f["box"]), arrays[f"faces.{i}.crop_mask"], f["region_digest"])
                    for i, f in enumerate(faces_doc))
    lat = doc["latent"]
    return anon.AnonymizedFile(tuple(doc["image_size"]), doc["pixels_sha256"], inversion, render,
                               anon.LatentFormat(int(lat["channels"]), float(lat["scale_factor"]),
                                                 float(lat["shift_factor"])),
                               int(doc["crop_size"]), keyed, torch.from_numpy(arrays["anonymized"]), entries, None,
                               doc.get("look", ""))
