"""Experiment configs the big_vision way: a Python file with ``get_config(arg=None)``.

``load("configs/gla_fewshot.py:runlocal,dtd,gla.shots=4")`` imports the file, calls
``get_config("runlocal,dtd")`` with the tokens that hold no ``=``, then applies each
``key=value`` override (dotted keys, values read as Python literals, else as strings). A config
names every dataset as ``"name@split"`` with an explicit split (``data.train``, ``data.test``,
``data.shifts``, ``data.validation``: see ``roles``) and its models as hub ids, directories or
``"tiny"`` / ``"tiny:SEED"`` (a random tiny CLIP for CPU runs). Datasets that need a manual
download read ``data.manual_dirs.<name>`` (added by :func:`load` for each one the config names),
else ``data.manual_dir``; once prepared in ``data.data_dir`` they need neither.

:func:`validate` checks a config before any work (every value's type and range, dataset names
and splits, directories and checkpoints) and never changes anything; :func:`fingerprint`
identifies an experiment in its work directory.
"""
from __future__ import annotations

import ast
import difflib
import hashlib
import importlib.util
import json
import os
import re
from pathlib import Path

import ml_collections

from glajax import schema
from glajax.data import builders, registry, world
from glajax.errors import CheckpointError, ConfigError, DatasetError, bad_argument
from glajax.models import checkpoints as model_checkpoints
from glajax.models import registry as models
from glajax.schema import Field
from glajax.train import recipes

TINY = models.TINY
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def configs_dir() -> Path:
  """The experiment configs: the copy an installed wheel carries (``glajax/configs``, packaged
  from the top-level folder by setup.py), else the source checkout's top-level ``configs/``."""
  package = Path(__file__).resolve().parents[1]
  installed = package / "configs"
  return installed if installed.is_dir() else package.parent / "configs"


def _config_file(name: str) -> Path:
  if not name.strip():
    known = sorted(p.stem for p in configs_dir().glob("*.py"))
    raise bad_argument("CONFIG", f"a get_config() file, or one of {', '.join(known)}",
                       "an empty string", ConfigError)
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
      raise _unknown_key(config, key, ".".join(parts[:depth]))
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
  config = _call_get_config(module.get_config, ",".join(args) or None, path)
  _add_manual_dirs(config)
  for token in tokens:
    if "=" in token:
      key, _, value = token.partition("=")
      override(config, key.strip(), _literal(value.strip()))
  _apply_folder(config)
  config.config_spec = spec
  return config


def _call_get_config(get_config, arg, path: Path) -> ml_collections.ConfigDict:
  """``get_config(arg)``, refused unless it takes one argument and returns a ConfigDict with
  ``experiment`` and ``data`` (as ``base()`` makes)."""
  import inspect  # noqa  (only to explain a get_config of the wrong signature)
  expected = "a file whose get_config(arg=None) returns an ml_collections.ConfigDict"
  try:
    inspect.signature(get_config).bind(arg)
  except (TypeError, ValueError):
    raise bad_argument("CONFIG", expected, f"{path}: get_config takes no argument", ConfigError
                       ) from None
  config = get_config(arg)
  if not isinstance(config, ml_collections.ConfigDict) or not all(
      k in config for k in ("experiment", "data", "model")):
    raise bad_argument("CONFIG", expected + " with experiment, model and data (config.base())",
                       f"{path}: get_config returned {type(config).__name__}", ConfigError)
  return config


def _apply_folder(config) -> None:
  """``data.folder`` (``configs/custom.py``), a folder of class subfolders or a CSV file, sets
  ``data.train`` to its training split and ``data.test`` to its test split, or to the training
  split when it has none (the kind then holds out a per-class fraction of it for testing)."""
  folder = config.data.get("folder")
  if not folder:
    return
  if not isinstance(folder, str):
    raise bad_argument("data.folder", "a folder path or a CSV file path", repr(folder),
                       ConfigError)
  name = registry.local_name(folder)
  try:
    splits = registry.get(name).source.splits
  except DatasetError:  # validate() says what is wrong with the folder, naming the key
    splits = ("train",)
  config.data.train, config.data.test = f"{name}@{splits[0]}", f"{name}@{splits[-1]}"


