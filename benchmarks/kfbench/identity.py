"""Identity and quality harness (format v2): the paper's table on a folder of face photos.

For every photo: anonymize all faces (whole-photo path), save the KeyFace PNG twice (lossless off and on) and
load each back, Restore -> Restore Photo with the right key, and with a wrong key. Measured per face, with
dlib's 128-d descriptor (distance < 0.6 = same person):

* identity distance original<->anonymized, original<->restored, original<->wrong-key restore;
* true-accept rate at 0.6 (share of faces the recognizer still matches to the original);
* face-detection rate on the anonymized (and restored) photos, inside each face's crop box;
* PSNR / SSIM of the restored face crop box vs the original;
* the restored photo vs the **ideal** (the original photo with VAE decode(original latent) pasted through the
  same masks, issue 11): max and mean gray-level difference, lossless off (target ≤ 1) and on (target: the
  original itself, difference 0);
* what Restore and Restore Photo report.

Before any of it, the recognizer itself is checked on the folder: same-identity pairs must match
and different identities must not.
"""

from __future__ import annotations

import itertools
import re
import statistics
import os
from pathlib import Path

import numpy as np
import torch

from .common import REPO, Models, new_key, pack, psnr, ssim
from .photo import anonymize_photo, ideal_photo, load_image, restore_photo, save_and_load, to_uint8

THRESHOLD = 0.6
IMAGE_EXT = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def photo_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXT)


def identity_label(path: Path) -> str:
    """'obama2.jpg' -> 'obama', 'rose-leslie1.jpg' -> 'rose-leslie' (trailing digits and separators dropped)."""
    return re.sub(r"[-_ ]*\d+$", "", path.stem).lower()


def _describe(image_u8: np.ndarray, det) -> np.ndarray:
    return pack("keyface_core.faces").face_descriptor(image_u8, det)


def _landmarks_at(image_u8: np.ndarray, box):
    """A FaceDetection at a given box with landmarks predicted on this image (for faces the detector missed)."""
    F = pack("keyface_core.faces")
    import dlib
    x0, y0, x1, y1 = box
    shape = F._model("shape68")(image_u8, dlib.rectangle(int(x0), int(y0), int(x1) - 1, int(y1) - 1))
    landmarks = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)
    return F.FaceDetection(box=tuple(int(v) for v in box), landmarks=landmarks, score=float("nan"))


def _iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def _find_in_region(image_u8: np.ndarray, crop_box, face_box):
    """Detect faces inside the face's square crop box; the detection overlapping the original face, or None."""
    F = pack("keyface_core.faces")
    x, y, s = crop_box
    found = F.detect_faces(np.ascontiguousarray(image_u8[y:y + s, x:x + s]))
    best, best_iou = None, 0.3
    for det in found:
        box = (det.box[0] + x, det.box[1] + y, det.box[2] + x, det.box[3] + y)
        iou = _iou(box, face_box)
        if iou >= best_iou:
            best, best_iou = F.FaceDetection(box=box, landmarks=det.landmarks + np.array([x, y], np.float32),
                                             score=det.score), iou
    return best


def _probe(image_u8: np.ndarray, crop_box, face_box, reference: np.ndarray) -> dict:
    """Detected? and identity distance to the reference descriptor (at the detection, else at the original box)."""
    F = pack("keyface_core.faces")
    det = _find_in_region(image_u8, crop_box, face_box)
    used = det if det is not None else _landmarks_at(image_u8, face_box)
    return {"detected": det is not None, "distance": F.identity_distance(_describe(image_u8, used), reference)}


def recognizer_check(originals: dict) -> dict:
    """Same-identity pairs must be below the threshold, different identities above (single-face photos)."""
    singles = {name: rec for name, rec in originals.items() if len(rec["detections"]) == 1}
    F = pack("keyface_core.faces")
    same, different = [], []
    for (a, ra), (b, rb) in itertools.combinations(sorted(singles.items()), 2):
        d = F.identity_distance(ra["descriptors"][0], rb["descriptors"][0])
        entry = {"a": a, "b": b, "distance": d, "match": d < THRESHOLD}
        (same if ra["label"] == rb["label"] else different).append(entry)
    ok_same = sum(e["match"] for e in same)
    ok_diff = sum(not e["match"] for e in different)
    return {
        "photos": sorted(singles), "skipped_multi_face": sorted(set(originals) - set(singles)),
        "same_pairs": len(same), "same_matched": ok_same,
        "same_max_distance": max((e["distance"] for e in same), default=None),
        "different_pairs": len(different), "different_rejected": ok_diff,
        "different_min_distance": min((e["distance"] for e in different), default=None),
        "passed": ok_same == len(same) and ok_diff == len(different) and len(same) > 0,
        "failures": [e for e in same if not e["match"]] + [e for e in different if e["match"]],
    }


