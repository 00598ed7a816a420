"""The real ComfyUI server and its real frontend in headless Chromium, for tests and screenshots.

`ComfyServer` starts ComfyUI's own `main.py --cpu` on a free loopback port with temporary input,
output, temp and user folders (KeyFace linked into custom_nodes, test checkpoints through an
extra_model_paths file) and stops it on exit. `browser_page()` opens the frontend the server
serves (the `comfyui-frontend-package` at the host's pinned version) in Debian's Chromium driven by
Playwright, with every request that does not go to the local server aborted. Nothing here is
imported by the pack.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from . import comfy_host

REPO = comfy_host.REPO
# What the probe of this kind of machine found works for a root, offline, headless Chromium.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]


class FrontendUnavailable(RuntimeError):
    """Chromium, Playwright or the frontend package is not installed (tests skip, or fail in CI)."""


def chromium_path() -> str:
    path = os.environ.get("KEYFACE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        raise FrontendUnavailable("Chromium is not installed: `apt-get install -y chromium` (Debian), or set "
                                  "KEYFACE_CHROMIUM to a Chromium binary.")
    return path


def pinned_frontend_version() -> str:
    """The comfyui-frontend-package version the host's requirements.txt pins."""
    for line in (comfy_host.comfy_dir() / "requirements.txt").read_text().splitlines():
        if line.strip().startswith("comfyui-frontend-package=="):
            return line.split("==", 1)[1].strip()
    raise RuntimeError("the host's requirements.txt pins no comfyui-frontend-package")


def check_frontend_package() -> str:
    """The installed frontend package version; raises FrontendUnavailable unless it is the host's pin."""
    from importlib import metadata
    want = pinned_frontend_version()
    try:
        have = metadata.version("comfyui-frontend-package")
    except metadata.PackageNotFoundError:
        raise FrontendUnavailable(f"comfyui-frontend-package is not installed: pip install "
                                  f"comfyui-frontend-package=={want}") from None
    if have != want:
        raise FrontendUnavailable(f"comfyui-frontend-package {have} is installed but the host pins {want}: "
                                  f"pip install comfyui-frontend-package=={want}")
    return have


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def link_pack(comfy: Path) -> None:
    link = comfy / "custom_nodes" / comfy_host.PACK_LINK_NAME
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)


