"""The pieces of SGD-G and Adam-G that need no buffer, as Optax transforms.

Each applies one per-point operation of :mod:`manifold` to every leaf it is given (by default a
leaf of shape ``(..., p)`` holds the ``p`` columns of ``reshape(-1, p)``, each a point of
G(1, n)). The steps with a buffer, :func:`grassmann_sgd` and :func:`grassmann_adam`, project and
clip themselves and end with the geodesic step; these pieces serve the orthogonality term that
goes before them (:func:`add_orthogonality_gradient`) and optimizers without a buffer, such as
Riemannian SGD::

  optax.chain(project_to_tangent(), grassmann_clip(0.1), optax.scale_by_learning_rate(0.1),
              exp_map_update())

Cho & Lee, "Riemannian approach to batch normalization", NeurIPS 2017 (arXiv:1709.09603).
"""

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from grassmann_optax._src import (
  checks,
  docstrings,
  manifold,
  points,
  sharding,
  stacks,
  steps,
)
from grassmann_optax._src import labels as labels_lib


def map_leaves(fn, layouts: list[points.Layout], tree, *rest):
  """``fn(layout, leaf, *rest_leaves)`` for every leaf of ``tree``; ``rest`` are trees alike."""
  leaves, treedef = jax.tree.flatten(tree)
  others = [treedef.flatten_up_to(other) for other in rest]
  return treedef.unflatten(
    [fn(layout, *args) for layout, *args in zip(layouts, leaves, *others, strict=True)]
  )


def _checked_init(name: str, point_axes, mesh_axes=None, *, undercomplete: bool = False):
  def init_fn(params):
    layouts = points.resolve(params, point_axes, mesh_axes)
    checks.check_manifold_leaves(params, name, layouts, undercomplete=undercomplete)
    return optax.EmptyState()

  return init_fn


def _require(updates, params, name: str) -> None:
  steps.require_params(params)
  checks.check_same_tree(updates, params, 'the updates', 'the params', name)
  checks.check_real_updates(updates, name)


def _layouts(tree, point_axes, mesh_axes, name: str) -> list[points.Layout]:
  """The layouts of ``tree``'s leaves, after checking, inside ``shard_map``, that every leaf that
  differs between devices says how it is split."""
  sharding.check_split(tree, sharding.resolve(tree, mesh_axes), name)
  return points.resolve(tree, point_axes, mesh_axes)


def is_static(value) -> bool:
  """A hyper-parameter known when the optimizer is built: a Python number, a NumPy scalar or a
  0-d NumPy array. A JAX array is not (``optax.inject_hyperparams`` makes every numeric
  hyper-parameter one, and may change it between steps)."""
  return isinstance(value, numbers.Real | np.generic | np.ndarray) and np.ndim(value) == 0


def is_static_zero(value) -> bool:
  return is_static(value) and float(value) == 0


