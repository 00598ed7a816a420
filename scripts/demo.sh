#!/usr/bin/env bash
# Demo command (README): sets up a fresh machine, then anonymize -> restore -> wrong key on a sample photo.
# Writes demo_output/keyface_demo.png (seven labelled panels) and prints what each proves.
# Pass --checkpoint PATH for a real model; --steps / --crop-size for a quicker run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m keyface_dev.demo "$@"
