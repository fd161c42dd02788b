"""Which parameters live on G(1, n): label trees for :func:`optax.partition`.

A label tree has the structure of the params and holds ``'grassmann'`` for a manifold leaf and
``'euclidean'`` for every other leaf. The label function is the one place where a model and the
optimizer meet.
"""

import itertools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from grassmann_optax._src import checks, docstrings, points

#: The label of a manifold leaf: each of its points is a unit vector of G(1, n) (a point of the
#: hyperball for :func:`adamh` and :func:`muonh`).
GRASSMANN = 'grassmann'
#: The label of every other leaf: stepped by the aliases' Euclidean optimizer.
EUCLIDEAN = 'euclidean'
LABELS = (GRASSMANN, EUCLIDEAN)

Predicate = Callable[[Any, Any], bool]
ParamLabels = Any | Callable[[Any], Any]


def is_undercomplete_conv(path: tuple[Any, ...], leaf: jax.Array) -> bool:
  """The paper's rule ((L1) of ``docs/algorithm.md``): a conv kernel with fan-in > outputs.

  ``leaf.ndim == 4`` (Flax ``[kh, kw, c_in, c_out]``) and ``kh·kw·c_in > c_out``, as in both
  originals, which give no reason (the target of the orthogonality penalty, mutually orthogonal
  unit columns, needs ``kh·kw·c_in >= c_out``).
  An integer or complex leaf is never one.

  Args:
    path: the leaf's key path in the params (unused: the rule looks at the shape only), as
      :func:`grassmann_labels` passes it to a predicate.
    leaf: the parameter array, or anything with a ``shape`` and a dtype.

  Example:
    >>> import jax.numpy as jnp, grassmann_optax as go
    >>> go.is_undercomplete_conv((), jnp.zeros((3, 3, 16, 143))), go.is_undercomplete_conv(
    ...     (), jnp.zeros((3, 3, 16, 144)))
    (True, False)
  """
  del path
  shape = tuple(jnp.shape(leaf))
  if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
    return False  # an integer or complex leaf cannot hold a real unit vector
  n, p = checks.fan_in_and_out(shape)
  return len(shape) == 4 and n > p


@docstrings.fill
def grassmann_labels(params: Any, *, predicate: Predicate | None = None) -> Any:
  """Labels each leaf ``'grassmann'`` or ``'euclidean'``.

  By default the rule of the paper's code ((L1)): conv kernels (``ndim == 4``) whose fan-in
  ``prod(shape[:-1])`` is strictly larger than their number of output units ``shape[-1]``.
  Dense kernels, biases and BatchNorm parameters are Euclidean.

  Works unchanged on Linen ``dict``/``FrozenDict`` trees and on ``flax.nnx.State``: the result
  has the structure of ``params``.

  Args:
    params: a parameter pytree.
    predicate: optional ``(path, leaf) -> bool`` replacing the default rule; ``path`` is the
      ``jax.tree_util`` key path of the leaf.

  Returns:
    A pytree of strings with the structure of ``params``.

  Example:
    >>> import jax.numpy as jnp, grassmann_optax as go
    >>> params = {'conv': jnp.zeros((3, 3, 16, 32)), 'dense': jnp.zeros((32, 10))}
    >>> go.grassmann_labels(params)
    {'conv': 'grassmann', 'dense': 'euclidean'}

  {{references}}
  """
  if predicate is not None and not callable(predicate):
    raise TypeError(
      f'grassmann_labels: predicate={predicate!r}: expected a callable (path, leaf) -> bool, '
      'or None for the default rule.'
    )
  rule = predicate or is_undercomplete_conv
  return jax.tree_util.tree_map_with_path(
    lambda path, leaf: GRASSMANN if rule(path, leaf) else EUCLIDEAN, params
  )


class ScaleInvariance(NamedTuple):
  """What :func:`find_scale_invariant` found: labels and point axes, as the aliases take them.

  ``go.adamg(lr, lr_g, **found._asdict())`` passes both.

  Attributes:
    param_labels: a pytree of ``'grassmann'`` and ``'euclidean'`` with the params' structure.
    point_axes: a pytree of the same structure holding, for each manifold leaf, its point axes
      (``None`` for the columns), and ``None`` elsewhere.
  """

  param_labels: Any
  point_axes: Any


