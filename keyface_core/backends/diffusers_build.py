"""Building a text-conditioned `LoadedModel` from diffusers components: from a pipeline folder (or a cached repo
snapshot) or from a single checkpoint file through diffusers' `from_single_file`.

Both paths end in `_build(components)`, so a folder and the same weights in one file give the same model.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from .diffusers import (SINGLE_FILE_PIPELINES, SUPPORTED, BackendError, _config, _offline, _own_memory, _resolve,
                        training_sigmas, architecture_fingerprint)
from .diffusers_text import FlowModel, TextConditionedModel, TextEncoder, flow_table

TEXT_SLOTS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"), ("text_encoder_3", "tokenizer_3"))


@contextlib.contextmanager
def quiet():
    """diffusers' and transformers' load-time chatter (progress bars, "install accelerate") off, for this load only:
    the CLI's progress bar and report are what the user reads."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    bars = transformers_logging.is_progress_bar_enabled()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])
        if bars:
            transformers_logging.enable_progress_bar()


def prediction_of(scheduler_config: dict, kind: str | None) -> str:
    if kind:
        return kind
    if scheduler_config.get("_class_name", "").startswith("FlowMatch"):
        return "flow"
    prediction = scheduler_config.get("prediction_type", "epsilon")
    found = {"epsilon": "eps", "v_prediction": "v"}.get(prediction)
    if found is None:
        raise BackendError(f"the scheduler's prediction_type {prediction!r} is not supported (epsilon, v_prediction, "
                           "or a FlowMatch scheduler).")
    return found


def _need_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise BackendError("text-conditioned models need transformers (their CLIP/T5 text encoders), which is not "
                           "installed: pip install 'keyface[diffusers]'.") from None


def from_folder(root: Path, denoiser: str, class_name: str, *, device: str, dtype: torch.dtype, kind: str | None):
    _need_transformers()
    with quiet():
        return _from_folder(root, denoiser, class_name, device=device, dtype=dtype, kind=kind)


def _from_folder(root: Path, denoiser: str, class_name: str, *, device: str, dtype: torch.dtype, kind: str | None):
    import diffusers
    import transformers

    index = _model_index(root)
    if _config(root / "vae").get("_class_name") != "AutoencoderKL" if (root / "vae").is_dir() else True:
        raise BackendError(f"{root.name} has no vae/ folder with an AutoencoderKL config (a text-conditioned "
                           "pipeline needs one).")
    if class_name == "UNet2DConditionModel":
        # before any weight is read: an inpainting/depth UNet fails later with a shape error that says nothing
        _check_unet(_config(root / denoiser), int(_config(root / "vae").get("latent_channels", 4)), root.name)
    components: dict = {}
    model_class = getattr(diffusers, class_name)
    components[denoiser] = model_class.from_pretrained(root / denoiser, torch_dtype=dtype)
    components["vae"] = diffusers.AutoencoderKL.from_pretrained(root / "vae", torch_dtype=dtype)
    for encoder_name, tokenizer_name in TEXT_SLOTS:
        if not (root / encoder_name / "config.json").is_file():
            continue
        encoder_class = _class_for(index, encoder_name, root / encoder_name)
        components[encoder_name] = getattr(transformers, encoder_class).from_pretrained(root / encoder_name,
                                                                                         dtype=dtype)
        if not (root / tokenizer_name).is_dir():
            raise BackendError(f"{root.name} has {encoder_name}/ but no {tokenizer_name}/ folder.")
        components[tokenizer_name] = transformers.AutoTokenizer.from_pretrained(root / tokenizer_name)
    scheduler = _config(root / "scheduler", "scheduler_config.json")
    return _build(components, scheduler, index, name=root.name, device=device, kind=kind)


def from_single_file(path: Path, config: str | None, *, device: str, dtype: torch.dtype, kind: str | None):
    """One .safetensors/.ckpt in the original (CompVis/Stability, ComfyUI) layout, through `from_single_file`."""
    _need_transformers()
    with quiet():
        return _from_single_file(path, config, device=device, dtype=dtype, kind=kind)


