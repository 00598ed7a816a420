"""Shared pieces of the benchmark: ComfyUI boot, models, timing, metrics, machine info.

Every KeyFace module is reached through ``comfy_host.pack_module`` so its classes are the ones
ComfyUI loaded (a direct ``import keyface_core`` would create a second copy of every class).
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from keyface_dev import comfy_host  # noqa: E402
from keyface_dev import tiny_models as tm  # noqa: E402

FACES_DIR = Path(os.environ.get("KEYFACE_FACES_DIR", REPO.parent / "shared" / "faces"))


# ----------------------------------------------------------------------------------------------
# ComfyUI and the pack
# ----------------------------------------------------------------------------------------------

def boot(threads: int) -> None:
    """Start headless ComfyUI (CPU) with KeyFace; silence ComfyUI's own per-sampler progress bars."""
    import logging
    if threads > 0:
        torch.set_num_threads(threads)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)   # ComfyUI logs every optional comfy_extras module it cannot import
    try:
        comfy_host.boot()
    finally:
        root.setLevel(level)
    import comfy.utils
    comfy.utils.PROGRESS_BAR_ENABLED = False


def pack(submodule: str):
    return comfy_host.pack_module(submodule)


def new_key(source: str = "bench"):
    K = pack("keyface_core.keys")
    return K.SecretKey(K.generate_key(), kind="key", source=source)


@dataclass
class Models:
    """A diffusion model with its conditioning (and VAE when the run needs pixels)."""

    name: str
    model: object
    cond: list
    vae: object = None
    latent_channels: int = 4
    real: bool = False          # a real checkpoint (quality numbers mean something)


def tiny_models(seed: int = 0, with_vae: bool = True) -> Models:
    clip = tm.clip_model(seed)
    cond = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    return Models("tiny UNet (random, 2.6 M params)", tm.unet_model(seed), cond,
                  tm.vae_model(seed) if with_vae else None)


def sd15_models(seed: int = 0) -> Models:
    model = tm.unet_model(seed, size=tm.SD15_UNET)
    params = sum(p.numel() for p in model.model.diffusion_model.parameters())
    return Models(f"SD1.5-sized UNet (random, {params / 1e6:.0f} M params)", model,
                  [[torch.zeros(1, 77, 768), {}]])


def checkpoint_models(path: str) -> Models:
    """A real checkpoint through ComfyUI's own loader; empty-prompt conditioning."""
    import comfy.sd
    import folder_paths
    out = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True,
                                                embedding_directory=folder_paths.get_folder_paths("embeddings"))
    model, clip, vae = out[:3]
    if clip is None or vae is None:
        raise SystemExit(f"{path}: the checkpoint must contain a text encoder and a VAE")
    cond = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    channels = int(getattr(model.model.latent_format, "latent_channels", 4))
    return Models(f"checkpoint {Path(path).name}", model, cond, vae, channels, real=True)


