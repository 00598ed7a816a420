"""Issue 14 items 1 and 3: a ControlNet layout hint from the face's 68 landmarks (keyface_core.hints, Face Hint),
the landmarks stored in the file (numbers, never hint pixels) so Restore redraws the identical hint, exact restore
through ControlNetApplyAdvanced on a real face photo, the "keeping expression" workflows, and bad inputs B67-B70."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, faces_dir
from keyface_core import hints
from keyface_core.errors import InputMismatchError, MetadataError

CROP = 64
PHOTO = "obama.jpg"


def photo_landmarks(name: str = PHOTO, crop: int = 256) -> np.ndarray:
    """dlib's landmarks of a shared face photo, in crop pixels of its square crop box (as detect() stores them)."""
    from keyface_core import faces, masks
    image = np.asarray(Image.open(faces_dir() / name).convert("RGB"))
    found = faces.detect_faces(image)[0]
    box = masks.square_crop_box(found.box, image.shape[:2], 2.0)
    return hints.to_crop(found.landmarks, box, crop)


# ------------------------------------------------------------------------------------------------ drawing (no host)

@pytest.mark.parametrize("style", hints.STYLES)
def test_a_redraw_from_the_same_numbers_is_bit_identical(style):
    lm = photo_landmarks()
    first = hints.draw(lm, 256, style)
    assert first.dtype == np.uint8 and first.shape == (256, 256, 3)
    stored = np.frombuffer(lm.astype("<f4").tobytes(), dtype="<f4").reshape(68, 2)   # what the file gives back
    assert np.array_equal(hints.draw(stored, 256, style), first)
    moved = lm.copy()
    moved[48:68, 1] += 3.0                                                              # the mouth opens
    assert not np.array_equal(hints.draw(moved, 256, style), first)


def test_keypoints_are_openpose_face_dots():
    """70 white dots (68 landmarks + the two pupils OpenPose adds) on black, radius 3 at 512 px; nothing else."""
    lm = photo_landmarks(crop=512)
    hint = hints.draw(lm, 512, "keypoints")
    assert set(np.unique(hint)) == {0, 255} and (hint[..., 0] == hint[..., 1]).all() and (hint[..., 1] == hint[..., 2]).all()
    points = np.concatenate([lm, hints.pupils(lm)])
    for x, y in points.astype(int):
        assert hint[y, x, 0] == 255
    assert hints.dot_radius(512) == 3 and hints.dot_radius(64) == 1
    from scipy import ndimage
    blobs = ndimage.label(hint[..., 0] > 0)[1]
    assert 50 <= blobs <= 70          # some of the 70 dots touch at 512 px (lip corners, inner brows)
    white = (hint[..., 0] > 0).sum()
    assert white <= 70 * 29           # a radius-3 disk has 29 pixels


def test_regions_follow_the_face_parsing_palette():
    lm = photo_landmarks()
    hint = hints.draw(lm, 256, "regions")
    colours = {tuple(c) for c in hint.reshape(-1, 3)}
    assert colours <= set(hints.REGION_PALETTE.values())
    labels = hints.region_labels(hint)
    assert set(np.unique(labels)) == set(hints.REGION_LABELS.values())      # every part is drawn
    # Parts sit where their landmarks are: the eye centre is eye, the nose tip nose, the chin skin.
    centre = lambda part: tuple(np.round(lm[list(part)].mean(axis=0)).astype(int))     # noqa: E731
    x, y = centre(hints.LEFT_EYE)
    assert labels[y, x] == hints.REGION_LABELS["l_eye"]
    x, y = centre(hints.RIGHT_EYE)
    assert labels[y, x] == hints.REGION_LABELS["r_eye"]
    x, y = np.round(lm[33]).astype(int) - (0, 2)
    assert labels[y, x] == hints.REGION_LABELS["nose"]
    x, y = np.round((lm[8] * 0.8 + lm[57] * 0.2)).astype(int)
    assert labels[y, x] == hints.REGION_LABELS["skin"]
    assert labels[0, 0] == 0 and labels[-1, -1] == 0


