"""Installing glajax: the wheel carries the configs, TensorFlow is an extra that says so when it is
missing, and it is kept off the GPUs. (scripts/check_wheel.sh, run by .ci/run, installs the built
wheel outside the checkout and runs ``glajax run wise_ft:runlocal`` from another directory.)"""
import pathlib
import subprocess
import sys
import textwrap

from glajax.experiments import config as config_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
  """Runs ``code`` in a fresh interpreter (module-level effects happen once per process)."""
  return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                        capture_output=True, text=True, timeout=120)


# A stand-in for TensorFlow that records set_visible_devices: importing preprocess defines
# functions only, so the real (slow to import) TensorFlow is not needed to see the call.
_FAKE_TF = """
import sys, types
calls = []
def set_visible_devices(devices, device_type=None):
  calls.append((list(devices), device_type))
  {raise_}
tf = types.ModuleType("tensorflow")
tf.config = types.SimpleNamespace(set_visible_devices=set_visible_devices)
sys.modules["tensorflow"] = tf
"""


def test_importing_the_data_layer_hides_the_gpus_from_tensorflow():
  result = _python(_FAKE_TF.format(raise_="") + """
import glajax.data.preprocess
print(calls)
""")
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "[([], 'GPU')]"


def test_too_late_to_hide_the_gpus_warns_and_imports():
  result = _python(_FAKE_TF.format(raise_="raise RuntimeError('devices already initialised')")
                   + """
import warnings
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter("always")
  import glajax.data.preprocess
print([str(w.message) for w in caught if w.category is RuntimeWarning])
""")
  assert result.returncode == 0, result.stderr
  assert "TensorFlow already uses the GPUs" in result.stdout
  assert "devices already initialised" in result.stdout


def test_without_tensorflow_the_error_says_how_to_install_it():
  result = _python("""
import sys
sys.modules["tensorflow"] = None  # as if not installed
try:
  import glajax.data.pipeline
except ImportError as e:
  print(e)
""")
  assert result.returncode == 0, result.stderr
  assert "pip install 'glajax[tf]'" in result.stdout


def test_real_tensorflow_sees_no_gpu():
  from glajax.data import preprocess
  assert preprocess.tf.config.get_visible_devices("GPU") == []


def test_configs_dir_is_the_checkouts_folder():
  assert config_lib.configs_dir() == REPO / "configs"
  assert (config_lib.configs_dir() / "wise_ft.py").is_file()


def test_configs_dir_prefers_the_copy_an_installed_wheel_carries(tmp_path, monkeypatch):
  site = tmp_path / "site-packages"
  (site / "glajax" / "configs").mkdir(parents=True)
  (site / "glajax" / "configs" / "mine.py").write_text("def get_config(arg=None): ...\n")
  (site / "configs").mkdir()  # another distribution's top-level folder: not ours
  monkeypatch.setattr(config_lib, "__file__", str(site / "glajax" / "experiments" / "config.py"))
  assert config_lib.configs_dir() == site / "glajax" / "configs"
  assert config_lib._config_file("mine") == site / "glajax" / "configs" / "mine.py"


def test_setup_maps_the_top_level_configs_into_the_package():
  """The wheel's glajax/configs is built from the top-level configs/ (setup.py)."""
  result = _python("""
import setuptools
seen = {}
setuptools.setup = lambda **kwargs: seen.update(kwargs)
exec(open("setup.py").read())
print(seen["package_dir"], "glajax.configs" in seen["packages"],
      "glajax.experiments.kinds" in seen["packages"],
      any("__pycache__" in p for p in seen["packages"]))
""")
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ["{'glajax.configs':", "'configs'}", "True", "True", "False"]


def test_a_folder_named_glajax_in_the_working_directory_does_not_shadow_the_package(tmp_path):
  """From the folder that holds a clone named glajax, ``import glajax`` is the package (the
  editable install puts the checkout on sys.path; a folder without __init__.py would otherwise
  win as a namespace package and have no ``load_clip``)."""
  (tmp_path / "glajax").symlink_to(REPO, target_is_directory=True)
  result = subprocess.run([sys.executable, "-c", "import glajax; print(glajax.load_clip.__name__)"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == "load_clip"


def test_the_command_line_is_quiet_and_helpful():
  """`glajax run --help` lists the bundled configs and the override syntax; a bad config is one
  line on stderr: no TensorFlow, absl or TFDS start-up lines."""
  run = lambda *args: subprocess.run([sys.executable, "-m", "glajax.cli", *args], cwd=REPO,
                                     capture_output=True, text=True, timeout=300)
  help_ = run("run", "--help")
  assert help_.returncode == 0 and not help_.stderr, help_.stderr
  for name in ("wise_ft", "gla_fewshot", "custom", "key=value", "runlocal"):
    assert name in help_.stdout
  bad = run("run", "wise_ft:wise_ft.alpha=1", "--workdir", "/nonexistent/never")
  assert bad.returncode == 1 and bad.stdout == ""
  assert bad.stderr.count("\n") == 1 and "did you mean 'wise_ft.alphas'" in bad.stderr, bad.stderr
  version = run("--version")
  assert version.stdout.startswith("glajax ")