def _candidate_layouts(ndim: int) -> list[tuple[int, ...]]:
  """Every non-empty set of point axes; the default (all but the last) and rows first."""
  default, rows = tuple(range(ndim - 1)), (ndim - 1,)
  subsets = [
    axes
    for size in range(1, ndim + 1)
    for axes in itertools.combinations(range(ndim), size)
    if axes not in (default, rows)
  ]
  return [default, rows, *subsets]


def _invariant_points(w: np.ndarray, g: np.ndarray, layout: points.Layout, tol: float) -> bool:
  """Euler's relation ``|⟨g_j, w_j⟩| <= tol ‖g_j‖ ‖w_j‖`` for every point ``j``."""
  axes = layout.point
  inner = np.abs(np.sum(w * g, axis=axes))
  bound = tol * np.sqrt(np.sum(w * w, axis=axes)) * np.sqrt(np.sum(g * g, axis=axes))
  return bool(np.all(inner <= bound))


def _perturbed(params: Any, seed: int) -> Any:
  """``params`` moved to a nearby generic point: each leaf plus 10% of its scale in noise.

  Leaves at zero (fresh biases) get noise of 1e-3: a network can be scale-invariant at zero
  biases only (a ReLU is positively homogeneous), which training does not keep.
  """
  rng = np.random.default_rng(seed)

  def move(x):
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
      return x
    scale = max(float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))), 1e-2) if x.size else 0
    return (x + 0.1 * scale * rng.standard_normal(x.shape)).astype(x.dtype)

  return jax.tree.map(move, params)


# What a loss function raises under ``jit`` when it uses a traced value as a Python value (an
# ``if`` on an argument, an integer step count) or gets a leaf ``jit`` cannot take: its gradient is
# then taken op by op, which raises the loss function's own error if it has one.
_NEEDS_CONCRETE = (
  TypeError,
  jax.errors.ConcretizationTypeError,
  jax.errors.TracerArrayConversionError,
  jax.errors.TracerIntegerConversionError,
)


def _float_gradients(loss_fn, args) -> Callable[[Any], list]:
  """``point -> gradients``: the gradient of every real floating-point leaf of ``point`` (None
  for the others: integer step counts, masks), as a list in the order of the leaves.

  The gradient is compiled once with ``jax.jit`` and reused for every point of one structure
  (the draws differ in values only); the arguments that are arrays are traced, the others (flags,
  strings) are fixed. A loss that needs concrete values gets its gradient op by op.
  """
  arg_leaves, arg_def = jax.tree.flatten(args)
  traced = [isinstance(a, (jax.Array, np.ndarray)) for a in arg_leaves]

  def loss_of(chosen, floating, fixed, treedef, arrays):
    chosen, fixed, arrays = iter(chosen), iter(fixed), iter(arrays)
    full = [next(chosen) if f else next(fixed) for f in floating]
    call_args = arg_def.unflatten(
      [next(arrays) if t else a for a, t in zip(arg_leaves, traced, strict=True)]
    )
    return loss_fn(treedef.unflatten(full), *call_args)

  compiled = jax.jit(jax.grad(loss_of), static_argnums=(1, 3))
  arrays = [a for a, t in zip(arg_leaves, traced, strict=True) if t]
  use_jit = True

  def gradients(point) -> list:
    nonlocal use_jit
    leaves, treedef = jax.tree.flatten(point)
    floating = tuple(bool(jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)) for x in leaves)
    chosen = [x for x, f in zip(leaves, floating, strict=True) if f]
    fixed = [x for x, f in zip(leaves, floating, strict=True) if not f]
    grads = None
    if use_jit:
      try:
        grads = compiled(chosen, floating, fixed, treedef, arrays)
      except _NEEDS_CONCRETE:
        use_jit = False
    if grads is None:
      grads = jax.grad(loss_of)(chosen, floating, fixed, treedef, arrays)
    grads = iter(grads)
    return [next(grads) if f else None for f in floating]

  return gradients


