"""A tower's blocks stacked and scanned (``layers.Blocks``): the same values and gradients as the
per-block loop under every rematerialisation policy and unroll, whole-model gradients equal to
transformers' PyTorch backward pass, one block in the program whatever the depth (no loop from
``unroll`` = the depth on), checkpoint names of stacked
parameters (``checkpoints.stack`` / ``unstack``, LIFT's adapters file), trainable patterns that
select some blocks of a stack, FSDP placement of the stacks, and train checkpoints written with
one leaf per block restored stacked.
"""
import dataclasses
import functools
import gc
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from glajax import CheckpointError, ConfigError, InputError, parallel
from glajax.models import checkpoints
from glajax.models.clip import CLIP, CLIPConfig, init_clip, load_clip, save_clip
from glajax.models.clip import checkpoint as clip_checkpoint
from glajax.models.clip import params_hf as clip_params_hf
from glajax.models.layers import REMAT_POLICIES, Block, Blocks
from glajax.models.siglip import SigLIP, SiglipConfig
from glajax.models.siglip import checkpoint as siglip_checkpoint
from glajax.models.siglip import params_hf as siglip_params_hf
from glajax.train import engine
from glajax.train.checkpoint import Checkpointer
from glajax.train.state import (create_train_state, frozen_blocks, make_optimizer,
                                param_labels)
from conftest import needs_devices

POLICIES = list(REMAT_POLICIES)
RTOL, ATOL = 1e-5, 1e-6   # float32: the scan and the loop fuse their matmuls differently


def _listed_and_stacked(cfg, causal: bool, seed: int = 5):
  """(a list of ``Block`` s, ``Blocks``) built from the same ``nnx.Rngs(seed)``."""
  options = dict(causal=causal, dtype=jnp.float32, param_dtype=jnp.float32)
  stacked = Blocks(cfg, **options, rngs=nnx.Rngs(seed))
  rngs = nnx.Rngs(seed)
  return [Block(cfg, **options, rngs=rngs) for _ in range(cfg.num_hidden_layers)], stacked


def test_blocks_hold_a_list_of_blocks_stacked():
  """``Blocks`` holds the parameters a list of ``Block`` s built from the same ``rngs`` holds,
  block i at [i]; ``blocks.block(i)`` is a copy of block i; a bad index, indexing or
  iterating the stack (whose items would be copies) is an InputError."""
  cfg = CLIPConfig.tiny(adapter_dim=4, vision_num_hidden_layers=3).vision
  listed, blocks = _listed_and_stacked(cfg, causal=False)
  for i, block in enumerate(listed):
    jax.tree.map(lambda s, b: np.testing.assert_array_equal(s[i], b), nnx.state(blocks),
                 nnx.state(block))
    jax.tree.map(np.testing.assert_array_equal, nnx.state(blocks.block(i)), nnx.state(block))
  assert len(blocks) == 3 and isinstance(blocks.block(-1), Block)
  for bad in (3, -4, True):
    with pytest.raises(InputError, match=r"i: expected a block index in \[-3, 3\)"):
      blocks.block(bad)
  for refused in (lambda: blocks[0], lambda: list(blocks)):
    with pytest.raises(InputError, match=r"blocks\[0\]: expected blocks.block\(i\)"):
      refused()


