"""The KeyFace latent nodes: thin adapters from ComfyUI types to keyface_core.protocol (format v2)."""

from __future__ import annotations

import math

import torch

import comfy.samplers
import comfy.utils
import latent_preview
from comfy_api.latest import io, ui

from ..keyface_core import protocol, protocol_v1
from ..keyface_core import sampling as core
from ..keyface_core.errors import InputMismatchError, KeyMaterialError
from ..keyface_core.masks import latent_mask
from ..keyface_core.scramble import SCRAMBLES
from . import model_adapter as adapter
from .conditioning import conditioning_id as _conditioning_id, conditioning_matches as _conditioning_matches
from .key_nodes import CATEGORY, KeyFaceKey
from .latent_info import (INFO_KEY, AnonymizedInfo, InversionSettings, NoiseInfo, RenderSettings, RestoredInfo, V1Info,
                          check_batch, info_of, make_latent)

DEFAULT_STEPS = 20
DEFAULT_SCHEDULER = "normal"
DEFAULT_SAMPLER = "dpmpp_2m"
MODE_TOOLTIP = ("How the face is inverted to noise (Restore retraces it). exact: two-state BDIA leapfrog in float64, "
                "one model call per step, restores bit for bit. exact_single: implicit Euler (Anderson-accelerated), "
                "several calls per step, restores to the solver tolerance. plain: classic DDIM inversion, approximate.")


# ----------------------------------------------------------------------------------------------
# Shared plumbing
# ----------------------------------------------------------------------------------------------

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


def check_model(model, model_id: str, what: str, legacy: bool = False):
    current = adapter.legacy_model_identity(model) if legacy and hasattr(adapter, "legacy_model_identity") \
        else adapter.model_identity(model)
    if current != model_id:
        raise InputMismatchError(f"the {what} was made with a different model (or LoRA/patches) than the one connected; "
                                 "use exactly the same checkpoint and patches as the anonymizing run.")


def check_conditioning(stored: str, model, positive, negative, cfg: float):
    if not _conditioning_matches(stored, *_conds(model, positive, negative, cfg)):
        raise InputMismatchError("the conditioning differs from the one used when anonymizing; connect the same "
                                 "positive/negative conditioning (same prompt, same CLIP, and any ControlNet with the same "
                                 "model, hint image, strength and start/end percent) as the anonymizing run.")


# ----------------------------------------------------------------------------------------------
# The operations (also called by the face pipeline, tests and benchmarks)
# ----------------------------------------------------------------------------------------------

def invert_latent(model, latent: dict, steps: int, scheduler: str, mode: str, cfg: float, positive=None, negative=None,
                  mask=None) -> tuple[dict, core.Stats]:
    """Invert to Noise: image LATENT -> noise LATENT carrying a NoiseInfo (not yet keyed)."""
    samples = latent["samples"]
    if samples.ndim != 4:
        raise InputMismatchError(f"KeyFace works on image latents [batch, channels, height, width]; got shape {tuple(samples.shape)}.")
    if mode not in core.METHODS:
        raise InputMismatchError(f"unknown mode {mode!r}; choose one of {', '.join(core.METHODS)}")
    positive, negative = _conds(model, positive, negative, cfg)
    batch = samples.shape[0]
    sigmas = adapter.sigmas_for(model, scheduler, steps)
    settings = InversionSettings(int(steps), scheduler, mode, float(cfg), adapter.model_identity(model),
                                 _conditioning_id(positive, negative), sigmas)
    clean = adapter.to_model_space(model, samples, torch.float64)
    if mask is None and "noise_mask" in latent:
        mask = latent["noise_mask"].reshape(-1, *latent["noise_mask"].shape[-2:])
    lmask = _mask_for(mask, samples)
    faces = protocol.FaceBatch(protocol.new_nonces(batch), tuple(range(batch)), lmask,
                               protocol.public_background(clean, lmask))
    protocol.check_mask_not_empty(lmask)
    stats = core.Stats()
    add_noise = adapter.add_noise_for(model)

    def body(denoise, progress):
        return protocol.invert(denoise, clean, sigmas, faces, method=mode, add_noise=add_noise, progress=progress,
                               stats=stats)
    noise = _run(model, positive, negative, cfg, samples, sigmas, steps, body, stats)
    out_samples = adapter.to_latent_space(model, noise.x)
    info = NoiseInfo(settings, faces, noise, None, clean, out_samples, model.model.latent_format)
    return make_latent(latent, out_samples, info), stats


