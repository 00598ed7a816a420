"""Face detection benchmark (issue 13 items 5 and 6): recall, precision and cost per detector mode, and big photos.

    .venv/bin/python benchmarks/detection.py [--quick] [--faces DIR] [--threads N] [--out DIR]

Sets (each image's true faces are known):
  shared   the photos of ../shared/faces, upright, against the number of faces in each (counted by eye);
  rotated  each photo turned 90 and 270 degrees (true boxes: the upright detection, turned);
  edge     each one-face photo cut so half the face width (left, right) or 60 % of its height (bottom) remains;
  small    a 12 MP scene (4000x3000, a photo background) holding faces 64, 80, 100 and 128 px wide;
  patch    obama_and_biden.jpg with a round patch drawn on the suits that main's detector took for a face.
Modes: main (the detector before this work: HOG at <= 1600 px, upsample 1, no edge or plausibility handling),
hog, auto, cnn (keyface_core.faces.detect_faces). Time per megapixel is over the shared photos.

Big photos: one face in a 12 MP photo vs the same face as a 512² crop, through the whole anonymize path (Face Mask,
Crop Faces, VAE Encode, Invert to Noise, Key Flip, Regenerate, VAE Decode, Paste Faces; tiny random model), on two
photos in the same run: the portrait obama.jpg upscaled to 12 MP (face ~930 px) and a real-scale 12 MP scene whose
face is ~100 px wide. And the mask IoU of the default (downscaled) detection against detection at full resolution.
Writes benchmarks/results/detection.md and detection.json.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

MODES = ("main", "hog", "auto", "cnn")
# Faces in each shared photo, counted by looking at it. obama_and_biden.jpg: a child at the lower right, head
# bowed, is the third.
TRUE_COUNTS = {"alex-lacamoire.png": 1, "alex-lacamoire2.jpg": 1, "biden.jpg": 1, "biden2.jpg": 1,
               "kit-harington.jpg": 1, "lin-manuel-miranda.png": 1, "obama.jpg": 1, "obama1.jpg": 1,
               "obama2.jpg": 1, "obama3.jpg": 1, "obama_and_biden.jpg": 3, "rose-leslie1.jpg": 1,
               "rose-leslie2.jpg": 1, "two_people.jpg": 2}
QUICK_PHOTOS = ("obama.jpg", "rose-leslie2.jpg", "two_people.jpg", "obama_and_biden.jpg")
SMALL_WIDTHS = (64, 80, 100, 128)


def main_detect(F, image: np.ndarray) -> list:
    """main's detector before issue 13: HOG on a copy capped at 1600 px, upsample 1, boxes clipped."""
    H, W = image.shape[:2]
    s = min(1.0, 1600 / max(H, W))
    small = image if s == 1.0 else np.asarray(Image.fromarray(image).resize((round(W * s), round(H * s)),
                                                                             Image.BILINEAR, reducing_gap=2.0))
    rects, _, _ = F._model("detector").run(np.ascontiguousarray(small), 1, 0.0)
    return [(max(0, r.left() / s), max(0, r.top() / s), min(W, (r.right() + 1) / s), min(H, (r.bottom() + 1) / s))
            for r in rects]


def clip(box, H, W):
    return (max(0, box[0]), max(0, box[1]), min(W, box[2]), min(H, box[3]))


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy
    return ix * iy / union if union > 0 else 0.0


def match(found: list, truth, H: int, W: int) -> tuple[int, int, int]:
    """(true positives, false positives, misses). truth: a list of boxes (matched by IoU >= 0.3 of the parts
    inside the frame, so a clipped box counts like one running off it) or a count (the shared photos)."""
    if isinstance(truth, int):
        tp = min(len(found), truth)
        return tp, len(found) - tp, truth - tp
    left = [clip(t, H, W) for t in truth]
    tp = 0
    for box in found:
        box = clip(box, H, W)
        best = max(range(len(left)), key=lambda i: iou(box, left[i]), default=None)
        if best is not None and iou(box, left[best]) >= 0.3:
            tp += 1
            left.pop(best)
    return tp, len(found) - tp, len(left)


