"""Exact restore at every latent scale (branch `exact`): the leapfrog's grid arithmetic.

The bug: a model that runs in float32 (ComfyUI's, the `dev:comfy-*` backend) sees float32(state), a step function
of the float64 state. The plain float64 leapfrog's round trip leaves ~1e-12 differences between the inversion's
states and the retrace's; where one moved float32(state) across a rounding boundary the model answered
differently and the leapfrog amplified it (measured: 1.5e-7 on the dev ComfyUI backend, 10 karras steps, std
0.01; 1.6e-3 reported at std 0.05). Small latents hit it most: their float32 steps are finest. Now every state
but the last is on a power-of-two grid where the steps are exact, so the retrace meets the inversion's states
(and model inputs) bit for bit.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from keyface_core import protocol, record, sampling
from keyface_core.keys import SecretKey

KEY = SecretKey(bytes(range(32)), kind="key", source="test key")
SCALES = [0.01, 0.05, 0.2, 1.0, 5.0]
SIGMAS = torch.tensor([14.6146, 2.9183, 0.6582, 0.0292, 0.0], dtype=torch.float32)   # 4 karras-like steps
FIXTURE = Path(__file__).parent / "fixtures" / "v2_legacy"
_W = torch.randn(4, 4, generator=torch.Generator().manual_seed(1)) * 0.5


def float32_denoiser(x, sigma):
    """A nonlinear eps model evaluated like ComfyUI's: on float32(x), in float32."""
    x, s = x.to(torch.float32), float(sigma)
    c_in = 1.0 / (s * s + 1.0) ** 0.5
    eps = torch.tanh(torch.einsum("ij,bjhw->bihw", _W, torch.tanh(x * c_in)) + x * c_in)
    return x - s * eps


