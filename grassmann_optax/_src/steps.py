"""The SGD-G and Adam-G steps of the manifold leaves: one pass of inner products, two of writes.

Every quantity of one SGD-G or Adam-G step of a point ((S3)-(S7), (A3)-(A11) of
``docs/algorithm.md``) is a combination ``c_x·x + c_g·g + c_w·w`` of the point's stored value
``w``, its gradient ``g`` and its stored buffer ``x``, with per-point scalar coefficients that
follow from the six inner products ``wᵀw, wᵀg, gᵀg, wᵀx, gᵀx, xᵀx`` ((F1)-(F9)). So a step reads
each array once to reduce the inner products, once to write the new buffer and once to write
the new point, and the per-point maths between runs on one value per point.

The buffer is transported *eagerly*, when it is written, along the step just taken, exactly as
the originals do ((G6) for SGD-G, (G7) for Adam-G): the step equals the original algorithm for
every learning rate and gradient size, steps past π/2 and π included. That is why these
transforms take the learning rate and end with the geodesic step: a transform that stores a
buffer must know the step its point takes, and a transform of an Optax chain sees only the
updates it returns, not what later transforms make of them (``docs/algorithm.md``, section 7).

Gradients whose sums are too large for float arithmetic are recomputed divided by a power of two
per point (F10); a point whose gradient is not finite keeps its value and buffer for that step
(F11); a point shorter than the ε of ``unit()`` moves onto the sphere in the direction of its step
(F12); a leaf with a mostly radial gradient has it projected explicitly before its products are
taken (F13).
"""

import functools
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from grassmann_optax._src import (
  checks,
  docstrings,
  manifold,
  native,
  points,
  sharding,
  stacks,
  tuning,
)

# Points whose transported buffer would be written with a factor 1/κ, |κ| below this (a step of
# about a right angle), store it in a mixed basis instead ((F9) of docs/algorithm.md).
_MIXED_BELOW = 0.5

# A gradient whose tangent part has a squared norm below this fraction of its own (a radial part
# about 8 times the tangent one, or more) is projected explicitly before its products are taken
# (F13): ‖h‖² from the products, gᵀg − a²(wᵀg)²(2 − a²wᵀw), would lose digits to cancellation.
_RADIAL_BELOW = 1 / 64

# A moved buffer whose norm is below this fraction of the sum of its parts' lengths (a first
# moment that nearly cancels the new gradient) has its norm taken from the arrays themselves: from
# the products it would keep ρ² times fewer digits, with ρ that ratio ((F13) of docs/algorithm.md).
_CANCELLED_BELOW = 1 / 8


class Gram(NamedTuple):
  """Inner products of each point's ``w``, ``ĝ = g/scale − shift·w`` and stored buffer ``x``
  (F1).

  Every field has one value per point. ``scale`` is a power of two where the gradient's sums are
  too large (F10), else 1. ``shift`` is 0, or, where the gradient is mostly radial, the
  coefficient of its part along ``w`` (F13): ``ĝ`` is then the projected gradient ``h/scale``
  itself, and ``projected`` is 1.
  """

  ww: jax.Array
  wg: jax.Array
  gg: jax.Array
  wx: jax.Array
  gx: jax.Array
  xx: jax.Array
  scale: jax.Array
  inverse: jax.Array  # 1 / scale
  shift: jax.Array
  projected: jax.Array  # 1 where ĝ is already tangent (F13), else 0

  @property
  def a(self) -> jax.Array:
    """(F2) ``1/(‖w‖ + ε)``: ``y = a·w``."""
    return manifold.inverse_norm(self.ww)


class Combination(NamedTuple):
  """Per-point coefficients of the vector ``x·X + g·Ĝ + w·W`` on the stored arrays."""

  x: jax.Array
  g: jax.Array
  w: jax.Array

  def rescaled(self) -> tuple[jax.Array, 'Combination']:
    """``(s, c/s)``: the coefficients divided by a power of two ``s`` near the largest of them
    (exact). An unclipped gradient rescued by (F10) has a coefficient as large as its scale,
    whose square would overflow (a NaN step for a finite gradient)."""
    peak = jnp.maximum(jnp.maximum(jnp.abs(self.x), jnp.abs(self.g)), jnp.abs(self.w))
    scale, inverse = manifold.power_of_two_near(jax.lax.stop_gradient(peak))
    return scale, Combination(self.x * inverse, self.g * inverse, self.w * inverse)

  def gram_norm(self, gram: Gram) -> jax.Array:
    """Its norm, from the Gram matrix of ``(x, ĝ, w)``; of :meth:`rescaled` coefficients, so that
    their squares cannot overflow (the norm is then ``s`` times this)."""
    x, g, w = self
    sq = (
      x**2 * gram.xx
      + g**2 * gram.gg
      + w**2 * gram.ww
      + 2 * x * g * gram.gx
      + 2 * x * w * gram.wx
      + 2 * g * w * gram.wg
    )
    return manifold.safe_sqrt(jnp.maximum(sq, 0))