@docstrings.fill
def find_scale_invariant(
  loss_fn: Callable[..., jax.Array],
  params: Any,
  *args: Any,
  tol: float = 1e-3,
  undercomplete_only: bool = True,
  groupings: str = 'any',
  draws: int = 2,
  seed: int = 0,
) -> ScaleInvariance:
  r"""Finds the scale-invariant leaves, and how their points are grouped, from two gradients.

  If ``L(c·w_j) = L(w_j)`` for every ``c > 0`` and every point ``w_j`` (as for a conv kernel
  followed by BatchNorm, per column; a projection followed by a per-head RMSNorm, per head; a
  matrix followed by LayerNorm, as a whole), Euler's theorem for functions homogeneous of degree
  0 gives

  .. math::
    \langle \partial L/\partial w_j,\, w_j\rangle = 0

  for every point ``j``. For each leaf with ``ndim >= 2``, every grouping of its axes into point
  axes is tested, :math:`|\langle g_j, w_j\rangle| \le \mathrm{tol}\,\lVert g_j\rVert
  \lVert w_j\rVert` for every point, and the passing grouping with the most points wins (a
  leaf invariant per column is also invariant as a whole; the columns are the finer structure).
  A leaf whose gradient is identically zero tells nothing and stays Euclidean. The test is
  necessary, not sufficient: evaluate ``loss_fn`` in training mode (batch statistics), on a real
  batch. BatchNorm's ε breaks the invariance slightly (cosines of about ε/Var, measured up to
  4e-4): hence the default ``tol``. A point of ``n`` elements that is not invariant has, by
  chance, a cosine of about ``0.8/√n`` or less, which for a whole matrix (a single point of
  10⁴ elements and more) can fall below ``tol``; so each grouping must pass at ``draws``
  gradients: at ``params``, and at points near it (every leaf plus 10% of its scale in noise,
  from ``seed``), where a chance cosine does not repeat. Networks whose normalisations have a
  small ε (LayerNorm, RMSNorm, QK-norm) pass at much smaller ``tol`` (1e-5), which rules out
  chance cosines further.

  Args:
    loss_fn: ``loss_fn(params, *args) -> scalar``.
    params: parameters at which to evaluate the gradient.
    *args: further arguments of ``loss_fn`` (a batch, ...).
    tol: tolerance on the cosine between each point and its gradient (default 1e-3).
    undercomplete_only: also require the finest invariant grouping to have more elements per
      point than points per group (for the columns of a conv kernel: fan-in > outputs, the
      paper's rule (L1)), so that the result can be given to :func:`sgdg` and :func:`adamg` as
      is; a leaf whose finest grouping fails it stays Euclidean (a square kernel followed by
      BatchNorm, say), rather than being constrained along a coarser grouping.
    groupings: ``'any'`` (every grouping of the axes) or ``'columns'`` (only the columns of
      ``reshape(-1, shape[-1])``, the paper's layout).
    draws: how many gradients a grouping must pass at (``params``, then nearby points).
    seed: seed of the nearby points.

  Returns:
    A :class:`ScaleInvariance` of ``param_labels``, a label pytree with the structure of
    ``params``, and ``point_axes``, a pytree of the same structure holding for each manifold
    leaf its point axes (``None`` for the columns) and ``None`` elsewhere.

  Example:
    >>> import jax, jax.numpy as jnp, grassmann_optax as go
    >>> def loss(p, x):  # x @ w, then a normalisation over each column: invariant per column
    ...   z = x @ p['w']
    ...   z = (z - z.mean(0)) / z.std(0)
    ...   return jnp.sum(jnp.sin(z @ p['v']))
    >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    >>> p = {'w': jax.random.normal(k1, (8, 4)), 'v': jax.random.normal(k2, (4, 2))}
    >>> found = go.find_scale_invariant(loss, p, jax.random.normal(k3, (32, 8)))
    >>> found.param_labels, found.point_axes
    ({'v': 'euclidean', 'w': 'grassmann'}, {'v': None, 'w': None})

  {{references}}
  """
  _check_search(groupings, draws, seed, tol)
  at = [params] + [_perturbed(params, seed + k) for k in range(draws - 1)]
  leaves, treedef = jax.tree.flatten(params)
  gradients = _float_gradients(loss_fn, args)
  samples = [(point, gradients(point)) for point in at]
  names = [name for name, _ in checks.named_leaves(params)]
  per_leaf = [
    [
      (np.asarray(w), None if g is None else np.asarray(g, np.float64))
      for w, g in zip(treedef.flatten_up_to(point), grads, strict=True)
    ]
    for point, grads in samples
  ]
  for draw, (_, grads) in enumerate(samples):
    for name, g in zip(names, grads, strict=True):
      if g is not None and not bool(np.all(np.isfinite(g))):
        where = 'at params' if draw == 0 else f'at a point near params (draw {draw})'
        raise ValueError(
          f'find_scale_invariant: the gradient of leaf {name!r} is not finite {where}, so '
          'nothing can be told from it. Evaluate loss_fn on a real batch, in training mode, at '
          'params where it is finite.'
        )

  found = [
    _finest_invariant_layout([draw[index] for draw in per_leaf], groupings, tol, undercomplete_only)
    for index in range(len(leaves))
  ]
  return ScaleInvariance(
    param_labels=treedef.unflatten([label for label, _ in found]),
    point_axes=treedef.unflatten([axes for _, axes in found]),
  )


