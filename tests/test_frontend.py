"""The shipped workflows in the real ComfyUI editor: the real server (`main.py --cpu`) with the frontend
package at the host's pinned version, in headless Chromium (Debian's `chromium`, driven by Playwright;
every request that does not go to the local server is aborted).

For every shipped workflow: loaded with the frontend's own `app.loadGraphData`, 0 missing nodes, 0
console errors, 0 error dialogs; every node's slots and widgets equal those of a fresh node of its type;
no overlapping nodes, no wire running right to left or under a node, nothing under the Run panel or the
minimap at 100 % zoom; `app.graphToPrompt` equals the shipped API twin; then queued through the
frontend and executed with a seeded checkpoint that the stock CheckpointLoaderSimple loads
(keyface_dev/tiny_checkpoint.py). To keep runs fast, AFTER the twin check the test sets widgets the way a
user would before pressing Run: the checkpoint (the user's own file; here the tiny one), crop_size 64
and 4 steps. The restore workflow is opened from the Templates dialog and run with no edits beyond picking
the user's files (checkpoint, and the anonymized PNG through the node's own upload button).

Skips with a loud message where Chromium, Playwright or the pinned frontend is missing; with CI=true a
missing piece fails instead. KEYFACE_UPDATE_DOCS=1 rewrites docs/screenshots/*.png and the template
thumbnails workflows/*.jpg from this run.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import urllib.parse
import warnings
from pathlib import Path

import pytest

from conftest import KEY_NAME, REPO

sys.path.insert(0, str(REPO / "scripts"))
import make_workflows  # noqa: E402

from keyface_dev import frontend, workflow_ui  # noqa: E402

CROP, STEPS = 64, 4
CONTROLNET = "keyface_tiny_controlnet.safetensors"   # what the user picks in ControlNetLoader; here the tiny one
UPDATE_DOCS = os.environ.get("KEYFACE_UPDATE_DOCS") == "1"
SCREENSHOTS = REPO / "docs" / "screenshots"
PACK = "KeyFace"   # the folder name ComfyUI serves the templates under (custom_nodes/KeyFace)


def require_frontend():
    try:
        frontend.chromium_path()
        import playwright.sync_api  # noqa: F401
        frontend.check_frontend_package()
    except (frontend.FrontendUnavailable, ImportError) as err:
        message = f"REAL-FRONTEND TEST NOT RUN: {err}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " (CI=true: the real-frontend test must run; .ci/run installs these)")
        warnings.warn(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def ui(tmp_path_factory, host):
    """(server, page, console, baseline errors, checkpoint name): the editor open, its first-run dialog closed.
    Needs `host` (the in-process ComfyUI) booted first: its asyncio.run cannot run inside Playwright's loop."""
    require_frontend()
    from keyface_dev import tiny_checkpoint
    checkpoint = tiny_checkpoint.ensure()
    work = tmp_path_factory.mktemp("frontend")
    keys = work / "keys"
    keys.mkdir()
    from keyface_core.keys import write_key_file
    write_key_file(keys / KEY_NAME)
    # The "keeping expression" workflows' ControlNetLoader lists the server's models/controlnet: a seeded ControlNet
    # file of ComfyUI's own classes, shaped for the tiny checkpoint's UNet (cached; ComfyUI's folder is ignored).
    from keyface_dev import comfy_host, tiny_models
    tiny_models.save_controlnet_file(comfy_host.comfy_dir() / "models" / "controlnet" / CONTROLNET)
    server = frontend.ComfyServer(checkpoints=checkpoint.parent, keys_dir=keys, work=work)
    (work / "input").mkdir()
    for sample in (REPO / "assets").glob("sample_*.jpg"):
        shutil.copy(sample, work / "input" / f"keyface_{sample.name}")
    with server, frontend.browser_page(server) as (page, console):
        frontend.open_app(page, server)
        frontend.close_first_run_dialog(page)
        page.wait_for_timeout(1000)
        baseline = console.errors()
        yield server, page, console, baseline, checkpoint.name


def load(page, console, workflow: dict):
    mark = console.mark()
    page.evaluate(frontend.JS_LOAD, workflow)
    page.wait_for_timeout(1000)
    return mark


