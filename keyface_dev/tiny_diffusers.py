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


# ------------------------------------------------------------------------------------------------------------------
# Text-conditioned pipelines (SD1.5, SDXL, SD3 layouts), every part tiny and seeded
# ------------------------------------------------------------------------------------------------------------------

TINY_MERGES = ("f a", "fa c", "fac e</w>", "p h", "ph o", "pho t", "phot o</w>", "s m", "sm i", "smi l", "smil e</w>")


def save_tiny_tokenizer(folder: Path, max_length: int = 77) -> Path:
    """A CLIP BPE tokenizer over the 256 byte symbols and a few merges, written without a download."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = sorted(ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    for merge in TINY_MERGES:
        vocab["".join(merge.split())] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    raw = folder / "_raw"
    raw.mkdir(exist_ok=True)
    (raw / "vocab.json").write_text(json.dumps(vocab))
    (raw / "merges.txt").write_text("#version: 0.2\n" + "\n".join(TINY_MERGES) + "\n")
    tokenizer = CLIPTokenizer(str(raw / "vocab.json"), str(raw / "merges.txt"), model_max_length=max_length)
    tokenizer.save_pretrained(folder)
    for name in ("vocab.json", "merges.txt"):
        (raw / name).unlink()
    raw.rmdir()
    return folder


TINY_VOCAB = 256 * 2 + len(TINY_MERGES) + 2


def _tiny_clip(seed: int, hidden: int, projection: int | None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=TINY_VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                            projection_dim=projection or hidden, bos_token_id=TINY_VOCAB - 2,
                            eos_token_id=TINY_VOCAB - 1, pad_token_id=TINY_VOCAB - 1, hidden_act="gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _tiny_vae(seed: int, latent_channels: int, scaling: float, shift: float | None = None):
    import diffusers

    torch.manual_seed(seed)
    extra = {} if shift is None else {"shift_factor": shift, "use_quant_conv": False, "use_post_quant_conv": False}
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 16, 32, 32),
                                   layers_per_block=1, latent_channels=latent_channels, norm_num_groups=8,
                                   down_block_types=("DownEncoderBlock2D",) * 4,
                                   up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=scaling, **extra)


def save_tiny_t5_tokenizer(folder: Path) -> Path:
    """A T5 (Unigram, sentencepiece-style) tokenizer over lowercase letters and a few words, written offline."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -2.0) for c in string.ascii_lowercase] + [("\u2581" + w, -1.5) for w in ("a", "face", "smiling")]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                    model_max_length=512).save_pretrained(folder)
    return Path(folder)


TINY_T5_VOCAB = 4 + 26 + 3


def save_tiny_sd(folder: Path, *, layout: str = "sd15", seed: int = 0, prediction_type: str = "epsilon",
                 t5: bool = False) -> Path:
    """A seeded tiny text-to-image pipeline folder: layout "sd15" (one CLIP, UNet2DConditionModel), "sdxl" (two
    CLIPs, pooled embeds + time_ids), "sd3" (SD3Transformer2DModel, two CLIPs and, with `t5`, a T5 encoder;
    FlowMatch scheduler, shift 3) or "flux" (FluxTransformer2DModel with guidance embedding, CLIP + T5, dynamic
    shift).
    The VAE downsamples 8x, as the real ones do; mechanics only."""
    from keyface_core.backends.diffusers_build import quiet

    with quiet():
        return _save_tiny_sd(Path(folder), layout, seed, prediction_type, t5)


