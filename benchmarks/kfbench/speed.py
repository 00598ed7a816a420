"""Speed, as ratios measured side by side on the same seeded model and input (format v2).

* Regenerate (KeyFace node function, KSamplerSelect("euler")) vs ComfyUI's KSampler (euler, same steps, add-noise
  off) from the same keyed noise: the same sampler, so the ratio is what KeyFace adds around it.
* Restore (unscramble + retrace, `steps` model calls, keyed-digest check) vs the same KSampler run.
* Invert to Noise (plain) vs the stock unsampling route: BasicScheduler + FlipSigmas + KSamplerSelect
  (euler) + SamplerCustom, all ComfyUI's own node classes; exact / exact_single vs plain inversion.
* Share of wall time outside UNet calls (a timing model_function_wrapper around every UNet call).
* A batch of N faces vs N single runs (anonymize = invert + key flip + Regenerate, exact, masked).
"""

from __future__ import annotations

import statistics

import torch

from .common import Models, compare, comfy_host, new_key, pack, rel_err, timed_clone


def _clean_latent(models: Models, shape, seed: int = 0) -> dict:
    """A LATENT whose model-space values have unit variance (like a real VAE latent after scaling)."""
    gen = torch.Generator().manual_seed(seed)
    scale = float(getattr(models.model.model.latent_format, "scale_factor", 1.0))
    return {"samples": torch.randn(shape, generator=gen, dtype=torch.float32) / scale}


def _stock_unsample(model, cond, steps: int, latent: dict) -> dict:
    from comfy_extras.nodes_custom_sampler import BasicScheduler, FlipSigmas, KSamplerSelect, SamplerCustom
    sigmas = BasicScheduler.execute(model, "normal", steps, 1.0).result[0]
    flipped = FlipSigmas.execute(sigmas).result[0]
    sampler = KSamplerSelect.execute("euler").result[0]
    return SamplerCustom.execute(model, False, 0, 1.0, cond, cond, sampler, flipped, latent).result[0]


def _ksampler(model, cond, steps: int, latent: dict, sampler: str = "euler") -> dict:
    nodes = comfy_host.boot()
    return nodes.common_ksampler(model, 0, steps, 1.0, sampler, "normal", cond, cond,
                                 {"samples": latent["samples"]}, disable_noise=True)[0]


def _euler():
    from comfy_extras.nodes_custom_sampler import KSamplerSelect
    return KSamplerSelect.execute("euler").result[0]


def _round_trip(cn, model, cond, latent: dict, steps: int, method: str, key) -> float:
    """Invert to Noise (method) -> Apply Key Flip -> Regenerate -> Restore: the restored latent's relative error."""
    noise, _ = cn.invert_latent(model, latent, steps, "normal", method, 1.0, cond, cond)
    anon, _ = cn.regenerate_latent(model, cn.flip_latent(noise, key), cond, cond)
    restored, _ = cn.restore_latent(model, anon, key, cond, cond)
    return rel_err(restored["samples"], latent["samples"])


