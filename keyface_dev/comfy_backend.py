"""A ComfyUI-hosted model behind the CLI's `LoadedModel` interface (dev only: tests and benchmarks).

`dev:comfy-tiny[:SEED]` / `dev:comfy-sd15[:SEED]` load the seeded random ComfyUI UNets of `tiny_models` (tiny, or
SD1.5-sized) and the tiny VAE, and run every model call through the nodes' own `model_adapter.run_core` (the same
CFGGuider, the same one-cond-per-call rule) - so a file the CLI writes with it restores in the ComfyUI nodes and
back (interchange), and the CLI-vs-nodes benchmark compares the same model calls. `run_core` runs a whole core
algorithm inside one `guider.sample`; the CLI calls the denoiser step by step, so each latent shape gets a
session: one `guider.sample` kept open on a worker thread, serving denoise calls from a queue.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

import torch

from keyface_core import sampling

from . import comfy_host, tiny_models


class _Session:
    """One open guider.sample for one latent shape, serving `denoise(x, sigma)` calls."""

    def __init__(self, adapter, patcher, conds, shape, sigmas):
        self.requests: queue.Queue = queue.Queue()
        self.replies: queue.Queue = queue.Queue()

        def serve(denoise):
            while True:
                item = self.requests.get()
                if item is None:
                    return None
                try:
                    self.replies.put((True, denoise(*item)))
                except BaseException as err:   # handed to the caller's thread
                    self.replies.put((False, err))

        def run():
            try:
                adapter.run_core(patcher, conds[0], conds[1], conds[2], shape, sigmas, serve)
            except BaseException as err:
                self.replies.put((False, err))

        self.thread = threading.Thread(target=run, name="keyface-comfy-session", daemon=True)
        self.thread.start()

    def __call__(self, x, sigma):
        self.requests.put((x, sigma))
        ok, value = self.replies.get()
        if not ok:
            raise value
        return value

    def close(self):
        self.requests.put(None)
        self.thread.join(timeout=30)


@dataclass
class ComfyModel:
    """`LoadedModel` over a ComfyUI ModelPatcher + VAE (empty prompt only: the UNet's default conditioning)."""

    patcher: object
    vae: object
    kind: str = "eps"
    latent_channels: int = 4
    downscale: int = 8
    add_noise: object = sampling.eps_add_noise
    model_id: str = ""
    scale_factor: float = 1.0
    shift_factor: float = 0.0
    _sessions: dict = field(default_factory=dict, repr=False)
    _cfg: float = 1.0

    def __post_init__(self):
        self._adapter = comfy_host.pack_module("nodes.model_adapter")
        self._conditioning = comfy_host.pack_module("nodes.conditioning")
        self.model_id = self._adapter.model_identity(self.patcher)
        fmt = self._adapter.latent_format(self.patcher)
        self.scale_factor, self.shift_factor = float(fmt.scale_factor), float(getattr(fmt, "shift_factor", 0.0) or 0.0)
        self.add_noise = self._adapter.add_noise_for(self.patcher)
        # The pack's own sampling module: `add_noise` must be the function the pack compares against.
        self._positive = self._adapter.default_conditioning(self.patcher)

    def sigmas(self, steps: int, scheduler: str) -> torch.Tensor:
        return self._adapter.sigmas_for(self.patcher, scheduler, steps)

    def set_conditioning(self, prompt: str, negative: str = "", cfg: float = 1.0) -> str:
        if prompt or negative:
            raise ValueError("the dev:comfy models take no prompt (the UNet's empty default conditioning)")
        if float(cfg) != self._cfg:
            self.close()
        self._cfg = float(cfg)
        return self._conditioning.conditioning_id(self._positive, self._positive)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        shape = tuple(x.shape)
        session = self._sessions.get(shape)
        if session is None:
            sigmas = self.sigmas(1, "normal")
            session = self._sessions[shape] = _Session(self._adapter, self.patcher,
                                                       (self._positive, self._positive, self._cfg), shape, sigmas)
        return session(x, sigma)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            latent = self.vae.encode(pixels.permute(0, 2, 3, 1).to(torch.float32))
        return (latent.to(torch.float64) - self.shift_factor) * self.scale_factor

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        vae_space = (latent.to(torch.float64) / self.scale_factor + self.shift_factor).to(torch.float32)
        with torch.no_grad():
            return self.vae.decode(vae_space)[..., :3].permute(0, 3, 1, 2).to(torch.float32)

    def release(self):
        """End the open sessions after each image: the ComfyUI model is then free for other samplers (the nodes)."""
        self.close()

    def close(self):
        for session in self._sessions.values():
            session.close()
        self._sessions.clear()


def load(spec: str, *, device: str = "auto") -> ComfyModel:
    """`dev:comfy-tiny[:SEED]` or `dev:comfy-sd15[:SEED]` (CPU)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[1] not in ("comfy-tiny", "comfy-sd15"):
        raise ValueError(f"not a dev ComfyUI model spec: {spec!r}")
    seed = int(parts[2]) if len(parts) == 3 else 0
    comfy_host.boot()
    size = tiny_models.SD15_UNET if parts[1] == "comfy-sd15" else None
    return ComfyModel(tiny_models.unet_model(seed, "eps", size), tiny_models.vae_model(seed))
