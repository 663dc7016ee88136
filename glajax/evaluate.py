"""Evaluation: the jitted predict, logits of a model on a stream of batches, and the one logits
cache format (``.npz`` with ``logits`` (N, C) float32, ``labels`` (N,) int32 and JSON
``metadata``).

Models are Flax NNX modules; :func:`split_model` splits them at the jit boundary, so one compiled
predict serves every model of the same structure (e.g. each WiSE-FT α).
"""
from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from glajax import io
from glajax.errors import bad_argument
from glajax.methods import metrics
from glajax.parallel import data_sharding, is_primary, make_mesh, replicated, shard_batch


def split_model(model: nnx.Module, with_batch_stats: bool = False):
  """(graphdef, params, rest): the NNX graph and two pure dicts, the ``nnx.Param``s (with
  ``with_batch_stats``, and the BatchNorm statistics ``nnx.BatchStat``: what a torch
  ``state_dict`` holds) and the rest."""
  graphdef, params, rest = nnx.split(
      model, (nnx.Param, nnx.BatchStat) if with_batch_stats else nnx.Param, ...)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def set_batch_norm(model: nnx.Module, train: bool) -> nnx.Module:
  """Every BatchNorm of ``model`` (the modules with ``use_running_average``: ``nnx.BatchNorm``,
  ``layers.BatchNorm``) in train mode (batch statistics, running ones updated: the BatchNorm part
  of ``model.train()``) or eval mode (running statistics: ``model.eval()``'s); in place, returns
  ``model``. A model without BatchNorm is unchanged."""
  model.set_attributes(use_running_average=not train, raise_if_not_found=False)
  return model


def global_batch(batch, mesh):
  """Sharded global arrays pass through; this process's NumPy slice is sharded first."""
  if all(isinstance(x, jax.Array) for x in jax.tree.leaves(batch)):
    return batch
  return shard_batch(batch, mesh)


def image_logits(model, batch):
  """The ``logits_fn`` of an image classifier: ``model(batch["image"])``."""
  return model(batch["image"])


@functools.lru_cache(maxsize=32)
def _predict_fn(graphdef, logits_fn, mesh):
  """The jitted ``logits_fn`` of one model structure on one mesh, compiled once and reused by
  every evaluation of a model with that structure; BatchNorm in eval mode (running statistics)."""
  repl, data = replicated(mesh), data_sharding(mesh)

  def predict(params, rest, batch):
    model = set_batch_norm(nnx.merge(graphdef, params, rest), train=False)
    return logits_fn(model, batch).astype(jnp.float32)

  return jax.jit(predict, in_shardings=(repl, repl, data), out_shardings=data)


def evaluate_logits(model: nnx.Module, logits_fn: Callable, batches, mesh=None, *,
                    desc: str | None = None, total: int | None = None):
  """(logits, labels) as NumPy over every batch, padding rows (``mask`` == 0) dropped.

  ``logits_fn(model, batch) -> (B, C)`` runs jitted with the batch sharded on ``data``, the
  model's BatchNorm (if any) in eval mode whatever mode it was given in. With
  ``desc``, process 0 shows a progress bar so labelled, in images (``total`` of them) per second.
  """
  mesh = make_mesh() if mesh is None else mesh
  graphdef, params, rest = split_model(model)
  predict = _predict_fn(graphdef, logits_fn, mesh)
  all_logits, all_labels = [], []
  bar = tqdm(total=total, desc=desc, unit=" images", dynamic_ncols=True,
             disable=desc is None or not is_primary())
  for batch in batches:
    batch = global_batch(batch, mesh)
    logits = multihost_utils.process_allgather(predict(params, rest, batch), tiled=True)
    labels = multihost_utils.process_allgather(batch["label"], tiled=True)
    keep = (multihost_utils.process_allgather(batch["mask"], tiled=True).astype(bool)
            if "mask" in batch else np.ones(len(labels), bool))
    all_logits.append(np.asarray(logits)[keep])
    all_labels.append(np.asarray(labels)[keep].astype(np.int32))
    bar.update(int(keep.sum()))
  bar.close()
  if not all_logits:
    raise bad_argument("batches", "at least one evaluation batch", "none")
  return np.concatenate(all_logits), np.concatenate(all_labels)


def imagenet_logits_transform(imagenet_classes) -> Callable | None:
  """How to turn ImageNet-1k logits (N, 1000) into a dataset's logits (N, C), or None.

  ``imagenet_classes`` (a dataset's ``DatasetInfo.imagenet_classes``) gives, for each class c,
  its ImageNet classes M(c); c's logit is max_{j in M(c)} z_j: one column each for ImageNet-R/A
  (``restrict_logits`` to their 200 columns), one or more for ObjectNet (``objectnet_logits``).
  """
  if imagenet_classes is None:
    return None
  if all(len(group) == 1 for group in imagenet_classes):
    return functools.partial(metrics.restrict_logits,
                             class_indices=np.asarray([g[0] for g in imagenet_classes]))
  return functools.partial(metrics.objectnet_logits, mapping=imagenet_classes)


def save_logits(path: str, logits, labels, metadata: Mapping) -> None:
  """Writes ``logits``, ``labels`` and JSON ``metadata`` to ``path`` (.npz) atomically."""
  io.save_npz(path, logits=np.asarray(logits, np.float32), labels=np.asarray(labels, np.int32),
              metadata=np.asarray(json.dumps(dict(metadata))))


def load_logits(path: str) -> tuple[np.ndarray, np.ndarray, dict]:
  """(logits, labels, metadata) of a file written by :func:`save_logits`."""
  with np.load(path) as cached:
    return cached["logits"], cached["labels"], json.loads(str(cached["metadata"]))
