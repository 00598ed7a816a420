"""Issue 14 item 2 (part): the conditioning fingerprint sees a ControlNet applied with ComfyUI's own
ControlNetApplyAdvanced: a changed hint, strength, start/end percent, chained ControlNet or ControlNet weights gives
another id (so Restore refuses it), the same one gives the same id, and ids stored in the c2 form still verify."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def apply(host, kf):
    import comfy.controlnet
    import nodes as comfy_nodes

    def control(seed=0):
        torch.manual_seed(seed)
        return comfy.controlnet.ControlNet(torch.nn.Conv2d(3, 4, 3), load_device=torch.device("cpu"))

    def conds(net, hint, strength=0.8, start=0.0, end=1.0, chain=None):
        positive = [[torch.ones(1, 77, 768), {"pooled_output": torch.zeros(1, 768)}]]
        negative = [[torch.zeros(1, 77, 768), {}]]
        node = comfy_nodes.ControlNetApplyAdvanced()
        if chain is not None:
            positive, negative = node.apply_controlnet(positive, negative, chain, hint, 0.5, 0.0, 1.0)
        return node.apply_controlnet(positive, negative, net, hint, strength, start, end)
    return control, conds


def hint(value=0.5):
    image = torch.zeros(1, 64, 64, 3)
    image[:, 20:40, 20:40] = value
    return image


def test_controlnet_changes_are_refused_and_the_same_one_matches(kf, apply):
    control, conds = apply
    C = kf.conditioning
    net = control()
    stored = C.conditioning_id(*conds(net, hint()))
    assert stored.startswith("c3-")
    assert C.conditioning_matches(stored, *conds(net, hint()))            # same everything: accepted
    assert C.conditioning_matches(stored, *conds(control(0), hint()))     # a fresh load of the same weights
    changed = {
        "hint": conds(net, hint(0.51)),
        "strength": conds(net, hint(), strength=0.7),
        "start": conds(net, hint(), start=0.1),
        "end": conds(net, hint(), end=0.9),
        "weights": conds(control(1), hint()),
        "chain": conds(net, hint(), chain=control(2)),
    }
    ids = {name: C.conditioning_id(*c) for name, c in changed.items()}
    for name, c in changed.items():
        assert not C.conditioning_matches(stored, *c), name
    assert len(set(ids.values()) | {stored}) == len(ids) + 1


def test_c2_ids_still_verify(kf, apply):
    """A file saved with the c2 form (ControlNet hashed by type only) keeps restoring with its own conditioning."""
    control, conds = apply
    C = kf.conditioning
    old = C.conditioning_id(*conds(control(), hint()), form=C.C2_PREFIX)
    assert old.startswith("c2-")
    assert C.conditioning_matches(old, *conds(control(), hint()))
    plain = [[torch.ones(1, 77, 768), {}]], [[torch.zeros(1, 77, 768), {}]]
    assert C.conditioning_matches(C.conditioning_id(*plain, form=C.C2_PREFIX), *plain)


@pytest.fixture(scope="module")
def controlled(host, tiny):
    """The tiny SD1.5 model, a prompt from the tiny CLIP, and ComfyUI's ControlNetApplyAdvanced with a seeded
    tiny ControlNet of ComfyUI's real classes (hint 64x64 for the 8x8 latent)."""
    import nodes as comfy_nodes
    from keyface_dev import tiny_models
    models, _, clip = tiny
    positive = comfy_nodes.CLIPTextEncode().encode(clip, "a photo of a face")[0]
    negative = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
    net = tiny_models.controlnet(3)

    def apply(hint_image, strength=0.9):
        return comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, net, hint_image,
                                                                      strength, 0.0, 1.0)
    return models["eps"], apply


def test_exact_restore_with_a_controlnet_in_the_graph(kf, key_pair, controlled):
    """Invert to Noise -> Apply Key Flip -> Regenerate -> Restore with the ControlNet in the conditioning: the
    restored latent is the original bit for bit (error 0); a changed hint or strength is refused, clearly."""
    model, apply = controlled
    C = kf.core_nodes
    generator = torch.Generator().manual_seed(0)
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=generator)}
    positive, negative = apply(hint())
    without = C.invert_latent(model, latent, 4, "normal", "exact", 2.0,
                              positive=apply(hint(), strength=0.0)[0], negative=negative)[0]
    noise, _ = C.invert_latent(model, latent, 4, "normal", "exact", 2.0, positive=positive, negative=negative)
    assert not torch.equal(noise["samples"], without["samples"])          # the ControlNet steers the model
    anonymized, _ = C.regenerate_latent(model, C.flip_latent(noise, key_pair[0]), positive=positive, negative=negative)
    restored, stats = C.restore_latent(model, anonymized, key_pair[0], positive=positive, negative=negative)
    assert torch.equal(restored["samples"], latent["samples"]) and stats["verification"].exact
    for changed in (apply(hint(0.6)), apply(hint(), strength=0.8)):
        with pytest.raises(kf.errors.InputMismatchError, match="conditioning"):
            C.restore_latent(model, anonymized, key_pair[0], positive=changed[0], negative=changed[1])
