"""Writes the shipped workflows from one declaration each, using a real ComfyUI's node definitions:
`workflows/<title>.json` (UI format: drag-and-drop, and the Templates dialog, which shows the file name
as the title) and `workflows/api/<title>.json` (API format: what `app.graphToPrompt` must give for it).
Slots, widget order and outputs come from the host's object_info (keyface_dev/workflow_ui.py); the
layout is computed from the data flow. `--check` fails when the committed files differ (tests run it).

    .venv/bin/python scripts/make_workflows.py [--check]

Adding a node to a workflow is one line in its `nodes` dict; a new workflow is one more `Graph`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from keyface_dev.workflow_ui import Graph, Node, Out  # noqa: E402

CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
PROMPT = "a photo of a person's face, natural light"
KEY_FILE = "my_keyface.key"
LOAD_KEY = {"source": "key file", "key_file": KEY_FILE, "variable": "KEYFACE_KEY", "kind": "key"}
BLUE, GREEN, PURPLE, BROWN = "#3f789e", "#8A8", "#a1309b", "#b58b2a"

ANONYMIZE_NOTE = """KeyFace: anonymize the faces in a photo (reversible with your key)

Pick three things, then press Run:
1. Checkpoint: your model (SD1.5, SDXL, SD3, Flux...). Restoring needs the same checkpoint and the same prompt.
2. Photo: upload it in "Photo to anonymize".
3. Key: a key file from ComfyUI/models/keyface_keys. No key yet? Add the node KeyFace > Create Key, run it once, press R, and pick the new file here.

The key file is the only way to get the real faces back: back it up somewhere safe. Without it nobody can restore them; with it anyone can.

The result goes to output/keyface/anonymized_*.png. Keep that PNG: a JPEG or resized copy loses the data needed to restore."""

RESTORE_NOTE = """KeyFace: restore the faces of an anonymized photo

Pick three things, then press Run:
1. Checkpoint: the same one that anonymized the photo (and keep the prompt the same).
2. Anonymized PNG: upload the file Save Anonymized wrote (output/keyface/anonymized_*.png), not a JPEG copy. For a copy that lost its data, also pick the original PNG as "metadata".
3. Key: the key file that anonymized it, from ComfyUI/models/keyface_keys. A different key is refused.

The restored photo shows the real faces: it goes to output/keyface/restored_*.png with ComfyUI's usual metadata. Share the anonymized PNG, not this one."""


def anonymize(photo: str, title: str) -> dict[str, Node]:
    """The anonymize chain: load -> find faces -> crop/encode -> invert -> flip -> regenerate -> decode/paste -> save."""
    return {
        "photo": Node("LoadImage", "Find faces", {"image": photo}, title),
        "mask": Node("KeyFaceFaceMask", "Find faces", {"image": Out("photo", "IMAGE"), "crop_size": 512, "context": 2.0,
                                                       "feather": 0.06, "max_faces": 16, "min_face_px": 0}),
        "crops": Node("KeyFaceCropFaces", "Find faces", {"image": Out("photo", "IMAGE"), "faces": Out("mask", "faces")}),
        "checkpoint": Node("CheckpointLoaderSimple", "Anonymize", {"ckpt_name": CHECKPOINT},
                           "Your checkpoint", lane=-1),
        "prompt": Node("CLIPTextEncode", "Anonymize", {"text": PROMPT, "clip": Out("checkpoint", "CLIP")},
                       "Prompt (Restore must use the same)", lane=-1),
        "key": Node("KeyFaceLoadKey", "Anonymize", dict(LOAD_KEY), "Your key", lane=-1),
        "encode": Node("VAEEncode", "Anonymize", {"pixels": Out("crops", "crops"), "vae": Out("checkpoint", "VAE")}),
        "invert": Node("KeyFaceInvertToNoise", "Anonymize", {"model": Out("checkpoint", "MODEL"), "latent": Out("encode"),
                                                             "steps": 20, "scheduler": "normal", "mode": "exact", "cfg": 1.0,
                                                             "positive": Out("prompt"), "mask": Out("crops", "masks")}),
        "flip": Node("KeyFaceApplyKeyFlip", "Anonymize", {"noise": Out("invert"), "key": Out("key"), "scramble": "pairswap"}),
        "sampler": Node("KSamplerSelect", "Anonymize", {"sampler_name": "dpmpp_2m"}, "Sampler for the new face (any)", lane=-1),
        "regenerate": Node("KeyFaceRegenerate", "Anonymize", {"model": Out("checkpoint", "MODEL"), "noise": Out("flip"),
                                                              "sampler": Out("sampler"), "scheduler": "normal", "steps": 20,
                                                              "cfg": 1.0, "seed": 0, "positive": Out("prompt")}),
        "decode": Node("VAEDecode", "Anonymize", {"samples": Out("regenerate"), "vae": Out("checkpoint", "VAE")}),
        "paste": Node("KeyFacePasteFaces", "Save", {"image": Out("photo", "IMAGE"), "crops": Out("decode"),
                                                    "faces": Out("crops", "faces")}),
        "save": Node("KeyFaceSaveAnonymized", "Save", {"image": Out("paste"), "faces": Out("crops", "faces"),
                                                       "latent": Out("regenerate"), "filename_prefix": "keyface/anonymized",
                                                       "lossless": False}),
    }


