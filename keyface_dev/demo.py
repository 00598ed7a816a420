"""Demo: anonymize -> save -> load -> restore (right key, lossless) -> restore (wrong key); a labelled sheet.

    bash scripts/demo.sh [--checkpoint PATH] [--image PATH] [--out DIR] [--steps N] [--crop-size N]

It runs the pack's own node functions in a headless ComfyUI, through the file, as a workflow does: Face Mask ->
Crop Faces -> VAE Encode -> Invert to Noise -> Apply Key Flip -> Regenerate -> VAE Decode -> Paste Faces -> Save
Anonymized (lossless) -> Load Anonymized -> Restore -> Restore Photo. Without --checkpoint the model is a seeded
random-weight tiny one: every mechanism (exact restore, lossless pixels, wrong key, untouched background) is real,
but a model that was never trained draws noise, so the anonymized, restored and wrong-key faces all look like noise
*by design*. Bring a real checkpoint (SD1.5/SDXL/SD3/Flux .safetensors) for real faces.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from . import comfy_host, tiny_models

REPO = comfy_host.REPO
AMPLIFY = 64          # the difference panel shows |restored - reference| x 64: one gray level is clearly visible
PANEL_HEIGHT = 320    # panels are shown at this height (nearest-neighbour: a zero stays zero, equal stays equal)
LABEL_HEIGHT = 58


@dataclass(frozen=True)
class Panel:
    """One tile of the demo sheet: a short label, what it proves, and its pixels (uint8 HxWx3)."""

    label: str
    proves: str
    pixels: np.ndarray


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a real checkpoint (.safetensors); default: seeded tiny model")
    parser.add_argument("--image", type=Path, default=REPO / "assets" / "sample_face.jpg")
    parser.add_argument("--out", type=Path, default=REPO / "demo_output")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--crop-size", type=int, default=None, help="face crop size (default 512 with a checkpoint, "
                                                                     "128 with the tiny model)")
    parser.add_argument("--prompt", default="a photo of a person's face, natural light")
    args = parser.parse_args(argv)

    print("[demo] starting a headless ComfyUI (CPU) with KeyFace loaded ...", flush=True)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)   # ComfyUI's start-up warnings (torchaudio missing...) are not the demo's
    try:
        comfy_host.boot()
    finally:
        root.setLevel(level)
    core_nodes = comfy_host.pack_module("nodes.core_nodes")
    face_nodes = comfy_host.pack_module("nodes.face_nodes")
    keys = comfy_host.pack_module("keyface_core.keys")
    images = comfy_host.pack_module("keyface_core.images")
    pngio = comfy_host.pack_module("keyface_core.pngio")

    if args.checkpoint:
        import comfy.sd
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(args.checkpoint), output_vae=True,
                                                                 output_clip=True)[:3]
        model_name = args.checkpoint.name
    else:
        model, clip, vae = tiny_models.unet_model(0), tiny_models.clip_model(0), tiny_models.vae_model(0)
        model_name = "seeded tiny random-weight model (built here, nothing downloaded)"
    crop_size = args.crop_size or (512 if args.checkpoint else 128)
    cond = clip.encode_from_tokens_scheduled(clip.tokenize(args.prompt))
    key = keys.SecretKey(keys.generate_key(), kind="key", source="demo key (in memory)")
    wrong = keys.SecretKey(keys.generate_key(), kind="key", source="another key (in memory)")

    # As LoadImage would: upright, 8-bit RGB, whatever the file is.
    original_u8, _ = images.load_image(args.image)
    image = torch.from_numpy(original_u8.astype(np.float32) / 255.0)[None]
    started = time.perf_counter()
    print(f"[demo] anonymizing {args.image.name} ({crop_size}px face crops, {args.steps} steps) ...", flush=True)
    _, faces = face_nodes.detect(image, crop_size=crop_size)
    crops, masks, faces = face_nodes.crop(image, faces)
    latent = {"samples": vae.encode(crops)}
    noise, inv = core_nodes.invert_latent(model, latent, args.steps, "normal", "exact", 1.0, cond, None, masks)
    keyed = core_nodes.flip_latent(noise, key)
    anon_latent, regen = core_nodes.regenerate_latent(model, keyed, cond, steps=args.steps)
    anonymized = face_nodes.paste(image, face_nodes.decode_crops(vae, anon_latent["samples"]), faces)

    # Save Anonymized in lossless mode, then Load Anonymized: through the file, as users do.
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "keyface_demo_anonymized.png"
    saved.unlink(missing_ok=True)
    info = anon_latent[core_nodes.INFO_KEY]
    saved_u8 = face_nodes._to_uint8(anonymized[0])
    sealed = face_nodes._seal_pixels(info, faces, saved_u8, image, vae, key)
    pngio.write_png_atomic(saved, saved_u8, face_nodes.build_record(faces, info, saved_u8, sealed))
    loaded, stored_latent, stored_faces, warnings = face_nodes.load_anonymized(saved)

    print("[demo] restoring with the right key, then with a wrong one ...", flush=True)
    restored_latent, stats = core_nodes.restore_latent(model, stored_latent, key, cond)
    restored, _ = face_nodes.restore_photo_from(loaded, stored_faces, restored_latent, vae)
    lossless, lossless_report = face_nodes.restore_photo_from(loaded, stored_faces, restored_latent, vae, key)
    wrong_latent, _ = core_nodes.restore_latent(model, stored_latent, wrong, cond, allow_wrong_key=True)
    wrong_image, _ = face_nodes.restore_photo_from(loaded, stored_faces, wrong_latent, vae)
    # What a perfect restore must equal: the same Restore Photo computation fed the ORIGINAL face latent, i.e. the
    # original face as this model's VAE decodes it. A VAE is lossy, so this is not the original photo; lossless
    # mode adds the sealed difference.
    reference = face_nodes.restore_photo(loaded, stored_faces, face_nodes.decode_crops(vae, latent["samples"]),
                                         face_nodes.decode_crops(vae, stored_latent["samples"]))
    elapsed = time.perf_counter() - started

    u8 = lambda t: face_nodes._to_uint8(t[0])
    restored_u8, reference_u8, lossless_u8 = u8(restored), u8(reference), u8(lossless)
    diff = np.abs(restored_u8.astype(np.int16) - reference_u8.astype(np.int16))
    latent_error = float((restored_latent["samples"].double() - latent["samples"].double()).abs().max())
    wrong_error = float((wrong_latent["samples"].double() - latent["samples"].double()).abs().max())
    inside = np.zeros(original_u8.shape[:2], dtype=bool)
    for region in faces.faces:
        x, y, size = region.box
        inside[y:y + size, x:x + size] = True
    outside_changed = int((saved_u8 != original_u8).any(axis=2)[~inside].sum())
    bit_identical = bool(np.array_equal(lossless_u8, original_u8))
    verification = stats["verification"].message()
    noise_note = "" if args.checkpoint else " (noise: random tiny weights, by design)"

    panels = [
        Panel("1 original", "the photo as loaded (upright, 8-bit RGB)", original_u8),
        Panel("2 anonymized" + noise_note,
              f"a new face drawn from the keyed noise; outside the face boxes {outside_changed} pixels changed",
              saved_u8),
        Panel("3 restored, right key: equals panel 4",
              f"Restore: face latent max error {latent_error:g}, {verification}; {stats['model_calls']} model calls",
              restored_u8),
        Panel("4 reference: original through this VAE" + ("" if args.checkpoint else
                                                           " (a random VAE decodes any face as noise)"),
              "what a perfect restore must equal: the original face latent decoded by this model's VAE", reference_u8),
        Panel(f"5 difference x{AMPLIFY}: {'all zero' if not diff.any() else f'max {int(diff.max())}'}",
              f"|restored - reference| per pixel: max {int(diff.max())} gray levels, so the restore is exact and the "
              "only loss is the VAE's own", np.clip(diff * AMPLIFY, 0, 255).astype(np.uint8)),
        Panel("6 lossless: original pixels, " + ("bit-identical" if bit_identical else "NOT identical"),
              f"lossless mode: the sealed pixel residual turns the restore into the original photo "
              f"({'bit-identical' if bit_identical else 'differs'}: {lossless_report.split('; photo: ')[-1]})",
              lossless_u8),
        Panel("7 wrong key" + noise_note,
              f"Restore with another key (allowed for the demo): a different face, latent max error {wrong_error:.3g}",
              u8(wrong_image)),
    ]
    sheet, layout = _sheet(panels)
    out = args.out / "keyface_demo.png"
    meta = PngImagePlugin.PngInfo()
    meta.add_text("keyface-demo-panels", json.dumps(layout))
    sheet.save(out, pnginfo=meta)

    print(f"model: {model_name}")
    if not args.checkpoint:
        print("note: with random tiny weights the generated faces are noise by design (the model was never trained); "
              "what this demo proves is the mechanics. Pass --checkpoint for real faces.")
    print(f"faces: {len(faces.faces)}; anonymize model calls {inv.model_calls}+{regen.model_calls}; restore "
          f"{stats['model_calls']}; {elapsed:.1f}s")
    for warning in warnings:
        print(f"warning: {warning}")
    print(f"panels of {out}:")
    for panel in panels:
        print(f"  {panel.label}: {panel.proves}")
    print(f"restored latent vs original: max abs error {latent_error:g}; restored photo vs reference: max "
          f"{int(diff.max())} gray levels; lossless photo vs original: "
          f"{'bit-identical' if bit_identical else 'NOT identical'}; wrong key: max abs error {wrong_error:.3g}")
    print(f"wrote {out}")
    return 0 if (latent_error == 0 and not diff.any() and bit_identical) else 1


def _sheet(panels: list) -> tuple[Image.Image, list]:
    """Panels side by side under their labels; the layout (label, box of the tile) for tests and tools."""
    tiles = []
    for panel in panels:
        h, w = panel.pixels.shape[:2]
        scale = PANEL_HEIGHT / h
        tiles.append(Image.fromarray(panel.pixels).resize((max(1, round(w * scale)), PANEL_HEIGHT), Image.NEAREST))
    width = max(sum(t.width for t in tiles), 1)
    sheet = Image.new("RGB", (width, LABEL_HEIGHT + PANEL_HEIGHT), "white")
    draw = ImageDraw.Draw(sheet)
    font = _font(13)
    layout, x = [], 0
    for panel, tile in zip(panels, tiles):
        sheet.paste(tile, (x, LABEL_HEIGHT))
        draw.multiline_text((x + 4, 4), _wrap(panel.label, tile.width - 8, draw, font), fill="black", font=font,
                            spacing=2)
        layout.append({"label": panel.label, "box": [x, LABEL_HEIGHT, x + tile.width, LABEL_HEIGHT + PANEL_HEIGHT]})
        x += tile.width
    return sheet, layout


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(text: str, width: int, draw: ImageDraw.ImageDraw, font) -> str:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return "\n".join([*lines, line])


if __name__ == "__main__":
    with torch.inference_mode():  # as ComfyUI runs nodes
        raise SystemExit(main())
