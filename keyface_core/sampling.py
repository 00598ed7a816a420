"""Invertible deterministic sampling over a generic x0-denoiser, in ComfyUI's sigma space.

Contract shared by every function here (k-diffusion's): ``denoise(x, sigma) -> x0`` predicts the
clean latent; ``sigmas`` run from high to low and end at 0; the Euler/DDIM direction is
``d = (x - x0) / sigma`` for eps, v and flow (CONST) models alike (REFERENCE.md §2).

Three methods:

* ``plain`` - DDIM inversion: one call per step, evaluated at the known point; approximate.
* ``exact_single`` - implicit Euler inversion: each step solves ``x_i = x_{i+1} - h d(x_i)`` by
  Anderson-accelerated fixed-point iteration, so ComfyUI's own Euler sampler (KSamplerAdvanced,
  add_noise off) regenerates it. Single state; exact to the solver tolerance; many calls.
* ``exact`` - BDIA with gamma = 1 (Zhang et al., "Exact diffusion inversion via bi-directional
  integration approximation", ECCV 2024): the leapfrog ``z_{i+1} = z_{i-1} + (s_{i+1} - s_{i-1}) d(z_i)``
  is inverted algebraically, one call per step, states in float64 on a power-of-two grid (see
  ``leapfrog_grid``) so that each step is bit-reversible even when the model runs in float32. The noise
  carries a second state, stored as its *residual* against an Euler step (zero for a fresh noise), so a
  sign flip of (x, residual) stays an exact involution without model calls.

Masked generation (``Background``): inside the binary mask the state evolves; outside it is held to
``add_noise(background_latent, public_noise, sigma)``, which the restorer recomputes from public
data (the background and a nonce-derived noise), never from the original face. Every step stays
exactly invertible because the held part is known on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
AddNoise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Progress = Callable[[dict], None]

METHODS = ("exact", "exact_single", "plain")


def eps_add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_sigma = x0 + sigma * noise (eps, v-prediction and EDM models)."""
    return x0 + sigma * noise


def flow_add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_sigma = (1 - sigma) * x0 + sigma * noise (rectified-flow / CONST models: SD3, Flux)."""
    return (1.0 - sigma) * x0 + sigma * noise


@dataclass
class Background:
    """The public region outside the mask and the trajectory it is held to."""

    mask: torch.Tensor      # [B,1,h,w] (or broadcastable), 1 = generated (face), 0 = held
    latent: torch.Tensor    # clean latent; only its values outside the mask are ever used
    noise: torch.Tensor     # public standard-normal noise of the latent's shape
    add_noise: AddNoise = eps_add_noise

    def hold(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x inside the mask, the background trajectory at sigma outside."""
        held = self.add_noise(self.latent.to(x.dtype), self.noise.to(x.dtype), sigma)
        return torch.where(self.mask.to(x.device) >= 0.5, x, held)

    def inside(self, x: torch.Tensor) -> torch.Tensor:
        """x inside the mask, zero outside (for residuals and norms)."""
        return torch.where(self.mask.to(x.device) >= 0.5, x, torch.zeros_like(x))


@dataclass
class Stats:
    """What a run cost and how well its solves converged."""

    model_calls: int = 0
    residuals: list = field(default_factory=list)   # per implicit solve: final relative residual
    iterations: list = field(default_factory=list)  # per implicit solve: model calls it took
    last_denoised: Optional[torch.Tensor] = field(default=None, repr=False)  # latest x0 estimate, for previews


class _Counter:
    """Wraps denoise: counts calls, reports progress, keeps the dtype of the state."""

    def __init__(self, denoise: Denoise, stats: Stats):
        self.denoise, self.stats = denoise, stats

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.stats.model_calls += 1
        denoised = self.denoise(x, sigma).to(x.dtype)
        self.stats.last_denoised = denoised
        return denoised


