"""The first run explains itself (issue 13 item 7): `python -m keyface_dev.demo` writes a sheet whose every panel is
labelled in words, prints what each panel proves, and shows an exact restore (latent error 0, difference panel all
zero, lossless panel bit-identical to the original); setup prints its own short lines and keeps pip's output in a
log shown only on failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO

LABELS = ["1 original", "2 anonymized", "3 restored, right key: equals panel 4",
          "4 reference: original through this VAE", "5 difference x64: all zero",
          "6 lossless: original pixels, bit-identical", "7 wrong key"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "keyface_dev.demo", "--steps", "3", "--crop-size", "64",
                           "--out", str(out)], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    seconds = time.perf_counter() - started
    print(f"demo took {seconds:.1f} s")
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout, out / "keyface_demo.png"


def tiles(path: Path):
    with Image.open(path) as sheet:
        layout = json.loads(sheet.info["keyface-demo-panels"])
        pixels = np.asarray(sheet.convert("RGB"))
    return layout, {p["label"]: pixels[p["box"][1]:p["box"][3], p["box"][0]:p["box"][2]] for p in layout}, pixels


def test_demo_sheet_has_labelled_panels_and_exact_restore(demo):
    _, path = demo
    layout, tile, pixels = tiles(path)
    labels = [p["label"] for p in layout]
    assert len(labels) == len(LABELS)
    for want, got in zip(LABELS, labels):
        assert got.startswith(want), (want, got)
    for panel in layout:
        x0, y0, x1, _ = panel["box"]
        assert (pixels[:y0, x0:x1] < 80).any(), f"no label text drawn above {panel['label']!r}"
    by_number = {label.split()[0]: t for label, t in tile.items()}
    assert not by_number["5"].any()                                   # the amplified difference: all zero
    assert np.array_equal(by_number["3"], by_number["4"])             # restored == the reference
    assert np.array_equal(by_number["6"], by_number["1"])             # lossless == the original pixels
    assert not np.array_equal(by_number["2"], by_number["1"])         # the face was changed
    assert not np.array_equal(by_number["7"], by_number["3"])         # a wrong key gives another face


def test_demo_prints_what_each_panel_proves(demo):
    stdout, path = demo
    assert "faces are noise by design" in stdout
    for label in LABELS:
        assert any(line.strip().startswith(label) and ": " in line for line in stdout.splitlines()), label
    assert "outside the face boxes 0 pixels changed" in stdout
    assert ("restored latent vs original: max abs error 0; restored photo vs reference: max 0 gray levels; "
            "lossless photo vs original: bit-identical") in stdout
    assert "verified exact" in stdout
    assert f"wrote {path}" in stdout


# ------------------------------------------------------------------------------------------ setup's output

def fake_venv(root: Path, pip_exit: int) -> Path:
    """A venv whose python has no torch and whose pip prints 200 lines, then exits with `pip_exit`."""
    bin_dir = root / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    python = bin_dir / "python"
    python.write_text("#!/usr/bin/env bash\n"
                      'if [ "$1" = "-c" ]; then exit 1; fi\n'           # "import torch, torchvision" fails
                      'for i in $(seq 1 200); do echo "pip line $i"; done\n'
                      f'echo "pip: the last words" >&2\nexit {pip_exit}\n')
    python.chmod(0o755)
    comfy = root / "comfy" / "comfy"
    comfy.mkdir(parents=True)
    (comfy / "samplers.py").write_text("")
    return root


def setup(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "KEYFACE_VENV": str(root / "venv"), "KEYFACE_COMFYUI_DIR": str(root / "comfy"),
           "KEYFACE_SETUP_LOG": str(root / "setup-pip.log"), "KEYFACE_CHROMIUM": "/bin/true", "CI": "true"}
    return subprocess.run(["bash", str(REPO / "scripts" / "setup_env.sh")], capture_output=True, text=True, env=env,
                          timeout=120)


def test_setup_prints_its_own_lines_and_logs_pip(tmp_path):
    done = setup(fake_venv(tmp_path, 0))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines and all(line.startswith("[setup]") for line in lines), lines
    assert any("installing torch" in line for line in lines) and lines[-1].startswith("[setup] ready")
    assert "pip line" not in done.stdout + done.stderr
    log = (tmp_path / "setup-pip.log").read_text()
    assert "pip line 1\n" in log and "pip line 200" in log


def test_setup_fails_with_the_log_tail(tmp_path):
    done = setup(fake_venv(tmp_path, 3))
    assert done.returncode != 0
    assert "[setup] FAILED: installing torch" in done.stderr
    assert "pip: the last words" in done.stderr and "pip line 200" in done.stderr
    assert "pip line 1\n" not in done.stderr       # only the tail