def test_points_outside_the_crop_are_skipped_not_wrapped():
    lm = photo_landmarks(crop=64)
    lm[:17] -= 200.0                                   # the jaw leaves the crop
    hint = hints.draw(lm, 64, "keypoints")
    assert hint.shape == (64, 64, 3) and hint.any()
    hints.draw(lm, 64, "regions")                      # polygons are clipped by the canvas


@pytest.mark.parametrize("bad", [np.zeros((5, 2)), np.full((68, 2), np.nan), np.zeros((68, 3))])
def test_bad_landmarks_are_refused_clearly(bad):
    with pytest.raises(InputMismatchError, match="68 finite"):
        hints.draw(bad, 64)
    with pytest.raises(InputMismatchError, match="style"):
        hints.draw(photo_landmarks(crop=64), 64, "canny")


# ----------------------------------------------------------------------------------------- the record (no host)

def test_landmarks_round_trip_through_the_record_and_old_records_are_unchanged():
    from test_record import GOLDEN_RECORD_SHA256, fixed_file
    import hashlib
    import zlib
    from dataclasses import replace
    from keyface_core import record
    file = fixed_file()[0]
    assert hashlib.sha256(zlib.decompress(record.encode(file))).hexdigest() == GOLDEN_RECORD_SHA256
    lm = photo_landmarks(crop=64)
    with_lm = replace(file, faces=(replace(file.faces[0], landmarks=lm), replace(file.faces[1], landmarks=lm + 1)))
    back = record.decode(record.encode(with_lm))
    assert back.faces[0].landmarks.dtype == np.float32 and np.array_equal(back.faces[0].landmarks, lm)
    assert np.array_equal(back.faces[1].landmarks, lm + 1)
    assert record.decode(record.encode(file)).faces[0].landmarks is None


def test_build_refuses_landmarks_that_are_not_68_points():
    from keyface_core import anonymized
    with pytest.raises(InputMismatchError, match="68 finite"):
        anonymized._landmarks(np.zeros((4, 2)))


# ------------------------------------------------------------------------------------------- on the real host

def _photo_tensor(name: str = PHOTO) -> torch.Tensor:
    pixels = np.asarray(Image.open(faces_dir() / name).convert("RGB"))
    return torch.from_numpy(pixels.astype(np.float32) / 255.0)[None]


def _pack(module: str):
    from keyface_dev import comfy_host
    return comfy_host.pack_module(module)


@pytest.fixture(scope="module")
def H(kf):
    from keyface_dev import comfy_host
    return comfy_host.pack_module("nodes.hint_nodes")


def test_face_hint_node_registers_with_tooltips(host, H):
    nodes, _ = host
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["KeyFaceFaceHint"] == "Face Hint"
    schema = H.FaceHint.define_schema()
    assert schema.description and all(p.tooltip for p in (*schema.inputs, *schema.outputs))


def test_detect_fills_landmarks_in_crop_pixels(kf):
    from keyface_core import faces as face_core
    F = kf.face_nodes
    image = _photo_tensor()
    _, faces = F.detect(image, crop_size=CROP)
    region = faces.faces[0]
    x, y, size = region.box
    found = face_core.detect_faces(F._to_uint8(image[0]))[0]
    expected = ((found.landmarks - np.array([x, y])) * CROP / size).astype(np.float32)
    assert region.landmarks.dtype == np.float32 and region.landmarks.shape == (68, 2)
    assert np.allclose(region.landmarks, expected, atol=1e-4)
    # Crop Faces keeps them, also when another MASK replaces the dlib masks.
    _, _, cropped = F.crop(image, faces, torch.ones(1, *image.shape[1:3]))
    assert np.array_equal(cropped.faces[0].landmarks, region.landmarks)


@pytest.fixture(scope="module")
def control(host, tiny):
    """(model, vae, apply(hint) -> (positive, negative)): tiny SD1.5, tiny CLIP prompt, ControlNetApplyAdvanced with
    the seeded tiny ControlNet of ComfyUI's own classes."""
    import nodes as comfy_nodes
    from keyface_dev import tiny_models
    models, vae, clip = tiny
    positive = comfy_nodes.CLIPTextEncode().encode(clip, "a photo of a face")[0]
    negative = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
    net = tiny_models.controlnet(5)

    def apply(hint, strength=1.0):
        return comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, net, hint, strength, 0.0, 1.0)
    return models["eps"], vae, apply


