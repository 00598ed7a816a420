"""Keyed ±1 sign flips of latent noise.

The pattern is one fair sign per latent element, drawn from SHAKE-256 over the image key (which
binds the secret to the image's nonce) and a context (latent shape, face index, purpose). Never a
torch/numpy seed: the stream is a standard XOF, identical on every platform and version.
A flip is its own inverse, bit-exactly: multiplying by ±1 changes only the sign bit.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def _encode(*fields: bytes) -> bytes:
    # Length-prefixed, so ("ab", "c") and ("a", "bc") never collide.
    return b"".join(len(f).to_bytes(8, "big") + f for f in fields)


def flip_context(shape: tuple[int, ...], face_index: int = 0, purpose: str = "noise-flip") -> bytes:
    """The public context of a pattern: what it is for, which face, which latent shape."""
    return _encode(purpose.encode(), str(int(face_index)).encode(), ",".join(str(int(s)) for s in shape).encode())


def sign_pattern(image_key: bytes, shape: tuple[int, ...], context: bytes) -> torch.Tensor:
    """±1 float32 tensor of `shape`, one keystream bit per element."""
    count = int(np.prod(shape))
    stream = hashlib.shake_256(_encode(b"keyface/v1/sign-pattern", image_key, context)).digest((count + 7) // 8)
    bits = np.unpackbits(np.frombuffer(stream, dtype=np.uint8), count=count, bitorder="little")
    signs = 1.0 - 2.0 * bits.astype(np.float32)
    return torch.from_numpy(signs.reshape(shape))


def apply_flip(x: torch.Tensor, signs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """x * signs inside the binary mask (1 = flip), x unchanged outside; an involution."""
    signs = signs.to(device=x.device, dtype=x.dtype)
    flipped = x * signs
    if mask is None:
        return flipped
    return torch.where(mask.to(x.device) >= 0.5, flipped, x)


def public_gaussian(seed: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard-normal float64 tensor from a public seed (Box–Muller over SHAKE-256); platform independent."""
    count = int(np.prod(shape))
    half = (count + 1) // 2
    raw = hashlib.shake_256(_encode(b"keyface/v1/public-gaussian", seed)).digest(16 * half)
    words = np.frombuffer(raw, dtype="<u8").reshape(half, 2)
    # 53-bit uniforms in (0, 1]: never 0, so log() is finite.
    u1 = ((words[:, 0] >> np.uint64(11)).astype(np.float64) + 1.0) / 2.0**53
    u2 = (words[:, 1] >> np.uint64(11)).astype(np.float64) / 2.0**53
    radius = np.sqrt(-2.0 * np.log(u1))
    normals = np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)])[:count]
    return torch.from_numpy(normals.reshape(shape).copy())


def seal(image_key: bytes, context: bytes, values: torch.Tensor) -> np.ndarray:
    """Encrypt a float64 tensor under the image key: its little-endian bytes XOR a SHAKE-256 keystream.

    Used for the exact method's second state (the residual), which a sign flip would leave readable in
    magnitude and which, flipped, would start the leapfrog's parasitic oscillation in the new face.
    Returns uint8 [8 * numel]; `unseal` with the same key and context gives the bits back exactly.
    """
    plain = np.ascontiguousarray(values.detach().cpu().to(torch.float64).numpy(), dtype="<f8").tobytes()
    stream = hashlib.shake_256(_encode(b"keyface/v1/seal", image_key, context)).digest(len(plain))
    return np.bitwise_xor(np.frombuffer(plain, dtype=np.uint8), np.frombuffer(stream, dtype=np.uint8))


def unseal(image_key: bytes, context: bytes, sealed: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `seal`: float64 tensor of `shape`."""
    data = np.ascontiguousarray(sealed, dtype=np.uint8).reshape(-1)
    if data.size != 8 * int(np.prod(shape)):
        raise ValueError(f"sealed data holds {data.size} bytes, not the {8 * int(np.prod(shape))} of shape {shape}")
    stream = hashlib.shake_256(_encode(b"keyface/v1/seal", image_key, context)).digest(data.size)
    plain = np.bitwise_xor(data, np.frombuffer(stream, dtype=np.uint8))
    return torch.from_numpy(plain.view("<f8").astype(np.float64).reshape(shape))