class Basis(NamedTuple):
  """Per point, the buffer transported to the current point is ``on_buffer·x + on_point·w``.

  ``(1, 0)``, the stored buffer itself, except after a step of about a right angle, where the
  stored buffer is kept in a mixed basis ((F9) of ``docs/algorithm.md``), and after the step of
  a point shorter than ε, whose buffer starts again from zero (F12).

  Attributes:
    on_buffer: the coefficient of the stored buffer ``x``, per point (shaped to broadcast
      against the leaf), or a scalar.
    on_point: the coefficient of the point ``w``, likewise.
  """

  on_buffer: Any
  on_point: Any


class Step(NamedTuple):
  """Per-point coefficients of one step: the new stored buffer, the update and the new basis."""

  buffer: Combination  # the new stored buffer x' on (x, ĝ, w)
  update_on_w: jax.Array  # update = update_on_w·w + update_on_buffer·x'
  update_on_buffer: jax.Array
  basis: Basis


def _tangent_coefficient(gram: Gram) -> jax.Array:
  """``a²(wᵀĝ)``, the part of ``ĝ`` along ``w`` that (F3) removes; 0 where ``ĝ`` is projected
  already (F13)."""
  return jnp.where(gram.projected > 0, 0, manifold.tangent_coefficient(gram.a, gram.wg))


def clipped_gradient(gram: Gram, max_norm) -> tuple[jax.Array, jax.Array]:
  """(F3), (F4) ``ĥ = k·(ĝ − a²(wᵀĝ) w)``: returns ``k`` and ``‖ĥ‖²``."""
  h_sq = jnp.where(  # (‖h‖/scale)²
    gram.projected > 0, gram.gg, manifold.tangent_norm_sq(gram.a, gram.ww, gram.wg, gram.gg)
  )
  norm = manifold.safe_sqrt(h_sq)
  k = manifold.clip_coefficient(norm, max_norm, gram.scale)
  return k, k * k * h_sq


def moved_buffer(gram: Gram, basis: Basis, decay, grad_weight, k) -> Combination:
  """(F5) ``decay·b + grad_weight·ĥ`` with ``b = on_buffer·x + on_point·w``."""
  on_g = grad_weight * k
  return Combination(
    x=decay * basis.on_buffer,
    g=on_g,
    w=decay * basis.on_point - on_g * _tangent_coefficient(gram),
  )


def geodesic_step(
  gram: Gram, moved: Combination, n: jax.Array, sigma, radius, *, own_direction: bool
) -> Step:
  """(F6)-(F9), (F12) The step ``d = −σ·B`` along the geodesic, ``B`` = ``moved``, and the buffer
  ``B`` transported along it.

  With ``n = ‖B‖``, ``θ = |σ| n``, ``r = θ/(θ + ε)`` and ``S = sign(σ)·r·sin θ``, the new point is
  ``y' = cos θ·y − S·B/n`` (G5) and the transported buffer is ``κ B + n λ y``, with ``κ = r cos θ,
  λ = sign(σ) sin θ`` for a buffer that is the step's own direction, SGD-G's (G6), and
  ``κ = 1 − r²(1 − cos θ), λ = S`` for Adam-G's first moment (G7). Where ``|κ| ≥ 1/2`` the
  transported buffer is stored and the update is written from it and ``w``; elsewhere (a step of
  about a right angle, where that would divide by ``κ ≈ 0``) the stored buffer is
  ``B + sign(S)·n·y``, from which both the update and, at the next step, the transported buffer
  follow with factors no larger than about 3. With ``radius`` ``R`` (per point, or None for 1)
  the new point is stored as ``R·y'``. ``n`` comes from :func:`_moved_norm`.
  """
  theta = jnp.abs(sigma) * n
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  # |σ|/(θ + ε), not |σ|·(1/(θ + ε)): 1/(θ + ε) is below the smallest float32 (and flushed to 0)
  # for an angle above 8.5e37, and the point would shrink to |cos θ|. σ = 0 gives 0, and a
  # derivative of 0 (ε/|σ| would give 0·∞ in it).
  inverse = jnp.abs(sigma) / (theta + manifold.UNIT_EPS)
  r = n * inverse  # θ/(θ + ε)
  q = jnp.sign(sigma) * sin * inverse  # S / n
  s_big = q * n  # S
  if own_direction:
    kappa, lam = r * cos, jnp.sign(sigma) * sin
  else:
    kappa, lam = 1 - r**2 * (1 - cos), s_big
  a = gram.a
  stored = jnp.abs(kappa) >= _MIXED_BELOW
  sign_s = jnp.where(s_big < 0, -1.0, 1.0).astype(n.dtype)
  kappa_safe = jnp.where(stored, kappa, 1)
  d_safe = jnp.where(stored, 1, cos + jnp.abs(s_big))
  both = 1 / (kappa_safe * d_safe)  # one division for 1/κ and 1/D
  inverse_kappa, inverse_d = d_safe * both, kappa_safe * both
  # Stored transported buffer x' = κ B + n λ y; update = (a cos θ − 1 + S λ a/κ) w − (q/κ) x'.
  # Mixed basis x' = B + sign(S) n y; update = (a cos θ − 1 + |S| a) w − q x'.
  on_b = jnp.where(stored, kappa, 1)
  on_y = jnp.where(stored, n * lam, sign_s * n)
  new_on_w = a * cos + jnp.where(stored, s_big * lam * a * inverse_kappa, jnp.abs(s_big) * a)
  update_on_buffer = -q * jnp.where(stored, inverse_kappa, 1)
  # At the next step the transported buffer is on_buffer'·x' + on_point'·y' (F9).
  rest = lam - kappa * sign_s
  to_point = n * rest * inverse_d
  if radius is not None:
    new_on_w, update_on_buffer = radius * new_on_w, radius * update_on_buffer
    to_point = to_point / radius
  basis = Basis(
    on_buffer=jnp.where(stored, 1, kappa + rest * s_big * inverse_d),
    on_point=jnp.where(stored, 0, to_point),
  )
  buffer = Combination(x=on_b * moved.x, g=on_b * moved.g, w=on_b * moved.w + on_y * a)
  step = Step(buffer, update_on_w=new_on_w - 1, update_on_buffer=update_on_buffer, basis=basis)
  return _degenerate_step(gram, moved, n, radius, step)


