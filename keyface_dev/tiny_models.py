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


class TinyControlNetLoader:
    """Test stand-in for ControlNetLoader: the seeded tiny ControlNet matching the tiny checkpoint's UNet."""

    RETURN_TYPES = ("CONTROL_NET",)
    FUNCTION = "load"
    CATEGORY = "KeyFace/dev"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"control_net_name": ("STRING", {"default": "tiny"}),
                             "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})}}

    def load(self, control_net_name, seed=0):
        return (controlnet(seed),)


def register_test_nodes() -> None:
    """Adds the tiny checkpoint and ControlNet loaders to ComfyUI's node table (tests and demo only)."""
    nodes = comfy_host.boot()
    nodes.NODE_CLASS_MAPPINGS["KeyFaceDevTinyCheckpoint"] = TinyCheckpointLoader
    nodes.NODE_DISPLAY_NAME_MAPPINGS["KeyFaceDevTinyCheckpoint"] = "Tiny Checkpoint (KeyFace dev)"
    nodes.NODE_CLASS_MAPPINGS["KeyFaceDevTinyControlNet"] = TinyControlNetLoader
    nodes.NODE_DISPLAY_NAME_MAPPINGS["KeyFaceDevTinyControlNet"] = "Tiny ControlNet (KeyFace dev)"


# ----------------------------------------------------------------------------------------------
# Tiny SDXL, SD3 (MMDiT) and Flux: ComfyUI's own model classes, latent formats and model sampling
# ----------------------------------------------------------------------------------------------

# Sizes of the tiny text-encoder outputs each architecture expects (real sizes in comments).
TINY_CONTEXT = {"sdxl": 32, "sd3": 32, "flux": 32}      # 2048, 4096, 4096
TINY_POOLED = {"sdxl": 32, "sd3": 32, "flux": 32}       # 1280, 2048, 768
TINY_TOKENS = {"sdxl": 77, "sd3": 77, "flux": 16}       # 77, 77 + T5 tokens, T5 tokens (256/512)
SDXL_ADM_EXTRA = 6 * 256   # six Timestep(256) size/crop embeddings model_base.SDXL.encode_adm appends to the pool


def _patched(model_config, seed: int, buffers=None):
    """Build the model from its config, seed every parameter (and `buffers(model)`), wrap in a ModelPatcher."""
    import comfy.model_management
    import comfy.model_patcher

    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({}, device="cpu")
    seed_parameters(base.diffusion_model, seed)
    if buffers is not None:
        with torch.no_grad():
            buffers(base.diffusion_model)
    base.diffusion_model.eval()
    return comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def sdxl_model(seed: int = 0):
    """A ModelPatcher around a tiny SDXL-architecture UNet (model_base.SDXL, eps, SDXL latent format).

    Like SDXL: no attention at the first level, linear transformer projections, 64-channel heads, a
    'sequential' ADM embedding fed by the pooled text embedding plus six size/crop embeddings, so the
    conditioning must carry ``pooled_output`` (width/height/crop default as in ComfyUI).
    """
    comfy_host.boot()
    import comfy.supported_models

    config = {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
        "num_classes": "sequential", "adm_in_channels": TINY_POOLED["sdxl"] + SDXL_ADM_EXTRA, "dtype": torch.float32,
        "in_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1], "transformer_depth": [0, 1],
        "channel_mult": [1, 2], "transformer_depth_middle": 1, "use_linear_in_transformer": True,
        "context_dim": TINY_CONTEXT["sdxl"], "num_head_channels": 32, "transformer_depth_output": [0, 0, 1, 1],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }

    class TinySDXL(comfy.supported_models.SDXL):
        unet_config = {k: config[k] for k in ("model_channels", "use_linear_in_transformer", "context_dim",
                                              "adm_in_channels", "use_temporal_attention")}
        unet_extra_config = {"num_heads": -1, "num_head_channels": config["num_head_channels"]}

    return _patched(TinySDXL(config), seed)


def sd3_model(seed: int = 0):
    """A ModelPatcher around a tiny SD3-architecture MMDiT (model_base.SD3, rectified flow with shift 3, SD3
    16-channel latent format with scale and shift). MMDiT fixes the width at 64 * depth: depth 1 gives one
    64-wide head; two joint blocks so one is a full block and the last is context pre-only, like SD3."""
    comfy_host.boot()
    import comfy.supported_models
    from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed_torch

    max_size = 16    # SD3: 192 (a 384x384 patch grid of stored positions, cropped to the image)
    config = {
        "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 1, "num_blocks": 2, "input_size": None,
        "adm_in_channels": TINY_POOLED["sd3"],
        "context_embedder_config": {"target": "torch.nn.Linear",
                                    "params": {"in_features": TINY_CONTEXT["sd3"], "out_features": 64}},
        "num_patches": max_size * max_size, "pos_embed_max_size": max_size, "pos_embed_scaling_factor": None,
        "x_block_self_attn_layers": [], "dtype": torch.float32,
    }

    class TinySD3(comfy.supported_models.SD3):
        unet_config = {"in_channels": 16, "pos_embed_scaling_factor": None}

    def positions(model):
        # The checkpoint's fixed sin-cos table (a buffer, so seed_parameters does not reach it).
        model.pos_embed.copy_(get_2d_sincos_pos_embed_torch(model.hidden_size, max_size, max_size).unsqueeze(0))

    return _patched(TinySD3(config), seed, positions)


