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
  """Marks a test that needs ≥ n devices (skipped with the count present when there are fewer)."""
  import jax
  count = jax.device_count()
  return pytest.mark.skipif(count < n, reason=f"needs {n} devices, {count} present "
                            f"({jax.default_backend()})")


def needs_cpu(why: str):
  """Marks a test that only runs on the CPU backend (e.g. CPU collectives)."""
  import jax
  return pytest.mark.skipif(jax.default_backend() != "cpu",
                            reason=f"CPU backend only ({why}); backend is {jax.default_backend()}")
