"""Mai et al.'s fine-tuning recipe (``recipes.finetune_sgd``) on a ResNet against the official
optimiser in PyTorch (OSU-MLB/Fine-Tuning-Is-Fine-If-Calibrated ``py/util/model.py``
``build_optimizer``/``get_parameters``: SGD with Nesterov momentum 0.9 and weight decay, the
backbone at 0.1·lr and the head at lr; ``py/workflow/train.py``: ``CosineAnnealingLR(epochs ·
iterations)`` stepped after every iteration, cross-entropy) under ``model.train()``: BatchNorm
normalises with the batch's statistics and trains the running ones."""
import jax
import numpy as np
import pytest
from flax import nnx

import glajax
from glajax.models.heads import LinearHead
from glajax.train import engine, recipes

torch = pytest.importorskip("torch")
from glajax.models.resnet.tests import resnet_reference as ref  # noqa: E402

STEPS, CLASSES, BATCH = 4, 3, 8


def _batches():
  rng = np.random.default_rng(0)
  return [{"image": rng.normal(size=(BATCH, 32, 32, 3)).astype(np.float32),
           "label": rng.integers(0, CLASSES, BATCH).astype(np.int32)} for _ in range(STEPS)]


def _official(torch_model, head, batches, lr, weight_decay):
  """py/workflow/train.py's iterations with py/util/model.py's optimiser."""
  backbone = [p for name, p in torch_model.named_parameters() if not name.startswith("fc.")]
  optimizer = torch.optim.SGD([{"params": backbone, "lr": 0.1 * lr},
                               {"params": head.parameters(), "lr": lr}],
                              lr=lr, weight_decay=weight_decay, momentum=0.9, nesterov=True)
  scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, STEPS)
  for batch in batches:
    logits = head(torch_model.features(ref.nchw(batch["image"])))
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(batch["label"]).long())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()


def test_finetune_sgd_follows_the_official_optimiser(tmp_path):
  torch_model = ref.build("bottleneck", (1, 1, 1, 1), widths=(4, 8, 8, 16), stem=8,
                          num_classes=10)
  torch.save(torch_model.state_dict(), tmp_path / "resnet.pth")
  backbone = glajax.load_model(tmp_path / "resnet.pth")
  rng = np.random.default_rng(1)
  kernel, bias = (0.1 * rng.normal(size=(64, CLASSES))).astype(np.float32), np.zeros(CLASSES)
  config = recipes.finetune_sgd()
  config.update(batch_size=BATCH, total_steps=STEPS, checkpoint_every=0, log_every=STEPS,
                progress=False, tensorboard=False)
  config.optimizer.learning_rate = 0.05
  task = recipes.classifier_task(backbone, LinearHead(kernel, bias, normalize=False), config)
  batches = _batches()
  trained, _ = engine.fit(task.model, task.loss_fn, config, lambda start: iter(batches[start:]),
                          str(tmp_path / "run"),
                          mesh=jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",)))
  head = torch.nn.Linear(64, CLASSES)
  with torch.no_grad():
    head.weight.copy_(torch.from_numpy(kernel.T))
    head.bias.zero_()
  _official(torch_model.train(), head, batches, 0.05, 1e-4)
  torch_model.eval()
  np.testing.assert_allclose(trained.head.kernel[...], head.weight.detach().numpy().T,
                             atol=2e-6, rtol=1e-5)
  np.testing.assert_allclose(trained.backbone.layer4[0].conv2.kernel[...],
                             torch_model.layer4[0].conv2.weight.detach().numpy().transpose(
                                 2, 3, 1, 0), atol=2e-6, rtol=1e-5)
  for ours, theirs in ((trained.backbone.bn1, torch_model.bn1),
                       (trained.backbone.layer4[0].bn3, torch_model.layer4[0].bn3)):
    np.testing.assert_allclose(ours.mean[...], theirs.running_mean.numpy(), atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(ours.var[...], theirs.running_var.numpy(), atol=1e-6, rtol=1e-5)
  images = batches[0]["image"]
  with torch.no_grad():
    expected = head(torch_model.features(ref.nchw(images))).numpy()
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(trained, images), expected, atol=1e-5,
                             rtol=0)
  np.testing.assert_array_equal(trained.backbone.fc.kernel[...],   # its own head: not trained
                                torch_model.fc.weight.detach().numpy().T)
