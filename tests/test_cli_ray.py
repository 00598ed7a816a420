"""`keyface anonymize --engine ray`: a local 2-CPU Ray cluster started by the command, 2 actors, the same files and
report as the local engine, resumable the same way, and actor sizing that does not starve Ray Data on 2 CPUs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import faces_dir
from test_cli import FAST, keyface

pytest.importorskip("ray.data", reason="the Ray engine needs ray[data] (requirements-dev.txt)")


def test_size_pool_fractional_on_small_machines():
    from keyface.engines import size_pool
    two = size_pool({"CPU": 2.0}, 2, "cpu")
    assert (two.workers, two.num_cpus, two.threads) == (2, 0.5, 1)     # 2 x 1 CPU would hang the read stage
    assert size_pool({"CPU": 2.0}, None, "cpu").workers == 1
    big = size_pool({"CPU": 16.0, "GPU": 4.0}, None, "cuda")
    assert (big.workers, big.num_gpus) == (4, 1.0) and big.num_cpus <= 3.75
    wide = size_pool({"CPU": 16.0}, 3, "cpu")
    assert wide.num_cpus == 5.0 and wide.threads == 5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    keyface("keygen", root / "k.key", check=0)
    inputs = root / "in"
    (inputs / "sub").mkdir(parents=True)
    shutil.copy(faces_dir() / "alex-lacamoire.png", inputs / "alex.png")
    shutil.copy(faces_dir() / "rose-leslie2.jpg", inputs / "sub" / "rose.jpg")
    shutil.copy(faces_dir() / "two_people.jpg", inputs / "sub" / "two.jpg")
    (inputs / "broken.jpg").write_text("not an image")
    return root


def _run(folder: Path, engine: str, out: str, *extra):
    args = ["anonymize", folder / "in", "--out", folder / out, "--key", folder / "k.key", *FAST, "--nonce", "derived"]
    if engine == "ray":
        args += ["--engine", "ray", "--workers", "2", "--ray-cpus", "2"]
    return keyface(*args, *extra, timeout=600)


def test_ray_files_identical_to_local_and_resume(folder):
    local = _run(folder, "local", "local")
    ray_run = _run(folder, "ray", "ray")
    assert local.returncode == ray_run.returncode == 1, ray_run.stderr   # the broken file, in both
    reports = {name: json.loads((folder / f"{name}.keyface-report.json").read_text()) for name in ("local", "ray")}
    for name, report in reports.items():
        rows = {Path(r["source"]).name: r for r in report["images"]}
        assert rows["broken.jpg"]["status"] == "failed" and "is not an image" in rows["broken.jpg"]["reason"]
        assert [rows[n]["status"] for n in ("alex.png", "rose.jpg", "two.jpg")] == ["ok"] * 3
        assert rows["two.jpg"]["faces"] == 2
    strip = lambda rows: [{k: r[k] for k in ("source", "output", "status", "faces", "reason")} for r in rows]
    assert strip(reports["local"]["images"]) == strip(reports["ray"]["images"])

    from keyface import store
    from keyface_core.keys import load_key_file
    from keyface_core.secure import open_bytes
    from keyface_core.protocol import REFERENCE_PURPOSE, _aad
    key = load_key_file(folder / "k.key")
    outputs = sorted(p.relative_to(folder / "local").as_posix() for p in (folder / "local").rglob("*.png"))
    assert outputs == sorted(p.relative_to(folder / "ray").as_posix() for p in (folder / "ray").rglob("*.png"))
    assert outputs == ["alex.png", "sub/rose.png", "sub/two.png"]
    for rel in outputs:
        a_px, a = store.read(folder / "local" / rel)
        b_px, b = store.read(folder / "ray" / rel)
        assert np.array_equal(a_px, b_px)
        assert torch.equal(a.keyed.x, b.keyed.x) and torch.equal(a.anonymized, b.anonymized)
        assert a.keyed.faces.nonces == b.keyed.faces.nonces and a.keyed.lock.key_checks == b.keyed.lock.key_checks
        assert a.keyed.lock.original_digests == b.keyed.lock.original_digests
        assert all(np.array_equal(x, y) for x, y in zip(a.keyed.lock.sealed_residuals, b.keyed.lock.sealed_residuals))
        # The sealed references are AEAD ciphertexts under fresh random nonces: compare what they hold.
        for i, (ra, rb) in enumerate(zip(a.keyed.lock.references, b.keyed.lock.references)):
            k = key.image_key(a.keyed.faces.nonces[i])
            shape = tuple(a.keyed.x.shape[1:])
            face = a.keyed.faces.face_indices[i]
            assert open_bytes(k, REFERENCE_PURPOSE, ra, _aad(face, shape)) == \
                open_bytes(k, REFERENCE_PURPOSE, rb, _aad(face, shape))
    # Resume on Ray: remove one output; the rerun redoes only that one.
    (folder / "ray" / "sub" / "rose.png").unlink()
    again = _run(folder, "ray", "ray")
    assert "1 done, 2 already done" in again.stderr, again.stderr
    a_px, _ = store.read(folder / "local" / "sub" / "rose.png")
    b_px, _ = store.read(folder / "ray" / "sub" / "rose.png")
    assert np.array_equal(a_px, b_px)
