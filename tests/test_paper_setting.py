"""`keyface paper` (benchmarks/paper_setting.py): the paper's setting on real face photos with the seeded tiny LDM.

The command runs as a subprocess: every column of the paper's table is printed next to the published numbers, the
restore is exact (restored latents error 0, verified by the keyed digests), the mechanics-only warning is shown,
no key material reaches the outputs or the images, and an ArcFace network given as TorchScript is used. Bad inputs
(ids C86-C89; rows for the README's table are in docs/notes/paper.md) each end with a clear message.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffusers", reason="the paper setting runs the diffusers backend (requirements-dev.txt)")
pytest.importorskip("skimage", reason="the paper setting's PSNR/SSIM need scikit-image (requirements-dev.txt)")

from conftest import REPO, faces_dir  # noqa: E402

sys.path.insert(0, str(REPO))
from benchmarks import paper_setting  # noqa: E402
from keyface_core.keys import write_key_file  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
COLUMNS = ("re-identified after anonymization", "re-identified after restore (dlib", "with a wrong key",
           "restore PSNR vs the original", "restore SSIM vs the original", "vs the VAE reconstruction",
           "restored latent vs original", "face detected on anonymized images", "UNet calls per anonymization",
           "ArcFace re-identified", "FaceNet re-identification")
PUBLISHED = ("0.3-0.6 %", "39-71 %", "20.7 dB", "0.857")


def keyface(*args, timeout=900):   # generous: a loaded 2-core machine runs this ~5x slower
    return subprocess.run([sys.executable, "-m", "keyface", *map(str, args)], capture_output=True, text=True,
                          env=ENV, cwd=REPO, timeout=timeout)


def tiny_arcface(path: Path) -> Path:
    """A seeded random 'ArcFace' (112x112 RGB -> 16-d vector) saved with torch.export: the loader seam, not a real
    network."""
    import torch
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5, stride=4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                              torch.nn.Flatten(), torch.nn.Linear(32, 16)).eval()
    torch.export.save(torch.export.export(net, (torch.zeros(1, 3, 112, 112),)), str(path))
    return path


def test_paper_table_through_the_command(tmp_path):
    faces = tmp_path / "faces"
    faces.mkdir()
    for name in ("alex-lacamoire.png", "lin-manuel-miranda.png"):
        shutil.copy(faces_dir() / name, faces / name)
    key = tmp_path / "k.key"
    write_key_file(key)
    key_hex = key.read_text().strip()
    out = tmp_path / "out"
    run = keyface("paper", "--faces", faces, "--limit", 2, "--size", 64, "--steps", 3, "--key", key, "--out", out,
                  "--arcface", tiny_arcface(tmp_path / "arcface.pt2"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "MECHANICS ONLY" in run.stdout
    for column in COLUMNS + PUBLISHED:
        assert column in run.stdout, column
    assert "not given (--facenet WEIGHTS)" in run.stdout

    result = json.loads((out / "paper_setting.json").read_text())
    summary = result["summary"]
    assert result["setting"]["mechanics_only"] is True and result["setting"]["scramble"] == "signflip"
    assert summary["photos_ok"] == 2 and summary["faces"] == 2
    # Exact restore: both photos' face latents match the keyed digests of the originals, error 0 ...
    assert summary["max_abs_error"] == 0.0 and summary["verified"] == {"rate": 1.0, "count": 2, "of": 2}
    assert "max abs error 0.0; verified exact 100.0 % (2/2)" in run.stdout
    # ... so the restored faces are the VAE's reconstruction of the originals up to the saved image's rounding.
    assert summary["max_levels_vs_vae"] <= 3   # measured 1 here; at most 3 over the 14-photo folder
    assert all(p["restore_calls"] == 3 for p in result["photos"])      # restore = `steps` UNet calls
    for row in result["faces"]:
        assert set(row) >= {"photo", "face", "box", "anonymized", "restored", "wrong_key", "psnr", "ssim",
                            "psnr_vs_vae", "vae_psnr"}
        assert set(row["anonymized"]["embeddings"]) == {"ArcFace"}
        assert row["anonymized"]["dlib_distance"] > 0
    for sub in ("anonymized", "restored", "wrong_key"):
        assert sorted(p.name for p in (out / sub).iterdir()) == ["alex-lacamoire.png", "lin-manuel-miranda.png"]

    # No key material anywhere (stdout, stderr, results, PNGs), and no machine paths in the results.
    assert key_hex not in run.stdout + run.stderr
    for file in out.rglob("*"):
        if file.is_file():
            data = file.read_bytes()
            assert key_hex.encode() not in data and bytes.fromhex(key_hex) not in data, file.name
    for name in ("paper_setting.md", "paper_setting.json"):
        text = (out / name).read_text()
        assert str(tmp_path) not in text and str(REPO) not in text, name


def test_bad_model_is_a_clear_usage_error(tmp_path):
    """C86: a --model that is not a diffusers face LDM: exit 2, what is wrong and what to pass instead."""
    faces = tmp_path / "faces"
    faces.mkdir()
    shutil.copy(faces_dir() / "obama.jpg", faces / "obama.jpg")
    (tmp_path / "not-a-model").mkdir()
    run = keyface("paper", "--faces", faces, "--model", tmp_path / "not-a-model", "--out", tmp_path / "out",
                  "--size", 64, "--steps", 2)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "keyface paper: --model:" in run.stderr and "not a diffusers pipeline folder" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "out").exists()          # nothing written when the run cannot start


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_unusable_identity_weights_say_how_to_export(tmp_path, capsys):
    """C87: --arcface/--facenet weights that cannot be used: exit 2 before any model work, with what to do."""
    faces = tmp_path / "faces"
    faces.mkdir()
    shutil.copy(faces_dir() / "obama.jpg", faces / "obama.jpg")
    import torch
    torch.save({"weight": torch.zeros(2)}, tmp_path / "state_dict.pt")
    cases = {
        ("--arcface", str(tmp_path / "state_dict.pt")): "A state dict alone has no architecture",
        ("--facenet", str(tmp_path / "missing.pt")): "is not a file",
        ("--arcface", str(tmp_path / "net.onnx")): "onnxruntime",
    }
    (tmp_path / "net.onnx").write_bytes(b"not onnx")
    for (flag, path), says in cases.items():
        code = paper_setting.main(["--faces", str(faces), flag, path, "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and says in err, (flag, err)
    # A network with the wrong output (not one vector per face) is refused on a probe input.
    torch.jit.script(torch.nn.Identity()).save(str(tmp_path / "identity.pt"))
    assert paper_setting.main(["--faces", str(faces), "--arcface", str(tmp_path / "identity.pt")]) == 2
    assert "expected one identity vector" in capsys.readouterr().err


def test_faces_folder_without_photos_or_faces(tmp_path, capsys):
    """C88: --faces not a folder or without photos: exit 2. C89: a photo without a face is a row, not a crash."""
    assert paper_setting.main(["--faces", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert paper_setting.main(["--faces", str(tmp_path / "empty")]) == 2
    assert "holds no photo" in capsys.readouterr().err
    (tmp_path / "blank").mkdir()
    Image.fromarray(np.full((96, 96, 3), 128, np.uint8)).save(tmp_path / "blank" / "wall.png")
    out = tmp_path / "out"
    assert paper_setting.main(["--faces", str(tmp_path / "blank"), "--size", "64", "--steps", "2",
                               "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1 without a face" in printed and "n/a (no face)" in printed
    photos = json.loads((out / "paper_setting.json").read_text())["photos"]
    assert photos[0]["status"] == "no_face" and "no face was found" in photos[0]["reason"]
