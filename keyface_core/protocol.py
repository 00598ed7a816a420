"""The KeyFace anonymization protocol (format v2), once, for every adapter (ComfyUI nodes, CLI, benchmarks).

Anonymize (per face, model-space latents, float64):
  1. ``invert``   the clean face latent -> noise at sigmas[0] with the exact two-state leapfrog (or another
                  method of ``keyface_core.sampling``); outside the mask the state is held to the public
                  background trajectory ``background + sigma * public noise``.
  2. ``lock``     the key scrambles the noise inside the mask (``pairswap`` by default, the paper's ``signflip``
                  as an option), seals the leapfrog's second state, and records a key check and a keyed digest
                  of the original latent. The result, ``KeyedNoise``, is what the file stores.
  3. the new face is drawn from the keyed noise by *any* sampler (ComfyUI's own, or ``render`` here for adapters
     without ComfyUI); ``sampler_start_noise`` gives a stock sampler the noise that makes its first state equal
     the keyed noise inside the mask and the public background outside it (ComfyUI's inpaint semantics).
Restore: ``unlock`` (unscramble, unseal) then ``retrace`` (the forward pass of the inversion): exactly ``steps``
model calls, never inverting the anonymized image; ``verify`` checks the result against the keyed digest.

Everything here is public except the image keys, which never leave the functions that take them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from . import sampling
from .errors import InputMismatchError, KeyFaceError, KeyMaterialError, NoFaceError
from .flip import flip_context, public_gaussian, seal, unseal
from .keys import check_matches, key_check_value, new_nonce
from .scramble import SCRAMBLES, scramble

DEFAULT_SCRAMBLE = "pairswap"
BACKGROUND_SEED = b"keyface/v1/background\x00"   # unchanged since v1: old files hold the same trajectory
RESIDUAL_PURPOSE = "residual-seal"
PIXELS_PURPOSE = "pixel-residual/v2"
PIXELS_DIGEST_PURPOSE = "original-pixels/v2"
DIGEST_PURPOSE = "original-latent/v2"
REFERENCE_PURPOSE = "original-latent-f32/v2"


# ----------------------------------------------------------------------------------------------
# Records of what flows between the steps
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InversionSettings:
    """What the inversion ran with; Restore's retrace must use exactly this (stored in the file)."""

    steps: int
    scheduler: str
    method: str
    cfg: float
    model_id: str
    cond_id: str
    sigmas: torch.Tensor  # ComfyUI's float32 schedule, descending to 0 (replayed, never recomputed)


@dataclass(frozen=True)
class RenderSettings:
    """What drew the anonymized face (informational: restore never re-runs it)."""

    sampler: str
    scheduler: str
    steps: int
    cfg: float
    seed: int


@dataclass(frozen=True)
class FaceBatch:
    """The public context of B face latents: one nonce and face index each, the latent mask, the background."""

    nonces: tuple
    face_indices: tuple
    mask: Optional[torch.Tensor]        # [B,1,h,w] binary (1 = face), or None for the whole latent
    background: Optional[torch.Tensor]  # [B,C,h,w] float64 clean model-space latent, zero inside the mask
                                        # (`public_background`): the original face never rides along

    def __post_init__(self):
        if len(self.nonces) != len(self.face_indices):
            raise InputMismatchError(f"{len(self.nonces)} nonces for {len(self.face_indices)} faces")

    @property
    def size(self) -> int:
        return len(self.nonces)


@dataclass(frozen=True)
class Lock:
    """What the key added to a noise, all of it public: the key never appears, only values derived one-way."""

    scramble: str
    key_checks: tuple                   # per item, 64-bit HMAC check of the image key (Restore refuses a wrong key)
    sealed_residuals: tuple             # per item, uint8 array (leapfrog second state XOR keystream) or None
    original_digests: tuple             # per item, keyed digest of the original latent (verified restore)
    references: tuple                   # per item, the original latent in float32, sealed (AEAD): measures X
    kdf: Optional[dict] = None          # passphrase KDF parameters (None for key files)


@dataclass(frozen=True)
class KeyedNoise:
    """The keyed noise of B faces: what Save Anonymized stores and Restore retraces."""

    x: torch.Tensor                     # [B,C,h,w] float64 scrambled noise at sigmas[0]
    faces: FaceBatch
    lock: Lock


