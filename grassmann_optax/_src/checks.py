"""Input checks shared by the transforms, the aliases and the label functions.

They run when a transform is initialised (on concrete shapes, outside any trace), so a bad
parameter tree fails before the first step with a message that names the offending leaf.
"""

import math
from typing import Any

import jax


def leaf_name(path) -> str:
  """A readable name for a pytree path, e.g. ``params/conv0/kernel``."""
  parts = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return '/'.join(parts) or '<root>'


def fan_in_and_out(shape: tuple[int, ...]) -> tuple[int, int]:
  """``(n, p)`` of the column view ``reshape(-1, shape[-1])``: rows (fan-in) and columns."""
  if not shape:
    return 1, 1
  return math.prod(shape[:-1]), shape[-1]


def has_manifold_rows(shape: tuple[int, ...]) -> bool:
  """Whether the column view ``reshape(-1, shape[-1])`` has the >= 2 rows of a point of G(1, n)."""
  return len(shape) >= 2 and fan_in_and_out(shape)[0] >= 2


def check_manifold_leaves(tree: Any, transform_name: str) -> None:
  """Every leaf must have at least 2 rows in its column view to be a point set on G(1, n)."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    shape = tuple(getattr(leaf, 'shape', ()))
    if not has_manifold_rows(shape):
      n, p = fan_in_and_out(shape)
      raise ValueError(
        f'{transform_name}: leaf {leaf_name(path)!r} of shape {shape} cannot lie on G(1, n): '
        'a manifold leaf is viewed as reshape(-1, shape[-1]) and needs at least 2 rows '
        f'(got n={n} rows, p={p} columns). Label it as euclidean instead.'
      )
