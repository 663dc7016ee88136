"""The methods together: each robust fine-tuning recipe named in ``compose.recipes`` (WiSE-FT's
``finetune``, ``flyp``, ``carot``), then a chain of post-hoc stages in the order
``compose.stages`` gives, every one of them fitted on training-side data:

==============  ======================================================  =========================
stage           what it does                                            fitted on
==============  ======================================================  =========================
wise_ft         θ_α = (1 − α)θ_zs + αθ_ft (Wortsman 2022); for FLYP/    α: the grid point with the
                CaRot the zero-shot head is rebuilt from the merged     best accuracy on
                text tower (CaRot's WiSE-FT script)                     ``data.validation``
temperature     z / T (Guo 2017)                                        T: NLL on the validation
gla             (z − log π_ft) + (z_zs/T_zs − log π_p) (Zhu 2023)       π_p: the training rows
gamma           z_c + γ·1[c ∈ U] (Mai 2024), when classes are held out  ALG γ: validation rows
==============  ======================================================  =========================

Every cell carries a 95 % bootstrap interval over the test rows, and each stage's change against
the one before it (ID and mean-shift accuracy and ECE) a paired interval on the same rows; a
change "appears" only when its interval excludes zero. ``compose.oracle`` adds, labelled as
such, the α chosen on the ID test set (never fitted, reference only).
"""
from __future__ import annotations

import numpy as np

import glajax
from glajax import methods as M
from glajax.errors import ConfigError, bad_argument
from glajax.experiments import report, roles
from glajax.schema import Field
from glajax.experiments.kinds import common, contrastive
from glajax.models.heads import ImageClassifier, LinearHead
from glajax.train import recipes

NAME = "compose"
FIELDS = {"compose.recipes": Field("any"), "compose.stages": Field("any"),
          "compose.alphas": Field("floats", 0, 1), "compose.num_seen": Field("int", 0),
          "compose.ece_bins": Field("int", 1, result=False),
          "compose.oracle": Field("bool", result=False)}
STAGES = ("wise_ft", "temperature", "gla", "gamma")
RECIPES = ("finetune", "flyp", "carot")
VALIDATION, PRIOR, FINE_TUNING = "validation", "prior", "fine-tuning"


def check(config) -> None:
  """The section's own rules: known recipes and stages, each recipe's config present, WiSE-FT
  first (it merges weights; the others act on logits), γ only with held-out classes."""
  options = config.compose
  for key, values, known in (("compose.recipes", options.recipes, RECIPES),
                             ("compose.stages", options.stages, STAGES)):
    bad = [v for v in values if v not in known]
    if not values or bad or len(set(values)) != len(values):
      raise bad_argument(key, f"distinct names from {', '.join(known)}", repr(values),
                         ConfigError)
  for recipe in options.recipes:
    section = config.recipes.get(recipe)
    if section is None or section.get("recipe") != recipe:
      raise bad_argument(f"recipes.{recipe}", f"the {recipe} recipe's config (recipe={recipe!r})",
                         repr(None if section is None else section.get("recipe")), ConfigError)
  if "wise_ft" in options.stages and options.stages[0] != "wise_ft":
    raise bad_argument("compose.stages", "wise_ft first (it merges weights; the other stages "
                       "act on its logits)", repr(options.stages), ConfigError)
  if ("gamma" in options.stages) != bool(options.num_seen):
    raise bad_argument("compose.stages", "'gamma' exactly when compose.num_seen holds classes "
                       "out", f"stages {options.stages!r}, num_seen {options.num_seen}",
                       ConfigError)


def train_sections(config) -> list[str]:
  """Each recipe named in ``compose.recipes`` trains with its own section ``recipes.<name>``."""
  return [f"recipes.{name}" for name in config.compose.recipes]


def plan(config) -> list[roles.Use]:
  check(config)
  options = config.compose
  train = common.train_ref(config)
  validation = roles.DataRef.parse(config.data.validation, "data.validation")
  if options.num_seen:
    common.check_num_seen("compose.num_seen", options.num_seen, train)
    seen = roles.classes(options.num_seen, config.seed, 0)
    train, validation = train.then(seen), validation.then(seen)
  uses = [roles.Use(roles.FIT, FINE_TUNING, "data.train", train),
          roles.Use(roles.FIT, VALIDATION, "data.validation", validation)]
  if "gla" in options.stages:
    uses.append(roles.Use(roles.FIT, PRIOR, "data.train", train))
  return uses + common.test_uses(config)


# ------------------------------------------------------------------------------------ models


