"""Checks of the analytic benchmark's closed-form denoiser and schedule (benchmarks/kfbench/analytic.py;
no ComfyUI needed): the benchmark's quality numbers are only as good as this denoiser."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
for path in (BENCH, BENCH.parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from kfbench import analytic as A  # noqa: E402

from keyface_core import protocol  # noqa: E402
from keyface_core import sampling as core  # noqa: E402
from keyface_core.keys import SecretKey  # noqa: E402
from keyface_core.scramble import SCRAMBLES  # noqa: E402


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


@pytest.mark.parametrize("scramble", SCRAMBLES)
def test_v2_protocol_round_trip_on_the_mixture(scramble):
    """invert -> lock -> draw the new face (protocol.render, dpmpp_2m) -> unlock -> retrace gives the original back
    (float64 relative error below 1e-12, float32-equal), in `steps` model calls, for every scramble."""
    gmm = A.GaussianMixture.faces_like()
    x0 = gmm.sample(torch.arange(8), torch.Generator().manual_seed(5)).float().double()   # a LATENT's float32 values
    sigmas = A.normal_sigmas(10)
    mask = A.face_ellipse().expand(8, 1, 16, 16).clone()
    nonces = tuple(bytes([i]) * 16 for i in range(8))
    faces = protocol.FaceBatch(nonces, (0,) * 8, mask, protocol.public_background(x0, mask))
    key = SecretKey(bytes(range(32)), kind="key", source="test key")
    noise = protocol.invert(gmm.denoise, x0, sigmas, faces)
    keyed = protocol.lock(noise, x0, faces, key, method_scramble=scramble)
    anonymized = protocol.render(gmm.denoise, keyed, sigmas)
    assert float(gmm.metrics(anonymized.double())["whitened_dist"].mean()) < 1.5
    stats = core.Stats()
    restored = protocol.retrace(gmm.denoise, protocol.unlock(keyed, key), sigmas, faces, stats=stats)
    assert stats.model_calls == 10
    assert A.rel_err(restored, x0) < 1e-12
    assert torch.equal(restored.float(), x0.float())
