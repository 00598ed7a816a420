"""Whole-photo face path: detect, crop, paste back, and the KeyFace PNG (save/load with metadata)."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

import folder_paths
from comfy_api.latest import io, ui

from ..keyface_core import faces as face_core
from ..keyface_core import masks as mask_core
from ..keyface_core import anonymized as anonymized_file
from ..keyface_core import photo, pngio, protocol
from ..keyface_core import sampling as core
from ..keyface_core.errors import InputMismatchError, KeyFaceError, MetadataError, NoFaceError, WrongKeyError
from ..keyface_core.keys import check_matches
from ..keyface_core.protocol_v1 import V1Anonymized
from .key_nodes import CATEGORY, KeyFaceKey
from .latent_info import INFO_KEY, AnonymizedInfo, InversionSettings, RestoredInfo, V1Info, info_of

log = logging.getLogger("keyface")
FacesType = io.Custom("KEYFACE_FACES")


@dataclass(frozen=True)
class FaceRegion:
    """One face of a photo: its square crop box (x, y, size) in image pixels and soft crop mask.

    `landmarks`: dlib's 68 points (float32 [68,2]) in CROP pixels of this face's crop, i.e.
    (lm - (x, y)) * crop_size / size; None when the face did not come from detection (a loaded file)."""

    index: int
    box: tuple
    mask: torch.Tensor  # [S,S] float32, multiples of 1/255 so the stored uint8 mask reproduces it
    landmarks: np.ndarray | None = None


@dataclass(frozen=True)
class FaceSet:
    """The faces of one photo, in crop order (= latent batch order)."""

    image_hw: tuple
    crop_size: int
    faces: tuple

    def __repr__(self) -> str:
        return f"<KeyFace faces: {len(self.faces)} in a {self.image_hw[1]}x{self.image_hw[0]} image, crops {self.crop_size}px>"


def _quantize(mask: torch.Tensor) -> torch.Tensor:
    """Round a soft mask to 1/255 steps: exactly what the PNG metadata stores."""
    return torch.round(mask.clamp(0, 1) * 255.0) / 255.0


def _rgb(image: torch.Tensor, what: str = "image") -> torch.Tensor:
    """An IMAGE as 3 channels: grayscale is repeated, alpha dropped (KeyFace reads and writes RGB)."""
    if image.ndim != 4:
        raise InputMismatchError(f"the {what} has shape {tuple(image.shape)}; expected an IMAGE "
                                 "[batch, height, width, channels].")
    channels = image.shape[-1]
    if channels == 3:
        return image
    if channels == 1:
        return image.expand(*image.shape[:-1], 3)
    if channels == 4:
        return image[..., :3]
    raise InputMismatchError(f"the {what} has {channels} channels; KeyFace takes RGB, RGBA or grayscale images.")


pixels_digest = anonymized_file.pixels_digest


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    # Rounding (not truncation) maps LoadImage's v/255 floats back to v exactly; torch does it multi-threaded.
    return torch.round(image.detach().cpu().to(torch.float32) * 255.0).clamp_(0, 255).to(torch.uint8).numpy()


def _blank_image_hint(pixels: np.ndarray) -> str:
    """Why a photo can hold no face at all: LoadImage turns a 16-bit PNG (gray or RGB) white, and a failed
    conversion can give one flat colour; name that instead of leaving "no face" as the whole story."""
    share_white = float((pixels >= 250).all(axis=-1).mean())
    if share_white > 0.98:
        return (f" The image is {share_white:.0%} white: ComfyUI's LoadImage turns 16-bit PNGs (gray or RGB) white, so "
                "save the photo as an 8-bit PNG or JPEG first.")
    if int(pixels.max()) - int(pixels.min()) <= 2:
        return " The image is a single flat colour: it holds no picture at all; check the file and how it was loaded."
    return ""


@dataclass(frozen=True)
class Detection:
    """What Face Mask found: the full-size MASK, the FaceSet of the chosen faces, every face found (numbered as
    in the preview) and which of them were chosen."""

    mask: torch.Tensor
    faces: FaceSet
    found: tuple
    chosen: tuple

    def preview(self, image: torch.Tensor) -> torch.Tensor:
        """IMAGE [1,H,W,3]: the photo with every detected face boxed and numbered (skipped faces in red)."""
        return torch.from_numpy(face_core.preview(_to_uint8(_rgb(image)[0]), list(self.found), list(self.chosen))
                                .astype(np.float32) / 255.0)[None]


def find_faces(image: torch.Tensor, crop_size: int = 512, context: float = 2.0, feather_frac: float = 0.06,
               max_faces: int = 16, min_face_px: int = 0, detector: str = "auto", coverage: str = "face",
               threshold: float = 0.0, which: str = "all") -> Detection:
    """Face Mask: detect faces in one IMAGE, choose which to anonymize, build their crop boxes and soft masks."""
    image = _rgb(image)
    if image.shape[0] != 1:
        raise InputMismatchError(f"Face Mask takes one photo at a time (batch 1); got a batch of {image.shape[0]}. "
                                 f"An animated GIF/WebP/APNG loads as its {image.shape[0]} frames: pick the frame to "
                                 "anonymize with Image From Batch (frame 1 is batch_index 0). Otherwise run the "
                                 "workflow once per photo.")
    # The float IMAGE itself: detection downsizes it before any 8-bit conversion (cost follows the faces).
    found = face_core.detect_faces(image[0], detector=detector, min_face_px=min_face_px, threshold=threshold)
    if not found:
        raise NoFaceError("no face was found in the image, so nothing would be anonymized. Try the 'auto' or 'cnn' "
                          "detector, a lower threshold or min_face_px, or connect your own MASK to Crop Faces."
                          + _blank_image_hint(_to_uint8(image[0])))
    chosen = face_core.select_faces(found, which)
    # max_faces keeps the most confident of the chosen faces.
    chosen = sorted(sorted(chosen, key=lambda i: -found[i].score)[:max_faces])
    if not chosen:
        raise NoFaceError(f"faces '{which}' chose none of the {len(found)} faces found, so nothing would be "
                          "anonymized; see the preview for their numbers.")
    H, W = image.shape[1:3]
    regions, full = [], torch.zeros(H, W)
    for index, i in enumerate(chosen):
        det = found[i]
        box = face_core.crop_box(det, (H, W), context, coverage)
        hard = torch.from_numpy(face_core.face_mask_in_box(det.landmarks, box, crop_size, coverage=coverage))
        soft = _quantize(mask_core.feather(hard, max(1.0, feather_frac * crop_size)))
        x, y, size = (int(v) for v in box)
        crop_lm = ((np.asarray(det.landmarks, np.float64) - (x, y)) * (crop_size / size)).astype(np.float32)
        regions.append(FaceRegion(index, (x, y, size), soft, crop_lm))
        # The full-size MASK only changes inside the crop box: resize the crop mask there (cost ∝ face, not photo).
        patch = torch.nn.functional.interpolate(soft[None, None], size=(size, size), mode="bilinear", antialias=True)[0, 0]
        full[y:y + size, x:x + size] = torch.maximum(full[y:y + size, x:x + size], patch)
    return Detection(full[None], FaceSet((H, W), int(crop_size), tuple(regions)), tuple(found), tuple(chosen))


def detect(image: torch.Tensor, crop_size: int = 512, context: float = 2.0, feather_frac: float = 0.06,
           max_faces: int = 16, min_face_px: int = 0, detector: str = "auto", coverage: str = "face",
           threshold: float = 0.0, which: str = "all") -> tuple[torch.Tensor, FaceSet]:
    """Faces of one IMAGE -> (full-size soft MASK [1,H,W], FaceSet with crop boxes and soft crop masks)."""
    result = find_faces(image, crop_size, context, feather_frac, max_faces, min_face_px, detector, coverage,
                        threshold, which)
    return result.mask, result.faces


def crop(image: torch.Tensor, faces: FaceSet, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, FaceSet]:
    """Square crops [N,S,S,C] and their masks [N,S,S]; a full-image MASK, when given, replaces the dlib masks."""
    image = _rgb(image)
    _check_image(image, faces)
    crops, masks, regions = [], [], []
    for region in faces.faces:
        crops.append(mask_core.crop_square(image[0], region.box, faces.crop_size))
        if mask is not None:
            full = mask.reshape(-1, *mask.shape[-2:])[0]
            if tuple(full.shape) != tuple(faces.image_hw):
                raise InputMismatchError(f"the mask is {full.shape[1]}x{full.shape[0]} but the image is "
                                         f"{faces.image_hw[1]}x{faces.image_hw[0]}; give a mask of the image's size.")
            soft = _quantize(mask_core.crop_square(full[..., None], region.box, faces.crop_size)[..., 0])
            region = replace(region, mask=soft)
        masks.append(region.mask)
        regions.append(region)
    out_faces = replace(faces, faces=tuple(regions))
    if all(float(m.max()) < 0.5 for m in masks):
        raise NoFaceError("every face mask is empty (nothing >= 0.5), so nothing would be anonymized; check the mask.")
    return torch.stack(crops), torch.stack(masks), out_faces


def paste(image: torch.Tensor, crops: torch.Tensor, faces: FaceSet) -> torch.Tensor:
    """Paste processed crops back through their soft masks; pixels outside the masks stay bit-identical."""
    image, crops = _rgb(image), _rgb(crops, "crops")
    _check_image(image, faces)
    if crops.shape[0] != len(faces.faces):
        raise InputMismatchError(f"{crops.shape[0]} crops for {len(faces.faces)} faces; connect the decoded crops of "
                                 "the same Crop Faces run (same order).")
    out = image[0].clone()  # the one copy of the photo; each face writes only its box
    for region, face in zip(faces.faces, crops):
        if face.shape[0] != faces.crop_size or face.shape[1] != faces.crop_size:
            face = mask_core.crop_square(face, (0, 0, min(face.shape[:2])), faces.crop_size)
        mask_core.paste_square_(out, face, region.box, region.mask)
    return out[None]


def _check_image(image: torch.Tensor, faces: FaceSet) -> None:
    if image.ndim != 4 or image.shape[0] != 1:
        raise InputMismatchError(f"expected one photo (batch 1); got shape {tuple(image.shape)}.")
    if tuple(image.shape[1:3]) != tuple(faces.image_hw):
        raise InputMismatchError(f"the image is {image.shape[2]}x{image.shape[1]} but the faces were found in a "
                                 f"{faces.image_hw[1]}x{faces.image_hw[0]} image; use the same image (not resized).")


# ----------------------------------------------------------------------------------------------
# The KeyFace PNG
# ----------------------------------------------------------------------------------------------

def build_record(faces: FaceSet, info: AnonymizedInfo, pixels: np.ndarray,
                 sealed_pixels=None, store_landmarks: bool = False) -> anonymized_file.AnonymizedFile:
    """Everything Restore needs except the key: the keyed noise and its context, bound to the saved pixels.
    `store_landmarks` adds each face's 68 landmarks (crop pixels), so Restore can redraw a Face Hint."""
    landmarks = None
    if store_landmarks:
        missing = [r.index for r in faces.faces if r.landmarks is None]
        if missing:
            raise InputMismatchError(f"store_landmarks is on but face(s) {missing} carry no landmarks (faces loaded "
                                     "from a file saved without them); use Face Mask's faces, or set store_landmarks "
                                     "to auto/no.")
        landmarks = [r.landmarks for r in faces.faces]
    if info.keyed.lock is None:
        raise InputMismatchError("this latent was never key-flipped, so it is not anonymized; run Apply Key Flip "
                                 "before Regenerate.")
    fmt = info.latent_format
    latent_format = anonymized_file.LatentFormat(int(info.samples.shape[1]), float(getattr(fmt, "scale_factor", 1.0)),
                                                 float(getattr(fmt, "shift_factor", 0.0) or 0.0))
    return anonymized_file.build(pixels, [r.box for r in faces.faces], [r.mask.cpu().numpy() for r in faces.faces],
                                 faces.crop_size, info.keyed, info.settings, info.render, latent_format, info.samples,
                                 sealed_pixels, landmarks)


