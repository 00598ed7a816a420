"""results.json -> results.md (Markdown tables) and PNG plots."""

from __future__ import annotations

import math
from pathlib import Path

from .common import fmt

TARGET_REGEN = 1.03
TARGET_OVERHEAD = 0.05
TARGET_RESTORE_EXTRA_CALLS = 3
TARGET_PHOTO_DIFF = 1


def _table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def _ratio(x) -> str:
    return "–" if x is None else f"{x:.3f}×"


def _get(d, *path):
    for p in path:
        if d is None:
            return None
        d = d.get(p) if isinstance(d, dict) else None
    return d


def _spread(values) -> str:
    if not values:
        return ""
    return f"{min(values):.3f}–{max(values):.3f}"


def targets(res: dict) -> list:
    """[(target, measured text, met: bool|str|None)]."""
    out = []
    speed = res.get("speed", {})
    regen = []
    for label, key in (("tiny", "tiny"), ("SD1.5-sized", "sd15")):
        r, q = _get(speed, key, "ratios"), _get(speed, key, "ratios_pooled") or {}
        if r and "regenerate / ksampler" in r:
            regen.append((label, r["regenerate / ksampler"], q.get("regenerate / ksampler"),
                          _get(speed, key, "ratios_per_round", "regenerate / ksampler")))
    if regen:
        text = "; ".join(f"{l}: {_ratio(raw)} (rounds {_spread(rounds)}; pooled {_ratio(pooled)})"
                         for l, raw, pooled, rounds in regen)
        raw_ok = all(raw <= TARGET_REGEN for _, raw, _, _ in regen)
        pooled_ok = all(p is not None and p <= TARGET_REGEN for _, _, p, _ in regen)
        met = True if raw_ok and pooled_ok else False if not raw_ok and not pooled_ok else \
            ("pooled yes, raw no" if pooled_ok else "raw yes, pooled no")
        out.append((f"Regenerate (KSamplerSelect euler) ≤ {TARGET_REGEN}× KSampler (euler, equal steps, same keyed "
                    "noise)", text, met))
    share = []
    for label, key in (("SD1.5-sized", "sd15"), ("tiny", "tiny")):
        t = _get(speed, key, "timings")
        if t:
            ops = {k: t[k]["overhead_share"] for k in ("regenerate", "restore", "invert_plain", "invert_exact") if k in t}
            share.append((label, ops, t.get("ksampler", {}).get("overhead_share")))
    if share:
        text = "; ".join(f"{l}: " + ", ".join(f"{k.replace('_', ' ')} {_pct(v)}" for k, v in ops.items())
                         + f" (KSampler itself {_pct(ks)})" for l, ops, ks in share)
        realistic = share[0]
        met = all(v <= TARGET_OVERHEAD for v in realistic[1].values())
        out.append((f"≤ {int(TARGET_OVERHEAD * 100)} % of wall time outside model calls (judged on the "
                    f"{realistic[0]} model)", text, met))
    cs = _get(res, "exactness", "nodes", "calls_vs_steps") or []
    exact = [r for r in cs if r["method"] == "exact"]
    if exact:
        text = ", ".join(f"{r['steps']} steps: {r['restore_calls']} calls, error {fmt(r['restore_rel_err'])}"
                         f"{' (bit-exact)' if r['bit_exact'] else ''}" for r in exact)
        out.append((f"Restore model calls = steps (+ ≤ {TARGET_RESTORE_EXTRA_CALLS}), restore error 0 (exact method, "
                    "tiny SD1.5)", text,
                    all(r["steps"] <= r["restore_calls"] <= r["steps"] + TARGET_RESTORE_EXTRA_CALLS and r["bit_exact"]
                        for r in exact)))
    sm = _get(res, "identity", "summary")
    if sm and sm.get("restored_max_diff") is not None:
        out.append((f"restored photo within {TARGET_PHOTO_DIFF} gray level of the ideal on every shared face "
                    "(Restore Photo)", f"max {sm['restored_max_diff']}, mean in the face boxes "
                    f"{fmt(sm['restored_mean_diff_in_boxes'])} over {sm['faces']} faces",
                    sm["restored_max_diff"] <= TARGET_PHOTO_DIFF))
        out.append(("lossless mode: the original photo bit for bit, verified",
                    f"max difference to the original {sm['restored_lossless_vs_original_max_diff']}; keyed pixel digest "
                    f"verified on {sm['lossless_verified']} of {sm['photos']} photos",
                    sm["restored_lossless_vs_original_max_diff"] == 0 and sm["lossless_verified"] == sm["photos"]))
    return out


def _lossless_per_box_pixel(ll: dict) -> dict:
    """Median sealed bytes per face-box pixel: the random VAE's residual and each white-noise stand-in."""
    import statistics
    out = {}
    pairs = [(b, box) for r in ll["rows"] for b, box in zip(r["sealed_bytes_per_face"], r["boxes"])]
    if pairs:
        out["random tiny VAE"] = statistics.median(b / box[2] ** 2 for b, box in pairs)
    for sd in ll.get("proxy_sd") or []:
        key = str(sd)
        values = [b / box[2] ** 2 for r in ll["rows"] for b, box in zip(r["proxy_sealed_bytes_per_face"][key], r["boxes"])]
        if values:
            out[f"white error σ = {float(sd):g}"] = statistics.median(values)
    return out


def _job_cost_markdown(results: list) -> list:
    s = []
    for res in results:
        s.append(f"{res['model']}, latent {'×'.join(map(str, res['latent_shape']))}, {res['steps']} steps, "
                 f"{res['reps']} shuffled rounds:\n")
        rows = []
        for name, row in res["rows"].items():
            rows.append([name, str(row["model_calls"]), f"{row['median_wall_s']:.3f}",
                         f"{row['ratio_raw_median']:.3f} ({row['ratio_raw_min']:.3f}–{row['ratio_raw_max']:.3f})",
                         f"{row['ratio_pooled']:.3f}", _pct(row["non_model_share"])])
        s.append(_table(["variant", "model calls", "median wall s", "raw ratio vs KSampler (min–max)", "pooled ratio",
                         "share outside model calls"], rows))
        s.append(f"\nRestore result equal to the original latent (torch.equal): "
                 f"{'yes' if res['checks'].get('restore_exact') else 'no'}; Restore says: "
                 f"{res['checks'].get('verification')}.\n")
    return s