ANONYMIZE_GROUPS = (("Find faces", BLUE), ("Anonymize", PURPLE), ("Save", GREEN))

CONTROLNET = "control_v11p_sd15_openpose.pth"
HINT_STYLE = "keypoints"
EXPRESSION_NOTE = """KeyFace: anonymize faces keeping their expression and pose (reversible with your key)

A ControlNet steers the new face with a hint drawn from the original face's 68 landmarks, so a smile stays a smile and a turned head stays turned. Pick four things, then press Run:
1. Checkpoint: your model. Restoring needs the same checkpoint, prompt and ControlNet.
2. ControlNet: one made for your checkpoint that reads the hint style of Face Hint: "keypoints" (OpenPose face dots: an OpenPose ControlNet such as control_v11p_sd15_openpose) or "regions" (face-parsing colours: a segmentation ControlNet).
3. Photo: upload it in "Photo to anonymize".
4. Key: a key file from ComfyUI/models/keyface_keys (no key yet? KeyFace > Create Key).

The PNG also stores the 68 landmarks (numbers, not pixels) so Restore can redraw the same hint. They show the original face's geometry (expression, pose, proportions), never its skin or identity descriptor. Back up your key file."""

RESTORE_EXPRESSION_NOTE = """KeyFace: restore faces that were anonymized keeping their expression

Pick four things, then press Run:
1. Checkpoint: the same one that anonymized the photo (same prompts too).
2. ControlNet: the same ControlNet file, and keep Face Hint's style and Apply ControlNet's strength and start/end as they were: a different hint or strength is refused.
3. Anonymized PNG: the file Save Anonymized wrote (it carries the landmarks Face Hint redraws the hint from).
4. Key: the key file that anonymized it.

The restored photo shows the real faces: share the anonymized PNG, not this one."""