def run_mode(F, mode: str, image: np.ndarray) -> tuple[list, float]:
    start = time.perf_counter()
    if mode == "main":
        boxes = main_detect(F, image)
    else:
        boxes = [d.box for d in F.detect_faces(image, detector=mode)]
    return boxes, time.perf_counter() - start


def turned_box(F, box, k: int, H: int, W: int):
    pts = np.array([F._rot_point(x, y, 90 * k, H, W) for x, y in ((box[0], box[1]), (box[2], box[3]))])
    return (*pts.min(axis=0), *pts.max(axis=0))


def scene(F, photos: dict, widths) -> tuple[np.ndarray, list]:
    """4000x3000 uint8: obama_and_biden's streamers (no faces) upscaled, with faces of these widths pasted."""
    canvas = Image.fromarray(photos["obama_and_biden.jpg"]).crop((0, 0, 700, 330)).resize((4000, 3000), Image.BICUBIC)
    sources = ["obama.jpg", "rose-leslie2.jpg", "biden2.jpg", "kit-harington.jpg"]
    truth = []
    for i, width in enumerate(widths):
        src = photos[sources[i % len(sources)]]
        (det,) = F.detect_faces(src)
        s = width / det.width
        pic = Image.fromarray(src).resize((round(src.shape[1] * s), round(src.shape[0] * s)), Image.LANCZOS)
        px, py = 300 + i * 950, 900 + (i % 2) * 900
        canvas.paste(pic, (px, py))
        truth.append(tuple(v * s + o for v, o in zip(det.box, (px, py, px, py))))
    return np.asarray(canvas), truth


def build_sets(F, scored: dict, photos: dict) -> dict:
    """{set: [(name, image, truth)]} for the scored photos (the scene and patch use `photos`); truth is a face
    count or a list of boxes."""
    sets = {"shared": [], "rotated": [], "edge": [], "small": [], "patch": []}
    for name, img in scored.items():
        sets["shared"].append((name, img, TRUE_COUNTS[name]))
        upright = [d.box for d in F.detect_faces(img, detector="auto")]
        H, W = img.shape[:2]
        for k in (1, 3):
            sets["rotated"].append((f"{name} turned {90 * k}°", np.ascontiguousarray(np.rot90(img, k)),
                                    [turned_box(F, b, k, H, W) for b in upright]))
        if TRUE_COUNTS[name] == 1 and len(upright) == 1:
            x0, y0, x1, y1 = upright[0]
            w, h = x1 - x0, y1 - y0
            cuts = {"left": (slice(None), slice(int(x0 + 0.5 * w), None), (-int(x0 + 0.5 * w), 0)),
                    "right": (slice(None), slice(None, int(x1 - 0.5 * w)), (0, 0)),
                    "bottom": (slice(None, int(y1 - 0.4 * h)), slice(None), (0, 0))}
            for side, (rows, cols, (dx, dy)) in cuts.items():
                part = np.ascontiguousarray(img[rows, cols])
                sets["edge"].append((f"{name} cut at the {side}", part, [(x0 + dx, y0 + dy, x1 + dx, y1 + dy)]))
    big, truth = scene(F, photos, SMALL_WIDTHS)
    sets["small"].append((f"12 MP scene, faces {', '.join(map(str, SMALL_WIDTHS))} px", big, truth))
    from keyface_dev.synthetic_faces import round_patch
    group = photos["obama_and_biden.jpg"]
    sets["patch"].append(("obama_and_biden.jpg + round patch", round_patch(group),
                          [d.box for d in F.detect_faces(group, detector="auto")]))
    return sets


