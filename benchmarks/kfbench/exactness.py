"""Exactness: round-trip errors of each inversion method, model calls, and what the payload buys.

Curves run the pure core (keyface_core.sampling) over a pure denoiser (the UNet's
``BaseModel.apply_model``, no ComfyUI sampling machinery), so solver settings can be varied
freely. The per-operation table runs the node functions (Invert to Noise, Apply Key Flip,
Regenerate, Restore) exactly as the nodes do.
"""

from __future__ import annotations

import contextlib
import functools
import time

import numpy as np
import torch

from .common import FACES_DIR, Models, new_key, pack, rel_err


def pure_denoiser(models: Models):
    """``denoise(x, sigma) -> x0`` straight on the UNet, float32, with the model's conditioning."""
    base = models.model.model
    context = models.cond[0][0]

    def denoise(x, sigma):
        with torch.no_grad():
            return base.apply_model(x.to(torch.float32), sigma.to(torch.float32).reshape(1).expand(x.shape[0]),
                                    c_crossattn=context.expand(x.shape[0], -1, -1))
    return denoise


def sigmas_for(models: Models, steps: int, scheduler: str = "normal") -> torch.Tensor:
    import comfy.samplers
    return comfy.samplers.calculate_sigmas(models.model.get_model_object("model_sampling"), scheduler, steps).cpu()


def face_latent(models: Models, size: int = 128) -> tuple[dict, torch.Tensor]:
    """(LATENT of a face crop from the faces folder through the model's VAE, its face mask [1,S,S]).

    The latent is rescaled to unit standard deviation in model space, as real SD latents are (a
    random VAE's latents are much smaller, which would inflate every relative error). Falls back to
    a seeded random latent with an elliptic mask when no face photo is available.
    """
    if models.vae is not None and FACES_DIR.is_dir():
        faces = pack("keyface_core.faces")
        masks = pack("keyface_core.masks")
        from PIL import Image
        for name in ("obama.jpg", "biden2.jpg"):
            path = FACES_DIR / name
            if not path.is_file():
                continue
            img = np.asarray(Image.open(path).convert("RGB"))
            dets = faces.detect_faces(img)
            if not dets:
                continue
            box = masks.square_crop_box(dets[0].box, img.shape[:2])
            crop = masks.crop_square(torch.from_numpy(img.copy()).float() / 255.0, box, size)
            mask = torch.from_numpy(faces.face_mask_in_box(dets[0].landmarks, box, size))[None]
            with torch.no_grad():
                samples = models.vae.encode(crop[None]).detach()
            if not models.real:
                samples = samples / float(models.model.model.latent_format.process_in(samples).std())
            return {"samples": samples}, mask
    gen = torch.Generator().manual_seed(0)
    h = size // 8
    scale = float(models.model.model.latent_format.scale_factor)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    return {"samples": torch.randn((1, 4, h, h), generator=gen) / scale}, ((xx ** 2 / 0.4 + yy ** 2 / 0.6) <= 1).float()[None]


@contextlib.contextmanager
def anderson_memory(core, memory: int):
    """Temporarily run the core's implicit solves with a given Anderson memory (0 = plain fixed point)."""
    original = core.solve_fixed_point
    core.solve_fixed_point = functools.partial(original, memory=memory)
    try:
        yield
    finally:
        core.solve_fixed_point = original


def _round_trip(core, denoise, x, sigmas, method, *, f32_states=False, tol=None, max_iter=None):
    inv, reg = core.Stats(), core.Stats()
    start = time.perf_counter()
    if method == "exact" and f32_states:
        # The two-state leapfrog with float32 states (the core keeps them in float64).
        noise, residual = core.invert_leapfrog(denoise, x.to(torch.float32), None, sigmas, stats=inv)
        out, _ = core.regenerate_leapfrog(denoise, noise, residual, sigmas, stats=reg)
    else:
        kwargs = {} if tol is None else {"tol": tol, "max_iter": max_iter}
        noise = core.invert(denoise, core.LatentState(x), sigmas, method, stats=inv, **kwargs)
        out = core.regenerate(denoise, noise, sigmas, method, stats=reg).x
    seconds = time.perf_counter() - start
    return {"rel_err": rel_err(out, x), "invert_calls": inv.model_calls, "regenerate_calls": reg.model_calls,
            "seconds": seconds,
            "max_residual": max(inv.residuals) if inv.residuals else None}


