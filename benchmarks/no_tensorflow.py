"""pytest plugin: makes TensorFlow (and TFDS) unimportable, as on accelerator images.

    PYTHONPATH=benchmarks python -m pytest -p no_tensorflow glajax/models ...

``benchmarks/gpu.sh --dry-run`` runs the GPU test selection with it on a CPU machine, so a test
that would need TensorFlow there fails here first. A ``None`` in ``sys.modules`` makes ``import``
raise ModuleNotFoundError and ``importlib.util.find_spec`` answer None (what transformers probes).
"""
import sys

for _name in ("tensorflow", "tensorflow_datasets", "tensorboard"):
  if _name in sys.modules and sys.modules[_name] is not None:
    raise RuntimeError(f"{_name} was imported before the no_tensorflow plugin")
  sys.modules[_name] = None
