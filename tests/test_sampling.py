"""Fast tests of keyface_core.sampling over closed-form denoisers (no ComfyUI, no network, seconds).

Two denoisers from the analytic benchmark (benchmarks/kfbench/analytic.py, imported, not copied):

* the Gaussian-mixture posterior mean (K = 8 identities, 4×16×16): nonlinear, exactly optimal;
* the same family with K = 1, a single Gaussian N(μ, Σ): the denoiser is linear,
  D(x, σ) = μ + Σ(Σ + σ²I)⁻¹(x − μ), so along each eigendirection of Σ (variance v) every sampler is a
  scalar recursion and its result is known in closed form. That pins what Euler, the leapfrog and plain
  DDIM inversion compute, not just that they round-trip.

Every method of ``sampling.METHODS`` is covered: round trips (float64 leapfrog: relative error below 1e-12
and bit-equal after rounding to float32, masked included), the implicit solver's tolerance, plain
inversion's error equal to its closed form, the Background held bit-exactly outside the mask at every
model call, call counts, and the progress contract.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
for path in (BENCH, BENCH.parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from kfbench import analytic as A  # noqa: E402

from keyface_core import sampling as core  # noqa: E402
from keyface_core.flip import public_gaussian  # noqa: E402

F64 = torch.float64
N = 6   # batch


@pytest.fixture(scope="module")
def gmm():
    return A.GaussianMixture.faces_like()


@pytest.fixture(scope="module")
def gauss():
    """One Gaussian component: a linear denoiser with a closed-form everything."""
    return A.GaussianMixture.faces_like(k=1, seed=3)


@pytest.fixture(scope="module")
def clean(gmm):
    """float32-representable values, as a VAE's LATENT is: a float64 retrace within ~1e-14 of such a value always
    rounds back to it (float64 samples can sit at a float32 rounding midpoint)."""
    return gmm.sample(torch.arange(N) % gmm.k, torch.Generator().manual_seed(11)).float().double()


@pytest.fixture(scope="module")
def mask():
    return A.face_ellipse().expand(N, 1, 16, 16)


def _background(mask, latent, dtype=F64, add_noise=core.eps_add_noise):
    noise = torch.stack([public_gaussian(b"test-sampling/" + bytes([i]), tuple(latent.shape[1:])) for i in range(latent.shape[0])])
    return core.Background(mask.to(dtype), latent.to(dtype), noise.to(dtype), add_noise)


class Watch:
    """Wraps a denoiser and checks, at every model call, that outside the mask the state IS the held trajectory
    at the call's sigma. `clean_calls` lists calls whose state is instead the clean latent (σ = 0) outside:
    plain inversion's first call, which evaluates the clean latent at the first nonzero sigma by design."""

    def __init__(self, denoise, background: core.Background):
        self.denoise, self.background, self.calls, self.violations, self.clean_calls = denoise, background, 0, [], []

    def __call__(self, x, sigma):
        self.calls += 1
        bg = self.background
        outside = ~(bg.mask >= 0.5).expand(x.shape)
        held = bg.add_noise(bg.latent.to(x.dtype), bg.noise.to(x.dtype), sigma)
        if not torch.equal(x[outside], held[outside]):
            if torch.equal(x[outside], bg.latent.to(x.dtype)[outside]):
                self.clean_calls.append(self.calls)
            else:
                self.violations.append((self.calls, float(sigma), float((x - held)[outside].abs().max())))
        return self.denoise(x, sigma)


# ==============================================================================================
# Closed forms on the single Gaussian
# ==============================================================================================

def _eigen_apply(gauss, y: torch.Tensor, factor) -> torch.Tensor:
    """Apply a scalar function of the eigenvalue to y (shape [B, *shape]): factor(v) per eigendirection of Σ."""
    flat = y.reshape(y.shape[0], -1)
    u = gauss.basis
    along = flat @ u                                     # [B, r]
    perp = flat - along @ u.T
    v_perp = gauss.iso_var
    v_along = gauss.extra_var + gauss.iso_var            # [r]
    out = factor(torch.tensor(v_perp, dtype=F64)) * perp + (along * factor(v_along)) @ u.T
    return out.reshape(y.shape)


def _euler_factor(sigmas):
    s = [float(v) for v in sigmas.to(F64)]

    def f(v):
        out = torch.ones_like(v)
        for a, b in zip(s, s[1:]):
            out = out * (1 + (b - a) * a / (v + a * a))
        return out
    return f


