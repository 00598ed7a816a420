#!/usr/bin/env bash
# The test command (README): builds what the tests need, then runs them all on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
exec .venv/bin/python -m pytest tests -q -p no:cacheprovider "$@"
