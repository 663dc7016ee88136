"""Chen et al.'s backdoor-adjustment recipe against LIFT's code (shijxcs/LIFT), ported to PyTorch:
the AdaptFormer block and bottleneck (models/peft_modules.py, models/peft_vit.py) and the cosine
classifier with its text-feature initialisation (models/classifiers.py, trainer.py), on a tiny
random CLIP, at initialisation and with every adapter parameter randomised."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glajax.models.clip import CLIPConfig, init_clip
from glajax.models.heads import CosineClassifier, ImageClassifier
from glajax.models.layers import Adapter
from glajax.train import recipes

torch = pytest.importorskip("torch")
F = torch.nn.functional

ATOL = 2e-5


def _t(x):
  return torch.from_numpy(np.array(x, np.float32))


class LiftAdaptFormer(torch.nn.Module):
  """models/peft_modules.py ``AdaptFormer``, with its parameters set from glajax's."""

  def __init__(self, adapter):
    super().__init__()
    self.ln = torch.nn.LayerNorm(adapter.down.in_features)
    self.ln.weight.data, self.ln.bias.data = _t(adapter.ln.scale[...]), _t(adapter.ln.bias[...])
    self.down_proj = torch.nn.Linear(adapter.down.in_features, adapter.down.out_features)
    self.down_proj.weight.data = _t(adapter.down.kernel[...]).T.contiguous()
    self.down_proj.bias.data = _t(adapter.down.bias[...])
    self.up_proj = torch.nn.Linear(adapter.up.in_features, adapter.up.out_features)
    self.up_proj.weight.data = _t(adapter.up.kernel[...]).T.contiguous()
    self.up_proj.bias.data = _t(adapter.up.bias[...])
    self.scale = torch.nn.Parameter(_t(adapter.scale[...]))

  def forward(self, x):
    x = self.ln(x)
    x = self.down_proj(x)
    x = F.relu(x)
    x = self.up_proj(x)
    return x * self.scale


def _ln(module, x):
  return F.layer_norm(x, (x.shape[-1],), _t(module.scale[...]), _t(module.bias[...]), 1e-5)


def _linear(module, x):
  return F.linear(x, _t(module.kernel[...]).T, _t(module.bias[...]))


def lift_image_features(clip, images):
  """models/peft_vit.py ``Peft_ViT.forward`` (CLIP-VIT branch, AdaptFormer only): the CLS token
  after ``ln_post``, before ``proj``."""
  vision = clip.vision_model
  x = _t(images).permute(0, 3, 1, 2)                         # NHWC -> NCHW
  conv = _t(vision.patch_embedding.kernel[...]).permute(3, 2, 0, 1)   # HWIO -> OIHW
  x = F.conv2d(x, conv, stride=clip.config.vision.patch_size)
  x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
  cls = _t(vision.class_embedding[...]).expand(x.shape[0], 1, -1)
  x = torch.cat([cls, x], dim=1) + _t(vision.position_embedding.embedding[...])
  x = _ln(vision.pre_layernorm, x)
  bsz, _, emb_dim = x.shape
  heads = clip.config.vision.num_attention_heads
  for i in range(len(vision.layers)):
    block = vision.layers.block(i)
    adaptformer = LiftAdaptFormer(block.adapter)
    x = x.permute(1, 0, 2)                                       # NLD -> LND
    identity = x
    x = _ln(block.layer_norm1, x)
    attn = block.self_attn
    in_w = torch.cat([_t(p.kernel[...]).T for p in (attn.q_proj, attn.k_proj, attn.v_proj)])
    in_b = torch.cat([_t(p.bias[...]) for p in (attn.q_proj, attn.k_proj, attn.v_proj)])
    q, k, v = F.linear(x, in_w, in_b).chunk(3, dim=-1)
    head_dim = emb_dim // heads
    q, k, v = (t.contiguous().view(t.shape[0], t.shape[1] * heads, head_dim).transpose(0, 1)
               for t in (q, k, v))
    x = F.scaled_dot_product_attention(q, k, v)
    x = x.transpose(0, 1).contiguous().view(-1, emb_dim)
    x = _linear(attn.out_proj, x).view(-1, bsz, emb_dim)
    x = x + identity
    identity = x
    x = _ln(block.layer_norm2, x)
    x = _linear(block.mlp.fc1, x)
    x = x * torch.sigmoid(1.702 * x)                             # QuickGELU
    x = _linear(block.mlp.fc2, x)
    x = x + adaptformer(identity)
    x = x + identity
    x = x.permute(1, 0, 2)
  return _ln(vision.post_layernorm, x[:, 0, :])


