"""Experiment configs the big_vision way: a Python file with ``get_config(arg=None)``.

``load("configs/gla_fewshot.py:runlocal,dataset=dtd,shots=4")`` imports the file, calls
``get_config("runlocal")`` with the tokens that hold no ``=``, then applies each ``key=value``
override (dotted keys, values read as Python literals, else as strings). A config names its
datasets as ``"name"`` or ``"name@split"`` and its models as hub ids, directories or ``"tiny"`` /
``"tiny:SEED"`` (a random tiny CLIP for CPU runs). Datasets that need a manual download read
``data.manual_dirs.<name>`` (added by :func:`load` for each one the config names), else
``data.manual_dir``; once prepared in ``data.data_dir`` they need neither. :func:`validate`
checks a config before any work; :func:`fingerprint` identifies an experiment in its work
directory.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import re
from pathlib import Path

import ml_collections

from glajax.errors import CheckpointError, ConfigError, DatasetError, bad_argument

EXPERIMENTS = ("wise_ft", "gla", "backdoor", "absent_class", "contrastive")
TINY = "tiny"
# Keys that change where or how fast a run goes, or only the post-hoc methods applied to cached
# logits: a work directory accepts a config that differs from its own in these alone, so
# post-hoc methods and reports can be re-run on what it holds.
_NOT_FINGERPRINTED = ("data.data_dir", "data.manual_dir", "data.manual_dirs",
                      "data.eval_batch_size", "progress",
                      "train.progress", "train.log_every", "train.checkpoint_every",
                      "train.keep_checkpoints", "train.tensorboard", "published",
                      "wise_ft.alphas", "wise_ft.export_alpha", "wise_ft.ece_bins",
                      "gla.match_confidence", "contrastive.ece_bins")
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def configs_dir() -> Path:
  """The repository's ``configs/`` folder (next to the ``glajax`` package)."""
  return Path(__file__).resolve().parents[2] / "configs"


def _config_file(name: str) -> Path:
  path = Path(name).expanduser()
  candidates = [path] if path.suffix == ".py" else [path.with_suffix(".py")]
  candidates += [configs_dir() / candidates[0].name]
  for candidate in candidates:
    if candidate.is_file():
      return candidate
  known = sorted(p.stem for p in configs_dir().glob("*.py"))
  raise bad_argument("CONFIG", f"a get_config() file, or one of {', '.join(known)}", repr(name),
                     ConfigError)


def _split_tokens(text: str) -> list[str]:
  """'runlocal,alphas=(0, 0.5),seed=1' -> ['runlocal', 'alphas=(0, 0.5)', 'seed=1']: commas
  inside brackets or quotes do not split."""
  tokens, current, depth, quote = [], [], 0, None
  for char in text:
    if quote:
      quote = None if char == quote else quote
    elif char in "'\"":
      quote = char
    elif char in "([{":
      depth += 1
    elif char in ")]}":
      depth -= 1
    elif char == "," and depth == 0:
      tokens.append("".join(current))
      current = []
      continue
    current.append(char)
  tokens.append("".join(current))
  return [t.strip() for t in tokens if t.strip()]


