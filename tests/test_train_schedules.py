"""The recipes' learning-rate schedules step by step against the authors' own schedulers.

Each reference below is ported from the official code into PyTorch (torch's own optimiser and
``lr_scheduler`` classes, the schedulers' stepping as in each official training loop); glajax's
optimiser (``make_optimizer``, Optax under ``jax.jit``) then follows the same learning rates and
the same parameter trajectory over a whole short run.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glajax.errors import ConfigError
from glajax.train import recipes
from glajax.train.state import learning_rate_schedule, make_optimizer

torch = pytest.importorskip("torch")

LR_RTOL, LR_ATOL = 1e-6, 2e-7   # float32 schedule vs Python floats (atol: × the base lr)
PARAM_RTOL, PARAM_ATOL = 2e-5, 1e-6


# ----------------------------------------------------------------- ports of the official code


def wise_ft_cosine_lr(optimizer, base_lrs, warmup_length, steps, min_lr=0.0):
  """mlfoundations/wise-ft src/models/utils.py ``cosine_lr`` (CaRot's adds ``min_lr``)."""
  if not isinstance(base_lrs, list):
    base_lrs = [base_lrs for _ in optimizer.param_groups]

  def adjust(step):
    for group, base_lr in zip(optimizer.param_groups, base_lrs):
      if step < warmup_length:
        lr = base_lr * (step + 1) / warmup_length
      else:
        e, es = step - warmup_length, steps - warmup_length
        lr = 0.5 * (1 + np.cos(np.pi * e / es)) * base_lr + min_lr
      group["lr"] = lr

  return adjust


class DasslConstantWarmup(torch.optim.lr_scheduler.LRScheduler):
  """Dassl's ``ConstantWarmupScheduler`` (dassl/optim/lr_scheduler.py, with its
  ``_BaseWarmupScheduler.step``); ``verbose`` dropped, which torch 2.13 no longer takes."""

  def __init__(self, optimizer, successor, warmup_epoch, cons_lr, last_epoch=-1):
    self.successor = successor
    self.warmup_epoch = warmup_epoch
    self.cons_lr = cons_lr
    super().__init__(optimizer, last_epoch)

  def get_lr(self):
    if self.last_epoch >= self.warmup_epoch:
      return self.successor.get_last_lr()
    return [self.cons_lr for _ in self.base_lrs]

  def step(self, epoch=None):
    if self.last_epoch >= self.warmup_epoch:
      self.successor.step(epoch)
      self._last_lr = self.successor.get_last_lr()
    else:
      super().step(epoch)


def _problem(seed=0, size=6):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(size, size)).astype(np.float32)
  b = rng.normal(size=(size,)).astype(np.float32)
  w0 = rng.normal(size=(size,)).astype(np.float32)
  return a, b, w0


def _loss_torch(w, a, b):
  return 0.5 * torch.sum((torch.from_numpy(a) @ w - torch.from_numpy(b)) ** 2)


def _loss_jax(params, a, b):
  return 0.5 * jnp.sum((a @ params["w"] - b) ** 2)


def _glajax_run(config, total, a, b, w0):
  """lrs and parameters after each step of glajax's optimiser on the same quadratic."""
  config.optimizer.trainable = (".*",)
  params = {"w": jnp.asarray(w0)}
  tx, schedule = make_optimizer(config.optimizer, params, total)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    grads = jax.grad(_loss_jax)(params, a, b)
    updates, opt_state = tx.update(grads, opt_state, params)
    return jax.tree.map(lambda p, u: p + u, params, updates), opt_state

  lrs, trajectory = [], []
  for k in range(total):
    lrs.append(float(jax.jit(schedule)(k)))
    params, opt_state = step(params, opt_state)
    trajectory.append(np.asarray(params["w"]))
  return np.array(lrs), np.array(trajectory)


# --------------------------------------------------------------------------------------- tests


def _torch_epochs(optimizer, scheduler, w, a, b, epochs, steps_per_epoch):
  """The official loop: per epoch, every batch's step, then ``scheduler.step()``; returns the lr
  each step ran at and the weights after it."""
  want_lr, want_w = [], []
  for _ in range(epochs):
    for _ in range(steps_per_epoch):
      want_lr.append(optimizer.param_groups[0]["lr"])
      optimizer.zero_grad()
      _loss_torch(w, a, b).backward()
      optimizer.step()
      want_w.append(w.detach().numpy().copy())
    scheduler.step()
  return want_lr, want_w


@pytest.mark.parametrize("recipe", ["finetune", "flyp"])
def test_wise_ft_and_carot_cosine_lr_warmup(recipe):
  """WiSE-FT finetune.py / CaRot carot_loss.py: ``scheduler(step)`` before every step, AdamW,
  (WiSE-FT) ``clip_grad_norm_(params, 1.0)``; 7 warmup steps of a 40-step run."""
  config = getattr(recipes, recipe)()
  total, warmup = 40, 7
  config.optimizer.update(warmup_steps=warmup, learning_rate=0.05)
  a, b, w0 = _problem()
  w = torch.tensor(w0, requires_grad=True)
  optimizer = torch.optim.AdamW([w], lr=0.05, weight_decay=config.optimizer.weight_decay)
  scheduler = wise_ft_cosine_lr(optimizer, 0.05, warmup, total)
  want_lr, want_w = [], []
  for step in range(total):
    scheduler(step)
    want_lr.append(optimizer.param_groups[0]["lr"])
    optimizer.zero_grad()
    _loss_torch(w, a, b).backward()
    if config.optimizer.grad_clip_norm:
      torch.nn.utils.clip_grad_norm_([w], config.optimizer.grad_clip_norm)
    optimizer.step()
    want_w.append(w.detach().numpy().copy())
  got_lr, got_w = _glajax_run(config, total, a, b, w0)
  assert want_lr[0] == pytest.approx(0.05 / warmup)       # the first step is not at lr 0
  np.testing.assert_allclose(got_lr, want_lr, rtol=LR_RTOL, atol=LR_ATOL * 0.05)
  # Adam's float32 rounding (torch vs Optax) drifts by ~1e-5 over the run; an lr off by one step
  # would already move the first update by ~7e-3.
  np.testing.assert_allclose(got_w, np.array(want_w), rtol=PARAM_RTOL, atol=2e-5)


