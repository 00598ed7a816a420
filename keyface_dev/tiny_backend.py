"""A seeded, pure-torch stand-in for a diffusers backend (`LoadedModel` interface), for CLI tests and benchmarks.

It has the shape of an SD1.5 pipeline (RGB -> 4-channel latent at 1/8 size, an eps-prediction denoiser over a
discrete DDPM schedule, prompt conditioning with CFG) but is tiny and random: it exercises the mechanics (batch,
resume, keys, files, exact restore), never image quality. No ComfyUI, no diffusers, no download.
Spec strings: ``dev:tiny`` (seed 0), ``dev:tiny:SEED`` (another seed = another model fingerprint).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from keyface_core import sampling

LATENT_CHANNELS = 4
DOWNSCALE = 8
SCALE_FACTOR = 0.18215
SCHEDULERS = ("normal", "karras", "simple", "exponential")


def _discrete_sigmas() -> torch.Tensor:
    """SD1.5's training schedule (scaled-linear betas, 1000 steps) as k-diffusion sigmas, ascending."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def schedule(steps: int, scheduler: str) -> torch.Tensor:
    """float32 sigmas descending to 0, the way ComfyUI computes them for a discrete eps model (the same code as the
    diffusers backend's, so the dev model and real folders share one schedule)."""
    from keyface_core.backends.diffusers import discrete_schedule
    return discrete_schedule(_discrete_sigmas(), steps, scheduler)


class _Net(torch.nn.Module):
    """eps(x, sigma, cond): two seeded 3x3 convolutions with a sigma and prompt embedding."""

    def __init__(self, seed: int, width: int = 32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        c = LATENT_CHANNELS
        self.w1 = torch.randn(width, c, 3, 3, generator=g) / math.sqrt(9 * c)
        self.w2 = torch.randn(c, width, 3, 3, generator=g) / math.sqrt(9 * width)
        self.sigma_embed = torch.randn(width, generator=g) * 0.5
        self.cond_proj = torch.randn(width, 16, generator=g) / 4.0

    def parameters_list(self) -> list:
        return [self.w1, self.w2, self.sigma_embed, self.cond_proj]

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        c_in = 1.0 / torch.sqrt(sigma.to(x.dtype) ** 2 + 1.0)
        h = F.conv2d(x * c_in, self.w1.to(x.dtype), padding=1)
        bias = torch.log(sigma.to(x.dtype).clamp_min(1e-4)) * self.sigma_embed.to(x.dtype)
        bias = bias + self.cond_proj.to(x.dtype) @ cond.to(x.dtype)
        h = torch.tanh(h + bias[None, :, None, None])
        return F.conv2d(h, self.w2.to(x.dtype), padding=1)


def _prompt_vector(prompt: str) -> torch.Tensor:
    digest = hashlib.shake_256(b"keyface-dev/prompt\0" + prompt.encode("utf-8")).digest(16)
    if not prompt:
        return torch.zeros(16)
    return torch.tensor([b / 127.5 - 1.0 for b in digest], dtype=torch.float32)


@dataclass
class TinyModel:
    """The `LoadedModel` interface of keyface_core.backends.diffusers, with a tiny random model behind it."""

    seed: int
    kind: str = "eps"
    latent_channels: int = LATENT_CHANNELS
    downscale: int = DOWNSCALE
    scale_factor: float = SCALE_FACTOR
    shift_factor: float = 0.0
    add_noise: Callable = sampling.eps_add_noise
    model_id: str = ""
    _net: _Net = field(default=None, repr=False)
    _cond: tuple = field(default=(None, None, 1.0), repr=False)

    def __post_init__(self):
        self._net = _Net(self.seed)
        g = torch.Generator().manual_seed(self.seed + 1)
        # The "VAE": 8x8 average pooling and a fixed 3 -> 4 channel map (pseudo-inverse to decode).
        self._enc = torch.randn(LATENT_CHANNELS, 3, generator=g) / math.sqrt(3)
        self._dec = torch.linalg.pinv(self._enc)
        digest = hashlib.sha256(b"keyface-dev/tiny/v1\0")
        for p in self._net.parameters_list() + [self._enc]:
            digest.update(p.numpy().tobytes())
        self.model_id = "dev-" + digest.hexdigest()[:32]
        self.set_conditioning("", "", 1.0)

    def sigmas(self, steps: int, scheduler: str) -> torch.Tensor:
        return schedule(steps, scheduler)

    def set_conditioning(self, prompt: str, negative: str = "", cfg: float = 1.0) -> str:
        self._cond = (_prompt_vector(prompt), _prompt_vector(negative), float(cfg))
        return "dev-cond-" + hashlib.sha256(f"{prompt}\0{negative}\0{float(cfg)!r}".encode()).hexdigest()[:24]

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        cond, uncond, cfg = self._cond
        sigma = torch.as_tensor(sigma)
        with torch.no_grad():
            eps = self._net(x, sigma, cond)
            if cfg != 1.0:   # cond and uncond in separate calls, like the real backends
                eps_u = self._net(x, sigma, uncond)
                eps = eps_u + cfg * (eps - eps_u)
        return x - sigma.to(x.dtype) * eps

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(pixels.to(torch.float32) * 2.0 - 1.0, DOWNSCALE)
        latent = torch.einsum("oc,bchw->bohw", self._enc, pooled)
        return (latent - self.shift_factor) * self.scale_factor

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        vae = latent.to(torch.float32) / self.scale_factor + self.shift_factor
        rgb = torch.einsum("co,bohw->bchw", self._dec, vae)
        up = F.interpolate(rgb, scale_factor=DOWNSCALE, mode="bilinear", align_corners=False)
        return ((up + 1.0) / 2.0).clamp(0.0, 1.0)


def load(spec: str, *, device: str = "cpu") -> TinyModel:
    """`dev:tiny` or `dev:tiny:SEED`."""
    parts = spec.split(":")
    if parts[:2] != ["dev", "tiny"] or len(parts) > 3:
        raise ValueError(f"not a dev model spec: {spec!r}")
    seed = int(parts[2]) if len(parts) == 3 else 0
    if device not in ("cpu", "auto"):
        raise ValueError("the dev:tiny model runs on the CPU only")
    return TinyModel(seed)
