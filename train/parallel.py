"""Data parallelism: devices, processes, and the compiled steps laid out on them.

``--parallel=pmap``: the state is replicated on every local device, each device takes its slice of
the global batch, gradients are ``pmean``-ed and BatchNorm averages its batch moments through the
axis name :data:`PMAP_AXIS`. ``--parallel=sharded``: one ``jit`` program over a one-axis mesh, the
state replicated and the batch split along the axis, so BatchNorm sees the global batch.
``--parallel=fsdp``: the same program with the parameters and the optimizer state split over the
same mesh axis too (fully sharded data parallelism): each array of the state is split along one
of its axes (:func:`fsdp_spec`), and XLA partitions the step, the optimizer's per-point sums and
orthogonality Gram included (all-reduced, never gathered: ``docs/scaling.md``). Each way an
update equals that of one device with the whole batch, up to the order of float32 sums.

Several processes (one per host, or several on one machine) train one model when
``--coordinator_address``, ``--num_processes`` and ``--process_id`` are given (or JAX finds them
in its environment): every process computes the same global batch and feeds its own rows.

References:
  Cho & Lee, "Riemannian approach to batch normalization", NeurIPS 2017, arXiv:1709.09603.
"""

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from train import config as config_lib

PMAP_AXIS = 'batch'
MESH_AXIS = 'data'


class Parallel(NamedTuple):
  """How state and batches are laid out on devices, and the compiled functions that use them."""

  num_devices: int  # over all processes
  put_state: Callable[[Any], Any]  # a host tree (state or variables), copied to every device
  get_state: Callable[[Any], Any]  # one host copy
  put_batch: Callable[..., tuple[jax.Array, ...]]  # global batch -> device arrays
  train_step: Callable[..., Any]
  eval_step: Callable[..., dict[str, jax.Array]]
  # ``fn(tree) -> scalar`` compiled for the layout, for a tree laid out as the state (such as
  # the parameters); returns a host float.
  compile_scalar: Callable[[Callable[[Any], jax.Array]], Callable[[Any], float]]


def initialize_distributed(config: config_lib.Config) -> None:
  """``jax.distributed.initialize`` when the flags or the environment ask for several processes.

  Each process passes the same ``--coordinator_address`` (or ``JAX_COORDINATOR_ADDRESS``) and
  ``--num_processes`` and its own ``--process_id``; what is left out JAX detects itself on
  clusters it knows (SLURM, Open MPI, TPU pods). Must run before JAX touches a device.
  """
  settings = {
    'coordinator_address': config.coordinator_address,
    'num_processes': config.num_processes,
    'process_id': config.process_id,
  }
  wanted = any(v is not None for v in settings.values()) or 'JAX_COORDINATOR_ADDRESS' in os.environ
  if wanted and not jax.distributed.is_initialized():
    try:
      jax.distributed.initialize(**settings)
    except ValueError as error:  # a setting missing that no cluster environment supplies
      given = ' '.join(f'--{name}={value}' for name, value in settings.items() if value is not None)
      raise config_lib.ConfigError(
        f'{given or "JAX_COORDINATOR_ADDRESS"}: several processes need --coordinator_address, '
        '--num_processes and --process_id together, unless the cluster (SLURM, Open MPI, a TPU '
        f'pod) supplies the rest; JAX says: {error}'
      ) from None
  if jax.distributed.is_initialized():
    avoid_cached_collectives()


# jax 0.12 (0.12.1 tested; 0.10.2 and 0.11.2 are not affected): in a run of several CPU
# processes (gloo), a process that loads a second program with collectives from the persistent
# compilation cache waits in it forever. Plain JAX shows it: two jitted reductions over a mesh of
# two processes, run twice with JAX_COMPILATION_CACHE_DIR set; the second run hangs.
_CACHED_COLLECTIVES_HANG = (0, 12)


def avoid_cached_collectives() -> bool:
  """Turns JAX's persistent compilation cache off in a multi-process CPU run under jax 0.12 and
  later, with a warning, rather than let the run hang; returns whether it did."""
  if (
    jax.process_count() == 1
    or jax.default_backend() != 'cpu'
    or jax.__version_info__ < _CACHED_COLLECTIVES_HANG
    or not jax.config.jax_enable_compilation_cache
    or not jax.config.jax_compilation_cache_dir
  ):
    return False
  jax.config.update('jax_enable_compilation_cache', False)
  print(
    f'warning: the persistent compilation cache ({jax.config.jax_compilation_cache_dir}) is off '
    f'in this run: with jax {jax.__version__}, CPU processes that load programs with '
    'collectives from it wait forever. Every process compiles its steps afresh.',
    file=sys.stderr,
  )
  return True