@dataclass(frozen=True)
class Verification:
    """Restore's verdict on its own result, against the keyed digest and the sealed float32 reference."""

    exact: Optional[bool]               # True: equal to the original (bit for bit, or within `ulps`); None: unknown
    relative_error: Optional[float]     # relative L2 difference to the original (0 when bit for bit)
    max_abs_error: Optional[float]
    wrong_key: bool = False
    ulps: int = 0                       # largest difference in float32 units in the last place
    differing: int = 0                  # how many latent values differ at all
    values: int = 0

    def message(self) -> str:
        if self.wrong_key:
            return "not the original: the key does not match the one that anonymized this image (allow_wrong_key)"
        if self.exact and self.differing == 0:
            return "verified exact: the restored face latent equals the original bit for bit (keyed digest matches)"
        if self.exact:
            return (f"verified exact to float32 rounding: {self.differing} of {self.values} latent values are "
                    f"{self.ulps} float32 step(s) from the original (the float64 retrace left ~1e-10)")
        if self.exact is None:
            return "not verified: this file carries no digest of the original"
        return (f"differs from the original by {self.relative_error:.3g} relative L2 (max {self.max_abs_error:.3g}, "
                f"{self.differing} of {self.values} values); the restorer's numerics differ from the anonymizer's "
                "(model dtype, device, thread count or kernels)")


ROUNDING_ULPS = 2   # a retrace that lands within this many float32 steps counts as exact (see Verification)


# ----------------------------------------------------------------------------------------------
# Keys and public derivations
# ----------------------------------------------------------------------------------------------

def new_nonces(count: int) -> tuple:
    return tuple(new_nonce() for _ in range(count))


def image_keys(key, nonces: Sequence[bytes], kdf: Optional[dict] = None) -> list:
    """One 32-byte key per face, bound to its nonce (passphrases: scrypt with the stored parameters)."""
    if key is None or not hasattr(key, "image_key"):
        raise KeyMaterialError("no key given: connect a KEYFACE_KEY from the Load Key node (or pass --key).")
    return [key.image_key(nonce, kdf) for nonce in nonces]


def key_matches(key, lock: Lock, nonces: Sequence[bytes]) -> list:
    """Per face: does the key pass the stored check?"""
    return [check_matches(k, stored) for k, stored in zip(image_keys(key, nonces, lock.kdf), lock.key_checks)]


def background_noise(nonce: bytes, shape: tuple) -> torch.Tensor:
    """The public standard-normal noise that drives the background trajectory of one face (float64)."""
    return public_gaussian(BACKGROUND_SEED + bytes(nonce), tuple(int(s) for s in shape))


