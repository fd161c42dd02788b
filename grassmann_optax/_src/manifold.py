"""Geometry of G(1, n) on the columns of one array.

An array of shape ``(..., p)`` is read as the matrix ``W = x.reshape(-1, p)``: its ``p`` columns
are ``p`` points of the Grassmann manifold G(1, n), ``n = prod(shape[:-1])``, each stored as a
unit vector. Every function here acts on each column independently; norms and inner products
reduce over all axes but the last, so a Flax kernel ``[kh, kw, c_in, c_out]`` needs no reshape.

The equation labels (E1-E7) are those of the project's SPEC, which follows the per-vector
operations of Cho & Lee, "Riemannian approach to batch normalization", NeurIPS 2017
(arXiv:1709.09603), Eqs. 6-9.

All arithmetic is done in ``compute_dtype(x)`` (float32 or wider), whatever the storage dtype.
"""

import jax
import jax.numpy as jnp

# The epsilon of ``unit()`` in both original implementations (SPEC E2).
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


def column_norm(x: jax.Array) -> jax.Array:
  """(E1) per-column Euclidean norm ``‖x_j‖``, shape ``(1, ..., 1, p)``."""
  return jnp.sqrt(column_dot(x, x))


def safe_divide(num: jax.Array, den: jax.Array) -> jax.Array:
  """``num / den`` where ``den != 0``, else 0 (no NaN in either branch's gradient)."""
  nonzero = den != 0
  return jnp.where(nonzero, num / jnp.where(nonzero, den, 1), 0)


def unit(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(E2) ``unit(v) = v / (‖v‖ + ε)``, ``ε = 1e-8``, per column; returns ``(unit(x), ‖x‖)``."""
  norm = column_norm(x)
  return x / (norm + UNIT_EPS), norm


def project(y: jax.Array, g: jax.Array) -> jax.Array:
  """(E3, paper Eq. 6) tangent projection ``g − (yᵀg) y`` at the unit columns ``y``."""
  return g - column_dot(y, g) * y


def clip_by_column_norm(h: jax.Array, max_norm) -> jax.Array:
  """(E4) ``h · ν/‖h‖`` for columns with ``‖h‖ > ν``, else ``h`` (no epsilon)."""
  norm = column_norm(h)
  scale = jnp.where(norm > max_norm, safe_divide(jnp.asarray(max_norm, norm.dtype), norm), 1)
  return h * scale


def _direction(d: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``u = d/(‖d‖ + ε)`` and ``θ = ‖d‖``, as in the originals' ``gexp``/``gpt``/``gpt2``."""
  theta = column_norm(d)
  return d / (theta + UNIT_EPS), theta


def exp_map(y: jax.Array, d: jax.Array) -> jax.Array:
  """(E5, paper Eq. 7) geodesic step ``exp_y(d) = y cos θ + u sin θ``."""
  u, theta = _direction(d)
  return y * jnp.cos(theta) + u * jnp.sin(theta)


def transport_step(y: jax.Array, d: jax.Array) -> jax.Array:
  """(E6, paper Eq. 9) ``d`` transported along its own geodesic: ``θ (u cos θ − y sin θ)``."""
  u, theta = _direction(d)
  return theta * (u * jnp.cos(theta) - y * jnp.sin(theta))


def transport(y: jax.Array, a: jax.Array, d: jax.Array) -> jax.Array:
  """(E7, paper Eq. 8) tangent ``a`` transported along the geodesic of ``d``.

  ``pt_y(a; d) = a − (uᵀa) (y sin θ + u (1 − cos θ))``.
  """
  u, theta = _direction(d)
  return a - column_dot(u, a) * (y * jnp.sin(theta) + u * (1 - jnp.cos(theta)))


def transport_to(y_new: jax.Array, b: jax.Array) -> jax.Array:
  """Transport a buffer ``b`` to the point ``y_new`` that a step along ``−b`` led to.

  When the last step was ``d = −c b`` (``c > 0`` per column, as in SGD-G and Adam-G), the parallel
  transport of ``b`` along that geodesic is ``P(b) / cos θ`` with ``P(b) = b − (y'ᵀb) y'`` the
  tangent projection at the new point ``y'``. For ``θ < π/2`` this is ``‖b‖ P(b)/‖P(b)‖``, which
  needs neither the old point nor the step, so a transform can transport its own buffer at the
  start of the next update (SPEC §10). Columns with ``P(b) = 0`` transport to zero.
  """
  projected = project(y_new, b)
  return projected * safe_divide(column_norm(b), column_norm(projected))


def orthogonality_gradient(w: jax.Array, omega) -> jax.Array:
  """(SPEC R2) ``2ω (Y YᵀY − Y)`` with ``Y = unit(W)``, in the layout of ``w``."""
  y, _ = unit(w)
  matrix = y.reshape(-1, y.shape[-1])
  gram = matrix.T @ matrix
  grad = 2 * omega * (matrix @ gram - matrix)
  return grad.reshape(w.shape)