def _degenerate_step(gram: Gram, moved: Combination, n, radius, step: Step) -> Step:
  """(F12) A point shorter than ε has no direction ``y``: it moves to ``−R·B/n``, the direction
  of its step, on the sphere, and its buffer starts again from zero. With ``n = 0`` it stays."""
  degenerate = manifold.is_degenerate(gram.a, gram.ww)
  on_new = -manifold.safe_divide(jnp.ones_like(n), n)
  if radius is not None:
    on_new = radius * on_new
  zero = jnp.zeros_like(n)
  return Step(
    buffer=Combination(
      *(jnp.where(degenerate, m, s) for m, s in zip(moved, step.buffer, strict=True))
    ),
    update_on_w=jnp.where(degenerate, jnp.where(n > 0, -1.0, 0.0), step.update_on_w),
    update_on_buffer=jnp.where(degenerate, on_new, step.update_on_buffer),
    basis=Basis(*(jnp.where(degenerate, zero, b) for b in step.basis)),
  )


class _Part(NamedTuple):
  """Manifold leaves in their compute dtype: one leaf, or equal small leaves stacked on axis 0."""

  w: jax.Array
  g: jax.Array
  x: jax.Array
  layout: points.Layout
  stack: stacks.Stack  # which leaves
  allow_kernel: bool  # the three arrays are stored in the compute dtype

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return self.layout.batch_shape(self.w.shape)

  @property
  def num_points(self) -> int:
    return self.layout.num_points(self.w.shape)


def _parts(layouts, g_leaves, x_leaves, w_leaves) -> list[_Part]:
  parts = []
  for stack in stacks.plan(layouts, w_leaves, g_leaves, x_leaves):
    first = stack.first
    allow_kernel = all(
      a.dtype == manifold.compute_dtype(w_leaves[first])
      for a in (g_leaves[first], x_leaves[first], w_leaves[first])
    )
    arrays = [manifold.upcast(stack.pick(tree)) for tree in (w_leaves, g_leaves, x_leaves)]
    parts.append(_Part(*arrays, stack.layout(layouts), stack, allow_kernel))
  return parts


def _products(part: _Part, g: jax.Array, *, kernel: bool = True) -> jax.Array:
  """``(wᵀw, wᵀg, gᵀg, wᵀx, gᵀx, xᵀx)`` of each point of ``part``, shape ``(6, points)``.

  Inside ``shard_map`` each device sums its block of a point and the sums are all-reduced over
  the mesh axes that split it; :func:`native.column_products` uses the CPU kernel only where no
  array differs between devices (outside ``shard_map``, and inside it for replicated arrays).
  """
  products = native.column_products(
    part.w,
    g,
    part.x,
    point_axes=part.layout.point,
    allow_kernel=kernel and part.allow_kernel and tuning.use_cpu_kernel(),
  )
  return sharding.psum(jnp.stack([s.reshape(-1) for s in products]), part.layout.point_mesh)


def _part_gram(part: _Part) -> tuple[jax.Array, ...]:
  """``(scale, inverse, shift, projected, sums)`` of one part's points (F1, F10, F13): the six
  products as rows of ``sums``, recomputed on the gradient divided per point by a power of two
  where some point's ``gᵀg`` is too large, and on the projected gradient where some point's
  gradient is mostly radial.

  The test and the recomputation are per part, so that a step reserves temporary memory for one
  part's scaled gradient, not for those of a whole group (the rare branch of a ``lax.cond`` is
  allocated all the same).
  """
  sums = _products(part, part.g)

  def rescaled():
    scale, inverse = manifold.column_scale(part.g, part.layout.point, part.layout.point_mesh)
    flat = lambda x: sharding.like(x.reshape(-1).astype(sums.dtype), sums)
    return flat(scale), flat(inverse), _products(part, part.g * inverse)

  # Devices that split a point hold the same all-reduced sums, so they take the same branch.
  one = sharding.like(jnp.ones(sums.shape[1:], sums.dtype), sums)
  scale, inverse, sums = jax.lax.cond(manifold.large(sums[2]), rescaled, lambda: (one, one, sums))

  ww, wg, gg = sums[0], sums[1], sums[2]
  a = manifold.inverse_norm(ww)
  h_sq = manifold.tangent_norm_sq(a, ww, wg, gg)

  def projected():
    """(F13) The products of ``ĝ = g/scale − c·w``, the projected gradient, from XLA's
    reductions (a rare branch: a second read of the arrays)."""
    shift = manifold.tangent_coefficient(a, wg)
    per_point = lambda x: x.reshape(part.layout.per_point_shape(part.w.shape))
    tangent = part.g * per_point(inverse) - per_point(shift) * part.w
    return shift, one, _products(part, tangent, kernel=False)

  zero = jnp.zeros_like(one)
  shift, flag, sums = jax.lax.cond(
    jnp.any(h_sq < _RADIAL_BELOW * gg), projected, lambda: (zero, zero, sums)
  )
  return scale, inverse, shift, flag, sums