def file_to_inputs(file: anonymized_file.AnonymizedFile, image: torch.Tensor) -> tuple[dict, FaceSet]:
    """(anonymized LATENT with AnonymizedInfo, FaceSet) from a v2 file and its image."""
    H, W = image.shape[1:3]
    _check_size(file.image_size, W, H)
    _check_schedule(file.inversion)
    regions = tuple(FaceRegion(int(index), tuple(face.box), torch.from_numpy(face.crop_mask.astype(np.float32) / 255.0),
                               None if face.landmarks is None else face.landmarks.copy())
                    for index, face in zip(file.keyed.faces.face_indices, file.faces))
    faces = FaceSet((H, W), file.crop_size, regions)
    info = AnonymizedInfo(file.inversion, file.keyed, file.render, file.anonymized, file.latent_format, None,
                          file.sealed_pixels)
    return {"samples": file.anonymized, INFO_KEY: info}, faces


def _face_batch_v1(record, lmask: torch.Tensor, state: torch.Tensor) -> protocol.FaceBatch:
    # v1 held the background at the anonymized state itself (its outside equals the original's).
    return protocol.FaceBatch(tuple(f.nonce for f in record.faces), tuple(f.index for f in record.faces), lmask,
                              protocol.public_background(state, lmask))


class _LatentFormat:
    """The scale/shift of a model's latent format, as stored in the metadata."""

    def __init__(self, scale: float, shift: float):
        self.scale_factor, self.shift_factor = scale, shift

    def process_in(self, latent):
        return (latent - self.shift_factor) * self.scale_factor

    def process_out(self, latent):
        return latent / self.scale_factor + self.shift_factor


