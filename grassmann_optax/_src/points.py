"""Which axes of a leaf form one point: ``point_axes``, resolved per leaf.

A leaf holds a set of points, each a vector made of the leaf's elements along its *point axes*;
every other axis (a *batch* axis) indexes points. ``None``, the default, is all axes but the last:
the columns of ``leaf.reshape(-1, leaf.shape[-1])``, the paper's layout. The rows of a Dense
kernel ``(in, out)`` are ``(1,)``; a whole leaf is ``tuple(range(leaf.ndim))``; each head of a
``DenseGeneral`` kernel ``(embed, heads, head_dim)`` is ``(0, 2)``; the columns of each layer of
a stacked ``(layers, in, out)`` kernel are ``(1,)``.

The orthogonality term (R1) couples the points of a *group*: the points that differ only in
the last batch axis. The other batch axes index groups: the layers of a stack, say.

``point_axes`` may be given as one spec for every leaf (``None``, an int or a tuple of ints), as
a pytree of specs with the structure of the params (missing leaves take the default), or as a
callable ``params -> pytree``, in the manner of ``optax.contrib.muon``'s dimension numbers. A
pytree given for the whole params also serves a transform that sees part of them (a branch of
``optax.partition``): specs are matched to leaves by their path.
"""

import math
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from grassmann_optax._src import checks

Spec = None | int | Sequence[int]
PointAxes = Spec | Any | Callable[[Any], Any]


_EXPECTED = (
  'expected None, an int, a tuple of ints, a pytree of those with the paths of the params, or a '
  'callable params -> pytree'
)


def _is_integer(x) -> bool:
  if isinstance(x, bool | np.bool_):
    return False
  try:
    operator.index(x)
  except (TypeError, AttributeError):  # a Flax box forwards __index__ to its value (or None)
    return False
  return True


def _integer_array(x) -> bool:
  """A NumPy or JAX integer array of at most one axis: a list of axes."""
  dtype = getattr(x, 'dtype', None)
  return (
    dtype is not None
    and getattr(x, 'ndim', 2) <= 1
    and np.issubdtype(dtype, np.integer)
    and not isinstance(x, jax.core.Tracer)
  )


def is_spec(x) -> bool:
  """A spec for one leaf: None, an int, a tuple/list of ints, or an integer array."""
  if x is None or _is_integer(x) or _integer_array(x):
    return True
  return isinstance(x, tuple | list) and all(_is_integer(a) for a in x)


def _as_spec(x) -> Spec:
  if _integer_array(x):
    return tuple(int(a) for a in np.ravel(x)) if np.ndim(x) else int(x)
  return x


def check_spec_tree(point_axes, where: str = 'point_axes') -> None:
  """Raises a TypeError unless ``point_axes`` is a spec, a pytree of specs or a callable.

  A top-level tuple or list is read as one spec, so it must hold integers: ``(0, None)`` is a
  mistake, not a pytree.
  """
  if callable(point_axes) or is_spec(point_axes):
    return
  if isinstance(point_axes, tuple | list) and not hasattr(point_axes, '_fields'):
    raise TypeError(
      f'{where}={point_axes!r}: a tuple or list of point axes must hold integers only '
      f'({_EXPECTED}).'
    )
  if jax.tree_util.treedef_is_leaf(jax.tree.structure(point_axes)):
    hint = f' {checks.static_args_hint(where)}' if where == 'point_axes' else ''
    raise TypeError(f'{where}={point_axes!r}: {_EXPECTED}.{hint}')
  for path, spec in jax.tree_util.tree_flatten_with_path(point_axes, is_leaf=is_spec)[0]:
    if not is_spec(spec):
      raise TypeError(
        f'{where}: the entry {spec!r} for {checks.leaf_name(path)!r} is not a spec of point '
        f'axes ({_EXPECTED}).'
      )


def normalize(spec: Spec, ndim: int, name: str = 'the leaf') -> tuple[int, ...]:
  """Sorted, non-negative point axes of a leaf with ``ndim`` axes; ``None``: all but the last.

  Raises:
    TypeError: an axis is not an integer.
    ValueError: no axis, an axis out of range, or an axis named twice.
  """
  if spec is None:
    return tuple(range(ndim - 1))
  spec = _as_spec(spec)
  given = tuple(spec) if isinstance(spec, Iterable) else (spec,)
  if not given:
    raise ValueError(f'point_axes of {name} is empty: a point needs at least one axis.')
  axes = []
  for axis in given:
    if isinstance(axis, bool):
      raise TypeError(f'point_axes of {name} must be integers, got {axis!r}.')
    try:
      axis = operator.index(axis)
    except TypeError:
      raise TypeError(f'point_axes of {name} must be integers, got {axis!r}.') from None
    if not -ndim <= axis < ndim:
      raise ValueError(
        f'point axis {axis} of {name} is out of range for {ndim} axes (point_axes {given}).'
      )
    axes.append(axis % ndim)
  if len(set(axes)) != len(axes):
    raise ValueError(f'point_axes {given} of {name} name an axis twice.')
  return tuple(sorted(axes))


