"""Your own data (``configs/custom.py``): one fine-tuning run on a folder of class subfolders (or
a CSV of ``path,label``), then both post-hoc methods on it: the WiSE-FT α sweep (Wortsman et al.,
CVPR 2022) and GLA (Zhu et al., NeurIPS 2023) with the prior estimated on the fine-tuning data.

The two are the ``wise_ft`` and ``gla`` kinds' own ``run`` on one plan: they share the zero-shot
classifier, the fine-tuned model (one run, one cache key) and its logits. When the data has no
test split (``data.test`` = ``data.train``), ``own_data.test_fraction`` of every class is held out
(seeded by ``own_data.split_seed``) as the test set; fine-tuning and the prior see the rest only.
"""
from __future__ import annotations

import numpy as np

from glajax.data import registry
from glajax.errors import ConfigError, bad_argument
from glajax.experiments import roles
from glajax.schema import Field
from glajax.experiments.kinds import common, gla, wise_ft

NAME = "own_data"
FIELDS = {**wise_ft.FIELDS, **gla.FIELDS, "own_data.test_fraction": Field("positive", 0, 0.99),
          "own_data.split_seed": Field("int", 0)}


def _pool_and_tests(config):
  """(the fine-tuning ref, the test uses): a per-class hold-out of the one split, or the data's
  own test split."""
  train, tests = common.train_ref(config), common.test_uses(config)
  if config.data.test != config.data.train:
    return train, tests
  options = config.own_data
  part = lambda p: roles.holdout(options.test_fraction, options.split_seed, p)  # noqa
  held_out = roles.Use(roles.TEST, "test", "own_data.test_fraction", train.then(part(1)))
  return train.then(part(0)), [held_out, *tests[1:]]


def _check_holdout(config) -> None:
  """A per-class hold-out of a folder or CSV needs two images of every class (one to train on,
  one to test on): refused before any work, naming the classes with fewer."""
  name, _, split = str(config.data.train).partition("@")
  if config.data.test != config.data.train or not registry.is_local(name):
    return
  info = registry.get(name)
  if split not in info.source.splits:
    return
  counts = registry.local_class_counts(name, split)
  few = [f"{info.classnames[c]} ({counts[c]})" for c in np.flatnonzero(counts < 2)]
  if few:
    raise bad_argument("own_data.test_fraction", f"at least 2 images in every class of "
                       f"data.folder={config.data.get('folder') or name!r} (one held out to "
                       f"test on, with no test split)", f"fewer in {len(few)} classes: "
                       f"{', '.join(few[:10])}", ConfigError)


def plan(config) -> list[roles.Use]:
  if config.gla.shots or config.gla.prior_data != gla.TRAINING:
    raise bad_argument("gla.shots, gla.prior_data", f"0 and {gla.TRAINING!r}: own_data "
                       "estimates the prior on its fine-tuning data",
                       (config.gla.shots, config.gla.prior_data), ConfigError)
  _check_holdout(config)
  pool, tests = _pool_and_tests(config)
  uses = [roles.Use(roles.FIT, "fine-tuning", "data.train", pool),
          roles.Use(roles.FIT, "prior (fine-tuning)", "gla.prior_data", pool)]
  if config.data.get("validation"):
    uses.append(roles.Use(roles.FIT, "temperature", "data.validation",
                          roles.DataRef.parse(config.data.validation, "data.validation")))
  return uses + tests


def run(exp) -> dict:
  """WiSE-FT, then GLA, on the same fine-tuned model: their results side by side, their tables
  in order, all their plots."""
  parts = {"wise_ft": wise_ft.run(exp), "gla": gla.run(exp)}
  return common.Outcome(
      results={name: part.results for name, part in parts.items()},
      tables=[table for part in parts.values() for table in part.tables],
      plots={name: plot for part in parts.values() for name, plot in part.plots.items()},
      accuracies=parts["wise_ft"].accuracies)  # GLA's zero-shot and fine-tuned are the same