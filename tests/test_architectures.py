"""KeyFace latent nodes on tiny, seeded SDXL, SD3 (MMDiT) and Flux models: ComfyUI's real model classes,
latent formats (SD3/Flux: 16 channels, scale *and* shift), model sampling and conditioning paths."""

from __future__ import annotations

import pytest
import torch

ARCHS = ["sdxl", "sd3", "flux"]
# cfg per architecture as users run them: SDXL/SD3 with a negative prompt, Flux guidance-distilled at cfg 1.
CFG = {"sdxl": 3.0, "sd3": 2.0, "flux": 1.0}
STEPS = 6


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def arch(host):
    """{name: (model, positive, negative or None)} for the three tiny architectures."""
    from keyface_dev import tiny_models
    out = {}
    for name in ARCHS:
        positive = tiny_models.conditioning(name, 0)
        negative = tiny_models.conditioning(name, 1) if CFG[name] != 1.0 else None
        out[name] = (tiny_models.ARCHITECTURES[name](0), positive, negative)
    return out


def image_latent(model, batch=1, seed=0):
    """A VAE-space latent whose model-space values are unit Gaussian (as a real VAE's roughly are)."""
    fmt = model.model.latent_format
    generator = torch.Generator().manual_seed(seed)
    state = torch.randn([batch, fmt.latent_channels, 8, 8], generator=generator)
    return {"samples": fmt.process_out(state).to(torch.float32)}


def pixel_mask(batch):
    """A [B, 64, 64] pixel mask, a different face box per item (latent 8x8: box at 1/8 size)."""
    mask = torch.zeros(batch, 64, 64)
    mask[0, 16:48, 8:40] = 1.0
    if batch > 1:
        mask[1, 24:56, 24:64] = 1.0
    return mask


def anonymize(kf, model, latent, key, positive, negative, cfg, mask=None, mode="exact"):
    C = kf.core_nodes
    noise, _ = C.invert_latent(model, latent, STEPS, "normal", mode, cfg, positive=positive, negative=negative, mask=mask)
    anonymized, _ = C.regenerate_latent(model, C.flip_latent(noise, key), positive=positive, negative=negative)
    return noise, anonymized


def test_tiny_models_are_the_real_architectures(arch):
    import comfy.latent_formats
    import comfy.model_base
    import comfy.model_sampling
    M = comfy.model_sampling
    expected = {"sdxl": (comfy.model_base.SDXL, comfy.latent_formats.SDXL, (M.EPS, M.ModelSamplingDiscrete), 4),
                "sd3": (comfy.model_base.SD3, comfy.latent_formats.SD3, (M.CONST, M.ModelSamplingDiscreteFlow), 16),
                "flux": (comfy.model_base.Flux, comfy.latent_formats.Flux, (M.CONST, M.ModelSamplingFlux), 16)}
    for name, (model, positive, _) in arch.items():
        base_cls, fmt_cls, sampling_classes, channels = expected[name]
        assert type(model.model) is base_cls
        assert type(model.model.latent_format) is fmt_cls and model.model.latent_format.latent_channels == channels
        for cls in sampling_classes:
            assert isinstance(model.get_model_object("model_sampling"), cls)
        params = sum(p.numel() for p in model.model.diffusion_model.parameters())
        assert params < 3_000_000, (name, params)
        assert "pooled_output" in positive[0][1]
    assert float(arch["flux"][0].model.latent_format.shift_factor) != 0.0
    assert float(arch["sd3"][0].model.latent_format.shift_factor) != 0.0
    assert arch["flux"][1][0][1]["guidance"] == 3.5


@pytest.mark.parametrize("name", ARCHS)
def test_every_conditioning_input_reaches_the_model(arch, kf, name):
    """Cross-attention, the pooled vector (SDXL ADM, SD3 y, Flux vector_in) and Flux guidance all change the output."""
    from keyface_dev import tiny_models
    model, positive, _ = arch[name]
    C = kf.core_nodes
    latent = image_latent(model)
    (cross, extra), = positive
    variants = {"cross_attn": [[tiny_models.conditioning(name, 1)[0][0], extra]],
                "pooled_output": [[cross, dict(extra, pooled_output=-extra["pooled_output"])]]}
    if name == "flux":
        variants["guidance"] = tiny_models.conditioning("flux", 0, guidance=1.0)
    base = C.invert_latent(model, latent, 2, "normal", "exact", 1.0, positive=positive)[0]["samples"]
    assert torch.isfinite(base).all()
    for what, cond in variants.items():
        other = C.invert_latent(model, latent, 2, "normal", "exact", 1.0, positive=cond)[0]["samples"]
        assert rel(other, base) > 1e-3, what


