#!/usr/bin/env bash
# Sets up .venv (glajax and TensorFlow, no torch; the test set-up adds it) and runs the embedded
# end-to-end demo; says how long each took.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
bash scripts/setup_env.sh demo
echo "set-up: $((SECONDS - start)) s"
. .venv/bin/activate
exec glajax demo "$@"
