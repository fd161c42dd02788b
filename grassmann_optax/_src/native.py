"""The six column inner products of a step in one pass on CPU: a C++ kernel behind ``jax.ffi``.

A fused SGD-G/Adam-G step needs, per column, ``wᵀw, wᵀg, gᵀg, wᵀb, gᵀb, bᵀb`` ((F1) of
``docs/algorithm.md``). On GPU XLA computes sibling reductions of the same operands in one fused
pass. XLA:CPU does not: it evaluates each reduction as its own loop and so reads ``w``, ``g`` and
``b`` nine times. On CPU :func:`column_products` therefore calls ``column_gram.cc``, which reads
each array once.

The kernel is compiled on first use with the system's C++ compiler (``$CXX``, else ``c++``,
``g++`` or ``clang++``) against the XLA FFI headers of the installed jaxlib, and cached in
``$GRASSMANN_OPTAX_CACHE_DIR`` (default ``~/.cache/grassmann_optax``). Where no compiler is found
or the build fails, a warning says so once and the same products are computed by XLA, which is
slower on CPU and otherwise identical. ``GRASSMANN_OPTAX_CPU_KERNEL=0`` turns the kernel off.

On x86-64 processors with AVX2 the kernel runs an AVX2 build of its loop, chosen when it is
loaded (:func:`kernel_variant` says which); ``GRASSMANN_OPTAX_CPU_KERNEL_ISA=baseline`` forces the
portable loop. Each column is summed in row order in one vector lane and nothing is contracted
into a fused multiply-add, so both return the same bits.

Other backends, and storage dtypes other than float32, always use the XLA reductions. The
kernel has a JVP rule (the products are bilinear), so the update stays differentiable; under
``vmap`` it runs once per batch member; under ``jit`` with sharded arrays each device reduces its
own shard (a ``psum`` adds up shards of rows), so nothing is gathered.

References:
  Cho & Lee, "Riemannian approach to batch normalization", NeurIPS 2017, arXiv:1709.09603.
"""

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from grassmann_optax._src import manifold

ENV_SWITCH = 'GRASSMANN_OPTAX_CPU_KERNEL'
# Read by the kernel when it is loaded: 'baseline' forces the portable loop instead of AVX2.
ENV_VARIANT = 'GRASSMANN_OPTAX_CPU_KERNEL_ISA'
ENV_CACHE_DIR = 'GRASSMANN_OPTAX_CACHE_DIR'
SOURCE = Path(__file__).with_name('column_gram.cc')
TARGET = 'grassmann_optax_column_gram'
SYMBOL = 'GrassmannColumnGram'
VARIANT_SYMBOL = 'GrassmannColumnGramVariant'
FLAGS = ('-O3', '-std=c++17', '-shared', '-fPIC', '-ffp-contract=off')
COMPILE_TIMEOUT_S = 300

_lock = threading.Lock()
_disabled_here = threading.local()


class BuildError(RuntimeError):
  """The CPU kernel could not be compiled or loaded."""


def cache_dir() -> Path:
  if path := os.environ.get(ENV_CACHE_DIR):
    return Path(path)
  base = os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache'
  return Path(base) / 'grassmann_optax'


def find_compiler() -> str | None:
  if compiler := os.environ.get('CXX'):
    return shutil.which(compiler) or compiler
  for name in ('c++', 'g++', 'clang++'):
    if path := shutil.which(name):
      return path
  return None


def _command(compiler: str, output: Path) -> list[str]:
  return [compiler, *FLAGS, f'-I{jax.ffi.include_dir()}', str(SOURCE), '-o', str(output)]


def library_path(compiler: str) -> Path:
  """Where the kernel built by ``compiler`` for this jaxlib and machine is cached."""
  key = hashlib.sha256()
  for part in (
    SOURCE.read_bytes(),
    ' '.join(_command(compiler, Path('out'))).encode(),
    jaxlib.__version__.encode(),
    platform.machine().encode(),
    platform.system().encode(),
  ):
    key.update(part)
  return cache_dir() / f'column_gram-{key.hexdigest()[:16]}.so'