def _literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every leaf key of ``config`` in dotted form."""
  keys = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      keys += flat_keys(value, f"{prefix}{key}.")
    else:
      keys.append(f"{prefix}{key}")
  return keys


def override(config: ml_collections.ConfigDict, key: str, value) -> None:
  """Sets dotted ``key`` to ``value``; an unknown key raises a ConfigError listing valid ones."""
  parts = key.split(".")
  node = config
  for depth, part in enumerate(parts):
    last = depth == len(parts) - 1
    if not isinstance(node, ml_collections.ConfigDict) or part not in node or (
        not last and not isinstance(node[part], ml_collections.ConfigDict)):
      raise bad_argument(f"config key {key!r}", f"one of {', '.join(flat_keys(config))}",
                         "an unknown key", ConfigError)
    if not last:
      node = node[part]
  current = node[parts[-1]]
  if isinstance(current, tuple) and isinstance(value, (list, str, int, float)):
    value = tuple(value) if isinstance(value, list) else (value,)
  try:
    node[parts[-1]] = value
  except TypeError as e:
    raise bad_argument(f"config key {key!r}", f"a value of type {type(current).__name__}",
                       repr(value), ConfigError) from e


def load(spec: str) -> ml_collections.ConfigDict:
  """``CONFIG[:arg,...,key=value,...]`` -> the ConfigDict (see the module docstring)."""
  name, _, rest = spec.partition(":")
  path = _config_file(name)
  module_spec = importlib.util.spec_from_file_location(f"glajax_config_{path.stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise bad_argument("CONFIG", "a file defining get_config(arg=None)", str(path), ConfigError)
  tokens = _split_tokens(rest)
  args = [t for t in tokens if "=" not in t]
  config = module.get_config(",".join(args) or None)
  _add_manual_dirs(config)
  for token in tokens:
    if "=" in token:
      key, _, value = token.partition("=")
      override(config, key.strip(), _literal(value.strip()))
  config.config_spec = spec
  return config


def dataset_spec(spec: str) -> tuple[str, str | None]:
  """'imagenet_r@test[:80%]' -> ('imagenet_r', 'test[:80%]'); 'imagenet2012' -> (name, None)."""
  name, _, split = spec.partition("@")
  return name, split or None


def datasets_of(config) -> list[str]:
  """Every dataset spec a config names (train, evaluation, shifts, GLA's prior data)."""
  data = config.data
  specs = [data.train, data.eval, *data.get("shifts", ()),
           config.get("gla", {}).get("prior_data")]
  return [s for s in specs if s and s != SHOTS]


def checkpoints_of(config) -> list[str]:
  return list(config.model.checkpoints)


def is_tiny(checkpoint: str) -> bool:
  return checkpoint == TINY or checkpoint.startswith(TINY + ":")


def _add_manual_dirs(config) -> None:
  """``data.manual_dirs.<name>`` (None) for each manually downloaded dataset the config names,
  so that ``data.manual_dirs.objectnet=...`` can be overridden; ``data.manual_dir`` is the
  fallback for all of them."""
  from glajax.data import registry  # pylint: disable=import-outside-toplevel
  names = [dataset_spec(s)[0] for s in datasets_of(config)]
  config.data.manual_dirs = ml_collections.ConfigDict(
      {n: None for n in dict.fromkeys(names) if n in registry.names()
       and generated_world(n) is None and registry.get(n).manual_download}, type_safe=False)


def manual_dir_of(config, name: str):
  """The manual-download folder of dataset ``name``: its own, else ``data.manual_dir``."""
  own = config.data.get("manual_dirs", {}).get(name)
  return own if own is not None else config.data.manual_dir


def generated_world(name: str) -> str | None:
  """The demo world's builder config a dataset name refers to ('demo_shapes_tiny' -> 'tiny',
  'demo_shapes' -> 'default'), or None for any other dataset."""
  if name == "demo_shapes":
    return "default"
  world_config = name[len("demo_shapes_"):] if name.startswith("demo_shapes_") else None
  return world_config if world_config in ("quick", "tiny") else None


def _register_generated(name: str) -> None:
  """Registers the demo's procedural world when a config names it (``demo_shapes_tiny``...)."""
  if generated_world(name) is not None:
    from glajax.demo import world  # pylint: disable=import-outside-toplevel
    world.register(generated_world(name))


def _check_checkpoint(checkpoint: str, check_files: bool) -> None:
  if not isinstance(checkpoint, str) or not checkpoint:
    raise bad_argument("model.checkpoints", "hub ids, directories or 'tiny[:SEED]'",
                       repr(checkpoint), ConfigError)
  if is_tiny(checkpoint):
    seed = checkpoint[len(TINY) + 1:]
    if seed and not seed.isdigit():
      raise bad_argument("model.checkpoints", "'tiny' or 'tiny:SEED' with an integer seed",
                         repr(checkpoint), ConfigError)
    return
  path = Path(checkpoint).expanduser()
  looks_local = checkpoint.startswith((".", "/", "~")) or path.exists()
  if looks_local or not _HUB_ID.fullmatch(checkpoint):
    if not (path / "config.json").is_file():
      raise bad_argument("model.checkpoints", "a checkpoint directory with config.json or a hub "
                         "id org/name", f"{checkpoint!r} (no such checkpoint)", CheckpointError)
    return
  if check_files:
    from glajax.models.hf import resolve_checkpoint  # pylint: disable=import-outside-toplevel
    resolve_checkpoint(checkpoint, allow_patterns=["config.json"])


def _check_dir(key: str, value) -> None:
  if value is not None and not os.path.isdir(os.path.expanduser(value)):
    raise bad_argument(key, "an existing directory", f"{value!r} (no such directory)",
                       DatasetError)


def _check_prepared(name: str, data_dir, manual_dir) -> None:
  """A dataset that needs a manual download must be prepared already or have its manual_dir."""
  from glajax.data import builders, registry  # pylint: disable=import-outside-toplevel
  info = registry.get(name)
  if not info.manual_download or manual_dir is not None:
    return
  root = os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))
  if info.source is not None:
    if info.source.root is not None or (
        builders.prepared_dir(info.source, root) / "dataset_info.json").is_file():
      return
  elif Path(root, *info.tfds_name.split("/")).is_dir():
    return
  raise bad_argument(f"data.manual_dirs.{name} (or data.manual_dir)",
                     f"the folder with {name}'s downloaded files (it is not prepared in {root})",
                     None, DatasetError)


