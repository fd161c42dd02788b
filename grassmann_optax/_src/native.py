"""The six per-point inner products of a step in one pass on CPU: a C++ kernel behind ``jax.ffi``.

A fused SGD-G/Adam-G step needs, per point (a unit vector of the manifold, by default a column),
``wᵀw, wᵀg, gᵀg, wᵀb, gᵀb, bᵀb`` ((F1) of ``docs/algorithm.md``). On GPU XLA computes sibling
reductions of the same operands in one fused pass. XLA:CPU does not: it evaluates each reduction
as its own loop and so reads ``w``, ``g`` and ``b`` nine times. On CPU :func:`column_products`
therefore calls ``column_gram.cc``, which reads each array once.

A point is made of the ``point_axes`` of a leaf; the other axes index points. The kernel reads
every layout whose runs of point and batch axes follow ``[batch][point][batch][point]`` (columns,
rows, whole leaves, attention heads, and stacks of those; :func:`kernel_layout`); XLA reduces the
others. ``docs/kernel.md`` describes the layouts, the loops and their measured speed.

The kernel is compiled when the package is installed (``CMakeLists.txt``, with scikit-build-core
and nanobind) into the extension module ``grassmann_optax._src._column_gram``. This module imports
it like any other module of the package the first time a CPU process traces a step that can use
it, and registers its handler with ``jax.ffi``; nothing is compiled at import or trace. Where the
package was installed without it (no C++ compiler, or ``GRASSMANN_OPTAX_BUILD_CPU_KERNEL=0``),
that first trace warns once and XLA computes the same products, slower on CPU and otherwise
identical. ``GRASSMANN_OPTAX_CPU_KERNEL=0`` turns the kernel off, without a warning.

On x86-64 processors with AVX2 the kernel runs an AVX2 build of its loops, chosen when it is
loaded (:func:`variant` says which); ``GRASSMANN_OPTAX_CPU_KERNEL_ISA=baseline`` forces the
portable loops. Both do the same float32 operations in the same order (each column summed in row
order in one vector lane, each run in eight lanes added up in a fixed tree) and nothing is
contracted into a fused multiply-add, so both return the same bits, whatever the threads do.

Other backends, and storage dtypes other than float32, always use the XLA reductions. The
kernel has a JVP rule (the products are bilinear), so the update stays differentiable; under
``vmap`` it runs once per batch member; under ``jit`` with sharded arrays each device reduces its
own shard (a ``psum`` adds up shards of point axes), so nothing is gathered.

The same extension module has two more handlers: ``unstack.cc`` (:func:`unstack`) copies the
leaves of a stack out in one call, and ``adam_products.cc`` (:func:`adam_products`) computes
AdamH's moments and the per-point products of its update in one pass, writing the moments in
place. Both have the same rules under ``vmap``, JVP and sharded ``jit`` as the products, and the
same switches.

The public switches are in :mod:`grassmann_optax.cpu_kernel`.

References:
  Cho & Lee, "Riemannian approach to batch normalization", NeurIPS 2017, arXiv:1709.09603.
"""

import contextlib
import functools
import importlib
import itertools
import re
import threading
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jaxlib.version
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from grassmann_optax._src import checks, manifold, points, sharding, tuning

ENV_SWITCH = 'GRASSMANN_OPTAX_CPU_KERNEL'
# Read by the kernel when it is loaded: 'baseline' forces the portable loop instead of AVX2.
ENV_VARIANT = 'GRASSMANN_OPTAX_CPU_KERNEL_ISA'
# Read when the package is installed (pyproject.toml): 0 installs it without the kernel.
ENV_BUILD = 'GRASSMANN_OPTAX_BUILD_CPU_KERNEL'
# The extension module that CMakeLists.txt builds and installs beside this file.
MODULE = 'grassmann_optax._src._column_gram'
TARGET = 'grassmann_optax_column_gram'
UNSTACK_TARGET = 'grassmann_optax_unstack'
ADAM_TARGET = 'grassmann_optax_adam_products'
# The sums of adam_products.cc: w·w, w·u, u·u, w·m', u·m'.
ADAM_SUMS = 5
# Runs of fewer elements take the kernel's column loop (kShortRun in column_gram.cc).
SHORT_RUN = 16

_lock = threading.Lock()
_disabled_here = threading.local()


class _Kernel(NamedTuple):
  """The kernel as this process loaded it."""

  variant: str | None  # 'avx2' or 'baseline'; None where it is not in use
  missing: str | None  # why it is not installed or not loadable (for the warning); else None


def _switched_off() -> bool:
  return tuning.switched_off(ENV_SWITCH)