@pytest.mark.parametrize("remat,unroll", [(p, 1) for p in POLICIES] + [("none", 2), ("dots", 3)])
@pytest.mark.parametrize("tower", ["clip_vision", "clip_text", "siglip_vision"])
def test_scan_equals_the_per_block_loop(tower, remat, unroll):
  """Σ sin(blocks(h)) and its gradients with respect to h and to every parameter of every
  block, under jit, float32: the scanned stack of 3 blocks (rematerialised as ``remat`` says,
  ``unroll`` blocks per iteration: a loop, a loop of 2 with 1 left over, none) equals the loop
  over a list of the same blocks without remat (rtol 1e-5, atol 1e-6)."""
  if tower == "siglip_vision":
    cfg, causal = SiglipConfig.tiny().vision, False
  else:
    cfg = getattr(CLIPConfig.tiny(adapter_dim=4, vision_num_hidden_layers=3,
                                  text_num_hidden_layers=3), tower[5:])
    causal = tower == "clip_text"
  cfg = dataclasses.replace(cfg, remat=remat, unroll=unroll)
  listed, blocks = _listed_and_stacked(cfg, causal)
  h = jnp.asarray(np.random.default_rng(0).normal(size=(2, 7, cfg.hidden_size)), jnp.float32)

  graphdef, state = nnx.split(blocks)
  scanned = jax.jit(jax.value_and_grad(
      lambda s, h: jnp.sin(nnx.merge(graphdef, s)(h)).sum(), argnums=(0, 1)))
  list_def = nnx.graphdef(listed[0])

  def loop(states, h):
    for s in states:
      h = nnx.merge(list_def, s)(h)
    return jnp.sin(h).sum()

  value, (grads, grad_h) = scanned(state, h)
  want, (want_grads, want_h) = jax.jit(jax.value_and_grad(loop, argnums=(0, 1)))(
      [nnx.state(b) for b in listed], h)
  np.testing.assert_allclose(value, want, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(grad_h, want_h, rtol=RTOL, atol=ATOL)
  stacked_want = jax.tree.map(lambda *g: jnp.stack(g), *want_grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL), grads,
               stacked_want)