def _gram(grams: list[tuple[jax.Array, ...]]) -> Gram:
  """The inner products of every point of a group of parts (from :func:`_part_gram`), one vector
  per product (F1, F10, F13)."""
  scale, inverse, shift, flag, sums = (
    jnp.concatenate(x, axis=-1) for x in zip(*grams, strict=True)
  )
  return Gram(*sums, scale=scale, inverse=inverse, shift=shift, projected=flag)


def _flat(per_part: list[jax.Array], dtype) -> jax.Array:
  return jnp.concatenate([v.reshape(-1).astype(dtype) for v in per_part])


def _split(vector: jax.Array, parts: list[_Part], *, broadcast: bool) -> list[jax.Array]:
  """A vector over the points of ``parts`` as one array per part (batch-shaped, or shaped to
  broadcast against the part with ``broadcast``); a leading axis of ``vector`` is kept."""
  out, start = [], 0
  for part in parts:
    piece = vector[..., start : start + part.num_points]
    shape = part.layout.per_point_shape(part.w.shape) if broadcast else part.batch_shape
    out.append(piece.reshape(*vector.shape[:-1], *shape))
    start += part.num_points
  return out


def _write(gram: Gram, step: Step, parts: list[_Part]) -> tuple[list, list]:
  """The element passes of every part: its new stored buffer, then its update (F11).

  Points whose gradient is not finite keep their buffer and get a zero update. The test is a
  select in the buffer pass only; the update pass reads the kept (finite) buffer with zero
  coefficients.
  """
  finite = jnp.isfinite(gram.gg)
  coefficients = tuning.per_point(
    step.buffer.x,
    step.buffer.g,
    step.buffer.w - step.buffer.g * gram.shift,  # ĝ = g/scale − shift·w, on the stored g (F13)
    jnp.where(finite, step.update_on_w, 0),
    jnp.where(finite, step.update_on_buffer, 0),
    gram.inverse,
    finite.astype(gram.ww.dtype),
  )
  updates, buffers = [], []
  for part, c in zip(parts, _split(coefficients, parts, broadcast=True), strict=True):
    on_x, on_g, on_w, update_w, update_x, inverse, kept = (v.astype(part.w.dtype) for v in c)
    new_x = jnp.where(kept > 0, on_x * part.x + on_g * (part.g * inverse) + on_w * part.w, part.x)
    updates.append(update_w * part.w + update_x * new_x)
    buffers.append(new_x)
  return updates, buffers


def _moved_norm(gram: Gram, moved: Combination, parts: list[_Part]) -> jax.Array:
  """``n = ‖B‖`` of every point of ``parts``, ``B = moved`` (F6), to the precision of ``B``.

  From the products (:meth:`Combination.gram_norm`) where ``B`` is not much shorter than its parts;
  where some point has ``‖B‖ < Σ|cᵢ|‖vᵢ‖/8`` (a first moment that nearly cancels the new
  gradient), the norms of such points are taken from ``B`` itself, formed from the arrays (a
  rare branch: a second read of the group's arrays, as (F13)'s of a part's). One ``lax.cond``
  for the group, not one per part: its branch keeps no array (each ``B`` is fused into its
  reduction), and one cond compiles in about two thirds of the time (WRN-28-10: 1.7 s more
  than without the branch, against 2.4 s).
  """
  scale, c = moved.rescaled()
  n = c.gram_norm(gram)  # ‖B‖/scale
  lengths = (
    jnp.abs(c.x) * manifold.safe_sqrt(gram.xx)
    + jnp.abs(c.g) * manifold.safe_sqrt(gram.gg)
    + jnp.abs(c.w) * manifold.safe_sqrt(gram.ww)
  )
  # Not where the gradient is not finite (an infinite one gives an infinite length): those points
  # are held.
  cancelled = jnp.isfinite(gram.gg) & (lengths * _CANCELLED_BELOW > n)
  # On the stored g: ĝ = g/scale − shift·w.
  coefficients = jnp.stack([c.x, c.g * gram.inverse, c.w - c.g * gram.shift])

  def explicit():
    norms = []
    for part, on in zip(parts, _split(coefficients, parts, broadcast=True), strict=True):
      b = on[0] * part.x + on[1] * part.g + on[2] * part.w
      norms.append(manifold.column_norm(b, part.layout.point, part.layout.point_mesh).reshape(-1))
    return jnp.concatenate(norms)

  return scale * jnp.where(cancelled, jax.lax.cond(jnp.any(cancelled), explicit, lambda: n), n)


