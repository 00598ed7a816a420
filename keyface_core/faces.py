"""Face detection, 68-point landmarks, face masks at three coverage levels and identity descriptors (dlib, lazy).

Detection (``detect_faces``) works on a downscaled luminance copy of the photo, made from the full-precision
pixels (8-bit only after downscaling), at the scale where the smallest face asked for is just detectable;
boxes and landmarks are then refined on the full-resolution region around each face, so a 12 MP photo costs
about what its faces cost. Detectors:

* ``hog``: dlib's HOG + linear SVM frontal detector (fast; finds faces from ~55 px at detection scale);
* ``cnn``: dlib's MMOD CNN (``mmod_human_face_detector.dat`` from face_recognition_models; more poses, slow on
  CPU, run on a copy capped at ``cnn_max_pixels``);
* ``auto``: HOG; when it finds nothing, HOG on the photo turned 90° and 270°; then the CNN.

Faces cut by the photo's edge are found on a reflect-padded copy (a face is nearly mirror-symmetric), and
their boxes and masks may run past the frame. Every candidate must pass a plausibility check built on its
landmarks: the face geometry (eyes above nose above mouth above chin, sane proportions), and, unless the
detector is confident, the CNN confirming a face in the landmark-aligned chip (a HOG hit on a round patch of
clothing has face-shaped landmarks, because the landmark model always returns a face shape, but no face
in its aligned chip).
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .errors import InputMismatchError, KeyFaceError

_INSTALL_HINT = "Install them with: pip install dlib-bin face_recognition_models"
_MODEL_FILES = {
    "shape68": "shape_predictor_68_face_landmarks.dat",
    "descriptor": "dlib_face_recognition_resnet_model_v1.dat",
    "cnn": "mmod_human_face_detector.dat",
}
_REQUIRED = ("shape_predictor_68_face_landmarks.dat", "dlib_face_recognition_resnet_model_v1.dat")
_models: dict = {}  # filled on first use, so importing this module stays cheap

DETECTORS = ("auto", "hog", "cnn")
COVERAGES = ("face", "face+ears+neck", "head")
ROTATIONS = (0, 90, 270)

# Smallest face box (pixels, at detection scale) dlib's HOG window still scores above 0: measured 55 px
# (score 0.5). The CNN (upsample 0) finds faces from 70 px HOG-box width and misses them at 60 px (measured
# on three of the shared photos), so its copy is scaled for 75 px.
_HOG_MIN_BOX = 56.0
_CNN_MIN_BOX = 75.0
# Faces the detection looks for by default: at least this many pixels, or 1/64 of the long side if larger
# (so a 12 MP photo is searched for faces >= 62 px), never smaller than 32 px.
_AUTO_MIN_FACE = (32.0, 64.0, 64.0)
DEFAULT_MAX_PIXELS = 12e6  # the detection copy never exceeds this (bounds time and memory)
DEFAULT_CNN_MAX_PIXELS = 0.5e6
# HOG scores at or above this are accepted on geometry alone; below, the CNN must confirm the aligned chip.
CONFIDENT_HOG_SCORE = 1.0
_EDGE_PASS_PIXELS = 0.3e6  # the reflect-padded pass for faces cut by the edge runs on a copy this large
_EDGE_PAD = 0.25  # padding on each side, as a fraction of the shorter side


def models_dir() -> Path:
    """Folder holding the dlib model files shipped by the face_recognition_models package."""
    # find_spec, not import: the package's __init__ needs pkg_resources, gone from new setuptools.
    spec = importlib.util.find_spec("face_recognition_models")
    if importlib.util.find_spec("dlib") is None or spec is None or not spec.submodule_search_locations:
        raise KeyFaceError(f"Face detection needs dlib and the face_recognition_models files. {_INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    missing = [name for name in _REQUIRED if not (folder / name).is_file()]
    if missing:
        raise KeyFaceError(f"Model files {missing} are missing from {folder}. {_INSTALL_HINT}")
    return folder


def _dlib():
    """Import dlib on first use, with an install hint when it is missing."""
    try:
        import dlib
    except ImportError as err:
        raise KeyFaceError(f"Face detection needs dlib ({err}). {_INSTALL_HINT}") from err
    return dlib


def _model(name: str):
    """Load (once) and return 'detector', 'shape68', 'descriptor' or 'cnn'."""
    if name not in _models:
        dlib = _dlib()
        if name == "detector":
            _models[name] = dlib.get_frontal_face_detector()
        elif name == "cnn":
            path = models_dir() / _MODEL_FILES["cnn"]
            if not path.is_file():
                raise KeyFaceError(f"The CNN face detector needs {path.name}, missing from {path.parent}. "
                                   f"{_INSTALL_HINT} (version 0.3.0 ships it), or use the 'hog' detector.")
            _models[name] = dlib.cnn_face_detection_model_v1(str(path))
        elif name == "shape68":
            _models[name] = dlib.shape_predictor(str(models_dir() / _MODEL_FILES[name]))
        else:
            _models[name] = dlib.face_recognition_model_v1(str(models_dir() / _MODEL_FILES[name]))
    return _models[name]


@dataclass(frozen=True)
class FaceDetection:
    """One face: box (x0, y0, x1, y1) and 68 landmarks (x, y), both in full-image pixels.

    The box and landmarks of a face cut by the photo's edge run past the frame (negative or beyond W/H).
    `detector` is "hog" or "cnn", `rotation` the quarter turn (0, 90, 270, counter-clockwise) the photo needed
    for the face to be upright, `verified` how the plausibility check accepted it ("score" or "cnn")."""

    box: tuple
    landmarks: np.ndarray
    score: float
    detector: str = "hog"
    rotation: int = 0
    verified: str = ""

    @property
    def width(self) -> int:
        return int(self.box[2] - self.box[0])


# ---------------------------------------------------------------------------------------- the source image

class _Source:
    """The photo as given (uint8 array or float tensor, never converted whole): downscaled copies and regions."""

    def __init__(self, image):
        import torch

        if isinstance(image, torch.Tensor):
            ok = image.ndim == 3 and image.shape[2] in (1, 3, 4) and image.is_floating_point()
            got = f"{image.dtype} {tuple(image.shape)}"
            self.t = image[..., :3] if ok and image.shape[2] == 4 else image
            self.unit = 1.0
        else:
            ok = isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
            got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            if ok:
                with warnings.catch_warnings():  # read-only arrays (np.asarray of a PIL image) are only read
                    warnings.simplefilter("ignore", UserWarning)
                    self.t = torch.from_numpy(np.ascontiguousarray(image))
            self.unit = 1.0 / 255.0
        if not ok:
            raise InputMismatchError(
                f"Face detection takes an RGB uint8 array [H,W,3] or a float image tensor [H,W,C] in 0..1; got {got}. "
                "For a ComfyUI IMAGE pass image[0]."
            )
        if self.t.shape[2] == 1:
            self.t = self.t.expand(*self.t.shape[:2], 3)
        self.H, self.W = int(self.t.shape[0]), int(self.t.shape[1])
        self._copies: dict = {}

    def gray(self, scale: float, rgb: bool = False) -> np.ndarray:
        """uint8 luminance (or RGB) copy at `scale`: resized in float, rounded to 8 bits only afterwards."""
        key = (round(scale, 6), rgb)
        if key in self._copies:
            return self._copies[key]
        h, w = max(1, round(self.H * scale)), max(1, round(self.W * scale))
        larger = [k for k in self._copies if k[1] == rgb and k[0] > scale]
        if larger:
            # A smaller copy from a larger one already made: cheap, and as good for a detector.
            base = Image.fromarray(self._copies[min(larger)])
            out = np.asarray(base.resize((w, h), Image.BILINEAR, reducing_gap=2.0))
        elif self.unit != 1.0:
            base = Image.fromarray(self.t.numpy())
            base = base if rgb else base.convert("L")
            out = np.asarray(base if (h, w) == (self.H, self.W) else base.resize((w, h), Image.BILINEAR, reducing_gap=2.0))
        else:
            out = self._float_copy(h, w, scale, rgb)
        self._copies[key] = np.ascontiguousarray(out)
        return self._copies[key]

    def _float_copy(self, h: int, w: int, scale: float, rgb: bool) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        t = self.t.to(torch.float32)
        if rgb:
            x = t.permute(2, 0, 1)[None] * 255.0
        else:
            # ITU-R 601 luma (Pillow's convert("L")), one matrix product; resizing is linear, so luma first is exact.
            weights = torch.tensor([0.299 * 255.0, 0.587 * 255.0, 0.114 * 255.0], dtype=torch.float32)
            x = (t.reshape(-1, 3) @ weights).reshape(1, 1, self.H, self.W)
        if (h, w) != (self.H, self.W):
            # Mild scales: plain bilinear (aliasing is negligible and it is 4x faster); strong ones: area average.
            if scale >= 0.75:
                x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
            else:
                x = F.interpolate(x, size=(h, w), mode="area")
        x = x[0].add_(0.5).clamp_(0, 255).to(torch.uint8)  # round half up, after downscaling
        return (x.permute(1, 2, 0) if rgb else x[0]).numpy()

    def region(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """uint8 RGB pixels of [y0:y1, x0:x1], reflect-padded where the window leaves the photo."""
        import torch

        cx0, cy0, cx1, cy1 = max(0, x0), max(0, y0), min(self.W, x1), min(self.H, y1)
        if cx1 <= cx0 or cy1 <= cy0:
            return np.zeros((max(1, y1 - y0), max(1, x1 - x0), 3), np.uint8)
        part = self.t[cy0:cy1, cx0:cx1]
        if self.unit == 1.0:
            part = torch.round(part.to(torch.float32) * 255.0).clamp_(0, 255).to(torch.uint8)
        arr = part.numpy()
        pad = ((cy0 - y0, y1 - cy1), (cx0 - x0, x1 - cx1), (0, 0))
        if any(p for pair in pad for p in pair):
            arr = _reflect_pad(arr, pad)
        return np.ascontiguousarray(arr)


def _reflect_pad(arr: np.ndarray, pad) -> np.ndarray:
    """np.pad 'reflect' that also works when the padding is wider than the array (repeats the reflection)."""
    while any(p > s - 1 for p, s in zip((pad[0][0], pad[0][1], pad[1][0], pad[1][1]),
                                         (arr.shape[0],) * 2 + (arr.shape[1],) * 2)):
        step = [(min(a, max(arr.shape[i] - 1, 0)), min(b, max(arr.shape[i] - 1, 0))) for i, (a, b) in enumerate(pad[:2])]
        if not any(a or b for a, b in step):
            return np.pad(arr, pad, mode="edge")
        arr = np.pad(arr, (*step, (0, 0))[: arr.ndim], mode="reflect")
        pad = tuple((a - sa, b - sb) for (a, b), (sa, sb) in zip(pad[:2], step)) + tuple(pad[2:])
    return np.pad(arr, pad[: arr.ndim], mode="reflect")


# ------------------------------------------------------------------------------------------- geometry helpers

def _rot_point(x, y, rotation: int, h: int, w: int):
    """Map (x, y) of an image of size (h, w) to its np.rot90(k=rotation/90) (counter-clockwise) version."""
    if rotation == 0:
        return x, y
    if rotation == 90:
        return y, w - x
    if rotation == 180:
        return w - x, h - y
    return h - y, x  # 270


def _unrot_points(pts: np.ndarray, rotation: int, h: int, w: int) -> np.ndarray:
    """Inverse of _rot_point for an Nx2 array (h, w = size of the *unrotated* image)."""
    x, y = pts[:, 0], pts[:, 1]
    if rotation == 0:
        return pts
    if rotation == 90:
        return np.stack([w - y, x], axis=1)
    if rotation == 180:
        return np.stack([w - x, h - y], axis=1)
    return np.stack([y, h - x], axis=1)


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _overlaps(a, b) -> bool:
    """Same face: boxes overlapping by IoU > 0.35, or the smaller one mostly inside the larger."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    small = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return _iou(a, b) > 0.35 or (small > 0 and ix * iy / small > 0.6)


