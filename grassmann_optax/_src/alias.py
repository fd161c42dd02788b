"""SGD-G and Adam-G as complete optimizers: manifold leaves on G(1, n), the rest Nesterov SGD."""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from grassmann_optax._src import checks, docstrings, points, steps, transforms
from grassmann_optax._src import labels as labels_lib

_NO_MANIFOLD_LEAF = (
  '{name}: no leaf of the params is labelled {grassmann!r}, so every parameter gets Nesterov '
  'SGD and nothing moves on G(1, n). The default labels (grassmann_labels) take only conv '
  'kernels (ndim == 4) whose fan-in exceeds their outputs. Pass param_labels: a label tree, '
  'a rule such as lambda p: go.grassmann_labels(p, predicate=...), or the labels that '
  'go.find_scale_invariant(loss_fn, params, batch) finds.'
)


def _traces(state) -> list:
  is_trace = lambda node: isinstance(node, optax.TraceState)
  return [node for node in jax.tree.leaves(state, is_leaf=is_trace) if is_trace(node)]


def _checked_against_init(
  tx: optax.GradientTransformation, name: str
) -> optax.GradientTransformationExtraArgs:
  """``tx``, whose ``update`` names the leaf where the updates differ from the params at init.

  The momentum buffers (``optax.TraceState``) have the shape of the params at ``init``.
  """

  tx = optax.with_extra_args_support(tx)

  def update_fn(updates, state, params=None, **extra_args):
    for trace in _traces(state):
      checks.check_same_tree(updates, trace.trace, 'the updates', 'the params given to init', name)
    return tx.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def euclidean_sgd(
  learning_rate: optax.ScalarOrSchedule,
  *,
  momentum: ArrayLike | None = 0.9,
  nesterov: bool = True,
  weight_decay: ArrayLike | None = 5e-4,
  weight_decay_mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Coupled L2 decay then (Nesterov) momentum SGD: the Euclidean branch of the aliases.

  .. math::
    \delta = g + \lambda\theta, \quad b \leftarrow \gamma b + \delta, \quad
    \theta \leftarrow \theta - \eta(\delta + \gamma b)

  ((N1)-(N3) of ``docs/algorithm.md``; without Nesterov, ``θ ← θ − η b``). The decay is added to
  the gradient before the momentum, as in both originals. By default it applies to leaves with
  ``ndim >= 2`` (kernels), never to biases or BatchNorm parameters, as in the paper's recipes.

  Args:
    learning_rate: η, or a schedule.
    momentum: γ in [0, 1], or ``None`` for none (as :func:`optax.sgd`).
    nesterov: Nesterov momentum (True in the paper).
    weight_decay: λ >= 0, or ``None``.
    weight_decay_mask: which leaves get decay, as in :func:`optax.add_decayed_weights`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax, jax.numpy as jnp, grassmann_optax as go
    >>> params = {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)}
    >>> tx = go.euclidean_sgd(0.1, momentum=0.0, weight_decay=0.5)
    >>> grads = jax.tree.map(jnp.zeros_like, params)
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> round(updates['kernel'][0, 0].item(), 6), abs(updates['bias'][0].item())  # kernels only
    (-0.05, 0.0)
  """
  if weight_decay_mask is None:
    weight_decay_mask = lambda params: jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)
  checks.check_hyperparameters(learning_rate=learning_rate, weight_decay=weight_decay)
  decays = weight_decay is not None and not transforms.is_static_zero(weight_decay)
  if decays:  # a mask without decay is never read
    checks.check_mask(weight_decay_mask, 'weight_decay_mask')
  decay = (
    optax.add_decayed_weights(weight_decay, mask=weight_decay_mask) if decays else optax.identity()
  )
  if momentum is not None:  # None: no momentum, as in optax.sgd
    checks.check_hyperparameters(momentum=momentum)
  checks.check_bool(nesterov=nesterov)
  sgd = optax.sgd(
    checks.checked_schedule(learning_rate, 'euclidean_sgd'), momentum=momentum, nesterov=nesterov
  )
  tx = _checked_against_init(optax.chain(decay, sgd), 'euclidean_sgd')
  if not decays or callable(weight_decay_mask):
    return tx
  return _mask_checked_at_init(tx, weight_decay_mask)


def _mask_checked_at_init(
  tx: optax.GradientTransformationExtraArgs, mask: Any
) -> optax.GradientTransformationExtraArgs:
  """``tx``, whose ``init`` refuses a ``weight_decay_mask`` tree that is not a prefix of the
  params (Optax's own error names neither the argument nor the leaf)."""

  def init_fn(params):
    num_leaves = len(jax.tree.leaves(params))
    # The one bool a callable mask gives under inject_hyperparams, which calls it with the step
    # count: it would turn the decay on or off for every leaf, silently.
    if jax.tree_util.treedef_is_leaf(jax.tree.structure(mask)) and num_leaves > 1:
      raise ValueError(
        f'euclidean_sgd: weight_decay_mask is the single bool {mask!r} for all {num_leaves} '
        'leaves of the params. Give a tree of bools or a callable params -> such a tree '
        '(weight_decay=None for no decay). ' + checks.static_args_hint('weight_decay_mask')
      )
    try:
      jax.tree.map(lambda *_: None, mask, params)
    except ValueError as error:
      raise ValueError(
        'euclidean_sgd: weight_decay_mask does not match the params: it must be a tree of bools '
        'with the structure of the params (or a prefix of it), or a callable params -> such a '
        f'tree. {error}'
      ) from None
    return tx.init(params)

  return optax.GradientTransformationExtraArgs(init_fn, tx.update)


def grassmann_partition(
  grassmann: optax.GradientTransformation,
  euclidean: optax.GradientTransformation,
  param_labels: labels_lib.ParamLabels | None,
  *,
  point_axes: points.PointAxes = None,
  mesh_axes: Any = None,
  require_undercomplete: bool = True,
  name: str = 'grassmann_partition',
) -> optax.GradientTransformationExtraArgs:
  """``optax.partition`` over ``'grassmann'``/``'euclidean'`` labels, checked.

  ``init`` raises a ValueError naming the leaf when the labels do not match the params, use an
  unknown label, or put on the manifold a leaf that is not real floating-point, has points of
  fewer than two elements, or points of no more elements than a group has points (a conv
  kernel's fan-in not larger than its outputs); it warns when no leaf is on the manifold.
  ``update`` raises a ValueError naming the leaf where the updates and params differ, and
  labels the leaves by the params, as ``init`` does (``optax.partition`` calls a label function
  on the updates, whose dtype may differ).

  Args:
    grassmann: the transformation of the manifold leaves (e.g. a chain of this library's
      transforms, or :func:`grassmann_sgd`).
    euclidean: the transformation of every other leaf.
    param_labels: a label tree, a callable ``params -> labels``, or ``None`` for
      :func:`grassmann_labels`.
    point_axes: the point axes the checks of ``init`` use (those ``grassmann`` uses).
    mesh_axes: the mesh axes that split the leaves inside ``shard_map`` (those ``grassmann``
      uses), so that ``init`` inside ``shard_map`` checks the whole leaves, not the blocks.
    require_undercomplete: refuse manifold leaves whose points have no more elements than their
      groups have points (where the orthogonality term's target ``WᵀW = I`` is out of reach);
      the aliases require it only with a nonzero ``omega``.
    name: how messages name the optimizer.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; extra arguments of ``update`` (such as
    ``value=``) reach both branches.

  Example:
    >>> import jax, jax.numpy as jnp, optax, grassmann_optax as go
    >>> params = {'conv': go.unit_initializer()(jax.random.key(0), (3, 3, 4, 8)),
    ...           'bias': jnp.zeros(8)}
    >>> tx = go.grassmann_partition(go.grassmann_adam(0.05), optax.adam(1e-3), None)
    >>> state = tx.init(params)
  """
  return _partition(
    grassmann,
    euclidean,
    param_labels,
    point_axes=point_axes,
    mesh_axes=mesh_axes,
    require_undercomplete=require_undercomplete,
    name=name,
  )


def _partition(
  grassmann,
  euclidean,
  param_labels,
  *,
  point_axes,
  mesh_axes,
  require_undercomplete: bool,
  name: str,
  undercomplete_hint: str = '',
) -> optax.GradientTransformationExtraArgs:
  """:func:`grassmann_partition`; ``undercomplete_hint`` ends the message for a leaf whose
  points cannot be mutually orthogonal (what the aliases know of ``omega``)."""

  def check_init(params, labels):
    points.check_names(params, point_axes, name)
    labels_lib.check_labels(
      params,
      labels,
      point_axes=point_axes,
      mesh_axes=mesh_axes,
      require_undercomplete=require_undercomplete,
      undercomplete_hint=undercomplete_hint,
      name=name,
    )

  return labels_lib.checked_partition(
    name,
    grassmann,
    euclidean,
    lambda params: labels_lib.resolve_labels(params, param_labels),
    check_init,
    _NO_MANIFOLD_LEAF.format(name=name, grassmann=labels_lib.GRASSMANN),
  )


@docstrings.fill
def sgdg(
  learning_rate: optax.ScalarOrSchedule,
  grassmann_learning_rate: optax.ScalarOrSchedule,
  *,
  momentum: ArrayLike = 0.9,
  nesterov: bool = True,
  grad_clip: ArrayLike | None = 0.1,
  omega: ArrayLike = 0.1,
  weight_decay: ArrayLike | None = 5e-4,
  weight_decay_mask: Any = None,
  param_labels: labels_lib.ParamLabels | None = None,
  point_axes: points.PointAxes = None,
  radius: ArrayLike | str | None = None,
  mesh_axes: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""SGD-G: Riemannian momentum SGD on G(1, n) for the manifold leaves, Nesterov SGD elsewhere.

  For every point ``w`` of a manifold leaf (by default every column), with ``y = unit(w)``
  (Algorithm 1; (S1)-(S7) of ``docs/algorithm.md``):

  .. math::
    h &= \mathrm{proj}_y(g + 2\omega(YY^\top Y - Y)), \quad \hat h = \mathrm{clip}(h, \nu), \\
    b &\leftarrow \gamma\,\mathrm{pt}(b) + \hat h, \quad
    w \leftarrow \exp_y(-\eta_G\, b).

  All other leaves: ``θ ← θ − η (δ + γ b)``, ``b ← γ b + δ``, ``δ = g + λθ`` with ``λ`` only on
  kernels ((N1)-(N3)). It is this chain of public transforms::

    grassmann_partition(
        optax.chain(add_orthogonality_gradient(omega),
                    grassmann_sgd(grassmann_learning_rate, momentum, grad_clip=grad_clip)),
        euclidean_sgd(learning_rate, momentum=momentum, nesterov=nesterov,
                      weight_decay=weight_decay),
        param_labels)

  Args:
    learning_rate: η for the Euclidean leaves (0.01 in the paper's CIFAR recipe), or a schedule.
    grassmann_learning_rate: η_G for the manifold leaves (0.2 in the paper's CIFAR recipe), or a
      schedule.
    momentum: γ for both parts (0.9).
    nesterov: Nesterov momentum for the Euclidean leaves (True in the paper).
    grad_clip: {{grad_clip}}
    omega: ω, the orthogonality strength (0.1); 0 skips the term.
    weight_decay: coupled L2 λ for the Euclidean kernels (5e-4); never on manifold leaves.
    weight_decay_mask: which Euclidean leaves get decay, as in :func:`optax.add_decayed_weights`;
      default: leaves with ``ndim >= 2``.
    param_labels: label tree or callable ``params -> labels``; default :func:`grassmann_labels`.
      Under :func:`optax.inject_hyperparams`, name a callable in ``static_args``.
    point_axes: {{point_axes}}
    radius: {{radius}}
    mesh_axes: {{mesh_axes}}

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; its ``update`` needs ``params``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, grassmann_optax as go
    >>> params = {'conv': go.unit_initializer()(jax.random.key(0), (3, 3, 4, 8)),
    ...           'bias': jnp.zeros(8)}
    >>> tx = go.sgdg(0.01, 0.2)
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)

  {{references}}
  """
  checks.check_hyperparameters(grassmann_learning_rate=grassmann_learning_rate)
  manifold_step = steps.grassmann_sgd(
    grassmann_learning_rate,
    momentum,
    grad_clip=grad_clip,
    point_axes=point_axes,
    radius=radius,
    mesh_axes=mesh_axes,
  )
  euclidean = euclidean_sgd(
    learning_rate,
    momentum=momentum,
    nesterov=nesterov,
    weight_decay=weight_decay,
    weight_decay_mask=weight_decay_mask,
  )
  return _hybrid('sgdg', manifold_step, euclidean, omega, param_labels, point_axes, mesh_axes)


@docstrings.fill
def adamg(
  learning_rate: optax.ScalarOrSchedule,
  grassmann_learning_rate: optax.ScalarOrSchedule,
  *,
  b1: ArrayLike = 0.9,
  b2: ArrayLike = 0.99,
  eps: ArrayLike = 1e-8,
  momentum: ArrayLike = 0.9,
  nesterov: bool = True,
  grad_clip: ArrayLike | None = 0.1,
  omega: ArrayLike = 0.1,
  weight_decay: ArrayLike | None = 5e-4,
  weight_decay_mask: Any = None,
  param_labels: labels_lib.ParamLabels | None = None,
  point_axes: points.PointAxes = None,
  radius: ArrayLike | str | None = None,
  mesh_axes: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Adam-G: Riemannian Adam on G(1, n) for the manifold leaves, Nesterov SGD elsewhere.

  For every point of a manifold leaf, with ``y = unit(w)`` and step ``t`` (Algorithm 2;
  (A1)-(A11) of ``docs/algorithm.md``):

  .. math::
    \hat h &= \mathrm{clip}(\mathrm{proj}_y(g + 2\omega(YY^\top Y - Y)), \nu), \\
    m &\leftarrow \beta_1\,\mathrm{pt}(m) + (1-\beta_1)\hat h, \quad
    v \leftarrow \beta_2 v + (1-\beta_2)\lVert\hat h\rVert^2, \\
    w &\leftarrow \exp_y\!\Big(-\eta_G \tfrac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}
      \tfrac{m}{\sqrt{v+\epsilon}}\Big),

  with one scalar ``v`` per point. The Euclidean leaves get Nesterov momentum SGD with coupled
  decay, as in :func:`sgdg` (the paper uses Adam only on the manifold). It is the chain of
  :func:`sgdg` with :func:`grassmann_adam` in place of :func:`grassmann_sgd`.

  Args:
    learning_rate: η for the Euclidean leaves (0.01 in the paper's CIFAR recipe), or a schedule.
    grassmann_learning_rate: η_G for the manifold leaves (0.05 in the paper's CIFAR recipe), or a
      schedule.
    b1: β1 (the paper passes its momentum, 0.9).
    b2: β2 (0.99).
    eps: ε inside the square root (1e-8).
    momentum: γ of the Euclidean Nesterov momentum (0.9).
    nesterov: Nesterov momentum for the Euclidean leaves.
    grad_clip: {{grad_clip}}
    omega: ω (0.1); 0 skips the term.
    weight_decay: coupled L2 λ for the Euclidean kernels (5e-4).
    weight_decay_mask: which Euclidean leaves get decay; default: leaves with ``ndim >= 2``.
    param_labels: label tree or callable ``params -> labels``; default :func:`grassmann_labels`.
    point_axes: {{point_axes}}
    radius: {{radius}}
    mesh_axes: {{mesh_axes}}

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; its ``update`` needs ``params``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, grassmann_optax as go
    >>> params = {'conv': go.unit_initializer()(jax.random.key(0), (3, 3, 4, 8)),
    ...           'bias': jnp.zeros(8)}
    >>> tx = go.adamg(0.01, 0.05)
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)

  {{references}}
  """
  checks.check_hyperparameters(grassmann_learning_rate=grassmann_learning_rate)
  manifold_step = steps.grassmann_adam(
    grassmann_learning_rate,
    b1,
    b2,
    eps,
    grad_clip=grad_clip,
    point_axes=point_axes,
    radius=radius,
    mesh_axes=mesh_axes,
  )
  euclidean = euclidean_sgd(
    learning_rate,
    momentum=momentum,
    nesterov=nesterov,
    weight_decay=weight_decay,
    weight_decay_mask=weight_decay_mask,
  )
  return _hybrid('adamg', manifold_step, euclidean, omega, param_labels, point_axes, mesh_axes)


def _hybrid(name, manifold_step, euclidean, omega, param_labels, point_axes, mesh_axes):
  """The aliases' chain: the orthogonality term and a manifold step, ``euclidean`` elsewhere."""
  orthogonality = transforms.add_orthogonality_gradient(
    omega, point_axes=point_axes, mesh_axes=mesh_axes
  )
  hint = ''
  if not transforms.is_static(omega):
    hint = (
      f' Here omega is an array ({omega!r}), as optax.inject_hyperparams makes every numeric '
      'hyper-parameter, so the orthogonality term cannot be known to be off. To train such '
      f"leaves without it, fix omega: inject_hyperparams(go.{name}, static_args=('omega',)) "
      'with omega=0.'
    )
  return _partition(
    optax.chain(orthogonality, manifold_step),
    euclidean,
    param_labels,
    point_axes=point_axes,
    mesh_axes=mesh_axes,
    require_undercomplete=not transforms.is_static_zero(omega),
    name=name,
    undercomplete_hint=hint,
  )