def manual_cast_unet(dtype: torch.dtype, seed: int = 0, size: dict | None = None):
    """The tiny UNet of `tiny_models` with the same float32 weights, computing in `dtype` (ComfyUI's manual_cast).

    The weights are the same seeded float32 tensors, so the model fingerprint matches and Restore runs; only
    the arithmetic differs (what a restorer whose ComfyUI computes in float16/bfloat16 does)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    config = tm._unet_config(size or tm.TINY_UNET)

    class TinySD15(comfy.supported_models.SD15):
        unet_config = {k: config[k] for k in ("context_dim", "model_channels", "use_linear_in_transformer",
                                              "adm_in_channels", "use_temporal_attention")}
        unet_extra_config = {"num_heads": config["num_heads"], "num_head_channels": -1}

    model_config = TinySD15(config)
    model_config.set_inference_dtype(torch.float32, None if dtype == torch.float32 else dtype)
    base = model_config.get_model({}, device="cpu")
    tm.seed_parameters(base.diffusion_model, seed)
    base.diffusion_model.eval()
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def weight_cast_unet(model_patcher, dtype: torch.dtype):
    """A copy of the model whose UNet weights are cast to `dtype` (a checkpoint loaded in float16/bfloat16)."""
    import copy

    import comfy.model_management as mm
    import comfy.model_patcher
    base = copy.deepcopy(model_patcher.model)
    base.diffusion_model.to(dtype)
    base.diffusion_model.dtype = dtype
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def count_params(model_patcher) -> int:
    return sum(p.numel() for p in model_patcher.model.diffusion_model.parameters())


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

class CallTimer:
    """A ComfyUI ``model_function_wrapper`` that times every UNet call (the whole model forward)."""

    def __init__(self):
        self.seconds = 0.0
        self.calls = 0

    def reset(self):
        self.seconds, self.calls = 0.0, 0

    def __deepcopy__(self, memo):
        # ModelPatcher.clone() deep-copies model_options; every clone must feed this one timer.
        return self

    def __call__(self, apply_model, args):
        start = time.perf_counter()
        out = apply_model(args["input"], args["timestep"], **args["c"])
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def timed_clone(model_patcher):
    """(clone of the model whose UNet calls are timed, its timer). Model identity is unchanged."""
    timer = CallTimer()
    clone = model_patcher.clone()
    clone.set_model_unet_function_wrapper(timer)
    return clone, timer


@dataclass
class Timing:
    wall: list = field(default_factory=list)
    model: list = field(default_factory=list)
    calls: list = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def overhead_share(self) -> float:
        """Median over runs of the share of wall time spent outside model calls."""
        return statistics.median([(w - m) / w for w, m in zip(self.wall, self.model)])

    def as_dict(self) -> dict:
        return {"wall_s": self.wall, "model_s": self.model, "calls": self.calls,
                "median_wall_s": self.median, "overhead_share": self.overhead_share,
                "calls_per_run": self.calls[0] if self.calls else None}


def compare(runs: dict, reps: int, timer: CallTimer, progress=None, warmup: bool = True) -> dict:
    """Time each callable `reps` times, round-robin (A B C A B C ...) so drifting machine load hits
    every variant alike; one untimed warm-up round first. Returns {name: Timing}."""
    out = {name: Timing() for name in runs}
    if warmup:
        for fn in runs.values():
            fn()
    for _ in range(reps):
        for name, fn in runs.items():
            timer.reset()
            start = time.perf_counter()
            fn()
            wall = time.perf_counter() - start
            out[name].wall.append(wall)
            out[name].model.append(timer.seconds)
            out[name].calls.append(timer.calls)
            if progress is not None:
                progress.update(1)
    return out


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------

def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.detach().to(torch.float64).cpu(), b.detach().to(torch.float64).cpu()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-300))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8-range arrays (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM (Wang et al. 2004: Gaussian window sigma 1.5, K1 0.01, K2 0.03, range 255), averaged
    over colour channels; scikit-image's structural_similarity(gaussian_weights=True) convention."""
    from scipy.ndimage import gaussian_filter
    a, b = a.astype(np.float64), b.astype(np.float64)
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for ch in range(a.shape[2]):
        x, y = a[..., ch], b[..., ch]
        blur = lambda t: gaussian_filter(t, sigma=1.5, truncate=3.5)
        mx, my = blur(x), blur(y)
        n = 49.0  # 7x7 effective window: sample-covariance correction as in scikit-image
        cov = n / (n - 1)
        vx, vy, vxy = cov * (blur(x * x) - mx * mx), cov * (blur(y * y) - my * my), cov * (blur(x * y) - mx * my)
        s = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        pad = 3
        values.append(float(s[pad:-pad, pad:-pad].mean()) if min(s.shape) > 2 * pad else float(s.mean()))
    return float(np.mean(values))


def fmt(value, digits: int = 3) -> str:
    """Compact number formatting for tables."""
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e5):
        return f"{value:.{max(1, digits - 1)}e}"
    return f"{value:.{digits}g}"


# ----------------------------------------------------------------------------------------------
# Machine and versions
# ----------------------------------------------------------------------------------------------

def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _repo_head() -> str | None:
    """The checked-out commit, read from .git files (no git process); works in linked worktrees too."""
    git = REPO / ".git"
    try:
        if git.is_file():  # a linked worktree: ".git" names its git dir, whose "commondir" holds the refs
            git = (REPO / git.read_text().split("gitdir:", 1)[1].strip()).resolve()
        common = git
        if (git / "commondir").is_file():
            common = (git / (git / "commondir").read_text().strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head[:12]
        ref = head[5:]
        for base in (git, common):
            if (base / ref).is_file():
                return (base / ref).read_text().strip()[:12]
        packed = common / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split()[0][:12]
        return None
    except (OSError, IndexError):
        return None


def machine_info() -> dict:
    import comfy.model_management as mm
    try:
        sys.path.insert(0, str(comfy_host.comfy_dir()))
        import comfyui_version
        comfy_version = comfyui_version.__version__
    except Exception:  # pragma: no cover - older ComfyUI
        comfy_version = "unknown"
    versions = {"python": platform.python_version(), "torch": torch.__version__, "comfyui": comfy_version,
                "numpy": np.__version__}
    for name in ("dlib", "scipy", "matplotlib"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:
            versions[name] = None
    mem = None
    try:
        import psutil
        mem = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:
        pass
    return {
        "platform": platform.platform(), "cpu": _cpu_name(), "cpu_cores": os.cpu_count(), "memory_gib": mem,
        "device": str(mm.get_torch_device()), "torch_threads": torch.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "versions": versions, "repo_head": _repo_head(),
    }
