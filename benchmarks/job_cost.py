"""The cost of the whole KeyFace job (format v2) against one stock KSampler run, side by side in one process.

Variants, each timed `--reps` times in a freshly shuffled order every round (so drifting machine load hits all alike):
  ksampler       ComfyUI's KSampler node path (common_ksampler), euler, N steps, on the keyed noise (no added noise)
  regenerate     KeyFace Regenerate with KSamplerSelect("euler"), N steps: the same work as KSampler
  anonymize      Invert to Noise (exact, N steps) + Apply Key Flip + Regenerate (dpmpp_2m, N steps)
  restore        Restore (unscramble + retrace, N steps) with its keyed-digest check

Reported: model calls, median wall seconds, the raw ratio to KSampler with its spread over the rounds
(min-median-max of the per-round ratios), and the pooled ratio (calls x shared seconds per call + own
non-model seconds), which hides differences inside model time and is shown only beside the raw one.

    .venv/bin/python benchmarks/job_cost.py [--reps 7] [--steps 20 30] [--sd15] [--threads 1]
Writes benchmarks/results/job_cost.md and job_cost.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from kfbench import common  # noqa: E402


def _latent(models, shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    scale = float(getattr(models.model.model.latent_format, "scale_factor", 1.0))
    return {"samples": torch.randn(shape, generator=gen, dtype=torch.float32) / scale}


def measure(models, shape, steps: int, reps: int, seed: int = 0) -> dict:
    import comfy.samplers
    cn = common.pack("nodes.core_nodes")
    nodes = common.comfy_host.boot()
    key = common.new_key()
    cond = models.cond
    timed, timer = common.timed_clone(models.model)
    latent = _latent(models, shape)
    mask = torch.zeros(shape[0], shape[2] * 8, shape[3] * 8)
    mask[:, shape[2] * 2:shape[2] * 6, shape[3] * 2:shape[3] * 6] = 1.0
    noise, _ = cn.invert_latent(models.model, latent, steps, "normal", "exact", 1.0, cond, cond, mask=mask)
    keyed = cn.flip_latent(noise, key)
    anonymized, _ = cn.regenerate_latent(models.model, keyed, cond, cond)
    euler = comfy.samplers.sampler_object("euler")
    dpmpp = comfy.samplers.sampler_object("dpmpp_2m")
    checks = {}

    def ksampler():
        nodes.common_ksampler(timed, 0, steps, 1.0, "euler", "normal", cond, cond, {"samples": keyed["samples"]},
                              disable_noise=True)

    def regenerate():
        cn.regenerate_latent(timed, keyed, cond, cond, euler, "normal", steps, 1.0)

    def anonymize():
        n, _ = cn.invert_latent(timed, latent, steps, "normal", "exact", 1.0, cond, cond, mask=mask)
        cn.regenerate_latent(timed, cn.flip_latent(n, key), cond, cond, dpmpp, "normal", steps, 1.0)

    def restore():
        out, stats = cn.restore_latent(timed, anonymized, key, cond, cond)
        checks["restore_exact"] = bool(torch.equal(out["samples"], latent["samples"]))
        checks["verification"] = stats["verification"].message()

    runs = {"ksampler": ksampler, "regenerate": regenerate, "anonymize": anonymize, "restore": restore}
    for fn in runs.values():     # one untimed warm-up round
        fn()
    walls = {name: [] for name in runs}
    model_s = {name: [] for name in runs}
    calls = {name: [] for name in runs}
    rng = random.Random(seed)
    for _ in range(reps):
        order = list(runs)
        rng.shuffle(order)
        for name in order:
            timer.reset()
            start = time.perf_counter()
            runs[name]()
            walls[name].append(time.perf_counter() - start)
            model_s[name].append(timer.seconds)
            calls[name].append(timer.calls)
    per_call = statistics.median(m / c for name in runs for m, c in zip(model_s[name], calls[name]) if c)
    rows = {}
    for name in runs:
        per_round = [w / k for w, k in zip(walls[name], walls["ksampler"])]
        non_model = statistics.median(w - m for w, m in zip(walls[name], model_s[name]))
        pooled = (calls[name][0] * per_call + non_model) / (
            calls["ksampler"][0] * per_call + statistics.median(w - m for w, m in zip(walls["ksampler"], model_s["ksampler"])))
        rows[name] = {"model_calls": calls[name][0], "median_wall_s": statistics.median(walls[name]),
                      "ratio_raw_median": statistics.median(per_round), "ratio_raw_min": min(per_round),
                      "ratio_raw_max": max(per_round), "ratio_pooled": pooled,
                      "non_model_share": statistics.median((w - m) / w for w, m in zip(walls[name], model_s[name])),
                      "wall_s": walls[name]}
    return {"model": models.name, "latent_shape": list(shape), "steps": steps, "reps": reps, "rows": rows,
            "seconds_per_model_call": per_call, "checks": checks}


def markdown(results: list, command: str, machine: dict) -> str:
    lines = ["# Job cost: anonymize and restore (format v2) vs one KSampler run", "",
             f"Command: `{command}`  ", f"Machine: {machine.get('cpu', '?')}, torch threads "
             f"{machine.get('torch_threads', '?')}, {machine.get('started', '')}", "",
             "Raw ratio = this variant's wall time / KSampler's in the same round (median, and min–max over the "
             "shuffled rounds). Pooled = model calls × shared seconds per call + own non-model seconds: it gives "
             "every variant the same seconds per model call, so read it only beside the raw ratio.", ""]
    for res in results:
        lines += [f"## {res['model']}, latent {res['latent_shape']}, {res['steps']} steps, {res['reps']} shuffled rounds",
                  "", "| variant | model calls | median wall s | raw ratio vs KSampler (min–max) | pooled ratio | "
                  "share outside model calls |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for name, row in res["rows"].items():
            lines.append(f"| {name} | {row['model_calls']} | {row['median_wall_s']:.3f} | "
                         f"{row['ratio_raw_median']:.3f} ({row['ratio_raw_min']:.3f}–{row['ratio_raw_max']:.3f}) | "
                         f"{row['ratio_pooled']:.3f} | {100 * row['non_model_share']:.1f} % |")
        lines += ["", f"Restore result equal to the original latent (torch.equal): {res['checks'].get('restore_exact')}; "
                  f"Restore says: {res['checks'].get('verification')}.", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7, help="shuffled rounds per variant (default 7)")
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 30], help="steps (default 20 30)")
    parser.add_argument("--shape", type=int, nargs=4, default=[1, 4, 32, 32], help="latent shape for the tiny model")
    parser.add_argument("--sd15", action="store_true", help="also the SD1.5-sized random UNet (860 M params; slow)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", default=str(HERE / "results"), help="output folder")
    args = parser.parse_args(argv)
    common.boot(args.threads)
    import datetime
    machine = {**common.machine_info(), "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    results = []
    tiny = common.tiny_models(with_vae=False)
    for steps in args.steps:
        print(f"tiny model, {steps} steps ...", file=sys.stderr)
        results.append(measure(tiny, tuple(args.shape), steps, args.reps))
    if args.sd15:
        big = common.sd15_models()
        for steps in args.steps:
            print(f"SD1.5-sized model, {steps} steps ...", file=sys.stderr)
            results.append(measure(big, (1, 4, 16, 16), steps, max(3, args.reps // 2)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join([".venv/bin/python benchmarks/job_cost.py", *(argv if argv is not None else sys.argv[1:])])
    (out / "job_cost.json").write_text(json.dumps({"command": command, "machine": machine, "results": results},
                                                  indent=1, default=str))
    (out / "job_cost.md").write_text(markdown(results, command, machine))
    print((out / "job_cost.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
