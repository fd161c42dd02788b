"""The sphere of a hyperball point: its radius, its two retractions and the transport of a buffer.

A hyperball leaf holds points, each a matrix made of the leaf's elements along its *point axes*
(:mod:`points`); by default the last two axes, so that a Dense kernel ``(in, out)`` is one point
and a stacked kernel ``(layers, in, out)`` of ``nn.scan``'ed layers is one point per layer. Each
point ``W`` stays on the sphere of radius ``R``, its Frobenius norm at ``init``. With
``y = W/‖W‖`` and a base update ``u`` (Adam's or Muon's), a step of rate ``η`` is one of two
*retractions*:

``normalize`` (Wen et al. 2025, the published AdamH/MuonH step)
  ``W' = R·Norm(y − η·u/max(‖u‖, 1e-10))``, ``Norm(x) = x/‖x‖``; with ``‖W‖ = R`` this is the
  paper's ``Norm(W − η‖W‖·u/max(‖u‖, 1e-10))·‖W‖``.

``geodesic`` (the great circle, as Cho & Lee 2017 move on G(1, n))
  ``u⊥ = u − (u·y) y``, ``d = −u⊥/‖u⊥‖``, ``θ = arctan(η·‖u⊥‖/max(‖u⊥‖, 1e-10))`` and
  ``W' = R·(cos θ·y + sin θ·d)``: the angle that ``normalize`` takes for a tangent ``u``, so that
  the two agree wherever ``u`` is tangent.

Along the geodesic a tangent vector ``m`` at ``y`` is carried to ``y'`` by the parallel transport
of the sphere, ``m + (m·d)((cos θ − 1) d − sin θ·y)``: the component along the direction of the
step turns with it, the rest is unchanged, so the norm and tangency are kept. ``normalize`` has
no transport (the published optimizers keep their buffers as they are).

Every function acts on one array and each of its points independently, in ``compute_dtype``
(float32 or wider).

References: Wen, Dang, Lyu, Ma, Liang, "Fantastic Pretraining Optimizers and Where to Find Them
2.1: Hyperball Optimization", 2025; Cho & Lee, "Riemannian approach to batch normalization",
NeurIPS 2017 (arXiv:1709.09603).
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from grassmann_optax._src import checks, manifold, points, sharding

# The floor of ‖u‖ in the published step (Levanter's and Marin's AdamH and MuonH).
MIN_UPDATE_NORM = 1e-10

RETRACTIONS = ('geodesic', 'normalize')


def matrix_axes(ndim: int) -> tuple[int, ...]:
  """The default point axes: the last two (a whole vector for a leaf of one axis)."""
  return tuple(range(max(ndim - 2, 0), ndim))


def resolve(tree: Any, point_axes: points.PointAxes) -> list[points.Layout]:
  """The layout of every leaf of ``tree``; a missing or ``None`` spec is :func:`matrix_axes`.

  ``point_axes`` is read as :mod:`points` reads it (a spec, a pytree of specs matched to the
  leaves by path, or a callable ``params -> pytree``); only the default differs.
  """
  leaves = checks.named_leaves(tree)
  point_axes = points.specs_for(tree, point_axes)
  if points.is_spec(point_axes):
    specs = [point_axes] * len(leaves)
  else:
    pairs = jax.tree_util.tree_flatten_with_path(point_axes, is_leaf=points.is_spec)[0]
    named = {checks.leaf_name(path): spec for path, spec in pairs}
    specs = [named.get(name) for name, _ in leaves]
  layouts = []
  for (name, leaf), spec in zip(leaves, specs, strict=True):
    shape = tuple(getattr(leaf, 'shape', ()))
    if spec is None and not shape:
      layouts.append(points.Layout((), ()))
      continue
    spec = matrix_axes(len(shape)) if spec is None else spec
    layouts.append(points.Layout.of(shape, spec, repr(name)))
  return layouts


def point_problem(dtype, point_size: int) -> str | None:
  """Why a leaf of this dtype, with points of ``point_size`` elements, cannot be on a sphere."""
  if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
    return (
      f'has dtype {jnp.dtype(dtype).name}; a hyperball point is a real floating-point matrix '
      '(float32, bfloat16, float64, ...)'
    )
  if point_size < 2:
    return (
      f'has points of {point_size} element along its point axes, and a sphere needs at least 2 '
      '(by default a point is the matrix of the last two axes)'
    )
  return None


def check_points(tree: Any, layouts: list[points.Layout], name: str) -> None:
  """Every leaf must be real floating-point, with points of at least 2 elements."""
  for (leaf_name, leaf), layout in zip(checks.named_leaves(tree), layouts, strict=True):
    shape = tuple(getattr(leaf, 'shape', ()))
    problem = point_problem(getattr(leaf, 'dtype', None), layout.point_size(shape))
    if problem:
      raise ValueError(
        f'{name}: leaf {leaf_name!r} of shape {shape} cannot be a hyperball point: it {problem}. '
        'Label it euclidean, or choose other point_axes.'
      )


def check_not_split(tree: Any, name: str, what: str = 'leaf') -> None:
  """Inside ``shard_map``, refuses a leaf that differs between devices (a split leaf).

  Each point's norm (and Newton–Schulz's Gram matrices) would be those of the block a device
  holds. Replicated leaves with all-reduced gradients (data parallelism) pass.
  """
  for leaf_name, leaf in checks.named_leaves(tree):
    axes = sorted(sharding.varying(leaf))
    if axes:
      raise ValueError(
        f'{name}: {what} {leaf_name!r} (local shape {tuple(leaf.shape)}) differs between devices '
        f'along the mesh axes {axes} inside shard_map. The hyperball transforms compute the '
        "norm of each point (and Newton-Schulz's Gram matrix) from the values one device holds, "
        'so a split leaf would move on the sphere of its local block. Replicate the hyperball '
        'leaves inside shard_map (split the batch, and pmean the gradients), or label this leaf '
        'euclidean.'
      )


def initial_radius(tree: Any, layouts: list[points.Layout], name: str) -> Any:
  """The Frobenius norm of every point, batch-shaped; a point of norm 0 is refused."""
  out = []
  for (leaf_name, w), layout in zip(checks.named_leaves(tree), layouts, strict=True):
    norm = norm_of(manifold.upcast(jnp.asarray(w)), layout.point)
    if not isinstance(norm, jax.core.Tracer) and not bool(jnp.all(norm > 0)):
      raise ValueError(
        f'{name}: leaf {leaf_name!r} has a point of norm 0, so it has no sphere to stay on (its '
        'radius is its norm at init). Initialise it away from zero, or label it euclidean.'
      )
    out.append(norm.reshape(layout.batch_shape(w.shape)))
  return jax.tree.unflatten(jax.tree.structure(tree), out)


def dot(a: jax.Array, b: jax.Array, axes) -> jax.Array:
  """Per-point inner product, 1 on the point axes."""
  return jnp.sum(a * b, axis=axes, keepdims=True)


def norm_of(x: jax.Array, axes) -> jax.Array:
  return manifold.safe_sqrt(dot(x, x, axes))


def unit(w: jax.Array, axes) -> jax.Array:
  """``y = w/‖w‖`` per point (a zero point stays zero)."""
  return manifold.safe_divide(w, norm_of(w, axes))


def tangent(g: jax.Array, y: jax.Array, axes) -> jax.Array:
  """``g − (g·y) y``: the component of ``g`` in the tangent space at the unit point ``y``."""
  return g - dot(g, y, axes) * y


class Move(NamedTuple):
  """One step along a great circle: from unit ``y`` in the unit direction ``d`` by ``θ``."""

  y: jax.Array
  d: jax.Array
  theta: jax.Array


def normalize_step(y, u, radius, lr, axes) -> tuple[jax.Array, None]:
  """``R·Norm(y − η·u/max(‖u‖, 1e-10))``, the published step; it transports nothing."""
  step = y - lr * u / jnp.maximum(norm_of(u, axes), MIN_UPDATE_NORM)
  return radius * manifold.safe_divide(step, norm_of(step, axes)), None


def geodesic_step(y, u, radius, lr, axes) -> tuple[jax.Array, Move]:
  """``R·(cos θ·y + sin θ·d)``, ``d = −u⊥/‖u⊥‖``, ``θ = arctan(η·‖u⊥‖/max(‖u⊥‖, 1e-10))``."""
  u_t = tangent(u, y, axes)
  n = norm_of(u_t, axes)
  d = -manifold.safe_divide(u_t, n)
  theta = jnp.arctan(lr * n / jnp.maximum(n, MIN_UPDATE_NORM))
  return radius * (jnp.cos(theta) * y + jnp.sin(theta) * d), Move(y, d, theta)


def transport(m: jax.Array, move: Move, axes) -> jax.Array:
  """Parallel transport of the tangent vector ``m`` along ``move``:
  ``m + (m·d)((cos θ − 1) d − sin θ·y)``."""
  along = dot(m, move.d, axes)
  return m + along * ((jnp.cos(move.theta) - 1) * move.d - jnp.sin(move.theta) * move.y)


class Retraction(NamedTuple):
  """How a hyperball step moves a point, and what that makes of gradients and buffers.

  ``tangent(g, y, axes)``: the gradient the moments see; ``step(y, u, radius, lr, axes)``: the
  new point and what ``transport(m, move, axes)`` needs to carry a buffer to it.
  """

  tangent: Callable
  step: Callable
  transport: Callable


_RETRACTIONS = {
  'normalize': Retraction(
    tangent=lambda g, y, axes: g,
    step=normalize_step,
    transport=lambda m, move, axes: m,
  ),
  'geodesic': Retraction(tangent=tangent, step=geodesic_step, transport=transport),
}


def retraction_of(retraction: str) -> Retraction:
  if not isinstance(retraction, str) or retraction not in _RETRACTIONS:
    raise ValueError(f'retraction={retraction!r}: expected one of {RETRACTIONS}.')
  return _RETRACTIONS[retraction]


def per_point(value: jax.Array, layout: points.Layout, shape) -> jax.Array:
  """A batch-shaped per-point value, shaped to broadcast against a leaf of ``shape``."""
  return value.reshape(layout.per_point_shape(shape))
