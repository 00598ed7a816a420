"""Keyed, self-inverse scrambles of the inverted noise inside the face mask (format v2, issue 10 item 7).

Two methods, both involutions that are exact to the bit and leave everything outside the mask untouched:

* ``pairswap`` (v2's default): the inside positions (every channel of every inside cell) are paired by a
  keyed random order, and each pair (u, v) becomes (s·v, s·u) with a keyed sign s per pair; an odd
  leftover position gets a keyed sign only. A sign flip keeps every |z_T| where it was, so the stored
  noise shows its magnitudes to anyone; after a keyed pairing no magnitude is tied to its position
  (measured in benchmarks/results/scramble.md).
* ``signflip`` (the paper's): one keyed sign per element, bit for bit what format v1 stored
  (``flip.apply_flip`` with ``flip.sign_pattern`` under ``flip.flip_context``), so v1 files restore.

Keystreams are SHAKE-256 over the image key (already bound to the image's nonce) and a length-prefixed,
domain-separated context (purpose, face index, item shape). No torch or numpy RNG: the streams are a
standard XOF, identical on every platform and library version. The pairing is the order of one keyed
64-bit word per position of the item, restricted to the inside positions; stable sorting makes ties
(probability about n²/2⁶⁵) deterministic too. Cost at a 4×128×128 latent: see `tests/test_scramble.py`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from .flip import _encode, apply_flip, flip_context, sign_pattern

SCRAMBLES = ("pairswap", "signflip")

# Domain labels of the two pairswap keystreams; changing either changes every v2 file (golden tests pin them).
_ORDER_LABEL = b"keyface/v2/pairswap/order"
_SIGN_LABEL = b"keyface/v2/pairswap/sign"


@dataclass(frozen=True)
class PairPlan:
    """Where pairswap moves each inside element of one item, as flat indices into ``x.reshape(-1)``.

    ``first[j]`` and ``second[j]`` form pair j, whose values become ``signs[j]·x[second[j]]`` and
    ``signs[j]·x[first[j]]``; ``single`` (empty or one index) is the odd leftover, multiplied by
    ``single_sign``. All are CPU int64 / float64 tensors.
    """

    first: torch.Tensor
    second: torch.Tensor
    signs: torch.Tensor
    single: torch.Tensor
    single_sign: torch.Tensor

    @property
    def pairs(self) -> int:
        return int(self.first.numel())


def pairswap_context(shape: tuple[int, ...], face_index: int = 0) -> bytes:
    """The public context of a pairswap keystream: purpose, face, item shape."""
    return flip_context(shape, face_index, "pairswap")


def order_stream(image_key: bytes, shape: tuple[int, ...], face_index: int = 0) -> np.ndarray:
    """One keyed little-endian uint64 word per element of `shape` (C-order); inside positions pair in its order."""
    count = int(np.prod(shape))
    raw = hashlib.shake_256(_encode(_ORDER_LABEL, image_key, pairswap_context(shape, face_index))).digest(8 * count)
    return np.frombuffer(raw, dtype="<u8")


def sign_stream(image_key: bytes, shape: tuple[int, ...], face_index: int = 0) -> np.ndarray:
    """One keyed bit per possible pair of `shape` (ceil(numel/2), the leftover included), as 0/1 uint8."""
    slots = (int(np.prod(shape)) + 1) // 2
    raw = hashlib.shake_256(_encode(_SIGN_LABEL, image_key, pairswap_context(shape, face_index))).digest((slots + 7) // 8)
    return np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=slots, bitorder="little")


def _inside(mask: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
    """Bool [C,h,w] on the CPU: where the mask (``>= 0.5``, [1,h,w] or [C,h,w]) selects."""
    if mask is None:
        return torch.ones(shape, dtype=torch.bool)
    if mask.dim() != 3 or tuple(mask.shape[1:]) != tuple(shape[1:]) or mask.shape[0] not in (1, shape[0]):
        raise ValueError(f"the scramble mask has shape {tuple(mask.shape)}; it must be [1,h,w] or [C,h,w] matching "
                         f"the noise item {tuple(shape)} (one item, not a batch)")
    return (mask.detach().cpu() >= 0.5).expand(shape)


def pair_plan(image_key: bytes, shape: tuple[int, ...], face_index: int, mask: torch.Tensor | None) -> PairPlan:
    """The keyed pairing and signs that `scramble(..., method="pairswap")` applies to an item of `shape`."""
    shape = tuple(int(s) for s in shape)
    inside = torch.nonzero(_inside(mask, shape).reshape(-1), as_tuple=True)[0].numpy()
    words = order_stream(image_key, shape, face_index)
    order = inside[np.argsort(words[inside], kind="stable")]
    bits = sign_stream(image_key, shape, face_index)
    pairs = order.size // 2
    signs = 1.0 - 2.0 * bits[: pairs + order.size % 2].astype(np.float64)
    return PairPlan(first=torch.from_numpy(order[0:2 * pairs:2].copy()), second=torch.from_numpy(order[1:2 * pairs:2].copy()),
                    signs=torch.from_numpy(signs[:pairs].copy()), single=torch.from_numpy(order[2 * pairs:].copy()),
                    single_sign=torch.from_numpy(signs[pairs:].copy()))


def _pairswap(x: torch.Tensor, plan: PairPlan) -> torch.Tensor:
    flat = x.reshape(-1)
    out = flat.clone()
    dev = x.device
    first, second = plan.first.to(dev), plan.second.to(dev)
    signs = plan.signs.to(device=dev, dtype=x.dtype)   # ±1 is exact in every float dtype
    out[first] = signs * flat[second]
    out[second] = signs * flat[first]
    if plan.single.numel():
        single = plan.single.to(dev)
        out[single] = plan.single_sign.to(device=dev, dtype=x.dtype) * flat[single]
    return out.reshape(x.shape)


def scramble(x: torch.Tensor, mask: torch.Tensor | None, image_key: bytes, face_index: int = 0,
             method: str = "pairswap") -> torch.Tensor:
    """Scramble ONE noise item `x` [C,h,w] inside `mask` ([1,h,w] or [C,h,w], inside = ``>= 0.5``; None = all).

    Self-inverse and bit-exact: ``scramble(scramble(x, ...), ...)`` equals `x` (``torch.equal``). Returns a
    new tensor of x's dtype and device; outside the mask it is bit-identical to `x`.
    """
    if method not in SCRAMBLES:
        raise ValueError(f"unknown scramble {method!r}; choose one of {', '.join(SCRAMBLES)}")
    if x.dim() != 3:
        raise ValueError(f"scramble takes one noise item [C,h,w], got shape {tuple(x.shape)}; call it per batch item")
    if not x.is_floating_point():
        raise TypeError(f"scramble needs a floating-point noise tensor, got {x.dtype}")
    shape = tuple(x.shape)
    if method == "signflip":
        # Exactly format v1's call, so v1 files unflip through here.
        _inside(mask, shape)   # same shape checks as pairswap
        return apply_flip(x, sign_pattern(image_key, shape, flip_context(shape, face_index)), mask)
    return _pairswap(x, pair_plan(image_key, shape, face_index, mask))
