"""Every bad input raises a clear GlajaxError and changes nothing on disk (issue 13).

One table, ``CASES``: a row is ``Case(id, call, error, names, setup)``. ``call(ctx)`` must raise
``error`` (a GlajaxError subclass) whose message contains every string of ``names`` (the
argument, or config key, it is about; a str or a tuple); ``setup(ctx)``, if given, prepares files
first. To add rows (configs, the command line), append to ``CASES``.

Each row runs with the current directory set to ``ctx.cwd``, a temporary folder holding files of
its own, so that a call aimed at "" or "." finds something to destroy. The whole temporary tree
(``ctx.root``: cwd, anything ``setup`` made, and the targets) is snapshotted before and after the
call, content and permissions included: a refused call writes, moves and deletes nothing.
Expensive resources (a tiny model, the tokenizer, a checkpoint) are built once per module,
outside the snapshotted tree, and only by the rows that use them.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from glajax import methods as M
from glajax.data import registry, subsample
from glajax.models import clip as hf
from glajax.models.clip import modeling as clip_lib
from glajax.errors import CheckpointError, ConfigError, DatasetError, GlajaxError, InputError
from glajax.models import registry as tokenizer_lib


# ---------------------------------------------------------------------------------------------
# The harness


@dataclasses.dataclass(frozen=True)
class Case:
  id: str
  call: Callable[["Ctx"], object]
  error: type[GlajaxError]
  names: str | tuple[str, ...]
  setup: Callable[["Ctx"], object] | None = None


class Shared:
  """Module-wide resources, built on first use, outside every row's snapshotted tree."""

  def __init__(self, directory: Path):
    self.directory = directory

  @functools.cached_property
  def model(self):
    """A random tiny CLIP with a 1000-token vocabulary (smaller than the tokenizer's)."""
    return clip_lib.init_clip(_tiny(vocab_size=1000, text_eos_token_id=999,
                                    text_bos_token_id=998, text_pad_token_id=0))

  @functools.cached_property
  def tok(self):
    return tokenizer_lib.load_tokenizer()

  @functools.cached_property
  def checkpoint(self) -> str:
    return hf.save_clip(self.model, self.directory / "checkpoint")

  @functools.cached_property
  def resnet(self):
    """A random tiny ResNet CLIP."""
    return clip_lib.init_clip(_tiny(resnet=True))

  @functools.cached_property
  def nan_checkpoint(self) -> str:
    """``checkpoint`` with one NaN in the second vision block's fc1 weight."""
    import safetensors.numpy
    out = self.directory / "nan_checkpoint"
    out.mkdir()
    tensors = safetensors.numpy.load_file(os.path.join(self.checkpoint, "model.safetensors"))
    tensors["vision_model.encoder.layers.1.mlp.fc1.weight"][3, 2] = np.nan
    safetensors.numpy.save_file(tensors, out / "model.safetensors")
    (out / "config.json").write_bytes(Path(self.checkpoint, "config.json").read_bytes())
    return str(out)


@dataclasses.dataclass
class Ctx:
  root: Path       # the snapshotted tree
  cwd: Path        # the current directory during the call
  shared: Shared

  def __getattr__(self, name):  # ctx.model, ctx.tok, ctx.checkpoint, ... from Shared
    return getattr(self.shared, name)

  def path(self, *parts) -> Path:
    return self.root.joinpath(*parts)

  def files(self, *relative, content: bytes = b"x"):
    """Creates files (and their folders) under root."""
    for name in relative:
      path = self.path(name)
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_bytes(content)