def build(compiler: str | None = None) -> Path:
  """Compiles the kernel unless the cache has it; returns the shared library's path.

  Raises:
    BuildError: no C++ compiler, or the compiler failed (its output is in the message).
  """
  compiler = compiler or find_compiler()
  if compiler is None:
    raise BuildError('no C++ compiler found (set CXX, or install g++ or clang++)')
  path = library_path(compiler)
  if path.exists():
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  # Build beside the final name and rename, so concurrent processes never load a partial file.
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=path.parent)
  os.close(fd)
  try:
    try:
      result = subprocess.run(
        _command(compiler, Path(tmp)),
        capture_output=True,
        text=True,
        timeout=COMPILE_TIMEOUT_S,
        check=False,
      )
    except (OSError, subprocess.TimeoutExpired) as error:
      raise BuildError(f'{compiler} could not run: {error}') from error
    if result.returncode != 0:
      raise BuildError(f'{compiler} failed ({result.returncode}):\n{result.stderr[-2000:]}')
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return path


def _switched_off() -> bool:
  return os.environ.get(ENV_SWITCH, '1').strip().lower() in ('0', 'false', 'no', 'off')


def _load_and_register() -> bool:
  try:
    library = ctypes.cdll.LoadLibrary(str(build()))
    handler = getattr(library, SYMBOL)
    variant = getattr(library, VARIANT_SYMBOL)
  except (BuildError, OSError, AttributeError) as error:
    warnings.warn(
      f'grassmann_optax: the CPU kernel for column inner products is unavailable, so XLA '
      f'computes them (slower on CPU, same results). Reason: {error}. Set {ENV_SWITCH}=0 to '
      'skip the build and this warning.',
      RuntimeWarning,
      stacklevel=5,
    )
    return False
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handler), platform='cpu')
  variant.restype = ctypes.c_char_p
  _variant.append(variant().decode())
  return True


_registration: list[bool] = []
_variant: list[str] = []


def _registered() -> bool:
  """Builds, loads and registers the kernel once per process; False where that is impossible."""
  if not _registration:
    with _lock:  # optimizers may be traced from several threads at once
      if not _registration:
        _registration.append(not _switched_off() and _load_and_register())
  return _registration[0]


def kernel_available() -> bool:
  """True when the CPU kernel is built and registered and not switched off in this thread."""
  return not getattr(_disabled_here, 'value', False) and _registered()


def kernel_variant() -> str | None:
  """The CPU kernel's instruction-set variant in this process (``'avx2'`` or ``'baseline'``).

  ``None`` where the kernel is unavailable or switched off (``GRASSMANN_OPTAX_CPU_KERNEL=0``).
  Both variants return the same bits. Public as ``grassmann_optax.cpu_kernel_variant``.

  Example:
    >>> import jax, grassmann_optax as go
    >>> go.cpu_kernel_variant() in (None, 'avx2', 'baseline')
    True
  """
  return _variant[0] if _registered() else None


