"""Each training loss under jax.jit against a plain NumPy reference on fixed random inputs."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glajax.errors import InputError
from glajax.models import heads
from glajax.train import losses

RTOL, ATOL = 1e-5, 1e-5


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_ce(logits, labels, eps=0.0):
  c = logits.shape[1]
  target = np.full(logits.shape, eps / c)
  target[np.arange(len(labels)), labels] += 1.0 - eps
  return float(-(target * _np_log_softmax(logits)).sum(-1).mean())


@pytest.fixture
def rng():
  return np.random.default_rng(0)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy_with_label_smoothing(rng, eps):
  logits = rng.normal(size=(16, 7)).astype(np.float32) * 3
  labels = rng.integers(0, 7, 16).astype(np.int32)
  got = jax.jit(losses.cross_entropy, static_argnums=2)(logits, labels, eps)
  np.testing.assert_allclose(got, _np_ce(logits.astype(np.float64), labels, eps), RTOL, ATOL)


def test_cross_entropy_weights_rows(rng):
  logits = rng.normal(size=(10, 4)).astype(np.float32)
  labels = rng.integers(0, 4, 10).astype(np.int32)
  mask = np.array([1] * 7 + [0] * 3, np.int32)
  got = jax.jit(losses.cross_entropy, static_argnums=2)(logits, labels, 0.0, mask)
  np.testing.assert_allclose(got, _np_ce(logits[:7].astype(np.float64), labels[:7]), RTOL, ATOL)


def test_cross_entropy_rejects_bad_smoothing():
  with pytest.raises(InputError, match="label_smoothing"):
    losses.cross_entropy(jnp.zeros((2, 3)), jnp.zeros(2, jnp.int32), 1.0)


def test_logit_adjusted_cross_entropy(rng):
  logits = rng.normal(size=(32, 5)).astype(np.float32)
  labels = rng.integers(0, 5, 32).astype(np.int32)
  counts = np.array([100, 40, 10, 5, 1.0])
  log_prior = np.log(counts / counts.sum()).astype(np.float32)
  got = jax.jit(losses.logit_adjusted_loss)(logits, labels, log_prior, 0.7)
  want = _np_ce(logits.astype(np.float64) + 0.7 * log_prior, labels)
  np.testing.assert_allclose(got, want, RTOL, ATOL)


def _np_contrastive_logits(img, txt, scale):
  return np.exp(scale) * _np_normalize(img.astype(np.float64)) @ _np_normalize(
      txt.astype(np.float64)).T


def test_clip_contrastive_loss(rng):
  img, txt = rng.normal(size=(2, 8, 6)).astype(np.float32)
  scale = np.float32(np.log(1 / 0.07))
  logits = _np_contrastive_logits(img, txt, scale)
  ids = np.arange(8)
  want = 0.5 * (_np_ce(logits, ids) + _np_ce(logits.T, ids))
  got = jax.jit(losses.clip_contrastive_loss)(img, txt, scale)
  np.testing.assert_allclose(got, want, 1e-5, 1e-5)


def _np_log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _np_sigmoid_loss(img, txt, scale, bias):
  """−(1/B) Σ_ij log σ(z_ij (exp(t)·cos_ij + b)), z = +1 on the diagonal, −1 off it."""
  logits = _np_contrastive_logits(img, txt, scale) + np.float64(bias)
  signs = 2 * np.eye(len(img)) - 1
  return float(-_np_log_sigmoid(signs * logits).sum() / len(img))


class _OpenClipSigLipLoss:
  """open_clip's ``SigLipLoss`` on one process (mlfoundations/open_clip ``src/open_clip/loss.py``
  at 89fb801: ``get_ground_truth``, ``get_logits``, ``_loss``), ported to torch as is; it takes
  normalised features and the exponentiated scale, as open_clip's models return them."""

  def __init__(self, torch):
    self.torch = torch

  def get_ground_truth(self, device, dtype, num_logits, negative_only=False):
    labels = -self.torch.ones((num_logits, num_logits), device=device, dtype=dtype)
    if not negative_only:
      labels = 2 * self.torch.eye(num_logits, device=device, dtype=dtype) + labels
    return labels

  def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
    logits = logit_scale * image_features @ text_features.T
    if logit_bias is not None:
      logits += logit_bias
    return logits

  def __call__(self, image_features, text_features, logit_scale, logit_bias):
    logits = self.get_logits(image_features, text_features, logit_scale, logit_bias)
    labels = self.get_ground_truth(image_features.device, image_features.dtype,
                                   image_features.shape[0])
    return -self.torch.nn.functional.logsigmoid(labels * logits).sum() / image_features.shape[0]