def select_devices(config: config_lib.Config) -> list[jax.Device]:
  """The devices of the run.

  Raises:
    ConfigError: ``--num_devices`` is more than this process has, the batch does not split
      evenly over the devices, or ``--parallel=pmap`` in a run of several processes.
  """
  if jax.process_count() > 1 and config.parallel == 'pmap':
    # pmap over the local devices: each process would train, and test, a model of its own.
    raise config_lib.ConfigError(
      f'--parallel=pmap replicates over the devices of one process: in a run of '
      f'{jax.process_count()} processes each would train a model of its own and test it on its '
      'part of the test set; use --parallel=sharded or --parallel=fsdp, which use the devices of '
      'all processes as one'
    )
  local = jax.local_devices()
  count = config.num_devices or len(local)
  if count > len(local):
    raise config_lib.ConfigError(
      f'--num_devices (--num_gpus)={count}, but this process sees {len(local)} device(s)'
    )
  if jax.process_count() > 1:
    if count != len(local):
      raise config_lib.ConfigError(
        'multi-process runs use every local device; leave --num_devices unset'
      )
    devices = jax.devices()
  else:
    devices = local[:count]
  total = count * jax.process_count()
  if config.task == 'train' and config.batch_size % total:
    raise config_lib.ConfigError(
      f'--batch_size={config.batch_size} does not split over {total} devices; use a multiple of '
      f'{total}, or --num_devices (--num_gpus) dividing {config.batch_size}'
    )
  return devices


def create_parallel(
  config: config_lib.Config, devices: list[jax.Device], train_step, eval_step
) -> Parallel:
  """The layout of ``--parallel`` over ``devices``, with both steps compiled for it.

  ``train_step(state, images, labels, rng, *, axis_name)`` and ``eval_step(variables, images,
  labels, mask, *, axis_name)``; ``axis_name`` is :data:`PMAP_AXIS` under pmap, else None.
  ``train_step`` may be None (evaluation only).
  """
  factory = {'pmap': _pmap_parallel, 'sharded': _sharded_parallel, 'fsdp': _fsdp_parallel}
  return factory[config.parallel](devices, train_step, eval_step)


def _process_rows(array: np.ndarray) -> np.ndarray:
  """This process's rows of a global batch (every process computes the same global batch)."""
  rows = len(array) // jax.process_count()
  return array[jax.process_index() * rows : (jax.process_index() + 1) * rows]


def _first_replica(x: jax.Array) -> np.ndarray:
  """Device 0's copy of a ``pmap``-replicated array, without compiling a slice."""
  return np.asarray(x.addressable_shards[0].data).reshape(x.shape[1:])


def _any_copy(x: jax.Array) -> np.ndarray:
  return np.asarray(x.addressable_data(0))


