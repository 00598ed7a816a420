"""The diffusers backend: a denoiser in ComfyUI's sigma space over a diffusers model folder (no ComfyUI import).

It hands the protocol the `LoadedModel` interface the CLI uses (`keyface/models.py`). Today it covers the
authors' family, an unconditional `UNet2DModel` with a `VQModel` or `AutoencoderKL` (e.g. the layout of
CompVis/ldm-celebahq-256: `unet/`, `vqvae/`, `scheduler/`), with eps or v prediction read from the scheduler
config. Text-conditioned pipelines (SD1.5/SDXL `UNet2DConditionModel`, SD3/Flux transformers) and single
checkpoint files are refused with a clear message: they are not built yet.

diffusers is imported inside functions, so `import keyface_core` never needs it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from keyface_core import sampling
from keyface_core.errors import InputMismatchError, KeyFaceError

SCHEDULERS = ("normal", "karras", "exponential", "simple")
AUTOENCODERS = (("vqvae", "VQModel"), ("vae", "AutoencoderKL"), ("vae", "VQModel"))


class BackendError(KeyFaceError):
    """A diffusers model cannot be used (what happened, what to do)."""


def training_sigmas(scheduler_config: dict) -> torch.Tensor:
    """The model's training noise levels (ascending, float64) from its scheduler config, as ComfyUI derives them.

    diffusers' "scaled_linear" is ComfyUI's "linear" (betas linear in sqrt); diffusers' "linear" is linear in beta."""
    steps = int(scheduler_config.get("num_train_timesteps", 1000))
    start = float(scheduler_config.get("beta_start", 0.0001))
    end = float(scheduler_config.get("beta_end", 0.02))
    kind = scheduler_config.get("beta_schedule", "linear")
    if scheduler_config.get("trained_betas"):
        betas = torch.tensor(scheduler_config["trained_betas"], dtype=torch.float64)
    elif kind == "scaled_linear":
        betas = torch.linspace(start ** 0.5, end ** 0.5, steps, dtype=torch.float64) ** 2
    elif kind == "linear":
        betas = torch.linspace(start, end, steps, dtype=torch.float64)
    elif kind == "squaredcos_cap_v2":
        t = torch.arange(steps + 1, dtype=torch.float64) / steps
        alpha_bar = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    else:
        raise BackendError(f"the scheduler config's beta_schedule {kind!r} is not supported; supported: "
                           "linear, scaled_linear, squaredcos_cap_v2 (or trained_betas).")
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def discrete_schedule(table: torch.Tensor, steps: int, scheduler: str) -> torch.Tensor:
    """float32 sigmas descending to 0 over a discrete model's training table, the way ComfyUI computes them."""
    if steps < 1:
        raise InputMismatchError("steps must be at least 1")
    log_table = table.log()
    sigma_min, sigma_max = float(table[0]), float(table[-1])

    def sigma_at(t: torch.Tensor) -> torch.Tensor:   # k-diffusion DiscreteSchedule.t_to_sigma
        low = t.floor().long().clamp(0, len(table) - 1)
        high = (low + 1).clamp(max=len(table) - 1)
        w = t - low
        return ((1 - w) * log_table[low] + w * log_table[high]).exp()

    if scheduler == "normal":
        sig = sigma_at(torch.linspace(len(table) - 1, 0, steps, dtype=torch.float64))
    elif scheduler == "simple":
        stride = len(table) / steps
        sig = torch.stack([table[-(1 + int(i * stride))] for i in range(steps)])
    elif scheduler == "karras":
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
        rho = 7.0
        sig = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    elif scheduler == "exponential":
        sig = torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64).exp()
    else:
        raise InputMismatchError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    return torch.cat([sig, sig.new_zeros(1)]).to(torch.float32)


