"""The paper's setting, reproducible: `keyface paper` (or `python benchmarks/paper_setting.py`).

Labarbarie, Itier, Puech, "Secure and reversible face anonymization with diffusion models" (arXiv 2510.01031):
an unconditional face LDM (diffusers `UNet2DModel` + `VQModel`, 256x256 faces), DDIM 50 steps, the key's sign flip
inside the face mask. This runs that setting through KeyFace's protocol on a folder of face photos and prints the
paper's columns next to its published numbers:

- re-identification rate after anonymization, after restore, and after restore with a wrong key: the dlib 128-d
  descriptor (`keyface_core.faces.face_descriptor`) of each original face against the same face in the other
  image; distance < 0.6 (dlib's same-person threshold) = re-identified. ArcFace or FaceNet too, if the user gives
  weights (`--arcface/--facenet`, TorchScript or ONNX; cosine similarity over a 5-point aligned crop);
- restore PSNR / SSIM (scikit-image) over each face's square crop box, against the original photo (the paper's
  measure), and against what the model's autoencoder can represent (the original with its face crop replaced by
  the VAE's reconstruction), plus the restored latent's error (the keyed digest check of the file);
- the face detection rate on anonymized images (dlib HOG);
- model calls per anonymization and per restore (the paper: 100 and 100).

Which sampler is "DDIM 50 steps" here (keyface_core/sampling.py, ComfyUI's sigma space): the new face is drawn by
`euler`, the deterministic first-order step x' = x + (sigma' - sigma) (x - D(x, sigma)) / sigma, which *is* DDIM
with eta = 0 for an eps model (Karras et al. 2022, eq. 4 and its DDIM remark), over the `simple` schedule (evenly
spaced training timesteps, DDIM's spacing). The inversion is KeyFace's `exact` method (BDIA leapfrog, gamma = 1),
not the paper's plain DDIM inversion: that is what makes the restore exact (see `WHY_EXACT`).

With no `--model`, a seeded random-weight tiny LDM is written to a temporary folder: the numbers then test the
mechanics only, and every output says so. Exit codes: 0 done, 2 the run cannot start (model, faces, weights, key).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:   # `python benchmarks/paper_setting.py` from anywhere
    sys.path.insert(0, str(REPO))

EXIT_OK, EXIT_USAGE = 0, 2
DLIB_THRESHOLD = 0.6
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")

# The paper's own numbers (REFERENCE.md section 1: authors' notebook, LFW, 1,600 pairs, their FFHQ LDM).
PAPER = {
    "reid_anonymized": "0.3-0.6 % (TAR at 0.1 % FAR, FaceNet)",
    "reid_restored": "39-71 % (TAR at 0.1 % FAR)",
    "reid_wrong_key": "not reported",
    "psnr": "20.7 dB",
    "ssim": "0.857",
    "latent_error": "not exact (approximate inversion, re-encoded pixels, re-estimated mask)",
    "detection": "100 %",
    "calls": "100 / 100",
}

MECHANICS_WARNING = ("MECHANICS ONLY: the model is a seeded random-weight tiny LDM, not a trained face model. These "
                     "numbers check that the pipeline runs and restores exactly; they say nothing about privacy or "
                     "image quality. Pass --model with a trained face LDM (e.g. a local copy of "
                     "CompVis/ldm-celebahq-256) for the real table.")

WHY_EXACT = (
    "Why KeyFace's restore is exact where the paper's is 20.7 dB: (1) the inversion is the algebraically invertible "
    "BDIA leapfrog in float64, not plain DDIM inversion; (2) the file stores the keyed noise itself, so restore "
    "never decodes, rounds and re-encodes the anonymized pixels; (3) the mask is stored, not re-estimated from the "
    "anonymized face; (4) the background trajectory comes from public data (the background and a nonce), the same "
    "on both sides. Restore is unflip + the inversion's forward retrace, checked against a keyed digest of the "
    "original latent (error 0 below). What remains between the restored photo and the original is the autoencoder "
    "alone: inside the face mask the restored pixels are the VAE's reconstruction of the original face (the "
    "ComfyUI nodes' lossless mode adds a sealed pixel residual that makes them bit-exact; the CLI has no such "
    "option yet).")


class SettingError(Exception):
    """The run cannot start as asked (message says what to do); exit code 2."""


# ----------------------------------------------------------------------------------------------
# Optional identity models (ArcFace / FaceNet weights the user supplies)
# ----------------------------------------------------------------------------------------------

# insightface's 5-point template for 112x112 ArcFace crops (eyes, nose tip, mouth corners; image left first).
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)


def five_points(landmarks: np.ndarray) -> np.ndarray:
    """dlib's 68 landmarks -> the 5 points ArcFace aligns by (eye centres, nose tip, mouth corners)."""
    lm = np.asarray(landmarks, dtype=np.float64)
    return np.stack([lm[36:42].mean(0), lm[42:48].mean(0), lm[30], lm[48], lm[54]])