@pytest.mark.parametrize("workflow_id", list(make_workflows.WORKFLOWS))
def test_workflow_loads_cleanly_and_converts_to_its_api_twin(ui, workflow_id, request):
    server, page, console, _, _ = ui
    ui_path, api_path = make_workflows.paths(workflow_id)
    if workflow_id in ("restore", "restore_expression"):   # the file it names must exist, or its preview 404s
        shutil.copy(request.getfixturevalue("anonymized"), server.folder("input") / "keyface_anonymized.png")
    mark = load(page, console, json.loads(ui_path.read_text()))
    assert page.evaluate(frontend.JS_MISSING) == []
    assert console.errors_since(mark) == [], console.failed_urls_since(mark)
    assert page.evaluate(frontend.JS_OPEN_DIALOGS) == []

    for node in page.evaluate(frontend.JS_NODE_SHAPES):
        loaded, fresh = node["loaded"], node["fresh"]
        # The image preview widget appears once the picked image has loaded; it is never serialized.
        loaded["widgets"] = [w for w in loaded["widgets"] if not w.startswith("$$")]
        assert (loaded["inputs"], loaded["widgets"], loaded["outputs"]) == (fresh["inputs"], fresh["widgets"], fresh["outputs"]), node
        assert loaded["size"][0] >= fresh["size"][0] and loaded["size"][1] >= fresh["size"][1], node

    geometry = page.evaluate(frontend.JS_GEOMETRY)
    rects = {int(k): v for k, v in geometry["rects"].items()}
    assert workflow_ui.readability_problems(rects, [tuple(w) for w in geometry["wires"]]) == []
    assert geometry["scale"] == 1.0
    hidden = frontend.nodes_under_panels(rects, geometry, page.evaluate(frontend.JS_PANELS))
    assert hidden == [], hidden

    assert page.evaluate(frontend.JS_PROMPT) == json.loads(api_path.read_text())
    if UPDATE_DOCS:
        frontend.screenshot_whole_graph(page, rects, geometry, SCREENSHOTS / f"{make_workflows.WORKFLOWS[workflow_id].file}.png")


def run_in_editor(server, page, console, changes: dict, timeout: float = 900) -> dict:
    """Set widgets like a user, press Run (app.queuePrompt), wait for the run; returns its /history entry."""
    before = set(server.get("/history"))
    done = page.evaluate(frontend.JS_SET_WIDGETS, changes)
    assert sorted(done) == sorted(k for k in changes), (done, changes)
    mark = console.mark()
    page.evaluate(frontend.JS_QUEUE)
    deadline = time.monotonic() + 60
    while not (set(server.get("/history")) | {i[1] for i in server.get("/queue")["queue_running"] + server.get("/queue")["queue_pending"]}) - before:
        assert time.monotonic() < deadline, f"nothing was queued; console: {console.errors_since(mark)}\n{server.log()}"
        time.sleep(0.3)
    ids = set(server.get("/history")) - before
    while not ids:
        time.sleep(0.5)
        ids = set(server.get("/history")) - before
    entry = server.wait_for_history(ids.pop(), timeout)
    assert entry["status"]["status_str"] == "success", (entry["status"], server.log())
    assert console.errors_since(mark) == [], console.failed_urls_since(mark)
    return entry


def fast(checkpoint: str) -> dict:
    return {"CheckpointLoaderSimple.ckpt_name": checkpoint, "KeyFaceFaceMask.crop_size": CROP,
            "KeyFaceInvertToNoise.steps": STEPS, "KeyFaceRegenerate.steps": STEPS}


@pytest.fixture(scope="module")
def anonymized(ui):
    """The anonymize workflow loaded, converted, queued and executed in the editor; the PNG it wrote."""
    server, page, console, _, checkpoint = ui
    load(page, console, json.loads(make_workflows.paths("anonymize")[0].read_text()))
    entry = run_in_editor(server, page, console, fast(checkpoint))
    images = [i for out in entry["outputs"].values() for i in out.get("images", [])]
    assert len(images) == 1 and images[0]["filename"].startswith("anonymized_")
    return server.folder("output") / images[0]["subfolder"] / images[0]["filename"]


