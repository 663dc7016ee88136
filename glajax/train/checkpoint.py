"""Orbax checkpoints of the train state: periodic, atomic, keep-last-N, resumable.

Orbax writes each step into ``<step>.orbax-checkpoint-tmp`` and renames it to ``<step>`` only once
every file is written, so a run killed mid-save leaves no half-valid step: unfinalised directories
are never listed and are removed when the next run opens the directory. Arrays are written as
their shards (each process those it holds; one copy of a replicated array) and restored into the
shardings of the state they are restored into, so a checkpoint resumes on another number of
devices or under another placement (replicated or FSDP).

A tower's blocks are stacked in the train state (``models.layers.Blocks``: ``…/layers/<name>``
with a leading layer axis); a checkpoint written when they were separate leaves
(``…/layers/{i}/…``) is restored with block i's leaves as ``[i]`` of the stacked ones.
"""
from __future__ import annotations

import logging
import os
import time

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from glajax import parallel
from glajax.errors import CheckpointError, bad_argument
from glajax.models import checkpoints

_log = logging.getLogger(__name__)


def _names(tree) -> list[str]:
  """'a/b/0/c' for every leaf of ``tree`` (dict keys, sequence indices, attribute names)."""
  key = lambda k: str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
  return ["/".join(map(key, path)) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _placed(leaf, sliced: bool) -> jax.ShapeDtypeStruct:
  """``leaf``'s shape, dtype and sharding; ``sliced``: those of ``leaf[i]``."""
  sharding = leaf.sharding
  if not sliced:
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
  if isinstance(sharding, jax.sharding.NamedSharding):
    sharding = jax.sharding.NamedSharding(sharding.mesh,
                                          jax.sharding.PartitionSpec(*sharding.spec[1:]))
  return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=sharding)


def _short(error: Exception, limit: int = 300) -> str:
  """``Type: first line of the message``, cut to ``limit`` characters (TensorStore's run long)."""
  cause = error.__cause__ if isinstance(error, CheckpointError) and error.__cause__ else error
  text = f"{type(cause).__name__}: {(str(cause).splitlines() or [''])[0]}"
  return text if len(text) <= limit else text[:limit - 3] + "..."