def anonymize_expression(photo: str, title: str) -> dict[str, Node]:
    """The anonymize chain with a ControlNet: Face Hint -> Apply ControlNet conditions inversion and drawing."""
    nodes = anonymize(photo, title)
    # The chain reads as before; the hint sits above it (below would put it under the editor's minimap at 100 %),
    # the ControlNet nodes in the lane below it, right of the first screen.
    nodes["hint"] = Node("KeyFaceFaceHint", "Find faces", {"faces": Out("crops", "faces"), "style": HINT_STYLE},
                         lane=-1)
    nodes["negative"] = Node("CLIPTextEncode", "Anonymize", {"text": "", "clip": Out("checkpoint", "CLIP")},
                             "Negative prompt (Restore must use the same)", lane=1)
    nodes["controlnet"] = Node("ControlNetLoader", "Anonymize", {"control_net_name": CONTROLNET},
                               "Your ControlNet (reads the hint)", lane=1)
    nodes["control"] = Node("ControlNetApplyAdvanced", "Anonymize", {
        "positive": Out("prompt"), "negative": Out("negative"), "control_net": Out("controlnet"), "image": Out("hint"),
        "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}, "Apply ControlNet (Restore must match)", lane=1)
    for step in ("invert", "regenerate"):
        nodes[step].inputs["positive"] = Out("control", "positive")
        nodes[step].inputs["negative"] = Out("control", "negative")
    nodes["save"].inputs["store_landmarks"] = "auto"
    return nodes


def restore_sources() -> dict[str, Node]:
    """What every restore graph starts from: the checkpoint, the anonymized PNG and the key."""
    return {
        "checkpoint": Node("CheckpointLoaderSimple", "Your files", {"ckpt_name": CHECKPOINT},
                           "Same checkpoint as the anonymizing run", lane=-1),
        "anonymized": Node("KeyFaceLoadAnonymized", "Your files", {"image": "keyface_anonymized.png",
                                                                   "vae": Out("checkpoint", "VAE"),
                                                                   "metadata": "(from the image)"},
                           "Anonymized PNG (as saved)"),
        "key": Node("KeyFaceLoadKey", "Your files", dict(LOAD_KEY), "The key that anonymized it", lane=-1),
    }


def restore_expression() -> dict[str, Node]:
    return {
        **restore_sources(),
        "hint": Node("KeyFaceFaceHint", "Restore", {"faces": Out("anonymized", "faces"), "style": HINT_STYLE},
                     "Face Hint (same style, from the stored landmarks)"),
        "prompt": Node("CLIPTextEncode", "Restore", {"text": PROMPT, "clip": Out("checkpoint", "CLIP")},
                       "Same prompt as the anonymizing run", lane=-1),
        "negative": Node("CLIPTextEncode", "Restore", {"text": "", "clip": Out("checkpoint", "CLIP")},
                         "Same negative prompt", lane=-1),
        "controlnet": Node("ControlNetLoader", "Restore", {"control_net_name": CONTROLNET},
                           "Same ControlNet as the anonymizing run", lane=-1),
        "control": Node("ControlNetApplyAdvanced", "Restore", {
            "positive": Out("prompt"), "negative": Out("negative"), "control_net": Out("controlnet"),
            "image": Out("hint"), "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0},
            "Apply ControlNet (same settings)"),
        "restore": Node("KeyFaceRestore", "Restore", {"model": Out("checkpoint", "MODEL"), "latent": Out("anonymized", "latent"),
                                                      "key": Out("key"), "positive": Out("control", "positive"),
                                                      "negative": Out("control", "negative"), "allow_wrong_key": False}),
        "photo": Node("KeyFaceRestorePhoto", "Restore", {"image": Out("anonymized", "image"), "faces": Out("anonymized", "faces"),
                                                         "restored": Out("restore"), "vae": Out("checkpoint", "VAE"),
                                                         "key": Out("key")}),
        "save": Node("SaveImage", "Save", {"images": Out("photo"), "filename_prefix": "keyface/restored"}),
    }

# Keyed by a stable id (tests and other branches refer to these); `file` is what users see.
WORKFLOWS = {
    "anonymize": Graph("Anonymize faces with a key", ANONYMIZE_GROUPS, ANONYMIZE_NOTE,
                       anonymize("keyface_sample_face.jpg", "Photo to anonymize")),
    "anonymize_group": Graph("Anonymize every face in a group photo", ANONYMIZE_GROUPS, ANONYMIZE_NOTE,
                             anonymize("keyface_sample_group.jpg", "Photo with several faces")),
    "restore": Graph("Restore faces with the key", (("Your files", BLUE), ("Restore", PURPLE), ("Save", GREEN)),
                     RESTORE_NOTE, {
        **restore_sources(),
        "prompt": Node("CLIPTextEncode", "Restore", {"text": PROMPT, "clip": Out("checkpoint", "CLIP")},
                       "Same prompt as the anonymizing run", lane=-1),
        "restore": Node("KeyFaceRestore", "Restore", {"model": Out("checkpoint", "MODEL"), "latent": Out("anonymized", "latent"),
                                                      "key": Out("key"), "positive": Out("prompt"),
                                                      "allow_wrong_key": False}),
        "photo": Node("KeyFaceRestorePhoto", "Restore", {"image": Out("anonymized", "image"), "faces": Out("anonymized", "faces"),
                                                         "restored": Out("restore"), "vae": Out("checkpoint", "VAE"),
                                                         "key": Out("key")}),
        "save": Node("SaveImage", "Save", {"images": Out("photo"), "filename_prefix": "keyface/restored"}),
    }),
    "anonymize_expression": Graph("Anonymize faces keeping expression", ANONYMIZE_GROUPS, EXPRESSION_NOTE,
                                  anonymize_expression("keyface_sample_face.jpg", "Photo to anonymize")),
    "restore_expression": Graph("Restore faces anonymized keeping expression",
                                (("Your files", BLUE), ("Restore", PURPLE), ("Save", GREEN)), RESTORE_EXPRESSION_NOTE,
                                restore_expression()),
}


def paths(workflow_id: str) -> tuple[Path, Path]:
    """(UI file, API file) of a shipped workflow."""
    name = WORKFLOWS[workflow_id].file
    return REPO / "workflows" / f"{name}.json", REPO / "workflows" / "api" / f"{name}.json"


def definitions(class_types) -> dict:
    from keyface_dev import workflow_ui
    import nodes
    infos = {t: workflow_ui.node_info(t) for t in class_types}
    workflow_ui.display_names.update({t: info["display_name"] for t, info in infos.items()})
    import tomllib
    import comfyui_version
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for t, info in infos.items():
        custom = str(info.get("python_module", "")).startswith("custom_nodes.")
        workflow_ui.packs[t] = (project["name"], project["version"]) if custom else ("comfy-core", comfyui_version.__version__)
    assert all(t in nodes.NODE_CLASS_MAPPINGS for t in class_types)
    return {t: workflow_ui.node_def(info) for t, info in infos.items()}


def render() -> dict[Path, str]:
    from keyface_dev import comfy_host, frontend, workflow_ui
    comfy_host.boot()
    version = frontend.pinned_frontend_version()
    files = {}
    for workflow_id, graph in WORKFLOWS.items():
        defs = definitions({n.class_type for n in graph.nodes.values()})
        ui_file, api_file = paths(workflow_id)
        ui = workflow_ui.ui_workflow(graph, defs, version)
        problems = workflow_ui.readability_problems(*workflow_ui.planned_geometry(ui), margin=workflow_ui.PLAN_MARGIN)
        if problems:
            raise SystemExit(f"{graph.file}: layout problems: " + "; ".join(problems))
        files[ui_file] = json.dumps(ui, indent=1) + "\n"
        files[api_file] = json.dumps(workflow_ui.api_prompt(graph, defs), indent=1) + "\n"
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if committed workflows differ")
    args = parser.parse_args()
    files = render()
    stale = [p.relative_to(REPO) for p, text in files.items() if not p.is_file() or p.read_text() != text]
    shipped = {p for p in (REPO / "workflows").rglob("*.json")}
    extra = sorted(p.relative_to(REPO) for p in shipped - set(files))
    if args.check:
        if stale or extra:
            print("stale workflows (run scripts/make_workflows.py):", *stale, *[f"{p} (not generated)" for p in extra])
            return 1
        return 0
    for path in extra:
        (REPO / path).unlink()
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