@pytest.fixture(scope="module")
def hinted(host, kf, H, key_pair, control, tmp_path_factory):
    """Face Mask -> Crop -> Face Hint (keypoints) -> ControlNetApplyAdvanced -> Invert -> Flip -> Regenerate -> Save
    Anonymized's record (store_landmarks) -> PNG, on a shared photo at crop 64: (path, faces, original latent, hint)."""
    model, vae, apply = control
    F, C = kf.face_nodes, kf.core_nodes
    image = _photo_tensor()
    _, faces = F.detect(image, crop_size=CROP)
    crops, masks, faces = F.crop(image, faces)
    hint = H.face_hints(faces, "keypoints")
    assert hint.shape == (1, CROP, CROP, 3) and hint.dtype == torch.float32
    positive, negative = apply(hint)
    with torch.inference_mode():
        latent = {"samples": vae.encode(crops)}
    noise, _ = C.invert_latent(model, latent, 4, "normal", "exact", 1.0, positive=positive, negative=negative,
                               mask=masks)
    anonymized, _ = C.regenerate_latent(model, C.flip_latent(noise, key_pair[0]), positive=positive,
                                        negative=negative, steps=4)
    with torch.inference_mode():
        pasted = F.paste(image, F.decode_crops(vae, anonymized["samples"]), faces)
    pixels = F._to_uint8(pasted[0])
    path = tmp_path_factory.mktemp("hinted") / "anon.png"
    info = _pack("nodes.latent_info").info_of(anonymized)
    kf.pngio.write_png_atomic(path, pixels, F.build_record(faces, info, pixels, store_landmarks=True))
    return path, faces, latent, hint


def test_exact_restore_with_a_redrawn_hint_from_the_file(kf, H, key_pair, control, hinted):
    """... -> Load Anonymized -> Face Hint (from the loaded landmarks) -> ControlNetApplyAdvanced -> Restore: the
    original face latent bit for bit (error 0); both styles redraw bit-identically from the stored numbers."""
    model, _, apply = control
    path, faces, latent, hint = hinted
    _, loaded, loaded_faces, warnings = kf.face_nodes.load_anonymized(path)
    assert warnings == []
    assert np.array_equal(loaded_faces.faces[0].landmarks, faces.faces[0].landmarks)
    redrawn = H.face_hints(loaded_faces, "keypoints")
    assert torch.equal(redrawn, hint)                                     # identical hint, from numbers only
    assert torch.equal(H.face_hints(loaded_faces, "regions"), H.face_hints(faces, "regions"))
    positive, negative = apply(redrawn)
    restored, stats = kf.core_nodes.restore_latent(model, loaded, key_pair[0], positive=positive, negative=negative)
    assert torch.equal(restored["samples"], latent["samples"])            # error 0
    assert stats["verification"].exact


def test_store_landmarks_auto_follows_the_graph(kf):
    F = kf.face_nodes
    with_hint = {"1": {"class_type": "KeyFaceFaceHint", "inputs": {}}, "2": {"class_type": "LoadImage", "inputs": {}}}
    without = {"2": {"class_type": "LoadImage", "inputs": {}}}
    assert F.wants_landmarks("auto", with_hint) and not F.wants_landmarks("auto", without)
    assert not F.wants_landmarks("auto", None)
    assert F.wants_landmarks("yes", without) and not F.wants_landmarks("no", with_hint)


# ------------------------------------------------------------------------------- workflows (real executor)

def _api(workflow_id: str) -> dict:
    sys.path.insert(0, str(REPO / "scripts"))
    import make_workflows
    prompt = json.loads(make_workflows.paths(workflow_id)[1].read_text())
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["class_type"] = "KeyFaceDevTinyCheckpoint"
            node["inputs"] = {"ckpt_name": "tiny", "prediction": "eps", "seed": 0}
        elif node["class_type"] == "ControlNetLoader":
            node["class_type"] = "KeyFaceDevTinyControlNet"
            node["inputs"] = {"control_net_name": "tiny", "seed": 0}
        elif node["class_type"] == "KeyFaceFaceMask":
            node["inputs"]["crop_size"] = CROP
        elif node["class_type"] in ("KeyFaceInvertToNoise", "KeyFaceRegenerate"):
            node["inputs"]["steps"] = 4
    return prompt


