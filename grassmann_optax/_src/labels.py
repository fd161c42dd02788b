"""Which parameters live on G(1, n): label trees for :func:`optax.partition`.

A label tree has the structure of the params and holds ``'grassmann'`` for a manifold leaf and
``'euclidean'`` for every other leaf. The label function is the one place where a model and the
optimizer meet.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from grassmann_optax._src import checks, manifold

GRASSMANN = 'grassmann'
EUCLIDEAN = 'euclidean'
LABELS = (GRASSMANN, EUCLIDEAN)

Predicate = Callable[[Any, Any], bool]
ParamLabels = Any | Callable[[Any], Any]


def _is_array_leaf(x) -> bool:
  return hasattr(x, 'shape') and hasattr(x, 'dtype')


def _flatten(tree):
  return jax.tree_util.tree_flatten_with_path(tree)


def _unboxed_names(tree) -> list[str]:
  """Leaf names with Flax NNX ``Variable`` boxes removed, so that labels taken from
  ``nnx.state(model, nnx.Param)`` match the raw arrays that ``nnx.Optimizer`` passes on."""
  try:
    from flax import nnx
  except ImportError:
    return [checks.leaf_name(path) for path, _ in _flatten(tree)[0]]
  is_box = lambda x: isinstance(x, nnx.Variable)
  unboxed = jax.tree.map(lambda x: x.get_value() if is_box(x) else x, tree, is_leaf=is_box)
  return [checks.leaf_name(path) for path, _ in _flatten(unboxed)[0]]


def is_undercomplete_conv(path, leaf) -> bool:
  """The paper's rule ((L1) of ``docs/algorithm.md``): a conv kernel with fan-in > outputs.

  ``leaf.ndim == 4`` (Flax ``[kh, kw, c_in, c_out]``) and ``kh·kw·c_in > c_out``: only then can
  the ``c_out`` unit columns be mutually orthogonal, the target of the orthogonality penalty.

  Example:
    >>> import jax.numpy as jnp, grassmann_optax as go
    >>> go.is_undercomplete_conv((), jnp.zeros((3, 3, 16, 143))), go.is_undercomplete_conv(
    ...     (), jnp.zeros((3, 3, 16, 144)))
    (True, False)
  """
  del path
  shape = tuple(leaf.shape)
  n, p = checks.fan_in_and_out(shape)
  return len(shape) == 4 and n > p


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

  References:
    Cho & Lee, "Riemannian approach to batch normalization", NeurIPS 2017, arXiv:1709.09603.
  """
  rule = predicate or is_undercomplete_conv
  return jax.tree_util.tree_map_with_path(
    lambda path, leaf: GRASSMANN if rule(path, leaf) else EUCLIDEAN, params
  )


