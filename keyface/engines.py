"""Engines run the same per-image function over a plan: `local` (this process) or `ray` (Ray Data actors).

Both call `run_task`, which turns every outcome of one image into an `ImageResult` (a failure never escapes it),
so both write the same files and the same report, and both resume the same way (an existing output is done).
The key never travels: each process loads it itself from its *source* (a file path or env:VAR), which is all a
`KeySpec` holds (SecretKey refuses to be pickled).
"""

from __future__ import annotations

import json
import logging
import math
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Optional

from keyface_core.errors import KeyFaceError, NoFaceError
from keyface_core.keys import key_from_env, load_key_file

from . import pipeline
from .batch import Task
from .models import load_model

log = logging.getLogger("keyface")
ENGINES = ("local", "ray")


@dataclass(frozen=True)
class KeySpec:
    """Where the key comes from: `path/to/file.key` or `env:VARIABLE` (never the key itself)."""

    source: str
    kind: str = "key"

    def load(self):
        if self.source.startswith("env:"):
            return key_from_env(self.source[4:], self.kind)
        return load_key_file(self.source, self.kind)

    def __str__(self) -> str:
        return self.source


@dataclass(frozen=True)
class Job:
    """Everything a worker needs to process any task of the run (picklable; nothing secret)."""

    operation: str                  # "anonymize" | "restore"
    out: str
    settings: object                # pipeline.Settings | pipeline.RestoreSettings
    model: str
    key: KeySpec
    device: str = "auto"
    dtype: str = "float32"
    threads: int = 0                # torch intra-op threads (0: leave torch's default)
    model_config: str | None = None  # configs for a single checkpoint file (a diffusers folder or repo id)


def run_task(task: Task, job: Job, model, key) -> pipeline.ImageResult:
    """One image, whatever happens: done, skipped (already done), no face, or failed with a user-facing reason."""
    target = Path(job.out) / task.rel
    start = time.perf_counter()
    if target.exists():
        return pipeline.ImageResult(task.key, task.rel, "skipped", None, "already done (output exists)")
    operation = pipeline.anonymize_image if job.operation == "anonymize" else pipeline.restore_image
    try:
        result = operation(task.source, target, job.settings, model, key)
    except NoFaceError as err:
        return pipeline.ImageResult(task.key, None, "no_face", 0, str(err), time.perf_counter() - start)
    except KeyFaceError as err:
        if target.exists() and "already exists" in str(err):
            return pipeline.ImageResult(task.key, task.rel, "skipped", None, "done meanwhile by another process")
        return pipeline.ImageResult(task.key, None, "failed", None, str(err), time.perf_counter() - start)
    except MemoryError:
        return pipeline.ImageResult(task.key, None, "failed", None, "out of memory on this image; lower --crop-size "
                                    "or --max-megapixels, or use a machine with more memory.",
                                    time.perf_counter() - start)
    except Exception as err:   # a bug or a backend failure: report it, keep the batch going
        log.debug("unexpected error on %s:\n%s", task.key, traceback.format_exc())
        return pipeline.ImageResult(task.key, None, "failed", None,
                                    f"internal error ({type(err).__name__}: {err}); rerun with --verbose and report it.",
                                    time.perf_counter() - start)
    result.output = task.rel
    return result


def _set_threads(threads: int) -> None:
    if threads > 0:
        import torch
        torch.set_num_threads(threads)


def setup_worker(job: Job):
    """(model, key) for a process; errors here stop the whole run (nothing could be processed)."""
    _set_threads(job.threads)
    key = job.key.load()
    model = load_model(job.model, job.device, job.dtype, job.model_config)
    return model, key


# ----------------------------------------------------------------------------------------------
# Local
# ----------------------------------------------------------------------------------------------

def run_local(tasks: Iterable[Task], job: Job, on_result: Callable[[Task, pipeline.ImageResult], None],
              model=None, key=None) -> None:
    if model is None or key is None:
        model, key = setup_worker(job)
    for task in tasks:
        on_result(task, run_task(task, job, model, key))


# ----------------------------------------------------------------------------------------------
# Ray
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RayPlan:
    workers: int
    num_cpus: float
    num_gpus: float
    threads: int


