"""GLA (Zhu et al., NeurIPS 2023): the zero-shot model's label prior log π_p estimated on labelled
training-side data, then f = (z_ft/T_ft − log π_ft) + (z_zs/T_zs − log π_p).

As the official code does it (BeierZhu/GLA: ``src/gla.py``; few-shot ``GLA.FS``'s
``pp_estimate`` and ``inference`` on CoOp/Dassl, whose ``datasets/*.py`` build the validation
shots):

- few-shot (``gla.shots`` = k): prompt tuning on k shots per class of ``data.train``, with the
  recipe ``gla.fewshot_recipe`` (``vit_b16_ep50`` as configured, or GLA.FS's scripted
  ``rn50_ep50``: ``rn50_ep50_shot{k}.yaml``, :func:`recipes.prompt_tuning_for_shots`), the
  learning rate scaled by batch/N when the N = C·k shots are fewer than a batch
  (:func:`recipes.scale_for_small_set`) and, with ``gla.final_model = "best_val"``, the epoch
  whose GLA accuracy on the validation shots is best (``engine.BestSelection``); validation
  shots from ``data.validation`` (``gla.val_shots``, or by default min(k,
  ``gla.val_shots_max``): k for ImageNet, ``generate_fewshot_train_val``, drawn from the training
  split disjoint from the training shots; min(k, 4) from the validation split for CoOp's other
  datasets, their ``datasets/*.py``); the prior from the zero-shot logits of the training and
  validation shots; the fine-tuned model's temperature T_ft matched to its accuracy on the
  validation shots; zero-shot heads from ``gla.templates`` (``"gla"``: GLA.FS's
  ``ENSEMBLE_TEMPLATES``);
- long-tail and many-shot: the prior from the (long-tailed) training split; π_ft its label
  frequency; T_ft = 1;
- T_zs (``gla.match_confidence``) matches the zero-shot model's confidence to its accuracy on
  the prior data and divides the zero-shot logits wherever the prior is applied.
"""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from glajax import methods as M
from glajax.data import registry
from glajax.errors import ConfigError, bad_argument
from glajax.experiments import report, roles
from glajax.schema import Field
from glajax.experiments.kinds import common
from glajax.train import engine, recipes

NAME = "gla"
FIELDS = {
    "gla.shots": Field("int", 0), "gla.val_shots": Field("int", 0),
    "gla.val_shots_max": Field("int", 0), "gla.long_tail": Field("bool"),
    "gla.match_confidence": Field("bool", result=False), "gla.prior_data": Field("str"),
    "gla.templates": Field("choice", choices=registry.TEMPLATE_SOURCES),
    "gla.fewshot_recipe": Field("choice", choices=recipes.FEWSHOT_RECIPES),
    "gla.final_model": Field("choice", choices=recipes.FINAL_MODELS),
}
TRAINING = "training"  # gla.prior_data: the fine-tuning data (and the validation shots)


def _shot_refs(config, train: roles.DataRef):
  """(fine-tuning ref, validation ref) of a few-shot config."""
  options, seed = config.gla, config.seed
  k = int(options.shots)
  cap = int(options.get("val_shots_max", 4))
  val_k = int(options.get("val_shots") or (min(k, cap) if cap else k))
  if not config.data.get("validation"):
    raise bad_argument("data.validation", "the split the few-shot validation shots come from "
                       "(the training split for ImageNet)", None, ConfigError)
  validation = roles.DataRef.parse(config.data.validation, "data.validation")
  if (validation.dataset, validation.split) == (train.dataset, train.split):
    common.check_shots("gla.shots", k + val_k, train, f"{k} training + {val_k} validation shots")
    return (train.then(roles.shots((k, val_k), seed, 0)),
            train.then(roles.shots((k, val_k), seed, 1)))
  common.check_shots("gla.shots", k, train, f"{k} training shots")
  common.check_shots("gla.val_shots", val_k, validation, f"{val_k} validation shots")
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


