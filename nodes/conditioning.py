"""Conditioning fingerprints: Regenerate and Restore refuse a prompt, CLIP or setting other than the inversion's."""

from __future__ import annotations

import hashlib

import torch

COND_ID_PREFIX = "c2-"  # conditioning fingerprints without it were made by KeyFace before scalars were hashed


def hash_cond_value(digest, value) -> None:
    """Feed one conditioning value to the digest: tensors by value, plain data by repr, objects by type."""
    if isinstance(value, torch.Tensor):
        digest.update(b"T" + str(tuple(value.shape)).encode())
        digest.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    elif value is None or isinstance(value, (bool, int, float, str)):
        digest.update(b"V" + repr(value).encode())
    elif isinstance(value, (list, tuple)):
        digest.update(b"L%d" % len(value))
        for item in value:
            hash_cond_value(digest, item)
    elif isinstance(value, dict):
        digest.update(b"D%d" % len(value))
        for name in sorted(value, key=str):
            digest.update(b"K" + str(name).encode())
            hash_cond_value(digest, value[name])
    else:  # ControlNet, hooks, ...: their identity changes every run; only the kind is stable
        digest.update(b"O" + type(value).__qualname__.encode())


def conditioning_id(positive, negative) -> str:
    """Fingerprint of the conditioning (tensors and settings such as Flux guidance or SDXL size), so
    Regenerate/Restore can refuse a different prompt."""
    digest = hashlib.sha256(b"keyface/conditioning/v2")
    for cond in (positive, negative):
        for entry in cond or []:
            hash_cond_value(digest, entry[0])
            hash_cond_value(digest, dict(entry[1]))
        digest.update(b"|")
    return COND_ID_PREFIX + digest.hexdigest()[:16]


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
    if str(stored).startswith(COND_ID_PREFIX):
        return conditioning_id(positive, negative) == stored
    return legacy_conditioning_id(positive, negative) == stored