PointStep = Callable[[Gram, dict[str, jax.Array], Callable], tuple[Step, dict[str, jax.Array]]]


def _fused_step(
  updates,
  buffers,
  params,
  per_point: list,
  names,
  radii,
  *,
  point_axes,
  mesh_axes,
  point_step: PointStep,
):
  """One step of every manifold leaf of ``updates``.

  ``per_point`` holds, per leaf, its per-point state: the values named ``names`` stacked on a
  leading axis (the :class:`Basis`, then the rule's own); ``radii`` the radius of every point per
  leaf (batch-shaped) with ``radius='init'``, else None. ``point_step(gram, vectors, norm_of)``
  gets them as vectors over the points (``radius`` among them where given), and
  ``norm_of(moved)`` gives the norm of a moved buffer (:func:`_moved_norm`); it returns the
  :class:`Step` and the new values of ``names``, in that order. Points whose gradient is not
  finite keep their state. Returns the updates, the new buffers (trees) and the new per-point
  state (a list over the leaves, stacked as ``per_point``).
  """
  g_leaves, treedef = jax.tree.flatten(updates)
  x_leaves, w_leaves = (treedef.flatten_up_to(tree) for tree in (buffers, params))
  layouts = points.resolve(params, point_axes, mesh_axes)
  parts = _parts(layouts, g_leaves, x_leaves, w_leaves)
  new_updates, new_buffers = [None] * len(g_leaves), [None] * len(g_leaves)
  new_state = [None] * len(g_leaves)
  grams = [_part_gram(part) for part in parts]
  # Inside shard_map, a group's per-point values vary along every mesh axis one of its parts'
  # do: parts are grouped by those axes too, so that each leaf's results vary along its own.
  keys = [(str(p.w.dtype), sharding.varying(g[-1])) for p, g in zip(parts, grams, strict=True)]
  for group in tuning.groups(keys):
    group_parts = [parts[i] for i in group]
    gram = _gram([grams[i] for i in group])
    rows = []
    for part in group_parts:
      stacked = part.stack.pick(per_point)  # (values, *batch), or (members, values, *batch)
      stacked = stacked if part.stack.alone else jnp.moveaxis(stacked, 0, 1)
      rows.append(stacked.reshape(len(names), -1).astype(gram.ww.dtype))
    table = jnp.concatenate(rows, axis=1)
    vectors = {name: table[index] for index, name in enumerate(names)}
    if radii is not None:
      vectors['radius'] = _flat([part.stack.pick(radii) for part in group_parts], gram.ww.dtype)
    step, held = point_step(gram, vectors, functools.partial(_moved_norm, gram, parts=group_parts))
    part_updates, part_buffers = _write(gram, step, group_parts)
    finite = jnp.isfinite(gram.gg)
    for index, part in enumerate(group_parts):
      part.stack.scatter(part_updates[index], new_updates)
      part.stack.scatter(part_buffers[index], new_buffers)
    kept = jnp.stack([jnp.where(finite, held[name], vectors[name]) for name in names])
    for part, piece in zip(group_parts, _split(kept, group_parts, broadcast=False), strict=True):
      # (values, *batch) per leaf; a stack's (values, members, *batch) with its members first.
      part.stack.scatter(piece if part.stack.alone else jnp.moveaxis(piece, 0, 1), new_state)
  cast = lambda new, old: [a.astype(b.dtype) for a, b in zip(new, old, strict=True)]
  return (
    treedef.unflatten(cast(new_updates, w_leaves)),
    treedef.unflatten(cast(new_buffers, x_leaves)),
    cast(new_state, per_point),
  )


# Optax wrappers whose params are averages or interpolations of the iterates: points off their
# sphere. Recognised by module when they call init, so that the warning costs nothing at run time.
_MOVING_WRAPPERS = {
  'optax.contrib._schedule_free': 'optax.contrib.schedule_free',
  'optax._src.lookahead': 'optax.lookahead',
}
_warned_wrappers: set[str] = set()


def warn_if_wrapped(name: str) -> None:
  """Warns once per wrapper when ``init`` is called from a wrapper that moves params itself."""
  frame = sys._getframe(1)
  for _ in range(32):
    if frame is None:
      return
    wrapper = _MOVING_WRAPPERS.get(frame.f_globals.get('__name__', ''))
    if wrapper is not None:
      break
    frame = frame.f_back
  else:
    return
  if wrapper in _warned_wrappers:
    return
  _warned_wrappers.add(wrapper)
  checks.warn(
    f'{name} inside {wrapper}: the params that {wrapper} hands back (its evaluation or slow '
    'params) are averages or interpolations of points, so they are off the manifold, and so '
    'are the params it passes to update (each step starts from their directions, (S1)). Map '
    'params back onto the manifold before you evaluate or save them: '
    'go.project_params(params, param_labels) (with radius= and point_axes= as the step has '
    'them). docs/composition.md says what each Optax wrapper does with these optimizers.',
  )