def train_config(exp):
  """The recipe as this run trains it: ``config.train``, for few-shot prompt tuning resolved
  for k shots (``gla.fewshot_recipe``) and for a training set smaller than one batch."""
  config, options = exp.config, exp.config.gla
  train = exp.train_config()
  if not options.shots or train.recipe != "prompt_tuning":
    return train
  if options.get("fewshot_recipe", "vit_b16_ep50") == "rn50_ep50":
    recipes.prompt_tuning_for_shots(train, int(options.shots))
  return recipes.scale_for_small_set(train, exp.num_classes(common.train_ref(config))
                                     * int(options.shots), jax.device_count())


def _templates(exp):
  """The zero-shot heads' templates: ``gla.templates`` of the training dataset."""
  return registry.templates(common.train_ref(exp.config).dataset,
                            exp.config.gla.get("templates", "clip"))


def _models(exp, checkpoint: str, train, selection=None):
  use = exp.use("fine-tuning")
  ref = common.train_ref(exp.config)
  templates = _templates(exp)
  if exp.config.train.recipe != "prompt_tuning":
    return common.classifier_models(exp, checkpoint, use, train, "finetuned", templates)
  final = exp.config.gla.get("final_model", "last_step")
  run = exp.run_key("prompt_tuned", train, checkpoint, use, final)
  exp.note_prompts("prompt-tuning initialisation", [train.template])

  def prompt_tuned():
    task = recipes.prompt_tuning_task(exp.load_model(checkpoint, train), exp.tokenizer(checkpoint),
                                      exp.classes(ref)[0], train)
    select = selection() if final == "best_val" and selection is not None else None
    return exp.fit(run, task, train, use, export="prompt_tuned", select=select)

  models = common.Lazy(zs=lambda: common.zeroshot(exp, checkpoint, ref, train, templates),
                       ft=prompt_tuned)
  return models, {"zs": common.zeroshot_tag(exp, checkpoint, ref, templates), "ft": run}


@nnx.jit
def _prompt_logits(model, features):
  return model(image_features=features)


def best_val_selection(exp, checkpoint: str, train, zeroshot, zs_tag: str, log_prior,
                       zs_temperature, ft_log_prior):
  """``engine.BestSelection`` scoring GLA's accuracy on the validation shots, as GLA.FS's
  ``trainers/gla.py`` ``test(split="val")`` does after every epoch: the prompt-tuned logits of
  the cached validation features, their temperature T searched to 1 pp, then
  z_ft/T + z_zs/T_zs − log π_p; accuracy in percent."""
  val = exp.use("validation")
  features, labels = exp.arrays(val, f"features-{exp.key(checkpoint, train.model.to_dict())}",
                                lambda: exp.load_model(checkpoint, train),
                                logits_fn=recipes.image_features)
  zs_logits = exp.arrays(val, zs_tag, zeroshot)[0] / zs_temperature

  def score(model):
    logits = np.asarray(_prompt_logits(model, features))
    temperature = float(M.match_confidence_temperature(logits, labels, tol=1.0))
    fused = M.gla_ensemble(logits, zs_logits, log_prior, ft_log_prior,
                           ft_temperature=temperature)
    return 100 * common.accuracy(fused, labels)

  return engine.BestSelection(score)


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


# The paired differences GLA's paper claims: debiasing the zero-shot model, and the ensemble
# against the fine-tuned model (after, before).
EFFECTS = (("debiased zero-shot", "zero-shot"), ("GLA", "fine-tuned"))


