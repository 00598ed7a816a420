"""Text-conditioned diffusers models behind the `LoadedModel` interface: SD1.5 and SDXL (`UNet2DConditionModel`,
eps or v), SD3 (`SD3Transformer2DModel`, rectified flow) and Flux (`FluxTransformer2DModel`, packed latents,
guidance embedding), with their CLIP and T5 text encoders.

Prompts are encoded the way the diffusers pipelines encode them (StableDiffusionPipeline, StableDiffusionXLPipeline,
StableDiffusion3Pipeline, FluxPipeline, clip_skip unset), so a prompt means here what it means in diffusers. Classifier-free
guidance runs the conditional and the unconditional branch in two separate model calls (never a batch of two: the
exact inversion needs every call to give the same bits for the same state), and is skipped at cfg 1 as ComfyUI does.

The conditioning fingerprint (`set_conditioning`'s return value, stored in the file) is a digest of the token ids,
the text embeddings and cfg. The prompt text itself is never stored or logged: a prompt may describe the person.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch

from keyface_core import sampling
from keyface_core.errors import InputMismatchError

from .diffusers import LoadedModel, nearest_timestep, schedule_over

COND_PREFIX = "dfc1-"   # bump when what the digest covers changes


@dataclass
class TextEncoder:
    """One tokenizer + text encoder pair, and which of its outputs the pipeline uses."""

    tokenizer: object = field(repr=False)
    encoder: torch.nn.Module = field(repr=False)
    hidden: str = "last"        # "last": last_hidden_state (SD1.5); "penultimate": hidden_states[-2] (SDXL, SD3)
    max_length: int = 77


@dataclass
class Embedding:
    """The tensors one prompt gives the denoiser (batch 1; expanded to the face batch at call time)."""

    context: torch.Tensor
    pooled: torch.Tensor | None = None


def _tokens(text: TextEncoder, prompt: str) -> torch.Tensor:
    return text.tokenizer(prompt, padding="max_length", max_length=text.max_length, truncation=True,
                          return_tensors="pt").input_ids


def _encode_clip(text: TextEncoder, prompt: str, digest) -> tuple[torch.Tensor, torch.Tensor | None]:
    ids = _tokens(text, prompt)
    digest.update(b"ids" + ids.to(torch.int64).numpy().tobytes())
    device = next(text.encoder.parameters()).device
    with torch.no_grad():
        out = text.encoder(ids.to(device), output_hidden_states=True)
    hidden = out.hidden_states[-2] if text.hidden == "penultimate" else out[0]
    pooled = out[0] if out[0].ndim == 2 else None     # CLIPTextModelWithProjection: text_embeds
    return hidden.to(torch.float32), (pooled.to(torch.float32) if pooled is not None else None)


def _digest_tensor(digest, tensor: torch.Tensor | None) -> None:
    if tensor is None:
        digest.update(b"none")
        return
    digest.update(str(tuple(tensor.shape)).encode())
    digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())


@dataclass
class TextConditionedModel(LoadedModel):
    """A `UNet2DConditionModel` (family "sd" or "sdxl"), an `SD3Transformer2DModel` ("sd3") or a
    `FluxTransformer2DModel` ("flux")."""

    family: str = "sd"
    texts: list = field(default_factory=list, repr=False)      # [TextEncoder]
    t5: TextEncoder | None = field(default=None, repr=False)   # SD3's optional third encoder; Flux's context
    joint_dim: int = 0                                          # SD3/Flux: the transformer's joint_attention_dim
    zero_empty_negative: bool = False                           # SDXL's force_zeros_for_empty_prompt
    flow_multiplier: float = 1000.0
    guidance: float | None = None                               # Flux-dev's distilled guidance (embedded)
    _cond: tuple = field(default=None, repr=False)

    def __post_init__(self):
        self.set_conditioning("", "", 1.0)

    # ------------------------------------------------------------------ conditioning
    def _embed(self, prompt: str, digest) -> Embedding:
        if self.family == "sd":
            context, _ = _encode_clip(self.texts[0], prompt, digest)
            return Embedding(context)
        if self.family == "flux":
            digest.update(b"ids" + _tokens(self.texts[0], prompt).to(torch.int64).numpy().tobytes())
            return self._embed_flux(prompt, digest)
        hiddens, pooled = [], []
        for text in self.texts:
            hidden, pool = _encode_clip(text, prompt, digest)
            hiddens.append(hidden)
            pooled.append(pool)
        context = torch.cat(hiddens, dim=-1)
        if self.family == "sdxl":                 # pooled from the last encoder with a projection (text_encoder_2)
            return Embedding(context, next(p for p in reversed(pooled) if p is not None))
        # SD3: CLIP-L + CLIP-G hidden states padded to the T5 width, then the T5 tokens after them
        context = torch.nn.functional.pad(context, (0, self.joint_dim - context.shape[-1]))
        if self.t5 is not None:
            ids = _tokens(self.t5, prompt)
            digest.update(b"t5" + ids.to(torch.int64).numpy().tobytes())
            device = next(self.t5.encoder.parameters()).device
            with torch.no_grad():
                t5 = self.t5.encoder(ids.to(device))[0].to(torch.float32)
        else:                                     # diffusers' StableDiffusion3Pipeline without text_encoder_3
            t5 = torch.zeros(1, 256, self.joint_dim)
        return Embedding(torch.cat([context, t5], dim=-2), torch.cat(pooled, dim=-1))

    def _embed_flux(self, prompt: str, digest) -> Embedding:
        """FluxPipeline.encode_prompt: CLIP's pooled output, and T5's hidden states as the context."""
        ids = _tokens(self.t5, prompt)
        digest.update(b"t5" + ids.to(torch.int64).numpy().tobytes())
        device = next(self.t5.encoder.parameters()).device
        with torch.no_grad():
            t5 = self.t5.encoder(ids.to(device), output_hidden_states=False)[0].to(torch.float32)
            clip = self.texts[0].encoder(_tokens(self.texts[0], prompt).to(device), output_hidden_states=False)
        return Embedding(t5, clip.pooler_output.to(torch.float32))

    def _zeros_like(self, embedding: Embedding) -> Embedding:
        pooled = None if embedding.pooled is None else torch.zeros_like(embedding.pooled)
        return Embedding(torch.zeros_like(embedding.context), pooled)

    def set_conditioning(self, prompt: str, negative: str = "", cfg: float = 1.0) -> str:
        cfg = float(cfg)
        if not math.isfinite(cfg) or cfg <= 0:
            raise InputMismatchError(f"cfg must be a positive number (got {cfg!r}).")
        digest = hashlib.sha256(b"keyface/diffusers-conditioning/v1\0" + self.family.encode())
        positive = self._embed(prompt, digest)
        _digest_tensor(digest, positive.context)
        _digest_tensor(digest, positive.pooled)
        digest.update(b"|")
        uncond = None
        if cfg != 1.0:
            if not negative and self.zero_empty_negative:
                uncond = self._zeros_like(positive)
                digest.update(b"zeros")
            else:
                uncond = self._embed(negative, digest)
            _digest_tensor(digest, uncond.context)
            _digest_tensor(digest, uncond.pooled)
        # at cfg 1 the unconditional branch is never run (as in ComfyUI), so a negative prompt changes nothing
        digest.update(b"cfg" + repr(cfg).encode())
        if self.guidance is not None:
            digest.update(b"guidance" + repr(float(self.guidance)).encode())
        self._cond = (positive, uncond, cfg)
        return COND_PREFIX + digest.hexdigest()[:24]

    # ------------------------------------------------------------------ model calls
    def _call(self, x: torch.Tensor, sigma: torch.Tensor, embedding: Embedding) -> torch.Tensor:
        """One denoiser call for one branch: the raw network output (eps, v or flow velocity)."""
        dtype = next(self.unet.parameters()).dtype
        device = x.device
        batch = x.shape[0]
        context = embedding.context.to(device, dtype).expand(batch, -1, -1).contiguous()
        with torch.no_grad():
            if self.family == "flux":
                return self._call_flux(x, sigma, context, embedding)
            if self.family == "sd3":
                t = (sigma.to(torch.float32) * self.flow_multiplier).expand(batch).to(device)
                pooled = embedding.pooled.to(device, dtype).expand(batch, -1).contiguous()
                return self.unet(hidden_states=x.to(dtype).contiguous(), encoder_hidden_states=context,
                                 pooled_projections=pooled, timestep=t, return_dict=False)[0].to(x.dtype)
            c_in = 1.0 / math.sqrt(float(sigma) ** 2 + 1.0)
            # ComfyUI's rule (nearest training step), not k-diffusion's interpolation: the same checkpoint then
            # computes the same function here and in the nodes (the unconditional family keeps interpolation)
            t = nearest_timestep(self.table, sigma).to(torch.float32).expand(batch).to(device)
            added = None
            if self.family == "sdxl":
                # (original size, crop top-left, target size) in pixels, as the SDXL pipeline passes them
                h, w = x.shape[-2] * self.downscale, x.shape[-1] * self.downscale
                time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=dtype, device=device).expand(batch, -1)
                added = {"text_embeds": embedding.pooled.to(device, dtype).expand(batch, -1).contiguous(),
                         "time_ids": time_ids.contiguous()}
            return self.unet((x * c_in).to(dtype).contiguous(), t, encoder_hidden_states=context,
                             added_cond_kwargs=added, return_dict=False)[0].to(x.dtype)

    def _call_flux(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, embedding: Embedding):
        """FluxPipeline's transformer call: 2x2 patches packed into tokens, positions as ids, timestep = sigma."""
        dtype = next(self.unet.parameters()).dtype
        b, c, h, w = x.shape
        if h % 2 or w % 2:
            raise InputMismatchError(f"a Flux latent needs an even size (got {h}x{w}); use a --crop-size that is a "
                                     f"multiple of {2 * self.downscale}.")
        packed = x.to(dtype).reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * 4)
        img_ids = torch.zeros(h // 2, w // 2, 3)
        img_ids[..., 1] += torch.arange(h // 2)[:, None]
        img_ids[..., 2] += torch.arange(w // 2)[None, :]
        device = x.device
        guidance = None
        if self.guidance is not None:
            guidance = torch.full([b], float(self.guidance), dtype=torch.float32, device=device)
        out = self.unet(hidden_states=packed.contiguous(), timestep=sigma.to(torch.float32).expand(b).to(device),
                        guidance=guidance, pooled_projections=embedding.pooled.to(device, dtype).expand(b, -1)
                        .contiguous(), encoder_hidden_states=context,
                        txt_ids=torch.zeros(context.shape[1], 3, dtype=dtype, device=device),
                        img_ids=img_ids.reshape(-1, 3).to(device, dtype), return_dict=False)[0]
        return out.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w).to(x.dtype)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        positive, uncond, cfg = self._cond
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(())
        out = self._call(x, sigma, positive)
        if uncond is not None:   # the unconditional branch in its own call (reproducible bits)
            out_u = self._call(x, sigma, uncond)
            out = out_u + cfg * (out - out_u)
        s = sigma.to(x.dtype)
        if self.kind == "flow":  # ComfyUI's CONST: x0 = x - sigma * v
            return x - s * out
        if self.kind == "v":
            return x / (s ** 2 + 1) - out * s / (s ** 2 + 1) ** 0.5
        return x - s * out


def _shifted(t: torch.Tensor, shift: float, rule: str) -> torch.Tensor:
    """ComfyUI's time shifts: "sd3" time_snr_shift (ModelSamplingDiscreteFlow), "flux" flux_time_shift with
    mu = shift (ModelSamplingFlux)."""
    if rule == "flux":
        return math.exp(shift) / (math.exp(shift) + (1 / t - 1))
    return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


def flow_table(shift: float, steps: int = 1000, rule: str = "sd3") -> torch.Tensor:
    """ComfyUI's flow sigmas (ascending): the shifted time at t = 1/steps .. 1."""
    return _shifted(torch.arange(1, steps + 1, dtype=torch.float64) / steps, shift, rule)


def flow_schedule(shift: float, steps: int, scheduler: str, train_steps: int = 1000, rule: str = "sd3") -> torch.Tensor:
    """float32 flow sigmas from 1 down to 0, as comfy.samplers.calculate_sigmas computes them for a flow model."""
    if steps < 1:
        raise InputMismatchError("steps must be at least 1")
    table = flow_table(shift, train_steps, rule)
    sigma_min, sigma_max = float(table[0]), float(table[-1])
    return schedule_over(table, steps, scheduler, lambda: _shifted(
        torch.linspace(sigma_max, sigma_min, steps, dtype=torch.float64), shift, rule))


@dataclass
class FlowModel(TextConditionedModel):
    """SD3 and Flux: sigmas in [0, 1] with x = (1 - sigma) x0 + sigma eps, shifted as the scheduler config says."""

    shift: float = 1.0
    train_steps: int = 1000
    shift_rule: str = "sd3"
    add_noise: object = sampling.flow_add_noise

    def sigmas(self, steps: int, scheduler: str) -> torch.Tensor:
        return flow_schedule(self.shift, steps, scheduler, self.train_steps, self.shift_rule)
