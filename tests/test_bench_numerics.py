"""The benchmark's numerics harness (benchmarks/kfbench/exactness.py, issue 11): a restore whose numerics differ from
the anonymizer's is reported as "differs from the original by X", never as exact, and the same numerics verify exact.
Small settings (2 analytic samples, 4 tiny-UNet steps); the full tables come from benchmarks/run.py."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))


def _rows(result: dict) -> dict:
    return {row["restorer"]: row for row in result["rows"]}


def _assert_differs(row: dict) -> None:
    assert row["exact"] is False and row["relative_error"] > 0 and row["differing"] > 0
    assert row["message"].startswith(f"differs from the original by {row['relative_error']:.3g} relative L2")


def test_analytic_restore_reports_lower_precision(kf):
    from kfbench import exactness
    threads = torch.get_num_threads()
    rows = _rows(exactness.numerics_analytic(2, 5))
    assert torch.get_num_threads() == threads                     # the harness leaves the thread count as it was
    same = rows["float64 denoiser, 1 thread(s) (as anonymized)"]
    assert same["exact"] is True and same["relative_error"] == 0 and same["message"].startswith("verified exact")
    for dtype in ("float32", "float16", "bfloat16"):
        _assert_differs(rows[f"input and output in {dtype}"])
    # Coarser arithmetic, larger X (float32 < float16 < bfloat16: 24, 11 and 8 significant bits).
    x = [rows[f"input and output in {d}"]["relative_error"] for d in ("float32", "float16", "bfloat16")]
    assert x[0] < x[1] < x[2]


def test_tiny_unet_restore_reports_bfloat16_and_refuses_cast_weights(kf, tiny):
    from kfbench import common, exactness
    models, vae, _ = tiny
    bench_models = common.Models("tiny", models["eps"], [[torch.zeros(1, 77, 32), {}]], vae)
    # bfloat16 only: float16 convolutions are slow on CPU (the analytic test covers float16).
    rows = _rows(exactness.numerics_tiny(bench_models, 4, crop_size=64, dtypes=(torch.bfloat16,)))
    same = rows["float32 UNet, 1 thread(s) (as anonymized)"]
    assert same["exact"] is True and same["relative_error"] == 0 and same["model_calls"] == 4
    for dtype in ("bfloat16",):
        _assert_differs(rows[f"UNet computing in {dtype} (manual_cast, float32 weights)"])
        assert "different model" in rows[f"UNet weights cast to {dtype}"]["refused"]
        _assert_differs(rows[f"UNet weights cast to {dtype}, fingerprint check bypassed"])