def markdown(res: dict) -> str:
    m = res["machine"]
    v = m["versions"]
    s = ["# KeyFace benchmark results (format v2)\n",
         f"Run {res['started']} with `{res['command']}`; wall time **{res['wall_s'] / 60:.1f} min**"
         f"{' (quick mode: fewer reps and points)' if res['quick'] else ''}.\n",
         f"Machine: {m['cpu']}, {m['cpu_cores']} cores, {m['memory_gib']} GiB, device `{m['device']}`, "
         f"torch threads {m['torch_threads']}; load average at start {', '.join(f'{x:.2f}' for x in m['load_average_at_start'] or [])}, "
         f"at end {', '.join(f'{x:.2f}' for x in res.get('load_average_at_end') or [])}. "
         f"Versions: Python {v['python']}, torch {v['torch']}, ComfyUI {v['comfyui']}, numpy {v['numpy']}, "
         f"dlib {v.get('dlib')}; repo HEAD {m.get('repo_head')}.\n",
         "All models are seeded random-weight ComfyUI models unless a checkpoint is named: timings and exactness "
         "are real, image quality is meaningless"
         + (" (except in the analytic section, whose denoiser is the exact one for a known Gaussian mixture)"
            if res.get("analytic") else "") + ". Timings are medians of interleaved repeats (A B C A B C ...).\n"]

    t = targets(res)
    if t:
        s.append("## Targets\n")
        s.append(_table(["target", "measured", "met"], [[a, b, c if isinstance(c, str) else "**yes**" if c else "**no**"]
                                                        for a, b, c in t]))
        s.append("")

    speed = res.get("speed", {})
    cols = [k for k in ("tiny", "sd15") if k in speed]
    if cols:
        head = {k: f"{'tiny' if k == 'tiny' else 'SD1.5-sized'} ({'×'.join(map(str, speed[k]['latent_shape']))}, "
                   f"{speed[k]['steps']} steps, {speed[k]['reps']} reps)" for k in cols}
        s.append("## Speed ratios\n")
        s.append(f"Models: {'; '.join(speed[k]['model'] for k in cols)}. Same seeded model, same input, cfg 1, "
                 "`normal` scheduler; KeyFace ops are the node functions. Regenerate draws with KSamplerSelect(euler) "
                 "and KSampler runs euler from the same keyed noise (Apply Key Flip's output). Each cell: ratio of "
                 "median wall times, the min–max of the per-round ratios, and in brackets the *pooled* ratio, where "
                 "every run is re-estimated as its model calls × the median seconds per model call over all runs + "
                 "its own median non-model seconds (it removes model-call jitter, and also hides any difference inside "
                 "model time: read it beside the raw one).\n")
        names = [("regenerate / ksampler", "Regenerate (euler) / KSampler (euler)", f"≤ {TARGET_REGEN}×"),
                 ("restore / ksampler", "Restore (retrace + verification) / KSampler (euler)", ""),
                 ("invert_plain / stock_unsample", "Invert to Noise (plain) / FlipSigmas + SamplerCustom", ""),
                 ("invert_exact / invert_plain", "Invert to Noise exact / plain", ""),
                 ("invert_exact_single / invert_plain", "Invert to Noise exact_single / plain", "")]

        def cell(k, key):
            raw, pooled = speed[k]["ratios"].get(key), (speed[k].get("ratios_pooled") or {}).get(key)
            rounds = (speed[k].get("ratios_per_round") or {}).get(key)
            if raw is None:
                return "–"
            return _ratio(raw) + (f" ({_spread(rounds)})" if rounds and len(rounds) > 1 else "") + \
                ("" if pooled is None else f" [{_ratio(pooled)}]")
        rows = [[label] + [cell(k, key) for k in cols] + [tgt] for key, label, tgt in names]
        for k in cols:
            b = speed.get(f"batch_{k}")
            if b:
                rows.append([f"batch of {b['n']} faces / {b['n']} single runs (anonymize, exact, {b['steps']} steps)"]
                            + [_ratio(b["ratio batch / singles"]) if c == k else "" for c in cols] + [""])
        p = res.get("photo")
        if p and "ratio photo / crop" in p:
            rows.append([f"one face in a {p['megapixels']:.1f} MP photo / same face as a {p['crop_size']}² crop "
                         f"(tiny, {p['steps']} steps)", _ratio(p["ratio photo / crop"])] + [""] * (len(cols) - 1) + [""])
        s.append(_table(["ratio"] + [head[k] for k in cols] + ["target"], rows))
        s.append("")
        s.append("### Time per operation and share outside model calls\n")
        s.append("Model time is measured by a `model_function_wrapper` around every UNet call; the rest (ComfyUI's "
                 "sampling setup, CFG, KeyFace's float64 algebra, scrambling, hashing, masks) is the overhead.\n")
        ops = [("ksampler", "KSampler (euler)"), ("regenerate", "Regenerate (euler)"),
               ("restore", "Restore"), ("stock_unsample", "FlipSigmas + SamplerCustom"),
               ("invert_plain", "Invert to Noise plain"), ("invert_exact", "Invert to Noise exact"),
               ("invert_exact_single", "Invert to Noise exact_single")]
        header = ["operation"]
        for k in cols:
            header += [f"{k}: median s", f"{k}: calls", f"{k}: outside model"]
        rows = []
        for key, label in ops:
            row = [label]
            for k in cols:
                tk = speed[k]["timings"].get(key)
                row += ([f"{tk['median_wall_s']:.3f}", str(tk["calls_per_run"]), _pct(tk["overhead_share"])]
                        if tk else ["–", "–", "–"])
            rows.append(row)
        s.append(_table(header, rows))
        s.append("")
        core = speed.get("core_overhead_tiny")
        if core:
            s.append("Pure core (keyface_core.sampling over `BaseModel.apply_model`, no ComfyUI), tiny model: share "
                     "outside the denoiser — " + ", ".join(f"{k} {_pct(v['overhead_share'])}" for k, v in core.items()) + ".\n")
        rt = [(k, speed[k]["round_trip_rel_err"]) for k in cols if speed[k]["round_trip_rel_err"]]
        if rt:
            routes = list(rt[0][1].keys())
            s.append("Round trip of the timed routes (relative latent error in LATENT space; KeyFace: through the v2 "
                     "Restore, which retraces each method's own noise; stock: unsample then KSampler):\n")
            s.append(_table(["route"] + [head[k] for k, _ in rt], [[r] + [fmt(d.get(r)) for _, d in rt] for r in routes]))
            s.append("")
        s.append("Regenerate (euler) vs KSampler (euler) from the same keyed noise, relative difference of the outputs: "
                 + ", ".join(f"{k} {fmt(speed[k]['regenerate_vs_ksampler_rel_diff'])}" for k in cols)
                 + ". Restore in the timed runs: " + "; ".join(
                     f"{k} {speed[k]['restore_calls']} model calls for {speed[k]['steps']} steps, "
                     f"{'bit-exact' if speed[k]['restore_exact'] else 'NOT bit-exact'}" for k in cols) + ".\n")
        s.append("Fixed costs KeyFace adds to every node run (model fingerprint checked by Regenerate/Restore, conditioning "
                 "fingerprint): " + "; ".join(f"{k}: model {1000 * speed[k]['fixed_costs_s']['model_identity']:.1f} ms, "
                                               f"conditioning {1000 * speed[k]['fixed_costs_s']['conditioning_id']:.1f} ms"
                                               for k in cols if 'fixed_costs_s' in speed[k]) + ".\n")
    jc = speed.get("job_cost_tiny")
    if jc:
        s.append("## Job cost: anonymize and restore vs one KSampler run\n")
        s.append("`benchmarks/job_cost.py`'s `measure`, run inside this suite. Variants, each timed in a freshly "
                 "shuffled order every round: *ksampler* = ComfyUI's KSampler (euler) on the keyed noise; *regenerate* "
                 "= Regenerate with KSamplerSelect(euler); *anonymize* = Invert to Noise (exact, masked) + Apply Key "
                 "Flip + Regenerate (dpmpp_2m); *restore* = Restore (unscramble + retrace + verification). Raw ratio = "
                 "wall time / KSampler's in the same round (median, min–max over rounds); pooled = model calls × shared "
                 "seconds per call + own non-model seconds.\n")
        s += _job_cost_markdown(jc)
    p = res.get("photo")
    if p and "stages_mean_s" in p:
        s.append(f"### One face: {p['photo_size'][0]}×{p['photo_size'][1]} photo vs {p['crop_size']}² crop\n")
        s.append(f"{p['model']}, exact mode, {p['steps']} steps, {p['reps']} reps; faces found: photo "
                 f"{p['faces_found']['photo']}, crop {p['faces_found']['crop']}; mean seconds per stage:\n")
        stages = list(p["stages_mean_s"]["photo"].keys())
        rows = [[st, f"{p['stages_mean_s']['photo'][st]:.3f}", f"{p['stages_mean_s']['crop'][st]:.3f}"] for st in stages]
        rows.append(["**total (median)**", f"{p['timings']['photo']['median_wall_s']:.3f}", f"{p['timings']['crop']['median_wall_s']:.3f}"])
        s.append(_table(["stage", f"{p['megapixels']:.1f} MP photo", f"{p['crop_size']}² crop"], rows))
        s.append("")
    ll = res.get("lossless")
    if ll:
        st = ll["sealed_bytes_per_face"] or {}
        s.append(f"## Lossless mode: bytes added per face ({ll['crop_size']}² crops)\n")
        s.append(f"{ll['model']} and the random tiny VAE, {ll['steps']} steps; every photo of the faces folder "
                 f"({ll['photos']} photos, {ll['faces']} faces), anonymized once and saved with lossless off and on. "
                 "The sealed residual is the original box pixels minus what Restore Photo gives without it (int16, "
                 "zlib level 9, then ChaCha20-Poly1305: 12-byte nonce + 16-byte tag). It is non-zero wherever VAE "
                 "decode(original latent) differs from the original, i.e. inside the soft mask; with this random VAE "
                 "that is every masked pixel, so these sizes are a worst case. The residual is taken at the face box's "
                 "own resolution in the photo (not at the crop size), so its size grows with the box. Without the key "
                 "the file reveals only the residual's length.\n")
        s.append(f"Sealed bytes per face: min {st.get('min')}, median {fmt(st.get('median'))}, mean {fmt(st.get('mean'))}, "
                 f"max {st.get('max')}; median {fmt(ll['bytes_per_box_pixel_median'])} bytes per pixel of the face box. "
                 f"Lossless restore bit-exact on every photo: {'yes' if ll['all_bit_exact'] else 'NO'}.\n")
        per_px = _lossless_per_box_pixel(ll)
        if per_px:
            s.append("Scaled to a 512² face box (median bytes per box pixel × 512²): "
                     + ", ".join(f"{name} {fmt(v * 512 * 512)}" for name, v in per_px.items()) + " bytes.\n")
        proxy = ll.get("proxy_sealed_bytes_per_face_median")
        if proxy:
            s.append("Stand-in for a real VAE (measured on the same face boxes and masks, packed and sealed the same "
                     "way): white reconstruction error of σ gray levels on every pixel the soft mask touches gives a "
                     "median of " + ", ".join(f"{fmt(v)} bytes per face at σ = {float(sd):g}" for sd, v in proxy.items())
                     + " (σ 2 / 4 / 8 ≈ PSNR 42 / 36 / 30 dB inside the mask). A real VAE's error is spatially "
                     "correlated and compresses better than white noise, so these bound it from above for a VAE of "
                     "that fidelity; even σ = 2 costs about 3 bits per masked value, so lossless mode adds hundreds "
                     "of kilobytes per face, not a few.\n")
        rows = [[r["photo"], str(r["faces"]), ", ".join(f"{b[2]}²" for b in r["boxes"]),
                 ", ".join(str(b) for b in r["sealed_bytes_per_face"]), str(r["png_bytes_plain"]),
                 str(r["png_bytes_added"]), _pct(r["residual_nonzero_pixels"] / r["box_pixels"]),
                 "yes" if r["bit_exact"] else "**no**"] for r in ll["rows"]]
        s.append(_table(["photo", "faces", "face boxes (px)", "sealed residual bytes per face", "PNG bytes (off)",
                         "PNG bytes added (on)", "box pixels the residual changes", "original bit for bit"], rows))
        s.append("")

    ex = res.get("exactness", {})
    cur = ex.get("curves")
    if cur:
        s.append("## Exactness curves\n")
        s.append(f"Pure core on the tiny model, latent {'×'.join(map(str, cur['latent_shape']))} (a face crop through the "
                 "tiny VAE, rescaled to unit variance in model space); error = ‖round trip − original‖ / ‖original‖ in "
                 "model space. `exact_single` uses the core defaults (tol 1e-6, ≤ 30 iterations, Anderson m = 5). "
                 "In v2 the round trip is exactly what Restore does: the inversion's noise retraced forward.\n")
        methods = list(dict.fromkeys(r["method"] for r in cur["vs_steps"]))
        steps = sorted(set(r["steps"] for r in cur["vs_steps"]))
        get = {(r["method"], r["steps"]): r for r in cur["vs_steps"]}
        rows = [[str(n)] + [f"{fmt(get[(mm, n)]['rel_err'])} ({get[(mm, n)]['invert_calls']}+{get[(mm, n)]['regenerate_calls']})"
                            for mm in methods] for n in steps]
        s.append("Round-trip error vs steps (model calls invert + retrace):\n")
        s.append(_table(["steps"] + methods, rows))
        s.append("")
        it = [r for r in cur["vs_iterations"] if r["iterations"] is not None]
        if it:
            iters = sorted(set(r["iterations"] for r in it))
            g = {(r["anderson_memory"], r["iterations"]): r for r in it}
            rows = [[str(i)] + [f"{fmt(g[(mem, i)]['rel_err'])} ({g[(mem, i)]['invert_calls']})" if (mem, i) in g else "–"
                                for mem in (0, 5)] for i in iters]
            s.append("`exact_single` round-trip error vs solver iterations per step (20 steps; invert calls):\n")
            s.append(_table(["iterations / step", "plain fixed point (m = 0)", "Anderson m = 5"], rows))
            refs = [r for r in cur["vs_iterations"] if r["iterations"] is None]
            s.append("\nReferences at 20 steps: " + ", ".join(f"{r['method']} {fmt(r['rel_err'])} ({r['invert_calls']} invert calls)" for r in refs) + ".\n")
        tol = cur.get("vs_tolerance")
        if tol:
            rows = [[fmt(r["tol"]), fmt(r["rel_err"]), str(r["invert_calls"]), fmt(r["max_residual"])] for r in tol]
            s.append("`exact_single` vs solver tolerance (20 steps, Anderson m = 5, ≤ 50 iterations per step):\n")
            s.append(_table(["tolerance", "round-trip error", "invert calls", "worst final residual"], rows))
            s.append("")
    nd = ex.get("nodes")
    if nd:
        s.append("## Model calls per anonymize / restore, and Restore's verdict\n")
        s.append(f"Node functions on {nd['model']}, latent {'×'.join(map(str, nd['latent_shape']))}, face mask covering "
                 f"{100 * nd['mask_fraction']:.0f} % of the crop. Anonymize = Invert to Noise + Apply Key Flip + "
                 "Regenerate (dpmpp_2m, same steps); Restore = the Restore node (unscramble + retrace of the stored "
                 "keyed noise; it never inverts the anonymized latent). Restore error = ‖restored − original‖ / "
                 "‖original‖ (LATENT samples). *As stored* = the keyed noise in float64, as the file holds it; "
                 "*rounded to float32* = what a file storing float32 noise would give.\n")
        rows = []
        for r in nd["rows"]:
            stored = r["restore"]["as stored (float64 keyed noise)"]
            f32 = r["restore"]["keyed noise rounded to float32"]
            rows.append([r["method"], str(r["invert_calls"]), str(r["regenerate_calls"]), str(stored["calls"]),
                         fmt(stored["rel_err"]) + (" (bit-exact)" if stored["bit_exact"] else ""), stored["verification"],
                         fmt(f32["rel_err"]), fmt(r["wrong_key"]["rel_err"])])
        s.append(_table(["method", "invert calls", "regenerate calls", "restore calls", "restore error (as stored)",
                         "Restore says", "restore error (noise in float32)", "wrong-key restore error"], rows))
        s.append("")
        cs = nd.get("calls_vs_steps")
        if cs:
            rows = [[r["method"], str(r["steps"]), str(r["invert_calls"] + r["regenerate_calls"]),
                     str(r["restore_calls"]), fmt(r["restore_rel_err"]) + (" (bit-exact)" if r["bit_exact"] else "")]
                    for r in cs]
            s.append("Calls vs steps (Restore = `steps` calls for every method; only `exact` retraces its own noise "
                     "exactly):\n")
            s.append(_table(["method", "steps", "anonymize calls", "restore calls", "restore error"], rows))
            s.append("")
    for key, title, unit in (("numerics_tiny", "tiny SD1.5 UNet, through the Restore node", "restored LATENT"),
                             ("numerics_analytic", "analytic model (exact float64 denoiser), through the protocol",
                              "restored latent")):
        nm = ex.get(key)
        if not nm:
            continue
        if key == "numerics_tiny":
            s.append("## Restore with other numerics than the anonymizer's (issue 11)\n")
            s.append("Anonymized once (exact, float32 UNet, 1 torch thread), then restored with other numerics; "
                     "*X* = relative L2 difference of the restored face latent from the original, as Restore's "
                     "verification reports it (from the sealed float32 reference), with its max and the number of "
                     "values that differ (all inside the face mask). *manual_cast* = ComfyUI computing in that dtype "
                     "with the same float32 weights (the model fingerprint matches, so Restore runs); *weights cast* = a "
                     "checkpoint loaded in that dtype (its fingerprint differs, so Restore refuses it as another "
                     "model; the next row lends it the float32 fingerprint to measure X anyway). The random UNet "
                     "amplifies perturbations (REFERENCE §2), so read X as an upper side for smooth real models.\n")
        s.append(f"### {title}: {nm.get('steps')} steps"
                 + (f", {nm['samples']} samples" if "samples" in nm else "") + "\n")
        rows = []
        for r in nm["rows"]:
            if "refused" in r:
                rows.append([r["restorer"], "refused: " + r["refused"].split(": ", 1)[-1], "–", "–", "–"])
                continue
            rows.append([r["restorer"], r["message"], fmt(r["relative_error"]), fmt(r["max_abs_error"]),
                         f"{r['differing']} of {r['values']}"]
                        + ([_pct(r["identity_recovered"])] if "identity_recovered" in r else []))
        header = ["restorer", "Restore says", "X (relative L2)", "max abs", "values differing"]
        if key == "numerics_analytic":
            header.append("identity recovered")
        s.append(_table(header, rows))
        s.append("")

    idn = res.get("identity")
    if idn:
        s.append("## Identity and quality harness\n")
        if not idn["real_checkpoint"]:
            s.append("**The identity numbers mean nothing for anonymization quality**: the model and VAE are "
                     "random-weight stand-ins (the VAE does not even reconstruct faces). The run proves the harness "
                     "works end to end, and the exactness columns (restored photo vs the ideal, lossless vs the "
                     "original) are real; run `benchmarks/run.py --checkpoint PATH` with a real checkpoint for the "
                     "paper's table.\n")
        c = idn["recognizer_check"]
        s.append(f"Recognizer check (dlib ResNet descriptor, threshold {idn['threshold']}, {len(c['photos'])} single-face "
                 f"photos in `{idn['folder']}`): {c['same_matched']}/{c['same_pairs']} same-identity pairs match (max "
                 f"distance {fmt(c['same_max_distance'])}), {c['different_rejected']}/{c['different_pairs']} different-identity "
                 f"pairs rejected (min distance {fmt(c['different_min_distance'])}) → **{'PASS' if c['passed'] else 'FAIL'}**.\n")
        sm = idn["summary"]
        s.append(f"{sm['faces']} faces in {sm['photos']} photos; {idn['model']}, mode {idn['mode']}, {idn['steps']} steps, "
                 f"crops {idn['crop_size']}². Each photo: anonymize → Save Anonymized (lossless off, and on) → Load "
                 "Anonymized → Restore → Restore Photo (lossless: with the key).\n")
        cols = [("anonymized", "anonymized"), ("restored", "restored (lossless off)"),
                ("restored_lossless", "restored (lossless on)"), ("wrong_key", "wrong-key restore")]

        def ps(name):
            p, q = sm.get(f"psnr_{name}"), sm.get(f"ssim_{name}")
            inf = sm.get(f"psnr_{name}_infinite", 0)
            if inf == sm["faces"]:
                return "∞ (identical)"
            return f"{fmt(p)} dB / {fmt(q)}" + (f" ({inf} identical)" if inf else "")
        rows = [["mean identity distance to original (dlib)"] + [fmt(sm[k]["mean_distance"]) for k, _ in cols],
                ["true-accept rate at 0.6"] + [_pct(sm[k]["true_accept_rate"]) for k, _ in cols],
                ["face detected (inside its crop box)"] + [_pct(sm[k]["detection_rate"]) for k, _ in cols],
                ["PSNR / SSIM of the crop box vs original"] + [ps("anonymized"), ps("restored"), ps("restored_lossless"), "–"]]
        s.append(_table(["measure"] + [c2 for _, c2 in cols], rows))
        s.append("")
        levels = res.get("identity_by_coverage") or {}
        if len(levels) > 1:
            s.append("Per coverage level of the mask (Face Mask `coverage`), anonymized faces:\n")
            s.append(_table(["coverage", "mean identity distance", "true-accept rate at 0.6", "face detected",
                             "PSNR / SSIM of the crop box"],
                            [[level, fmt(v["anonymized"]["mean_distance"]), _pct(v["anonymized"]["true_accept_rate"]),
                              _pct(v["anonymized"]["detection_rate"]),
                              f"{fmt(v.get('psnr_anonymized'))} dB / {fmt(v.get('ssim_anonymized'))}"]
                             for level, v in levels.items()]))
            s.append("")
        rows = [["lossless off", str(sm["restored_max_diff"]), fmt(sm["restored_mean_diff_in_boxes"]),
                 str(sm["restored_vs_original_max_diff"]), fmt(sm["restored_vs_original_mean_diff_in_boxes"])],
                ["lossless on", str(sm["restored_lossless_max_diff"]), fmt(sm["restored_lossless_mean_diff_in_boxes"]),
                 str(sm["restored_lossless_vs_original_max_diff"]),
                 fmt(sm["restored_lossless_vs_original_mean_diff_in_boxes"])]]
        s.append("Restored photo vs the **ideal** (the original photo with VAE decode(original latent) pasted through "
                 "the same masks) and vs the original, in gray levels over every photo (mean over the face boxes; "
                 "outside them every pixel is the original's):\n")
        s.append(_table(["Restore Photo", "max vs ideal", "mean vs ideal", "max vs original", "mean vs original"], rows))
        n_ideal = sm.get("psnr_ideal")
        s.append(f"\nThe ideal itself vs the original (crop boxes): {fmt(n_ideal)} dB — the VAE's loss, which only "
                 f"lossless mode removes. Face latents verified exact by Restore: {sm['latents_verified_exact']} of "
                 f"{sm['photos']} photos; lossless pixels verified by their keyed digest: {sm['lossless_verified']} of "
                 f"{sm['photos']}. Lossless mode added {fmt(sm['lossless_png_bytes_added_per_face'])} PNG bytes per "
                 f"face at {idn['crop_size']}² crops. Model calls per photo: anonymize "
                 f"{fmt(sm['anonymize_calls_per_photo'])}, restore {fmt(sm['restore_calls_per_photo'])}.\n")
        reports = sorted({p["restore_report"] for p in idn["per_photo"]} | {p["restore_report_lossless"] for p in idn["per_photo"]})
        s.append("What Restore Photo reported (distinct lines): " + " / ".join(f"“{r}”" for r in reports) + ".\n")
    if res.get("analytic"):
        s.append(analytic_markdown(res["analytic"]))
    s.append("## Settings\n")
    import json
    s.append("```\n" + "\n".join(f"{k}: {json.dumps(v)}" for k, v in res["settings"].items()) + "\n```\n")
    s.append("Section wall times: " + ", ".join(f"{k} {v:.0f} s" for k, v in res["section_s"].items()) + ".\n")
    if res.get("plots"):
        s.append("Plots: " + ", ".join(f"[{Path(p).name}]({Path(p).name})" for p in res["plots"]) + ".\n")
    return "\n".join(s)


