"""How the fused steps lay out their work for XLA: speed only, never the algorithm.

The fused steps (:mod:`steps`) make three choices for speed, each here:

1. **Stacks.** Small leaves of one shape, dtype and layout are stacked into one array, so that a
   model of hundreds of equal leaves (a Transformer's layers) compiles and runs as a few arrays,
   not hundreds; inside ``shard_map``, only leaves that vary along the same mesh axes
   (:func:`stacks`; :mod:`grassmann_optax._src.stacks` plans them and takes the leaves' pieces
   back for every transform that steps leaves).
2. **Groups.** Leaves whose per-point maths (cos, sin, clipping and transport factors, on one
   value per point) runs once for all their points, side by side: all leaves of a dtype (inside
   ``shard_map``, of a dtype and of the mesh axes their per-point values vary along, so that a
   leaf's results vary along its own axes only, as ``shard_map``'s ``out_specs`` say). Other
   backends launch one kernel after another, each with a cost. On CPU every leaf's inner
   products are then reduced before any element pass, two kernel calls at a time on two cores,
   and the passes follow. Each large leaf a group of its own instead, so that its passes could
   start as soon as its own products were done, was slower on this project's 2-core Intel
   machine: `sgdg` on WRN-28-10 took 2.15-2.19 × Nesterov SGD's update against 2.04-2.06 × so
   (two alternating runs each of ``python -m benchmarks.update --sections wrn``).
3. **Barriers and the CPU kernel.** On CPU the per-point coefficients are materialised before
   the element passes (:func:`per_point`), and the six inner products come from one pass of the
   C++ kernel (:mod:`native`) instead of six XLA reductions.

The Hyperball steps (:mod:`hyperball`) use the barriers and the kernel too, and on CPU order
their leaves one after another (:func:`after`), so that the arrays a leaf computes and reads
again need no temporary memory as large as the params.

``GRASSMANN_OPTAX_TUNING=0`` in the environment, or :func:`disabled` around the tracing, turns all
of it off: every leaf alone, no barrier, XLA's reductions. The results agree to float rounding
(sums in another order); the tests compare both.
"""

import contextlib
import os
import threading
from collections.abc import Hashable, Iterator, Sequence

import jax
import jax.numpy as jnp

ENV_SWITCH = 'GRASSMANN_OPTAX_TUNING'
# Leaves with fewer elements than this are stacked with their equals.
SMALL_LEAF = 1 << 16

_off_here = threading.local()


def switched_off(variable: str) -> bool:
  """Whether the environment variable ``variable`` says off (``0``, ``false``, ``no``, ``off``)."""
  return os.environ.get(variable, '1').strip().lower() in ('0', 'false', 'no', 'off')


def enabled() -> bool:
  """Whether the tuning applies to what is traced now, in this thread."""
  if getattr(_off_here, 'value', False):
    return False
  return not switched_off(ENV_SWITCH)


@contextlib.contextmanager
def disabled() -> Iterator[None]:
  """Functions traced inside this block use no backend tuning (for comparing and timing).

  ``jax.jit`` reuses the trace it already has of a function: build the transform anew inside
  the block, or its ``update`` keeps the tuning it was first traced with.
  """
  before = getattr(_off_here, 'value', False)
  _off_here.value = True
  try:
    yield
  finally:
    _off_here.value = before


def _cpu() -> bool:
  return jax.default_backend() == 'cpu'


def stacks(signatures: Sequence[tuple], sizes: Sequence[int]) -> list[list[int]]:
  """Which leaves are stacked into one array: equal signatures, each under ``SMALL_LEAF``.

  ``signatures`` identify a leaf's shape, dtype and layout; ``sizes`` are element counts.
  Returns lists of leaf indices, in order of first appearance; a leaf alone is a list of one.
  """
  if not enabled():
    return [[i] for i in range(len(sizes))]
  out: dict[object, list[int]] = {}
  for index, (signature, size) in enumerate(zip(signatures, sizes, strict=True)):
    key = signature if size < SMALL_LEAF else ('alone', index)
    out.setdefault(key, []).append(index)
  return list(out.values())