@dataclass
class Embedder:
    """A user-supplied face-recognition network: aligned RGB crop -> identity vector, compared by cosine."""

    name: str            # "ArcFace" | "FaceNet"
    source: str          # the file's name (never its full path: reports carry no machine paths)
    size: int            # input side (112 ArcFace, 160 FaceNet)
    threshold: float     # cosine similarity at or above which two faces count as the same person
    run: object = field(repr=False)

    def embed(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        from skimage.transform import SimilarityTransform, warp
        template = ARCFACE_TEMPLATE * (self.size / 112.0)
        transform = SimilarityTransform.from_estimate(five_points(landmarks), template)
        if not transform:
            raise SettingError(f"{self.name}: cannot align a face (degenerate landmarks)")
        crop = warp(image, transform.inverse, output_shape=(self.size, self.size), order=1, preserve_range=True)
        x = ((crop.astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None]   # both nets: [-1, 1] RGB NCHW
        vector = np.asarray(self.run(np.ascontiguousarray(x)), dtype=np.float64).reshape(-1)
        return vector / max(float(np.linalg.norm(vector)), 1e-12)


def load_embedder(name: str, path: str, threshold: float) -> Embedder:
    """A torch.export program (.pt2), TorchScript (.pt/.pth/.ts) or ONNX (.onnx) face-recognition network, checked
    on one input."""
    size = 112 if name == "ArcFace" else 160
    flag = f"--{name.lower()}"
    file = Path(path).expanduser()
    if not file.is_file():
        raise SettingError(f"{flag}: {file.name!r} is not a file. Pass {name} weights as an exported program "
                           "(.pt2, torch.export.save), a TorchScript module (.pt) or an ONNX file.")
    if file.suffix.lower() == ".onnx":
        try:
            import onnxruntime
        except ImportError:
            raise SettingError(f"{flag}: {file.name} is an ONNX model, which needs onnxruntime "
                               "(pip install onnxruntime), or export it to TorchScript.") from None
        try:
            session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
        except Exception as err:   # onnxruntime raises its own exception types for bad files
            raise SettingError(f"{flag}: onnxruntime cannot load {file.name} ({type(err).__name__}).") from None
        input_name = session.get_inputs()[0].name

        def run(x):
            return session.run(None, {input_name: x})[0]
    else:
        import warnings
        import torch
        try:
            if file.suffix.lower() == ".pt2":   # torch.export.save(torch.export.export(model, (x,)), "net.pt2")
                module = torch.export.load(str(file)).module()
            else:
                with warnings.catch_warnings():   # torch 2.14 deprecates TorchScript; the user's file is one
                    warnings.simplefilter("ignore", FutureWarning)
                    module = torch.jit.load(str(file), map_location="cpu").eval()
        except Exception as err:   # a state dict, a pickle, a damaged file: torch raises several types
            raise SettingError(f"{flag}: {file.name} is not a TorchScript module or an exported program "
                               f"({type(err).__name__}). A state dict alone has no architecture: build the network, "
                               "load the weights, then torch.export.save(torch.export.export(model, (x,)), 'net.pt2') "
                               "or torch.jit.script(model).save('net.pt'), or pass an ONNX file.") from None

        def run(x):
            with torch.no_grad():
                return module(torch.from_numpy(x)).detach().cpu().numpy()
    embedder = Embedder(name, file.name, size, threshold, run)
    try:
        probe = np.asarray(run(np.zeros((1, 3, size, size), dtype=np.float32)))
    except Exception as err:   # wrong input size or layout: report, do not crash mid-run
        raise SettingError(f"{flag}: {file.name} does not run on a 1x3x{size}x{size} RGB crop in [-1, 1] "
                           f"({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}).") from None
    if probe.ndim != 2 or probe.shape[0] != 1 or probe.shape[1] < 2:
        raise SettingError(f"{flag}: {file.name} returns shape {tuple(probe.shape)}; expected one identity vector "
                           "[1, D] per face.")
    return embedder


# ----------------------------------------------------------------------------------------------
# Measures
# ----------------------------------------------------------------------------------------------

def psnr(reference: np.ndarray, test: np.ndarray) -> float:
    from skimage.metrics import peak_signal_noise_ratio
    if np.array_equal(reference, test):
        return math.inf
    return float(peak_signal_noise_ratio(reference, test, data_range=255))


def ssim(reference: np.ndarray, test: np.ndarray) -> float:
    """Wang et al. 2004 SSIM (Gaussian window sigma 1.5, population covariance), over RGB channels."""
    from skimage.metrics import structural_similarity
    return float(structural_similarity(reference, test, channel_axis=2, data_range=255, gaussian_weights=True,
                                       sigma=1.5, use_sample_covariance=False))


def _iou(a, b) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, x1 - x0) * max(0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def matched_detection(original, detections: list):
    """The detection in another image that is the same face as `original` (box IoU >= 0.3), or None."""
    best = max(detections, key=lambda d: _iou(original.box, d.box), default=None)
    return best if best is not None and _iou(original.box, best.box) >= 0.3 else None


@dataclass
class Identity:
    """One face compared with the original: detected again? descriptor distance, re-identified?"""

    detected: bool
    dlib_distance: float
    reidentified: bool
    embeddings: dict = field(default_factory=dict)   # name -> {"cosine": c, "reidentified": bool}


def compare_identity(original_image, original_det, original_desc, other_image, embedders, original_embeds) -> Identity:
    from keyface_core import faces as face_core
    found = matched_detection(original_det, face_core.detect_faces(other_image))
    # No face found there: describe it at the original's landmarks anyway (an attacker who knows where the face
    # was); that can only raise the re-identification rate.
    at = found if found is not None else original_det
    distance = face_core.identity_distance(original_desc, face_core.face_descriptor(other_image, at))
    embeddings = {}
    for embedder in embedders:
        cosine = float(np.dot(original_embeds[embedder.name], embedder.embed(other_image, at.landmarks)))
        embeddings[embedder.name] = {"cosine": round(cosine, 6), "reidentified": cosine >= embedder.threshold}
    return Identity(found is not None, round(distance, 6), distance < DLIB_THRESHOLD, embeddings)


@dataclass
class FaceRow:
    """One face of one photo: every measure the table aggregates (the JSON's per-face rows)."""

    photo: str
    face: int
    box: tuple                       # (x, y, size): the square crop the model saw
    anonymized: Identity
    restored: Identity
    wrong_key: Identity
    psnr: float                      # restored vs original, over the crop box (the paper's measure)
    ssim: float
    psnr_vs_vae: float               # restored vs the original with the VAE-reconstructed face (the model's ceiling)
    ssim_vs_vae: float
    vae_psnr: float                  # the VAE reconstruction vs the original: what any latent restore is bounded by
    max_levels_vs_vae: int           # largest |restored - VAE reconstruction| in 8-bit levels
    dlib_restored_vs_vae: float      # identity distance restored vs VAE reconstruction (the protocol alone: ~0)


@dataclass
class PhotoRow:
    photo: str
    faces: int
    status: str                       # "ok" | "no_face" | "failed"
    reason: str = ""
    verified: Optional[bool] = None   # restored latents match the keyed digests
    max_abs_error: Optional[float] = None
    anonymize_calls: int = 0
    restore_calls: int = 0
    anonymize_seconds: float = 0.0
    restore_seconds: float = 0.0


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------

def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="keyface paper", description="The paper's setting (Labarbarie et al., arXiv 2510.01031) on a folder of "
        "faces: unconditional face LDM, DDIM 50 steps, sign flip in the face mask; prints the paper's columns next "
        "to its published numbers. Exit codes: 0 done, 2 the run cannot start.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=None, help="a diffusers face-LDM folder (unet/ + vqvae/ + scheduler/) or "
                        "a cached Hugging Face repo id, e.g. CompVis/ldm-celebahq-256. Default: a seeded random "
                        "tiny LDM in a temporary folder (mechanics only).")
    parser.add_argument("--faces", default=str(REPO.parent / "shared" / "faces"), help="folder of face photos")
    parser.add_argument("--size", type=int, default=256, help="face crop side in pixels (the paper: 256)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (the paper: 50)")
    parser.add_argument("--scramble", choices=("signflip", "pairswap"), default="signflip",
                        help="signflip: the paper's keyed sign flip inside the face mask; pairswap: KeyFace's default")
    parser.add_argument("--key", default=None, help="a key file from `keyface keygen`, or env:VAR. Default: a fresh "
                        "random key held in memory only.")
    parser.add_argument("--out", default="keyface-paper-out", help="folder for anonymized/, restored/, wrong_key/ "
                        "and paper_setting.md/.json")
    parser.add_argument("--arcface", default=None, help="ArcFace network: torch.export .pt2, TorchScript .pt or "
                        "ONNX .onnx; 112x112 RGB in [-1, 1]")
    parser.add_argument("--facenet", default=None, help="FaceNet network: torch.export .pt2, TorchScript .pt or "
                        "ONNX .onnx; 160x160 RGB in [-1, 1]")
    parser.add_argument("--arcface-threshold", type=float, default=0.3,
                        help="cosine similarity counted as the same person for ArcFace (set yours for a FAR)")
    parser.add_argument("--facenet-threshold", type=float, default=0.4,
                        help="cosine similarity counted as the same person for FaceNet (0.4 ~ distance 1.1)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N photos (sorted by name)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1...")
    return parser.parse_args(argv)


def list_photos(folder: Path, limit: Optional[int]) -> list[Path]:
    if not folder.is_dir():
        raise SettingError(f"--faces {folder.name!r} is not a folder; pass a folder of face photos.")
    photos = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if limit is not None:
        photos = photos[:max(0, limit)]
    if not photos:
        raise SettingError(f"--faces {folder.name!r} holds no photo ({', '.join(IMAGE_SUFFIXES)}).")
    return photos


def load_key(spec: Optional[str]):
    from keyface_core.errors import KeyFaceError
    from keyface_core.keys import SecretKey, generate_key, key_from_env, load_key_file
    if spec is None:
        return SecretKey(generate_key(), kind="key", source="a fresh random key (memory only)"), "a fresh random key"
    try:
        if spec.startswith("env:"):
            return key_from_env(spec[4:]), "from an environment variable"
        if not Path(spec).is_file():
            raise SettingError("--key is not an existing key file; pass a file made by `keyface keygen` or env:VAR "
                               "(never the key itself).")
        return load_key_file(spec), "from a key file"
    except KeyFaceError as err:
        raise SettingError(f"--key: {err}") from None


def load_model(spec: Optional[str], device: str, workdir: Path):
    """(model, description, mechanics_only)."""
    try:   # diffusers advises installing accelerate on every load; the table is the output here
        from diffusers.utils import logging as diffusers_logging
        diffusers_logging.set_verbosity_error()
    except ImportError:
        pass
    from keyface.models import load_model as load
    from keyface_core.errors import KeyFaceError
    if spec is None:
        from keyface_dev.tiny_diffusers import save_tiny_ldm
        folder = save_tiny_ldm(workdir / "tiny-ldm", seed=0)
        model = load(str(folder), device=device)
        return model, "seeded random tiny LDM (UNet2DModel + VQModel, keyface_dev.tiny_diffusers, seed 0)", True
    try:
        model = load(spec, device=device)
    except KeyFaceError as err:
        raise SettingError(f"--model: {err}") from None
    shown = spec if (not Path(spec).expanduser().exists() and spec.count("/") == 1) else Path(spec).name
    return model, f"{shown} ({model.model_id})", spec.startswith("dev:")


def run(args: argparse.Namespace) -> dict:
    import torch
    from keyface import pipeline, store
    from keyface_core import faces as face_core
    from keyface_core import masks as mask_core
    from keyface_core import photo as photo_core
    from keyface_core.errors import KeyFaceError, NoFaceError
    from keyface_core.keys import SecretKey, generate_key

    try:
        import skimage  # noqa: F401  (PSNR/SSIM and the ArcFace alignment)
    except ImportError:
        raise SettingError("the paper's columns need scikit-image for PSNR/SSIM: pip install scikit-image") from None
    if args.size < 8 or args.size % 8:
        raise SettingError(f"--size {args.size} must be a multiple of 8 (the latent grid), >= 8.")
    if args.steps < 1:
        raise SettingError("--steps must be at least 1.")
    photos = list_photos(Path(args.faces).expanduser(), args.limit)
    key, key_origin = load_key(args.key)
    wrong_key = SecretKey(generate_key(), kind="key", source="a random wrong key")
    embedders = [load_embedder(name, path, threshold) for name, path, threshold in
                 (("ArcFace", args.arcface, args.arcface_threshold), ("FaceNet", args.facenet, args.facenet_threshold))
                 if path]
    with tempfile.TemporaryDirectory(prefix="keyface-paper-") as workdir:
        start = time.perf_counter()
        model, model_text, mechanics_only = load_model(args.model, args.device, Path(workdir))
        load_seconds = time.perf_counter() - start
        out = Path(args.out)   # created only once everything could start
        for sub in ("anonymized", "restored", "wrong_key"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        native = _native_size(model)
        settings = pipeline.Settings(steps=args.steps, scheduler="simple", method="exact", sampler="euler",
                                     scramble=args.scramble, crop_size=args.size, nonce="random")
        if mechanics_only:
            print(MECHANICS_WARNING, flush=True)
        photo_rows, face_rows = [], []
        try:
            for index, source in enumerate(photos, 1):
                print(f"[{index}/{len(photos)}] {source.name}", flush=True)
                rows, photo_row = _one_photo(source, out, settings, model, key, wrong_key, embedders, pipeline,
                                             face_core, mask_core, photo_core, torch, KeyFaceError, NoFaceError)
                photo_rows.append(photo_row)
                face_rows.extend(rows)
        finally:
            store.cleanup(out)   # the atomic writes' per-process staging folders
    return {
        "setting": {"model": model_text, "mechanics_only": mechanics_only, "faces_folder": Path(args.faces).name,
                    "photos": len(photos), "size": args.size, "native_size": native, "steps": args.steps,
                    "scheduler": "simple (evenly spaced training timesteps, DDIM's spacing)",
                    "sampler": "euler = DDIM eta 0 (deterministic first-order step in sigma space)",
                    "inversion": "exact (BDIA leapfrog, gamma 1, float64)", "scramble": args.scramble,
                    "mask": "dlib 68-landmark face polygon (the paper: BiSeNet parsing)",
                    "key": key_origin, "wrong_key": "a fresh random key",
                    "identity": ["dlib (distance < 0.6)"] + [f"{e.name} {e.source} (cosine >= {e.threshold:g})"
                                                             for e in embedders],
                    "model_load_seconds": round(load_seconds, 2)},
        "summary": summarize(face_rows, photo_rows, embedders),
        "photos": [asdict(r) for r in photo_rows],
        "faces": [asdict(r) for r in face_rows],
    }


def _native_size(model) -> Optional[int]:
    unet = getattr(model, "unet", None)
    sample = getattr(getattr(unet, "config", None), "sample_size", None)
    if isinstance(sample, int):
        return sample * int(getattr(model, "downscale", 1))
    return None


def _one_photo(source, out, settings, model, key, wrong_key, embedders, pipeline, face_core, mask_core, photo_core,
               torch, KeyFaceError, NoFaceError):
    name = source.stem + ".png"
    anon_path, restored_path, wrong_path = (out / sub / name for sub in ("anonymized", "restored", "wrong_key"))
    try:
        anonymized = pipeline.anonymize_image(source, anon_path, settings, model, key)
        restored = pipeline.restore_image(anon_path, restored_path, pipeline.RestoreSettings(), model, key)
        pipeline.restore_image(anon_path, wrong_path, pipeline.RestoreSettings(allow_wrong_key=True), model, wrong_key)
    except NoFaceError as err:
        return [], PhotoRow(source.name, 0, "no_face", str(err))
    except KeyFaceError as err:
        return [], PhotoRow(source.name, 0, "failed", str(err))
    original, _ = pipeline.read_image(source, settings.max_megapixels)
    faces = pipeline.find_faces(original, settings)            # the same detection anonymize used
    # The model's ceiling: the original with each face crop replaced by its VAE reconstruction, pasted with the
    # same soft masks as the restore (pipeline.clean_latents is the latent anonymize started from).
    with torch.no_grad():
        clean = pipeline.clean_latents(source, settings, model)
        recon = torch.cat([model.decode(clean[i:i + 1]) for i in range(clean.shape[0])]).to(torch.float32)
    ideal = photo_core.from_u8(original)
    for box, crop, soft in zip(faces.boxes, recon.permute(0, 2, 3, 1), faces.masks):
        ideal = mask_core.paste_square(ideal, crop, box, soft)
    ideal = photo_core.to_u8(ideal)
    images = {kind: pipeline.read_image(path, settings.max_megapixels)[0]
              for kind, path in (("anonymized", anon_path), ("restored", restored_path), ("wrong_key", wrong_path))}
    detections = face_core.detect_faces(original)
    rows = []
    for i, box in enumerate(faces.boxes):
        x, y, size = box
        region = (slice(y, y + size), slice(x, x + size))
        # The dlib detection this crop came from: the one whose box centre lies in the crop, nearest its centre.
        det = min(detections, key=lambda d: abs((d.box[0] + d.box[2]) / 2 - (x + size / 2)) +
                  abs((d.box[1] + d.box[3]) / 2 - (y + size / 2)))
        desc = face_core.face_descriptor(original, det)
        embeds = {e.name: e.embed(original, det.landmarks) for e in embedders}
        ident = {kind: compare_identity(original, det, desc, image, embedders, embeds)
                 for kind, image in images.items()}
        o, r, v = original[region], images["restored"][region], ideal[region]
        rows.append(FaceRow(source.name, i, tuple(int(b) for b in box), ident["anonymized"], ident["restored"],
                            ident["wrong_key"], psnr(o, r), ssim(o, r), psnr(v, r), ssim(v, r), psnr(o, v),
                            int(np.abs(r.astype(np.int16) - v.astype(np.int16)).max()),
                            round(face_core.identity_distance(face_core.face_descriptor(ideal, det),
                                                              face_core.face_descriptor(images["restored"], det)), 6)))
    photo_row = PhotoRow(source.name, len(faces.boxes), "ok", "", restored.verified, restored.max_abs_error,
                         anonymized.model_calls, restored.model_calls, round(anonymized.seconds, 3),
                         round(restored.seconds, 3))
    return rows, photo_row


# ----------------------------------------------------------------------------------------------
# Summary and table
# ----------------------------------------------------------------------------------------------

def _rate(values: list) -> dict:
    n, k = len(values), sum(bool(v) for v in values)
    return {"rate": (k / n) if n else None, "count": k, "of": n}


def _mean(values: list) -> Optional[float]:
    """Mean of finite values; inf when every value is inf (identical images), None without values."""
    if not values:
        return None
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.inf
    return float(np.mean(finite))


def summarize(faces: list, photos: list, embedders: list) -> dict:
    ok = [p for p in photos if p.status == "ok"]
    summary = {
        "photos_ok": len(ok), "photos_no_face": sum(p.status == "no_face" for p in photos),
        "photos_failed": sum(p.status == "failed" for p in photos), "faces": len(faces),
        "reid_anonymized": _rate([f.anonymized.reidentified for f in faces]),
        "reid_restored": _rate([f.restored.reidentified for f in faces]),
        "reid_wrong_key": _rate([f.wrong_key.reidentified for f in faces]),
        "dlib_distance_median": {kind: (float(np.median([getattr(f, kind).dlib_distance for f in faces]))
                                        if faces else None) for kind in ("anonymized", "restored", "wrong_key")},
        "detection_anonymized": _rate([f.anonymized.detected for f in faces]),
        "psnr": _mean([f.psnr for f in faces]), "ssim": _mean([f.ssim for f in faces]),
        "psnr_vs_vae": _mean([f.psnr_vs_vae for f in faces]), "ssim_vs_vae": _mean([f.ssim_vs_vae for f in faces]),
        "vae_psnr": _mean([f.vae_psnr for f in faces]),
        "max_levels_vs_vae": max((f.max_levels_vs_vae for f in faces), default=None),
        "dlib_restored_vs_vae_max": max((f.dlib_restored_vs_vae for f in faces), default=None),
        "verified": _rate([p.verified for p in ok]),
        "max_abs_error": max((p.max_abs_error for p in ok if p.max_abs_error is not None), default=None),
        # Per photo: all faces of a photo go through the UNet as one batch, so a call serves every face.
        "calls_per_anonymization": (float(np.mean([p.anonymize_calls for p in ok])) if ok else None),
        "calls_per_restore": (float(np.mean([p.restore_calls for p in ok])) if ok else None),
        "seconds_per_photo": (float(np.mean([p.anonymize_seconds + p.restore_seconds for p in ok])) if ok else None),
    }
    for embedder in embedders:
        for kind in ("anonymized", "restored", "wrong_key"):
            summary[f"{embedder.name}_{kind}"] = _rate([getattr(f, kind).embeddings[embedder.name]["reidentified"]
                                                        for f in faces])
    return summary


def _pct(rate: dict) -> str:
    return "n/a (no face)" if rate["rate"] is None else f"{100 * rate['rate']:.1f} % ({rate['count']}/{rate['of']})"


def _db(value) -> str:
    return "n/a" if value is None else ("inf (identical)" if math.isinf(value) else f"{value:.2f} dB")


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def table(result: dict) -> str:
    s, st = result["summary"], result["setting"]
    ours = "this run (MECHANICS ONLY: random tiny model)" if st["mechanics_only"] else "this run"
    med = s["dlib_distance_median"]

    def dist(kind):
        return "" if med[kind] is None else f"; median distance {med[kind]:.3f}"
    rows = [
        ("re-identified after anonymization (dlib < 0.6)", PAPER["reid_anonymized"],
         _pct(s["reid_anonymized"]) + dist("anonymized")),
        ("re-identified after restore (dlib < 0.6)", PAPER["reid_restored"],
         _pct(s["reid_restored"]) + dist("restored")),
        ("re-identified after restore with a wrong key", PAPER["reid_wrong_key"],
         _pct(s["reid_wrong_key"]) + dist("wrong_key")),
        ("restore PSNR vs the original (through the VAE)", PAPER["psnr"], _db(s["psnr"])),
        ("restore SSIM vs the original (through the VAE)", PAPER["ssim"], _num(s["ssim"])),
        ("restore PSNR / SSIM vs the VAE reconstruction (what an exact latent restore gives)", "-",
         f"{_db(s['psnr_vs_vae'])} / {_num(s['ssim_vs_vae'])}; largest difference "
         f"{s['max_levels_vs_vae']} gray level(s) (8-bit rounding); dlib distance at most "
         f"{_num(s['dlib_restored_vs_vae_max'])}"),
        ("the VAE's own reconstruction PSNR (the ceiling of any latent restore)", "-", _db(s["vae_psnr"])),
        ("restored latent vs original (keyed digest check)", PAPER["latent_error"],
         "n/a" if s["max_abs_error"] is None else
         f"max abs error {s['max_abs_error']}; verified exact {_pct(s['verified'])}"),
        ("face detected on anonymized images (dlib HOG)", PAPER["detection"], _pct(s["detection_anonymized"])),
        ("UNet calls per anonymization / restore (per photo, its faces batched)", PAPER["calls"],
         "n/a" if s["calls_per_anonymization"] is None else
         f"{s['calls_per_anonymization']:.0f} / {s['calls_per_restore']:.0f}"),
    ]
    names = sorted({k.split("_")[0] for k in s if k.startswith(("ArcFace_", "FaceNet_"))})
    for name in ("ArcFace", "FaceNet"):
        if name in names:
            rows.append((f"{name} re-identified: anonymized / restored / wrong key", "see TAR rows above",
                         " / ".join(_pct(s[f"{name}_{kind}"]) for kind in ("anonymized", "restored", "wrong_key"))))
        else:
            rows.append((f"{name} re-identification", "FaceNet: the TAR rows above",
                         f"not given (--{name.lower()} WEIGHTS)"))
    lines = [f"| column | paper (LFW, trained FFHQ LDM) | {ours} |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def markdown(result: dict) -> str:
    st, s = result["setting"], result["summary"]
    parts = ["# The paper's setting (Labarbarie, Itier, Puech, arXiv 2510.01031), reproduced with KeyFace", ""]
    if st["mechanics_only"]:
        parts += [f"**{MECHANICS_WARNING}**", ""]
    native = "" if st["native_size"] in (None, st["size"]) else f" (the model's native size is {st['native_size']})"
    parts += [
        f"- model: {st['model']}",
        f"- faces: {st['photos']} photos from `{st['faces_folder']}/`: {s['photos_ok']} done, "
        f"{s['photos_no_face']} without a face, {s['photos_failed']} failed; {s['faces']} faces measured",
        f"- {st['size']}x{st['size']} face crops{native}, {st['steps']} steps, scheduler {st['scheduler']}"
        + ("" if (st["size"], st["steps"]) == (256, 50) else
           " (the paper: 256x256, 50 steps; `--size 256 --steps 50` are the defaults)"),
        f"- new face drawn by {st['sampler']}; inversion {st['inversion']}; scramble {st['scramble']} in the face "
        f"mask ({st['mask']})",
        f"- key: {st['key']}; wrong key: {st['wrong_key']}; identity: {', '.join(st['identity'])}",
        f"- re-identified = the same face in the other image is within the threshold of the original "
        "(a face the detector misses there is described at the original's landmarks, which can only raise the "
        "rate); PSNR/SSIM over each face's square crop box; SSIM: scikit-image, Gaussian window sigma 1.5",
        "", table(result), "", WHY_EXACT, "",
        "The paper's rates are true-accept rates at 0.1 % false-accept over 1,600 LFW pairs with FaceNet; the rates "
        "here are per face against the same photo's original, with dlib's fixed threshold (and the given ArcFace/"
        "FaceNet thresholds), so they compare in kind, not digit for digit.",
        "", "Per-face rows: paper_setting.json (`faces`, `photos`).", ""]
    return "\n".join(parts)


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def main(argv=None) -> int:
    """Run the paper's setting; print the table; write OUT/paper_setting.md and .json. Returns the exit code."""
    try:
        args = parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as stop:   # --help (0) or an argparse usage error (2)
        return int(stop.code or 0)
    try:
        result = run(args)
    except SettingError as err:
        print(f"keyface paper: {err}", file=sys.stderr)
        return EXIT_USAGE
    out = Path(args.out)
    (out / "paper_setting.json").write_text(json.dumps(_jsonable(result), indent=1) + "\n")
    text = markdown(result)
    (out / "paper_setting.md").write_text(text)
    print()
    print(text)
    print(f"wrote {out / 'paper_setting.md'}, {out / 'paper_setting.json'} and the images under {out}/")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