def _from_single_file(path: Path, config: str | None, *, device: str, dtype: torch.dtype, kind: str | None):
    import diffusers
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type, load_single_file_checkpoint

    try:
        checkpoint = load_single_file_checkpoint(str(path))
    except Exception as err:
        raise BackendError(f"cannot read the checkpoint file {path.name}: {type(err).__name__}: {err}") from None
    model_type = infer_diffusers_model_type(checkpoint)
    config_root = _resolve(config) if config else None
    if config_root is not None:
        index = _model_index(config_root)
        pipeline_name = index.get("_class_name", "")
    else:
        index, pipeline_name = {}, SINGLE_FILE_PIPELINES.get(model_type, "")
    if pipeline_name not in set(SINGLE_FILE_PIPELINES.values()):
        raise BackendError(f"{path.name} looks like a {model_type!r} checkpoint"
                           + (f" and the config folder is a {pipeline_name or 'pipeline of unknown class'}"
                              if config_root is not None else "")
                           + f"; single files load for SD1.5, SD2, SDXL base and SD3 only. Supported: {SUPPORTED}.")
    pipeline_class = getattr(diffusers, pipeline_name)
    kwargs = dict(torch_dtype=dtype, local_files_only=_offline())
    if config_root is not None:
        kwargs["config"] = str(config_root)
    if pipeline_name == "StableDiffusionPipeline":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = pipeline_class.from_single_file(str(path), **kwargs)
    except BackendError:
        raise
    except Exception as err:   # diffusers needs the model's configs and tokenizers, from the Hub unless given
        raise BackendError(
            f"diffusers could not build a {pipeline_name} from {path.name} ({type(err).__name__}). A single file "
            "holds only weights: its configs, tokenizers and scheduler come from a diffusers folder of the same "
            "architecture. Pass one: --model-config <diffusers folder or cached repo id> (or KEYFACE_MODEL_CONFIG=…, "
            "config= in the API), e.g. a local copy of stable-diffusion-v1-5/stable-diffusion-v1-5 for an SD1.5 file.") from None
    components = {name: value for name, value in pipe.components.items() if value is not None}
    scheduler = dict(pipe.scheduler.config)
    scheduler["_class_name"] = type(pipe.scheduler).__name__
    return _build(components, scheduler, index or {"_class_name": pipeline_name}, name=path.name, device=device,
                  kind=kind)


def _build(components: dict, scheduler: dict, index: dict, *, name: str, device: str, kind: str | None):
    for value in components.values():
        if isinstance(value, torch.nn.Module):
            _own_memory(value.to(device))
    vae = components["vae"].to(device).eval()
    vae_config = vae.config
    texts = []
    for encoder_name, tokenizer_name in TEXT_SLOTS[:2]:
        if encoder_name in components:
            encoder = components[encoder_name].to(device).eval()
            tokenizer = components[tokenizer_name]
            texts.append(TextEncoder(tokenizer, encoder, max_length=int(tokenizer.model_max_length)
                                     if tokenizer.model_max_length < 10_000 else 77))
    if not texts:
        raise BackendError(f"{name} has no text_encoder/ (CLIP): a text-conditioned pipeline needs one.")
    common = dict(autoencoder=vae, latent_channels=int(vae_config.latent_channels),
                  downscale=2 ** (len(vae_config.block_out_channels) - 1),
                  scale_factor=float(getattr(vae_config, "scaling_factor", 1.0) or 1.0),
                  shift_factor=float(getattr(vae_config, "shift_factor", 0.0) or 0.0))
    prediction = prediction_of(scheduler, kind)
    if "transformer" in components and type(components["transformer"]).__name__ == "FluxTransformer2DModel":
        return _build_flux(components, scheduler, name, prediction, common, device)
    if "transformer" in components:
        transformer = components["transformer"].to(device).eval()
        if prediction != "flow":
            raise BackendError(f"{name}: an SD3 transformer needs a FlowMatch scheduler (found "
                               f"{scheduler.get('_class_name')}).")
        if scheduler.get("use_dynamic_shifting"):
            raise BackendError(f"{name}: the scheduler uses resolution-dependent (dynamic) shifting, which the "
                               "diffusers backend does not support; set a fixed `shift` in scheduler_config.json.")
        for text in texts:
            text.hidden = "penultimate"
        t5 = None
        if "text_encoder_3" in components:
            t5 = TextEncoder(components["tokenizer_3"], components["text_encoder_3"].to(device).eval(), max_length=256)
        shift = float(scheduler.get("shift", 1.0))
        steps = int(scheduler.get("num_train_timesteps", 1000))
        return FlowModel(kind="flow", unet=transformer, table=flow_table(shift, steps), family="sd3", texts=texts,
                         t5=t5, joint_dim=int(transformer.config.joint_attention_dim), shift=shift, train_steps=steps,
                         model_id=architecture_fingerprint({"transformer": transformer, "vae": vae},
                                                           {"shift": shift, "train_steps": steps}), **common)
    unet = components["unet"].to(device).eval()
    config = unet.config
    if prediction == "flow":
        raise BackendError(f"{name}: a UNet with a FlowMatch scheduler is not a layout the backend knows.")
    _check_unet(dict(config), common["latent_channels"], name)
    family = "sdxl" if config.addition_embed_type == "text_time" else "sd"
    if family == "sdxl":
        if len(texts) != 2:
            raise BackendError(f"{name}: an SDXL UNet needs text_encoder/ and text_encoder_2/ (the refiner, with "
                               "one encoder, is not supported).")
        for text in texts:
            text.hidden = "penultimate"
    return TextConditionedModel(kind=prediction, unet=unet, table=training_sigmas(scheduler), family=family,
                                texts=texts, zero_empty_negative=family == "sdxl" and bool(
                                    index.get("force_zeros_for_empty_prompt", True)),
                                model_id=architecture_fingerprint({"unet": unet, "vae": vae},
                                                                  {"prediction": prediction}), **common)