def speed_ratios(models: Models, shape: tuple, steps: int, reps: int, progress, exact_single_reps: int = 1,
                 warmup_each: bool = True, check_round_trip: bool = True) -> dict:
    """Time the node operations against ComfyUI's stock routes; every run also records model time."""
    cn = pack("nodes.core_nodes")
    cond = models.cond
    key = new_key()
    timed, timer = timed_clone(models.model)
    latent = _clean_latent(models, shape)
    noise_exact, _ = cn.invert_latent(models.model, latent, steps, "normal", "exact", 1.0, cond, cond)
    keyed = cn.flip_latent(noise_exact, key)
    anonymized, _ = cn.regenerate_latent(models.model, keyed, cond, cond)
    euler = _euler()
    last = {}

    def keep(name, fn):
        def run():
            last[name] = fn()
        return run

    runs = {
        "ksampler": keep("ksampler", lambda: _ksampler(timed, cond, steps, keyed)),
        "regenerate": keep("regenerate", lambda: cn.regenerate_latent(timed, keyed, cond, cond, euler, "normal",
                                                                       steps, 1.0)[0]),
        "restore": keep("restore", lambda: cn.restore_latent(timed, anonymized, key, cond, cond)),
        "stock_unsample": keep("stock_unsample", lambda: _stock_unsample(timed, cond, steps, latent)),
        "invert_plain": keep("invert_plain", lambda: cn.invert_latent(timed, latent, steps, "normal", "plain", 1.0, cond, cond)[0]),
        "invert_exact": keep("invert_exact", lambda: cn.invert_latent(timed, latent, steps, "normal", "exact", 1.0, cond, cond)[0]),
    }
    if not warmup_each:
        # Large models: one shared warm-up run (first-call allocations) instead of one per variant.
        runs["ksampler"]()
    timings = compare(runs, reps, timer, progress, warmup=warmup_each)
    if exact_single_reps:
        runs_single = {"invert_exact_single": keep("invert_exact_single", lambda: cn.invert_latent(
            timed, latent, steps, "normal", "exact_single", 1.0, cond, cond)[0])}
        timings.update(compare(runs_single, exact_single_reps, timer, progress, warmup=False))

    model = models.model
    round_trip = {}
    if check_round_trip:
        # What each inversion method gives back through the v2 restore (unscramble + retrace of its own noise).
        for method in ("exact", "exact_single", "plain"):
            round_trip[f"{method} (Invert to Noise -> Key Flip -> Regenerate -> Restore)"] = _round_trip(
                cn, model, cond, latent, steps, method, key)
        round_trip["stock (FlipSigmas+SamplerCustom -> KSampler euler)"] = rel_err(
            _ksampler(model, cond, steps, last["stock_unsample"])["samples"], latent["samples"])
    # Regenerate (euler) and KSampler (euler) start from the same keyed noise and run the same sampler.
    same_output = rel_err(last["regenerate"]["samples"], last["ksampler"]["samples"])
    restore_out, restore_stats = last["restore"]
    restore_exact = bool(torch.equal(restore_out["samples"], latent["samples"]))

    # KeyFace's fixed per-operation costs that KSampler does not have.
    import time as _time
    adapter = pack("nodes.model_adapter")
    start = _time.perf_counter()
    for _ in range(3):
        adapter.model_identity(model)
    identity_s = (_time.perf_counter() - start) / 3
    start = _time.perf_counter()
    for _ in range(3):
        cn._conditioning_id(cond, cond)  # core_nodes re-exports conditioning.conditioning_id
    cond_id_s = (_time.perf_counter() - start) / 3
    t = {k: v.as_dict() for k, v in timings.items()}
    med = {k: v.median for k, v in timings.items()}
    pairs = {
        "regenerate / ksampler": ("regenerate", "ksampler"),
        "restore / ksampler": ("restore", "ksampler"),
        "invert_plain / stock_unsample": ("invert_plain", "stock_unsample"),
        "invert_exact / invert_plain": ("invert_exact", "invert_plain"),
        "invert_exact_single / invert_plain": ("invert_exact_single", "invert_plain"),
    }
    ratios = {name: med[a] / med[b] for name, (a, b) in pairs.items() if a in med and b in med}
    # Per-round ratios (the variants run round-robin, so each round's pair shares the machine's load).
    spread = {name: [wa / wb for wa, wb in zip(timings[a].wall, timings[b].wall)]
              for name, (a, b) in pairs.items() if a in timings and b in timings and len(timings[a].wall) == len(timings[b].wall)}
    # Non-model seconds per run (median), and the ratios again with the model-call jitter pooled out:
    # every variant calls the same model on the same shapes, so each run is re-estimated as
    # calls x (median seconds per model call over all runs) + its own median non-model seconds.
    non_model = {k: statistics.median(w - m for w, m in zip(v.wall, v.model)) for k, v in timings.items()}
    per_call = statistics.median(m / c for v in timings.values() for m, c in zip(v.model, v.calls) if c)
    est = {k: timings[k].calls[0] * per_call + non_model[k] for k in timings}
    pooled = {name: est[a] / est[b] for name, (a, b) in pairs.items() if a in est and b in est}
    return {"model": models.name, "latent_shape": list(shape), "steps": steps, "reps": reps, "timings": t,
            "ratios": ratios, "ratios_per_round": spread, "ratios_pooled": pooled, "model_s_per_call": per_call,
            "non_model_s": non_model, "round_trip_rel_err": round_trip,
            "regenerate_vs_ksampler_rel_diff": same_output,
            "restore_calls": restore_stats["model_calls"], "restore_exact": restore_exact,
            "restore_verification": restore_stats["verification"].message(),
            "fixed_costs_s": {"model_identity": identity_s, "conditioning_id": cond_id_s}}