def _unknown_key(config, key: str, section: str):
  """The error for an unknown ``key``: the closest keys first, then the keys of the deepest
  section of ``key`` that exists (or the top-level sections), not all of them."""
  keys = flat_keys(config)
  close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
  hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
  inside = [k for k in keys if section and k.startswith(section + ".")]
  if inside:
    expected = f"one of the keys of {section!r}: {', '.join(inside)}"
  else:
    sections = sorted({k.split(".")[0] for k in keys})
    expected = f"a key of this config, under one of {', '.join(sections)}"
  return bad_argument(f"config key {key!r}{hint}", expected, "an unknown key", ConfigError)


def _did_you_mean(key: str, known) -> str:
  close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.6)
  return f"; did you mean {' or '.join(map(repr, close))}?" if close else ""


def dataset_spec(spec: str) -> tuple[str, str | None]:
  """'imagenet_r@test[:80%]' -> ('imagenet_r', 'test[:80%]'); 'imagenet2012' -> (name, None)."""
  name, _, split = str(spec).partition("@")
  return name, split or None


def data_keys(config) -> list[tuple[str, str]]:
  """(config key, dataset spec) of every dataset a config names: train, test, shifts,
  validation and GLA's prior data when that names a dataset."""
  data = config.data
  keys = [("data.train", data.train), ("data.test", data.test)]
  keys += [(f"data.shifts[{i}]", s) for i, s in enumerate(data.get("shifts", ()))]
  if data.get("validation"):
    keys.append(("data.validation", data.validation))
  prior = config.get("gla", {}).get("prior_data")
  if prior and "@" in str(prior):
    keys.append(("gla.prior_data", prior))
  return keys


def datasets_of(config) -> list[str]:
  """Every dataset spec a config names."""
  return [spec for _, spec in data_keys(config)]


def checkpoints_of(config) -> list[str]:
  return list(config.model.checkpoints)


def is_tiny(checkpoint: str) -> bool:
  """Whether ``checkpoint`` names a random tiny model: ``tiny[-variant][:SEED]``."""
  return checkpoint.partition(":")[0] in models.tiny_names()


def generated_world(name: str) -> str | None:
  """The demo world's builder config a dataset name refers to ('demo_shapes_tiny' -> 'tiny'),
  or None for any other dataset."""
  return next((c for c in world.CONFIGS if world.dataset_name(c) == name), None)


def _add_manual_dirs(config) -> None:
  """``data.manual_dirs.<name>`` (None) for each manually downloaded dataset the config names,
  so that ``data.manual_dirs.objectnet=...`` can be overridden; ``data.manual_dir`` is the
  fallback for all of them."""
  names = [dataset_spec(s)[0] for s in datasets_of(config)]
  config.data.manual_dirs = ml_collections.ConfigDict(
      {n: None for n in dict.fromkeys(names)
       if n in registry.names() and registry.get(n).manual_download}, type_safe=False)


def manual_dir_of(config, name: str):
  """The manual-download folder of dataset ``name``: its own, else ``data.manual_dir``."""
  own = config.data.get("manual_dirs", {}).get(name)
  return own if own is not None else config.data.manual_dir


# ------------------------------------------------------------------------------- validation


def _check_patch_size(checkpoint: str, patch_size, image_size, own_size=None) -> None:
  """``image_size`` is a multiple of the patch size, or the checkpoint's own (SigLIP So400m/14
  at 384 px: 27 patches, the last 6 pixels unused)."""
  if patch_size and image_size % patch_size and image_size != own_size:
    raise bad_argument("data.image_size", f"a multiple of {checkpoint}'s patch size "
                       f"{patch_size}" + (f" or its own {own_size}" if own_size else ""),
                       repr(image_size), ConfigError)


