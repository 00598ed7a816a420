"""Analytic quality proxy: the samplers and the anonymization on data whose optimal denoiser is known.

The random-weight models of the other sections say nothing about image quality. Here the data is a
Gaussian mixture in a 4×16×16 latent space (K "identities": a shared background field, an
identity-specific field inside a central "face" ellipse, and a shared low-rank + isotropic
within-identity covariance), and the denoiser is its exact posterior mean E[x0 | x0 + σ·n = x]. A
perfect sampler then draws from the mixture itself, so sample quality (likelihood, distance to the
nearest identity, ambiguity, error against a fine ODE solution) and "did anonymization land on a
different identity" become measurable numbers. A mixture is a proxy for faces, not faces: see
benchmarks/README.md for what it does and does not tell.

Everything runs the pure core (``keyface_core.sampling``, ``flip``, ``keys``) exactly as the nodes
call it (``nodes/core_nodes.py``: ``invert_latent`` / ``flip_latent`` / ``regenerate_latent`` /
``restore_latent``; ``nodes/latent_info.background_for``), on ComfyUI's SD1.5 ``normal`` schedule
and ``karras`` schedules (recomputed here; checked against ComfyUI's own when it is loaded).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

F64 = torch.float64
SHAPE = (4, 16, 16)


def _modules():
    """(sampling, flip, keys) of keyface_core: ComfyUI's loaded copy when it is booted, else a plain import."""
    from keyface_dev import comfy_host
    if comfy_host._booted is not None:
        pk = comfy_host.pack_module
        return pk("keyface_core.sampling"), pk("keyface_core.flip"), pk("keyface_core.keys")
    from keyface_core import flip, keys, sampling
    return sampling, flip, keys


# ----------------------------------------------------------------------------------------------
# Schedule: ComfyUI's SD1.5 discrete "normal" scheduler, in k-diffusion's sigma space
# ----------------------------------------------------------------------------------------------

def sd15_sigma_table() -> torch.Tensor:
    """The 1000 training sigmas of SD1.5 (linear beta schedule 0.00085..0.012), in float64.

    ComfyUI (ModelSamplingDiscrete) keeps them as float32 and their logs as float32 of the float64 logs."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=F64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def normal_sigmas(steps: int) -> torch.Tensor:
    """ComfyUI's ``normal`` scheduler on SD1.5 (comfy.samplers.normal_scheduler): steps+1 float32 sigmas, last 0."""
    log_sigmas = sd15_sigma_table().log().float()
    timesteps = torch.linspace(len(log_sigmas) - 1, 0, steps)
    low, high = timesteps.floor().long(), timesteps.ceil().long()
    w = timesteps.frac()
    sigmas = ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def karras_sigmas(steps: int, rho: float = 7.0) -> torch.Tensor:
    """ComfyUI's ``karras`` scheduler on SD1.5 (k-diffusion get_sigmas_karras between the model's sigma_min/max)."""
    table = sd15_sigma_table().float()
    smin, smax = float(table[0]), float(table[-1])
    ramp = torch.linspace(0, 1, steps)
    sigmas = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


SCHEDULES = {"normal": normal_sigmas, "karras": karras_sigmas}


def comfy_sigmas(scheduler: str, steps: int):
    """ComfyUI's own schedule for SD1.5's model sampling, or None when ComfyUI is not loaded."""
    try:
        import comfy.model_sampling
        import comfy.samplers
    except ImportError:
        return None
    return comfy.samplers.calculate_sigmas(comfy.model_sampling.ModelSamplingDiscrete(), scheduler, steps).cpu()


# ----------------------------------------------------------------------------------------------
# The data distribution and its exact denoiser
# ----------------------------------------------------------------------------------------------

def _smooth_fields(gen: torch.Generator, count: int, shape, blur: float) -> torch.Tensor:
    """`count` smooth random fields of `shape` (Gaussian-blurred white noise, periodic), unit variance per field."""
    from scipy.ndimage import gaussian_filter
    raw = torch.randn((count, *shape), generator=gen, dtype=F64).numpy()
    smooth = gaussian_filter(raw, sigma=(0, 0, blur, blur), mode="wrap")
    smooth = torch.from_numpy(smooth)
    return smooth / smooth.reshape(count, -1).std(dim=1).reshape(count, *[1] * len(shape))