def groups(keys: Sequence[Hashable]) -> list[list[int]]:
  """Which arrays share one per-point computation: those of equal ``keys`` (a dtype, and inside
  ``shard_map`` the mesh axes the per-point values vary along); lists of indices (see the
  module's 2.)."""
  if not enabled():
    return [[i] for i in range(len(keys))]
  by_key: dict[Hashable, list[int]] = {}
  for index, key in enumerate(keys):
    by_key.setdefault(key, []).append(index)
  return list(by_key.values())


def _barrier(x: jax.Array) -> jax.Array:
  """``x``, through a trivial reduction that XLA:CPU keeps as a fusion boundary.

  The product of ``x`` and ones over a new axis of two: exact for every value (``x·1 = x``,
  signed zeros and NaN included), and left to XLA's own loop emitter. A sum with zeros would do
  the same, but XLA:CPU hands sum reductions to YNNPACK, whose reduction over a leading axis of
  two measured 50x slower on a (500, 64, 16) array (5.3 ms against 0.1 ms).
  """
  return jnp.prod(jnp.stack([x, jnp.ones_like(x)]), axis=0)


def per_point(*coefficients: jax.Array) -> jax.Array:
  """The per-point coefficients stacked, ``(len(coefficients), *shape)``, for the element passes.

  On CPU, XLA otherwise fuses the per-point maths into each consuming element loop and evaluates
  it again for every element, and it copies donated buffers whose last reader is not ordered
  before the in-place write. A trivial reduction is a fusion boundary that survives compilation
  (``optimization_barrier`` does not) and orders the element passes after every point's
  reduction: measured 2.3x faster updates on WRN-28-10. The coefficients are gathered by selects
  on the row index rather than stacked, which XLA:CPU compiles to fewer small fusions per leaf.
  """
  shape = jnp.broadcast_shapes(*(c.shape for c in coefficients))
  dtype = jnp.result_type(*coefficients)
  if not (enabled() and _cpu()):
    return jnp.stack([jnp.broadcast_to(c, shape).astype(dtype) for c in coefficients])
  row = jax.lax.broadcasted_iota(jnp.int32, (len(coefficients), *shape), 0)
  gathered = jnp.broadcast_to(coefficients[-1], row.shape).astype(dtype)
  for index in range(len(coefficients) - 2, -1, -1):
    gathered = jnp.where(row == index, coefficients[index], gathered)
  return _barrier(gathered)


def materialized(x: jax.Array) -> jax.Array:
  """``x``, computed once as a whole before its slices are taken (for a stack of leaves).

  Otherwise XLA fuses the computation of a stacked result into each slice that reads it and
  evaluates the whole stack again for every leaf: quadratic work and compile time in the number
  of leaves (500 leaves: 12x the compile time of ``optax.adamw``). The same trivial reduction as
  :func:`per_point` is the fusion boundary.
  """
  return _barrier(x)


def after(x: jax.Array, previous: jax.Array | None) -> jax.Array:
  """``x`` (a per-point value), computed after the scalar ``previous`` on CPU; else ``x`` as is.

  XLA:CPU schedules independent leaves side by side, so that the arrays each of them computes
  and reads again (Adam's update, the iterates of Newton–Schulz) are all alive at once, in one
  temporary buffer as large as the params that is mapped and faulted in again at every step.
  Making what produces a leaf's first such array wait on a scalar of the previous leaf (its
  per-point coefficients, known once its products are reduced) keeps about two leaves' worth
  alive. The select never takes its first branch (nothing is above infinity, not even NaN), so
  the value is ``x`` exactly.
  """
  if previous is None or not (enabled() and _cpu()):
    return x
  return jnp.where(previous > jnp.inf, jnp.zeros_like(x), x)


def use_cpu_kernel() -> bool:
  """Whether the inner products may come from the CPU kernel (where it is installed)."""
  return enabled()
