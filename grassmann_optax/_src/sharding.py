"""Leaves split across devices inside ``shard_map``: which mesh axes split which axes of a leaf.

Inside ``jax.shard_map`` each device sees its block of a sharded leaf. Per-point sums (norms,
inner products) are then sums over the devices that split a point, and the orthogonality term
(R2) couples points that other devices hold. ``mesh_axes`` tells the transforms, for each leaf,
the mesh axes that split its axes: the ``PartitionSpec`` given to ``shard_map`` for it. With it,
per-point sums are all-reduced (``psum``) over the mesh axes that split the point axes, and the
orthogonality term all-reduces a Gram matrix instead of gathering the leaf ((P5) of
``docs/algorithm.md``).

``mesh_axes`` is ``None`` (nothing is split), one ``PartitionSpec`` for every leaf, a pytree of
``PartitionSpec`` (or ``None``) with the paths of the params (missing leaves are not split), or a
callable ``params -> pytree``, as ``point_axes`` is. A plain tuple of axis names is read as a
``PartitionSpec``.
"""

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec

from grassmann_optax._src import checks

Split = tuple[tuple[str, ...], ...]  # per axis of a leaf, the mesh axes that split it

_EXPECTED = (
  'expected None, a PartitionSpec (the one given to shard_map for the leaf), a pytree of those '
  'with the paths of the params, or a callable params -> pytree'
)


def _is_spec(x) -> bool:
  if x is None or isinstance(x, PartitionSpec):
    return True
  return isinstance(x, tuple) and not hasattr(x, '_fields') and all(_is_entry(e) for e in x)


def _is_entry(entry) -> bool:
  if entry is None or isinstance(entry, str):
    return True
  return isinstance(entry, tuple | list) and all(isinstance(e, str) for e in entry)