@docstrings.fill
def add_orthogonality_gradient(
  omega: ArrayLike, *, point_axes: points.PointAxes = None, mesh_axes: Any = None
) -> optax.GradientTransformationExtraArgs:
  r"""Adds the gradient of the orthogonality penalty to the updates.

  For each group of points viewed as the columns of ``W ∈ R^{n×p}``, with ``Y = unit(W)``,

  .. math::
    g \leftarrow g + 2\omega\,(Y Y^\top Y - Y),

  the gradient of :math:`\tfrac{\omega}{2}\lVert Y^\top Y - I_p\rVert_F^2` ((R1), (R2) of
  ``docs/algorithm.md``; the poster's "Regularization on G(1, n)"). Adding it to the gradient, as
  the original PyTorch optimizer does, leaves the loss untouched; use
  :func:`orthogonality_penalty` to log the value. A Python ``omega == 0`` returns
  :func:`optax.identity` and costs nothing. The ``p`` points of a group can be orthogonal only if
  they have at least ``p`` elements each; ``init`` refuses a leaf with fewer, and, as the paper's
  rule of fan-in larger than outputs does, a square one.

  Args:
    omega: penalty strength ω >= 0 (0.1 in every recipe of the paper).
    point_axes: {{point_axes}}
    mesh_axes: {{mesh_axes}}

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` that needs ``params``.

  Example:
    >>> import jax.numpy as jnp, optax, grassmann_optax as go
    >>> w = jnp.eye(3)[:, :2] + 0.1
    >>> tx = go.add_orthogonality_gradient(0.1)
    >>> g, _ = tx.update(jnp.zeros_like(w), tx.init(w), w)
    >>> bool(jnp.abs(g).max() > 0)
    True

  {{references}}
  """
  checks.check_hyperparameters(omega=omega)
  points.check_spec_tree(point_axes)
  sharding.check_spec_tree(mesh_axes)
  if is_static_zero(omega):
    return optax.with_extra_args_support(optax.identity())

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _require(updates, params, 'add_orthogonality_gradient')

    def add(layout, g, w):
      w32 = manifold.upcast(w)
      if layout.split:  # inside shard_map, with the mesh axes named
        term = manifold.orthogonality_gradient(
          w32, omega, layout.point, layout.point_mesh, layout.member_mesh
        )
      else:
        term = sharding.orthogonality_gradient(w32, omega, layout.point)
      return (manifold.upcast(g) + term).astype(g.dtype)

    layouts = _layouts(params, point_axes, mesh_axes, 'add_orthogonality_gradient')
    g_leaves, treedef = jax.tree.flatten(updates)
    w_leaves = treedef.flatten_up_to(params)
    out = [None] * len(g_leaves)
    for stack in stacks.plan(layouts, w_leaves, g_leaves):
      layout = layouts[stack.first]
      if stack.alone or layout.split or not layout.batch:
        for i in stack.members:
          out[i] = add(layouts[i], g_leaves[i], w_leaves[i])
        continue
      # Equal small leaves as one stack, each leaf a group of its own (a new leading batch
      # axis): two batched matrix products instead of two per leaf.
      new = add(stack.layout(layouts), stack.pick(g_leaves), stack.pick(w_leaves))
      stack.scatter(new, out)
    return treedef.unflatten(out), state

  init_fn = _checked_init('add_orthogonality_gradient', point_axes, mesh_axes, undercomplete=True)
  return optax.GradientTransformationExtraArgs(init_fn, sharding.explicit_axes_as_auto(update_fn))


@docstrings.fill
def project_to_tangent(
  *, point_axes: points.PointAxes = None, mesh_axes: Any = None
) -> optax.GradientTransformationExtraArgs:
  r"""Projects each point of the updates onto the tangent space at ``unit(w)``.

  .. math::
    h = g - (y^\top g)\, y, \qquad y = w / (\lVert w\rVert + 10^{-8}),

  the Riemannian gradient on G(1, n) (paper Eq. 6; (G3) of ``docs/algorithm.md``). ``g`` is the
  gradient at the stored ``w``, not rescaled by ``‖w‖``, as in the original optimizers. The inner
  product does not overflow for gradients up to the dtype's maximum; ``h`` is stored in the
  gradient's dtype. :func:`grassmann_sgd` and :func:`grassmann_adam` project themselves.

  Args:
    point_axes: {{point_axes}}
    mesh_axes: {{mesh_axes}}

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` that needs ``params``.

  Example:
    >>> import jax.numpy as jnp, grassmann_optax as go
    >>> w, g = jnp.array([[1.0], [0.0]]), jnp.array([[3.0], [4.0]])
    >>> tx = go.project_to_tangent()
    >>> h, _ = tx.update(g, tx.init(w), w)
    >>> h.tolist()
    [[0.0], [4.0]]

  {{references}}
  """
  points.check_spec_tree(point_axes)
  sharding.check_spec_tree(mesh_axes)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _require(updates, params, 'project_to_tangent')

    def proj(layout, g, w):
      h = manifold.project(manifold.upcast(w), manifold.upcast(g), layout.point, layout.point_mesh)
      return h.astype(g.dtype)

    layouts = _layouts(params, point_axes, mesh_axes, 'project_to_tangent')
    return map_leaves(proj, layouts, updates, params), state

  init_fn = _checked_init('project_to_tangent', point_axes, mesh_axes)
  return optax.GradientTransformationExtraArgs(init_fn, sharding.explicit_axes_as_auto(update_fn))