def with_face_indices(latent: dict, face_indices) -> dict:
    """The same noise LATENT, its batch items labelled as faces `face_indices` of the photo (Crop Faces order)."""
    info = info_of(latent)
    faces = info.faces
    new = protocol.FaceBatch(faces.nonces, tuple(int(i) for i in face_indices), faces.mask, faces.background)
    from dataclasses import replace
    return make_latent(latent, latent["samples"], replace(info, faces=new))


def flip_latent(latent: dict, key, mask=None, scramble: str = protocol.DEFAULT_SCRAMBLE) -> dict:
    """Apply Key Flip: lock an unkeyed noise with the key, or unlock a keyed one (the node is an involution)."""
    info = info_of(latent)
    if not isinstance(info, NoiseInfo):
        raise InputMismatchError("Apply Key Flip needs the noise LATENT from Invert to Noise (it carries the per-image "
                                 "nonce the key is bound to); connect that output, unchanged.")
    if key is None or not hasattr(key, "image_key"):
        raise KeyMaterialError("connect a KEYFACE_KEY from the Load Key node.")
    faces = info.faces
    if mask is not None:
        lmask = _mask_for(mask, info.samples)
        faces = protocol.FaceBatch(faces.nonces, faces.face_indices, lmask,
                                   protocol.public_background(info.clean, lmask) if info.clean is not None else None)
    from dataclasses import replace
    if info.lock is None:
        if info.clean is None:
            raise InputMismatchError("this noise was unlocked from a keyed one; key-flip Invert to Noise's output "
                                     "instead (the keyed digest needs the original latent).")
        keyed = protocol.lock(info.state, info.clean, faces, key, method_scramble=scramble)
        state = core.NoiseState(keyed.x, None)
        new = replace(info, faces=faces, state=state, lock=keyed.lock)
    else:
        state = protocol.unlock(info.keyed, key, allow_wrong_key=True)
        new = replace(info, state=state, lock=None)
    samples = _samples_of(info, state.x)
    return make_latent(latent, samples, new)


def _samples_of(info, x: torch.Tensor) -> torch.Tensor:
    fmt = info.latent_format
    return x.to(torch.float32) if fmt is None else fmt.process_out(x).to(torch.float32)


def _max_denoise(model, sigma0: float) -> bool:
    """KSAMPLER's rule: the first noise is scaled by sqrt(1 + sigma^2) when the schedule starts at sigma_max."""
    sigma_max = float(model.get_model_object("model_sampling").sigma_max)
    return math.isclose(sigma_max, sigma0, rel_tol=1e-05) or sigma0 > sigma_max


def regenerate_latent(model, latent: dict, positive=None, negative=None, sampler=None, scheduler: str = DEFAULT_SCHEDULER,
                      steps: int = DEFAULT_STEPS, cfg: float = 1.0, seed: int = 0,
                      sampler_name: str = "") -> tuple[dict, core.Stats]:
    """Regenerate: draw the new face from the keyed noise with a stock ComfyUI sampler (inpaint semantics).

    Equals SamplerCustomAdvanced given the same model, conditioning, sigmas, noise (`protocol.sampler_start_noise`)
    and latent with noise_mask, bit for bit. Restore never re-runs it."""
    info = info_of(latent)
    if not isinstance(info, NoiseInfo):
        raise InputMismatchError("Regenerate needs a noise LATENT from Invert to Noise or Apply Key Flip, unchanged. "
                                 "For other noise, use KSamplerAdvanced or SamplerCustomAdvanced.")
    positive, negative = _conds(model, positive, negative, cfg)
    sigmas = adapter.sigmas_for(model, scheduler, steps)
    sigma0 = float(info.settings.sigmas[0])
    if not math.isclose(float(sigmas[0]), sigma0, rel_tol=1e-4):
        raise InputMismatchError(f"the '{scheduler}' schedule starts at sigma {float(sigmas[0]):.4g} but the noise is at "
                                 f"sigma {sigma0:.4g}; pick a scheduler that starts at the model's maximum noise "
                                 "(normal, karras, exponential, simple, sgm_uniform, beta) or the same model.")
    sampler = sampler if sampler is not None else comfy.samplers.sampler_object(DEFAULT_SAMPLER)
    flow = adapter.add_noise_for(model) is core.flow_add_noise
    noise, background = protocol.sampler_start_noise(info.state.x, info.faces, sigma0, flow=flow,
                                                     max_denoise=_max_denoise(model, float(sigmas[0])))
    fmt = model.model.latent_format
    # ComfyUI applies process_latent_in to latent_image itself; the noise is used as given.
    latent_image = fmt.process_out(background).to(torch.float32) if background is not None \
        else torch.zeros(noise.shape, dtype=torch.float32)
    denoise_mask = None if info.faces.mask is None else (info.faces.mask >= 0.5).to(torch.float32)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    callback = latent_preview.prepare_callback(model, len(sigmas) - 1)
    stats = core.Stats()
    counted = _counting(guider, stats)
    with torch.no_grad():
        samples = counted.sample(noise.to(torch.float32), latent_image, sampler, sigmas, denoise_mask=denoise_mask,
                                 callback=callback, disable_pbar=True, seed=seed)
    samples = samples.to(torch.float32).cpu()
    render = RenderSettings(sampler_name or _sampler_name(sampler), scheduler, int(steps), float(cfg), int(seed))
    keyed = info.keyed if info.lock is not None else None
    out = AnonymizedInfo(info.settings, keyed, render, samples, info.latent_format, info.clean) if keyed is not None \
        else AnonymizedInfo(info.settings, protocol.KeyedNoise(info.state.x, info.faces, None), render, samples,
                            info.latent_format, info.clean)
    return make_latent(latent, samples, out), stats


