"""The four KeyFace latent nodes and the key loader: thin adapters over keyface_core."""

from __future__ import annotations

import torch

import comfy.samplers
import comfy.utils
import latent_preview
from comfy_api.latest import io

from ..keyface_core import sampling as core
from ..keyface_core.errors import InputMismatchError, KeyMaterialError, WrongKeyError
from ..keyface_core.flip import apply_flip, flip_context, seal, sign_pattern, unseal
from ..keyface_core.keys import check_matches, key_check_value, new_nonce
from ..keyface_core.masks import latent_mask
from . import model_adapter as adapter
from .conditioning import conditioning_id as _conditioning_id, conditioning_matches as _conditioning_matches
from .key_nodes import KeyFaceKey
from .latent_info import (INFO_KEY, KeyFaceInfo, Settings, background_for, check_batch, check_not_empty, info_of,
                          make_latent)

CATEGORY = "KeyFace"

MODE_TOOLTIP = ("exact: two-state BDIA leapfrog in float64, one model call per step, restores to float rounding "
                "(the noise carries a second state; Regenerate and Restore use it). "
                "exact_single: single-state implicit inversion (Anderson-accelerated), noise any Euler/DDIM sampler "
                "regenerates, several model calls per step. plain: classic DDIM inversion, one call per step, approximate.")


def _conds(model, positive, negative, cfg):
    if positive is None:
        positive = adapter.default_conditioning(model)
        if positive is None:
            raise InputMismatchError("this model needs a conditioning: connect a positive CONDITIONING "
                                     "(e.g. CLIPTextEncode with an empty or neutral prompt).")
    if negative is None:
        if cfg != 1.0:
            raise InputMismatchError(f"cfg is {cfg} but no negative conditioning is connected; connect one or set cfg to 1.0.")
        negative = positive
    return positive, negative


def _mask_for(mask, samples: torch.Tensor):
    if mask is None:
        return None
    lm = latent_mask(mask, tuple(samples.shape[-2:]))
    return check_batch("mask", lm, samples.shape[0])


def _run(model, positive, negative, cfg, samples, sigmas, ticks, body, stats: core.Stats):
    """Run a core algorithm under ComfyUI's sampling machinery: one progress tick per step, with the same
    live preview KSampler shows (ComfyUI's --preview-method; none by default, then it costs nothing)."""
    pbar = comfy.utils.ProgressBar(ticks)
    previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)

    def progress(info):
        image = None
        if previewer is not None and stats.last_denoised is not None:
            image = previewer.decode_latent_to_preview_image("JPEG", stats.last_denoised.to(torch.float32))
        pbar.update_absolute(min(int(info["step"]), ticks), ticks, image)
    return adapter.run_core(model, positive, negative, cfg, tuple(samples.shape), sigmas,
                            lambda denoise: body(denoise, progress))


def _check_model(model, settings: Settings, what: str):
    model_id = adapter.model_identity(model)
    if model_id != settings.model_id:
        raise InputMismatchError(f"the {what} was made with a different model (or LoRA/patches) than the one connected; "
                                 "use exactly the same checkpoint and patches as the anonymizing run.")