@dataclass
class ComfyServer:
    """ComfyUI's main.py on 127.0.0.1:<free port>, in its own temporary folders. Use as a context manager."""

    checkpoints: Path | None = None          # a folder with checkpoints CheckpointLoaderSimple should list
    keys_dir: Path | None = None             # KEYFACE_KEYS_DIR of the server process
    work: Path | None = None                 # parent of input/, output/, temp/, user/ (a temp folder if None)
    start_timeout: float = 180.0
    port: int = 0
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def folder(self, name: str) -> Path:
        return self.work / name

    def __enter__(self) -> "ComfyServer":
        comfy = comfy_host.comfy_dir()
        check_frontend_package()
        link_pack(comfy)
        if self.work is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="keyface-frontend-")
            self.work = Path(self._tmp.name)
        for name in ("input", "output", "temp", "user"):
            self.folder(name).mkdir(parents=True, exist_ok=True)
        paths = self.work / "extra_model_paths.yaml"
        paths.write_text(json.dumps({"keyface_test": {"base_path": str(self.work),
                                                       **({"checkpoints": str(self.checkpoints)} if self.checkpoints else {})}}))
        self.port = self.port or free_port()
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        if self.keys_dir is not None:
            env["KEYFACE_KEYS_DIR"] = str(self.keys_dir)
        command = [sys.executable, "main.py", "--cpu", "--use-pytorch-cross-attention", "--listen", "127.0.0.1",
                   "--port", str(self.port), "--disable-auto-launch", "--input-directory", str(self.folder("input")),
                   "--output-directory", str(self.folder("output")), "--temp-directory", str(self.folder("temp")),
                   "--user-directory", str(self.folder("user")), "--extra-model-paths-config", str(paths),
                   "--database-url", f"sqlite:///{self.work / 'comfyui.db'}"]
        self.log_path = self.work / "server.log"
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(command, cwd=comfy, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        log.close()
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.process.returncode} while starting:\n{self.log()}")
            try:
                self.get("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    self.__exit__(None, None, None)
                    raise RuntimeError(f"ComfyUI did not answer within {self.start_timeout:.0f} s:\n{self.log()}")
                time.sleep(0.5)
        return self

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)
        if self._tmp is not None:
            self._tmp.cleanup()

    def log(self, tail: int = 8000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:] if self.log_path and self.log_path.is_file() else ""

    def get(self, route: str, timeout: float = 30.0):
        with urllib.request.urlopen(self.url + route, timeout=timeout) as response:
            data = response.read()
            return json.loads(data) if "json" in response.headers.get("Content-Type", "") else data

    def wait_for_history(self, prompt_id: str, timeout: float = 600.0) -> dict:
        """The /history entry of a queued prompt once it has finished (successfully or not)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and (
                    entry["status"]["completed"] or entry["status"].get("status_str") == "error"):
                return entry
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log()}")
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log()}")


@contextlib.contextmanager
def browser_page(server: ComfyServer, width: int = 1920, height: int = 1080):
    """(page, console) for the frontend at `server.url`; console collects console messages and page errors.

    Only requests to the local server go through. The frontend also asks Comfy's registry which release is
    current and which packs a loaded workflow uses: those get the registry's empty answer (no releases,
    no such pack, as for a pack not published there) so the page behaves as it would online; anything
    else is aborted and recorded in `console.blocked`.
    """
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise FrontendUnavailable("Playwright is not installed: pip install playwright (the browser is Debian's "
                                  "chromium; never `playwright install`).") from None
    executable = chromium_path()
    with tempfile.TemporaryDirectory(prefix="keyface-chromium-") as profile, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=executable, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": width, "height": height}, device_scale_factor=1)
        local = server.url

        def route(request_route):
            url = request_route.request.url
            if url.startswith(local + "/") or url == local:
                request_route.continue_()
                return
            console.outside.append(url)
            empty = registry_reply(url)
            if empty is not None:
                request_route.fulfill(status=200, content_type="application/json", body=json.dumps(empty))
            else:
                console.blocked.append(url)
                request_route.abort()

        console = Console()
        context.route("**/*", route)
        page = context.pages[0] if context.pages else context.new_page()
        page.on("console", console.on_console)
        page.on("pageerror", console.on_page_error)
        page.on("response", console.on_response)
        try:
            yield page, console
        finally:
            context.close()


REGISTRY = "https://api.comfy.org/"


def registry_reply(url: str):
    """The empty answer Comfy's registry gives for release notes and for packs it does not list; None otherwise."""
    if not url.startswith(REGISTRY):
        return None
    path = url[len(REGISTRY):].split("?", 1)[0]
    if path == "releases":
        return []
    if path == "nodes":
        return {"nodes": [], "total": 0, "page": 1, "limit": 10, "totalPages": 0}
    return None


@dataclass
class Console:
    """Console messages, page errors, failed responses and aborted (non-local) requests of one page."""

    messages: list[tuple[str, str]] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)     # every non-local request (answered or aborted)
    responses: list[tuple[int, str, str]] = field(default_factory=list)   # (status, url, content type)
    failed: list[tuple[int, str]] = field(default_factory=list)   # (index into messages when it happened, url)

    def on_console(self, message) -> None:
        where = (message.location or {}).get("url", "")
        self.messages.append((message.type, message.text + (f" [{where}]" if where and message.type == "error" else "")))

    def on_response(self, response) -> None:
        self.responses.append((response.status, response.url, response.headers.get("content-type", "")))
        if response.status >= 400:
            self.failed.append((len(self.messages), f"HTTP {response.status} {response.url}"))

    def failed_urls_since(self, mark: int) -> list[str]:
        return [url for at, url in self.failed if at >= mark] + self.blocked

    def on_page_error(self, error) -> None:
        self.messages.append(("pageerror", str(error)))

    def errors(self) -> list[str]:
        return [text for kind, text in self.messages if kind in ("error", "pageerror")]

    def mark(self) -> int:
        return len(self.messages)

    def errors_since(self, mark: int) -> list[str]:
        return [text for kind, text in self.messages[mark:] if kind in ("error", "pageerror")]