def _save_tiny_sd(folder: Path, layout: str, seed: int, prediction_type: str, t5: bool) -> Path:
    import diffusers

    save_tiny_tokenizer(folder / "tokenizer")
    index = {"_diffusers_version": diffusers.__version__, "tokenizer": ["transformers", "CLIPTokenizer"]}
    if layout == "sd15":
        text = _tiny_clip(seed + 1, 32, None)
        text.save_pretrained(folder / "text_encoder")
        torch.manual_seed(seed)
        unet = diffusers.UNet2DConditionModel(
            # the architecture of ComfyUI's tiny SD1.5 (keyface_dev.tiny_models.TINY_UNET): 2 heads, GroupNorm 32
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=2, norm_num_groups=32)
        vae = _tiny_vae(seed + 2, 4, 0.18215)
        scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=False,
                                            steps_offset=1)
        index.update({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                      "text_encoder": ["transformers", "CLIPTextModel"], "requires_safety_checker": False,
                      "safety_checker": [None, None], "feature_extractor": [None, None]})
        denoiser, sub = unet, "unet"
    elif layout == "sdxl":
        _tiny_clip(seed + 1, 32, None).save_pretrained(folder / "text_encoder")
        _tiny_clip(seed + 3, 32, 16).save_pretrained(folder / "text_encoder_2")
        save_tiny_tokenizer(folder / "tokenizer_2")
        torch.manual_seed(seed)
        unet = diffusers.UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64, attention_head_dim=(4, 8), norm_num_groups=8, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8,
            transformer_layers_per_block=1)
        vae = _tiny_vae(seed + 2, 4, 0.13025)
        scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                     prediction_type=prediction_type, timestep_spacing="leading",
                                                     steps_offset=1)
        index.update({"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                      "text_encoder": ["transformers", "CLIPTextModel"],
                      "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                      "tokenizer_2": ["transformers", "CLIPTokenizer"], "force_zeros_for_empty_prompt": True})
        denoiser, sub = unet, "unet"
    elif layout == "sd3":
        _tiny_clip(seed + 1, 16, 16).save_pretrained(folder / "text_encoder")
        _tiny_clip(seed + 3, 16, 16).save_pretrained(folder / "text_encoder_2")
        save_tiny_tokenizer(folder / "tokenizer_2")
        torch.manual_seed(seed)
        denoiser = diffusers.SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=48, caption_projection_dim=16, pooled_projection_dim=32,
            pos_embed_max_size=16)
        vae = _tiny_vae(seed + 2, 16, 1.5305, shift=0.0609)
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
        index.update({"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
                      "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
                      "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                      "tokenizer_2": ["transformers", "CLIPTokenizer"],
                      "text_encoder_3": [None, None], "tokenizer_3": [None, None]})
        if t5:
            from transformers import T5Config, T5EncoderModel
            torch.manual_seed(seed + 4)
            T5EncoderModel(T5Config(vocab_size=TINY_T5_VOCAB, d_model=48, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                                    decoder_start_token_id=0)).eval().save_pretrained(folder / "text_encoder_3")
            save_tiny_t5_tokenizer(folder / "tokenizer_3")
            index.update({"text_encoder_3": ["transformers", "T5EncoderModel"],
                          "tokenizer_3": ["transformers", "T5TokenizerFast"]})
        sub = "transformer"
    elif layout == "flux":
        from transformers import T5Config, T5EncoderModel
        _tiny_clip(seed + 1, 32, None).save_pretrained(folder / "text_encoder")
        torch.manual_seed(seed + 4)
        T5EncoderModel(T5Config(vocab_size=TINY_T5_VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                                decoder_start_token_id=0)).eval().save_pretrained(folder / "text_encoder_2")
        save_tiny_t5_tokenizer(folder / "tokenizer_2")
        torch.manual_seed(seed)
        denoiser = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(2, 2, 4))
        vae = _tiny_vae(seed + 2, 16, 0.3611, shift=0.1159)
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                              max_shift=1.15)
        index.update({"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"],
                      "text_encoder": ["transformers", "CLIPTextModel"],
                      "text_encoder_2": ["transformers", "T5EncoderModel"],
                      "tokenizer_2": ["transformers", "T5TokenizerFast"]})
        sub = "transformer"
    else:
        raise ValueError(f"unknown layout {layout!r}: sd15, sdxl, sd3 or flux")
    denoiser.save_pretrained(folder / sub)
    vae.save_pretrained(folder / "vae")
    scheduler.save_pretrained(folder / "scheduler")
    index.update({"vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", type(scheduler).__name__]})
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    return folder


# The ComfyUI (original LDM) description of save_tiny_sd's "sd15" UNet: which blocks hold attention.
TINY_SD15_LDM_UNET = {"num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [1, 0],
                      "transformer_depth_output": [1, 1, 0, 0], "transformer_depth_middle": 1}


