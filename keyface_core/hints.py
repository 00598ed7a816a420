"""ControlNet layout hints drawn from dlib's 68 face landmarks (pure numpy/PIL, no ComfyUI).

Two styles, both at the crop's size and both deterministic (integer rasterisation, no antialiasing: the same
numbers redraw the same bytes, which is what lets Restore redraw the hint the conditioning fingerprint saw):

- ``keypoints``: the OpenPose face style that face ControlNets (openpose "face"/"faceonly" preprocessors of
  controlnet_aux, DWPose) are trained on: 70 filled white dots on black — the 68 iBUG-300W points (dlib's
  layout is the same) plus the two pupils, which OpenPose adds as points 68/69 (here: the centre of each eye
  contour). OpenPose draws radius 3 on a ~512 px canvas; the radius here scales with the crop.
- ``regions``: a landmark-derived face-parsing map in the CelebAMask-HQ / BiSeNet style the paper's authors
  condition on (flat colours per part on black; `REGION_PALETTE`). It is a geometric approximation (polygons
  through the landmarks), not a parser: no hair, ears, neck or glasses.

Landmarks are (x, y) in crop pixels, float32 [68, 2]: (landmarks_in_image - (box_x, box_y)) * crop / box_size.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from .errors import InputMismatchError

STYLES = ("keypoints", "regions")

# CelebAMask-HQ label ids (as in face-parsing BiSeNet models) -> RGB of the face-parsing visualisation palette
# (zllrunning/face-parsing.PyTorch `part_colors[label]`, which it writes as BGR; listed here as the RGB seen on
# screen). "left"/"right" are the sides of the image (dlib points 36-41 / 17-21 are on the image's left).
REGION_LABELS = {"background": 0, "skin": 1, "l_brow": 2, "r_brow": 3, "l_eye": 4, "r_eye": 5, "nose": 10,
                 "mouth": 11, "u_lip": 12, "l_lip": 13}
REGION_PALETTE = {
    "background": (0, 0, 0),
    "skin": (0, 85, 255),
    "l_brow": (0, 170, 255),
    "r_brow": (85, 0, 255),
    "l_eye": (170, 0, 255),
    "r_eye": (0, 255, 0),
    "nose": (255, 0, 0),
    "mouth": (255, 0, 85),
    "u_lip": (255, 0, 170),
    "l_lip": (255, 85, 0),
}

# The 68-point layout (iBUG 300-W, dlib's shape_predictor_68_face_landmarks).
JAW = range(0, 17)
LEFT_BROW, RIGHT_BROW = range(17, 22), range(22, 27)
NOSE_BRIDGE, NOSE_BASE = range(27, 31), range(31, 36)
LEFT_EYE, RIGHT_EYE = range(36, 42), range(42, 48)
OUTER_LIPS, INNER_LIPS = range(48, 60), range(60, 68)

FOREHEAD = 0.35   # brows raised by this share of the chin-to-brow height, as the face mask does (faces.py)


def check_landmarks(landmarks) -> np.ndarray:
    """float32 [68,2] finite landmarks, or InputMismatchError saying what came instead."""
    lm = np.asarray(landmarks)
    if lm.shape != (68, 2) or not np.issubdtype(lm.dtype, np.number) or not np.isfinite(lm).all():
        raise InputMismatchError(f"a face hint needs 68 finite (x, y) landmarks per face; got an array of shape "
                                 f"{lm.shape} ({lm.dtype}). Use the faces from Face Mask or Load Anonymized.")
    return lm.astype(np.float32, copy=False)


def to_crop(landmarks_image, box, crop_size: int) -> np.ndarray:
    """Image-pixel landmarks -> crop-pixel landmarks of the square crop box (x, y, size), float32 [68,2]."""
    x, y, size = (float(v) for v in box)
    lm = np.asarray(landmarks_image, dtype=np.float64)
    return ((lm - (x, y)) * (float(crop_size) / size)).astype(np.float32)


def pupils(landmarks: np.ndarray) -> np.ndarray:
    """OpenPose's points 68 and 69: the centres of the image-left and image-right eye contours, float32 [2,2]."""
    lm = check_landmarks(landmarks).astype(np.float64)
    return np.stack([lm[list(LEFT_EYE)].mean(axis=0), lm[list(RIGHT_EYE)].mean(axis=0)]).astype(np.float32)


def dot_radius(size: int) -> int:
    """OpenPose's face dots are radius 3 on a ~512 px canvas; keep that share of the crop (at least 1 px)."""
    return max(1, int(round(3.0 * size / 512.0)))


def draw_keypoints(landmarks, size: int) -> np.ndarray:
    """OpenPose-face-style hint: uint8 RGB [size,size,3], 70 filled white dots on black."""
    lm = check_landmarks(landmarks)
    points = np.concatenate([lm, pupils(lm)]).astype(np.float64)
    canvas = np.zeros((size, size), dtype=bool)
    r = dot_radius(size)
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    disk = xx * xx + yy * yy <= r * r
    for px, py in points:
        # OpenPose truncates to the pixel (int(x)); points outside the crop are skipped like its "x > eps" test.
        cx, cy = int(np.floor(px)), int(np.floor(py))
        if not (0 <= cx < size and 0 <= cy < size):
            continue
        y0, y1, x0, x1 = cy - r, cy + r + 1, cx - r, cx + r + 1
        sy0, sx0 = max(0, -y0), max(0, -x0)
        sy1, sx1 = disk.shape[0] - max(0, y1 - size), disk.shape[1] - max(0, x1 - size)
        canvas[max(0, y0):min(size, y1), max(0, x0):min(size, x1)] |= disk[sy0:sy1, sx0:sx1]
    out = np.zeros((size, size, 3), dtype=np.uint8)
    out[canvas] = 255
    return out


