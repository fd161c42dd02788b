"""Composable Optax transforms for SGD-G and Adam-G on G(1, n).

Each transform applies the per-column geometry of :mod:`manifold` to every leaf it is given (a leaf
of shape ``(..., p)`` holds ``p`` points of G(1, n), one per column of ``reshape(-1, p)``). Chained
as

  add_orthogonality_gradient -> project_to_tangent -> grassmann_clip
    -> grassmann_momentum | grassmann_adam_moments -> scale_by_learning_rate -> exp_map_update

they compute SGD-G and Adam-G of Cho & Lee, "Riemannian approach to batch normalization",
NeurIPS 2017 (arXiv:1709.09603), Algorithms 1 and 2, while every step turns each column by less
than π/2 (the buffers are transported lazily, (T1) of ``docs/algorithm.md``). The fused updates
:func:`sgdg_manifold_update` and :func:`adamg_manifold_update` are exact for every step. Apply
the transforms only to the manifold leaves, e.g. through :func:`optax.partition`.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from grassmann_optax._src import checks, manifold, points

# The message of optax's own transforms that need params (``optax._src.base.NO_PARAMS_MSG``,
# no longer exported at the top level).
NO_PARAMS_MSG = (
  'You are using a transformation that requires the current value of parameters, but you are '
  'not passing `params` when calling `update`.'
)


def require_params(params):
  if params is None:
    raise ValueError(NO_PARAMS_MSG)


def _check_params(updates, params, name: str) -> None:
  require_params(params)
  checks.check_same_tree(updates, params, 'the updates', 'the params', name)


def _init_checked(name: str, point_axes):
  def init_fn(params):
    check_init(params, name, point_axes)
    return optax.EmptyState()

  return init_fn


def check_init(params, name: str, point_axes) -> list[points.Layout]:
  """The layouts of the leaves of ``params``, after checking that they are manifold leaves."""
  layouts = points.resolve(params, point_axes)
  checks.check_manifold_leaves(params, name, layouts)
  return layouts


def map_leaves(fn, layouts: list[points.Layout], tree, *rest, outputs: int = 1):
  """``fn(layout, leaf, *rest_leaves)`` for every leaf of ``tree``; a tree (or ``outputs`` trees).

  ``rest`` are trees with the structure of ``tree``.
  """
  leaves, treedef = jax.tree.flatten(tree)
  others = [treedef.flatten_up_to(other) for other in rest]
  out = [fn(layout, *args) for layout, *args in zip(layouts, leaves, *others, strict=True)]
  if outputs == 1:
    return treedef.unflatten(out)
  return (
    tuple(treedef.unflatten(list(column)) for column in zip(*out, strict=True))
    if out
    else ((tree,) * outputs)
  )


def per_point_zeros(params, layouts: list[points.Layout]):
  """One zero per point (float32 or wider), shaped by the batch axes of each leaf."""

  def zeros(layout, w):
    return jnp.zeros(layout.batch_shape(w.shape), manifold.compute_dtype(w))

  return map_leaves(zeros, layouts, params)


def broadcast_per_point(value, layout: points.Layout, like):
  """A per-point array (batch-axes shape) reshaped to broadcast against its leaf ``like``."""
  return value.reshape(layout.per_point_shape(like.shape))


def is_static_zero(value) -> bool:
  return isinstance(value, (int, float)) and value == 0


def add_orthogonality_gradient(
  omega: ArrayLike, *, point_axes: points.PointAxes = None
) -> optax.GradientTransformation:
  r"""Adds the gradient of the orthogonality penalty to the updates.

  For each leaf viewed as ``W ∈ R^{n×p}`` with ``Y = unit(W)`` (columns scaled to unit norm),

  .. math::
    g \leftarrow g + 2\omega\,(Y Y^\top Y - Y),

  the gradient of :math:`\tfrac{\omega}{2}\lVert Y^\top Y - I_p\rVert_F^2` ((R1), (R2) of
  ``docs/algorithm.md``). Adding it to the gradient, as the original PyTorch optimizer does,
  leaves the loss untouched; use :func:`orthogonality_penalty` to log the value. A Python
  ``omega == 0`` returns :func:`optax.identity` and costs nothing.

  With other ``point_axes``, ``W`` is the matrix of the points of one group (one column per
  point), and the term couples only the points of a group.

  Args:
    omega: penalty strength ω >= 0 (0.1 in every recipe of the paper).
    point_axes: the axes of each leaf that form one point: ``None`` (all but the last: the
      columns), an int or a tuple of ints, a pytree of those, or a callable ``params -> pytree``
      (see ``docs/algorithm.md``, section 10).

  Returns:
    An :class:`optax.GradientTransformation` that needs ``params``.

  Example:
    >>> import jax.numpy as jnp, optax, grassmann_optax as go
    >>> w = jnp.eye(3)[:, :2] + 0.1
    >>> tx = go.add_orthogonality_gradient(0.1)
    >>> g, _ = tx.update(jnp.zeros_like(w), tx.init(w), w)
    >>> bool(jnp.abs(g).max() > 0)
    True

  References:
    Cho & Lee, "Riemannian approach to batch normalization", NeurIPS 2017, arXiv:1709.09603.
  """
  checks.check_hyperparameters(omega=omega)
  if is_static_zero(omega):
    return optax.identity()

  def update_fn(updates, state, params=None):
    _check_params(updates, params, 'add_orthogonality_gradient')

    def add(layout, g, w):
      term = manifold.orthogonality_gradient(manifold.upcast(w), omega, layout.point)
      return (manifold.upcast(g) + term).astype(g.dtype)

    return map_leaves(add, points.resolve(params, point_axes), updates, params), state

  init_fn = _init_checked('add_orthogonality_gradient', point_axes)
  return optax.GradientTransformation(init_fn, update_fn)


def project_to_tangent(*, point_axes: points.PointAxes = None) -> optax.GradientTransformation:
  r"""Projects each column of the updates onto the tangent space at ``unit(w)``.

  .. math::
    h = g - (y^\top g)\, y, \qquad y = w / (\lVert w\rVert + 10^{-8}),

  the Riemannian gradient on G(1, n) (paper Eq. 6; (G3) of ``docs/algorithm.md``). ``g`` is the
  gradient at the stored ``w``, not rescaled by ``‖w‖``, as in the original optimizers. The inner
  product does not overflow for gradients up to the dtype's maximum; ``h`` is stored in the
  gradient's dtype, so an element of ``h`` beyond its range (possible only for gradients within
  a factor of about 2 of that maximum) becomes infinite. The fused updates never store ``h``.

  Args:
    point_axes: the axes of each leaf that form one point: ``None`` (all but the last: the
      columns), an int or a tuple of ints, a pytree of those, or a callable ``params -> pytree``
      (see ``docs/algorithm.md``, section 10).

  Returns:
    An :class:`optax.GradientTransformation` that needs ``params``.

  Example:
    >>> import jax.numpy as jnp, grassmann_optax as go
    >>> w, g = jnp.array([[1.0], [0.0]]), jnp.array([[3.0], [4.0]])
    >>> tx = go.project_to_tangent()
    >>> h, _ = tx.update(g, tx.init(w), w)
    >>> h.tolist()
    [[0.0], [4.0]]

  References:
    Cho & Lee, "Riemannian approach to batch normalization", NeurIPS 2017, arXiv:1709.09603.
  """

  def update_fn(updates, state, params=None):
    _check_params(updates, params, 'project_to_tangent')

    def proj(layout, g, w):
      y, _ = manifold.unit(manifold.upcast(w), layout.point)
      return manifold.project(y, manifold.upcast(g), layout.point).astype(g.dtype)

    return map_leaves(proj, points.resolve(params, point_axes), updates, params), state

  return optax.GradientTransformation(_init_checked('project_to_tangent', point_axes), update_fn)


def grassmann_clip(
  max_norm: ArrayLike | None, *, point_axes: points.PointAxes = None
) -> optax.GradientTransformation:
  r"""Clips the norm of every column separately.

  .. math::
    \hat h = h \cdot \min(1, \nu / \lVert h\rVert)

  per column ((G4) of ``docs/algorithm.md``). Applied to the projected gradient, before any
  learning rate, so a fresh gradient turns a column by at most ``η·ν`` radians. Columns whose sum
  of squares overflows are scaled by a power of two first, so a finite ``h`` of any size gets the
  clipped column of the same ``h`` scaled down. ``None`` disables clipping.

  Args:
    max_norm: the threshold ν > 0 (0.1 in every recipe of the paper), or ``None``.
    point_axes: the axes of each leaf that form one point: ``None`` (all but the last: the
      columns), an int or a tuple of ints, a pytree of those, or a callable ``params -> pytree``
      (see ``docs/algorithm.md``, section 10).

  Returns:
    An :class:`optax.GradientTransformation`.

  Example:
    >>> import jax.numpy as jnp, grassmann_optax as go
    >>> tx = go.grassmann_clip(1.0)
    >>> h, _ = tx.update(jnp.array([[3.0, 0.3], [4.0, 0.4]]), tx.init(None))
    >>> jnp.linalg.norm(h, axis=0).round(3)  # the first column had norm 5, the second 0.5
    Array([1. , 0.5], dtype=float32)

  References:
    Cho & Lee, "Riemannian approach to batch normalization", NeurIPS 2017, arXiv:1709.09603.
  """
  checks.check_hyperparameters(grad_clip=max_norm)
  if max_norm is None:
    return optax.identity()

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params

    def clip(layout, h):
      return manifold.clip_by_column_norm(manifold.upcast(h), max_norm, layout.point).astype(
        h.dtype
      )

    return map_leaves(clip, points.resolve(updates, point_axes), updates), state

  return optax.GradientTransformation(init_fn, update_fn)


class GrassmannMomentumState(NamedTuple):
  """State of :func:`grassmann_momentum`: the buffer, tangent at the point it was last used."""

  trace: optax.Params


def grassmann_momentum(
  decay: ArrayLike = 0.9, *, point_axes: points.PointAxes = None
) -> optax.GradientTransformation:
  r"""Heavy-ball momentum on G(1, n), with the buffer transported between steps.

  With ``b`` the buffer of the previous step and ``y`` the current point,

  .. math::
    b \leftarrow \gamma\, \mathrm{pt}(b) + \hat h, \qquad
    \mathrm{pt}(b) = \lVert b\rVert\, P_y(b) / \lVert P_y(b)\rVert,

  where :math:`P_y(b) = b - (y^\top b) y` ((S5), (T1) of ``docs/algorithm.md``; paper Eq. 9).

  The buffer is in gradient units and the learning rate is applied afterwards, as in
  :func:`optax.trace`; the originals store ``−η b`` instead. The two agree for a constant rate;
  with a schedule, this transform applies the new rate to the whole buffer at once.

  **Limit: steps below π/2.** The transform sees only the new point, not the step that led
  there, so it transports its buffer lazily, at the start of the next update, by (T1). That
  equals the originals' parallel transport while every step turns each column by less than π/2,
  up to their factor ``θ/(θ + 10⁻⁸)`` (a relative ``10⁻⁸/θ`` per step); for a step of π/2 or
  more the transported buffer has the wrong sign. With clipping ``ν`` a step turns a column by
  at most ``η ν/(1 − γ)``, far below π/2 in the paper's recipes. Without clipping, or with large
  rates, use :func:`sgdg_manifold_update` (or :func:`sgdg`), which is exact for every step.

  Args:
    decay: the momentum γ in [0, 1] (0.9 in the paper).
    point_axes: the axes of each leaf that form one point: ``None`` (all but the last: the
      columns), an int or a tuple of ints, a pytree of those, or a callable ``params -> pytree``
      (see ``docs/algorithm.md``, section 10).

  Returns:
    An :class:`optax.GradientTransformation` that needs ``params``. It must be followed only by a
    positive scaling (the learning rate) and :func:`exp_map_update`, so that the next step
    really is along ``−b``.

  Example:
    >>> import jax.numpy as jnp, grassmann_optax as go
    >>> w = jnp.array([[1.0], [0.0]])
    >>> tx = go.grassmann_momentum(0.9)
    >>> b, state = tx.update(jnp.array([[0.0], [1.0]]), tx.init(w), w)
    >>> b.tolist()
    [[0.0], [1.0]]

  References:
    Cho & Lee, "Riemannian approach to batch normalization", NeurIPS 2017, arXiv:1709.09603.
  """
  checks.check_hyperparameters(momentum=decay)

  def init_fn(params):
    check_init(params, 'grassmann_momentum', point_axes)
    return GrassmannMomentumState(trace=jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None):
    require_params(params)
    checks.check_update_trees(updates, params, state.trace, 'grassmann_momentum')

    def step(layout, g, b, w):
      y, _ = manifold.unit(manifold.upcast(w), layout.point)
      carried = manifold.transport_to(y, manifold.upcast(b), layout.point)
      new = decay * carried + manifold.upcast(g)
      return new.astype(g.dtype), new.astype(b.dtype)

    layouts = points.resolve(params, point_axes)
    new_updates, trace = map_leaves(step, layouts, updates, state.trace, params, outputs=2)
    return new_updates, GrassmannMomentumState(trace=trace)

  return optax.GradientTransformation(init_fn, update_fn)


class GrassmannAdamMomentsState(NamedTuple):
  """State of :func:`grassmann_adam_moments`.

  Attributes:
    count: number of updates so far (``t``), int32.
    mu: first moment, tangent at the point it was last used; the shape of the params.
    nu: one scalar second moment per point, float32 or wider, shaped by the batch axes of each
      leaf (``params.shape[-1:]`` for columns).
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates


def grassmann_adam_moments(
  b1: ArrayLike = 0.9,
  b2: ArrayLike = 0.99,
  eps: ArrayLike = 1e-8,
  *,
  point_axes: points.PointAxes = None,
) -> optax.GradientTransformation:
  r"""Adam-G moments: a transported first moment and one scalar second moment per column.

  For each column, with ``t`` the step number (1, 2, ...),

  .. math::
    m &\leftarrow \beta_1\,\mathrm{pt}(m) + (1-\beta_1)\,\hat h, \\
    v &\leftarrow \beta_2\, v + (1-\beta_2)\,\lVert \hat h\rVert^2, \\
    \text{out} &= \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\;\frac{m}{\sqrt{v + \epsilon}},

  with ε inside the square root and the bias correction folded into the step ((A5)-(A8) of
  ``docs/algorithm.md``). ``pt`` transports ``m`` along the last step as in
  :func:`grassmann_momentum` (paper Eq. 8). Follow it with a learning rate and
  :func:`exp_map_update`.

  **Limit: steps below π/2.** As for :func:`grassmann_momentum`, ``m`` is transported lazily
  by (T1): exact while every step turns each column by less than π/2 (up to about ``10⁻⁸`` per
  step, from the originals' ε), wrong in sign beyond. A step of Adam-G turns a column by about
  ``η`` times the bias correction, below π/2 unless the rate is large.
  :func:`adamg_manifold_update` (and :func:`adamg`) are exact for every step.

  Args:
    b1: β1 in [0, 1) (the paper passes its momentum, 0.9).
    b2: β2 in [0, 1) (0.99 in both originals).
    eps: ε >= 0, added to ``v`` under the square root.
    point_axes: the axes of each leaf that form one point: ``None`` (all but the last: the
      columns), an int or a tuple of ints, a pytree of those, or a callable ``params -> pytree``
      (see ``docs/algorithm.md``, section 10).

  Returns:
    An :class:`optax.GradientTransformation` that needs ``params``.

  Example:
    >>> import jax.numpy as jnp, grassmann_optax as go
    >>> w = jnp.array([[1.0], [0.0]])
    >>> tx = go.grassmann_adam_moments()
    >>> out, state = tx.update(jnp.array([[0.0], [0.5]]), tx.init(w), w)
    >>> out.round(4).tolist()  # first step has unit norm per column
    [[0.0], [1.0]]

  References:
    Cho & Lee, "Riemannian approach to batch normalization", NeurIPS 2017, arXiv:1709.09603.
  """
  checks.check_hyperparameters(b1=b1, b2=b2, eps=eps)

  def init_fn(params):
    layouts = check_init(params, 'grassmann_adam_moments', point_axes)
    return GrassmannAdamMomentsState(
      count=jnp.zeros([], jnp.int32),
      mu=jax.tree.map(jnp.zeros_like, params),
      nu=per_point_zeros(params, layouts),
    )

  def update_fn(updates, state, params=None):
    require_params(params)
    checks.check_update_trees(updates, params, state.mu, 'grassmann_adam_moments')
    count = optax.safe_increment(state.count)

    def step(layout, g, m, v, w):
      g = manifold.upcast(g)
      y, _ = manifold.unit(manifold.upcast(w), layout.point)
      t = count.astype(g.dtype)
      correction = jnp.sqrt(1 - b2**t) / (1 - b1**t)
      m_new = b1 * manifold.transport_to(y, manifold.upcast(m), layout.point) + (1 - b1) * g
      v_new = b2 * broadcast_per_point(v, layout, w) + (1 - b2) * manifold.column_dot(
        g, g, layout.point
      )
      out = correction * m_new / jnp.sqrt(v_new + eps)
      return out.astype(w.dtype), m_new.astype(m.dtype), v_new.reshape(v.shape)

    layouts = points.resolve(params, point_axes)
    new_updates, mu, nu = map_leaves(step, layouts, updates, state.mu, state.nu, params, outputs=3)
    return new_updates, GrassmannAdamMomentsState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


