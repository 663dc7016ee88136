"""GLA (Zhu et al., NeurIPS 2023): the zero-shot model's label prior log π_p estimated on labelled
training-side data, then f = (z_ft/T_ft − log π_ft) + (z_zs/T_zs − log π_p).

As the official code does it (BeierZhu/GLA: ``src/gla.py``; few-shot ``GLA.FS``'s
``pp_estimate`` and ``inference`` on CoOp/Dassl, whose ``datasets/*.py`` build the validation
shots):

- few-shot (``gla.shots`` = k): fine-tuning on k shots per class of ``data.train``; validation
  shots from ``data.validation`` (``gla.val_shots``, default min(k, 4); drawn disjoint from the
  training shots when it is the training split, k more for ImageNet); the prior from the zero-shot
  logits of the training and validation shots; the fine-tuned model's temperature T_ft matched
  to its accuracy on the validation shots;
- long-tail and many-shot: the prior from the (long-tailed) training split; π_ft its label
  frequency; T_ft = 1;
- T_zs (``gla.match_confidence``) matches the zero-shot model's confidence to its accuracy on
  the prior data and divides the zero-shot logits wherever the prior is applied.
"""
from __future__ import annotations

import numpy as np

from glajax import methods as M
from glajax.errors import ConfigError, bad_argument
from glajax.experiments import report, roles
from glajax.experiments.kinds import common
from glajax.train import recipes

NAME = "gla"
TRAINING = "training"  # gla.prior_data: the fine-tuning data (and the validation shots)


def _shot_refs(config, train: roles.DataRef):
  """(fine-tuning ref, validation ref) of a few-shot config."""
  options, seed = config.gla, config.seed
  k = int(options.shots)
  val_k = int(options.get("val_shots") or min(k, 4))
  if not config.data.get("validation"):
    raise bad_argument("data.validation", "the split the few-shot validation shots come from "
                       "(the training split for ImageNet)", None, ConfigError)
  validation = roles.DataRef.parse(config.data.validation, "data.validation")
  if (validation.dataset, validation.split) == (train.dataset, train.split):
    return (train.then(roles.shots((k, val_k), seed, 0)),
            train.then(roles.shots((k, val_k), seed, 1)))
  return train.then(roles.shots((k,), seed)), validation.then(roles.shots((val_k,), seed))


def plan(config) -> list[roles.Use]:
  train = common.train_ref(config)
  uses = []
  if config.gla.shots:
    train, validation = _shot_refs(config, train)
    uses.append(roles.Use(roles.FIT, "validation", "data.validation", validation))
  uses.insert(0, roles.Use(roles.FIT, "fine-tuning", "data.train", train))
  prior = config.gla.prior_data
  if prior == TRAINING:
    uses += [roles.Use(roles.FIT, f"prior ({u.purpose})", "gla.prior_data", u.ref)
             for u in list(uses)]
  else:
    uses.append(roles.Use(roles.FIT, "prior", "gla.prior_data",
                          roles.DataRef.parse(prior, "gla.prior_data")))
  return uses + common.test_uses(config)


def _models(exp, checkpoint: str, train):
  use = exp.use("fine-tuning")
  if exp.config.train.recipe != "prompt_tuning":
    return common.classifier_models(exp, checkpoint, use, train, export="finetuned")
  ref = common.train_ref(exp.config)
  run = exp.run_key("prompt_tuned", train, checkpoint, use)

  def prompt_tuned():
    task = recipes.prompt_tuning_task(exp.load_model(checkpoint, train), exp.tokenizer(checkpoint),
                                      exp.classes(ref)[0], train)
    return exp.fit(run, task, train, use, export="prompt_tuned")

  models = common.Lazy(zs=lambda: common.zeroshot(exp, checkpoint, ref, train), ft=prompt_tuned)
  return models, {"zs": common.zeroshot_tag(exp, checkpoint, ref), "ft": run}


def _prior(exp, models, tags):
  """(log π_p, info): estimated on the zero-shot logits of every prior use, together."""
  uses = [u for u in exp.uses if u.purpose.startswith("prior")]
  outputs = exp.logits(tags["zs"], lambda: models.zs, uses)
  logits = np.concatenate([outputs[u.purpose][0] for u in uses])
  labels = np.concatenate([outputs[u.purpose][1] for u in uses])
  temperature = "match_confidence" if exp.config.gla.match_confidence else None
  return M.estimate_log_prior(logits, labels, return_info=True, temperature=temperature)


def _variants(zs, ft, log_prior, zs_temperature, ft_temperature, ft_log_prior):
  """name -> logits function of a test purpose: the four rows of GLA's tables."""
  return {
      "zero-shot": lambda p: zs[p][0],
      "debiased zero-shot": lambda p: M.logit_adjust(zs[p][0] / zs_temperature, log_prior),
      "fine-tuned": lambda p: ft[p][0],
      "GLA": lambda p: M.gla_ensemble(ft[p][0], zs[p][0] / zs_temperature, log_prior,
                                      ft_log_prior, ft_temperature=ft_temperature),
  }


def run(exp) -> dict:
  config, options = exp.config, exp.config.gla
  tests = exp.tests()
  models, tags = _models(exp, config.model.checkpoints[0], exp.train_config())
  log_prior, info = _prior(exp, models, tags)
  zs_temperature = float(info["temperature"])
  ft_temperature = 1.0
  if options.shots:  # few-shot: T_ft matched on the validation shots, to 1 pp (trainers/gla.py)
    ft_temperature = float(M.match_confidence_temperature(
        *exp.arrays(exp.use("validation"), tags["ft"], lambda: models.ft), tol=1.0))
  num_classes = log_prior.shape[0]
  counts = np.bincount(exp.labels(exp.use("fine-tuning")), minlength=num_classes)
  ft_log_prior = np.log(counts / counts.sum()) if (counts > 0).all() else None
  zs = exp.logits(tags["zs"], lambda: models.zs, tests)
  ft = exp.logits(tags["ft"], lambda: models.ft, tests)
  rows, results = [], {}
  for name, logits_of in _variants(zs, ft, log_prior, zs_temperature, ft_temperature,
                                   ft_log_prior).items():
    test_logits, labels = logits_of(tests[0].purpose), zs[tests[0].purpose][1]
    groups = (M.group_accuracy(test_logits, labels, counts) if options.long_tail
              else M.group_accuracy_by_prior(test_logits, labels, log_prior))
    row = {k: float(v) for k, v in groups.items() if k != "all"}
    row.update(common.accuracy_row({u.purpose: (logits_of(u.purpose), zs[u.purpose][1])
                                    for u in tests}, tests))
    rows.append((name, row))
    results[name] = row
  group_names = ["many", "medium", "few"] if options.long_tail else ["head", "medium", "tail"]
  columns = common.columns(tests)
  columns = columns[:1] + group_names + columns[1:]
  title = (f"GLA on {common.train_ref(config).dataset} ({config.train.recipe}"
           + (f", {options.shots}-shot" if options.shots else "") + ")")
  return {"results": {"accuracy": results, "log_prior": np.asarray(log_prior).tolist(),
                      "prior_residual": float(info["residual"]),
                      "zs_temperature": zs_temperature, "ft_temperature": ft_temperature,
                      "train_counts": counts.tolist(), "recipe": config.train.recipe},
          "tables": [report.table(title, columns, rows, config.published,
                                  context={"shots": options.shots})],
          "plots": {"prior.png": report.PriorPlot(np.asarray(log_prior), counts)}}
