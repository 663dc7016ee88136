#!/usr/bin/env bash
# Creates .venv (if missing) and installs glajax with its test extras (`demo`: with TensorFlow
# only, what the demo needs: no torch). Idempotent.
# torch is the test-only parity oracle: its CPU build is installed first, pinned, so that an
# unpinned torch does not pull several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
if [ "${1:-test}" = demo ]; then
  python -m pip install -q -e ".[tf]" --config-settings editable_mode=compat
  exit 0
fi
python -m pip install -q "torch==${GLAJAX_TORCH_VERSION:-2.13.0}"
# open_clip: the parity oracle of the open_clip and OpenAI CLIP formats. --no-deps: it requires
# torchvision, whose PyPI wheel breaks beside the CPU torch (the tests import open_clip's model
# code without it: glajax/models/clip/tests/open_clip_reference.py).
python -m pip install -q --no-deps "open_clip_torch==3.3.0"
# compat: the checkout goes on sys.path (a .pth entry), so a folder named glajax in the current
# directory (the clone itself, seen from its parent) cannot shadow the package as a namespace
python -m pip install -q -e ".[test]" --config-settings editable_mode=compat