def lift_cosine_head(features, text_features, proj, scale=25.0):
  """trainer.py ``init_head_text_feat`` (prompt "default"; CLIP-ViT) then models/classifiers.py
  ``CosineClassifier.forward``."""
  text_features = F.normalize(_t(text_features), dim=-1)
  text_features = text_features @ _t(proj).t()
  weight = F.normalize(text_features, dim=-1)
  return F.linear(F.normalize(features, dim=-1), F.normalize(weight, dim=-1)) * scale


def _model(randomise):
  clip = init_clip(CLIPConfig.tiny(adapter_dim=4, vision_num_hidden_layers=2), seed=0)
  if randomise:
    rng = np.random.default_rng(1)
    a = clip.vision_model.layers.adapter   # every block's adapter, stacked: block i's at [i]
    for i in range(len(clip.vision_model.layers)):
      for var, mean in ((a.ln.scale, 1.0), (a.ln.bias, 0.0), (a.down.kernel, 0.0),
                        (a.down.bias, 0.0), (a.up.kernel, 0.0), (a.up.bias, 0.0),
                        (a.scale, 1.0)):
        var[i] = jnp.asarray(mean + 0.5 * rng.normal(size=var.shape[1:]), jnp.float32)
  return clip


@pytest.mark.parametrize("randomise", [False, True])
def test_adaptformer_block_and_cosine_head_match_lift(randomise):
  clip = _model(randomise)
  images = np.random.default_rng(2).normal(size=(3, 32, 32, 3)).astype(np.float32)
  text = np.random.default_rng(3).normal(size=(5, 16)).astype(np.float32)   # (C, P)
  kernel = np.asarray(clip.visual_projection.kernel[...])                  # OpenAI visual.proj
  head = CosineClassifier.from_text_features(text, kernel, 25.0)
  classifier = ImageClassifier(clip, head, features="pre_projection")
  graphdef, state = nnx.split(classifier)
  got = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, images)
  got_features = jax.jit(lambda s, x: nnx.merge(graphdef, s).backbone.image_features(x))(state,
                                                                                      images)
  with torch.no_grad():
    want_features = lift_image_features(clip, images)
    want = lift_cosine_head(want_features, text, kernel)
  np.testing.assert_allclose(got_features, want_features.numpy(), atol=ATOL, rtol=1e-5)
  np.testing.assert_allclose(got, want.numpy(), atol=25 * ATOL, rtol=1e-5)
  if not randomise:   # at init the adapters add exactly nothing
    clip.vision_model.layers.adapter = None   # every block's
    plain = jax.jit(lambda m, x: m.image_features(x))(clip, images)
    np.testing.assert_allclose(got_features, plain, atol=1e-6)


def test_adapter_initialisation_follows_lift():
  adapter = Adapter(768, 64, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(adapter.ln.scale[...], 1.0)
  np.testing.assert_array_equal(adapter.ln.bias[...], 0.0)
  np.testing.assert_array_equal(adapter.up.kernel[...], 0.0)
  np.testing.assert_array_equal(adapter.up.bias[...], 0.0)
  np.testing.assert_array_equal(adapter.down.bias[...], 0.0)
  np.testing.assert_array_equal(adapter.scale[...], [1.0])
  # kaiming_normal_(a=√5) on a (64, 768) weight: std = sqrt(2 / (1 + 5)) / sqrt(768)
  reference = torch.empty(64, 768)
  torch.nn.init.kaiming_normal_(reference, a=math.sqrt(5))
  std = float(np.std(adapter.down.kernel[...]))
  assert std == pytest.approx(float(reference.std()), rel=0.03)
  assert std == pytest.approx(math.sqrt(1 / 3) / math.sqrt(768), rel=0.03)
  fixed = Adapter(8, 2, scale=0.1, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  assert fixed.scale is None and fixed.fixed_scale == 0.1


def _lift_adapter_dim(num_classes, n_layers):
  """models/peft_vit.py ``ViT_Tuner``."""
  return 2 ** max(0, int(math.log2(num_classes / (n_layers * 2))))


def test_bottleneck_for_vit_b_and_vit_l():
  for layers in (12, 24):
    for num_classes in list(range(1, 3000)) + [8142]:
      assert recipes.adapter_dim(num_classes, layers) == _lift_adapter_dim(num_classes, layers)
  # ImageNet-LT, Places-LT, iNaturalist 2018 on ViT-B/16 and ViT-L/14
  assert [recipes.adapter_dim(c, 12) for c in (1000, 365, 8142)] == [32, 8, 256]
  assert [recipes.adapter_dim(c, 24) for c in (1000, 365, 8142)] == [16, 4, 128]
  assert recipes.backdoor_peft(1000, num_layers=24).model.adapter_dim == 16
