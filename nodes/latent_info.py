"""What a KeyFace LATENT carries beside its samples, so the next node can match it exactly.

ComfyUI LATENTs are dicts; other nodes copy them shallowly and keep unknown keys, so the info
rides along under ``latent["keyface"]`` while ``latent["samples"]`` stays an ordinary latent that
stock nodes (KSamplerAdvanced, VAEDecode, previews) accept. Nothing here is secret: nonces, masks,
the background and the anonymized states are public; the key never enters a LATENT.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch

from ..keyface_core.errors import InputMismatchError, NoFaceError
from ..keyface_core.flip import public_gaussian
from ..keyface_core import sampling as core

INFO_KEY = "keyface"


@dataclass(frozen=True)
class Settings:
    """The inversion settings both directions must share."""

    steps: int
    scheduler: str
    method: str
    cfg: float
    model_id: str
    sigmas: torch.Tensor  # ComfyUI's float32 schedule, descending to 0

    def public(self) -> dict:
        """JSON-able form for the image metadata (no tensors)."""
        return {"steps": self.steps, "scheduler": self.scheduler, "method": self.method, "cfg": self.cfg,
                "model_id": self.model_id, "sigmas": [float(s) for s in self.sigmas]}


@dataclass(frozen=True)
class KeyFaceInfo:
    """Exact state and context of a noise (``kind='noise'``) or clean (``kind='latent'``) latent."""

    kind: str
    settings: Settings
    state: torch.Tensor                      # model space; float64 for the exact method
    second: Optional[torch.Tensor]           # noise: residual; latent: partner (exact method only)
    samples: torch.Tensor                    # the LATENT samples this info belongs to
    nonces: tuple                            # one 16-byte nonce per batch item
    face_indices: tuple                      # which face of the photo each batch item is
    mask: Optional[torch.Tensor] = None      # [B,1,h,w] binary latent mask (1 = face)
    background: Optional[torch.Tensor] = None  # model-space clean latent; only outside the mask is used
    latent_format: Any = None                # ComfyUI latent format (scale/shift), for flips without a MODEL
    kdf: Optional[dict] = None               # passphrase KDF parameters once a passphrase key was applied
    key_checks: Optional[tuple] = None       # per item, set by Apply Key Flip
    flipped: bool = False                    # parity of flips applied since inversion
    sealed: Optional[tuple] = None           # exact method: per item, the original residual sealed by the key
    extra: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        # ComfyUI prints node inputs into error reports (/history): keep it short, and tensor-free.
        s = self.settings
        return (f"<KeyFace {self.kind}: batch {self.state.shape[0]}, {s.method}, {s.steps} steps {s.scheduler}, "
                f"cfg {s.cfg:g}, {'masked' if self.mask is not None else 'whole latent'}, "
                f"{'key-flipped' if self.key_checks is not None else 'not key-flipped'}>")

    def matches(self, samples: torch.Tensor) -> bool:
        """True when `samples` are still the ones this info was made for (no node edited them)."""
        return samples is self.samples or (samples.shape == self.samples.shape and torch.equal(samples.cpu(), self.samples.cpu()))

    def with_(self, **changes) -> "KeyFaceInfo":
        return replace(self, **changes)


def info_of(latent: dict) -> Optional[KeyFaceInfo]:
    """The KeyFace info of a LATENT, or None when it has none or its samples were edited since."""
    info = latent.get(INFO_KEY)
    if isinstance(info, KeyFaceInfo) and info.matches(latent["samples"]):
        return info
    return None


def make_latent(base: dict, samples: torch.Tensor, info: Optional[KeyFaceInfo]) -> dict:
    """A new LATENT dict: base's other keys kept (batch_index, ...), new samples and info."""
    out = {k: v for k, v in base.items() if k not in (INFO_KEY, "noise_mask")}
    out["samples"] = samples
    if info is not None:
        out[INFO_KEY] = info.with_(samples=samples)
    return out


def background_for(info_mask: Optional[torch.Tensor], clean_state: torch.Tensor, nonces: tuple, add_noise,
                   dtype: torch.dtype) -> Optional[core.Background]:
    """The held background: clean latent outside the mask, public nonce-derived noise."""
    if info_mask is None:
        return None
    shape = tuple(clean_state.shape[1:])
    noise = torch.stack([public_gaussian(b"keyface/v1/background\x00" + nonce, shape) for nonce in nonces])
    return core.Background(info_mask.to(dtype), clean_state.to(dtype), noise.to(dtype), add_noise)


def check_not_empty(lmask: Optional[torch.Tensor], what: str) -> None:
    """Refuse a latent mask with an item that covers no cell: that item would silently stay un-anonymized."""
    if lmask is None:
        return
    empty = [item for item in range(lmask.shape[0]) if not bool((lmask[item] >= 0.5).any())]
    if empty:
        raise NoFaceError(f"the {what} is empty on the latent grid for batch item(s) {empty} (nothing >= 0.5 after "
                          "downsampling to 1/8 size), so nothing would be anonymized there. Connect the face mask "
                          "(Face Mask / Crop Faces), or a mask covering at least one 8x8-pixel cell.")


def check_batch(name: str, tensor: Optional[torch.Tensor], batch: int) -> Optional[torch.Tensor]:
    """Broadcast a batch-1 tensor to `batch`, or refuse a different batch size with a clear message."""
    if tensor is None:
        return None
    if tensor.shape[0] == batch:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(batch, *tensor.shape[1:])
    raise InputMismatchError(f"the {name} has a batch of {tensor.shape[0]} but the latent has {batch}; "
                             f"give one {name} for all, or one per latent in the same order.")
