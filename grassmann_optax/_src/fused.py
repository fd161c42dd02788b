"""Fused SGD-G and Adam-G manifold updates: the whole step of a column in one plane.

Every quantity of one SGD-G/Adam-G step ((S1)-(S7), (A1)-(A11) of ``docs/algorithm.md``) is a
combination ``α w + β g + γ b`` of the column's stored weight ``w``, its gradient ``g`` and its
buffer ``b``, with per-column scalar coefficients that follow from the six inner products
``wᵀw, wᵀg, gᵀg, wᵀb, gᵀb, bᵀb``. So the update reads each array once to reduce the inner
products, once to write the new buffer and once to write the new weight, where the composable
chain of :mod:`transforms` reads them once per transform. On CPU the six reductions run in one
pass of a C++ kernel (:mod:`native`), because XLA:CPU would read the operands once per reduction.

The buffer is transported *eagerly*, when it is written, exactly as the originals do (G6, G7):
the updates equal the original algorithm for every learning rate and gradient size, including
steps that turn a column by more than π/2. The stored buffer is kept in a basis that keeps both
later passes well conditioned for every step angle ((F9) of ``docs/algorithm.md``): the
buffer transported to the current point is ``mix[0]·trace + mix[1]·w`` per column, and ``mix``
is ``(1, 0)``, the stored buffer itself, except after a step of about a right angle.

Column sums that overflow are recomputed on the gradient divided by a power of two, so gradients
up to the dtype's maximum give the clipped step of the same gradients scaled down. A column whose
gradient is not finite keeps its point and buffer for that step, and the other columns move.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from grassmann_optax._src import checks, manifold, native, points, transforms

# Columns whose step has |κ| below this (a step of about a right angle, see _transport) keep
# their buffer in the mixed basis; above it, the stored buffer is the transported one.
_MIXED_BELOW = 0.5


class _Plane(NamedTuple):
  """Per-column scalars of one step, from the inner products of ``w``, ``ĝ = g/s`` and ``x``.

  ``x`` is the stored buffer, ``b = mix[0]·x + mix[1]·w`` the buffer transported to ``w``. Every
  field is a vector over the columns of all manifold leaves, one after the other.
  """

  a: jax.Array  # 1 / (‖w‖ + ε): y = a·w
  s_ww: jax.Array
  s_wg: jax.Array
  s_gg: jax.Array
  s_wx: jax.Array
  s_gx: jax.Array
  s_xx: jax.Array
  g_scale: jax.Array  # s: a power of two where ‖g‖² overflows, else 1
  g_inverse: jax.Array  # 1/s


class _Leaf(NamedTuple):
  """One manifold leaf in its compute dtype, and what it is stored as."""

  w: jax.Array
  g: jax.Array  # the gradient, orthogonality term included
  x: jax.Array  # the stored buffer
  layout: points.Layout
  allow_kernel: bool  # the three arrays are stored in the compute dtype

  @property
  def num_points(self) -> int:
    return self.layout.num_points(self.w.shape)


def _leaf(layout, g_stored, x_stored, w_stored, omega) -> _Leaf:
  w, x = manifold.upcast(w_stored), manifold.upcast(x_stored)
  g = manifold.upcast(g_stored)
  if not transforms.is_static_zero(omega):
    g = g + manifold.orthogonality_gradient(w, omega, layout.point)
  # The kernel reads arrays as stored: only where no upcast would have to be written out.
  allow_kernel = all(a.dtype == w.dtype for a in (g_stored, x_stored, w_stored))
  return _Leaf(w=w, g=g, x=x, layout=layout, allow_kernel=allow_kernel)


def _products(leaf: _Leaf, g: jax.Array) -> jax.Array:
  """``(wᵀw, wᵀg, gᵀg, wᵀx, gᵀx, xᵀx)`` of each point, shape ``(6, points)``."""
  products = native.column_products(
    leaf.w, g, leaf.x, point_axes=leaf.layout.point, allow_kernel=leaf.allow_kernel
  )
  return jnp.stack([s.reshape(-1) for s in products])


def _plane(leaves: list[_Leaf]) -> _Plane:
  """The inner products of every point of a group of leaves, in one vector per product.

  The per-point maths that follows runs once for the group (see :func:`_groups`). Where a
  gradient's sums overflow, all products are recomputed on gradients divided by a power of two
  per point (a ``lax.cond``: finite sums cost one comparison).
  """
  sums = jnp.concatenate([_products(leaf, leaf.g) for leaf in leaves], axis=1)

  def rescaled():
    scales = [manifold.column_scale(leaf.g, leaf.layout.point) for leaf in leaves]
    products = [
      _products(leaf, leaf.g * inv) for leaf, (_, inv) in zip(leaves, scales, strict=True)
    ]
    flat = lambda index: jnp.concatenate([pair[index].reshape(-1) for pair in scales])
    return flat(0).astype(sums.dtype), flat(1).astype(sums.dtype), jnp.concatenate(products, 1)

  one = jnp.ones(sums.shape[1:], sums.dtype)
  scale, inverse, s = jax.lax.cond(jnp.any(jnp.isinf(sums)), rescaled, lambda: (one, one, sums))
  return _Plane(
    a=1 / (manifold.safe_sqrt(s[0]) + manifold.UNIT_EPS),
    s_ww=s[0],
    s_wg=s[1],
    s_gg=s[2],
    s_wx=s[3],
    s_gx=s[4],
    s_xx=s[5],
    g_scale=scale,
    g_inverse=inverse,
  )


def _columns(per_leaf: list[jax.Array], leaves: list[_Leaf], dtype) -> jax.Array:
  """Per-point state of each leaf (shape ``(..., *batch)``) side by side: ``(..., points)``."""
  flat = []
  for state, leaf in zip(per_leaf, leaves, strict=True):
    lead = state.shape[: state.ndim - len(leaf.layout.batch)]
    flat.append(state.reshape(*lead, leaf.num_points).astype(dtype))
  return jnp.concatenate(flat, axis=-1)


def _split(columns: jax.Array, leaves: list[_Leaf], *, broadcast: bool) -> list[jax.Array]:
  """The inverse of :func:`_columns`; with ``broadcast``, parts broadcast against their leaf."""
  out, start = [], 0
  for leaf in leaves:
    part = columns[..., start : start + leaf.num_points]
    if broadcast:
      shape = leaf.layout.per_point_shape(leaf.w.shape)
    else:
      shape = leaf.layout.batch_shape(leaf.w.shape)
    out.append(part.reshape(*columns.shape[:-1], *shape))
    start += leaf.num_points
  return out


class _Combination(NamedTuple):
  """Per-column coefficients of a vector ``c_x·x + c_g·ĝ + c_w·w``."""

  x: jax.Array
  g: jax.Array
  w: jax.Array

  def norm(self, plane: _Plane) -> jax.Array:
    """``‖c_x x + c_g ĝ + c_w w‖`` from the Gram matrix of ``(x, ĝ, w)``."""
    sq = (
      self.x**2 * plane.s_xx
      + self.g**2 * plane.s_gg
      + self.w**2 * plane.s_ww
      + 2 * self.x * self.g * plane.s_gx
      + 2 * self.x * self.w * plane.s_wx
      + 2 * self.g * self.w * plane.s_wg
    )
    return manifold.safe_sqrt(jnp.maximum(sq, 0))


def _clipped_gradient(plane: _Plane, max_norm) -> tuple[jax.Array, jax.Array]:
  """``ĥ = k·(ĝ − a² (wᵀĝ) w)``: (S3) then (S4). Returns ``k`` and ``‖ĥ‖²``."""
  a2 = plane.a**2
  h_sq = jnp.maximum(plane.s_gg - a2 * plane.s_wg**2 * (2 - a2 * plane.s_ww), 0)  # (‖h‖/s)²
  if max_norm is None:
    return plane.g_scale, plane.g_scale**2 * h_sq
  h_norm = manifold.safe_sqrt(h_sq)
  clipped = h_norm * plane.g_scale > max_norm
  k = jnp.where(clipped, manifold.safe_divide(max_norm, h_norm), plane.g_scale)
  return k, k**2 * h_sq


def _moved_buffer(plane: _Plane, mix, decay, grad_weight, k) -> _Combination:
  """``decay·b + grad_weight·ĥ`` on ``(x, ĝ, w)``, with ``b = mix[0] x + mix[1] w``."""
  c_g = grad_weight * k
  return _Combination(
    x=decay * mix[0],
    g=c_g,
    w=decay * mix[1] - c_g * plane.a**2 * plane.s_wg,
  )


class _Step(NamedTuple):
  """Per-column coefficients of the new stored buffer and of the update, and the new mix."""

  buffer: _Combination  # the new stored buffer x' on (x, ĝ, w)
  on_w: jax.Array  # update = on_w·w + on_buffer·x'
  on_buffer: jax.Array
  mix: jax.Array  # (2, 1, ..., 1, p): the new buffer at the new point is mix[0]·x' + mix[1]·w'


def _transport(plane: _Plane, moved: _Combination, sigma, radius, *, eager_e6: bool) -> _Step:
  """The geodesic step along ``d = −σ·B`` and the transported buffer, ``B`` = ``moved``.

  With ``n = ‖B‖``, ``θ = |σ| n``, ``r = θ/(θ + ε)`` and ``S = sign(σ)·r·sin θ``, the new point is
  ``y' = cos θ·y − S·B/n`` (G5) and the transported buffer is ``n (κ B/n + λ y)``, with
  ``κ = r cos θ, λ = sign(σ) sin θ`` for SGD-G's (G6) and ``κ = 1 − r²(1 − cos θ), λ = S`` for
  Adam-G's (G7). Where ``|κ| ≥ 1/2`` the transported buffer is stored and the update is written
  from it and ``w``; elsewhere (a step of about a right angle, where that would divide by
  ``κ ≈ 0``) the stored buffer is ``B + sign(S)·n·y``, from which both the update and, at the
  next step, the transported buffer follow with factors no larger than about 3. With a
  ``radius`` ``R`` (per point, or None for 1) the new point is stored as ``R·y'``.
  """
  n = moved.norm(plane)
  theta = jnp.abs(sigma) * n
  # One division for both 1/κ and 1/D below: one fusion fewer per leaf on CPU.
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  inverse_t = 1 / (theta + manifold.UNIT_EPS)
  r = theta * inverse_t
  q = sigma * sin * inverse_t  # S / n
  s_big = q * n  # S
  if eager_e6:
    kappa, lam = r * cos, jnp.sign(sigma) * sin
  else:
    kappa, lam = 1 - r**2 * (1 - cos), s_big
  a = plane.a
  stored = jnp.abs(kappa) >= _MIXED_BELOW
  sign_s = jnp.where(s_big < 0, -1.0, 1.0).astype(n.dtype)
  kappa_safe = jnp.where(stored, kappa, 1)
  d_safe = jnp.where(stored, 1, cos + jnp.abs(s_big))
  both = 1 / (kappa_safe * d_safe)
  inverse_kappa, inverse_d = d_safe * both, kappa_safe * both
  # Stored transported buffer x' = κ B + n λ y; update = (a cos θ − 1 + S λ a/κ) w − (q/κ) x'.
  # Mixed basis x' = B + sign(S) n y; update = (a cos θ − 1 + |S| a) w − q x'.
  on_b = jnp.where(stored, kappa, 1)
  on_y = jnp.where(stored, n * lam, sign_s * n)
  on_y_new = a * cos + jnp.where(stored, s_big * lam * a * inverse_kappa, jnp.abs(s_big) * a)
  on_buffer = -q * jnp.where(stored, inverse_kappa, 1)
  # Next step: the transported buffer is mix[0]·x' + mix[1]·y' (docs/algorithm.md (F9)), and
  # the stored point is w' = R·y'.
  rest = lam - kappa * sign_s
  to_point = n * rest * inverse_d
  if radius is not None:
    on_y_new, on_buffer, to_point = radius * on_y_new, radius * on_buffer, to_point / radius
  on_w = on_y_new - 1
  mix = jnp.stack(
    [
      jnp.where(stored, 1, kappa + rest * s_big * inverse_d),
      jnp.where(stored, 0, to_point),
    ]
  )
  buffer = _Combination(x=on_b * moved.x, g=on_b * moved.g, w=on_b * moved.w + on_y * a)
  return _Step(buffer=buffer, on_w=on_w, on_buffer=on_buffer, mix=mix)


def _per_column(*coefficients):
  """Materialises per-point coefficients before the element-wise passes that use them.

  XLA:CPU otherwise fuses the per-point maths (cos, sin, clipping and transport factors) into
  each consuming element loop and re-evaluates it for every element; it also copies donated
  buffers whose last reader is not ordered before the in-place write. A (trivial) reduction is a
  fusion boundary that survives compilation, unlike ``optimization_barrier``, and makes the
  element passes depend on every point's reduction. Measured on WRN-28-10 on CPU: 2.3x faster.

  The coefficients are gathered by selects on the row index rather than stacked: XLA:CPU then
  compiles the per-point maths of a WRN leaf to 16 small fusions instead of 24 (each a task on
  the leaf's critical path; three more per leaf measured 5% slower updates).
  """
  shape = jnp.broadcast_shapes(*(c.shape for c in coefficients))
  dtype = jnp.result_type(*coefficients)
  row = jax.lax.broadcasted_iota(jnp.int32, (len(coefficients), *shape), 0)
  gathered = jnp.broadcast_to(coefficients[-1], row.shape).astype(dtype)
  for index in range(len(coefficients) - 2, -1, -1):
    gathered = jnp.where(row == index, coefficients[index], gathered)
  return jnp.sum(jnp.stack([gathered, jnp.zeros_like(gathered)]), axis=0)


def _write(plane: _Plane, step: _Step, leaves: list[_Leaf], held=()):
  """The element passes of every leaf: its new stored buffer, then its update.

  Columns whose gradient is not finite keep their buffer and get a zero update; ``held`` are
  pairs ``(new, old)`` of per-column state, of which such columns keep ``old``. Returns the
  updates, the new buffers and the held per-column state.

  The test is a select in the buffer pass only: the update pass reads the kept (finite) buffer
  with zero coefficients, because a select there measured 17% slower updates on CPU.
  """
  finite = jnp.isfinite(plane.s_gg)
  columns = _per_column(
    step.buffer.x,
    step.buffer.g,
    step.buffer.w,
    jnp.where(finite, step.on_w, 0),
    jnp.where(finite, step.on_buffer, 0),
    plane.g_inverse,
    finite.astype(plane.a.dtype),
    *(jnp.where(finite, new, old) for new, old in held),
  )
  updates, buffers = [], []
  for leaf, (c_x, c_g, c_w, on_w, on_buffer, inverse, kept) in zip(
    leaves, _split(columns[:7], leaves, broadcast=True), strict=True
  ):
    c_x, c_g, c_w, on_w, on_buffer, inverse = (
      c.astype(leaf.w.dtype) for c in (c_x, c_g, c_w, on_w, on_buffer, inverse)
    )
    new_x = jnp.where(kept > 0, c_x * leaf.x + c_g * (leaf.g * inverse) + c_w * leaf.w, leaf.x)
    updates.append(on_w * leaf.w + on_buffer * new_x)
    buffers.append(new_x)
  return updates, buffers, columns[7:]


def _step_group(leaves, state_leaves, radius, column_step):
  """One fused step of a group of leaves: per-point maths once for all their points."""
  plane = _plane(leaves)
  state_columns = [_columns(parts, leaves, plane.a.dtype) for parts in state_leaves]
  if not _is_scalar(radius):
    radius = _columns(radius, leaves, plane.a.dtype)
  step, held = column_step(plane, radius, *state_columns)
  updates, buffers, kept = _write(plane, step, leaves, held)
  new_state, row = [], 0
  for parts, columns in zip(state_leaves, state_columns, strict=True):
    rows = columns.size // columns.shape[-1]
    block = kept[row : row + rows].reshape(columns.shape)
    row += rows
    split = _split(block, leaves, broadcast=False)
    new_state.append([new.astype(old.dtype) for new, old in zip(split, parts, strict=True)])
  return updates, buffers, new_state


# Leaves with fewer elements than this share one per-point computation on CPU (see _groups).
_SMALL_LEAF = 1 << 16


def _groups(leaves: list[_Leaf]) -> list[list[int]]:
  """Which leaves share one per-point computation (one chain of small per-point fusions).

  On CPU each large leaf is a group of its own: its passes then start as soon as its own inner
  products are done, and those of different leaves overlap; one group for the 24 manifold leaves
  of WRN-28-10, or groups of four, measured 5-10% slower. Small leaves, whose passes are short,
  share one group, so that many small leaves do not cost a chain of tasks each (200 leaves of
  16x8: 2.7x faster updates, 10x faster compilation). Other backends run one kernel after
  another, each with a launch cost: all leaves of a dtype share one group.
  """
  by_dtype: dict[str, list[int]] = {}
  alone = []
  cpu = jax.default_backend() == 'cpu'
  for index, leaf in enumerate(leaves):
    if cpu and leaf.w.size >= _SMALL_LEAF:
      alone.append([index])
    else:
      by_dtype.setdefault(str(leaf.w.dtype), []).append(index)
  return alone + list(by_dtype.values())


def _fused_step(updates, buffers, params, per_point, omega, point_axes, radius, column_step):
  """Runs one fused step over the manifold leaves of ``updates``.

  ``per_point`` is a list of state trees with per-point values (shaped ``(..., *batch)``) for
  each leaf, the first of them ``mix``; ``radius`` is None, a number, or a tree of per-point
  radii. ``column_step(plane, radius, *per_point_vectors)`` returns the :class:`_Step` and the
  pairs ``(new, old)`` of per-point state, one per row of those vectors. Returns the updates,
  the new buffers and the new per-point state trees.

  Leaves are stepped in groups that share their per-point maths (:func:`_groups`).
  """
  g_leaves, treedef = jax.tree.flatten(updates)
  layouts = points.resolve(params, point_axes)
  stored = [treedef.flatten_up_to(tree) for tree in (buffers, params)]
  leaves = [
    _leaf(layout, g, x, w, omega)
    for layout, g, x, w in zip(layouts, g_leaves, *stored, strict=True)
  ]
  state_leaves = [treedef.flatten_up_to(tree) for tree in per_point]
  radius_leaves = None if _is_scalar(radius) else treedef.flatten_up_to(radius)
  new_updates, new_buffers = [None] * len(leaves), [None] * len(leaves)
  new_state = [[None] * len(leaves) for _ in per_point]
  for group in _groups(leaves):
    state = [[parts[i] for i in group] for parts in state_leaves]
    group_radius = radius if radius_leaves is None else [radius_leaves[i] for i in group]
    updates_g, buffers_g, state_g = _step_group(
      [leaves[i] for i in group], state, group_radius, column_step
    )
    for j, i in enumerate(group):
      new_updates[i] = updates_g[j].astype(stored[1][i].dtype)
      new_buffers[i] = buffers_g[j].astype(stored[0][i].dtype)
      for out, values in zip(new_state, state_g, strict=True):
        out[i] = values[j]
  return (
    treedef.unflatten(new_updates),
    treedef.unflatten(new_buffers),
    [treedef.unflatten(values) for values in new_state],
  )


def _is_scalar(radius) -> bool:
  """None, a number or a 0-d array (one radius for every point), not a tree of radii."""
  if radius is None or isinstance(radius, int | float):
    return True
  return isinstance(radius, jax.Array | np.ndarray) and radius.ndim == 0


def _mix_init(params, layouts):
  """``(1, 0)`` per point: the stored buffer is the transported one."""

  def init(layout, w):
    shape = layout.batch_shape(w.shape)
    dtype = manifold.compute_dtype(w)
    return jnp.stack([jnp.ones(shape, dtype), jnp.zeros(shape, dtype)])

  return transforms.map_leaves(init, layouts, params)


def _radius_state(radius, params, layouts):
  return transforms.initial_radius(params, layouts) if radius == 'init' else None


def _radius_for_step(radius, state_radius):
  """The radius the step uses: None (unit), a number, or the tree kept in the state."""
  if radius == 'init':
    return state_radius
  return radius


class SgdgManifoldState(NamedTuple):
  """State of :func:`sgdg_manifold_update`.

  Attributes:
    count: number of updates so far, int32 (drives a learning-rate schedule).
    trace: the momentum buffer ``b`` (gradient units), transported to the current point, in the
      shape of the params.
    mix: per point, shape ``(2, *batch)`` (``(2, p)`` for columns): the transported buffer is
      ``mix[0]·trace + mix[1]·w/R``; ``(1, 0)`` except after a step of about a right angle
      (``docs/algorithm.md`` (F9)).
    radius: with ``radius='init'``, the radius ``R`` of every point, shaped by the batch axes;
      otherwise ``None``.
  """

  count: jax.Array
  trace: optax.Params
  mix: optax.Params
  radius: optax.Params = None


class AdamgManifoldState(NamedTuple):
  """State of :func:`adamg_manifold_update`.

  Attributes:
    count: number of updates so far (``t``), int32.
    mu: first moment ``m``, transported to the current point, in the shape of the params.
    nu: one scalar second moment per point, float32 or wider, shaped by the batch axes
      (``params.shape[-1:]`` for columns).
    mix: per point, shape ``(2, *batch)``: the transported first moment is
      ``mix[0]·mu + mix[1]·w/R``; ``(1, 0)`` except after a step of about a right angle.
    radius: with ``radius='init'``, the radius ``R`` of every point; otherwise ``None``.
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  mix: optax.Params
  radius: optax.Params = None


def _learning_rate(learning_rate, count):
  return learning_rate(count) if callable(learning_rate) else learning_rate


def sgdg_manifold_update(
  learning_rate: optax.ScalarOrSchedule,
  *,
  momentum: ArrayLike = 0.9,
  grad_clip: ArrayLike | None = 0.1,
  omega: ArrayLike = 0.0,
  point_axes: points.PointAxes = None,
  radius: ArrayLike | str | None = None,
) -> optax.GradientTransformation:
  r"""The SGD-G step of every column, fused and exact for every step size (Algorithm 1).

  For every column, with ``y = unit(w)`` and ``b`` the buffer transported to ``y``:

  .. math::
    \hat h = \mathrm{clip}(\mathrm{proj}_y(g + 2\omega(YY^\top Y - Y)), \nu), \quad
    B = \gamma b + \hat h, \quad d = -\eta B, \\
    w \leftarrow \exp_y(d), \qquad b \leftarrow -\mathrm{pt}_y(d; d)/\eta

  ((S1)-(S7) of ``docs/algorithm.md``; paper Eqs. 6, 7, 9). The buffer is in gradient units, as
  in :func:`optax.trace`; the originals store ``−η b`` (the same for a constant rate). Returns
  the additive update ``exp_y(d) − w``, so it is the last transform of a manifold branch. It
  equals the chain ``add_orthogonality_gradient → project_to_tangent → grassmann_clip →
  grassmann_momentum → scale_by_learning_rate → exp_map_update`` while every step turns each
  column by less than π/2, and stays exact beyond, where the chain does not.

  Args:
    learning_rate: η_G, or a schedule of the step count.
    momentum: γ.
    grad_clip: ν > 0, or ``None``.
    omega: ω of the orthogonality gradient; a Python 0 skips it.
    point_axes: the axes of each leaf that form one point: ``None`` (all but the last: the
      columns), an int or a tuple of ints, a pytree of those, or a callable ``params -> pytree``
      (section 10 of ``docs/algorithm.md``).
    radius: ``None`` (unit points, as in the paper), a positive number ``R``, or ``'init'``
      (each point keeps its norm at ``init``): points are stored at that norm, steps are angles.

  Returns:
    An :class:`optax.GradientTransformation` that needs ``params``; its state is a
    :class:`SgdgManifoldState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, grassmann_optax as go
    >>> w = go.unit_initializer()(jax.random.key(0), (27, 8))
    >>> tx = go.sgdg_manifold_update(0.2, grad_clip=None)
    >>> u, state = tx.update(jnp.ones_like(w), tx.init(w), w)
    >>> bool(jnp.allclose(jnp.linalg.norm(w + u, axis=0), 1, atol=1e-6))
    True

  References:
    Cho & Lee, "Riemannian approach to batch normalization", NeurIPS 2017, arXiv:1709.09603.
  """
  checks.check_hyperparameters(momentum=momentum, grad_clip=grad_clip, omega=omega)
  checks.check_radius(radius)

  def init_fn(params):
    layouts = transforms.check_init(params, 'sgdg_manifold_update', point_axes)
    return SgdgManifoldState(
      count=jnp.zeros([], jnp.int32),
      trace=jax.tree.map(jnp.zeros_like, params),
      mix=_mix_init(params, layouts),
      radius=_radius_state(radius, params, layouts),
    )

  def update_fn(updates, state, params=None):
    transforms.require_params(params)
    checks.check_update_trees(updates, params, state.trace, 'sgdg_manifold_update')
    lr = _learning_rate(learning_rate, state.count)

    def column_step(plane, point_radius, mix):
      k, _ = _clipped_gradient(plane, grad_clip)
      moved = _moved_buffer(plane, mix, momentum, 1.0, k)
      sigma = jnp.asarray(lr, plane.a.dtype)
      result = _transport(plane, moved, sigma, point_radius, eager_e6=True)
      return result, list(zip(result.mix, mix, strict=True))

    new_updates, trace, (mix,) = _fused_step(
      updates,
      state.trace,
      params,
      [state.mix],
      omega,
      point_axes,
      _radius_for_step(radius, state.radius),
      column_step,
    )
    count = optax.safe_increment(state.count)
    return new_updates, state._replace(count=count, trace=trace, mix=mix)

  return optax.GradientTransformation(init_fn, update_fn)


def adamg_manifold_update(
  learning_rate: optax.ScalarOrSchedule,
  *,
  b1: ArrayLike = 0.9,
  b2: ArrayLike = 0.99,
  eps: ArrayLike = 1e-8,
  grad_clip: ArrayLike | None = 0.1,
  omega: ArrayLike = 0.0,
  point_axes: points.PointAxes = None,
  radius: ArrayLike | str | None = None,
) -> optax.GradientTransformation:
  r"""The Adam-G step of every column, fused and exact for every step size (Algorithm 2).

  For every column, with ``y = unit(w)``, ``m`` the first moment transported to ``y`` and step
  ``t``:

  .. math::
    \tilde m = \beta_1 m + (1-\beta_1)\hat h, \quad
    v \leftarrow \beta_2 v + (1-\beta_2)\lVert\hat h\rVert^2, \quad
    d = -\eta\,\tfrac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,\tfrac{\tilde m}{\sqrt{v+\epsilon}}, \\
    w \leftarrow \exp_y(d), \qquad m \leftarrow \mathrm{pt}_y(\tilde m; d)

  ((A1)-(A11) of ``docs/algorithm.md``; paper Eqs. 6-8), with one scalar ``v`` per column. It
  equals the chain ``add_orthogonality_gradient → project_to_tangent → grassmann_clip →
  grassmann_adam_moments → scale_by_learning_rate → exp_map_update`` while every step turns each
  column by less than π/2, and stays exact beyond.

  Args:
    learning_rate: η_G, or a schedule of the step count.
    b1: β1 in [0, 1).
    b2: β2 in [0, 1).
    eps: ε inside the square root.
    grad_clip: ν > 0, or ``None``.
    omega: ω of the orthogonality gradient; a Python 0 skips it.
    point_axes: the axes of each leaf that form one point: ``None`` (all but the last: the
      columns), an int or a tuple of ints, a pytree of those, or a callable ``params -> pytree``
      (section 10 of ``docs/algorithm.md``).
    radius: ``None`` (unit points, as in the paper), a positive number ``R``, or ``'init'``
      (each point keeps its norm at ``init``): points are stored at that norm, steps are angles.

  Returns:
    An :class:`optax.GradientTransformation` that needs ``params``; its state is an
    :class:`AdamgManifoldState`, whose ``count`` also drives the schedule.

  Example:
    >>> import jax, jax.numpy as jnp, optax, grassmann_optax as go
    >>> w = go.unit_initializer()(jax.random.key(0), (27, 8))
    >>> tx = go.adamg_manifold_update(0.05)
    >>> u, state = tx.update(jnp.ones_like(w), tx.init(w), w)
    >>> state.nu.shape
    (8,)

  References:
    Cho & Lee, "Riemannian approach to batch normalization", NeurIPS 2017, arXiv:1709.09603.
  """
  checks.check_hyperparameters(b1=b1, b2=b2, eps=eps, grad_clip=grad_clip, omega=omega)
  checks.check_radius(radius)

  def init_fn(params):
    layouts = transforms.check_init(params, 'adamg_manifold_update', point_axes)
    return AdamgManifoldState(
      count=jnp.zeros([], jnp.int32),
      mu=jax.tree.map(jnp.zeros_like, params),
      nu=transforms.per_point_zeros(params, layouts),
      mix=_mix_init(params, layouts),
      radius=_radius_state(radius, params, layouts),
    )

  def update_fn(updates, state, params=None):
    transforms.require_params(params)
    checks.check_update_trees(updates, params, state.mu, 'adamg_manifold_update')
    lr = _learning_rate(learning_rate, state.count)
    count = optax.safe_increment(state.count)

    def column_step(plane, point_radius, mix, v):
      k, h_sq = _clipped_gradient(plane, grad_clip)
      moved = _moved_buffer(plane, mix, b1, 1 - b1, k)
      v_new = b2 * v + (1 - b2) * h_sq
      t = count.astype(v_new.dtype)
      correction = jnp.sqrt(1 - b2**t) / (1 - b1**t)
      sigma = lr * correction / jnp.sqrt(v_new + eps)
      result = _transport(plane, moved, sigma, point_radius, eager_e6=False)
      return result, [*zip(result.mix, mix, strict=True), (v_new, v)]

    new_updates, mu, (mix, nu) = _fused_step(
      updates,
      state.mu,
      params,
      [state.mix, state.nu],
      omega,
      point_axes,
      _radius_for_step(radius, state.radius),
      column_step,
    )
    return new_updates, state._replace(count=count, mu=mu, nu=nu, mix=mix)

  return optax.GradientTransformation(init_fn, update_fn)