def test_lift_per_epoch_cosine():
  """LIFT trainer.py: SGD(lr, momentum, weight_decay) + ``CosineAnnealingLR(optim,
  num_epochs)``, ``sched.step()`` after each epoch; the loader keeps the last partial batch."""
  config = recipes.backdoor_peft(num_classes=100)
  num_examples, batch, epochs = 700, 128, config.epochs
  recipes.set_total_steps(config, num_examples)
  steps_per_epoch = math.ceil(num_examples / batch)
  assert config.optimizer.steps_per_epoch == steps_per_epoch == 6
  assert config.total_steps == epochs * steps_per_epoch
  a, b, w0 = _problem(1)
  w = torch.tensor(w0, requires_grad=True)
  opt = config.optimizer
  optimizer = torch.optim.SGD([w], lr=opt.learning_rate, weight_decay=opt.weight_decay,
                              momentum=opt.momentum)
  scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
  want_lr, want_w = _torch_epochs(optimizer, scheduler, w, a, b, epochs, steps_per_epoch)
  got_lr, got_w = _glajax_run(config, config.total_steps, a, b, w0)
  np.testing.assert_allclose(got_lr, want_lr, rtol=LR_RTOL, atol=LR_ATOL * opt.learning_rate)
  assert len(set(got_lr[:steps_per_epoch])) == 1     # constant within an epoch
  np.testing.assert_allclose(got_w, np.array(want_w), rtol=PARAM_RTOL, atol=PARAM_ATOL)


def test_gla_dassl_constant_warmup_epoch_then_per_epoch_cosine():
  """GLA vit_b16_ep50.yaml on Dassl: ``build_lr_scheduler`` (CosineAnnealingLR(optim,
  float(MAX_EPOCH)) wrapped by ConstantWarmupScheduler, WARMUP_RECOUNT True), stepped by
  trainers/gla.py after the last batch of each epoch; the loader drops the last partial batch."""
  config = recipes.prompt_tuning()
  num_examples, batch, epochs = 100, 32, config.epochs
  recipes.set_total_steps(config, num_examples)
  steps_per_epoch = num_examples // batch
  assert config.optimizer.steps_per_epoch == steps_per_epoch == 3
  a, b, w0 = _problem(2)
  w = torch.tensor(w0, requires_grad=True)
  opt = config.optimizer
  optimizer = torch.optim.SGD([w], lr=opt.learning_rate, momentum=opt.momentum,
                              weight_decay=opt.weight_decay, dampening=0, nesterov=False)
  cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, float(epochs))
  scheduler = DasslConstantWarmup(optimizer, cosine, 1, 1e-5)
  want_lr, want_w = _torch_epochs(optimizer, scheduler, w, a, b, epochs, steps_per_epoch)
  got_lr, got_w = _glajax_run(config, config.total_steps, a, b, w0)
  assert want_lr[:steps_per_epoch] == [1e-5] * steps_per_epoch
  assert want_lr[steps_per_epoch] == pytest.approx(opt.learning_rate)
  np.testing.assert_allclose(got_lr, want_lr, rtol=LR_RTOL, atol=LR_ATOL * opt.learning_rate)
  np.testing.assert_allclose(got_w, np.array(want_w), rtol=PARAM_RTOL, atol=PARAM_ATOL)


def test_linear_from_zero_is_kept_as_an_option():
  config = recipes.finetune().optimizer
  config.update(warmup="linear_from_zero", warmup_steps=4, learning_rate=1.0)
  schedule = jax.jit(learning_rate_schedule(config, 10))
  np.testing.assert_allclose([schedule(k) for k in range(5)], [0, 0.25, 0.5, 0.75, 1.0],
                             atol=1e-7)


def test_set_total_steps_and_per_epoch_errors():
  config = recipes.backdoor_peft(num_classes=10)
  with pytest.raises(ConfigError, match="steps_per_epoch"):
    learning_rate_schedule(config.optimizer, 100)
  recipes.set_total_steps(config, 129)
  assert (config.optimizer.steps_per_epoch, config.total_steps) == (2, 20)
  config = recipes.prompt_tuning()
  recipes.set_total_steps(config, 20)          # fewer than one batch: Dassl keeps it
  assert (config.optimizer.steps_per_epoch, config.total_steps) == (1, 50)
  config.optimizer.warmup_steps = 3
  with pytest.raises(ConfigError, match="warmup_steps"):
    learning_rate_schedule(config.optimizer, 50)
  with pytest.raises(ValueError, match="num_train_examples"):
    recipes.set_total_steps(config, 0)
  config = recipes.finetune()
  config.optimizer.schedule = "step"
  with pytest.raises(ConfigError, match="schedule"):
    learning_rate_schedule(config.optimizer, 50)