def test_anonymize_workflow_runs_in_the_editor(ui, anonymized):
    import numpy as np
    from PIL import Image
    server = ui[0]
    with Image.open(anonymized) as im:
        assert set(im.info) <= {"keyface"}
        after = np.asarray(im.convert("RGB"))
    source = server.folder("input") / "keyface_sample_face.jpg"
    before = np.asarray(Image.open(source).convert("RGB"))
    assert after.shape == before.shape and (after != before).any()
    if UPDATE_DOCS:
        frontend.before_after(source, anonymized, thumbnail("anonymize"), box=face_box(anonymized))


def thumbnail(workflow_id: str) -> Path:
    return REPO / "workflows" / f"{make_workflows.WORKFLOWS[workflow_id].file}.jpg"


def face_box(path: Path):
    from keyface_core import pngio
    return pngio.read_png(path)[1].faces[0].box


def test_group_workflow_runs_in_the_editor(ui):
    server, page, console, _, checkpoint = ui
    load(page, console, json.loads(make_workflows.paths("anonymize_group")[0].read_text()))
    entry = run_in_editor(server, page, console, fast(checkpoint))
    images = [i for out in entry["outputs"].values() for i in out.get("images", [])]
    assert len(images) == 1
    if UPDATE_DOCS:
        saved = server.folder("output") / images[0]["subfolder"] / images[0]["filename"]
        frontend.before_after(server.folder("input") / "keyface_sample_group.jpg", saved, thumbnail("anonymize_group"))


def test_templates_dialog_lists_the_pack_and_its_restore_template_runs(ui, anonymized):
    server, page, console, _, checkpoint = ui
    titles = {g.file for g in make_workflows.WORKFLOWS.values()}
    listed = server.get("/workflow_templates")
    assert set(listed.get(PACK, [])) == titles, listed
    mark = console.mark()
    seen = len(console.responses)
    shown = frontend.open_pack_templates(page, PACK, thumbnails=len(titles))
    for title in titles:
        assert title in shown["text"]   # the file name is the card's title
    fetched = {urllib.parse.unquote(url.rsplit("/", 1)[1]): (status, kind) for status, url, kind in console.responses[seen:]
               if f"/api/workflow_templates/{PACK}/" in url}
    assert fetched == {f"{t}.jpg": (200, "image/jpeg") for t in titles}, fetched
    assert len(shown["images"]) == len(titles) and all(i["loaded"] and i["width"] >= 256 for i in shown["images"]), shown
    assert console.errors_since(mark) == [], console.failed_urls_since(mark)

    restore = make_workflows.WORKFLOWS["restore"].file
    mark = console.mark()
    frontend.click_template(page, restore)
    assert page.evaluate(frontend.JS_MISSING) == [] and console.errors_since(mark) == []
    assert page.evaluate(frontend.JS_PROMPT) == json.loads(make_workflows.paths("restore")[1].read_text())
    # The user's files: their checkpoint, and the anonymized PNG through Load Anonymized's upload button.
    uploaded = frontend.upload_through_widget(page, "KeyFaceLoadAnonymized", anonymized)
    assert uploaded == anonymized.name
    entry = run_in_editor(server, page, console, {"CheckpointLoaderSimple.ckpt_name": checkpoint})
    images = [i for out in entry["outputs"].values() for i in out.get("images", [])]
    assert len(images) == 1 and images[0]["filename"].startswith("restored_")
    restored = server.folder("output") / images[0]["subfolder"] / images[0]["filename"]
    if UPDATE_DOCS:
        frontend.before_after(anonymized, restored, thumbnail("restore"), ("anonymized", "restored"), box=face_box(anonymized))