def record_to_inputs_v1(record, image: torch.Tensor, vae=None):
    """(anonymized LATENT with V1Info, FaceSet, exact?) from a format-v1 record and its image."""
    s = record.settings
    try:
        crop_size = int(s["crop_size"])
        settings = InversionSettings(int(s["steps"]), str(s["scheduler"]), str(s["method"]), float(s["cfg"]),
                                     str(s["model_id"]), str(s.get("cond_id", "")),
                                     torch.tensor([float(v) for v in s["sigmas"]], dtype=torch.float32))
        fmt = _LatentFormat(float(s["latent_scale"]), float(s["latent_shift"]))
        latent_shape = tuple(int(v) for v in s["latent_shape"])
    except (KeyError, TypeError, ValueError):
        raise MetadataError("the KeyFace settings in this image are incomplete; restore needs the PNG exactly as "
                            "Save Anonymized wrote it.") from None
    _check_schedule(settings)
    H, W = image.shape[1:3]
    _check_size(record.image_size, W, H)
    regions = []
    for face in record.faces:
        if face.box is None or face.mask is None or face.mask.shape != (crop_size, crop_size):
            raise MetadataError("a face record in this image lacks its box or mask; the metadata is damaged.")
        regions.append(FaceRegion(face.index, tuple(face.box), torch.from_numpy(face.mask.astype(np.float32) / 255.0)))
    faces = FaceSet((H, W), crop_size, tuple(regions))
    exact = all("state" in f.payload for f in record.faces)
    dtype = core.state_dtype(settings.method)
    partner = None
    if exact:
        state = torch.stack([torch.from_numpy(f.payload["state"].copy()) for f in record.faces]).to(dtype)
        if tuple(state.shape[1:]) != latent_shape:
            raise MetadataError("the stored latent payload does not match the stored latent shape; the metadata is damaged.")
        if all("partner" in f.payload for f in record.faces) and settings.method == "exact":
            partner = torch.stack([torch.from_numpy(f.payload["partner"].copy()) for f in record.faces]).to(dtype)
        samples = fmt.process_out(state).to(torch.float32)
    else:
        if vae is None:
            raise MetadataError("this image carries no latent payload (saved without it, or the payload was stripped); "
                                "connect a VAE to Load Anonymized to re-encode the pixels (approximate restore).")
        crops, _, _ = crop(image, faces)
        samples = vae.encode(crops[..., :3])
        state = fmt.process_in(samples.to(dtype))
        log.warning("KeyFace: no latent payload in this image; restoring from re-encoded pixels is APPROXIMATE.")
    lmask = mask_core.latent_mask(torch.stack([r.mask for r in regions]), latent_shape[-2:])
    sealed = None
    if settings.method == "exact" and all("sealed_residual" in f.payload for f in record.faces):
        sealed = tuple(f.payload["sealed_residual"] for f in record.faces)
        if any(x.dtype != np.uint8 or x.size != 8 * int(np.prod(latent_shape)) for x in sealed):
            raise MetadataError("the sealed residual stored in this image does not match its latent shape; the "
                                "metadata is damaged.")
    # Exact-method images saved before residual sealing carry the residual flipped instead (sealed None).
    anon = V1Anonymized(state, partner, _face_batch_v1(record, lmask, state), tuple(f.key_check for f in record.faces),
                        sealed, record.kdf, settings.method)
    info = V1Info(settings, anon, samples, fmt, exact)
    return {"samples": samples, INFO_KEY: info}, faces, exact