def _snapshot(root: Path) -> dict:
  """{relative path: (mode incl. file type, sha256 of a file's content)} under ``root``."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(root):
    for name in dirnames + filenames:
      path = os.path.join(dirpath, name)
      stat = os.lstat(path)
      digest = None
      if os.path.isfile(path) and not os.path.islink(path):
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
      out[os.path.relpath(path, root)] = (stat.st_mode, digest)
  return out


# ---------------------------------------------------------------------------------------------
# Inputs the rows share

Z = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 2.0], [0.5, 0.2, 3.0]], np.float32)
Y = np.array([0, 1, 2, 2], np.int32)
Z0, Y0 = np.zeros((0, 3), np.float32), np.zeros((0,), np.int32)
ABSENT = np.array([False, False, True])
IMAGE_SIZE = 32  # CLIPConfig.tiny's


def _images(batch: int, size: int = IMAGE_SIZE):
  return np.zeros((batch, size, size, 3), np.float32)


def _tiny(**overrides):
  return clip_lib.CLIPConfig.tiny(**overrides)


def _save(ctx, target, **kwargs):
  return hf.save_clip(ctx.model, target, **kwargs)


def _load(path, **kwargs):
  return hf.load_clip(path, **kwargs)


_OPEN_CLIP_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8,
                   "layers": 12}
_VIT_OPEN_CLIP = {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768,
                                                   "patch_size": 16}, "text_cfg": _OPEN_CLIP_TEXT}
# as open_clip's model_configs/ViT-B-16-SigLIP.json and roberta-ViT-B-32.json
_SIGLIP_OPEN_CLIP = {
    "embed_dim": 768, "init_logit_bias": -10, "custom_text": True,
    "vision_cfg": {"image_size": 224, "timm_model_name": "vit_base_patch16_siglip_224",
                   "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": "none"},
    "text_cfg": {"context_length": 64, "vocab_size": 32000,
                 "hf_tokenizer_name": "timm/ViT-B-16-SigLIP",
                 "tokenizer_kwargs": {"clean": "canonicalize"}, "width": 768, "heads": 12,
                 "layers": 12, "no_causal_mask": True, "proj_bias": True, "pool_type": "last",
                 "norm_kwargs": {"eps": 1e-6}}}
_ROBERTA_OPEN_CLIP = {
    "embed_dim": 512, "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
    "text_cfg": {"hf_model_name": "roberta-base", "hf_tokenizer_name": "roberta-base",
                 "hf_pooler_type": "mean_pooler"}}


def _open_clip_config(ctx, name, model_cfg, **extra):
  import json
  ctx.path(name).mkdir(parents=True)
  ctx.path(name, "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg,
                                                                 **extra}))


def _torch_save(ctx, name, tensors):
  torch = pytest.importorskip("torch")
  torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, ctx.path(name))


def _without_torch(call):
  """``call()`` as where torch is not installed (``import torch`` raises ImportError)."""
  import sys
  saved = sys.modules.get("torch")
  sys.modules["torch"] = None
  try:
    return call()
  finally:
    if saved is None:
      del sys.modules["torch"]
    else:
      sys.modules["torch"] = saved


def _zeroshot(ctx, classnames=("cat", "dog"), templates=("a photo of a {}.",), **kwargs):
  from glajax.zeroshot import zeroshot_head
  return zeroshot_head(ctx.model, ctx.tok, classnames, templates, show_progress=False, **kwargs)


def _nan_model(ctx):
  del ctx
  model = clip_lib.init_clip(_tiny(vision_num_hidden_layers=1, text_num_hidden_layers=1))
  kernel = model.visual_projection.kernel
  kernel[...] = kernel[...].at[0, 0].set(jnp.inf)
  return model


def _folder(ctx, *relative):
  return registry.folder_dataset("bad_inputs_folder", ctx.path(*relative))


def _prepare_folder(ctx, data_dir):
  from glajax.data import builders
  return builders.prepare(_folder(ctx, "raw").source, None, ctx.path(data_dir))


def _image_files(ctx, *relative):
  from PIL import Image
  for name in relative:
    path = ctx.path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)


def _checkpointer(ctx, directory, **kwargs):
  from glajax.train.checkpoint import Checkpointer
  return Checkpointer(str(ctx.path(directory)), every=1, **kwargs)


def _export_with_user_files(ctx):
  ctx.path("export").mkdir()
  ctx.files("export/notes.txt", "export/config.json")


# ---------------------------------------------------------------------------------------------
# The table

CASES = [
    # --- models: configs ----------------------------------------------------------------------
    Case("config_image_size_0", lambda c: _tiny(image_size=0), ConfigError, "image_size"),
    Case("config_image_size_negative", lambda c: _tiny(image_size=-32), ConfigError,
         "image_size"),
    Case("config_image_size_indivisible", lambda c: _tiny(image_size=30), ConfigError,
         ("image_size", "patch_size")),
    Case("config_image_size_str", lambda c: _tiny(image_size="32"), ConfigError, "image_size"),
    Case("config_patch_size_0", lambda c: _tiny(patch_size=0), ConfigError, "patch_size"),
    Case("config_hidden_size_0", lambda c: _tiny(vision_hidden_size=0), ConfigError,
         "vision.hidden_size"),
    Case("config_heads_0", lambda c: _tiny(text_num_attention_heads=0), ConfigError,
         "text.num_attention_heads"),
    Case("config_layers_0", lambda c: _tiny(vision_num_hidden_layers=0), ConfigError,
         "vision.num_hidden_layers"),
    Case("config_vocab_size_0", lambda c: _tiny(vocab_size=0), ConfigError, "vocab_size"),
    Case("config_projection_dim_0", lambda c: _tiny(projection_dim=0), ConfigError,
         "projection_dim"),
    Case("config_unknown_field", lambda c: _tiny(image_sise=32), ConfigError, "image_sise"),
    # --- models: encoders ---------------------------------------------------------------------
    Case("encode_text_id_too_large", lambda c: c.model.encode_text(np.array([[998, 1000, 999]])),
         InputError, ("input_ids", "vocab_size")),
    Case("encode_text_id_negative", lambda c: c.model.encode_text(np.array([[998, -1, 999]])),
         InputError, "input_ids"),
    Case("encode_text_float_ids", lambda c: c.model.encode_text(np.ones((1, 3), np.float32)),
         InputError, "input_ids"),
    Case("encode_text_too_long", lambda c: c.model.encode_text(np.ones((1, 78), np.int32)),
         InputError, "input_ids"),
    Case("encode_image_empty_batch", lambda c: c.model.encode_image(_images(0)), InputError,
         "images"),
    Case("encode_image_nchw", lambda c: c.model.encode_image(np.zeros((1, 3, 32, 32),
                                                                      np.float32)),
         InputError, "images"),
    Case("encode_image_wrong_size", lambda c: c.model.encode_image(_images(1, 40)), InputError,
         "images"),
    Case("encode_image_uint8", lambda c: c.model.encode_image(_images(1).astype(np.uint8)),
         InputError, "images"),
    Case("interpolate_image_size_0",
         lambda c: clip_lib.interpolate_position_embedding(c.model, 0), InputError, "image_size"),
    # --- tokenizer ----------------------------------------------------------------------------
    Case("tokenizer_non_str", lambda c: c.tok(["a cat", 3]), InputError, "texts"),
    Case("tokenizer_context_length_1", lambda c: tokenizer_lib.load_tokenizer(context_length=1),
         InputError, "context_length"),
    Case("tokenizer_missing_directory",
         lambda c: tokenizer_lib.load_tokenizer(str(c.path("missing"))), CheckpointError,
         "path_or_hub_id"),
    Case("tokenizer_corrupt_files", lambda c: tokenizer_lib.load_tokenizer(str(c.path("tok"))),
         CheckpointError, ("path_or_hub_id", "tok"),
         setup=lambda c: (c.files("tok/vocab.json", content=b"{bad"), c.files("tok/merges.txt"))),
    # --- zero-shot head -----------------------------------------------------------------------
    Case("zeroshot_classnames_str", lambda c: _zeroshot(c, classnames="cat"), InputError,
         ("classnames", "'cat'")),
    Case("zeroshot_classnames_empty", lambda c: _zeroshot(c, classnames=[]), InputError,
         "classnames"),
    Case("zeroshot_classnames_not_str", lambda c: _zeroshot(c, classnames=["cat", 7]), InputError,
         "classnames"),
    Case("zeroshot_templates_str", lambda c: _zeroshot(c, templates="a photo of a {}."),
         InputError, "templates"),
    Case("zeroshot_template_two_fields", lambda c: _zeroshot(c, templates=["a {} of a {}."]),
         InputError, ("templates", "a {} of a {}.")),
    Case("zeroshot_template_no_field", lambda c: _zeroshot(c, templates=["a photo."]),
         InputError, "templates"),
    Case("zeroshot_template_named_field", lambda c: _zeroshot(c, templates=["a {name}."]),
         InputError, "templates"),
    Case("zeroshot_template_unbalanced", lambda c: _zeroshot(c, templates=["a {."]), InputError,
         "templates"),
    Case("zeroshot_batch_size_0", lambda c: _zeroshot(c, batch_size=0), InputError,
         "batch_size"),
    Case("zeroshot_tokenizer_vocab_mismatch", lambda c: _zeroshot(c), InputError,
         ("tokenizer", "vocab_size")),
    # --- methods: calibration on no samples and bad static arguments --------------------------
    *[Case(f"{name}_no_samples", lambda c, f=getattr(M, name): f(Z0, Y0), InputError, "logits")
      for name in ("ece", "mce", "adaptive_ece", "classwise_ece", "nll", "brier",
                   "reliability_diagram", "fit_temperature", "match_confidence_temperature",
                   "accuracy")],
    Case("ece_num_bins_0", lambda c: M.ece(Z, Y, num_bins=0), InputError, "num_bins"),
    Case("ece_num_bins_float", lambda c: M.ece(Z, Y, num_bins=2.5), InputError, "num_bins"),
    Case("ece_num_bins_bool", lambda c: M.mce(Z, Y, num_bins=True), InputError, "num_bins"),
    Case("ece_per_batch_0", lambda c: M.ece(Z, Y, per_batch=0), InputError, "per_batch"),
    Case("ece_labels_out_of_range", lambda c: M.ece(Z, Y + 1), InputError, "labels"),
    Case("ece_nan_logits", lambda c: M.ece(np.where(Z > 2.5, np.nan, Z), Y), InputError,
         "logits"),
    Case("fit_temperature_num_steps_0", lambda c: M.fit_temperature(Z, Y, num_steps=0),
         InputError, "num_steps"),
    Case("match_confidence_num_steps_0",
         lambda c: M.match_confidence_temperature(Z, Y, num_steps=0), InputError, "num_steps"),
    Case("accuracy_k_0", lambda c: M.accuracy(Z, Y, k=0), InputError, "k"),
    # --- methods: priors, adjustment, ensembles -----------------------------------------------
    Case("estimate_log_prior_missing_class", lambda c: M.estimate_log_prior(Z[:2], Y[:2]),
         InputError, "labels"),
    Case("estimate_log_prior_solver", lambda c: M.estimate_log_prior(Z, Y, solver="sgd"),
         InputError, "solver"),
    Case("logit_adjust_tau_str", lambda c: M.logit_adjust(Z, np.zeros(3, np.float32), tau="1"),
         InputError, "tau"),
    Case("logit_adjust_prior_shape", lambda c: M.logit_adjust(Z, np.zeros(4, np.float32)),
         InputError, "log_prior"),
    Case("gla_ensemble_shapes", lambda c: M.gla_ensemble(Z, Z[:2], np.zeros(3, np.float32)),
         InputError, "zs_logits"),
    Case("backdoor_ensemble_empty", lambda c: M.backdoor_ensemble([]), InputError,
         "logits_list"),
    Case("wise_ft_alpha_str", lambda c: M.wise_ft({"w": Z}, {"w": Z}, "0.5"), InputError,
         "alpha"),
    Case("wise_ft_alpha_out_of_range", lambda c: M.wise_ft({"w": Z}, {"w": Z}, 1.5), InputError,
         "alpha"),
    Case("wise_ft_trees_differ", lambda c: M.wise_ft({"w": Z}, {"v": Z}, 0.5), InputError,
         "params_1"),
    Case("output_ensemble_alpha_str", lambda c: M.output_ensemble(Z, Z, "0.5"), InputError,
         "alpha"),
    Case("output_ensemble_space", lambda c: M.output_ensemble(Z, Z, 0.5, space="prob"),
         InputError, "space"),
    Case("restrict_logits_empty", lambda c: M.restrict_logits(Z, []), InputError,
         "class_indices"),
    Case("restrict_logits_empty_int", lambda c: M.restrict_logits(Z, np.array([], np.int32)),
         InputError, "class_indices"),
    Case("restrict_logits_duplicates", lambda c: M.restrict_logits(Z, [0, 0]), InputError,
         "class_indices"),
    Case("restrict_logits_out_of_range", lambda c: M.restrict_logits(Z, [3]), InputError,
         "class_indices"),
    # --- methods: absent classes --------------------------------------------------------------
    Case("alg_gamma_one_seen_class",
         lambda c: M.alg_gamma(Z, np.zeros(4, np.int32), np.array([False, True, True])),
         InputError, "absent"),
    Case("alg_gamma_absent_labels", lambda c: M.alg_gamma(Z, Y, ABSENT), InputError, "labels"),
    Case("apply_gamma_mask_shape", lambda c: M.apply_gamma(Z, ABSENT[:2], 1.0), InputError,
         "absent"),
    Case("apply_gamma_empty_absent_set", lambda c: M.apply_gamma(Z, np.zeros(3, bool), 1.0),
         InputError, "absent"),
    Case("ausuc_no_absent_samples", lambda c: M.ausuc(Z, np.array([0, 1, 1, 0]), ABSENT),
         InputError, "labels"),
    # --- Hugging Face checkpoints: export -----------------------------------------------------
    Case("save_clip_empty_path", lambda c: _save(c, ""), InputError, "directory"),
    Case("save_clip_current_directory", lambda c: _save(c, "."), InputError,
         ("directory", "current directory")),
    Case("save_clip_parent_directory", lambda c: _save(c, ".."), InputError, "directory"),
    Case("save_clip_root", lambda c: _save(c, "/", overwrite=True), InputError, "directory"),
    Case("save_clip_over_user_files", lambda c: _save(c, c.path("export")), CheckpointError,
         ("directory", "notes.txt"), setup=_export_with_user_files),
    Case("save_clip_overwrite_keeps_user_files",
         lambda c: _save(c, c.path("export"), overwrite=True), CheckpointError,
         ("directory", "notes.txt"), setup=_export_with_user_files),
    Case("save_clip_onto_a_file", lambda c: _save(c, c.path("model.bin")), CheckpointError,
         "directory", setup=lambda c: c.files("model.bin")),
    Case("save_clip_under_a_file", lambda c: _save(c, c.path("model.bin", "export")),
         CheckpointError, ("directory", "under the file", "model.bin"),
         setup=lambda c: c.files("model.bin")),
    Case("save_clip_not_a_model", lambda c: hf.save_clip({"w": 1}, c.path("export")),
         InputError, "model"),
    Case("save_clip_non_finite_model", lambda c: hf.save_clip(_nan_model(c), c.path("export")),
         InputError, ("model", "visual_projection.weight")),
    Case("save_clip_extra_file_escapes", lambda c: _save(c, c.path("export"),
                                                         extra_files={"../x": b""}),
         InputError, "extra_files"),
    # --- Hugging Face checkpoints: load -------------------------------------------------------
    Case("load_clip_nan_weights", lambda c: _load(c.nan_checkpoint), CheckpointError,
         ("checkpoint", "vision_model.encoder.layers.1.mlp.fc1.weight")),
    Case("load_clip_image_size_0", lambda c: _load(c.checkpoint, image_size=0), InputError,
         "image_size"),
    Case("load_clip_image_size_indivisible", lambda c: _load(c.checkpoint, image_size=33),
         InputError, "image_size"),
    Case("load_clip_missing_directory", lambda c: _load(c.path("missing")), CheckpointError,
         "path_or_hub_id"),
    Case("load_clip_a_file", lambda c: _load(c.path("model.bin")), CheckpointError,
         "path_or_hub_id", setup=lambda c: c.files("model.bin")),
    Case("load_clip_no_config", lambda c: _load(c.path("ckpt")), CheckpointError,
         ("checkpoint", "config.json"), setup=lambda c: c.files("ckpt/model.safetensors")),
    Case("load_clip_truncated_weights", lambda c: _load(c.path("ckpt")), CheckpointError,
         ("checkpoint", "model.safetensors"),
         setup=lambda c: (c.files("ckpt/model.safetensors", content=b"\x08\x00\x00"),
                          c.path("ckpt/config.json").write_bytes(
                              Path(c.checkpoint, "config.json").read_bytes()))),
    # --- open_clip and OpenAI checkpoints, checkpoints of other families ----------------------
    Case("load_clip_open_clip_timm_tower", lambda c: _load(c.path("siglip")), CheckpointError,
         ("checkpoint", "vision_cfg.timm_model_name='vit_base_patch16_siglip_224' (a timm image "
          "tower)", "init_logit_bias", "open_clip itself"),
         setup=lambda c: _open_clip_config(c, "siglip", _SIGLIP_OPEN_CLIP)),
    Case("load_clip_open_clip_hf_text_encoder", lambda c: _load(c.path("roberta")),
         CheckpointError, ("checkpoint", "text_cfg.hf_model_name='roberta-base' (a transformers "
                           "text encoder)"),
         setup=lambda c: _open_clip_config(c, "roberta", _ROBERTA_OPEN_CLIP)),
    Case("load_clip_open_clip_other_normalisation", lambda c: _load(c.path("oc")),
         CheckpointError, ("checkpoint", "preprocess_cfg.mean", "0.485"),
         setup=lambda c: _open_clip_config(c, "oc", _VIT_OPEN_CLIP, preprocess_cfg={
             "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]})),
    Case("load_clip_open_clip_weights_without_config", lambda c: _load(c.path("oc")),
         CheckpointError, ("checkpoint", "open_clip_config.json", "open_clip_model.safetensors"),
         setup=lambda c: c.files("oc/open_clip_model.safetensors")),
    Case("load_clip_openai_pt_without_torch", lambda c: _without_torch(
        lambda: _load(c.path("RN50.pt"))), CheckpointError,
         ("checkpoint", "pip install torch", "RN50.pt", "timm/resnet50_clip.openai"),
         setup=lambda c: c.files("RN50.pt")),
    Case("load_clip_pt_of_another_model", lambda c: _load(c.path("resnet50.pt")),
         CheckpointError, ("checkpoint", "OpenAI CLIP", "visual.conv1.weight", "fc.weight"),
         setup=lambda c: _torch_save(c, "resnet50.pt", {"fc.weight": np.zeros((2, 3))})),
    Case("load_clip_siglip_checkpoint", lambda c: _load(c.path("siglip_hf")), CheckpointError,
         ("path_or_hub_id", "model_type 'siglip'", "glajax.load_model"),
         setup=lambda c: (c.files("siglip_hf/model.safetensors"),
                          c.path("siglip_hf/config.json").write_text(
                              '{"model_type": "siglip", "vision_config": {}, '
                              '"text_config": {}}'))),
    Case("load_clip_resnet_with_adapters", lambda c: hf.checkpoint._with_options(
        _tiny(resnet=True), adapter_dim=4, adapter_scale="learnable", remat="none",
        attention="auto", unroll=1, activation=None), ConfigError, ("adapter_dim", "ResNet")),
    Case("config_unroll_zero", lambda c: _tiny(vision_unroll=0), ConfigError,
         ("vision.unroll", "an int >= 1", "0")),
    Case("blocks_indexed", lambda c: c.shared.model.vision_model.layers[0], InputError,
         ("blocks[0]", "blocks.block(i)")),
    Case("blocks_block_out_of_range", lambda c: c.shared.model.vision_model.layers.block(2),
         InputError, ("i", "[-2, 2)")),
    Case("trainable_two_groups_in_a_stack", lambda c: _two_groups_in_a_stack(c), ConfigError,
         ("optimizer.groups", "vision_model/layers/")),
    Case("config_resnet_image_size_odd", lambda c: _tiny(resnet=True, image_size=33),
         ConfigError, "vision.image_size"),
    Case("config_resnet_image_size_16", lambda c: _tiny(resnet=True, image_size=16),
         ConfigError, "vision.image_size"),
    Case("config_resnet_three_stages", lambda c: _tiny(resnet=True, layers=(1, 1, 1)),
         ConfigError, "vision.layers"),
    Case("config_resnet_width_odd", lambda c: _tiny(resnet=True, width=7), ConfigError,
         "vision.width"),
    Case("config_resnet_heads_indivisible",
         lambda c: _tiny(resnet=True, vision_num_attention_heads=3), ConfigError,
         "vision.num_attention_heads"),
    Case("save_clip_resnet_as_transformers",
         lambda c: hf.save_clip(c.resnet, c.path("export"), format="transformers"),
         InputError, ("format", "open_clip")),
    # --- data ---------------------------------------------------------------------------------
    Case("folder_dataset_missing_root", lambda c: _folder(c, "missing"), DatasetError,
         "manual_dir"),
    Case("folder_dataset_no_class_folders", lambda c: _folder(c, "raw"), DatasetError,
         "manual_dir", setup=lambda c: c.files("raw/readme.txt")),
    Case("folder_dataset_class_folders_without_images",
         lambda c: _prepare_folder(c, "tfds"), DatasetError, ("manual_dir", "raw"),
         setup=lambda c: c.files("raw/cat/notes.txt", "raw/dog/.hidden.jpg")),
    Case("folder_dataset_undecodable_image", lambda c: _prepare_folder(c, "tfds"), DatasetError,
         ("manual_dir", "bad.jpg"),
         setup=lambda c: (_image_files(c, "raw/cat/0.jpg"), c.files("raw/dog/bad.jpg"))),
    Case("dataset_unknown_name", lambda c: registry.get("imagenet2013"), DatasetError, "name"),
    Case("split_list_bad_line", lambda c: subsample.read_split_list(c.path("list.txt")),
         DatasetError, "list.txt", setup=lambda c: c.files("list.txt", content=b"a.jpg cat\n")),
    # --- file system --------------------------------------------------------------------------
    Case("prepare_data_dir_under_a_file", lambda c: _prepare_folder(c, "blocker/tfds"),
         DatasetError, ("data_dir", "blocker"),
         setup=lambda c: (_image_files(c, "raw/cat/0.jpg"), c.files("blocker"))),
    Case("checkpointer_under_a_file", lambda c: _checkpointer(c, "blocker/checkpoints"),
         CheckpointError, ("directory", "blocker"), setup=lambda c: c.files("blocker")),
    Case("checkpointer_keep_0", lambda c: _checkpointer(c, "checkpoints", keep=0), InputError,
         "keep"),
    Case("checkpointer_one_leaf_per_block_unstackable",
         lambda c: _checkpointer(c, "checkpoints").restore_latest(
             {"layers": {"mlp": {"w": jnp.zeros((3, 3))}}}),
         CheckpointError, ("step 1", "layers/<i>", "does not stack", "start over"),
         setup=lambda c: _two_checkpoints(c, "checkpoints", {"layers": {
             "0": {"mlp": {"w": jnp.zeros(3)}}, "1": {"mlp": {"w": jnp.zeros(3)}}}})),
    Case("checkpointer_nothing_restores",
         lambda c: _checkpointer(c, "checkpoints").restore_latest({"w": jnp.zeros(4)}),
         CheckpointError, ("checkpoints", "step 1", "step 2"),
         setup=lambda c: _two_checkpoints(c, "checkpoints", {"w": jnp.zeros(3)})),
    # --- experiment configs: every check runs before the work directory is touched -----------
    *[Case(f"config_{name}", lambda c, o=override: _run(c, f"wise_ft:runlocal,{o}"), error,
           key) for name, override, error, key in (
        ("negative_learning_rate", "train.optimizer.learning_rate=-1.0", ConfigError,
         "train.optimizer.learning_rate"),
        ("alpha_above_one", "wise_ft.alphas=(0.0, 1.5)", ConfigError, "wise_ft.alphas"),
        ("alpha_a_string", "wise_ft.alphas=abc", ConfigError, "wise_ft.alphas"),
        ("batch_size_0", "train.batch_size=0", ConfigError, "train.batch_size"),
        ("accum_steps_0", "train.accum_steps=0", ConfigError, "train.accum_steps"),
        ("keep_checkpoints_0", "train.keep_checkpoints=0", ConfigError,
         "train.keep_checkpoints"),
        ("eval_batch_size_0", "data.eval_batch_size=0", ConfigError, "data.eval_batch_size"),
        ("ece_bins_0", "wise_ft.ece_bins=0", ConfigError, "wise_ft.ece_bins"),
        ("optimizer_adamx", "train.optimizer.name=adamx", ConfigError, "train.optimizer.name"),
        ("image_size_33", "data.image_size=33", ConfigError, "data.image_size"),
        ("data_image_size_0", "data.image_size=0", ConfigError, "data.image_size"),
        ("dtype_float17", "train.model.dtype=float17", ConfigError, "train.model.dtype"),
        ("unroll_0", "train.model.unroll=0", ConfigError, "train.model.unroll"),
        ("sharding_zero3", "train.sharding=zero3", ConfigError, "train.sharding"),
        ("batch_stats_eval", "train.batch_stats=eval", ConfigError, "train.batch_stats"),
        ("schedule_unknown", "train.optimizer.schedule=linear", ConfigError,
         "train.optimizer.schedule"),
        ("unknown_split", "data.test='demo_shapes_tiny@test_nope'", DatasetError, "data.test"),
        ("split_missing", "data.train='demo_shapes_tiny'", ConfigError, "data.train"),
        ("unknown_dataset", "data.train='demo_shapez_tiny@train'", DatasetError, "data.train"),
        ("unknown_key", "wise_ft.alpha=0.3", ConfigError, ("wise_ft.alpha", "did you mean")),
        ("fit_on_a_test_split", "data.train='demo_shapes_tiny@test_sketch'", ConfigError,
         "data.train"),
        ("temperature_on_a_test_split", "data.validation='demo_shapes_tiny@test_photo'",
         ConfigError, "data.validation"),
    )],
    Case("config_activation_unknown",
         lambda c: _run(c, "backdoor:runlocal,train.model.activation=swish"), ConfigError,
         ("train.model.activation", "quick_gelu")),
    Case("num_seen_all_classes", lambda c: _run(c, "absent_class:runlocal,absent_class.num_seen=100"),
         ConfigError, ("absent_class.num_seen", "from 1 to 99", "100")),
    Case("compose_num_seen_beyond_classes", lambda c: _run(
        c, "compose:runlocal,compose.num_seen=500,compose.stages=('wise_ft','gamma')"),
         ConfigError, ("compose.num_seen", "from 1 to 99", "500")),
    Case("shots_beyond_the_data", lambda c: _run(c, "gla_fewshot:runlocal,gla.shots=3"),
         ConfigError, ("gla.shots", "demo_shapes_tiny@train", "3 training + 3 validation shots")),
    Case("own_data_learning_rate_not_a_candidate", lambda c: _run(
        c, f"custom:data.folder={c.path('own')},train.optimizer.learning_rate=3e-4"),
         ConfigError, ("train.optimizer.learning_rate", "own_data.learning_rates", "0.0003"),
         setup=lambda c: _image_files(c, "own/cat/0.png", "own/cat/1.png", "own/dog/0.png",
                                      "own/dog/1.png")),
    Case("config_empty", lambda c: _run(c, ""), ConfigError, "CONFIG"),
    Case("config_unknown_file", lambda c: _run(c, "no_such_config"), ConfigError, "CONFIG"),
    Case("config_prior_on_a_test_split",
         lambda c: _run(c, "gla_longtail:runlocal,gla.prior_data='demo_shapes_tiny@test_photo'"),
         ConfigError, "gla.prior_data"),
    Case("config_absent_test_fraction_elsewhere",
         lambda c: _run(c, "absent_class:runlocal,absent_class.test_fraction=0.3"),
         ConfigError, "data.test"),
    Case("workdir_under_a_file", lambda c: _run(c, "wise_ft:runlocal", "blocker/work"),
         ConfigError, "--workdir", setup=lambda c: c.files("blocker")),
    Case("workdir_of_another_experiment", lambda c: _run(c, "wise_ft:runlocal,seed=1", "work"),
         ConfigError, ("--workdir", "fingerprint"), setup=lambda c: _claimed(c, "work")),
    Case("workdir_in_use", lambda c: _run(c, "wise_ft:runlocal", "work"), ConfigError,
         ("--workdir", f"pid {os.getpid()}"), setup=lambda c: _claimed(c, "work", lock=True)),
    # --- issue 22: refused before any work -----------------------------------------------
    Case("config_get_config_returns_a_dict", lambda c: _run(c, str(c.path("own.py"))),
         ConfigError, ("CONFIG", "own.py", "returned dict"),
         setup=lambda c: _config_file(c, "def get_config(arg=None):\n  return {}\n")),
    Case("config_get_config_without_argument", lambda c: _run(c, str(c.path("own.py"))),
         ConfigError, ("CONFIG", "own.py", "takes no argument"),
         setup=lambda c: _config_file(c, "def get_config():\n  return None\n")),
    Case("workdir_truncated_experiment_json", lambda c: _run(c, "wise_ft:runlocal", "work"),
         ConfigError, ("--workdir", "experiment.json"),
         setup=lambda c: c.files("work/experiment.json", content=b'{"fingerprint": "ab')),
    Case("workdir_experiment_json_a_list", lambda c: _run(c, "wise_ft:runlocal", "work"),
         ConfigError, ("--workdir", "experiment.json"),
         setup=lambda c: c.files("work/experiment.json", content=b"[1, 2]")),
    Case("workdir_with_wildcards", lambda c: _run(c, "wise_ft:runlocal", "a**b/work"),
         ConfigError, ("--workdir", "a**b")),
    Case("workdir_current_directory", lambda c: _run_in(c, "wise_ft:runlocal", "."),
         ConfigError, ("--workdir", "notes.txt")),
    Case("workdir_empty_string", lambda c: _run_in(c, "wise_ft:runlocal", ""), ConfigError,
         "--workdir"),
    Case("workdir_user_files", lambda c: _run(c, "wise_ft:runlocal", "mine"), ConfigError,
         ("--workdir", "thesis.tex"), setup=lambda c: c.files("mine/thesis.tex")),
    Case("config_checkpoint_without_weights",
         lambda c: _run(c, f"wise_ft:runlocal,model.checkpoints=('{c.path('ckpt')}',)"),
         CheckpointError, ("model.checkpoints", "config.json"),
         setup=lambda c: _weightless_checkpoint(c, "ckpt")),
    Case("config_batch_not_divisible_by_accum_steps",
         lambda c: _run(c, "wise_ft:runlocal,train.accum_steps=3"), ConfigError,
         ("train.batch_size", "accum_steps=3")),
    Case("config_batch_15_on_2_devices", lambda c: _with_devices(
        2, lambda: _run(c, "wise_ft:runlocal,train.batch_size=15")), ConfigError,
         ("train.batch_size", "2 devices", "15")),
    Case("config_model_parallel_3_on_2_devices", lambda c: _with_devices(
        2, lambda: _run(c, "wise_ft:runlocal,train.model_parallel=3")), ConfigError,
         ("train.model_parallel", "divisor of the 2 devices", "3")),
    Case("config_eval_batch_15_on_2_devices", lambda c: _with_devices(
        2, lambda: _run(c, "wise_ft:runlocal,data.eval_batch_size=15")), ConfigError,
         ("data.eval_batch_size", "2 devices")),
    Case("tfds_not_prepared_offline", lambda c: _offline(lambda: _run(
        c, f"wise_ft:runlocal,data.test='dtd@test',data.data_dir='{c.path('tfds')}'")),
         DatasetError, ("data.test", "dtd", "tfds build"), setup=lambda c: c.path("tfds").mkdir()),
    *[Case(f"own_data_{name}", lambda c: _run(c, f"custom:runlocal,data.folder={c.path('own')}"
                                              + suffix), error, names, setup=setup)
      for name, setup, suffix, error, names in (
          ("one_class", lambda c: _image_files(c, "own/cat/0.png", "own/cat/1.png"), "",
           DatasetError, ("data.folder", "own", "at least two classes")),
          ("empty_class_folder", lambda c: (_image_files(c, "own/cat/0.png", "own/cat/1.png"),
                                            c.path("own/dog").mkdir()), "", DatasetError,
           ("data.folder", "every class", "dog")),
          ("one_image_per_class_held_out", lambda c: _image_files(c, "own/cat/0.png",
                                                                  "own/dog/0.png"), "",
           ConfigError, ("own_data.test_fraction", "data.folder", "cat (1)")),
          ("names_equal_lowercased", lambda c: _image_files(c, "own/Cat/0.png", "own/cat/0.png"),
           "", DatasetError, ("data.folder", "'Cat', 'cat'")),
          ("names_equal_with_spaces", lambda c: _image_files(c, "own/ice_cream/0.png",
                                                             "own/ice cream/0.png"), "",
           DatasetError, ("data.folder", "ice_cream")),
          ("dangling_symlink", lambda c: (_image_files(c, "own/cat/0.png", "own/dog/0.png"),
                                          os.symlink(c.path("gone.png"), c.path("own/cat/1.png"))),
           "", DatasetError, ("data.folder", "1.png")),
          ("symlink_loop", lambda c: (_image_files(c, "own/cat/0.png", "own/dog/0.png"),
                                      os.symlink("x.png", c.path("own/dog/x.png"))),
           "", DatasetError, ("data.folder", "x.png")),
      )],
    *[Case(f"own_csv_{name}", lambda c: _run(c, f"custom:runlocal,data.folder={c.path('own.csv')}"),
           DatasetError, ("data.folder", "own.csv", found), setup=lambda c, r=rows: _csv(c, r))
      for name, rows, found in (
          ("only_test_rows", ("a.png,cat,test", "b.png,dog,test"), "only test rows"),
          ("image_in_train_and_test", ("a.png,cat,train", "b.png,dog,train", "a.png,cat,test",
                                       "b.png,dog,test"), "in several splits"),
      )],
    Case("folder_every_undecodable_image_named", lambda c: _prepare_folder(c, "tfds"),
         DatasetError, ("manual_dir", "bad.jpg", "worse.png", "2 that are not"),
         setup=lambda c: (_image_files(c, "raw/cat/0.jpg", "raw/dog/0.jpg"),
                          c.files("raw/dog/bad.jpg", "raw/cat/worse.png"))),
    Case("own_data_undecodable_images_before_any_work", lambda c: _run(
        c, f"custom:runlocal,data.folder={c.path('own')}"), DatasetError,
         ("data.folder", "bad.jpg", "worse.png", "2 that are not", "cannot identify image file"),
         setup=lambda c: (_image_files(c, "own/cat/0.png", "own/cat/1.png", "own/dog/0.png",
                                       "own/dog/1.png"),
                          c.files("own/dog/bad.jpg", "own/cat/worse.png"))),
    Case("own_data_missing_folder", lambda c: _run(
        c, f"custom:runlocal,data.folder={c.path('nowhere')}"), DatasetError,
         ("data.folder: expected an existing folder", "nowhere' (no such directory)")),
    # --- issue 22: methods that were silent or raised raw ----------------------------------
    Case("estimate_log_prior_tol_nan", lambda c: M.estimate_log_prior(Z, Y, tol=float("nan")),
         InputError, "tol"),
    Case("estimate_log_prior_max_iter_0", lambda c: M.estimate_log_prior(Z, Y, max_iter=0),
         InputError, "max_iter"),
    Case("apply_gamma_nan", lambda c: M.apply_gamma(Z, ABSENT, float("nan")), InputError,
         "gamma"),
    Case("apply_gamma_str", lambda c: M.apply_gamma(Z, ABSENT, "1"), InputError, "gamma"),
    Case("wise_ft_alpha_list", lambda c: M.wise_ft({"w": Z}, {"w": Z}, [0.5, 0.2]),
         InputError, "alpha"),
    Case("output_ensemble_alpha_list", lambda c: M.output_ensemble(Z, Z, [0.5]), InputError,
         "alpha"),
]


def _weightless_checkpoint(ctx, name):
  """A checkpoint directory with the tiny CLIP's config.json and no weights."""
  ctx.path(name).mkdir()
  ctx.path(name, "config.json").write_bytes(Path(ctx.checkpoint, "config.json").read_bytes())