def per_point_init(params, layouts, values: tuple[float, ...]):
  """Per leaf, ``values`` for every point (float32 or wider), stacked on a leading axis:
  shape ``(len(values), *batch_shape)``."""
  leaves = []
  for layout, w in zip(layouts, jax.tree.leaves(params), strict=True):
    shape, dtype = layout.batch_shape(w.shape), manifold.compute_dtype(w)
    leaves.append(jnp.stack([jnp.full(shape, value, dtype) for value in values]))
  return jax.tree.unflatten(jax.tree.structure(params), leaves)


def _rows(per_point, index: int):
  return jax.tree.map(lambda values: values[index], per_point)


def initial_radius(params, layouts, name: str):
  """The norm of every point of ``params``, batch-shaped; a zero point has none (ValueError)."""
  out = []
  for (leaf_name, w), layout in zip(checks.named_leaves(params), layouts, strict=True):
    norm = manifold.column_norm(manifold.upcast(w), layout.point, layout.point_mesh)
    advice = 'Initialise it away from zero (e.g. with go.unit_initializer()), or give a radius.'
    checks.check_initial_norms(norm, w, leaf_name, name, advice)
    out.append(norm.reshape(layout.batch_shape(w.shape)))
  return jax.tree.unflatten(jax.tree.structure(params), out)


def check_init(params, name: str, point_axes, mesh_axes) -> list[points.Layout]:
  """The layouts of the leaves of ``params``, after checking that they can be manifold leaves.

  Inside ``shard_map`` the layouts name the mesh axes that split each point (``mesh_axes``), so
  that ``radius='init'`` takes the norm of the whole point, not of this device's block.
  """
  layouts = points.resolve(params, point_axes, mesh_axes)
  checks.check_manifold_leaves(params, name, layouts)
  return layouts


def require_params(params) -> None:
  if params is None:
    raise ValueError(checks.NO_PARAMS_MSG)


# Why the per-point values of a leaf are one array: each array of the state is a buffer that
# every call of a jitted step hands over and takes back, at a few microseconds whatever its size.
# With three arrays per leaf, a step of 500 leaves of (64, 16) took 1.78x AdamW's time; with one,
# 1.12x (docs/performance.md, "Many small leaves").
_PER_POINT_DOC = """per_point: per leaf, its per-point values stacked on a leading axis, each
      shaped by the batch axes of the leaf (``params.shape[-1:]`` for columns), float32 or
      wider: {rows}. One array per leaf, not one per value, so that a model of many small
      leaves hands over few arrays; the properties name the rows. They are read-only views,
      not fields: ``optax.tree_utils.tree_get``, ``tree_set`` and ``_replace`` reach
      ``per_point`` (in each of its arrays, row ``k`` is ``array[k]``)."""


class GrassmannSgdState(NamedTuple):
  """State of :func:`grassmann_sgd`.

  Attributes:
    count: number of updates so far, int32 (drives a learning-rate schedule).
    trace: the momentum buffer ``b`` (gradient units) in the shape of the params; the buffer
      transported to the current point is ``basis.on_buffer·trace + basis.on_point·params``.
    {per_point}
    radius: with ``radius='init'``, the radius of every point, shaped by the batch axes;
      otherwise ``None``.
  """

  count: jax.Array
  trace: optax.Params
  per_point: optax.Params
  radius: optax.Params = None

  @property
  def basis(self) -> 'Basis':
    """The :class:`Basis` of every point (rows 0 and 1 of ``per_point``)."""
    return Basis(_rows(self.per_point, 0), _rows(self.per_point, 1))


class GrassmannAdamState(NamedTuple):
  """State of :func:`grassmann_adam`.

  Attributes:
    count: number of updates so far (``t``), int32.
    mu: first moment ``m`` in the shape of the params; the moment transported to the current
      point is ``basis.on_buffer·mu + basis.on_point·params``.
    {per_point}
    radius: with ``radius='init'``, the radius of every point; otherwise ``None``.
  """

  count: jax.Array
  mu: optax.Updates
  per_point: optax.Params
  radius: optax.Params = None

  @property
  def basis(self) -> 'Basis':
    """The :class:`Basis` of every point (rows 0 and 1 of ``per_point``)."""
    return Basis(_rows(self.per_point, 0), _rows(self.per_point, 1))

  @property
  def nu(self) -> optax.Updates:
    """The scalar second moment ``v`` of every point (row 2 of ``per_point``)."""
    return _rows(self.per_point, 2)


GrassmannSgdState.__doc__ = GrassmannSgdState.__doc__.format(
  per_point=_PER_POINT_DOC.format(rows='``basis.on_buffer``, ``basis.on_point``')
)
GrassmannAdamState.__doc__ = GrassmannAdamState.__doc__.format(
  per_point=_PER_POINT_DOC.format(rows='``basis.on_buffer``, ``basis.on_point``, ``nu``')
)