def test_remat_is_in_the_scan_step():
  """The scan's body is the rematerialised block: a checkpoint inside the scan, none outside."""
  for remat in POLICIES:
    cfg = dataclasses.replace(CLIPConfig.tiny().vision, remat=remat)
    graphdef, state = nnx.split(Blocks(cfg, causal=False, dtype=jnp.float32,
                                       param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
    h = jnp.zeros((1, 5, cfg.hidden_size))
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(h))(state).jaxpr
    scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    assert len(scans) == 1 and not any("checkpoint" in e.primitive.name or "remat" in
                                       e.primitive.name for e in jaxpr.eqns)
    body = {e.primitive.name for e in scans[0].params["jaxpr"].jaxpr.eqns}
    assert any("checkpoint" in n or "remat" in n for n in body) == (remat != "none"), body


def test_the_program_holds_one_block_whatever_the_depth():
  """The gradient program of a 2-block and a 6-block CLIP has the same number of matmuls: each
  tower's blocks are one scanned block."""
  def matmuls(layers):
    model = nnx.eval_shape(lambda: CLIP(CLIPConfig.tiny(
        vision_num_hidden_layers=layers, text_num_hidden_layers=layers, vocab_size=50,
        text_eos_token_id=49), rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    images, ids = np.zeros((2, 32, 32, 3), np.float32), np.array([[3, 5, 49], [3, 49, 0]])
    loss = lambda state: jnp.sum(jnp.sin(nnx.merge(graphdef, state)(images, ids)))
    return jax.jit(jax.grad(loss)).lower(state).as_text().count("stablehlo.dot_general")

  assert matmuls(2) == matmuls(6) > 0


def test_unroll_from_the_depth_on_runs_the_blocks_without_a_loop():
  """The lowered gradient program of a CLIP whose towers have 3 blocks holds one loop per pass of
  each tower with ``unroll`` 1 and 2, none with 3 or more (``load_clip(unroll=...)`` sets both
  towers')."""
  config = CLIPConfig.tiny(vision_num_hidden_layers=3, text_num_hidden_layers=3, vocab_size=50,
                           text_eos_token_id=49)

  def program(unroll):
    model = nnx.eval_shape(lambda: CLIP(clip_checkpoint._with_options(
        config, adapter_dim=0, adapter_scale="learnable", remat="none", attention="auto",
        unroll=unroll, activation=None), rngs=nnx.Rngs(0)))
    assert model.config.vision.unroll == model.config.text.unroll == unroll
    graphdef, state = nnx.split(model)
    images, ids = np.zeros((2, 32, 32, 3), np.float32), np.array([[3, 5, 49], [3, 49, 0]])
    loss = lambda state: jnp.sum(jnp.sin(nnx.merge(graphdef, state)(images, ids)))
    text = jax.jit(jax.grad(loss)).lower(state).as_text()
    return text.count("stablehlo.while")

  assert program(1) == program(2) == 4   # forward and backward of two towers
  assert program(3) == program(5) == 0


# --- whole models against transformers' backward pass ----------------------------------------

TEXT = dict(vocab_size=50, num_hidden_layers=3, num_attention_heads=3, max_position_embeddings=9)
VISION = dict(image_size=24, patch_size=8, num_hidden_layers=3, num_attention_heads=3)


def _families():
  """name -> (transformers model class, its config, glajax from_tensors, table, config class)."""
  transformers = pytest.importorskip("transformers")
  return {
      "clip": (transformers.CLIPModel, transformers.CLIPConfig(
          text_config=dict(**TEXT, hidden_size=24, intermediate_size=40, eos_token_id=49,
                           bos_token_id=48, pad_token_id=0),
          vision_config=dict(**VISION, hidden_size=36, intermediate_size=50), projection_dim=20,
          logit_scale_init_value=1.2), clip_checkpoint.from_tensors, clip_params_hf.TABLE,
          CLIPConfig),
      "siglip": (transformers.SiglipModel, transformers.SiglipConfig(
          text_config=dict(**TEXT, hidden_size=24, intermediate_size=40, projection_size=36),
          vision_config=dict(**VISION, hidden_size=36, intermediate_size=50)),
          siglip_checkpoint.from_tensors, siglip_params_hf.TABLE, SiglipConfig),
  }


def _hf_model(family: str):
  """A tiny transformers model of ``family``, every parameter random."""
  torch = pytest.importorskip("torch")
  model_class, config, *_ = _families()[family]
  torch.manual_seed(0)
  model = model_class(config).eval()
  with torch.no_grad():
    for _, param in model.named_parameters():
      param.add_(0.1 * torch.randn_like(param))
  return model


@functools.cache
def _reference(family: str):
  """(transformers model, its gradients of Σ sin(logits_per_image) by name, inputs)."""
  torch = pytest.importorskip("torch")
  hf_model = _hf_model(family)
  config = hf_model.config
  rng = np.random.default_rng(0)
  size = config.vision_config.image_size
  images = rng.normal(size=(3, size, size, 3)).astype(np.float32)
  text = config.text_config
  ids = rng.integers(1, text.vocab_size - 2, size=(4, text.max_position_embeddings))
  ids[:, -3] = text.vocab_size - 1   # CLIP's EOS, where it pools (SigLIP: the last position)
  out = hf_model(input_ids=torch.from_numpy(ids),
                 pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
  torch.sin(out.logits_per_image).sum().backward()
  grads = {k: p.grad.numpy().copy() for k, p in hf_model.named_parameters()}
  return hf_model, grads, (images, ids)


@pytest.mark.parametrize("family, remat", [
    *(("clip", remat) for remat in POLICIES), ("siglip", "dots"),
    *(pytest.param("siglip", remat, marks=pytest.mark.slow) for remat in ("none", "block"))])
def test_gradients_equal_transformers_under_every_policy(family, remat):
  """The gradient of Σ sin(logits_per_image) with respect to every parameter, through both
  towers' scanned blocks rematerialised as ``remat`` says, under jit: transformers' backward
  pass of the same weights, by its names (float32; 1e-6 + 2e-5 of the largest gradient of each
  tensor: k_proj's bias has a gradient of 0 in theory, a few 1e-7 in float32)."""
  hf_model, want, (images, ids) = _reference(family)
  _, _, from_tensors, table, config_class = _families()[family]
  tensors = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
  config = config_class.from_hf(hf_model.config)
  config = dataclasses.replace(config,
                               vision=dataclasses.replace(config.vision, remat=remat),
                               text=dataclasses.replace(config.text, remat=remat))
  graphdef, state = nnx.split(from_tensors(config, tensors))
  loss = lambda state: jnp.sum(jnp.sin(nnx.merge(graphdef, state)(images, ids)))
  got = checkpoints.unstack({checkpoints.path_str(p): np.asarray(v.get_value()) for p, v in
                             nnx.to_flat_state(jax.jit(jax.grad(loss))(state))})
  assert len(got) == len(want)
  for key, theirs in want.items():
    path, transform = table.ours(key)
    theirs = table.transforms[transform][0](theirs)
    np.testing.assert_allclose(got[path], theirs.reshape(got[path].shape), rtol=0,
                               atol=1e-6 + 2e-5 * np.abs(theirs).max(), err_msg=key)


# --- checkpoint names -------------------------------------------------------------------------

def test_checkpoint_names_of_stacked_parameters():
  """``host_params`` names block i ``….layers.{i}.…`` (as every format does); ``stack`` is
  ``unstack``'s inverse; ``abstract`` gives the shapes by those names."""
  model = init_clip(CLIPConfig.tiny(adapter_dim=4))
  stacked = {checkpoints.path_str(p): np.asarray(v.get_value())
             for p, v in nnx.to_flat_state(nnx.state(model))}
  assert stacked["vision_model.layers.mlp.fc1.kernel"].shape == (2, 32, 64)
  named = checkpoints.host_params(model)
  assert "vision_model.layers.mlp.fc1.kernel" not in named
  np.testing.assert_array_equal(named["vision_model.layers.1.mlp.fc1.kernel"],
                                stacked["vision_model.layers.mlp.fc1.kernel"][1])
  np.testing.assert_array_equal(named["text_model.layers.0.layer_norm2.bias"],
                                stacked["text_model.layers.layer_norm2.bias"][0])
  assert set(checkpoints.unstack(stacked)) == set(named)
  back = checkpoints.stack(named, stacked)
  assert set(back) == set(stacked)
  for key, value in stacked.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  _, _, expected = checkpoints.abstract(lambda: CLIP(CLIPConfig.tiny(adapter_dim=4),
                                                     rngs=nnx.Rngs(0)))
  assert {k: v.shape for k, v in expected.items()} == {k: v.shape for k, v in named.items()}
  assert checkpoints.block_names("a/layers/mlp/w", np.zeros((2, 3))) == ["a/layers/0/mlp/w",
                                                                          "a/layers/1/mlp/w"]
  for path in ("a.layers.0.w", "a.layer1.0.w", "players.w", "logit_scale"):
    assert checkpoints.block_names(path, np.zeros((2,))) is None, path
  assert checkpoints.per_block("a/layers/0/mlp/w") and checkpoints.per_block("a.layers.1.w")
  for path in ("a/layers/mlp/w", "a.layer1.0.w", "players/0/w"):
    assert not checkpoints.per_block(path), path


def test_an_adapters_file_of_per_block_names_loads(tmp_path):
  """``glajax_adapters.safetensors`` names each block's adapter ``vision_model.layers.{i}.
  adapter.…``: one written by hand next to a transformers checkpoint loads into block i's
  slice, and ``save_clip`` writes the same names back."""
  hf_model = _hf_model("clip")
  directory = tmp_path / "clip"
  hf_model.save_pretrained(directory)
  width, bottleneck, rng = 36, 5, np.random.default_rng(3)
  shapes = {"ln.scale": (width,), "ln.bias": (width,), "down.kernel": (width, bottleneck),
            "down.bias": (bottleneck,), "up.kernel": (bottleneck, width), "up.bias": (width,),
            "scale": (1,)}
  adapters = {f"vision_model.layers.{i}.adapter.{name}": rng.normal(size=shape).astype(np.float32)
              for i in range(3) for name, shape in shapes.items()}
  save_file(adapters, os.path.join(directory, clip_checkpoint.ADAPTERS_FILE),
            metadata={"adapter_dim": str(bottleneck), "adapter_scale": "'learnable'"})
  model = load_clip(directory)
  assert model.config.vision.adapter_dim == bottleneck
  for i in range(3):
    np.testing.assert_array_equal(model.vision_model.layers.adapter.up.kernel[i],
                                  adapters[f"vision_model.layers.{i}.adapter.up.kernel"])
  save_clip(model, tmp_path / "export")
  written = load_file(tmp_path / "export" / clip_checkpoint.ADAPTERS_FILE)
  assert set(written) == set(adapters)
  for key, value in adapters.items():
    np.testing.assert_array_equal(written[key], value, err_msg=key)


# --- trainable patterns -----------------------------------------------------------------------

def _optimizer_config(trainable, **options):
  return ml_collections.ConfigDict(dict(name="adamw", learning_rate=0.1, weight_decay=0.3,
                                        schedule="constant", grad_clip_norm=0.05,
                                        trainable=trainable, **options))


def _per_block(tree):
  """A params dict with each stacked ``layers`` sub-dict as one sub-dict per block."""
  if not isinstance(tree, dict):
    return tree
  out = {}
  for key, value in tree.items():
    if key == "layers" and isinstance(value, dict):
      count = jax.tree.leaves(value)[0].shape[0]
      value = {str(i): jax.tree.map(lambda x: x[i], value) for i in range(count)}
    out[key] = _per_block(value)
  return out


def test_a_pattern_that_selects_some_blocks_trains_those_blocks_only():
  """``optimizer.trainable`` matches each block of a stack by its own name (``…/layers/{i}/…``):
  LIFT's adapters of block 1 alone, or block 1 and the head, train exactly as when the blocks
  were separate leaves (AdamW with weight decay and global-norm clipping, two steps): the frozen
  blocks' slices stay bit-identical."""
  model = init_clip(CLIPConfig.tiny(adapter_dim=4, vision_num_hidden_layers=3))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  rng = np.random.default_rng(0)
  grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)
           for _ in range(2)]
  for trainable in (("vision_model/layers/1/adapter/",),
                    ("vision_model/layers/[12]/", "^visual_projection/"),
                    ("<adapters>",)):
    labels = param_labels(params, trainable, aliases=model.param_groups())
    blocks = frozen_blocks(params, trainable, aliases=model.param_groups())
    adapters_only = trainable[0].endswith("adapter/")
    assert labels["vision_model"]["layers"]["adapter"]["up"]["kernel"] == "default"
    assert labels["text_model"]["layers"]["mlp"]["fc1"]["kernel"] == "frozen"
    assert labels["vision_model"]["layers"]["mlp"]["fc1"]["kernel"] == (
        "frozen" if trainable[0] != "vision_model/layers/[12]/" else "default")
    if trainable == ("<adapters>",):
      assert blocks == {}
    else:
      want = [True, False, adapters_only]
      np.testing.assert_array_equal(blocks["vision_model/layers/adapter/up/kernel"], want)

    def train(params, grads):
      tx, _ = make_optimizer(_optimizer_config(trainable), params, 10, model.param_groups())
      opt_state = tx.init(params)
      for g in grads:
        updates, opt_state = tx.update(g, opt_state, params)
        params = optax.apply_updates(params, updates)
      return params

    got = jax.jit(train)(params, grads)
    want = jax.jit(train)(_per_block(params), [_per_block(g) for g in grads])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 _per_block(got), want)
    before, after = (p["vision_model"]["layers"]["adapter"]["up"]["kernel"]
                     for p in (params, got))
    if blocks:
      np.testing.assert_array_equal(after[0], before[0])   # block 0: frozen, bit-identical
    assert np.abs(after[1] - before[1]).max() > 0          # block 1: trained


def test_two_groups_within_one_stack_are_refused():
  """Optimiser groups (their own learning rate or decay) need one group per stacked leaf: a
  pattern giving block 0 and block 1 of a stack different groups is a ConfigError."""
  params = nnx.to_pure_dict(nnx.state(init_clip(CLIPConfig.tiny()), nnx.Param))
  with pytest.raises(ConfigError, match=r"optimizer.groups.*\['default', 'late'\] for the "
                     r"blocks of vision_model/layers/"):
    param_labels(params, (".*",), ({"name": "late", "pattern": "vision_model/layers/1/"},))
  labels = param_labels(params, (".*",), ({"name": "tower", "pattern": "vision_model/layers/"},))
  assert labels["vision_model"]["layers"]["mlp"]["fc1"]["kernel"] == "tower"


# --- placement and train checkpoints ----------------------------------------------------------

@pytest.mark.parametrize("build", [
    CLIPConfig.vit_b16, CLIPConfig.vit_l14,
    pytest.param(SiglipConfig.so400m_p14_384, marks=pytest.mark.slow)], ids=lambda f: f.__name__)
def test_fsdp_splits_a_stack_on_a_width_axis(build):
  """``parallel.fsdp_spec`` (the largest divisible axis) splits every stacked block parameter of
  the real-size towers that it splits on a width axis, never on the layer axis, over 8 and 64
  devices."""
  config = build()
  model_class = SigLIP if isinstance(config, SiglipConfig) else CLIP
  model = nnx.eval_shape(lambda: model_class(config, rngs=nnx.Rngs(0)))
  stacks = {checkpoints.path_str(p): v.get_value().shape
            for p, v in nnx.to_flat_state(nnx.state(model))
            if ".layers." in checkpoints.path_str(p)}
  assert stacks
  for devices in (8, 64):
    for path, shape in stacks.items():
      spec = tuple(parallel.fsdp_spec(shape, devices))
      assert spec[:1] != (parallel.DATA_AXIS,), (path, shape, spec)


def _fsdp_step(layers: int):
  """(compiled FSDP train step of a width-64 tiny CLIP image tower with ``layers`` blocks,
  remat "block", on 8 devices; its stacks' shapes)."""
  config = CLIPConfig.tiny(vision_num_hidden_layers=layers, vision_hidden_size=64,
                           vision_intermediate_size=256, text_num_hidden_layers=1)
  config = dataclasses.replace(config, vision=dataclasses.replace(config.vision, remat="block"))
  model = nnx.eval_shape(lambda: CLIP(config, rngs=nnx.Rngs(0)))
  loss_fn = lambda model, batch, rng: (jnp.mean(model.encode_image(batch["image"])**2), {})
  graphdef, params, rest = engine.split_model(model)
  tx = optax.sgd(0.1)
  state = jax.eval_shape(lambda p: create_train_state(p, tx, 0, False), params)
  mesh = parallel.make_mesh()
  shardings = (parallel.shardings(state, mesh, "fsdp"), parallel.shardings(rest, mesh, "fsdp"))
  step = engine.make_train_step(graphdef, loss_fn, tx, mesh, shardings=shardings)
  abstract = lambda tree, where: jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, where)
  images = jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32)
  compiled = step.lower(abstract(state, shardings[0]), abstract(rest, shardings[1]),
                        {"image": images}).compile()
  stacks = [v.shape for v in jax.tree.leaves(nnx.state(model.vision_model.layers))]
  return compiled, stacks


