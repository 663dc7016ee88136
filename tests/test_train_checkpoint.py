"""Checkpointer.restore_latest: resume from the newest checkpoint that restores."""
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glajax import CheckpointError
from glajax.train.checkpoint import Checkpointer

# Orbax leaves un-awaited coroutines behind when a damaged checkpoint fails to restore.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

STATE = {"w": jnp.arange(64.0), "b": jnp.ones(3), "step": jnp.zeros((), jnp.int32)}


def _state(step):
  return jax.tree.map(lambda x: x + step, STATE)


def _saved(directory, steps=(1, 2, 3)):
  checkpoints = Checkpointer(str(directory), every=1, keep=5)
  for step in steps:
    checkpoints.save(step, _state(step))
  checkpoints.close()


def _damage(step_dir, how):
  data = os.path.join(step_dir, "default")
  if how == "truncated":     # a disk that filled up, or a copy that stopped halfway
    for root, _, files in os.walk(data):
      if os.path.basename(root) == "d":   # OCDBT's data files
        for name in files:
          open(os.path.join(root, name), "wb").close()
  elif how == "garbage_manifest":
    with open(os.path.join(data, "manifest.ocdbt"), "wb") as f:
      f.write(b"junk")
  elif how == "no_item":
    shutil.rmtree(data)


def test_no_checkpoint_gives_step_0(tmp_path):
  checkpoints = Checkpointer(str(tmp_path / "ckpt"), every=1)
  assert checkpoints.restore_latest(STATE) == (0, None)
  checkpoints.close()


def test_latest_restores(tmp_path):
  _saved(tmp_path / "ckpt")
  checkpoints = Checkpointer(str(tmp_path / "ckpt"), every=1, keep=5)
  step, state = checkpoints.restore_latest(STATE)
  assert step == 3
  jax.tree.map(np.testing.assert_array_equal, state, _state(3))
  checkpoints.close()


@pytest.mark.parametrize("how", ["truncated", "garbage_manifest", "no_item"])
def test_corrupted_latest_falls_back_and_says_so(tmp_path, caplog, how):
  directory = tmp_path / "ckpt"
  _saved(directory)
  _damage(str(directory / "3"), how)
  checkpoints = Checkpointer(str(directory), every=1, keep=5)
  with caplog.at_level(logging.WARNING, logger="glajax.train.checkpoint"):
    step, state = checkpoints.restore_latest(STATE)
  assert step == 2
  jax.tree.map(np.testing.assert_array_equal, state, _state(2))
  warning = caplog.text
  assert "checkpoint step 3" in warning and "resuming from step 2" in warning, warning
  # The damaged step is kept aside (nothing deleted), and step 3 can be saved again.
  aside = [name for name in os.listdir(directory) if name.startswith("corrupt-3-")]
  assert len(aside) == 1 and aside[0] in warning
  assert checkpoints.all_steps() == [1, 2]
  assert checkpoints.save(3, _state(3))
  checkpoints.close()
  again = Checkpointer(str(directory), every=1, keep=5)
  step, state = again.restore_latest(STATE)
  assert step == 3
  jax.tree.map(np.testing.assert_array_equal, state, _state(3))
  again.close()


def test_two_corrupted_steps_fall_back_to_the_third(tmp_path, caplog):
  directory = tmp_path / "ckpt"
  _saved(directory)
  _damage(str(directory / "3"), "truncated")
  _damage(str(directory / "2"), "garbage_manifest")
  checkpoints = Checkpointer(str(directory), every=1, keep=5)
  with caplog.at_level(logging.WARNING, logger="glajax.train.checkpoint"):
    step, _ = checkpoints.restore_latest(STATE)
  assert step == 1
  assert "checkpoint step 3" in caplog.text and "checkpoint step 2" in caplog.text
  checkpoints.close()


def test_nothing_restores_moves_nothing(tmp_path):
  """A state of another shape (a changed config) fails for every step: an error, no renames."""
  directory = tmp_path / "ckpt"
  _saved(directory, steps=(1, 2))
  before = sorted(os.listdir(directory))
  checkpoints = Checkpointer(str(directory), every=1, keep=5)
  other = {**STATE, "w": jnp.arange(65.0)}
  with pytest.raises(CheckpointError, match="step 2: .*step 1: "):
    checkpoints.restore_latest(other)
  assert sorted(os.listdir(directory)) == before
  checkpoints.close()


def test_checkpoint_directory_under_a_file(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(CheckpointError, match="directory: .*file"):
    Checkpointer(str(tmp_path / "file" / "ckpt"), every=1)


def test_save_on_a_broken_disk_names_the_directory(tmp_path):
  """A filesystem error while saving (here: the directory replaced by a file) is a
  CheckpointError naming the directory, not a raw OSError."""
  directory = tmp_path / "ckpt"
  checkpoints = Checkpointer(str(directory), every=1)
  shutil.rmtree(directory)
  directory.write_text("x")
  with pytest.raises(CheckpointError, match=f"directory: .*{directory}.*step 1"):
    checkpoints.save(1, _state(1))
