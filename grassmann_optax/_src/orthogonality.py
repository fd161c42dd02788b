"""The orthogonality penalty on the manifold leaves ((R1) of ``docs/algorithm.md``)."""

from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from grassmann_optax._src import checks, docstrings, manifold, points, sharding
from grassmann_optax._src import labels as labels_lib


@docstrings.fill
def orthogonality_penalty(
  params: Any, labels: Any, omega: ArrayLike, *, point_axes: points.PointAxes = None
) -> jax.Array:
  r"""The orthogonality penalty of the manifold leaves, as a loss value.

  .. math::
    L_O = \sum_{W} \frac{\omega}{2}\,\lVert W^\top W - I_p\rVert_F^2

  over the leaves labelled ``'grassmann'``, each viewed as ``W = w.reshape(-1, p)`` ((R1); the
  poster's "Regularization on G(1,n)"). Since the columns are unit, it penalises the squared
  cosines between the weight vectors of different output units. Its gradient is ``2ω(WWᵀW − W)``;
  :func:`add_orthogonality_gradient` adds ``2ω(YYᵀY − Y)`` with ``Y = unit(W)`` ((R2)), the same
  for unit columns. So add this value to the loss only if you leave that transform out
  (``omega=0`` in the aliases); otherwise log it.

  Args:
    params: a parameter pytree.
    labels: its label tree, or a callable ``params -> labels`` (e.g. :func:`grassmann_labels`).
    omega: penalty strength ω.
    point_axes: the point axes of the manifold leaves (default: columns); ``W`` is then the
      matrix of the points of one group, one column per point, summed over the groups.

  Returns:
    A scalar in float32 or wider.

  Example:
    >>> import jax.numpy as jnp, grassmann_optax as go
    >>> w = jnp.array([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]])  # two equal unit columns
    >>> float(go.orthogonality_penalty({'w': w}, {'w': 'grassmann'}, 0.5))
    0.5

  {{references}}
  """
  labels = labels_lib.resolve_labels(params, labels)
  checks.check_hyperparameters(omega=omega)
  labels_lib.check_labels(
    params,
    labels,
    require_undercomplete=False,
    point_axes=point_axes,
    name='orthogonality_penalty',
  )
  # The manifold leaves only, as the aliases read them: point_axes need not fit the others
  # (point_axes=1 and a bias).
  masked = labels_lib.manifold_leaves(params, labels)
  layouts = points.resolve(masked, point_axes)
  leaves = jax.tree.leaves(masked)
  return _penalty(leaves, omega=omega, point_axes=[layout.point for layout in layouts])


@sharding.replicated_under_explicit_axes
def _penalty(leaves: list[jax.Array], *, omega: ArrayLike, point_axes: list) -> jax.Array:
  total = jnp.zeros([], jnp.float32)
  for leaf, point in zip(leaves, point_axes, strict=True):
    stack, _ = manifold.group_matrices(manifold.upcast(leaf), point)
    gram = jnp.einsum('gnp,gnq->gpq', stack, stack)
    residual = gram - jnp.eye(gram.shape[-1], dtype=gram.dtype)
    total = total + 0.5 * omega * jnp.sum(residual**2)
  return total
