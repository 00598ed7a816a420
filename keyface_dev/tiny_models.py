"""Seeded random-weight models of real ComfyUI architectures, for tests, demo and benchmarks.

No pretrained weights are reachable here; these exercise the mechanics (inversion, keys, restore,
workflows) with ComfyUI's own classes. ComfyUI builds layers without initialising them, so every
parameter is seeded: weights ~ N(0, 1/fan_in), norm scales 1, biases 0 (standard init; the model is
not shrunk to make inversion easy). Image quality from these models means nothing.
"""

from __future__ import annotations

import math

import torch

from . import comfy_host

TINY_UNET = {"model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": [1, 1], "context_dim": 32, "num_heads": 2}
# An SD1.5-sized UNet (860 M parameters) for realistic per-call cost in benchmarks.
SD15_UNET = {"model_channels": 320, "channel_mult": [1, 2, 4, 4], "num_res_blocks": [2, 2, 2, 2], "context_dim": 768, "num_heads": 8}


def seed_parameters(module: torch.nn.Module, seed: int) -> None:
    """Standard init, deterministic in parameter-name order."""
    generator = torch.Generator().manual_seed(seed)
    module.requires_grad_(False)
    with torch.no_grad():
        for name, param in sorted(module.named_parameters(), key=lambda item: item[0]):
            if name.endswith("bias"):
                param.zero_()
            elif param.ndim == 1:
                param.fill_(1.0)
            else:
                fan_in = math.prod(param.shape[1:])
                values = torch.randn(param.shape, generator=generator, dtype=torch.float32) / math.sqrt(fan_in)
                param.copy_(values.to(param.dtype))


def _unet_config(size: dict) -> dict:
    levels = len(size["channel_mult"])
    attention = [1] * (levels - 1) + [0]   # like SD1.5: no attention at the deepest level
    return {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": None, "dtype": torch.float32, "in_channels": 4, "model_channels": size["model_channels"],
        "num_res_blocks": size["num_res_blocks"],
        "transformer_depth": [a for a in attention for _ in range(size["num_res_blocks"][0])],
        "channel_mult": size["channel_mult"], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
        "context_dim": size["context_dim"], "num_heads": size["num_heads"], "num_head_channels": -1,
        "transformer_depth_output": [a for a in attention for _ in range(size["num_res_blocks"][0] + 1)],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }


def unet_model(seed: int = 0, prediction: str = "eps", size: dict | None = None):
    """A ModelPatcher around an SD1.5-architecture UNet; prediction 'eps', 'v' or 'flow' (ComfyUI's own patches)."""
    comfy_host.boot()
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    config = _unet_config(size or TINY_UNET)

    class TinySD15(comfy.supported_models.SD15):
        unet_config = {k: config[k] for k in ("context_dim", "model_channels", "use_linear_in_transformer",
                                              "adm_in_channels", "use_temporal_attention")}
        unet_extra_config = {"num_heads": config["num_heads"], "num_head_channels": -1}

    model_config = TinySD15(config)
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({}, device="cpu")
    seed_parameters(base.diffusion_model, seed)
    base.diffusion_model.eval()
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    if prediction == "v":
        from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete
        patcher = ModelSamplingDiscrete().patch(patcher, "v_prediction", False)[0]
    elif prediction == "flow":
        from comfy_extras.nodes_model_advanced import ModelSamplingSD3
        patcher = ModelSamplingSD3().patch(patcher, 3.0)[0]
    elif prediction != "eps":
        raise ValueError("prediction must be 'eps', 'v' or 'flow'")
    return patcher


def vae_model(seed: int = 0):
    """A tiny AutoencoderKL (8x downscale, 4 latent channels) wrapped in ComfyUI's VAE."""
    comfy_host.boot()
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    model = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    seed_parameters(model, seed + 1)
    state = model.state_dict()
    return comfy.sd.VAE(sd=state, config={"params": {"ddconfig": ddconfig, "embed_dim": 4}})


def clip_model(seed: int = 0):
    """A tiny CLIP text encoder on ComfyUI's bundled SD1 tokenizer (context width 32)."""
    comfy_host.boot()
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base

    textmodel = {"architectures": ["CLIPTextModel"], "hidden_act": "quick_gelu", "hidden_size": 32,
                 "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2, "max_position_embeddings": 77,
                 "vocab_size": 49408, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
                 "layer_norm_eps": 1e-5, "projection_dim": 32, "torch_dtype": "float32", "model_type": "clip_text_model"}

    class TinyClipL(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
            super().__init__(device=device, dtype=dtype, textmodel_json_config=textmodel, model_options=model_options,
                             layer="last", return_projected_pooled=False)

    class TinyClip(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
            super().__init__(device=device, dtype=dtype, model_options=model_options, clip_model=TinyClipL)

    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, TinyClip)
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32})
    seed_parameters(clip.cond_stage_model, seed + 2)
    return clip


class TinyCheckpointLoader:
    """Test stand-in for CheckpointLoaderSimple: (MODEL, CLIP, VAE) from seeded random weights."""

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "KeyFace/dev"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": ("STRING", {"default": "tiny"}),
                             "prediction": (["eps", "v", "flow"], {"default": "eps"}),
                             "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})}}

    def load(self, ckpt_name, prediction="eps", seed=0):
        return unet_model(seed, prediction), clip_model(seed), vae_model(seed)


def register_test_nodes() -> None:
    """Adds the tiny checkpoint loader to ComfyUI's node table (tests and demo only)."""
    nodes = comfy_host.boot()
    nodes.NODE_CLASS_MAPPINGS["KeyFaceDevTinyCheckpoint"] = TinyCheckpointLoader
    nodes.NODE_DISPLAY_NAME_MAPPINGS["KeyFaceDevTinyCheckpoint"] = "Tiny Checkpoint (KeyFace dev)"
