"""Device mesh, batch sharding and the sharding of parameters and optimiser state.

Data parallelism is ``jax.jit`` over a ``Mesh`` of all devices with one axis, ``data``: batches are
sharded on their leading axis. Parameters, optimiser state and the rest of a model's state are
either replicated (what ``pmap`` lowers to since JAX 0.8) or fully sharded over the same axis
(``"fsdp"``, ZeRO-3: :func:`fsdp_spec` says where each array goes; a jitted step gathers them
where it computes with them). Each process feeds its own slice of the global batch; multi-host
runs call ``jax.distributed.initialize()`` first, and share one work directory: process 0 writes
the files (``is_primary``) and the others wait at a ``barrier`` where they read them.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from glajax.errors import bad_argument

DATA_AXIS = "data"
# How parameters, optimiser state and a model's other state are placed on the mesh.
SHARDINGS = ("replicated", "fsdp")
# Under "fsdp", arrays with fewer elements (biases, norms, scalars) stay replicated: their memory
# is negligible and gathering each would cost a collective.
FSDP_MIN_SIZE = 1024


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


def fsdp_spec(shape, devices: int) -> P:
  """Where ``"fsdp"`` puts an array of ``shape`` on a ``data`` axis of ``devices`` devices.

  Rule: the largest axis whose length ``devices`` divides (the first of equal ones) is split
  over ``data``; an array with no such axis, or with fewer than ``FSDP_MIN_SIZE`` elements,
  is replicated (``P()``). Each device then holds 1/``devices`` of every split array.
  """
  if int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE:
    return P()
  divisible = [(-n, axis) for axis, n in enumerate(shape) if n % devices == 0]
  if not divisible:
    return P()
  axis = min(divisible)[1]
  return P(*(DATA_AXIS if a == axis else None for a in range(axis + 1)))


def shardings(tree, mesh: Mesh, how: str = "replicated"):
  """The ``NamedSharding`` of every leaf (an array or ``jax.ShapeDtypeStruct``) of ``tree``:
  :func:`replicated`, or :func:`fsdp_spec` over the ``data`` axis when ``how`` is ``"fsdp"``."""
  if how not in SHARDINGS:
    raise bad_argument("sharding", f"one of {', '.join(SHARDINGS)}", repr(how))
  if how == "replicated":
    return jax.tree.map(lambda _: replicated(mesh), tree)
  devices = mesh.shape[DATA_AXIS]
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, devices)), tree)


def put(tree, tree_shardings):
  """Fresh global arrays of ``tree``'s host or device values, each placed as its sharding in
  ``tree_shardings`` says (works across processes: each builds its own shards)."""

  def place(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(place, tree, tree_shardings)


def to_host(tree):
  """Process-local NumPy copies of global arrays: a replicated one read from this process's
  first copy, a sharded one gathered (every process must call this)."""

  def get(x):
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return multihost_utils.process_allgather(x, tiled=True)

  return jax.tree.map(get, tree)