def _release(version: str) -> tuple[int, int, int] | None:
  """``(major, minor, patch)`` of a jaxlib version (``0.12.1``, ``0.12.1.dev20261201``), or
  ``None`` for a string that does not start so."""
  match = re.match(r'(\d+)\.(\d+)\.(\d+)', version)
  return tuple(map(int, match.groups())) if match else None


def _newer_than_runtime(build_jaxlib: str | None) -> str | None:
  """Why the kernel must not be registered in this process, or ``None`` where it may be.

  XLA refuses a handler built against a newer version of its FFI API than its own, and that
  refusal stops jax's CPU backend, every computation with it. pip's isolated build uses the
  oldest supported jax (``pyproject.toml``), but a build without isolation uses the jax at hand,
  which may be downgraded later, so the kernel is loaded only into a jaxlib at least as new as
  the one it was built against (the jaxlib version stands in for the FFI API version, which
  jaxlib does not expose to Python). A version that cannot be read counts as too new.
  """
  runtime = jaxlib.version.__version__
  rebuild = (
    'rebuild the kernel against this jaxlib: pip install scikit-build-core nanobind cmake, then '
    'pip install --no-build-isolation --force-reinstall --no-deps with the source you installed '
    'grassmann_optax from (e.g. -e . in a checkout)'
  )
  if build_jaxlib is None:
    return f'its module does not say which jaxlib it was built against; {rebuild}'
  built, running = _release(build_jaxlib), _release(runtime)
  if built is not None and running is not None and built <= running:
    return None
  return (
    f'it was built against jaxlib {build_jaxlib}, which may be newer than the jaxlib {runtime} '
    f'of this process, whose XLA would then refuse it. Upgrade jax and jaxlib to {build_jaxlib} '
    f'or later, or {rebuild}'
  )


def _load() -> _Kernel:
  """Imports the installed extension module and registers its handler with ``jax.ffi``."""
  if _switched_off():
    return _Kernel(None, None)
  try:
    module = importlib.import_module(MODULE)
  except ImportError as error:
    if isinstance(error, ModuleNotFoundError) and error.name == MODULE:
      missing = (
        'grassmann_optax was installed without it (no C++ compiler was found, or '
        f'{ENV_BUILD}=0 was set). Reinstall grassmann_optax where a C++ compiler is found to '
        'build it'
      )
    else:
      missing = (
        f'its module {MODULE} could not be imported ({error}). Reinstall grassmann_optax where '
        'a C++ compiler is found to rebuild it'
      )
    return _Kernel(None, missing)
  stale = _newer_than_runtime(getattr(module, 'build_jaxlib', None))
  if stale:
    return _Kernel(None, stale)
  jax.ffi.register_ffi_target(TARGET, module.handler(), platform='cpu')
  jax.ffi.register_ffi_target(UNSTACK_TARGET, module.unstack_handler(), platform='cpu')
  jax.ffi.register_ffi_target(ADAM_TARGET, module.adam_products_handler(), platform='cpu')
  return _Kernel(module.variant(), None)


_loaded: list[_Kernel] = []
_warned: list[bool] = []


def _kernel() -> _Kernel:
  """Loads the kernel once per process."""
  if not _loaded:
    with _lock:  # optimizers may be traced from several threads at once
      if not _loaded:
        _loaded.append(_load())
  return _loaded[0]


def _use_kernel() -> bool:
  """Whether functions traced now use the kernel; warns once where it is missing."""
  if getattr(_disabled_here, 'value', False):
    return False
  kernel = _kernel()
  if kernel.missing is not None and not _warned:
    with _lock:
      if not _warned:
        _warned.append(True)
        checks.warn(
          f'grassmann_optax: the CPU kernel for the per-point inner products is unavailable: '
          f'{kernel.missing}. Until then XLA computes them (the same results, slower on CPU); '
          f'set {ENV_SWITCH}=0 to use XLA without this warning.',
          RuntimeWarning,
        )
  return kernel.variant is not None


def available() -> bool:
  """Whether the CPU kernel is installed and switched on for functions traced in this thread.

  False where the package was installed without it (no C++ compiler was found, or
  ``GRASSMANN_OPTAX_BUILD_CPU_KERNEL=0`` was set), under ``GRASSMANN_OPTAX_CPU_KERNEL=0`` and inside
  :func:`disabled`. Then XLA computes the inner products: the same results, slower on CPU. GPU and
  TPU processes never use the kernel, whatever this says. Public as
  ``grassmann_optax.cpu_kernel.available``.

  Example:
    >>> import grassmann_optax as go
    >>> with go.cpu_kernel.disabled():
    ...   go.cpu_kernel.available()
    False
  """
  return not getattr(_disabled_here, 'value', False) and _kernel().variant is not None


