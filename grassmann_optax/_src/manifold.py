"""Geometry of the sphere G(1, n) on the points of one array, once per operation.

An array holds points of the Grassmann manifold G(1, n), each a unit vector made of its elements
along the *point axes* ``axes`` (:mod:`points`); by default all axes but the last, so that an
array of shape ``(..., p)`` holds the ``p`` columns of ``x.reshape(-1, p)``, ``n =
prod(shape[:-1])``. Every function acts on each point independently.

Each operation is written once, as per-point scalar coefficients (``*_coefficient(s)``,
functions of per-point inner products such as ``wᵀw`` and ``wᵀg``): the standalone transforms
apply them to inner products they reduce themselves, and the fused steps (:mod:`steps`) to the
inner products of one pass over the stored point, the gradient and the buffer. Norms and inner
products reduce over the point axes with ``keepdims``, so no layout needs a reshape or a
transpose.

The labels (G1)-(G5) and (R2) are those of ``docs/algorithm.md``, the project's write-up of the
per-vector operations of Cho & Lee, "Riemannian approach to batch normalization", NeurIPS 2017
(arXiv:1709.09603), Eqs. 6-9, as the original implementations compute them.

All arithmetic is done in ``compute_dtype(x)`` (float32 or wider), whatever the storage dtype.
Inside ``shard_map``, ``mesh`` names the mesh axes that split each point: per-point reductions
are all-reduced over them (:mod:`sharding`).
"""

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from grassmann_optax._src import sharding

# The epsilon of ``unit()`` in both original implementations (G2).
UNIT_EPS = 1e-8


def compute_dtype(x: jax.Array) -> jnp.dtype:
  """The dtype in which the geometry of ``x`` is computed: ``x.dtype``, at least float32."""
  return jnp.promote_types(x.dtype, jnp.float32)


def upcast(x: jax.Array) -> jax.Array:
  return x.astype(compute_dtype(x))


def _point_axes(x: jax.Array, axes) -> tuple[int, ...]:
  return tuple(range(x.ndim - 1)) if axes is None else axes


# Per-point scalars. Arguments are per-point arrays of any shape; they broadcast.


def safe_sqrt(x: jax.Array) -> jax.Array:
  """``sqrt(x)`` for ``x >= 0``, with derivative 0 instead of infinity at 0.

  Norms of zero points (a zero buffer, a zero gradient column) are common; with this the update
  stays differentiable there.
  """
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1)), 0)


def safe_divide(num: jax.Array, den: jax.Array) -> jax.Array:
  """``num / den`` where ``den != 0``, else 0 (no NaN in either branch's gradient)."""
  nonzero = den != 0
  return jnp.where(nonzero, num / jnp.where(nonzero, den, 1), 0)


def inverse_norm(ww: jax.Array) -> jax.Array:
  """(G2) ``a = 1/(‖w‖ + ε)``, so that ``unit(w) = a·w``."""
  return 1 / (safe_sqrt(ww) + UNIT_EPS)


def is_degenerate(a: jax.Array, ww: jax.Array) -> jax.Array:
  """Points shorter than the ε of (G2): ``unit(w)`` is not a direction (a zero point, say)."""
  return a * a * ww < 0.25


def tangent_coefficient(a: jax.Array, wg: jax.Array) -> jax.Array:
  """(G3) ``c`` with ``proj_y(g) = g − c·w`` at ``y = a·w``: ``c = a²·wᵀg``."""
  return a * a * wg


def tangent_norm_sq(a: jax.Array, ww: jax.Array, wg: jax.Array, gg: jax.Array) -> jax.Array:
  """(G3) ``‖g − a²(wᵀg) w‖² = gᵀg − a²(wᵀg)²(2 − a² wᵀw)``, at least 0."""
  a2 = a * a
  return jnp.maximum(gg - a2 * wg * wg * (2 - a2 * ww), 0)


def clip_coefficient(norm: jax.Array, max_norm, scale=1) -> jax.Array:
  """(G4) ``k`` with ``clip(h, ν) = k·(h/s)``: ``ν/‖h/s‖`` where ``‖h‖ > ν``, else ``s``.

  ``norm`` is ``‖h/s‖`` for a power of two ``s`` (``scale``) that keeps the sums of ``h/s``
  finite (F10); ``k`` is computed from it directly, so that it stays a normal number however
  large ``‖h‖`` is.
  """
  if max_norm is None:
    return jnp.broadcast_to(jnp.asarray(scale, norm.dtype), norm.shape)
  clipped = safe_divide(jnp.asarray(max_norm, norm.dtype), norm)
  return jnp.where(norm * scale > max_norm, clipped, scale)