def _plain_round_trip_factor(sigmas):
    """Plain DDIM inversion (d evaluated at the known point; at σ = 0 at the next sigma) then Euler."""
    s = [float(v) for v in sigmas.to(F64)]

    def f(v):
        out = torch.ones_like(v)
        for a, b in zip(s, s[1:]):
            e = b if b > 0 else a
            out = out * (1 - (b - a) * e / (v + e * e)) * (1 + (b - a) * a / (v + a * a))
        return out
    return f


def _leapfrog_factor(sigmas):
    """BDIA γ = 1 from a fresh noise (residual zero): y1 = Euler(y0), y_{i+1} = y_{i-1} + (s_{i+1}-s_{i-1}) d(y_i)."""
    s = [float(v) for v in sigmas.to(F64)]

    def f(v):
        prev = torch.ones_like(v)
        cur = prev * (1 + (s[1] - s[0]) * s[0] / (v + s[0] ** 2))
        for i in range(1, len(s) - 1):
            prev, cur = cur, prev + (s[i + 1] - s[i - 1]) * s[i] / (v + s[i] ** 2) * cur
        return cur
    return f


def test_single_gaussian_denoiser_is_linear(gauss):
    """The premise of the closed forms: D(x) − μ is linear in x − μ with eigenvalues v/(v + σ²)."""
    x = gauss.sample(torch.zeros(3, dtype=torch.long), torch.Generator().manual_seed(1)) * 3
    mu = gauss.means[0].reshape(1, *gauss.shape)
    for sigma in (0.03, 1.0, 14.6):
        expected = mu + _eigen_apply(gauss, x - mu, lambda v: v / (v + sigma ** 2))
        assert A.rel_err(gauss.denoise(x, torch.tensor(sigma, dtype=F64)), expected) < 1e-13


@pytest.mark.parametrize("steps", [10, 20])
def test_euler_and_leapfrog_compute_their_closed_forms(gauss, steps):
    sigmas = A.normal_sigmas(steps).to(F64)
    mu = gauss.means[0].reshape(1, *gauss.shape)
    x_t = sigmas[0] * torch.randn(3, *gauss.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    euler = core.regenerate_euler(gauss.denoise, x_t, sigmas)
    assert A.rel_err(euler - mu, _eigen_apply(gauss, x_t - mu, _euler_factor(sigmas))) < 1e-12
    leap, _ = core.regenerate_leapfrog(gauss.denoise, x_t, None, sigmas)
    assert A.rel_err(leap - mu, _eigen_apply(gauss, x_t - mu, _leapfrog_factor(sigmas))) < 1e-12


@pytest.mark.parametrize("steps", [10, 20])
def test_plain_round_trip_error_is_its_closed_form(gauss, steps):
    """plain is approximate by design (measured round trip 0.143 relative at 10 steps, 0.100 at 20); its round trip
    must be exactly the product of its step factors."""
    sigmas = A.normal_sigmas(steps).to(F64)
    mu = gauss.means[0].reshape(1, *gauss.shape)
    x0 = gauss.sample(torch.zeros(3, dtype=torch.long), torch.Generator().manual_seed(4))
    back = core.regenerate_euler(gauss.denoise, core.invert_euler(gauss.denoise, x0, sigmas, implicit=False), sigmas)
    expected = mu + _eigen_apply(gauss, x0 - mu, _plain_round_trip_factor(sigmas))
    assert A.rel_err(back, expected) < 1e-12
    err = A.rel_err(back, x0)
    assert err == pytest.approx(A.rel_err(expected, x0), rel=1e-9)
    assert err > 1e-2, "plain inversion is not exact: a tiny error here means the test lost its teeth"


# ==============================================================================================
# Round trips on the Gaussian mixture, every method
# ==============================================================================================

@pytest.mark.parametrize("masked", [False, True], ids=["whole", "masked"])
@pytest.mark.parametrize("steps", [10, 20])
def test_leapfrog_round_trip_in_float64(gmm, clean, mask, masked, steps):
    """exact: float64 states, the algebra inverts each step; measured ≤ 7e-14 relative, so below 1e-12, and
    equal to the original after rounding both to float32 (what the VAE gets)."""
    sigmas = A.normal_sigmas(steps)
    bg = _background(mask, clean) if masked else None
    inv, reg = core.Stats(), core.Stats()
    noise = core.invert(gmm.denoise, core.LatentState(clean), sigmas, "exact", background=bg, stats=inv)
    assert noise.x.dtype == F64 and noise.residual.dtype == F64
    back = core.regenerate(gmm.denoise, noise, sigmas, "exact", background=bg, stats=reg).x
    assert A.rel_err(back, clean) < 1e-12
    assert torch.equal(back.float(), clean.float())
    assert reg.model_calls == steps
    # inversion: the partner solve, then one call per remaining step and one for the residual
    assert inv.model_calls == sum(inv.iterations) + steps
    if masked:
        outside = ~(mask >= 0.5).expand(clean.shape)
        assert torch.equal(back[outside], clean[outside])
        assert torch.equal(noise.residual[outside], torch.zeros_like(noise.residual[outside]))


def test_leapfrog_round_trip_with_a_given_partner_is_exact_for_any_partner(gmm, clean):
    """Any partner inverts exactly (the module's claim); the regenerated partner is handed back too, as the
    inversion used it: rounded to the leapfrog's grid (bit for bit), within 1e-12 of the one given."""
    sigmas = A.normal_sigmas(10)
    partner = clean + 0.1 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(9), dtype=F64)
    noise = core.invert(gmm.denoise, core.LatentState(clean, partner), sigmas, "exact")
    back = core.regenerate(gmm.denoise, noise, sigmas, "exact")
    grid = core.leapfrog_grid(sigmas)
    assert A.rel_err(back.x, clean) < 1e-12 and A.rel_err(back.partner, partner) < 1e-10
    assert torch.equal(back.partner, torch.round(partner / grid) * grid)


