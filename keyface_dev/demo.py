"""Demo: anonymize -> restore (right key) -> restore (wrong key) on a sample photo; writes a side-by-side image.

    bash scripts/demo.sh [--checkpoint PATH] [--image PATH] [--out DIR]

Without --checkpoint it uses a seeded random-weight tiny model: the mechanics (exact restore, wrong key,
pixel-exact background) are real, the "faces" it generates are noise. Bring a real checkpoint
(SD1.5/SDXL/SD3/Flux .safetensors) for real faces.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import comfy_host, tiny_models

REPO = comfy_host.REPO


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a real checkpoint (.safetensors); default: seeded tiny model")
    parser.add_argument("--image", type=Path, default=REPO / "assets" / "sample_face.jpg")
    parser.add_argument("--out", type=Path, default=REPO / "demo_output")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompt", default="a photo of a person's face, natural light")
    args = parser.parse_args(argv)

    comfy_host.boot()
    core_nodes = comfy_host.pack_module("nodes.core_nodes")
    face_nodes = comfy_host.pack_module("nodes.face_nodes")
    keys = comfy_host.pack_module("keyface_core.keys")
    metadata = comfy_host.pack_module("keyface_core.metadata")

    if args.checkpoint:
        import comfy.sd
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(args.checkpoint), output_vae=True, output_clip=True)[:3]
        crop_size = 512
    else:
        model, clip, vae = tiny_models.unet_model(0), tiny_models.clip_model(0), tiny_models.vae_model(0)
        crop_size = 128
    cond = clip.encode_from_tokens_scheduled(clip.tokenize(args.prompt))
    key = keys.SecretKey(keys.generate_key(), kind="key", source="demo key (in memory)")
    wrong = keys.SecretKey(keys.generate_key(), kind="key", source="another key (in memory)")

    image = torch.from_numpy(np.array(Image.open(args.image).convert("RGB")).astype(np.float32) / 255.0)[None]
    started = time.perf_counter()
    _, faces = face_nodes.detect(image, crop_size=crop_size)
    crops, masks, faces = face_nodes.crop(image, faces)
    latent = {"samples": vae.encode(crops)}
    noise, inv = core_nodes.invert_latent(model, latent, args.steps, "normal", "exact", 1.0, cond, None, masks)
    anon_latent, regen = core_nodes.regenerate_latent(model, core_nodes.flip_latent(noise, key), cond)
    anonymized = face_nodes.paste(image, vae.decode(anon_latent["samples"]), faces)

    # Through the file, as users do: Save Anonymized -> Load Anonymized.
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "keyface_demo_anonymized.png"
    saved.unlink(missing_ok=True)
    metadata.write_png_atomic(saved, face_nodes._to_uint8(anonymized[0]), face_nodes.build_record(faces, anon_latent[core_nodes.INFO_KEY], True))
    pixels, record, _ = metadata.read_png(saved)
    loaded = torch.from_numpy(pixels.astype(np.float32) / 255.0)[None]
    stored_latent, stored_faces, exact = face_nodes.record_to_inputs(record, loaded)

    restored_latent, calls = core_nodes.restore_latent(model, stored_latent, key, cond)
    restored = face_nodes.paste(loaded, vae.decode(restored_latent["samples"]), stored_faces)
    wrong_latent, _ = core_nodes.restore_latent(model, stored_latent, wrong, cond, allow_wrong_key=True)
    wrong_image = face_nodes.paste(loaded, vae.decode(wrong_latent["samples"]), stored_faces)
    elapsed = time.perf_counter() - started

    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm())
    error, wrong_error = rel(restored_latent["samples"], latent["samples"]), rel(wrong_latent["samples"], latent["samples"])
    panels = [("original", image), ("anonymized", anonymized), ("restored (right key)", restored), ("wrong key", wrong_image)]
    tiles = [Image.fromarray(face_nodes._to_uint8(t[0])) for _, t in panels]
    w, h = tiles[0].size
    sheet = Image.new("RGB", (w * len(tiles), h + 24), "white")
    draw = ImageDraw.Draw(sheet)
    for i, ((label, _), tile) in enumerate(zip(panels, tiles)):
        sheet.paste(tile, (i * w, 24))
        draw.text((i * w + 6, 5), label, fill="black")
    out = args.out / "keyface_demo.png"
    sheet.save(out)
    model_name = args.checkpoint.name if args.checkpoint else "seeded tiny random model (faces are noise; mechanics are real)"
    print(f"model: {model_name}")
    print(f"faces: {len(faces.faces)}; anonymize model calls {inv.model_calls}+{regen.model_calls}; "
          f"restore calls {calls['invert_calls']}+{calls['regenerate_calls']}; total {elapsed:.1f}s")
    print(f"restored latent vs original: relative error {error:.2e} (payload exact: {exact}); wrong key: {wrong_error:.2f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    with torch.inference_mode():  # as ComfyUI runs nodes
        raise SystemExit(main())