def bias_correction(decay, t: jax.Array) -> jax.Array:
  """(A7), (F14) ``1 − β^t`` for the step count ``t`` (a float array, t ≥ 1), to the precision of
  ``t``'s dtype: ``−expm1(t·log β)``, with ``log β`` taken in double precision where ``β`` is a
  Python or NumPy number or a 0-d NumPy array; a JAX array (a traced ``β``) gets
  ``log1p(−(1 − β))``, whose ``1 − β`` is exact for ``β ≥ 1/2``.

  ``1 − β**t`` in float32 rounds ``β`` before the subtraction: for ``β = 0.999`` its relative
  error at ``t = 1`` is 1.3e-5, and Adam-G's step length would carry it (the PyTorch original
  computes it in double precision; the TensorFlow original keeps ``β^t`` in float32 and has this
  rounding). ``β = 0`` gives 1.
  """
  if isinstance(decay, numbers.Real | np.generic) or (
    isinstance(decay, np.ndarray) and decay.shape == ()
  ):
    if float(decay) == 0:
      return jnp.ones_like(t)
    log_decay = jnp.asarray(math.log1p(-(1 - float(decay))), t.dtype)
  else:
    decay = jnp.asarray(decay, t.dtype)
    zero = decay == 0
    # log1p(−1) = −∞ would make the derivative NaN through the unused branch of the where.
    log_decay = jnp.log1p(-(1 - jnp.where(zero, 0.5, decay)))
    return jnp.where(zero, 1, -jnp.expm1(t * log_decay)).astype(t.dtype)
  return -jnp.expm1(t * log_decay)