def face_ellipse(shape=SHAPE, fraction: float = 0.35) -> torch.Tensor:
    """Binary [1,1,h,w] mask of a centred upright ellipse (axes 4:5) covering about `fraction` of the grid."""
    h, w = shape[-2:]
    yy, xx = torch.meshgrid(torch.arange(h, dtype=F64) + 0.5 - h / 2, torch.arange(w, dtype=F64) + 0.5 - w / 2, indexing="ij")
    # area pi*a*b = fraction*h*w with b = 1.25 a
    a = math.sqrt(fraction * h * w / (math.pi * 1.25))
    return (((xx / a) ** 2 + (yy / (1.25 * a)) ** 2) <= 1.0).to(F64)[None, None]


@dataclass
class GaussianMixture:
    """x0 ~ (1/K) Σ_k N(μ_k, Σ), Σ = s²·I + U diag(λ) Uᵀ (U: d×r orthonormal), shared by all components.

    With x = x0 + σ·n, each component stays Gaussian with covariance Σ + σ²I, so the posterior mean is
    E[x0 | x] = m̄ + A(x − m̄), A = Σ(Σ + σ²I)⁻¹, m̄ = Σ_k w_k(x) μ_k, w = softmax of the components' log
    densities (log-sum-exp); A shrinks by s²/(s²+σ²) off U and by (λ_j+s²)/(λ_j+s²+σ²) along U.
    """

    means: torch.Tensor        # [K, d]
    basis: torch.Tensor        # U, [d, r], orthonormal columns
    extra_var: torch.Tensor    # λ, [r]
    iso_var: float             # s²
    shape: tuple = SHAPE

    @property
    def d(self) -> int:
        return self.means.shape[1]

    @property
    def k(self) -> int:
        return self.means.shape[0]

    # -- building ------------------------------------------------------------------------------
    @classmethod
    def faces_like(cls, k: int = 8, shape=SHAPE, iso_sd: float = 0.2, rank: int = 8, lowrank_var: float = 0.05,
                   face_fraction: float = 0.35, blur: float = 1.5, seed: int = 0) -> GaussianMixture:
        """K identities: a shared smooth background, an identity-specific smooth field inside a central ellipse
        (soft edge, so a little identity leaks outside the mask, as hair and ears do), unit-ish variance per
        element; within-identity variation = iso_sd² per element + `rank` smooth shared directions adding
        `lowrank_var` per element in total."""
        gen = torch.Generator().manual_seed(seed)
        d = int(np.prod(shape))
        background = _smooth_fields(gen, 1, shape, blur)[0]
        faces = _smooth_fields(gen, k, shape, blur)
        from scipy.ndimage import gaussian_filter
        weight = torch.from_numpy(gaussian_filter(face_ellipse(shape, face_fraction)[0, 0].numpy(), sigma=1.0, mode="nearest"))
        means = (background * (1 - weight) + faces * weight).reshape(k, d)
        directions = _smooth_fields(gen, rank, shape, blur).reshape(rank, d).T
        basis, _ = torch.linalg.qr(directions)
        extra = torch.full((rank,), lowrank_var * d / rank, dtype=F64)
        return cls(means, basis, extra, iso_sd ** 2, tuple(shape))

    def spec(self) -> dict:
        """What a report needs to know about the distribution."""
        maha = self.mahalanobis2(self.means.reshape(self.k, *self.shape))   # [K, K]: mean i against component j
        off = maha[~torch.eye(self.k, dtype=torch.bool)]
        within = self.iso_var + float(self.extra_var.sum()) / self.d
        mask = face_ellipse(self.shape).reshape(-1).repeat(self.shape[0]) >= 0.5 if len(self.shape) == 3 else None
        diff = self.means[:, None, :] - self.means[None]
        between_outside = float((diff[..., ~mask] ** 2).sum() / (diff ** 2).sum()) if mask is not None else None
        return {"k": self.k, "shape": list(self.shape), "d": self.d, "iso_sd": self.iso_var ** 0.5,
                "rank": int(self.basis.shape[1]), "within_sd_per_element": within ** 0.5,
                "mean_rms": float(self.means.pow(2).mean().sqrt()),
                "min_mean_distance_whitened": float(off.min().sqrt()), "median_mean_distance_whitened": float(off.median().sqrt()),
                "min_mean_distance_rms": float(torch.cdist(self.means, self.means)[~torch.eye(self.k, dtype=torch.bool)].min() / self.d ** 0.5),
                "between_identity_variance_outside_mask": between_outside}

    # -- the closed form ----------------------------------------------------------------------
    def _quad(self, flat: torch.Tensor, sigma: float) -> torch.Tensor:
        """[B, K] (x − μ_k)ᵀ (Σ + σ²I)⁻¹ (x − μ_k)."""
        # Expanded (‖x‖² − 2 x·μ + ‖μ‖²) instead of forming x − μ_k for every k: 5× faster, and in float64
        # the cancellation costs < 1e-11 in the logits even at σ_max.
        iso = self.iso_var + sigma ** 2
        sq = (flat * flat).sum(1, keepdim=True) - 2 * flat @ self.means.T + (self.means * self.means).sum(1)
        c = (flat @ self.basis)[:, None, :] - (self.means @ self.basis)[None]
        return (sq - (c * c).sum(-1)) / iso + (c * c / (self.extra_var + iso)).sum(-1)

    def _logdet(self, sigma: float) -> float:
        iso = self.iso_var + sigma ** 2
        r = self.basis.shape[1]
        return (self.d - r) * math.log(iso) + float(torch.log(self.extra_var + iso).sum())

    def log_resp(self, x: torch.Tensor, sigma: float = 0.0) -> torch.Tensor:
        """[B, K] log posterior of the component given x at noise level sigma (equal weights)."""
        logits = -0.5 * self._quad(x.reshape(x.shape[0], -1).to(F64), sigma)
        return logits - torch.logsumexp(logits, dim=1, keepdim=True)

    def log_density(self, x: torch.Tensor, sigma: float = 0.0) -> torch.Tensor:
        """[B] log p_σ(x), the mixture convolved with N(0, σ²I)."""
        logits = -0.5 * (self._quad(x.reshape(x.shape[0], -1).to(F64), sigma) + self._logdet(sigma) + self.d * math.log(2 * math.pi))
        return torch.logsumexp(logits, dim=1) - math.log(self.k)

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """E[x0 | x] for x = x0 + σ·n: the exactly optimal x0 predictor (the core's denoiser contract)."""
        s = float(sigma)
        flat = x.reshape(x.shape[0], -1).to(F64)
        w = torch.softmax(-0.5 * self._quad(flat, s), dim=1)
        mbar = w @ self.means
        v = flat - mbar
        iso = self.iso_var + s ** 2
        a_iso = self.iso_var / iso
        a_low = (self.extra_var + self.iso_var) / (self.extra_var + iso) - a_iso
        out = mbar + a_iso * v + ((v @ self.basis) * a_low) @ self.basis.T
        return out.reshape(x.shape).to(x.dtype)

    # -- sampling and metrics -----------------------------------------------------------------
    def sample(self, identities: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """One clean latent per identity index, float64 [B, *shape]."""
        n = identities.shape[0]
        z = torch.randn((n, self.d), generator=gen, dtype=F64) * self.iso_var ** 0.5
        u = torch.randn((n, self.basis.shape[1]), generator=gen, dtype=F64) * self.extra_var.sqrt()
        return (self.means[identities] + z + u @ self.basis.T).reshape(n, *self.shape)

    def mahalanobis2(self, x: torch.Tensor) -> torch.Tensor:
        """[B, K] squared Mahalanobis distance to every component under Σ."""
        return self._quad(x.reshape(x.shape[0], -1).to(F64), 0.0)

    def metrics(self, x: torch.Tensor) -> dict:
        """Per-sample quality: NLL per dimension, whitened RMS distance to the nearest component (≈ 1 for true
        samples, < 1 over-smoothed, > 1 off the data), nearest identity and its responsibility."""
        maha = self.mahalanobis2(x)
        resp = self.log_resp(x).exp()
        top, nearest = resp.max(dim=1)
        return {"nll_per_dim": (-self.log_density(x) / self.d), "whitened_dist": (maha.min(dim=1).values / self.d).sqrt(),
                "nearest": nearest, "max_resp": top}


def summarize(m: dict, identities: torch.Tensor | None = None) -> dict:
    """Batch means of `metrics` (and identity agreement when the intended identities are given)."""
    out = {"nll_per_dim": float(m["nll_per_dim"].mean()), "whitened_dist": float(m["whitened_dist"].mean()),
           "whitened_dist_max": float(m["whitened_dist"].max()),
           "unambiguous": float((m["max_resp"] > 0.99).to(F64).mean()), "nearest": m["nearest"].tolist()}
    if identities is not None:
        out["same_identity"] = float((m["nearest"] == identities).to(F64).mean())
    return out


def rms(a: torch.Tensor, b: torch.Tensor | None = None) -> float:
    """Root mean square per element over the whole batch (data units: within-identity sd is ~0.3)."""
    diff = a.to(F64) if b is None else a.to(F64) - b.to(F64)
    return float(diff.pow(2).mean().sqrt())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest per-sample ‖a − b‖ / ‖b‖."""
    a, b = a.to(F64).reshape(a.shape[0], -1), b.to(F64).reshape(b.shape[0], -1)
    return float((torch.linalg.vector_norm(a - b, dim=1) / torch.linalg.vector_norm(b, dim=1)).max())


def median_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Median over samples of ‖a − b‖ / ‖b‖."""
    a, b = a.to(F64).reshape(a.shape[0], -1), b.to(F64).reshape(b.shape[0], -1)
    return float((torch.linalg.vector_norm(a - b, dim=1) / torch.linalg.vector_norm(b, dim=1)).median())


# ----------------------------------------------------------------------------------------------
# Verification of the closed form
# ----------------------------------------------------------------------------------------------

def verify_denoiser(seed: int = 1) -> dict:
    """Checks of the closed form; returns the worst errors (a test asserts their bounds).

    * brute force: on a tiny mixture (d = 6) against full-matrix Gaussian algebra (torch's
      MultivariateNormal log densities, explicit solves), at several sigmas;
    * Tweedie: on the benchmark's own mixture, D(x) = x + σ² ∇ log p_σ(x) by autograd of the density;
    * small sigma: D(x, 1e-4) ≈ x on true samples;
    * Monte Carlo orthogonality: on the tiny mixture, E[(x0 − D(x))·φ(x)] ≈ 0 for φ = 1, x, D(x)
      (what defines a conditional mean), reported in standard errors.
    """
    gen = torch.Generator().manual_seed(seed)
    tiny = GaussianMixture.faces_like(k=3, shape=(1, 2, 3), iso_sd=0.3, rank=2, lowrank_var=0.2, face_fraction=0.5,
                                      blur=0.5, seed=seed)
    tiny.means = tiny.means * 1.5   # overlapping but distinct components, so responsibilities matter
    cov = tiny.iso_var * torch.eye(tiny.d, dtype=F64) + tiny.basis @ torch.diag(tiny.extra_var) @ tiny.basis.T
    worst_brute = 0.0
    x = torch.randn((64, *tiny.shape), generator=gen, dtype=F64) * 1.5
    for sigma in (0.05, 0.3, 1.0, 3.0, 14.6):
        flat = x.reshape(64, -1)
        cs = cov + sigma ** 2 * torch.eye(tiny.d, dtype=F64)
        logp = torch.stack([torch.distributions.MultivariateNormal(mu, cs).log_prob(flat) for mu in tiny.means], dim=1)
        w = torch.softmax(logp, dim=1)
        post = torch.stack([mu + torch.linalg.solve(cs, (flat - mu).T).T @ cov.T for mu in tiny.means], dim=1)
        brute = (w[..., None] * post).sum(1)
        worst_brute = max(worst_brute, float((tiny.denoise(x, torch.tensor(sigma, dtype=F64)).reshape(64, -1) - brute).abs().max()))
        dens = torch.logsumexp(logp, dim=1) - math.log(tiny.k)
        worst_brute = max(worst_brute, float((tiny.log_density(x, sigma) - dens).abs().max()))

    gmm = GaussianMixture.faces_like()
    ids = torch.arange(16) % gmm.k
    x0 = gmm.sample(ids, gen)
    worst_tweedie = 0.0
    for sigma in (0.1, 1.0, 5.0, 14.6):
        x = (x0 + sigma * torch.randn(x0.shape, generator=gen, dtype=F64)).requires_grad_(True)
        grad, = torch.autograd.grad(gmm.log_density(x, sigma).sum(), x)
        tweedie = x.detach() + sigma ** 2 * grad
        worst_tweedie = max(worst_tweedie, rel_err(gmm.denoise(x.detach(), torch.tensor(sigma, dtype=F64)), tweedie))
    small = rel_err(gmm.denoise(x0, torch.tensor(1e-4, dtype=F64)), x0)

    n = 200_000
    ids = torch.randint(0, tiny.k, (n,), generator=gen)
    x0 = tiny.sample(ids, gen)
    worst_z = 0.0
    for sigma in (0.3, 1.0):
        x = x0 + sigma * torch.randn(x0.shape, generator=gen, dtype=F64)
        err = (x0 - tiny.denoise(x, torch.tensor(sigma, dtype=F64))).reshape(n, -1)
        for phi in (torch.ones_like(err), x.reshape(n, -1), tiny.denoise(x, torch.tensor(sigma, dtype=F64)).reshape(n, -1)):
            prod = err * phi
            z = (prod.mean(0) / (prod.std(0) / n ** 0.5)).abs().max()
            worst_z = max(worst_z, float(z))
    return {"brute_force_max_abs_err": worst_brute, "tweedie_max_rel_err": worst_tweedie,
            "small_sigma_rel_err": small, "monte_carlo_orthogonality_max_z": worst_z, "monte_carlo_samples": n}


# ----------------------------------------------------------------------------------------------
# Reference solution of the probability-flow ODE
# ----------------------------------------------------------------------------------------------

def reference_trajectory(denoise, x: torch.Tensor, sigmas: torch.Tensor, substeps: int, sigma_floor: float = 1e-4) -> list:
    """States at every sigma of `sigmas` of the PF-ODE dx/dσ = (x − D(x, σ))/σ from x at sigmas[0], by Heun
    (k-diffusion's sample_heun) on ≈ `substeps` geometric sub-steps in all; the last interval runs to
    `sigma_floor` and then takes D (the ODE's limit at σ → 0)."""
    sig = [float(s) for s in sigmas.to(F64)]
    per = max(2, math.ceil(substeps / (len(sig) - 1)))
    x = x.to(F64)
    out = [x]
    for a, b in itertools.pairwise(sig):
        grid = np.geomspace(a, b if b > 0 else sigma_floor, per + 1)
        for s0, s1 in itertools.pairwise(grid):
            d0 = (x - denoise(x, torch.tensor(s0, dtype=F64))) / s0
            x1 = x + (s1 - s0) * d0
            d1 = (x1 - denoise(x1, torch.tensor(s1, dtype=F64))) / s1
            x = x + (s1 - s0) * (d0 + d1) / 2
        if b == 0:
            x = denoise(x, torch.tensor(sigma_floor, dtype=F64))
        out.append(x)
    return out


class Recorder:
    """Wraps a denoiser and keeps every input state: for Euler and the leapfrog alike, the calls of a
    regenerate run are at z_0 … z_{N−1} (one per step), so this is the trajectory at the grid sigmas."""

    def __init__(self, denoise):
        self.denoise, self.states = denoise, []

    def __call__(self, x, sigma):
        self.states.append(x.detach().clone())
        return self.denoise(x, sigma)


def oscillation(traj: list, ref: list) -> dict:
    """Error against the reference along the grid, e_i = z_i − r_i, and its step-to-step alternating part
    a_i = e_i − (e_{i−1} + e_{i+1})/2 (a smooth error drift gives a ≈ 0; a mode (−1)^i·v gives a = 2v).
    RMS per element over the batch; max and mean over interior steps."""
    e = [z.to(F64) - r for z, r in zip(traj, ref)]
    alt = [e[i] - 0.5 * (e[i - 1] + e[i + 1]) for i in range(1, len(e) - 1)]
    alt_rms = [rms(a) for a in alt] or [0.0]
    err_rms = [rms(v) for v in e]
    return {"alternating_max": max(alt_rms), "alternating_mean": float(np.mean(alt_rms)),
            "trajectory_err_max": max(err_rms), "alternating_per_step": alt_rms, "err_per_step": err_rms}


# ----------------------------------------------------------------------------------------------
# Experiment 1: sampling quality vs steps
# ----------------------------------------------------------------------------------------------

METHODS = ("exact", "exact_single", "plain")


def quality_vs_steps(gmm: GaussianMixture, core, n: int, steps_list, substeps: int, schedules=("normal", "karras"),
                     progress=None, seed: int = 10) -> dict:
    """Generate from x_T = σ_max·n with each method, steps and schedule; compare with the fine PF-ODE solution.

    `exact` starts from NoiseState(x_T, residual=None): the core's fresh-noise convention (the leapfrog's
    second state is an Euler step from x_T, residual zero), what regenerating any noise that was not
    inverted does. `exact_single` and `plain` regenerate with the same Euler sampler (they differ only in
    inversion), so their generation numbers coincide by construction; the extra schedules run only
    `exact` and `plain`. Also, on the first schedule: the round trip (invert a true sample, regenerate).
    """
    gen = torch.Generator().manual_seed(seed)
    ids = torch.arange(n) % gmm.k
    x0_true = gmm.sample(ids, gen)
    noise = torch.randn((n, *gmm.shape), generator=gen, dtype=F64)
    rows, refs, traj = [], {}, {}
    ref_final = ref_nearest = None
    for schedule in schedules:
        for steps in steps_list:
            sigmas = SCHEDULES[schedule](steps)
            x_t = float(sigmas[0]) * noise
            ref = reference_trajectory(gmm.denoise, x_t, sigmas, substeps)
            if ref_final is None:
                ref_final = ref[-1]
                ref_nearest = gmm.metrics(ref_final)["nearest"]
            # Every grid starts at the same sigma_max, so every reference ends at the same ODE solution;
            # their spread is the reference's own accuracy.
            refs[f"{schedule}/{steps}"] = {"spread_rms": rms(ref[-1], ref_final)}
            outs = {}
            for method in (METHODS if schedule == schedules[0] else ("exact", "plain")):
                rec = Recorder(gmm.denoise)
                stats = core.Stats()
                t0 = time.perf_counter()
                state = core.regenerate(rec, core.NoiseState(x_t.to(core.state_dtype(method)), None), sigmas, method, stats=stats)
                seconds = time.perf_counter() - t0
                out = outs[method] = state.x.to(F64)
                m = gmm.metrics(out)
                summary = summarize(m)
                summary.pop("nearest")
                o = oscillation(rec.states + [state.x], ref)
                row = {"schedule": schedule, "method": method, "steps": steps, "calls": stats.model_calls, "seconds": seconds,
                       "err_vs_reference_rms": rms(out, ref_final), "err_vs_reference_median_rel": median_rel_err(out, ref_final),
                       "same_identity_as_reference": float((m["nearest"] == ref_nearest).to(F64).mean()), **summary,
                       "alternating_max": o["alternating_max"], "alternating_mean": o["alternating_mean"],
                       "trajectory_err_max": o["trajectory_err_max"]}
                if schedule == schedules[0]:
                    # round trip: a true sample -> noise -> back (the core solves the partner for exact)
                    inv = core.Stats()
                    nz = core.invert(gmm.denoise, core.LatentState(x0_true.to(core.state_dtype(method))), sigmas, method, stats=inv)
                    back = core.regenerate(gmm.denoise, nz, sigmas, method).x
                    row.update({"round_trip_rel_err": rel_err(back, x0_true), "round_trip_median_rel_err": median_rel_err(back, x0_true),
                                "round_trip_identity_kept": float((gmm.metrics(back)["nearest"] == ids).to(F64).mean()),
                                "round_trip_invert_calls": inv.model_calls,
                                "inverted_noise_std_over_sigma_max": float(nz.x.to(F64).std() / sigmas[0]),
                                "inverted_residual_rms": None if nz.residual is None else rms(nz.residual)})
                rows.append(row)
                traj[f"{schedule}/{method}/{steps}"] = {"alternating": o["alternating_per_step"], "err": o["err_per_step"],
                                                       "sigmas": [float(v) for v in sigmas]}
                if progress is not None:
                    progress.update(1)
            rows[-len(outs)]["exact_minus_plain_rms"] = rms(outs["exact"], outs["plain"])
    ref_summary = summarize(gmm.metrics(ref_final))
    ref_summary.pop("nearest")
    true_summary = summarize(gmm.metrics(x0_true), ids)
    true_summary.pop("nearest")
    return {"samples": n, "rows": rows, "reference": {"substeps": substeps, "per_grid": refs,
                                                      "max_spread_rms": max(r["spread_rms"] for r in refs.values()),
                                                      **ref_summary},
            "true_samples": true_summary, "trajectories": traj}


# ----------------------------------------------------------------------------------------------
# Experiment 2: anonymization as the product does it
# ----------------------------------------------------------------------------------------------

def _nonce(i: int) -> bytes:
    return hashlib.sha256(b"keyface-bench/analytic/nonce" + i.to_bytes(4, "big")).digest()[:16]


def _key(keys, name: str):
    return keys.SecretKey(hashlib.sha256(b"keyface-bench/analytic/" + name.encode()).digest(), kind="key",
                          source=f"analytic benchmark ({name})")


def _background(core, mask, public_noise, clean, dtype):
    """nodes/latent_info.background_for: the clean latent outside the mask, nonce-derived public noise (None: no mask)."""
    if mask is None:
        return None
    return core.Background(mask.to(dtype), clean.to(dtype), public_noise.to(dtype), core.eps_add_noise)


def _flipped(core, flip, mask, noise_state, signs):
    """nodes/core_nodes.flip_latent on the way out: flip the state inside the flip mask; the exact method's
    residual is sealed away (the restorer gets it back with the key) and the new face starts from zero."""
    res = noise_state.residual
    return core.NoiseState(flip.apply_flip(noise_state.x, signs, mask), None if res is None else torch.zeros_like(res))


def _flipped_legacy(core, flip, mask, noise_state, signs):
    """The rule before sealing (diagnostic): the residual flipped along with the state."""
    res = noise_state.residual
    return core.NoiseState(flip.apply_flip(noise_state.x, signs, mask),
                           None if res is None else flip.apply_flip(res, signs, mask))


def _restore(core, flip, denoise, sigmas, method, background, mask, latent_state, signs, residual):
    """nodes/core_nodes.restore_latent: invert (background from the latent it is given), unflip, put back the
    unsealed residual (a wrong key unseals none: zero), regenerate."""
    b = background(latent_state.x.to(F64), core.state_dtype(method))
    nz = core.invert(denoise, latent_state, sigmas, method, background=b)
    back = core.NoiseState(flip.apply_flip(nz.x, signs, mask), None if nz.residual is None else residual)
    return core.regenerate(denoise, back, sigmas, method, background=b).x


def anonymization(gmm: GaussianMixture, core, flip, keys, n: int, steps: int, methods=METHODS, progress=None,
                  seed: int = 20, schedule: str = "normal") -> dict:
    """invert -> keyed flip -> regenerate (anonymize), then invert -> unflip -> regenerate (restore), per method,
    for the whole latent and for the face ellipse (Background held as the nodes hold it)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.arange(n) % gmm.k
    x0 = gmm.sample(ids, gen)
    sigmas = SCHEDULES[schedule](steps)
    shape = tuple(gmm.shape)
    nonces = [_nonce(i) for i in range(n)]
    right, wrong = _key(keys, "right"), _key(keys, "wrong")

    def patterns(key):
        return torch.stack([flip.sign_pattern(key.image_key(nc), shape, flip.flip_context(shape, 0)) for nc in nonces])
    signs_right, signs_wrong = patterns(right), patterns(wrong)
    ellipse = face_ellipse(shape)
    public_noise = torch.stack([flip.public_gaussian(b"keyface/v1/background\x00" + nc, shape) for nc in nonces])
    clean_summary = summarize(gmm.metrics(x0), ids)
    out = {"samples": n, "steps": steps, "schedule": schedule, "mask_fraction": float(ellipse.mean()), "clean": clean_summary, "rows": []}

    for masked in (False, True):
        mask = ellipse.expand(n, 1, *shape[-2:]) if masked else None

        background = functools.partial(_background, core, mask, public_noise)
        flipped = functools.partial(_flipped, core, flip, mask)

        for method in methods:
            dtype = core.state_dtype(method)
            inv_stats, reg_stats = core.Stats(), core.Stats()
            bg = background(x0, dtype)
            noise = core.invert(gmm.denoise, core.LatentState(x0.to(dtype)), sigmas, method, background=bg, stats=inv_stats)
            unflipped_regen = core.regenerate(gmm.denoise, noise, sigmas, method, background=bg).x
            anon = core.regenerate(gmm.denoise, flipped(noise, signs_right), sigmas, method, background=bg, stats=reg_stats)
            m_anon = gmm.metrics(anon.x)
            row = {"method": method, "masked": masked, "anonymize_calls": inv_stats.model_calls + reg_stats.model_calls,
                   "anonymized": summarize(m_anon, ids),
                   "identity_change_rate": float((m_anon["nearest"] != ids).to(F64).mean()),
                   "anonymized_change_rms": rms(anon.x, x0),
                   "outside_mask_max_abs_change": None if mask is None else float(((anon.x.to(F64) - x0) * (1 - mask)).abs().max()),
                   "round_trip_no_flip_rel_err": rel_err(unflipped_regen, x0),
                   "round_trip_no_flip_median_rel_err": median_rel_err(unflipped_regen, x0),
                   "residual_rms": None if noise.residual is None else rms(noise.residual)}
            row["anonymized"].pop("same_identity")
            if noise.residual is not None:
                # Diagnostic: the rule before sealing (residual flipped with the state), to show how much of the
                # parasitic mode a flipped residual seeds.
                legacy = core.regenerate(gmm.denoise, _flipped_legacy(core, flip, mask, noise, signs_right), sigmas,
                                         method, background=bg).x
                row["diagnostic_flipped_residual_whitened_dist"] = float(gmm.metrics(legacy)["whitened_dist"].mean())

            # restore as restore_latent does: background from the anonymized state (= the original outside the mask)
            restore = functools.partial(_restore, core, flip, gmm.denoise, sigmas, method, background, mask)
            sealed = noise.residual  # what the key unseals
            no_residual = None if sealed is None else torch.zeros_like(sealed)
            partner = anon.partner
            variants = {"payload": anon,
                        "float32 state + partner": core.LatentState(
                            anon.x.to(torch.float32).to(dtype), None if partner is None else partner.to(torch.float32).to(dtype)),
                        "no partner (float64 state)": core.LatentState(anon.x),
                        "float32, no partner": core.LatentState(anon.x.to(torch.float32).to(dtype)),
                        "1 % noise, no partner": core.LatentState(
                            (anon.x.to(F64) + 0.01 * rms(anon.x) * torch.randn(anon.x.shape, generator=gen, dtype=F64)).to(dtype))}
            row["restore"] = {}
            for name, state in variants.items():
                restored = restore(state, signs_right, sealed)
                m = gmm.metrics(restored)
                row["restore"][name] = {"rel_err": rel_err(restored, x0), "median_rel_err": median_rel_err(restored, x0),
                                        "rms": rms(restored, x0),
                                        "identity_recovered": float((m["nearest"] == ids).to(F64).mean())}
            wrong_out = restore(anon, signs_wrong, no_residual)
            m_wrong = gmm.metrics(wrong_out)
            row["wrong_key"] = summarize(m_wrong, ids)
            row["wrong_key"]["rel_err"] = rel_err(wrong_out, x0)
            row["wrong_key"]["same_as_anonymized"] = float((m_wrong["nearest"] == m_anon["nearest"]).to(F64).mean())
            out["rows"].append(row)
            if progress is not None:
                progress.update(1)
    return out


# ----------------------------------------------------------------------------------------------
# Section entry point
# ----------------------------------------------------------------------------------------------

def run(cfg: dict, progress=None, log=print) -> dict:
    core, flip, keys = _modules()
    t0 = time.perf_counter()
    checks = verify_denoiser()
    failed = [k for k, bound in CHECK_BOUNDS.items() if not checks[k] <= bound]
    if failed:
        raise AssertionError(f"analytic denoiser failed its checks {failed}: {checks}")
    checks["seconds"] = time.perf_counter() - t0
    schedule_check = {}
    for name, fn in SCHEDULES.items():
        for steps in cfg["steps"]:
            theirs = comfy_sigmas(name, steps)
            schedule_check[f"{name}/{steps}"] = None if theirs is None else float((fn(steps) - theirs).abs().max())
    if progress is not None:
        progress.update(1)
    gmm = GaussianMixture.faces_like(k=cfg["k"])
    res = {"distribution": gmm.spec(), "denoiser_checks": checks, "schedule_vs_comfyui_max_abs_diff": schedule_check,
           "settings": dict(cfg)}
    log(f"analytic: denoiser verified (brute force {checks['brute_force_max_abs_err']:.1e}, Tweedie "
        f"{checks['tweedie_max_rel_err']:.1e}); {gmm.k} identities, d = {gmm.d}")
    res["quality"] = quality_vs_steps(gmm, core, cfg["samples"], cfg["steps"], cfg["reference_substeps"],
                                      progress=progress)
    res["anonymization"] = anonymization(gmm, core, flip, keys, cfg["anon_samples"], cfg["anon_steps"], progress=progress)
    # The shipped workflows' setting for the exact method (karras, 30 steps), exact method only.
    res["anonymization_more"] = [anonymization(gmm, core, flip, keys, cfg["anon_samples"], 30, methods=("exact",),
                                               progress=progress, schedule="karras")]
    return res


CHECK_BOUNDS = {"brute_force_max_abs_err": 1e-10, "tweedie_max_rel_err": 1e-9, "small_sigma_rel_err": 1e-6,
                "monte_carlo_orthogonality_max_z": 5.0}


def progress_total(cfg: dict) -> int:
    return 1 + (len(METHODS) + 2) * len(cfg["steps"]) + 2 * len(METHODS) + 2