class _Recipe:
  """The zero-shot and fine-tuned models of one recipe, built lazily, with their cache tags and
  the WiSE-FT merge of the two (shared with the wise_ft and contrastive kinds' caches)."""

  def __init__(self, exp, recipe: str):
    self.exp, self.recipe = exp, recipe
    self.checkpoint = exp.config.model.checkpoints[0]
    self.train = exp.train_config(exp.config.recipes[recipe])
    use, ref = exp.use(FINE_TUNING), common.train_ref(exp.config)
    self.contrastive = recipe in ("flyp", "carot")
    name = recipe if self.contrastive else "finetuned"
    self.tags = {"zs": common.zeroshot_tag(exp, self.checkpoint, ref),
                 "ft": exp.run_key(name, self.train, self.checkpoint, use)}
    self.models = common.Lazy(zs=lambda: common.zeroshot(exp, self.checkpoint, ref, self.train),
                              ft=self._fine_tuned)

  def _fine_tuned(self):
    use = self.exp.use(FINE_TUNING)
    if not self.contrastive:
      return common.finetuned(self.exp, self.models.zs, self.tags["ft"], use, self.train)
    return contrastive.trained(self.exp, self.checkpoint, self.tags["ft"], self.train, use)

  def merged(self, alpha: float):
    """The classifier of θ_α = (1 − α)θ_zs + αθ_ft."""
    zs, ft = self.models.zs, self.models.ft
    if not self.contrastive:
      return common.wise_ft_model(zs, ft, alpha)
    backbone = common.wise_ft_model(zs.backbone, ft.backbone, alpha)
    names, templates = self.exp.classes(common.train_ref(self.exp.config))
    head = glajax.zeroshot_head(backbone, self.exp.tokenizer(self.checkpoint), names, templates,
                                show_progress=False)
    return ImageClassifier(backbone, LinearHead.from_zeroshot(np.asarray(head)))

  def tag(self, alpha: float) -> str:
    """The cache tag of θ_α: the endpoints under the zero-shot and fine-tuned models' own tags,
    the rest as the wise_ft kind names them (its logits are shared)."""
    return {0.0: self.tags["zs"], 1.0: self.tags["ft"]}.get(
        alpha, f"wise{alpha:g}-{self.exp.key(self.tags['zs'], self.tags['ft'], alpha)}")

  def logits(self, alpha: float, uses):
    """purpose -> (logits, labels) of θ_α on ``uses`` (cached)."""
    make = {0.0: lambda: self.models.zs, 1.0: lambda: self.models.ft}.get(
        alpha, lambda: self.merged(alpha))
    return self.exp.logits(self.tag(alpha), make, uses)


# ------------------------------------------------------------------------------------ stages


def _wise_ft(exp, recipe: _Recipe, state: dict) -> tuple[str, dict]:
  """α from the grid with the best validation accuracy (the first of equal ones)."""
  alphas = sorted({float(a) for a in exp.config.compose.alphas})
  val = exp.use(VALIDATION)
  scores = [common.accuracy(*recipe.logits(a, [val])[VALIDATION]) for a in alphas]
  alpha = alphas[int(np.argmax(scores))]
  state["alpha"] = alpha
  return f"+ WiSE-FT (α = {alpha:g}, on validation)", recipe.logits(alpha, [val, *exp.tests()])


def _temperature(exp, recipe: _Recipe, state: dict, outputs: dict) -> tuple[str, dict]:
  temperature = float(M.fit_temperature(*outputs[VALIDATION]))
  state["temperature"] = temperature
  return (f"+ temperature (T = {temperature:.2f})",
          {p: (np.asarray(z) / temperature, y) for p, (z, y) in outputs.items()})


def _gla(exp, recipe: _Recipe, state: dict, outputs: dict) -> tuple[str, dict]:
  """The zero-shot prior (estimated on the training rows, its confidence-matched temperature
  applied to the zero-shot logits) removed from both, as the gla kind does."""
  prior_logits, prior_labels = exp.arrays(exp.use(PRIOR), recipe.tags["zs"],
                                          lambda: recipe.models.zs)
  log_prior, info = M.estimate_log_prior(prior_logits, prior_labels, return_info=True,
                                         temperature="match_confidence")
  counts = np.bincount(exp.labels(exp.use(FINE_TUNING)), minlength=log_prior.shape[0])
  ft_log_prior = np.log(counts / counts.sum()) if (counts > 0).all() else None
  zs = recipe.logits(0.0, [exp.use(VALIDATION), *exp.tests()])
  t_zs = float(info["temperature"])
  state.update(log_prior=np.asarray(log_prior), zs_temperature=t_zs,
               zs_temperature_matched=True, prior_residual=float(info["residual"]))
  return "+ GLA (prior on the training rows)", {
      p: (np.asarray(M.gla_ensemble(z, zs[p][0] / t_zs, log_prior, ft_log_prior)), y)
      for p, (z, y) in outputs.items()}