@pytest.mark.parametrize("batch", [1, 8])
def test_sigmoid_loss_against_numpy(rng, batch):
  img, txt = rng.normal(size=(2, batch, 6)).astype(np.float32)
  scale, bias = np.float32(np.log(10.0)), np.float32(-10.0)   # SigLIP's initialisation
  got = jax.jit(losses.sigmoid_loss)(img, txt, scale, bias)
  np.testing.assert_allclose(got, _np_sigmoid_loss(img.astype(np.float64), txt, scale, bias),
                             1e-5, 1e-5)
  np.testing.assert_allclose(jax.jit(losses.sigmoid_logits)(img, txt, scale, bias),
                             _np_contrastive_logits(img, txt, scale) + bias, 1e-5, 1e-5)


def test_sigmoid_loss_and_its_gradients_equal_open_clips(rng):
  """The loss and its gradients with respect to the features, t and b (which open_clip #1076
  found unused under the CLIP loss) against open_clip's SigLipLoss in torch."""
  torch = pytest.importorskip("torch")
  img, txt = rng.normal(size=(2, 12, 7))
  scale, bias = 2.1, -3.4
  got, grads = jax.jit(jax.value_and_grad(losses.sigmoid_loss, argnums=(0, 1, 2, 3)))(
      *(np.asarray(a, np.float32) for a in (img, txt, scale, bias)))
  leaves = [torch.tensor(a, dtype=torch.float64, requires_grad=True)
            for a in (img, txt, scale, bias)]
  t_img, t_txt, t_scale, t_bias = leaves
  normalise = torch.nn.functional.normalize
  want = _OpenClipSigLipLoss(torch)(normalise(t_img, dim=-1), normalise(t_txt, dim=-1),
                                    t_scale.exp(), t_bias)
  want.backward()
  np.testing.assert_allclose(got, want.item(), 1e-5, 1e-5)
  for ours, leaf, name in zip(grads, leaves, ("image", "text", "logit_scale", "logit_bias")):
    np.testing.assert_allclose(ours, leaf.grad.numpy(), rtol=1e-4, atol=1e-5, err_msg=name)
  assert abs(float(grads[3])) > 1e-3   # b is trained


def test_sigmoid_self_distillation_loss(rng):
  s_img, s_txt, t_img, t_txt = rng.normal(size=(4, 6, 5)).astype(np.float32)
  s_scale, s_bias, t_scale, t_bias = (np.float32(v) for v in (2.0, -1.0, 3.5, -4.0))
  s = _np_contrastive_logits(s_img, s_txt, s_scale) + s_bias
  p = 1 / (1 + np.exp(-(_np_contrastive_logits(t_img, t_txt, t_scale) + t_bias)))
  want = -(p * _np_log_sigmoid(s) + (1 - p) * _np_log_sigmoid(-s)).sum() / 6
  args = (s_img, s_txt, s_scale, s_bias, t_img, t_txt, t_scale, t_bias)
  got = jax.jit(losses.sigmoid_self_distillation_loss)(*args)
  np.testing.assert_allclose(got, want, 1e-5, 1e-5)
  # The teacher is a constant; a student that predicts what the teacher does gets no gradient.
  grad = jax.grad(losses.sigmoid_self_distillation_loss, argnums=(4, 5, 6, 7))(*args)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in grad)
  same = (t_img, t_txt, t_scale, t_bias, t_img, t_txt, t_scale, t_bias)
  grad = jax.grad(losses.sigmoid_self_distillation_loss, argnums=(0, 1, 2, 3))(*same)
  assert max(float(jnp.abs(g).max()) for g in grad) < 1e-5


