"""Conditioning fingerprints: Regenerate and Restore refuse a prompt, CLIP or setting other than the inversion's."""

from __future__ import annotations

import hashlib

import torch

COND_ID_PREFIX = "c3-"  # c3: a ControlNet counts by its hint, strength, range, chain and weights
C2_PREFIX = "c2-"      # c2 (2026-11): scalars hashed, a ControlNet only by its type; still verified for old files
CONTROL_WEIGHT_SAMPLE = 4096   # values per weight tensor in a ControlNet's fingerprint: fast on 1.4 GB models


def hash_cond_value(digest, value, control: bool = True) -> None:
    """Feed one conditioning value to the digest: tensors by value, plain data by repr, a ControlNet by what
    steers it (`control`; off for the c2 form), other objects by type."""
    if isinstance(value, torch.Tensor):
        digest.update(b"T" + str(tuple(value.shape)).encode())
        digest.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    elif value is None or isinstance(value, (bool, int, float, str)):
        digest.update(b"V" + repr(value).encode())
    elif isinstance(value, (list, tuple)):
        digest.update(b"L%d" % len(value))
        for item in value:
            hash_cond_value(digest, item, control)
    elif isinstance(value, dict):
        digest.update(b"D%d" % len(value))
        for name in sorted(value, key=str):
            digest.update(b"K" + str(name).encode())
            hash_cond_value(digest, value[name], control)
    elif control and _is_control(value):
        _hash_control(digest, value)
    else:  # hooks, ...: their identity changes every run; only the kind is stable
        digest.update(b"O" + type(value).__qualname__.encode())


def _is_control(value) -> bool:
    """ComfyUI's ControlBase family (ControlNet, ControlLora, T2IAdapter...), recognised by what they carry."""
    return hasattr(value, "cond_hint_original") and hasattr(value, "strength") and hasattr(value, "timestep_percent_range")


def _hash_control(digest, control) -> None:
    """A ControlNet in the conditioning steers every denoiser call, so Restore must see the same one: the hint's
    pixels, strength, start/end percent, strength type, extra inputs, the chained ControlNets, and its weights."""
    digest.update(b"C" + type(control).__qualname__.encode())
    hash_cond_value(digest, control.cond_hint_original)
    hash_cond_value(digest, float(control.strength))
    hash_cond_value(digest, tuple(float(p) for p in control.timestep_percent_range))
    hash_cond_value(digest, str(getattr(control, "strength_type", "")))
    hash_cond_value(digest, bool(getattr(control, "global_average_pooling", False)))
    hash_cond_value(digest, list(getattr(control, "extra_concat_orig", []) or []))
    model = getattr(control, "control_model", None) or getattr(control, "t2i_model", None)
    digest.update(b"W")
    if isinstance(model, torch.nn.Module):
        for name, tensor in model.state_dict().items():
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // CONTROL_WEIGHT_SAMPLE)   # an even sample across the whole tensor
            digest.update(name.encode() + str(tuple(tensor.shape)).encode())
            digest.update(flat[::step][:CONTROL_WEIGHT_SAMPLE].to("cpu", torch.float32).contiguous().numpy().tobytes())
    previous = getattr(control, "previous_controlnet", None)
    digest.update(b"P")
    if previous is not None:
        _hash_control(digest, previous)


def conditioning_id(positive, negative, *, form: str = COND_ID_PREFIX) -> str:
    """Fingerprint of the conditioning (tensors, settings such as Flux guidance or SDXL size, and a ControlNet's
    hint, strength, range and weights), so Regenerate/Restore can refuse a different prompt or control."""
    control = form == COND_ID_PREFIX
    digest = hashlib.sha256(b"keyface/conditioning/v3" if control else b"keyface/conditioning/v2")
    for cond in (positive, negative):
        for entry in cond or []:
            hash_cond_value(digest, entry[0], control)
            hash_cond_value(digest, dict(entry[1]), control)
        digest.update(b"|")
    return form + digest.hexdigest()[:16]


def legacy_conditioning_id(positive, negative) -> str:
    """The first fingerprint (tensors only), kept so images saved with it still restore."""
    digest = hashlib.sha256()
    for cond in (positive, negative):
        for entry in cond or []:
            digest.update(entry[0].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            for name in sorted(entry[1]):
                value = entry[1][name]
                if isinstance(value, torch.Tensor):
                    digest.update(name.encode() + value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:16]


def conditioning_matches(stored, positive, negative) -> bool:
    if not stored:
        return True  # nothing recorded to compare with
    for form in (COND_ID_PREFIX, C2_PREFIX):
        if str(stored).startswith(form):
            return conditioning_id(positive, negative, form=form) == stored
    return legacy_conditioning_id(positive, negative) == stored