def _check_search(groupings: str, draws: int, seed: int, tol) -> None:
  """The arguments of :func:`find_scale_invariant` other than the function and its inputs."""
  if groupings not in ('any', 'columns'):
    raise ValueError(f"find_scale_invariant: groupings={groupings!r}: expected 'any' or 'columns'.")
  for name, value in (('draws', draws), ('seed', seed)):
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
      raise TypeError(f'find_scale_invariant: {name}={value!r}: expected an integer.')
  if draws < 1:
    raise ValueError(f'find_scale_invariant: draws={draws}: at least one gradient is needed.')
  checks.check_hyperparameters(tol=tol)


def _finest_invariant_layout(
  pairs: list, groupings: str, tol, undercomplete_only: bool
) -> tuple[str, tuple[int, ...] | None]:
  """``(label, point_axes)`` of one leaf from its ``(w, g)`` at every draw: the grouping with the
  most points in which every point is scale-invariant at every draw (``None``: the columns)."""
  w, g = pairs[0]
  if g is None or w.ndim < 2 or not all(np.any(g != 0) for _, g in pairs):
    return EUCLIDEAN, None
  pairs = [(np.asarray(w, np.float64), g) for w, g in pairs]
  w = pairs[0][0]
  candidates = _candidate_layouts(w.ndim)[: 1 if groupings == 'columns' else None]
  best = None
  for axes in candidates:
    layout = points.Layout.of(w.shape, axes)
    if layout.point_size(w.shape) < 2:
      continue
    better = best is None or layout.num_points(w.shape) > best.num_points(w.shape)
    if better and all(_invariant_points(w, g, layout, tol) for w, g in pairs):
      best = layout
  # The finest invariant grouping decides; a coarser one is not taken in its place.
  if best is None or (undercomplete_only and checks.undercomplete_problem(w.shape, best)):
    return EUCLIDEAN, None
  default = best.point == tuple(range(w.ndim - 1))
  return GRASSMANN, None if default else best.point


def resolve_labels(params: Any, param_labels: ParamLabels | None) -> Any:
  """The label tree for ``params``: ``grassmann_labels``, a callable's result, or a given tree.

  A given tree may be a different container type with the same paths (``dict`` labels for
  ``FrozenDict`` params, labels boxed in ``nnx.Param`` for raw arrays); it is rebuilt in the
  structure of ``params``.
  """
  if param_labels is None:
    return grassmann_labels(params)
  labels = param_labels(params) if callable(param_labels) else param_labels
  if isinstance(labels, str) and len(jax.tree.leaves(params)) > 1:
    raise ValueError(
      f'The label tree does not match the params: got the single label {labels!r}. '
      + checks.static_args_hint('param_labels')
    )
  treedef = jax.tree.structure(params)
  if jax.tree.structure(labels) == treedef:
    return labels  # the same paths: nothing to match by name
  by_path = dict(
    zip(checks.unique_names(labels, 'param_labels'), jax.tree.leaves(labels), strict=True)
  )
  names = checks.unique_names(params, 'the params, matched to param_labels by name')
  found = checks.pick_by_name(
    by_path,
    names,
    lambda name: (
      f'The label tree does not match the params: no label for the leaf {name!r}. Labels '
      'must have the structure of the params, e.g. go.grassmann_labels(params).'
    ),
    lambda name: (
      f'The label tree does not match the params: the label {name!r} names no parameter.'
    ),
  )
  return jax.tree_util.tree_unflatten(treedef, found)