def _local_vision_sizes(path: Path):
  """(patch size, image size) of a local checkpoint's ``config.json``, or Nones."""
  try:
    with open(path / "config.json") as f:
      vision = json.load(f).get("vision_config", {})
    return vision.get("patch_size"), vision.get("image_size")
  except (OSError, ValueError, AttributeError):
    return None, None  # the family's loader reports a broken checkpoint, naming it


def _check_own_size(checkpoint: str, image_size, own_size) -> None:
  """An explicit ``data.image_size`` is the checkpoint's own (its position embeddings' grid)."""
  if image_size is not None and own_size and image_size != own_size:
    raise bad_argument("data.image_size", f"{checkpoint}'s own image size {own_size} (its "
                       "position embeddings are for that grid; leave data.image_size unset, "
                       "or None, to take it from the checkpoint)", repr(image_size), ConfigError)


def _hub_vision_sizes(checkpoint: str):
  """(patch size, image size) of a hub checkpoint's ``config.json`` (fetched, or from the hub
  cache offline), or Nones."""
  try:
    return _local_vision_sizes(Path(model_checkpoints.resolve_checkpoint(
        checkpoint, allow_patterns=["*.json"])))
  except CheckpointError:
    return None, None  # models.locate names the missing checkpoint


def checkpoint_image_size(checkpoint: str, check_files: bool = True) -> int | None:
  """A checkpoint's own image size: its ``config.json``'s ``vision_config.image_size`` (a
  local directory, or a hub id's when ``check_files``), ``TINY_IMAGE_SIZE`` for a random tiny
  model, else None (the format does not say)."""
  if is_tiny(checkpoint):
    return TINY_IMAGE_SIZE
  path = Path(checkpoint).expanduser()
  if path.is_dir():
    return _local_vision_sizes(path)[1]
  if check_files and _HUB_ID.fullmatch(checkpoint):
    return _hub_vision_sizes(checkpoint)[1]
  return None


def with_image_size(config):
  """``config`` itself when ``data.image_size`` is set, else a copy with the image size of
  ``model.checkpoints[0]`` (:func:`checkpoint_image_size`); a ConfigError naming
  ``data.image_size`` when the checkpoint does not state one."""
  if config.data.get("image_size") is not None:
    return config
  checkpoint = checkpoints_of(config)[0] if checkpoints_of(config) else None
  size = checkpoint_image_size(checkpoint) if isinstance(checkpoint, str) else None
  if size is None:
    raise bad_argument("data.image_size", f"the image size in pixels (the checkpoint "
                       f"{checkpoint!r} does not state its own)", "none given", ConfigError)
  config = config.copy_and_resolve_references()
  config.data.image_size = int(size)
  return config


def _check_checkpoint(checkpoint: str, check_files: bool, image_size: int = 0) -> None:
  tiny = " or ".join(f"'{n}[:SEED]'" for n in models.tiny_names())
  if not isinstance(checkpoint, str) or not checkpoint:
    raise bad_argument("model.checkpoints", f"hub ids, directories or {tiny}", repr(checkpoint),
                       ConfigError)
  name, colon, seed = checkpoint.partition(":")
  if name == TINY or name.startswith(TINY + "-"):
    if name not in models.tiny_names() or (colon and not seed.isdigit()):
      raise bad_argument("model.checkpoints", f"{tiny} with an integer seed", repr(checkpoint),
                         ConfigError)
    if image_size is not None:
      _check_patch_size(checkpoint, 8, image_size)  # the tiny models' patch (or stem) stride
    return
  path = Path(checkpoint).expanduser()
  looks_local = checkpoint.startswith((".", "/", "~")) or path.exists()
  if looks_local or not _HUB_ID.fullmatch(checkpoint):
    if not path.exists():
      raise bad_argument("model.checkpoints", "a checkpoint directory or a hub id org/name",
                         f"{checkpoint!r} (no such checkpoint)", CheckpointError)
    try:
      models.locate(path)
    except CheckpointError as e:
      raise bad_argument("model.checkpoints", "a checkpoint of a glajax model family",
                         f"{checkpoint!r}: {e}", CheckpointError) from None
    if path.is_dir() and not any(p.suffix in _WEIGHT_SUFFIXES for p in path.iterdir()):
      raise bad_argument("model.checkpoints", "a checkpoint directory with its weights ("
                         f"{', '.join(_WEIGHT_SUFFIXES)} files)", f"{checkpoint!r} holding "
                         f"{sorted(p.name for p in path.iterdir())[:8]}", CheckpointError)
    patch_size, own_size = _local_vision_sizes(path)
    _check_own_size(checkpoint, image_size, own_size)
    if image_size is not None:
      _check_patch_size(checkpoint, patch_size, image_size, own_size)
    return
  if check_files:
    models.locate(checkpoint)
    _check_own_size(checkpoint, image_size, _hub_vision_sizes(checkpoint)[1])


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".npz")