PointRule = Callable[..., tuple[Step, dict[str, jax.Array]]]


def _transform(
  name: str,
  init_state: Callable,
  point_rule: PointRule,
  *,
  learning_rate,
  point_axes,
  mesh_axes,
  radius,
  buffer_field: str,
  own_fields: tuple[str, ...] = (),
) -> optax.GradientTransformationExtraArgs:
  """The transformation of a fused step; what differs between SGD-G and Adam-G is passed in.

  ``init_state(params, per_point, radii)`` builds the state; ``buffer_field`` names its
  buffer and ``own_fields`` its per-point values after the :class:`Basis` (Adam-G's ``nu``, which
  starts at 0), the rows of its ``per_point`` field in that order.
  ``point_rule(gram, basis, own, radius, lr, count, norm_of)`` returns the :class:`Step` and the new
  values of ``own`` (a dict of per-point vectors).
  """
  checks.check_hyperparameters(learning_rate=learning_rate)
  names = (*Basis._fields, *own_fields)
  initial = (1.0, 0.0, *(0.0 for _ in own_fields))  # the stored buffer is the transported one

  def init_fn(params):
    layouts = check_init(params, name, point_axes, mesh_axes)
    warn_if_wrapped(name)
    radii = initial_radius(params, layouts, name) if isinstance(radius, str) else None
    return init_state(params, per_point_init(params, layouts, initial), radii)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    require_params(params)
    checks.check_state(state, ('count', 'per_point', 'radius', buffer_field), name)
    buffers = getattr(state, buffer_field)
    checks.check_update_trees(updates, params, buffers, name)
    sharding.check_split(params, sharding.resolve(params, mesh_axes), name)
    lr = checks.scheduled(learning_rate, state.count, name)
    count = optax.safe_increment(state.count)
    treedef = jax.tree.structure(params)
    radii = treedef.flatten_up_to(state.radius) if isinstance(radius, str) else None
    scalar_radius = None if isinstance(radius, str) else radius

    def point_step(gram, vectors, norm_of):
      basis = Basis(*(vectors[f] for f in Basis._fields))
      own = {f: vectors[f] for f in own_fields}
      point_radius = vectors.get('radius', scalar_radius)
      step, own = point_rule(gram, basis, own, point_radius, lr, count, norm_of)
      return step, {**step.basis._asdict(), **own}

    new_updates, new_buffers, per_point = _fused_step(
      updates,
      buffers,
      params,
      treedef.flatten_up_to(state.per_point),
      names,
      radii,
      point_axes=point_axes,
      mesh_axes=mesh_axes,
      point_step=point_step,
    )
    return new_updates, state._replace(
      count=count,
      per_point=treedef.unflatten(per_point),
      **{buffer_field: new_buffers},
    )

  return optax.GradientTransformationExtraArgs(init_fn, sharding.explicit_axes_as_auto(update_fn))