@pytest.mark.parametrize("name", ARCHS)
def test_exact_restore_and_wrong_key(arch, kf, key_pair, name):
    model, positive, negative = arch[name]
    key, other = key_pair
    C = kf.core_nodes
    latent = image_latent(model)
    noise, anonymized = anonymize(kf, model, latent, key, positive, negative, CFG[name])
    for out in (noise, anonymized):
        assert torch.isfinite(out["samples"]).all()
    restored, stats = C.restore_latent(model, anonymized, key, positive=positive, negative=negative)
    error, change = rel(restored["samples"], latent["samples"]), rel(anonymized["samples"], latent["samples"])
    print(f"\n[{name}] exact, {STEPS} steps, cfg {CFG[name]}: restore error {error:.3g}, anonymized differs by {change:.3g}, "
          f"restore calls {stats['model_calls']}, {stats['verification'].message()}")
    assert torch.equal(restored["samples"], latent["samples"])      # measured: error 0
    assert stats["model_calls"] == STEPS and stats["verification"].exact
    assert change > 0.05
    with pytest.raises(kf.errors.WrongKeyError):
        C.restore_latent(model, anonymized, other, positive=positive, negative=negative)


@pytest.mark.parametrize("name", ARCHS)
def test_masked_batch_holds_the_background_and_restores(arch, kf, key_pair, name):
    model, positive, negative = arch[name]
    C = kf.core_nodes
    latent = image_latent(model, batch=2, seed=1)
    _, anonymized = anonymize(kf, model, latent, key_pair[0], positive, negative, CFG[name], mask=pixel_mask(2))
    info = anonymized["keyface"]
    inside = info.keyed.faces.mask.bool().expand_as(latent["samples"])
    assert 0 < int(inside.sum()) < inside.numel()
    # The stored background holds the original outside the mask and nothing inside it.
    original_state = model.model.latent_format.process_in(latent["samples"].double())
    assert torch.equal(info.keyed.faces.background[~inside], original_state[~inside])
    assert bool((info.keyed.faces.background[inside] == 0).all())
    for item in range(2):   # each face changed, not just the batch on average
        item_inside = inside[item]
        assert rel(anonymized["samples"][item][item_inside], latent["samples"][item][item_inside]) > 0.05
    restored, _ = C.restore_latent(model, anonymized, key_pair[0], positive=positive, negative=negative)
    error = rel(restored["samples"], latent["samples"])
    print(f"\n[{name}] masked batch of 2: restore error {error:.3g}, "
          f"samples outside the mask equal: {torch.equal(anonymized['samples'][~inside], latent['samples'][~inside])}")
    assert torch.equal(restored["samples"], latent["samples"])
    with pytest.raises(kf.errors.WrongKeyError):
        C.restore_latent(model, anonymized, key_pair[1], positive=positive, negative=negative)


@pytest.mark.parametrize("name", ARCHS)
def test_models_without_a_default_conditioning_ask_for_one(arch, kf, key_pair, name):
    model, positive, negative = arch[name]
    C = kf.core_nodes
    latent = image_latent(model)
    with pytest.raises(kf.errors.InputMismatchError, match="needs a conditioning.*positive CONDITIONING"):
        C.invert_latent(model, latent, STEPS, "normal", "exact", 1.0, positive=None)
    # The same check guards Regenerate and Restore when the conditioning is left unconnected there.
    noise = C.flip_latent(C.invert_latent(model, latent, STEPS, "normal", "exact", 1.0, positive=positive)[0], key_pair[0])
    _, anonymized = anonymize(kf, model, latent, key_pair[0], positive, None, 1.0)
    with pytest.raises(kf.errors.InputMismatchError, match="needs a conditioning"):
        C.regenerate_latent(model, noise, positive=None)
    with pytest.raises(kf.errors.InputMismatchError, match="needs a conditioning"):
        C.restore_latent(model, anonymized, key_pair[0], positive=None)