def harness(models: Models, folder: Path, steps: int, mode: str, crop_size: int, limit: int | None, out_dir: Path,
            progress, log=print, coverage: str = "face") -> dict:
    """coverage: Face Mask's coverage level (face, face+ears+neck, head) of the anonymized region."""
    F = pack("keyface_core.faces")
    FN = pack("nodes.face_nodes")
    key, wrong = new_key("right"), new_key("wrong")
    files = photo_files(folder)
    originals = {}
    for path in files:
        image = load_image(path)
        u8 = to_uint8(image)
        dets = F.detect_faces(u8)
        originals[path.name] = {"label": identity_label(path), "image": image, "u8": u8, "detections": dets,
                                "descriptors": [_describe(u8, d) for d in dets]}
        progress.update(1)
    check = recognizer_check(originals)
    num = lambda v: "n/a" if v is None else f"{v:.3f}"
    log(f"recognizer check: {check['same_matched']}/{check['same_pairs']} same-identity pairs match "
        f"(max distance {num(check['same_max_distance'])}), {check['different_rejected']}/{check['different_pairs']} "
        f"different-identity pairs rejected (min distance {num(check['different_min_distance'])}) -> "
        f"{'PASS' if check['passed'] else 'FAIL (no same-identity pairs)' if not check['same_pairs'] else 'FAIL'}")
    for failure in check["failures"]:
        log(f"  recognizer mismatch: {failure}")

    photos = [p for p in files if originals[p.name]["detections"]]
    if limit:
        photos = photos[:limit]
    faces_out, per_photo = [], []
    for path in photos:
        rec = originals[path.name]
        image, u8 = rec["image"], rec["u8"]
        anon, faces, anon_latent, original_latent, anon_calls = anonymize_photo(models, image, key, steps, mode,
                                                                                crop_size, coverage=coverage)
        loaded, latent, faces_l, size, _, warn = save_and_load(models, anon, faces, anon_latent, out_dir, path.stem)
        restored, _, stats, report = restore_photo(models, loaded, latent, faces_l, key)
        wrong_img, _, wrong_stats, _ = restore_photo(models, loaded, latent, faces_l, wrong, allow_wrong_key=True)
        loaded_ll, latent_ll, faces_ll, size_ll, sealed, warn_ll = save_and_load(
            models, anon, faces, anon_latent, out_dir, path.stem + "_lossless", lossless=True, original=image, key=key)
        restored_ll, _, _, report_ll = restore_photo(models, loaded_ll, latent_ll, faces_ll, key, lossless_key=key)
        ideal = ideal_photo(models, image, original_latent, faces)
        images = {"anonymized": to_uint8(loaded), "restored": to_uint8(restored), "wrong_key": to_uint8(wrong_img),
                  "restored_lossless": to_uint8(restored_ll)}
        box_mask = np.zeros(u8.shape[:2], bool)
        for region in faces.faces:
            x, y, s = region.box
            box_mask[y:y + s, x:x + s] = True
        vs_ideal = {}
        for name, target in (("restored", ideal), ("restored_lossless", ideal), ("restored_vs_original", u8),
                             ("restored_lossless_vs_original", u8)):
            mine = images[name.replace("_vs_original", "")]
            diff = np.abs(mine.astype(np.int16) - target.astype(np.int16))
            vs_ideal[name] = {"max": int(diff.max()), "mean_in_boxes": float(diff[box_mask].mean()),
                              "differing_pixels": int((diff.max(axis=-1) > 0).sum())}
        per_photo.append({"photo": path.name, "faces": len(faces.faces), "anonymize_calls": anon_calls,
                          "restore_calls": stats["model_calls"], "png_bytes": size, "png_bytes_lossless": size_ll,
                          "sealed_bytes_per_face": sealed, "restore_report": report,
                          "restore_report_lossless": report_ll,
                          "wrong_key_report": wrong_stats["verification"].message(),
                          "load_warnings": warn + warn_ll, "vs_ideal": vs_ideal,
                          "restored_latent_exact": bool(stats["verification"].exact)})
        for region in faces.faces:
            x, y, s = region.box
            # The original detection this crop was made from (same detector, same image).
            centre = lambda d: ((d.box[0] + d.box[2]) / 2, (d.box[1] + d.box[3]) / 2)
            idx = min(range(len(rec["detections"])), key=lambda i: (centre(rec["detections"][i])[0] - (x + s / 2)) ** 2
                      + (centre(rec["detections"][i])[1] - (y + s / 2)) ** 2)
            det, ref = rec["detections"][idx], rec["descriptors"][idx]
            row = {"photo": path.name, "face": region.index, "label": rec["label"], "crop_box": list(region.box)}
            for name in ("anonymized", "restored", "wrong_key", "restored_lossless"):
                row[name] = _probe(images[name], region.box, det.box, ref)
            window = lambda arr: arr[y:y + s, x:x + s]
            for name in ("anonymized", "restored", "restored_lossless"):
                row[f"psnr_{name}"] = psnr(window(images[name]), window(u8))
                row[f"ssim_{name}"] = ssim(window(images[name]), window(u8))
            row["psnr_ideal"] = psnr(window(ideal), window(u8))
            row["psnr_restored_vs_ideal"] = psnr(window(images["restored"]), window(ideal))
            faces_out.append(row)
        progress.update(1)

    def rate(name, field):
        values = [r[name][field] for r in faces_out]
        return sum(values) / len(values) if values else None

    def mean(values):
        values = [v for v in values if v is not None and np.isfinite(v)]
        return statistics.fmean(values) if values else None

    def tar(name):
        values = [r[name]["distance"] < THRESHOLD for r in faces_out]
        return sum(values) / len(values) if values else None

    summary = {"faces": len(faces_out), "photos": len(photos)}
    for name in ("anonymized", "restored", "restored_lossless", "wrong_key"):
        dists = [r[name]["distance"] for r in faces_out]
        summary[name] = {"mean_distance": mean(dists), "median_distance": statistics.median(dists) if dists else None,
                         "true_accept_rate": tar(name), "detection_rate": rate(name, "detected")}
    for name in ("anonymized", "restored", "restored_lossless", "ideal"):
        summary[f"psnr_{name}"] = mean([r[f"psnr_{name}"] for r in faces_out])
        summary[f"psnr_{name}_infinite"] = sum(1 for r in faces_out if r[f"psnr_{name}"] == float("inf"))
        if name != "ideal":
            summary[f"ssim_{name}"] = mean([r[f"ssim_{name}"] for r in faces_out])
    for name in ("restored", "restored_lossless", "restored_vs_original", "restored_lossless_vs_original"):
        summary[f"{name}_max_diff"] = max((p["vs_ideal"][name]["max"] for p in per_photo), default=None)
        summary[f"{name}_mean_diff_in_boxes"] = mean([p["vs_ideal"][name]["mean_in_boxes"] for p in per_photo])
    summary["latents_verified_exact"] = sum(p["restored_latent_exact"] for p in per_photo)
    summary["lossless_verified"] = sum("keyed digest verified" in p["restore_report_lossless"] for p in per_photo)
    summary["anonymize_calls_per_photo"] = mean([p["anonymize_calls"] for p in per_photo])
    summary["restore_calls_per_photo"] = mean([p["restore_calls"] for p in per_photo])
    summary["lossless_png_bytes_added_per_face"] = mean(
        [(p["png_bytes_lossless"] - p["png_bytes"]) / p["faces"] for p in per_photo])
    return {"model": models.name, "real_checkpoint": models.real, "folder": os.path.relpath(folder, REPO), "steps": steps, "mode": mode,
            "crop_size": crop_size, "coverage": coverage, "threshold": THRESHOLD, "recognizer_check": check, "summary": summary,
            "per_face": faces_out, "per_photo": per_photo}
