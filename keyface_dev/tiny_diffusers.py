"""Seeded tiny diffusers pipelines built from configs (no download), for tests and benchmarks: the authors'
family, an unconditional `UNet2DModel` + `VQModel` (or `AutoencoderKL`) saved as a diffusers folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def save_tiny_ldm(folder: Path, *, seed: int = 0, prediction_type: str = "epsilon", autoencoder: str = "VQModel",
                  latent_channels: int = 3) -> Path:
    """Write `folder` with model_index.json, unet/, vqvae/ (or vae/) and scheduler/ (DDIM, linear betas)."""
    import diffusers

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(sample_size=16, in_channels=latent_channels, out_channels=latent_channels,
                                 block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))
    common = dict(in_channels=3, out_channels=3, block_out_channels=(16, 32, 32), layers_per_block=1,
                  latent_channels=latent_channels, norm_num_groups=8,
                  down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
    if autoencoder == "VQModel":
        vae, sub = diffusers.VQModel(num_vq_embeddings=64, vq_embed_dim=latent_channels, **common), "vqvae"
    else:
        vae, sub = diffusers.AutoencoderKL(scaling_factor=0.5, **common), "vae"
    scheduler = diffusers.DDIMScheduler(beta_start=0.0015, beta_end=0.0195, beta_schedule="linear",
                                        prediction_type=prediction_type, clip_sample=False)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / sub)
    scheduler.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "LDMPipeline", "unet": ["diffusers", "UNet2DModel"], sub: ["diffusers", autoencoder],
        "scheduler": ["diffusers", "DDIMScheduler"]}, indent=1))
    return folder
