"""Geometry of G(1, n) on the columns of one array.

An array of shape ``(..., p)`` is read as the matrix ``W = x.reshape(-1, p)``: its ``p`` columns
are ``p`` points of the Grassmann manifold G(1, n), ``n = prod(shape[:-1])``, each stored as a
unit vector. Every function here acts on each column independently; norms and inner products
reduce over all axes but the last, so a Flax kernel ``[kh, kw, c_in, c_out]`` needs no reshape.

The labels (G1)-(G7) and (R2) are those of ``docs/algorithm.md``, the project's write-up of the
per-vector operations of Cho & Lee, "Riemannian approach to batch normalization", NeurIPS 2017
(arXiv:1709.09603), Eqs. 6-9, as the original implementations compute them.

All arithmetic is done in ``compute_dtype(x)`` (float32 or wider), whatever the storage dtype.
"""

import jax
import jax.numpy as jnp

# The epsilon of ``unit()`` in both original implementations (G2).
UNIT_EPS = 1e-8


def compute_dtype(x: jax.Array) -> jnp.dtype:
  """The dtype in which the geometry of ``x`` is computed: ``x.dtype``, at least float32."""
  return jnp.promote_types(x.dtype, jnp.float32)


def upcast(x: jax.Array) -> jax.Array:
  return x.astype(compute_dtype(x))


def _column_axes(x: jax.Array) -> tuple[int, ...]:
  return tuple(range(x.ndim - 1))


def column_dot(a: jax.Array, b: jax.Array) -> jax.Array:
  """Per-column inner product ``aᵀb``, shape ``(1, ..., 1, p)``."""
  return jnp.sum(a * b, axis=_column_axes(a), keepdims=True)


def safe_sqrt(x: jax.Array) -> jax.Array:
  """``sqrt(x)`` for ``x >= 0``, with derivative 0 instead of infinity at 0.

  Norms of zero columns (a zero buffer, a zero gradient column) are common; with this the update
  stays differentiable there.
  """
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1)), 0)


def column_norm(x: jax.Array) -> jax.Array:
  """(G1) per-column Euclidean norm ``‖x_j‖``, shape ``(1, ..., 1, p)``."""
  return safe_sqrt(column_dot(x, x))