def _check_schedule(settings: InversionSettings) -> None:
    sig = settings.sigmas
    if (settings.method not in core.METHODS or settings.steps < 1 or sig.numel() != settings.steps + 1
            or not bool(torch.isfinite(sig).all()) or float(sig[-1]) != 0.0 or not bool((sig[:-1] >= sig[1:]).all())):
        raise MetadataError("the KeyFace settings in this image are inconsistent (method, steps and noise schedule do "
                            "not agree): the metadata was edited. Restore needs the PNG exactly as Save Anonymized "
                            "wrote it.")


def _check_size(image_size, W: int, H: int) -> None:
    if (W, H) != tuple(image_size):
        raise InputMismatchError(f"the image is {W}x{H} but its KeyFace metadata was written for "
                                 f"{image_size[0]}x{image_size[1]}: it was resized, so restore cannot "
                                 "place the faces. Use the file as Save Anonymized wrote it.")


def decode_crops(vae, samples: torch.Tensor) -> torch.Tensor:
    """VAE-decode face latents one at a time (the same batch shape at save and at restore: bit-identical)."""
    return torch.cat([vae.decode(samples[i:i + 1]) for i in range(samples.shape[0])])[..., :3].to(torch.float32)


def restore_photo(image: torch.Tensor, faces: FaceSet, restored: torch.Tensor, anonymized: torch.Tensor) -> torch.Tensor:
    """The restored photo [1,H,W,3]: the anonymized crops removed from the feather band algebraically."""
    image = _rgb(image)
    _check_image(image, faces)
    out = photo.restore_photo(image[0], [r.box for r in faces.faces], [r.mask for r in faces.faces],
                              _rgb(restored, "restored crops"), _rgb(anonymized, "anonymized crops"))
    return photo.from_u8(photo.to_u8(out))[None]


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".heic", ".avif")
# Words of a file name that say nothing about who is in it (camera prefixes, our own names, fillers).
_NEUTRAL_WORDS = frozenset({"keyface", "anonymized", "anonymised", "anon", "face", "faces", "image", "images", "photo",
                            "photos", "input", "output", "copy", "final", "crop", "crops", "restored", "sample", "img",
                            "dsc", "dscn", "dscf", "pxl", "pic", "pict", "jpg", "png", "new", "old", "edit", "edited",
                            "and", "the", "with", "from", "for", "scan", "screenshot", "portrait", "picture"})


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if len(w) >= 3 and not w.isdigit()}


def prefix_repeats_source_name(prefix: str, prompt) -> bool:
    """True when the output prefix repeats a word of an image file name the graph loads ('obama_portrait.jpg')."""
    if not isinstance(prompt, dict):
        return False
    sources = set()
    for node in prompt.values():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        for value in (inputs or {}).values():
            if isinstance(value, str) and value.lower().split(" [")[0].endswith(_IMAGE_SUFFIXES):
                sources |= _words(Path(value.split(" [")[0]).stem)
    return bool((sources - _NEUTRAL_WORDS) & _words(prefix))


STORE_LANDMARKS = ("auto", "yes", "no")
HINT_NODE = "KeyFaceFaceHint"


def wants_landmarks(choice: str, prompt) -> bool:
    """Save Anonymized's store_landmarks: auto = only when the graph draws a Face Hint (then Restore needs them)."""
    if choice not in STORE_LANDMARKS:
        raise InputMismatchError(f"store_landmarks must be one of {', '.join(STORE_LANDMARKS)}; got '{choice}'.")
    if choice != "auto":
        return choice == "yes"
    return isinstance(prompt, dict) and any(isinstance(n, dict) and n.get("class_type") == HINT_NODE
                                            for n in prompt.values())


def anonymized_file_path(prefix: str, image_hw) -> Path:
    """Next free output path for the prefix (ComfyUI's counter); never derived from the source file name."""
    output = folder_paths.get_output_directory()
    inside = os.path.abspath(os.path.join(output, os.path.dirname(os.path.normpath(prefix))))
    if not prefix.strip() or os.path.commonpath((os.path.abspath(output), inside)) != os.path.abspath(output):
        raise KeyFaceError(f"filename_prefix '{prefix}' does not name a file inside ComfyUI's output folder; use a "
                           "relative name such as keyface/anonymized. Nothing was written.")
    try:
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, output, image_hw[1], image_hw[0])
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        where = os.path.join(output, os.path.dirname(os.path.normpath(prefix)))
        raise KeyFaceError(f"cannot use the output folder {where}: {err.strerror or err}. Pick a filename_prefix "
                           "whose folders can be created in ComfyUI's output folder; nothing was written.") from None
    return Path(folder) / f"{name}_{counter:05}_.png"


# ----------------------------------------------------------------------------------------------
# Node classes
# ----------------------------------------------------------------------------------------------