def _check_dir(key: str, value) -> None:
  if value is not None and not os.path.isdir(os.path.expanduser(value)):
    raise bad_argument(key, "an existing directory", f"{value!r} (no such directory)",
                       DatasetError)


def _check_prepared(key: str, name: str, data_dir, manual_dir) -> None:
  """A dataset that needs a manual download must be prepared already or have its manual_dir;
  one TFDS downloads must be prepared already or its download host reachable."""
  info = registry.get(name)
  if manual_dir is not None or (not info.manual_download and (
      info.source is not None or generated_world(name) is not None)):
    return
  root = os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))
  if info.source is not None:
    if info.source.root is not None or (
        builders.prepared_dir(info.source, root) / "dataset_info.json").is_file():
      return
  elif Path(root, *info.tfds_name.split("/")).is_dir():
    return
  if not info.manual_download:
    _check_downloadable(key, info, root)
    return
  raise bad_argument(f"data.manual_dirs.{name} (or data.manual_dir)",
                     f"the folder with {name}'s downloaded files (it is not prepared in {root})",
                     None, DatasetError)


def _reachable(host: str, timeout: float = 3.0) -> bool:
  """Whether a TCP connection to ``host``:443 opens within ``timeout`` seconds."""
  import socket  # noqa  (only to check a download can start)
  try:
    socket.create_connection((host, 443), timeout=timeout).close()
  except OSError:
    return False
  return True


def _check_downloadable(key: str, info, root: str) -> None:
  """A dataset TFDS would download: refused at once when its download host cannot be reached
  (instead of retrying for minutes), saying what to download and where it must be prepared."""
  import urllib.parse  # noqa
  import tensorflow_datasets as tfds  # noqa  (TFDS: loaded on demand)
  try:
    urls = list(tfds.builder_cls(info.tfds_name.split("/")[0]).url_infos or {})
  except Exception:  # an unknown builder: TFDS says so when it is read  # noqa: BLE001
    return
  hosts = sorted({urllib.parse.urlparse(u).hostname for u in urls} - {None})
  unreachable = [h for h in hosts if not _reachable(h)]
  if unreachable:
    raise bad_argument(key, f"{info.name} prepared in {root} (data.data_dir), or a network that "
                       f"reaches {', '.join(unreachable)} to download it ({', '.join(urls[:3])}); "
                       f"elsewhere: tfds build {info.tfds_name} --data_dir <dir>, then copy it "
                       "there", f"neither ({info.tfds_name} not prepared, no connection)",
                       DatasetError)


def known_splits(name: str) -> tuple[str, ...] | None:
  """The split names of a dataset when they are known without reading its files, else None."""
  world_config = generated_world(name)
  if world_config is not None:
    return world.split_names(world.spec(world_config))
  source = registry.get(name).source
  return None if source is None else tuple(source.splits)