@needs_devices(8)
def test_fsdp_gathers_one_block_at_a_time():
  """Under FSDP the scan gathers block i's parameters in step i, never a whole stack: the
  compiled train step (8 devices, remat "block") all-gathers no array of a stack's shape, and
  its temporaries grow by less than one block's parameters (float32) per added block."""
  (two, _), (four, stacks) = _fsdp_step(2), _fsdp_step(4)
  block_bytes = sum(int(np.prod(shape[1:])) * 4 for shape in stacks)
  gathered = set(re.findall(r"= f32\[([\d,]+)\]\{[^}]*\} all-gather\(", four.as_text()))
  assert gathered and not gathered & {",".join(map(str, shape)) for shape in stacks}, gathered
  growth = (four.memory_analysis().temp_size_in_bytes
            - two.memory_analysis().temp_size_in_bytes) / 2
  assert growth < block_bytes, (growth, block_bytes)


# Orbax leaves un-awaited coroutines behind when a checkpoint fails to restore.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("sharding", ["replicated", "fsdp"])
def test_a_train_checkpoint_with_one_leaf_per_block_resumes_stacked(tmp_path, sharding):
  """A train state written with one leaf per block (``…/layers/{i}/…``: parameters, AdamW's
  moments, the EMA teacher, the text tower frozen) restores into the stacked state, placed as
  this run's (replicated or FSDP over 8 devices): block i's leaves bit-identical at [i]."""
  model = init_clip(CLIPConfig.tiny(adapter_dim=4))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype),
                        nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  config = _optimizer_config(("<image>",))

  def state_of(params, like=None):
    tx, _ = make_optimizer(config, params, 10, model.param_groups())
    state = create_train_state(params, tx, 0, with_teacher=True)
    _, opt_state = tx.update(jax.tree.map(jnp.ones_like, params), state.opt_state, params)
    return state.replace(opt_state=opt_state, step=jnp.int32(3))

  written = state_of(_per_block(params))
  old = Checkpointer(str(tmp_path), every=1)
  kept = {f"vision_model/layers/{i}/mlp/fc1/kernel": jnp.full((32, 64), i + 1.0) for i in (0, 1)}
  old.save(3, (written, {"params": kept}))   # BestSelection's kept leaves, by flat path
  old.close()
  want = state_of(params)
  mesh = parallel.make_mesh()
  like = (jax.tree.map(jnp.zeros_like, want),
          {"params": {"vision_model/layers/mlp/fc1/kernel": jnp.zeros((2, 32, 64))}})
  like = parallel.put(like, parallel.shardings(like, mesh, sharding))
  checkpointer = Checkpointer(str(tmp_path), every=1)
  step, (got, kept) = checkpointer.restore_latest(like)
  checkpointer.close()
  assert step == 3 and jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  np.testing.assert_array_equal(kept["params"]["vision_model/layers/mlp/fc1/kernel"],
                                np.stack([np.full((32, 64), 1.0), np.full((32, 64), 2.0)]))
  for a, b in zip(jax.tree.leaves((got, kept)), jax.tree.leaves(like)):
    assert a.sharding == b.sharding
  gc.collect()   # Orbax's coroutines of the first, failed restore: collected under the filter


# Orbax leaves un-awaited coroutines behind when a checkpoint fails to restore.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_per_block_checkpoint_that_does_not_stack_is_refused(tmp_path):
  """One leaf per block for 2 blocks where this run has 3: a CheckpointError saying why, nothing
  moved."""
  old = Checkpointer(str(tmp_path), every=1)
  old.save(4, {"layers": {str(i): {"w": jnp.zeros(3)} for i in range(2)}})
  old.close()
  checkpointer = Checkpointer(str(tmp_path), every=1)
  with pytest.raises(CheckpointError, match=r"step 4: expected a train state matching this run, "
                     r"found one leaf per block .*does not stack into it.*start over"):
    checkpointer.restore_latest({"layers": {"w": jnp.zeros((3, 3))}})
  assert sorted(os.listdir(tmp_path)) == ["4"]
  checkpointer.close()
  gc.collect()
