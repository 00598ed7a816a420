"""KeyFace benchmark and evaluation harness (format v2): one command, Markdown + JSON + PNG plots.

    .venv/bin/python benchmarks/run.py [--quick] [--checkpoint PATH] [--faces DIR] [--only SECTION,...]

Sections (all by default): speed (tiny model, with the job-cost table of benchmarks/job_cost.py), sd15
(SD1.5-sized random UNet), exactness (restore error, calls, and Restore's verdict under other numerics),
photo (12 MP photo vs 512² crop, and the bytes lossless mode adds per face), identity (anonymize -> save
-> load -> restore on a faces folder: identity, the restored photo vs the ideal, lossless on and off),
analytic (sampler quality on a Gaussian mixture with its exact denoiser; format v1's anonymization as baseline).
Writes benchmarks/results/results.md, results.json and *.png (plots need matplotlib).
See benchmarks/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

SECTIONS = ("speed", "sd15", "exactness", "photo", "identity", "analytic")


def settings_for(quick: bool) -> dict:
    if quick:
        return {
            "speed": {"shape": [1, 4, 32, 32], "steps": 10, "reps": 2, "exact_single_reps": 1},
            "core_overhead": {"shape": [1, 4, 32, 32], "steps": 10, "reps": 2},
            "batch": {"n": 4, "shape": [1, 4, 32, 32], "steps": 5, "reps": 2},
            "sd15": None,
            "curves": {"steps": [5, 10, 20], "iterations": [1, 3, 8], "tolerances": [1e-3, 1e-6]},
            "nodes": {"steps": 20, "methods": ["exact", "plain", "exact_single"], "calls_steps": [10, 20]},
            "numerics": {"steps": 10, "analytic_samples": 8, "analytic_steps": 10},
            "job_cost": {"shape": [1, 4, 32, 32], "steps": [10], "reps": 3},
            "photo": {"megapixels": 12.0, "crop_size": 512, "steps": 3, "reps": 1},
            "lossless": {"crop_size": 512, "steps": 3, "limit": 3},
            "identity": {"steps": 8, "mode": "exact", "crop_size": 128, "limit": 3},
            "analytic": {"k": 8, "samples": 16, "steps": [5, 10, 20], "reference_substeps": 300,
                         "anon_samples": 16, "anon_steps": 20},
        }
    return {
        "speed": {"shape": [1, 4, 32, 32], "steps": 20, "reps": 5, "exact_single_reps": 1},
        "core_overhead": {"shape": [1, 4, 32, 32], "steps": 20, "reps": 3},
        "batch": {"n": 4, "shape": [1, 4, 32, 32], "steps": 10, "reps": 3},
        "sd15": {"shape": [1, 4, 16, 16], "steps": 3, "reps": 3, "batch_n": 2, "batch_steps": 2, "batch_reps": 1},
        "curves": {"steps": [5, 10, 20, 30, 50], "iterations": [1, 2, 4, 8, 16, 24],
                   "tolerances": [1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7]},
        "nodes": {"steps": 20, "methods": ["exact", "exact_single", "plain"], "calls_steps": [10, 20, 30, 50]},
        "numerics": {"steps": 20, "analytic_samples": 64, "analytic_steps": 20},
        "job_cost": {"shape": [1, 4, 32, 32], "steps": [20, 30], "reps": 7},
        "photo": {"megapixels": 12.0, "crop_size": 512, "steps": 8, "reps": 2},
        "lossless": {"crop_size": 512, "steps": 4, "limit": None},
        "identity": {"steps": 20, "mode": "exact", "crop_size": 128, "limit": None},
        "analytic": {"k": 8, "samples": 64, "steps": [5, 10, 20, 30, 50], "reference_substeps": 600,
                     "anon_samples": 64, "anon_steps": 20},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and points, no SD1.5-sized model (~2 min)")
    parser.add_argument("--checkpoint", metavar="PATH", help="real checkpoint for the identity harness "
                        "(comfy.sd.load_checkpoint_guess_config); default: the tiny random model")
    parser.add_argument("--faces", metavar="DIR", help="folder of face photos (default: ../shared/faces)")
    parser.add_argument("--only", metavar="SECTIONS", help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--out", metavar="DIR", default=str(HERE / "results"), help="output folder")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: stable timings on a "
                        "shared machine; 0 = torch's default)")
    parser.add_argument("--steps", type=int, help="identity harness: steps (default 20; 8 with --quick)")
    parser.add_argument("--crop-size", type=int, help="identity harness: face crop size (default 128 for the tiny "
                        "model, 512 with --checkpoint)")
    parser.add_argument("--limit", type=int, help="identity harness: at most this many photos")
    parser.add_argument("--coverage", default="face", help="identity harness: Face Mask coverage levels to compare, "
                        "comma-separated (face, face+ears+neck, head; default face). The first is the main table; "
                        "each level adds a row to the per-coverage table.")
    args = parser.parse_args(argv)

    only = set(SECTIONS) if not args.only else {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = only - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.faces:
        os.environ["KEYFACE_FACES_DIR"] = str(Path(args.faces).resolve())

    from tqdm import tqdm
    from kfbench import common, report

    def log(msg):
        tqdm.write(msg, file=sys.stderr)

    started = time.perf_counter()
    log("booting ComfyUI (CPU) with KeyFace ...")
    common.boot(args.threads)
    cfg = settings_for(args.quick)
    idcfg = dict(cfg["identity"])
    if args.checkpoint:
        idcfg["crop_size"] = 512
    for name in ("steps", "crop_size", "limit"):
        value = getattr(args, name)
        if value is not None:
            idcfg[name] = value
    cfg["identity"] = idcfg
    command = " ".join([".venv/bin/python benchmarks/run.py"] + [shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)])
    res = {"command": command, "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
           "quick": args.quick, "sections": sorted(only), "settings": cfg, "machine": common.machine_info(),
           "checkpoint": args.checkpoint, "faces_dir": os.path.relpath(common.FACES_DIR, HERE.parent), "section_s": {}}

    def bar(desc, total):
        return tqdm(total=total, desc=desc, unit="run", file=sys.stderr, dynamic_ncols=True, leave=True)

    def section(name, fn):
        t0 = time.perf_counter()
        try:
            fn()
        finally:
            res["section_s"][name] = time.perf_counter() - t0
            # Keep partial results on disk as the run goes.
            _write_json(out / "results.json", res)

    from kfbench import analytic, exactness, identity, photo, speed
    # The analytic section needs no ComfyUI model.
    tiny = common.tiny_models() if only & {"speed", "exactness", "photo", "identity"} else None
    res["speed"] = {}

    if "speed" in only:
        def run_speed():
            c = cfg["speed"]
            with bar("speed: tiny model", c["reps"] * 6 + c["exact_single_reps"]) as p:
                res["speed"]["tiny"] = speed.speed_ratios(tiny, tuple(c["shape"]), c["steps"], c["reps"], p,
                                                          c["exact_single_reps"])
            c = cfg["core_overhead"]
            with bar("speed: pure-core overhead", 6 * c["reps"] - (c["reps"] - 1)) as p:
                res["speed"]["core_overhead_tiny"] = speed.core_overhead(tiny, tuple(c["shape"]), c["steps"], c["reps"], p)
            c = cfg["batch"]
            with bar(f"speed: batch of {c['n']} vs singles", 2 * c["reps"]) as p:
                res["speed"]["batch_tiny"] = speed.batch_vs_single(tiny, c["n"], tuple(c["shape"]), c["steps"], c["reps"], p)
            c = cfg["job_cost"]
            from job_cost import measure as job_cost
            res["speed"]["job_cost_tiny"] = []
            for steps in c["steps"]:
                log(f"job cost: tiny model, {steps} steps, {c['reps']} shuffled rounds ...")
                res["speed"]["job_cost_tiny"].append(job_cost(tiny, tuple(c["shape"]), steps, c["reps"]))
        section("speed", run_speed)

    if "sd15" in only and cfg["sd15"]:
        def run_sd15():
            c = cfg["sd15"]
            log("building the SD1.5-sized random UNet (860 M parameters) ...")
            big = common.sd15_models()
            with bar("speed: SD1.5-sized UNet", c["reps"] * 6) as p:
                res["speed"]["sd15"] = speed.speed_ratios(big, tuple(c["shape"]), c["steps"], c["reps"], p,
                                                          exact_single_reps=0, warmup_each=False,
                                                          check_round_trip=False)
            with bar(f"speed: SD1.5-sized batch of {c['batch_n']} vs singles", 2 * c["batch_reps"]) as p:
                res["speed"]["batch_sd15"] = speed.batch_vs_single(big, c["batch_n"], tuple(c["shape"]), c["batch_steps"],
                                                                   c["batch_reps"], p, warmup=False)
            del big
            gc.collect()
        section("sd15", run_sd15)

    if "exactness" in only:
        def run_exactness():
            res["exactness"] = {}
            c = cfg["curves"]
            total = 4 * len(c["steps"]) + 2 * len(c["iterations"]) + len(c["tolerances"])
            with bar("exactness: curves", total) as p:
                res["exactness"]["curves"] = exactness.curves(tiny, c["steps"], c["iterations"], c["tolerances"], p)
            c = cfg["nodes"]
            with bar("exactness: calls and restore", len(c["methods"]) * (3 + len(c["calls_steps"]))) as p:
                res["exactness"]["nodes"] = exactness.node_restore_table(tiny, c["steps"], c["methods"],
                                                                         c["calls_steps"], p)
            c = cfg["numerics"]
            with bar("exactness: restore with other numerics (tiny)", 6) as p:
                res["exactness"]["numerics_tiny"] = exactness.numerics_tiny(tiny, c["steps"], p,
                                                                            threads=max(1, args.threads))
            with bar("exactness: restore with other numerics (analytic)", 5) as p:
                res["exactness"]["numerics_analytic"] = exactness.numerics_analytic(
                    c["analytic_samples"], c["analytic_steps"], p, threads=max(1, args.threads))
            if args.threads > 0:
                import torch
                torch.set_num_threads(args.threads)
        section("exactness", run_exactness)

    if "photo" in only:
        def run_photo():
            c = cfg["photo"]
            with bar(f"photo: {c['megapixels']:.0f} MP photo vs {c['crop_size']}² crop", 2 * c["reps"]) as p:
                res["photo"] = photo.photo_vs_crop(tiny, c["steps"], c["reps"], p, c["megapixels"], c["crop_size"])
            c = cfg["lossless"]
            n = len(identity.photo_files(common.FACES_DIR))
            n = min(n, c["limit"]) if c["limit"] else n
            with bar(f"photo: lossless bytes per face at {c['crop_size']}²", n) as p:
                res["lossless"] = photo.lossless_sizes(tiny, common.FACES_DIR, c["steps"], c["crop_size"],
                                                       out / "raw" / "lossless", p, c["limit"])
        section("photo", run_photo)

    if "identity" in only:
        def run_identity():
            c = cfg["identity"]
            models = tiny
            if args.checkpoint:
                log(f"loading checkpoint {args.checkpoint} ...")
                models = common.checkpoint_models(args.checkpoint)
            folder = common.FACES_DIR
            files = identity.photo_files(folder)
            n = len(files) + (min(c["limit"], len(files)) if c["limit"] else len(files))
            levels = [v.strip() for v in args.coverage.split(",") if v.strip()] or ["face"]
            res["identity_by_coverage"] = {}
            for level in levels:
                with bar(f"identity harness ({level})", n) as p:
                    run = identity.harness(models, folder, c["steps"], c["mode"], c["crop_size"], c["limit"],
                                           out / "raw" / "identity" / level.replace("+", "_"), p, log, coverage=level)
                res.setdefault("identity", run)
                res["identity_by_coverage"][level] = run["summary"]
        section("identity", run_identity)

    if "analytic" in only:
        def run_analytic():
            c = cfg["analytic"]
            with bar("analytic: Gaussian mixture, exact denoiser", analytic.progress_total(c)) as p:
                res["analytic"] = analytic.run(c, p, log)
        section("analytic", run_analytic)

    res["wall_s"] = time.perf_counter() - started
    res["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    res["plots"] = [Path(p).name for p in report.plots(res, out)]
    _write_json(out / "results.json", res)
    md = report.markdown(res)
    (out / "results.md").write_text(md)
    log(f"\nwrote {out / 'results.md'}, results.json and {len(res['plots'])} plots in {res['wall_s'] / 60:.1f} min")
    for target, measured, met in report.targets(res):
        log(f"  [{met if isinstance(met, str) else 'MET' if met else 'NOT MET'}] {target}: {measured}")
    return 0


def _plain(obj):
    """JSON-safe copy: infinities (identical images' PSNR) and NaN become strings, tensors lists."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, float) and (math.isinf(obj) or math.isnan(obj)):
        return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "tolist"):
        return _plain(obj.tolist())
    return str(obj)


def _write_json(path: Path, res: dict) -> None:
    path.write_text(json.dumps(_plain(res), indent=1, allow_nan=False))


if __name__ == "__main__":
    sys.exit(main())
