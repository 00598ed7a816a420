"""Writes workflows/*.json (UI format, drag-and-drop) and workflows/api/*.json (API format) from one
graph definition each, using the node definitions of a real ComfyUI. `--check` fails when the
committed files differ from what would be generated (tests run it).

    .venv/bin/python scripts/make_workflows.py [--check]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
PROMPT = "a photo of a person's face, natural light"

# id: (class_type, {input: value or [source_id, output_index]}, title)
ANONYMIZE = {
    "1": ("CheckpointLoaderSimple", {"ckpt_name": CHECKPOINT}, "Your checkpoint (SD1.5, SDXL, SD3, Flux...)"),
    "2": ("LoadImage", {"image": "keyface_sample_face.jpg"}, "Photo to anonymize"),
    "3": ("KeyFaceLoadKey", {"source": "key file", "key_file": "my_keyface.key", "variable": "KEYFACE_KEY", "kind": "key"}, None),
    "4": ("CLIPTextEncode", {"text": PROMPT, "clip": ["1", 1]}, "Prompt (Restore must use the same)"),
    "5": ("KeyFaceFaceMask", {"image": ["2", 0], "crop_size": 512, "context": 2.0, "feather": 0.06, "max_faces": 16,
                              "min_face_px": 0}, None),
    "6": ("KeyFaceCropFaces", {"image": ["2", 0], "faces": ["5", 1]}, None),
    "7": ("VAEEncode", {"pixels": ["6", 0], "vae": ["1", 2]}, None),
    "8": ("KeyFaceInvertToNoise", {"model": ["1", 0], "latent": ["7", 0], "steps": 20, "scheduler": "normal",
                                   "mode": "exact", "cfg": 1.0, "positive": ["4", 0], "mask": ["6", 1]}, None),
    "9": ("KeyFaceApplyKeyFlip", {"noise": ["8", 0], "key": ["3", 0], "scramble": "pairswap"}, None),
    "14": ("KSamplerSelect", {"sampler_name": "dpmpp_2m"}, "Sampler for the new face (any)"),
    "10": ("KeyFaceRegenerate", {"model": ["1", 0], "noise": ["9", 0], "sampler": ["14", 0], "scheduler": "normal",
                                 "steps": 20, "cfg": 1.0, "seed": 0, "positive": ["4", 0]}, None),
    "11": ("VAEDecode", {"samples": ["10", 0], "vae": ["1", 2]}, None),
    "12": ("KeyFacePasteFaces", {"image": ["2", 0], "crops": ["11", 0], "faces": ["6", 2]}, None),
    "13": ("KeyFaceSaveAnonymized", {"image": ["12", 0], "faces": ["6", 2], "latent": ["10", 0],
                                     "filename_prefix": "keyface/anonymized", "lossless": False}, None),
}

RESTORE = {
    "1": ("CheckpointLoaderSimple", {"ckpt_name": CHECKPOINT}, "Same checkpoint as the anonymizing run"),
    "2": ("KeyFaceLoadAnonymized", {"image": "keyface_anonymized.png", "vae": ["1", 2], "metadata": "(from the image)"}, "Anonymized PNG (as saved)"),
    "3": ("KeyFaceLoadKey", {"source": "key file", "key_file": "my_keyface.key", "variable": "KEYFACE_KEY", "kind": "key"}, None),
    "4": ("CLIPTextEncode", {"text": PROMPT, "clip": ["1", 1]}, "Same prompt as the anonymizing run"),
    "5": ("KeyFaceRestore", {"model": ["1", 0], "latent": ["2", 1], "key": ["3", 0], "positive": ["4", 0],
                             "allow_wrong_key": False}, None),
    "6": ("KeyFaceRestorePhoto", {"image": ["2", 0], "faces": ["2", 2], "restored": ["5", 0], "vae": ["1", 2],
                                  "key": ["3", 0]}, None),
    "8": ("SaveImage", {"images": ["6", 0], "filename_prefix": "keyface/restored"}, None),
}

GROUP = {k: (t, dict(i), title) for k, (t, i, title) in ANONYMIZE.items()}
GROUP["2"] = ("LoadImage", {"image": "keyface_sample_group.jpg"}, "Photo with several faces")

WORKFLOWS = {"keyface_anonymize": ANONYMIZE, "keyface_restore": RESTORE, "keyface_anonymize_group": GROUP}


def api_prompt(graph: dict) -> dict:
    return {nid: {"class_type": t, "inputs": inputs, "_meta": {"title": title or t}} for nid, (t, inputs, title) in graph.items()}


DEFAULTS: dict = {}


def _definition(class_type: str) -> tuple[list, list, list]:
    """(input slots [(name, type)], widget names in order, outputs [(name, type)]) from ComfyUI itself."""
    import nodes
    cls = nodes.NODE_CLASS_MAPPINGS[class_type]
    spec = cls.INPUT_TYPES()
    slots, widgets, trailing = [], [], []
    for section in ("required", "optional"):
        for name, value in spec.get(section, {}).items():
            kind = value[0]
            options = value[1] if len(value) > 1 and isinstance(value[1], dict) else {}
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                widgets.append(name)
                DEFAULTS[(class_type, name)] = options.get("default", kind[0] if isinstance(kind, list) and kind else None)
                if options.get("control_after_generate"):
                    widgets.append(None)
                if options.get("image_upload"):
                    trailing.append("upload")   # the frontend adds the upload button after every value widget
            else:
                slots.append((name, kind))
    names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
    return slots, widgets + trailing, list(zip(names, cls.RETURN_TYPES))


def ui_workflow(graph: dict) -> dict:
    """The editor's format: nodes with positions, typed slots, links and widget values."""
    order = list(graph)
    links, out_links = [], {}
    definitions = {nid: _definition(t) for nid, (t, _, _) in graph.items()}
    ui_nodes = []
    for nid in order:
        class_type, inputs, title = graph[nid]
        slots, widgets, outputs = definitions[nid]
        node_inputs = []
        for slot_index, (name, kind) in enumerate(slots):
            link = None
            if name in inputs and isinstance(inputs[name], list):
                src, src_slot = inputs[name]
                link = len(links) + 1
                links.append([link, int(src), src_slot, int(nid), slot_index, definitions[src][2][src_slot][1]])
                out_links.setdefault((src, src_slot), []).append(link)
            # Every socket, connected or not, as the frontend builds the node: link slot indices then match.
            node_inputs.append({"name": name, "type": kind, "link": link})
        values = []
        for w in widgets:
            if w is None:
                values.append("fixed")
            elif w == "upload":
                values.append("image")
            else:
                values.append(inputs.get(w, DEFAULTS.get((class_type, w))))
        column, row = divmod(order.index(nid), 4)
        ui_nodes.append({"id": int(nid), "type": class_type, "pos": [40 + 360 * column, 40 + 260 * row],
                         "size": [320, 200], "flags": {}, "order": order.index(nid), "mode": 0,
                         "inputs": node_inputs, "outputs": [], "properties": {"Node name for S&R": class_type},
                         "widgets_values": values, **({"title": title} if title else {})})
    for node in ui_nodes:
        nid = str(node["id"])
        node["outputs"] = [{"name": name, "type": kind, "links": out_links.get((nid, i), []), "slot_index": i}
                           for i, (name, kind) in enumerate(definitions[nid][2])]
    return {"last_node_id": max(int(n) for n in graph), "last_link_id": len(links), "nodes": ui_nodes, "links": links,
            "groups": [], "config": {}, "extra": {"keyface": "generated by scripts/make_workflows.py"}, "version": 0.4}


def render() -> dict[Path, str]:
    from keyface_dev import comfy_host
    comfy_host.boot()
    files = {}
    for name, graph in WORKFLOWS.items():
        files[REPO / "workflows" / f"{name}.json"] = json.dumps(ui_workflow(graph), indent=1) + "\n"
        files[REPO / "workflows" / "api" / f"{name}.json"] = json.dumps(api_prompt(graph), indent=1) + "\n"
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if committed workflows differ")
    args = parser.parse_args()
    stale = []
    for path, text in render().items():
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path.relative_to(REPO))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print("stale workflows (run scripts/make_workflows.py):", *stale)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