def invert_latent(model, latent: dict, steps: int, scheduler: str, mode: str, cfg: float, positive=None, negative=None,
                  mask=None, nonces=None, face_indices=None, lmask=None, sigmas=None) -> tuple[dict, core.Stats]:
    """The Invert to Noise operation, shared with the face pipeline.

    `sigmas` (Restore) replays a stored schedule, so a restore never depends on how this ComfyUI version
    computes the scheduler."""
    samples = latent["samples"]
    if samples.ndim != 4:
        raise InputMismatchError(f"KeyFace works on image latents [batch, channels, height, width]; got shape {tuple(samples.shape)}.")
    positive, negative = _conds(model, positive, negative, cfg)
    batch = samples.shape[0]
    sigmas = adapter.sigmas_for(model, scheduler, steps) if sigmas is None else sigmas
    settings = Settings(steps, scheduler, mode, float(cfg), adapter.model_identity(model), sigmas)
    dtype = core.state_dtype(mode)
    info = info_of(latent)
    if info is not None and info.kind == "latent" and info.settings.method == mode:
        clean = core.LatentState(info.state.to(dtype), info.second)
    else:
        clean = core.LatentState(adapter.to_model_space(model, samples, dtype))
    if mask is None and "noise_mask" in latent:
        mask = latent["noise_mask"].reshape(-1, *latent["noise_mask"].shape[-2:])
    if lmask is None:
        lmask = _mask_for(mask, samples)
    check_not_empty(lmask, "mask")
    nonces = tuple(nonces) if nonces is not None else tuple(new_nonce() for _ in range(batch))
    background = background_for(lmask, clean.x, nonces, adapter.add_noise_for(model), dtype)
    stats = core.Stats()

    def body(denoise, progress):
        return core.invert(denoise, clean, sigmas, mode, background=background, progress=progress, stats=stats)
    noise = _run(model, positive, negative, cfg, samples, sigmas, steps, body, stats)
    out_samples = adapter.to_latent_space(model, noise.x)
    out = KeyFaceInfo("noise", settings, noise.x, noise.residual,
                      out_samples, nonces, tuple(face_indices if face_indices is not None else range(batch)),
                      mask=lmask, background=None if lmask is None else clean.x, latent_format=model.model.latent_format,
                      extra={"cond_id": _conditioning_id(positive, negative)})
    return make_latent(latent, out_samples, out), stats


def flip_latent(latent: dict, key, mask=None) -> dict:
    """The Apply Key Flip operation: an exact involution on the noise LATENT.

    The noise's signs are flipped. The exact method's second state (residual) is not flipped but sealed
    by the key and replaced by zero, so the new face starts consistent (a flipped residual starts the
    leapfrog's parasitic oscillation: an off-distribution face); flipping again unseals it. Images saved
    before sealing ("legacy_residual") keep the old rule: the residual is flipped too."""
    info = info_of(latent)
    if info is None or info.kind != "noise":
        raise InputMismatchError("Apply Key Flip needs the noise LATENT from Invert to Noise (it carries the per-image "
                                 "nonce the key is bound to); connect that output, unchanged.")
    if key is None or not hasattr(key, "image_key"):
        raise KeyMaterialError("connect a KEYFACE_KEY from the Load Key node.")
    shape = tuple(info.state.shape[1:])
    flip_mask = _mask_for(mask, info.samples) if mask is not None else info.mask
    check_not_empty(flip_mask, "flip mask")
    kdf = info.kdf if info.kdf is not None else key.kdf
    image_keys = [key.image_key(nonce, kdf) for nonce in info.nonces]
    patterns = [sign_pattern(k, shape, flip_context(shape, face)) for k, face in zip(image_keys, info.face_indices)]
    masks = [None if flip_mask is None else flip_mask[item] for item in range(len(patterns))]

    def flip_each(batch: torch.Tensor) -> torch.Tensor:
        return torch.stack([apply_flip(x, signs, m) for x, signs, m in zip(batch, patterns, masks)])
    state = flip_each(info.state)
    second, sealed = _flip_second(info, image_keys, shape, flip_each)
    checks = [key_check_value(k) for k in image_keys]
    if info.settings.method == "exact" or info.latent_format is None:
        samples = state.to(torch.float32) if info.latent_format is None else info.latent_format.process_out(state).to(torch.float32)
    elif float(getattr(info.latent_format, "shift_factor", 0.0) or 0.0) == 0.0:
        # Purely scaled formats: flipping the samples themselves keeps the involution bit-exact.
        samples = flip_each(info.samples)
        state = info.latent_format.process_in(samples)
    else:
        samples = info.latent_format.process_out(state).to(torch.float32)
    new = info.with_(state=state, second=second, key_checks=tuple(checks), kdf=kdf, flipped=not info.flipped,
                     mask=info.mask if info.mask is not None else flip_mask, sealed=sealed)
    return make_latent(latent, samples, new)


