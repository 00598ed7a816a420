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

    Only requests to the local server go through; everything else (fonts, telemetry, update checks) is
    aborted, so the test is offline and sees what a user without internet would see.
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
            if request_route.request.url.startswith(local + "/") or request_route.request.url == local:
                request_route.continue_()
            else:
                console.blocked.append(request_route.request.url)
                request_route.abort()

        console = Console()
        context.route("**/*", route)
        page = context.pages[0] if context.pages else context.new_page()
        page.on("console", console.on_console)
        page.on("pageerror", console.on_page_error)
        try:
            yield page, console
        finally:
            context.close()


@dataclass
class Console:
    messages: list[tuple[str, str]] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)

    def on_console(self, message) -> None:
        self.messages.append((message.type, message.text))

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
