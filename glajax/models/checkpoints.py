"""What every model family's checkpoint code shares: finding a checkpoint (a directory or a hub
id), reading its tensors (safetensors, sharded or not, BF16 included, or PyTorch ``.bin``) on the
host, the conversion table that maps a format's tensor names to glajax parameter paths, and the
atomic export directory.

A conversion table is a tuple of rows ``(their key, glajax path, transform)`` whose templates hold
``{slot}`` placeholders (each slot a regex, e.g. ``{i}`` = ``\\d+``); a transform is a pair of
functions (theirs -> ours, ours -> theirs), e.g. Linear ``weight[out, in]`` <-> ``kernel[in, out]``
and Conv OIHW <-> HWIO. Loading builds the model abstractly (``nnx.eval_shape``), shape-checks
every tensor and reports every problem in one ``CheckpointError``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from huggingface_hub import snapshot_download
from safetensors import safe_open

from glajax.errors import CheckpointError, ConfigError, bad_argument

MAX_PROBLEMS = 40  # listed in a CheckpointError; the count says how many there are in all

# transform name -> (theirs -> ours, ours -> theirs)
TRANSFORMS = {
    "same": (lambda w: w, lambda w: w),
    "linear": (lambda w: w.T, lambda w: w.T),
    "conv": (lambda w: w.transpose(2, 3, 1, 0), lambda w: w.transpose(3, 2, 0, 1)),
}


def path_str(path) -> str:
  """'a.b.0.kernel' for an NNX state path."""
  return ".".join(str(p) for p in path)


@dataclasses.dataclass(frozen=True)
class Table:
  """A two-way map between a format's tensor names and glajax parameter paths.

  ``rows``: (their key template, glajax path template, transform name); ``slots``: placeholder ->
  regex; ``skipped``: their keys that are not parameters (buffers); ``transforms``: name ->
  (theirs -> ours, ours -> theirs), defaulting to :data:`TRANSFORMS`.
  """
  rows: tuple[tuple[str, str, str], ...]
  slots: dict
  skipped: re.Pattern = re.compile(r"$^")
  transforms: dict = dataclasses.field(default_factory=lambda: dict(TRANSFORMS))

  def __post_init__(self):
    compiled = tuple((self._compile(theirs), theirs, self._compile(ours), ours, name)
                     for theirs, ours, name in self.rows)
    object.__setattr__(self, "_compiled", compiled)

  def _compile(self, template: str) -> re.Pattern:
    pattern = re.escape(template)
    for slot, regex in self.slots.items():
      pattern = pattern.replace(re.escape("{" + slot + "}"), f"(?P<{slot}>{regex})")
    return re.compile(pattern + "$")

  def ours(self, key: str) -> tuple[str, str] | None:
    """Their key -> (glajax path, transform name), or None when no row matches."""
    for theirs_re, _, _, ours, name in self._compiled:
      if m := theirs_re.match(key):
        return ours.format(**m.groupdict()), name
    return None

  def theirs(self, path: str) -> tuple[str, str] | None:
    """glajax path -> (their key, transform name), or None when no row matches."""
    for _, theirs, ours_re, _, name in self._compiled:
      if m := ours_re.match(path):
        return theirs.format(**m.groupdict()), name
    return None

  def convert(self, tensors: dict[str, np.ndarray], expected: dict, source: str,
              optional: Callable[[str], bool] = lambda path: False) -> dict[str, np.ndarray]:
    """Their tensors -> glajax arrays by path, each shape-checked against ``expected`` (path ->
    ShapeDtypeStruct); every unexpected, missing (unless ``optional``) or misshapen tensor is
    collected into one CheckpointError; non-finite weights are refused."""
    converted, found, problems = {}, set(), []
    for key, value in tensors.items():
      if self.skipped.match(key):
        continue
      target = self.ours(key)
      if target is None:
        problems.append(f"unexpected tensor {key} {tuple(value.shape)}")
        continue
      path, transform = target
      found.add(path)
      if path not in expected:
        problems.append(f"unexpected tensor {key} {tuple(value.shape)} (no {path} in the model)")
        continue
      value = self.transforms[transform][0](value)
      if tuple(value.shape) != tuple(expected[path].shape):
        problems.append(f"{key}: expected shape {tuple(expected[path].shape)} (after "
                        f"{transform} transform), found {tuple(value.shape)}")
        continue
      converted[path] = value
    problems += [f"missing tensor {(self.theirs(p) or (p,))[0]}" for p in sorted(expected)
                 if p not in found and not optional(p)]
    if problems:
      raise CheckpointError(f"checkpoint {source} does not fit its config "
                            f"({len(problems)} problems):\n  " + "\n  ".join(_cut(problems)))
    check_finite(converted, source, names=lambda p: (self.theirs(p) or (p,))[0])
    return converted

  def export(self, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """glajax path -> array, to their names and layouts (contiguous float32 copies)."""
    out = {}
    for path, value in params.items():
      target = self.theirs(path)
      if target is None:
        raise bad_argument("model", "parameters this checkpoint format can hold",
                           f"{path}, which it cannot")
      key, transform = target
      out[key] = np.array(self.transforms[transform][1](value), np.float32, order="C")
    return out


# transformers' two-tower layout shared by CLIP and SigLIP: each tower's pre-LN encoder layers,
# its token / position embeddings and its final LayerNorm (slots and rows of a ``Table``).
HF_TOWER_SLOTS = {
    "tower": r"vision|text",
    "i": r"\d+",
    "linear": r"self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12]",
    "ln": r"layer_norm[12]",
    "embedding": r"token_embedding|position_embedding",
    "final_ln": r"post_layernorm|final_layer_norm",
}
HF_TOWER_ROWS = (
    ("{tower}_model.encoder.layers.{i}.{linear}.weight", "{tower}_model.layers.{i}.{linear}.kernel",
     "linear"),
    ("{tower}_model.encoder.layers.{i}.{linear}.bias", "{tower}_model.layers.{i}.{linear}.bias",
     "same"),
    ("{tower}_model.encoder.layers.{i}.{ln}.weight", "{tower}_model.layers.{i}.{ln}.scale", "same"),
    ("{tower}_model.encoder.layers.{i}.{ln}.bias", "{tower}_model.layers.{i}.{ln}.bias", "same"),
    ("{tower}_model.embeddings.{embedding}.weight", "{tower}_model.{embedding}.embedding", "same"),
    ("{tower}_model.{final_ln}.weight", "{tower}_model.{final_ln}.scale", "same"),
    ("{tower}_model.{final_ln}.bias", "{tower}_model.{final_ln}.bias", "same"),
)


def _cut(problems: list[str]) -> list[str]:
  more = len(problems) - MAX_PROBLEMS
  return problems[:MAX_PROBLEMS] + ([f"... and {more} more"] if more > 0 else [])


def check_finite(tensors: dict[str, np.ndarray], source: str, argument: str = "checkpoint",
                 error=CheckpointError, names: Callable[[str], str] = lambda key: key) -> None:
  """Refuses NaN or infinite weights (a diverged run's export), naming every such tensor."""
  bad = {key: int(np.size(value) - np.isfinite(value).sum()) for key, value in tensors.items()
         if not np.isfinite(value).all()}
  if bad:
    listed = [f"{names(key)} ({count} of {np.size(tensors[key])})" for key, count in bad.items()]
    raise bad_argument(argument, "finite weights",
                       f"NaN or inf in {len(bad)} tensors of {source}: "
                       + ", ".join(listed[:MAX_PROBLEMS]), error)


# A stacked parameter (``layers.Blocks``): ``….layers.<name>`` (or ``…/layers/<name>``) whose
# ``<name>`` does not start with a block index.
_STACKED = re.compile(
    r"(?P<head>(?:.*[./])?layers)(?P<sep>[./])(?P<tail>[^\d./][^./]*(?:[./].+)?)$")
_PER_BLOCK = re.compile(r"(^|[./])layers[./]\d+([./]|$)")   # block i's own ``….layers.{i}.…``


def per_block(name: str) -> bool:
  """Whether ``name`` is block i's own ``….layers.{i}.…`` (``/`` separators too), as formats and
  the per-block layout name it, not a stacked parameter's."""
  return _PER_BLOCK.search(name) is not None


def block_names(path: str, value) -> list[str] | None:
  """The names ``….layers.{i}.<name>`` (i < L) of the blocks of the stacked parameter ``path`` =
  ``….layers.<name>`` (``value``: anything with its shape (L, …)), or None when ``path`` is not
  stacked. The separator, ``.`` (glajax paths) or ``/`` (train-state paths), is kept."""
  m = _STACKED.match(path)
  if m is None:
    return None
  return [f"{m['head']}{m['sep']}{i}{m['sep']}{m['tail']}" for i in range(value.shape[0])]


def unstack(arrays: dict) -> dict:
  """Path -> array (or ShapeDtypeStruct) with stacked blocks -> the same by checkpoint name:
  each stacked ``….layers.<name>`` of L blocks becomes ``….layers.0.<name>`` …
  ``….layers.{L-1}.<name>``, its slices [0] … [L − 1]; every other path stays."""
  out = {}
  for path, value in arrays.items():
    names = block_names(path, value)
    if names is None:
      out[path] = value
      continue
    for i, name in enumerate(names):
      out[name] = (jax.ShapeDtypeStruct(value.shape[1:], value.dtype)
                   if isinstance(value, jax.ShapeDtypeStruct) else value[i])
  return out


def stack(arrays: dict, like: dict) -> dict:
  """The inverse of :func:`unstack` for the paths of ``like`` (path -> anything with a
  ``shape``): each stacked path's blocks ``….layers.{i}.<name>`` of ``arrays`` stacked (NumPy);
  every other path taken as it is."""
  out = {}
  for path, value in like.items():
    names = block_names(path, value)
    out[path] = arrays[path] if names is None else np.stack([np.asarray(arrays[n]) for n in names])
  return out


def abstract(build: Callable[[], nnx.Module]):
  """(graphdef, flat state, expected): ``build()`` run abstractly (``nnx.eval_shape``), its flat
  state and the ShapeDtypeStruct of every parameter by checkpoint name (:func:`unstack`)."""
  graphdef, state = nnx.split(nnx.eval_shape(build))
  flat = nnx.to_flat_state(state)
  return graphdef, flat, unstack({path_str(path): var.get_value() for path, var in flat})


def assemble(graphdef, flat, arrays: dict) -> nnx.Module:
  """The module of ``graphdef`` with every path of ``flat`` set, in its dtype, from ``arrays``
  (by checkpoint name: stacked blocks assembled by :func:`stack`)."""
  values = stack(arrays, {path_str(path): var.get_value() for path, var in flat})
  for path, var in flat:
    var.set_raw_value(jnp.asarray(values[path_str(path)], var.get_value().dtype))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def host_params(model: nnx.Module, variables=nnx.Param) -> dict[str, np.ndarray]:
  """Checkpoint name (:func:`unstack`) -> float32 NumPy copy of every ``variables`` leaf of
  ``model``."""
  return unstack({path_str(path): np.asarray(jax.device_get(var.get_value()), np.float32)
                  for path, var in nnx.to_flat_state(nnx.state(model, variables))})


# ---------------------------------------------------------------------------------------------
# Locating and reading checkpoints


def resolve_checkpoint(path_or_hub_id: str | os.PathLike, allow_patterns=None,
                       file_suffixes: tuple[str, ...] = ()) -> str:
  """A local path for ``path_or_hub_id``: the directory itself or its hub snapshot, or a file
  ending in one of ``file_suffixes`` (e.g. OpenAI's ``.pt``).

  Hub ids go through ``huggingface_hub.snapshot_download`` (its cache; HF_HUB_OFFLINE honoured).
  """
  path = os.path.expanduser(os.fspath(path_or_hub_id))
  if os.path.isdir(path) or (os.path.isfile(path) and path.endswith(tuple(file_suffixes))):
    return path
  if os.path.exists(path):
    expected = "a checkpoint directory" + "".join(f" or a {s} file" for s in file_suffixes)
    raise bad_argument("path_or_hub_id", expected, f"the file {path}", CheckpointError)
  if not re.fullmatch(r"[\w.-]+/[\w.-]+", path) or path.startswith((".", "/")):
    raise bad_argument("path_or_hub_id", "an existing checkpoint directory or a hub id (org/name)",
                       f"{path} (no such directory)", CheckpointError)
  try:
    return snapshot_download(path, allow_patterns=allow_patterns)
  except Exception as e:  # offline cache miss, unknown repo, network error: one message
    raise bad_argument("path_or_hub_id", "an existing directory or a downloadable hub id",
                       f"{path!r}: no such directory, and the hub said {type(e).__name__}: {e} "
                       f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')})",
                       CheckpointError) from None


def hub_directory(path_or_hub_id, patterns) -> str:
  """The local directory of a transformers-format checkpoint: as is, or its hub snapshot of the
  files matching ``patterns`` (with its PyTorch weights when the repo has no safetensors)."""
  directory = resolve_checkpoint(path_or_hub_id, allow_patterns=list(patterns))
  if not has_weights(directory) and not os.path.isdir(path_or_hub_id):
    directory = resolve_checkpoint(path_or_hub_id,
                                   allow_patterns=[*patterns, "pytorch_model*.bin"])
  return directory


HF_WEIGHTS = (("model.safetensors.index.json", "model.safetensors"),
              ("pytorch_model.bin.index.json", "pytorch_model.bin"))


def snapshot(path_or_hub_id, patterns, fallback, names=HF_WEIGHTS) -> str:
  """The local directory of a checkpoint: as is, or its hub snapshot of the files ``patterns``
  match, with ``fallback``'s too when those hold no weights (:func:`weight_files` of ``names``;
  e.g. PyTorch's ``.bin`` when a repo has no safetensors)."""
  directory = resolve_checkpoint(path_or_hub_id, allow_patterns=list(patterns))
  if not has_weights(directory, names) and not os.path.isdir(path_or_hub_id):
    directory = resolve_checkpoint(path_or_hub_id, allow_patterns=[*patterns, *fallback])
  return directory


def weight_files(directory: str, names=HF_WEIGHTS) -> list[str]:
  """The weight files of a checkpoint directory: the first of ``names`` ((index, single file)
  pairs, in the order transformers prefers them) that is there, its shards listed by the index."""
  for index, single in names:
    index_path = os.path.join(directory, index) if index else None
    if index_path and os.path.exists(index_path):
      try:
        with open(index_path) as f:
          weight_map = json.load(f)["weight_map"]
      except (OSError, ValueError, KeyError) as e:
        raise bad_argument("checkpoint", f"a valid {index}", f"{index_path} ({e})",
                           CheckpointError) from None
      return [os.path.join(directory, name) for name in sorted(set(weight_map.values()))]
    if os.path.exists(os.path.join(directory, single)):
      return [os.path.join(directory, single)]
  wanted = " or ".join(single for _, single in names)
  raise bad_argument("checkpoint", f"{wanted} (sharded or not)",
                     f"none in {directory} (files: {sorted(os.listdir(directory))})",
                     CheckpointError)


def has_weights(directory: str, names=HF_WEIGHTS) -> bool:
  try:
    weight_files(directory, names)
  except CheckpointError:
    return False
  return True


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Every tensor as float32 NumPy, on the host: no JAX backend is needed (a GPU-only JAX has
  no "cpu" one). NumPy has no bfloat16, so BF16 tensors are read from their bytes via ml_dtypes."""
  try:
    with safe_open(path, framework="numpy") as f:
      tensors, bf16 = {}, []
      for k in f.keys():
        if f.get_slice(k).get_dtype() == "BF16":
          bf16.append(k)
        else:
          tensors[k] = f.get_tensor(k).astype(np.float32)
    if bf16:
      tensors.update(read_bf16(path, bf16))
    return tensors
  except Exception as e:  # SafetensorError on a truncated or corrupt file
    raise bad_argument("checkpoint", "a readable safetensors file",
                       f"{path} ({type(e).__name__}: {e})", CheckpointError) from None


def read_bf16(path: str, keys: list[str]) -> dict[str, np.ndarray]:
  """BF16 tensors of a safetensors file (8-byte header length, JSON header, raw little-endian
  data at [start, end) after the header), widened to float32."""
  import ml_dtypes  # noqa  (a JAX dependency)
  with open(path, "rb") as f:
    header_len = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(header_len))
    data = np.memmap(path, np.uint8, mode="r", offset=8 + header_len)
    out = {}
    for k in keys:
      start, end = header[k]["data_offsets"]
      out[k] = (np.frombuffer(data[start:end], ml_dtypes.bfloat16)
                .reshape(header[k]["shape"]).astype(np.float32))
    return out


def read_torch(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # noqa  (torch: optional, pytorch_model.bin only)
  except ImportError:
    raise bad_argument("checkpoint", "model.safetensors (reading pytorch_model.bin needs torch)",
                       path, CheckpointError) from None
  try:
    tensors = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise bad_argument("checkpoint", "a readable pytorch_model.bin",
                       f"{path} ({type(e).__name__}: {e})", CheckpointError) from None
  return {k: v.detach().float().numpy() for k, v in tensors.items()}


def read_tensors(directory: str, names=HF_WEIGHTS) -> dict[str, np.ndarray]:
  """Every tensor of the checkpoint in ``directory`` (see :func:`weight_files`), float32 NumPy."""
  tensors = {}
  for path in weight_files(directory, names):
    if not os.path.exists(path):
      raise bad_argument("checkpoint", "every shard named in the index", f"{path} is missing",
                         CheckpointError)
    tensors.update(read_safetensors(path) if path.endswith(".safetensors") else read_torch(path))
  return tensors


def read_json(directory: str, name: str) -> dict:
  """``directory/name`` as a JSON object, or a CheckpointError naming the file."""
  path = os.path.join(directory, name)
  if not os.path.isfile(path):
    raise bad_argument("checkpoint", f"a directory with {name}", f"none in {directory}",
                       CheckpointError)
  try:
    with open(path) as f:
      value = json.load(f)
  except (OSError, ValueError) as e:
    raise bad_argument("checkpoint", f"a readable {name}", f"{path} ({e})",
                       CheckpointError) from None
  if not isinstance(value, dict):
    raise bad_argument("checkpoint", f"a JSON object in {name}",
                       f"{type(value).__name__} in {path}", CheckpointError)
  return value


def config_dict(config, what: str) -> dict:
  """A model's config as a dict: ``config`` itself, a transformers config (``to_dict``), a
  ``config.json`` file or its directory; an unreadable file is a ConfigError naming ``what``
  ("CLIP", "SigLIP")."""
  if hasattr(config, "to_dict"):
    return config.to_dict()
  if isinstance(config, dict):
    return config
  path = os.path.join(config, "config.json") if os.path.isdir(config) else os.fspath(config)
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise bad_argument("config", f"a readable {what} config.json", f"{path} ({e})",
                       ConfigError) from None


def describe(path: str) -> str:
  """What is at a checkpoint path, for an error: its files, and what its ``config.json`` says."""
  if not os.path.isdir(path):
    return f"the file {path}"
  text = f"{path} holding {sorted(os.listdir(path))[:12]}"
  try:
    config = read_json(path, "config.json")
  except CheckpointError:
    return text
  kind = config.get("model_type") or config.get("architecture") or config.get("architectures")
  return text + f" (config.json says model_type {kind!r})"


# ---------------------------------------------------------------------------------------------
# Exports

EXPORT_MARKER = ".glajax-export"   # written last into every export: the files glajax wrote


def write_export(directory, write: Callable[[str], None], *, overwrite: bool = False,
                 replaceable: re.Pattern = re.compile(r"$^")) -> str:
  """Writes an export directory atomically: ``write(tmp)`` fills a temporary directory beside
  ``directory``, which then takes its place, so a crash leaves the old export or none.

  ``directory`` may be new, empty, or an earlier glajax export (it holds ``.glajax-export``, the
  list of files glajax wrote); ``overwrite=True`` also replaces a checkpoint glajax did not write
  (files matching ``replaceable``). Files that are not part of an export are never removed: a
  directory holding any is refused, as are ``""``, the current directory and its parents.
  Returns the absolute path.
  """
  target = export_target(directory)
  replaced = _removable_files(target, overwrite, replaceable)
  parent = os.path.dirname(target)
  with _filesystem("directory", target):
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
  try:
    with _filesystem("directory", target):
      umask = _umask()
      os.chmod(tmp, 0o777 & ~umask)   # mkdtemp makes it 0700
      write(tmp)
      written = sorted(os.listdir(tmp))
      for name in written:   # safetensors writes 0600 files
        if os.path.isfile(os.path.join(tmp, name)):
          os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
      with open(os.path.join(tmp, EXPORT_MARKER), "w") as f:   # last: the export is whole
        json.dump({"glajax_export": 1, "files": written}, f, indent=2)
      _replace_directory(tmp, target, replaced)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return target


def write_files(directory: str, files: dict) -> None:
  """Writes ``files`` (name -> ``bytes``, ``str`` or a function ``write(path)``) into
  ``directory``."""
  for name, content in files.items():
    path = os.path.join(directory, name)
    if callable(content):
      content(path)
    else:
      with open(path, "wb" if isinstance(content, bytes) else "w") as f:
        f.write(content)


def check_file_names(argument: str, names, reserved) -> None:
  """Plain file names (no path, no leading dot) other than ``reserved``."""
  for name in names:
    if (not isinstance(name, str) or not name or name.startswith(".") or os.sep in name
        or name in reserved):
      raise bad_argument(argument, "plain file names other than the checkpoint's own", repr(name))


def _umask() -> int:
  """The process's umask, read without changing it where Linux allows (no race with threads)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError):
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def _filesystem(argument: str, path: str):
  """Turns an OSError about ``path`` into a CheckpointError naming ``argument`` and the path."""
  try:
    yield
  except OSError as e:
    raise bad_argument(argument, "a writable location", f"{path} ({type(e).__name__}: "
                       f"{e.strerror or e})", CheckpointError) from e


def export_target(directory) -> str:
  """The absolute export path (checked before any work; a symlink resolved to the directory it
  points to); refuses "", the current directory and its parents."""
  if not isinstance(directory, (str, os.PathLike)):
    raise bad_argument("directory", "a directory path", type(directory).__name__)
  path = os.fspath(directory)
  if not isinstance(path, str) or not path.strip():
    raise bad_argument("directory", "a non-empty directory path", repr(path))
  target = os.path.abspath(path)
  if os.path.islink(target):  # an export through a link replaces what it points to, not the link
    target = os.path.realpath(target)
  real, cwd = os.path.realpath(target), os.path.realpath(os.getcwd())
  if real == cwd or cwd.startswith(real.rstrip(os.sep) + os.sep):
    raise bad_argument("directory", "a directory other than the current directory and its "
                       "parents (an export replaces its directory)", f"{path!r} ({target})")
  if os.path.exists(target) and not os.path.isdir(target):
    raise bad_argument("directory", "a directory path", f"the file {target}", CheckpointError)
  parent = os.path.dirname(target)
  while not os.path.exists(parent) and os.path.dirname(parent) != parent:
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise bad_argument("directory", "a path whose parents are directories",
                       f"{target} under the file {parent}", CheckpointError)
  return target


def _removable_files(target: str, overwrite: bool, replaceable: re.Pattern) -> list[str]:
  """The files of an existing ``target`` that an export may replace; raises when any other
  file is there (or, without ``overwrite``, when ``target`` is not a glajax export)."""
  if not os.path.isdir(target):
    return []
  with _filesystem("directory", target):
    entries = sorted(os.listdir(target))
  if not entries:
    return []
  ours = _export_files(target)
  if ours is None and not overwrite:
    raise bad_argument(
        "directory", f"a new or empty directory, or an earlier glajax export (with "
        f"{EXPORT_MARKER}); overwrite=True replaces a checkpoint glajax did not write",
        f"{target} holding {entries[:10]}", CheckpointError)
  allowed = set(ours or ()) | {EXPORT_MARKER}
  foreign = [e for e in entries if not (e in allowed or (overwrite and replaceable.match(e)))
             or not os.path.isfile(os.path.join(target, e))]
  if foreign:
    raise bad_argument(
        "directory", "a directory holding nothing but a checkpoint (files that glajax did not "
        "write are never removed)", f"{target} also holding {foreign[:10]}"
        + (f" and {len(foreign) - 10} more" if len(foreign) > 10 else "")
        + "; move them or export elsewhere", CheckpointError)
  return entries


def _export_files(directory: str) -> list[str] | None:
  """The files listed in ``directory``'s export marker, or None if it has no valid marker."""
  try:
    with open(os.path.join(directory, EXPORT_MARKER)) as f:
      files = json.load(f)["files"]
  except (OSError, ValueError, KeyError, TypeError):
    return None
  if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
    return None
  return files


def _replace_directory(new: str, target: str, replaced: list[str]) -> None:
  """Moves ``new`` to ``target``. An existing ``target`` is moved aside first; then only its
  files named in ``replaced`` are deleted (anything else is kept there and reported)."""
  if not os.path.exists(target):
    os.rename(new, target)
    return
  old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=os.path.dirname(target))
  os.rmdir(old)
  os.rename(target, old)
  try:
    os.rename(new, target)
  except BaseException:
    os.rename(old, target)
    raise
  for name in replaced:
    path = os.path.join(old, name)
    if os.path.isfile(path) and not os.path.islink(path):
      os.remove(path)
  try:
    os.rmdir(old)
  except OSError:  # a file appeared meanwhile: keep it, say where
    logging.warning("export: %s held files that appeared during the export; they are kept "
                    "in %s", target, old)
