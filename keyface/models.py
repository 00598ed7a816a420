"""Which model the CLI runs: the diffusers backend of keyface_core, or a seeded dev model for tests.

Every backend hands over the same `LoadedModel` interface (keyface_core/backends/diffusers.py): `denoise(x, sigma)
-> x0` in ComfyUI's sigma space, `sigmas(steps, scheduler)`, `encode`/`decode` between pixels in 0..1 and the
model-space latent, `add_noise`, `model_id`, `set_conditioning(prompt, negative, cfg) -> cond_id`, and (for the
file's latent format) `scale_factor`/`shift_factor`.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from keyface_core.errors import InputMismatchError, KeyFaceError

DEV_PREFIX = "dev:"


class Model(Protocol):
    kind: str
    model_id: str
    latent_channels: int
    downscale: int
    add_noise: Callable
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def sigmas(self, steps: int, scheduler: str) -> torch.Tensor: ...
    def encode(self, pixels: torch.Tensor) -> torch.Tensor: ...
    def decode(self, latent: torch.Tensor) -> torch.Tensor: ...
    def set_conditioning(self, prompt: str, negative: str, cfg: float) -> str: ...


class ModelLoadError(KeyFaceError):
    """The model named on the command line cannot be loaded (what happened, what to do)."""


def latent_scale(model) -> tuple[float, float]:
    """(scale, shift) between the VAE's latent and the model-space latent (what the file records)."""
    scale = getattr(model, "scale_factor", None)
    if scale is None:
        scale = getattr(model, "scaling_factor", 1.0)
    return float(scale), float(getattr(model, "shift_factor", 0.0) or 0.0)


def load_model(spec: str, device: str = "auto", dtype: str = "float32"):
    """The model named by `spec`: a diffusers folder, a Hugging Face repo id (local cache), a single checkpoint file,
    or `dev:tiny[:SEED]` / `dev:comfy-tiny` / `dev:comfy-sd15` (seeded random models, mechanics only)."""
    if not spec:
        raise InputMismatchError("no model given: pass --model with a diffusers folder, a Hugging Face repo id or a "
                                 "checkpoint file.")
    if spec.startswith(DEV_PREFIX):
        return _load_dev(spec, device)
    try:
        from keyface_core.backends import diffusers as backend
    except ImportError as err:
        # The backend module is not shipped yet (issue 12 part A): say so plainly instead of pointing at an extra.
        raise ModelLoadError(f"loading {spec!r} needs the diffusers backend, which this version of KeyFace does not "
                             "include yet; anonymize in ComfyUI with the KeyFace nodes, or use a dev model "
                             "(dev:tiny, dev:comfy-tiny, dev:comfy-sd15) to try the command line.") from None
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise InputMismatchError(f"unknown --dtype {dtype!r}; choose float32, float16 or bfloat16.")
    resolved = _device(device)
    try:
        return backend.load(spec, device=resolved, dtype=torch_dtype)
    except KeyFaceError:
        raise
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load the model {spec!r}: {err}. Pass a diffusers folder, a cached Hugging Face "
                             "repo id or a .safetensors/.ckpt checkpoint.") from None


def _device(device: str) -> str:
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_dev(spec: str, device: str):
    name = spec[len(DEV_PREFIX):]
    if name.startswith("tiny"):
        from keyface_dev import tiny_backend
        try:
            return tiny_backend.load(spec, device=device)
        except ValueError as err:
            raise ModelLoadError(f"{err} (dev models: dev:tiny, dev:tiny:SEED, dev:comfy-tiny, dev:comfy-sd15)") from None
    if name.startswith("comfy-"):
        from keyface_dev import comfy_backend
        return comfy_backend.load(spec, device=device)
    raise ModelLoadError(f"unknown dev model {spec!r}; dev models: dev:tiny, dev:tiny:SEED, dev:comfy-tiny, "
                         "dev:comfy-sd15 (seeded random weights: mechanics only).")
