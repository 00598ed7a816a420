"""Runs KeyFace's core samplers inside ComfyUI's own sampling machinery.

A `comfy.samplers.Sampler` subclass is handed to `CFGGuider.sample`, so model loading, conditioning,
CFG, model patches (LoRA, ControlNet, hooks) and memory management are ComfyUI's. Inside, the guider
becomes the core's ``denoise(x, sigma) -> x0`` and the core algorithm runs on model-space latents.
Noise scaling is bypassed (it divides by 1 - sigma for flow models, which breaks at sigma = 1).
"""

from __future__ import annotations

import hashlib
import weakref

import torch

import comfy.model_management
import comfy.model_sampling
import comfy.samplers

from ..keyface_core import sampling as core
from ..keyface_core.errors import InputMismatchError


def _one_cond_at_a_time(args: dict) -> list:
    """Evaluate cond and uncond in separate model calls.

    ComfyUI batches them when free memory allows, so two runs of the same prompt can differ in the
    last bits; exact restore needs every model call to be reproducible (REFERENCE.md §2).
    """
    model, x, sigma, options = args["model"], args["input"], args["sigma"], args["model_options"]
    return [comfy.samplers.calc_cond_batch(model, [cond], x, sigma, options)[0] for cond in args["conds"]]


def reproducible(model_patcher):
    """A clone of the model whose cond/uncond batching does not depend on free memory."""
    patched = model_patcher.clone()
    patched.model_options["sampler_calc_cond_batch_function"] = _one_cond_at_a_time
    return patched


def add_noise_for(model_patcher):
    """The model's forward-noising rule (flow models mix; eps/v/EDM add)."""
    sampling = model_patcher.get_model_object("model_sampling")
    return core.flow_add_noise if isinstance(sampling, comfy.model_sampling.CONST) else core.eps_add_noise


def sigmas_for(model_patcher, scheduler: str, steps: int) -> torch.Tensor:
    """ComfyUI's own schedule (float32, descending, ending at 0), as KSampler computes it."""
    sampling = model_patcher.get_model_object("model_sampling")
    return comfy.samplers.calculate_sigmas(sampling, scheduler, steps).cpu()


def latent_format(model_patcher):
    return model_patcher.model.latent_format


def to_model_space(model_patcher, samples: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """LATENT samples (VAE space) -> model space (scale/shift applied), in `dtype`."""
    return latent_format(model_patcher).process_in(samples.to(dtype))


def to_latent_space(model_patcher, state: torch.Tensor) -> torch.Tensor:
    """Model-space state -> float32 LATENT samples."""
    return latent_format(model_patcher).process_out(state).to(torch.float32)


_identity_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def model_identity(model_patcher) -> str:
    """Cached `_compute_identity`: recomputed only when the weights object or its patch set changes."""
    key = (model_patcher.patches_uuid, tuple(sorted(model_patcher.patches)))
    cached = _identity_cache.get(model_patcher.model)
    if cached is None or cached[0] != key:
        cached = (key, _compute_identity(model_patcher))
        _identity_cache[model_patcher.model] = cached
    return cached[1]


def _compute_identity(model_patcher) -> str:
    """A cheap fingerprint of the model as it will run: class, sampling, sampled weights, patches.

    Restore must use the same model; hashing all weights would take seconds per run, so a fixed
    sample of every parameter tensor (shape + strided values) and the patch list stand in.
    """
    digest = hashlib.sha256()
    model = model_patcher.model
    sampling = model_patcher.get_model_object("model_sampling")
    digest.update(type(model).__name__.encode())
    digest.update(type(sampling).__name__.encode())
    for name in ("sigma_min", "sigma_max", "shift", "multiplier"):
        value = getattr(sampling, name, None)
        if value is not None:
            digest.update(f"{name}={float(value):.9g}".encode())
    digest.update(type(model.latent_format).__name__.encode())
    state = model.diffusion_model.state_dict()
    for key in sorted(state):
        tensor = state[key]
        digest.update(key.encode() + str(tuple(tensor.shape)).encode())
        flat = tensor.reshape(-1)
        if flat.numel():
            stride = max(1, flat.numel() // 16)
            digest.update(flat[::stride][:16].detach().to("cpu", torch.float32).numpy().tobytes())
    for key in sorted(model_patcher.patches):
        for patch in model_patcher.patches[key]:
            digest.update(f"{key}:{patch[0]:.6g}:{patch[2]:.6g}".encode())
    return digest.hexdigest()[:16]


class _CoreSampler(comfy.samplers.Sampler):
    """Adapts ComfyUI's sampler contract to one core call; the result is read back from `.result`."""

    def __init__(self, run):
        self.run = run
        self.result = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False):
        def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            comfy.model_management.throw_exception_if_processing_interrupted()
            sigma = sigma.to(torch.float32) if sigma.dtype != torch.float32 else sigma
            # Same call as k-diffusion's samplers: model(x, sigma * s_in, **extra_args).
            s_in = torch.ones([x.shape[0]], dtype=torch.float32, device=x.device)
            return model_wrap(x.to(torch.float32), sigma.to(x.device) * s_in, **extra_args)

        self.result = self.run(denoise)
        # The guider post-processes what we return; the exact float64 result lives in self.result.
        return torch.zeros_like(noise)


def run_core(model_patcher, positive, negative, cfg: float, shape: tuple, sigmas: torch.Tensor, run):
    """Run ``run(denoise)`` inside CFGGuider.sample with a reproducible model; returns its result."""
    model = reproducible(model_patcher)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative if negative is not None else positive)
    guider.set_cfg(cfg)
    sampler = _CoreSampler(run)
    zeros = torch.zeros(shape, dtype=torch.float32)
    # The guider's own noise scaling is bypassed: our sampler ignores `noise` and returns a dummy.
    with torch.no_grad():
        try:
            guider.sample(zeros, zeros, sampler, sigmas.to(torch.float32), disable_pbar=True, seed=0)
        except KeyError as err:
            if err.args and err.args[0] == "pooled_output":  # SDXL/SD3/Flux read it; ComfyUI raises a bare KeyError
                raise InputMismatchError("this model needs a pooled text embedding in its conditioning; connect a "
                                         "CLIP Text Encode made with this checkpoint's CLIP.") from None
            raise
    return sampler.result


def default_conditioning(model_patcher, batch: int = 1):
    """An empty conditioning for UNet models with cross-attention, when none is connected."""
    config = getattr(model_patcher.model, "model_config", None)
    unet = getattr(config, "unet_config", {}) or {}
    context_dim = unet.get("context_dim")
    if context_dim is None or unet.get("adm_in_channels"):
        return None
    return [[torch.zeros([1, 77, int(context_dim)]), {}]]


