"""The diffusers backend: a denoiser in ComfyUI's sigma space over diffusers models (no ComfyUI import).

It hands the protocol the `LoadedModel` interface the CLI uses (`keyface/models.py`), for
- the authors' family, an unconditional `UNet2DModel` with a `VQModel` or `AutoencoderKL` (the layout of
  CompVis/ldm-celebahq-256: `unet/`, `vqvae/`, `scheduler/`), eps or v prediction from the scheduler config;
- text-conditioned SD1.5/SD2/SDXL (`UNet2DConditionModel` + CLIP), SD3 (`SD3Transformer2DModel`) and Flux
  (`FluxTransformer2DModel`) rectified-flow pipelines (`diffusers_text.py`, built by `diffusers_build.py`).
A model comes from a diffusers folder, from a repo id resolved through the Hugging Face cache, or from one
original-layout checkpoint file (`from_single_file`, configs from a diffusers folder or the cache). The sigma
schedule always comes from the model's scheduler config.

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

    def sigma_at(t: torch.Tensor) -> torch.Tensor:   # k-diffusion DiscreteSchedule.t_to_sigma
        low = t.floor().long().clamp(0, len(table) - 1)
        high = (low + 1).clamp(max=len(table) - 1)
        w = t - low
        return ((1 - w) * log_table[low] + w * log_table[high]).exp()

    return schedule_over(table, steps, scheduler,
                         lambda: sigma_at(torch.linspace(len(table) - 1, 0, steps, dtype=torch.float64)))


def schedule_over(table: torch.Tensor, steps: int, scheduler: str, normal: Callable[[], torch.Tensor]) -> torch.Tensor:
    """float32 sigmas descending to 0 over an ascending training table, as comfy.samplers.calculate_sigmas: one
    code for discrete and flow models; `normal` gives the model's own evenly spaced sigmas (its time-to-sigma map)."""
    sigma_min, sigma_max = float(table[0]), float(table[-1])
    if scheduler == "normal":
        sig = normal()
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