def find_scale_invariant(
  loss_fn: Callable[..., jax.Array],
  params: Any,
  *args,
  tol: float = 1e-3,
  undercomplete_only: bool = True,
) -> Any:
  r"""Finds the kernels whose columns are scale-invariant, from one gradient evaluation.

  If ``L(c·w_j) = L(w_j)`` for every ``c > 0`` (as for a kernel followed by BatchNorm), Euler's
  theorem for functions homogeneous of degree 0 gives

  .. math::
    \langle \partial L/\partial w_j,\, w_j\rangle = 0

  for every column ``j``. A leaf with ``ndim >= 2`` is labelled ``'grassmann'`` when every column
  satisfies :math:`|\langle g_j, w_j\rangle| \le \mathrm{tol}\,\lVert g_j\rVert\lVert w_j\rVert`
  and its gradient is not identically zero (an unused kernel tells nothing). The test is
  necessary, not sufficient: evaluate ``loss_fn`` in training mode (batch statistics), on a
  real batch, with random (not zero) parameters. BatchNorm's ε breaks the invariance slightly
  (cosines of about ε/Var, measured up to 4e-4), while kernels that are not invariant show
  cosines of 0.1 and more: hence the default ``tol``.

  Args:
    loss_fn: ``loss_fn(params, *args) -> scalar``.
    params: parameters at which to evaluate the gradient.
    *args: further arguments of ``loss_fn`` (a batch, ...).
    tol: tolerance on the cosine between each column and its gradient (default 1e-3).
    undercomplete_only: also require fan-in > outputs, as :func:`grassmann_labels` does
      ((L1)), so that the result can be given to :func:`sgdg` and :func:`adamg` as is.

  Returns:
    A label pytree with the structure of ``params``.

  Example:
    >>> import jax, jax.numpy as jnp, grassmann_optax as go
    >>> def loss(p, x):  # x @ w followed by a normalisation: scale-invariant in w
    ...   z = x @ p['w']
    ...   z = (z - z.mean(0)) / z.std(0)
    ...   return jnp.sum(jnp.sin(z @ p['v']))
    >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    >>> p = {'w': jax.random.normal(k1, (8, 4)), 'v': jax.random.normal(k2, (4, 2))}
    >>> go.find_scale_invariant(loss, p, jax.random.normal(k3, (32, 8)))
    {'v': 'euclidean', 'w': 'grassmann'}

  References:
    Cho & Lee, "Riemannian approach to batch normalization", NeurIPS 2017, arXiv:1709.09603.
  """
  grads = jax.grad(loss_fn)(params, *args)

  def label(path, w, g):
    del path
    shape = tuple(w.shape)
    n, p = checks.fan_in_and_out(shape)
    if not checks.has_manifold_rows(shape) or (undercomplete_only and n <= p):
      return EUCLIDEAN
    w64, g64 = manifold.upcast(jnp.asarray(w)), manifold.upcast(jnp.asarray(g))
    inner = jnp.abs(manifold.column_dot(w64, g64))
    bound = tol * manifold.column_norm(w64) * manifold.column_norm(g64)
    invariant = bool(jnp.all(inner <= bound)) and bool(jnp.any(g64 != 0))
    return GRASSMANN if invariant else EUCLIDEAN

  return jax.tree_util.tree_map_with_path(label, params, grads)


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
      f'The label tree does not match the params: got the single label {labels!r}. Under '
      'optax.inject_hyperparams, name a callable param_labels in static_args (Optax treats '
      "every callable as a schedule): inject_hyperparams(go.adamg, static_args=('param_labels',))."
    )
  treedef = jax.tree.structure(params)
  by_path = dict(zip(_unboxed_names(labels), jax.tree.leaves(labels), strict=True))
  names = _unboxed_names(params)
  for name in names:
    if name not in by_path:
      raise ValueError(
        f'The label tree does not match the params: no label for the leaf {name!r}. Labels '
        'must have the structure of the params, e.g. go.grassmann_labels(params).'
      )
  extra = sorted(set(by_path) - set(names))
  if extra:
    raise ValueError(
      f'The label tree does not match the params: the label {extra[0]!r} names no parameter.'
    )
  return jax.tree_util.tree_unflatten(treedef, [by_path[name] for name in names])


def check_labels(params: Any, labels: Any, *, require_undercomplete: bool = True) -> None:
  """Raises a ValueError naming the leaf if a label is unknown or a manifold leaf is unfit."""
  label_of = {checks.leaf_name(path): label for path, label in _flatten(labels)[0]}
  for path, leaf in _flatten(params)[0]:
    name = checks.leaf_name(path)
    label = label_of[name]
    if label not in LABELS:
      raise ValueError(f'Unknown label {label!r} for the leaf {name!r}; expected one of {LABELS}.')
    if label != GRASSMANN:
      continue
    shape = tuple(leaf.shape)
    n, p = checks.fan_in_and_out(shape)
    problem = checks.manifold_leaf_problem(shape, getattr(leaf, 'dtype', None))
    if problem:
      raise ValueError(
        f'The grassmann leaf {name!r} of shape {shape} cannot lie on G(1, n): it {problem}. '
        'Label it euclidean.'
      )
    if require_undercomplete and n <= p:
      raise ValueError(
        f'The grassmann leaf {name!r} of shape {shape} has fan-in {n} <= {p} outputs: its '
        f'{p} unit columns cannot be mutually orthogonal in R^{n}, so the paper keeps such '
        'kernels Euclidean. Label it euclidean.'
      )
