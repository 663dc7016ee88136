"""The stages of ``glajax demo``: every method of the library on the demo world, end to end.

zero-shot → prior estimation (vs the true pre-training prior) → debiased zero-shot → end-to-end
fine-tuning → WiSE-FT α sweep → GLA ensemble → temperature scaling → long-tailed fine-tuning with
the logit-adjusted loss and the backdoor ensemble over several foundation models → class-subset
fine-tuning with ALG/PCV γ and AUSUC → FLYP vs CaRot (ECE under shift).

Each stage returns plain numbers (and arrays for the plots); ``EFFECTS`` states each effect the
world is built to show with its threshold, and ``effects`` says whether it appeared.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import time

import jax.numpy as jnp
import numpy as np

from glajax.demo import pretrain as pretrain_lib
from glajax.data import world

OOD_SPLITS = tuple(f"test_{d}" for d in world.DOMAINS[1:])
TEST_SPLITS = ("test_photo",) + OOD_SPLITS


@dataclasses.dataclass(frozen=True)
class Scale:
  """How much of everything a run does (``full``, ``quick`` and the test's ``tiny``)."""
  world_config: str
  pretrain: pretrain_lib.PretrainSpec
  num_foundation: int = 2
  batch_size: int = 128
  finetune_steps: int = 150
  finetune_lr: float = 1e-3
  contrastive_steps: int = 150
  contrastive_lr: float = 5e-4
  longtail_steps: int = 150
  longtail_lr: float = 0.05
  wise_alphas: tuple[float, ...] = tuple(np.round(np.linspace(0, 1, 11), 2))
  pcv_seeds: int = 3
  eval_batch: int = 500


SCALES = {
    "full": Scale("default", pretrain_lib.PretrainSpec(steps=400)),
    "quick": Scale("quick", pretrain_lib.PretrainSpec(steps=250, batch_size=128),
                   finetune_steps=80, contrastive_steps=80, longtail_steps=80,
                   wise_alphas=(0.0, 0.25, 0.5, 0.75, 1.0), pcv_seeds=1, eval_batch=600),
    "tiny": Scale("tiny", pretrain_lib.PretrainSpec(width=32, steps=20, batch_size=64),
                  batch_size=64, finetune_steps=10, contrastive_steps=10, longtail_steps=10,
                  wise_alphas=(0.0, 0.5, 1.0), pcv_seeds=1, eval_batch=100),
}

# name -> (what the world is built to show, comparison, threshold); stated in the report too.
EFFECTS = {
    "prior_spearman": ("estimated prior correlates with the true pre-training prior "
                       "(Spearman ρ)", ">=", 0.9),
    "debias_gain": ("debiasing raises balanced zero-shot accuracy (photo)", ">", 0.0),
    "finetune_id_gain": ("fine-tuning raises in-domain accuracy", ">", 0.0),
    "finetune_ood_change": ("fine-tuning lowers OOD accuracy (mean of shifted domains)", "<",
                            0.0),
    "wise_ft_ood_gain": ("some WiSE-FT α beats both endpoints on OOD accuracy", ">", 0.0),
    "gla_id_gain": ("GLA ensemble beats fine-tuning in-domain", ">", 0.0),
    "temperature_ece_change": ("temperature scaling lowers in-domain ECE", "<", 0.0),
    "la_vs_ce_gain": ("logit-adjusted loss beats plain CE on balanced accuracy (long tail)", ">",
                      0.0),
    "backdoor_gain": ("backdoor ensemble beats the best single foundation model", ">", 0.0),
    "alg_absent_gain": ("ALG γ recovers absent-class accuracy (Acc U/Y)", ">", 0.0),
    "pcv_absent_gain": ("PCV γ recovers absent-class accuracy (Acc U/Y)", ">", 0.0),
    "carot_ece_change": ("CaRot lowers OOD ECE against FLYP", "<", 0.0),
}
_COMPARE = {">": np.greater, ">=": np.greater_equal, "<": np.less}


def effect_appeared(name: str, value) -> bool:
  """Whether ``value`` passes the threshold of effect ``name`` (a missing value does not)."""
  _, comparison, threshold = EFFECTS[name]
  return value is not None and bool(np.isfinite(value)) and bool(
      _COMPARE[comparison](value, threshold))


def _accuracy(logits, labels) -> float:
  return float(np.mean(np.asarray(logits).argmax(-1) == labels))


class Demo:
  """One run: the prepared world, the foundation models and every stage's numbers."""

  def __init__(self, workdir: str, scale: Scale, seed: int = 0, progress: bool = True):
    import glajax  # pylint: disable=import-outside-toplevel
    from glajax import parallel as mesh_lib  # pylint: disable=import-outside-toplevel
    self.workdir, self.scale, self.seed, self.progress = workdir, scale, seed, progress
    self.data_dir = os.path.join(workdir, "tfds")
    self.model_dir = os.path.join(workdir, "models", f"{scale.world_config}_seed{seed}")
    self.name = world.register(scale.world_config)
    self.builder = world.builder(scale.world_config, data_dir=self.data_dir)
    self.spec = self.builder.builder_config.spec
    self.mesh = mesh_lib.make_mesh()
    self.tokenizer = glajax.load_tokenizer()
    self.results: dict = {}
    self.arrays: dict = {}
    self.timings: dict = {}

  # ------------------------------------------------------------------------------- helpers

  def _run_dir(self, name: str) -> str:
    return os.path.join(self.workdir, "runs", self.scale.world_config, name)

  def test_logits(self, model, splits=TEST_SPLITS) -> dict:
    """split -> (logits, labels) of ``model`` (an image classifier) on the world's ``splits``,
    in one evaluation pass (one compilation)."""
    from glajax.data import pipeline  # pylint: disable=import-outside-toplevel
    from glajax.train import engine  # pylint: disable=import-outside-toplevel
    batches = itertools.chain.from_iterable(
        pipeline.eval_batches(self.name, split=split, batch_size=self.scale.eval_batch,
                              image_size=self.spec.image_size, mesh=self.mesh,
                              data_dir=self.data_dir) for split in splits)
    logits, labels = engine.evaluate_logits(model, engine.image_logits, batches, self.mesh)
    sizes = np.cumsum([self.builder.info.splits[split].num_examples for split in splits])
    return {split: (z, y) for split, z, y in zip(splits, np.split(logits, sizes[:-1]),
                                                  np.split(labels, sizes[:-1]))}

  def train_data(self, split: str, indices=None):
    from glajax.data import pipeline  # pylint: disable=import-outside-toplevel

    def data(start_step):
      return pipeline.train_batches(self.name, split=split, batch_size=self.scale.batch_size,
                                    seed=self.seed, image_size=self.spec.image_size, flip=False,
                                    indices=indices, start_step=start_step, mesh=self.mesh,
                                    data_dir=self.data_dir)
    return data

  def fit(self, task, config, data, name: str):
    from glajax.train import engine  # pylint: disable=import-outside-toplevel
    config.seed = self.seed
    config.checkpoint_every = 0
    config.tensorboard = False
    config.progress = self.progress
    config.log_every = max(1, config.total_steps // 5)
    model, _ = engine.fit(task.model, task.loss_fn, config, data, self._run_dir(name),
                          mesh=self.mesh)
    return task.eval_model(model) if task.eval_model is not None else model

  def zeroshot_classifier(self, clip):
    import glajax  # pylint: disable=import-outside-toplevel
    from glajax.models import heads  # pylint: disable=import-outside-toplevel
    head = glajax.zeroshot_head(clip, self.tokenizer, world.CLASSNAMES, world.TEMPLATES)
    return heads.CLIPClassifier(clip, heads.LinearHead.from_zeroshot(np.asarray(head)))

  def _finetune_config(self, steps: int):
    from glajax.train import recipes  # pylint: disable=import-outside-toplevel
    config = recipes.finetune()
    config.batch_size = self.scale.batch_size
    config.total_steps = steps
    config.optimizer.update(learning_rate=self.scale.finetune_lr,
                            warmup_steps=max(1, steps // 10))
    return config

  def finetune(self, clip, name: str, indices=None):
    """End-to-end fine-tuning (WiSE-FT's recipe at demo scale) of a zero-shot classifier."""
    from glajax.train import recipes  # pylint: disable=import-outside-toplevel
    classifier = self.zeroshot_classifier(clip)
    config = self._finetune_config(self.scale.finetune_steps)
    task = recipes.classifier_task(classifier.clip, classifier.head, config)
    return self.fit(task, config, self.train_data("train", indices), name)

  def _timed(self, name, fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    self.timings[name] = round(time.perf_counter() - start, 1)
    return out

  # -------------------------------------------------------------------------------- stages

  def stage_world(self):
    self.builder.download_and_prepare()
    counts = [world.pretrain_class_counts(self.spec, i) for i in range(self.scale.num_foundation)]
    self.arrays["pretrain_counts"] = counts
    self.results["world"] = {
        "config": self.scale.world_config, "dataset": self.name,
        "classes": world.NUM_CLASSES, "domains": list(world.DOMAINS),
        "splits": {s: self.builder.info.splits[s].num_examples
                   for s in world.split_names(self.spec)},
        "pretrain_imbalance": [float(c.max() / c.min()) for c in counts],
    }

  def stage_pretrain(self):
    self.foundation = []
    for i in range(self.scale.num_foundation):
      self.foundation.append(pretrain_lib.pretrain(
          self.builder, i, self.scale.pretrain, self.model_dir, tokenizer=self.tokenizer,
          seed=self.seed, progress=self.progress))
    self.results["pretrain"] = dataclasses.asdict(self.scale.pretrain)

  def stage_zeroshot(self):
    from scipy import stats  # pylint: disable=import-outside-toplevel
    from glajax import methods as M  # pylint: disable=import-outside-toplevel
    self.zs = self.zeroshot_classifier(self.foundation[0])
    self.zs_logits = self.test_logits(self.zs, TEST_SPLITS + ("train", "validation"))
    train_logits, train_labels = self.zs_logits["train"]
    log_prior, info = M.estimate_log_prior(train_logits, train_labels, return_info=True)
    self.zs_log_prior = np.asarray(log_prior)
    true_log_prior = np.log(self.arrays["pretrain_counts"][0] / self.spec.pretrain_size)
    self.arrays["log_prior"] = self.zs_log_prior
    debiased = {s: _accuracy(M.logit_adjust(z, log_prior), y)
                for s, (z, y) in self.zs_logits.items() if s in TEST_SPLITS}
    zs_acc = {s: _accuracy(*self.zs_logits[s]) for s in TEST_SPLITS}
    self.results["zeroshot"] = {"accuracy": zs_acc, "ood_accuracy": _mean(zs_acc, OOD_SPLITS)}
    self.results["prior"] = {
        "spearman": float(stats.spearmanr(self.zs_log_prior, true_log_prior).statistic),
        "slope": float(np.polyfit(true_log_prior, self.zs_log_prior, 1)[0]),
        "pearson_log": float(np.corrcoef(self.zs_log_prior, true_log_prior)[0, 1]),
        "residual": float(info["residual"]), "estimated_on": "train (balanced, photo)"}
    self.results["debiased_zeroshot"] = {"accuracy": debiased,
                                         "gain_photo": debiased["test_photo"]
                                         - zs_acc["test_photo"]}

  def stage_finetune(self):
    from flax import nnx  # pylint: disable=import-outside-toplevel
    from glajax import methods as M  # pylint: disable=import-outside-toplevel
    from glajax.train import engine  # pylint: disable=import-outside-toplevel
    self.ft = self.finetune(self.foundation[0], "finetune")
    self.ft_logits = self.test_logits(self.ft, TEST_SPLITS + ("validation",))
    ft_acc = {s: _accuracy(*self.ft_logits[s]) for s in TEST_SPLITS}
    zs = self.results["zeroshot"]
    self.results["finetune"] = {
        "accuracy": ft_acc, "ood_accuracy": _mean(ft_acc, OOD_SPLITS),
        "id_gain": ft_acc["test_photo"] - zs["accuracy"]["test_photo"],
        "ood_change": _mean(ft_acc, OOD_SPLITS) - zs["ood_accuracy"]}
    # WiSE-FT: θ_α = (1 − α)·θ_zs + α·θ_ft over the image tower and the head.
    graphdef, params_zs, rest = engine.split_model(self.zs)
    _, params_ft, _ = engine.split_model(self.ft)
    curve = []
    for alpha in self.scale.wise_alphas:
      merged = nnx.merge(graphdef, M.wise_ft(params_zs, params_ft, alpha), rest)
      acc = {s: _accuracy(*zy) for s, zy in self.test_logits(merged).items()}
      curve.append({"alpha": float(alpha), "ID": acc["test_photo"],
                    "avg shifts": _mean(acc, OOD_SPLITS)})
    ood = [p["avg shifts"] for p in curve]
    interior = ood[1:-1]
    self.results["wise_ft"] = {
        "curve": curve,
        "best_alpha_ood": curve[int(np.argmax(ood))]["alpha"],
        "ood_gain": (max(interior) - max(ood[0], ood[-1])) if interior else float("nan")}
    # GLA: f = (z_ft − log π_ft) + (z_zs − log π_p), π_ft uniform (balanced fine-tuning).
    gla = {s: _accuracy(M.gla_ensemble(self.ft_logits[s][0], self.zs_logits[s][0],
                                       self.zs_log_prior), self.ft_logits[s][1])
           for s in TEST_SPLITS}
    self.results["gla"] = {"accuracy": gla, "id_gain": gla["test_photo"] - ft_acc["test_photo"]}
    # Temperature scaling of the fine-tuned model on the held-out photo split.
    val_logits, val_labels = self.ft_logits["validation"]
    temperature = float(M.fit_temperature(val_logits, val_labels))
    ece = lambda z, y: float(M.ece(z, y))  # noqa: E731
    before = {s: ece(*self.ft_logits[s]) for s in TEST_SPLITS}
    after = {s: ece(self.ft_logits[s][0] / temperature, self.ft_logits[s][1])
             for s in TEST_SPLITS}
    self.results["temperature"] = {"temperature": temperature, "ece_before": before,
                                   "ece_after": after,
                                   "id_ece_change": after["test_photo"] - before["test_photo"]}

  def stage_longtail(self):
    import glajax  # pylint: disable=import-outside-toplevel
    from glajax import methods as M  # pylint: disable=import-outside-toplevel
    from glajax.train import recipes  # pylint: disable=import-outside-toplevel
    counts = world.train_lt_class_counts(self.spec)
    prompts = self.tokenizer([f"a photo of a {c}." for c in world.CLASSNAMES])
    out, logits = {"train_counts": counts.tolist()}, []
    runs = [(i, 1.0) for i in range(self.scale.num_foundation)] + [(0, 0.0)]
    for index, tau in runs:
      config = recipes.backdoor_peft(world.NUM_CLASSES)
      config.batch_size = self.scale.batch_size
      config.total_steps = self.scale.longtail_steps
      config.tau = tau
      config.optimizer.update(learning_rate=self.scale.longtail_lr)
      clip = glajax.load_clip(os.path.join(self.model_dir,
                                           pretrain_lib.FOUNDATION_DIR.format(index)),
                              adapter_dim=config.model.adapter_dim)
      text = np.asarray(clip.encode_text(jnp.asarray(prompts)))
      task = recipes.backdoor_task(clip, text, counts, config)
      name = f"longtail_{index}" + ("_ce" if tau == 0 else "")
      model = self.fit(task, config, self.train_data("train_lt"), name)
      z, y = self.test_logits(model, ("test_photo",))["test_photo"]
      groups = {k: float(v) for k, v in M.group_accuracy(z, y, counts).items()}
      out[name] = {"accuracy": _accuracy(z, y), "groups": groups}
      if tau:
        logits.append(z)
    ensemble = np.asarray(M.backdoor_ensemble(logits))
    out["ensemble"] = {"accuracy": _accuracy(ensemble, y),
                       "groups": {k: float(v) for k, v in
                                  M.group_accuracy(ensemble, y, counts).items()}}
    singles = [out[f"longtail_{i}"]["accuracy"] for i in range(self.scale.num_foundation)]
    out["backdoor_gain"] = out["ensemble"]["accuracy"] - max(singles)
    out["la_vs_ce_gain"] = out["longtail_0"]["accuracy"] - out["longtail_0_ce"]["accuracy"]
    self.results["longtail"] = out

  def stage_subset(self):
    from glajax import methods as M  # pylint: disable=import-outside-toplevel
    from glajax.data import pipeline, subsample  # pylint: disable=import-outside-toplevel
    seen, absent = subsample.class_subset(world.NUM_CLASSES, world.NUM_CLASSES // 2, self.seed)
    train_labels = pipeline.read_labels(self.name, "train", data_dir=self.data_dir)
    model = self.finetune(self.foundation[0], "subset",
                          subsample.indices_in_classes(train_labels, seen))
    logits = self.test_logits(model, ("test_photo", "train"))
    z, y = logits["test_photo"]
    z_train, y_train = logits["train"]
    on_seen = seen[y_train]
    gamma_alg = float(M.alg_gamma(z_train[on_seen], y_train[on_seen], absent))
    gamma_pcv = float(self._pcv_gamma(seen, train_labels))
    zs_z, _ = self.zs_logits["test_photo"]
    accuracies = lambda logits: {k: float(v) for k, v in  # noqa: E731
                                 M.seen_absent_accuracies(logits, y, absent).items()}
    before = accuracies(z)
    after_alg = accuracies(M.apply_gamma(z, absent, gamma_alg))
    after_pcv = accuracies(M.apply_gamma(z, absent, gamma_pcv))
    area_ft, curve_ft = M.ausuc(z, y, absent, return_curve=True)
    area_zs, curve_zs = M.ausuc(zs_z, y, absent, return_curve=True)
    self.arrays["ausuc"] = {"fine-tuned on seen classes": (float(area_ft), curve_ft),
                            "zero-shot": (float(area_zs), curve_zs)}
    self.results["subset"] = {
        "seen_classes": int(seen.sum()), "gamma_alg": gamma_alg, "gamma_pcv": gamma_pcv,
        "pcv_seeds": self.scale.pcv_seeds, "zeroshot": accuracies(zs_z),
        "finetuned": before, "finetuned_alg": after_alg,
        "finetuned_pcv": after_pcv,
        "ausuc_finetuned": float(area_ft), "ausuc_zeroshot": float(area_zs),
        "alg_absent_gain": after_alg["acc_u_y"] - before["acc_u_y"],
        "pcv_absent_gain": after_pcv["acc_u_y"] - before["acc_u_y"]}

  def _pcv_gamma(self, seen, train_labels):
    """PCV (Mai et al.): fine-tune on a random half of the seen classes, choose γ for the other
    half on held-out (validation) data of the seen classes; average over ``pcv_seeds`` seeds."""
    from glajax import methods as M  # pylint: disable=import-outside-toplevel
    from glajax.data import subsample  # pylint: disable=import-outside-toplevel
    seen_classes = np.flatnonzero(seen)
    relabel = np.full(world.NUM_CLASSES, -1)
    relabel[seen_classes] = np.arange(seen_classes.size)
    zs_z, zs_y = self.zs_logits["validation"]
    rows = seen[zs_y]
    splits = []
    for k in range(self.scale.pcv_seeds):
      pseudo_seen, pseudo_absent = subsample.class_subset(seen_classes.size,
                                                          seen_classes.size // 2, 1000 + k)
      pseudo_seen_full = np.zeros(world.NUM_CLASSES, bool)
      pseudo_seen_full[seen_classes[pseudo_seen]] = True
      model = self.finetune(self.foundation[0], f"pcv_{k}",
                            subsample.indices_in_classes(train_labels, pseudo_seen_full))
      z, y = self.test_logits(model, ("validation",))["validation"]
      source = M.seen_absent_accuracies(zs_z[rows][:, seen_classes], relabel[zs_y[rows]],
                                        pseudo_absent)["acc_u_y"]
      splits.append((z[rows][:, seen_classes], relabel[y[rows]], pseudo_absent, source))
    return M.pcv_gamma(splits)

  def stage_carot(self):
    from glajax import methods as M  # pylint: disable=import-outside-toplevel
    from glajax.train import recipes  # pylint: disable=import-outside-toplevel
    out = {}
    for name, recipe in (("flyp", recipes.flyp), ("carot", recipes.carot)):
      config = recipe()
      config.batch_size = self.scale.batch_size
      config.total_steps = self.scale.contrastive_steps
      config.optimizer.update(learning_rate=self.scale.contrastive_lr,
                              warmup_steps=max(1, config.total_steps // 10))
      config.teacher.every = max(1, config.total_steps // 10)
      clip = self._fresh_foundation(0)
      task = recipes.contrastive_task(clip, self.tokenizer, world.CLASSNAMES, world.TEMPLATES,
                                      config)
      model = self.fit(task, config, self.train_data("train"), name)
      logits = self.test_logits(model)
      acc = {s: _accuracy(*logits[s]) for s in TEST_SPLITS}
      ece = {s: float(M.ece(*logits[s])) for s in TEST_SPLITS}
      out[name] = {"accuracy": acc, "ece": ece, "ood_accuracy": _mean(acc, OOD_SPLITS),
                   "ood_ece": _mean(ece, OOD_SPLITS)}
      self.arrays.setdefault("reliability", {})[f"{name} ({OOD_SPLITS[0][5:]})"] = (
          logits[OOD_SPLITS[0]])
    out["ood_ece_change"] = out["carot"]["ood_ece"] - out["flyp"]["ood_ece"]
    self.results["carot"] = out

  def _fresh_foundation(self, index: int):
    import glajax  # pylint: disable=import-outside-toplevel
    return glajax.load_clip(os.path.join(self.model_dir,
                                         pretrain_lib.FOUNDATION_DIR.format(index)))

  STAGES = ("world", "pretrain", "zeroshot", "finetune", "longtail", "subset", "carot")

  def run(self, stages=STAGES) -> dict:
    import tqdm  # pylint: disable=import-outside-toplevel
    for stage in tqdm.tqdm(stages, desc="glajax demo", disable=not self.progress):
      self._timed(stage, getattr(self, f"stage_{stage}"))
    self.results["effects"] = effects(self.results)
    self.results["timings_s"] = self.timings
    return self.results


def _mean(values: dict, keys) -> float:
  return float(np.mean([values[k] for k in keys]))


def effects(results: dict) -> dict:
  """Every effect of ``EFFECTS`` with its measured value, threshold and whether it appeared."""
  get = {
      "prior_spearman": ("prior", "spearman"),
      "debias_gain": ("debiased_zeroshot", "gain_photo"),
      "finetune_id_gain": ("finetune", "id_gain"),
      "finetune_ood_change": ("finetune", "ood_change"),
      "wise_ft_ood_gain": ("wise_ft", "ood_gain"),
      "gla_id_gain": ("gla", "id_gain"),
      "temperature_ece_change": ("temperature", "id_ece_change"),
      "la_vs_ce_gain": ("longtail", "la_vs_ce_gain"),
      "backdoor_gain": ("longtail", "backdoor_gain"),
      "alg_absent_gain": ("subset", "alg_absent_gain"),
      "pcv_absent_gain": ("subset", "pcv_absent_gain"),
      "carot_ece_change": ("carot", "ood_ece_change"),
  }
  out = {}
  for name, (section, key) in get.items():
    description, comparison, threshold = EFFECTS[name]
    value = results.get(section, {}).get(key)
    out[name] = {"description": description, "comparison": comparison, "threshold": threshold,
                 "value": value, "appeared": effect_appeared(name, value),
                 "measured": value is not None}
  return out
