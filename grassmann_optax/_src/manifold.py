"""Geometry of G(1, n) on the points of one array.

An array holds points of the Grassmann manifold G(1, n), each a unit vector made of its elements
along the *point axes* ``axes`` (:mod:`points`); by default all axes but the last, so that an
array of shape ``(..., p)`` holds the ``p`` columns of ``x.reshape(-1, p)``, ``n =
prod(shape[:-1])``. Every function here acts on each point independently; norms and inner
products reduce over the point axes with ``keepdims``, so no layout needs a reshape or a
transpose. The docstrings say "column" for "point" where the default layout makes them the same.

The labels (G1)-(G7) and (R2) are those of ``docs/algorithm.md``, the project's write-up of the
per-vector operations of Cho & Lee, "Riemannian approach to batch normalization", NeurIPS 2017
(arXiv:1709.09603), Eqs. 6-9, as the original implementations compute them.

All arithmetic is done in ``compute_dtype(x)`` (float32 or wider), whatever the storage dtype.
"""

import math

import jax
import jax.numpy as jnp

# The epsilon of ``unit()`` in both original implementations (G2).
UNIT_EPS = 1e-8


def compute_dtype(x: jax.Array) -> jnp.dtype:
  """The dtype in which the geometry of ``x`` is computed: ``x.dtype``, at least float32."""
  return jnp.promote_types(x.dtype, jnp.float32)


def upcast(x: jax.Array) -> jax.Array:
  return x.astype(compute_dtype(x))


def _point_axes(x: jax.Array, axes) -> tuple[int, ...]:
  return tuple(range(x.ndim - 1)) if axes is None else axes


def column_dot(a: jax.Array, b: jax.Array, axes=None) -> jax.Array:
  """Per-point inner product ``aᵀb``: shape ``(1, ..., 1, p)`` for columns, 1 on point axes."""
  return jnp.sum(a * b, axis=_point_axes(a, axes), keepdims=True)


def safe_sqrt(x: jax.Array) -> jax.Array:
  """``sqrt(x)`` for ``x >= 0``, with derivative 0 instead of infinity at 0.

  Norms of zero columns (a zero buffer, a zero gradient column) are common; with this the update
  stays differentiable there.
  """
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1)), 0)


def column_norm(x: jax.Array, axes=None) -> jax.Array:
  """(G1) per-point Euclidean norm ``‖x_j‖``, shape ``(1, ..., 1, p)`` for columns."""
  return safe_sqrt(column_dot(x, x, axes))


def column_scale(x: jax.Array, axes=None) -> tuple[jax.Array, jax.Array]:
  """Per column, a power of two ``s`` near ``max|x_j|`` where that maximum exceeds 1, else 1.

  Returns ``(s, 1/s)``, shape ``(1, ..., 1, p)``, with ``max|x_j|/s < 4``. Dividing a column by
  a power of two is exact, so ``x/s`` has the digits of ``x`` with a smaller exponent, and its
  squares and inner products cannot overflow. Non-finite columns get ``s = 1``.
  """
  peak = jnp.max(jnp.abs(jax.lax.stop_gradient(x)), axis=_point_axes(x, axes), keepdims=True)
  _, exponent = jnp.frexp(jnp.where(jnp.isfinite(peak), peak, 1))
  # 1/s must stay a normal number (XLA:CPU flushes subnormals to zero): s <= 2^(max_exp - 2).
  exponent = jnp.clip(exponent, 0, jnp.finfo(peak.dtype).maxexp - 2)
  one = jnp.ones_like(peak)
  return jnp.ldexp(one, exponent), jnp.ldexp(one, -exponent)


def rescue_overflow(x: jax.Array, sums: jax.Array, rescaled, axes=None) -> tuple[jax.Array, ...]:
  """``(1, 1, sums)``, or ``(s, 1/s, rescaled(x/s))`` if some of ``sums`` overflowed.

  ``s`` is :func:`column_scale` of ``x``; ``sums`` are column reductions of ``x`` (sums of
  squares, inner products) and ``rescaled`` computes the same reductions of a scaled copy. The
  scale is computed only when some sum is infinite (``lax.cond``), so finite sums cost one
  comparison and no extra pass over ``x``.
  """

  def scaled():
    scale, inverse = column_scale(x, axes)
    return scale, inverse, rescaled(x * inverse)

  point = _point_axes(x, axes)
  one = jnp.ones(tuple(1 if a in point else n for a, n in enumerate(x.shape)), sums.dtype)
  return jax.lax.cond(jnp.any(jnp.isinf(sums)), scaled, lambda: (one, one, sums))


def safe_divide(num: jax.Array, den: jax.Array) -> jax.Array:
  """``num / den`` where ``den != 0``, else 0 (no NaN in either branch's gradient)."""
  nonzero = den != 0
  return jnp.where(nonzero, num / jnp.where(nonzero, den, 1), 0)


def unit(x: jax.Array, axes=None) -> tuple[jax.Array, jax.Array]:
  """(G2) ``unit(v) = v / (‖v‖ + ε)``, ``ε = 1e-8``, per point; returns ``(unit(x), ‖x‖)``."""
  norm = column_norm(x, axes)
  return x / (norm + UNIT_EPS), norm