def size_pool(resources: dict, workers: Optional[int], device: str) -> RayPlan:
    """Actor count and per-actor resources from the cluster's: whole-CPU actors on a small machine starve Ray Data's
    other stages and the job hangs, so CPU actors share what is left after one CPU for the rest of the pipeline."""
    cpus = float(resources.get("CPU", 1.0))
    gpus = float(resources.get("GPU", 0.0))
    wants_gpu = device.startswith("cuda") or (device == "auto" and gpus > 0)
    if wants_gpu:
        if gpus <= 0:
            raise KeyFaceError("--device cuda with --engine ray, but the Ray cluster has no GPU; use --device cpu.")
        n = workers or max(1, int(gpus))
        num_gpus = min(1.0, gpus / n)
        num_cpus = max(0.25, min(1.0, (cpus - 1.0) / n))
        return RayPlan(n, round(num_cpus, 2), round(num_gpus, 2), 1)
    n = workers or max(1, int(cpus) - 1)
    share = (cpus - 1.0 if cpus > 1 else cpus / 2) / n
    num_cpus = float(math.floor(share)) if share >= 1 else max(0.05, share)
    return RayPlan(n, round(num_cpus, 2), 0.0, max(1, math.floor(num_cpus)))


class _RayWorker:
    """Ray Data actor: loads the model and the key once, then processes one task per row."""

    def __init__(self, job: Job):
        self.job = job
        self.model, self.key = setup_worker(job)

    def __call__(self, batch: dict) -> dict:
        import numpy as np
        rows = []
        for source, rel, index in zip(batch["source"], batch["rel"], batch["index"]):
            task = Task(Path(str(source)), str(rel), int(index))
            result = run_task(task, self.job, self.model, self.key)
            rows.append(json.dumps({"index": int(index), **result.row()}))
        return {"result": np.array(rows, dtype=object)}


def run_ray(tasks: list[Task], job: Job, on_result: Callable[[Task, pipeline.ImageResult], None], *,
            address: Optional[str] = None, workers: Optional[int] = None, local_cpus: Optional[int] = None,
            on_started: Optional[Callable[[RayPlan, float], None]] = None) -> RayPlan:
    try:
        import ray
        import ray.data
    except ImportError:
        raise KeyFaceError("--engine ray needs Ray Data: pip install 'keyface[ray]' (ray[data]==2.60.0).") from None
    started = time.perf_counter()
    owned = not ray.is_initialized()
    if owned:
        # No address: always a new local cluster ("local"; stopped below), never one left running in Ray's temp
        # folder; "auto", host:port or ray://host:10001 joins an existing one.
        ray.init(address=address or "local", num_cpus=local_cpus if address is None else None,
                 include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING, configure_logging=True)
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        return _run_on_ray(ray, tasks, job, on_result, workers, on_started, started)
    finally:
        if owned:
            ray.shutdown()


def _run_on_ray(ray, tasks, job, on_result, workers, on_started, started) -> RayPlan:
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    plan = size_pool(ray.cluster_resources(), workers, job.device)
    worker_job = replace(job, threads=job.threads or plan.threads)
    # The key must be loadable where the actors run: check it here first for a clear error.
    job.key.load()
    by_index = {t.index: t for t in tasks}
    if on_started is not None:
        on_started(plan, time.perf_counter() - started)
    if not tasks:
        return plan
    dataset = ray.data.from_items([{"source": str(t.source), "rel": t.rel, "index": t.index} for t in tasks],
                                  override_num_blocks=min(len(tasks), max(1, plan.workers * 4)))
    results = dataset.map_batches(
        _RayWorker, fn_constructor_kwargs={"job": worker_job}, batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=plan.workers), num_cpus=plan.num_cpus,
        num_gpus=plan.num_gpus or None)
    try:
        for row in results.iter_rows():      # streamed: progress and report as each photo finishes
            doc = json.loads(row["result"])
            task = by_index[doc.pop("index")]
            fields = {k: v for k, v in doc.items() if k in pipeline.ImageResult.__dataclass_fields__}
            extra = {k: v for k, v in doc.items() if k not in fields}
            on_result(task, pipeline.ImageResult(**fields, extra=extra))
    except Exception as err:   # an actor could not start (model or key missing on a node), or the cluster failed
        cause = err
        while getattr(cause, "cause", None) is not None:
            cause = cause.cause
        first = (str(cause).splitlines() or [""])[0][:300]
        raise KeyFaceError(f"the Ray job failed ({type(cause).__name__}: {first}); the photos finished so far are "
                           "kept. Check that every node sees the inputs, the output folder, the key and the model at "
                           "the same paths, then rerun to resume.") from None
    return plan