def _check_dataset(key: str, spec, check_files: bool, config) -> None:
  name, split = dataset_spec(spec)
  if not isinstance(spec, str) or split is None:
    raise bad_argument(key, "'dataset@split' with an explicit split (e.g. 'dtd@train')",
                       repr(spec), ConfigError)
  if registry.is_local(name):
    folder = config.data.get("folder")
    if folder and registry.local_name(folder) == name:
      key = "data.folder"  # the key the user set, not the data.train / data.test it makes
    try:
      info = registry.get(name)  # the folder or CSV file is there, with classes (not prepared)
    except DatasetError as e:   # its own "argument: expected …, found …", under the user's key
      inner = re.match(r"[^:]*: expected (.*?), found (.*)$", str(e), re.S)
      expected, found = inner.groups() if inner else (
          "a folder of class subfolders or a CSV file of path,label rows", str(e))
      path = folder or name.partition(":")[2]
      found = found.replace(repr(name), repr(path))
      if path not in found:
        found = f"{found}, in {path}"
      raise bad_argument(key, expected.replace("folder:<an existing folder>", "an existing "
                                               "folder"), found, DatasetError) from None
    if check_files:   # every image decodes, before anything is claimed (once per data)
      builders.check_decodable(info.source, key)
  elif name not in registry.names():
    raise bad_argument(key, f"a dataset name from the registry ({', '.join(registry.names())})",
                       repr(name) + _did_you_mean(name, registry.names()), DatasetError)
  splits = known_splits(name)
  base_split = re.split(r"[\[+]", split)[0]
  if splits is not None and base_split not in splits:
    raise bad_argument(key, f"a split of {name} ({', '.join(splits)})", repr(split),
                       DatasetError)
  if check_files:
    _check_prepared(key, name, config.data.data_dir, manual_dir_of(config, name))


# The keys every experiment config has (``base``), as ``glajax.schema`` declares them; each
# experiment kind declares its own keys (``FIELDS``, dotted from the config's root, and
# ``check(config)`` for what spans keys), each recipe its train section
# (``glajax.train.recipes.check_config``).
BASE_FIELDS = {
    "seed": Field("int", 0, 2**31 - 1), "progress": Field("bool", result=False),
    "data.image_size": Field("int", 1, optional=True), "data.eval_batch_size": Field("int", 1, result=False),
    "data.data_dir": Field("str", optional=True, result=False),
    "data.manual_dir": Field("str", optional=True, result=False),
    "data.manual_dirs": Field("any", result=False), "published": Field("any", result=False),
    "demo": Field("any", result=False),
}


def train_sections(config, kind) -> list[str]:
  """The dotted names of the recipe sections ``config`` trains with: the kind's
  ``train_sections(config)``, else ``train`` when the config has one."""
  sections = getattr(kind, "train_sections", None)
  if sections is not None:
    return list(sections(config))
  return ["train"] if "train" in config else []


def section(config, dotted: str):
  """The sub-section of ``config`` at ``dotted`` (e.g. ``recipes.flyp``)."""
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def check_values(config, kind) -> None:
  """Every value's type and range, each error naming the config key: the base keys, each recipe
  section against the recipe it names (``recipes.check_config``), and the kind's own keys (its
  ``FIELDS`` and its ``check(config)`` for what spans keys)."""
  schema.check_section(config, BASE_FIELDS, "")
  schema.check_section(config, getattr(kind, "FIELDS", {}), "")
  if hasattr(kind, "check"):   # what spans keys, incl. which recipe sections there are
    kind.check(config)
  for prefix in train_sections(config, kind):
    recipes.check_config(section(config, prefix), prefix)
  _check_batches(config, kind)