class FaceMask(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KeyFaceFaceMask", display_name="Face Mask", category=CATEGORY,
            description="Finds faces with dlib (bundled models, no download), numbers them in a preview, and makes a "
                        "soft mask per chosen face (face, face+ears+neck or whole head), plus the square crop each "
                        "face will be anonymized in. Non-faces are rejected by a landmark plausibility check.",
            # The controls added later are optional, so workflows saved before them still validate.
            inputs=[
                io.Image.Input("image", tooltip="One photo (RGB, RGBA or grayscale; alpha is ignored)."),
                io.Int.Input("crop_size", default=512, min=64, max=4096, step=64,
                             tooltip="Working resolution of each face crop: 512 for SD1.5, 1024 for SDXL/SD3/Flux."),
                io.Float.Input("context", default=2.0, min=1.2, max=4.0, step=0.1,
                               tooltip="Crop side as a multiple of the face size (more context = more coherent face)."),
                io.Float.Input("feather", default=0.06, min=0.0, max=0.25, step=0.01,
                               tooltip="Soft edge width, as a fraction of the crop size."),
                io.Int.Input("max_faces", default=16, min=1, max=256,
                             tooltip="Keep at most this many of the chosen faces (the most confident ones)."),
                io.Int.Input("min_face_px", default=0, min=0, max=4096,
                             tooltip="Smallest face to look for and keep (box width in photo pixels). 0 = automatic: "
                                     "32 px, or 1/64 of the photo's long side up to 64 px (12 MP: 64 px). Smaller "
                                     "values find smaller faces and cost more time."),
                io.Combo.Input("detector", options=list(face_core.DETECTORS), default="auto", optional=True,
                               tooltip="auto: HOG; when it finds nothing, HOG on the photo turned 90/270 degrees, then "
                                       "dlib's CNN. hog: fast, frontal faces (today's detector). cnn: dlib's CNN, more "
                                       "poses, slow on CPU (run on a copy of at most 0.5 MP)."),
                io.Combo.Input("coverage", options=list(face_core.COVERAGES), default="face", optional=True,
                               tooltip="How much of the head to replace. face: the face oval (ears, hair and neck stay "
                                       "original and can still identify). face+ears+neck: also ears and neck. head: "
                                       "the whole head with hair. More coverage hides more but changes more."),
                io.Float.Input("threshold", default=0.0, min=-1.0, max=3.0, step=0.05, optional=True,
                               tooltip="Detector score a face must reach (0 = dlib's default). Lower finds more "
                                       "(and more non-faces, still filtered by the plausibility check); higher keeps "
                                       "only sure faces."),
                io.String.Input("faces", default="all", optional=True,
                                tooltip="Which faces to anonymize: 'all', 'largest N', or numbers from the preview "
                                        "such as '0, 2' or '1-3'."),
            ],
            outputs=[io.Mask.Output(display_name="mask", tooltip="Soft mask of every chosen face, at the photo's size."),
                     FacesType.Output(display_name="faces", tooltip="Where each face is: crop boxes and crop masks, "
                                                                    "for Crop Faces / Paste Faces / Save Anonymized."),
                     io.Image.Output(display_name="preview", tooltip="The photo with every detected face boxed and "
                                                                     "numbered (green: anonymized, red: skipped); "
                                                                     "use the numbers in 'faces'.")],
        )

    @classmethod
    def execute(cls, image, crop_size, context, feather, max_faces, min_face_px, detector="auto", coverage="face",
                threshold=0.0, faces="all") -> io.NodeOutput:
        result = find_faces(image, crop_size, context, feather, max_faces, min_face_px, detector, coverage,
                            threshold, faces)
        return io.NodeOutput(result.mask, result.faces, result.preview(image))


class CropFaces(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KeyFaceCropFaces", display_name="Crop Faces", category=CATEGORY,
            description="Cuts each face out as a square crop at the working resolution, with its mask. Feed the crops "
                        "to VAE Encode and the masks to Invert to Noise.",
            inputs=[io.Image.Input("image", tooltip="The same photo Face Mask looked at."),
                    FacesType.Input("faces", tooltip="Face Mask's faces output."),
                    io.Mask.Input("mask", optional=True, tooltip="Any full-image MASK (e.g. from a segmentation pack) "
                                                                 "to use instead of the dlib face masks.")],
            outputs=[io.Image.Output(display_name="crops", tooltip="One square crop per face (a batch): VAE Encode it."),
                     io.Mask.Output(display_name="masks", tooltip="One mask per crop: connect to Invert to Noise."),
                     FacesType.Output(display_name="faces", tooltip="The faces with the masks actually used.")],
        )

    @classmethod
    def execute(cls, image, faces, mask=None) -> io.NodeOutput:
        return io.NodeOutput(*crop(image, faces, mask))


class PasteFaces(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KeyFacePasteFaces", display_name="Paste Faces", category=CATEGORY,
            description="Pastes the processed face crops back into the photo through their soft masks. Every pixel "
                        "outside the masks stays bit-identical to the input photo.",
            inputs=[io.Image.Input("image", tooltip="The photo to paste into (the original, or the loaded "
                                                    "anonymized one when restoring)."),
                    io.Image.Input("crops", tooltip="VAE Decode of Regenerate's (or Restore's) latent."),
                    FacesType.Input("faces", tooltip="Crop Faces' (or Load Anonymized's) faces output.")],
            outputs=[io.Image.Output(display_name="image", tooltip="The photo with the faces replaced; every other "
                                                                   "pixel is bit-identical to the input.")],
        )

    @classmethod
    def execute(cls, image, crops, faces) -> io.NodeOutput:
        return io.NodeOutput(paste(image, crops, faces))