def test_orthogonality_penalty_is_frobenius_not_squared(rng):
  w = rng.normal(size=(12, 5)).astype(np.float32)
  want = np.sqrt(((w.T.astype(np.float64) @ w - np.eye(5)) ** 2).sum())
  np.testing.assert_allclose(jax.jit(losses.orthogonality_penalty)(w), want, 1e-5)
  q, _ = np.linalg.qr(rng.normal(size=(12, 5)))
  assert float(losses.orthogonality_penalty(q.astype(np.float32))) < 1e-5


def test_projection_cross_penalty(rng):
  wv, wt = rng.normal(size=(7, 4)), rng.normal(size=(5, 4))
  want = np.sqrt(((wv @ wt.T) ** 2).sum())
  got = jax.jit(losses.projection_cross_penalty)(wv.astype(np.float32), wt.astype(np.float32))
  np.testing.assert_allclose(got, want, 1e-5)


def test_self_distillation_loss(rng):
  s_img, s_txt, t_img, t_txt = rng.normal(size=(4, 6, 5)).astype(np.float32)
  s_scale, t_scale = np.float32(2.0), np.float32(3.5)
  s = _np_contrastive_logits(s_img, s_txt, s_scale)
  t = _np_contrastive_logits(t_img, t_txt, t_scale)

  def row_ce(teacher, student):
    p = np.exp(_np_log_softmax(teacher))
    return float(-(p * _np_log_softmax(student)).sum(-1).mean())

  want = row_ce(t, s) + row_ce(t.T, s.T)
  got = jax.jit(losses.self_distillation_loss)(s_img, s_txt, s_scale, t_img, t_txt, t_scale)
  np.testing.assert_allclose(got, want, 1e-5, 1e-5)
  # The teacher is a constant: no gradient reaches it.
  grad = jax.grad(losses.self_distillation_loss, argnums=(3, 4, 5))(
      s_img, s_txt, s_scale, t_img, t_txt, t_scale)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in grad)


def test_teacher_momentum_schedule_formula():
  total = 1000
  steps = np.arange(0, total + 1, 50)
  got = np.asarray(jax.jit(losses.teacher_momentum, static_argnums=1)(steps, total))
  want = np.where(steps < 200, 0.05 + (0.9 - 0.05) * steps / 200, 0.9)
  np.testing.assert_allclose(got, want, 1e-6, 1e-6)
  assert got[0] == pytest.approx(0.05) and got[-1] == pytest.approx(0.9)


def test_ema_update(rng):
  t = {"a": rng.normal(size=(3,)), "b": rng.normal(size=(2, 2))}
  s = {"a": rng.normal(size=(3,)), "b": rng.normal(size=(2, 2))}
  got = jax.jit(losses.ema_update)(t, s, 0.3)
  for k in t:
    np.testing.assert_allclose(got[k], 0.3 * t[k] + 0.7 * s[k], 1e-6, 1e-6)


def test_cosine_classifier_logits(rng):
  f = rng.normal(size=(9, 6)).astype(np.float32)
  w = rng.normal(size=(4, 6)).astype(np.float32)
  want = 25.0 * _np_normalize(f.astype(np.float64)) @ _np_normalize(w.astype(np.float64)).T
  np.testing.assert_allclose(jax.jit(heads.cosine_logits)(f, w), want, 1e-5, 1e-5)
  np.testing.assert_allclose(heads.CosineClassifier(w)(f), want, 1e-5, 1e-5)


def test_cosine_classifier_pinv_option_maps_back_through_projection(rng):
  projection = rng.normal(size=(10, 4)).astype(np.float32)   # (hidden, projection_dim)
  text = rng.normal(size=(3, 4)).astype(np.float32)
  clf = heads.CosineClassifier.from_text_features(text, projection, init="pinv")
  # The back-mapped weights project onto the text features (W has full column rank).
  np.testing.assert_allclose(np.asarray(clf.weight[...]) @ projection, text, 1e-4, 1e-4)
  with pytest.raises(InputError, match="text_features"):
    heads.CosineClassifier.from_text_features(text[:, :3], projection)
  with pytest.raises(InputError, match="init"):
    heads.CosineClassifier.from_text_features(text, projection, init="mean")