@contextlib.contextmanager
def kernel_disabled() -> Iterator[None]:
  """Functions traced inside this block use XLA's reductions instead of the CPU kernel.

  For comparing or timing the two; the results are the same up to float rounding. Public as
  ``grassmann_optax.cpu_kernel_disabled``. It applies to tracing in the current thread: jit a
  function inside the block, and it keeps the XLA reductions wherever it is called.

  Example:
    >>> import jax, jax.numpy as jnp, grassmann_optax as go
    >>> w = go.unit_initializer()(jax.random.key(0), (27, 8))
    >>> tx = go.sgdg_manifold_update(0.2)
    >>> with go.cpu_kernel_disabled():
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


def _xla_products(w, g, b) -> tuple[jax.Array, ...]:
  x = (w, g, b)
  return tuple(manifold.column_dot(x[i], x[j]) for i, j in _PAIRS)


def _ffi_gram(w, g, b) -> jax.Array:
  out = jax.ShapeDtypeStruct((6, w.shape[-1]), jnp.float32)
  return jax.ffi.ffi_call(TARGET, out, vmap_method='sequential')(w, g, b)


def _mesh_axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _operand_spec(shape) -> tuple:
  spec = tuple(shape.sharding.spec)
  return spec + (None,) * (len(shape.shape) - len(spec))


def _partition(mesh, arg_shapes, result_shape):
  """Each device sums its own shard; shards along rows are then added up with ``psum``."""
  del result_shape
  spec = _operand_spec(arg_shapes[0])
  row_axes = tuple(axis for entry in spec[:-1] for axis in _mesh_axes(entry))

  def local(w, g, b):
    gram = _ffi_gram(w, g, b)
    return jax.lax.psum(gram, row_axes) if row_axes else gram

  operand = NamedSharding(mesh, PartitionSpec(*spec))
  return mesh, local, NamedSharding(mesh, PartitionSpec(None, spec[-1])), (operand,) * 3


def _infer_sharding(mesh, arg_shapes, result_shape):
  del result_shape
  return NamedSharding(mesh, PartitionSpec(None, _operand_spec(arg_shapes[0])[-1]))


@functools.cache
def _partitioned_gram(ndim: int):
  """The kernel with a sharding rule, so that ``jit`` over sharded arrays keeps the shards.

  Without it XLA's partitioner would gather every operand onto each device first. The columns
  (last axis) stay sharded as they are; the other axes are reduced, with a ``psum`` across the
  mesh axes that shard them.
  """
  gram = custom_partitioning(_ffi_gram)
  rows = [f'r{i}' for i in range(ndim - 1)]
  operand = ' '.join([*rows, 'p'])
  gram.def_partition(
    _partition,
    infer_sharding_from_operands=_infer_sharding,
    sharding_rule=f'{operand}, {operand}, {operand} -> k p',
    reduction_factors=tuple(rows),
  )
  return gram


@jax.custom_batching.custom_vmap
def _platform_gram(w, g, b) -> jax.Array:
  return jax.lax.platform_dependent(
    w, g, b, cpu=_partitioned_gram(w.ndim), default=lambda *x: _stack(_xla_products(*x))
  )


@_platform_gram.def_vmap
def _platform_gram_batched(axis_size, in_batched, w, g, b):
  """Under ``vmap``, one call per batch member (the kernel reduces every axis but the last)."""
  operands = tuple(
    x if batched else jnp.broadcast_to(x, (axis_size, *x.shape))
    for x, batched in zip((w, g, b), in_batched, strict=True)
  )
  return jax.lax.map(lambda x: _platform_gram(*x), operands), True


@jax.custom_jvp
def _kernel_gram(w, g, b) -> jax.Array:
  return _platform_gram(w, g, b)


@_kernel_gram.defjvp
def _kernel_gram_jvp(primals, tangents):
  # d(xᵀy) = dxᵀy + xᵀdy for each of the six bilinear products.
  x, dx = primals, tangents
  derivative = [
    manifold.column_dot(dx[i], x[j]) + manifold.column_dot(x[i], dx[j]) for i, j in _PAIRS
  ]
  return _kernel_gram(*primals), _stack(derivative)


def _stack(products) -> jax.Array:
  return jnp.stack([p.reshape(-1) for p in products])


def column_products(
  w: jax.Array, g: jax.Array, b: jax.Array, *, allow_kernel: bool = True
) -> tuple[jax.Array, ...]:
  """``(wᵀw, wᵀg, gᵀg, wᵀb, gᵀb, bᵀb)`` per column, each of shape ``(1, ..., 1, p)``.

  The inner products of (F1) in ``docs/algorithm.md``, from which every per-column coefficient
  of a fused step follows. Uses the one-pass CPU kernel when ``allow_kernel``, the three arrays
  are float32 of one shape with at least one axis and the kernel is available; otherwise six XLA
  reductions. Callers pass ``allow_kernel=False`` for arrays upcast from a narrower storage
  dtype, whose conversion XLA fuses into its own reductions but would have to write out for the
  kernel. Differentiable; runs per member under ``vmap``; keeps ``jit`` shardings local.

  Example:
    >>> import jax.numpy as jnp, grassmann_optax as go
    >>> w = jnp.eye(3)[:, :2]
    >>> ww, wg, gg, wb, gb, bb = go.column_products(w, 2 * w, jnp.zeros_like(w))
    >>> ww.tolist(), wg.tolist(), bb.tolist()
    ([[1.0, 1.0]], [[2.0, 2.0]], [[0.0, 0.0]])
  """
  arrays = (w, g, b)
  usable = (
    allow_kernel
    and w.ndim >= 1
    and all(x.dtype == jnp.float32 and x.shape == w.shape for x in arrays)
    # Only a CPU process builds the kernel: GPU and TPU users need no compiler and get no warning.
    and jax.default_backend() == 'cpu'
    and kernel_available()
  )
  if not usable:
    return _xla_products(w, g, b)
  gram = _kernel_gram(w, g, b)
  shape = (1,) * (w.ndim - 1) + (w.shape[-1],)
  return tuple(gram[k].reshape(shape) for k in range(6))
