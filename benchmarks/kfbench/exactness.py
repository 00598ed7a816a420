"""Exactness (format v2): round-trip errors of each inversion method, model calls, Restore's verdict.

Curves run the pure core (keyface_core.sampling) over a pure denoiser (the UNet's
``BaseModel.apply_model``, no ComfyUI sampling machinery), so solver settings can be varied
freely. The per-operation table runs the node functions (Invert to Noise, Apply Key Flip,
Regenerate, Restore) exactly as the nodes do. The numerics tables restore with other numerics than
the anonymizer's (float16/bfloat16, another thread count) and report what Restore's verification says.
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


def _float32_noise(LI, anon: dict) -> dict:
    """The anonymized LATENT with its stored keyed noise rounded to float32 (what a file storing float32 would hold)."""
    from dataclasses import replace
    info = LI.info_of(anon)
    keyed = replace(info.keyed, x=info.keyed.x.to(torch.float32).to(info.keyed.x.dtype))
    return LI.make_latent(anon, anon["samples"], replace(info, keyed=keyed))


VARIANTS = ("as stored (float64 keyed noise)", "keyed noise rounded to float32")


def node_restore_table(models: Models, steps: int, methods, calls_steps, progress, crop_size: int = 128) -> dict:
    """Anonymize (Invert to Noise -> Apply Key Flip -> Regenerate) and Restore with the node functions, on a masked
    face latent: model calls per operation, restore error, Restore's own verdict, per method and steps."""
    cn = pack("nodes.core_nodes")
    LI = pack("nodes.latent_info")
    cond = models.cond
    latent, mask = face_latent(models, crop_size)
    key, wrong = new_key("right"), new_key("wrong")
    rows, per_steps = [], []

    def anonymize(method, n_steps):
        noise, inv = cn.invert_latent(models.model, latent, n_steps, "normal", method, 1.0, cond, cond, mask=mask)
        anon, reg = cn.regenerate_latent(models.model, cn.flip_latent(noise, key), cond, cond, steps=n_steps)
        return anon, inv.model_calls, reg.model_calls

    def restore(anon, use_key, allow=False):
        restored, stats = cn.restore_latent(models.model, anon, use_key, cond, cond, allow_wrong_key=allow)
        return {"rel_err": rel_err(restored["samples"], latent["samples"]),
                "bit_exact": bool(torch.equal(restored["samples"], latent["samples"])),
                "calls": stats["model_calls"], "verification": stats["verification"].message()}

    for method in methods:
        anon, inv_calls, reg_calls = anonymize(method, steps)
        row = {"method": method, "steps": steps, "invert_calls": inv_calls, "regenerate_calls": reg_calls,
               "anonymized_vs_original": rel_err(anon["samples"], latent["samples"]), "restore": {}}
        for variant in VARIANTS:
            held = anon if variant == VARIANTS[0] else _float32_noise(LI, anon)
            row["restore"][variant] = restore(held, key)
            progress.update(1)
        row["wrong_key"] = restore(anon, wrong, allow=True)
        progress.update(1)
        rows.append(row)
    for method in methods:
        for n_steps in calls_steps:
            anon, inv_calls, reg_calls = anonymize(method, n_steps)
            r = restore(anon, key)
            per_steps.append({"method": method, "steps": n_steps, "invert_calls": inv_calls,
                              "regenerate_calls": reg_calls, "restore_calls": r["calls"],
                              "restore_rel_err": r["rel_err"], "bit_exact": r["bit_exact"],
                              "verification": r["verification"]})
            progress.update(1)
    return {"model": models.name, "latent_shape": list(latent["samples"].shape),
            "mask_fraction": float((mask >= 0.5).float().mean()), "rows": rows, "calls_vs_steps": per_steps}


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass


def numerics_tiny(models: Models, steps: int, progress=None, crop_size: int = 128, threads: int = 1,
                  dtypes=(torch.float16, torch.bfloat16)) -> dict:
    """Issue 11: what Restore says when the restorer's numerics differ from the anonymizer's.

    Anonymized once with the float32 UNet at `threads` torch threads; restored with: the same (reference),
    another thread count, the UNet computing in float16 / bfloat16 with the same float32 weights (ComfyUI's
    manual_cast: the model fingerprint matches, so Restore runs), and the UNet's weights cast to float16 /
    bfloat16 (a checkpoint loaded in that dtype: another fingerprint, so Restore refuses it as another model;
    X is then measured with the original's fingerprint lent to it)."""
    progress = progress if progress is not None else _NoProgress()
    cn = pack("nodes.core_nodes")
    adapter = pack("nodes.model_adapter")
    cond = models.cond
    latent, mask = face_latent(models, crop_size)
    key = new_key("numerics")
    previous = torch.get_num_threads()
    try:
        return _numerics_tiny(models, steps, progress, cn, adapter, cond, latent, mask, key, threads, dtypes)
    finally:
        torch.set_num_threads(previous)


