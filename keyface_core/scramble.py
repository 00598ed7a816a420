# TEMPORARY integrator stub: the `scramble` branch's keyface_core/scramble.py replaces this file entirely (on a merge conflict keep the branch's version).
import hashlib
import numpy as np
import torch
from .flip import apply_flip, flip_context, sign_pattern
SCRAMBLES = ("pairswap", "signflip")

def scramble(x, mask, image_key, face_index, method="pairswap"):
    shape = tuple(x.shape)
    m = (mask >= 0.5).expand(shape) if mask is not None else torch.ones(shape, dtype=torch.bool)
    if method == "signflip":
        return apply_flip(x, sign_pattern(image_key, shape, flip_context(shape, face_index)), mask)
    idx = torch.nonzero(m.reshape(-1)).reshape(-1).numpy()
    words = np.frombuffer(hashlib.shake_256(b"stub" + image_key + str(shape).encode() + bytes([face_index])).digest(8 * len(idx)), dtype="<u8")
    perm = idx[np.argsort(words, kind="stable")]
    signs = sign_pattern(image_key, (len(perm) // 2 + 1,), b"stub")
    flat = x.reshape(-1).clone()
    n = len(perm) // 2
    a, b = torch.from_numpy(perm[0:2 * n:2]), torch.from_numpy(perm[1:2 * n:2])
    s = signs[:n].to(x.dtype)
    ua, ub = flat[a].clone(), flat[b].clone()
    flat[a], flat[b] = s * ub, s * ua
    return flat.reshape(shape)