def _batch(std, masked, seed=0):
    clean = torch.randn([2, 4, 8, 8], generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * std
    mask = None
    if masked:
        mask = torch.zeros(2, 1, 8, 8)
        mask[:, :, 2:6, 1:5] = 1
    faces = protocol.FaceBatch((b"\x01" * 16, b"\x02" * 16), (0, 1), mask, protocol.public_background(clean, mask))
    return clean, faces


class _Recording:
    """The denoiser, keeping every float64 input it was called with."""

    def __init__(self):
        self.inputs = []

    def __call__(self, x, sigma):
        self.inputs.append(x.clone())
        return float32_denoiser(x, sigma)


@pytest.mark.parametrize("masked", [False, True], ids=["whole", "masked"])
@pytest.mark.parametrize("std", SCALES)
def test_protocol_restores_bit_for_bit_at_every_scale(std, masked):
    clean, faces = _batch(std, masked)
    keyed = protocol.lock(protocol.invert(float32_denoiser, clean, SIGMAS, faces), clean, faces, KEY)
    restored = protocol.retrace(float32_denoiser, protocol.unlock(keyed, KEY), SIGMAS, faces)
    assert torch.equal(restored.float(), clean.float())
    # The last state's only rounding is carried back in the residual: float64 error ~1e-16, not ~1e-12.
    assert float((restored - clean).abs().max()) <= 1e-14
    verdict = protocol.verify(restored, keyed, KEY)
    assert verdict.exact and verdict.differing == 0 and "bit for bit" in verdict.message()


@pytest.mark.parametrize("numerics", ["grid", "legacy"])
@pytest.mark.parametrize("std", [0.01, 1.0])
def test_the_retrace_meets_every_inversion_state_bit_for_bit(std, numerics):
    """The cause, pinned: with the grid every model input of the retrace equals the inversion's (in reverse
    order) bit for bit; with the plain float64 arithmetic of older files they differ in the last bits."""
    clean, faces = _batch(std, masked=True)
    background = protocol.make_background(faces)
    inverse, forward = _Recording(), _Recording()
    stats = sampling.Stats()
    noise = sampling.invert(inverse, sampling.LatentState(clean), SIGMAS, "exact", background=background,
                            stats=stats, numerics=numerics)
    sampling.regenerate(forward, noise, SIGMAS, "exact", background=background, numerics=numerics)
    solved = sum(stats.iterations)                              # the partner solve's calls come first
    retraced = list(reversed(inverse.inputs[solved:]))          # z_0 .. z_{N-1}
    assert len(retraced) == len(forward.inputs) == len(SIGMAS) - 1
    same = [torch.equal(a, b) for a, b in zip(retraced, forward.inputs)]
    if numerics == "grid":
        assert all(same)
    else:
        assert not all(same)
        assert max(float((a - b).abs().max()) for a, b in zip(retraced, forward.inputs)) < 1e-9


def test_numerics_are_read_from_the_noise():
    clean, faces = _batch(0.2, masked=True)
    background = protocol.make_background(faces)
    for numerics in sampling.NUMERICS:
        noise = sampling.invert(float32_denoiser, sampling.LatentState(clean), SIGMAS, "exact",
                                background=background, numerics=numerics)
        assert sampling.leapfrog_numerics(noise.x, SIGMAS, background) == numerics
        keyed = protocol.lock(noise, clean, faces, KEY)   # a key's scramble keeps grid values on the grid
        assert sampling.leapfrog_numerics(keyed.x, SIGMAS, background) == numerics
    with pytest.raises(ValueError, match="unknown leapfrog numerics"):
        sampling.invert(float32_denoiser, sampling.LatentState(clean), SIGMAS, "exact", numerics="fast")


def test_a_file_written_before_the_grid_restores_as_it_did():
    """tests/fixtures/v2_legacy: a record made by the code before this change (make_fixture.py)."""
    import test_record as T
    expected = json.loads((FIXTURE / "expected.json").read_text())
    back = record.decode((FIXTURE / "record.bin").read_bytes())
    noise = protocol.unlock(back.keyed, T.KEY)
    background = protocol.make_background(back.keyed.faces)
    assert sampling.leapfrog_numerics(noise.x, back.inversion.sigmas, background) == "legacy"
    restored = protocol.retrace(T.denoise, noise, back.inversion.sigmas, back.keyed.faces)
    f64 = hashlib.sha256(np.ascontiguousarray(restored.numpy(), dtype="<f8").tobytes()).hexdigest()
    f32 = hashlib.sha256(np.ascontiguousarray(restored.float().numpy(), dtype="<f4").tobytes()).hexdigest()
    assert f64 == expected["restored_f64_sha256"] and f32 == expected["original_f32_sha256"]
    assert protocol.verify(restored, back.keyed, T.KEY).exact


@pytest.fixture(scope="module")
def eps_model(tiny):
    return tiny[0]["eps"]


@pytest.mark.parametrize("std", SCALES)
def test_nodes_restore_bit_for_bit_at_every_scale(kf, key_pair, eps_model, std):
    """Invert to Noise -> Apply Key Flip -> Regenerate -> Restore on the tiny ComfyUI UNet, 4 steps, 8x8."""
    C, key = kf.core_nodes, key_pair[0]
    fmt = eps_model.model.latent_format
    state = torch.randn([2, 4, 8, 8], generator=torch.Generator().manual_seed(0)) * std
    latent = {"samples": fmt.process_out(state).to(torch.float32)}
    mask = torch.zeros(2, 64, 64)
    mask[:, 16:48, 8:40] = 1
    for m in (None, mask):
        noise, _ = C.invert_latent(eps_model, latent, 4, "karras", "exact", 1.0, mask=m)
        anonymized, _ = C.regenerate_latent(eps_model, C.flip_latent(noise, key))
        restored, info = C.restore_latent(eps_model, anonymized, key)
        assert torch.equal(restored["samples"], latent["samples"])
        verdict = info["verification"]
        assert verdict.exact and verdict.differing == 0 and "bit for bit" in verdict.message()


@pytest.fixture(scope="module")
def comfy_denoiser(host):
    from keyface_dev import comfy_backend
    model = comfy_backend.load("dev:comfy-tiny")
    model.set_conditioning("", "", 1.0)
    yield model
    model.close()


@pytest.mark.parametrize("std", SCALES)
def test_protocol_on_comfyui_denoiser_restores_bit_for_bit(comfy_denoiser, std):
    """The reported setup: the `dev:comfy-tiny` backend (ComfyUI's own CFGGuider, float32 x0), 4 karras steps."""
    m = comfy_denoiser
    sigmas = m.sigmas(4, "karras")
    for masked in (False, True):
        clean, faces = _batch(std, masked)
        keyed = protocol.lock(protocol.invert(m.denoise, clean, sigmas, faces, add_noise=m.add_noise), clean, faces, KEY)
        restored = protocol.retrace(m.denoise, protocol.unlock(keyed, KEY), sigmas, faces, add_noise=m.add_noise)
        assert torch.equal(restored.float(), clean.float())
        assert float((restored - clean).abs().max()) <= 1e-14
        assert protocol.verify(restored, keyed, KEY).differing == 0