@docstrings.fill
def grassmann_clip(
  max_norm: ArrayLike | None, *, point_axes: points.PointAxes = None, mesh_axes: Any = None
) -> optax.GradientTransformationExtraArgs:
  r"""Clips the norm of every point separately.

  .. math::
    \hat h = h \cdot \min(1, \nu / \lVert h\rVert)

  per point ((G4) of ``docs/algorithm.md``). Applied to the projected gradient, before any
  learning rate, so a fresh gradient turns a point by at most ``η·ν`` radians. A point whose sum
  of squares is too large for float arithmetic is divided by a power of two first, so every
  finite ``h`` gets the clipped point of the same ``h`` scaled down. ``None`` disables clipping.

  Args:
    max_norm: {{grad_clip}}
    point_axes: {{point_axes}}
    mesh_axes: {{mesh_axes}}

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax.numpy as jnp, grassmann_optax as go
    >>> tx = go.grassmann_clip(1.0)
    >>> h, _ = tx.update(jnp.array([[3.0, 0.3], [4.0, 0.4]]), tx.init(None))
    >>> jnp.linalg.norm(h, axis=0).round(3)  # the first column had norm 5, the second 0.5
    Array([1. , 0.5], dtype=float32)

  {{references}}
  """
  checks.check_hyperparameters(max_norm=max_norm)
  points.check_spec_tree(point_axes)
  sharding.check_spec_tree(mesh_axes)
  if max_norm is None:
    return optax.with_extra_args_support(optax.identity())

  def init_fn(params):
    points.resolve(params, point_axes)  # a spec that does not fit fails here, not at update
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args

    def clip(layout, h):
      if h.size == 0:  # no points: nothing to clip
        return h
      h32 = manifold.upcast(h)
      clipped = manifold.clip_by_column_norm(h32, max_norm, layout.point, layout.point_mesh)
      return clipped.astype(h.dtype)

    checks.check_real_updates(updates, 'grassmann_clip')
    layouts = _layouts(updates, point_axes, mesh_axes, 'grassmann_clip')
    return map_leaves(clip, layouts, updates), state

  return optax.GradientTransformationExtraArgs(init_fn, sharding.explicit_axes_as_auto(update_fn))


class ExpMapUpdateState(NamedTuple):
  """State of :func:`exp_map_update` with ``radius='init'`` (otherwise its state is
  :class:`optax.EmptyState`).

  Attributes:
    radius: the norm of every point at ``init``, per leaf, shaped by the axes that index points.
  """

  radius: optax.Params