def core_overhead(models: Models, shape: tuple, steps: int, reps: int, progress) -> dict:
    """Share of wall time outside the denoiser in the pure core (no ComfyUI), per method and direction."""
    import time
    core = pack("keyface_core.sampling")
    import comfy.samplers
    base = models.model.model
    context = models.cond[0][0]
    state = {"t": 0.0}

    def denoise(x, sigma):
        start = time.perf_counter()
        with torch.no_grad():
            out = base.apply_model(x.to(torch.float32), sigma.to(torch.float32).reshape(1).expand(x.shape[0]),
                                   c_crossattn=context.expand(x.shape[0], -1, -1))
        state["t"] += time.perf_counter() - start
        return out

    latent = _clean_latent(models, shape)["samples"] * float(base.latent_format.scale_factor)
    sigmas = comfy.samplers.calculate_sigmas(models.model.get_model_object("model_sampling"), "normal", steps).cpu()
    out = {}
    for method in ("plain", "exact", "exact_single"):
        noise = core.invert(denoise, core.LatentState(latent), sigmas, method)
        walls, models_t = [], []
        for direction in ("invert", "regenerate"):
            walls, models_t = [], []
            for _ in range(reps if method != "exact_single" or direction == "regenerate" else 1):
                state["t"] = 0.0
                start = time.perf_counter()
                if direction == "invert":
                    core.invert(denoise, core.LatentState(latent), sigmas, method)
                else:
                    core.regenerate(denoise, noise, sigmas, method)
                walls.append(time.perf_counter() - start)
                models_t.append(state["t"])
                progress.update(1)
            shares = sorted((w - m) / w for w, m in zip(walls, models_t))
            out[f"{direction} {method}"] = {"overhead_share": shares[len(shares) // 2], "wall_s": walls}
    return out


def batch_vs_single(models: Models, n: int, shape: tuple, steps: int, reps: int, progress, warmup: bool = True) -> dict:
    """Anonymize N faces as one batch vs N single runs (exact method, one face mask each)."""
    cn = pack("nodes.core_nodes")
    cond = models.cond
    key = new_key()
    timed, timer = timed_clone(models.model)
    _, c, h, w = shape
    gen = torch.Generator().manual_seed(1)
    scale = float(models.model.model.latent_format.scale_factor)
    samples = torch.randn((n, c, h, w), generator=gen) / scale
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    masks = torch.stack([((xx - 0.1 * (i % 3 - 1)) ** 2 / 0.45 + (yy ** 2) / 0.6 <= 1).float() for i in range(n)])

    def anonymize(lat, mask):
        noise, _ = cn.invert_latent(timed, lat, steps, "normal", "exact", 1.0, cond, cond, mask=mask)
        return cn.regenerate_latent(timed, cn.flip_latent(noise, key), cond, cond)[0]

    runs = {
        "batch": lambda: anonymize({"samples": samples}, masks),
        "singles": lambda: [anonymize({"samples": samples[i:i + 1]}, masks[i:i + 1]) for i in range(n)],
    }
    timings = compare(runs, reps, timer, progress, warmup=warmup)
    return {"model": models.name, "n": n, "latent_shape": [n, c, h, w], "steps": steps, "reps": reps,
            "timings": {k: v.as_dict() for k, v in timings.items()},
            "ratio batch / singles": timings["batch"].median / timings["singles"].median,
            "per_face_s": {"batch": timings["batch"].median / n, "single": timings["singles"].median / n}}