@docstrings.fill
def grassmann_sgd(
  learning_rate: optax.ScalarOrSchedule,
  momentum: ArrayLike = 0.9,
  *,
  grad_clip: ArrayLike | None = 0.1,
  point_axes: points.PointAxes = None,
  radius: ArrayLike | str | None = None,
  mesh_axes: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""The SGD-G step of every point: project, clip, momentum, geodesic step and transport.

  For every point ``w`` (by default every column of a leaf), with ``y = unit(w)`` and ``b`` the
  buffer transported to ``y`` (Algorithm 1; (S1)-(S7) of ``docs/algorithm.md``):

  .. math::
    \hat h = \mathrm{clip}(g - (y^\top g)\, y,\ \nu), \quad
    B = \gamma b + \hat h, \quad d = -\eta B, \\
    w \leftarrow \exp_y(d), \qquad b \leftarrow -\mathrm{pt}_y(d; d)/\eta

  (paper Eqs. 6, 7, 9). The update is ``exp_y(d) − w``, so that :func:`optax.apply_updates` puts
  each point on the geodesic; a stored ``w`` that was not unit is re-normalised (S1). Put
  :func:`add_orthogonality_gradient` before it for the paper's orthogonality term, and nothing
  that changes the updates after it. It is exact for every step size: the buffer is transported
  along the step taken, past π/2 and π too.

  The buffer is in gradient units, as in :func:`optax.trace`; the originals store ``−η b``. The
  two agree for a constant rate; after a change of rate this applies the new rate to the whole
  buffer, the originals to new gradients only.

  Args:
    learning_rate: η_G, or a schedule of the step count.
    momentum: γ in [0, 1] (0.9 in the paper).
    grad_clip: {{grad_clip}}
    point_axes: {{point_axes}}
    radius: {{radius}}
    mesh_axes: {{mesh_axes}}

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` that needs ``params``; its state is a
    :class:`GrassmannSgdState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, grassmann_optax as go
    >>> w = go.unit_initializer()(jax.random.key(0), (27, 8))
    >>> tx = go.grassmann_sgd(0.2, grad_clip=None)
    >>> u, state = tx.update(jnp.ones_like(w), tx.init(w), w)
    >>> bool(jnp.allclose(jnp.linalg.norm(w + u, axis=0), 1, atol=1e-6))
    True

  {{references}}
  """
  checks.check_hyperparameters(momentum=momentum, grad_clip=grad_clip)
  checks.check_radius(radius)
  points.check_spec_tree(point_axes)
  sharding.check_spec_tree(mesh_axes)

  def init_state(params, per_point, radii):
    return GrassmannSgdState(
      count=jnp.zeros([], jnp.int32),
      trace=jax.tree.map(jnp.zeros_like, params),
      per_point=per_point,
      radius=radii,
    )

  def point_rule(gram, basis, own, point_radius, lr, count, norm_of):
    del count
    k, _ = clipped_gradient(gram, grad_clip)
    moved = moved_buffer(gram, basis, momentum, 1.0, k)
    sigma = jnp.asarray(lr, gram.ww.dtype)
    n = norm_of(moved)
    return geodesic_step(gram, moved, n, sigma, point_radius, own_direction=True), own

  return _transform(
    'grassmann_sgd',
    init_state,
    point_rule,
    learning_rate=learning_rate,
    point_axes=point_axes,
    mesh_axes=mesh_axes,
    radius=radius,
    buffer_field='trace',
  )


@docstrings.fill
def grassmann_adam(
  learning_rate: optax.ScalarOrSchedule,
  b1: ArrayLike = 0.9,
  b2: ArrayLike = 0.99,
  eps: ArrayLike = 1e-8,
  *,
  grad_clip: ArrayLike | None = 0.1,
  point_axes: points.PointAxes = None,
  radius: ArrayLike | str | None = None,
  mesh_axes: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""The Adam-G step of every point: project, clip, moments, geodesic step and transport.

  For every point ``w``, with ``y = unit(w)``, ``m`` the first moment transported to ``y`` and
  step ``t`` (Algorithm 2; (A1)-(A11) of ``docs/algorithm.md``):

  .. math::
    \hat h = \mathrm{clip}(g - (y^\top g)\, y,\ \nu), \quad
    \tilde m = \beta_1 m + (1-\beta_1)\hat h, \quad
    v \leftarrow \beta_2 v + (1-\beta_2)\lVert\hat h\rVert^2, \\
    d = -\eta\,\tfrac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,\tfrac{\tilde m}{\sqrt{v+\epsilon}},
    \qquad w \leftarrow \exp_y(d), \qquad m \leftarrow \mathrm{pt}_y(\tilde m; d)

  (paper Eqs. 6-8), with **one** scalar second moment ``v`` per point and ε inside the square
  root. The update is ``exp_y(d) − w``; put :func:`add_orthogonality_gradient` before it for the
  paper's orthogonality term, and nothing that changes the updates after it. It is exact for
  every step size.

  Args:
    learning_rate: η_G, or a schedule of the step count.
    b1: β1 in [0, 1) (the paper passes its momentum, 0.9).
    b2: β2 in [0, 1) (0.99 in both originals).
    eps: ε, added to ``v`` under the square root; at least 1.2e-38, the smallest normal float32.
    grad_clip: {{grad_clip}}
    point_axes: {{point_axes}}
    radius: {{radius}}
    mesh_axes: {{mesh_axes}}

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` that needs ``params``; its state is a
    :class:`GrassmannAdamState`, whose ``count`` also drives the schedule.

  Example:
    >>> import jax, jax.numpy as jnp, optax, grassmann_optax as go
    >>> w = go.unit_initializer()(jax.random.key(0), (27, 8))
    >>> tx = go.grassmann_adam(0.05)
    >>> u, state = tx.update(jnp.ones_like(w), tx.init(w), w)
    >>> state.nu.shape
    (8,)

  {{references}}
  """
  checks.check_hyperparameters(b1=b1, b2=b2, eps=eps, grad_clip=grad_clip)
  checks.check_radius(radius)
  points.check_spec_tree(point_axes)
  sharding.check_spec_tree(mesh_axes)

  def init_state(params, per_point, radii):
    return GrassmannAdamState(
      count=jnp.zeros([], jnp.int32),
      mu=jax.tree.map(jnp.zeros_like, params),
      per_point=per_point,
      radius=radii,
    )

  def point_rule(gram, basis, own, point_radius, lr, count, norm_of):
    k, h_sq = clipped_gradient(gram, grad_clip)
    moved = moved_buffer(gram, basis, b1, 1 - b1, k)
    nu = b2 * own['nu'] + (1 - b2) * h_sq
    t = count.astype(nu.dtype)
    correction = jnp.sqrt(manifold.bias_correction(b2, t)) / manifold.bias_correction(b1, t)
    sigma = lr * correction / jnp.sqrt(nu + eps)
    n = norm_of(moved)
    return geodesic_step(gram, moved, n, sigma, point_radius, own_direction=False), {'nu': nu}

  return _transform(
    'grassmann_adam',
    init_state,
    point_rule,
    learning_rate=learning_rate,
    point_axes=point_axes,
    mesh_axes=mesh_axes,
    radius=radius,
    buffer_field='mu',
    own_fields=('nu',),
  )
