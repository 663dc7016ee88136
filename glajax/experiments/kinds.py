"""The experiment kinds: each turns an :class:`~glajax.experiments.runner.Experiment` into an
outcome ``{"results": ..., "tables": [...], "plots": {...}}`` for ``report.write``.

Heavy passes go through the experiment's caches (logits, fine-tuning runs); everything after
them is a pure method of ``glajax.methods`` on cached logits.

==============  =================================================================  ===========
kind            what runs                                                          paper
==============  =================================================================  ===========
wise_ft         zero-shot head, fine-tuning (end-to-end or head only), α sweep     Wortsman 22
gla             prior estimation, fine-tuning or prompt tuning, GLA ensemble       Zhu 23
backdoor        adapters + cosine classifier + LA loss per backbone, Σ_m z_m       Chen 25
absent_class    fine-tuning on seen classes, ALG / PCV / oracle γ, AUSUC           Mai 24
contrastive     FLYP or CaRot, accuracy and ECE under shift                        Goyal 23, Oh 24
==============  =================================================================  ===========
"""
from __future__ import annotations

import os

import numpy as np

from glajax.experiments import config as config_lib
from glajax.experiments.report import table


def _acc(logits, labels) -> float:
  return float(np.mean(np.asarray(logits).argmax(-1) == np.asarray(labels)))


def _column(spec: str, id_spec: str) -> str:
  """A shift's column: its dataset name, or its split when it shares the ID dataset."""
  if spec == id_spec:
    return "ID"
  name, split = config_lib.dataset_spec(spec)
  return split if split and name == config_lib.dataset_spec(id_spec)[0] else name


def _with_average(row: dict, shifts: list[str]) -> dict:
  if shifts:
    row["avg shifts"] = float(np.mean([row[s] for s in shifts]))
  return row


def _eval_specs(config) -> tuple[str, list[str]]:
  return config.data.eval, list(config.data.shifts)


class _Lazy:
  """Builds each named model once, on first use (cached logits may make it unnecessary)."""

  def __init__(self, **factories):
    self._factories, self._built = factories, {}

  def __getattr__(self, name):
    if name.startswith("_"):
      raise AttributeError(name)
    if name not in self._built:
      self._built[name] = self._factories[name]()
    return self._built[name]


def _accuracy_row(logits: dict, id_spec: str, shifts: list[str]) -> dict:
  row = {_column(s, id_spec): _acc(*zy) for s, zy in logits.items()}
  return _with_average(row, [_column(s, id_spec) for s in shifts])


def _classifier_models(exp, checkpoint: str, train_spec: str, train, indices=None):
  """Zero-shot classifier and its end-to-end fine-tuned version (WiSE-FT's recipe)."""

  def zeroshot():
    return exp.zeroshot_classifier(exp.load_clip(checkpoint), checkpoint, train_spec)

  models = _Lazy(zs=zeroshot, ft=lambda: _finetune(exp, models.zs, "finetuned", train_spec,
                                                   train, indices))
  return models


def _finetune(exp, zs, name: str, train_spec: str, train, indices=None, export: bool = True):
  """The classifier ``zs`` fine-tuned end to end (WiSE-FT's recipe) in ``runs/<name>``."""
  from glajax.train import recipes  # pylint: disable=import-outside-toplevel
  task = recipes.classifier_task(zs.clip, zs.head, train)
  return exp.fit(name, task if export else task._replace(export=None), train, train_spec,
                 indices)


# ------------------------------------------------------------------------------------- WiSE-FT


