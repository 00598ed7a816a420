"""keyface_core.protocol (format v2) on closed-form denoisers, without ComfyUI: the contract every adapter calls."""

from __future__ import annotations

import math

import pytest
import torch

from keyface_core import protocol, sampling
from keyface_core.errors import InputMismatchError, NoFaceError, WrongKeyError
from keyface_core.keys import SecretKey

KEY = SecretKey(bytes(range(32)), kind="key", source="test key")
OTHER = SecretKey(bytes(range(1, 33)), kind="key", source="other key")


def gaussian_denoiser(x, sigma):
    """Posterior mean of x0 ~ N(0, I) given x = x0 + sigma * eps."""
    return x / (1.0 + sigma ** 2)


def nonlinear_denoiser(x, sigma):
    """A smooth nonlinear stand-in for a UNet (chaotic enough that a wrong bit would show)."""
    return torch.tanh(x) / (1.0 + sigma) + 0.1 * torch.roll(x, 1, dims=-1) / (1.0 + sigma ** 2)


def flow_denoiser(x, sigma):
    return torch.tanh(x * (1 - sigma)) * 0.5


def sigmas_eps(steps=12):
    # karras-like, ending at 0
    ramp = torch.linspace(0, 1, steps)
    smin, smax, rho = 0.03, 14.6, 7.0
    s = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1)]).to(torch.float32)


def sigmas_flow(steps=10):
    return torch.linspace(1, 0, steps + 1).to(torch.float32)


