"""What a KeyFace LATENT carries beside its samples, so the next node can match it exactly.

ComfyUI LATENTs are dicts; other nodes copy them shallowly and keep unknown keys, so the info rides along
under ``latent["keyface"]`` while ``latent["samples"]`` stays an ordinary latent that stock nodes
(KSamplerAdvanced, VAEDecode, previews) accept. One typed record per stage:

* ``NoiseInfo``      Invert to Noise's output (``lock`` None) or Apply Key Flip's (``lock`` set);
* ``AnonymizedInfo`` Regenerate's output (or Load Anonymized's, for a v2 file): the keyed noise Restore retraces;
* ``V1Info``         Load Anonymized's output for a format-v1 file (restored by re-inversion);
* ``RestoredInfo``   Restore's output: refused by a second Restore (it would anonymize the face again).

The key never enters a LATENT. ``NoiseInfo.clean`` (the original face latent) lives in memory only between
Invert to Noise and Save Anonymized, for the keyed digest; nothing writes it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional, Union

import torch

from ..keyface_core import protocol, sampling
from ..keyface_core.errors import InputMismatchError
from ..keyface_core.protocol import InversionSettings, RenderSettings
from ..keyface_core.protocol_v1 import V1Anonymized

INFO_KEY = "keyface"


@dataclass(frozen=True)
class NoiseInfo:
    settings: InversionSettings
    faces: protocol.FaceBatch
    state: sampling.NoiseState            # unkeyed noise, or (locked) the keyed noise with no second state
    lock: Optional[protocol.Lock]
    clean: Optional[torch.Tensor]         # the original model-space latent (memory only; None after unlock)
    samples: torch.Tensor
    latent_format: Any = None

    @property
    def keyed(self) -> protocol.KeyedNoise:
        if self.lock is None:
            raise InputMismatchError("this noise was never key-flipped; run Apply Key Flip first.")
        return protocol.KeyedNoise(self.state.x, self.faces, self.lock)

    def __repr__(self) -> str:
        # ComfyUI prints node inputs into error reports (/history): keep it short and tensor-free.
        return (f"<KeyFace noise: batch {self.faces.size}, {_describe(self.settings)}, "
                f"{'masked' if self.faces.mask is not None else 'whole latent'}, "
                f"{('key-flipped (' + self.lock.scramble + ')') if self.lock else 'not key-flipped'}>")


@dataclass(frozen=True)
class AnonymizedInfo:
    settings: InversionSettings
    keyed: protocol.KeyedNoise
    render: Optional[RenderSettings]
    samples: torch.Tensor                 # the drawn anonymized latent (VAE space), stored for the feather band
    latent_format: Any = None
    clean: Optional[torch.Tensor] = None  # memory only, as in NoiseInfo
    sealed_pixels: Optional[tuple] = None  # lossless files: per face protocol.SealedPixels

    def __repr__(self) -> str:
        return f"<KeyFace anonymized: batch {self.keyed.faces.size}, {_describe(self.settings)}>"


@dataclass(frozen=True)
class V1Info:
    settings: InversionSettings
    anon: V1Anonymized
    samples: torch.Tensor
    latent_format: Any = None
    exact_payload: bool = True

    def __repr__(self) -> str:
        return f"<KeyFace anonymized (format v1): batch {self.anon.faces.size}, {_describe(self.settings)}>"


@dataclass(frozen=True)
class RestoredInfo:
    settings: InversionSettings
    faces: protocol.FaceBatch
    verification: protocol.Verification
    samples: torch.Tensor
    anonymized: Optional[torch.Tensor] = None   # the anonymized latent it replaces (VAE space): the feather band
    sealed_pixels: Optional[tuple] = None       # lossless files: per face protocol.SealedPixels
    kdf: Optional[dict] = None
    key_checks: Optional[tuple] = None          # to tell a wrong key from a tampered lossless residual

    def __repr__(self) -> str:
        return f"<KeyFace restored: batch {self.faces.size}, {self.verification.message()}>"


Info = Union[NoiseInfo, AnonymizedInfo, V1Info, RestoredInfo]


def _describe(s: InversionSettings) -> str:
    return f"{s.method}, {s.steps} steps {s.scheduler}, cfg {s.cfg:g}"


def info_of(latent: dict) -> Optional[Info]:
    """The KeyFace info of a LATENT, or None when it has none or its samples were edited since."""
    info = latent.get(INFO_KEY) if isinstance(latent, dict) else None
    if not isinstance(info, (NoiseInfo, AnonymizedInfo, V1Info, RestoredInfo)):
        return None
    samples = latent.get("samples")
    if samples is info.samples or (isinstance(samples, torch.Tensor) and samples.shape == info.samples.shape
                                   and torch.equal(samples.cpu(), info.samples.cpu())):
        return info
    return None


def make_latent(base: dict, samples: torch.Tensor, info: Optional[Info]) -> dict:
    """A new LATENT dict: base's other keys kept (batch_index, ...), new samples and info."""
    out = {k: v for k, v in base.items() if k not in (INFO_KEY, "noise_mask")}
    out["samples"] = samples
    if info is not None:
        out[INFO_KEY] = replace(info, samples=samples)
    return out


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