class SaveAnonymized(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KeyFaceSaveAnonymized", display_name="Save Anonymized", category=CATEGORY, is_output_node=True,
            description="Writes the anonymized photo as a PNG carrying only its pixels and the KeyFace record "
                        "(keyed noise, nonces, masks, settings; no workflow, no prompt, no EXIF, no source file name). "
                        "Atomic: no partial files.",
            inputs=[
                io.Image.Input("image", tooltip="Paste Faces' output: the anonymized photo."),
                FacesType.Input("faces", tooltip="Crop Faces' faces output (boxes and masks are stored)."),
                io.Latent.Input("latent", tooltip="Regenerate's output for these faces (it carries the keyed noise "
                                                  "Restore retraces)."),
                io.String.Input("filename_prefix", default="keyface/anonymized",
                                tooltip="Output name prefix; never include the person's or the source file's name."),
                io.Boolean.Input("lossless", default=False, optional=True,
                                 tooltip="Also seal (encrypted with the key) the pixel difference between the original "
                                         "photo and what Restore gives, so Restore returns the original photo bit for "
                                         "bit. Needs original, vae and key connected; adds roughly 200-500 KB per 512x512 face (measured)."),
                io.Image.Input("original", optional=True, tooltip="Lossless mode: the original photo (LoadImage)."),
                io.Vae.Input("vae", optional=True, tooltip="Lossless mode: the VAE that decoded the faces."),
                KeyFaceKey.Input("key", optional=True, tooltip="Lossless mode: the key that seals the pixel residual."),
                io.Combo.Input("store_landmarks", options=list(STORE_LANDMARKS), default="auto", optional=True,
                               tooltip="Store each face's 68 landmarks (numbers, in the clear) so Restore can redraw "
                                       "the same Face Hint for its ControlNet. auto: only when this graph has a Face "
                                       "Hint node. They reveal the original face's geometry (expression, pose, face "
                                       "proportions), never its texture or an identity descriptor."),
            ],
            outputs=[],
            hidden=[io.Hidden.prompt],
        )

    @classmethod
    def execute(cls, image, faces, latent, filename_prefix, lossless=False, original=None, vae=None,
                key=None, store_landmarks="auto") -> io.NodeOutput:
        info = info_of(latent)
        if not isinstance(info, AnonymizedInfo):
            raise InputMismatchError("Save Anonymized needs Regenerate's LATENT output, unchanged.")
        hidden = getattr(cls, "hidden", None)
        if prefix_repeats_source_name(filename_prefix, getattr(hidden, "prompt", None)):
            raise InputMismatchError("filename_prefix repeats a word of the source image's file name, which can "
                                     "name the person; use a neutral prefix such as keyface/anonymized. Nothing was "
                                     "written.")
        image = _rgb(image)
        _check_image(image, faces)
        pixels = _to_uint8(image[0])
        sealed_pixels = None
        if lossless:
            sealed_pixels = _seal_pixels(info, faces, pixels, original, vae, key)
        store = wants_landmarks(store_landmarks, getattr(hidden, "prompt", None))
        record = build_record(faces, info, pixels, sealed_pixels, store)
        path = anonymized_file_path(filename_prefix, faces.image_hw)
        pngio.write_png_atomic(path, pixels, record)
        folder = Path(folder_paths.get_output_directory())
        return io.NodeOutput(ui=ui.SavedImages([ui.SavedResult(path.name, str(path.parent.relative_to(folder)),
                                                                io.FolderType.output)]))


def _seal_pixels(info: AnonymizedInfo, faces: FaceSet, pixels: np.ndarray, original, vae, key) -> tuple:
    """Lossless mode: per face, the sealed residual that turns Restore's photo into the original, and its digest."""
    missing = [name for name, value in (("original", original), ("vae", vae), ("key", key)) if value is None]
    if missing:
        raise InputMismatchError(f"lossless mode needs {', '.join(missing)} connected to Save Anonymized (the original "
                                 "photo, the VAE that decoded the faces, and the key); or turn lossless off.")
    if info.clean is None or info.keyed.lock is None:
        raise InputMismatchError("lossless mode needs the latent of this run (Regenerate's output), not a loaded one.")
    original = _rgb(original)
    _check_image(original, faces)
    fmt = info.latent_format
    restored_crops = decode_crops(vae, fmt.process_out(info.clean).to(torch.float32))
    anonymized_crops = decode_crops(vae, info.samples)
    # Exactly what Restore Photo will compute from the saved 8-bit pixels.
    predicted = photo.to_u8(restore_photo(photo.from_u8(pixels)[None], faces, restored_crops, anonymized_crops)[0])
    original_u8 = _to_uint8(original[0])
    boxes = [r.box for r in faces.faces]
    keys = protocol.image_keys(key, info.keyed.faces.nonces, info.keyed.lock.kdf)
    sealed = []
    for k, region, residual in zip(keys, faces.faces, photo.pixel_residual(original_u8, predicted, boxes)):
        sealed.append(protocol.seal_pixel_residual(k, region.index, region.box, residual,
                                                   photo.box_pixels(original_u8, region.box)))
    return tuple(sealed)