def _poly(points: np.ndarray) -> list:
    # PIL rasterises float vertices without antialiasing: same numbers, same pixels.
    return [(float(x), float(y)) for x, y in points]


def _skin_polygon(lm: np.ndarray) -> np.ndarray:
    """Jaw line + brows raised toward the forehead ("up" follows the face, so a tilted head keeps its forehead)."""
    jaw, brows = lm[list(JAW)], lm[17:27]
    up = brows.mean(axis=0) - lm[8]
    height = float(np.linalg.norm(up)) or 1.0
    raised = brows + up / height * (FOREHEAD * height)
    return np.vstack([jaw, raised[::-1]])


def draw_regions(landmarks, size: int) -> np.ndarray:
    """Face-parsing-style hint: uint8 RGB [size,size,3]; parts as flat `REGION_PALETTE` colours on black."""
    lm = check_landmarks(landmarks).astype(np.float64)
    image = Image.new("RGB", (int(size), int(size)), REGION_PALETTE["background"])
    draw = ImageDraw.Draw(image)
    eye_width = float(np.linalg.norm(lm[45] - lm[36])) or 1.0
    brow_width = max(1, int(round(0.06 * eye_width)))

    draw.polygon(_poly(_skin_polygon(lm)), fill=REGION_PALETTE["skin"])
    # Nose: the bridge widened to the base's wings, closed along the nostrils.
    base = lm[list(NOSE_BASE)]
    half = (lm[35] - lm[31]) * 0.25
    nose = np.vstack([lm[27] - half, lm[30] - half * 1.6, base, lm[30] + half * 1.6, lm[27] + half])
    draw.polygon(_poly(nose), fill=REGION_PALETTE["nose"])
    for name, part in (("l_brow", LEFT_BROW), ("r_brow", RIGHT_BROW)):
        # A brow is an arc of 5 points: thicken it downward into a band.
        arc = lm[list(part)]
        centre = lm[30]
        toward = centre - arc.mean(axis=0)
        toward = toward / (float(np.linalg.norm(toward)) or 1.0) * (brow_width * 2.5)
        draw.polygon(_poly(np.vstack([arc, (arc + toward)[::-1]])), fill=REGION_PALETTE[name])
    draw.polygon(_poly(lm[list(LEFT_EYE)]), fill=REGION_PALETTE["l_eye"])
    draw.polygon(_poly(lm[list(RIGHT_EYE)]), fill=REGION_PALETTE["r_eye"])
    # Lips: upper = outer 48..54 back along inner 64..60; lower = outer 54..59,48 back along inner 60,67..64.
    upper = np.vstack([lm[48:55], lm[[64, 63, 62, 61, 60]]])
    lower = np.vstack([lm[[54, 55, 56, 57, 58, 59, 48]], lm[[60, 67, 66, 65, 64]]])
    draw.polygon(_poly(lm[list(OUTER_LIPS)]), fill=REGION_PALETTE["mouth"])
    draw.polygon(_poly(upper), fill=REGION_PALETTE["u_lip"])
    draw.polygon(_poly(lower), fill=REGION_PALETTE["l_lip"])
    draw.polygon(_poly(lm[list(INNER_LIPS)]), fill=REGION_PALETTE["mouth"])
    return np.asarray(image, dtype=np.uint8).copy()


def draw(landmarks, size: int, style: str = "keypoints") -> np.ndarray:
    """One face's hint, uint8 RGB [size,size,3], in `style` ('keypoints' or 'regions')."""
    if style not in STYLES:
        raise InputMismatchError(f"hint style must be one of {', '.join(STYLES)}; got '{style}'.")
    if not isinstance(size, (int, np.integer)) or not 8 <= int(size) <= 8192:
        raise InputMismatchError(f"hint size must be an integer from 8 to 8192 pixels; got {size!r}.")
    return (draw_keypoints if style == "keypoints" else draw_regions)(landmarks, int(size))


def draw_batch(landmarks: Sequence, size: int, style: str = "keypoints") -> np.ndarray:
    """Hints of several faces, uint8 [N,size,size,3] in the given (crop) order."""
    return np.stack([draw(lm, size, style) for lm in landmarks])


def region_labels(hint: np.ndarray) -> np.ndarray:
    """Label ids [H,W] (uint8, `REGION_LABELS`) of a `regions` hint; unknown colours map to background."""
    out = np.zeros(hint.shape[:2], dtype=np.uint8)
    for name, colour in REGION_PALETTE.items():
        out[(hint == np.array(colour, dtype=np.uint8)).all(axis=-1)] = REGION_LABELS[name]
    return out
