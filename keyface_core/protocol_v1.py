"""Restoring format-v1 files (KeyFace before 2026-12): re-invert the stored anonymized latent, unflip, regenerate.

v1 drew the anonymized face with the leapfrog itself, so its file holds the exact anonymized state and partner;
restore inverts them back to the keyed noise, undoes the sign flip (``signflip`` scramble), unseals the
residual (or, for files saved before residual sealing, flips it too) and regenerates: 2 x steps model calls.
Kept read-only: nothing writes v1 any more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import sampling
from .errors import WrongKeyError
from .flip import flip_context, unseal
from .keys import check_matches
from .protocol import FaceBatch, image_keys, make_background
from .scramble import scramble


@dataclass(frozen=True)
class V1Anonymized:
    """The exact anonymized state a v1 file carries, with its per-face context."""

    state: torch.Tensor                 # [B,C,h,w] model space (float64 for the exact method)
    partner: Optional[torch.Tensor]     # leapfrog partner at sigmas[-2] (exact method)
    faces: FaceBatch                    # background = the anonymized state itself (held outside the mask)
    key_checks: tuple
    sealed: Optional[tuple]             # per item the sealed residual; None = saved before sealing
    kdf: Optional[dict]
    method: str


def restore(denoise: sampling.Denoise, anon: V1Anonymized, sigmas: torch.Tensor, key, *, add_noise,
            allow_wrong_key: bool = False, progress=None, stats: Optional[sampling.Stats] = None) -> torch.Tensor:
    """The original latent of a v1 file (exact method with its payload: bit for bit)."""
    faces = anon.faces
    keys = image_keys(key, faces.nonces, anon.kdf)
    matches = [check_matches(k, stored) for k, stored in zip(keys, anon.key_checks)]
    if not allow_wrong_key and not all(matches):
        raise WrongKeyError(f"this key ({getattr(key, 'source', 'given key')}) does not match the key that anonymized "
                            "this image; pick the right key, or enable allow_wrong_key to see what a wrong key gives.")
    dtype = sampling.state_dtype(anon.method)
    background = make_background(faces, add_noise, dtype)
    noise = sampling.invert(denoise, sampling.LatentState(anon.state.to(dtype), anon.partner), sigmas.to(dtype),
                            anon.method, background=background, progress=progress, stats=stats,
                            numerics="legacy")   # v1 files were made with plain float64 leapfrog steps
    shape = tuple(noise.x.shape[1:])
    masks = [torch.ones((1, *shape[1:])) if faces.mask is None else faces.mask[i] for i in range(faces.size)]
    x = torch.stack([scramble(item, m, k, face, "signflip")
                     for item, m, k, face in zip(noise.x, masks, keys, faces.face_indices)])
    residual = None
    if noise.residual is not None:
        if anon.sealed is None:   # saved before sealing: the residual was flipped with the noise
            residual = torch.stack([scramble(item, m, k, face, "signflip")
                                    for item, m, k, face in zip(noise.residual, masks, keys, faces.face_indices)])
        else:
            residual = torch.stack([
                unseal(k, flip_context(shape, face, "residual-seal"), s, shape).to(dtype) if ok
                else torch.zeros(shape, dtype=dtype)
                for k, face, s, ok in zip(keys, faces.face_indices, anon.sealed, matches)])
    return sampling.regenerate(denoise, sampling.NoiseState(x, residual), sigmas.to(dtype), anon.method,
                               background=background, progress=progress, stats=stats, numerics="legacy").x