def _pmap_parallel(devices, train_step, eval_step) -> Parallel:
  num_local = len(devices)

  def put_batch(*arrays):
    local = [_process_rows(a) for a in arrays]
    return tuple(a.reshape(num_local, a.shape[0] // num_local, *a.shape[1:]) for a in local)

  # Placed under pmap's own axis name, so that the step's outputs match its inputs (no retrace);
  # through host memory, so that no per-leaf program is compiled.
  replicated = NamedSharding(Mesh(np.asarray(devices), (PMAP_AXIS,)), P(PMAP_AXIS))

  def put_state(tree):
    def put(x):
      x = np.asarray(x)
      return jax.device_put(np.broadcast_to(x[None], (num_local, *x.shape)), replicated)

    return jax.tree.map(put, tree)

  def compile_scalar(fn):
    compiled = jax.pmap(fn, devices=devices)
    return lambda tree: float(_first_replica(compiled(tree)))

  pmap = functools.partial(jax.pmap, axis_name=PMAP_AXIS, devices=devices)
  return Parallel(
    num_devices=num_local * jax.process_count(),
    put_state=put_state,
    get_state=lambda tree: jax.tree.map(_first_replica, tree),
    put_batch=put_batch,
    train_step=None
    if train_step is None
    else pmap(
      functools.partial(train_step, axis_name=PMAP_AXIS), in_axes=(0, 0, 0, None), donate_argnums=0
    ),
    eval_step=pmap(functools.partial(eval_step, axis_name=PMAP_AXIS)),
    compile_scalar=compile_scalar,
  )


def _sharded_parallel(devices, train_step, eval_step) -> Parallel:
  mesh = Mesh(np.asarray(devices), (MESH_AXIS,))
  replicated = NamedSharding(mesh, P())
  batch = NamedSharding(mesh, P(MESH_AXIS))

  def put_batch(*arrays):
    return tuple(
      jax.make_array_from_process_local_data(batch, _process_rows(a), a.shape) for a in arrays
    )

  def put_state(tree):
    # From host memory, which every process holds alike; also valid when the mesh spans hosts.
    def put(x):
      x = np.asarray(x)
      return jax.make_array_from_callback(x.shape, replicated, lambda index: x[index])

    return jax.tree.map(put, tree)

  def compile_scalar(fn):
    compiled = jax.jit(fn, out_shardings=replicated)
    return lambda tree: float(_any_copy(compiled(tree)))

  return Parallel(
    num_devices=len(devices),
    put_state=put_state,
    get_state=lambda tree: jax.tree.map(_any_copy, tree),
    put_batch=put_batch,
    train_step=None
    if train_step is None
    else jax.jit(
      train_step,
      in_shardings=(replicated, batch, batch, replicated),
      out_shardings=(replicated, replicated),
      donate_argnums=0,
    ),
    eval_step=jax.jit(
      eval_step, in_shardings=(replicated, batch, batch, batch), out_shardings=replicated
    ),
    compile_scalar=compile_scalar,
  )


# Arrays smaller than this stay whole on every device under fsdp: splitting them saves nothing.
FSDP_MIN_SIZE = 1 << 10


def fsdp_spec(shape: tuple[int, ...], num_devices: int) -> P:
  """How ``--parallel=fsdp`` splits an array of ``shape`` over the mesh axis.

  Along its largest axis that the devices divide; among equal sizes the earliest, so that a conv
  kernel ``[kh, kw, c_in, c_out]`` with ``c_in = c_out`` is split by rows (its points' elements,
  whose per-point sums and ``p × p`` Gram are all-reduced) rather than by columns (whose Gram is
  ``n × n``). Arrays under :data:`FSDP_MIN_SIZE` elements, or with no such axis, stay whole.
  """
  size = int(np.prod(shape)) if shape else 1
  candidates = [axis for axis, n in enumerate(shape) if n % num_devices == 0 and n > 1]
  if size < FSDP_MIN_SIZE or not candidates or num_devices == 1:
    return P()
  axis = max(candidates, key=lambda a: (shape[a], -a))
  return P(*(MESH_AXIS if a == axis else None for a in range(len(shape))))


def _fsdp_parallel(devices, train_step, eval_step) -> Parallel:
  mesh = Mesh(np.asarray(devices), (MESH_AXIS,))
  replicated = NamedSharding(mesh, P())
  batch = NamedSharding(mesh, P(MESH_AXIS))
  split = lambda shape: NamedSharding(mesh, fsdp_spec(tuple(shape), len(devices)))
  sharded = _sharded_parallel(devices, None, eval_step)

  def put_state(tree):
    # Each process builds only its own shards, from the host copy every process holds alike.
    def put(x):
      x = np.asarray(x)
      return jax.make_array_from_callback(x.shape, split(x.shape), lambda index: x[index])

    return jax.tree.map(put, tree)

  compiled: dict[Any, Callable] = {}

  def step(state, images, labels, rng):
    # Compiled for the state's layout when the state first arrives, its outputs laid out alike.
    layout = jax.tree.map(lambda x: x.sharding, state)
    key = jax.tree.structure(state)
    if key not in compiled:
      compiled[key] = jax.jit(
        train_step,
        in_shardings=(layout, batch, batch, replicated),
        out_shardings=(layout, replicated),
        donate_argnums=0,
      )
    return compiled[key](state, images, labels, rng)

  return sharded._replace(
    put_state=put_state,
    # The variables arrive split like the state; the batch is split, the sums come back whole.
    eval_step=jax.jit(
      eval_step, in_shardings=(None, batch, batch, batch), out_shardings=replicated
    ),
    # The state stays split; Orbax saves each process's shards as they are. A copy on the
    # devices, because the next step donates the state it is given, and a checkpoint waits for
    # that step to come out finite before it is written (one more split state per device while
    # it waits).
    get_state=_device_copy,
    train_step=None if train_step is None else step,
  )


@jax.jit
def _device_copy(tree: Any) -> Any:
  """A copy of ``tree`` on the devices and in the layout that hold it."""
  return jax.tree.map(jnp.copy, tree)


def first_copy(tree: Any) -> Any:
  """One host copy of every leaf of a replicated tree of step outputs (metrics, sums)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)).reshape(-1)[0], tree)