def variant() -> str | None:
  """The CPU kernel's instruction-set variant in this process (``'avx2'`` or ``'baseline'``).

  ``None`` where the kernel is not installed or is switched off (``GRASSMANN_OPTAX_CPU_KERNEL=0``).
  Both variants return the same bits. Public as ``grassmann_optax.cpu_kernel.variant``.

  Example:
    >>> import grassmann_optax as go
    >>> go.cpu_kernel.variant() in (None, 'avx2', 'baseline')
    True
  """
  return _kernel().variant


@contextlib.contextmanager
def disabled() -> Iterator[None]:
  """Functions traced inside this block use XLA's reductions instead of the CPU kernel.

  For comparing or timing the two; the results are the same up to float rounding. Public as
  ``grassmann_optax.cpu_kernel.disabled``. It applies to tracing in the current thread: jit a
  function inside the block, and it keeps the XLA reductions wherever it is called. ``jax.jit``
  reuses the trace it already has of a function, so a transform whose ``update`` was traced
  before the block keeps the kernel in it: build the transform anew inside the block to compare.

  Example:
    >>> import jax, jax.numpy as jnp, grassmann_optax as go
    >>> w = go.unit_initializer()(jax.random.key(0), (27, 8))
    >>> tx = go.grassmann_sgd(0.2)
    >>> with go.cpu_kernel.disabled():
    ...   update = jax.jit(tx.update)
    ...   u, _ = update(jnp.ones_like(w), tx.init(w), w)
  """
  before = getattr(_disabled_here, 'value', False)
  _disabled_here.value = True
  try:
    yield
  finally:
    _disabled_here.value = before


_PAIRS = ((0, 0), (0, 1), (1, 1), (0, 2), (1, 2), (2, 2))


def normalize_point_axes(ndim: int, point_axes: int | Sequence[int] | None) -> tuple[int, ...]:
  """The axes of a point, sorted, non-negative and unique; ``None`` is all axes but the last.

  Raises:
    TypeError: an axis is not an integer.
    ValueError: no axis, an axis out of range for ``ndim`` axes, or an axis named twice.
  """
  return points.normalize(point_axes, ndim, 'the array')


def kernel_layout(
  shape: Sequence[int], point_axes: Sequence[int]
) -> tuple[int, int, int, int] | None:
  """The kernel's view ``(O, N1, I, N2)`` of an array of ``shape``, or ``None`` if it has none.

  ``point_axes`` as :func:`normalize_point_axes` returns them. Axes of size 1 are left out
  (either role fits them), except a last axis that is not a point axis, so that every layout of
  columns keeps the column loop. Adjacent axes of the same role merge into a run; the runs must
  follow ``[O][N1][I][N2]``: an optional run of batch axes, a run of point axes, an optional run of
  batch axes and an optional run of point axes. Point ``(o, i)`` is ``x[o, :, i, :]`` of the
  array read as ``(O, N1, I, N2)``; its index among the points is ``o * I + i``, the row-major
  order of the batch axes. ``N2 == 1`` selects the column loop, ``N2 >= 16`` the run loop, and
  ``1 < N2 < 16`` the column loop over ``I * N2`` columns whose sums are then added per point.
  Where ``N1 == 1`` and ``N2 > 1`` (rows), all batch axes go to ``O``, which the kernel splits
  across threads; rows shorter than 16 elements are left to XLA.

  Example:
    >>> from grassmann_optax._src import native
    >>> native.kernel_layout((768, 2304), (0,)), native.kernel_layout((768, 2304), (1,))
    ((1, 768, 2304, 1), (768, 1, 1, 2304))
    >>> native.kernel_layout((12, 768, 12, 64), (1, 3))  # stacked heads
    (12, 768, 12, 64)
    >>> native.kernel_layout((2, 3, 4, 5, 6), (1, 3)) is None  # batch, point, batch, point, batch
    True
    >>> native.kernel_layout((1000, 4), (1,)) is None  # rows of 4
    True
  """
  ndim = len(shape)
  points = set(point_axes)
  runs: list[list] = []  # [is a point run, size]
  for axis, size in enumerate(shape):
    is_point = axis in points
    if size == 1 and (is_point or axis != ndim - 1):
      continue
    if runs and runs[-1][0] == is_point:
      runs[-1][1] *= size
    else:
      runs.append([is_point, size])
  view = [1, 1, 1, 1]  # O (batch), N1 (point), I (batch), N2 (point)
  slot = 3
  for is_point, size in reversed(runs):
    while slot >= 0 and (slot % 2 == 1) != is_point:
      slot -= 1
    if slot < 0:
      return None
    view[slot] = size
    slot -= 1
  outer, reduced, inner, run = view
  if reduced == 1 and run > 1:
    if run < SHORT_RUN:
      return None  # rows of a few elements: XLA reads them faster than either of the loops
    # (O, 1, I, N2) is (O * I, 1, 1, N2): rows of runs, which the kernel splits by o.
    return outer * inner, 1, 1, run
  return outer, reduced, inner, run


