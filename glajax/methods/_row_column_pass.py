"""A row reduction and the column reduction that needs it, over one (N, C) matrix E:

    t = E u  (N,),   c = Eᵀ φ(t)  (C,),   φ(t) = 1/t  or  r ∘ t.

The prior solvers are made of these (``priors._Factored``): the gradient is t = E w, p̄ ∝ w ∘
Eᵀ(1/t); a Hessian-vector product is t = E(w∘v), Eᵀ(t/s²). E is ~200 MB at 50 000 × 1 000, so
each read of it is what a solve costs.

* ``"xla"``: two reductions, so two reads of E (the column reduction needs all of t).
* ``"pallas"``: one read. A Pallas kernel (Triton on a GPU) walks a block of rows a few rows at a
  time: the rows' t, then φ(t) times those rows added into the block's (C,) column sums, while
  the rows are in registers. The blocks' column sums, (N/128, C), are then added by XLA (~1 % of
  E). It needs E padded to a multiple of 128 rows and a power-of-two number of columns (zeros:
  a zero column adds nothing to t, a zero row has t = 0 and φ(0) is taken as 0). Off a GPU the
  kernel runs in Pallas' interpreter: exact, slow, for tests.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

IMPLEMENTATIONS = ("xla", "pallas")
BLOCK_ROWS = 128          # rows per Pallas program: its (C,) column sums are one output row
MAX_PALLAS_COLUMNS = 8192  # a few rows of E and the (C,) sums stay in one program's registers


class Matrix(NamedTuple):
  """E as the implementation reads it (padded for ``"pallas"``) and its own (N, C)."""
  values: jax.Array
  shape: tuple[int, int]
  implementation: str

  @property
  def reads_per_pass(self) -> int:
    """Reads of E in one ``row_column_pass``: one for ``"pallas"``, two for ``"xla"``."""
    return 1 if self.implementation == "pallas" else 2


def prepare(exp_z: jax.Array, implementation: str) -> Matrix:
  """E laid out for ``implementation``: as is for ``"xla"``; for ``"pallas"`` with zero rows up
  to a multiple of ``BLOCK_ROWS`` and zero columns up to a power of two (≥ 16)."""
  num_rows, num_columns = exp_z.shape
  if implementation == "pallas":
    shape = (-(-num_rows // BLOCK_ROWS) * BLOCK_ROWS, max(16, pl.next_power_of_2(num_columns)))
    exp_z = _pad(exp_z, shape)
  return Matrix(exp_z, (num_rows, num_columns), implementation)


def row_column_pass(matrix: Matrix, u, row_scale=None, *, reciprocal: bool):
  """(t, c): t = E u (N,), c = Eᵀ φ(t) (C,), φ(t) = 1/t (``reciprocal``) or ``row_scale`` ∘ t
  (``row_scale``: (N,)). Float32; one read of E for ``"pallas"``, two for ``"xla"``."""
  if matrix.implementation == "xla":
    t = jnp.sum(matrix.values * u, axis=-1)
    phi = 1.0 / t if reciprocal else row_scale * t
    return t, jnp.sum(matrix.values * phi[:, None], axis=0)
  (num_rows, num_columns), (padded_rows, padded_columns) = matrix.shape, matrix.values.shape
  row_scale = (jnp.zeros((padded_rows,), jnp.float32) if reciprocal
               else _pad(row_scale, (padded_rows,)))   # zero rows: t = 0, φ = 0
  t, c = _pallas_pass(matrix.values, _pad(u, (padded_columns,)), row_scale,
                      reciprocal=reciprocal, interpret=jax.default_backend() != "gpu")
  return t[:num_rows], c[:num_columns]


def _pad(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  return jnp.pad(x, [(0, want - have) for have, want in zip(x.shape, shape)])


@functools.partial(jax.jit, static_argnames=("reciprocal", "interpret"))
def _pallas_pass(exp_z, u, row_scale, *, reciprocal, interpret):
  num_rows, num_columns = exp_z.shape
  rows_per_step = max(1, min(16, 8192 // num_columns))   # 8 × 1024 floats: 32 per thread

  def kernel(e_ref, u_ref, r_ref, t_ref, c_ref):
    weights = u_ref[...]

    def step(j, column_sums):
      rows = pl.ds(pl.multiple_of(j * rows_per_step, rows_per_step), rows_per_step)
      block = e_ref[rows, :]
      t = jnp.sum(block * weights[None, :], axis=1)
      t_ref[rows] = t
      phi = jnp.where(t > 0, 1.0 / t, 0.0) if reciprocal else r_ref[rows] * t
      return column_sums + jnp.sum(block * phi[:, None], axis=0)

    c_ref[...] = jax.lax.fori_loop(0, BLOCK_ROWS // rows_per_step, step,
                                   jnp.zeros((num_columns,), jnp.float32))[None, :]

  blocks = num_rows // BLOCK_ROWS
  t, block_sums = pl.pallas_call(
      kernel, grid=(blocks,),
      in_specs=[pl.BlockSpec((BLOCK_ROWS, num_columns), lambda i: (i, 0)),
                pl.BlockSpec((num_columns,), lambda i: (0,)),
                pl.BlockSpec((BLOCK_ROWS,), lambda i: (i,))],
      out_specs=[pl.BlockSpec((BLOCK_ROWS,), lambda i: (i,)),
                 pl.BlockSpec((1, num_columns), lambda i: (i, 0))],
      out_shape=[jax.ShapeDtypeStruct((num_rows,), jnp.float32),
                 jax.ShapeDtypeStruct((blocks, num_columns), jnp.float32)],
      compiler_params=pl_triton.CompilerParams(num_warps=8, num_stages=3),
      interpret=interpret, name="prior_row_column_pass")(exp_z, u, row_scale)
  return t, jnp.sum(block_sums, axis=0)
