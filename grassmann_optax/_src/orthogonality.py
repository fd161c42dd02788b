"""The orthogonality penalty on the manifold leaves ((R1) of ``docs/algorithm.md``)."""

from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from grassmann_optax._src import labels as labels_lib
from grassmann_optax._src import manifold


def orthogonality_penalty(params: Any, labels: Any, omega: ArrayLike) -> jax.Array:
  r"""The orthogonality penalty of the manifold leaves, as a loss value.

  .. math::
    L_O = \sum_{W} \frac{\omega}{2}\,\lVert W^\top W - I_p\rVert_F^2

  over the leaves labelled ``'grassmann'``, each viewed as ``W = w.reshape(-1, p)`` ((R1); the
  poster's "Regularization on G(1,n)"). Since the columns are unit, it penalises the squared
  cosines between the weight vectors of different output units. Its gradient
  ``2ω(WWᵀW − W)`` is what :func:`add_orthogonality_gradient` adds, so add this value to the loss
  only if you leave that transform out (``omega=0`` in the aliases); otherwise log it.

  Args:
    params: a parameter pytree.
    labels: its label tree, or a callable ``params -> labels`` (e.g. :func:`grassmann_labels`).
    omega: penalty strength ω.

  Returns:
    A scalar in float32 or wider.

  Example:
    >>> import jax.numpy as jnp, grassmann_optax as go
    >>> w = jnp.array([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]])  # two equal unit columns
    >>> float(go.orthogonality_penalty({'w': w}, {'w': 'grassmann'}, 0.5))
    0.5

  References:
    Cho & Lee, "Riemannian approach to batch normalization", NeurIPS 2017, arXiv:1709.09603.
  """
  labels = labels_lib.resolve_labels(params, labels)
  labels_lib.check_labels(params, labels, require_undercomplete=False)
  total = jnp.zeros([], jnp.float32)
  for leaf, label in zip(jax.tree.leaves(params), jax.tree.leaves(labels), strict=True):
    if label != labels_lib.GRASSMANN:
      continue
    matrix = manifold.upcast(leaf).reshape(-1, leaf.shape[-1])
    gram = matrix.T @ matrix
    residual = gram - jnp.eye(gram.shape[0], dtype=gram.dtype)
    total = total + 0.5 * omega * jnp.sum(residual**2)
  return total