def test_linear_head_from_zeroshot_gives_zeroshot_logits(rng):
  zs = rng.normal(size=(5, 6)).astype(np.float32)
  f = rng.normal(size=(7, 6)).astype(np.float32)
  head = heads.LinearHead.from_zeroshot(zs)
  np.testing.assert_allclose(head(f), _np_normalize(f) @ zs.T, 1e-5, 1e-5)
  # SigLIP: exp(t)·cos + b, the model's logit bias on every class
  biased = heads.LinearHead.from_zeroshot(zs, nnx.Param(jnp.asarray(-3.5)))
  np.testing.assert_allclose(biased(f), _np_normalize(f) @ zs.T - 3.5, 1e-5, 1e-5)
  with pytest.raises(InputError, match="logit_bias"):
    heads.LinearHead.from_zeroshot(zs, np.zeros(2))


def _official_carot_ema_run(params_per_step, total, every, src, tar, warm_up):
  """MLAI-Yonsei/CaRot src/models/carot_loss.py: the teacher starts as the student
  (``teacher_enc.load_state_dict``); after ``optimizer.step()`` of step = i + epoch·num_batches,
  ``if step % ema_up_freq == 0 or step == num_batches * epochs`` it is updated in place with
  ``param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)``."""
  torch = pytest.importorskip("torch")
  teacher = [torch.tensor(v) for v in params_per_step[0]["init"]]
  out = []
  for step, after in enumerate(params_per_step[1:]):
    student = [torch.tensor(v) for v in after["params"]]
    if (step % every == 0) or (step == total):
      if step < total * warm_up:
        m = ((tar - src) / (total * warm_up)) * step + src
      else:
        m = tar
      for param_q, param_k in zip(student, teacher):
        param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
    out.append([t.numpy().copy() for t in teacher])
  return out


@pytest.mark.parametrize("every", [1, 3, 500])
def test_carot_teacher_update_matches_the_official_loop(rng, every):
  num_batches, epochs = 7, 3            # 21 steps; the ramp covers k < 4.2
  total = num_batches * epochs
  init = [rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(5,)).astype(np.float32)]
  history = [{"init": init}]
  params = init
  for _ in range(total):                # each step's student after its optimiser update
    params = [p + 0.1 * rng.normal(size=p.shape).astype(np.float32) for p in params]
    history.append({"params": params})
  want = _official_carot_ema_run(history, total, every, 0.05, 0.9, 0.2)
  update = jax.jit(functools.partial(losses.carot_teacher_update, total_steps=total, every=every,
                                     start=0.05, end=0.9, warmup_fraction=0.2))
  teacher = {"a": jnp.asarray(init[0]), "b": jnp.asarray(init[1])}
  for step in range(total):
    student = {"a": jnp.asarray(history[step + 1]["params"][0]),
               "b": jnp.asarray(history[step + 1]["params"][1])}
    teacher = update(teacher, student, jnp.int32(step))
    np.testing.assert_allclose(teacher["a"], want[step][0], rtol=1e-6, atol=1e-6,
                               err_msg=f"step {step}")
    np.testing.assert_allclose(teacher["b"], want[step][1], rtol=1e-6, atol=1e-6,
                               err_msg=f"step {step}")
  # k = 0 is an update step: right after the first optimiser update the teacher has moved.
  first = update({"a": jnp.asarray(init[0]), "b": jnp.asarray(init[1])},
                 {"a": jnp.asarray(history[1]["params"][0]),
                  "b": jnp.asarray(history[1]["params"][1])}, jnp.int32(0))
  assert not np.allclose(first["a"], init[0])


def test_carot_teacher_update_rejects_bad_period():
  with pytest.raises(InputError, match="every"):
    losses.carot_teacher_update({"a": jnp.zeros(2)}, {"a": jnp.ones(2)}, 0, total_steps=10,
                                every=0)
