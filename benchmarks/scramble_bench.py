"""Format v2 on the analytic model: scramble (pairswap vs signflip), the new face drawn by ComfyUI's own samplers,
restore by retrace, render cfg, and the magnitude attack. One run, side by side.

The data is the analytic benchmark's Gaussian mixture (benchmarks/kfbench/analytic.py: K identities in a 4×16×16
latent, the exact posterior-mean denoiser). Everything goes through the core protocol exactly as the nodes call it
(``keyface_core.protocol``: invert → lock → [any sampler] → unlock → retrace):

1. quality: exact leapfrog inversion (float64), ``lock`` with each scramble, then the new face drawn from the keyed
   noise by ComfyUI's k-diffusion samplers (``comfy.k_diffusion.sampling.sample_euler / sample_dpmpp_2m /
   sample_heun``, ``comfy.extra_samplers.uni_pc.sample_unipc``) with ComfyUI's inpaint semantics (REFERENCE §5:
   the first state inside the mask is the keyed noise, outside it is background + σ·public noise, held so at every
   call, and the denoised output outside replaced by the background). Whitened distance to the nearest identity
   (true samples: 1.00; below 1 = over-smoothed) for the whole latent regenerated and for the face ellipse only.
   Beside it the v1 draw (the leapfrog itself) and Restore (``unlock`` + ``retrace``: calls and error).
2. the same draws through ComfyUI's actual sampler object (``comfy.samplers.ksampler(name)`` /
   ``sampler_object("uni_pc")``, i.e. ``KSAMPLER.sample`` with ``denoise_mask`` / ``latent_image`` and the noise from
   ``protocol.sampler_start_noise``) over the analytic denoiser wrapped as a ComfyUI model: difference to (1).
3. render cfg: the mixture has an exact conditional denoiser (identity c known: that component's posterior mean), so
   ComfyUI's cfg rule D = D_u + w(D_c − D_u) is measurable; the "prompt" asks for another identity than the original.
4. the magnitude attack (issue 10 item 7): an attacker who holds the model learns each identity's mean noise and
   spread (inverting 2,048–4,096 samples of their own), then reads a file's stored keyed noise inside the mask and
   picks the most likely identity: position-wise folded-Gaussian likelihood on |z| (what a sign flip leaves), a
   position-free likelihood (what survives any permutation inside the mask), and, as the upper reference, the full
   unscrambled z_T. Accuracy with Wilson 95 % intervals and a one-sided binomial test against chance.

    .venv/bin/python benchmarks/scramble_bench.py [--samples 64] [--trials 4096] [--quick]
Writes benchmarks/results/scramble.md and scramble.json. Needs ComfyUI's sources (scripts/setup_env.sh); no model
weights, no GPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
for path in (HERE, HERE.parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kfbench import analytic as A  # noqa: E402
from keyface_core import protocol, sampling  # noqa: E402
from keyface_core.keys import SecretKey  # noqa: E402
from keyface_core.scramble import SCRAMBLES  # noqa: E402

F64, F32 = torch.float64, torch.float32
SAMPLERS = ("euler", "dpmpp_2m", "heun", "uni_pc")
# (row label, sampler, node schedule): ComfyUI's KSampler node runs uni_pc on steps+1 sigmas with the penultimate
# one dropped (DISCARD_PENULTIMATE_SIGMA_SAMPLERS); SamplerCustomAdvanced passes the schedule as given.
UNI_PC_NODE = "uni_pc (KSampler-node schedule)"
DRAWS = tuple((name, name, False) for name in SAMPLERS) + ((UNI_PC_NODE, "uni_pc", True),)
GRIDS = (("normal", 10), ("normal", 20), ("normal", 30), ("karras", 30))
DEFAULT = ("dpmpp_2m", "normal", 20)


# ----------------------------------------------------------------------------------------------
# ComfyUI (sources only: no server, no nodes, no pack)
# ----------------------------------------------------------------------------------------------

@dataclass
class Comfy:
    samplers: object
    ksampling: object
    uni_pc: object
    model_sampling: object


def load_comfy() -> Comfy:
    from keyface_dev.comfy_host import comfy_dir
    root = str(comfy_dir())
    if root not in sys.path:
        sys.path.insert(0, root)
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import comfy.k_diffusion.sampling as ksampling
    import comfy.model_sampling
    import comfy.samplers
    from comfy.extra_samplers import uni_pc
    return Comfy(comfy.samplers, ksampling, uni_pc, comfy.model_sampling)


class Counted:
    """A denoiser that counts its calls (batched calls count once, as one UNet forward would)."""

    def __init__(self, denoise):
        self.denoise, self.calls = denoise, 0

    def __call__(self, x, sigma):
        self.calls += 1
        s = sigma.reshape(-1)[0] if torch.is_tensor(sigma) and sigma.dim() else sigma
        return self.denoise(x, s)


class ComfyAnalyticModel:
    """The analytic denoiser dressed as what ``KSAMPLER.sample`` gets (a CFGGuider-like model_wrap): ``inner_model``
    carries SD1.5's eps model sampling and BaseModel's ``scale_latent_inpaint``; calling it returns x0."""

    def __init__(self, comfy: Comfy, denoise):
        class Sampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
            pass

        class Inner:
            model_sampling = Sampling()

            def scale_latent_inpaint(self, sigma, noise, latent_image, **kwargs):   # = comfy.model_base.BaseModel's
                return self.model_sampling.noise_scaling(sigma.reshape([sigma.shape[0]] + [1] * (len(noise.shape) - 1)),
                                                         noise, latent_image)
        self.inner_model = Inner()
        self.denoise = denoise

    def __call__(self, x, sigma, model_options=None, seed=None, **_):
        return self.denoise(x, sigma)


def sampler_function(comfy: Comfy, name: str):
    return comfy.uni_pc.sample_unipc if name == "uni_pc" else getattr(comfy.ksampling, f"sample_{name}")


def draw_by_hand(comfy: Comfy, name: str, denoise, keyed_x: torch.Tensor, faces: protocol.FaceBatch,
                 sigmas: torch.Tensor) -> torch.Tensor:
    """A stock k-diffusion sampler called directly, with the inpaint semantics written out (float32, as ComfyUI)."""
    bg = protocol.make_background(faces, dtype=F32)
    sigmas = sigmas.to(F32).clone()   # uni_pc writes 0.001 into sigmas[-1] in place (comfy 0.3.75, `sigmas[:]`)

    def model(x, sigma, **_):
        s = sigma.reshape(-1)[0]
        held = x if bg is None else bg.hold(x, s)
        out = denoise(held, s)
        return out if bg is None else torch.where(bg.mask >= 0.5, out, bg.latent)
    x = keyed_x.to(F32)
    start = x if bg is None else bg.hold(x, sigmas[0])
    return sampler_function(comfy, name)(model, start, sigmas, extra_args={}, disable=True)


def draw_by_ksampler(comfy: Comfy, name: str, denoise, keyed_x: torch.Tensor, faces: protocol.FaceBatch,
                     sigmas: torch.Tensor) -> torch.Tensor:
    """ComfyUI's own path: its sampler object's ``KSAMPLER.sample`` with denoise_mask / latent_image and the noise
    ``protocol.sampler_start_noise`` gives (what Regenerate hands SamplerCustomAdvanced's machinery)."""
    sampler = comfy.samplers.sampler_object(name)
    wrap = ComfyAnalyticModel(comfy, lambda x, s: denoise(x, s.reshape(-1)[0]))
    sigmas = sigmas.to(F32).clone()   # see draw_by_hand
    max_denoise = sampler.max_denoise(wrap, sigmas)
    noise, latent = protocol.sampler_start_noise(keyed_x, faces, float(sigmas[0]), flow=False, max_denoise=max_denoise)
    latent = torch.zeros_like(noise) if latent is None else latent
    mask = None if faces.mask is None else faces.mask.to(F32)
    return sampler.sample(wrap, sigmas, {"model_options": {}, "seed": 0}, None, noise.to(F32), latent.to(F32),
                          mask, True)


# ----------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------

def bench_key(name: str) -> SecretKey:
    return SecretKey(hashlib.sha256(b"keyface-bench/scramble/" + name.encode()).digest(), kind="key",
                     source=f"scramble benchmark ({name})")


def nonces(count: int, tag: str) -> tuple:
    return tuple(hashlib.sha256(f"keyface-bench/scramble/{tag}/{i}".encode()).digest()[:16] for i in range(count))


def face_batch(x0: torch.Tensor, mask: torch.Tensor | None, tag: str) -> protocol.FaceBatch:
    n = x0.shape[0]
    return protocol.FaceBatch(nonces(n, tag), (0,) * n, mask, protocol.public_background(x0, mask))


def whitened(gmm: A.GaussianMixture, x: torch.Tensor) -> dict:
    m = gmm.metrics(x.to(F64))
    return {"whitened_dist": float(m["whitened_dist"].mean()), "nearest": m["nearest"]}


# ----------------------------------------------------------------------------------------------
# 1 + 2: quality of the new face, restore, ComfyUI's own path
# ----------------------------------------------------------------------------------------------

def quality(comfy: Comfy, gmm: A.GaussianMixture, n: int, grids=GRIDS, seed: int = 20, log=print) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.arange(n) % gmm.k
    # float32 values, as a VAE's LATENT is: then a retrace within ~1e-14 of them rounds back to them exactly
    x0 = gmm.sample(ids, gen).to(F32).to(F64)
    ellipse = A.face_ellipse(gmm.shape)
    key = bench_key("right")
    rows = []
    for masked in (False, True):
        mask = ellipse.expand(n, 1, *gmm.shape[-2:]).clone() if masked else None
        faces = face_batch(x0, mask, "quality")
        for schedule, steps in grids:
            sigmas = A.SCHEDULES[schedule](steps)
            inv = sampling.Stats()
            noise = protocol.invert(gmm.denoise, x0, sigmas, faces, method="exact", stats=inv)
            for scramble in SCRAMBLES:
                keyed = protocol.lock(noise, x0, faces, key, method_scramble=scramble)
                base = {"masked": masked, "schedule": schedule, "steps": steps, "scramble": scramble}
                # v1's draw: the leapfrog itself from the keyed noise, residual sealed away (zero)
                v1 = sampling.regenerate(gmm.denoise, sampling.NoiseState(keyed.x, torch.zeros_like(noise.residual)),
                                         sigmas, "exact", background=protocol.make_background(faces)).x
                # restore: unlock + retrace, never touching the anonymized latent
                ret = sampling.Stats()
                back = protocol.retrace(gmm.denoise, protocol.unlock(keyed, key), sigmas, faces, stats=ret)
                restore = {"restore_calls": ret.model_calls, "restore_rel_err": A.rel_err(back, x0),
                           "restore_float32_equal": bool(torch.equal(back.to(F32), x0.to(F32))),
                           "invert_calls": inv.model_calls}
                rows.append({**base, "sampler": "leapfrog (v1)", **whitened(gmm, v1), "calls": steps, **restore})
                for label, name, node_schedule in DRAWS:
                    draw_sigmas = sigmas
                    if node_schedule:
                        longer = A.SCHEDULES[schedule](steps + 1)
                        draw_sigmas = torch.cat([longer[:-2], longer[-1:]])
                    counted = Counted(gmm.denoise)
                    t0 = time.perf_counter()
                    hand = draw_by_hand(comfy, name, counted, keyed.x, faces, draw_sigmas)
                    seconds = time.perf_counter() - t0
                    calls = counted.calls
                    via = draw_by_ksampler(comfy, name, gmm.denoise, keyed.x, faces, draw_sigmas)
                    w_hand, w_via = whitened(gmm, hand), whitened(gmm, via)
                    rows.append({**base, "sampler": label, **w_hand, "calls": calls, "seconds": seconds,
                                 "ksampler_whitened_dist": w_via["whitened_dist"],
                                 "ksampler_max_abs_diff": float((via.to(F64) - hand.to(F64)).abs().max()),
                                 "ksampler_rel_diff": A.rel_err(via, hand),
                                 "ksampler_same_nearest": float((w_via["nearest"] == w_hand["nearest"]).double().mean()),
                                 "identity_changed": float((w_hand["nearest"] != ids).double().mean()),
                                 "outside_max_abs_change": None if mask is None else
                                 float(((hand.to(F64) - x0) * (1 - mask.to(F64))).abs().max()), **restore})
            log(f"quality: {'mask' if masked else 'whole'} {schedule} {steps} done")
    for row in rows:
        row.pop("nearest", None)
    true = whitened(gmm, x0)["whitened_dist"]
    return {"samples": n, "true_samples_whitened_dist": true, "mask_fraction": float(ellipse.mean()), "rows": rows}


# ----------------------------------------------------------------------------------------------
# 3: render cfg (exact conditional denoiser of the mixture)
# ----------------------------------------------------------------------------------------------

def conditional_denoiser(gmm: A.GaussianMixture, classes: torch.Tensor):
    """E[x0 | x, identity c] per batch item: the posterior mean of that one component (reuses the mixture code)."""
    singles = {int(c): A.GaussianMixture(gmm.means[int(c):int(c) + 1], gmm.basis, gmm.extra_var, gmm.iso_var, gmm.shape)
               for c in classes.unique()}

    def denoise(x, sigma):
        out = torch.empty_like(x)
        for c, single in singles.items():
            sel = classes == c
            out[sel] = single.denoise(x[sel], sigma)
        return out
    return denoise


def cfg_effect(comfy: Comfy, gmm: A.GaussianMixture, n: int, cfgs=(1.0, 2.0, 4.0, 7.0), seed: int = 21) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.arange(n) % gmm.k
    x0 = gmm.sample(ids, gen)
    target = (ids + 1) % gmm.k          # the "prompt": another identity than the original
    cond = conditional_denoiser(gmm, target)
    sampler, schedule, steps = DEFAULT
    sigmas = A.SCHEDULES[schedule](steps)
    key = bench_key("right")
    rows = []
    for masked in (False, True):
        mask = A.face_ellipse(gmm.shape).expand(n, 1, *gmm.shape[-2:]).clone() if masked else None
        faces = face_batch(x0, mask, "cfg")
        noise = protocol.invert(gmm.denoise, x0, sigmas, faces, method="exact")   # inversion: unconditional, cfg 1
        keyed = protocol.lock(noise, x0, faces, key)
        for w in (None, *cfgs):
            if w is None:
                denoise = gmm.denoise
            else:
                def denoise(x, s, w=w):
                    u = gmm.denoise(x, s)
                    return u + (cond(x, s) - u) * w      # comfy.samplers.cfg_function: uncond + (cond - uncond)·cfg
            out = draw_by_hand(comfy, sampler, denoise, keyed.x, faces, sigmas)
            m = gmm.metrics(out.to(F64))
            rows.append({"masked": masked, "cfg": w, "whitened_dist": float(m["whitened_dist"].mean()),
                         "lands_on_prompted": float((m["nearest"] == target).double().mean()),
                         "keeps_original": float((m["nearest"] == ids).double().mean()),
                         "unambiguous": float((m["max_resp"] > 0.99).double().mean())})
    return {"samples": n, "sampler": sampler, "schedule": schedule, "steps": steps, "rows": rows}


# ----------------------------------------------------------------------------------------------
# 4: the magnitude attack
# ----------------------------------------------------------------------------------------------

def wilson(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return centre - half, centre + half


def _log_folded(y: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """log density of |N(m, s²)| at y ≥ 0 (elementwise; broadcast)."""
    a, b = -0.5 * ((y - m) / s) ** 2, -0.5 * ((y + m) / s) ** 2
    return torch.logaddexp(a, b) - torch.log(s) - 0.5 * math.log(2 * math.pi)


def attack(comfy: Comfy, gmm: A.GaussianMixture, train_per: int, trials: int, masked: bool = True, steps: int = 20,
           seed: int = 30, log=print) -> dict:
    """Identify the original identity from a file's stored keyed noise inside the mask (masked) or anywhere (whole
    latent regenerated: the scramble covers everything)."""
    sigmas = A.normal_sigmas(steps)
    shape = gmm.shape
    mask_cells = A.face_ellipse(shape) if masked else torch.ones(1, 1, *shape[-2:], dtype=F64)
    inside = (mask_cells[0] >= 0.5).expand(shape).reshape(-1)

    def invert(x0, tag):
        mask = mask_cells.expand(x0.shape[0], 1, *shape[-2:]).clone() if masked else None
        faces = face_batch(x0, mask, tag)
        return protocol.invert(gmm.denoise, x0, sigmas, faces, method="exact"), faces

    gen = torch.Generator().manual_seed(seed)
    train_ids = torch.arange(gmm.k * train_per) % gmm.k
    z_train = invert(gmm.sample(train_ids, gen), "attack-train")[0].x.reshape(len(train_ids), -1)[:, inside]
    means = torch.stack([z_train[train_ids == k].mean(0) for k in range(gmm.k)])          # [K, n_in]
    spread = (z_train - means[train_ids]).pow(2).mean(0).sqrt()                           # [n_in], pooled
    test_ids = torch.randint(0, gmm.k, (trials,), generator=gen)
    x_test = gmm.sample(test_ids, gen)
    noise, faces = invert(x_test, "attack-test")
    z_full = noise.x.reshape(trials, -1)[:, inside]
    # position-free reference density per identity: the folded law averaged over inside positions, on a grid
    grid = torch.linspace(0, float(z_full.abs().max()) * 1.05 + 1e-9, 4001, dtype=F64)
    pooled = torch.stack([_log_folded(grid[:, None], means[k][None], spread[None]).exp().mean(1) for k in range(gmm.k)])

    def folded_guess(y):        # y = |stored| at the inside positions: [T, n_in]
        ll = torch.stack([_log_folded(y, means[k], spread).sum(1) for k in range(gmm.k)], dim=1)
        return ll.argmax(1)

    def free_guess(y):
        idx = torch.bucketize(y, grid).clamp(1, len(grid) - 1)
        ll = torch.stack([torch.log(pooled[k][idx].clamp_min(1e-300)).sum(1) for k in range(gmm.k)], dim=1)
        return ll.argmax(1)

    def full_guess(z):
        ll = torch.stack([(-0.5 * ((z - means[k]) / spread) ** 2).sum(1) for k in range(gmm.k)], dim=1)
        return ll.argmax(1)

    def score(guess) -> dict:
        hits = int((guess == test_ids).sum())
        lo, hi = wilson(hits, trials)
        from scipy.stats import binomtest
        p = binomtest(hits, trials, 1.0 / gmm.k, alternative="greater").pvalue
        return {"accuracy": hits / trials, "ci95": [lo, hi], "hits": hits, "p_above_chance": float(p)}

    key = bench_key("attack")
    def draw_guess(stored):
        """The attacker runs the public model on the stored noise (default sampler, background held)."""
        drawn = draw_by_hand(comfy, DEFAULT[0], gmm.denoise, stored, faces, sigmas)
        return gmm.metrics(drawn.to(F64))["nearest"]

    out = {"k": gmm.k, "masked": masked, "chance": 1.0 / gmm.k, "trials": trials, "train_samples": int(len(train_ids)),
           "inside_elements": int(inside.sum()), "steps": steps,
           "unscrambled_full_z": score(full_guess(z_full)),
           "unscrambled_folded": score(folded_guess(z_full.abs())),
           "unscrambled_model_draw": score(draw_guess(noise.x)), "scrambles": {}}
    for scramble in SCRAMBLES:
        t0 = time.perf_counter()
        stored = protocol.lock(noise, x_test, faces, key, method_scramble=scramble).x
        seconds = time.perf_counter() - t0
        keyed = stored.reshape(trials, -1)[:, inside]
        out["scrambles"][scramble] = {"folded": score(folded_guess(keyed.abs())), "position_free": score(free_guess(keyed.abs())),
                                      "full_z_attacker_on_stored": score(full_guess(keyed)),
                                      "model_draw": score(draw_guess(stored)),
                                      "lock_seconds_per_item": seconds / trials}
    log(f"attack K={gmm.k} {'mask' if masked else 'whole'}: done")
    return out


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

def _f(v, d=3):
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float) and (abs(v) < 1e-3 and v != 0):
        return f"{v:.1e}"
    return f"{v:.{d}f}" if isinstance(v, float) else str(v)


def _pct(s: dict) -> str:
    lo, hi = s["ci95"]
    return f"{100 * s['accuracy']:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}]"


def report(res: dict) -> str:
    q = res["quality"]
    lines = ["# Format v2 on the analytic model: scramble, any-sampler draw, restore, cfg, magnitude attack", "",
             f"`benchmarks/scramble_bench.py`, {res['seconds']:.0f} s on {res['machine']}; torch {res['torch']}, "
             f"commit {res['commit']}. Gaussian mixture (K = {res['k']}, 4×16×16, exact posterior-mean denoiser), "
             f"{q['samples']} samples; face ellipse = {100 * q['mask_fraction']:.0f} % of the cells. "
             "Inversion: exact leapfrog, float64. True samples score "
             f"{q['true_samples_whitened_dist']:.3f}.", "",
             "## 1. Whitened distance of the new face (true samples 1.00; whole latent / mask)", "",
             "Drawn from the keyed noise by ComfyUI's k-diffusion sampler functions, called by hand with the inpaint "
             "semantics of REFERENCE §5; *whole* = the whole latent regenerated, *mask* = only the face ellipse "
             "(background held). Same numbers for both scrambles to the digits shown unless two are given "
             "(pairswap / signflip).", ""]
    grid_list = [tuple(g) for g in res["grids"]]
    grids = [f"{s} {n}" for s, n in grid_list]
    lines += ["| sampler | " + " | ".join(grids) + " | model calls (20 normal) |", "| --- |" + " --- |" * (len(grids) + 1)]

    def cell(rows, sampler, schedule, steps, scramble):
        w = [r for r in rows if r["sampler"] == sampler and r["schedule"] == schedule and r["steps"] == steps
             and r["scramble"] == scramble]
        whole = next(r for r in w if not r["masked"])["whitened_dist"]
        mask = next(r for r in w if r["masked"])["whitened_dist"]
        return whole, mask
    for sampler in ("leapfrog (v1)", *(d[0] for d in DRAWS)):
        cells = []
        for schedule, steps in grid_list:
            a = cell(q["rows"], sampler, schedule, steps, "pairswap")
            b = cell(q["rows"], sampler, schedule, steps, "signflip")
            if f"{a[0]:.3f}/{a[1]:.3f}" == f"{b[0]:.3f}/{b[1]:.3f}":
                cells.append(f"{a[0]:.3f} / {a[1]:.3f}")
            else:
                cells.append(f"{a[0]:.3f} / {a[1]:.3f} (sf {b[0]:.3f} / {b[1]:.3f})")
        calls = next(r["calls"] for r in q["rows"] if r["sampler"] == sampler and r["steps"] == 20 and r["schedule"] == "normal")
        lines.append(f"| {sampler} | " + " | ".join(cells) + f" | {calls} |")
    d = [r for r in q["rows"] if (r["sampler"], r["schedule"], r["steps"]) == DEFAULT and r["scramble"] == "pairswap"]
    dw, dm = next(r for r in d if not r["masked"]), next(r for r in d if r["masked"])
    ok_whole, ok_mask = abs(dw["whitened_dist"] - 1.0) <= 0.05, dm["whitened_dist"] <= 1.30
    lines += ["", f"Target (default dpmpp_2m, 20 normal, pairswap): whole within 0.05 of 1.00 → {dw['whitened_dist']:.3f} "
              f"({'met' if ok_whole else 'NOT met'}); mask ≤ 1.30 → {dm['whitened_dist']:.3f} "
              f"({'met' if ok_mask else 'NOT met'}). Outside the mask the new face differs from the original by at most "
              f"{max(r['outside_max_abs_change'] for r in q['rows'] if r['masked'] and r.get('outside_max_abs_change') is not None):.1e} "
              "(float32 draw).", ""]
    lines += ["### Restore (unlock + retrace) at every row", "",
              "| grid | restore calls | inversion calls | worst relative error (float64) | equal to the original in float32 |",
              "| --- | --- | --- | --- | --- |"]
    for schedule, steps in grid_list:
        rs = [r for r in q["rows"] if r["schedule"] == schedule and r["steps"] == steps]
        lines.append(f"| {schedule} {steps} | {sorted({r['restore_calls'] for r in rs})} | "
                     f"{sorted({r['invert_calls'] for r in rs})} | {max(r['restore_rel_err'] for r in rs):.1e} | "
                     f"{'all' if all(r['restore_float32_equal'] for r in rs) else 'NOT all'} |")
    lines += ["", "## 2. The same draws through ComfyUI's own KSAMPLER path", "",
              "`comfy.samplers.sampler_object(name).sample(model_wrap, sigmas, …, noise, latent_image, denoise_mask)` over "
              "the analytic denoiser wrapped as a ComfyUI model (eps model sampling of SD1.5, BaseModel's "
              "`scale_latent_inpaint`), noise and latent_image from `protocol.sampler_start_noise` (max_denoise as "
              "KSAMPLER decides it). Against the hand-driven call, over every grid and both scrambles:", "",
              "| sampler | worst max abs difference | worst relative difference | worst whitened-distance difference | same nearest identity |",
              "| --- | --- | --- | --- | --- |"]
    for sampler in (d[0] for d in DRAWS):
        rs = [r for r in q["rows"] if r["sampler"] == sampler]
        lines.append(f"| {sampler} | {max(r['ksampler_max_abs_diff'] for r in rs):.1e} | {max(r['ksampler_rel_diff'] for r in rs):.1e} | "
                     f"{max(abs(r['ksampler_whitened_dist'] - r['whitened_dist']) for r in rs):.1e} | "
                     f"{100 * min(r['ksampler_same_nearest'] for r in rs):.0f} % |")
    c = res["cfg"]
    lines += ["", f"## 3. Render cfg ({c['sampler']}, {c['steps']} {c['schedule']}, pairswap; inversion at cfg 1, unconditional)", "",
              "The mixture's exact conditional denoiser (the posterior mean given identity c) plays the prompt; the "
              "prompt asks for another identity than the original (c = original + 1 mod K); cfg as ComfyUI's "
              "`cfg_function`: D = D_u + cfg·(D_c − D_u). *uncond* = no prompt (v2's default draw).", "",
              "| cfg | whole: whitened dist | lands on prompted identity | keeps original | mask: whitened dist | lands on prompted | keeps original |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for w in sorted({r["cfg"] for r in c["rows"]}, key=lambda v: -1 if v is None else v):
        a = next(r for r in c["rows"] if r["cfg"] == w and not r["masked"])
        b = next(r for r in c["rows"] if r["cfg"] == w and r["masked"])
        lines.append(f"| {'uncond' if w is None else f'{w:g}'} | {a['whitened_dist']:.3f} | {100 * a['lands_on_prompted']:.0f} % | "
                     f"{100 * a['keeps_original']:.0f} % | {b['whitened_dist']:.3f} | {100 * b['lands_on_prompted']:.0f} % | "
                     f"{100 * b['keeps_original']:.0f} % |")
    lines += ["", "## 4. Magnitude attack: which identity does a file's stored noise come from?", "",
              "The attacker holds the model, inverts their own samples of every identity (20 normal steps, exact) to learn "
              "each identity's mean noise m_k and the pooled spread s per position inside the mask, then scores a stored "
              "keyed noise y (inside the mask only; outside it is public background + public noise): *folded* = "
              "Σ_i log fold-N(|y_i|; m_k,i, s_i) (what a sign flip leaves readable), *position-free* = Σ_j log mean_i "
              "fold-N(|y_j|; m_k,i, s_i) (uses only the multiset of magnitudes, which any scramble inside the mask keeps), "
              "*full z* = Gaussian likelihood of the signed values. Accuracy [Wilson 95 %]; p = one-sided binomial test "
              "against chance.", "",
              "| region | K (chance) | trials | unscrambled z_T, full | unscrambled, folded | signflip: folded | signflip: position-free | pairswap: folded | pairswap: position-free | pairswap: full-z attacker |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for a in res["attack"]:
        sf, ps = a["scrambles"]["signflip"], a["scrambles"]["pairswap"]
        lines.append(f"| {'mask' if a['masked'] else 'whole'} ({a['inside_elements']} values) | {a['k']} ({100 * a['chance']:.1f} %) | {a['trials']} | {_pct(a['unscrambled_full_z'])} | "
                     f"{_pct(a['unscrambled_folded'])} | {_pct(sf['folded'])} | {_pct(sf['position_free'])} | "
                     f"{_pct(ps['folded'])} | {_pct(ps['position_free'])} | {_pct(ps['full_z_attacker_on_stored'])} |")
    lines += ["", "*model draw* = the attacker runs the public model (dpmpp_2m, 20 normal, background held) on what the file "
              "stores and takes the nearest identity of the result: on an unscrambled z_T that is the original; on a "
              "scrambled one it is the anonymized face.", "",
              "| region | K | model draw: unscrambled z_T | model draw: signflip | model draw: pairswap |", "| --- | --- | --- | --- | --- |"]
    for a in res["attack"]:
        sf, ps = a["scrambles"]["signflip"], a["scrambles"]["pairswap"]
        lines.append(f"| {'mask' if a['masked'] else 'whole'} | {a['k']} | {_pct(a['unscrambled_model_draw'])} | "
                     f"{_pct(sf['model_draw'])} | {_pct(ps['model_draw'])} |")
    lines += ["", "| region | K | signflip folded: p vs chance | pairswap folded: p vs chance | position-free (both): p | lock cost per item (pairswap / signflip) |",
              "| --- | --- | --- | --- | --- | --- |"]
    for a in res["attack"]:
        sf, ps = a["scrambles"]["signflip"], a["scrambles"]["pairswap"]
        lines.append(f"| {'mask' if a['masked'] else 'whole'} | {a['k']} | {sf['folded']['p_above_chance']:.1e} | {ps['folded']['p_above_chance']:.2f} | "
                     f"{sf['position_free']['p_above_chance']:.2g} / {ps['position_free']['p_above_chance']:.2g} | "
                     f"{1e3 * ps['lock_seconds_per_item']:.1f} ms / {1e3 * sf['lock_seconds_per_item']:.1f} ms |")
    lines += ["", "Reading: the position-wise magnitude attack works on the sign flip and falls to chance under pairswap. "
              "The position-free column is what no scramble inside the mask can remove (the multiset of values stays); "
              "it is the same for both by construction and shows how much identity the magnitudes carry without their "
              "positions. Raw numbers: `scramble.json`.", ""]
    return "\n".join(lines)


def _shown(path: Path) -> str:
    """The output folder relative to the repo when inside it: results files carry no machine paths."""
    try:
        return str(path.resolve().relative_to(HERE.parent))
    except ValueError:
        return path.name


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=64, help="samples per quality row (default 64)")
    ap.add_argument("--trials", type=int, default=16384, help="attack trials per setting (default 16384: ±0.3 pp at K = 32)")
    ap.add_argument("--quick", action="store_true", help="fewer samples and trials, 20-step grid only (smoke run)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="output folder")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    comfy = load_comfy()
    gmm = A.GaussianMixture.faces_like(k=8)
    n, trials = (16, 512) if args.quick else (args.samples, args.trials)
    grids = (("normal", 20),) if args.quick else GRIDS
    res = {"k": gmm.k, "settings": vars(args) | {"out": _shown(args.out)}, "grids": [list(g) for g in grids]}
    res["quality"] = quality(comfy, gmm, n, grids)
    res["cfg"] = cfg_effect(comfy, gmm, n)
    gmm32 = A.GaussianMixture.faces_like(k=32)
    res["attack"] = [attack(comfy, g, per, trials, masked) for masked in (True, False) for g, per in ((gmm, 256), (gmm32, 128))]
    res["seconds"] = time.perf_counter() - t0
    import platform
    import subprocess
    res["machine"] = f"{platform.machine()} {torch.get_num_threads()} thread(s)"
    res["torch"] = torch.__version__
    try:
        res["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                       text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        res["commit"] = "unknown"
    args.out.mkdir(parents=True, exist_ok=True)
    name = "scramble_quick" if args.quick else "scramble"
    (args.out / f"{name}.json").write_text(json.dumps(res, indent=1, default=str))
    (args.out / f"{name}.md").write_text(report(res))
    print(f"wrote {args.out / name}.json ({res['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