def _rows(exp, zs, ft, fitted: dict, counts):
  """(rows, results, outputs) of the four variants on the test sets, with the group
  accuracies; ``outputs``: variant -> purpose -> (logits, labels)."""
  tests, long_tail = exp.tests(), exp.config.gla.long_tail
  log_prior = fitted["prior"][0]
  rows, results, outputs = [], {}, {}
  evidence = common.Evidence(exp)
  # long tail: mean per-class accuracy over the count groups; else GLA's thirds by the prior,
  # over their samples (``M.group_accuracy`` / ``M.group_accuracy_by_prior``)
  groups, metric = ((M.count_groups(counts), "class_mean") if long_tail
                    else (M.prior_groups(log_prior), "subset"))
  for name, logits_of in _variants(zs, ft, log_prior, fitted["prior"][1], fitted["ft_temperature"],
                                   fitted["prior"][2]).items():
    outputs[name] = {u.purpose: (np.asarray(logits_of(u.purpose)), zs[u.purpose][1])
                     for u in tests}
    test_logits, labels = outputs[name][tests[0].purpose]
    row = {k: evidence.of(test_logits, labels, metric, mask) for k, mask in groups.items()
           if k != "all"}
    row.update(evidence.cells(outputs[name], tests))
    rows.append((name, row))
    results[name] = common.estimates(row)
  return rows, results, outputs


def _selection_record(fitted: dict):
  """The best-validation choice of this invocation (None when not used or reused from cache)."""
  select = fitted.get("selection")
  if select is None or select.chosen is None:
    return None
  return {"epoch_step": select.chosen[0], "val_gla_accuracy": select.chosen[1],
          "history": [list(h) for h in select.history]}


def run(exp) -> dict:
  config, options = exp.config, exp.config.gla
  tests = exp.tests()
  checkpoint, train = config.model.checkpoints[0], train_config(exp)
  fitted = {}  # what fine-tuning's best-val selection reads, known before it starts
  models, tags = _models(exp, checkpoint, train, lambda: fitted.setdefault(
      "selection", best_val_selection(exp, checkpoint, train, lambda: models.zs, tags["zs"],
                                      *fitted["prior"])))
  log_prior, info = _prior(exp, models, tags)
  counts = np.bincount(exp.labels(exp.use("fine-tuning")), minlength=log_prior.shape[0])
  ft_log_prior = np.log(counts / counts.sum()) if (counts > 0).all() else None
  fitted["prior"] = (log_prior, float(info["temperature"]), ft_log_prior)
  fitted["ft_temperature"] = 1.0
  if options.shots:  # few-shot: T_ft matched on the validation shots, to 1 pp (trainers/gla.py)
    fitted["ft_temperature"] = float(M.match_confidence_temperature(
        *exp.arrays(exp.use("validation"), tags["ft"], lambda: models.ft), tol=1.0))
  zs = exp.logits(tags["zs"], lambda: models.zs, tests)
  rows, results, outputs = _rows(exp, zs, exp.logits(tags["ft"], lambda: models.ft, tests),
                                 fitted, counts)
  evidence = common.Evidence(exp)
  effects_table, effects = common.effects_outcome(
      "GLA: paired differences (95 % intervals on the same test rows)", common.EFFECT_COLUMNS,
      [(f"{after} vs {before}", evidence.effects(outputs[before], outputs[after], tests))
       for after, before in EFFECTS])
  group_names = ["many", "medium", "few"] if options.long_tail else ["head", "medium", "tail"]
  columns = common.columns(tests)
  columns = columns[:1] + group_names + columns[1:]
  title = (f"GLA on {common.train_ref(config).dataset} ({config.train.recipe}"
           + (f", {options.shots}-shot" if options.shots else "") + ")")
  return common.Outcome(
      results={"accuracy": results, "log_prior": np.asarray(log_prior).tolist(),
               "prior_residual": float(info["residual"]),
               "zs_temperature": fitted["prior"][1],
               "zs_temperature_matched": bool(options.match_confidence),
               "ft_temperature": fitted["ft_temperature"],
               "train_counts": counts.tolist(), "recipe": config.train.recipe,
               "best_val": _selection_record(fitted), "effects": effects},
      tables=[report.table(title, columns, rows, config.published,
                           context={"shots": options.shots}), effects_table],
      plots={"prior.png": report.PriorPlot(np.asarray(log_prior), counts)},
      train_as_run=train.to_dict(),
      accuracies={name: row[common.ID] for name, row in rows
                  if name in ("zero-shot", "fine-tuned")})