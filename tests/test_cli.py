"""The `keyface` command line, through a subprocess (`python -m keyface ...`) on real photos and a seeded tiny model.

Bad inputs in a batch are each reported with a clear reason while the rest completes (ids C71-C79, rows for the
README's table are in docs/notes/cli.md); a kill mid-batch leaves nothing half-written and nothing done twice;
restore gives error 0 for every face; the key never appears in output, reports or files.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import REPO, faces_dir

MODEL = "dev:tiny"
FAST = ["--model", MODEL, "--steps", "4", "--crop-size", "64"]
# Small photos (fast detection): three single faces and one with two.
PHOTOS = {"alex-lacamoire.png": "a/alex.png", "lin-manuel-miranda.png": "a/b/lin.png", "rose-leslie2.jpg": "rose.jpg",
          "two_people.jpg": "a/two.jpg"}


def keyface(*args, env=None, check=None, timeout=300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **(env or {})}
    done = subprocess.run([sys.executable, "-m", "keyface", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=REPO)
    if check is not None:
        assert done.returncode == check, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


def key_forms(key_file: Path) -> list[str]:
    raw = bytes.fromhex(key_file.read_text().strip())
    return [raw.hex(), raw.hex().upper(), base64.b64encode(raw).decode(), raw.hex()[:24]]


def assert_no_key(text: str, key_file: Path) -> None:
    for form in key_forms(key_file):
        assert form not in text


def png_chunks(path: Path) -> list[bytes]:
    data = path.read_bytes()
    pos, kinds = 8, []
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        kinds.append(kind)
        pos += 12 + length
    return kinds


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    keyface("keygen", root / "archive", check=0)
    keyface("keygen", root / "other.key", check=0)
    photos = root / "photos"
    for name, rel in PHOTOS.items():
        (photos / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(faces_dir() / name, photos / rel)
    return root


@pytest.fixture(scope="module")
def batch(work):
    """A folder of photos with one bad input of every kind, anonymized once."""
    inputs = work / "batch"
    shutil.copytree(work / "photos", inputs)
    bad = inputs / "bad"
    bad.mkdir()
    (bad / "notes.jpg").write_text("not a photo at all\n")                           # not an image
    data = (faces_dir() / "rose-leslie2.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(data[: len(data) // 3])                      # damaged
    (bad / "gone.jpg").symlink_to(bad / "does-not-exist.jpg")                        # unreadable
    Image.new("RGB", (96, 96), (120, 160, 200)).save(bad / "sky.png")                # no face
    Image.new("RGB", (1300, 1000), (90, 90, 90)).save(bad / "huge.png")              # over --max-megapixels
    (inputs / "README.txt").write_text("ignored: not an image suffix\n")
    before = {p: p.read_bytes() for p in inputs.rglob("*") if p.is_file()}
    run = keyface("anonymize", inputs, "--out", work / "anon", "--key", work / "archive.key", *FAST,
                  "--max-megapixels", "0.8")
    report = json.loads((work / "anon.keyface-report.json").read_text())
    return {"run": run, "report": report, "inputs": inputs, "before": before,
            "rows": {Path(r["source"]).relative_to(inputs).as_posix(): r for r in report["images"]}}


def test_batch_bad_inputs_reported_rest_completes(batch, work):
    run, rows = batch["run"], batch["rows"]
    assert run.returncode == 1, run.stderr          # partial failure
    assert set(rows) == {"a/alex.png", "a/b/lin.png", "rose.jpg", "a/two.jpg", "bad/notes.jpg", "bad/truncated.jpg",
                         "bad/gone.jpg", "bad/sky.png", "bad/huge.png"}
    for rel in ("a/alex.png", "a/b/lin.png", "rose.jpg", "a/two.jpg"):
        assert rows[rel]["status"] == "ok", rows[rel]
    assert rows["a/two.jpg"]["faces"] == 2 and rows["a/alex.png"]["faces"] == 1
    expected = {  # C71-C75: what each bad input says
        "bad/notes.jpg": ("failed", "is not an image Pillow can read"),
        "bad/truncated.jpg": ("failed", "is damaged or truncated"),
        "bad/gone.jpg": ("failed", "the file does not exist (or is a broken link)"),
        "bad/sky.png": ("no_face", "no face was found, so nothing was anonymized and nothing written"),
        "bad/huge.png": ("failed", "over the limit of 0.8 MP; raise --max-megapixels"),
    }
    for rel, (status, says) in expected.items():
        assert rows[rel]["status"] == status and says in rows[rel]["reason"], rows[rel]
        assert rows[rel]["output"] is None
        assert f"{rel.split('/')[-1]}" in run.stderr    # each failure is also one line on stderr
    assert "4 done, 0 already done, 1 without a face, 4 failed" in run.stderr
    assert "img/min" in run.stderr


def test_outputs_mirror_tree_png_only_record(batch, work):
    out = work / "anon"
    outputs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert outputs == ["a/alex.png", "a/b/lin.png", "a/two.png", "rose.png"]
    for rel in outputs:
        kinds = png_chunks(out / rel)
        # Only pixels and the KeyFace record: no EXIF, text, ICC, time.
        assert set(kinds) <= {b"IHDR", b"IDAT", b"IEND", b"kfRC"} and kinds.count(b"kfRC") == 1, kinds
        assert Image.open(out / rel).mode == "RGB"
    # The inputs were not touched; the report lives beside the output folder, not in it.
    assert {p: p.read_bytes() for p in batch["inputs"].rglob("*") if p.is_file() and not p.is_symlink()} == \
        {p: v for p, v in batch["before"].items() if not p.is_symlink()}
    assert (work / "anon.keyface-report.json").is_file()


def test_restore_error_zero_every_face(batch, work):
    run = keyface("restore", work / "anon", "--out", work / "restored", "--key", work / "archive.key", "--model", MODEL)
    assert run.returncode == 0, run.stderr
    report = json.loads((work / "restored.keyface-report.json").read_text())
    assert [r["status"] for r in report["images"]] == ["ok"] * 4
    assert all(r["verified"] is True and r["max_abs_error"] == 0.0 for r in report["images"])
    assert "4 verified exact" in run.stderr
    # Directly: the restored face latents equal the original crops' latents (float32, as the user sees them).
    sys.path.insert(0, str(REPO))
    from keyface import pipeline
    from keyface.models import load_model
    from keyface_core.keys import load_key_file
    model, key = load_model(MODEL), load_key_file(work / "archive.key")
    settings = pipeline.Settings(steps=4, crop_size=64)
    faces = 0
    for source, rel in (("a/two.jpg", "a/two.png"), ("rose.jpg", "rose.png")):
        restored = pipeline.restored_latents(work / "anon" / rel, model, key).to(torch.float32)
        clean = pipeline.clean_latents(batch["inputs"] / source, settings, model).to(torch.float32)
        assert torch.equal(restored, clean)
        faces += restored.shape[0]
    assert faces == 3
    restored_png = work / "restored" / "a" / "two.png"
    assert set(png_chunks(restored_png)) == {b"IHDR", b"IDAT", b"IEND"}


def test_restore_wrong_key_wrong_model_reported(batch, work):
    mixed = work / "mixed"
    mixed.mkdir()
    shutil.copy(work / "anon" / "rose.png", mixed / "rose.png")
    shutil.copy(batch["inputs"] / "rose.jpg", mixed / "plain.png")                  # no record
    Image.open(batch["inputs"] / "rose.jpg").save(mixed / "plain.png")
    run = keyface("restore", mixed, "--out", work / "wrongkey", "--key", work / "other.key", "--model", MODEL)
    assert run.returncode == 1
    rows = {Path(r["source"]).name: r for r in json.loads((work / "wrongkey.keyface-report.json").read_text())["images"]}
    assert rows["rose.png"]["status"] == "failed"
    assert "does not match the key that anonymized this image" in rows["rose.png"]["reason"]          # C76
    assert "carries no KeyFace record, so it cannot be restored" in rows["plain.png"]["reason"]        # C78
    run = keyface("restore", mixed / "rose.png", "--out", work / "wrongmodel", "--key", work / "archive.key",
                  "--model", "dev:tiny:7")
    assert run.returncode == 1
    row = json.loads((work / "wrongmodel.keyface-report.json").read_text())["images"][0]
    assert "anonymized with a different model" in row["reason"]                                        # C77
    assert not (work / "wrongkey" / "rose.png").exists() and not (work / "wrongmodel" / "rose.png").exists()


def test_rerun_skips_done_and_exit_codes(batch, work):
    out = work / "anon"
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    good = [batch["inputs"] / rel for rel in ("a", "rose.jpg")]
    run = keyface("anonymize", *good, "--out", out, "--key", work / "archive.key", *FAST, "--max-megapixels", "0.8")
    # Folder `a` mirrors relative to itself: new outputs alex.png, b/lin.png, two.png; rose.jpg -> rose.png is done.
    assert run.returncode == 0, run.stderr
    assert "1 already done" in run.stderr
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert keyface("anonymize", work / "nothing-*.jpg", "--out", work / "x", "--key", work / "archive.key",
                   *FAST).returncode == 3                                              # nothing to do
    assert keyface("anonymize", batch["inputs"], "--out", work / "x", "--key", work / "archive.key",
                   "--model", MODEL, "--steps", "0").returncode == 2                   # usage error
    assert keyface("anonymize", work / "missing-folder", "--out", work / "x", "--key", work / "archive.key",
                   *FAST).returncode == 2


def test_never_overwrites_input(work, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(faces_dir() / "alex-lacamoire.png", folder / "alex.png")
    before = (folder / "alex.png").read_bytes()
    run = keyface("anonymize", folder, "--out", folder, "--key", work / "archive.key", *FAST)
    assert run.returncode == 2 and "is inside the output folder" in run.stderr               # C79
    run = keyface("anonymize", folder / "alex.png", "--out", folder, "--key", work / "archive.key", *FAST)
    assert run.returncode == 2 and "never overwrites an input" in run.stderr
    assert (folder / "alex.png").read_bytes() == before and sorted(folder.iterdir()) == [folder / "alex.png"]
    # An output folder inside the input folder is fine: it is left out of the walk.
    keyface("anonymize", folder, "--out", folder / "anon", "--key", work / "archive.key", *FAST, check=0)
    keyface("anonymize", folder, "--out", folder / "anon", "--key", work / "archive.key", *FAST, check=0)
    assert sorted(p.name for p in (folder / "anon").iterdir()) == ["alex.png"]


def test_flat_names_number_outputs_and_resume(work, tmp_path):
    out = tmp_path / "flat"
    args = ["anonymize", work / "photos", "--out", out, "--key", work / "archive.key", *FAST, "--flat-names"]
    keyface(*args, check=0)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["000001.png", "000002.png", "000003.png", "000004.png"]
    report = json.loads((tmp_path / "flat.keyface-report.json").read_text())
    mapping = {Path(r["source"]).name: r["output"] for r in report["images"]}
    assert mapping["two.jpg"] == "000003.png"
    # A new photo later gets the next number; the earlier ones keep theirs (read from the report).
    shutil.copy(faces_dir() / "alex-lacamoire2.jpg", work / "photos" / "zz.jpg")
    try:
        run = keyface(*args, check=0)
        assert "4 already done" in run.stderr
        report = json.loads((tmp_path / "flat.keyface-report.json").read_text())
        again = {Path(r["source"]).name: r["output"] for r in report["images"]}
        assert {k: again[k] for k in mapping} == mapping and again["zz.jpg"] == "000005.png"
    finally:
        (work / "photos" / "zz.jpg").unlink()
    # Without the report, numbered outputs cannot be matched to sources: refused, not guessed.
    (tmp_path / "flat.keyface-report.json").unlink()
    run = keyface(*args)
    assert run.returncode == 2 and "no report of the run that made them" in run.stderr


def test_kill_mid_batch_then_resume(work, tmp_path):
    inputs = tmp_path / "many"
    inputs.mkdir()
    for i in range(8):
        shutil.copy(faces_dir() / "alex-lacamoire.png", inputs / f"p{i}.png")
    out, report_path = tmp_path / "out", tmp_path / "out.keyface-report.json"
    cmd = [sys.executable, "-m", "keyface", "anonymize", str(inputs), "--out", str(out), "--key",
           str(work / "archive.key"), "--model", MODEL, "--steps", "30", "--crop-size", "128"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600   # generous: a loaded CI machine is slow to boot and to write the first file
    while time.time() < deadline and len(list(out.glob("p*.png"))) < 2 and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("p*.png")}
    assert 1 <= len(done_before) < 8, f"killed with {len(done_before)} of 8 outputs written (expected some, not all)"
    # Whatever was killed mid-write is a hidden temp file, never an output; every output is complete.
    sys.path.insert(0, str(REPO))
    from keyface import store
    for name in done_before:
        _, record = store.read(out / name)
        assert record is not None and record.keyed.faces.size == 1
    run = keyface("anonymize", inputs, "--out", out, "--key", work / "archive.key", "--model", MODEL, "--steps", "30",
                  "--crop-size", "128", check=0)
    assert f"{8 - len(done_before)} done, {len(done_before)} already done" in run.stderr
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("p*.png") if p.name in done_before} \
        == done_before                                                                  # nothing done twice
    assert sorted(p.name for p in out.iterdir()) == [f"p{i}.png" for i in range(8)]  # no temp left
    rows = json.loads(report_path.read_text())["images"]
    assert len(rows) == 8 and {r["status"] for r in rows} == {"ok", "skipped"}
    assert all(r["faces"] == 1 for r in rows)


def test_keys_never_leak(work, tmp_path):
    key_file = work / "archive.key"
    secret = key_file.read_text().strip()
    photo = work / "photos" / "rose.jpg"
    run = keyface("anonymize", photo, "--out", tmp_path / "o", "--key", "env:KF_TEST_KEY", *FAST, "--verbose",
                  "--report", tmp_path / "r.csv", env={"KF_TEST_KEY": secret}, check=0)
    texts = [run.stdout, run.stderr, (tmp_path / "r.csv").read_text()]
    restored = keyface("restore", tmp_path / "o", "--out", tmp_path / "r", "--key", "env:KF_TEST_KEY", "--model",
                       MODEL, "-v", env={"KF_TEST_KEY": secret}, check=0)
    texts += [restored.stdout, restored.stderr, (tmp_path / "r.keyface-report.json").read_text()]
    wrong = keyface("restore", tmp_path / "o", "--out", tmp_path / "w", "--key", "env:KF_TEST_KEY", "--model", MODEL,
                    env={"KF_TEST_KEY": (work / "other.key").read_text().strip()})
    texts += [wrong.stdout, wrong.stderr]
    # The key typed where its source goes: refused without echoing it.
    pasted = keyface("anonymize", photo, "--out", tmp_path / "p", "--key", secret, *FAST)
    assert pasted.returncode == 2 and "never the key itself" in pasted.stderr
    texts += [pasted.stdout, pasted.stderr]
    unset = keyface("anonymize", photo, "--out", tmp_path / "p", "--key", "env:KF_UNSET_VAR_X", *FAST)
    assert unset.returncode == 2 and "KF_UNSET_VAR_X is not set" in unset.stderr
    for text in texts:
        assert_no_key(text, key_file)
    for path in (tmp_path / "o").rglob("*"):
        data = path.read_bytes()
        for form in key_forms(key_file):
            assert form.encode() not in data
        assert bytes.fromhex(secret) not in data


def test_inspect_shows_no_secret(batch, work):
    target = work / "anon" / "a" / "two.png"
    run = keyface("inspect", target, check=0)
    assert "2 face(s)" in run.stdout and "model fingerprint: dev-" in run.stdout
    info = json.loads(keyface("inspect", target, "--json", check=0).stdout)
    assert len(info["faces"]) == 2 and info["inversion"]["steps"] == 4
    text = run.stdout + json.dumps(info)
    assert_no_key(text, work / "archive.key")
    assert "two" not in json.dumps(info) and "alex" not in json.dumps(info)   # no source names in the file
    plain = keyface("inspect", batch["inputs"] / "rose.jpg")
    assert plain.returncode == 1 and "carries no KeyFace record" in plain.stderr


def test_help_is_the_manual():
    text = keyface("--help", check=0).stdout
    assert "Exit codes" in text and "anonymize" in text and "restore" in text and "inspect" in text
    text = keyface("anonymize", "--help", check=0).stdout
    for word in ("--flat-names", "--engine", "Resumable", "--report", "--nonce", "130"):
        assert word in text


def test_paper_command_says_what_it_needs():
    run = keyface("paper", "--help-setting")
    try:
        import benchmarks.paper_setting  # noqa: F401  (the diffusers branch's script)
        assert run.returncode == 0
    except ImportError:
        assert run.returncode == 2 and "needs the diffusers backend" in run.stderr


def test_choose_faces_and_coverage(work, tmp_path):
    """--faces, --coverage and --detector reach the core's detection as Face Mask's controls do; a choice naming
    a face that is not there is that photo's reported failure, with nothing written for it."""
    photo = tmp_path / "in" / "two.jpg"
    photo.parent.mkdir()
    shutil.copy(faces_dir() / "two_people.jpg", photo)
    runs = {}
    for name, extra in {"all": [], "largest": ["--faces", "largest 1", "--coverage", "head", "--detector", "auto"],
                        "missing": ["--faces", "5"]}.items():
        out = tmp_path / name
        run = keyface("anonymize", photo.parent, "--out", out, "--key", work / "archive.key", *FAST, *extra)
        runs[name] = (run, json.loads((tmp_path / f"{name}.keyface-report.json").read_text())["images"][0])
    assert runs["all"][0].returncode == 0 and runs["all"][1]["faces"] == 2
    run, row = runs["largest"]
    assert run.returncode == 0 and row["faces"] == 1, run.stderr
    # The whole-head crop is larger than the face crop of the same face.
    info_all = json.loads(keyface("inspect", tmp_path / "all" / "two.png", "--json", check=0).stdout)
    info_one = json.loads(keyface("inspect", tmp_path / "largest" / "two.png", "--json", check=0).stdout)
    one_size = info_one["faces"][0]["box"][2]
    assert one_size > max(face["box"][2] for face in info_all["faces"])
    run, row = runs["missing"]
    assert run.returncode == 1 and row["status"] != "ok"
    assert "names face(s) [5], but only 2 were found" in row["reason"]
    assert not (tmp_path / "missing" / "two.png").exists()
