"""Reading and writing PNGs for the CLI, through keyface_core.pngio (the v2 record) and its atomic writes.

Each process writes through its own hidden staging folder beside the target (`.keyface-staging-<host>-<pid>`):
pngio writes the file there atomically, then it is hard-linked into place (never replacing a file) and the staged
name removed. A process killed at any point leaves at most its staging folder, which the next run removes when
that process is gone; an output name that exists is always a complete file.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import numpy as np

from keyface_core import anonymized as anon
from keyface_core import metadata as v1
from keyface_core import pngio
from keyface_core.errors import KeyFaceError, MetadataError

TEMP_PREFIX = ".keyface-tmp-"
STAGING_PREFIX = ".keyface-staging-"


# ----------------------------------------------------------------------------------------------
# Atomic files
# ----------------------------------------------------------------------------------------------

def temp_name(target: Path) -> str:
    """Prefix of `.keyface-tmp-<host>-<pid>-<random>.part` temp files (reports): resume removes dead processes' ones."""
    return f"{TEMP_PREFIX}{socket.gethostname()}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------------------------
# PNGs
# ----------------------------------------------------------------------------------------------

def _staging(folder: Path) -> Path:
    path = folder / f"{STAGING_PREFIX}{socket.gethostname()}-{os.getpid()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write(target: Path, pixels: np.ndarray, file: anon.AnonymizedFile | None) -> None:
    """The anonymized PNG (pixels + v2 record) or, with `file` None, a plain PNG (a restored photo)."""
    target = Path(target)
    if os.path.lexists(target):
        raise KeyFaceError(f"{target} already exists; KeyFace never overwrites a file.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = _staging(target.parent) / target.name
    if os.path.lexists(staged):
        staged.unlink()
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    if file is None:
        v1.write_png_atomic(staged, pixels, None)
    else:
        pngio.write_png_atomic(staged, pixels, file)
    try:
        os.link(staged, target)    # fails if the target exists: a file made meanwhile is never clobbered
    except FileExistsError:
        raise KeyFaceError(f"{target} already exists; KeyFace never overwrites a file.") from None
    finally:
        staged.unlink(missing_ok=True)


def read(path: Path) -> tuple[np.ndarray, anon.AnonymizedFile | None]:
    """(RGB uint8 pixels, the v2 record or None); a v1 record is refused with what to do."""
    pixels, record, _ = pngio.read_png(path)
    if record is not None and not isinstance(record, anon.AnonymizedFile):
        raise MetadataError(f"{Path(path).name} is a KeyFace format v1 file; restore it with the ComfyUI nodes "
                            "(Load Anonymized + Restore). The CLI reads format v2.")
    return pixels, record


def remove_stale(folder: Path, recursive: bool = True) -> int:
    """Remove what killed runs of this host left in `folder` (staging folders, report temps); returns how many."""
    host = socket.gethostname()
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    find = folder.rglob if recursive else folder.glob
    removed = 0
    for path in [*find(f"{STAGING_PREFIX}*"), *find(f"{TEMP_PREFIX}*.part")]:
        name = path.name[len(STAGING_PREFIX):] if path.is_dir() else path.name[len(TEMP_PREFIX):].rpartition("-")[0]
        owner, _, pid = name.rpartition("-")
        if owner != host or not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue   # another machine's, or a process still running
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed += 1
    return removed


def cleanup(folder: Path) -> None:
    """Remove this process's (empty) staging folders under `folder` at the end of a run."""
    for path in Path(folder).rglob(f"{STAGING_PREFIX}{socket.gethostname()}-{os.getpid()}"):
        shutil.rmtree(path, ignore_errors=True)
