"""Hugging Face (transformers-format) CLIP checkpoints <-> glajax ``CLIP``.

The conversion is one table: each row pairs an HF key template with a glajax parameter path
template and names the transform between them (Linear ``weight[out, in]`` <-> ``kernel[in, out]``;
Conv OIHW <-> HWIO; the rest as is). Loading builds the model abstractly (``nnx.eval_shape``),
shape-checks every tensor and reports every problem in one ``CheckpointError``.
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

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from huggingface_hub import snapshot_download
from safetensors import safe_open
from safetensors.numpy import save_file

from glajax.errors import CheckpointError, ConfigError, InputError, bad_argument
from glajax.methods import _checks
from glajax.models.clip import (CLIP, CLIPConfig, _Adapter, interpolate_position_embedding)

# Placeholder -> the regex it stands for, in both key spellings (glajax paths use '.' too).
_SLOTS = {
    "tower": r"vision|text",
    "i": r"\d+",
    "linear": r"self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12]",
    "ln": r"layer_norm[12]",
    "embedding": r"token_embedding|position_embedding",
    "final_ln": r"post_layernorm|final_layer_norm",
    "projection": r"visual_projection|text_projection",
}

# (HF key, glajax path, transform)
_TABLE = (
    ("{tower}_model.encoder.layers.{i}.{linear}.weight",
     "{tower}_model.layers.{i}.{linear}.kernel", "linear"),
    ("{tower}_model.encoder.layers.{i}.{linear}.bias", "{tower}_model.layers.{i}.{linear}.bias",
     "same"),
    ("{tower}_model.encoder.layers.{i}.{ln}.weight", "{tower}_model.layers.{i}.{ln}.scale", "same"),
    ("{tower}_model.encoder.layers.{i}.{ln}.bias", "{tower}_model.layers.{i}.{ln}.bias", "same"),
    ("vision_model.embeddings.class_embedding", "vision_model.class_embedding", "same"),
    ("vision_model.embeddings.patch_embedding.weight", "vision_model.patch_embedding.kernel",
     "conv"),
    ("{tower}_model.embeddings.{embedding}.weight", "{tower}_model.{embedding}.embedding", "same"),
    ("vision_model.pre_layrnorm.weight", "vision_model.pre_layernorm.scale", "same"),
    ("vision_model.pre_layrnorm.bias", "vision_model.pre_layernorm.bias", "same"),
    ("{tower}_model.{final_ln}.weight", "{tower}_model.{final_ln}.scale", "same"),
    ("{tower}_model.{final_ln}.bias", "{tower}_model.{final_ln}.bias", "same"),
    ("{projection}.weight", "{projection}.kernel", "linear"),
    ("logit_scale", "logit_scale", "same"),
)
# buffers, not parameters; an exported classifier's head (load_clip reads the CLIP)
_SKIPPED = re.compile(r".*position_ids$|^classifier\.(weight|bias)$")

# transform name -> (HF -> glajax, glajax -> HF)
_TRANSFORMS = {
    "same": (lambda w: w, lambda w: w),
    "linear": (lambda w: w.T, lambda w: w.T),
    "conv": (lambda w: w.transpose(2, 3, 1, 0), lambda w: w.transpose(3, 2, 0, 1)),
}

ADAPTERS_FILE = "glajax_adapters.safetensors"
_MAX_PROBLEMS = 40  # listed in a CheckpointError; the count says how many there are in all
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt"]  # config, weights, tokenizer


def _compile(template: str) -> re.Pattern:
  pattern = re.escape(template)
  for slot, regex in _SLOTS.items():
    pattern = pattern.replace(re.escape("{" + slot + "}"), f"(?P<{slot}>{regex})")
  return re.compile(pattern + "$")


_ROWS = tuple((_compile(hf), hf, _compile(ours), ours, name) for hf, ours, name in _TABLE)


def _hf_to_glajax_key(key: str) -> tuple[str, str] | None:
  """HF key -> (glajax path, transform name), or None if the key is not a CLIP parameter."""
  for hf_re, _, _, ours, name in _ROWS:
    if m := hf_re.match(key):
      return ours.format(**m.groupdict()), name
  return None


def _glajax_to_hf_key(path: str) -> tuple[str, str] | None:
  for _, hf, ours_re, _, name in _ROWS:
    if m := ours_re.match(path):
      return hf.format(**m.groupdict()), name
  return None


def _path_str(path) -> str:
  return ".".join(str(p) for p in path)


def _is_adapter(path: str) -> bool:
  return ".adapter." in path


# ---------------------------------------------------------------------------------------------
# Locating and reading checkpoints


def resolve_checkpoint(path_or_hub_id: str | os.PathLike, allow_patterns=None) -> str:
  """A local directory for ``path_or_hub_id``: the directory itself or its hub snapshot.

  Hub ids go through ``huggingface_hub.snapshot_download`` (its cache; HF_HUB_OFFLINE honoured).
  """
  path = os.fspath(path_or_hub_id)
  if os.path.isdir(path):
    return path
  if os.path.exists(path):
    raise bad_argument("path_or_hub_id", "a checkpoint directory", f"the file {path}",
                       CheckpointError)
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


def _weight_files(directory: str) -> list[str]:
  """The weight files of a checkpoint directory, in the order transformers prefers them."""
  for index, single in (("model.safetensors.index.json", "model.safetensors"),
                        ("pytorch_model.bin.index.json", "pytorch_model.bin")):
    index_path = os.path.join(directory, index)
    if os.path.exists(index_path):
      try:
        with open(index_path) as f:
          weight_map = json.load(f)["weight_map"]
      except (OSError, ValueError, KeyError) as e:
        raise bad_argument("checkpoint", f"a valid {index}", f"{index_path} ({e})",
                           CheckpointError) from None
      return [os.path.join(directory, name) for name in sorted(set(weight_map.values()))]
    if os.path.exists(os.path.join(directory, single)):
      return [os.path.join(directory, single)]
  raise bad_argument("checkpoint", "model.safetensors (sharded or not) or pytorch_model.bin",
                     f"none in {directory} (files: {sorted(os.listdir(directory))})",
                     CheckpointError)


def _has_weights(directory: str) -> bool:
  try:
    _weight_files(directory)
  except CheckpointError:
    return False
  return True


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
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
      tensors.update(_read_bf16(path, bf16))
    return tensors
  except Exception as e:  # SafetensorError on a truncated or corrupt file
    raise bad_argument("checkpoint", "a readable safetensors file",
                       f"{path} ({type(e).__name__}: {e})", CheckpointError) from None


def _read_bf16(path: str, keys: list[str]) -> dict[str, np.ndarray]:
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


def _read_torch(path: str) -> dict[str, np.ndarray]:
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


def _read_weights(directory: str) -> dict[str, np.ndarray]:
  tensors = {}
  for path in _weight_files(directory):
    if not os.path.exists(path):
      raise bad_argument("checkpoint", "every shard named in the index", f"{path} is missing",
                         CheckpointError)
    tensors.update(_read_safetensors(path) if path.endswith(".safetensors") else _read_torch(path))
  return tensors


def _read_config(directory: str) -> CLIPConfig:
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    raise bad_argument("checkpoint", "a directory with config.json", f"none in {directory}",
                       CheckpointError)
  try:
    return CLIPConfig.from_hf(path)
  except ConfigError as e:
    raise CheckpointError(f"checkpoint {directory} is not a CLIP checkpoint: {e}") from None


# ---------------------------------------------------------------------------------------------
# Load / save


def _convert(tensors: dict[str, np.ndarray], expected: dict[str, jax.ShapeDtypeStruct],
             source: str) -> dict[str, np.ndarray]:
  """HF tensors -> glajax arrays by path; every problem collected into one CheckpointError."""
  converted, found, problems = {}, set(), []
  for key, value in tensors.items():
    if _SKIPPED.match(key):
      continue
    target = _hf_to_glajax_key(key)
    if target is None:
      problems.append(f"unexpected tensor {key} {value.shape}")
      continue
    path, transform = target
    found.add(path)
    if path not in expected:
      problems.append(f"unexpected tensor {key} {value.shape} (no {path} in the model)")
      continue
    value = _TRANSFORMS[transform][0](value)
    if value.shape != expected[path].shape:
      problems.append(f"{key}: expected shape {expected[path].shape} (after {transform} "
                      f"transform), found {value.shape}")
      continue
    converted[path] = value
  problems += [f"missing tensor {_glajax_to_hf_key(p)[0]}" for p in sorted(expected)
               if p not in found and not _is_adapter(p)]
  if problems:
    shown = problems[:_MAX_PROBLEMS] + ([f"... and {len(problems) - _MAX_PROBLEMS} more"]
                                        if len(problems) > _MAX_PROBLEMS else [])
    raise CheckpointError(f"checkpoint {source} does not fit its config "
                          f"({len(problems)} problems):\n  " + "\n  ".join(shown))
  _check_finite(converted, source)
  return converted


def _check_finite(tensors: dict[str, np.ndarray], source: str, argument: str = "checkpoint",
                  error=CheckpointError) -> None:
  """Refuses NaN or infinite weights (a diverged run's export), naming every such tensor."""
  bad = {key: int(np.size(value) - np.isfinite(value).sum()) for key, value in tensors.items()
         if not np.isfinite(value).all()}
  if bad:
    hf_names = {key: (_glajax_to_hf_key(key) or (key,))[0] for key in bad}
    listed = [f"{hf_names[key]} ({count} of {np.size(tensors[key])})" for key, count in bad.items()]
    raise bad_argument(argument, "finite weights",
                       f"NaN or inf in {len(bad)} tensors of {source}: "
                       + ", ".join(listed[:_MAX_PROBLEMS]), error)


def load_clip(path_or_hub_id: str | os.PathLike, *, dtype=jnp.float32, param_dtype=jnp.float32,
              image_size: int | None = None, adapter_dim: int | None = None,
              adapter_scale: float | str = "learnable", remat: bool = False,
              attention: str = "auto", seed: int = 0) -> CLIP:
  """Loads a transformers-format CLIP checkpoint (local directory or hub id) as a ``CLIP``.

  Reads ``config.json`` and ``model.safetensors`` (sharded or not) or ``pytorch_model.bin``.
  ``image_size`` resizes the position embeddings bicubically. ``adapter_dim > 0`` adds freshly
  initialised AdaptFormer adapters (LIFT's, ``adapter_scale`` ``"learnable"`` or a fixed float;
  ``up`` zero, so outputs equal the checkpoint's); adapters
  saved by ``save_clip`` in ``glajax_adapters.safetensors`` are restored when ``adapter_dim`` is
  None. ``remat`` and ``attention`` set both towers' (see ``CLIPVisionConfig``).
  """
  if image_size is not None:
    _checks.positive_int("image_size", image_size)  # before reading gigabytes of weights
  directory = resolve_checkpoint(path_or_hub_id, allow_patterns=_HUB_PATTERNS)
  if not _has_weights(directory) and not os.path.isdir(path_or_hub_id):
    # a hub repo without safetensors: fetch its PyTorch weights too
    directory = resolve_checkpoint(path_or_hub_id,
                                   allow_patterns=[*_HUB_PATTERNS, "pytorch_model*.bin"])
  config = _read_config(directory)
  adapters = _read_adapters(directory) if adapter_dim is None else None
  if adapters is not None:
    adapter_dim, adapter_scale = adapters[1], adapters[2]
  vision = dataclasses.replace(config.vision, adapter_dim=adapter_dim or 0,
                               adapter_scale=adapter_scale, remat=remat, attention=attention)
  config = dataclasses.replace(config, vision=vision, text=dataclasses.replace(
      config.text, remat=remat, attention=attention))
  model = clip_from_hf_tensors(config, _read_weights(directory), dtype=dtype,
                               param_dtype=param_dtype, seed=seed,
                               adapters=None if adapters is None else adapters[0], source=directory)
  if image_size is not None and image_size != config.vision.image_size:
    interpolate_position_embedding(model, image_size)
  return model


def clip_from_hf_tensors(config: CLIPConfig, tensors: dict[str, np.ndarray], *, dtype=jnp.float32,
                         param_dtype=jnp.float32, seed: int = 0, adapters=None,
                         source: str = "tensors") -> CLIP:
  """A ``CLIP`` from HF-named tensors (a transformers ``state_dict`` as NumPy arrays).

  The model is built abstractly; adapter parameters come from ``adapters`` (glajax paths) or,
  when ``config.vision.adapter_dim > 0`` and none are given, a fresh init with ``seed``.
  """
  abstract = nnx.eval_shape(lambda: CLIP(config, dtype=dtype, param_dtype=param_dtype,
                                         rngs=nnx.Rngs(seed)))
  graphdef, state = nnx.split(abstract)
  flat = nnx.to_flat_state(state)
  expected = {_path_str(path): var.get_value() for path, var in flat}
  converted = _convert(tensors, expected, source)
  if adapters is not None:
    converted.update(_check_adapters(adapters, expected, source))
  elif config.vision.adapter_dim:
    converted.update(_init_adapters(config, dtype, param_dtype, seed))
  for path, var in flat:
    key = _path_str(path)
    var.set_raw_value(jnp.asarray(converted[key], expected[key].dtype))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _init_adapters(config: CLIPConfig, dtype, param_dtype, seed: int) -> dict[str, jax.Array]:
  rngs = nnx.Rngs(seed)
  out = {}
  for i in range(config.vision.num_hidden_layers):
    adapter = _Adapter(config.vision.hidden_size, config.vision.adapter_dim,
                       scale=config.vision.adapter_scale, dtype=dtype, param_dtype=param_dtype,
                       rngs=rngs)
    for path, var in nnx.to_flat_state(nnx.state(adapter, nnx.Param)):
      out[f"vision_model.layers.{i}.adapter.{_path_str(path)}"] = var.get_value()
  return out


def _read_adapters(directory: str):
  path = os.path.join(directory, ADAPTERS_FILE)
  if not os.path.exists(path):
    return None
  try:
    with safe_open(path, framework="numpy") as f:
      meta = f.metadata() or {}
      tensors = {k: f.get_tensor(k) for k in f.keys()}
    scale = meta["adapter_scale"].strip("'\"")
    return tensors, int(meta["adapter_dim"]), scale if scale == "learnable" else float(scale)
  except Exception as e:
    raise bad_argument("checkpoint", f"a readable {ADAPTERS_FILE}",
                       f"{path} ({type(e).__name__}: {e})", CheckpointError) from None


def _check_adapters(tensors, expected, source) -> dict[str, np.ndarray]:
  wanted = {p: s for p, s in expected.items() if _is_adapter(p)}
  problems = [f"missing adapter tensor {p}" for p in wanted if p not in tensors]
  problems += [f"{p}: expected shape {wanted[p].shape}, found {v.shape}"
               for p, v in tensors.items() if p in wanted and v.shape != wanted[p].shape]
  problems += [f"unexpected adapter tensor {p}" for p in tensors if p not in wanted]
  if problems:
    raise CheckpointError(f"{ADAPTERS_FILE} in {source} does not fit the model:\n  "
                          + "\n  ".join(problems))
  _check_finite(tensors, f"{source}/{ADAPTERS_FILE}")
  return tensors


EXPORT_MARKER = ".glajax-export"   # written last into every export: the files glajax wrote
# What a transformers CLIP checkpoint directory holds: replaced with ``overwrite=True``.
_CHECKPOINT_FILES = re.compile(
    r"(config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json"
    r"|pytorch_model(-\d+-of-\d+)?\.bin|pytorch_model\.bin\.index\.json|"
    + re.escape(ADAPTERS_FILE) + ")$")


def save_clip(model: CLIP, directory: str | os.PathLike, *, overwrite: bool = False,
              extra_files: dict | None = None, config_updates: dict | None = None,
              extra_tensors: dict | None = None) -> str:
  """Writes ``config.json`` + ``model.safetensors`` that transformers' ``CLIPModel`` loads.

  Adapter parameters (not part of transformers' CLIP) go to ``glajax_adapters.safetensors``,
  which ``load_clip`` restores. ``extra_files`` maps more file names to their content (``bytes``
  or ``str``) or to a function ``write(path)``; they are part of the export (e.g. a head).

  Never destroys anything: the files are written into a temporary directory beside
  ``directory``, which is then renamed into place, so a crash leaves the old export or none.
  ``directory`` may be new, empty, or an earlier glajax export (it holds ``.glajax-export``,
  the list of files glajax wrote); ``overwrite=True`` also replaces a checkpoint glajax did not
  write. Files that are not part of an export are never removed: a directory holding any is
  refused, as are ``""``, the current directory and its parents. Returns the absolute path.
  """
  if not isinstance(model, CLIP):
    raise bad_argument("model", "a glajax CLIP", type(model).__name__)
  target = _export_target(directory)
  extra_files = dict(extra_files or {})
  for name in extra_files:
    if (not isinstance(name, str) or not name or name.startswith(".") or os.sep in name
        or name in ("config.json", "model.safetensors", ADAPTERS_FILE)):
      raise bad_argument("extra_files", "plain file names other than the checkpoint's own",
                         repr(name))
  weights, adapters = {}, {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    key = _path_str(path)
    value = np.asarray(jax.device_get(var.get_value()), np.float32)
    if _is_adapter(key):
      adapters[key] = value
      continue
    hf_key, transform = _glajax_to_hf_key(key)
    weights[hf_key] = _TRANSFORMS[transform][1](value).copy()
  for name, value in (extra_tensors or {}).items():
    if not isinstance(name, str) or name in weights:
      raise bad_argument("extra_tensors", "names other than the CLIP's own", repr(name))
    weights[name] = np.ascontiguousarray(value, np.float32)
  # A diverged model is not exported (load_clip would refuse it anyway).
  _check_finite({**weights, **adapters}, "the model", "model", InputError)
  replaced = _removable_files(target, overwrite)
  parent = os.path.dirname(target)
  with _filesystem("directory", target):
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
  try:
    with _filesystem("directory", target):
      umask = _umask()
      os.chmod(tmp, 0o777 & ~umask)   # mkdtemp makes it 0700
      config = model.config
      with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump({**config.to_hf(), **(config_updates or {})}, f, indent=2)
      save_file(weights, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
      if adapters:
        save_file(adapters, os.path.join(tmp, ADAPTERS_FILE),
                  metadata={"adapter_dim": str(config.vision.adapter_dim),
                            "adapter_scale": repr(config.vision.adapter_scale)})
      for name, content in extra_files.items():
        path = os.path.join(tmp, name)
        if callable(content):
          content(path)
        else:
          with open(path, "wb" if isinstance(content, bytes) else "w") as f:
            f.write(content)
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


def _export_target(directory) -> str:
  """The absolute export path; refuses "", the current directory and its parents."""
  if not isinstance(directory, (str, os.PathLike)):
    raise bad_argument("directory", "a directory path", type(directory).__name__)
  path = os.fspath(directory)
  if not isinstance(path, str) or not path.strip():
    raise bad_argument("directory", "a non-empty directory path", repr(path))
  target = os.path.abspath(path)
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


def _removable_files(target: str, overwrite: bool) -> list[str]:
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
  foreign = [e for e in entries if not (e in allowed or (overwrite and _CHECKPOINT_FILES.match(e)))
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
    logging.warning("save_clip: %s held files that appeared during the export; they are kept "
                    "in %s", target, old)