@pytest.mark.parametrize("masked", [False, True], ids=["whole", "masked"])
def test_exact_single_solves_every_step_to_tolerance(gmm, clean, mask, masked):
    """Implicit Euler inversion: each solve's residual ≤ tol, the round trip follows (float32 states, tol 1e-6:
    measured 2.6e-6 (whole) and 2.4e-7 (masked) worst relative error over the batch at 10 steps)."""
    sigmas = A.normal_sigmas(10)
    bg = _background(mask, clean, torch.float32) if masked else None
    stats = core.Stats()
    noise = core.invert(gmm.denoise, core.LatentState(clean), sigmas, "exact_single", background=bg, stats=stats)
    assert noise.x.dtype == torch.float32
    assert len(stats.residuals) == 10 and max(stats.residuals) <= 1e-6
    assert all(it >= 2 for it in stats.iterations), "a solve of a nonlinear step cannot converge at its first guess"
    back = core.regenerate(gmm.denoise, noise, sigmas, "exact_single", background=bg).x
    assert A.rel_err(back, clean) < 1e-5


def test_exact_single_tolerance_is_what_limits_the_error(gmm, clean):
    """In float64 the implicit solve reaches what it is asked: round trip ~ tol, not the float32 floor."""
    sigmas = A.normal_sigmas(10).to(F64)
    errs = {}
    for tol in (1e-4, 1e-10):
        stats = core.Stats()
        noise = core.invert_euler(gmm.denoise, clean, sigmas, implicit=True, tol=tol, max_iter=60, stats=stats)
        assert max(stats.residuals) <= tol
        errs[tol] = A.rel_err(core.regenerate_euler(gmm.denoise, noise, sigmas), clean)
    assert errs[1e-10] < 1e-8
    assert errs[1e-10] < 1e-3 * errs[1e-4]


def test_solver_reports_an_unconverged_solve_instead_of_hiding_it():
    """max_iter reached: the residual comes back above tol, so callers can see it."""
    a = torch.tensor([[0.95]], dtype=F64)

    def g(x):   # a slow scalar contraction toward 2.0 with a nonlinear term
        return 0.1 + a * x + 0.001 * torch.sin(x)
    x, residual, evaluations = core.solve_fixed_point(g, torch.zeros(1, 1, dtype=F64), tol=1e-12, max_iter=3)
    assert evaluations == 3 and residual > 1e-12
    x, residual, evaluations = core.solve_fixed_point(g, torch.zeros(1, 1, dtype=F64), tol=1e-12, max_iter=50)
    assert residual <= 1e-12 and evaluations < 50
    assert float((g(x) - x).abs()) < 1e-11


def test_plain_is_approximate_on_the_mixture(gmm, clean):
    """plain: one call per step both ways; measured round trip 0.14 median relative error at 10 steps (worst
    sample 0.82: it lands near another identity), 0.097 median at 20 steps."""
    sigmas = A.normal_sigmas(10)
    stats = core.Stats()
    noise = core.invert(gmm.denoise, core.LatentState(clean), sigmas, "plain", stats=stats)
    back = core.regenerate(gmm.denoise, noise, sigmas, "plain").x
    assert stats.model_calls == 10
    assert 0.05 < A.median_rel_err(back, clean) < 0.5