def batch(masked=True, items=2, shape=(4, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn((items, *shape), generator=g, dtype=torch.float64)
    mask = None
    if masked:
        mask = torch.zeros((items, 1, *shape[1:]))
        mask[:, :, 2:6, 1:7] = 1
    nonces = tuple(bytes([seed, item]) * 8 for item in range(items))   # fixed: the test is deterministic
    faces = protocol.FaceBatch(nonces, tuple(range(items)), mask,
                               protocol.public_background(clean, mask))
    return clean, faces


@pytest.mark.parametrize("denoise,sigmas,add_noise", [
    (nonlinear_denoiser, sigmas_eps(), sampling.eps_add_noise),
    (gaussian_denoiser, sigmas_eps(), sampling.eps_add_noise),
    (flow_denoiser, sigmas_flow(), sampling.flow_add_noise)])
@pytest.mark.parametrize("scramble", ["pairswap", "signflip"])
@pytest.mark.parametrize("masked", [True, False])
def test_restore_is_bit_exact_and_costs_steps_calls(denoise, sigmas, add_noise, scramble, masked):
    clean, faces = batch(masked)
    noise = protocol.invert(denoise, clean, sigmas, faces, add_noise=add_noise)
    keyed = protocol.lock(noise, clean, faces, KEY, method_scramble=scramble)
    assert not torch.equal(keyed.x, noise.x)
    stats = sampling.Stats()
    restored = protocol.retrace(denoise, protocol.unlock(keyed, KEY), sigmas, faces, add_noise=add_noise, stats=stats)
    # float64 algebra leaves ~1e-16; in float32 (the LATENT users see) the restore is bit for bit
    assert float((restored - clean).abs().max()) <= 1e-8
    assert torch.equal(restored.to(torch.float32), clean.to(torch.float32))
    assert stats.model_calls == len(sigmas) - 1              # restore costs exactly `steps` model calls
    assert protocol.verify(restored, keyed, KEY).exact is True


def test_lock_changes_only_the_mask_and_unlock_is_its_inverse():
    clean, faces = batch()
    noise = protocol.invert(nonlinear_denoiser, clean, sigmas_eps(), faces)
    keyed = protocol.lock(noise, clean, faces, KEY)
    outside = faces.mask.expand_as(noise.x) < 0.5
    assert torch.equal(keyed.x[outside], noise.x[outside])
    assert not torch.equal(keyed.x[~outside], noise.x[~outside])
    back = protocol.unlock(keyed, KEY)
    assert torch.equal(back.x, noise.x) and torch.equal(back.residual, noise.residual)
    # The file side never holds the second state, and the stored background holds no face.
    assert all(s is not None for s in keyed.lock.sealed_residuals)
    assert bool((faces.background[~outside] == 0).all())


def test_wrong_key_is_refused_and_when_allowed_gives_another_face():
    clean, faces = batch()
    sigmas = sigmas_eps()
    noise = protocol.invert(nonlinear_denoiser, clean, sigmas, faces)
    keyed = protocol.lock(noise, clean, faces, KEY)
    with pytest.raises(WrongKeyError, match="does not match"):
        protocol.unlock(keyed, OTHER)
    wrong = protocol.unlock(keyed, OTHER, allow_wrong_key=True)
    assert torch.equal(wrong.residual, torch.zeros_like(wrong.residual))    # nothing unsealed for a wrong key
    other = protocol.retrace(nonlinear_denoiser, wrong, sigmas, faces)
    inside = faces.mask.expand_as(clean) >= 0.5
    change = float((other - clean)[inside].norm() / clean[inside].norm())
    assert change > 0.3
    assert torch.isfinite(other).all()
    verdict = protocol.verify(other, keyed, OTHER)
    assert verdict.exact is False and verdict.wrong_key and "key does not match" in verdict.message()


def test_verify_measures_a_numerics_difference():
    clean, faces = batch()
    sigmas = sigmas_eps()
    noise = protocol.invert(nonlinear_denoiser, clean, sigmas, faces)
    keyed = protocol.lock(noise, clean, faces, KEY)
    restored = protocol.retrace(nonlinear_denoiser, protocol.unlock(keyed, KEY), sigmas, faces)
    nudged = restored + 1e-2 * torch.randn_like(restored)
    verdict = protocol.verify(nudged, keyed, KEY)
    assert verdict.exact is False
    expected = float((nudged - clean).norm() / clean.norm())
    assert math.isclose(verdict.relative_error, expected, rel_tol=1e-3)  # against the sealed float32 reference
    assert "differs from the original by" in verdict.message()


def test_sampler_start_noise_gives_the_keyed_noise_inside_and_the_background_outside():
    clean, faces = batch()
    sigmas = sigmas_eps()
    noise = protocol.invert(nonlinear_denoiser, clean, sigmas, faces)
    keyed = protocol.lock(noise, clean, faces, KEY)
    sigma0 = float(sigmas[0])
    for max_denoise in (False, True):
        start, latent = protocol.sampler_start_noise(keyed.x, faces, sigma0, flow=False, max_denoise=max_denoise)
        scale = math.sqrt(1 + sigma0 ** 2) if max_denoise else sigma0
        first = latent + scale * start                                    # ComfyUI's EPS.noise_scaling
        inside = faces.mask.expand_as(clean) >= 0.5
        assert torch.allclose(first[inside], keyed.x[inside], rtol=1e-12, atol=1e-12)
        held = protocol.make_background(faces).hold(keyed.x, torch.tensor(sigma0, dtype=torch.float64))
        assert torch.allclose((latent + sigma0 * start)[~inside], held[~inside], rtol=1e-12, atol=1e-12)
        assert bool((latent[inside] == 0).all())                          # the original face never enters the draw


def test_render_holds_the_background_and_draws_inside():
    clean, faces = batch()
    sigmas = sigmas_eps()
    noise = protocol.invert(gaussian_denoiser, clean, sigmas, faces)
    keyed = protocol.lock(noise, clean, faces, KEY)
    for name in protocol.RENDER_SAMPLERS:
        out = protocol.render(gaussian_denoiser, keyed, sigmas, sampler=name)
        outside = faces.mask.expand_as(clean) < 0.5
        assert torch.equal(out[outside], clean.to(torch.float32)[outside])
        assert float((out - clean.float())[~outside].norm()) > 0.1


def test_empty_mask_and_unknown_scramble_are_refused():
    clean, faces = batch()
    empty = protocol.FaceBatch(faces.nonces, faces.face_indices, torch.zeros_like(faces.mask), faces.background)
    with pytest.raises(NoFaceError, match="empty on the latent grid"):
        protocol.invert(gaussian_denoiser, clean, sigmas_eps(), empty)
    noise = protocol.invert(gaussian_denoiser, clean, sigmas_eps(), faces)
    with pytest.raises(InputMismatchError, match="unknown scramble"):
        protocol.lock(noise, clean, faces, KEY, method_scramble="rot13")


def test_verify_calls_a_float32_rounding_difference_exact_and_says_so():
    clean, faces = batch()
    sigmas = sigmas_eps()
    noise = protocol.invert(nonlinear_denoiser, clean, sigmas, faces)
    keyed = protocol.lock(noise, clean, faces, KEY)
    restored = protocol.retrace(nonlinear_denoiser, protocol.unlock(keyed, KEY), sigmas, faces)
    one_ulp = restored.to(torch.float32).clone()
    one_ulp.view(-1)[5] = torch.nextafter(one_ulp.view(-1)[5], torch.tensor(float("inf")))
    verdict = protocol.verify(one_ulp.double(), keyed, KEY)
    assert verdict.exact and verdict.differing == 1 and verdict.ulps == 1
    assert "to float32 rounding: 1 of 512" in verdict.message()
