"""No key material anywhere a user shares. Every shipped workflow runs with a known key file and a known
passphrase, plus the stock nodes people add (Save Latent, Save Image, Preview Image) and failing runs
(wrong key, broken key sources); then every channel is scanned for the key file's bytes, the
passphrase and the per-face keys derived from them, in raw, hex and base64 form:

- every file written under ComfyUI's output and temp folders (PNG chunks, embedded prompt/workflow
  JSON, .latent files),
- ComfyUI's history for each prompt, the status and server messages (what /history and the websocket
  carry), including the error reports of failing runs (message, traceback, node inputs),
- all log records of every logger at DEBUG level (with tracebacks), and stdout/stderr.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import os
from pathlib import Path

import pytest

from conftest import KEY_NAME
from test_workflows import load_api, run, workflow_paths

PASSPHRASE = "correct horse battery staple, 42 times"
PASS_VAR = "KEYFACE_LEAK_TEST_PASSPHRASE"
NEAR_KEY_VAR = "KEYFACE_LEAK_TEST_NEAR_KEY"
CREATED = "leak_test_created"


def forms(secret: bytes) -> list[bytes]:
    hexed = secret.hex()
    return [secret, hexed.encode(), hexed.upper().encode(), base64.b64encode(secret), base64.urlsafe_b64encode(secret),
            base64.b64encode(secret).rstrip(b"=")]


class Capture(logging.Handler):
    """Every log record of every logger, formatted with its traceback."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(self.format(record))


def with_extras(prompt: dict) -> dict:
    """The anonymize workflow plus what users add: latent files, a stock SaveImage, a preview."""
    flip = next(k for k, n in prompt.items() if n["class_type"] == "KeyFaceApplyKeyFlip")
    regen = next(k for k, n in prompt.items() if n["class_type"] == "KeyFaceRegenerate")
    paste = next(k for k, n in prompt.items() if n["class_type"] == "KeyFacePasteFaces")
    prompt["100"] = {"class_type": "SaveLatent", "inputs": {"samples": [flip, 0], "filename_prefix": "leak/noise"}}
    prompt["101"] = {"class_type": "SaveLatent", "inputs": {"samples": [regen, 0], "filename_prefix": "leak/anon"}}
    prompt["102"] = {"class_type": "SaveImage", "inputs": {"images": [paste, 0], "filename_prefix": "leak/stock"}}
    prompt["103"] = {"class_type": "PreviewImage", "inputs": {"images": [paste, 0]}}
    return prompt


def use_passphrase(prompt: dict) -> dict:
    for node in prompt.values():
        if node["class_type"] == "KeyFaceLoadKey":
            node["inputs"].update(source="environment variable", variable=PASS_VAR, kind="passphrase")
    return prompt