def project(y: jax.Array, g: jax.Array, axes=None) -> jax.Array:
  """(G3, paper Eq. 6) tangent projection ``g − (yᵀg) y`` at the unit columns ``y``.

  Where ``yᵀg`` would overflow, it is computed on ``g`` divided by a power of two and scaled
  back, so the result is finite wherever it fits its dtype.
  """
  inner = column_dot(y, g, axes)
  scale, _, inner = rescue_overflow(g, inner, lambda scaled: column_dot(y, scaled, axes), axes)
  return g - (inner * scale) * y


def clip_by_column_norm(h: jax.Array, max_norm, axes=None) -> jax.Array:
  """(G4) ``h · ν/‖h‖`` for columns with ``‖h‖ > ν``, else ``h`` (no epsilon).

  Columns whose sum of squares overflows are divided by a power of two before their norm is
  taken, so every finite ``h`` gets the clipped column it would get scaled down.
  """
  squares = column_dot(h, h, axes)
  scale, inverse, squares = rescue_overflow(h, squares, lambda x: column_dot(x, x, axes), axes)
  norm = safe_sqrt(squares)  # ‖h‖ / scale
  clipped = (h * inverse) * safe_divide(jnp.asarray(max_norm, norm.dtype), norm)
  return jnp.where(norm * scale > max_norm, clipped, h)


def _direction(d: jax.Array, axes=None) -> tuple[jax.Array, jax.Array]:
  """``u = d/(‖d‖ + ε)`` and ``θ = ‖d‖``, as in the originals' ``gexp``/``gpt``/``gpt2``."""
  theta = column_norm(d, axes)
  return d / (theta + UNIT_EPS), theta


def exp_map(y: jax.Array, d: jax.Array, axes=None) -> jax.Array:
  """(G5, paper Eq. 7) geodesic step ``exp_y(d) = y cos θ + u sin θ``."""
  u, theta = _direction(d, axes)
  return y * jnp.cos(theta) + u * jnp.sin(theta)


def transport_step(y: jax.Array, d: jax.Array, axes=None) -> jax.Array:
  """(G6, paper Eq. 9) ``d`` transported along its own geodesic: ``θ (u cos θ − y sin θ)``."""
  u, theta = _direction(d, axes)
  return theta * (u * jnp.cos(theta) - y * jnp.sin(theta))


def transport(y: jax.Array, a: jax.Array, d: jax.Array, axes=None) -> jax.Array:
  """(G7, paper Eq. 8) tangent ``a`` transported along the geodesic of ``d``.

  ``pt_y(a; d) = a − (uᵀa) (y sin θ + u (1 − cos θ))``.
  """
  u, theta = _direction(d, axes)
  return a - column_dot(u, a, axes) * (y * jnp.sin(theta) + u * (1 - jnp.cos(theta)))


def transport_to(y_new: jax.Array, b: jax.Array, axes=None) -> jax.Array:
  """(T1) Transport a buffer ``b`` to the point ``y_new`` that a step along ``−b`` led to.

  When the last step was ``d = −c b`` (``c > 0`` per column, as in SGD-G and Adam-G) and turned
  the column by ``θ``, the tangent projection ``P(b) = b − (y'ᵀb) y'`` at the new point ``y'``
  equals ``cos θ`` times the parallel transport of ``b``. So ``‖b‖ P(b)/‖P(b)‖`` is the parallel
  transport (G6, G7) **while θ < π/2**, up to the originals' factor ``θ/(θ + ε)``; past π/2 it
  has the wrong sign, and near π/2 it is ill-conditioned. It needs neither the old point nor the
  step, which is what lets a transform of a chain carry its own buffer (``docs/algorithm.md``,
  section 7). Columns with ``P(b) = 0`` transport to zero.
  """
  projected = project(y_new, b, axes)
  return projected * safe_divide(column_norm(b, axes), column_norm(projected, axes))


def group_matrices(x: jax.Array, axes=None) -> tuple[jax.Array, callable]:
  """``x`` as a stack of matrices ``(groups, n, p)``: one column per point, one matrix per group.

  The points of a group differ only in the last batch axis (:mod:`points`). Returns the stack
  and the function that puts such a stack back in the layout of ``x``. For the default layout
  this is ``x.reshape(1, -1, p)``, with no transpose.
  """
  point = _point_axes(x, axes)
  batch = [a for a in range(x.ndim) if a not in point]
  group_axes, last = (batch[:-1], batch[-1:]) if batch else ([], [])
  order = (*group_axes, *point, *last)
  moved = jnp.transpose(x, order) if order != tuple(range(x.ndim)) else x
  shape = moved.shape
  n_groups = math.prod(x.shape[a] for a in group_axes)
  n = math.prod(x.shape[a] for a in point)
  stack = moved.reshape(n_groups, n, -1)

  def back(stack):
    moved_back = stack.reshape(shape)
    if order == tuple(range(x.ndim)):
      return moved_back
    return jnp.transpose(moved_back, tuple(order.index(a) for a in range(x.ndim)))

  return stack, back


def orthogonality_gradient(w: jax.Array, omega, axes=None) -> jax.Array:
  """(R2) ``2ω (Y YᵀY − Y)`` with ``Y = unit(W)`` per group of points, in the layout of ``w``."""
  y, _ = unit(w, axes)
  stack, back = group_matrices(y, axes)
  gram = jnp.einsum('gnp,gnq->gpq', stack, stack)
  return back(2 * omega * (jnp.einsum('gnp,gpq->gnq', stack, gram) - stack))
