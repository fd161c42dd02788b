"""Initialisation of manifold kernels ((L1) of ``docs/algorithm.md``)."""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from grassmann_optax._src import docstrings, manifold


@docstrings.fill
def unit_initializer() -> Callable[..., jax.Array]:
  """A Flax initializer whose columns are random unit vectors.

  Draws a truncated normal (−2, 2) of the full shape and divides each column of
  ``reshape(-1, shape[-1])`` by ``‖column‖ + 1e-8``, as the original TensorFlow code's
  ``unit_initializer`` does: each output unit starts at a random point of G(1, n) (not uniform:
  the truncated normal is not isotropic).

  Returns:
    ``init(key, shape, dtype=jnp.float32) -> jax.Array``, usable as ``kernel_init`` of
    ``flax.linen.Conv`` or ``flax.nnx.Conv``.

  Example:
    >>> import jax, jax.numpy as jnp, grassmann_optax as go
    >>> w = go.unit_initializer()(jax.random.key(0), (3, 3, 16, 32))
    >>> bool(jnp.allclose(jnp.linalg.norm(w.reshape(-1, 32), axis=0), 1.0, atol=1e-6))
    True

  {{references}}
  """

  def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    shape = tuple(shape)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
        f'unit_initializer: dtype {jnp.dtype(dtype).name} is not real floating-point, and a '
        'unit vector needs one (float32, bfloat16, float64, ...).'
      )
    if len(shape) < 2:
      raise ValueError(f'unit_initializer needs a shape with at least 2 axes; got {shape}.')
    draw = jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.promote_types(dtype, jnp.float32))
    columns, _ = manifold.unit(draw)
    return columns.astype(dtype)

  return init