@pytest.fixture(scope="module")
def scan(host, kf):
    """Run everything once with all channels captured; returns (channels, secrets, failed runs)."""
    nodes, work = host
    keys_dir = Path(os.environ["KEYFACE_KEYS_DIR"])
    key_hex = (keys_dir / KEY_NAME).read_text().strip()
    os.environ[PASS_VAR] = PASSPHRASE
    os.environ[NEAR_KEY_VAR] = key_hex[:-1] + "g"  # the real key with one non-hex digit: must not be echoed

    handler, root = Capture(), logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    out, err = io.StringIO(), io.StringIO()
    runs, channels = [], {}
    workflow_json = json.loads(workflow_paths("anonymize")[0].read_text())
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            def go(label, prompt, expect_success=True):
                try:
                    executor, server = run(prompt)
                except RuntimeError as validation:  # ComfyUI refused the prompt: its message is a channel too
                    channels[f"{label}: validation"] = str(validation).encode()
                    runs.append((label, False))
                    return
                runs.append((label, executor.success))
                assert executor.success == expect_success, (label, server.messages)
                channels[f"{label}: history"] = json.dumps(executor.history_result, default=str).encode()
                channels[f"{label}: status"] = json.dumps(executor.status_messages, default=str).encode()
                channels[f"{label}: server"] = json.dumps(server.messages, default=str).encode()

            from keyface_dev import comfy_host
            anon = with_extras(load_api("keyface_anonymize"))
            executor, server = comfy_host.run_prompt(anon, extra_data={"extra_pnginfo": {"workflow": workflow_json}})
            assert executor.success, server.messages
            channels["anonymize: history"] = json.dumps(executor.history_result, default=str).encode()
            channels["anonymize: status"] = json.dumps(executor.status_messages, default=str).encode()
            out_png = max((work / "output" / "keyface").glob("anonymized_*.png"), key=lambda p: p.stat().st_mtime_ns)
            (work / "input" / "keyface_anonymized.png").write_bytes(out_png.read_bytes())
            go("restore", load_api("keyface_restore"))
            wrong = load_api("keyface_restore")
            next(n for n in wrong.values() if n["class_type"] == "KeyFaceLoadKey")["inputs"]["key_file"] = "other.key"
            go("restore with wrong key", wrong, expect_success=False)
            for node in wrong.values():
                if node["class_type"] == "KeyFaceRestore":
                    node["inputs"]["allow_wrong_key"] = True
            go("restore with allow_wrong_key", wrong)
            go("anonymize with passphrase", use_passphrase(with_extras(load_api("keyface_anonymize"))))
            go("group", load_api("keyface_anonymize_group"))
            near = load_api("keyface_anonymize")
            next(n for n in near.values() if n["class_type"] == "KeyFaceLoadKey")["inputs"].update(
                source="environment variable", variable=NEAR_KEY_VAR)
            go("key-like variable that is not a key", near, expect_success=False)
            missing = load_api("keyface_anonymize")
            next(n for n in missing.values() if n["class_type"] == "KeyFaceLoadKey")["inputs"]["key_file"] = "gone.key"
            go("missing key file", missing, expect_success=False)
            # A key made in the editor (Create Key), then used: its bytes must not show up anywhere either.
            go("create key", {"1": {"class_type": "KeyFaceCreateKey", "inputs": {"name": CREATED}}})
            go("create key again (kept, not overwritten)", {"1": {"class_type": "KeyFaceCreateKey", "inputs": {"name": CREATED}}})
            made = load_api("keyface_anonymize")
            next(n for n in made.values() if n["class_type"] == "KeyFaceLoadKey")["inputs"]["key_file"] = CREATED + ".key"
            go("anonymize with the created key", made)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        os.environ.pop(NEAR_KEY_VAR, None)
    channels["log records"] = "\n".join(handler.lines).encode()
    channels["stdout"] = out.getvalue().encode()
    channels["stderr"] = err.getvalue().encode()
    for folder in ("output", "temp"):
        for path in (work / folder).rglob("*"):
            if path.is_file():
                channels[str(path.relative_to(work))] = path.read_bytes()

    key = kf.keys.load_key_file(keys_dir / KEY_NAME)
    created = kf.keys.load_key_file(keys_dir / f"{CREATED}.key")
    secrets = {"key file bytes": forms(bytes.fromhex(key_hex)),
               "created key file bytes": forms(bytes.fromhex((keys_dir / f"{CREATED}.key").read_text().strip())),
               "passphrase": [PASSPHRASE.encode(), PASSPHRASE.encode().hex().encode(), base64.b64encode(PASSPHRASE.encode())],
               "key-like variable": [os.environ.get(NEAR_KEY_VAR, key_hex[:-1] + "g").encode()]}
    # Per-face keys derived from the key file and from the passphrase, for every face that was saved.
    passphrase_key = kf.keys.SecretKey(PASSPHRASE.encode(), kind="passphrase", source="test")
    for path in (work / "output").rglob("anonymized_*.png"):
        record = kf.pngio.read_png(path)[1]
        kdf = record.keyed.lock.kdf
        for index, nonce in zip(record.keyed.faces.face_indices, record.keyed.faces.nonces):
            derived = [passphrase_key.image_key(nonce, kdf)] if kdf else [key.image_key(nonce), created.image_key(nonce)]
            secrets[f"image key of {path.name} face {index}"] = [f for d in derived for f in forms(d)]
    return channels, secrets, dict(runs)


def test_every_run_happened(scan):
    channels, secrets, runs = scan
    assert runs == {"restore": True, "restore with wrong key": False, "restore with allow_wrong_key": True,
                    "anonymize with passphrase": True, "group": True, "key-like variable that is not a key": False,
                    "missing key file": False, "create key": True, "create key again (kept, not overwritten)": True,
                    "anonymize with the created key": True}
    written = [name for name in channels if name.startswith(("output", "temp"))]
    assert any(n.endswith(".latent") for n in written) and any("stock" in n for n in written)
    assert any(n.endswith(".png") and "anonymized" in n for n in written)
    assert len([s for s in secrets if s.startswith("image key")]) >= 4
    logs = channels["log records"].decode()
    assert "does not match" in logs and "not hex digits" in logs  # the failures were logged, so the scan saw them


def test_no_secret_in_any_channel(scan):
    channels, secrets, _ = scan
    hits = [(channel, secret) for channel, blob in channels.items() for secret, variants in secrets.items()
            if any(v in blob for v in variants)]
    assert not hits, hits
    print(f"\nleak scan: {len(channels)} channels x {sum(len(v) for v in secrets.values())} secret forms, 0 hits")


def test_the_scan_finds_a_planted_leak(scan, host):
    """Control: the same matching does find the key where it really is (the key file) and in a planted log line."""
    channels, secrets, _ = scan
    key_file = (Path(os.environ["KEYFACE_KEYS_DIR"]) / KEY_NAME).read_bytes()
    planted = b"INFO keyface loaded " + base64.b64encode(bytes.fromhex(key_file.decode().strip()))
    for blob in (key_file, planted):
        assert any(v in blob for v in secrets["key file bytes"])


def test_error_reports_show_the_key_by_name_only(scan):
    channels, _, _ = scan
    report = channels["restore with wrong key: status"].decode()
    assert "does not match" in report and "current_inputs" in report
    assert "<KeyFace key from key file" in report  # the KEYFACE_KEY input prints as its source, nothing else
    validation = channels["missing key file: validation"].decode()
    assert "gone.key" in validation and "keygen" in validation