def axis_names(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def check_spec_tree(mesh_axes, where: str = 'mesh_axes') -> None:
  """Raises a TypeError unless ``mesh_axes`` is a spec, a pytree of specs or a callable."""
  if callable(mesh_axes) or _is_spec(mesh_axes):
    return
  if isinstance(mesh_axes, tuple | list) and not hasattr(mesh_axes, '_fields'):
    raise TypeError(f'{where}={mesh_axes!r}: {_EXPECTED}.')
  if jax.tree_util.treedef_is_leaf(jax.tree.structure(mesh_axes)):
    hint = f' {checks.static_args_hint(where)}' if where == 'mesh_axes' else ''
    raise TypeError(f'{where}={mesh_axes!r}: {_EXPECTED}.{hint}')
  for path, spec in jax.tree_util.tree_flatten_with_path(mesh_axes, is_leaf=_is_spec)[0]:
    if not _is_spec(spec):
      raise TypeError(
        f'{where}: the entry {spec!r} for {checks.leaf_name(path)!r} is not a PartitionSpec '
        f'({_EXPECTED}).'
      )


def _bound(name: str) -> bool:
  """Whether the mesh axis ``name`` is bound here (inside ``shard_map`` over it)."""
  try:
    jax.lax.axis_size(name)
  except NameError:
    return False
  return True


def _split(spec, ndim: int, name: str) -> Split:
  """The mesh axes that split each axis of a leaf here.

  Outside ``shard_map`` (under ``jit`` with sharded params, or with none) a leaf is the whole
  array, so mesh axes that are not bound split nothing; inside it, an axis name that is not
  bound (a typo) leaves the leaf's variation unnamed, which :func:`check_split` refuses.
  """
  entries = tuple(spec) if spec is not None else ()
  if len(entries) > ndim:
    raise ValueError(
      f'mesh_axes of {name} has {len(entries)} entries for a leaf of {ndim} axes: give the '
      'PartitionSpec that shard_map was given for this leaf.'
    )
  split = tuple(tuple(m for m in axis_names(e) if _bound(m)) for e in entries)
  return split + ((),) * (ndim - len(entries))


def resolve(tree: Any, mesh_axes) -> list[Split | None]:
  """Per leaf of ``tree``, the mesh axes that split each of its axes (``None``: not split)."""
  leaves = checks.named_leaves(tree)
  if mesh_axes is None:
    return [None] * len(leaves)
  if callable(mesh_axes):
    mesh_axes = mesh_axes(tree)
    check_spec_tree(mesh_axes, 'mesh_axes(params)')
  ndim = lambda leaf: len(getattr(leaf, 'shape', ()))
  if _is_spec(mesh_axes):
    return [_split(mesh_axes, ndim(leaf), repr(name)) for name, leaf in leaves]
  specs = checks.entries_by_name(tree, mesh_axes, 'mesh_axes', _is_spec)
  return [
    _split(spec, ndim(leaf), repr(name)) for (name, leaf), spec in zip(leaves, specs, strict=True)
  ]


def varying(x) -> frozenset:
  """The mesh axes along which ``x`` differs between devices (inside ``shard_map``)."""
  try:
    aval = jax.typeof(x)
  except TypeError:
    return frozenset()
  manual = getattr(aval, 'manual_axis_type', None)  # jax >= 0.10
  if manual is not None:
    return frozenset(manual.varying)
  return frozenset(getattr(aval, 'vma', ()) or ())


def _explicit(x) -> tuple[Any, frozenset]:
  """The abstract mesh of ``x`` and the explicit mesh axes that split it (none for others)."""
  if not isinstance(x, jax.Array):
    return None, frozenset()
  aval_sharding = getattr(jax.typeof(x), 'sharding', None)
  mesh = getattr(aval_sharding, 'mesh', None)
  explicit = frozenset(getattr(mesh, 'explicit_axes', ()) or ())
  if not explicit:
    return None, frozenset()
  named = {m for entry in aval_sharding.spec for m in axis_names(entry)}
  return mesh, frozenset(named & explicit)


def _explicit_mesh(tree: Any):
  """The mesh whose explicit axes split a leaf of ``tree``, or ``None``."""
  meshes = {mesh for mesh, names in map(_explicit, jax.tree.leaves(tree)) if names}
  if len(meshes) > 1:
    raise ValueError(
      f'the arrays are split over {len(meshes)} different meshes with explicit axes; put them '
      'on one mesh'
    )
  return meshes.pop() if meshes else None


def _on_auto_axes(fn, mesh, out_sharding, *args):
  return jax.sharding.auto_axes(fn, out_sharding=out_sharding, axes=tuple(mesh.explicit_axes))(
    *args
  )


def explicit_axes_as_auto(update_fn):
  """``update_fn(updates, state, params, **extra_args)`` that also takes explicitly sharded leaves.

  A leaf sharded over a mesh whose axes are ``Explicit`` (the default of ``jax.make_mesh``) has
  its sharding in its type, and operations whose result sharding is ambiguous (the reshape of a
  split kernel into its points, the product ``YᵀY`` of a leaf split by columns) are errors there.
  For such leaves the update runs inside :func:`jax.sharding.auto_axes`: XLA partitions it as
  under ``jit`` with sharded leaves on an ``Auto`` mesh (per-point sums and the orthogonality
  Gram all-reduced, nothing gathered), and every result takes the sharding of its input: the
  updates that of the updates, each state leaf that of the state leaf it replaces (replicated
  where that had none).
  """

  @functools.wraps(update_fn)
  def wrapped(updates, state, params=None, **extra_args):
    mesh = _explicit_mesh((updates, state, params))
    if mesh is None:
      return update_fn(updates, state, params, **extra_args)
    replicated = NamedSharding(mesh, PartitionSpec())

    def out_sharding(x):
      return jax.typeof(x).sharding if _explicit(x)[0] == mesh else replicated

    # The new state has the structure of the state; the updates, that of the updates.
    out = jax.tree.map(out_sharding, (updates, state))
    run = lambda u, s, p: update_fn(u, s, p, **extra_args)
    return _on_auto_axes(run, mesh, out, updates, state, params)

  return wrapped


def replicated_under_explicit_axes(fn):
  """``fn(*arrays, **options)``, whose results are small, for explicitly sharded arrays too.

  As :func:`explicit_axes_as_auto`, but every result is replicated over the mesh (a loss value,
  per-point sums).
  """

  @functools.wraps(fn)
  def wrapped(*arrays, **options):
    mesh = _explicit_mesh(arrays)
    if mesh is None:
      return fn(*arrays, **options)
    run = lambda *a: fn(*a, **options)
    return _on_auto_axes(run, mesh, NamedSharding(mesh, PartitionSpec()), *arrays)

  return wrapped


def check_split(tree: Any, splits: Sequence, name: str) -> None:
  """Inside ``shard_map``, every leaf that differs between devices must say how it is split.

  A leaf that varies along a mesh axis that ``mesh_axes`` does not name for it would have its
  norms and orthogonality term computed from its local block alone: silently wrong.
  """
  for (leaf_name, leaf), split in zip(checks.named_leaves(tree), splits, strict=True):
    named = {m for axis in split for m in axis} if split is not None else set()
    unnamed = sorted(varying(leaf) - named)
    if unnamed:
      raise ValueError(
        f'{name}: leaf {leaf_name!r} (local shape {tuple(leaf.shape)}) differs between devices '
        f'along the mesh axes {unnamed} inside shard_map, but mesh_axes does not say which of '
        'its axes they split, so its norms and orthogonality term would be those of the local '
        'block alone. Pass mesh_axes=, the PartitionSpec you gave shard_map for it (e.g. '
        "mesh_axes=P(None, 'model') for a leaf split by columns)."
      )


def axis_size(names: tuple[str, ...]) -> int:
  """How many devices ``names`` span: 1 for none, as outside ``shard_map`` (global shapes).

  ``names`` come from :func:`resolve`, which keeps only the mesh axes bound here.
  """
  return math.prod(jax.lax.axis_size(name) for name in names)


def psum(x: jax.Array, names: tuple[str, ...]) -> jax.Array:
  return jax.lax.psum(x, names) if names else x


def pmax(x: jax.Array, names: tuple[str, ...]) -> jax.Array:
  return jax.lax.pmax(x, names) if names else x


def like(value: jax.Array, reference: jax.Array) -> jax.Array:
  """``value``, varying along the mesh axes ``reference`` varies along (for ``lax.cond``)."""
  names = tuple(sorted(varying(reference) - varying(value)))
  return jax.lax.pcast(value, names, to='varying') if names else value


def splitting(spec: tuple, axes) -> tuple[str, ...]:
  """The mesh axes that split ``axes`` of an array laid out by ``spec`` (:func:`operand_spec`),
  in order: those a partitioner all-reduces a per-point sum over."""
  return tuple(name for axis in axes for name in axis_names(spec[axis]))


def on_auto_axes(mesh, local):
  """``local``, the per-device body a partitioner returns, traced with ``mesh``'s axes ``Auto``.

  jax traces a custom partitioning's per-device body under the mesh that was set when the
  computation was compiled. From jax 0.11 on, a mesh with ``Explicit`` axes there gives the
  body's operations sharding annotations that nothing lowers afterwards ("No registered
  implementation for untyped custom call to Sharding"), so the kernel and the orthogonality
  term failed under ``jax.set_mesh`` of such a mesh, the default of ``jax.make_mesh``. The body
  runs on one device's blocks, where axis types say nothing, so it is traced as on an ``Auto``
  mesh of the same axes; its collectives (``psum`` over mesh axes) are unchanged.
  """
  auto = AbstractMesh(
    tuple(mesh.axis_sizes),
    tuple(mesh.axis_names),
    axis_types=(AxisType.Auto,) * len(mesh.axis_names),
  )

  @functools.wraps(local)
  def body(*args):
    with jax.sharding.use_abstract_mesh(auto):
      return local(*args)

  return body


def operand_spec(mesh, shape) -> tuple:
  """The mesh axes of each axis of a custom partitioning's operand, from the layout XLA gives it.

  The partitioners take their shardings undecoded (``decode_shardings=False``): XLA may lay out
  a value with one mesh axis split over two of its axes (the products of a stack of two leaves,
  flattened beside those of a leaf split four ways), which no PartitionSpec can say, and jax's
  decoding of such a result raised before the partitioner ran. Here an operand is decoded as
  jax decodes it; one that cannot be is taken whole (XLA gathers it), and each result takes the
  layout that follows from the operands, whatever XLA had proposed for it. The decoding is jax's
  private function: should a later jax move or change it, operands are taken whole (the same
  results, with a gather) instead of failing.
  """
  sharding = shape.sharding
  if isinstance(sharding, NamedSharding):
    spec = tuple(sharding.spec)
  else:
    try:
      from jax._src.sharding_impls import parse_flatten_op_sharding

      spec = tuple(parse_flatten_op_sharding(sharding._hlo_sharding, mesh)[0])
    except (ImportError, AttributeError, TypeError, ValueError):
      # ValueError: jax's IndivisibleError; the others: a jax without this private API.
      spec = ()
  return spec + (None,) * (len(shape.shape) - len(spec))


@functools.cache
def _partitioned_orthogonality(ndim: int, point_axes: tuple[int, ...]):
  """The orthogonality gradient with a sharding rule for ``jit`` over sharded leaves (P5).

  XLA's partitioner gathers a leaf split by columns onto every device to form ``YᵀY``. With this
  rule each device runs the ``shard_map`` form on its block: the mesh axes that split the point
  axes and those that split the points of a group come from the leaf's sharding, and a Gram
  matrix is all-reduced instead.
  """
  from grassmann_optax._src import manifold  # manifold reduces through this module

  batch = [axis for axis in range(ndim) if axis not in point_axes]

  def plain(w, omega):
    return manifold.orthogonality_gradient(w, omega, point_axes)

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    spec = operand_spec(mesh, arg_shapes[0])
    point = splitting(spec, point_axes)
    members = axis_names(spec[batch[-1]]) if batch else ()

    def local(w, omega):
      return manifold.orthogonality_gradient(w, omega, point_axes, point, members)

    leaf = NamedSharding(mesh, PartitionSpec(*spec))
    return mesh, on_auto_axes(mesh, local), leaf, (leaf, NamedSharding(mesh, PartitionSpec()))

  def infer_sharding(mesh, arg_shapes, result_shape):
    del result_shape
    return NamedSharding(mesh, PartitionSpec(*operand_spec(mesh, arg_shapes[0])))

  gradient = custom_partitioning(plain)
  factors = ' '.join(f'a{axis}' for axis in range(ndim))
  gradient.def_partition(
    partition,
    infer_sharding_from_operands=infer_sharding,
    decode_shardings=False,
    sharding_rule=f'{factors}, -> {factors}',
  )

  @jax.custom_batching.custom_vmap
  def batchable(w, omega):
    return gradient(w, omega)

  @batchable.def_vmap
  def vmap_rule(axis_size, in_batched, w, omega):
    """``jax.vmap`` over runs (custom_partitioning has no batching rule of its own).

    The mapped axis, moved to the front, indexes groups like any leading batch axis, so the
    partitioned form of one more axis computes it; where the leaf has no batch axis (the mapped
    axis would become the axis of a group's points) or ``omega`` is mapped too, the unpartitioned
    form is mapped instead.
    """
    w_batched, omega_batched = in_batched
    if not w_batched:
      w = jnp.broadcast_to(w, (axis_size, *w.shape))
    if batch and not omega_batched:
      shifted = tuple(axis + 1 for axis in point_axes)
      return _partitioned_orthogonality(ndim + 1, shifted)(w, omega), True
    if not omega_batched:
      omega = jnp.broadcast_to(omega, (axis_size,))
    return jax.vmap(plain)(w, omega), True

  @jax.custom_jvp
  def differentiable(w, omega):
    return batchable(w, omega)

  @differentiable.defjvp
  def jvp(primals, tangents):  # derivatives through the unpartitioned form
    return jax.jvp(plain, primals, tangents)

  return differentiable


def orthogonality_gradient(w: jax.Array, omega, point_axes: tuple[int, ...]) -> jax.Array:
  """(R2) of ``w``; under ``jit`` over a sharded ``w``, without gathering it (P5)."""
  omega = jnp.asarray(omega, w.dtype)
  return _partitioned_orthogonality(w.ndim, tuple(point_axes))(w, omega)