def _visible(box, H: int, W: int) -> float:
    x0, y0, x1, y1 = box
    inside = max(0.0, min(x1, W) - max(x0, 0)) * max(0.0, min(y1, H) - max(y0, 0))
    area = (x1 - x0) * (y1 - y0)
    return inside / area if area > 0 else 0.0


def smallest_face(H: int, W: int, min_face_px: int = 0) -> float:
    """The smallest face (box width, pixels) detection looks for: min_face_px, or the automatic size."""
    if min_face_px and min_face_px > 0:
        return float(min_face_px)
    lo, share, hi = _AUTO_MIN_FACE
    return float(min(hi, max(lo, max(H, W) / share)))


def detection_scale(H: int, W: int, min_face_px: int = 0, max_pixels: float = DEFAULT_MAX_PIXELS,
                    min_box: float = _HOG_MIN_BOX) -> float:
    """Scale of the detection copy: the smallest face becomes just detectable, within max_pixels and 2x."""
    scale = min(2.0, min_box / smallest_face(H, W, min_face_px))
    return float(min(scale, math.sqrt(max_pixels / max(1, H * W))))


# ------------------------------------------------------------------------------------------------ detection

@dataclass(frozen=True)
class _Candidate:
    box: tuple  # full-image pixels (float), may run past the frame
    score: float
    detector: str
    rotation: int


