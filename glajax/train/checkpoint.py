"""Orbax checkpoints of the train state: periodic, atomic, keep-last-N, resumable.

Orbax writes each step into ``<step>.orbax-checkpoint-tmp`` and renames it to ``<step>`` only once
every file is written, so a run killed mid-save leaves no half-valid step: unfinalised directories
are never listed and are removed when the next run opens the directory.
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from glajax.errors import CheckpointError, bad_argument


class Checkpointer:
  """Saves the train state every ``every`` steps (0: never), keeping the last ``keep``."""

  def __init__(self, directory: str, every: int, keep: int = 3):
    if keep < 1:
      raise bad_argument("keep", "at least 1 checkpoint to keep", keep)
    self.every = every
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(every, 1), max_to_keep=keep, create=True,
        cleanup_tmp_directories=True, enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

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
    saved = self._manager.save(step, args=ocp.args.StandardSave(state), force=force)
    self._manager.wait_until_finished()
    return saved

  def restore(self, step: int, like):
    """The state saved at ``step``, with the shapes, dtypes and shardings of the pytree ``like``."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
    try:
      return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except (FileNotFoundError, ValueError, KeyError) as e:
      raise CheckpointError(f"checkpoint step {step} in {self._manager.directory}: expected a "
                            f"train state matching this run, found an error: {e}") from e

  def close(self):
    self._manager.close()
