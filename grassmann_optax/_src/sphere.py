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
(float32 or wider). A step is computed as :mod:`steps` computes SGD-G and Adam-G: the new point
``W' = on_w·W + on_u·u`` and the transported buffer ``m + on_u·u + on_w·W`` are combinations of
the arrays with per-point coefficients, which follow from the per-point inner products
``W·W, W·u, u·u, W·m, u·m`` (:func:`normalize_step`, :func:`geodesic_step`). So a step reads the
arrays once to reduce the products (:func:`products`: one pass of the CPU kernel of
:mod:`native`; ``'geodesic'`` first reduces ``W·W`` and ``W·g`` for the tangent part of the
gradient) and once more to write each result, and the trigonometry runs once per point. Norms
of such combinations come from the products (``‖u⊥‖² = u·u − 2p·W·u + p²·W·W``), exact to
round-off, which is relative to ``‖u‖²``: an update almost along ``W`` (``‖u⊥‖ ≪ ‖u‖``) has
its direction ``d`` known less precisely, as in :mod:`steps`.

References: Wen, Dang, Lyu, Ma, Liang, "Fantastic Pretraining Optimizers and Where to Find Them
2.1: Hyperball Optimization", 2025; Cho & Lee, "Riemannian approach to batch normalization",
NeurIPS 2017 (arXiv:1709.09603).
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from grassmann_optax._src import checks, manifold, native, points, sharding, tuning

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
  return points.resolve(tree, point_axes, default=matrix_axes)


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
  """The Frobenius norm of every point, batch-shaped; a point of norm 0, or of a norm outside
  ``checks.RADIUS_RANGE``, is refused."""
  out = []
  for (leaf_name, w), layout in zip(checks.named_leaves(tree), layouts, strict=True):
    norm = norm_of(manifold.upcast(jnp.asarray(w)), layout.point)
    advice = 'It has no sphere to stay on: initialise it away from zero, or label it euclidean.'
    checks.check_initial_norms(norm, w, leaf_name, name, advice, checks.HYPERBALL_RADIUS)
    out.append(norm.reshape(layout.batch_shape(w.shape)))
  return jax.tree.unflatten(jax.tree.structure(tree), out)


def norm_of(x: jax.Array, axes) -> jax.Array:
  """Per-point Euclidean norm, 1 on the point axes."""
  return manifold.column_norm(x, axes)


def products(w: jax.Array, u: jax.Array, m: jax.Array, axes, *, allow_kernel: bool = True):
  """``(w·w, w·u, u·u, w·m, u·m, m·m)`` per point, 1 on the point axes, from one read of each.

  On CPU the three arrays are read once by the kernel of :mod:`native` (where ``allow_kernel``,
  the tuning is on and the arrays are float32); otherwise XLA reduces the products that are used
  (a GPU fuses sibling reductions into one pass). Pass the same array twice where fewer are
  needed: ``products(w, g, g, axes)[:2]`` is ``(w·w, w·g)`` from one read of ``w`` and ``g``.
  """
  return native.column_products(
    w, u, m, point_axes=axes, allow_kernel=allow_kernel and tuning.use_cpu_kernel()
  )


def _inverse(x: jax.Array) -> jax.Array:
  return manifold.safe_divide(jnp.ones_like(x), x)


def radial_coefficient(ww: jax.Array, wg: jax.Array) -> jax.Array:
  """``c`` of ``g − (g·y) y = g − c·w``, ``y = w/‖w‖``: ``c = w·g/‖w‖²`` (0 for a zero point)."""
  return _inverse(ww) * wg