class Layout(NamedTuple):
  """How one leaf is read as points, and (inside ``shard_map``) how it is split across devices."""

  point: tuple[int, ...]  # the axes of one point
  batch: tuple[int, ...]  # the axes that index points; the last indexes points of a group
  point_mesh: tuple[str, ...] = ()  # mesh axes that split each point: its sums are all-reduced
  member_mesh: tuple[str, ...] = ()  # mesh axes that split the points of a group

  @classmethod
  def of(cls, shape: tuple[int, ...], spec: Spec, name: str = 'the leaf', split=None) -> 'Layout':
    """The layout of a leaf of ``shape``; ``split`` names the mesh axes of each of its axes."""
    point = normalize(spec, len(shape), name)
    batch = tuple(a for a in range(len(shape)) if a not in point)
    if split is None:
      return cls(point, batch)
    point_mesh = tuple(m for a in point for m in split[a])
    member_mesh = tuple(split[batch[-1]]) if batch else ()
    return cls(point, batch, point_mesh, member_mesh)

  @property
  def split(self) -> bool:
    return bool(self.point_mesh or self.member_mesh)

  def stacked(self) -> 'Layout':
    """The layout of equal leaves of this layout stacked on a new leading axis, a batch axis.

    Each leaf keeps its points. The new axis is a group axis where the leaves have batch axes;
    where they have none (one point per leaf) it is the last batch axis, so the leaves' points
    form one group: maths that couples the points of a group must not stack such leaves.
    """
    return self._replace(
      point=tuple(a + 1 for a in self.point), batch=(0, *(a + 1 for a in self.batch))
    )

  def point_size(self, shape) -> int:
    return math.prod(shape[a] for a in self.point)

  def points_per_group(self, shape) -> int:
    return shape[self.batch[-1]] if self.batch else 1

  def batch_shape(self, shape) -> tuple[int, ...]:
    """The shape of per-point state: the batch axes of the leaf."""
    return tuple(shape[a] for a in self.batch)

  def num_points(self, shape) -> int:
    return math.prod(self.batch_shape(shape))

  def per_point_shape(self, shape) -> tuple[int, ...]:
    """The shape of per-point scalars that broadcast against the leaf (1 on point axes)."""
    return tuple(1 if a in self.point else n for a, n in enumerate(shape))


def _named_specs(point_axes) -> dict[str, Spec]:
  pairs = jax.tree_util.tree_flatten_with_path(point_axes, is_leaf=is_spec)[0]
  return {name: _as_spec(spec) for name, spec in checks.by_name(pairs, 'point_axes').items()}


def specs_for(tree: Any, point_axes: PointAxes) -> PointAxes:
  """``point_axes`` for ``tree``: a callable is called on it, and the result checked."""
  if callable(point_axes):
    point_axes = point_axes(tree)
    check_spec_tree(point_axes, 'point_axes(params)')
  return point_axes


def resolve(
  tree: Any,
  point_axes: PointAxes,
  mesh_axes: Any = None,
  default: Callable[[int], tuple[int, ...]] | None = None,
) -> list[Layout]:
  """The layout of every leaf of ``tree``, in the order of ``jax.tree.leaves(tree)``.

  ``mesh_axes`` (see :mod:`sharding`) says which mesh axes split each leaf inside ``shard_map``.
  ``default(ndim)`` gives the point axes of a leaf whose spec is ``None`` (else the columns); a
  scalar leaf then has no point axes.

  Raises:
    TypeError: ``point_axes`` (or what a callable returns) is not a spec or a pytree of specs.
    ValueError: a spec that does not fit its leaf.
  """
  from grassmann_optax._src import sharding  # sharding reads point layouts

  leaves = checks.named_leaves(tree)
  point_axes = specs_for(tree, point_axes)
  splits = sharding.resolve(tree, mesh_axes)
  if is_spec(point_axes):
    spec = _as_spec(point_axes)
    specs = [spec] * len(leaves)
  else:
    specs = [_as_spec(s) for s in checks.entries_by_name(tree, point_axes, 'point_axes', is_spec)]
  layouts = []
  for (name, leaf), spec, split in zip(leaves, specs, splits, strict=True):
    shape = tuple(getattr(leaf, 'shape', ()))
    if spec is None and default is not None:
      if not shape:
        layouts.append(Layout((), ()))
        continue
      spec = default(len(shape))
    layouts.append(Layout.of(shape, spec, repr(name), split))
  return layouts


def check_names(params: Any, point_axes: PointAxes, name: str | None = None) -> None:
  """A pytree of specs must name only leaves of ``params`` (a typo would pass silently).

  ``name``: the function the message starts with.
  """
  point_axes = specs_for(params, point_axes)
  if is_spec(point_axes):
    return
  names = set(checks.unique_names(params, 'the params, matched to point_axes by name'))
  extra = sorted(set(_named_specs(point_axes)) - names)
  if extra:
    start = f'{name}: point_axes' if name else 'point_axes'
    raise ValueError(f'{start} names {extra[0]!r}, which is not a leaf of the params.')