def geodesic_coefficients(theta: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(G5) ``(cos θ, sin θ/(θ + ε))``: ``exp_y(d) = cos θ·y + sin θ/(θ + ε)·d``, ``θ = ‖d‖``."""
  return jnp.cos(theta), jnp.sin(theta) / (theta + UNIT_EPS)


# Per-point reductions of arrays.


def column_dot(a: jax.Array, b: jax.Array, axes=None, mesh=()) -> jax.Array:
  """Per-point inner product ``aᵀb``: shape ``(1, ..., 1, p)`` for columns, 1 on point axes."""
  return sharding.psum(jnp.sum(a * b, axis=_point_axes(a, axes), keepdims=True), mesh)


def column_norm(x: jax.Array, axes=None, mesh=()) -> jax.Array:
  """(G1) per-point Euclidean norm ``‖x_j‖``, shape ``(1, ..., 1, p)`` for columns."""
  return safe_sqrt(column_dot(x, x, axes, mesh))


def column_scale(
  x: jax.Array, axes=None, mesh=(), *, small_too: bool = False
) -> tuple[jax.Array, jax.Array]:
  """Per point, a power of two ``s`` near ``max|x_j|`` where that maximum exceeds 1, else 1.

  Returns ``(s, 1/s)``, shape ``(1, ..., 1, p)``, with ``max|x_j|/s < 4``. Dividing a point by
  a power of two is exact, so ``x/s`` has the digits of ``x`` with a smaller exponent, and its
  squares and inner products cannot overflow. With ``small_too``, points whose maximum is below
  1 are scaled up the same way, so that their squares cannot underflow either. Non-finite and
  zero points get ``s = 1``.
  """
  peak = jnp.max(jnp.abs(jax.lax.stop_gradient(x)), axis=_point_axes(x, axes), keepdims=True)
  return power_of_two_near(sharding.pmax(peak, mesh), small_too=small_too)


def power_of_two_near(peak: jax.Array, *, small_too: bool = True) -> tuple[jax.Array, jax.Array]:
  """``(s, 1/s)`` elementwise: a power of two ``s`` near ``peak`` (a non-negative array) where
  ``peak`` exceeds 1, or with ``small_too`` wherever it is not 0, else 1; 1 where ``peak`` is not
  finite. ``peak/s < 4``; ``s`` and ``1/s`` stay normal numbers."""
  _, exponent = jnp.frexp(jnp.where(jnp.isfinite(peak), peak, 1))
  # s and 1/s must stay normal numbers (XLA:CPU flushes subnormals to zero).
  info = jnp.finfo(peak.dtype)
  exponent = jnp.clip(exponent, info.minexp + 2 if small_too else 0, info.maxexp - 2)
  one = jnp.ones_like(peak)
  return jnp.ldexp(one, exponent), jnp.ldexp(one, -exponent)


def large(sums: jax.Array) -> jax.Array:
  """Whether some of ``sums`` (of squares of a point) are too large for the per-point maths.

  Beyond ``2^(max_exp/2 − 4)`` the products and squares of the per-point maths (a clipping factor
  squared times a sum of squares, say) can overflow or underflow, so the sums are recomputed on
  points divided by a power of two (:func:`column_scale`). NaN is not large: a NaN point stays
  NaN however it is scaled.
  """
  limit = 2.0 ** (jnp.finfo(sums.dtype).maxexp // 2 - 4)
  return jnp.any(jnp.isinf(sums) | (sums > limit))


def rescued(x: jax.Array, squares: jax.Array, values, rescaled, axes=None, mesh=()):
  """``(1, 1, values)``, or ``(s, 1/s, rescaled(x/s))`` if some of ``squares`` are :func:`large`.

  ``s`` is :func:`column_scale` of ``x``; ``squares`` are per-point sums of squares that decide
  (``xᵀx``, or the square of an inner product), ``values`` the per-point reductions of ``x``
  wanted, and ``rescaled`` computes the same reductions of a scaled copy. The scale is computed
  only when needed (``lax.cond``), so usual sums cost one comparison and no extra pass over ``x``.
  """

  def scaled():
    scale, inverse = column_scale(x, axes, mesh)
    return sharding.like(scale, values), sharding.like(inverse, values), rescaled(x * inverse)

  point = _point_axes(x, axes)
  one = jnp.ones(tuple(1 if a in point else n for a, n in enumerate(x.shape)), squares.dtype)
  one = sharding.like(one, values)
  # Devices that split a point hold the same all-reduced sums, so they take the same branch.
  return jax.lax.cond(large(squares), scaled, lambda: (one, one, values))


# The operations on arrays, from the coefficients above.


def normalized(x: jax.Array, axes=None, mesh=()) -> jax.Array:
  """``x/‖x‖`` per point, for every finite point that is not zero, whatever its scale.

  Each point is first divided by the power of two near its largest element (:func:`column_scale`
  with ``small_too``; exact), so that its squares neither overflow (a point of norm 1e20 in
  float32) nor underflow (1e-30). A zero point stays zero (it has no direction), and a point
  holding NaN or inf is returned as it is, so that a diverged parameter stays visible instead
  of becoming a unit vector or zero.
  """
  _, inverse = column_scale(x, axes, mesh, small_too=True)
  scaled = x * inverse
  squares = column_dot(scaled, scaled, axes, mesh)
  return jnp.where(jnp.isfinite(squares), safe_divide(scaled, safe_sqrt(squares)), x)


def unit(x: jax.Array, axes=None, mesh=()) -> tuple[jax.Array, jax.Array]:
  """(G2) ``unit(v) = v / (‖v‖ + ε)``, ``ε = 1e-8``, per point; returns ``(unit(x), ‖x‖)``."""
  norm = column_norm(x, axes, mesh)
  return x / (norm + UNIT_EPS), norm


def project(w: jax.Array, g: jax.Array, axes=None, mesh=()) -> jax.Array:
  """(G3, paper Eq. 6) tangent projection ``g − (yᵀg) y`` at ``y = unit(w)``.

  Where ``wᵀg`` would overflow, it is computed on ``g`` divided by a power of two and scaled
  back, so the result is finite wherever it fits its dtype.
  """
  a = inverse_norm(column_dot(w, w, axes, mesh))
  wg = column_dot(w, g, axes, mesh)
  rescaled = lambda scaled: column_dot(w, scaled, axes, mesh)
  scale, _, wg = rescued(g, wg * wg, wg, rescaled, axes, mesh)
  return g - (tangent_coefficient(a, wg) * scale) * w


def clip_by_column_norm(h: jax.Array, max_norm, axes=None, mesh=()) -> jax.Array:
  """(G4) ``h · ν/‖h‖`` for points with ``‖h‖ > ν``, else ``h`` (no epsilon).

  Points whose sum of squares is too large are divided by a power of two before their norm is
  taken, so every finite ``h`` gets the clipped point it would get scaled down.
  """
  squares = column_dot(h, h, axes, mesh)
  rescaled = lambda x: column_dot(x, x, axes, mesh)
  scale, inverse, squares = rescued(h, squares, squares, rescaled, axes, mesh)
  norm = safe_sqrt(squares)  # ‖h‖ / scale
  return (h * inverse) * clip_coefficient(norm, max_norm, scale)


def exp_map(w: jax.Array, d: jax.Array, axes=None, radius=None, mesh=()) -> jax.Array:
  """(G5, paper Eq. 7) ``R·exp_y(d) = R·(y cos θ + d sin θ/(θ + ε))``, ``y = unit(w)``.

  ``radius`` ``R`` (per point, broadcastable, or None for 1). A point shorter than ε
  (:func:`is_degenerate`, a zero point, say) has no direction for ``y``: it moves to
  ``R·d/‖d‖``, the direction of its step, so that it is back on the sphere.
  """
  ww = column_dot(w, w, axes, mesh)
  a = inverse_norm(ww)
  theta = column_norm(d, axes, mesh)
  cos, sinc = geodesic_coefficients(theta)
  on_w, on_d = a * cos, sinc
  degenerate = is_degenerate(a, ww)
  on_w = jnp.where(degenerate, 0, on_w)
  on_d = jnp.where(degenerate, safe_divide(jnp.ones_like(theta), theta), on_d)
  if radius is not None:
    on_w, on_d = radius * on_w, radius * on_d
  return on_w * w + on_d * d


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


def orthogonality_gradient(w: jax.Array, omega, axes=None, mesh=(), members=()) -> jax.Array:
  """(R2) ``2ω (Y YᵀY − Y)`` with ``Y = unit(W)`` per group of points, in the layout of ``w``.

  Inside ``shard_map`` (P5): with each point split over ``mesh`` (rows of ``W``), ``YᵀY`` is the
  all-reduce of the local ``p × p`` Grams; with the points of a group split over ``members``
  (columns), ``Y YᵀY = (Y Yᵀ) Y`` and ``Y Yᵀ`` is the all-reduce of the local ``n × n`` ones; with
  both, the local blocks are first gathered along the cheaper of the two.
  """
  y, _ = unit(w, axes, mesh)
  stack, back = group_matrices(y, axes)
  if members and mesh:
    n, p = stack.shape[1] * sharding.axis_size(mesh), stack.shape[2] * sharding.axis_size(members)
    if n * p / sharding.axis_size(mesh) + p * p <= n * p / sharding.axis_size(members) + n * n:
      full = jax.lax.all_gather(stack, members, axis=2, tiled=True)
      gram = sharding.psum(jnp.einsum('gnp,gnq->gpq', full, full), mesh)
      return back(2 * omega * (_local_columns(full, gram, members) - stack))
    full = jax.lax.all_gather(stack, mesh, axis=1, tiled=True)
    outer = sharding.psum(jnp.einsum('gnp,gmp->gnm', full, full), members)
    return back(2 * omega * (_local_rows(outer, full, mesh) - stack))
  if members:
    outer = sharding.psum(jnp.einsum('gnp,gmp->gnm', stack, stack), members)
    return back(2 * omega * (jnp.einsum('gnm,gmp->gnp', outer, stack) - stack))
  gram = sharding.psum(jnp.einsum('gnp,gnq->gpq', stack, stack), mesh)
  return back(2 * omega * (jnp.einsum('gnp,gpq->gnq', stack, gram) - stack))


def _local_columns(full, gram, members):
  """``Y G`` for this device's columns of ``full = Y`` (gathered along ``members``)."""
  width = gram.shape[2] // sharding.axis_size(members)
  start = jax.lax.axis_index(members) * width
  local = jax.lax.dynamic_slice_in_dim(gram, start, width, axis=2)
  return jnp.einsum('gnp,gpq->gnq', full, local)


def _local_rows(outer, full, mesh):
  """``H Y`` for this device's rows, ``H = Y Yᵀ`` of ``full = Y`` (gathered along ``mesh``)."""
  height = outer.shape[1] // sharding.axis_size(mesh)
  start = jax.lax.axis_index(mesh) * height
  local = jax.lax.dynamic_slice_in_dim(outer, start, height, axis=1)
  return jnp.einsum('gnm,gmp->gnp', local, full)