def validate(config, check_files: bool = True) -> None:
  """Checks ``config`` before any work: its kind, dataset names (registry), checkpoints (hub ids
  or directories) and, with ``check_files``, that directories, prepared datasets and checkpoints
  exist. Raises ConfigError, DatasetError or CheckpointError naming the culprit."""
  from glajax.data import registry  # pylint: disable=import-outside-toplevel
  if config.get("experiment") not in EXPERIMENTS:
    raise bad_argument("experiment", f"one of {', '.join(EXPERIMENTS)}",
                       repr(config.get("experiment")), ConfigError)
  if not checkpoints_of(config):
    raise bad_argument("model.checkpoints", "at least one checkpoint", "none", ConfigError)
  gla = config.get("gla", {})
  if gla.get("prior_data") == SHOTS and not gla.get("shots"):
    raise bad_argument("gla.prior_data", f"a dataset spec, or {SHOTS!r} with gla.shots > 0",
                       f"{SHOTS!r} with gla.shots = {gla.get('shots')}", ConfigError)
  absent = config.get("absent_class", {})
  if absent.get("test_fraction") and config.data.eval != config.data.train:
    raise bad_argument("data.eval", f"the training split {config.data.train!r}, which "
                       "absent_class.test_fraction divides into fine-tuning and test data",
                       repr(config.data.eval), ConfigError)
  if check_files:
    _check_dir("data.data_dir", config.data.data_dir)
    _check_dir("data.manual_dir", config.data.manual_dir)
    for name, directory in config.data.get("manual_dirs", {}).items():
      _check_dir(f"data.manual_dirs.{name}", directory)
  for spec in datasets_of(config):
    name, _ = dataset_spec(spec)
    _register_generated(name)
    if name not in registry.names():
      raise bad_argument("data", f"dataset names from the registry ({', '.join(registry.names())})",
                         repr(name), DatasetError)
    if check_files and generated_world(name) is None:
      _check_prepared(name, config.data.data_dir, manual_dir_of(config, name))
  for checkpoint in checkpoints_of(config):  # last: a hub id may need the network
    _check_checkpoint(checkpoint, check_files)


def fingerprint(config) -> str:
  """SHA-256 (16 hex digits) of the config's result-relevant content."""
  content = json.loads(config.to_json_best_effort())
  content.pop("config_spec", None)
  for key in _NOT_FINGERPRINTED:
    *parents, leaf = key.split(".")
    node = content
    for parent in parents:
      node = node.get(parent, {})
    node.pop(leaf, None)
  text = json.dumps(content, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def base(experiment: str) -> ml_collections.ConfigDict:
  """The fields every experiment config has; config files fill them in."""
  return ml_collections.ConfigDict(dict(
      experiment=experiment,
      seed=0,
      progress=True,
      model=dict(checkpoints=("openai/clip-vit-base-patch16",)),
      data=dict(train="imagenet2012", eval="imagenet2012", shifts=(), data_dir=None,
                manual_dir=None, image_size=224, eval_batch_size=256),
      published=dict(source="", rows={}),
  ))


# ------------------------------------------------------------------------ for configs/*.py

IMAGENET_SHIFTS = ("imagenet_v2", "imagenet_r", "imagenet_sketch", "objectnet", "imagenet_a")
FEWSHOT_DATASETS = ("imagenet2012", "caltech101", "oxford_iiit_pet", "cars196",
                    "oxford_flowers102", "food101", "fgvc_aircraft", "sun397", "dtd", "eurosat",
                    "ucf101")
BACKBONES = ("openai/clip-vit-base-patch16", "laion/CLIP-ViT-B-16-laion2B-s34B-b88K",
             "facebook/metaclip-b16-fullcc2.5b")
TINY_WORLD = "demo_shapes_tiny"
SHOTS = "shots"  # gla.prior_data: the k-shot training examples


def parse_arg(arg: str | None, allowed) -> set[str]:
  """The tokens of ``get_config``'s ``arg`` ('runlocal,linear'); unknown ones raise."""
  tokens = {t.strip() for t in (arg or "").split(",") if t.strip()}
  unknown = tokens - set(allowed)
  if unknown:
    raise bad_argument("config arg", f"tokens from {', '.join(sorted(allowed))}",
                       ", ".join(sorted(unknown)), ConfigError)
  return tokens


def runlocal(config, *, train: str = "train", eval_split: str = "test_photo",
             shifts=("test_sketch", "test_noise"), backbones: int = 1, steps: int = 8):
  """Shrinks ``config`` to CPU size: random tiny CLIPs, the demo's tiny procedural world
  (32-px coloured shapes; photo train/test, sketch and noise as shifts), a few steps at a
  learning rate a random model can learn from."""
  config.model.checkpoints = tuple(f"{TINY}:{i}" for i in range(backbones))
  config.data.update(train=f"{TINY_WORLD}@{train}", eval=f"{TINY_WORLD}@{eval_split}",
                     shifts=tuple(f"{TINY_WORLD}@{s}" for s in shifts), image_size=32,
                     eval_batch_size=40)
  config.train.update(batch_size=16, total_steps=steps, checkpoint_every=0, log_every=steps,
                      tensorboard=False)
  config.train.model.dtype = "float32"
  config.train.optimizer.update(warmup_steps=1, learning_rate=1e-3 if config.train.optimizer.name
                                == "adamw" else 0.05)
  config.progress = False
  config.published = ml_collections.ConfigDict(dict(source="", rows={}))
  return config