def _batch_shape(shape: Sequence[int], point_axes: Sequence[int]) -> tuple[int, ...]:
  return tuple(size for axis, size in enumerate(shape) if axis not in point_axes)


def _point_shape(shape: Sequence[int], point_axes: Sequence[int]) -> tuple[int, ...]:
  """``shape`` with the point axes set to 1: one value per point, broadcastable against it."""
  return tuple(1 if axis in point_axes else size for axis, size in enumerate(shape))


def _dot(a: jax.Array, b: jax.Array, point_axes: tuple[int, ...]) -> jax.Array:
  # For the default axes this is manifold.column_dot, the same reduction.
  return jnp.sum(a * b, axis=point_axes, keepdims=True)


def _xla_products(w, g, b, point_axes) -> tuple[jax.Array, ...]:
  x = (w, g, b)
  return tuple(_dot(x[i], x[j], point_axes) for i, j in _PAIRS)


def _stack(products, batch_shape) -> jax.Array:
  return jnp.stack([p.reshape(batch_shape) for p in products])


def _ffi_gram(w, g, b, point_axes) -> jax.Array:
  """The kernel on one device's operands: shape ``(6, *batch_shape)``."""
  batch_shape = _batch_shape(w.shape, point_axes)
  layout = kernel_layout(w.shape, point_axes)
  if layout is None:  # a shard of rows cut below 16 elements by sharding: XLA reduces it
    return _stack(_xla_products(w, g, b, point_axes), batch_shape)
  outer, reduced, inner, run = layout
  out = jax.ShapeDtypeStruct((6, outer * inner), jnp.float32)
  gram = jax.ffi.ffi_call(TARGET, out, vmap_method='sequential')(
    w,
    g,
    b,
    outer=np.int64(outer),
    reduced=np.int64(reduced),
    inner=np.int64(inner),
    run=np.int64(run),
  )
  return gram.reshape((6, *batch_shape))


@functools.cache
def _partitioned_gram(ndim: int, point_axes: tuple[int, ...]):
  """The kernel with a sharding rule, so that ``jit`` over sharded arrays keeps the shards.

  Without it XLA's partitioner would gather every operand onto each device first. The rule names
  one factor per axis: the batch axes stay sharded as they are in the output, the point axes are
  reduced, each device summing its shard with a ``psum`` across the mesh axes that shard them.
  """
  batch_axes = tuple(axis for axis in range(ndim) if axis not in point_axes)

  def output_sharding(mesh, spec):
    return NamedSharding(mesh, PartitionSpec(None, *(spec[axis] for axis in batch_axes)))

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    spec = sharding.operand_spec(mesh, arg_shapes[0])
    reduced = sharding.splitting(spec, point_axes)

    def local(w, g, b):
      gram = _ffi_gram(w, g, b, point_axes)
      return jax.lax.psum(gram, reduced) if reduced else gram

    operand = NamedSharding(mesh, PartitionSpec(*spec))
    return mesh, sharding.on_auto_axes(mesh, local), output_sharding(mesh, spec), (operand,) * 3

  def infer_sharding(mesh, arg_shapes, result_shape):
    del result_shape
    return output_sharding(mesh, sharding.operand_spec(mesh, arg_shapes[0]))

  gram = custom_partitioning(lambda w, g, b: _ffi_gram(w, g, b, point_axes))
  factors = [f'a{axis}' for axis in range(ndim)]
  operand = ' '.join(factors)
  result = ' '.join(['k', *(factors[axis] for axis in batch_axes)])
  gram.def_partition(
    partition,
    infer_sharding_from_operands=infer_sharding,
    decode_shardings=False,
    sharding_rule=f'{operand}, {operand}, {operand} -> {result}',
    reduction_factors=tuple(factors[axis] for axis in point_axes),
  )
  return gram


@functools.cache
def _kernel_gram(point_axes: tuple[int, ...]):
  """The kernel for points over ``point_axes``, differentiable and batchable: ``(6, *batch)``."""

  @jax.custom_batching.custom_vmap
  def platform_gram(w, g, b):
    batch_shape = _batch_shape(w.shape, point_axes)
    return jax.lax.platform_dependent(
      w,
      g,
      b,
      cpu=_partitioned_gram(w.ndim, point_axes),
      default=lambda *x: _stack(_xla_products(*x, point_axes), batch_shape),
    )

  @platform_gram.def_vmap
  def platform_gram_batched(axis_size, in_batched, w, g, b):
    """Under ``vmap``, one call per batch member (the kernel sees the member's layout)."""
    operands = tuple(
      x if batched else jnp.broadcast_to(x, (axis_size, *x.shape))
      for x, batched in zip((w, g, b), in_batched, strict=True)
    )
    return jax.lax.map(lambda x: platform_gram(*x), operands), True

  @jax.custom_jvp
  def gram(w, g, b):
    return platform_gram(w, g, b)

  @gram.defjvp
  def gram_jvp(primals, tangents):
    # d(xᵀy) = dxᵀy + xᵀdy for each of the six bilinear products.
    x, dx = primals, tangents
    derivative = [_dot(dx[i], x[j], point_axes) + _dot(x[i], dx[j], point_axes) for i, j in _PAIRS]
    return gram(*primals), _stack(derivative, _batch_shape(x[0].shape, point_axes))

  return gram