def open_app(page, server: ComfyServer, timeout_ms: int = 120_000) -> None:
    """Load the editor and wait until `window.app` has its graph and the node definitions."""
    page.goto(server.url + "/", wait_until="domcontentloaded", timeout=timeout_ms)
    page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph && "
                           "Object.keys(window.LiteGraph.registered_node_types || {}).length > 50",
                           timeout=timeout_ms)


# ------------------------------------------------------------------------------------ in-page helpers
# Each runs in the page through page.evaluate; they use only the frontend's public `app` and LiteGraph.

JS_DISMISS_DIALOGS = """() => { for (const b of document.querySelectorAll('.p-dialog .p-dialog-close-button, .p-dialog-header-close'))
    b.click(); return document.querySelectorAll('.p-dialog').length; }"""

JS_OPEN_DIALOGS = """() => [...document.querySelectorAll('.p-dialog')].map(d => (d.innerText || '').slice(0, 400))"""

JS_LOAD = """async (workflow) => { await app.loadGraphData(structuredClone(workflow), true, true, null);
    await new Promise(r => setTimeout(r, 300)); return app.graph.nodes.length; }"""

JS_PROMPT = """async () => (await app.graphToPrompt()).output"""

JS_MISSING = """() => app.graph.nodes.filter(n => !(n.type in LiteGraph.registered_node_types) || n.has_errors)
    .map(n => n.type)"""

# The loaded nodes' slots and widgets next to those of a fresh node of the same type.
JS_NODE_SHAPES = """() => app.graph.nodes.map(n => { const f = LiteGraph.createNode(n.type); return {
    id: n.id, type: n.type,
    loaded: {inputs: (n.inputs || []).map(i => [i.name, i.type, !!i.widget]), widgets: (n.widgets || []).map(w => w.name),
             outputs: (n.outputs || []).map(o => [o.name, o.type]), size: [...n.size]},
    fresh: {inputs: (f.inputs || []).map(i => [i.name, i.type, !!i.widget]), widgets: (f.widgets || []).map(w => w.name),
            outputs: (f.outputs || []).map(o => [o.name, o.type]), size: [...f.computeSize()]}}; })"""

# Node rectangles (title bar included), wire segments through native reroutes, and the view.
JS_GEOMETRY = """() => {
  const rects = {}; for (const n of app.graph.nodes) { const b = n.boundingRect; rects[n.id] = [b[0], b[1], b[2], b[3]]; }
  const wires = [];
  const reroutes = app.graph.reroutes || new Map();
  for (const link of app.graph.links.values ? app.graph.links.values() : Object.values(app.graph.links)) {
    if (!link) continue;
    const s = app.graph.getNodeById(link.origin_id), t = app.graph.getNodeById(link.target_id);
    const start = s.getConnectionPos(false, link.origin_slot), end = t.getConnectionPos(true, link.target_slot);
    const chain = []; let rid = link.parentId;
    while (rid != null) { const r = reroutes.get(rid); chain.unshift([r.pos[0], r.pos[1]]); rid = r.parentId; }
    const stops = [[start[0], start[1]], ...chain, [end[0], end[1]]];
    for (let i = 0; i + 1 < stops.length; i++) wires.push([link.origin_id, link.target_id, stops[i], stops[i + 1]]);
  }
  const canvas = app.canvas.canvas.getBoundingClientRect();
  return {rects, wires, reroutes: reroutes.size, scale: app.canvas.ds.scale, offset: [...app.canvas.ds.offset],
          canvas: [canvas.x, canvas.y, canvas.width, canvas.height],
          groups: app.graph.groups.map(g => [g.title, [...g._bounding]])};
}"""