def restore_photo_from(image: torch.Tensor, faces: FaceSet, restored: dict, vae, key=None) -> tuple[torch.Tensor, str]:
    """Restore Photo: the original photo back (ideal within 1 gray level; lossless files: bit for bit, verified)."""
    info = info_of(restored)
    if not isinstance(info, RestoredInfo):
        raise InputMismatchError("Restore Photo needs Restore's 'restored' LATENT, unchanged.")
    if info.anonymized is None:
        raise InputMismatchError("this restored latent does not say which anonymized faces it replaces; connect "
                                 "Restore's output for a loaded or freshly anonymized image.")
    if len(faces.faces) != info.faces.size:
        raise InputMismatchError(f"{info.faces.size} restored faces for {len(faces.faces)} face regions; connect "
                                 "the faces output of the same Load Anonymized.")
    out = restore_photo(image, faces, decode_crops(vae, info.samples), decode_crops(vae, info.anonymized))
    report = info.verification.message()
    if info.sealed_pixels is None:
        return out, report + "; photo: the original with the restored faces (within 1 gray level of the ideal)"
    if key is None:
        return out, report + ("; photo: this file also carries a sealed lossless residual: connect the key to "
                              "Restore Photo to get the original pixels back bit for bit")
    predicted = photo.to_u8(out[0])
    keys = protocol.image_keys(key, info.faces.nonces, info.kdf)
    if info.key_checks is not None and not all(check_matches(k, c) for k, c in zip(keys, info.key_checks)):
        raise WrongKeyError(f"this key ({key.source}) is the wrong key for this file's sealed lossless pixels; connect "
                            "the key that anonymized it.")
    boxes = [r.box for r in faces.faces]
    residuals = [protocol.open_pixel_residual(k, region.index, region.box, sealed)
                 for k, region, sealed in zip(keys, faces.faces, info.sealed_pixels)]
    original = photo.apply_residual(predicted, residuals, boxes)
    verified = all(protocol.pixels_match(k, region.index, region.box, sealed, photo.box_pixels(original, region.box))
                   for k, region, sealed in zip(keys, faces.faces, info.sealed_pixels))
    report += ("; photo: lossless, the original pixels bit for bit (keyed digest verified)" if verified else
               "; photo: lossless residual applied but the keyed pixel digest does NOT match: the file was altered")
    return photo.from_u8(original)[None], report


class RestorePhoto(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KeyFaceRestorePhoto", display_name="Restore Photo", category=CATEGORY,
            description="Puts the restored faces back into the loaded photo, removing every trace of the anonymized "
                        "face from the soft edges. Files saved in lossless mode come back as the original pixels, "
                        "bit for bit, verified.",
            inputs=[io.Image.Input("image", tooltip="Load Anonymized's image."),
                    FacesType.Input("faces", tooltip="Load Anonymized's faces."),
                    io.Latent.Input("restored", tooltip="Restore's output."),
                    io.Vae.Input("vae", tooltip="The checkpoint's VAE (the same as the anonymizing run)."),
                    KeyFaceKey.Input("key", optional=True, tooltip="Only for files saved in lossless mode: opens the "
                                                                   "sealed pixel residual.")],
            outputs=[io.Image.Output(display_name="image", tooltip="The restored photo: save it with Save Image."),
                     io.String.Output(display_name="report", tooltip="What was verified: the face latents, and for "
                                                                     "lossless files the pixels.")],
        )

    @classmethod
    def execute(cls, image, faces, restored, vae, key=None) -> io.NodeOutput:
        out, report = restore_photo_from(image, faces, restored, vae, key)
        log.info("KeyFace: %s", report)
        return io.NodeOutput(out, report, ui=ui.PreviewText(report))


def _input_files() -> list[str]:
    folder = folder_paths.get_input_directory()
    return sorted(f for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f))) if os.path.isdir(folder) else []


SAME_FILE = "(from the image)"


def _resampled(pixels: np.ndarray, size: tuple) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.fromarray(pixels).resize(tuple(size), Image.Resampling.LANCZOS)).copy()


def load_anonymized(path, metadata_path=None, vae=None, allow_altered: bool = False):
    """(IMAGE, anonymized LATENT, FaceSet, warnings) from a Save Anonymized PNG, or from an altered copy of it.

    The record comes from `path` itself, or from `metadata_path` (the PNG Save Anonymized wrote) when `path`
    is a copy that lost it (a JPEG a site served, a resized copy). A record is bound to its pixels: pixels edited
    after saving, or a record placed on other pixels, are refused unless `allow_altered` (then a warning)."""
    pixels, record, read = pngio.read_png(path)
    warnings = list(read.warnings)
    separate = metadata_path is not None
    if separate:
        _, record, _ = pngio.read_png(metadata_path)
        if record is None:
            raise MetadataError(f"'{Path(metadata_path).name}' (chosen as metadata) carries no KeyFace metadata either; "
                                "pick the PNG Save Anonymized wrote.")
        warnings = [w for w in warnings if "metadata cannot be present" not in w and "cannot carry" not in w]
        if read.lossy:
            warnings.append(f"the image is {read.format}, recompressed with losses: exactness is lost wherever its "
                            "pixels are used")
    if record is None:
        raise MetadataError(_no_record_message(Path(path).name, read))
    size = tuple(record.image_size)
    if (pixels.shape[1], pixels.shape[0]) != size:
        warnings = [w for w in warnings if "resized after anonymization" not in w]
        warnings.append(f"the image is {pixels.shape[1]}x{pixels.shape[0]} but was saved as {size[0]}x{size[1]}; it "
                        "was resampled back, so pixels outside the faces are not the saved ones (exactness lost)")
        pixels = _resampled(pixels, size)
    tensor = torch.from_numpy(pixels.astype(np.float32) / 255.0)[None]
    if isinstance(record, anonymized_file.AnonymizedFile):
        warnings += _check_binding(record, pixels, separate or read.lossy or bool(read.resized), allow_altered)
        latent, faces = file_to_inputs(record, tensor)
        return tensor, latent, faces, warnings
    stored = record.settings.get("pixels_sha256")
    exact_payload = all("state" in f.payload for f in record.faces)
    if isinstance(stored, str) and pixels_digest(pixels) != stored:
        warnings.append("the pixels differ from those Save Anonymized wrote (recompressed, resized or edited): the "
                        "restored photo keeps those changes outside the faces"
                        + ("; the faces themselves restore exactly from the stored latents" if exact_payload
                           else ", and the faces are re-encoded from them: approximate"))
    latent, faces, _ = record_to_inputs_v1(record, tensor, vae)
    return tensor, latent, faces, warnings