def plots(res: dict, out: Path) -> list:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    floor = 1e-17

    def clip(v):
        return max(v, floor)

    cur = _get(res, "exactness", "curves")
    if cur:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        methods = list(dict.fromkeys(r["method"] for r in cur["vs_steps"]))
        for mm in methods:
            rows = sorted((r for r in cur["vs_steps"] if r["method"] == mm), key=lambda r: r["steps"])
            axes[0].semilogy([r["steps"] for r in rows], [clip(r["rel_err"]) for r in rows], "o-", label=mm)
            axes[1].plot([r["steps"] for r in rows], [r["invert_calls"] + r["regenerate_calls"] for r in rows], "o-", label=mm)
        axes[0].set(xlabel="steps", ylabel="round-trip relative error", title="Round trip vs steps (tiny model)")
        axes[1].set(xlabel="steps", ylabel="model calls (invert + retrace)", title="Model calls vs steps")
        axes[1].set_yscale("log")
        for a, where in zip(axes, ("center right", "lower right")):
            a.grid(True, which="both", alpha=0.3)
            a.legend(fontsize=8, loc=where)
        path = _save_figure(fig, out / "exactness_vs_steps.png", plt)
        made.append(str(path))

        it = [r for r in cur["vs_iterations"] if r["iterations"] is not None]
        if it:
            fig, ax = plt.subplots(figsize=(6.5, 4.2))
            for mem, label in ((0, "fixed point (Anderson m = 0)"), (5, "Anderson m = 5")):
                rows = sorted((r for r in it if r["anderson_memory"] == mem), key=lambda r: r["iterations"])
                ax.loglog([r["invert_calls"] for r in rows], [clip(r["rel_err"]) for r in rows], "o-", label=label)
            tol = cur.get("vs_tolerance") or []
            if tol:
                ax.loglog([r["invert_calls"] for r in tol], [clip(r["rel_err"]) for r in tol], "s--",
                          label="Anderson m = 5, by tolerance")
            x_left = min(r["invert_calls"] for r in it)
            for r in cur["vs_iterations"]:
                if r["iterations"] is None:
                    ax.axhline(clip(r["rel_err"]), ls=":", color="gray")
                    ax.annotate(f"{r['method']} ({r['invert_calls']} invert calls)", (x_left, clip(r["rel_err"])),
                                fontsize=8, va="bottom")
            ax.set(xlabel="invert model calls (20 steps)", ylabel="round-trip relative error",
                   title="exact_single: error vs solver work")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
            path = _save_figure(fig, out / "exactness_vs_iterations.png", plt)
            made.append(str(path))

    speed = res.get("speed", {})
    cols = [k for k in ("tiny", "sd15") if k in speed]
    if cols:
        keys = ["regenerate / ksampler", "restore / ksampler", "invert_plain / stock_unsample",
                "invert_exact / invert_plain"]
        fig, ax = plt.subplots(figsize=(8, 3.8))
        _grouped_barh(ax, keys, cols, lambda k: [speed[k]["ratios"].get(key, math.nan) for key in keys])
        ax.axvline(1.0, color="black", lw=0.8)
        ax.axvline(TARGET_REGEN, color="red", ls="--", lw=0.8, label=f"{TARGET_REGEN}× target")
        ax.set_xlabel("time ratio (median)")
        ax.legend(fontsize=8)
        path = _save_figure(fig, out / "speed_ratios.png", plt)
        made.append(str(path))

        fig, ax = plt.subplots(figsize=(8, 3.8))
        ops = ["ksampler", "regenerate", "restore", "stock_unsample", "invert_plain", "invert_exact"]
        _grouped_barh(ax, ops, cols, lambda k: [100 * speed[k]["timings"][o]["overhead_share"] for o in ops])
        ax.axvline(100 * TARGET_OVERHEAD, color="red", ls="--", lw=0.8, label="5 % target")
        ax.set_xlabel("% of wall time outside UNet calls")
        ax.legend(fontsize=8)
        path = _save_figure(fig, out / "overhead_share.png", plt)
        made.append(str(path))
    an = res.get("analytic")
    if an:
        made.append(str(analytic_plot(an, out, plt)))
    return made