def curves(models: Models, steps_list, iter_list, tol_list, progress, crop_size: int = 128) -> dict:
    """Round-trip relative latent error (model space) vs steps, vs solver iterations, vs tolerance."""
    core = pack("keyface_core.sampling")
    denoise = pure_denoiser(models)
    latent, _ = face_latent(models, crop_size)
    x = models.model.model.latent_format.process_in(latent["samples"].to(torch.float64))
    out = {"latent_shape": list(x.shape), "vs_steps": [], "vs_iterations": [], "vs_tolerance": []}
    methods = [("plain", {}), ("exact_single", {}), ("exact", {}), ("exact (float32 states)", {"f32_states": True})]
    for steps in steps_list:
        sigmas = sigmas_for(models, steps)
        for label, kw in methods:
            method = label.split(" ")[0]
            row = _round_trip(core, denoise, x, sigmas, method, **kw)
            out["vs_steps"].append({"method": label, "steps": steps, **row})
            progress.update(1)
    sigmas = sigmas_for(models, 20)
    for memory in (0, 5):
        with anderson_memory(core, memory):
            for iters in iter_list:
                # tol 0: every implicit step runs exactly `iters` model calls.
                row = _round_trip(core, denoise, x, sigmas, "exact_single", tol=0.0, max_iter=iters)
                out["vs_iterations"].append({"method": "exact_single", "anderson_memory": memory, "iterations": iters,
                                             "steps": 20, **row})
                progress.update(1)
    with anderson_memory(core, 5):
        for tol in tol_list:
            # At most 50 iterations per step: below the float32 residual floor (~3e-7 here) a
            # tolerance is never met and every step would spend the whole budget.
            row = _round_trip(core, denoise, x, sigmas, "exact_single", tol=tol, max_iter=50)
            out["vs_tolerance"].append({"method": "exact_single", "anderson_memory": 5, "tol": tol, "steps": 20, **row})
            progress.update(1)
    for label in ("plain", "exact"):
        row = _round_trip(core, denoise, x, sigmas, label)
        out["vs_iterations"].append({"method": label, "anderson_memory": None, "iterations": None, "steps": 20, **row})
    return out


def _variant(cn, LI, adapter, models: Models, anon: dict, variant: str) -> dict:
    """The anonymized LATENT as a restorer would hold it under each storage assumption."""
    info = LI.info_of(anon)
    if variant == "payload":
        return anon
    if variant == "float32 state + partner":
        second = None if info.second is None else info.second.to(torch.float32).to(info.second.dtype)
        return LI.make_latent(anon, anon["samples"], info.with_(state=info.state.to(torch.float32).to(info.state.dtype),
                                                                 second=second))
    if variant == "float32 samples only":
        state = adapter.to_model_space(models.model, anon["samples"], info.state.dtype)
        return LI.make_latent(anon, anon["samples"], info.with_(state=state, second=None))
    if variant == "8-bit pixels via VAE":
        samples = vae_reencode(models, anon["samples"])
        state = adapter.to_model_space(models.model, samples, info.state.dtype)
        return LI.make_latent(anon, samples, info.with_(state=state, second=None))
    raise ValueError(variant)


def vae_reencode(models: Models, samples: torch.Tensor) -> torch.Tensor:
    """Decode, round to 8-bit pixels, encode again: what saving the anonymized image as a PNG does."""
    with torch.no_grad():
        pixels = models.vae.decode(samples)
        pixels = (pixels.clamp(0, 1) * 255).round() / 255.0
        return models.vae.encode(pixels).detach()


VARIANTS = ("payload", "float32 state + partner", "float32 samples only", "8-bit pixels via VAE")


def node_calls_and_payload(models: Models, steps: int, methods, calls_steps, progress, crop_size: int = 128) -> dict:
    """Anonymize (invert -> flip -> regenerate) and Restore with the node functions, on a masked face
    latent: model calls per operation and restore error under each payload variant, per method."""
    cn = pack("nodes.core_nodes")
    LI = pack("nodes.latent_info")
    adapter = pack("nodes.model_adapter")
    cond = models.cond
    latent, mask = face_latent(models, crop_size)
    key, wrong = new_key("right"), new_key("wrong")
    original = adapter.to_model_space(models.model, latent["samples"], torch.float64)
    rows, per_steps = [], []

    def anonymize(method, n_steps):
        noise, inv = cn.invert_latent(models.model, latent, n_steps, "normal", method, 1.0, cond, cond, mask=mask)
        anon, reg = cn.regenerate_latent(models.model, cn.flip_latent(noise, key), cond, cond)
        return anon, inv.model_calls + reg.model_calls

    def restore_err(anon, use_key, allow=False):
        restored, calls = cn.restore_latent(models.model, anon, use_key, cond, cond, allow_wrong_key=allow)
        state = LI.info_of(restored).state
        return rel_err(state, original), calls["invert_calls"] + calls["regenerate_calls"]

    for method in methods:
        anon, anon_calls = anonymize(method, steps)
        change = rel_err(LI.info_of(anon).state, original)
        row = {"method": method, "steps": steps, "anonymize_calls": anon_calls, "anonymized_vs_original": change,
               "restore": {}}
        for variant in VARIANTS:
            if variant == "8-bit pixels via VAE" and models.vae is None:
                continue
            err, calls = restore_err(_variant(cn, LI, adapter, models, anon, variant), key)
            row["restore"][variant] = {"rel_err": err, "calls": calls}
            progress.update(1)
        err, calls = restore_err(anon, wrong, allow=True)
        row["wrong_key_restore_rel_err"] = err
        rows.append(row)
    for method in ("exact", "plain"):
        for n_steps in calls_steps:
            anon, anon_calls = anonymize(method, n_steps)
            err, calls = restore_err(anon, key)
            per_steps.append({"method": method, "steps": n_steps, "anonymize_calls": anon_calls, "restore_calls": calls,
                              "restore_rel_err": err})
            progress.update(1)
    floor = None
    if models.vae is not None:
        # Re-encoding alone, no diffusion: the error the pixel path starts from.
        floor = rel_err(adapter.to_model_space(models.model, vae_reencode(models, latent["samples"]), torch.float64), original)
    return {"model": models.name, "latent_shape": list(latent["samples"].shape), "vae_reencode_floor_rel_err": floor,
            "mask_fraction": float((mask >= 0.5).float().mean()), "rows": rows, "calls_vs_steps": per_steps}
