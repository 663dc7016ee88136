"""Device mesh, batch sharding and the sharding of parameters and optimiser state.

Data parallelism is ``jax.jit`` over a ``Mesh`` of all devices with axes ``data`` and ``model``
(``model`` of size 1 unless asked for): batches are sharded on their leading axis over ``data``.
Parameters, optimiser state and the rest of a model's state are either replicated (what ``pmap``
lowers to since JAX 0.8) or fully sharded over ``data`` (``"fsdp"``, ZeRO-3: :func:`fsdp_spec`
says where each array goes; a jitted step gathers them where it computes with them). A ``model``
axis of size m > 1 adds Megatron-style tensor parallelism: the arrays a model family names
(``tensor_axis``: attention heads, MLP hidden units) stay split m ways over ``model`` while they
compute, and XLA's SPMD partitioner inserts the reductions; the batch is replicated over
``model``. Each process feeds its own slice of the global batch; multi-host
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
MODEL_AXIS = "model"
# How parameters, optimiser state and a model's other state are placed on the mesh.
SHARDINGS = ("replicated", "fsdp")
# Under "fsdp", arrays with fewer elements (biases, norms, scalars) stay replicated: their memory
# is negligible and gathering each would cost a collective.
FSDP_MIN_SIZE = 1024


def make_mesh(devices=None, model: int = 1) -> Mesh:
  """A (len(devices) / model, model) mesh with axes (``data``, ``model``) over ``devices``
  (default: every device of every process); neighbouring devices share a ``model`` group."""
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise bad_argument("devices", "at least one device", "an empty list")
  if isinstance(model, bool) or not isinstance(model, (int, np.integer)) or model < 1 or len(
      devices) % model:
    raise bad_argument("model_parallel", f"a positive divisor of the {len(devices)} devices",
                       repr(model))
  return Mesh(np.asarray(devices).reshape(len(devices) // model, model), (DATA_AXIS, MODEL_AXIS))


def axis_size(mesh: Mesh, axis: str) -> int:
  """The size of ``axis`` in ``mesh``, 1 when the mesh has no such axis."""
  return dict(mesh.shape).get(axis, 1)


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


def _spec(entries) -> P:
  """``P(*entries)`` without trailing Nones (so equal placements compare equal)."""
  entries = list(entries)
  while entries and entries[-1] is None:
    entries.pop()
  return P(*entries)


def tensor_spec(shape, devices: int, axis: int | None) -> P:
  """Where tensor parallelism puts an array of ``shape`` on a ``model`` axis of ``devices``
  devices: axis ``axis`` (negative: from the end, so a stack of blocks has the same rule) split
  over ``model`` when ``devices`` > 1 divides it; else ``P()``."""
  if axis is None or devices == 1 or not shape or shape[axis] % devices:
    return P()
  axis %= len(shape)
  return _spec(MODEL_AXIS if a == axis else None for a in range(len(shape)))


def fsdp_spec(shape, devices: int, spec: P = P()) -> P:
  """Where ``"fsdp"`` puts an array of ``shape`` on a ``data`` axis of ``devices`` devices, on
  top of ``spec`` (its tensor-parallel placement, :func:`tensor_spec`).

  Rule: the largest axis that ``spec`` leaves whole and whose length ``devices`` divides (the
  first of equal ones) is split over ``data``; an array with no such axis, or with fewer than
  ``FSDP_MIN_SIZE`` elements, keeps ``spec``. Each device then holds 1/``devices`` of every
  split array (of its ``model`` shard).
  """
  entries = list(spec) + [None] * (len(shape) - len(spec))
  if int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE:
    return _spec(entries)
  divisible = [(-n, axis) for axis, n in enumerate(shape)
               if entries[axis] is None and n % devices == 0]
  if not divisible:
    return _spec(entries)
  entries[min(divisible)[1]] = DATA_AXIS
  return _spec(entries)


def shardings(tree, mesh: Mesh, how: str = "replicated", tensor_axis=None):
  """The ``NamedSharding`` of every leaf (an array or ``jax.ShapeDtypeStruct``) of ``tree``:
  :func:`replicated`, or :func:`fsdp_spec` over the ``data`` axis when ``how`` is ``"fsdp"``;
  on a ``model`` axis of size > 1, on top of :func:`tensor_spec` with the axis that
  ``tensor_axis(path)`` (the leaf's 'a/b/kernel' path; a model family's rule) names."""
  if how not in SHARDINGS:
    raise bad_argument("sharding", f"one of {', '.join(SHARDINGS)}", repr(how))
  data, model = axis_size(mesh, DATA_AXIS), axis_size(mesh, MODEL_AXIS)

  def place(path, x):
    spec = P()
    if model > 1 and tensor_axis is not None:
      spec = tensor_spec(x.shape, model, tensor_axis(key_path(path)))
    if how == "fsdp":
      spec = fsdp_spec(x.shape, data, spec)
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(place, tree)


def key_path(path) -> str:
  """'a/b/0/kernel' for the key path of a leaf of nested dicts and sequences."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


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
