"""Device mesh and batch sharding.

Data parallelism is ``jax.jit`` over a ``Mesh`` of all devices with one axis, ``data``: batches are
sharded on their leading axis, parameters are replicated (what ``pmap`` lowers to since JAX 0.8).
Each process feeds its own slice of the global batch; multi-host runs call
``jax.distributed.initialize()`` first, and share one work directory: process 0 writes the files
(``is_primary``) and the others wait at a ``barrier`` where they read them.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from glajax.errors import bad_argument

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh with axis ``data`` over ``devices`` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise bad_argument("devices", "at least one device", "an empty list")
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def is_primary() -> bool:
  """Whether this process writes shared files (reports, logits, exports): process 0."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches ``barrier(name)`` (no-op in a single process), e.g. so
  that what process 0 wrote to the shared work directory is there for all."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a batch: leading axis split over ``data``."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding of parameters and optimiser state: a full copy on every device."""
  return NamedSharding(mesh, P())


def shard_batch(local_batch, mesh: Mesh):
  """Turns this process's slice (a pytree of NumPy arrays) into global arrays sharded on ``data``.

  Every leaf's leading axis must divide evenly over this process's devices in the mesh.
  """
  sharding = data_sharding(mesh)
  local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)

  def put(x):
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] % local_devices:
      raise bad_argument("batch", f"a leading axis divisible by {local_devices} local devices",
                         f"shape {x.shape}")
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree.map(put, local_batch)