def _sampler_name(sampler) -> str:
    function = getattr(sampler, "sampler_function", None)
    name = getattr(function, "__name__", type(sampler).__name__)
    return name.removeprefix("sample_")


def _counting(guider, stats: core.Stats):
    """The guider with its model evaluations counted (for benchmarks), computing exactly what it would."""
    predict = guider.predict_noise

    def counted(*args, **kwargs):
        stats.model_calls += 1
        return predict(*args, **kwargs)
    guider.predict_noise = counted   # this guider instance only; it is built per Regenerate call
    return guider


def restore_latent(model, latent: dict, key, positive=None, negative=None, mask=None,
                   allow_wrong_key=False) -> tuple[dict, dict]:
    """Restore: unscramble + unseal the stored keyed noise and retrace the inversion: the original latent.

    `steps` model calls; never inverts the anonymized latent. Format-v1 files take the old path."""
    info = info_of(latent)
    if isinstance(info, RestoredInfo):
        raise InputMismatchError("this latent was already restored: restoring it again would anonymize the face "
                                 "again. Connect Load Anonymized's (or Regenerate's) latent to Restore.")
    if isinstance(info, V1Info):
        return _restore_v1(model, info, key, positive, negative, allow_wrong_key)
    if not isinstance(info, AnonymizedInfo):
        raise InputMismatchError("Restore needs the anonymized LATENT with its KeyFace info: the output of Regenerate, "
                                 "or of Load Anonymized for a saved image.")
    if info.keyed.lock is None:
        raise InputMismatchError("this latent was never key-flipped, so there is nothing to restore; run Apply Key "
                                 "Flip before Regenerate.")
    if key is None or not hasattr(key, "image_key"):
        raise KeyMaterialError("connect a KEYFACE_KEY from the Load Key node.")
    s = info.settings
    check_model(model, s.model_id, "anonymized latent")
    check_conditioning(s.cond_id, model, positive, negative, s.cfg)
    positive, negative = _conds(model, positive, negative, s.cfg)
    keyed = info.keyed
    noise = protocol.unlock(keyed, key, allow_wrong_key=allow_wrong_key)
    stats = core.Stats()
    add_noise = adapter.add_noise_for(model)

    def body(denoise, progress):
        return protocol.retrace(denoise, noise, s.sigmas, keyed.faces, method=s.method, add_noise=add_noise,
                                progress=progress, stats=stats)
    restored = _run(model, positive, negative, s.cfg, info.samples, s.sigmas, s.steps, body, stats)
    verification = protocol.verify(restored, keyed, key)
    samples = adapter.to_latent_space(model, restored)
    out = RestoredInfo(s, keyed.faces, verification, samples, info.samples, info.sealed_pixels, keyed.lock.kdf,
                       keyed.lock.key_checks)
    return make_latent(latent, samples, out), {"model_calls": stats.model_calls, "verification": verification}


