#!/usr/bin/env bash
# Sets up .venv and runs the embedded end-to-end demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
exec glajax demo "$@"
