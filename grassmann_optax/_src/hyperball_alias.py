"""AdamH and MuonH as complete optimizers: projection matrices on the hyperball, the rest AdamW."""

import optax
from jax.typing import ArrayLike

from grassmann_optax._src import checks, hyperball, points
from grassmann_optax._src import labels as labels_lib
from grassmann_optax._src import transformer_labels as transformer

_NO_HYPERBALL_LEAF = (
  '{name}: no leaf of the params is labelled {grassmann!r}, so every parameter gets AdamW and '
  'nothing moves on the hyperball. Pass param_labels: a label tree, or a rule such as '
  'go.transformer_labels (the default), which takes leaves named kernel.'
)


def _partition(
  name: str,
  sphere_step: optax.GradientTransformation,
  euclidean: optax.GradientTransformation,
  param_labels: labels_lib.ParamLabels | None,
  point_axes: points.PointAxes = None,
) -> optax.GradientTransformationExtraArgs:
  """``optax.partition`` of the hyperball leaves (``'grassmann'``) and the rest, checked."""
  rule = transformer.transformer_labels if param_labels is None else param_labels

  def check_init(params, labels):
    points.check_names(params, point_axes, name)  # a key that names no leaf is a typo
    labels_lib.check_known(labels, name)

  return labels_lib.checked_partition(
    name,
    sphere_step,
    euclidean,
    lambda params: labels_lib.resolve_labels(params, rule),
    check_init,
    _NO_HYPERBALL_LEAF.format(name=name, grassmann=labels_lib.GRASSMANN),
  )


def _adamw(name, learning_rate, b1, b2, eps, weight_decay):
  checks.check_hyperparameters(
    learning_rate=learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay
  )
  if weight_decay is None:  # none, as the check's message allows
    weight_decay = 0.0
  return optax.adamw(
    checks.checked_schedule(learning_rate, f'{name} (its AdamW leaves)'),
    b1=b1,
    b2=b2,
    eps=eps,
    weight_decay=weight_decay,
    mask=transformer.decays,
  )


def _point_axes(point_axes: points.PointAxes) -> points.PointAxes:
  return transformer.point_axes if point_axes is None else point_axes


def adamh(
  learning_rate: optax.ScalarOrSchedule,
  hyperball_learning_rate: optax.ScalarOrSchedule,
  *,
  b1: ArrayLike = 0.9,
  b2: ArrayLike = 0.95,
  eps: ArrayLike = 1e-8,
  weight_decay: ArrayLike = 0.1,
  param_labels: labels_lib.ParamLabels | None = None,
  point_axes: points.PointAxes = None,
  retraction: str = 'geodesic',
) -> optax.GradientTransformationExtraArgs:
  r"""AdamH: Adam with every projection matrix on the sphere of its initial norm; AdamW elsewhere.

  For every point ``W`` of a hyperball leaf (a matrix; one per layer of a stacked kernel, one per
  head of an attention ``DenseGeneral`` kernel), with ``R`` its norm at ``init`` and
  ``y = W/‖W‖`` (Wen et al. 2025):

  .. math::
    u = \mathrm{Adam}_{\beta_1,\beta_2,\epsilon}(g), \qquad
    W \leftarrow R\,\mathrm{Norm}\Big(y - \eta_H \frac{u}{\max(\lVert u\rVert, 10^{-10})}\Big)

  with ``retraction='normalize'`` (the published AdamH), or along the great circle by
  ``arctan(η_H)`` with the first moment transported, with ``'geodesic'``
  (:func:`hyperball_adam`). Every other leaf gets ``optax.adamw(learning_rate, b1, b2, eps,
  weight_decay)``, with decay on the leaves of two axes or more (embeddings, the head) and none
  on biases and norm scales (leaves named ``bias``, ``scale``, and vectors). It is this chain of
  public transforms::

    optax.partition(
        {'grassmann': hyperball_adam(hyperball_learning_rate, b1=b1, b2=b2, eps=eps,
                                     retraction=retraction, point_axes=point_axes),
         'euclidean': optax.adamw(learning_rate, b1, b2, eps, weight_decay=weight_decay,
                                  mask=...)},
        param_labels or transformer_labels)

  Args:
    learning_rate: η of AdamW for the Euclidean leaves, or a schedule.
    hyperball_learning_rate: η_H, the step relative to each point's radius, or a schedule.
    b1: β1 of both parts.
    b2: β2 of both parts (0.95).
    eps: ε of both parts, outside the square root.
    weight_decay: AdamW's decoupled decay λ of the Euclidean leaves; none on the hyperball,
      whose norms are fixed.
    param_labels: a label tree (``'grassmann'`` for the hyperball) or a callable
      ``params -> labels``; default :func:`transformer_labels`.
    point_axes: the axes of each hyperball leaf that form one point; default (``None``) the last
      two axes, and one point per head for the ``DenseGeneral`` kernels of attention (the rules
      of :func:`transformer_labels`).
    retraction: ``'geodesic'`` or ``'normalize'`` (the published AdamH).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` that needs ``params``; extra arguments of
    ``update`` (``value=``) reach both parts.

  Example:
    >>> import jax, jax.numpy as jnp, optax, grassmann_optax as go
    >>> params = {'mlp': {'kernel': jax.random.normal(jax.random.key(0), (8, 32)),
    ...                   'bias': jnp.zeros(32)}}
    >>> tx = go.adamh(1e-3, 0.01)
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> new = optax.apply_updates(params, updates)
    >>> bool(jnp.isclose(jnp.linalg.norm(new['mlp']['kernel']),
    ...                  jnp.linalg.norm(params['mlp']['kernel'])))
    True

  References:
    Wen, Dang, Lyu, Ma, Liang, "Fantastic Pretraining Optimizers and Where to Find Them 2.1:
    Hyperball Optimization", 2025.

    Cho & Lee, "Riemannian approach to batch normalization", NeurIPS 2017,
    `arXiv:1709.09603 <https://arxiv.org/abs/1709.09603>`_.
  """
  checks.check_hyperparameters(hyperball_learning_rate=hyperball_learning_rate)
  sphere_step = hyperball.hyperball_adam(
    hyperball_learning_rate,
    b1=b1,
    b2=b2,
    eps=eps,
    retraction=retraction,
    point_axes=_point_axes(point_axes),
  )
  euclidean = _adamw('adamh', learning_rate, b1, b2, eps, weight_decay)
  return _partition('adamh', sphere_step, euclidean, param_labels, point_axes)