# ----------------------------------------------------------------------------------------------
# Analytic section (kfbench/analytic.py)
# ----------------------------------------------------------------------------------------------

def _euler_label(method: str) -> str:
    return "Euler (plain = exact_single)" if method == "plain" else method


def _schedule_check(diffs: dict) -> str:
    if not diffs or any(v is None for v in diffs.values()):
        return " (not compared with ComfyUI: it was not loaded)"
    worst = max(diffs.values())
    return " (bit-identical to ComfyUI's `calculate_sigmas`)" if worst == 0 else f" (max |Δσ| vs ComfyUI's {fmt(worst)})"


def analytic_markdown(an: dict) -> str:
    d, c, q, a = an["distribution"], an["denoiser_checks"], an["quality"], an["anonymization"]
    data = (f"Data: a mixture of {d['k']} \"identities\" in a {'×'.join(map(str, d['shape']))} latent (d = {d['d']}): a "
            f"shared smooth background, an identity-specific smooth field inside a central ellipse covering "
            f"{100 * a['mask_fraction']:.0f} % of the grid (soft edge: {100 * d['between_identity_variance_outside_mask']:.1f} % "
            f"of the between-identity variance lies outside the mask), means of RMS {fmt(d['mean_rms'])}; shared "
            f"within-identity covariance isotropic sd {fmt(d['iso_sd'])} + {d['rank']} smooth directions (total sd "
            f"{fmt(d['within_sd_per_element'])} per element). Nearest two identities are {fmt(d['min_mean_distance_rms'])} "
            f"apart (RMS per element), {fmt(d['min_mean_distance_whitened'])} in Mahalanobis units. The denoiser is the exact "
            f"posterior mean E[x0 | x0 + σn]; checks: brute force (d = 6, full matrices) {fmt(c['brute_force_max_abs_err'])}, "
            f"Tweedie (autograd of log p_σ) {fmt(c['tweedie_max_rel_err'])}, D(x, 1e-4) vs x {fmt(c['small_sigma_rel_err'])}, "
            f"Monte Carlo orthogonality max |z| {fmt(c['monte_carlo_orthogonality_max_z'])} ({c['monte_carlo_samples']} "
            f"samples). Schedules: SD1.5 `normal` (the nodes' default) and `karras`"
            + _schedule_check(an["schedule_vs_comfyui_max_abs_diff"]) + ".\n")
    metrics = ("Metrics: **whitened distance** = √(min_k Mahalanobis² / d), ≈ 1 for true samples, < 1 = too smooth (pulled "
               "towards a mean), > 1 = off the data (noise, oscillation); **NLL/dim** under the true mixture (lower is not "
               "always better: a sample at a mean scores best); **unambiguous** = share whose largest identity posterior "
               "> 0.99; errors are RMS per element (data units: within-identity sd ≈ 0.3, identities ≥ 0.58 apart).\n")
    s = ["## Analytic quality proxy (Gaussian mixture, exact denoiser)\n", data, metrics]

    ref, true = q["reference"], q["true_samples"]
    s.append(f"### Generation from x_T = σ_max·n ({q['samples']} samples)\n")
    s.append(f"Reference: the probability-flow ODE from the same x_T by Heun on ~{ref['substeps']} geometric sub-steps "
             f"(references from all grids agree to {fmt(ref['max_spread_rms'])} RMS). `exact` starts from "
             "`NoiseState(x_T, residual=None)` (the core's fresh-noise convention: second state = an Euler step); "
             "`exact_single` and `plain` both regenerate with Euler, so they generate identically. *Alternating part* = "
             "RMS of e_i − (e_{i−1} + e_{i+1})/2 along the trajectory, e_i = state − reference at σ_i (max over steps): the "
             "leapfrog's parasitic (−1)^i mode.\n")
    head = ["steps", "method", "whitened dist", "NLL/dim", "unambiguous", "identity = reference", "err vs reference",
            "alternating part", "exact − Euler"]
    for schedule in dict.fromkeys(r["schedule"] for r in q["rows"]):
        rows = [["true samples", "", fmt(true["whitened_dist"]), fmt(true["nll_per_dim"]), _pct(true["unambiguous"]), "", "", "", ""],
                ["ODE reference", "", fmt(ref["whitened_dist"]), fmt(ref["nll_per_dim"]), _pct(ref["unambiguous"]), "", "", "", ""]]
        for r in q["rows"]:
            if r["schedule"] != schedule or r["method"] == "exact_single":
                continue
            rows.append([str(r["steps"]), _euler_label(r["method"]), fmt(r["whitened_dist"]), fmt(r["nll_per_dim"]),
                         _pct(r["unambiguous"]), _pct(r["same_identity_as_reference"]), fmt(r["err_vs_reference_rms"]),
                         fmt(r["alternating_max"]), fmt(r.get("exact_minus_plain_rms")) if r["method"] == "exact" else ""])
        s.append(f"`{schedule}` schedule:\n")
        s.append(_table(head, rows))
        s.append("")
    rt = [r for r in q["rows"] if "round_trip_rel_err" in r]
    if rt:
        steps = sorted({r["steps"] for r in rt})
        g = {(r["method"], r["steps"]): r for r in rt}
        methods = [m for m in ("exact", "exact_single", "plain") if any(k[0] == m for k in g)]
        rows = [[str(n)] + [f"{fmt(g[(m, n)]['round_trip_median_rel_err'])} / {fmt(g[(m, n)]['round_trip_rel_err'])} "
                            f"({_pct(g[(m, n)]['round_trip_identity_kept'])}; {g[(m, n)]['round_trip_invert_calls']} calls)"
                            for m in methods] for n in steps]
        s.append("Round trip of true samples (invert, regenerate; no flip): median / max relative error (identity kept; "
                 "invert calls), `normal` schedule:\n")
        s.append(_table(["steps"] + methods, rows))
        s.append("")

    for run in (a, *an.get("anonymization_more", [])):
        _analytic_anonymization(s, run, d)
    s.append("")
    return "\n".join(s)


