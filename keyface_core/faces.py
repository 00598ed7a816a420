"""Face detection, 68-point landmarks, face-skin masks and identity descriptors (dlib, loaded lazily)."""

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .errors import InputMismatchError, KeyFaceError

_INSTALL_HINT = "Install them with: pip install dlib-bin face_recognition_models"
_MODEL_FILES = ("shape_predictor_68_face_landmarks.dat", "dlib_face_recognition_resnet_model_v1.dat")
_models: dict = {}  # filled on first use, so importing this module stays cheap


def models_dir() -> Path:
    """Folder holding the dlib model files shipped by the face_recognition_models package."""
    # find_spec, not import: the package's __init__ needs pkg_resources, gone from new setuptools.
    spec = importlib.util.find_spec("face_recognition_models")
    if importlib.util.find_spec("dlib") is None or spec is None or not spec.submodule_search_locations:
        raise KeyFaceError(f"Face detection needs dlib and the face_recognition_models files. {_INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    missing = [name for name in _MODEL_FILES if not (folder / name).is_file()]
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
    """Load (once) and return 'detector', 'shape68' or 'descriptor'."""
    if name not in _models:
        dlib = _dlib()
        if name == "detector":
            _models[name] = dlib.get_frontal_face_detector()
        elif name == "shape68":
            _models[name] = dlib.shape_predictor(str(models_dir() / _MODEL_FILES[0]))
        else:
            _models[name] = dlib.face_recognition_model_v1(str(models_dir() / _MODEL_FILES[1]))
    return _models[name]


@dataclass(frozen=True)
class FaceDetection:
    """One face: box (x0, y0, x1, y1) and 68 landmarks (x, y), both in full-image pixels."""

    box: tuple
    landmarks: np.ndarray
    score: float


def _check_rgb(image: np.ndarray) -> np.ndarray:
    ok = isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    if not ok:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise InputMismatchError(
            f"Face detection takes an RGB uint8 array [H,W,3]; got {got}. "
            "Convert with (image[0].clamp(0, 1) * 255).round().byte().numpy() for a ComfyUI IMAGE."
        )
    return np.ascontiguousarray(image)


def detect_faces(image: np.ndarray, max_side: int = 1600, upsample: int = 1, min_face_px: int = 0) -> list:
    """Find frontal faces with dlib's HOG detector; return FaceDetections sorted left-to-right, then top."""
    dlib = _dlib()
    image = _check_rgb(image)
    H, W = image.shape[:2]
    scale = min(1.0, max_side / max(H, W))
    small = image
    if scale < 1.0:
        # Detect on a downscaled copy for speed; landmarks below still use full resolution.
        size = (max(1, round(W * scale)), max(1, round(H * scale)))
        small = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR, reducing_gap=2.0))
    sx, sy = W / small.shape[1], H / small.shape[0]
    rects, scores, _ = _model("detector").run(small, int(upsample), 0.0)
    faces = []
    for r, score in zip(rects, scores):
        # dlib rectangles are inclusive; map to exclusive full-image pixel bounds.
        left, top = round(r.left() * sx), round(r.top() * sy)
        right, bottom = round((r.right() + 1) * sx) - 1, round((r.bottom() + 1) * sy) - 1
        full = dlib.rectangle(left, top, right, bottom)
        if min(full.width(), full.height()) < min_face_px:
            continue
        shape = _model("shape68")(image, full)
        landmarks = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)
        box = (max(0, full.left()), max(0, full.top()), min(W, full.right() + 1), min(H, full.bottom() + 1))
        faces.append(FaceDetection(box=tuple(int(v) for v in box), landmarks=landmarks, score=float(score)))
    return sorted(faces, key=lambda f: (f.box[0], f.box[1]))


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
    centre = hull.mean(axis=0)
    away = hull - centre
    dist = np.linalg.norm(away, axis=1, keepdims=True)
    return hull + away / np.maximum(dist, 1e-6) * (grow * size)


def _rasterize(polygon: np.ndarray, height: int, width: int) -> np.ndarray:
    canvas = Image.new("L", (int(width), int(height)), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in polygon.tolist()], fill=1, outline=1)
    return np.asarray(canvas, dtype=np.float32)


def face_mask(landmarks: np.ndarray, image_hw, forehead: float = 0.35, grow: float = 0.05) -> np.ndarray:
    """Hard 0/1 float32 mask [H,W] of the face skin (jaw to forehead) for one face's landmarks."""
    return _rasterize(_face_polygon(landmarks, forehead, grow), image_hw[0], image_hw[1])


def face_mask_in_box(
    landmarks: np.ndarray, box, out_size: int, forehead: float = 0.35, grow: float = 0.05
) -> np.ndarray:
    """Hard 0/1 float32 mask [out_size,out_size] of the face skin inside the square crop box (x, y, size)."""
    x, y, size = box
    polygon = _face_polygon(landmarks, forehead, grow)
    # Pixel centres: crop pixel i covers image pixels [x + i*s, x + (i+1)*s) with s = size/out_size.
    s = out_size / size
    mapped = (polygon - (x, y) + 0.5) * s - 0.5
    return _rasterize(mapped, out_size, out_size)


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
