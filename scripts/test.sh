#!/usr/bin/env bash
# Sets up .venv and runs the test suite (fast tests; pass `-m slow` or `-m ""` for the rest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
exec python -m pytest -n 2 "$@"