def _config_file(ctx, text):
  ctx.path("own.py").write_text(text)


def _csv(ctx, rows):
  _image_files(ctx, "a.png", "b.png")
  ctx.path("own.csv").write_text("\n".join(rows) + "\n")


def _run_in(ctx, spec, workdir):
  """``run`` with ``workdir`` as given (relative to the current directory, ``ctx.cwd``)."""
  from glajax import experiments
  return experiments.run(spec, workdir)


def _with_devices(count, call):
  from unittest import mock
  with mock.patch("jax.device_count", return_value=count):
    return call()


def _offline(call):
  """``call()`` where no download host can be reached."""
  from unittest import mock
  from glajax.experiments import config
  with mock.patch.object(config, "_reachable", return_value=False):
    return call()


def _run(ctx, spec, workdir="work"):
  from glajax import experiments
  return experiments.run(spec, str(ctx.path(workdir)))


def _claimed(ctx, workdir, lock=False):
  """A work directory claimed by ``wise_ft:runlocal`` (and, with ``lock``, held by this live
  process)."""
  import json
  from glajax import experiments
  from glajax.experiments import runner
  config = experiments.load("wise_ft:runlocal")
  directory = runner.claim_workdir(config, str(ctx.path(workdir)), experiments.fingerprint(config))
  if lock:
    with open(os.path.join(directory, runner.LOCK_FILE), "w") as f:
      json.dump({"pid": os.getpid(), "command": "glajax run wise_ft:runlocal"}, f)