def sigma_to_timestep(table: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The (fractional) training timestep of a noise level: log-sigma interpolation (k-diffusion's sigma_to_t)."""
    log_sigma = sigma.to(torch.float64).clamp_min(1e-10).log()
    log_table = table.log()
    dists = log_sigma - log_table
    low = (dists >= 0).cumsum(0).argmax().clamp(max=len(table) - 2)
    high = low + 1
    w = ((log_table[low] - log_sigma) / (log_table[low] - log_table[high])).clamp(0, 1)
    return (1 - w) * low + w * high


def weights_fingerprint(*modules: torch.nn.Module) -> str:
    """A digest of the weights themselves (names and values, in state-dict order): the same folder, the same id."""
    digest = hashlib.sha256(b"keyface/diffusers-weights/v1\0")
    for module in modules:
        for name, tensor in module.state_dict().items():
            digest.update(name.encode() + b"\0" + str(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return "dfu-" + digest.hexdigest()[:32]


@dataclass
class LoadedModel:
    """What the protocol needs from a model: denoise in sigma space, the schedule, the autoencoder."""

    kind: str                    # "eps" | "v"
    unet: torch.nn.Module = field(repr=False)
    autoencoder: torch.nn.Module = field(repr=False)
    table: torch.Tensor = field(repr=False)
    latent_channels: int
    downscale: int
    scale_factor: float = 1.0
    shift_factor: float = 0.0
    model_id: str = ""
    add_noise: Callable = sampling.eps_add_noise
    quantized: bool = False

    def sigmas(self, steps: int, scheduler: str) -> torch.Tensor:
        return discrete_schedule(self.table, steps, scheduler)

    def set_conditioning(self, prompt: str, negative: str = "", cfg: float = 1.0) -> str:
        if prompt or negative or float(cfg) != 1.0:
            raise InputMismatchError("this model is unconditional (a UNet2DModel): it takes no prompt and no cfg; "
                                     "leave --prompt/--negative empty and --cfg at 1.")
        return "uncond"

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        dtype = next(self.unet.parameters()).dtype
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(())
        c_in = 1.0 / math.sqrt(float(sigma) ** 2 + 1.0)
        t = sigma_to_timestep(self.table, sigma).to(torch.float32).expand(x.shape[0])
        with torch.no_grad():
            # Contiguous, one layout always: a convolution may round differently on another memory layout,
            # and the exact inversion needs the same bits for the same state in both directions.
            out = self.unet((x * c_in).to(dtype).contiguous(), t.to(x.device)).sample.to(x.dtype)
        s = sigma.to(x.dtype)
        if self.kind == "v":   # ComfyUI's V_PREDICTION with sigma_data 1
            return x / (s ** 2 + 1) - out * s / (s ** 2 + 1) ** 0.5
        return x - s * out

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        dtype = next(self.autoencoder.parameters()).dtype
        with torch.no_grad():
            encoded = self.autoencoder.encode((pixels * 2.0 - 1.0).to(dtype))
        latent = encoded.latents if self.quantized else encoded.latent_dist.mode()
        return ((latent.to(torch.float32) - self.shift_factor) * self.scale_factor)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        dtype = next(self.autoencoder.parameters()).dtype
        vae_latent = (latent.to(torch.float32) / self.scale_factor + self.shift_factor).to(dtype)
        with torch.no_grad():
            image = self.autoencoder.decode(vae_latent).sample
        return ((image.to(torch.float32) + 1.0) / 2.0).clamp(0.0, 1.0)


def _resolve(spec: str) -> Path:
    """A local diffusers folder, or a repo id resolved through the Hugging Face cache exactly as diffusers does
    (a download only when the user names a repo that is not cached and HF_HUB_OFFLINE is not set)."""
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        return path
    if path.suffix in (".safetensors", ".ckpt", ".pt", ".bin") or path.is_file():
        raise BackendError(f"{spec!r} is a single checkpoint file; the diffusers backend loads diffusers folders "
                           "(model_index.json + unet/ + vqvae/ or vae/ + scheduler/) in this version. Convert it "
                           "with diffusers' from_single_file + save_pretrained, or use the ComfyUI nodes.")
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        from huggingface_hub import snapshot_download
        try:
            return Path(snapshot_download(spec))
        except Exception as err:   # offline and not cached, unknown repo, network
            raise BackendError(f"cannot find the model {spec!r} in the Hugging Face cache or download it "
                               f"({type(err).__name__}); pass a local diffusers folder instead.") from None
    raise BackendError(f"{spec!r} is not a folder, a checkpoint file or a Hugging Face repo id.")


def load(model: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32, kind: str | None = None) -> LoadedModel:
    """Load an unconditional diffusers LDM (UNet2DModel + VQModel/AutoencoderKL + scheduler) from `model`."""
    import diffusers

    root = _resolve(model)
    unet_config = _config(root / "unet")
    unet_class = unet_config.get("_class_name", "")
    if unet_class != "UNet2DModel":
        raise BackendError(f"{root.name}: its denoiser is a {unet_class or 'unknown model'}; this version of the "
                           "diffusers backend runs unconditional UNet2DModel pipelines only (the paper's face LDM "
                           "family). For SD1.5/SDXL/SD3/Flux checkpoints use the ComfyUI nodes.")
    for folder, class_name in AUTOENCODERS:
        if (root / folder / "config.json").is_file() and _config(root / folder).get("_class_name") == class_name:
            break
    else:
        raise BackendError(f"{root.name} has no vqvae/ or vae/ folder with a VQModel or AutoencoderKL config.")
    scheduler_config = _config(root / "scheduler", "scheduler_config.json")
    prediction = kind or {"epsilon": "eps", "v_prediction": "v"}.get(scheduler_config.get("prediction_type", "epsilon"))
    if prediction not in ("eps", "v"):
        raise BackendError(f"prediction_type {scheduler_config.get('prediction_type')!r} is not supported (epsilon, "
                           "v_prediction).")
    unet = diffusers.UNet2DModel.from_pretrained(root / "unet", torch_dtype=dtype).to(device).eval()
    autoencoder = getattr(diffusers, class_name).from_pretrained(root / folder, torch_dtype=dtype).to(device).eval()
    config = autoencoder.config
    downscale = 2 ** (len(config.block_out_channels) - 1)
    return LoadedModel(
        kind=prediction, unet=unet, autoencoder=autoencoder, table=training_sigmas(scheduler_config),
        latent_channels=int(config.latent_channels), downscale=downscale,
        scale_factor=float(getattr(config, "scaling_factor", 1.0) or 1.0),
        shift_factor=float(getattr(config, "shift_factor", 0.0) or 0.0),
        model_id=weights_fingerprint(unet, autoencoder), quantized=class_name == "VQModel")


def _config(folder: Path, name: str = "config.json") -> dict:
    path = folder / name
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise BackendError(f"{path} is missing: not a diffusers pipeline folder (expected unet/, vqvae/ or vae/, "
                           "scheduler/).") from None
    except (OSError, ValueError) as err:
        raise BackendError(f"cannot read {path}: {err}") from None