def _slices(x: jax.Array) -> list[jax.Array]:
  return [x[i] for i in range(x.shape[0])]


def _ffi_unstack(x: jax.Array) -> list[jax.Array]:
  results = [jax.ShapeDtypeStruct(x.shape[1:], x.dtype)] * x.shape[0]
  return jax.ffi.ffi_call(UNSTACK_TARGET, results, vmap_method='sequential')(x)


@functools.cache
def _partitioned_unstack(ndim: int, count: int):
  """The unstack kernel with a sharding rule: each device splits its own shard.

  Every axis but the stack axis keeps its sharding in the results; a sharded stack axis is
  gathered (the stacks of small leaves are split along their other axes, if at all).
  """

  def specs(mesh, arg_shapes):
    spec = (None, *sharding.operand_spec(mesh, arg_shapes[0])[1:])
    result = NamedSharding(mesh, PartitionSpec(*spec[1:]))
    return NamedSharding(mesh, PartitionSpec(*spec)), [result] * count

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    operand, results = specs(mesh, arg_shapes)
    return mesh, sharding.on_auto_axes(mesh, _ffi_unstack), results, (operand,)

  def infer_sharding(mesh, arg_shapes, result_shape):
    del result_shape
    return specs(mesh, arg_shapes)[1]

  unstack = custom_partitioning(_ffi_unstack)
  factors = ' '.join(f'a{axis}' for axis in range(1, ndim))
  unstack.def_partition(
    partition,
    infer_sharding_from_operands=infer_sharding,
    decode_shardings=False,
    sharding_rule=f'n {factors} -> ' + ', '.join([factors] * count),
    need_replication_factors=('n',),
  )
  return unstack


def _cpu_unstack(x: jax.Array) -> list[jax.Array]:
  if x.ndim == 1 or sharding.varying(x):
    # Scalars have nothing to keep sharded; inside shard_map this is the device's own block, and
    # the results vary along the mesh axes that the block does.
    return [sharding.like(piece, x) for piece in _ffi_unstack(x)]
  return list(_partitioned_unstack(x.ndim, x.shape[0])(x))


@jax.custom_batching.custom_vmap
def _platform_unstack(x: jax.Array) -> list[jax.Array]:
  return jax.lax.platform_dependent(x, cpu=_cpu_unstack, default=_slices)


@_platform_unstack.def_vmap
def _platform_unstack_batched(axis_size, in_batched, x):
  """Under ``vmap``: the stack axis first, then one call whose results keep the batch axis."""
  del axis_size
  (batched,) = in_batched
  if not batched:
    results = _platform_unstack(x)
  else:
    results = _platform_unstack(jnp.moveaxis(x, 0, 1))
  return results, [batched] * len(results)


@jax.custom_jvp
def _kernel_unstack(x: jax.Array) -> list[jax.Array]:
  return _platform_unstack(x)


@_kernel_unstack.defjvp
def _kernel_unstack_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  return _kernel_unstack(x), _slices(dx)


def unstack(x: jax.Array) -> list[jax.Array]:
  """``[x[0], ..., x[n-1]]``: the leaves of a stack of equal leaves, ``n = x.shape[0]``.

  On CPU, with the kernel installed and switched on, one call of ``unstack.cc`` copies out all
  the slices. As XLA slices, each would be a kernel of its own, with its own offset, that LLVM
  compiles: 500 leaves of one shape took 5.5 s to compile for one array, against 0.3 s for an
  elementwise operation on the same leaves. Otherwise the slices of ``x``, computed once as a
  whole first (:func:`tuning.materialized`). Both are exact copies; differentiable, per member
  under ``vmap``, shard by shard under ``jit`` with sharded arrays and on each device's block
  inside ``shard_map``.
  """
  usable = (
    tuning.use_cpu_kernel()
    and not getattr(_disabled_here, 'value', False)
    and jax.default_backend() == 'cpu'
    and _kernel().variant is not None
  )
  if not usable:
    return _slices(tuning.materialized(x))
  return list(_kernel_unstack(x))