class Checkpointer:
  """Saves the train state every ``every`` steps (0: never), keeping the last ``keep``."""

  def __init__(self, directory: str, every: int, keep: int = 3):
    if keep < 1:
      raise bad_argument("keep", "at least 1 checkpoint to keep", keep)
    self.every = every
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(every, 1), max_to_keep=keep, create=True,
        cleanup_tmp_directories=True, enable_async_checkpointing=False)
    directory = os.path.abspath(directory)
    try:
      # The handler fixes the single-item layout up front: otherwise Orbax infers it from the
      # first step it restores, and a damaged step would make every other one fail too.
      self._manager = ocp.CheckpointManager(directory, options=options,
                                            item_handlers=ocp.StandardCheckpointHandler())
    except OSError as e:  # a path under a file, a read-only or full disk
      raise bad_argument("directory", "a writable checkpoint directory",
                         f"{directory} ({type(e).__name__}: {e.strerror or e})",
                         CheckpointError) from e

  def latest_step(self) -> int | None:
    """The last finalised step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, force: bool = False) -> bool:
    """Writes ``state`` at ``step`` if it is a save step (or ``force``); True if it saved."""
    if self.every <= 0 and not force:
      return False
    if step in self._manager.all_steps():
      return False
    try:
      saved = self._manager.save(step, args=ocp.args.StandardSave(state), force=force)
      self._manager.wait_until_finished()
    except OSError as e:  # a read-only or full disk
      raise bad_argument("directory", "a writable checkpoint directory",
                         f"{self._manager.directory} ({type(e).__name__}: {e.strerror or e}) "
                         f"while saving step {step}", CheckpointError) from e
    return saved

  def restore(self, step: int, like):
    """The state saved at ``step``, with the shapes, dtypes and shardings of the pytree ``like``."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
    try:
      return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:
      saved = self._per_block_names(step, like)
      if saved is not None:
        try:
          return self._restore_stacked(step, like, saved)
        except Exception as stack_error:  # noqa: BLE001  (any mismatch: one message)
          raise CheckpointError(
              f"checkpoint step {step}: expected a train state matching this run, found one leaf "
              f"per block (…/layers/<i>/…) that does not stack into it "
              f"({_short(stack_error, 80)}); start over in another work directory") from None
      if not isinstance(e, (FileNotFoundError, ValueError, KeyError)):
        raise
      raise CheckpointError(f"checkpoint step {step} in {self._manager.directory}: expected a "
                            f"train state matching this run, found an error: {e}") from e

  def _per_block_names(self, step: int, like) -> list[str] | None:
    """The leaf names of step ``step`` when it holds a tower's blocks as separate leaves
    (``…/layers/{i}/…``) where ``like`` has none, else None."""
    try:
      saved = _names(self._manager.item_metadata(step).tree)
    except Exception:  # noqa: BLE001  (no readable metadata: a damaged step, said elsewhere)
      return None
    if any(map(checkpoints.per_block, saved)) and not any(map(checkpoints.per_block,
                                                                _names(like))):
      return saved
    return None

  def _restore_stacked(self, step: int, like, saved: list[str]):
    """Step ``step`` written with one leaf per block, restored into ``like``'s stacked leaves:
    block i's ``…/layers/{i}/<name>`` is ``[i]`` of ``…/layers/<name>`` (``checkpoints.
    block_names``), every other leaf as it is; placed as ``like`` is."""
    leaves, treedef = jax.tree_util.tree_flatten(like)
    wanted = {}   # saved name -> ShapeDtypeStruct (one block's, or a whole leaf's)
    for name, leaf in zip(_names(like), leaves):
      blocks = checkpoints.block_names(name, leaf)
      for block in blocks or [name]:
        wanted[block] = _placed(leaf, sliced=blocks is not None)
    if sorted(wanted) != sorted(saved):
      missing, extra = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
      raise ValueError(f"missing {missing[:3]}, unexpected {extra[:3]}")
    metadata = self._manager.item_metadata(step).tree
    target = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(metadata),
                                          [wanted[n] for n in _names(metadata)])
    restored = dict(zip(_names(metadata), jax.tree_util.tree_leaves(
        self._manager.restore(step, args=ocp.args.StandardRestore(target)))))
    out = []
    for name, leaf in zip(_names(like), leaves):
      blocks = checkpoints.block_names(name, leaf)
      out.append(restored[name] if blocks is None else jax.device_put(
          jnp.stack([restored[b] for b in blocks]), leaf.sharding))
    _log.warning("checkpoint step %d in %s holds one leaf per block: restored with each tower's "
                 "blocks stacked", step, self._manager.directory)
    return jax.tree_util.tree_unflatten(treedef, out)

  def restore_latest(self, like):
    """``(step, state)`` of the newest checkpoint that restores, or ``(0, None)`` if none exists.

    A newer checkpoint that fails to restore (damaged files) while an older one restores is
    set aside (renamed ``corrupt-<step>-<time>``, never deleted) with a warning naming it and
    the error, so that training redoes and saves that step again. When no checkpoint restores
    (e.g. the run's config changed the state's shapes), a CheckpointError lists every step and
    why, and nothing is moved.
    """
    failures = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state = self.restore(step, like)
      except Exception as e:  # Orbax and TensorStore raise many types for damaged files
        failures.append((step, _short(e)))
        continue
      for bad, reason in failures:
        self._set_aside(bad, reason, step)
      return step, state
    if failures:
      raise CheckpointError(
          f"checkpoints in {self._manager.directory}: expected one that restores into this run's "
          f"train state, found none ({'; '.join(f'step {s}: {r}' for s, r in failures)}); "
          "move them away (or use another work directory) to start over")
    return 0, None

  def _set_aside(self, step: int, reason: str, fallback: int) -> None:
    directory = os.fspath(self._manager.directory)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = os.path.join(directory, f"corrupt-{step}-{stamp}")
    if parallel.is_primary():  # one process renames; the others wait for it
      for n in range(1, 1000):
        if not os.path.exists(aside):
          break
        aside = os.path.join(directory, f"corrupt-{step}-{stamp}-{n}")
      try:
        os.rename(os.path.join(directory, str(step)), aside)
      except OSError as e:
        raise bad_argument("checkpoint", f"a movable damaged checkpoint step {step}",
                           f"{directory} ({type(e).__name__}: {e.strerror or e})",
                           CheckpointError) from e
    parallel.barrier(f"glajax set aside checkpoint {step}")
    self._manager.reload()
    _log.warning("checkpoint step %d in %s does not restore (%s): skipped, resuming from step "
                 "%d; the damaged checkpoint is kept as %s", step, directory, reason, fallback,
                 aside)

  def close(self):
    self._manager.close()