def _no_record_message(name: str, read) -> str:
    """B01/B07: say what the file is, not what it might have been."""
    if read.lossy:
        return (f"'{name}' carries no KeyFace metadata: it is a {read.format} file, and lossy formats drop it "
                "(nonces, masks, keyed noise). Restore needs the PNG exactly as Save Anonymized wrote it; or choose "
                "that PNG as Load Anonymized's metadata to restore this copy.")
    return (f"this image was not made by Save Anonymized (no KeyFace data in '{name}'): there is nothing to restore. "
            "Pick the PNG Save Anonymized wrote (keyface/anonymized_*.png in the output folder).")


def _check_binding(file, pixels: np.ndarray, expected_changes: bool, allow_altered: bool) -> list:
    """A record belongs to one photo: refuse it on other pixels, and on pixels edited after saving."""
    if anonymized_file.pixels_digest(pixels) == file.pixels_sha256:
        return []
    if file.look and anonymized_file.look_distance(file.look, anonymized_file.look_hash(pixels)) > anonymized_file.SAME_LOOK:
        raise InputMismatchError("this KeyFace record belongs to another image: the pixels it was made with look "
                                 "different (its stored look hash does not match). Use the PNG exactly as Save "
                                 "Anonymized wrote it, or choose that PNG as the metadata of a copy of it.")
    altered = anonymized_file.altered_regions(file, pixels)
    where = f"face(s) {altered}" if altered else "the background"
    if not (expected_changes or allow_altered):
        raise InputMismatchError(f"the pixels of this file were edited after it was saved ({where} differ from the "
                                 "record's digests), so the restored photo would keep those edits. Use the file "
                                 "exactly as Save Anonymized wrote it, or enable allow_altered to restore anyway.")
    return [f"the pixels differ from those Save Anonymized wrote ({where}): the restored photo keeps those changes "
            "outside the faces; the faces themselves restore exactly from the stored keyed noise"]


def _comfy_file(name: str, what: str) -> str:
    """Path of an input/output/temp file named the ComfyUI way ("x.png", "x.png [output]"); never outside them."""
    path = os.path.realpath(folder_paths.get_annotated_filepath(name))
    roots = [os.path.realpath(d) for d in (folder_paths.get_input_directory(), folder_paths.get_output_directory(),
                                           folder_paths.get_temp_directory())]
    if not any(os.path.commonpath((root, path)) == root for root in roots):
        raise InputMismatchError(f"the {what} '{name}' is outside ComfyUI's input, output and temp folders; upload "
                                 "the file (or put it in the input folder) and pick it from the list.")
    return path


def _file_fingerprint(path: str) -> str:
    try:
        st = os.stat(path)
        return f"{path}:{st.st_mtime_ns}:{st.st_size}"
    except OSError:
        return f"{path}:missing"


class LoadAnonymized(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KeyFaceLoadAnonymized", display_name="Load Anonymized", category=CATEGORY,
            description="Loads a PNG written by Save Anonymized: the photo, its keyed noise and the faces, ready for "
                        "Restore -> Restore Photo. Refuses a record that does not belong to these pixels.",
            inputs=[
                io.Combo.Input("image", options=_input_files(), upload=io.UploadType.image,
                               tooltip="The anonymized PNG, in ComfyUI's input folder."),
                io.Vae.Input("vae", optional=True, tooltip="Only for old (format v1) files saved without their latent "
                                                          "payload: the crops are re-encoded from pixels (approximate)."),
                io.Combo.Input("metadata", options=[SAME_FILE, *_input_files()], default=SAME_FILE, optional=True,
                               tooltip="Where the KeyFace metadata comes from. Normally the image itself; pick the "
                                       "original PNG here to restore a copy that lost it (a JPEG or resized copy): "
                                       "works, with a warning that exactness is lost outside the faces."),
                io.Boolean.Input("allow_altered", default=False, optional=True,
                                 tooltip="Restore even when the pixels were edited after saving (the edits stay in "
                                         "the restored photo; the faces still restore exactly). Off: refused."),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="The anonymized photo as saved."),
                     io.Latent.Output(display_name="latent", tooltip="The anonymized face latents with their KeyFace "
                                                                     "info: connect to Restore."),
                     FacesType.Output(display_name="faces", tooltip="The stored faces: connect to Paste Faces.")],
        )

    @classmethod
    def execute(cls, image, vae=None, metadata=SAME_FILE, allow_altered=False) -> io.NodeOutput:
        path = _comfy_file(image, "image")
        metadata_path = None if metadata in (None, SAME_FILE) else _comfy_file(metadata, "metadata file")
        tensor, latent, faces, warnings = load_anonymized(path, metadata_path, vae, bool(allow_altered))
        for warning in warnings:
            log.warning("KeyFace: %s", warning)
        return io.NodeOutput(tensor, latent, faces)

    @classmethod
    def fingerprint_inputs(cls, image, vae=None, metadata=SAME_FILE, allow_altered=False):
        paths = [folder_paths.get_annotated_filepath(image)]
        if metadata not in (None, SAME_FILE):
            paths.append(folder_paths.get_annotated_filepath(metadata))
        return "|".join(_file_fingerprint(p) for p in paths)

    @classmethod
    def validate_inputs(cls, image, vae=None, metadata=SAME_FILE, allow_altered=False):
        for name, what in ((image, "image"), (metadata, "metadata file")):
            if what == "metadata file" and name in (None, SAME_FILE):
                continue
            try:
                path = _comfy_file(name, what)
            except InputMismatchError as err:
                return str(err)
            if not os.path.isfile(path):
                return f"the {what} '{name}' was not found in ComfyUI's input folder; upload it and pick it again."
        return True


NODES = [FaceMask, CropFaces, PasteFaces, SaveAnonymized, LoadAnonymized, RestorePhoto]