# Screen rectangles of the floating panels a node could hide under.
JS_PANELS = """() => { const out = {};
  const pick = {'run panel': '.actionbar, .actionbar-container', 'minimap': '.litegraph-minimap, .minimap-main-container, [class*=minimap]',
                'canvas menu': '.graph-canvas-menu, [class*=canvas-menu]', 'side bar': '.side-tool-bar-container',
                'top menu': '.comfyui-menu, .comfy-menu-bar, .workflow-tabs-container'};
  for (const [name, sel] of Object.entries(pick)) {
    out[name] = [...document.querySelectorAll(sel)].map(e => e.getBoundingClientRect()).filter(r => r.width > 0 && r.height > 0)
      .map(r => [r.x, r.y, r.width, r.height]); }
  return out; }"""

JS_SET_WIDGETS = """(changes) => { const done = [];
  for (const n of app.graph.nodes) for (const w of (n.widgets || [])) {
    const key = n.type + '.' + w.name; if (key in changes) { w.value = changes[key]; if (w.callback) w.callback(w.value); done.push(key); } }
  app.graph.setDirtyCanvas(true, true); return done; }"""

JS_QUEUE = """async () => { await app.queuePrompt(0, 1); return true; }"""


def nodes_under_panels(rects: dict, geometry: dict, panels: dict) -> list[str]:
    """Nodes whose on-screen box (stored view, as loaded) meets a floating panel, the menu or the side bar."""
    scale, (ox, oy) = geometry["scale"], geometry["offset"]
    cx, cy = geometry["canvas"][:2]
    hits = []
    for node_id, (x, y, w, h) in rects.items():
        sx, sy, sw, sh = (x + ox) * scale + cx, (y + oy) * scale + cy, w * scale, h * scale
        for name, boxes in panels.items():
            for bx, by, bw, bh in boxes:
                if sx < bx + bw and bx < sx + sw and sy < by + bh and by < sy + sh:
                    hits.append(f"node {node_id} under the {name}")
    return sorted(set(hits))


def graph_bounds(geometry: dict) -> tuple[float, float, float, float]:
    xs, ys = [], []
    for x, y, w, h in list(geometry["rects"].values()) + [b for _, b in geometry["groups"]]:
        xs += [x, x + w]
        ys += [y, y + h]
    for _, _, a, b in geometry["wires"]:
        xs += [a[0], b[0]]
        ys += [a[1], b[1]]
    return min(xs), min(ys), max(xs), max(ys)


def screenshot_whole_graph(page, rects: dict, geometry: dict, path: Path, margin: int = 40) -> Path:
    """A screenshot of the editor at 100 % zoom with a window large enough to show the whole graph."""
    x0, y0, x1, y1 = graph_bounds(geometry)
    ox, oy = geometry["offset"]
    width = int(max(1280, (x1 + ox) + margin))
    height = int(max(720, (y1 + oy) + margin + 230))   # + the minimap's corner, so it covers no node
    old = page.viewport_size
    page.set_viewport_size({"width": width, "height": height})
    page.wait_for_timeout(800)
    page.evaluate("(o) => { app.canvas.ds.scale = 1; app.canvas.ds.offset[0] = o[0]; app.canvas.ds.offset[1] = o[1];"
                  " app.canvas.setDirty(true, true); }", [ox, oy])
    page.wait_for_timeout(800)
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path))
    page.set_viewport_size(old)
    page.wait_for_timeout(500)
    return path


DIALOG_CLOSE = ".p-dialog button.absolute.right-6"   # the dialog's visible close (X) button in 1.32.9


def close_first_run_dialog(page, wait_ms: int = 15_000) -> bool:
    """A first start opens the Templates dialog (a new user's welcome); close it with its X like a user."""
    dialog = page.locator(".p-dialog")
    try:
        dialog.first.wait_for(state="visible", timeout=wait_ms)
    except Exception:  # playwright TimeoutError: no dialog this time
        return False
    page.locator(DIALOG_CLOSE).first.click()
    dialog.first.wait_for(state="hidden", timeout=wait_ms)
    return True