def accuracy(F, sets: dict, progress, cnn_subset: tuple | None = None) -> dict:
    """Per set and mode: tp/fp/missed, recall, precision, seconds per MP. The CNN (slow on CPU) runs only on the
    images made from `cnn_subset` photos when given (and on the generated scene and patch)."""
    out = {}
    for set_name, items in sets.items():
        rows = {}
        for mode in MODES:
            tp = fp = fn = 0
            seconds, mp = 0.0, 0.0
            per_image = []
            for name, img, truth in items:
                if mode == "cnn" and cnn_subset is not None and not name.startswith(cnn_subset):
                    continue
                boxes, dt = run_mode(F, mode, img)
                a, b, c = match(boxes, truth, *img.shape[:2])
                tp, fp, fn = tp + a, fp + b, fn + c
                seconds += dt
                mp += img.shape[0] * img.shape[1] / 1e6
                per_image.append({"image": name, "found": len(boxes), "tp": a, "fp": b, "missed": c,
                                  "seconds": round(dt, 3)})
                progress(f"{set_name} {mode} {name}: {a} found, {b} false, {c} missed, {dt:.2f} s")
            rows[mode] = {"tp": tp, "fp": fp, "missed": fn, "recall": tp / max(1, tp + fn),
                          "precision": tp / max(1, tp + fp), "seconds": seconds, "megapixels": mp,
                          "s_per_mp": seconds / max(mp, 1e-9), "images": per_image}
        out[set_name] = rows
    return out


def mask_iou(F, det, ref, H: int, W: int) -> float:
    ox, oy = max(0, int(det.box[0]) - det.width), max(0, int(det.box[1]) - det.width)
    shape = (min(H, int(det.box[3]) + det.width) - oy, min(W, int(det.box[2]) + det.width) - ox)
    a = F.face_mask(det.landmarks - (ox, oy), shape) > 0.5
    b = F.face_mask(ref.landmarks - (ox, oy), shape) > 0.5
    return float((a & b).sum() / max(1, (a | b).sum()))


def big_photos(args, photos: dict, F, progress) -> dict:
    """12 MP vs 512² crop through the whole path (tiny model), both photos in one run; mask IoU vs full res."""
    import torch
    from kfbench import common, photo

    common.boot(args.threads)
    FN = common.pack("nodes.face_nodes")
    masks = common.pack("keyface_core.masks")
    PF = common.pack("keyface_core.faces")
    models = common.tiny_models()
    key = common.new_key()
    steps, reps = (3, 1) if args.quick else (8, 2)
    portrait = photo.upscale_to(common.FACES_DIR / "obama.jpg", 12.0)
    scene_u8, _ = scene(PF, photos, (100,))
    real = torch.from_numpy(scene_u8.astype(np.float32) / 255.0)[None]
    timed, timer = common.timed_clone(models.model)
    run_models = common.Models(models.name, timed, models.cond, models.vae)
    out = {"model": models.name, "steps": steps, "reps": reps, "crop_size": 512, "photos": {}}
    for label, big in (("portrait obama.jpg upscaled to 12 MP", portrait), ("12 MP scene, one face ~100 px", real)):
        _, faces = FN.detect(big, 512)
        region = faces.faces[0]
        small = masks.crop_square(big[0], region.box, 512)[None].contiguous()
        stages = {"photo": {}, "crop": {}}

        def run(kind, image):
            return lambda: photo.anonymize_photo(run_models, image, key, steps, "exact", 512, stages[kind])

        run("crop", small)()                   # warm-up
        stages["crop"].clear()
        timings = common.compare({"photo": run("photo", big), "crop": run("crop", small)}, reps, timer, None,
                                 warmup=False)
        ratio = timings["photo"].median / timings["crop"].median
        # Mask IoU: the default detection against detection at full resolution (scale 1).
        H, W = big.shape[1:3]
        found = PF.detect_faces(big[0])
        full_res = PF.detect_faces(big[0], min_face_px=56, max_pixels=H * W)
        ious = []
        for det in found:
            refs = [d for d in full_res if PF._iou(d.box, det.box) > 0.5]
            ious.append(mask_iou(PF, det, refs[0], H, W) if refs else 0.0)
        t0 = time.perf_counter()
        PF.detect_faces(big[0])
        t_big = time.perf_counter() - t0
        t0 = time.perf_counter()
        PF.detect_faces(small[0])
        t_small = time.perf_counter() - t0
        out["photos"][label] = {
            "size": [int(W), int(H)], "megapixels": H * W / 1e6, "face_px": int(found[0].width) if found else None,
            "crop_box_px": int(region.box[2]), "faces_found": len(faces.faces),
            "median_s": {"photo": timings["photo"].median, "crop": timings["crop"].median},
            "ratio": ratio, "detect_s": {"photo": t_big, "crop": t_small},
            "stages_mean_s": {k: {s: v / reps for s, v in st.items()} for k, st in stages.items()},
            "mask_iou_vs_full_resolution": ious}
        progress(f"{label}: ratio {ratio:.3f}, detect {t_big:.2f} s vs {t_small:.2f} s, mask IoU {ious}")
    # Every face >= 64 px in 12 MP: the small-face scene's masks against full resolution too.
    big_u8, truth = scene(PF, photos, SMALL_WIDTHS)
    found = PF.detect_faces(big_u8)
    full_res = PF.detect_faces(big_u8, min_face_px=56, max_pixels=big_u8.shape[0] * big_u8.shape[1])
    out["small_faces_mask_iou"] = {str(w): next((mask_iou(PF, d, r, *big_u8.shape[:2]) for d in found
                                                  for r in full_res if PF._iou(d.box, t) > 0.4 and
                                                  PF._iou(r.box, t) > 0.4), 0.0)
                                   for w, t in zip(SMALL_WIDTHS, truth)}
    return out


