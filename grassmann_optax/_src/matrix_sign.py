r"""Muon's orthogonalisation: the matrix sign of every point by Newton–Schulz iterations.

For a matrix ``X`` (rows > columns: its transpose), ``X₀ = X/(‖X‖_F + ε)`` and five times

.. math::
  A = X_k X_k^\top, \qquad X_{k+1} = a X_k + (b A + c A^2) X_k,

with ``(a, b, c) = (3.4445, −4.7750, 2.0315)``: the quintic of Jordan et al.'s Muon, as
:func:`optax.contrib.muon` computes it, which takes the singular values of ``X₀`` to about 1
(``U S' Vᵀ``, ``S'`` between about 0.7 and 1.2) without an SVD.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from grassmann_optax._src import checks, manifold, points, sharding, sphere

# The coefficients of optax.contrib.muon (Jordan et al.'s Muon).
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def _to_matrices(x: jax.Array, layout: points.Layout):
  """``x`` as a stack of matrices (batch axes first), and the map back to its layout.

  A point of two axes is the matrix of those axes, in the leaf's order; a point of more axes is
  the matrix of its last axis against the others (the columns of its reshape), one of one axis a
  column.
  """
  order = layout.batch + layout.point
  moved = jnp.transpose(x, order)
  batch = moved.shape[: len(layout.batch)]
  point = moved.shape[len(layout.batch) :]
  rows, cols = (math.prod(point[:-1]), point[-1]) if len(point) > 1 else (point[0], 1)
  inverse = tuple(order.index(axis) for axis in range(x.ndim))

  def back(m: jax.Array) -> jax.Array:
    return jnp.transpose(m.reshape(moved.shape), inverse)

  return moved.reshape(*batch, rows, cols), back


def newton_schulz(x: jax.Array, ns_steps, eps) -> jax.Array:
  """Newton–Schulz orthogonalisation of every matrix of ``x`` (shape ``(..., rows, cols)``).

  ``ns_steps`` may be traced (under :func:`optax.inject_hyperparams`): a loop of XLA then runs
  the iterations, in place of the unrolled ones.
  """
  tall = x.shape[-2] > x.shape[-1]
  if tall:
    x = jnp.swapaxes(x, -1, -2)
  squares = jnp.sum(x * x, axis=(-2, -1), keepdims=True)
  # Where the sum of squares overflows (elements near 1e19 in float32), the matrix is first
  # divided by its largest element: X/‖X‖ does not change, and ε is negligible at that size.
  overflow = jnp.isinf(squares) & jnp.all(jnp.isfinite(x), axis=(-2, -1), keepdims=True)
  # Both scaled by 2⁻⁶⁴ first: 1/largest near the float32 maximum would be a denormal, which
  # CPUs and accelerators flush to 0 when the division becomes a multiplication.
  tiny = jnp.asarray(2.0**-64, x.dtype)
  largest = jnp.max(jnp.abs(x), axis=(-2, -1), keepdims=True) * tiny
  x = jnp.where(overflow, (x * tiny) / jnp.where(overflow, largest, 1), x)
  squares = jnp.where(overflow, jnp.sum(x * x, axis=(-2, -1), keepdims=True), squares)
  x = x / (manifold.safe_sqrt(squares) + eps)
  a, b, c = (jnp.asarray(k, x.dtype) for k in NS_COEFFS)

  def iteration(_, x):
    gram = x @ jnp.swapaxes(x, -1, -2)
    return a * x + (b * gram + c * gram @ gram) @ x

  if isinstance(ns_steps, int):
    for step in range(ns_steps):
      x = iteration(step, x)
  else:
    x = jax.lax.fori_loop(0, ns_steps, iteration, x)
  return jnp.swapaxes(x, -1, -2) if tall else x


def matrix_sign(u: jax.Array, layout: points.Layout, ns_steps: int, eps) -> jax.Array:
  """:func:`newton_schulz` of every point of ``u``, in ``u``'s layout."""
  matrices, back = _to_matrices(u, layout)
  return back(newton_schulz(matrices, ns_steps, eps))