class Transport(NamedTuple):
  """The parallel transport ``m ↦ m + (m·d)((cos θ − 1) d − sin θ·y)`` along a geodesic step,
  per point, on the arrays: ``m·d = d_u·(u·m) + d_w·(w·m)`` and ``(cos θ − 1) d − sin θ·y =
  k_u·u + k_w·w``."""

  d_u: jax.Array
  d_w: jax.Array
  k_u: jax.Array
  k_w: jax.Array

  def coefficients(self, wm: jax.Array, um: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(on_u, on_w)`` of the transported ``m = m + on_u·u + on_w·w``."""
    along = self.d_u * um + self.d_w * wm
    return along * self.k_u, along * self.k_w


def normalize_step(ww, wu, uu, radius, lr) -> tuple[tuple[jax.Array, jax.Array], None]:
  """``R·Norm(y − η·u/max(‖u‖, 1e-10))`` as ``on_w·w + on_u·u``; it transports nothing.

  Per point, from ``w·w``, ``w·u`` and ``u·u``: ``y = a·w`` with ``a = 1/‖w‖``, ``s = η/max(‖u‖,
  1e-10)``, ``‖y − s·u‖² = a²·w·w − 2as·w·u + s²·u·u`` and ``k = R/‖y − s·u‖`` (0 for a zero
  step), so ``W' = ka·w − ks·u``. A point whose products are not finite (a NaN in ``u``) gets NaN
  coefficients, as the published step divides by its NaN norm: its whole update is NaN.

  Where the step is longer than the point (``s·‖u‖ > 1``: a rate ``η > 1``), ``a`` and ``s`` are
  first divided by ``m = s·‖u‖``, which leaves ``W'`` as it is and keeps ``s²·u·u`` finite: at
  ``η = 2e19`` it would overflow float32, and the point would go to the origin.
  """
  a = _inverse(manifold.safe_sqrt(ww))
  s = lr / jnp.maximum(manifold.safe_sqrt(uu), MIN_UPDATE_NORM)
  m = jnp.maximum(jnp.abs(s) * manifold.safe_sqrt(uu), 1)
  a, s = a / m, s / m
  step_sq = jnp.maximum(a * a * ww - 2 * a * s * wu + s * s * uu, 0)
  k = manifold.safe_divide(radius, manifold.safe_sqrt(step_sq))
  # safe_sqrt maps NaN to 0, and k would be 0: the point would move to the origin.
  k = jnp.where(jnp.isnan(step_sq), jnp.nan, k)
  return (k * a, -k * s), None


def geodesic_step(ww, wu, uu, radius, lr) -> tuple[tuple[jax.Array, jax.Array], Transport]:
  """``R·(cos θ·y + sin θ·d)`` as ``on_w·w + on_u·u``, and the :class:`Transport` of the step.

  Per point, from ``w·w``, ``w·u`` and ``u·u``: ``y = a·w``, ``a = 1/‖w‖``; ``u⊥ = u − p·w`` with
  ``p = a²·w·u``, ``‖u⊥‖² = u·u − 2p·w·u + p²·w·w``; ``d = −u⊥/‖u⊥‖ = d_u·u + d_w·w`` with
  ``d_u = −1/‖u⊥‖``, ``d_w = p/‖u⊥‖`` (0 where ``u⊥ = 0``); ``θ = arctan(η·‖u⊥‖/max(‖u⊥‖,
  1e-10))``.
  """
  a = _inverse(manifold.safe_sqrt(ww))
  p = a * a * wu
  n = manifold.safe_sqrt(jnp.maximum(uu - 2 * p * wu + p * p * ww, 0))
  inverse_n = _inverse(n)
  d_u, d_w = -inverse_n, inverse_n * p
  theta = jnp.arctan(lr * n / jnp.maximum(n, MIN_UPDATE_NORM))
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  on = (radius * (cos * a + sin * d_w), radius * sin * d_u)
  return on, Transport(d_u, d_w, (cos - 1) * d_u, (cos - 1) * d_w - sin * a)


_STEPS = {'normalize': normalize_step, 'geodesic': geodesic_step}


def retraction_of(retraction: str) -> Callable:
  """The step function of ``retraction`` (:func:`normalize_step` or :func:`geodesic_step`)."""
  if not isinstance(retraction, str) or retraction not in _STEPS:
    raise ValueError(f'retraction={retraction!r}: expected one of {RETRACTIONS}.')
  return _STEPS[retraction]


def per_point(value: jax.Array, layout: points.Layout, shape) -> jax.Array:
  """A batch-shaped per-point value, shaped to broadcast against a leaf of ``shape``."""
  return value.reshape(layout.per_point_shape(shape))