# ==============================================================================================
# Background held bit-exactly at every step, every method, both directions, eps and flow
# ==============================================================================================

@pytest.mark.parametrize("add_noise", [core.eps_add_noise, core.flow_add_noise], ids=["eps", "flow"])
@pytest.mark.parametrize("method", core.METHODS)
def test_background_is_held_bit_exactly_at_every_model_call(gmm, clean, mask, method, add_noise):
    dtype = core.state_dtype(method)
    sigmas = A.normal_sigmas(8) if add_noise is core.eps_add_noise else torch.linspace(1.0, 0.0, 9)
    bg = _background(mask, clean, dtype, add_noise)
    outside = ~(mask >= 0.5).expand(clean.shape)
    watch_inv = Watch(gmm.denoise, bg)
    noise = core.invert(watch_inv, core.LatentState(clean), sigmas, method, background=bg)
    start = add_noise(bg.latent, bg.noise, sigmas[0].to(dtype))
    assert torch.equal(noise.x[outside], start[outside])
    watch_reg = Watch(gmm.denoise, bg)
    out = core.regenerate(watch_reg, noise, sigmas, method, background=bg).x
    assert watch_inv.calls > 0 and watch_reg.calls == 8
    assert watch_inv.violations == [] and watch_reg.violations == []
    assert watch_inv.clean_calls == ([1] if method == "plain" else []) and watch_reg.clean_calls == []
    assert torch.equal(out[outside], clean.to(dtype)[outside])


def test_background_hold_is_the_documented_formula():
    m = torch.tensor([[[[1.0, 0.0], [0.4, 0.5]]]], dtype=F64)
    latent, noise, x = torch.full((1, 1, 2, 2), 2.0, dtype=F64), torch.full((1, 1, 2, 2), -1.0, dtype=F64), torch.zeros(1, 1, 2, 2, dtype=F64)
    sigma = torch.tensor(0.25, dtype=F64)
    eps = core.Background(m, latent, noise).hold(x, sigma)
    flow = core.Background(m, latent, noise, core.flow_add_noise).hold(x, sigma)
    assert eps.flatten().tolist() == [0.0, 1.75, 1.75, 0.0]                   # 2 + 0.25·(−1)
    assert flow.flatten().tolist() == [0.0, 1.25, 1.25, 0.0]                  # 0.75·2 + 0.25·(−1)


# ==============================================================================================
# Contracts: method table, progress, dtypes
# ==============================================================================================

def test_unknown_method_is_refused_with_the_choices(gmm, clean):
    sigmas = A.normal_sigmas(4)
    for call in (lambda: core.invert(gmm.denoise, core.LatentState(clean), sigmas, "ddim"),
                 lambda: core.regenerate(gmm.denoise, core.NoiseState(clean), sigmas, "ddim")):
        with pytest.raises(ValueError, match="unknown inversion method 'ddim'; choose one of exact, exact_single, plain"):
            call()


@pytest.mark.parametrize("method", core.METHODS)
def test_progress_reports_every_step_with_the_call_count(gmm, clean, method):
    sigmas = A.normal_sigmas(5)
    events = []
    stats = core.Stats()
    noise = core.invert(gmm.denoise, core.LatentState(clean), sigmas, method, progress=events.append, stats=stats)
    core.regenerate(gmm.denoise, noise, sigmas, method, progress=events.append)
    inv = [e for e in events if e["phase"] == "invert"]
    reg = [e for e in events if e["phase"] == "regenerate"]
    assert [e["step"] for e in inv] == list(range(1, 6)) and {e["total"] for e in inv} == {5}
    assert [e["step"] for e in reg] == list(range(1, 6))
    assert inv[-1]["model_calls"] == stats.model_calls
    assert [e["model_calls"] for e in reg] == list(range(1, 6))
    assert stats.last_denoised is not None and stats.last_denoised.shape == clean.shape


def test_state_dtypes():
    assert core.state_dtype("exact") == F64
    assert core.state_dtype("exact_single") == torch.float32 and core.state_dtype("plain") == torch.float32
    assert math.isclose(float(A.normal_sigmas(20)[0]), 14.6146, rel_tol=1e-4)