def report(res: dict) -> str:
    s = ["# Face detection: recall, precision, cost (issue 13 items 5 and 6)", "",
         f"Command: `{res['command']}`; {res['started']}; {res['machine']}; torch threads {res['threads']}. "
         "Boxes match a true face at IoU >= 0.3 (of the parts inside the frame); the shared photos are scored "
         "against the number of faces in each (counted by eye). `main` is the detector before this work (HOG at "
         "<= 1600 px, upsample 1, no edge or plausibility handling). Times include landmarks and checks.", ""]
    names = {"shared": "shared photos (upright)", "rotated": "turned 90° / 270°", "edge": "face cut by the edge",
             "small": "12 MP scene, small faces", "patch": "round non-face patch"}
    acc = res.get("accuracy", {})
    if acc:
        if res.get("cnn_photos", "all") != "all":
            s += [f"The CNN (slow on this CPU) ran on the images made from {', '.join(res['cnn_photos'])}, the scene "
                  "and the patch photo only; its cells give their count.", ""]
        s += accuracy_table(acc, names)
    big = res.get("big_photos")
    if big:
        s += big_table(big)
    s += ["Per image (found / false / missed, seconds) is in detection.json.", ""]
    return "\n".join(s)


def accuracy_table(acc: dict, names: dict) -> list:
    s = []
    s.append("| set | images | faces | " + " | ".join(f"{m}: recall / precision" for m in MODES) + " |")
    s.append("| --- | --- | --- | " + " | ".join("---" for _ in MODES) + " |")
    for set_name, rows in acc.items():
        first = rows[MODES[0]]

        def cell(r):
            sub = "" if len(r["images"]) == len(first["images"]) else f", {len(r['images'])} images"
            return f"{r['recall']:.2f} / {r['precision']:.2f} ({r['fp']} false{sub})"
        s.append(f"| {names[set_name]} | {len(first['images'])} | {first['tp'] + first['missed']} | "
                 + " | ".join(cell(rows[m]) for m in MODES) + " |")
    s += ["", "Time per megapixel on the shared photos (seconds per MP, whole call):", "",
          "| " + " | ".join(MODES) + " |", "| " + " | ".join("---" for _ in MODES) + " |",
          "| " + " | ".join(f"{acc['shared'][m]['s_per_mp']:.3f}" for m in MODES) + " |", ""]
    return s