def _check_batches(config, kind) -> None:
  """Every batch splits evenly over the devices (and a training batch over its
  ``accum_steps`` micro-batches, each over the devices), and ``model_parallel`` divides them:
  checked here, not after the data is prepared."""
  import jax  # noqa  (the device count; jax is loaded by then anyway)
  devices = jax.device_count()
  size = config.data.eval_batch_size
  if size % devices:
    raise bad_argument("data.eval_batch_size", f"a multiple of the {devices} devices", size,
                       ConfigError)
  for prefix in train_sections(config, kind):
    train = section(config, prefix)
    batch, accum = train.get("batch_size"), train.get("accum_steps", 1) or 1
    model = train.get("model_parallel", 1)
    if isinstance(model, int) and model >= 1 and devices % model:
      raise bad_argument(f"{prefix}.model_parallel", f"a divisor of the {devices} devices", model,
                         ConfigError)
    if batch is not None and (batch % accum or (batch // accum) % devices):
      raise bad_argument(f"{prefix}.batch_size", f"a multiple of {prefix}.accum_steps={accum} "
                         f"× the {devices} devices", batch, ConfigError)


def unfingerprinted(config, kind) -> list[str]:
  """The keys that change where or how fast a run goes, or only the post-hoc methods applied to
  cached logits: a work directory accepts a config that differs from its own in these alone,
  so post-hoc methods and reports can be re-run on what it holds."""
  keys = schema.unfingerprinted(BASE_FIELDS, "")
  for prefix in train_sections(config, kind):
    keys += recipes.unfingerprinted(prefix)
  return keys + schema.unfingerprinted(getattr(kind, "FIELDS", {}), "")


def validate(config, kind, check_files: bool = True) -> None:
  """Checks ``config`` before any work and changes nothing: every value (:func:`check_values`
  with its ``kind``'s declarations), dataset names and explicit splits, checkpoints and, with
  ``check_files``, that directories, prepared datasets and checkpoints exist. Raises ConfigError,
  DatasetError or CheckpointError naming the config key."""
  if not checkpoints_of(config):
    raise bad_argument("model.checkpoints", "at least one checkpoint", "none", ConfigError)
  if "folder" in config.data and not config.data.train:
    raise bad_argument("data.folder", "a folder of class subfolders or a CSV file of path,label "
                       "rows (configs/custom.py:data.folder=/path/to/images)", "none given",
                       ConfigError)
  check_values(config, kind)
  if check_files:
    _check_dir("data.data_dir", config.data.data_dir)
    _check_dir("data.manual_dir", config.data.manual_dir)
    for name, directory in config.data.get("manual_dirs", {}).items():
      _check_dir(f"data.manual_dirs.{name}", directory)
  for key, spec in data_keys(config):
    _check_dataset(key, spec, check_files, config)
  for checkpoint in checkpoints_of(config):  # last: a hub id may need the network
    _check_checkpoint(checkpoint, check_files, config.data.image_size)


def fingerprint(config, kind) -> str:
  """SHA-256 (16 hex digits) of the config's result-relevant content (all but
  :func:`unfingerprinted`)."""
  content = json.loads(config.to_json_best_effort())
  content.pop("config_spec", None)
  for key in unfingerprinted(config, kind):
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
      data=dict(train="imagenet2012@train", test="imagenet2012@validation", shifts=(),
                validation=None, data_dir=None, manual_dir=None, image_size=224,
                eval_batch_size=256),
      published=dict(table=None, rows=(), columns={}),
  ))


# ------------------------------------------------------------------------ for configs/*.py

IMAGENET_SHIFTS = ("imagenet_v2@test", "imagenet_r@test", "imagenet_sketch@test",
                   "objectnet@test", "imagenet_a@test")
FEWSHOT_DATASETS = ("imagenet2012", "caltech101", "oxford_iiit_pet", "cars196",
                    "oxford_flowers102", "food101", "fgvc_aircraft", "sun397", "dtd", "eurosat",
                    "ucf101")
# Our columns of an ImageNet table -> the columns of published.json's ImageNet tables.
IMAGENET_COLUMNS = {"ID": "IN", "imagenet_v2": "V2", "imagenet_r": "R", "imagenet_sketch": "Sketch",
                    "objectnet": "ObjectNet", "imagenet_a": "A", "avg shifts": "avg_shifts"}