def flux_model(seed: int = 0):
    """A ModelPatcher around a tiny Flux-dev-architecture transformer (model_base.Flux: 2x2 patches, RoPE,
    guidance embedding, pooled vector input; ModelSamplingFlux; Flux 16-channel latent format with scale and
    shift). One double-stream and one single-stream block, width 64, two heads."""
    comfy_host.boot()
    import comfy.supported_models

    config = {
        "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": TINY_POOLED["flux"],
        "context_in_dim": TINY_CONTEXT["flux"], "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1,
        "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True,
        "guidance_embed": True, "dtype": torch.float32,
    }

    class TinyFlux(comfy.supported_models.Flux):
        unet_config = {"image_model": "flux", "guidance_embed": True}

    return _patched(TinyFlux(config), seed)


ARCHITECTURES = {"sdxl": sdxl_model, "sd3": sd3_model, "flux": flux_model}


def conditioning(arch: str, seed: int = 0, guidance: float = 3.5):
    """A CONDITIONING list for `arch`'s tiny model, from seeded random tensors: what the matching text
    encoder node would give. SDXL: cross-attention + pooled_output (like CLIPTextEncode on an SDXL CLIP);
    SD3: the same with SD3's sizes; Flux: T5-like tokens + CLIP-L pool + ``guidance`` (as FluxGuidance sets it)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {', '.join(ARCHITECTURES)}")
    generator = torch.Generator().manual_seed(10_000 + seed)
    cross_attn = torch.randn([1, TINY_TOKENS[arch], TINY_CONTEXT[arch]], generator=generator)
    extra = {"pooled_output": torch.randn([1, TINY_POOLED[arch]], generator=generator)}
    if arch == "flux":
        extra["guidance"] = guidance
    return [[cross_attn, extra]]


def _control_model(seed: int, size: dict):
    comfy_host.boot()
    import comfy.cldm.cldm
    import comfy.ops

    config = {k: v for k, v in _unet_config(size).items()
              if k not in ("out_channels", "use_temporal_attention", "use_temporal_resblock")}
    control_model = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init,
                                               device="cpu", **config)
    seed_parameters(control_model, seed)
    return control_model.eval()


def controlnet(seed: int = 0):
    """A seeded ControlNet of ComfyUI's real classes (`comfy.cldm.cldm.ControlNet` in `comfy.controlnet.ControlNet`)
    matching the tiny SD1.5 UNet's shapes, for ControlNetApplyAdvanced; hints are RGB at 8x the latent size."""
    import comfy.controlnet
    import comfy.model_management

    control_model = _control_model(seed, TINY_UNET)
    return comfy.controlnet.ControlNet(control_model, load_device=comfy.model_management.get_torch_device())


CONTROLNET_RECIPE = {"version": 1, "format": "ldm control_model.*", "dtype": "float16"}


def save_controlnet_file(path, seed: int = 0, size: dict | None = None, dtype=torch.float16):
    """Write a seeded ControlNet as a file the stock ControlNetLoader loads (ldm keys `control_model.*`, the
    layout of lllyasviel's ControlNet 1.x files; ComfyUI detects the UNet config from the shapes). `size` must be
    the UNet the ControlNet steers: default the frontend test checkpoint's (keyface_dev.tiny_checkpoint).
    Written atomically; a cached file of the same recipe is kept. Returns the path."""
    import json
    import os
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.torch import save_file

    if size is None:
        from .tiny_checkpoint import RECIPE
        size = RECIPE["unet"]
    path = Path(path)
    recipe = dict(CONTROLNET_RECIPE, seed=seed, unet=size, dtype=str(dtype).removeprefix("torch."))
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as handle:
                if json.loads((handle.metadata() or {}).get("keyface_recipe", "null")) == recipe:
                    return path
        except Exception:   # unreadable or partial: rebuild
            pass
    state = {f"control_model.{k}": v.to(dtype).contiguous() for k, v in _control_model(seed, size).state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(state, str(partial), metadata={"keyface_recipe": json.dumps(recipe)})
    os.replace(partial, path)
    return path