def _flip_second(info: KeyFaceInfo, image_keys: list, shape: tuple, flip_each):
    """(second state, sealed) after a flip: seal the residual on the way out, unseal it on the way back."""
    if info.second is None:
        return None, None
    if info.extra.get("legacy_residual"):
        return flip_each(info.second), None
    contexts = [flip_context(shape, face, "residual-seal") for face in info.face_indices]
    if info.sealed is None:
        sealed = tuple(seal(k, c, r) for k, c, r in zip(image_keys, contexts, info.second))
        return torch.zeros_like(info.second), sealed
    # A key that fails the stored check gets no residual back: a consistent start, i.e. a clean other face.
    checks = info.key_checks or (None,) * len(image_keys)
    second = torch.stack([
        unseal(k, c, s, shape).to(info.second.dtype) if stored is not None and check_matches(k, stored)
        else torch.zeros(shape, dtype=info.second.dtype)
        for k, c, s, stored in zip(image_keys, contexts, info.sealed, checks)])
    return second.to(info.second.device), None


def regenerate_latent(model, latent: dict, positive=None, negative=None) -> tuple[dict, core.Stats]:
    """The Regenerate operation: noise LATENT -> clean LATENT, exactly matching its inversion."""
    info = info_of(latent)
    if info is None or info.kind != "noise":
        raise InputMismatchError("Regenerate needs a noise LATENT from Invert to Noise or Apply Key Flip, unchanged. "
                                 "For other noise, use KSamplerAdvanced with add_noise disabled.")
    settings = info.settings
    _check_model(model, settings, "noise")
    positive, negative = _conds(model, positive, negative, settings.cfg)
    if not _conditioning_matches(info.extra.get("cond_id"), positive, negative):
        raise InputMismatchError("the conditioning differs from the one used by Invert to Noise; connect the same "
                                 "positive/negative conditioning (same prompt, same CLIP).")
    dtype = core.state_dtype(settings.method)
    if settings.method == "exact":
        noise = core.NoiseState(info.state.to(dtype), info.second)
    else:
        # Single-state: start from the samples exactly as KSamplerAdvanced would.
        noise = core.NoiseState(adapter.to_model_space(model, latent["samples"], dtype))
    background = background_for(info.mask, info.background, info.nonces, adapter.add_noise_for(model), dtype) \
        if info.mask is not None else None
    stats = core.Stats()

    def body(denoise, progress):
        return core.regenerate(denoise, noise, settings.sigmas, settings.method, background=background, progress=progress, stats=stats)
    clean = _run(model, positive, negative, settings.cfg, latent["samples"], settings.sigmas, settings.steps, body, stats)
    samples = adapter.to_latent_space(model, clean.x)
    out = info.with_(kind="latent", state=clean.x, second=clean.partner, samples=samples)
    return make_latent(latent, samples, out), stats