def _newest(folder, pattern):
    return max(folder.glob(pattern), key=lambda p: p.stat().st_mtime_ns)


def test_keeping_expression_workflows_run_and_restore_verified(host, kf):
    """The shipped pair as written (checkpoint and ControlNet loaders swapped for the seeded tiny ones, crop 64,
    4 steps): the file stores the landmarks (store_landmarks auto, a Face Hint is in the graph), no hint pixels,
    and the restore twin redraws the hint and reports "verified exact"."""
    from keyface_dev import comfy_host
    nodes, work = host
    executor, server = comfy_host.run_prompt(_api("anonymize_expression"))
    assert executor.success, server.messages
    path = _newest(work / "output" / "keyface", "anonymized_*.png")
    pixels, record, _ = kf.pngio.read_png(path)
    assert record.faces[0].landmarks is not None and record.faces[0].landmarks.shape == (68, 2)
    shutil.copy(path, work / "input" / "keyface_anonymized.png")
    executor, server = comfy_host.run_prompt(_api("restore_expression"))
    assert executor.success, server.messages
    shown = str(executor.history_result["outputs"])
    assert "verified exact" in shown, shown


# ------------------------------------------------------------------------------------------- bad input B67-B70

def test_B67_face_hint_on_faces_without_landmarks(kf, H):
    """Faces loaded from a file saved without landmarks (store_landmarks no, or an older file)."""
    from dataclasses import replace
    F = kf.face_nodes
    _, faces = F.detect(_photo_tensor(), crop_size=CROP)
    bare = replace(faces, faces=tuple(replace(r, landmarks=None) for r in faces.faces))
    with pytest.raises(kf.errors.InputMismatchError, match=r"carry no landmarks, so no hint can be drawn.*Face Mask"):
        H.face_hints(bare)
    with pytest.raises(kf.errors.InputMismatchError, match="Face Hint needs the faces output"):
        H.face_hints("not faces")


def test_B68_restore_with_a_hint_from_other_landmarks_or_style(kf, H, key_pair, control, hinted):
    """A hint drawn from another face's landmarks, or in the other style, is not the anonymizing run's conditioning:
    Restore refuses it (the c3 fingerprint covers the hint's pixels)."""
    model, _, apply = control
    path, faces, _, _ = hinted
    _, loaded, loaded_faces, _ = kf.face_nodes.load_anonymized(path)
    other = kf.face_nodes.detect(_photo_tensor("biden.jpg"), crop_size=CROP)[1]
    for hint in (H.face_hints(loaded_faces, "regions"), H.face_hints(other, "keypoints")):
        wrong = apply(hint)
        with pytest.raises(kf.errors.InputMismatchError, match="conditioning differs"):
            kf.core_nodes.restore_latent(model, loaded, key_pair[0], positive=wrong[0], negative=wrong[1])


def test_B69_store_landmarks_yes_without_landmarks(kf, key_pair, control):
    from dataclasses import replace
    F = kf.face_nodes
    _, faces = F.detect(_photo_tensor(), crop_size=CROP)
    bare = replace(faces, faces=tuple(replace(r, landmarks=None) for r in faces.faces))
    with pytest.raises(kf.errors.InputMismatchError, match="store_landmarks is on but face"):
        F.build_record(bare, None, None, store_landmarks=True)
    with pytest.raises(kf.errors.InputMismatchError, match="store_landmarks must be one of"):
        F.wants_landmarks("sometimes", None)


def test_B70_damaged_landmarks_in_the_record(monkeypatch):
    """Landmarks edited in the record (another shape, values far outside the crop): refused as damaged."""
    from dataclasses import replace
    from keyface_core import record
    from test_record import fixed_file
    file = fixed_file()[0]
    lm = photo_landmarks(crop=64)
    with_lm = replace(file, faces=(replace(file.faces[0], landmarks=lm), file.faces[1]))
    monkeypatch.setattr(record, "LANDMARKS_SHAPE", (34, 4))
    payload = record.encode(with_lm)
    monkeypatch.undo()
    with pytest.raises(MetadataError, match=r"damaged \(array 'faces.0.landmarks' is float32 \(34, 4\)"):
        record.decode(payload)
    far = replace(file, faces=(replace(file.faces[0], landmarks=np.full((68, 2), 1e9, np.float32)), file.faces[1]))
    with pytest.raises(MetadataError, match="landmarks lie far outside"):
        record.decode(record.encode(far))