# The backdoor paper's three ViT-B/16s (JiahaoChen1/Pre-train-Imbalance trainer.py, README):
# OpenAI's (clip._MODELS["ViT-B/16"]; here transformers' conversion of it), OpenCLIP's
# laion2b_s34b_b88k (the README's laion/CLIP-ViT-B-16-laion2B-s34B-b88K) and MetaCLIP's
# ('ViT-B-16-quickgelu', 'metaclip_400m'), which open_clip 3.3.0's pretrained.py fetches from
# timm/vit_base_patch16_clip_224.metaclip_400m (open_clip format).
BACKBONES = ("openai/clip-vit-base-patch16", "laion/CLIP-ViT-B-16-laion2B-s34B-b88K",
             "timm/vit_base_patch16_clip_224.metaclip_400m")
# OpenAI's RN50 (clip.load("RN50")) in open_clip's format: open_clip's pretrained.py
# RN50 "openai" hf_hub.
OPENAI_RN50 = "timm/resnet50_clip.openai"
TINY_WORLD = "demo_shapes_tiny"
TINY_IMAGE_SIZE = 32  # the tiny world's images, and a random tiny model's size by default


def train_spec(name: str) -> str:
  """'dtd' -> 'dtd@train': the registry's training split, named explicitly."""
  return f"{name}@{registry.get(name).train_split}"


def test_spec(name: str) -> str:
  """'dtd' -> 'dtd@test': the registry's evaluation split, named explicitly."""
  return f"{name}@{registry.get(name).eval_split}"


def recipe(name: str, **arguments) -> ml_collections.ConfigDict:
  """The config of recipe ``name`` (``train.recipes.RECIPES``) with ``recipe`` set to its name:
  the recipe a config names is the recipe that runs, and reports label it so."""
  if name not in recipes.RECIPES:
    raise bad_argument("recipe", f"one of {', '.join(recipes.RECIPES)}", repr(name), ConfigError)
  config = recipes.RECIPES[name](**arguments)
  config.recipe = name
  config.total_steps = -1  # epochs · ⌈N / batch⌉, the papers' way
  return config


def parse_arg(arg: str | None, allowed) -> set[str]:
  """The tokens of ``get_config``'s ``arg`` ('runlocal,linear'); unknown ones raise."""
  tokens = {t.strip() for t in (arg or "").split(",") if t.strip()}
  unknown = tokens - set(allowed)
  if unknown:
    raise bad_argument("config arg", f"tokens from {', '.join(sorted(allowed))}",
                       ", ".join(sorted(unknown)), ConfigError)
  return tokens


def runlocal(config, *, train: str = "train", test: str = "test_photo",
             shifts=("test_sketch", "test_noise"), backbones: int = 1, steps: int = 8,
             tiny: str = TINY, sections=("train",)):
  """Shrinks ``config`` to CPU size: random tiny models (``tiny``: a CLIP ViT; ``"tiny-rn"``:
  a CLIP ResNet), the demo's tiny procedural world (32-px coloured shapes; photo train/test,
  sketch and noise as shifts), a few steps at a learning rate a random model can learn from in
  each recipe section of ``sections``; no published numbers beside random models."""
  config.model.checkpoints = tuple(f"{tiny}:{i}" for i in range(backbones))
  config.data.update(train=f"{TINY_WORLD}@{train}", test=f"{TINY_WORLD}@{test}",
                     shifts=tuple(f"{TINY_WORLD}@{s}" for s in shifts), image_size=TINY_IMAGE_SIZE,
                     eval_batch_size=40)
  for name in sections:
    recipe = section(config, name)
    recipe.update(batch_size=16, total_steps=steps, checkpoint_every=0, log_every=steps,
                  tensorboard=False)
    recipe.model.dtype = "float32"
    recipe.optimizer.learning_rate = 1e-3 if recipe.optimizer.name == "adamw" else 0.05
    if not recipe.optimizer.get("warmup_epochs"):
      recipe.optimizer.warmup_steps = 1
  config.progress = False
  config.published = ml_collections.ConfigDict(dict(table=None, rows=(), columns={}))
  return config