def _numerics_tiny(models, steps, progress, cn, adapter, cond, latent, mask, key, threads, dtypes) -> dict:
    from .common import manual_cast_unet, weight_cast_unet
    torch.set_num_threads(threads)
    noise, _ = cn.invert_latent(models.model, latent, steps, "normal", "exact", 1.0, cond, cond, mask=mask)
    anon, _ = cn.regenerate_latent(models.model, cn.flip_latent(noise, key), cond, cond, steps=steps)
    rows = []

    def restore(label, model, note=""):
        start = time.perf_counter()
        try:
            out, stats = cn.restore_latent(model, anon, key, cond, cond)
        except Exception as err:  # Restore's refusal is the measurement here
            rows.append({"restorer": label, "refused": f"{type(err).__name__}: {err}", "note": note})
            return
        v = stats["verification"]
        rows.append({"restorer": label, "message": v.message(), "exact": v.exact,
                     "relative_error": v.relative_error, "max_abs_error": v.max_abs_error, "ulps": v.ulps,
                     "differing": v.differing, "values": v.values, "model_calls": stats["model_calls"],
                     "rel_err_vs_original": rel_err(out["samples"], latent["samples"]),
                     "seconds": time.perf_counter() - start, "note": note})

    restore(f"float32 UNet, {threads} thread(s) (as anonymized)", models.model)
    progress.update(1)
    other = 2 if threads != 2 else 1
    torch.set_num_threads(other)
    try:
        restore(f"float32 UNet, {other} threads", models.model)
    finally:
        torch.set_num_threads(threads)
    progress.update(1)
    for dtype in dtypes:
        name = str(dtype).replace("torch.", "")
        restore(f"UNet computing in {name} (manual_cast, float32 weights)", manual_cast_unet(dtype))
        progress.update(1)
        cast = weight_cast_unet(models.model, dtype)
        restore(f"UNet weights cast to {name}", cast, "Restore's model check")
        # Lend the float32 model's fingerprint to measure what the numerics alone do.
        adapter._identity_cache[cast.model] = ((cast.patches_uuid, tuple(sorted(cast.patches))),
                                               adapter.model_identity(models.model))
        restore(f"UNet weights cast to {name}, fingerprint check bypassed", cast, "measurement only")
        progress.update(1)
    return {"model": models.name, "steps": steps, "latent_shape": list(latent["samples"].shape),
            "mask_fraction": float((mask >= 0.5).float().mean()), "rows": rows}


def numerics_analytic(n: int, steps: int, progress=None, threads: int = 1) -> dict:
    """The same question on the analytic model (kfbench/analytic.py's Gaussian mixture, exact float64 denoiser):
    anonymize with the float64 denoiser, restore with it computed at lower precision. As ComfyUI casts a model's
    input and output, the scaled input x/sqrt(1+sigma^2) and the predicted noise are rounded to the dtype (the
    mixture's own arithmetic stays float64, so this is a lower bound on what a float16 model does)."""
    import hashlib
    from . import analytic as A
    protocol = pack("keyface_core.protocol")
    keys = pack("keyface_core.keys")
    gmm = A.GaussianMixture.faces_like()
    gen = torch.Generator().manual_seed(11)
    ids = torch.arange(n) % gmm.k
    x0 = gmm.sample(ids, gen).to(torch.float64)
    sigmas = A.normal_sigmas(steps)
    mask = A.face_ellipse(gmm.shape).expand(n, 1, *gmm.shape[-2:]).to(torch.float32)
    nonces = tuple(hashlib.sha256(b"keyface-bench/numerics/" + bytes([i])).digest()[:16] for i in range(n))
    faces = protocol.FaceBatch(nonces, tuple(range(n)), mask, protocol.public_background(x0, mask))
    key = keys.SecretKey(hashlib.sha256(b"keyface-bench/numerics/key").digest(), kind="key", source="numerics bench")
    previous = torch.get_num_threads()
    try:
        return _numerics_analytic(gmm, x0, ids, sigmas, mask, faces, key, n, steps, progress, threads, protocol)
    finally:
        torch.set_num_threads(previous)


def _numerics_analytic(gmm, x0, ids, sigmas, mask, faces, key, n, steps, progress, threads, protocol) -> dict:
    torch.set_num_threads(threads)
    noise = protocol.invert(gmm.denoise, x0, sigmas, faces, method="exact")
    keyed = protocol.lock(noise, x0, faces, key)

    def lowered(dtype):
        def denoise(x, sigma):
            s = float(sigma)
            c_in = (1.0 + s * s) ** 0.5
            xin = (x / c_in).to(dtype).to(torch.float64) * c_in
            denoised = gmm.denoise(xin, sigma)
            if s == 0:
                return denoised.to(dtype).to(torch.float64)
            eps = ((xin - denoised) / s).to(dtype).to(torch.float64)
            return x - s * eps
        return denoise

    rows = []

    def restore(label, denoise):
        restored = protocol.retrace(denoise, protocol.unlock(keyed, key), sigmas, faces, method="exact")
        v = protocol.verify(restored, keyed, key)
        m = gmm.metrics(restored.to(torch.float64))
        rows.append({"restorer": label, "message": v.message(), "exact": v.exact, "relative_error": v.relative_error,
                     "max_abs_error": v.max_abs_error, "ulps": v.ulps, "differing": v.differing, "values": v.values,
                     "rel_err_vs_original": rel_err(restored, x0),
                     "identity_recovered": float((m["nearest"] == ids).to(torch.float64).mean())})
        if progress is not None:
            progress.update(1)

    restore(f"float64 denoiser, {threads} thread(s) (as anonymized)", gmm.denoise)
    other = 2 if threads != 2 else 1
    torch.set_num_threads(other)
    try:
        restore(f"float64 denoiser, {other} threads", gmm.denoise)
    finally:
        torch.set_num_threads(threads)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        restore(f"input and output in {str(dtype).replace('torch.', '')}", lowered(dtype))
    return {"samples": n, "steps": steps, "shape": list(gmm.shape), "mask_fraction": float((mask >= 0.5).float().mean()),
            "rows": rows}