def _analytic_anonymization(s: list, a: dict, d: dict) -> None:
    s.append(f"### Anonymization ({a['samples']} true samples, {a['steps']} steps, `{a.get('schedule', 'normal')}`)\n")
    s.append("**Format v1's path**, kept as the baseline issue 10 compares against (v2 draws the face with a stock "
             "sampler and restores by retracing the stored noise; v2 on this model is `benchmarks/scramble_bench.py`). "
             "As the v1 nodes did it, in the pure core: invert → keyed ±1 flip of the noise (`exact`'s residual is sealed by the key; the new face starts from a zero residual) with "
             "`sign_pattern(key.image_key(nonce), …, flip_context(shape, 0))` → regenerate; *mask* = the face ellipse, "
             "with the background held as `background_for` holds it (clean latent + nonce-derived public noise). Restore "
             "= invert the anonymized latent → unflip, unseal the residual → regenerate. Clean samples: whitened distance "
             f"{fmt(a['clean']['whitened_dist'])}, NLL/dim {fmt(a['clean']['nll_per_dim'])}. A random new identity would "
             f"change identity in {100 * (1 - 1 / d['k']):.1f} % of cases.\n")
    rows = []
    for r in a["rows"]:
        an_ = r["anonymized"]
        rows.append(["mask" if r["masked"] else "whole latent", r["method"], str(r["anonymize_calls"]),
                     _pct(r["identity_change_rate"]), fmt(an_["whitened_dist"]) + f" (max {fmt(an_['whitened_dist_max'])})",
                     fmt(an_["nll_per_dim"]), _pct(an_["unambiguous"]), fmt(r["anonymized_change_rms"]),
                     "–" if r["outside_mask_max_abs_change"] is None else fmt(r["outside_mask_max_abs_change"])])
    s.append(_table(["region", "method", "anonymize calls", "identity changed", "whitened dist", "NLL/dim", "unambiguous",
                     "change (RMS)", "max change outside mask"], rows))
    diag = [(("mask" if r["masked"] else "whole latent"), r["diagnostic_flipped_residual_whitened_dist"])
            for r in a["rows"] if r.get("diagnostic_flipped_residual_whitened_dist") is not None]
    if diag:
        s.append("\n`exact` seals its leapfrog residual with the key and starts the new face from a zero residual. "
                 "Diagnostic: the rule before sealing (residual flipped along with the noise) gave whitened distance "
                 + ", ".join(f"{fmt(v)} ({k})" for k, v in diag) + " — the parasitic mode a flipped residual seeds.")
    s.append("")
    variants = list(a["rows"][0]["restore"].keys())
    rows = []
    for r in a["rows"]:
        rows.append(["mask" if r["masked"] else "whole latent", r["method"]]
                    + [f"{fmt(r['restore'][v]['rel_err'])} ({_pct(r['restore'][v]['identity_recovered'])})" for v in variants]
                    + [f"{_pct(r['wrong_key']['same_identity'])} / {fmt(r['wrong_key']['whitened_dist'])}"])
    s.append("Restore: max relative error (share whose identity is recovered), by what the restorer holds — the payload "
             "(float64 state + leapfrog partner for `exact`), both rounded to float32, the state without its partner, "
             "float32 samples without partner, and the latent perturbed by 1 % of its RMS (a stand-in for re-encoding "
             "pixels). Last column: with a wrong key, share landing on the original identity / whitened distance.\n")
    s.append(_table(["region", "method"] + variants + ["wrong key: original identity / whitened dist"], rows))
    s.append("")