def nearest_timestep(table: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The training timestep nearest in log sigma: the rule ComfyUI's ModelSamplingDiscrete.timestep applies, so
    the UNet is evaluated where ComfyUI evaluates it (and where it was trained: integer timesteps)."""
    log_sigma = sigma.to(torch.float64).clamp_min(1e-10).log()
    return (log_sigma - table.log()).abs().argmin().to(torch.float64)


def weights_fingerprint(*modules: torch.nn.Module) -> str:
    """A digest of the weights themselves (names and values, in state-dict order): the same folder, the same id."""
    digest = hashlib.sha256(b"keyface/diffusers-weights/v1\0")
    for module in modules:
        for name, tensor in module.state_dict().items():
            digest.update(name.encode() + b"\0" + str(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return "dfu-" + digest.hexdigest()[:32]


def architecture_fingerprint(modules: dict, extra: dict | None = None) -> str:
    """`weights_fingerprint` plus each module's class and config (head count, norm groups, embedding types...): two
    configs can share every weight shape yet compute differently. For the text-conditioned families; the
    unconditional family keeps the weights-only form so its files still restore."""
    digest = hashlib.sha256(b"keyface/diffusers-model/v2\0")
    for name, module in modules.items():
        config = {k: v for k, v in dict(getattr(module, "config", {}) or {}).items()
                  if not k.startswith("_") and k not in ("name_or_path", "transformers_version", "dtype")}
        digest.update(f"{name}:{type(module).__name__}:".encode() + json.dumps(config, sort_keys=True, default=str)
                      .encode())
    digest.update(json.dumps(extra or {}, sort_keys=True, default=str).encode())
    digest.update(weights_fingerprint(*modules.values()).encode())
    return "dfu-" + digest.hexdigest()[:32]


def _own_memory(module: torch.nn.Module) -> torch.nn.Module:
    """Every weight in its own freshly allocated (aligned) buffer. Weights read from one .safetensors file can be
    views at arbitrary offsets of its mapped storage, and a CPU matmul may then round differently (measured: the
    same UNet weights gave outputs 6e-6 apart). The exact restore needs the same bits from the same weights however
    they were loaded, in every process."""
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            tensor.data = tensor.data.clone(memory_format=torch.contiguous_format)
    return module


@dataclass
class LoadedModel:
    """What the protocol needs from a model: denoise in sigma space, the schedule, the autoencoder."""

    kind: str                    # "eps" | "v" | "flow" (diffusers_text.FlowModel)
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


CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
DENOISERS = {"UNet2DModel": "unet", "UNet2DConditionModel": "unet", "SD3Transformer2DModel": "transformer",
             "FluxTransformer2DModel": "transformer"}
# What a single checkpoint file is loaded as, by diffusers' own guess of its layout (single_file_utils).
SINGLE_FILE_PIPELINES = {"v1": "StableDiffusionPipeline", "v2": "StableDiffusionPipeline",
                         "xl_base": "StableDiffusionXLPipeline", "playground-v2-5": "StableDiffusionXLPipeline",
                         "sd3": "StableDiffusion3Pipeline", "sd35_medium": "StableDiffusion3Pipeline",
                         "sd35_large": "StableDiffusion3Pipeline"}
SUPPORTED = ("UNet2DModel + VQModel/AutoencoderKL (unconditional LDMs), UNet2DConditionModel + AutoencoderKL + CLIP "
             "(SD1.5, SD2, SDXL base), SD3Transformer2DModel + AutoencoderKL + CLIP (+T5) (SD3/SD3.5), "
             "FluxTransformer2DModel + AutoencoderKL + CLIP + T5 (Flux.1 dev/schnell)")


def _offline() -> bool:
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


def _resolve(spec: str) -> Path:
    """A local diffusers folder, or a repo id resolved through the Hugging Face cache exactly as diffusers does
    (a download only when the user names a repo that is not cached and HF_HUB_OFFLINE is not set)."""
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        return path
    if path.suffix in CHECKPOINT_SUFFIXES or path.is_file():
        raise BackendError(f"{spec!r} is a single checkpoint file, not a diffusers folder.")
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
        try:
            return Path(snapshot_download(spec))
        except LocalEntryNotFoundError:
            if _offline():
                raise BackendError(f"the repo {spec!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set, "
                                   "so it cannot be downloaded: download it once where the network is allowed "
                                   f"(`hf download {spec}`), point HF_HOME at the cache that holds it, or pass a "
                                   "local diffusers folder.") from None
            raise BackendError(f"cannot find the model {spec!r} in the Hugging Face cache or download it (no network "
                               "or the Hub did not answer); pass a local diffusers folder instead.") from None
        except Exception as err:   # unknown or gated repo, network
            raise BackendError(f"cannot find the model {spec!r} in the Hugging Face cache or download it "
                               f"({type(err).__name__}); check the repo id, or pass a local diffusers folder "
                               "instead.") from None
    raise BackendError(f"{spec!r} is not a folder, a checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)}) or a "
                       "Hugging Face repo id (owner/name).")


def load(model: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32, kind: str | None = None,
         config: str | None = None) -> LoadedModel:
    """Load a diffusers model from a folder, a Hugging Face repo id (through the cache) or a single checkpoint file.

    `config` (single files only): a diffusers folder or repo id with the same architecture, whose component configs,
    tokenizers and scheduler replace the ones diffusers would otherwise fetch from the Hub."""
    path = Path(os.path.expanduser(model))
    if path.suffix.lower() in CHECKPOINT_SUFFIXES and not path.is_dir():
        if not path.is_file():
            raise BackendError(f"the checkpoint file {model!r} does not exist.")
        return _load_single_file(path, config, device=device, dtype=dtype, kind=kind)
    root = _resolve(model)
    denoiser, class_name = _denoiser(root)
    if class_name == "UNet2DModel":
        return _load_unconditional(root, device=device, dtype=dtype, kind=kind)
    from . import diffusers_build
    return diffusers_build.from_folder(root, denoiser, class_name, device=device, dtype=dtype, kind=kind)


def _denoiser(root: Path) -> tuple[str, str]:
    """(subfolder, class name) of the pipeline's denoiser, or a BackendError naming what is supported."""
    for folder in ("unet", "transformer"):
        if (root / folder / "config.json").is_file():
            class_name = _config(root / folder).get("_class_name", "")
            if class_name in DENOISERS:
                return folder, class_name
            raise BackendError(f"{root.name}: its denoiser is a {class_name or 'model of unknown class'}, which the "
                               f"diffusers backend does not run. Supported: {SUPPORTED}. Other pipelines: use the "
                               "ComfyUI nodes.")
    raise BackendError(f"{root} is not a diffusers pipeline folder: it has no unet/ or transformer/ with a "
                       "config.json (expected model_index.json, unet/ or transformer/, vae/ or vqvae/, scheduler/).")


def _load_single_file(path: Path, config: str | None, *, device: str, dtype: torch.dtype, kind: str | None):
    from . import diffusers_build
    return diffusers_build.from_single_file(path, config, device=device, dtype=dtype, kind=kind)


def _load_unconditional(root: Path, *, device: str, dtype: torch.dtype, kind: str | None) -> LoadedModel:
    """An unconditional diffusers LDM (UNet2DModel + VQModel/AutoencoderKL + scheduler), the paper's family."""
    import diffusers

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
    unet = _own_memory(diffusers.UNet2DModel.from_pretrained(root / "unet", torch_dtype=dtype).to(device)).eval()
    autoencoder = _own_memory(getattr(diffusers, class_name).from_pretrained(root / folder, torch_dtype=dtype)
                              .to(device)).eval()
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