def contiguous_points(shape: Sequence[int], point_axes: Sequence[int]) -> tuple[int, int] | None:
  """``(points, size)`` where every point is ``size`` contiguous elements of a row-major array of
  ``shape`` (the batch axes before the point axes, axes of size 1 aside); else ``None``.

  Example:
    >>> from grassmann_optax._src import native
    >>> native.contiguous_points((12, 768, 2304), (1, 2)), native.contiguous_points((8, 4), (0,))
    ((12, 1769472), None)
  """
  roles = [axis in point_axes for axis, size in enumerate(shape) if size != 1]
  if any(is_point and not later for is_point, later in itertools.pairwise(roles)):
    return None
  size = int(np.prod([shape[axis] for axis in point_axes], dtype=np.int64))
  points = int(np.prod(shape, dtype=np.int64)) // max(size, 1)
  return (points, size) if size > 0 and points > 0 else None


def _xla_adam(w, g, mu, nu, c, scalars, point_axes, tangent):
  """:func:`adam_products` in XLA: the moments, then five reductions."""
  b1, c1, b2, c2, eps, d1, d2 = (scalars[k] for k in range(7))
  h = g - c.reshape(_point_shape(w.shape, point_axes)) * w if tangent else g
  mu = b1 * mu + c1 * h
  nu = b2 * nu + (c2 * h) * h
  u = (mu / d1) / (jnp.sqrt(nu / d2) + eps)
  pairs = ((w, w), (w, u), (u, u), (w, mu), (u, mu))
  sums = _stack([_dot(a, b, point_axes) for a, b in pairs], _batch_shape(w.shape, point_axes))
  return (mu, nu, u, sums) if tangent else (mu, nu, sums)


def _ffi_adam(w, g, mu, nu, c, scalars, point_axes, tangent):
  """The kernel on one device's operands; the moments are written in place of the old ones."""
  batch_shape = _batch_shape(w.shape, point_axes)
  layout = contiguous_points(w.shape, point_axes)
  if layout is None:
    return _xla_adam(w, g, mu, nu, c, scalars, point_axes, tangent)
  moment = jax.ShapeDtypeStruct(w.shape, jnp.float32)
  update = jax.ShapeDtypeStruct(w.shape if tangent else (0,), jnp.float32)
  out = (moment, moment, update, jax.ShapeDtypeStruct((ADAM_SUMS, layout[0]), jnp.float32))
  mu, nu, u, sums = jax.ffi.ffi_call(
    ADAM_TARGET, out, vmap_method='sequential', input_output_aliases={2: 0, 3: 1}
  )(w, g, mu, nu, c.reshape(-1), scalars, points=np.int64(layout[0]), tangent=bool(tangent))
  sums = sums.reshape((ADAM_SUMS, *batch_shape))
  return (mu, nu, u, sums) if tangent else (mu, nu, sums)


@functools.cache
def _partitioned_adam(ndim: int, point_axes: tuple[int, ...], tangent: bool):
  """The Adam kernel with a sharding rule: each device steps its own shard (as
  :func:`_partitioned_gram`; a ``psum`` adds up the sums of shards of point axes)."""
  batch_axes = tuple(axis for axis in range(ndim) if axis not in point_axes)

  def shardings(mesh, spec):
    operand = NamedSharding(mesh, PartitionSpec(*spec))
    per_point = NamedSharding(mesh, PartitionSpec(*(spec[axis] for axis in batch_axes)))
    sums = NamedSharding(mesh, PartitionSpec(None, *(spec[axis] for axis in batch_axes)))
    return operand, per_point, (operand,) * (3 if tangent else 2) + (sums,)

  def partition(mesh, arg_shapes, result_shape):
    # The shardings come undecoded: the result's may split one mesh axis over two of its axes
    # (a stack of two leaves beside a leaf split four ways, its products flattened together),
    # which no PartitionSpec can say. The result takes the operands' layout instead.
    del result_shape
    spec = sharding.operand_spec(mesh, arg_shapes[0])
    reduced = sharding.splitting(spec, point_axes)

    def local(*operands):
      *arrays, sums = _ffi_adam(*operands, point_axes, tangent)
      return (*arrays, jax.lax.psum(sums, reduced) if reduced else sums)

    operand, per_point, results = shardings(mesh, spec)
    replicated = NamedSharding(mesh, PartitionSpec(None))
    return (
      mesh,
      sharding.on_auto_axes(mesh, local),
      results,
      (operand,) * 4 + (per_point, replicated),
    )

  def infer_sharding(mesh, arg_shapes, result_shape):
    del result_shape
    return shardings(mesh, sharding.operand_spec(mesh, arg_shapes[0]))[2]

  adam = custom_partitioning(lambda *x: _ffi_adam(*x, point_axes, tangent))
  factors = [f'a{axis}' for axis in range(ndim)]
  operand = ' '.join(factors)
  batch = ' '.join(factors[axis] for axis in batch_axes)
  adam.def_partition(
    partition,
    infer_sharding_from_operands=infer_sharding,
    decode_shardings=False,
    sharding_rule=(
      f'{operand}, {operand}, {operand}, {operand}, {batch}, s -> '
      + f'{operand}, ' * (3 if tangent else 2)
      + f'k {batch}'
    ),
    need_replication_factors=('s',),
  )
  return adam


