"""Batches: which files, where their outputs go, what is already done, and the report.

Inputs: files, folders (walked recursively, sorted, image suffixes only) and glob patterns (``**`` recursive).
Outputs mirror each input's path relative to the folder (or glob base) it was found under, always ``.png``; with
``flat_names`` they are numbered ``000001.png``… instead, so no output name can carry a word of a source name
(the report, kept outside the output folder, maps numbers back to sources). An output that exists is done:
writes are atomic, so an existing output is always complete, and a rerun skips it.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from keyface_core.errors import InputMismatchError

from . import store
from .pipeline import ImageResult

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".jfif"})
REPORT_VERSION = 1


class UsageError(InputMismatchError):
    """The command line cannot run as given (exit code 2); nothing was processed."""


@dataclass(frozen=True)
class Task:
    """One input and the output it becomes."""

    source: Path            # as walked (absolute or relative to the working directory)
    rel: str                # output path relative to the output folder, POSIX separators
    index: int              # position in the sorted plan

    @property
    def key(self) -> str:
        return str(self.source)


def _has_magic(text: str) -> bool:
    return any(c in text for c in "*?[")


def walk(inputs: Iterable[str], exclude: Optional[Path] = None) -> list[tuple[Path, str]]:
    """(path, path relative to its base) for every input file; a missing explicit path is kept (reported later)."""
    found: list[tuple[Path, str]] = []
    excluded = exclude.resolve() if exclude is not None else None

    def skip(path: Path) -> bool:
        if excluded is None:
            return False
        try:
            path.resolve().relative_to(excluded)
            return True
        except ValueError:
            return False

    for item in inputs:
        path = Path(item)
        if (path.exists() or path.is_symlink()) and skip(path):
            raise UsageError(f"input '{item}' is inside the output folder; choose an --out outside the inputs "
                             "(KeyFace never overwrites an input).")
        if path.is_dir():
            for sub in sorted(p for p in path.rglob("*") if p.is_file() or p.is_symlink()):
                hidden = any(part.startswith(".") for part in sub.relative_to(path).parts)
                if sub.suffix.lower() in IMAGE_SUFFIXES and not hidden and not skip(sub):
                    found.append((sub, sub.relative_to(path).as_posix()))
        elif path.exists() or path.is_symlink():
            found.append((path, path.name))     # named explicitly: processed (and reported) whatever its suffix
        elif _has_magic(item):
            parts = Path(item).parts
            magic_at = next(i for i, p in enumerate(parts) if _has_magic(p))
            base = Path(*parts[:magic_at]) if magic_at else Path(".")
            for name in sorted(glob.glob(item, recursive=True)):
                sub = Path(name)
                if sub.is_file() and sub.suffix.lower() in IMAGE_SUFFIXES and not skip(sub):
                    found.append((sub, sub.relative_to(base).as_posix()))
        else:
            raise UsageError(f"input '{item}' does not exist (not a file, folder or matching glob pattern).")
    seen, unique = set(), []
    for path, rel in found:
        marker = os.path.abspath(path)
        if marker not in seen:
            seen.add(marker)
            unique.append((path, rel))
    return unique


def plan(inputs: Iterable[str], out: Path, *, flat_names: bool = False, previous: Optional[dict] = None,
         suffix: str = ".png") -> list[Task]:
    """The tasks of a run, deterministic for the same inputs (so a rerun finds the same outputs)."""
    out = Path(out)
    walked = walk(inputs, exclude=out)
    input_files = {os.path.abspath(p) for p, _ in walked}
    if flat_names:
        rels = _numbered([str(p) for p, _ in walked], previous or {}, out, suffix)
    else:
        rels = _mirrored([rel for _, rel in walked], suffix)
    tasks = []
    for index, ((path, _), rel) in enumerate(zip(walked, rels)):
        target = os.path.abspath(out / rel)
        if target in input_files:
            raise UsageError(f"the output for '{path}' would replace an input file; choose an --out folder outside "
                             "the inputs. KeyFace never overwrites an input.")
        tasks.append(Task(path, rel, index))
    return tasks


def _mirrored(rels: list[str], suffix: str) -> list[str]:
    """Same relative path with the suffix replaced; where two inputs would meet (a.jpg and a.png), both keep their
    own suffix in the name (a.jpg.png, a.png.png), decided from the whole set so reruns agree."""
    def plain(rel: str) -> str:
        p = Path(rel)
        return (p.with_suffix(suffix) if p.suffix else p.with_name(p.name + suffix)).as_posix()

    counts: dict[str, int] = {}
    for rel in rels:
        counts[plain(rel).lower()] = counts.get(plain(rel).lower(), 0) + 1
    return [plain(rel) if counts[plain(rel).lower()] == 1 else rel + suffix for rel in rels]


def _numbered(sources: list[str], previous: dict, out: Path, suffix: str) -> list[str]:
    """000001.png… in input order, keeping the numbers an earlier run (its report) gave to the same sources."""
    mapping = {row["source"]: row["output"] for row in previous.get("images", []) if row.get("output")}
    used = set(mapping.values())
    if not mapping and out.is_dir() and any(p.suffix == suffix for p in out.iterdir()):
        raise UsageError(f"--flat-names: {out} already holds outputs but no report of the run that made them was "
                         "found; pass that run's --report (it maps the numbers to sources), or use an empty --out.")
    taken = [int(Path(v).stem) for v in used if Path(v).stem.isdigit()]
    counter = max(taken, default=0)
    rels = []
    for source in sources:
        if source in mapping:
            rels.append(mapping[source])
            continue
        counter += 1
        rels.append(f"{counter:06d}{suffix}")
    return rels


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------

def default_report_path(out: Path) -> Path:
    """Beside the output folder, never inside it: the report names the sources, the output folder can be shared."""
    out = Path(out)
    return out.parent / f"{out.name}.keyface-report.json"


def journal_path(report: Path) -> Path:
    return Path(report).with_name(Path(report).name + ".journal")


def load_report(path: Path) -> dict:
    """The report of an earlier run, with the rows its journal holds beyond it (a killed run's last images)."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8")) if Path(path).suffix.lower() != ".csv" else \
            {"images": list(csv.DictReader(io.StringIO(Path(path).read_text(encoding="utf-8"))))}
    except (OSError, ValueError):
        doc = {}
    rows = {row.get("source"): row for row in doc.get("images", []) if isinstance(row, dict)}
    try:
        for line in journal_path(path).read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue            # the line a kill cut short
            if isinstance(row, dict):
                rows[row.get("source")] = row
    except OSError:
        pass
    doc["images"] = list(rows.values())
    return doc


class Report:
    """Rows by input, written atomically (JSON, or CSV when the path ends in .csv) after every few images."""

    FIELDS = ("source", "output", "status", "faces", "reason", "seconds", "model_seconds", "model_calls",
              "verified", "max_abs_error")

    def __init__(self, path: Path, command: str, settings: dict, tasks: list[Task], previous: Optional[dict] = None,
                 every_s: float = 30.0):
        self.path, self.command, self.settings = Path(path), command, settings
        self.every_s = every_s
        self.rows: dict[str, dict] = {}
        self.order = [t.key for t in tasks]
        self.started = time.time()
        self._last_write = 0.0
        old = {row.get("source"): row for row in (previous or {}).get("images", [])}
        for task in tasks:
            self.rows[task.key] = {"source": task.key, "output": task.rel, "status": "pending", "faces": None,
                                   "reason": "not processed yet (the run was interrupted)"}
        self._previous = old

    def previous_row(self, key: str) -> Optional[dict]:
        return self._previous.get(key)

    def add(self, task: Task, result: ImageResult) -> None:
        row = result.row()
        row["source"] = task.key
        row["output"] = task.rel if result.status in ("ok", "skipped") else None
        self.rows[task.key] = row
        if result.status != "skipped":
            # One appended line per image: what a kill cannot take back (the full report is rewritten rarely).
            fd = os.open(journal_path(self.path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "a", encoding="utf-8") as journal:
                journal.write(json.dumps(row) + "\n")
        if time.monotonic() - self._last_write >= self.every_s:
            self.write()

    def counts(self) -> dict:
        counts: dict[str, int] = {}
        for row in self.rows.values():
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        return counts

    def document(self) -> dict:
        return {"keyface_report": REPORT_VERSION, "command": self.command, "settings": self.settings,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started)),
                "seconds": round(time.time() - self.started, 3), "counts": self.counts(),
                "images": [self.rows[k] for k in self.order]}

    def write(self, final: bool = False) -> None:
        self._last_write = time.monotonic()
        if self.path.suffix.lower() == ".csv":
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=self.FIELDS, extrasaction="ignore")
            writer.writeheader()
            for key in self.order:
                writer.writerow(self.rows[key])
            data = buffer.getvalue().encode("utf-8")
        else:
            data = (json.dumps(self.document(), indent=1) + "\n").encode("utf-8")
        _replace_atomic(self.path, data)
        if final:
            try:
                journal_path(self.path).unlink()
            except OSError:
                pass


def _replace_atomic(path: Path, data: bytes) -> None:
    """Replace the report in one rename (a kill leaves the previous complete report, never half of one)."""
    import tempfile
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=store.temp_name(path), suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o600)     # it names the sources: owner-only
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