def _restore_v1(model, info: V1Info, key, positive, negative, allow_wrong_key) -> tuple[dict, dict]:
    s = info.settings
    check_model(model, s.model_id, "anonymized latent", legacy=True)
    check_conditioning(s.cond_id, model, positive, negative, s.cfg)
    positive, negative = _conds(model, positive, negative, s.cfg)
    stats = core.Stats()
    add_noise = adapter.add_noise_for(model)

    def body(denoise, progress):
        return protocol_v1.restore(denoise, info.anon, s.sigmas, key, add_noise=add_noise,
                                   allow_wrong_key=allow_wrong_key, progress=progress, stats=stats)
    restored = _run(model, positive, negative, s.cfg, info.samples, s.sigmas, 2 * s.steps, body, stats)
    samples = adapter.to_latent_space(model, restored)
    verification = protocol.Verification(None, None, None)
    out = RestoredInfo(s, info.anon.faces, verification, samples, info.samples, None, info.anon.kdf)
    return make_latent({}, samples, out), {"model_calls": stats.model_calls, "verification": verification}


# ----------------------------------------------------------------------------------------------
# Node classes (V3 schema)
# ----------------------------------------------------------------------------------------------

def _conditioning_inputs(what: str):
    return [
        io.Conditioning.Input("positive", optional=True, tooltip=f"Conditioning the model sees {what}. Leave empty for "
                                                                  "an empty prompt (UNet models)."),
        io.Conditioning.Input("negative", optional=True, tooltip="Negative conditioning; only used when cfg is not 1."),
    ]


class InvertToNoise(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KeyFaceInvertToNoise", display_name="Invert to Noise", category=CATEGORY,
            description="Runs the diffusion ODE backwards: image latent -> the noise the model would turn into it, "
                        "exactly (Restore retraces it). The output is an ordinary LATENT plus what Apply Key Flip and "
                        "Restore need.",
            inputs=[
                io.Model.Input("model", tooltip="Your checkpoint's MODEL (with any LoRA/patches); Restore must get "
                                                "exactly the same."),
                io.Latent.Input("latent", tooltip="Image latent (VAE Encode). A noise_mask on it restricts the change to the mask."),
                io.Int.Input("steps", default=DEFAULT_STEPS, min=1, max=1000,
                             tooltip="Inversion steps; Restore replays them (stored), costing this many model calls."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.SCHEDULER_NAMES), default=DEFAULT_SCHEDULER,
                               tooltip="Noise levels of the inversion; the schedule is stored, so Restore replays it "
                                       "exactly even after a ComfyUI update."),
                io.Combo.Input("mode", options=list(core.METHODS), default="exact", tooltip=MODE_TOOLTIP),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Guidance while inverting; 1.0 inverts most faithfully. Restore reuses it. "
                                       "Regenerate may draw the new face at another cfg."),
                *_conditioning_inputs("while inverting (Restore must get the same)"),
                io.Mask.Input("mask", optional=True, tooltip="Face mask: only this region is inverted and later redrawn; "
                                                            "outside it the latent is held to a public background trajectory."),
            ],
            outputs=[io.Latent.Output(display_name="noise", tooltip="The inverted noise (an ordinary LATENT) plus "
                                                                    "what Apply Key Flip needs.")],
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
            description="Scrambles the noise inside the mask by a pattern only the key (and this image's nonce) "
                        "determines. Applying it twice is exactly the identity: the same node undoes it.",
            inputs=[
                io.Latent.Input("noise", tooltip="Noise from Invert to Noise."),
                KeyFaceKey.Input("key", tooltip="From Load Key. The pattern also depends on this image's random "
                                                "nonce, so no two images share one."),
                io.Combo.Input("scramble", options=list(SCRAMBLES), default=protocol.DEFAULT_SCRAMBLE, optional=True,
                               tooltip="pairswap (default): swaps keyed pairs of noise values with keyed signs, so "
                                       "neither the signs nor where each magnitude sits can be read without the key. "
                                       "signflip: the paper's keyed ±1 sign flip (magnitudes stay in place)."),
                io.Mask.Input("mask", optional=True, tooltip="Where to scramble; default: the mask given to Invert to "
                                                            "Noise, or everywhere. Values >= 0.5 count as inside."),
            ],
            outputs=[io.Latent.Output(display_name="noise", tooltip="The key-scrambled noise; feed it to Regenerate. "
                                                                    "Flipping it again with the same key undoes it.")],
        )

    @classmethod
    def execute(cls, noise, key, scramble=protocol.DEFAULT_SCRAMBLE, mask=None) -> io.NodeOutput:
        return io.NodeOutput(flip_latent(noise, key, mask, scramble or protocol.DEFAULT_SCRAMBLE))