@functools.cache
def _kernel_adam(point_axes: tuple[int, ...], tangent: bool):
  """The Adam kernel for points over ``point_axes``, differentiable and batchable."""

  def reference(*operands):
    return _xla_adam(*operands, point_axes, tangent)

  def cpu(*operands):
    if any(sharding.varying(x) for x in operands):
      # Inside shard_map: the device's own blocks, and results that vary as the operands do.
      results = _ffi_adam(*operands, point_axes, tangent)
      for x in operands:
        results = tuple(sharding.like(r, x) for r in results)
      return results
    return _partitioned_adam(operands[0].ndim, point_axes, tangent)(*operands)

  @jax.custom_batching.custom_vmap
  def platform_adam(*operands):
    return jax.lax.platform_dependent(*operands, cpu=cpu, default=reference)

  @platform_adam.def_vmap
  def platform_adam_batched(axis_size, in_batched, *operands):
    """Under ``vmap``, one call per batch member (the kernel sees the member's layout)."""
    operands = tuple(
      x if batched else jnp.broadcast_to(x, (axis_size, *x.shape))
      for x, batched in zip(operands, in_batched, strict=True)
    )
    return jax.lax.map(lambda x: platform_adam(*x), operands), (True,) * (4 if tangent else 3)

  @jax.custom_jvp
  def adam(w, g, mu, nu, c, scalars):
    return platform_adam(w, g, mu, nu, c, scalars)

  @adam.defjvp
  def adam_jvp(primals, tangents):
    return adam(*primals), jax.jvp(reference, primals, tangents)[1]

  return adam


def adam_kernel_applies(w, g, mu, nu, *, point_axes: Sequence[int], allow_kernel=True) -> bool:
  """Whether :func:`adam_products` runs its kernel on these operands (else it returns None)."""
  return (
    allow_kernel
    and w.ndim >= 1
    and all(x.dtype == jnp.float32 and x.shape == w.shape for x in (w, g, mu, nu))
    and contiguous_points(w.shape, tuple(point_axes)) is not None
    and jax.default_backend() == 'cpu'
    and _use_kernel()
  )


def adam_products(
  w: jax.Array,
  g: jax.Array,
  mu: jax.Array,
  nu: jax.Array,
  *,
  b1,
  b2,
  eps,
  t: jax.Array,
  point_axes: Sequence[int],
  tangent: jax.Array | None = None,
  allow_kernel: bool = True,
) -> tuple[jax.Array, jax.Array, jax.Array | None, tuple[jax.Array, ...]] | None:
  """Adam's moments and the inner products of its update, for AdamH's step, in one pass on CPU.

  With ``h = g − c·w`` where ``tangent`` gives the per-point ``c`` (the projection of the
  gradient on the sphere's tangent space; a per-point array, 1 on the point axes), else
  ``h = g``: ``mu' = b1·mu + (1 − b1)·h``, ``nu' = b2·nu + ((1 − b2)·h)·h`` and, for Adam's
  update ``u = (mu'/(1 − b1^t)) / (√(nu'/(1 − b2^t)) + eps)``, the per-point
  ``(w·w, w·u, u·u, w·mu', u·mu')``, each of ``w``'s shape with the point axes 1. Returns
  ``(mu', nu', u, sums)``; ``u`` is written out only with ``tangent`` (the geodesic step reads it
  in two passes after this one; the published step recomputes it in its one), else ``None``.

  On CPU one call of ``adam_products.cc`` reads ``w``, ``g``, ``mu`` and ``nu`` once and writes
  the moments in place, where XLA would make a pass per moment, write ``u`` out and read it
  again for the sums. Returns ``None`` where the kernel does not apply (not CPU, not float32,
  points that are not contiguous, the kernel missing or switched off): the caller then computes
  the same in XLA. Differentiable; per member under ``vmap``; each device steps its own shard
  under ``jit`` with sharded arrays, and its own block inside ``shard_map``.
  """
  axes = tuple(point_axes)
  if not adam_kernel_applies(w, g, mu, nu, point_axes=axes, allow_kernel=allow_kernel):
    return None
  t = jnp.asarray(t, jnp.float32)
  corrections = (manifold.bias_correction(b1, t), manifold.bias_correction(b2, t))
  scalars = jnp.stack(
    [jnp.asarray(x, jnp.float32) for x in (b1, 1 - b1, b2, 1 - b2, eps, *corrections)]
  )
  batch_shape = _batch_shape(w.shape, axes)
  if tangent is None:
    c = jnp.zeros(batch_shape, jnp.float32)
  else:
    c = jnp.broadcast_to(tangent, _point_shape(w.shape, axes)).astype(jnp.float32)
    c = c.reshape(batch_shape)
  results = _kernel_adam(axes, tangent is not None)(w, g, mu, nu, c, scalars)
  mu, nu, *u, sums = results
  shape = _point_shape(w.shape, axes)
  return mu, nu, (u[0] if u else None), tuple(sums[k].reshape(shape) for k in range(ADAM_SUMS))