def test_keeping_expression_workflows_run_in_the_editor(ui):
    """Anonymize keeping expression, then its restore twin, in the editor with the user's picks only (checkpoint,
    ControlNet, the anonymized PNG through the upload button): the file carries the landmarks and Restore, redrawing
    the hint from them, reports the face latent verified exact."""
    from keyface_core import pngio
    server, page, console, _, checkpoint = ui
    load(page, console, json.loads(make_workflows.paths("anonymize_expression")[0].read_text()))
    entry = run_in_editor(server, page, console, {**fast(checkpoint), "ControlNetLoader.control_net_name": CONTROLNET})
    images = [i for out in entry["outputs"].values() for i in out.get("images", [])]
    assert len(images) == 1 and images[0]["filename"].startswith("anonymized_")
    saved = server.folder("output") / images[0]["subfolder"] / images[0]["filename"]
    record = pngio.read_png(saved)[1]
    assert all(face.landmarks is not None for face in record.faces)
    if UPDATE_DOCS:
        frontend.before_after(server.folder("input") / "keyface_sample_face.jpg", saved,
                              thumbnail("anonymize_expression"), box=face_box(saved))

    load(page, console, json.loads(make_workflows.paths("restore_expression")[0].read_text()))
    assert page.evaluate(frontend.JS_MISSING) == []
    assert frontend.upload_through_widget(page, "KeyFaceLoadAnonymized", saved) == saved.name
    entry = run_in_editor(server, page, console, {"CheckpointLoaderSimple.ckpt_name": checkpoint,
                                                  "ControlNetLoader.control_net_name": CONTROLNET})
    assert "verified exact" in json.dumps(entry["outputs"]), entry["outputs"]
    images = [i for out in entry["outputs"].values() for i in out.get("images", [])]
    assert len(images) == 1 and images[0]["filename"].startswith("restored_")
    if UPDATE_DOCS:
        restored = server.folder("output") / images[0]["subfolder"] / images[0]["filename"]
        frontend.before_after(saved, restored, thumbnail("restore_expression"), ("anonymized", "restored"),
                              box=face_box(saved))


def test_generator_uses_the_servers_object_info(ui, host):
    """What the generator derives in-process equals what the live server's /object_info gives the frontend."""
    server = ui[0]
    live = server.get("/object_info")
    for graph in make_workflows.WORKFLOWS.values():
        for class_type in {n.class_type for n in graph.nodes.values()}:
            here, there = workflow_ui.node_def(workflow_ui.node_info(class_type)), workflow_ui.node_def(live[class_type])
            assert (here.slots, [w for w, _ in here.widgets], here.outputs) == \
                   (there.slots, [w for w, _ in there.widgets], there.outputs), class_type


def test_frontend_is_the_hosts_pin():
    require_frontend()
    assert frontend.check_frontend_package() == frontend.pinned_frontend_version()


def test_thumbnails_and_screenshots_are_committed():
    from PIL import Image
    for graph in make_workflows.WORKFLOWS.values():
        thumb = REPO / "workflows" / f"{graph.file}.jpg"
        shot = SCREENSHOTS / f"{graph.file}.png"
        for path, fmt in ((thumb, "JPEG"), (shot, "PNG")):
            assert path.is_file(), f"{path.relative_to(REPO)} missing: run KEYFACE_UPDATE_DOCS=1 pytest tests/test_frontend.py"
            with Image.open(path) as im:
                assert im.format == fmt and min(im.size) >= 200


def test_create_key_in_the_editor_shows_where_the_key_is(ui):
    """A first key without a terminal: add Create Key, press Run; the node says where the file is and to back it
    up. The message is not saved into the workflow, and the key bytes appear nowhere on the page."""
    import stat
    server, page, console, _, _ = ui
    mark = console.mark()
    page.evaluate("""() => { app.graph.clear(); const n = LiteGraph.createNode('KeyFaceCreateKey'); n.pos = [120, 160];
        app.graph.add(n); n.widgets.find(w => w.name === 'name').value = 'first_key'; }""")
    before = set(server.get("/history"))
    page.evaluate(frontend.JS_QUEUE)
    deadline = time.monotonic() + 120
    while not set(server.get("/history")) - before:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.3)
    path = server.keys_dir / "first_key.key"
    page.wait_for_function("() => app.graph.nodes[0].widgets.some(w => w.name === 'keyface_message' && w.value)",
                           timeout=30_000)
    shown = page.evaluate("() => app.graph.nodes[0].widgets.find(w => w.name === 'keyface_message').value")
    assert str(path) in shown and "BACK IT UP" in shown
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    secret = path.read_text().strip()
    workflow = page.evaluate("() => JSON.stringify(app.graph.serialize())")
    page_text = page.evaluate("() => document.body.innerText + [...document.querySelectorAll('textarea')].map(t => t.value).join()")
    assert "BACK IT UP" not in workflow          # a message, not a setting
    for blob in (workflow, page_text, json.dumps(server.get("/history"))):
        assert secret not in blob and secret.upper() not in blob
    assert console.errors_since(mark) == [], console.failed_urls_since(mark)
    if UPDATE_DOCS:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "Create Key.png"), clip={"x": 60, "y": 80, "width": 700, "height": 360})