def save_tiny_sd15_single_file(folder: Path, path: Path) -> Path:
    """The "sd15" folder's weights as one original-layout (CompVis/ComfyUI) .safetensors file, the kind users
    download: model.diffusion_model.*, first_stage_model.*, cond_stage_model.transformer.*. The names come from
    ComfyUI's own diffusers->LDM maps (needs the ComfyUI host: keyface_dev.comfy_host)."""
    import diffusers
    import safetensors.torch
    from transformers import CLIPTextModel

    from . import comfy_host
    comfy_host.boot()
    import comfy.diffusers_convert
    import comfy.utils

    folder, path = Path(folder), Path(path)
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").state_dict()
    names = comfy.utils.unet_to_diffusers(dict(TINY_SD15_LDM_UNET))
    state = {}
    for diffusers_name, tensor in unet.items():
        if diffusers_name not in names:
            raise KeyError(f"no LDM name for the UNet weight {diffusers_name}")
        state["model.diffusion_model." + names[diffusers_name]] = tensor
    vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae").state_dict()
    for name, tensor in comfy.diffusers_convert.convert_vae_state_dict(vae).items():
        state["first_stage_model." + name] = tensor
    for name, tensor in CLIPTextModel.from_pretrained(folder / "text_encoder").state_dict().items():
        state["cond_stage_model.transformer.text_model." + name.removeprefix("text_model.")] = tensor
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def comfy_unet_from_folder(folder: Path):
    """ComfyUI's own SD1.5 UNet (a ModelPatcher of keyface_dev.tiny_models' TinySD15) holding the "sd15" folder's
    UNet weights: the same checkpoint in the other host's code, for interchange measurements."""
    import diffusers

    from . import comfy_host, tiny_models
    comfy_host.boot()
    import comfy.utils

    patcher = tiny_models.unet_model(0, "eps")
    names = comfy.utils.unet_to_diffusers(dict(TINY_SD15_LDM_UNET))
    unet = diffusers.UNet2DConditionModel.from_pretrained(Path(folder) / "unet").state_dict()
    state = {names[name]: tensor for name, tensor in unet.items()}
    missing, unexpected = patcher.model.diffusion_model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"the tiny ComfyUI UNet and the diffusers folder differ: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return patcher


def interchange_numbers(folder: Path, steps: tuple = (3, 10, 20)) -> dict:
    """The numbers in docs/notes/dfcond.md ("Interchange"): the "sd15" folder's UNet run by diffusers (the backend)
    and by ComfyUI (its own UNet code, same weights), zero conditioning, std-1 latents. Per-call x0 difference at
    each sigma of a 10-step karras schedule, and the restore error when the other host retraces."""
    from keyface_core import protocol
    from keyface_core.backends import diffusers as backend
    from keyface_core.backends.diffusers_text import Embedding
    from keyface_core.keys import SecretKey, generate_key

    from . import comfy_backend, tiny_models

    ours = backend.load(str(folder))
    ours._cond = (Embedding(torch.zeros(1, 77, 32)), None, 1.0)   # what ComfyUI's UNet gets without a CLIP
    comfy = comfy_backend.ComfyModel(comfy_unet_from_folder(folder), tiny_models.vae_model(0))
    out: dict = {"per_call": [], "restore": []}
    try:
        torch.manual_seed(0)
        x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
        for sigma in ours.sigmas(10, "karras")[:-1]:
            a, b = ours.denoise(x * float(sigma), sigma), comfy.denoise(x * float(sigma), sigma)
            out["per_call"].append({"sigma": float(sigma), "max_abs": float((a - b).abs().max()),
                                    "relative": float((a - b).norm() / a.norm())})
        comfy.close()
        mask = torch.zeros(2, 1, 8, 8)
        mask[:, :, 2:7, 2:6] = 1.0
        for count in steps:
            for name, (first, second) in (("diffusers->comfyui", (ours, comfy)), ("comfyui->diffusers", (comfy, ours))):
                torch.manual_seed(3)
                clean = torch.randn(2, 4, 8, 8, dtype=torch.float64)
                batch = protocol.FaceBatch(protocol.new_nonces(2), (0, 1), mask, protocol.public_background(clean, mask))
                key = SecretKey(generate_key(), kind="key", source="measurement key (in memory)")
                sigmas = first.sigmas(count, "karras")
                keyed = protocol.lock(protocol.invert(first.denoise, clean, sigmas, batch, method="exact",
                                                      add_noise=first.add_noise), clean, batch, key)
                verdicts = []
                for restorer in (first, second):
                    restored = protocol.retrace(restorer.denoise, protocol.unlock(keyed, key), sigmas, batch,
                                                add_noise=restorer.add_noise)
                    verdicts.append(protocol.verify(restored, keyed, key))
                    comfy.close()
                same, other = verdicts
                out["restore"].append({"steps": count, "direction": name, "same_host_exact": same.exact,
                                       "other_exact": other.exact, "other_relative": other.relative_error,
                                       "other_max_abs": other.max_abs_error, "differing": other.differing,
                                       "values": other.values})
    finally:
        comfy.close()
    return out


if __name__ == "__main__":   # python -m keyface_dev.tiny_diffusers [FOLDER]: the interchange numbers as JSON
    import sys
    import tempfile

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()) / "tiny-sd15"
    if not (target / "model_index.json").is_file():
        save_tiny_sd(target, layout="sd15")
    print(json.dumps(interchange_numbers(target), indent=1))