def restore_latent(model, latent: dict, key, positive=None, negative=None, mask=None, allow_wrong_key=False) -> tuple[dict, dict]:
    """Invert the anonymized latent, undo the key flip, regenerate: the original latent (exact method: bit-close)."""
    info = info_of(latent)
    if info is None or info.kind != "latent":
        raise InputMismatchError("Restore needs the anonymized LATENT with its KeyFace info: the output of Regenerate, "
                                 "or of Load Anonymized for a saved image.")
    if info.key_checks is not None and key is not None and not allow_wrong_key:
        kdf = info.kdf if info.kdf is not None else key.kdf
        for nonce, stored in zip(info.nonces, info.key_checks):
            if not check_matches(key.image_key(nonce, kdf), stored):
                raise WrongKeyError(f"this key ({key.source}) does not match the key that anonymized this image; "
                                    "pick the right key, or enable allow_wrong_key to see what a wrong key gives.")
    settings = info.settings
    _check_model(model, settings, "anonymized latent")
    if not _conditioning_matches(info.extra.get("cond_id"), *_conds(model, positive, negative, settings.cfg)):
        raise InputMismatchError("the conditioning differs from the one used when anonymizing; connect the same "
                                 "positive/negative conditioning (same prompt, same CLIP) as the anonymizing run.")
    noise_latent, inv_stats = invert_latent(
        model, latent, settings.steps, settings.scheduler, settings.method, settings.cfg, positive, negative,
        nonces=info.nonces, face_indices=info.face_indices, lmask=info.mask, sigmas=settings.sigmas)
    # The stored KDF parameters (passphrase keys) must be reused, not the key's defaults.
    # The sealed residual, the stored key checks (they guard unsealing) and the residual rule come along too.
    noise_info = noise_latent[INFO_KEY]
    noise_info = noise_info.with_(kdf=info.kdf, sealed=info.sealed, key_checks=info.key_checks,
                                  extra={**noise_info.extra, "legacy_residual": bool(info.extra.get("legacy_residual"))})
    noise_latent = make_latent(noise_latent, noise_latent["samples"], noise_info)
    unflipped = flip_latent(noise_latent, key, mask)
    restored, regen_stats = regenerate_latent(model, unflipped, positive, negative)
    stats = {"invert_calls": inv_stats.model_calls, "regenerate_calls": regen_stats.model_calls}
    return restored, stats


# ----------------------------------------------------------------------------------------------
# Node classes (V3 schema)
# ----------------------------------------------------------------------------------------------

def _common_inputs():
    return [
        io.Conditioning.Input("positive", optional=True, tooltip="Conditioning the model sees while inverting. "
                              "Regenerate/Restore must get the same. Leave empty for an empty prompt (UNet models)."),
        io.Conditioning.Input("negative", optional=True, tooltip="Negative conditioning; only used when cfg is not 1."),
    ]


class InvertToNoise(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KeyFaceInvertToNoise", display_name="Invert to Noise", category=CATEGORY,
            description="Runs the diffusion ODE backwards: image latent -> the noise the model would turn into it. "
                        "The output is an ordinary LATENT; it also carries what Regenerate needs to match it exactly.",
            inputs=[
                io.Model.Input("model", tooltip="Your checkpoint's MODEL (with any LoRA/patches); Regenerate and "
                                                "Restore must get exactly the same."),
                io.Latent.Input("latent", tooltip="Image latent (VAE Encode). A noise_mask on it restricts the change to the mask."),
                io.Int.Input("steps", default=30, min=1, max=1000,
                             tooltip="Regenerate/Restore reuse them (stored). The exact mode's two-state sampler needs "
                                     "more steps than Euler to stay on the image manifold: 30 with karras is the "
                                     "measured default (benchmarks/README.md, analytic section); fewer give artifacts."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.SCHEDULER_NAMES), default="karras",
                               tooltip="ComfyUI scheduler for the noise levels; the schedule is stored, so Regenerate "
                                       "and Restore replay it exactly. karras suits eps/v models (SD1.5/SDXL); SD3/Flux "
                                       "users usually pick simple or beta."),
                io.Combo.Input("mode", options=list(core.METHODS), default="exact", tooltip=MODE_TOOLTIP),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Guidance while inverting; 1.0 is most exact. Regenerate reuses it."),
                *_common_inputs(),
                io.Mask.Input("mask", optional=True, tooltip="Face mask: only this region is inverted and later regenerated; "
                                                            "outside it the latent is held to a public background trajectory."),
            ],
            outputs=[io.Latent.Output(display_name="noise", tooltip="The inverted noise (an ordinary LATENT) plus "
                                                                    "what Regenerate needs to match it exactly.")],
        )

    @classmethod
    def execute(cls, model, latent, steps, scheduler, mode, cfg, positive=None, negative=None, mask=None) -> io.NodeOutput:
        out, _ = invert_latent(model, latent, steps, scheduler, mode, cfg, positive, negative, mask)
        return io.NodeOutput(out)