def wise_ft(exp) -> dict:
  """WiSE-FT: θ_α = (1 − α)·θ_zs + α·θ_ft over encoder and head, evaluated for each α on ID and
  the shifts (Wortsman et al., CVPR 2022)."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from glajax import methods as M  # pylint: disable=import-outside-toplevel
  from glajax.train import engine, mesh, recipes  # pylint: disable=import-outside-toplevel
  config = exp.config
  checkpoint = config.model.checkpoints[0]
  id_spec, shifts = _eval_specs(config)
  specs = [id_spec, *shifts]
  models = _classifier_models(exp, checkpoint, config.data.train, exp.train_config())
  if config.wise_ft.linear:
    classifiers = models
    models = _Lazy(zs=lambda: classifiers.zs, ft=lambda: _linear_probe(
        exp, classifiers.zs, "finetuned", config.data.train, exp.train_config()))

  def merged(alpha):
    graphdef, params_zs, rest = engine.split_model(models.zs)
    _, params_ft, _ = engine.split_model(models.ft)
    return nnx.merge(graphdef, jax.jit(M.wise_ft)(params_zs, params_ft, alpha), rest)

  curve, rows = [], {}
  for alpha in config.wise_ft.alphas:
    alpha = float(alpha)
    logits = exp.logits(f"wise_alpha{alpha:g}", lambda a=alpha: merged(a), specs)
    row = _accuracy_row(logits, id_spec, shifts)
    ece = float(M.ece(*logits[id_spec], num_bins=config.wise_ft.ece_bins))
    curve.append({"alpha": alpha, **row, "ece_id": ece})
    rows[alpha] = (row, logits[id_spec])
  export_alpha = float(config.wise_ft.export_alpha)
  final = exp.path("final", f"wise_ft_alpha{export_alpha:g}")
  if not _exists(final):
    model = merged(export_alpha)  # every process takes part; process 0 writes
    if mesh.is_primary():
      recipes.export_classifier(model, final)
    mesh.barrier("glajax wise_ft export")
  columns = ["ID", *[_column(s, id_spec) for s in shifts]] + (["avg shifts"] if shifts else [])
  names = {0.0: "zero-shot (α=0)", 1.0: "fine-tuned (α=1)"}
  label = lambda a: names.get(a, f"WiSE-FT α={a:g}")  # noqa: E731
  title = f"WiSE-FT on {config_lib.dataset_spec(config.data.train)[0]}: accuracy, ID and shifts"
  main = table(title, columns,
               [(label(a), rows[a][0]) for a in rows], config.published)
  reliability = {label(a): rows[a][1] for a in rows if a in (0.0, 1.0, export_alpha)}
  return {"results": {"curve": curve, "export_alpha": export_alpha},
          "tables": [main],
          "plots": {"wise_ft_curve.png": ("wise_ft_curve", curve),
                    "reliability.png": ("reliability", reliability, config.wise_ft.ece_bins)}}


def _linear_probe(exp, zs, name: str, train_spec: str, train):
  """WiSE-FT's linear classifier: the zero-shot head trained on the frozen encoder's features
  of ``train_spec`` (computed once, cached like logits, no augmentation)."""
  from glajax.models import heads  # pylint: disable=import-outside-toplevel
  from glajax.train import recipes  # pylint: disable=import-outside-toplevel
  features, labels = exp.logits("features", lambda: zs.clip, [train_spec],
                                logits_fn=recipes.image_features)[train_spec]
  head = heads.LinearHead(np.asarray(zs.head.kernel[...]), np.asarray(zs.head.bias[...]))
  task = recipes.linear_probe_task(head, train)
  head = exp.fit_arrays(name, task, train, {"features": features, "label": labels})
  return heads.CLIPClassifier(zs.clip, head)


def _exists(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "config.json"))


# ----------------------------------------------------------------------------------------- GLA


def _train_counts(labels, num_classes: int) -> np.ndarray:
  return np.bincount(np.asarray(labels), minlength=num_classes)


def gla(exp) -> dict:
  """GLA (Zhu et al., NeurIPS 2023): log π_p from zero-shot logits on labelled data, then
  f = (z_ft/T − log π_ft) + (z_zs − log π_p); ``gla.finetune`` is ``"finetune"`` (WiSE-FT's
  end-to-end recipe) or ``"prompt_tuning"`` (few-shot; T searched by matching confidence)."""
  from glajax import methods as M  # pylint: disable=import-outside-toplevel
  from glajax.data import subsample  # pylint: disable=import-outside-toplevel
  from glajax.train import recipes  # pylint: disable=import-outside-toplevel
  config, options = exp.config, exp.config.gla
  checkpoint = config.model.checkpoints[0]
  id_spec, shifts = _eval_specs(config)
  specs = [id_spec, *shifts]
  train_labels = exp.labels(config.data.train)
  indices = None
  if options.shots:
    indices = subsample.k_shot_indices(train_labels, options.shots, config.seed)[0]
  counts = _train_counts(train_labels if indices is None else train_labels[indices],
                         len(exp.classes(config.data.train)[0]))
  train = exp.train_config()
  models = _classifier_models(exp, checkpoint, config.data.train, train, indices)
  if options.finetune == "prompt_tuning":
    def prompt_tuned():
      clip = exp.load_clip(checkpoint)
      task = recipes.prompt_tuning_task(clip, exp.tokenizer(checkpoint),
                                        exp.classes(config.data.train)[0], train)
      return exp.fit("prompt_tuned", task, train, config.data.train, indices)
    classifiers = models
    models = _Lazy(zs=lambda: classifiers.zs, ft=prompt_tuned)
  # The prior is estimated on labelled downstream data: gla.prior_data, or with
  # gla.prior_data = "shots" the k-shot training examples (all a few-shot task has).
  on_shots = options.prior_data == config_lib.SHOTS
  prior_spec = config.data.train if on_shots else options.prior_data
  prior_rows = indices if on_shots else slice(None)
  zs = exp.logits("zeroshot", lambda: models.zs, [*specs, prior_spec])
  ft = exp.logits("finetuned", lambda: models.ft, [*specs, prior_spec])
  prior_logits, prior_labels = (a[prior_rows] for a in zs[prior_spec])
  log_prior, info = M.estimate_log_prior(
      prior_logits, prior_labels, return_info=True,
      temperature="match_confidence" if options.match_confidence else None)
  temperature = (float(M.match_confidence_temperature(*(a[prior_rows] for a in ft[prior_spec])))
                 if options.finetune == "prompt_tuning" else 1.0)
  ft_log_prior = (np.log(counts / counts.sum()) if options.long_tail else None)
  results, rows = {}, []
  variants = {
      "zero-shot": lambda s: zs[s][0],
      "debiased zero-shot": lambda s: M.logit_adjust(zs[s][0], log_prior),
      "fine-tuned": lambda s: ft[s][0],
      "GLA": lambda s: M.gla_ensemble(ft[s][0], zs[s][0], log_prior, ft_log_prior,
                                      ft_temperature=temperature),
  }
  for name, logits_of in variants.items():
    labels = zs[id_spec][1]
    id_logits = logits_of(id_spec)
    if options.long_tail:
      groups = M.group_accuracy(id_logits, labels, counts)
    else:
      groups = M.group_accuracy_by_prior(id_logits, labels, log_prior)
    row = {k: float(v) for k, v in groups.items() if k != "all"}
    row.update({_column(s, id_spec): _acc(logits_of(s), zs[s][1]) for s in specs})
    row = _with_average(row, [_column(s, id_spec) for s in shifts])
    results[name] = row
    rows.append((name, row))
  group_names = ["many", "medium", "few"] if options.long_tail else ["head", "medium", "tail"]
  columns = ["ID", *group_names, *[_column(s, id_spec) for s in shifts]] + (
      ["avg shifts"] if shifts else [])
  title = (f"GLA on {config_lib.dataset_spec(config.data.train)[0]}"
           + (f", {options.shots}-shot" if options.shots else ""))
  return {"results": {"accuracy": results, "log_prior": np.asarray(log_prior).tolist(),
                      "prior_residual": float(info["residual"]),
                      "prior_temperature": float(info["temperature"]),
                      "ft_temperature": temperature, "train_counts": counts.tolist()},
          "tables": [table(title, columns, rows, config.published)],
          "plots": {"prior.png": ("prior", np.asarray(log_prior), counts)}}


# ---------------------------------------------------------------------------------- backdoor


def backdoor(exp) -> dict:
  """Backdoor adjustment (Chen et al., ICML 2025): per backbone m, AdaptFormer adapters + cosine
  classifier trained with the logit-adjusted loss; prediction Σ_m z_m (P(c) = 1/M)."""
  import glajax  # pylint: disable=import-outside-toplevel
  from glajax import methods as M  # pylint: disable=import-outside-toplevel
  from glajax.data import subsample  # pylint: disable=import-outside-toplevel
  from glajax.train import recipes  # pylint: disable=import-outside-toplevel
  config, options = exp.config, exp.config.backdoor
  classnames = exp.classes(config.data.train)[0]
  train_labels = exp.labels(config.data.train)
  indices = None
  if options.imbalance_ratio:
    indices = subsample.long_tail_indices(train_labels, options.imbalance_ratio, config.seed)
  counts = _train_counts(train_labels if indices is None else train_labels[indices],
                         len(classnames))
  id_spec = config.data.eval
  rows, results, all_logits = [], {}, []
  for m, checkpoint in enumerate(config.model.checkpoints):
    def trained(m=m, checkpoint=checkpoint):
      train = exp.train_config()
      clip = exp.load_clip(checkpoint)  # with train.model.adapter_dim adapters
      head = glajax.zeroshot_head(clip, exp.tokenizer(checkpoint), classnames,
                                  [options.template], show_progress=config.progress)
      task = recipes.backdoor_task(clip, np.asarray(head), counts, train)
      return exp.fit(f"backbone{m}", task, train, config.data.train, indices)
    logits, labels = exp.logits(f"backbone{m}", trained, [id_spec])[id_spec]
    all_logits.append(logits)
    name = f"{checkpoint} (LA loss)"
    row = {k: float(v) for k, v in M.group_accuracy(logits, labels, counts).items()}
    rows.append((name, row))
    results[name] = row
  ensemble = np.asarray(M.backdoor_ensemble(all_logits))
  row = {k: float(v) for k, v in M.group_accuracy(ensemble, labels, counts).items()}
  rows.append(("backdoor ensemble", row))
  results["backdoor ensemble"] = row
  title = f"Backdoor adjustment on {config_lib.dataset_spec(config.data.train)[0]}"
  return {"results": {"accuracy": results, "train_counts": counts.tolist()},
          "tables": [table(title, ["many", "medium", "few", "all"], rows, config.published)],
          "plots": {"prior.png": ("prior", np.log(counts / counts.sum()), counts)}}


# ------------------------------------------------------------------------------ absent class


def absent_class(exp) -> dict:
  """Absent-class calibration (Mai et al., NeurIPS 2024): fine-tune on the seen classes, add γ
  to the absent classes' logits (ALG from the training data; PCV from pseudo splits of the
  seen classes; oracle from test), AUSUC. With ``absent_class.test_fraction`` the training
  split is divided per class into fine-tuning pool and test set (the evaluation spec unused)."""
  from glajax import methods as M  # pylint: disable=import-outside-toplevel
  from glajax.data import subsample  # pylint: disable=import-outside-toplevel
  config, options = exp.config, exp.config.absent_class
  checkpoint = config.model.checkpoints[0]
  num_classes = len(exp.classes(config.data.train)[0])
  seen, absent = subsample.class_subset(num_classes, options.num_seen, options.split_seed)
  train_spec = config.data.train
  train_labels = exp.labels(train_spec)
  if options.test_fraction:  # one labelled split, divided per class into training and test
    pool, test_rows = subsample.holdout_indices(train_labels, options.test_fraction,
                                                options.split_seed)
    id_spec = train_spec
  else:
    pool, test_rows, id_spec = np.arange(train_labels.size), slice(None), config.data.eval
  indices = pool[seen[train_labels[pool]]]  # the fine-tuning data: the seen classes' examples
  models = _classifier_models(exp, checkpoint, train_spec, exp.train_config(), indices)
  zs = exp.logits("zeroshot", lambda: models.zs, [id_spec, train_spec])
  ft = exp.logits("finetuned", lambda: models.ft, [id_spec, train_spec])
  zs_logits, labels = (a[test_rows] for a in zs[id_spec])
  ft_logits = ft[id_spec][0][test_rows]
  gamma_alg = float(M.alg_gamma(ft[train_spec][0][indices], train_labels[indices], absent))
  gamma_oracle = float(M.oracle_gamma(ft_logits, labels, absent))
  # PCV: hold out ``pcv_holdout`` of S's training examples (per class); per seed, fine-tune on
  # the rest of a pseudo-seen half of S and choose γ on the held-out examples, the source
  # (zero-shot) model's pseudo-absent accuracy taken on the same examples.
  pcv_train, pcv_val = (indices[i] for i in subsample.holdout_indices(
      train_labels[indices], options.pcv_holdout, options.split_seed))
  zs_train = zs[train_spec][0]
  seen_ids = np.flatnonzero(seen)
  val_labels = np.searchsorted(seen_ids, train_labels[pcv_val])
  splits, pseudo_absent_classes = [], []
  for seed in options.pcv_seeds:
    pseudo_seen, pseudo_absent = subsample.class_subset(len(seen_ids), len(seen_ids) // 2, seed)
    pcv_seen = np.zeros_like(seen)
    pcv_seen[seen_ids[pseudo_seen]] = True
    name = f"pcv_{seed}"
    pcv_indices = pcv_train[pcv_seen[train_labels[pcv_train]]]
    pcv_logits = exp.logits(name, lambda n=name, i=pcv_indices: _finetune(
        exp, models.zs, n, train_spec, exp.train_config(), i, export=False),
                            [train_spec])[train_spec][0]
    source = M.seen_absent_accuracies(zs_train[pcv_val][:, seen], val_labels, pseudo_absent)
    splits.append((pcv_logits[pcv_val][:, seen], val_labels, pseudo_absent, source["acc_u_y"]))
    pseudo_absent_classes.append(seen_ids[pseudo_absent].tolist())
  gamma_pcv = float(M.pcv_gamma(splits))
  variants = {"zero-shot": zs_logits, "fine-tuned": ft_logits,
              f"fine-tuned + ALG γ ({gamma_alg:.2f})": M.apply_gamma(ft_logits, absent, gamma_alg),
              f"fine-tuned + PCV γ ({gamma_pcv:.2f})": M.apply_gamma(ft_logits, absent, gamma_pcv),
              f"fine-tuned + oracle γ ({gamma_oracle:.2f})":
                  M.apply_gamma(ft_logits, absent, gamma_oracle)}
  curves, rows, results = {}, [], {}
  for name, logits in variants.items():
    row = {k: float(v) for k, v in M.seen_absent_accuracies(logits, labels, absent).items()}
    if name in ("zero-shot", "fine-tuned"):
      area, curve = M.ausuc(logits, labels, absent, return_curve=True)
      row["ausuc"] = float(area)
      curves[name] = (float(area), {k: np.asarray(v) for k, v in curve.items()})
    rows.append((name, row))
    results[name] = row
  columns = ["acc_y_y", "acc_s_y", "acc_u_y", "acc_s_s", "acc_u_u", "ausuc"]
  title = (f"Absent-class calibration on {config_lib.dataset_spec(config.data.train)[0]} "
           f"({int(seen.sum())} seen / {int(absent.sum())} absent classes)")
  return {"results": {"accuracy": results, "gamma_alg": gamma_alg, "gamma_pcv": gamma_pcv,
                      "gamma_oracle": gamma_oracle, "seen_classes": np.flatnonzero(seen).tolist(),
                      "pcv_seeds": list(options.pcv_seeds),
                      "pcv_held_out": pcv_val.tolist(),
                      "test_rows": test_rows.tolist() if options.test_fraction else None,
                      "pcv_pseudo_absent_classes": pseudo_absent_classes},
          "tables": [table(title, columns, rows, config.published)],
          "plots": {"ausuc.png": ("ausuc", curves)}}


# ------------------------------------------------------------------------------ FLYP / CaRot


def contrastive(exp) -> dict:
  """FLYP (Goyal et al., CVPR 2023) or CaRot (Oh et al., NeurIPS 2024): contrastive fine-tuning
  on class prompts; accuracy and ECE on ID and each shift, against zero-shot."""
  from glajax import methods as M  # pylint: disable=import-outside-toplevel
  from glajax.train import recipes  # pylint: disable=import-outside-toplevel
  config, options = exp.config, exp.config.contrastive
  checkpoint = config.model.checkpoints[0]
  id_spec, shifts = _eval_specs(config)
  specs = [id_spec, *shifts]
  models = _classifier_models(exp, checkpoint, config.data.train, exp.train_config())

  def trained():
    train = exp.train_config()
    classnames, templates = exp.classes(config.data.train)
    task = recipes.contrastive_task(exp.load_clip(checkpoint), exp.tokenizer(checkpoint),
                                    classnames, templates, train)
    return exp.fit(options.method, task, train, config.data.train)

  outputs = {"zero-shot": exp.logits("zeroshot", lambda: models.zs, specs),
             options.method: exp.logits(options.method, trained, specs)}
  rows, results = [], {}
  shift_columns = [_column(s, id_spec) for s in shifts]
  for name, logits in outputs.items():
    row = _accuracy_row(logits, id_spec, shifts)
    ece = {f"ECE {_column(s, id_spec)}": float(M.ece(*logits[s], num_bins=options.ece_bins))
           for s in specs}
    if shifts:
      ece["ECE avg shifts"] = float(np.mean([ece[f"ECE {c}"] for c in shift_columns]))
    row.update(ece)
    rows.append((name, row))
    results[name] = row
  columns = ["ID", *shift_columns] + (["avg shifts"] if shifts else [])
  columns += [f"ECE {c}" for c in columns]
  reliability = {name: logits[shifts[0] if shifts else id_spec]
                 for name, logits in outputs.items()}
  title = f"{options.method.upper()}: accuracy and ECE ({options.ece_bins} bins) under shift"
  return {"results": {"metrics": results},
          "tables": [table(title, columns, rows, config.published)],
          "plots": {"reliability.png": ("reliability", reliability, options.ece_bins)}}


KINDS = {"wise_ft": wise_ft, "gla": gla, "backdoor": backdoor, "absent_class": absent_class,
         "contrastive": contrastive}
