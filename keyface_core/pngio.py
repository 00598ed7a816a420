"""PNG I/O for anonymized photos: pixels plus one KeyFace chunk, written atomically, read strictly.

Format v2 lives in one private binary chunk ``kfRC``: ancillary (lowercase 1st letter: viewers may ignore it),
private (lowercase 2nd), and unsafe-to-copy (uppercase 4th), so an editor that changes the pixels must drop it
rather than carry a record that no longer matches them. Format v1 (a ``keyface`` iTXt chunk) is still read.
"""

from __future__ import annotations

import os
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Union

import numpy as np
from PIL import PngImagePlugin

from . import metadata as v1
from . import record as v2
from .anonymized import AnonymizedFile
from .errors import InputMismatchError, KeyFaceError, MetadataError

CHUNK_TYPE = b"kfRC"
ReadRecord = Union[AnonymizedFile, "v1.AnonymizationRecord", None]


def write_png_atomic(path: Union[str, os.PathLike], pixels: np.ndarray, file: AnonymizedFile) -> Path:
    """Write pixels + the v2 record to `path` (temp file + link/rename: never a partial or overwritten file)."""
    target = Path(path)
    image = v1._image_from_array(pixels)
    if tuple(file.image_size) != image.size:
        raise InputMismatchError(f"the record describes a {file.image_size[0]}x{file.image_size[1]} image but the "
                                 f"pixels are {image.size[0]}x{image.size[1]}; save the image the record was made for")
    payload = v2.encode(file)
    info = PngImagePlugin.PngInfo()
    info.add(CHUNK_TYPE, payload)
    if os.path.lexists(target):
        raise KeyFaceError(v1._exists_message(target))
    tmp_name = None
    try:
        with tempfile.NamedTemporaryFile(delete=False, dir=target.parent, prefix=".keyface-", suffix=".png.tmp") as handle:
            tmp_name = handle.name
            image.save(handle, format="PNG", pnginfo=info)
            handle.flush()
            os.fsync(handle.fileno())
        v1._set_mode(tmp_name, v1._final_mode(target, False))
        v1._publish(tmp_name, target, False)
    except BaseException as err:
        if tmp_name is not None:
            v1._remove_quietly(tmp_name)
        if isinstance(err, KeyFaceError) or not isinstance(err, Exception):
            raise
        if isinstance(err, OSError):
            raise KeyFaceError(f"could not save {target}: {err.strerror or err}. Check that the folder {target.parent} "
                               "exists, is writable and has free space; nothing was written.") from err
        raise KeyFaceError(f"could not encode {target.name} as PNG ({type(err).__name__}: {err}); nothing was written") from err
    v1._fsync_dir(target.parent)
    return target


def read_png(path: Union[str, os.PathLike]) -> tuple[np.ndarray, ReadRecord, "v1.ReadInfo"]:
    """Pixels (RGB uint8) + the record (v2 `AnonymizedFile`, v1 record, or None) + notes about the file."""
    source = Path(path)
    data = _read_bytes(source)
    chunks = v1._png_chunks(data) if data.startswith(v1._PNG_SIGNATURE) else []
    ours = [c for c in chunks if c[0] == CHUNK_TYPE]
    if not ours:
        pixels, record, info = v1.read_png_bytes(source, data)
        info.resized = record is not None and tuple(record.image_size) != info.size
        return pixels, record, info
    if len(ours) > 1:
        raise MetadataError(f"{source.name} holds {len(ours)} KeyFace records, so it was edited after KeyFace saved "
                            f"it; {v2._DAMAGED}")
    # Pixels and notes come from the v1 reader; Pillow never sees the record chunk (it checks every CRC).
    pixels, legacy, info = v1.read_png_bytes(source, data, drop=tuple(ours))
    if legacy is not None:
        raise MetadataError(f"{source.name} holds records of two KeyFace formats, so it was edited; {v2._DAMAGED}")
    ctype, start, end = ours[0]
    (crc,) = struct.unpack_from(">I", data, end - 4)
    if zlib.crc32(data[start + 4:end - 4]) != crc:
        raise MetadataError(f"{source.name}: the KeyFace metadata in this image is damaged (its PNG chunk checksum "
                            f"does not match); {v2._DAMAGED}")
    payload = data[start + 8:end - 4]
    version = v2.peek_version(payload)
    if version is not None and version > v2.FORMAT_VERSION:
        raise MetadataError(f"{source.name} was anonymized by a newer KeyFace (metadata format version {version}); "
                            "Update the KeyFace node pack to restore it.")
    try:
        record = v2.decode(payload)
    except MetadataError as err:
        raise MetadataError(f"{source.name}: {err}") from None
    info.resized = tuple(record.image_size) != info.size
    info.warnings = [w for w in info.warnings if "cannot carry" not in w]
    return pixels, record, info


def _read_bytes(source: Path) -> bytes:
    try:
        return source.read_bytes()
    except FileNotFoundError:
        raise KeyFaceError(f"image file not found: {source}; check the path") from None
    except IsADirectoryError:
        raise KeyFaceError(f"{source} is a folder, not an image; pass the PNG itself") from None
    except OSError as err:
        raise KeyFaceError(f"cannot read {source}: {err.strerror or err}; check its permissions") from None