# ------------------------------------------------------------------------------------------- the command line

def test_cli_stores_landmarks_only_when_asked(tmp_path):
    """keyface anonymize --store-landmarks: the record carries the same crop-pixel landmarks as the nodes' detect();
    without the flag it carries none (the command line draws no hint)."""
    from keyface.models import load_model
    from keyface.pipeline import Settings, anonymize_image, find_faces, read_image
    from keyface_core import pngio
    from keyface_core.keys import SecretKey
    model = load_model("dev:tiny")
    key = SecretKey(bytes(range(32)), kind="key", source="test")
    source = faces_dir() / PHOTO
    for store in (True, False):
        settings = Settings(steps=2, scheduler="normal", crop_size=CROP, store_landmarks=store)
        target = tmp_path / f"out_{store}.png"
        anonymize_image(source, target, settings, model, key)
        record = pngio.read_png(target)[1]
        from keyface.cli import describe
        assert all(face["landmarks"] is store for face in describe(record)["faces"])     # keyface inspect says so
        if store:
            expected = find_faces(read_image(source, 64.0), settings).landmarks
            assert all(np.array_equal(f.landmarks, lm) for f, lm in zip(record.faces, expected))
        else:
            assert all(f.landmarks is None for f in record.faces)


# ------------------------------------------------------------------------------------------- benchmark metrics

def _bench():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import attributes
    return attributes


@pytest.mark.parametrize("degrees", [-15.0, 10.0])
def test_pose_fit_recovers_an_in_plane_rotation(degrees):
    A = _bench()
    lm = photo_landmarks().astype(np.float64)
    t = np.radians(degrees)
    centre = lm.mean(axis=0)
    turned = (lm - centre) @ np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]]) + centre
    diff = A.compare_faces(lm, turned)
    assert abs(diff["roll_diff"] - abs(degrees)) < 0.5 and diff["yaw_diff"] < 0.5 and diff["pitch_diff"] < 0.5
    assert diff["landmark_nme"] > 0.05 and A.landmark_nme(lm, lm) == 0.0


def test_mouth_and_eye_ratios_follow_the_landmarks():
    A = _bench()
    lm = photo_landmarks().astype(np.float64)
    opened = lm.copy()
    opened[[65, 66, 67], 1] += 0.2 * A.inter_ocular(lm)
    assert A.mouth_open_ratio(opened) > A.mouth_open_ratio(lm) + 0.1
    closed = lm.copy()
    for a, b in ((37, 41), (38, 40), (43, 47), (44, 46)):
        closed[[a, b], 1] = lm[[a, b], 1].mean()
    assert A.eye_open_ratio(closed) < 0.02 < A.eye_open_ratio(lm)
    image = np.full((120, 120, 3), 200, np.uint8)
    image[40:80, 40:80] = np.arange(40, dtype=np.uint8)[None, :, None] * 5
    box = (40, 40, 80, 80)
    for out in (A.blur_faces(image, [box]), A.pixelate_faces(image, [box])):
        assert out.shape == image.shape and (out[40:80, 40:80] != image[40:80, 40:80]).any()
        assert np.array_equal(out[:20], image[:20])          # outside the ellipse untouched


# README bad-input rows kept beside their tests (tests/test_bad_input.py checks the README quotes each).
BAD_INPUT_ROWS = {
    "B67": ("Face Hint on faces without landmarks", "carry no landmarks, so no hint can be drawn"),
    "B68": ("Restore with a hint from other landmarks, or in the other style", "the conditioning differs"),
    "B69": ("store_landmarks yes on faces that carry none", "store_landmarks is on but face(s) [0] carry no landmarks"),
    "B70": ("Landmarks in the record edited", "face 0's landmarks lie far outside its crop"),
}