def _grouped_barh(ax, labels: list, cols: list, values) -> None:
    """One horizontal bar per label and model column (tiny / SD1.5-sized), grouped by label."""
    width = 0.8 / len(cols)
    for j, k in enumerate(cols):
        ax.barh([i + j * width for i in range(len(labels))], values(k), height=width,
                label="tiny" if k == "tiny" else "SD1.5-sized")
    ax.set_yticks([i + width * (len(cols) - 1) / 2 for i in range(len(labels))])
    ax.set_yticklabels(labels, fontsize=8)
    ax.grid(True, axis="x", alpha=0.3)


def _save_figure(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def analytic_plot(an: dict, out: Path, plt) -> Path:
    q = an["quality"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for schedule, ls in (("normal", "-"), ("karras", "--")):
        for method, color in (("exact", "C3"), ("plain", "C0")):
            rows = sorted((r for r in q["rows"] if r["schedule"] == schedule and r["method"] == method), key=lambda r: r["steps"])
            if not rows:
                continue
            label = f"{_euler_label(method)}, {schedule}"
            axes[0].plot([r["steps"] for r in rows], [r["whitened_dist"] for r in rows], "o" + ls, color=color, label=label)
            axes[1].semilogy([r["steps"] for r in rows], [r["err_vs_reference_rms"] for r in rows], "o" + ls, color=color, label=label)
    axes[0].axhline(q["true_samples"]["whitened_dist"], color="black", lw=0.8, label="true samples")
    axes[0].set(xlabel="steps", ylabel="whitened distance to nearest identity", title="Realism (1 = like true samples)")
    axes[0].set_yscale("log")
    axes[1].set(xlabel="steps", ylabel="RMS error vs fine ODE solution", title="Error vs reference")
    steps = 20 if any(r["steps"] == 20 for r in q["rows"]) else max(r["steps"] for r in q["rows"])
    for method, color in (("exact", "C3"), ("plain", "C0")):
        t = q["trajectories"].get(f"normal/{method}/{steps}")
        if t:
            axes[2].semilogy(range(1, len(t["err"])), [max(v, 1e-6) for v in t["err"][1:]], "-", color=color,
                             label=f"{_euler_label(method)}: error")
            axes[2].semilogy(range(1, len(t["alternating"]) + 1), [max(v, 1e-6) for v in t["alternating"]], ":", color=color,
                             label=f"{_euler_label(method)}: alternating part")
    axes[2].set(xlabel=f"step ({steps} steps, normal)", ylabel="RMS per element", title="Along the trajectory")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    path = _save_figure(fig, out / "analytic_quality.png", plt)
    return path