class Regenerate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KeyFaceRegenerate", display_name="Regenerate", category=CATEGORY,
            description="Draws the new face from the key-scrambled noise with any ComfyUI sampler (KSamplerSelect or "
                        "a custom SAMPLER), keeping everything outside the mask. Restore does not depend on it: pick "
                        "the sampler, steps, cfg and prompt that look best.",
            inputs=[io.Model.Input("model", tooltip="The same MODEL as Invert to Noise (the noise is at its sigmas)."),
                    io.Latent.Input("noise", tooltip="Apply Key Flip's output, unchanged."),
                    io.Sampler.Input("sampler", optional=True,
                                     tooltip="Any SAMPLER (KSamplerSelect, custom samplers); default dpmpp_2m."),
                    io.Combo.Input("scheduler", options=list(comfy.samplers.SCHEDULER_NAMES), default=DEFAULT_SCHEDULER,
                                   tooltip="Noise levels for drawing the face; must start at the model's maximum noise."),
                    io.Int.Input("steps", default=DEFAULT_STEPS, min=1, max=1000, tooltip="Sampling steps for the new face."),
                    io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                                   tooltip="Guidance for the new face (e.g. 5-7 with a face prompt on SD1.5); needs a "
                                           "negative conditioning when not 1."),
                    io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                                 tooltip="Only ancestral/SDE samplers use it (their added noise)."),
                    *_conditioning_inputs("while drawing the new face (may differ from the inversion's)")],
            outputs=[io.Latent.Output(display_name="latent", tooltip="The anonymized image latent: VAE Decode it, "
                                                                     "and give it to Save Anonymized.")],
        )

    @classmethod
    def execute(cls, model, noise, sampler=None, scheduler=DEFAULT_SCHEDULER, steps=DEFAULT_STEPS, cfg=1.0, seed=0,
                positive=None, negative=None) -> io.NodeOutput:
        out, _ = regenerate_latent(model, noise, positive, negative, sampler, scheduler, steps, cfg, seed)
        return io.NodeOutput(out)


class Restore(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KeyFaceRestore", display_name="Restore", category=CATEGORY,
            description="Undoes an anonymization with the key: unscrambles the stored noise and retraces the inversion "
                        "(as many model calls as its steps), then checks the result against the keyed digest.",
            inputs=[
                io.Model.Input("model", tooltip="The same checkpoint (and patches) as the anonymizing run."),
                io.Latent.Input("latent", tooltip="Anonymized latent: Load Anonymized's output (or Regenerate's)."),
                KeyFaceKey.Input("key", tooltip="The key that anonymized the image; a different key is refused "
                                                "(its check value does not match) unless allow_wrong_key is on."),
                *_conditioning_inputs("while inverting (the same as the anonymizing run's Invert to Noise)"),
                io.Boolean.Input("allow_wrong_key", default=False, optional=True,
                                 tooltip="Run even when the key's check value does not match: shows the different "
                                         "person a wrong key produces."),
            ],
            outputs=[io.Latent.Output(display_name="restored", tooltip="The original face latent: connect it to "
                                                                       "Restore Photo (or VAE Decode + Paste Faces)."),
                     io.String.Output(display_name="report", tooltip="Whether the result is verified exact, or how "
                                                                     "much it differs from the original.")],
        )

    @classmethod
    def execute(cls, model, latent, key, positive=None, negative=None, allow_wrong_key=False) -> io.NodeOutput:
        out, stats = restore_latent(model, latent, key, positive, negative, None, allow_wrong_key)
        report = f"{stats['verification'].message()} ({stats['model_calls']} model calls)"
        method = getattr(getattr(info_of(latent), "settings", None), "method", "exact")
        if method != "exact" and not stats["verification"].exact:
            report += f"; note: this file was inverted with the approximate mode '{method}', which alone explains a difference"
        return io.NodeOutput(out, report, ui=ui.PreviewText(report))


NODES = [InvertToNoise, ApplyKeyFlip, Regenerate, Restore]