def _hog_boxes(gray: np.ndarray, threshold: float) -> list:
    rects, scores, _ = _model("detector").run(gray, 0, float(threshold))
    return [((r.left(), r.top(), r.right() + 1, r.bottom() + 1), float(s)) for r, s in zip(rects, scores)]


def _cnn_boxes(rgb: np.ndarray, threshold: float) -> list:
    out = []
    for d in _model("cnn")(rgb, 0):
        if d.confidence >= threshold:
            r = d.rect
            out.append(((r.left(), r.top(), r.right() + 1, r.bottom() + 1), float(d.confidence)))
    return out


def _scan(src: _Source, detector: str, scale: float, rotation: int, threshold: float, pad: float = 0.0) -> list:
    """Candidates from one detector on one (optionally rotated, reflect-padded) copy at `scale`."""
    img = src.gray(scale, rgb=(detector == "cnn"))
    h, w = img.shape[:2]
    p = int(round(pad * min(h, w)))
    if p:
        img = _reflect_pad(img, ((p, p), (p, p), (0, 0))[: img.ndim])
    if rotation:
        img = np.ascontiguousarray(np.rot90(img, k=rotation // 90))
    boxes = (_cnn_boxes if detector == "cnn" else _hog_boxes)(img, threshold)
    hp, wp = h + 2 * p, w + 2 * p
    found = []
    for (x0, y0, x1, y1), score in boxes:
        corners = _unrot_points(np.array([[x0, y0], [x1, y1]], dtype=np.float64), rotation, hp, wp) - p
        bx0, by0 = corners.min(axis=0) / scale
        bx1, by1 = corners.max(axis=0) / scale
        found.append(_Candidate((bx0, by0, bx1, by1), score, detector, rotation))
    return found


def _merge(cands: list, H: int, W: int) -> list:
    """Drop mirror twins in the padding (< 30 % inside the photo) and duplicates (keep the higher score)."""
    kept = []
    for c in sorted(cands, key=lambda c: -c.score):
        if _visible(c.box, H, W) < 0.3:
            continue
        if not any(_overlaps(c.box, k.box) for k in kept):
            kept.append(c)
    return kept


def _hog_candidates(src: _Source, scale: float, threshold: float, rotation: int, edges: bool) -> list:
    cands = []
    small = scale * scale * src.H * src.W <= _EDGE_PASS_PIXELS
    if not (edges and small):
        cands += _scan(src, "hog", scale, rotation, threshold)
    if edges:
        # Faces cut by the frame: a reflect-padded copy (the mirror completes a half face); on big photos a
        # coarser copy, so it costs a fraction of the main pass.
        edge_scale = min(scale, math.sqrt(_EDGE_PASS_PIXELS / max(1, src.H * src.W)))
        cands += _scan(src, "hog", edge_scale, rotation, threshold, pad=_EDGE_PAD)
    return cands


def _cnn_candidates(src: _Source, min_face_px: int, threshold: float, rotation: int, cnn_max_pixels: float,
                    edges: bool) -> list:
    scale = detection_scale(src.H, src.W, min_face_px, cnn_max_pixels, _CNN_MIN_BOX)
    return _scan(src, "cnn", scale, rotation, threshold, pad=0.15 if edges else 0.0)


# ----------------------------------------------------------------------------------- refinement, plausibility

# Index permutation that maps the 68 landmarks of a face to those of its mirror image.
_MIRROR = (list(range(16, -1, -1)) + list(range(26, 16, -1)) + [27, 28, 29, 30] + [35, 34, 33, 32, 31]
           + [45, 44, 43, 42, 47, 46] + [39, 38, 37, 36, 41, 40] + [54, 53, 52, 51, 50, 49, 48]
           + [59, 58, 57, 56, 55] + [64, 63, 62, 61, 60] + [67, 66, 65])


def _upright_region(src: _Source, box, rotation: int, margin: float = 0.6):
    """(uint8 RGB region around box with the face upright, its box in region pixels, map region->image)."""
    x0, y0, x1, y1 = box
    m = margin * max(x1 - x0, y1 - y0)
    rx0, ry0, rx1, ry1 = (int(math.floor(x0 - m)), int(math.floor(y0 - m)), int(math.ceil(x1 + m)), int(math.ceil(y1 + m)))
    region = src.region(rx0, ry0, rx1, ry1)
    h, w = region.shape[:2]
    if rotation:
        region = np.ascontiguousarray(np.rot90(region, k=rotation // 90))
    corners = np.array([[x0 - rx0, y0 - ry0], [x1 - rx0, y1 - ry0]], dtype=np.float64)
    rot = np.array([_rot_point(px, py, rotation, h, w) for px, py in corners])
    local = (*rot.min(axis=0), *rot.max(axis=0))

    def to_image(pts: np.ndarray) -> np.ndarray:
        return _unrot_points(np.asarray(pts, dtype=np.float64), rotation, h, w) + (rx0, ry0)

    return region, local, to_image


def _refine_box(region: np.ndarray, local, threshold: float):
    """A HOG box fitted on the region at a scale where the face is ~160 px (the detection copy's box is coarse)."""
    bw = local[2] - local[0]
    f = min(1.0, 160.0 / max(bw, 1.0))
    small = region if f == 1.0 else np.asarray(Image.fromarray(region).resize(
        (max(1, round(region.shape[1] * f)), max(1, round(region.shape[0] * f))), Image.BILINEAR, reducing_gap=2.0))
    gray = np.ascontiguousarray(np.asarray(Image.fromarray(small).convert("L")))
    best, best_iou, best_score = None, 0.3, None
    for (x0, y0, x1, y1), score in _hog_boxes(gray, min(threshold, 0.0) - 0.5):
        b = (x0 / f, y0 / f, x1 / f, y1 / f)
        iou = _iou(b, local)
        if iou > best_iou:
            best, best_iou, best_score = b, iou, score
    return best, best_score


def _fit_landmarks(region: np.ndarray, box) -> np.ndarray:
    dlib = _dlib()
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    shape = _model("shape68")(region, dlib.rectangle(x0, y0, max(x0 + 1, x1 - 1), max(y0 + 1, y1 - 1)))
    return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)


def landmark_geometry_ok(landmarks: np.ndarray) -> bool:
    """Eyes above nose above mouth above chin (along the face's own up axis), and human proportions."""
    lm = np.asarray(landmarks, dtype=np.float64)
    eyes_l, eyes_r = lm[36:42].mean(axis=0), lm[42:48].mean(axis=0)
    eyes, nose, mouth, chin = (eyes_l + eyes_r) / 2, lm[30], lm[48:68].mean(axis=0), lm[8]
    jaw = float(np.linalg.norm(lm[16] - lm[0]))
    up = eyes - chin
    height = float(np.linalg.norm(up))
    if jaw < 1e-6 or height < 1e-6:
        return False
    u = up / height
    order = [float(p @ u) for p in (eyes, nose, mouth, chin)]
    iod = float(np.linalg.norm(eyes_r - eyes_l))
    # Measured on the shared photos: iod/jaw 0.38-0.48, height/jaw 0.66-0.95.
    return order[0] > order[1] > order[2] > order[3] and 0.25 <= iod / jaw <= 0.65 and 0.45 <= height / jaw <= 1.4


def _cnn_confirms(region: np.ndarray, landmarks_local: np.ndarray) -> bool:
    """The CNN finds a face in the chip aligned by these landmarks (independent of the HOG window)."""
    dlib = _dlib()
    x0, y0 = landmarks_local.min(axis=0)
    x1, y1 = landmarks_local.max(axis=0)
    points = [dlib.point(int(round(px)), int(round(py))) for px, py in landmarks_local]
    shape = dlib.full_object_detection(dlib.rectangle(int(x0), int(y0), int(x1), int(y1)), points)
    chip = dlib.get_face_chip(region, shape, size=150, padding=0.5)  # 150: real faces score 0.7+, patches nothing
    return len(_model("cnn")(chip, 0)) > 0


def _finish(src: _Source, cand: _Candidate, threshold: float, check: bool) -> FaceDetection | None:
    """Refine the box and fit landmarks on the full-resolution region; None if the plausibility check fails."""
    region, local, to_image = _upright_region(src, cand.box, cand.rotation)
    refined, refined_score = _refine_box(region, local, threshold)
    box = refined if refined is not None else local
    lm_local = _fit_landmarks(region, box)
    verified = ""
    if check:
        if not landmark_geometry_ok(lm_local):
            return None
        confident = cand.detector == "cnn" or max(cand.score, refined_score if refined_score is not None else -9) \
            >= CONFIDENT_HOG_SCORE
        if confident:
            verified = "score"
        elif _cnn_available() and _cnn_confirms(region, lm_local):
            verified = "cnn"
        else:
            return None
    corners = to_image(np.array([[box[0], box[1]], [box[2], box[3]]]))
    x0, y0 = corners.min(axis=0)
    x1, y1 = corners.max(axis=0)
    landmarks = to_image(lm_local).astype(np.float32)
    return FaceDetection(box=(int(round(x0)), int(round(y0)), int(round(x1)), int(round(y1))), landmarks=landmarks,
                         score=float(cand.score), detector=cand.detector, rotation=int(cand.rotation),
                         verified=verified)


def _cnn_available() -> bool:
    try:
        return (models_dir() / _MODEL_FILES["cnn"]).is_file()
    except KeyFaceError:
        return False


def detect_faces(image, detector: str = "hog", min_face_px: int = 0, threshold: float = 0.0,
                 max_pixels: float = DEFAULT_MAX_PIXELS, cnn_max_pixels: float = DEFAULT_CNN_MAX_PIXELS,
                 check: bool = True, edges: bool = True, max_side: int | None = None) -> list:
    """Find faces; return FaceDetections sorted left-to-right, then top.

    image: uint8 RGB array [H,W,3], or a float tensor [H,W,C] in 0..1 (a ComfyUI IMAGE item; never converted
    whole). min_face_px: the smallest face (box width) to look for and keep; 0 = automatic (>= 32 px, and
    >= 1/64 of the long side up to 64 px). threshold: detector score a face must reach (0 = dlib's default;
    lower finds more, higher only sure faces). check: reject candidates failing the landmark plausibility
    check. edges: also find faces cut by the photo's edge. max_side: cap the detection copy's long side.
    """
    if detector not in DETECTORS:
        raise InputMismatchError(f"unknown face detector '{detector}'; choose one of {', '.join(DETECTORS)}.")
    src = _Source(image)
    H, W = src.H, src.W
    if max_side:
        max_pixels = min(max_pixels, (max_side * max_side) * min(H, W) / max(H, W))
    scale = detection_scale(H, W, min_face_px, max_pixels)

    def attempt(rotation: int, use: str) -> list:
        if use == "cnn":
            cands = _cnn_candidates(src, min_face_px, threshold, rotation, cnn_max_pixels, edges)
        else:
            cands = _hog_candidates(src, scale, threshold, rotation, edges)
        out = []
        for cand in _merge(cands, H, W):
            det = _finish(src, cand, threshold, check)
            if det is not None and det.width >= min_face_px and not any(_overlaps(det.box, o.box) for o in out):
                out.append(det)
        return out

    if detector == "hog":
        found = attempt(0, "hog")
    elif detector == "cnn":
        found = attempt(0, "cnn")
    else:
        # HOG upright, then HOG turned 90/270 (cheap, and its landmarks are fitted upright), then the CNN.
        found = attempt(0, "hog")
        for rotation in (90, 270):
            if found:
                break
            found = attempt(rotation, "hog")
        if not found and _cnn_available():
            found = attempt(0, "cnn")
    return sorted(found, key=lambda f: (f.box[0], f.box[1]))


def select_faces(found: list, which: str) -> list[int]:
    """Indices (into `found`, numbered as the preview shows them) of the faces to anonymize.

    which: "all"; "largest N" (the N widest faces); or a list of numbers such as "0, 2" or "1-3"."""
    text = (which or "all").strip().lower()
    if text in ("", "all", "*"):
        return list(range(len(found)))
    if text.startswith("largest"):
        rest = text[len("largest"):].strip() or "1"
        if not rest.isdigit() or int(rest) < 1:
            raise InputMismatchError(f"faces '{which}' is not understood; write 'largest N' with N >= 1, e.g. 'largest 2'.")
        order = sorted(range(len(found)), key=lambda i: -found[i].width)[: int(rest)]
        return sorted(order)
    chosen = set()
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        if not lo.strip().isdigit() or (hi and not hi.strip().isdigit()):
            raise InputMismatchError(f"faces '{which}' is not understood; write 'all', 'largest N', or face numbers "
                                     "from the preview such as '0, 2' or '1-3'.")
        a, b = int(lo), int(hi) if hi else int(lo)
        chosen.update(range(min(a, b), max(a, b) + 1))
    missing = sorted(i for i in chosen if i >= len(found))
    if missing:
        raise InputMismatchError(f"faces '{which}' names face(s) {missing}, but only {len(found)} were found "
                                 f"(numbered 0 to {len(found) - 1} in the preview).")
    return sorted(chosen)


# ------------------------------------------------------------------------------------------------------ masks

def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Convex hull (Andrew's monotone chain) of Nx2 points, counter-clockwise."""
    pts = sorted(map(tuple, points.tolist()))

    def turns_left(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0]) > 0

    def half(seq):
        out = []
        for p in seq:
            while len(out) >= 2 and not turns_left(out[-2], out[-1], p):
                out.pop()
            out.append(p)
        return out[:-1]

    return np.array(half(pts) + half(pts[::-1]), dtype=np.float64)


def _frame(lm: np.ndarray):
    """The face's own axes: unit up (chin to brows), unit right, face height and jaw width."""
    up = lm[17:27].mean(axis=0) - lm[8]
    height = float(np.linalg.norm(up)) or 1.0
    u = up / height
    r = np.array([-u[1], u[0]])
    if float((lm[16] - lm[0]) @ r) < 0:  # right = from jaw point 0 to 16 (the image's left-to-right for a frontal face)
        r = -r
    width = float(np.linalg.norm(lm[16] - lm[0])) or height
    return u, r, height, width


def _grow(poly: np.ndarray, by: float) -> np.ndarray:
    centre = poly.mean(axis=0)
    away = poly - centre
    dist = np.linalg.norm(away, axis=1, keepdims=True)
    return poly + away / np.maximum(dist, 1e-6) * by


def _ellipse(centre, u, r, half_up: float, half_right: float, n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return centre + np.outer(np.cos(t) * half_right, r) + np.outer(np.sin(t) * half_up, u)


def _face_polygon(landmarks: np.ndarray, forehead: float, grow: float) -> np.ndarray:
    """Face-skin outline in the landmarks' coordinates: jaw + brows raised to cover the forehead."""
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (68, 2):
        raise InputMismatchError(f"Expected 68 (x, y) landmarks, got shape {lm.shape}; use detect_faces' output.")
    jaw, brows = lm[0:17], lm[17:27]
    # "Up" follows the face (chin to brows), so tilted heads get their forehead in the right place.
    up = brows.mean(axis=0) - lm[8]
    height = float(np.linalg.norm(up)) or 1.0
    raised = brows + up / height * (forehead * height)
    hull = _convex_hull(np.vstack([jaw, raised]))
    # Grow outward from the centre by a fraction of the face size, to cover skin just past the landmarks.
    size = max(height, float(np.linalg.norm(jaw[16] - jaw[0])))
    return _grow(hull, grow * size)


def coverage_polygons(landmarks: np.ndarray, coverage: str = "face", forehead: float = 0.35,
                      grow: float = 0.05) -> list[np.ndarray]:
    """Polygons whose union is the mask at a coverage level, built from the 68 landmarks and head geometry.

    face: jaw + raised brows (the face oval). face+ears+neck: plus an ear on each side and the neck down to about
    0.7 face heights below the chin (what the paper's face parser keeps). head: plus the skull and hair, an
    ellipse reaching about one face height above the brows and 0.2 jaw widths past each cheek."""
    if coverage not in COVERAGES:
        raise InputMismatchError(f"unknown coverage '{coverage}'; choose one of {', '.join(COVERAGES)}.")
    face = _face_polygon(landmarks, forehead, grow)
    if coverage == "face":
        return [face]
    lm = np.asarray(landmarks, dtype=np.float64)
    u, r, height, width = _frame(lm)
    polys = [face]
    # Ears: beside the jaw between brow and nose-tip level, ~0.35 face heights tall.
    ear_level = (lm[27] + lm[30]) / 2
    for side, jaw_pt in ((-1, lm[1]), (1, lm[15])):
        along = float((jaw_pt - ear_level) @ r)
        centre = ear_level + r * along + r * side * 0.07 * width + u * 0.05 * height
        polys.append(_ellipse(centre, u, r, 0.32 * height, 0.12 * width))
    # Neck: from the lower jaw down, slightly narrower than the jaw.
    top_l, top_r = lm[3], lm[13]
    drop = 0.75 * height
    inward = 0.08 * width
    polys.append(_convex_hull(np.vstack([top_l, lm[5], lm[8], lm[11], top_r,
                                         top_r - u * drop - r * inward, top_l - u * drop + r * inward])))
    if coverage == "head":
        chin, brows = lm[8], lm[17:27].mean(axis=0)
        top = brows + u * 1.0 * height
        centre = (chin + top) / 2 - u * 0.02 * height + r * float((lm[27] - (chin + top) / 2) @ r)
        polys.append(_ellipse(centre, u, r, float(np.linalg.norm(top - chin)) / 2 * 1.02, 0.5 * width + 0.2 * width))
    return polys


def _rasterize(polygons, height: int, width: int) -> np.ndarray:
    canvas = Image.new("L", (int(width), int(height)), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in polygons if isinstance(polygons, (list, tuple)) else [polygons]:
        draw.polygon([tuple(p) for p in polygon.tolist()], fill=1, outline=1)
    return np.asarray(canvas, dtype=np.float32)


def coverage_bounds(landmarks: np.ndarray, coverage: str = "face") -> tuple:
    """(x0, y0, x1, y1) bounding the mask at this coverage level, in the landmarks' coordinates."""
    pts = np.vstack(coverage_polygons(landmarks, coverage))
    return (*pts.min(axis=0).tolist(), *pts.max(axis=0).tolist())


def crop_box(detection: FaceDetection, image_hw, context: float = 2.0, coverage: str = "face") -> tuple:
    """The square crop (x, y, size) a face is anonymized in: `context` x the face box, grown (never shrunk) to hold
    the whole coverage mask. The nodes and the command line both call this, so their crops agree."""
    from .masks import square_crop_box
    if coverage == "face":
        return square_crop_box(detection.box, image_hw, context)
    bx0, by0, bx1, by1 = coverage_bounds(detection.landmarks, coverage)
    x0, y0, x1, y1 = detection.box
    ux0, uy0, ux1, uy1 = min(bx0, x0), min(by0, y0), max(bx1, x1), max(by1, y1)
    # The mask's extent plus 15 % for the feathered edge, or the usual context around the face box.
    side = max(context * max(x1 - x0, y1 - y0), 1.15 * max(ux1 - ux0, uy1 - uy0))
    cx, cy = (ux0 + ux1) / 2, (uy0 + uy1) / 2
    return square_crop_box((cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2), image_hw, 1.0)


def face_mask(landmarks: np.ndarray, image_hw, forehead: float = 0.35, grow: float = 0.05,
              coverage: str = "face") -> np.ndarray:
    """Hard 0/1 float32 mask [H,W] of one face at a coverage level (clipped where it runs off the frame)."""
    return _rasterize(coverage_polygons(landmarks, coverage, forehead, grow), image_hw[0], image_hw[1])


def face_mask_in_box(landmarks: np.ndarray, box, out_size: int, forehead: float = 0.35, grow: float = 0.05,
                     coverage: str = "face") -> np.ndarray:
    """Hard 0/1 float32 mask [out_size,out_size] of one face inside the square crop box (x, y, size)."""
    x, y, size = box
    s = out_size / size
    # Pixel centres: crop pixel i covers image pixels [x + i*s, x + (i+1)*s) with s = size/out_size.
    mapped = [(p - (x, y) + 0.5) * s - 0.5 for p in coverage_polygons(landmarks, coverage, forehead, grow)]
    return _rasterize(mapped, out_size, out_size)


# --------------------------------------------------------------------------------------------------- identity

def _check_rgb(image: np.ndarray) -> np.ndarray:
    ok = isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    if not ok:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise InputMismatchError(
            f"Face detection takes an RGB uint8 array [H,W,3]; got {got}. "
            "Convert with (image[0].clamp(0, 1) * 255).round().byte().numpy() for a ComfyUI IMAGE."
        )
    return np.ascontiguousarray(image)


def face_descriptor(image: np.ndarray, detection: FaceDetection) -> np.ndarray:
    """128-d dlib identity descriptor (float64) of one detected face."""
    dlib = _dlib()
    image = _check_rgb(image)
    x0, y0, x1, y1 = detection.box
    # Rebuild dlib's shape from the stored landmarks, so the descriptor sees exactly those points.
    points = [dlib.point(int(round(px)), int(round(py))) for px, py in detection.landmarks]
    shape = dlib.full_object_detection(dlib.rectangle(x0, y0, x1 - 1, y1 - 1), points)
    return np.array(_model("descriptor").compute_face_descriptor(image, shape), dtype=np.float64)


def identity_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Euclidean distance between two descriptors; below 0.6 means the same person for dlib's model."""
    return float(np.linalg.norm(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)))


def preview(image_u8: np.ndarray, found: list, chosen: list[int]) -> np.ndarray:
    """A copy of the photo with every detected face boxed and numbered: chosen faces green, skipped ones red."""
    img = Image.fromarray(np.ascontiguousarray(image_u8))
    draw = ImageDraw.Draw(img)
    line = max(2, round(max(img.size) / 400))
    for i, det in enumerate(found):
        colour = (40, 220, 60) if i in chosen else (230, 40, 40)
        x0, y0, x1, y1 = det.box
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=line)
        label = f"{i}" + ("" if i in chosen else " (skipped)")
        size = max(12, round(det.width / 4))
        try:
            from PIL import ImageFont
            font = ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1 has one fixed-size font
            font = None
        tx, ty = max(0, x0), max(0, y0 - size - line)
        bbox = draw.textbbox((tx, ty), label, font=font)
        draw.rectangle(bbox, fill=colour)
        draw.text((tx, ty), label, fill=(0, 0, 0), font=font)
    return np.asarray(img)


__all__ = ["COVERAGES", "DETECTORS", "FaceDetection", "coverage_bounds", "crop_box", "coverage_polygons", "detect_faces",
           "detection_scale", "face_descriptor", "face_mask", "face_mask_in_box", "identity_distance",
           "landmark_geometry_ok", "models_dir", "preview", "select_faces", "smallest_face"]