def _hold(background: Optional[Background], x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return x if background is None else background.hold(x, sigma)


def _inside(background: Optional[Background], x: torch.Tensor) -> torch.Tensor:
    return x if background is None else background.inside(x)


def _direction(denoise: Callable, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    # Same expression and order as k-diffusion's to_d, so float32 runs match ComfyUI bit for bit.
    return (x - denoise(x, sigma)) / sigma


def _report(progress: Optional[Progress], phase: str, step: int, total: int, stats: Stats, **extra) -> None:
    if progress is not None:
        progress({"phase": phase, "step": step, "total": total, "model_calls": stats.model_calls, **extra})


def _relative_norm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample ||a|| / max(||b||, tiny)."""
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    return torch.linalg.vector_norm(a, dim=1) / torch.linalg.vector_norm(b, dim=1).clamp_min(1e-30)


def solve_fixed_point(g: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, tol: float, max_iter: int,
                      memory: int = 5) -> tuple[torch.Tensor, float, int]:
    """Solve x = g(x) by Anderson acceleration (type II, per batch sample); returns (x, residual, evaluations).

    Plain iteration contracts slowly at high sigma (REFERENCE.md §2); Anderson mixes the last
    ``memory`` iterates to cut the evaluations several-fold. The returned x is the last g output.
    """
    batch = x.shape[0]
    flat = lambda t: t.reshape(batch, -1).to(torch.float64)
    xs, fs = [], []          # past iterates and residuals f = g(x) - x, flattened
    gx = g(x)
    evaluations = 1
    while True:
        f = gx - x
        residual = float(_relative_norm(f, gx).max())
        if residual <= tol or evaluations >= max_iter:
            return gx, residual, evaluations
        xs.append(flat(x)), fs.append(flat(f))
        xs, fs = xs[-(memory + 1):], fs[-(memory + 1):]
        if len(fs) > 1:
            dF = torch.stack([fs[k + 1] - fs[k] for k in range(len(fs) - 1)], dim=2)   # [B, n, m]
            dG = torch.stack([(xs[k + 1] + fs[k + 1]) - (xs[k] + fs[k]) for k in range(len(fs) - 1)], dim=2)
            gamma = torch.linalg.lstsq(dF, fs[-1].unsqueeze(2)).solution             # [B, m, 1]
            new = (xs[-1] + fs[-1]) - (dG @ gamma).squeeze(2)
            x = new.reshape(x.shape).to(x.dtype)
        else:
            x = gx
        gx = g(x)
        evaluations += 1


# ----------------------------------------------------------------------------------------------
# Single-state Euler/DDIM (plain and exact_single)
# ----------------------------------------------------------------------------------------------

def regenerate_euler(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, background: Optional[Background] = None,
                     progress: Optional[Progress] = None, stats: Optional[Stats] = None) -> torch.Tensor:
    """Deterministic Euler (= DDIM) from noise at sigmas[0] to a latent at sigmas[-1]; ComfyUI's `euler`."""
    stats = stats if stats is not None else Stats()
    model = _Counter(denoise, stats)
    sigmas = sigmas.to(x.device, x.dtype)
    total = len(sigmas) - 1
    x = _hold(background, x, sigmas[0])
    for i in range(total):
        d = _direction(model, x, sigmas[i])
        x = _hold(background, x + d * (sigmas[i + 1] - sigmas[i]), sigmas[i + 1])
        _report(progress, "regenerate", i + 1, total, stats)
    return x


def invert_euler(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, implicit: bool,
                 background: Optional[Background] = None, tol: float = 1e-6, max_iter: int = 30,
                 progress: Optional[Progress] = None, stats: Optional[Stats] = None) -> torch.Tensor:
    """Latent at sigmas[-1] -> noise at sigmas[0] that `regenerate_euler` maps back.

    explicit (plain): x_i = x_{i+1} + (s_i - s_{i+1}) d(x_{i+1}); implicit: solve x_i = x_{i+1} - (s_{i+1} - s_i) d(x_i).
    """
    stats = stats if stats is not None else Stats()
    model = _Counter(denoise, stats)
    sigmas = sigmas.to(x.device, x.dtype)
    total = len(sigmas) - 1
    x = _hold(background, x, sigmas[-1])
    last_d = torch.zeros_like(x)
    for step, i in enumerate(range(total - 1, -1, -1), start=1):
        h = sigmas[i + 1] - sigmas[i]
        if not implicit:
            # DDIM inversion evaluates at the known point; at sigma 0 use the first nonzero sigma.
            eval_sigma = sigmas[i + 1] if float(sigmas[i + 1]) > 0 else sigmas[i]
            d = _direction(model, x, eval_sigma)
            x = _hold(background, x - d * h, sigmas[i])
        else:
            target = x
            def step_back(y, target=target, sigma=sigmas[i], h=h):
                return _hold(background, target - _direction(model, y, sigma) * h, sigma)
            guess = _hold(background, target - last_d * h, sigmas[i])
            x, residual, calls = solve_fixed_point(step_back, guess, tol=tol, max_iter=max_iter)
            last_d = (target - x) / h
            stats.residuals.append(residual)
            stats.iterations.append(calls)
        _report(progress, "invert", step, total, stats, residual=stats.residuals[-1] if implicit else None)
    return x


# ----------------------------------------------------------------------------------------------
# Two-state leapfrog, BDIA gamma = 1 (exact)
# ----------------------------------------------------------------------------------------------

def _euler_from(model, background, x, s_from, s_to, grid: Optional[float] = None):
    return _hold(background, _snap(x + _direction(model, x, s_from) * (s_to - s_from), grid), s_to)


# Grid arithmetic for the leapfrog (why: a float32 model sees float32(state), a step function of the float64
# state. Plain float64 round trips leave ~1e-12 differences; where one moves float32(state) across a rounding
# boundary the model answers differently and the leapfrog amplifies it: 1.5e-7 .. 1.6e-3 errors, most often for
# small latents, whose float32 steps are finest). Every state but the last is kept on a grid of multiples of a
# power of two q, where sums and differences are exact: the retrace meets the inversion's states bit for bit, so
# the model sees the same inputs in both directions, whatever its dtype. The last state (sigma 0, the latent)
# is z_{N-2} + step, off the grid; the inversion's rounding of z_{N-2} to the grid (at most q/2) is carried
# back in the residual's sub-grid part (a quarter of it, so it cannot be confused with the grid part), and the
# retrace adds it to the last state: the latent comes back to ~1e-16, not amplified.
GRID_BITS = 40   # q = 2^(ceil(log2 max(1, sigma0)) - 40): 1.5e-11 for SD (sigma0 14.6), 9.1e-13 for flow (sigma0 1);
                 # exact while states stay below 2^52 q (6.6e4 and 4.1e3); beyond it a sum rounds as plain float64
_FINE = 4.0      # the correction rides in the residual divided by this (|c|/4 <= q/8: unambiguous next to the grid)


def leapfrog_grid(sigmas: torch.Tensor) -> float:
    """The grid step q of the exact leapfrog for a schedule: a power of two, from public data (sigmas[0]) only."""
    top = max(1.0, float(sigmas[0]))
    exponent = int(torch.ceil(torch.log2(torch.tensor(top, dtype=torch.float64))))
    return 2.0 ** (exponent - GRID_BITS)


def on_grid(x: torch.Tensor, grid: float, mask: Optional[torch.Tensor] = None) -> bool:
    """Is every value (inside `mask`) a multiple of `grid` (a noise the grid inversion wrote), or not (older)?"""
    x = x.to(torch.float64)
    if mask is not None:
        x = x[(mask.to(x.device) >= 0.5).expand(x.shape)]
    return bool(torch.equal(_snap(x, grid), x))


def _snap(x: torch.Tensor, grid: Optional[float]) -> torch.Tensor:
    # Exact: q is a power of two, so x / q and the product are exact; only round() changes the value. From
    # 2^52 q up a float64 is a multiple of q already: kept as is (no overflow to inf for huge or forged values).
    if grid is None:
        return x
    return torch.where(x.abs() < 2.0 ** 52 * grid, torch.round(x / grid) * grid, x)


def _split_residual(residual: torch.Tensor, grid: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(grid part, last-state correction) of a stored residual (both exact: Sterbenz, powers of two)."""
    coarse = _snap(residual, grid)
    return coarse, (residual - coarse) * _FINE


def regenerate_leapfrog(denoise: Denoise, x: torch.Tensor, residual: Optional[torch.Tensor], sigmas: torch.Tensor, *,
                        background: Optional[Background] = None, progress: Optional[Progress] = None,
                        stats: Optional[Stats] = None, grid: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise (x at sigmas[0], residual) -> (latent at sigmas[-1], its partner at sigmas[-2]); N calls.

    `grid`: the step of `leapfrog_grid` (bit-reversible grid arithmetic), or None for the plain float64
    arithmetic of files written before it."""
    stats = stats if stats is not None else Stats()
    model = _Counter(denoise, stats)
    sigmas = sigmas.to(x.device, x.dtype)
    total = len(sigmas) - 1
    last = lambda i: grid if i < total else None   # grid for the states before the last one
    fine = None
    if residual is not None:
        residual = _inside(background, residual.to(x.dtype))
        if grid is not None and total > 1:
            residual, fine = _split_residual(residual, grid)
    # Only values inside the mask are snapped: outside, both directions hold the same public trajectory.
    prev = _hold(background, _snap(x, grid), sigmas[0])
    cur = _euler_from(model, background, prev, sigmas[0], sigmas[1], last(1))
    if residual is not None:
        cur = cur + residual
    _report(progress, "regenerate", 1, total, stats)
    for i in range(1, total):
        step = _snap(_direction(model, cur, sigmas[i]) * (sigmas[i + 1] - sigmas[i - 1]), last(i + 1))
        nxt = _hold(background, _snap(prev + step, last(i + 1)), sigmas[i + 1])
        prev, cur = cur, nxt
        _report(progress, "regenerate", i + 1, total, stats)
    if fine is not None:
        cur = cur + fine
    return cur, prev


def solve_partner(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, background: Optional[Background] = None,
                  tol: float = 1e-4, max_iter: int = 12, stats: Optional[Stats] = None) -> torch.Tensor:
    """The partner state z at sigmas[-2] whose Euler step lands on x: a consistent start for inversion.

    Any partner inverts exactly; a consistent one keeps the leapfrog's parasitic mode small.
    """
    stats = stats if stats is not None else Stats()
    model = _Counter(denoise, stats)
    sigmas = sigmas.to(x.device, x.dtype)
    s_from, s_to = sigmas[-2], sigmas[-1]
    x = _hold(background, x, s_to)

    def g(y):
        return _hold(background, x - _direction(model, y, s_from) * (s_to - s_from), s_from)
    partner, residual, calls = solve_fixed_point(g, _hold(background, x, s_from), tol=tol, max_iter=max_iter)
    stats.residuals.append(residual)
    stats.iterations.append(calls)
    return partner


def invert_leapfrog(denoise: Denoise, x: torch.Tensor, partner: Optional[torch.Tensor], sigmas: torch.Tensor, *,
                    background: Optional[Background] = None, progress: Optional[Progress] = None,
                    stats: Optional[Stats] = None, partner_tol: float = 1e-4,
                    partner_max_iter: int = 12, grid: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(latent, partner or None) -> (noise x at sigmas[0], residual); exact inverse of `regenerate_leapfrog`
    with the same `grid` (bit for bit in every state but the last when `grid` is given)."""
    stats = stats if stats is not None else Stats()
    model = _Counter(denoise, stats)
    sigmas = sigmas.to(x.device, x.dtype)
    total = len(sigmas) - 1
    last = lambda i: grid if i < total else None   # as in regenerate_leapfrog: by the index of the state made
    if partner is None:
        partner = solve_partner(denoise, x, sigmas, background=background, tol=partner_tol,
                                max_iter=partner_max_iter, stats=stats)
    cur = _hold(background, x, sigmas[-1])                                     # z_N
    prev = _hold(background, _snap(partner.to(x.dtype), grid), sigmas[-2])     # z_{N-1}: any partner inverts
    fine = None
    for step, i in enumerate(range(total - 1, 0, -1), start=1):
        # z_{i-1} = z_{i+1} - (s_{i+1} - s_{i-1}) d(z_i): the leapfrog solved for its oldest state. The forward
        # step that made z_{i+1} rounded its increment to the grid unless z_{i+1} is the last state.
        inc = _snap(_direction(model, prev, sigmas[i]) * (sigmas[i + 1] - sigmas[i - 1]), last(i + 1))
        older = _hold(background, _snap(cur - inc, grid), sigmas[i - 1])
        if grid is not None and i + 1 == total:
            # What the retrace's last step will give before its correction, and the correction that makes it x.
            fine = _inside(background, cur - _hold(background, older + inc, sigmas[i + 1]))
        cur, prev = prev, older
        _report(progress, "invert", step, total, stats)
    # Now prev = z_0 (noise) and cur = z_1; store z_1 as its residual against an Euler step from z_0 (rounded
    # to the grid as the retrace rounds it, so this part is a grid value and the retrace's sum exact).
    residual = _inside(background, cur - _euler_from(model, background, prev, sigmas[0], sigmas[1], last(1)))
    if fine is not None:
        residual = residual + fine / _FINE
    _report(progress, "invert", total, total, stats)
    return prev, residual


# ----------------------------------------------------------------------------------------------
# One entry point per direction, by method name
# ----------------------------------------------------------------------------------------------

@dataclass
class NoiseState:
    """Inverted noise at sigmas[0]; `residual` only for the two-state method."""

    x: torch.Tensor
    residual: Optional[torch.Tensor] = None


@dataclass
class LatentState:
    """A clean latent at sigmas[-1]; `partner` (the state at sigmas[-2]) only for the two-state method."""

    x: torch.Tensor
    partner: Optional[torch.Tensor] = None


def state_dtype(method: str) -> torch.dtype:
    """float64 for the two-state method (exactness lives in the algebra), float32 otherwise (ComfyUI's)."""
    return torch.float64 if method == "exact" else torch.float32


NUMERICS = ("grid", "legacy")   # the exact method's arithmetic: grid (since format v2.1) or plain float64 (older)


def leapfrog_numerics(noise: torch.Tensor, sigmas: torch.Tensor, background: Optional[Background] = None) -> str:
    """Which arithmetic made an exact-method noise: "grid" when every value is on `leapfrog_grid` (the grid
    inversion writes only such values inside the mask, a key's pairswap/signflip keeps them there; outside
    it the public background is held as before), else "legacy" (written
    before the grid: a float64 noise value of ~15 is a multiple of 2^-36 with odds 2^-13, never all of them)."""
    mask = None if background is None else background.mask
    return "grid" if on_grid(noise, leapfrog_grid(sigmas), mask) else "legacy"


def _grid_for(numerics: str, sigmas: torch.Tensor) -> Optional[float]:
    if numerics not in NUMERICS:
        raise ValueError(f"unknown leapfrog numerics {numerics!r}; choose one of {', '.join(NUMERICS)}")
    return leapfrog_grid(sigmas) if numerics == "grid" else None


def _invert_leapfrog(denoise, latent, sigmas, *, background, tol, max_iter, progress, stats, numerics):
    noise, residual = invert_leapfrog(denoise, latent.x, latent.partner, sigmas, background=background,
                                      progress=progress, stats=stats, grid=_grid_for(numerics or "grid", sigmas))
    return NoiseState(noise, residual)


def _regenerate_leapfrog(denoise, noise, sigmas, *, background, progress, stats, numerics):
    numerics = numerics or leapfrog_numerics(noise.x, sigmas, background)
    out, partner = regenerate_leapfrog(denoise, noise.x, noise.residual, sigmas, background=background,
                                       progress=progress, stats=stats, grid=_grid_for(numerics, sigmas))
    return LatentState(out, partner)


def _invert_single(implicit: bool):
    def run(denoise, latent, sigmas, *, background, tol, max_iter, progress, stats, numerics):
        return NoiseState(invert_euler(denoise, latent.x, sigmas, implicit=implicit, background=background, tol=tol,
                                       max_iter=max_iter, progress=progress, stats=stats))
    return run


def _regenerate_single(denoise, noise, sigmas, *, background, progress, stats, numerics):
    return LatentState(regenerate_euler(denoise, noise.x, sigmas, background=background, progress=progress, stats=stats))


@dataclass(frozen=True)
class Method:
    """One inversion method: how to invert a latent and how to retrace its noise (exact inverses of each other)."""

    invert: Callable
    regenerate: Callable


METHOD_TABLE = {
    "exact": Method(_invert_leapfrog, _regenerate_leapfrog),
    "exact_single": Method(_invert_single(True), _regenerate_single),
    "plain": Method(_invert_single(False), _regenerate_single),
}
assert tuple(METHOD_TABLE) == METHODS


def _method(method: str) -> Method:
    if method not in METHOD_TABLE:
        raise ValueError(f"unknown inversion method {method!r}; choose one of {', '.join(METHODS)}")
    return METHOD_TABLE[method]


def invert(denoise: Denoise, latent: LatentState, sigmas: torch.Tensor, method: str, *,
           background: Optional[Background] = None, tol: float = 1e-6, max_iter: int = 30,
           progress: Optional[Progress] = None, stats: Optional[Stats] = None,
           numerics: Optional[str] = None) -> NoiseState:
    """Latent -> noise by `method` (see module doc); `progress` gets k-diffusion-style dicts for previews.

    `numerics` (exact method only): "grid" (the default: bit-reversible) or "legacy" (format v1's restore, which
    must invert with the arithmetic its file was made with)."""
    run = _method(method).invert
    dtype = state_dtype(method)
    partner = None if latent.partner is None else latent.partner.to(dtype)
    return run(denoise, LatentState(latent.x.to(dtype), partner), sigmas.to(dtype), background=background, tol=tol,
               max_iter=max_iter, progress=progress, stats=stats, numerics=numerics)


def regenerate(denoise: Denoise, noise: NoiseState, sigmas: torch.Tensor, method: str, *,
               background: Optional[Background] = None, progress: Optional[Progress] = None,
               stats: Optional[Stats] = None, numerics: Optional[str] = None) -> LatentState:
    """Noise -> latent by `method`; the exact inverse of `invert` with the same arguments.

    `numerics` (exact method): None reads it from the noise (`leapfrog_numerics`), so files written before the
    grid arithmetic retrace as they were made."""
    run = _method(method).regenerate
    dtype = state_dtype(method)
    residual = None if noise.residual is None else noise.residual.to(dtype)
    return run(denoise, NoiseState(noise.x.to(dtype), residual), sigmas.to(dtype), background=background,
               progress=progress, stats=stats, numerics=numerics)
