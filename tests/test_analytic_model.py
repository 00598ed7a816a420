"""Checks of the analytic benchmark's closed-form denoiser and schedule (benchmarks/kfbench/analytic.py;
no ComfyUI needed): the benchmark's quality numbers are only as good as this denoiser."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
for path in (BENCH, BENCH.parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from kfbench import analytic as A


def test_denoiser_is_the_posterior_mean():
    checks = A.verify_denoiser()
    for name, bound in A.CHECK_BOUNDS.items():
        assert checks[name] <= bound, (name, checks)


def test_true_samples_look_true():
    gmm = A.GaussianMixture.faces_like()
    ids = torch.arange(64) % gmm.k
    m = A.summarize(gmm.metrics(gmm.sample(ids, torch.Generator().manual_seed(3))), ids)
    assert abs(m["whitened_dist"] - 1.0) < 0.02
    assert m["same_identity"] == 1.0 and m["unambiguous"] == 1.0


def test_denoiser_limits_and_dtype():
    gmm = A.GaussianMixture.faces_like()
    x = gmm.sample(torch.arange(4), torch.Generator().manual_seed(4))
    assert gmm.denoise(x.float(), torch.tensor(1.0)).dtype == torch.float32
    # at a huge sigma the posterior is the prior mean (equal weights)
    far = gmm.denoise(1e4 * torch.randn(2, *gmm.shape, dtype=torch.float64), torch.tensor(1e6, dtype=torch.float64))
    assert torch.allclose(far.reshape(2, -1), gmm.means.mean(0).expand(2, -1), atol=1e-3)


def test_schedules_match_comfyui_formulas():
    normal = A.normal_sigmas(20)
    assert normal.shape == (21,) and float(normal[-1]) == 0.0
    assert abs(float(normal[0]) - 14.6146) < 1e-3 and abs(float(normal[-2]) - 0.0292) < 1e-3
    assert bool((normal[:-1] > normal[1:]).all())
    karras = A.karras_sigmas(20)
    assert abs(float(karras[0]) - float(normal[0])) < 1e-5 and abs(float(karras[-2]) - float(normal[-2])) < 1e-6
    theirs = A.comfy_sigmas("normal", 20)   # None unless ComfyUI is importable in this process
    if theirs is not None:
        assert torch.equal(normal, theirs)


def test_exact_round_trip_and_flip_restore_on_the_mixture():
    from keyface_core import sampling as core
    gmm = A.GaussianMixture.faces_like()
    x0 = gmm.sample(torch.arange(8), torch.Generator().manual_seed(5))
    sigmas = A.normal_sigmas(10)
    noise = core.invert(gmm.denoise, core.LatentState(x0), sigmas, "exact")
    signs = torch.where(torch.rand(x0.shape, generator=torch.Generator().manual_seed(6)) < 0.5, -1.0, 1.0).double()
    anon = core.regenerate(gmm.denoise, core.NoiseState(noise.x * signs, noise.residual * signs), sigmas, "exact")
    back = core.invert(gmm.denoise, anon, sigmas, "exact")
    restored = core.regenerate(gmm.denoise, core.NoiseState(back.x * signs, back.residual * signs), sigmas, "exact").x
    assert A.rel_err(restored, x0) < 1e-10