def column_scale(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per column, a power of two ``s`` near ``max|x_j|`` where that maximum exceeds 1, else 1.

  Returns ``(s, 1/s)``, shape ``(1, ..., 1, p)``, with ``max|x_j|/s < 4``. Dividing a column by
  a power of two is exact, so ``x/s`` has the digits of ``x`` with a smaller exponent, and its
  squares and inner products cannot overflow. Non-finite columns get ``s = 1``.
  """
  peak = jnp.max(jnp.abs(jax.lax.stop_gradient(x)), axis=_column_axes(x), keepdims=True)
  _, exponent = jnp.frexp(jnp.where(jnp.isfinite(peak), peak, 1))
  # 1/s must stay a normal number (XLA:CPU flushes subnormals to zero): s <= 2^(max_exp - 2).
  exponent = jnp.clip(exponent, 0, jnp.finfo(peak.dtype).maxexp - 2)
  one = jnp.ones_like(peak)
  return jnp.ldexp(one, exponent), jnp.ldexp(one, -exponent)


def rescue_overflow(x: jax.Array, sums: jax.Array, rescaled) -> tuple[jax.Array, ...]:
  """``(1, 1, sums)``, or ``(s, 1/s, rescaled(x/s))`` if some of ``sums`` overflowed.

  ``s`` is :func:`column_scale` of ``x``; ``sums`` are column reductions of ``x`` (sums of
  squares, inner products) and ``rescaled`` computes the same reductions of a scaled copy. The
  scale is computed only when some sum is infinite (``lax.cond``), so finite sums cost one
  comparison and no extra pass over ``x``.
  """

  def scaled():
    scale, inverse = column_scale(x)
    return scale, inverse, rescaled(x * inverse)

  one = jnp.ones((1,) * (x.ndim - 1) + x.shape[-1:], sums.dtype)
  return jax.lax.cond(jnp.any(jnp.isinf(sums)), scaled, lambda: (one, one, sums))


def safe_divide(num: jax.Array, den: jax.Array) -> jax.Array:
  """``num / den`` where ``den != 0``, else 0 (no NaN in either branch's gradient)."""
  nonzero = den != 0
  return jnp.where(nonzero, num / jnp.where(nonzero, den, 1), 0)


def unit(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(G2) ``unit(v) = v / (‖v‖ + ε)``, ``ε = 1e-8``, per column; returns ``(unit(x), ‖x‖)``."""
  norm = column_norm(x)
  return x / (norm + UNIT_EPS), norm


def project(y: jax.Array, g: jax.Array) -> jax.Array:
  """(G3, paper Eq. 6) tangent projection ``g − (yᵀg) y`` at the unit columns ``y``.

  Where ``yᵀg`` would overflow, it is computed on ``g`` divided by a power of two and scaled
  back, so the result is finite wherever it fits its dtype.
  """
  scale, _, inner = rescue_overflow(g, column_dot(y, g), lambda scaled: column_dot(y, scaled))
  return g - (inner * scale) * y


def clip_by_column_norm(h: jax.Array, max_norm) -> jax.Array:
  """(G4) ``h · ν/‖h‖`` for columns with ``‖h‖ > ν``, else ``h`` (no epsilon).

  Columns whose sum of squares overflows are divided by a power of two before their norm is
  taken, so every finite ``h`` gets the clipped column it would get scaled down.
  """
  scale, inverse, squares = rescue_overflow(h, column_dot(h, h), lambda x: column_dot(x, x))
  norm = safe_sqrt(squares)  # ‖h‖ / scale
  clipped = (h * inverse) * safe_divide(jnp.asarray(max_norm, norm.dtype), norm)
  return jnp.where(norm * scale > max_norm, clipped, h)


def _direction(d: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``u = d/(‖d‖ + ε)`` and ``θ = ‖d‖``, as in the originals' ``gexp``/``gpt``/``gpt2``."""
  theta = column_norm(d)
  return d / (theta + UNIT_EPS), theta


def exp_map(y: jax.Array, d: jax.Array) -> jax.Array:
  """(G5, paper Eq. 7) geodesic step ``exp_y(d) = y cos θ + u sin θ``."""
  u, theta = _direction(d)
  return y * jnp.cos(theta) + u * jnp.sin(theta)


def transport_step(y: jax.Array, d: jax.Array) -> jax.Array:
  """(G6, paper Eq. 9) ``d`` transported along its own geodesic: ``θ (u cos θ − y sin θ)``."""
  u, theta = _direction(d)
  return theta * (u * jnp.cos(theta) - y * jnp.sin(theta))


def transport(y: jax.Array, a: jax.Array, d: jax.Array) -> jax.Array:
  """(G7, paper Eq. 8) tangent ``a`` transported along the geodesic of ``d``.

  ``pt_y(a; d) = a − (uᵀa) (y sin θ + u (1 − cos θ))``.
  """
  u, theta = _direction(d)
  return a - column_dot(u, a) * (y * jnp.sin(theta) + u * (1 - jnp.cos(theta)))


def transport_to(y_new: jax.Array, b: jax.Array) -> jax.Array:
  """(T1) Transport a buffer ``b`` to the point ``y_new`` that a step along ``−b`` led to.

  When the last step was ``d = −c b`` (``c > 0`` per column, as in SGD-G and Adam-G) and turned
  the column by ``θ``, the tangent projection ``P(b) = b − (y'ᵀb) y'`` at the new point ``y'``
  equals ``cos θ`` times the parallel transport of ``b``. So ``‖b‖ P(b)/‖P(b)‖`` is the parallel
  transport (G6, G7) **while θ < π/2**, up to the originals' factor ``θ/(θ + ε)``; past π/2 it
  has the wrong sign, and near π/2 it is ill-conditioned. It needs neither the old point nor the
  step, which is what lets a transform of a chain carry its own buffer (``docs/algorithm.md``,
  section 7). Columns with ``P(b) = 0`` transport to zero.
  """
  projected = project(y_new, b)
  return projected * safe_divide(column_norm(b), column_norm(projected))


def orthogonality_gradient(w: jax.Array, omega) -> jax.Array:
  """(R2) ``2ω (Y YᵀY − Y)`` with ``Y = unit(W)``, in the layout of ``w``."""
  y, _ = unit(w)
  matrix = y.reshape(-1, y.shape[-1])
  gram = matrix.T @ matrix
  grad = 2 * omega * (matrix @ gram - matrix)
  return grad.reshape(w.shape)