@sharding.replicated_under_explicit_axes
def column_products(
  w: jax.Array,
  g: jax.Array,
  b: jax.Array,
  *,
  point_axes: int | Sequence[int] | None = None,
  allow_kernel: bool = True,
) -> tuple[jax.Array, ...]:
  """``(wᵀw, wᵀg, gᵀg, wᵀb, gᵀb, bᵀb)`` per point, each of ``w``'s shape with point axes 1.

  The inner products of (F1) in ``docs/algorithm.md`` (whose ``x`` is the stored buffer ``b``
  here: the momentum of SGD-G, the first moment of Adam-G), from which every per-point
  coefficient of a fused step follows (Cho & Lee, NeurIPS 2017, arXiv:1709.09603). A point (a
  unit vector of the manifold) is made of the axes ``point_axes``; every other axis indexes
  points. By default the points are the columns of ``w.reshape(-1, p)``, each product of shape
  ``(1, ..., 1, p)``.

  Uses the one-pass CPU kernel when ``allow_kernel``, the three arrays are float32 of one shape
  with at least one axis, the layout is one the kernel reads (the columns, rows, whole array,
  heads of a ``DenseGeneral`` kernel and stacks of those all are; ``docs/kernel.md``) and the
  kernel is installed and switched on (:func:`available`), and no array differs between the
  devices of a ``shard_map``; otherwise six XLA reductions, which give the same results up to
  float rounding. Differentiable; runs per member under ``vmap``; keeps ``jit`` shardings local
  (on a mesh with explicit axes, it returns the products replicated). Public as
  ``grassmann_optax.cpu_kernel.column_products``.

  Args:
    w: the points (the weights), float, of any shape with at least one axis.
    g: the gradient, of ``w``'s shape.
    b: the buffer, of ``w``'s shape.
    point_axes: the axes that make one point: an int or a tuple of ints, negative counting
      from the end; ``None``, all axes but the last.
    allow_kernel: whether the CPU kernel may be used. Callers pass ``False`` for arrays upcast
      from a narrower storage dtype, whose conversion XLA fuses into its own reductions but
      would have to write out for the kernel.

  Raises:
    TypeError: a point axis is not an integer.
    ValueError: ``point_axes`` is empty or names an axis ``w`` does not have.

  Example:
    >>> import jax.numpy as jnp, grassmann_optax as go
    >>> w = jnp.eye(3)[:, :2]
    >>> ww, wg, gg, wb, gb, bb = go.cpu_kernel.column_products(w, 2 * w, jnp.zeros_like(w))
    >>> ww.tolist(), wg.tolist(), bb.tolist()
    ([[1.0, 1.0]], [[2.0, 2.0]], [[0.0, 0.0]])
    >>> heads = jnp.ones((4, 3, 2))  # (embed, heads, head_dim): one point per head
    >>> ww, *_ = go.cpu_kernel.column_products(heads, heads, heads, point_axes=(0, 2))
    >>> ww.shape, ww.ravel().tolist()
    ((1, 3, 1), [8.0, 8.0, 8.0])
  """
  axes = normalize_point_axes(w.ndim, point_axes)
  arrays = (w, g, b)
  usable = (
    allow_kernel
    and w.ndim >= 1
    and all(x.dtype == jnp.float32 and x.shape == w.shape for x in arrays)
    and kernel_layout(w.shape, axes) is not None
    # Only a CPU process loads the kernel: GPU and TPU users get no warning where it is missing.
    and jax.default_backend() == 'cpu'
    # Inside shard_map, arrays that differ between devices (a leaf split along an axis of its
    # points' batch) take XLA's reductions: the kernel's result would not carry their type.
    and not any(sharding.varying(x) for x in arrays)
    and _use_kernel()
  )
  if not usable:
    return _xla_products(w, g, b, axes)
  gram = _kernel_gram(axes)(w, g, b)
  shape = _point_shape(w.shape, axes)
  return tuple(gram[k].reshape(shape) for k in range(6))