class ExpMapUpdateState(NamedTuple):
  """State of :func:`exp_map_update`: the radius of every point (``radius='init'`` only)."""

  radius: optax.Params


def exp_map_update(
  *, point_axes: points.PointAxes = None, radius: ArrayLike | str | None = None
) -> optax.GradientTransformation:
  r"""Turns a tangent step ``d`` into the additive update that moves along the geodesic.

  .. math::
    u = \exp_y(d) - w, \qquad \exp_y(d) = y\cos\theta + \frac{d}{\theta+10^{-8}}\sin\theta,
    \quad \theta = \lVert d\rVert,\ y = \mathrm{unit}(w),

  per column (paper Eq. 7; (G5), (S1) of ``docs/algorithm.md``), so that
  ``optax.apply_updates`` lands exactly on the geodesic and re-normalises a stored ``w`` that was
  not unit. It must be the last transform of its chain.

  With ``radius``, each point is kept at that norm instead of 1: ``u = R·exp_y(d) − w``. The
  steps are angles, as on the unit sphere: the radius only scales where a point is stored.

  Args:
    point_axes: the axes of each leaf that form one point: ``None`` (all but the last: the
      columns), an int or a tuple of ints, a pytree of those, or a callable ``params -> pytree``
      (see ``docs/algorithm.md``, section 10).
    radius: ``None`` (unit points, as in the paper), a positive number ``R``, or ``'init'``:
      each point keeps the norm it has when ``init`` is called (kept in the state).

  Returns:
    An :class:`optax.GradientTransformation` that needs ``params``.

  Example:
    >>> import jax.numpy as jnp, optax, grassmann_optax as go
    >>> w = jnp.array([[2.0], [0.0]])
    >>> tx = go.exp_map_update()
    >>> u, _ = tx.update(jnp.array([[0.0], [jnp.pi / 2]]), tx.init(w), w)
    >>> optax.apply_updates(w, u).round(6).tolist()
    [[0.0], [1.0]]

  References:
    Cho & Lee, "Riemannian approach to batch normalization", NeurIPS 2017, arXiv:1709.09603.
  """

  checks.check_radius(radius)

  def init_fn(params):
    layouts = check_init(params, 'exp_map_update', point_axes)
    if radius != 'init':
      return optax.EmptyState()
    return ExpMapUpdateState(radius=initial_radius(params, layouts))

  def update_fn(updates, state, params=None):
    _check_params(updates, params, 'exp_map_update')
    radii = state.radius if radius == 'init' else None

    def move(layout, d, w, *r):
      w = manifold.upcast(w)
      y, _ = manifold.unit(w, layout.point)
      moved = manifold.exp_map(y, manifold.upcast(d), layout.point)
      scale = broadcast_per_point(r[0], layout, w) if r else radius
      if scale is not None:
        moved = scale * moved
      return (moved - w).astype(d.dtype)

    layouts = points.resolve(params, point_axes)
    trees = (updates, params) if radii is None else (updates, params, radii)
    return map_leaves(move, layouts, *trees), state

  return optax.GradientTransformation(init_fn, update_fn)


def initial_radius(params, layouts: list[points.Layout]):
  """The norm of every point of ``params``, shaped by the batch axes of each leaf."""

  def norm(layout, w):
    norm = manifold.column_norm(manifold.upcast(w), layout.point)
    return norm.reshape(layout.batch_shape(w.shape))

  return map_leaves(norm, layouts, params)
