"""Leaves stepped as one array: a leaf alone, or equal small leaves stacked on a new axis 0.

A model of hundreds of equal small layers (a Transformer's) compiles and runs as a few arrays
instead of hundreds when the leaves of one shape, dtypes and layout are stacked
(:func:`tuning.stacks` says which; with the tuning off every leaf is alone). The transforms that
step leaves (the orthogonality term, the SGD-G and Adam-G steps, the Hyperball steps) all plan
their stacks here, from one signature, and take their pieces back with one copy
(:func:`native.unstack`).
"""

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from grassmann_optax._src import native, points, sharding, tuning


class Stack(NamedTuple):
  """The indices of the leaves stepped as one array, in the order of the flattened tree."""

  members: tuple[int, ...]

  @property
  def first(self) -> int:
    return self.members[0]

  @property
  def alone(self) -> bool:
    """One leaf, stepped as it is (no new axis)."""
    return len(self.members) == 1

  def layout(self, layouts: Sequence[points.Layout]) -> points.Layout:
    """The layout of the stepped array: the leaf's, or its stack's (a new leading batch axis)."""
    layout = layouts[self.first]
    return layout if self.alone else layout.stacked()

  def pick(self, leaves: Sequence[jax.Array]) -> jax.Array:
    """The members' leaves as one array: the leaf itself, or the leaves stacked on axis 0."""
    if self.alone:
      return leaves[self.first]
    return jnp.stack([leaves[i] for i in self.members])

  def scatter(self, value: jax.Array, out: list) -> None:
    """Puts each member's piece of ``value`` (``value`` itself, or its slices along axis 0) at
    the member's index of ``out``."""
    pieces = [value] if self.alone else native.unstack(value)
    for index, piece in zip(self.members, pieces, strict=True):
      out[index] = piece


def plan(layouts: Sequence[points.Layout], *leaves: Sequence[jax.Array]) -> list[Stack]:
  """The stacks of the leaves: equal layout, shape (of the first list), dtypes and, inside
  ``shard_map``, varying mesh axes (of every list), each under :data:`tuning.SMALL_LEAF`
  elements; every leaf in one stack, in order of first appearance.

  ``leaves`` are lists over the same leaves (the params first, then the updates and buffers that
  are stepped with them), so that stacked arrays are of one dtype each.
  """
  first = leaves[0]
  # Inside shard_map a stack varies along every mesh axis that one of its members varies along,
  # so members of different axes would come back typed as varying where their out_specs say
  # replicated: such leaves are not stacked together.
  signatures = [
    (
      tuple(first[i].shape),
      tuple(str(x[i].dtype) for x in leaves),
      tuple(sharding.varying(x[i]) for x in leaves),
      layout,
    )
    for i, layout in enumerate(layouts)
  ]
  return [Stack(tuple(members)) for members in tuning.stacks(signatures, [x.size for x in first])]