FLUX_GUIDANCE = 3.5   # FluxPipeline's default guidance_scale (the embedded, distilled guidance of Flux.1-dev)


def _build_flux(components: dict, scheduler: dict, name: str, prediction: str, common: dict, device: str):
    """Flux.1: CLIP (pooled) in text_encoder/, T5 in text_encoder_2/, 2x2-packed latents, embedded guidance."""
    transformer = components["transformer"].to(device).eval()
    if prediction != "flow":
        raise BackendError(f"{name}: a Flux transformer needs a FlowMatch scheduler (found "
                           f"{scheduler.get('_class_name')}).")
    if "text_encoder_2" not in components or type(components["text_encoder_2"]).__name__ != "T5EncoderModel":
        raise BackendError(f"{name}: a Flux pipeline needs its T5 encoder in text_encoder_2/ and tokenizer_2/.")
    clip = TextEncoder(components["tokenizer"], components["text_encoder"].to(device).eval())
    t5 = TextEncoder(components["tokenizer_2"], components["text_encoder_2"].to(device).eval(), max_length=512)
    steps = int(scheduler.get("num_train_timesteps", 1000))
    if scheduler.get("use_dynamic_shifting"):
        # ComfyUI's Flux default (ModelSamplingFlux, mu = max_shift, 1.15 for dev) rather than diffusers'
        # resolution-dependent mu: the schedule then does not depend on the crop size
        shift, rule = float(scheduler.get("max_shift", 1.15)), "flux"
        steps = 10_000   # ModelSamplingFlux's table has 10000 entries
    else:
        shift, rule = float(scheduler.get("shift", 1.0)), "sd3"
    guidance = FLUX_GUIDANCE if transformer.config.guidance_embeds else None
    return FlowModel(kind="flow", unet=transformer, table=flow_table(shift, steps, rule), family="flux", texts=[clip],
                     t5=t5, joint_dim=int(transformer.config.joint_attention_dim), shift=shift, train_steps=steps,
                     shift_rule=rule, guidance=guidance, flow_multiplier=1.0,
                     model_id=architecture_fingerprint({"transformer": transformer, "vae": common["autoencoder"]},
                                                       {"shift": shift, "rule": rule, "train_steps": steps}),
                     **common)


def _check_unet(config: dict, latent_channels: int, name: str) -> None:
    """Refuse UNets that need inputs the backend does not supply, naming what they are."""
    if int(config.get("in_channels", latent_channels)) != latent_channels:
        raise BackendError(f"{name}: the UNet takes {config.get('in_channels')} input channels but the VAE makes "
                           f"{latent_channels} (an inpainting or depth UNet?); only text-to-image UNets are "
                           "supported.")
    if config.get("addition_embed_type") not in (None, "text_time") or config.get("class_embed_type") is not None \
            or config.get("time_cond_proj_dim") is not None:
        raise BackendError(f"{name}: this UNet takes extra conditioning (addition_embed_type "
                           f"{config.get('addition_embed_type')!r}, class_embed_type {config.get('class_embed_type')!r}, "
                           "time_cond_proj_dim) that the diffusers backend does not supply (SD1.5/SD2/SDXL base only).")


def _model_index(root: Path) -> dict:
    path = root / "model_index.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BackendError(f"cannot read {path}: {err}") from None


def _class_for(index: dict, name: str, folder: Path) -> str:
    """The transformers class of a text encoder: model_index.json's entry, else its config's `architectures`."""
    entry = index.get(name)
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]:
        return str(entry[1])
    architectures = _config(folder).get("architectures") or []
    if architectures:
        return str(architectures[0])
    raise BackendError(f"{folder}: cannot tell which text encoder class this is (no model_index.json entry, no "
                       "`architectures` in config.json).")
