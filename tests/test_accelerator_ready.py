"""What the suite needs to pass on an accelerator: float32 matmuls in float32, no TensorFlow in
the model/methods/train code paths (accelerator images have none), no cpu backend needed to load
a checkpoint."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

# What the model, methods and train tests import (benchmarks/gpu.sh runs those on accelerator
# images, which have no TensorFlow; ml_collections, which the recipes use, travels as a wheel).
_NO_TF_MODULES = ("glajax", "glajax.methods", "glajax.models.registry", "glajax.models.clip",
                  "glajax.models.heads", "glajax.models.tokenizer", "glajax.zeroshot",
                  "glajax.evaluate", "glajax.parallel", "glajax.train.engine",
                  "glajax.train.recipes", "glajax.train.losses", "glajax.train.checkpoint",
                  "glajax.train.prompt_tuning", "glajax.train.state")


def test_float32_matmuls_are_float32():
  """conftest states the precision the parity tests mean (TF32 is XLA's default on GPUs)."""
  assert jax.config.jax_default_matmul_precision == "highest"
  a = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
  np.testing.assert_allclose(jax.jit(lambda x: x @ x)(a), a.astype(np.float64) @ a, rtol=1e-4,
                             atol=1e-4)


def test_model_methods_train_modules_do_not_import_tensorflow():
  code = ("import sys\n" + "".join(f"import {m}\n" for m in _NO_TF_MODULES)
          + "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('tensorflow', 'tensorflow_datasets'))\n"
          + "assert not bad, bad[:5]\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ}, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]


def test_load_clip_needs_no_cpu_backend(tmp_path, monkeypatch):
  """A GPU-only JAX has no "cpu" backend: reading weights must not ask for it (issue 14)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from glajax.models.clip import load_clip
  torch.manual_seed(0)
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=8, eos_token_id=39,
                       bos_token_id=38, pad_token_id=0),
      vision_config=dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2), projection_dim=8)
  hf = transformers.CLIPModel(config).eval()
  hf.save_pretrained(str(tmp_path / "f32"))
  hf.to(torch.bfloat16).save_pretrained(str(tmp_path / "bf16"))
  real_devices = jax.devices

  def devices(backend=None):
    if backend is not None and str(backend) == "cpu":
      raise RuntimeError("Unknown backend cpu. Available backends are ['cuda']")
    return real_devices(backend)

  monkeypatch.setattr(jax, "devices", devices)
  f32 = load_clip(str(tmp_path / "f32"))
  bf16 = load_clip(str(tmp_path / "bf16"))
  w32 = np.asarray(f32.vision_model.patch_embedding.kernel[...])
  w16 = np.asarray(bf16.vision_model.patch_embedding.kernel[...])
  assert w16.dtype == np.float32
  np.testing.assert_allclose(w16, w32, rtol=1e-2, atol=1e-2)   # bf16 rounding of the same weights
  expected = hf.vision_model.embeddings.patch_embedding.weight.float().detach().numpy()
  np.testing.assert_array_equal(w16, expected.transpose(2, 3, 1, 0))