def manifold_leaves(params: Any, labels: Any) -> Any:
  """``params`` with every leaf not labelled ``'grassmann'`` replaced by ``optax.MaskedNode``.

  This is the tree :func:`optax.partition` hands to the manifold branch.
  """
  leaves, treedef = jax.tree.flatten(params)
  on = treedef.flatten_up_to(labels)
  return treedef.unflatten(
    [w if label == GRASSMANN else optax.MaskedNode() for w, label in zip(leaves, on, strict=True)]
  )


def check_known(labels: Any, name: str | None = None) -> None:
  """Raises a ValueError naming the first leaf whose label is not one of :data:`LABELS`.

  ``name``: the optimizer the message starts with, if any.
  """
  for leaf_name, label in checks.named_leaves(labels):
    if label not in LABELS:
      unknown = f'{name}: unknown' if name else 'Unknown'
      raise ValueError(
        f'{unknown} label {label!r} for the leaf {leaf_name!r}; expected one of {LABELS}.'
      )


def check_labels(
  params: Any,
  labels: Any,
  *,
  require_undercomplete: bool = True,
  point_axes: points.PointAxes = None,
  mesh_axes: Any = None,
  undercomplete_hint: str = '',
  name: str | None = None,
) -> None:
  """Raises a ValueError naming the leaf if a label is unknown or a manifold leaf is unfit.

  A manifold leaf must be real floating-point with points of at least 2 elements and, with
  ``require_undercomplete``, more elements per point than its groups have points (for the
  columns of a kernel: fan-in > outputs). ``name``: the function the message starts with.
  """
  check_known(labels, name)
  prefix = f'{name}: the' if name else 'The'
  # The manifold leaves only, as optax.partition hands them to the step: point_axes need not
  # fit the other leaves (point_axes=1 and a bias).
  masked = manifold_leaves(params, labels)
  layouts = points.resolve(masked, point_axes, mesh_axes)
  for (path, leaf), layout in zip(
    jax.tree_util.tree_leaves_with_path(masked), layouts, strict=True
  ):
    leaf_name = checks.leaf_name(path)
    shape = tuple(jnp.shape(leaf))
    problem = checks.manifold_leaf_problem(getattr(leaf, 'dtype', None), layout.point_size(shape))
    if problem:
      raise ValueError(
        f'{prefix} grassmann leaf {leaf_name!r} of shape {shape} cannot lie on G(1, n): it '
        f'{problem}. Label it euclidean.'
      )
    undercomplete = checks.undercomplete_problem(shape, layout) if require_undercomplete else None
    if undercomplete:
      raise ValueError(
        f'{prefix} grassmann leaf {leaf_name!r} of shape {shape} {undercomplete}, so the paper '
        'keeps such kernels Euclidean. Label it euclidean, or choose other point_axes.'
        f'{undercomplete_hint}'
      )


def checked_partition(
  name: str,
  grassmann: optax.GradientTransformation,
  euclidean: optax.GradientTransformation,
  label_fn: Callable[[Any], Any],
  check_init: Callable[[Any, Any], None],
  no_manifold_leaf: str,
) -> optax.GradientTransformationExtraArgs:
  """``optax.partition`` of the ``'grassmann'`` leaves and the rest, as the aliases check it.

  ``init`` calls ``check_init(params, labels)`` and warns ``no_manifold_leaf`` where no leaf is
  labelled ``'grassmann'``; ``update`` refuses another optimizer's state and updates that do not
  fit the params, naming ``name``, and labels the leaves by the params where they are given, as
  ``init`` does. Extra arguments (``value=``) reach both branches.
  """
  transforms = {GRASSMANN: grassmann, EUCLIDEAN: euclidean}

  def init_fn(params):
    labels = label_fn(params)
    check_init(params, labels)
    if GRASSMANN not in jax.tree.leaves(labels):
      checks.warn(no_manifold_leaf)
    return optax.partition(transforms, labels).init(params)

  def update_fn(updates, state, params=None, **extra_args):
    checks.check_state(state, ('inner_states',), name)
    if params is not None:
      checks.check_same_tree(updates, params, 'the updates', 'the params', name)
    # Labelled by the params, as at init where they are given: optax.partition would call a
    # label function on the updates, and an update of another dtype (a complex or integer
    # gradient) would move its leaf to the other branch, to be refused there as a missing leaf
    # instead of for its dtype.
    labels = label_fn(updates if params is None else params)
    return optax.partition(transforms, labels).update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
