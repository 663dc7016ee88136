"""Test set-up: 8 virtual CPU devices (for mesh tests), no network, quiet TensorFlow, and float32
matmuls computed in float32.

Precision: the parity tests compare float32 against transformers/NumPy at ~1e-5. XLA computes
float32 matmuls in TF32 on NVIDIA GPUs by default (10-bit mantissa, ~1e-3 relative), so the
suite states the precision it means, "highest" (true float32), through the environment: it
reaches the subprocesses that tests start, too. bfloat16 tests set their own looser tolerances.

Devices: on a CPU the suite sees 8 virtual devices; on an accelerator it sees what is there
(run it with JAX_PLATFORMS=cuda or tpu). Tests that need several devices say so with
``needs_devices(n)`` and are skipped, with the reason, when fewer are present.
"""
import os
import socket
import subprocess
import sys

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TFDS_DISABLE_GCS", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")


def needs_devices(n: int):
  """Marks a test that needs ≥ n devices (skipped, saying so, when fewer are present). The
  condition is evaluated when the test runs, never at import: a module importing this must not
  start a JAX backend (the jax.distributed children import test modules before initialising)."""
  return pytest.mark.skipif(f"__import__('jax').device_count() < {n}",
                            reason=f"needs {n} devices; fewer are present on this backend")


def needs_cpu(why: str):
  """Marks a test that only runs on the CPU backend (e.g. CPU collectives); evaluated lazily."""
  return pytest.mark.skipif("__import__('jax').default_backend() != 'cpu'",
                            reason=f"CPU backend only ({why})")


def two_jax_processes(module: str, call: str, timeout: int = 600) -> None:
  """Runs ``module.call`` (a test module of ``tests/`` and a call in it, e.g.
  ``"_child_main('/tmp/w')"``) in two processes joined by ``jax.distributed`` (gloo
  collectives), 4 virtual CPU devices each, and waits for both; fails with the output of one
  that did not exit 0."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  procs = []
  for i in range(2):
    tests = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests")
    code = (f"import sys; sys.path.insert(0, {tests!r}); import jax; "
            "jax.config.update('jax_cpu_collectives_implementation', 'gloo'); "
            f"jax.distributed.initialize('localhost:{port}', 2, {i}); "
            "assert jax.device_count() == 8 and jax.local_device_count() == 4; "
            f"import {module} as t; t.{call}")
    procs.append(subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}))
  for proc in procs:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out.decode()[-3000:]
