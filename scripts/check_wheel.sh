#!/usr/bin/env bash
# CI: builds glajax's wheel, installs it into a fresh virtual environment outside the checkout and
# runs `glajax run wise_ft:runlocal` from another directory, as a user who ran `pip install glajax`
# would. Fails if the wheel lacks anything the run needs (configs, assets, the entry point), if
# the run imports anything from the checkout, or if the wheel's declared dependencies (base + tf)
# are not met by the versions the run used. Then it executes the notebooks with that environment's
# python from outside the checkout (scripts/run_notebooks.py, tiny setting, one shared work
# directory) into a temporary folder, and fails if any cell raised or if their outputs differ from
# the committed ones beyond numbers (run_notebooks.py --compare notebooks/).
#
#   bash scripts/check_wheel.sh                    # CI
#   bash scripts/check_wheel.sh --write-notebooks  # also copy the executed notebooks into
#                                                  # notebooks/ (the committed outputs)
#
# Fast (no download): the fresh environment gets the wheel alone (--no-deps); its dependencies
# are those already in .venv, which a .pth file puts on its path after its own site-packages.
set -euo pipefail
write_notebooks=0
for arg in "$@"; do
  case $arg in
    --write-notebooks) write_notebooks=1 ;;
    *) echo "usage: $0 [--write-notebooks]" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
REPO=$PWD
start=$SECONDS
[ -x .venv/bin/python ] || bash scripts/setup_env.sh
PY=$REPO/.venv/bin/python
TMP=$(mktemp -d "${TMPDIR:-/tmp}/glajax-wheel.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

# 1. The wheel, built from a copy of the files git knows (tracked, or untracked and not ignored),
#    so that nothing a build left in the checkout (build/, *.egg-info) ends up in it.
mkdir -p "$TMP/src" "$TMP/dist"
git ls-files -z --cached --others --exclude-standard \
  | tar --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C "$TMP/src"
"$PY" -m pip wheel --no-deps --no-build-isolation -q -w "$TMP/dist" "$TMP/src" >"$TMP/build.log" 2>&1 \
  || { cat "$TMP/build.log"; exit 1; }
wheel=$(ls "$TMP"/dist/glajax-*.whl)

# 2. A fresh environment outside the checkout, seeing .venv's packages after its own.
"$PY" -m venv --without-pip "$TMP/venv"
site=$("$TMP/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' >"$site/_glajax_deps.pth"
"$TMP/venv/bin/python" -m pip install -q --no-deps --no-index "$wheel"

# 3. From another directory: glajax and its configs come from the installed wheel, and the
#    versions the run uses meet what the wheel declares.
mkdir -p "$TMP/elsewhere"
cd "$TMP/elsewhere"
env -u PYTHONPATH TF_CPP_MIN_LOG_LEVEL=3 "$TMP/venv/bin/python" - "$site" <<'EOF'
import importlib.metadata as md, pathlib, sys
from packaging.requirements import Requirement
import glajax
from glajax.experiments import config
site = pathlib.Path(sys.argv[1])
assert pathlib.Path(glajax.__file__).is_relative_to(site), glajax.__file__
assert config.configs_dir() == site / "glajax" / "configs", config.configs_dir()
names = sorted(p.stem for p in config.configs_dir().glob("*.py"))
assert "wise_ft" in names, names
problems = []
for text in md.distribution("glajax").requires or []:
  req = Requirement(text)
  if req.marker and not any(req.marker.evaluate({"extra": e}) for e in ("", "tf")):
    continue
  try:
    found = md.version(req.name)
  except md.PackageNotFoundError:
    problems.append(f"{req} (not installed)")
    continue
  if not req.specifier.contains(found, prereleases=True):
    problems.append(f"{req} (found {found})")
assert not problems, "wheel's dependencies not met: " + "; ".join(problems)
print(f"wheel: glajax from {site}, configs {', '.join(names)}")
EOF
run_start=$SECONDS
env -u PYTHONPATH HF_HUB_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=3 JAX_PLATFORMS=cpu \
  "$TMP/venv/bin/glajax" run wise_ft:runlocal --workdir "$TMP/work" >"$TMP/run.log" 2>&1 \
  || { tail -n 40 "$TMP/run.log"; echo "wheel check: glajax run wise_ft:runlocal failed"; exit 1; }
test -s "$TMP/work/report.json" || { tail -n 40 "$TMP/run.log"; echo "wheel check: no report.json"; exit 1; }
run_seconds=$((SECONDS - run_start))

# 4. The notebooks, executed by the wheel's environment from elsewhere (its python is the kernel).
nb_start=$SECONDS
compare=(--compare "$REPO/notebooks")
[ "$write_notebooks" = 1 ] && compare=()
env -u PYTHONPATH PATH="$TMP/venv/bin:$PATH" "$TMP/venv/bin/python" "$REPO/scripts/run_notebooks.py" \
  --out "$TMP/notebooks" --workdir "$TMP/nbwork" "${compare[@]}" \
  || { echo "wheel check: the notebooks failed (executed copies in $TMP/notebooks, removed on exit)"; exit 1; }
if [ "$write_notebooks" = 1 ]; then
  cp "$TMP"/notebooks/*.ipynb "$REPO/notebooks/"
  echo "notebooks/: outputs written from this run"
fi
echo "wheel check passed: $(basename "$wheel") installed outside the checkout;" \
  "glajax run wise_ft:runlocal ${run_seconds} s; notebooks $((SECONDS - nb_start)) s;" \
  "whole check $((SECONDS - start)) s"