def _gamma(exp, recipe: _Recipe, state: dict, outputs: dict) -> tuple[str, dict]:
  absent = ~state["seen"]
  gamma = float(M.alg_gamma(*outputs[VALIDATION], absent))
  state["gamma"] = gamma
  return (f"+ ALG γ ({gamma:.2f}, on validation)",
          {p: (np.asarray(M.apply_gamma(z, absent, gamma)), y) for p, (z, y) in outputs.items()})


_STAGE_FUNCTIONS = {"temperature": _temperature, "gla": _gla, "gamma": _gamma}


def _path(exp, recipe: _Recipe, seen) -> tuple[list[tuple[str, dict]], dict]:
  """[(label, purpose -> (logits, labels))] from the fine-tuned model through every stage."""
  stages = list(exp.config.compose.stages)
  state = {"seen": seen}
  uses = [exp.use(VALIDATION), *exp.tests()]
  path = [("zero-shot", recipe.logits(0.0, uses)), (recipe.recipe, recipe.logits(1.0, uses))]
  if stages and stages[0] == "wise_ft":
    path.append(_wise_ft(exp, recipe, state))
    stages = stages[1:]
  for stage in stages:
    path.append(_STAGE_FUNCTIONS[stage](exp, recipe, state, path[-1][1]))
  return path, state


# ------------------------------------------------------------------------------------ report


def run(exp) -> dict:
  config = exp.config
  tests = exp.tests()
  use = exp.use(FINE_TUNING)
  seen = (roles.class_mask(use.ref.steps[-1], exp.num_classes(use.ref))
          if config.compose.num_seen else np.ones(exp.num_classes(use.ref), bool))
  tables, results, paths, accuracies = [], {}, {}, {}
  evidence = common.Evidence(exp, int(config.compose.ece_bins))
  for name in config.compose.recipes:
    recipe = _Recipe(exp, name)
    path, state = _path(exp, recipe, seen)
    if config.compose.oracle and "wise_ft" in config.compose.stages:
      path.append(_oracle(exp, recipe))
    rows = [(label, evidence.row(outputs, tests, seen)) for label, outputs in path]
    effects = [(f"{label} vs {previous}", evidence.effects(before, after, tests))
               for (previous, before), (label, after) in zip(path[1:-1], path[2:])]
    tables += [report.table(f"{name} then {' → '.join(config.compose.stages)} on "
                            f"{use.ref.dataset}", evidence.columns(tests, seen), rows),
               report.table(f"{name}: each stage against the one before (paired 95 % "
                            "intervals on the same test rows)", common.EFFECT_COLUMNS, effects,
                            effects=True)]
    alphas = sorted({float(a) for a in config.compose.alphas})
    results[name] = {"rows": common.intervals_json(rows),
                     "logits_tags": {f"{a:g}": recipe.tag(a) for a in alphas},
                     "effects": common.intervals_json(effects),
                     **{k: v for k, v in state.items() if k in (
                         "alpha", "temperature", "gamma", "zs_temperature",
                         "zs_temperature_matched", "prior_residual")},
                     **({"log_prior": state["log_prior"].tolist()} if "log_prior" in state
                        else {})}
    accuracies.update({f"{name}: {label}": row[common.ID] for label, row in rows[:2]})
    paths[name] = [(label, {k: row[k] for k in ("ID", "avg shifts", "ECE ID") if k in row})
                   for label, row in rows]
  return common.Outcome(results=results, tables=tables,
                        plots={"compose_path.png": report.ComposePath(paths)},
                        accuracies=accuracies)


def _oracle(exp, recipe: _Recipe) -> tuple[str, dict]:
  """The α of the grid best on the ID test set: a reference line, never a fitted choice."""
  test = exp.tests()[0]
  alphas = sorted({float(a) for a in exp.config.compose.alphas})
  scores = [common.accuracy(*recipe.logits(a, [test])[test.purpose]) for a in alphas]
  alpha = alphas[int(np.argmax(scores))]
  return (f"oracle: WiSE-FT α = {alpha:g} chosen on the ID test set (reference only)",
          recipe.logits(alpha, [exp.use(VALIDATION), *exp.tests()]))
