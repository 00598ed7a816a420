"""A seeded checkpoint file that the stock `CheckpointLoaderSimple` loads as SD1.5 (tests only).

The shipped workflows start with `CheckpointLoaderSimple`; running them unchanged (in the real
frontend, through the real server) needs a file that ComfyUI's model detection accepts. ComfyUI
detects SD1.5 from the UNet's shapes (model_channels 320, context_dim 768) and then builds CLIP-L
and the SD VAE at their full sizes, so the file holds a reduced-depth UNet (two levels, one res
block) and a full CLIP-L and VAE, every weight seeded (`tiny_models.seed_parameters`), in float16
to stay small. It is built once with `comfy.sd.save_checkpoint` into an ignored cache folder and
never committed. Image quality from it means nothing.

    .venv/bin/python -m keyface_dev.tiny_checkpoint [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from . import comfy_host
from .tiny_models import _unet_config, seed_parameters

REPO = comfy_host.REPO
NAME = "keyface_tiny_sd15.safetensors"
# Bump when the recipe changes: the cached file is rebuilt when its stored recipe differs.
RECIPE = {"version": 1, "unet": {"model_channels": 320, "channel_mult": [1, 2], "num_res_blocks": [1, 1],
                                 "context_dim": 768, "num_heads": 8}, "clip": "clip-l full", "vae": "sd full",
          "dtype": "float16", "seed": 0}


def default_dir() -> Path:
    """Where the file is cached: $KEYFACE_TEST_MODELS_DIR or .cache/test_models/checkpoints (ignored)."""
    return Path(os.environ.get("KEYFACE_TEST_MODELS_DIR", REPO / ".cache" / "test_models" / "checkpoints"))


def _recipe_of(path: Path) -> dict | None:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as handle:
            return json.loads((handle.metadata() or {}).get("keyface_recipe", "null"))
    except Exception:  # unreadable or partial file: rebuild it
        return None


def build(path: Path, seed: int = 0) -> Path:
    """Write the checkpoint to `path` (atomically) from seeded weights."""
    comfy_host.boot()
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL

    dtype = torch.float16
    config = _unet_config(RECIPE["unet"])
    config["dtype"] = dtype

    class ReducedSD15(comfy.supported_models.SD15):
        unet_config = {k: config[k] for k in ("context_dim", "model_channels", "use_linear_in_transformer",
                                              "adm_in_channels", "use_temporal_attention")}

    model_config = ReducedSD15(config)
    model_config.set_inference_dtype(dtype, None)
    base = model_config.get_model({}, device="cpu")
    seed_parameters(base.diffusion_model, seed)
    model = comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))

    clip = comfy.sd.CLIP(target=model_config.clip_target(), model_options={"dtype": dtype})
    seed_parameters(clip.cond_stage_model, seed + 2)

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    autoencoder = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    seed_parameters(autoencoder, seed + 1)
    vae = comfy.sd.VAE(sd={k: v.to(dtype) for k, v in autoencoder.state_dict().items()}, dtype=dtype)

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    recipe = dict(RECIPE, seed=seed)
    comfy.sd.save_checkpoint(str(partial), model, clip, vae, metadata={"keyface_recipe": json.dumps(recipe)})
    os.replace(partial, path)
    return path


def ensure(folder: Path | None = None) -> Path:
    """The cached checkpoint, built first if it is missing or from another recipe. Returns its path."""
    path = (folder or default_dir()) / NAME
    if not path.is_file() or _recipe_of(path) != RECIPE:
        build(path, RECIPE["seed"])
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="folder (default: .cache/test_models/checkpoints)")
    args = parser.parse_args(argv)
    path = ensure(args.out)
    print(f"{path} ({path.stat().st_size / 2**20:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