def public_background(clean: torch.Tensor, mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The clean latent with the face zeroed: all of it the held trajectory ever uses, and all a file may carry."""
    if mask is None:
        return None
    return torch.where(mask.to(clean.device) >= 0.5, torch.zeros_like(clean), clean)


def make_background(faces: FaceBatch, add_noise=sampling.eps_add_noise,
                    dtype: torch.dtype = torch.float64) -> Optional[sampling.Background]:
    """The held background of a batch (None without a mask: the whole latent is generated)."""
    if faces.mask is None:
        return None
    if faces.background is None:
        raise InputMismatchError("a masked face batch needs its background latent")
    shape = tuple(faces.background.shape[1:])
    noise = torch.stack([background_noise(nonce, shape) for nonce in faces.nonces])
    return sampling.Background(faces.mask.to(dtype), faces.background.to(dtype), noise.to(dtype), add_noise)


def check_mask_not_empty(mask: Optional[torch.Tensor], what: str = "mask") -> None:
    """Refuse a latent mask with an item that covers no cell: that face would silently stay un-anonymized."""
    if mask is None:
        return
    empty = [item for item in range(mask.shape[0]) if not bool((mask[item] >= 0.5).any())]
    if empty:
        raise NoFaceError(f"the {what} is empty on the latent grid for batch item(s) {empty} (nothing >= 0.5 after "
                          "downsampling to the latent size), so nothing would be anonymized there. Connect the face "
                          "mask (Face Mask / Crop Faces), or a mask covering at least one latent cell.")


def _digest(image_key: bytes, latent: torch.Tensor) -> str:
    from .secure import keyed_digest
    return keyed_digest(image_key, DIGEST_PURPOSE, _f32_bytes(latent))


def _f32_bytes(latent: torch.Tensor) -> bytes:
    # float32, like the LATENT the user sees: the float64 retrace is exact to ~1e-16, which float32 rounding removes.
    return np.ascontiguousarray(latent.detach().cpu().to(torch.float32).numpy(), dtype="<f4").tobytes()


def _seal_reference(image_key: bytes, face_index: int, latent: torch.Tensor) -> bytes:
    from .secure import seal_bytes
    f32 = np.ascontiguousarray(latent.detach().cpu().to(torch.float32).numpy(), dtype="<f4").tobytes()
    return seal_bytes(image_key, REFERENCE_PURPOSE, f32, _aad(face_index, latent.shape))


def _aad(face_index: int, shape) -> bytes:
    return f"face={int(face_index)};shape={','.join(str(int(s)) for s in shape)}".encode()


# ----------------------------------------------------------------------------------------------
# The steps
# ----------------------------------------------------------------------------------------------

def invert(denoise: sampling.Denoise, clean: torch.Tensor, sigmas: torch.Tensor, faces: FaceBatch, *,
           method: str = "exact", add_noise=sampling.eps_add_noise, progress=None,
           stats: Optional[sampling.Stats] = None) -> sampling.NoiseState:
    """Clean model-space latent [B,C,h,w] -> its noise at sigmas[0], exactly invertible by `retrace`."""
    check_mask_not_empty(faces.mask)
    dtype = sampling.state_dtype(method)
    background = make_background(faces, add_noise, dtype)
    return sampling.invert(denoise, sampling.LatentState(clean.to(dtype)), sigmas, method, background=background,
                           progress=progress, stats=stats)


def lock(noise: sampling.NoiseState, clean: torch.Tensor, faces: FaceBatch, key, *,
         method_scramble: str = DEFAULT_SCRAMBLE, kdf: Optional[dict] = None) -> KeyedNoise:
    """Scramble the noise inside the mask with the key, seal the second state, record checks and digests.

    `clean` is the original latent the noise came from (digest and sealed reference for verified restore)."""
    if method_scramble not in SCRAMBLES:
        raise InputMismatchError(f"unknown scramble {method_scramble!r}; choose one of {', '.join(SCRAMBLES)}")
    check_mask_not_empty(faces.mask, "key mask")
    kdf = kdf if kdf is not None else getattr(key, "kdf", None)
    keys = image_keys(key, faces.nonces, kdf)
    shape = tuple(noise.x.shape[1:])
    x = torch.stack([scramble(item, _item_mask(faces, i, shape), k, face, method_scramble)
                     for i, (item, k, face) in enumerate(zip(noise.x, keys, faces.face_indices))])
    sealed = (None,) * faces.size
    if noise.residual is not None:
        sealed = tuple(seal(k, flip_context(shape, face, RESIDUAL_PURPOSE), r)
                       for k, face, r in zip(keys, faces.face_indices, noise.residual))
    clean = clean.to(torch.float64)
    new_lock = Lock(method_scramble, tuple(key_check_value(k) for k in keys), sealed,
                    tuple(_digest(k, c) for k, c in zip(keys, clean)),
                    tuple(_seal_reference(k, face, c) for k, face, c in zip(keys, faces.face_indices, clean)), kdf)
    return KeyedNoise(x, faces, new_lock)


def unlock(keyed: KeyedNoise, key, *, allow_wrong_key: bool = False) -> sampling.NoiseState:
    """Undo `lock`: unscramble the noise; unseal the second state for faces whose key check passes.

    A key failing the check unseals nothing (the residual stays zero: a clean other face, never NaN)."""
    faces, lk = keyed.faces, keyed.lock
    keys = image_keys(key, faces.nonces, lk.kdf)
    matches = [check_matches(k, stored) for k, stored in zip(keys, lk.key_checks)]
    if not allow_wrong_key and not all(matches):
        from .errors import WrongKeyError
        raise WrongKeyError(f"this key ({getattr(key, 'source', 'given key')}) does not match the key that anonymized "
                            "this image; pick the right key, or enable allow_wrong_key to see what a wrong key gives.")
    shape = tuple(keyed.x.shape[1:])
    x = torch.stack([scramble(item, _item_mask(faces, i, shape), k, face, lk.scramble)
                     for i, (item, k, face) in enumerate(zip(keyed.x, keys, faces.face_indices))])
    residual = None
    if any(s is not None for s in lk.sealed_residuals):
        residual = torch.stack([
            unseal(k, flip_context(shape, face, RESIDUAL_PURPOSE), s, shape) if ok and s is not None
            else torch.zeros(shape, dtype=torch.float64)
            for k, face, s, ok in zip(keys, faces.face_indices, lk.sealed_residuals, matches)]).to(keyed.x.device)
    return sampling.NoiseState(x, residual)


def retrace(denoise: sampling.Denoise, noise: sampling.NoiseState, sigmas: torch.Tensor, faces: FaceBatch, *,
            method: str = "exact", add_noise=sampling.eps_add_noise, progress=None,
            stats: Optional[sampling.Stats] = None) -> torch.Tensor:
    """The inversion's forward pass from its noise: the original latent (exact method: bit for bit), `steps` calls."""
    dtype = sampling.state_dtype(method)
    background = make_background(faces, add_noise, dtype)
    return sampling.regenerate(denoise, noise, sigmas, method, background=background, progress=progress,
                               stats=stats).x


def verify(restored: torch.Tensor, keyed: KeyedNoise, key) -> Verification:
    """Check a restored latent [B,C,h,w] against the keyed digests; measure the difference when they disagree."""
    lk = keyed.lock
    if not lk.original_digests or any(d is None for d in lk.original_digests):
        return Verification(None, None, None)
    keys = image_keys(key, keyed.faces.nonces, lk.kdf)
    if not all(check_matches(k, stored) for k, stored in zip(keys, lk.key_checks)):
        return Verification(False, None, None, wrong_key=True)
    values = int(restored.numel())
    if all(_digest(k, r) == d for k, r, d in zip(keys, restored, lk.original_digests)):
        return Verification(True, 0.0, 0.0, values=values)
    references = []
    from .secure import open_bytes
    for k, face, r, sealed in zip(keys, keyed.faces.face_indices, restored, lk.references):
        if sealed is None:
            return Verification(False, None, None, values=values)
        raw = open_bytes(k, REFERENCE_PURPOSE, bytes(sealed), _aad(face, r.shape))
        references.append(torch.from_numpy(np.frombuffer(raw, dtype="<f4").copy().reshape(tuple(r.shape))))
    reference = torch.stack(references)
    mine = restored.detach().cpu().to(torch.float32)
    diff = (mine.double() - reference.double())
    spacing = torch.from_numpy(np.spacing(np.abs(reference.numpy()))).double()
    ulps = int(torch.ceil((diff.abs() / spacing).max()).item()) if values else 0
    differing = int((mine != reference).sum())
    rel = float(torch.linalg.vector_norm(diff) / torch.linalg.vector_norm(reference.double()).clamp_min(1e-30))
    return Verification(ulps <= ROUNDING_ULPS, rel, float(diff.abs().max()), ulps=ulps, differing=differing,
                        values=values)


# ----------------------------------------------------------------------------------------------
# Drawing the new face
# ----------------------------------------------------------------------------------------------

def sampler_start_noise(keyed_x: torch.Tensor, faces: FaceBatch, sigma0: float, *, flow: bool,
                        max_denoise: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(noise, latent_image) for a stock k-diffusion sampler with ComfyUI's inpaint semantics (REFERENCE §5).

    ComfyUI starts at ``noise_scaling(sigma0, noise, latent_image)`` (``latent + s*noise``, s = sigma0, or
    sqrt(1 + sigma0^2) with max_denoise; flow: ``sigma0*noise + (1 - sigma0)*latent``) and holds the region outside
    the mask to ``latent + sigma*noise``. So: outside the mask, noise = the public background noise and latent =
    the background; inside, latent = 0 (the original face never enters the draw) and noise = keyed noise / s.
    Both returned in model space, float64; `latent_image` is None without a mask."""
    keyed_x = keyed_x.to(torch.float64)
    scale = math.sqrt(1.0 + sigma0 ** 2) if (max_denoise and not flow) else float(sigma0)
    inside_noise = keyed_x / scale
    if faces.mask is None:
        return inside_noise, None
    shape = tuple(keyed_x.shape[1:])
    public = torch.stack([background_noise(nonce, shape) for nonce in faces.nonces]).to(keyed_x.device)
    inside = faces.mask.to(keyed_x.device) >= 0.5
    noise = torch.where(inside, inside_noise, public)
    latent = torch.where(inside, torch.zeros_like(keyed_x), faces.background.to(keyed_x.device, torch.float64))
    return noise, latent


RENDER_SAMPLERS = ("euler", "heun", "dpmpp_2m")


def render(denoise: sampling.Denoise, keyed: KeyedNoise, sigmas: torch.Tensor, *, sampler: str = "dpmpp_2m",
           add_noise=sampling.eps_add_noise, progress=None, stats: Optional[sampling.Stats] = None) -> torch.Tensor:
    """Draw the new face from the keyed noise without ComfyUI (k-diffusion's deterministic samplers, inpaint-held).

    For the CLI and benchmarks; the ComfyUI nodes use ComfyUI's own samplers. Float32 like ComfyUI."""
    if sampler not in RENDER_SAMPLERS:
        raise InputMismatchError(f"unknown sampler {sampler!r}; choose one of {', '.join(RENDER_SAMPLERS)}")
    stats = stats if stats is not None else sampling.Stats()
    sigmas = sigmas.to(torch.float32)
    background = make_background(keyed.faces, add_noise, torch.float32)
    x = keyed.x.to(torch.float32)

    def model(x, sigma):
        stats.model_calls += 1
        held = x if background is None else background.hold(x, sigma)
        out = denoise(held, sigma).to(torch.float32)
        stats.last_denoised = out
        return out if background is None else torch.where(background.mask >= 0.5, out, background.latent)

    x = x if background is None else background.hold(x, sigmas[0])
    total = len(sigmas) - 1
    old_denoised = None
    for i in range(total):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, s)
        d = (x - denoised) / s
        if sampler == "euler" or (sampler == "heun" and float(s_next) == 0):
            x = x + d * (s_next - s)
        elif sampler == "heun":
            x_2 = x + d * (s_next - s)
            d_2 = (x_2 - model(x_2, s_next)) / s_next
            x = x + (d + d_2) / 2 * (s_next - s)
        else:  # dpmpp_2m (k-diffusion sample_dpmpp_2m)
            t, t_next = -torch.log(s), -torch.log(s_next) if float(s_next) > 0 else None
            if t_next is None:
                x = denoised
            else:
                h = t_next - t
                if old_denoised is None:
                    denoised_d = denoised
                else:
                    h_last = t - (-torch.log(sigmas[i - 1]))
                    r = h_last / h
                    denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
                x = (s_next / s) * x - (-h).expm1() * denoised_d
            old_denoised = denoised
        if background is not None:
            x = background.hold(x, s_next)
        if progress is not None:
            progress({"phase": "render", "step": i + 1, "total": total, "model_calls": stats.model_calls})
    return x


def _item_mask(faces: FaceBatch, item: int, shape: tuple) -> torch.Tensor:
    """The mask scramble gets for one item: the latent mask, or everything when the whole latent is generated."""
    if faces.mask is None:
        return torch.ones((1, *shape[1:]), dtype=torch.float32)
    return faces.mask[item]


Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------------
# Lossless mode: the sealed pixel residual
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SealedPixels:
    """One face's pixel residual, authenticated-encrypted with its image key, and a keyed digest of the original."""

    sealed: bytes
    digest: str


def _box_aad(face_index: int, box) -> bytes:
    return f"face={int(face_index)};box={','.join(str(int(v)) for v in box)}".encode()


def seal_pixel_residual(image_key: bytes, face_index: int, box, residual: np.ndarray,
                        original_box: np.ndarray) -> SealedPixels:
    from .photo import pack_residual
    from .secure import keyed_digest, seal_bytes
    aad = _box_aad(face_index, box)
    return SealedPixels(seal_bytes(image_key, PIXELS_PURPOSE, pack_residual(residual), aad),
                        keyed_digest(image_key, PIXELS_DIGEST_PURPOSE, aad + np.ascontiguousarray(original_box).tobytes()))


def open_pixel_residual(image_key: bytes, face_index: int, box, sealed: SealedPixels) -> np.ndarray:
    """The residual; a wrong key or a tampered file fails authentication (KeyFaceError with what to do)."""
    from .errors import MetadataError
    from .photo import unpack_residual
    from .secure import open_bytes
    try:
        raw = open_bytes(image_key, PIXELS_PURPOSE, bytes(sealed.sealed), _box_aad(face_index, box))
    except KeyFaceError:
        raise
    except Exception:  # the AEAD's authentication failure (cryptography's InvalidTag)
        raise MetadataError(f"the sealed lossless pixels of face {face_index} do not authenticate: the file was "
                            "tampered with (or its record altered). Restore the untouched PNG; the faces still "
                            "restore without lossless mode.") from None
    return unpack_residual(raw, int(box[2]))


def pixels_match(image_key: bytes, face_index: int, box, sealed: SealedPixels, restored_box: np.ndarray) -> bool:
    from .secure import keyed_digest
    aad = _box_aad(face_index, box)
    return keyed_digest(image_key, PIXELS_DIGEST_PURPOSE, aad + np.ascontiguousarray(restored_box).tobytes()) == sealed.digest