def _two_groups_in_a_stack(ctx):
  from flax import nnx
  from glajax.train.state import param_labels
  params = nnx.to_pure_dict(nnx.state(ctx.shared.model, nnx.Param))
  return param_labels(params, (".*",), ({"name": "last", "pattern": "vision_model/layers/1/"},))


def _two_checkpoints(ctx, directory, state):
  checkpointer = _checkpointer(ctx, directory)
  for step in (1, 2):
    checkpointer.save(step, state)
  checkpointer.close()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  return Shared(tmp_path_factory.mktemp("shared"))


# Orbax leaves un-awaited coroutines behind when a checkpoint fails to restore.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case, shared, tmp_path, monkeypatch):
  ctx = Ctx(root=tmp_path, cwd=tmp_path / "cwd", shared=shared)
  ctx.files("cwd/notes.txt", "cwd/results/report.json", content=b"the user's own")
  if case.setup is not None:
    case.setup(ctx)
  monkeypatch.chdir(ctx.cwd)
  before = _snapshot(tmp_path)
  with pytest.raises(GlajaxError) as raised:
    case.call(ctx)
  assert isinstance(raised.value, case.error), (
      f"expected {case.error.__name__}, got {type(raised.value).__name__}: {raised.value}")
  message = str(raised.value)
  for name in (case.names,) if isinstance(case.names, str) else case.names:
    assert name in message, f"{name!r} not in the message: {message}"
  assert "expected" in message, message
  assert _snapshot(tmp_path) == before, "the failing call changed files"


