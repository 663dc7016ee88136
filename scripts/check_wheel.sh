#!/usr/bin/env bash
# CI: builds glajax's wheel, installs it into a fresh virtual environment outside the checkout and
# runs `glajax run wise_ft:runlocal` from another directory, as a user who ran `pip install glajax`
# would. Fails if the wheel lacks anything the run needs (configs, assets, the entry point), if
# the run imports anything from the checkout, or if the wheel's declared dependencies (base + tf)
# are not met by the versions the run used.
#
# Fast (no download): the fresh environment gets the wheel alone (--no-deps); its dependencies
# are those already in .venv, which a .pth file puts on its path after its own site-packages.
set -euo pipefail
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
echo "wheel check passed: $(basename "$wheel") installed outside the checkout;" \
  "glajax run wise_ft:runlocal $((SECONDS - run_start)) s; whole check $((SECONDS - start)) s"