def big_table(big: dict) -> list:
    s = []
    if big:
        s += [f"## One face in 12 MP vs the same face as a 512² crop ({big['model']}, {big['steps']} steps, "
              f"{big['reps']} reps, same run)", "",
              "| photo | size | face px | photo s | 512² crop s | ratio | detect: photo / crop s | mask IoU vs full res |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for label, p in big["photos"].items():
            s.append(f"| {label} | {p['size'][0]}x{p['size'][1]} | {p['face_px']} | {p['median_s']['photo']:.2f} | "
                     f"{p['median_s']['crop']:.2f} | **{p['ratio']:.3f}×** | {p['detect_s']['photo']:.2f} / "
                     f"{p['detect_s']['crop']:.2f} | {', '.join(f'{v:.3f}' for v in p['mask_iou_vs_full_resolution'])} |")
        s += ["", "Mean seconds per stage:", "", "| photo | stage | 12 MP | 512² crop |", "| --- | --- | --- | --- |"]
        for label, p in big["photos"].items():
            for stage in p["stages_mean_s"]["photo"]:
                s.append(f"| {label} | {stage} | {p['stages_mean_s']['photo'][stage]:.3f} | "
                         f"{p['stages_mean_s']['crop'].get(stage, 0.0):.3f} |")
        s += ["", "Small faces in the 12 MP scene, mask IoU of the default detection vs full resolution: "
              + ", ".join(f"{w} px: {v:.3f}" for w, v in big["small_faces_mask_iou"].items()) + ".", ""]
    return s


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"4 photos ({', '.join(QUICK_PHOTOS)}), 3 steps, 1 rep")
    parser.add_argument("--faces", metavar="DIR", help="folder of face photos (default: ../shared/faces)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--only", choices=("accuracy", "big"), help="run one part and merge it into the existing "
                        "detection.json (accuracy: recall/precision/time; big: 12 MP vs 512² and mask IoU)")
    parser.add_argument("--out", metavar="DIR", default=str(HERE / "results"), help="output folder")
    args = parser.parse_args(argv)
    if args.faces:
        os.environ["KEYFACE_FACES_DIR"] = str(Path(args.faces).resolve())
    from kfbench import common

    def progress(msg):
        print(msg, file=sys.stderr, flush=True)

    import keyface_core.faces as F
    names = QUICK_PHOTOS if args.quick else tuple(sorted(TRUE_COUNTS))
    photos = {n: np.asarray(Image.open(common.FACES_DIR / n).convert("RGB")) for n in names
              if (common.FACES_DIR / n).is_file()}
    for needed in ("obama.jpg", "obama_and_biden.jpg", "rose-leslie2.jpg", "biden2.jpg", "kit-harington.jpg"):
        if needed not in photos and (common.FACES_DIR / needed).is_file():
            photos.setdefault(needed, np.asarray(Image.open(common.FACES_DIR / needed).convert("RGB")))
    scored = {n: p for n, p in photos.items() if n in names}
    import platform
    res = {"command": "python benchmarks/detection.py" + ("".join(f" {a}" for a in (argv or sys.argv[1:]))),
           "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
           "machine": f"{platform.machine()} {os.cpu_count()} CPUs", "threads": args.threads,
           "faces_dir": os.path.relpath(common.FACES_DIR, HERE.parent), "photos": sorted(scored)}
    import torch
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.only and (out / "detection.json").is_file():
        previous = json.loads((out / "detection.json").read_text())
        res = {**previous, "command": previous["command"] + "; then " + res["command"],
               **{k: v for k, v in res.items() if k not in ("command", "started", "photos")}}
    if args.only in (None, "accuracy"):
        subset = None if args.quick else QUICK_PHOTOS + ("12 MP scene", "obama_and_biden.jpg + round patch")
        res["cnn_photos"] = "all" if subset is None else list(QUICK_PHOTOS)
        res["accuracy"] = accuracy(F, build_sets(F, scored, photos), progress, subset)
        res["photos"] = sorted(scored)
        (out / "detection.json").write_text(json.dumps(res, indent=1, default=float))
    if args.only in (None, "big"):
        res["big_photos"] = big_photos(args, photos, F, progress)
    (out / "detection.json").write_text(json.dumps(res, indent=1, default=float))
    (out / "detection.md").write_text(report(res))
    print(report(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