class ApplyKeyFlip(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KeyFaceApplyKeyFlip", display_name="Apply Key Flip", category=CATEGORY,
            description="Flips the sign of each noise element inside the mask, by a pattern only the key (and this "
                        "image's nonce) determines. Applying it twice is exactly the identity: the same node undoes it.",
            inputs=[
                io.Latent.Input("noise", tooltip="Noise from Invert to Noise."),
                KeyFaceKey.Input("key", tooltip="From Load Key. The flip pattern also depends on this image's random "
                                                "nonce, so no two images share one."),
                io.Mask.Input("mask", optional=True, tooltip="Where to flip; default: the mask given to Invert to Noise, "
                                                            "or everywhere. Values >= 0.5 count as inside."),
            ],
            outputs=[io.Latent.Output(display_name="noise", tooltip="The key-scrambled noise; feed it to Regenerate. "
                                                                    "Flipping it again with the same key undoes it.")],
        )

    @classmethod
    def execute(cls, noise, key, mask=None) -> io.NodeOutput:
        return io.NodeOutput(flip_latent(noise, key, mask))


class Regenerate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KeyFaceRegenerate", display_name="Regenerate", category=CATEGORY,
            description="Runs the deterministic sampler from the noise back to an image latent, with the settings "
                        "Invert to Noise recorded (steps, scheduler, mode, cfg, mask).",
            inputs=[io.Model.Input("model", tooltip="The same MODEL as Invert to Noise (checked)."),
                    io.Latent.Input("noise", tooltip="Apply Key Flip's output (or Invert to Noise's), unchanged."),
                    *_common_inputs()],
            outputs=[io.Latent.Output(display_name="latent", tooltip="The anonymized image latent: VAE Decode it, "
                                                                     "and give it to Save Anonymized as the payload.")],
        )

    @classmethod
    def execute(cls, model, noise, positive=None, negative=None) -> io.NodeOutput:
        out, _ = regenerate_latent(model, noise, positive, negative)
        return io.NodeOutput(out)


class Restore(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KeyFaceRestore", display_name="Restore", category=CATEGORY,
            description="Undoes an anonymization with the key: invert -> flip -> regenerate, using the settings stored "
                        "with the anonymized latent. With the right key and the same model it returns the original latent.",
            inputs=[
                io.Model.Input("model", tooltip="The same checkpoint (and patches) as the anonymizing run."),
                io.Latent.Input("latent", tooltip="Anonymized latent: Regenerate's output or Load Anonymized's."),
                KeyFaceKey.Input("key", tooltip="The key that anonymized the image; a different key is refused "
                                                "(its check value does not match) unless allow_wrong_key is on."),
                *_common_inputs(),
                io.Mask.Input("mask", optional=True, tooltip="Override the stored mask (normally leave empty)."),
                io.Boolean.Input("allow_wrong_key", default=False, optional=True,
                                 tooltip="Run even when the key's check value does not match: shows the different "
                                         "person a wrong key produces."),
            ],
            outputs=[io.Latent.Output(display_name="restored", tooltip="The original face latent: VAE Decode it, "
                                                                       "then Paste Faces into the loaded image.")],
        )

    @classmethod
    def execute(cls, model, latent, key, positive=None, negative=None, mask=None, allow_wrong_key=False) -> io.NodeOutput:
        out, _ = restore_latent(model, latent, key, positive, negative, mask, allow_wrong_key)
        return io.NodeOutput(out)


NODES = [InvertToNoise, ApplyKeyFlip, Regenerate, Restore]