def muonh(
  learning_rate: optax.ScalarOrSchedule,
  hyperball_learning_rate: optax.ScalarOrSchedule,
  *,
  momentum: ArrayLike = 0.95,
  nesterov: bool = True,
  ns_steps: int = 5,
  b1: ArrayLike = 0.9,
  b2: ArrayLike = 0.95,
  eps: ArrayLike = 1e-8,
  weight_decay: ArrayLike = 0.1,
  param_labels: labels_lib.ParamLabels | None = None,
  point_axes: points.PointAxes = None,
  retraction: str = 'geodesic',
) -> optax.GradientTransformationExtraArgs:
  r"""MuonH: Muon with every projection matrix on the sphere of its initial norm; AdamW elsewhere.

  For every point ``W`` of a hyperball leaf (a matrix), with ``R`` its norm at ``init`` and
  ``y = W/‖W‖`` (Wen et al. 2025):

  .. math::
    b \leftarrow \mu b + g, \quad u = \mathrm{NS}(\mu b + g), \qquad
    W \leftarrow R\,\mathrm{Norm}\Big(y - \eta_H \frac{u}{\max(\lVert u\rVert, 10^{-10})}\Big)

  (``NS``: ``ns_steps`` Newton–Schulz iterations, five by default, :func:`scale_by_matrix_sign`)
  with ``retraction='normalize'`` (the published MuonH), or along the great circle by
  ``arctan(η_H)`` with the momentum transported, with ``'geodesic'`` (:func:`hyperball_muon`).
  Every other leaf gets ``optax.adamw(learning_rate, b1, b2, eps, weight_decay)``, decay as in
  :func:`adamh`. It is :func:`adamh`'s partition with :func:`hyperball_muon` on the hyperball.

  Args:
    learning_rate: η of AdamW for the Euclidean leaves, or a schedule.
    hyperball_learning_rate: η_H, the step relative to each point's radius, or a schedule.
    momentum: μ of the hyperball leaves' momentum (0.95).
    nesterov: Nesterov momentum, as in Muon.
    ns_steps: Newton–Schulz iterations (5).
    b1: β1 of AdamW.
    b2: β2 of AdamW (0.95).
    eps: ε of AdamW.
    weight_decay: AdamW's decoupled decay λ of the Euclidean leaves.
    param_labels: a label tree or a callable ``params -> labels``; default
      :func:`transformer_labels`.
    point_axes: the axes of each hyperball leaf that form one point (a matrix), as in
      :func:`adamh`.
    retraction: ``'geodesic'`` or ``'normalize'`` (the published MuonH).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` that needs ``params``; extra arguments of
    ``update`` (``value=``) reach both parts.

  Example:
    >>> import jax, jax.numpy as jnp, optax, grassmann_optax as go
    >>> params = {'attn': {'query': {'kernel': jax.random.normal(jax.random.key(0), (8, 2, 4)),
    ...                              'bias': jnp.zeros((2, 4))}}}
    >>> tx = go.muonh(1e-3, 0.01)
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params, value=jnp.ones([]))
    >>> new = optax.apply_updates(params, updates)['attn']['query']['kernel']
    >>> bool(jnp.allclose(jnp.linalg.norm(new, axis=(0, 2)),
    ...                   jnp.linalg.norm(params['attn']['query']['kernel'], axis=(0, 2))))
    True

  References:
    Wen, Dang, Lyu, Ma, Liang, "Fantastic Pretraining Optimizers and Where to Find Them 2.1:
    Hyperball Optimization", 2025.

    Cho & Lee, "Riemannian approach to batch normalization", NeurIPS 2017,
    `arXiv:1709.09603 <https://arxiv.org/abs/1709.09603>`_.
  """
  checks.check_hyperparameters(hyperball_learning_rate=hyperball_learning_rate)
  sphere_step = hyperball.hyperball_muon(
    hyperball_learning_rate,
    momentum=momentum,
    nesterov=nesterov,
    ns_steps=ns_steps,
    retraction=retraction,
    point_axes=_point_axes(point_axes),
  )
  euclidean = _adamw('muonh', learning_rate, b1, b2, eps, weight_decay)
  return _partition('muonh', sphere_step, euclidean, param_labels, point_axes)
