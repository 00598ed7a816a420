"""Face Hint: a ControlNet control image per face, drawn from the 68 landmarks the faces carry (keyface_core.hints)."""

from __future__ import annotations

import numpy as np
import torch

from comfy_api.latest import io

from ..keyface_core import hints
from ..keyface_core.errors import InputMismatchError
from .face_nodes import HINT_NODE, FacesType, FaceSet
from .key_nodes import CATEGORY


def face_hints(faces: FaceSet, style: str = "keypoints") -> torch.Tensor:
    """IMAGE [N,S,S,3] float32 (k/255 exactly), one hint per face in crop order (= latent batch order)."""
    if not isinstance(faces, FaceSet) or not faces.faces:
        raise InputMismatchError("Face Hint needs the faces output of Face Mask, Crop Faces or Load Anonymized.")
    missing = [r.index for r in faces.faces if r.landmarks is None]
    if missing:
        raise InputMismatchError(
            f"face(s) {missing} carry no landmarks, so no hint can be drawn: these faces were loaded from a file "
            "saved without them (Save Anonymized's store_landmarks was 'no', or 'auto' in a graph without Face Hint, "
            "or the file predates KeyFace's Face Hint). For a new anonymization use Face Mask's faces. To restore "
            "such a file, use the restore workflow without a ControlNet: a file anonymized with a ControlNet hint "
            "restores only with that hint, which this file cannot redraw.")
    pixels = hints.draw_batch([r.landmarks for r in faces.faces], faces.crop_size, style)
    return torch.from_numpy(pixels.astype(np.float32) / 255.0)


class FaceHint(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=HINT_NODE, display_name="Face Hint", category=CATEGORY,
            description="Draws a ControlNet control image for each face from its 68 landmarks, at the crop size and in "
                        "crop order, so the new face keeps the original's expression and pose. Restore redraws the "
                        "identical hint from the landmarks Save Anonymized stored (never the hint's pixels).",
            inputs=[
                FacesType.Input("faces", tooltip="Crop Faces' (or Face Mask's) faces when anonymizing; Load "
                                                 "Anonymized's faces when restoring."),
                io.Combo.Input("style", options=list(hints.STYLES), default="keypoints",
                               tooltip="keypoints: 70 white dots on black, the OpenPose face style (for openpose / "
                                       "face-landmark ControlNets). regions: flat-colour face parts (skin, brows, eyes, "
                                       "nose, lips, mouth) in the face-parsing segmentation style (for segmentation "
                                       "ControlNets). Restore must use the same style."),
            ],
            outputs=[io.Image.Output(display_name="hint", tooltip="One control image per face (a batch, crop order): "
                                                                  "connect to Apply ControlNet's image.")],
        )

    @classmethod
    def execute(cls, faces, style="keypoints") -> io.NodeOutput:
        return io.NodeOutput(face_hints(faces, style))


NODES = [FaceHint]