def check_steps(ns_steps) -> None:
  """``ns_steps`` is an integer >= 0 (a concrete one: a traced one is not checked)."""
  if isinstance(ns_steps, jax.core.Tracer):
    return
  if (
    isinstance(ns_steps, bool)
    or not isinstance(ns_steps, int | np.integer | jax.Array)
    or not jnp.issubdtype(jnp.asarray(ns_steps).dtype, jnp.integer)
    or jnp.shape(ns_steps) != ()
  ):
    raise TypeError(f'ns_steps={ns_steps!r}: expected an integer >= 0 (5 in Muon).')
  if int(ns_steps) < 0:
    raise ValueError(f'ns_steps={ns_steps!r}: expected an integer >= 0 (5 in Muon).')


def scale_by_matrix_sign(
  ns_steps: int = 5,
  *,
  eps: jax.typing.ArrayLike = 1e-8,
  point_axes: points.PointAxes = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Orthogonalises every point of the updates by Newton–Schulz, as Muon does.

  For every point ``U`` (by default the matrix of the last two axes; leading axes index stacked
  layers), with ``X₀ = U/(‖U‖_F + ε)`` (or ``Uᵀ`` where ``U`` has more rows than columns):

  .. math::
    A = X_k X_k^\top, \quad X_{k+1} = 3.4445\,X_k + (-4.7750\,A + 2.0315\,A^2)\,X_k,

  ``ns_steps`` times: the orthogonalisation of :func:`optax.contrib.muon`, whose result has the
  singular vectors of ``U`` and singular values near 1. The arithmetic is in float32 or wider;
  the updates keep their dtype. Put :func:`optax.trace` before it and
  :func:`hyperball_step` after it for MuonH (:func:`hyperball_muon` is that step with its buffer
  transported along the geodesic).

  Args:
    ns_steps: the number of Newton–Schulz iterations (5).
    eps: ε added to the Frobenius norm before the first iteration.
    point_axes: the axes of each leaf that form one point (a matrix): ``None`` (the last two
      axes), an int or a tuple of ints (a point of more than two axes is the matrix of its last
      axis against the others), a pytree of those with the paths of the updates, or a callable
      ``updates -> pytree``.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` without state; it does not need
    ``params``, and takes and ignores extra arguments (``value=``).

  Example:
    >>> import jax, jax.numpy as jnp, grassmann_optax as go
    >>> u = jax.random.normal(jax.random.key(0), (2, 16, 8))  # two stacked layers
    >>> o, _ = go.scale_by_matrix_sign().update(u, go.scale_by_matrix_sign().init(u))
    >>> s = jnp.linalg.svd(o, compute_uv=False)
    >>> bool(jnp.all((s > 0.6) & (s < 1.3)))
    True

  References:
    Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024,
    https://kellerjordan.github.io/posts/muon/.
  """
  check_steps(ns_steps)
  checks.check_hyperparameters(eps=eps)
  points.check_spec_tree(point_axes)

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    sphere.check_not_split(updates, 'scale_by_matrix_sign', 'the update of leaf')
    checks.check_real_updates(updates, 'scale_by_matrix_sign')
    for leaf_name, u in checks.named_leaves(updates):
      if jnp.ndim(u) == 0:
        raise ValueError(
          f'scale_by_matrix_sign: the update of leaf {leaf_name!r} is a scalar, which is no '
          'matrix to orthogonalise. Leave such leaves to another optimizer (optax.partition).'
        )
    layouts = sphere.resolve(updates, point_axes)
    leaves, treedef = jax.tree.flatten(updates)
    out = [
      u  # no elements: nothing to orthogonalise
      if jnp.size(u) == 0
      else matrix_sign(
        jnp.asarray(u, jnp.promote_types(u.dtype, jnp.float32)), layout, ns_steps, eps
      ).astype(u.dtype)
      for u, layout in zip(leaves, layouts, strict=True)
    ]
    return treedef.unflatten(out), state

  return optax.GradientTransformationExtraArgs(init_fn, sharding.explicit_axes_as_auto(update_fn))
