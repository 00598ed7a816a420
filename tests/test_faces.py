"""Tests for keyface_core.faces on the real photos in ../shared/faces (skipped without dlib or photos)."""

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("dlib")

from keyface_core import faces  # noqa: E402
from keyface_core.errors import InputMismatchError, KeyFaceError  # noqa: E402
from keyface_core.masks import square_crop_box  # noqa: E402

# Faces dlib's HOG detector finds at the default settings. obama_and_biden.jpg holds a third,
# real face: a child at the lower right, head bowed, only partly in frame (score ~0.3).
EXPECTED_COUNTS = {
    "alex-lacamoire.png": 1,
    "alex-lacamoire2.jpg": 1,
    "biden.jpg": 1,
    "biden2.jpg": 1,
    "kit-harington.jpg": 1,
    "lin-manuel-miranda.png": 1,
    "obama.jpg": 1,
    "obama1.jpg": 1,
    "obama2.jpg": 1,
    "obama3.jpg": 1,
    "obama_and_biden.jpg": 3,
    "rose-leslie1.jpg": 1,
    "rose-leslie2.jpg": 1,
    "two_people.jpg": 2,
}
SAME = [
    ("obama.jpg", "obama2.jpg"),
    ("biden.jpg", "biden2.jpg"),
    ("rose-leslie1.jpg", "rose-leslie2.jpg"),
    ("alex-lacamoire.png", "alex-lacamoire2.jpg"),
]
DIFFERENT = [
    ("obama.jpg", "biden2.jpg"),
    ("rose-leslie1.jpg", "kit-harington.jpg"),
    ("alex-lacamoire2.jpg", "lin-manuel-miranda.png"),
    ("obama2.jpg", "kit-harington.jpg"),
]


def faces_dir() -> Path:
    """The shared photo folder: $KEYFACE_FACES_DIR, else ../shared/faces beside the repository."""
    default = Path(__file__).resolve().parents[2] / "shared" / "faces"
    folder = Path(os.environ.get("KEYFACE_FACES_DIR") or default)
    if not folder.is_dir():
        pytest.skip(f"face photos not found at {folder}; set KEYFACE_FACES_DIR")
    return folder


_cache: dict = {}


def photo(name: str) -> np.ndarray:
    if name not in _cache:
        from PIL import Image

        _cache[name] = np.asarray(Image.open(faces_dir() / name).convert("RGB"))
    return _cache[name]


def detections(name: str) -> list:
    key = ("det", name)
    if key not in _cache:
        _cache[key] = faces.detect_faces(photo(name))
    return _cache[key]


def descriptor(name: str) -> np.ndarray:
    (only,) = detections(name)
    return faces.face_descriptor(photo(name), only)


def test_models_dir_has_the_model_files():
    folder = faces.models_dir()
    assert (folder / "shape_predictor_68_face_landmarks.dat").is_file()
    assert (folder / "dlib_face_recognition_resnet_model_v1.dat").is_file()


def test_models_dir_says_what_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(KeyFaceError, match="pip install dlib-bin face_recognition_models"):
        faces.models_dir()


@pytest.mark.parametrize("name", sorted(EXPECTED_COUNTS))
def test_detect_faces_counts_and_geometry(name):
    image = photo(name)
    found = detections(name)
    assert len(found) == EXPECTED_COUNTS[name]
    H, W = image.shape[:2]
    for face in found:
        x0, y0, x1, y1 = face.box
        assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H
        assert face.landmarks.shape == (68, 2) and face.landmarks.dtype == np.float32
        # Landmarks lie on the face: their centre is inside the box.
        cx, cy = face.landmarks.mean(axis=0)
        assert x0 < cx < x1 and y0 < cy < y1
    assert [f.box[0] for f in found] == sorted(f.box[0] for f in found)


def test_downscaled_detection_maps_back_to_full_resolution():
    image = photo("obama3.jpg")  # 1434x2333: downscaled at max_side=1600 and 800
    (full,) = faces.detect_faces(image, max_side=4000)
    (small,) = faces.detect_faces(image, max_side=800)
    ax0, ay0, ax1, ay1 = full.box
    bx0, by0, bx1, by1 = small.box
    inter = max(0, min(ax1, bx1) - max(ax0, bx0)) * max(0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    assert inter / union > 0.6
    # Landmarks are fitted at full resolution either way, so they agree closely.
    assert np.abs(full.landmarks - small.landmarks).mean() < 0.05 * (ax1 - ax0)


def test_detect_faces_min_face_px_and_blank_image():
    assert faces.detect_faces(photo("two_people.jpg"), min_face_px=10_000) == []
    assert faces.detect_faces(np.full((300, 400, 3), 128, np.uint8)) == []


def test_detect_faces_rejects_non_rgb_uint8():
    with pytest.raises(InputMismatchError, match="uint8"):
        faces.detect_faces(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(InputMismatchError, match=r"\[H,W,3\]"):
        faces.detect_faces(np.zeros((64, 64), np.uint8))


@pytest.mark.parametrize("name", ["obama.jpg", "two_people.jpg", "biden.jpg"])
def test_face_mask_covers_landmarks_and_forehead(name):
    image = photo(name)
    H, W = image.shape[:2]
    for face in detections(name):
        mask = faces.face_mask(face.landmarks, (H, W))
        assert mask.shape == (H, W) and mask.dtype == np.float32
        assert set(np.unique(mask).tolist()) == {0.0, 1.0}
        xs, ys = np.round(face.landmarks).astype(int).T
        assert mask[ys, xs].all()  # all 68 landmarks, hence their hull, lie inside the mask
        brow_top = int(face.landmarks[17:27, 1].min())
        assert mask[: brow_top - 5].any()  # the forehead above the brows is covered
        assert mask.sum() < 0.2 * H * W  # the face, not the whole photo
        assert mask[face.box[1] : face.box[3], face.box[0] : face.box[2]].mean() > 0.5


def test_face_mask_in_box_matches_the_full_mask_crop():
    image = photo("obama.jpg")
    (face,) = detections("obama.jpg")
    x, y, size = square_crop_box(face.box, image.shape[:2])
    full = faces.face_mask(face.landmarks, image.shape[:2])[y : y + size, x : x + size]
    same = faces.face_mask_in_box(face.landmarks, (x, y, size), size)
    assert same.shape == (size, size)
    assert (same != full).mean() < 0.005
    small = faces.face_mask_in_box(face.landmarks, (x, y, size), 128)
    assert small.shape == (128, 128) and abs(small.mean() - full.mean()) < 0.02


def test_same_identity_is_closer_than_0_6():
    for a, b in SAME:
        d = faces.identity_distance(descriptor(a), descriptor(b))
        assert d < 0.6, f"{a} vs {b}: {d:.3f}"


def test_different_identities_are_farther_than_0_6():
    for a, b in DIFFERENT:
        d = faces.identity_distance(descriptor(a), descriptor(b))
        assert d > 0.6, f"{a} vs {b}: {d:.3f}"


def test_group_photo_faces_match_their_people():
    image = photo("obama_and_biden.jpg")
    biden, obama = detections("obama_and_biden.jpg")[:2]  # left to right: Biden, then Obama
    d = descriptor("obama.jpg"), descriptor("biden2.jpg")
    assert faces.face_descriptor(image, obama).shape == (128,)
    assert faces.identity_distance(faces.face_descriptor(image, obama), d[0]) < 0.6
    assert faces.identity_distance(faces.face_descriptor(image, biden), d[1]) < 0.6
    assert faces.identity_distance(faces.face_descriptor(image, biden), d[0]) > 0.6