def test_the_table_is_large_and_ids_are_unique():
  assert len(CASES) >= 60
  assert len({case.id for case in CASES}) == len(CASES)


def test_numpy_integers_are_accepted_where_ints_are():
  """num_bins=np.int64(10) (e.g. from a config array) means 10."""
  for fn in (M.ece, M.mce, M.adaptive_ece, M.classwise_ece):
    np.testing.assert_allclose(fn(Z, Y, num_bins=np.int64(10)), fn(Z, Y, num_bins=10))
  np.testing.assert_allclose(M.ece(Z, Y, per_batch=np.int32(2)), M.ece(Z, Y, per_batch=2))
  np.testing.assert_allclose(M.fit_temperature(Z, Y, num_steps=np.int64(30)),
                             M.fit_temperature(Z, Y, num_steps=30))
  np.testing.assert_allclose(M.accuracy(Z, Y, k=np.int64(2)), M.accuracy(Z, Y, k=2))
  np.testing.assert_allclose(M.wise_ft({"w": Z}, {"w": 2 * Z}, np.float32(0.25))["w"], 1.25 * Z)
  assert _tiny(image_size=np.int64(16)).vision.image_size == 16


def test_a_csv_with_a_byte_order_mark_is_read(tmp_path):
  """Excel's "CSV UTF-8" starts with a byte-order mark: the header is still a header."""
  ctx = Ctx(root=tmp_path, cwd=tmp_path, shared=None)
  _image_files(ctx, "a.png", "b.png")
  ctx.path("own.csv").write_text("path,label\na.png,cat\nb.png,dog\n", encoding="utf-8-sig")
  info = registry.get(registry.local_name(ctx.path("own.csv")))
  assert info.classnames == ("cat", "dog")


def test_an_export_through_a_symlink_replaces_what_it_points_to(shared, tmp_path, monkeypatch):
  """Re-exporting to a link to an earlier export keeps the link and fills what it points to."""
  monkeypatch.chdir(tmp_path)
  first = _save(Ctx(tmp_path, tmp_path, shared), tmp_path / "v1")
  os.symlink("v1", tmp_path / "latest")
  assert _save(Ctx(tmp_path, tmp_path, shared), tmp_path / "latest", overwrite=True) == first
  assert os.path.islink(tmp_path / "latest")
  assert {"config.json", "model.safetensors"} <= set(os.listdir(first))
  _load(str(tmp_path / "latest"))