@pytest.mark.parametrize("mode", ["exact", "exact_single", "plain"])
def test_flux_flip_twice_is_bit_exact_with_a_shifted_latent_format(arch, kf, key_pair, mode):
    model, positive, _ = arch["flux"]
    C = kf.core_nodes
    noise, _ = C.invert_latent(model, image_latent(model), 3, "normal", mode, 1.0, positive=positive)
    once = C.flip_latent(noise, key_pair[0])
    twice = C.flip_latent(once, key_pair[0])
    assert torch.equal(twice["samples"], noise["samples"])
    assert torch.equal(twice["keyface"].state.x, noise["keyface"].state.x)
    if noise["keyface"].state.residual is not None:
        assert torch.equal(twice["keyface"].state.residual, noise["keyface"].state.residual)
    assert not torch.equal(once["samples"], noise["samples"])


@pytest.mark.parametrize("mode", ["plain", "exact_single"])
def test_flux_single_state_modes_smoke(arch, kf, key_pair, mode):
    model, positive, _ = arch["flux"]
    C = kf.core_nodes
    latent = image_latent(model)
    noise, anonymized = anonymize(kf, model, latent, key_pair[0], positive, None, 1.0, mode=mode)
    restored, _ = C.restore_latent(model, anonymized, key_pair[0], positive=positive)
    for out in (noise, anonymized, restored):
        assert torch.isfinite(out["samples"]).all()
    print(f"\n[flux] {mode}: anonymized differs by {rel(anonymized['samples'], latent['samples']):.3g}, "
          f"restore error {rel(restored['samples'], latent['samples']):.3g}")
    assert rel(anonymized["samples"], latent["samples"]) > 0.05


@pytest.mark.parametrize("name", ["flux", "sdxl"])
def test_restore_with_other_scalar_conditioning_is_refused(arch, kf, key_pair, name):
    model, positive, _ = arch[name]
    C = kf.core_nodes
    latent = image_latent(model)
    _, anonymized = anonymize(kf, model, latent, key_pair[0], positive, None, 1.0)
    (cross, extra), = positive
    changed = {"guidance": 1.0} if name == "flux" else {"width": 1024, "height": 1024}
    try:
        restored, _ = C.restore_latent(model, anonymized, key_pair[0], positive=[[cross, dict(extra, **changed)]])
    except kf.errors.InputMismatchError:
        return
    raise AssertionError(f"restore accepted {changed}; restore error {rel(restored['samples'], latent['samples']):.3g}")


def test_images_fingerprinted_before_scalars_were_hashed_still_restore(arch, kf, key_pair):
    """A latent whose stored conditioning id is the legacy (tensors-only) one restores with the same prompt."""
    model, positive, _ = arch["flux"]
    C = kf.core_nodes
    latent = image_latent(model)
    _, anonymized = anonymize(kf, model, latent, key_pair[0], positive, None, 1.0)
    info = anonymized["keyface"]
    legacy = kf.conditioning.legacy_conditioning_id(positive, positive)
    assert not legacy.startswith(kf.conditioning.COND_ID_PREFIX) and info.settings.cond_id.startswith(kf.conditioning.COND_ID_PREFIX)
    from dataclasses import replace
    old = C.make_latent(anonymized, anonymized["samples"], replace(info, settings=replace(info.settings, cond_id=legacy)))
    restored, _ = C.restore_latent(model, old, key_pair[0], positive=positive)
    assert torch.equal(restored["samples"], latent["samples"])
    other = tiny_conditioning("flux", 5)
    with pytest.raises(kf.errors.InputMismatchError, match="conditioning differs"):
        C.restore_latent(model, old, key_pair[0], positive=other)


@pytest.mark.parametrize("name", ["sdxl", "flux"])
def test_conditioning_without_pooled_output_says_what_to_connect(arch, kf, name):
    model, positive, _ = arch[name]
    (cross, extra), = positive
    bare = [[cross, {k: v for k, v in extra.items() if k != "pooled_output"}]]
    with pytest.raises(kf.errors.InputMismatchError, match="pooled text embedding"):
        kf.core_nodes.invert_latent(model, image_latent(model), 2, "normal", "exact", 1.0, positive=bare)


def tiny_conditioning(name, seed):
    from keyface_dev import tiny_models
    return tiny_models.conditioning(name, seed)