@docstrings.fill
def exp_map_update(
  *,
  point_axes: points.PointAxes = None,
  radius: ArrayLike | str | None = None,
  mesh_axes: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Turns a tangent step ``d`` into the additive update that moves along the geodesic.

  .. math::
    u = R\exp_y(d) - w, \qquad \exp_y(d) = y\cos\theta + \frac{d}{\theta+10^{-8}}\sin\theta,
    \quad \theta = \lVert d\rVert,\ y = \mathrm{unit}(w),

  per point (paper Eq. 7; (G5), (S1) of ``docs/algorithm.md``), so that
  ``optax.apply_updates`` lands exactly on the geodesic and re-normalises a stored ``w`` that was
  not unit. It must be the last transform of its chain. A point shorter than ε (a zero point)
  has no direction: it moves to ``R·d/‖d‖``, on the sphere.

  It keeps no buffer. The steps with a buffer, :func:`grassmann_sgd` and :func:`grassmann_adam`,
  end with their own geodesic step, because they must transport the buffer along it.

  Args:
    point_axes: {{point_axes}}
    radius: {{radius}}
    mesh_axes: {{mesh_axes}}

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` that needs ``params``.

  Example:
    >>> import jax.numpy as jnp, optax, grassmann_optax as go
    >>> w = jnp.array([[2.0], [0.0]])
    >>> tx = go.exp_map_update()
    >>> u, _ = tx.update(jnp.array([[0.0], [jnp.pi / 2]]), tx.init(w), w)
    >>> optax.apply_updates(w, u).round(6).tolist()
    [[0.0], [1.0]]

  {{references}}
  """
  checks.check_radius(radius)
  points.check_spec_tree(point_axes)
  sharding.check_spec_tree(mesh_axes)

  def init_fn(params):
    layouts = steps.check_init(params, 'exp_map_update', point_axes, mesh_axes)
    if not isinstance(radius, str):
      return optax.EmptyState()
    return ExpMapUpdateState(radius=steps.initial_radius(params, layouts, 'exp_map_update'))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _require(updates, params, 'exp_map_update')

    def move(layout, d, w, *r):
      w32 = manifold.upcast(w)
      scale = r[0].reshape(layout.per_point_shape(w.shape)) if r else radius
      moved = manifold.exp_map(w32, manifold.upcast(d), layout.point, scale, layout.point_mesh)
      return (moved - w32).astype(d.dtype)

    layouts = _layouts(params, point_axes, mesh_axes, 'exp_map_update')
    if isinstance(radius, str):
      checks.check_radii(params, state.radius, layouts, 'exp_map_update')
    trees = (updates, params) if not isinstance(radius, str) else (updates, params, state.radius)
    return map_leaves(move, layouts, *trees), state

  return optax.GradientTransformationExtraArgs(init_fn, sharding.explicit_axes_as_auto(update_fn))


@docstrings.fill
def project_params(
  params: Any,
  param_labels: Any = None,
  *,
  point_axes: points.PointAxes = None,
  radius: ArrayLike | Any = None,
  mesh_axes: Any = None,
) -> Any:
  """Maps the manifold leaves of ``params`` back onto their sphere: each point to ``R·unit(w)``.

  For params that a wrapper moved off the manifold: the evaluation params of
  :func:`optax.contrib.schedule_free_eval_params`, the slow params of :func:`optax.lookahead`, an
  exponential moving average of params. Those are averages of points, and an average of unit
  vectors is shorter than 1. Other leaves are returned as they are, and so are a zero point
  (it has no direction) and a point holding NaN or inf (so that a diverged average stays
  visible). Points of any finite norm, 1e-30 or 1e30 in float32, are placed exactly.

  Args:
    params: a parameter pytree.
    param_labels: its labels (a tree or a callable ``params -> labels``, as the aliases take
      them); ``None`` for :func:`grassmann_labels`.
    point_axes: {{point_axes}}
    radius: ``None`` (unit points), a positive number, or a pytree with the structure of the
      manifold leaves' radii as a step's state holds them (``state.radius`` with
      ``radius='init'``, and a Hyperball step's; inside an alias's state,
      ``optax.tree_utils.tree_get(state, 'radius')``), one value per point; give ``point_axes`` as
      that step has them (a Hyperball alias's, by default: :func:`transformer_point_axes`).
    mesh_axes: {{mesh_axes}}

  Returns:
    ``params`` with every point of every manifold leaf at its radius.

  Example:
    >>> import jax.numpy as jnp, grassmann_optax as go
    >>> params = {'w': jnp.array([[0.6, 0.0], [0.0, 0.5]]), 'b': jnp.ones(2)}
    >>> go.project_params(params, {'w': 'grassmann', 'b': 'euclidean'})['w'].tolist()
    [[1.0, 0.0], [0.0, 1.0]]

  {{references}}
  """
  if isinstance(radius, str):
    raise TypeError(
      f'project_params: radius={radius!r}; give None, a number, or the per-point radii that a '
      "step with radius='init' keeps in its state (state.radius, or "
      "optax.tree_utils.tree_get(state, 'radius') for an alias's state)."
    )
  # A tree (even of one scalar, as a Hyperball state holds for one matrix) or an array of radii
  # is per point; a bare number is one radius for all.
  per_point = radius is not None and (
    not jax.tree_util.treedef_is_leaf(jax.tree.structure(radius)) or jnp.ndim(radius) > 0
  )
  if not per_point:
    checks.check_radius(radius)
  labels = labels_lib.resolve_labels(params, param_labels)
  # Unknown labels, and manifold leaves that cannot hold points (integer, complex, points of
  # one element), are refused as the aliases' init refuses them.
  labels_lib.check_labels(
    params,
    labels,
    require_undercomplete=False,
    point_axes=point_axes,
    mesh_axes=mesh_axes,
    name='project_params',
  )
  leaves, treedef = jax.tree.flatten(params)
  on = [label == labels_lib.GRASSMANN for label in treedef.flatten_up_to(labels)]
  # The manifold leaves only, as optax.partition hands them to a step: point_axes need not fit
  # the other leaves.
  masked = labels_lib.manifold_leaves(params, labels)
  layouts = _layouts(masked, point_axes, mesh_axes, 'project_params')
  named = checks.named_leaves(masked)
  if per_point:
    scales = _per_point_radii(radius, named, layouts)
  else:
    scales = [1 if radius is None else radius] * len(named)
  placed = []
  for (_, w), layout, scale in zip(named, layouts, scales, strict=True):
    direction = manifold.normalized(manifold.upcast(w), layout.point, layout.point_mesh)
    placed.append((scale * direction).astype(w.dtype))
  placed = iter(placed)
  return treedef.unflatten(
    [next(placed) if here else w for w, here in zip(leaves, on, strict=True)]
  )


def _per_point_radii(radius: Any, named: list, layouts: list[points.Layout]) -> list[jax.Array]:
  """The radii of :func:`project_params`, one array per manifold leaf shaped to broadcast
  against it, after checking that they are one positive finite value per point."""
  given = jax.tree.leaves(radius)
  if len(given) != len(named):
    raise ValueError(
      f'project_params: radius holds {len(given)} arrays of radii, but params have '
      f'{len(named)} manifold leaves. Pass the state.radius of the step (with '
      "radius='init') that holds these params (optax.tree_utils.tree_get(state, 'radius') "
      "for an alias's state), or a number."
    )
  scales = []
  for (name, w), layout, r in zip(named, layouts, given, strict=True):
    points_in_leaf = layout.num_points(w.shape)
    if jnp.size(r) != points_in_leaf:
      raise ValueError(
        f'project_params: the radii given for leaf {name!r} (shape {jnp.shape(r)}) are not '
        f'one per point: the leaf {tuple(w.shape)} has {points_in_leaf} points with these '
        "point_axes. Pass the state.radius of the step (with radius='init') that holds these "
        "params, and the point_axes that step uses (a Hyperball alias's: the last two axes, "
        '(-2, -1), but a head of an attention kernel).'
      )
    if not isinstance(r, jax.core.Tracer) and not bool(
      np.all(np.isfinite(np.asarray(r)) & (np.asarray(r) > 0))
    ):
      raise ValueError(
        f'project_params: the radii given for leaf {name!r} are not all positive and finite: '
        'a point lies on a sphere of radius > 0.'
      )
    scales.append(jnp.reshape(r, layout.per_point_shape(w.shape)))
  return scales