def open_pack_templates(page, pack: str, thumbnails: int = 0, timeout_ms: int = 60_000) -> dict:
    """Open Templates (the side bar button) and pick the pack; returns the dialog's text and its images (the
    frontend fetches each thumbnail and shows it from a blob: URL, so the test matches them by the fetches).
    thumbnails: wait until that many images are in the dialog and loaded (a loaded machine is slow to fetch)."""
    page.locator('.side-tool-bar-container button[aria-label="Templates"]').click()
    dialog = page.locator(".p-dialog")
    dialog.wait_for(state="visible", timeout=30_000)
    dialog.get_by_text(pack, exact=True).first.click()
    if thumbnails:
        page.wait_for_function("""(n) => { const d = document.querySelector('.p-dialog'); if (!d) return false;
          const imgs = [...d.querySelectorAll('img')];
          return imgs.length >= n && imgs.every(i => i.complete && i.naturalWidth > 0); }""",
                               arg=thumbnails, timeout=timeout_ms)
    page.wait_for_timeout(1500)   # let the response events of the fetches reach the test
    return page.evaluate("""() => { const d = document.querySelector('.p-dialog');
      return {text: d.innerText, images: [...d.querySelectorAll('img')].map(i => ({loaded: i.complete, width: i.naturalWidth,
              height: i.naturalHeight}))}; }""")


def click_template(page, title: str) -> None:
    """Click a template card by its title, as a user would, and wait for the dialog to close."""
    dialog = page.locator(".p-dialog")
    dialog.get_by_text(title, exact=True).first.click()
    dialog.wait_for(state="hidden", timeout=30_000)
    page.wait_for_timeout(1000)


def upload_through_widget(page, class_type: str, path: Path, timeout_ms: int = 30_000) -> str:
    """Press a node's upload button and choose `path` in the file chooser; returns the value the widget took."""
    with page.expect_file_chooser(timeout=timeout_ms) as chooser:
        page.evaluate("(t) => { const n = app.graph.nodes.find(n => n.type === t);"
                      " n.widgets.find(w => w.name === 'upload').callback(); }", class_type)
    chooser.value.set_files(str(path))
    page.wait_for_function("([t, name]) => app.graph.nodes.find(n => n.type === t).widgets[0].value === name",
                           arg=[class_type, path.name], timeout=timeout_ms)
    return page.evaluate("(t) => app.graph.nodes.find(n => n.type === t).widgets[0].value", class_type)


THUMB = 512
TINY_LABEL = "test run of this pack with a tiny random model: its faces are noise, not real quality"


def _label(draw, xy, text, size=18):
    from PIL import ImageFont
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:   # Pillow < 10.1
        font = ImageFont.load_default()
    draw.text(xy, text, fill=(255, 255, 255), font=font, stroke_width=2, stroke_fill=(0, 0, 0))


def before_after(before: Path, after: Path, out: Path, titles=("before", "after"), box=None) -> Path:
    """A square JPEG thumbnail: two images side by side (the face box, or the whole photos), labelled."""
    from PIL import Image, ImageDraw
    canvas = Image.new("RGB", (THUMB, THUMB), (24, 24, 28))
    for i, source in enumerate((before, after)):
        with Image.open(source) as im:
            im = im.convert("RGB")
            if box is not None:
                x, y, size = box
                im = im.crop((x, y, x + size, y + size))
            im.thumbnail((THUMB // 2 - 6, THUMB - 120))
            canvas.paste(im, (i * THUMB // 2 + (THUMB // 2 - im.width) // 2, (THUMB - im.height) // 2))
    draw = ImageDraw.Draw(canvas)
    for i, title in enumerate(titles):
        _label(draw, (i * THUMB // 2 + 12, 16), title, 26)
    words, lines = TINY_LABEL.split(), [""]
    for word in words:   # wrap to the thumbnail's width
        lines[-1:] = [lines[-1] + " " + word] if len(lines[-1]) + len(word) < 44 else [lines[-1], word]
    for i, line in enumerate(lines):
        _label(draw, (10, THUMB - 30 - 22 * (len(lines) - 1 - i)), line.strip(), 16)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, "JPEG", quality=88, optimize=True)
    return out
