"""Training and evaluation of a BN network with SGD-G / Adam-G (Cho & Lee, NeurIPS 2017).

Flat functions in the manner of flax ``examples/imagenet``: :func:`create_optimizer`,
:func:`create_train_state`, :func:`train_step`, :func:`eval_step`, :func:`evaluate` and
:func:`train_and_evaluate`. What the TF program of the paper did, and this one repeats (SPEC §7):

* the learning rates of both parameter groups decay together, by step, with TF's boundary
  semantics (SPEC §7.1), and the optimizer state persists across decays;
* undercomplete conv kernels are re-initialised with unit columns and put on G(1, n) (SPEC §1);
  the orthogonality gradient and coupled L2 decay live inside the optimizer (SPEC §5, §6);
* the test set is evaluated every ``vali_freq`` steps and at the end with BN population
  statistics and no dropout: cross-entropy, top-1 and top-k error (SPEC §7.5).

Data parallelism: ``pmap`` (state replicated, gradients ``pmean``-ed, BatchNorm statistics
synchronised through the axis name ``'batch'``) or ``sharded`` (``jit`` over a one-axis mesh,
batch split along it, so BatchNorm sees the global batch). Either way the update equals that of
one device with the whole batch, up to the order of float32 reductions.

A run resumes exactly from its latest checkpoint: the batch of step ``s`` and its dropout key
are pure functions of ``(seed, s)``, and the checkpoint holds the step, parameters, BN
statistics and optimizer state.

References:
  Cho & Lee, "Riemannian approach to batch normalization", NeurIPS 2017, arXiv:1709.09603.
"""

import dataclasses
import functools
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import grassmann_optax as go
from train import config as config_lib
from train import input_pipeline, models

Config = config_lib.Config
PMAP_AXIS = 'batch'
MESH_AXIS = 'data'
CHECKPOINT_ITEMS = ('state', 'config')
# Hyper-parameters that a resumed run normally keeps; a change is reported, not refused.
RESUME_FIELDS = (
  'learnRate',
  'learnRateG',
  'learnRateDecay',
  'decay_epochs',
  'epochs',
  'batch_size',
  'seed',
  'keep_prob',
  'omega',
  'grad_clip',
  'momentum',
)


class TrainState(train_state.TrainState):
  """Flax ``TrainState`` plus the BatchNorm population statistics."""

  batch_stats: Any = None


# ---------------------------------------------------------------------------------------------
# Schedule and optimizer.


def decay_steps(decay_epochs, num_train: int, batch_size: int) -> list[int]:
  """``floor(E_k · num_train / batch_size)`` for each decay epoch ``E_k`` (SPEC §7.1)."""
  return [math.floor(epoch * num_train / batch_size) for epoch in decay_epochs]


def num_train_steps(config: Config, num_train: int) -> int:
  """``floor(epochs · num_train / batch_size)``, capped by ``max_steps`` when given."""
  steps = math.floor(config.epochs * num_train / config.batch_size)
  return steps if config.max_steps is None else min(steps, config.max_steps)


def create_learning_rate_fn(
  base_learning_rate: float, config: Config, num_train: int
) -> optax.Schedule:
  """Step decay with the TF program's semantics (SPEC §7.1).

  At 0-based step ``s`` the rate is ``base · decay^#{k : s > decay_step_k}``. The optax schedule
  scales from ``count >= boundary`` on, so each boundary is ``decay_step_k + 1``; coinciding
  boundaries (tiny datasets) multiply their factors.
  """
  boundaries: dict[int, float] = {}
  for step in decay_steps(config.decay_epochs, num_train, config.batch_size):
    boundaries[step + 1] = boundaries.get(step + 1, 1.0) * config.learnRateDecay
  return optax.piecewise_constant_schedule(base_learning_rate, boundaries)


def parameter_labels(config: Config) -> Callable[[Any], Any]:
  """``params -> labels``: the paper's rule when ``--grassmann`` is on, else all Euclidean."""
  if config.optimizer != 'sgd' and config.grassmann:
    return go.grassmann_labels
  return lambda params: jax.tree.map(lambda _: go.EUCLIDEAN, params)


def decay_classes(params: Mapping[str, Any]) -> Any:
  """Labels each leaf with its TF decay class: ``weight``, ``bias``, ``gamma`` or ``beta``.

  Kernels are weights; BatchNorm's ``scale`` is gamma; a ``bias`` beside a kernel is a layer's
  bias, any other ``bias`` is BatchNorm's beta (the VGG BatchNorm has no gamma).
  """

  def classify(name: str, leaf: Any, siblings: Mapping[str, Any]) -> Any:
    if isinstance(leaf, Mapping):
      return {key: classify(key, value, leaf) for key, value in leaf.items()}
    if name == 'scale':
      return 'gamma'
    if name == 'bias':
      return 'bias' if 'kernel' in siblings else 'beta'
    return 'weight'

  return {key: classify(key, value, params) for key, value in params.items()}


def _decay(rate: float | None, kind: str, labels_fn: Callable[[Any], Any]):
  def mask(params):
    classes, labels = decay_classes(params), labels_fn(params)
    return jax.tree.map(lambda c, label: c == kind and label == go.EUCLIDEAN, classes, labels)

  return optax.add_decayed_weights(rate, mask=mask) if rate else optax.identity()


def create_optimizer(config: Config, num_train: int) -> optax.GradientTransformation:
  """The optimizer of ``--optimizer``, with the step-decayed learning rates (SPEC §3, §4, §6).

  ``sgd``: the TF baseline, Nesterov momentum SGD on every parameter with coupled L2 per class
  (``weightDecay``, ``biasDecay``, ``gammaDecay``, ``betaDecay``). ``sgdg`` / ``adamg``: the
  library's hybrid optimizer; kernels off the manifold get ``weightDecay``, manifold kernels no
  decay, biases and BatchNorm parameters their own decay if given (none in the paper's recipes).
  Adam-G's β1 is ``--momentum``, as in the TF program; β2 is ``--adam_beta2``.
  """
  labels_fn = parameter_labels(config)
  learning_rate = create_learning_rate_fn(config.learnRate, config, num_train)
  class_decays = [
    _decay(config.biasDecay, 'bias', labels_fn),
    _decay(config.gammaDecay, 'gamma', labels_fn),
    _decay(config.betaDecay, 'beta', labels_fn),
  ]
  if config.optimizer == 'sgd':
    return optax.chain(
      _decay(config.weightDecay, 'weight', labels_fn),
      *class_decays,
      optax.sgd(learning_rate, momentum=config.momentum, nesterov=config.nesterov),
    )
  options = dict(
    momentum=config.momentum,
    nesterov=config.nesterov,
    grad_clip=config.grad_clip,
    omega=config.omega or 0.0,
    weight_decay=config.weightDecay,
    param_labels=labels_fn,
  )
  grassmann_learning_rate = create_learning_rate_fn(config.learnRateG, config, num_train)
  if config.optimizer == 'sgdg':
    hybrid = go.sgdg(learning_rate, grassmann_learning_rate, **options)
  else:
    hybrid = go.adamg(
      learning_rate,
      grassmann_learning_rate,
      b1=config.momentum,
      b2=config.adam_beta2,
      eps=config.adam_eps,
      **options,
    )
  return optax.chain(*class_decays, hybrid)


# ---------------------------------------------------------------------------------------------
# State, steps.


def create_model(config: Config, num_classes: int) -> nn.Module:
  """The model of ``--model``; BatchNorm synchronised by axis name under ``pmap`` only."""
  return models.create_model(
    config.model,
    num_classes=num_classes,
    depth=config.depth,
    widen_factor=config.widen_factor,
    keep_prob=config.keep_prob,
    bn_axis_name=PMAP_AXIS if config.parallel == 'pmap' else None,
  )


def reinitialize_manifold_kernels(rng: jax.Array, params: Any, labels: Any) -> Any:
  """Gives every ``'grassmann'`` leaf random unit columns (SPEC §1.2, TF ``unit_initializer``)."""
  init = go.unit_initializer()
  leaves, treedef = jax.tree.flatten(params)
  label_leaves = treedef.flatten_up_to(labels)
  fresh = [
    init(jax.random.fold_in(rng, index), leaf.shape, leaf.dtype) if label == go.GRASSMANN else leaf
    for index, (leaf, label) in enumerate(zip(leaves, label_leaves, strict=True))
  ]
  return treedef.unflatten(fresh)


def create_train_state(
  rng: jax.Array,
  config: Config,
  model: nn.Module,
  input_shape: tuple[int, ...],
  tx: optax.GradientTransformation,
) -> TrainState:
  """Initialises the model, puts its manifold kernels on G(1, n), and the optimizer state.

  This is the one place where model and optimizer meet: the label function of
  ``--grassmann`` decides which kernels get unit columns.
  """

  # Compiled at the lowest backend optimisation level: it runs once, and compiling every random
  # initialiser at full optimisation takes seconds on CPU.
  @functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})
  def init(rng):
    init_rng, unit_rng = jax.random.split(rng)
    variables = model.init(init_rng, jnp.zeros(input_shape, jnp.float32), train=False)
    params = variables['params']
    params = reinitialize_manifold_kernels(unit_rng, params, parameter_labels(config)(params))
    state = TrainState.create(
      apply_fn=model.apply, params=params, tx=tx, batch_stats=variables['batch_stats']
    )
    return state.replace(step=jnp.zeros([], jnp.int32))

  return init(rng)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def train_step(
  state: TrainState,
  images: jax.Array,
  labels: jax.Array,
  dropout_rng: jax.Array,
  *,
  learning_rate_fns: Mapping[str, optax.Schedule],
  orthogonality: Callable[[Any], jax.Array] | None = None,
  axis_name: str | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One update on a batch (the local shard under ``pmap``).

  The dropout key is ``fold_in(dropout_rng, step)`` (and the device index under ``pmap``), so a
  resumed run draws the same masks. Under ``pmap`` the gradients and metrics are averaged over
  ``axis_name``; the model's BatchNorm averages its batch moments over the same axis.
  """
  rng = jax.random.fold_in(dropout_rng, state.step)
  if axis_name is not None:
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))

  def loss_fn(params):
    logits, updates = state.apply_fn(
      {'params': params, 'batch_stats': state.batch_stats},
      images,
      train=True,
      rngs={'dropout': rng},
      mutable=['batch_stats'],
    )
    return jnp.mean(cross_entropy(logits, labels)), (logits, updates['batch_stats'])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  metrics = {'loss': loss, 'error': jnp.mean(jnp.argmax(logits, -1) != labels)}
  for name, fn in learning_rate_fns.items():
    metrics[name] = jnp.asarray(fn(state.step), jnp.float32)
  if orthogonality is not None:
    metrics['orthogonality'] = orthogonality(state.params)
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
    metrics = jax.lax.pmean(metrics, axis_name)
  return state.apply_gradients(grads=grads, batch_stats=batch_stats), metrics


def eval_step(
  variables: Mapping[str, Any],
  images: jax.Array,
  labels: jax.Array,
  mask: jax.Array,
  *,
  apply_fn: Callable[..., jax.Array],
  k: int,
  axis_name: str | None = None,
) -> dict[str, jax.Array]:
  """Sums over the real (``mask == 1``) examples of loss, top-1 and top-k errors, and count.

  BatchNorm uses its population statistics and dropout is off (SPEC §7.5). With ``k`` at least
  the number of classes the top-k error is 0.
  """
  logits = apply_fn(variables, images, train=False)
  top_k = jax.lax.top_k(logits, min(k, logits.shape[-1]))[1]
  wrong = {
    'loss': cross_entropy(logits, labels),
    'error': jnp.argmax(logits, -1) != labels,
    f'top{k}_error': ~jnp.any(top_k == labels[:, None], axis=-1),
  }
  sums = {name: jnp.sum(jnp.where(mask > 0, value, 0.0)) for name, value in wrong.items()}
  sums['count'] = jnp.sum(mask)
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  return sums


# ---------------------------------------------------------------------------------------------
# Devices: one small strategy per --parallel value.


class Parallel(NamedTuple):
  """How state and batches are laid out on devices, and the compiled steps that use them."""

  num_devices: int  # over all processes
  put_state: Callable[[Any], Any]  # a host tree (state or variables), copied to every device
  get_state: Callable[[Any], Any]  # one host copy
  put_batch: Callable[..., tuple[jax.Array, ...]]  # global batch -> device arrays
  train_step: Callable[..., tuple[TrainState, dict[str, jax.Array]]]
  eval_step: Callable[..., dict[str, jax.Array]]


def _process_slice(array: np.ndarray) -> np.ndarray:
  """This process's rows of a global batch (every process computes the same global batch)."""
  rows = len(array) // jax.process_count()
  return array[jax.process_index() * rows : (jax.process_index() + 1) * rows]


def _host_copy(tree: Any) -> Any:
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def _first_replica(x: jax.Array) -> np.ndarray:
  """Device 0's copy of a ``pmap``-replicated array, without compiling a slice."""
  return np.asarray(x.addressable_shards[0].data).reshape(x.shape[1:])


def make_pmap_parallel(devices, step_fn, eval_fn) -> Parallel:
  """``pmap`` over local ``devices``: replicated state, batch split along a leading axis.

  Multi-host: each process feeds its rows of the global batch to its own devices; the
  collectives over ``'batch'`` span every process.
  """
  num_local = len(devices)

  def put_batch(*arrays):
    local = [_process_slice(a) for a in arrays]
    return tuple(a.reshape(num_local, a.shape[0] // num_local, *a.shape[1:]) for a in local)

  # Placed under pmap's own axis name, so that the step's outputs match its inputs (no retrace);
  # through host memory, so that no per-leaf program is compiled.
  replicated = NamedSharding(Mesh(np.asarray(devices), (PMAP_AXIS,)), P(PMAP_AXIS))

  def put_replicated(tree):
    def put(x):
      x = np.asarray(x)
      return jax.device_put(np.broadcast_to(x[None], (num_local, *x.shape)), replicated)

    return jax.tree.map(put, tree)

  return Parallel(
    num_devices=num_local * jax.process_count(),
    put_state=put_replicated,
    get_state=lambda state: jax.tree.map(_first_replica, state),
    put_batch=put_batch,
    train_step=None
    if step_fn is None
    else jax.pmap(
      functools.partial(step_fn, axis_name=PMAP_AXIS),
      axis_name=PMAP_AXIS,
      in_axes=(0, 0, 0, None),
      devices=devices,
      donate_argnums=(0,),
    ),
    eval_step=jax.pmap(
      functools.partial(eval_fn, axis_name=PMAP_AXIS), axis_name=PMAP_AXIS, devices=devices
    ),
  )


def make_sharded_parallel(devices, step_fn, eval_fn) -> Parallel:
  """``jit`` over a one-axis mesh: replicated state, batch sharded along ``'data'``.

  Multi-host: ``devices`` are all processes' devices and each process contributes its rows of
  the global batch through ``jax.make_array_from_process_local_data``.
  """
  mesh = Mesh(np.asarray(devices), (MESH_AXIS,))
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(MESH_AXIS))

  def put_batch(*arrays):
    return tuple(
      jax.make_array_from_process_local_data(batch_sharding, _process_slice(a), a.shape)
      for a in arrays
    )

  def put_replicated(tree):
    # From host memory, which every process holds alike; also valid when the mesh spans hosts.
    def put(x):
      x = np.asarray(x)
      return jax.make_array_from_callback(x.shape, replicated, lambda index: x[index])

    return jax.tree.map(put, tree)

  return Parallel(
    num_devices=len(devices),
    put_state=put_replicated,
    get_state=_host_copy,
    put_batch=put_batch,
    train_step=None
    if step_fn is None
    else jax.jit(
      step_fn,
      in_shardings=(replicated, batch_sharding, batch_sharding, replicated),
      out_shardings=(replicated, replicated),
      donate_argnums=(0,),
    ),
    eval_step=jax.jit(
      eval_fn,
      in_shardings=(replicated, batch_sharding, batch_sharding, batch_sharding),
      out_shardings=replicated,
    ),
  )


def initialize_distributed(config: Config) -> None:
  """Multi-host: ``jax.distributed.initialize`` when asked for by flags or the environment.

  Needed only when several processes train one model (e.g. one per host). Each process passes
  the same ``--coordinator_address`` (or ``JAX_COORDINATOR_ADDRESS``) and ``--num_processes``
  and its own ``--process_id``; what is left out JAX detects itself on clusters it knows
  (SLURM, Open MPI, TPU pods). Must run before JAX touches a device; runs once per process.
  """
  settings = {
    'coordinator_address': config.coordinator_address,
    'num_processes': config.num_processes,
    'process_id': config.process_id,
  }
  wanted = any(v is not None for v in settings.values()) or 'JAX_COORDINATOR_ADDRESS' in os.environ
  if wanted and not jax.distributed.is_initialized():
    jax.distributed.initialize(**settings)


def select_devices(config: Config) -> list[jax.Device]:
  """The devices of the run; raises ValueError if the batch does not split evenly over them."""
  local = jax.local_devices()
  count = config.num_devices or len(local)
  if count < 1 or count > len(local):
    raise ValueError(f'--num_devices={count}, but this process sees {len(local)} device(s)')
  if jax.process_count() > 1:
    if count != len(local):
      raise ValueError('multi-host runs use every local device; leave --num_devices unset')
    devices = jax.devices() if config.parallel == 'sharded' else local
  else:
    devices = local[:count]
  total = count * jax.process_count()
  if config.task == 'train' and config.batch_size % total:
    raise ValueError(
      f'--batch_size={config.batch_size} does not split over {total} devices; use a multiple of '
      f'{total}, or --num_devices (--num_gpus) dividing {config.batch_size}'
    )
  return devices


def make_parallel(config: Config, devices, step_fn, eval_fn) -> Parallel:
  factory = {'pmap': make_pmap_parallel, 'sharded': make_sharded_parallel}[config.parallel]
  return factory(devices, step_fn, eval_fn)


# ---------------------------------------------------------------------------------------------
# Evaluation.


def _padded(arrays: tuple[np.ndarray, ...], size: int) -> tuple[np.ndarray, ...]:
  pad = size - len(arrays[0])
  if not pad:
    return arrays
  return tuple(np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) for a in arrays)


def evaluate(
  parallel: Parallel, variables: Any, test_ds: input_pipeline.ArrayDataset, config: Config
) -> dict[str, float]:
  """Mean cross-entropy, top-1 and top-k error over the whole test set (SPEC §7.5).

  Batches of ``vali_batch_size`` rounded up to a multiple of the device count; the padding is
  masked out, so one compiled step serves every batch and no example counts twice.
  """
  batch_size = -(-config.vali_batch_size // parallel.num_devices) * parallel.num_devices
  sums = [
    parallel.eval_step(variables, *parallel.put_batch(*_padded(batch, batch_size)))
    for batch in input_pipeline.eval_batches(test_ds, batch_size)
  ]
  # Every device holds the same psum-ed totals: one copy of each, summed over batches on host.
  totals = {
    name: float(sum(np.asarray(s[name].addressable_data(0)).reshape(-1)[0] for s in sums))
    for name in sums[0]
  }
  count = totals.pop('count')
  return {name: value / count for name, value in totals.items()}


# ---------------------------------------------------------------------------------------------
# Run directory, checkpoints, metrics.


def run_directory(config: Config) -> str:
  """``--train_path`` as given, else ``<train_dir>/<data>_<arch>_<optimizer>``; absolute."""
  path = config.train_path or os.path.join(config.train_dir, config_lib.run_name(config))
  return os.path.abspath(os.path.expanduser(path))


def checkpoint_manager(directory: str, config: Config, create: bool) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=config.max_to_keep, create=create)
  return ocp.CheckpointManager(directory, options=options, item_names=CHECKPOINT_ITEMS)


def resolve_checkpoint(path: str) -> tuple[str, int]:
  """``(checkpoints directory, step)`` for a step directory, checkpoints directory or run dir.

  Raises:
    ValueError: if ``path`` holds no checkpoint.
  """
  path = os.path.abspath(os.path.expanduser(path.rstrip('/')))
  if os.path.basename(path).isdigit() and os.path.isdir(os.path.join(path, 'state')):
    return os.path.dirname(path), int(os.path.basename(path))
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    path = os.path.join(path, 'checkpoints')
  step = latest_checkpoint_step(path)
  if step is None:
    raise ValueError(f'no checkpoint found at {path}')
  return path, step


def latest_checkpoint_step(directory: str) -> int | None:
  """The newest complete checkpoint step in ``directory``, or None (nothing is created)."""
  if not os.path.isdir(directory):
    return None
  steps = [
    int(name)
    for name in os.listdir(directory)
    if name.isdigit() and os.path.isdir(os.path.join(directory, name, 'state'))
  ]
  return max(steps, default=None)


def read_checkpoint_config(directory: str, step: int) -> dict[str, Any]:
  """The run configuration stored beside the state of checkpoint ``step``."""
  with ocp.CheckpointManager(directory, item_names=CHECKPOINT_ITEMS) as manager:
    restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  return dict(restored['config'])


def load_checkpoint(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """``(state, config)`` of a checkpoint as nested dicts of NumPy arrays (for analysis).

  ``path`` as for ``--load``: a step directory, a checkpoints directory or a run directory.
  """
  directory, step = resolve_checkpoint(path)
  with ocp.CheckpointManager(directory, item_names=CHECKPOINT_ITEMS) as manager:
    restored = manager.restore(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardRestore(), config=ocp.args.JsonRestore()),
    )
  return restored['state'], dict(restored['config'])


def check_architecture(saved: Mapping[str, Any], config: Config, num_classes: int | None) -> None:
  """Raises ValueError naming the difference if a checkpoint was written for another network."""
  expected = {**config_lib.architecture(config)}
  found = {name: saved.get(name) for name in expected}
  if num_classes is not None and saved.get('num_classes') not in (None, num_classes):
    found['num_classes'], expected['num_classes'] = saved['num_classes'], num_classes
  if found != expected:
    raise ValueError(
      f'checkpoint was written for {config_lib.describe_architecture(saved)}; '
      f'this run is {config_lib.describe_architecture(expected)}'
      + (f' with {num_classes} classes' if 'num_classes' in expected else '')
    )


def _warn_changed_hyperparameters(saved: Mapping[str, Any], config: Config) -> None:
  changed = [
    f'{name}: {saved.get(name)} -> {getattr(config, name)}'
    for name in RESUME_FIELDS
    if name in saved and _jsonable(saved[name]) != _jsonable(getattr(config, name))
  ]
  if changed:
    warnings.warn('resuming with changed settings: ' + '; '.join(changed), stacklevel=2)


def _jsonable(value: Any) -> Any:
  return json.loads(json.dumps(value))


def saved_config(config: Config, num_classes: int) -> dict[str, Any]:
  """The JSON stored with each checkpoint: every setting, plus the number of classes."""
  fields = dataclasses.asdict(config)
  fields.pop('explicit')
  return _jsonable({**fields, 'num_classes': num_classes})


def checkpoint_payload(state: TrainState) -> dict[str, Any]:
  return {
    'step': state.step,
    'params': state.params,
    'batch_stats': state.batch_stats,
    'opt_state': state.opt_state,
  }


def restore_state(state: TrainState, directory: str, step: int) -> TrainState:
  """Restores checkpoint ``step`` into the structure of the fresh ``state``."""
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, checkpoint_payload(state))
  with ocp.CheckpointManager(directory, item_names=CHECKPOINT_ITEMS) as manager:
    restored = manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
    )['state']
  return state.replace(**restored)


class MetricWriter:
  """TensorBoard scalars plus ``metrics.jsonl`` (one ``{step, split, ...}`` object a line).

  A resumed run first drops the lines logged after its checkpoint (``start_step``), which the
  interrupted run wrote and this one is about to write again.
  """

  def __init__(self, directory: str, enabled: bool, start_step: int = 0):
    self.enabled = enabled
    if not enabled:
      return
    from tensorboardX import SummaryWriter

    os.makedirs(directory, exist_ok=True)
    self.tensorboard = SummaryWriter(directory)
    path = os.path.join(directory, 'metrics.jsonl')
    if os.path.exists(path):
      with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)['step'] <= start_step]
      with open(path, 'w') as f:
        f.writelines(kept)
    self.jsonl = open(path, 'a')

  def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    for name, value in metrics.items():
      self.tensorboard.add_scalar(f'{split}/{name}', value, step)
    self.jsonl.write(json.dumps({'step': step, 'split': split, **metrics}) + '\n')
    self.jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self.tensorboard.close()
      self.jsonl.close()


def _final_line(metrics: Mapping[str, float], steps: int) -> str:
  return f'final: test_error={metrics["error"]:.6g} test_loss={metrics["loss"]:.6g} steps={steps}'


# ---------------------------------------------------------------------------------------------
# The program.


def _step_functions(config: Config, model, num_train: int):
  learning_rate_fns = {
    'learning_rate': create_learning_rate_fn(config.learnRate, config, num_train)
  }
  orthogonality = None
  if config.optimizer != 'sgd':
    learning_rate_fns['learning_rate_g'] = create_learning_rate_fn(
      config.learnRateG, config, num_train
    )
    if config.grassmann and config.omega:
      labels_fn = parameter_labels(config)
      orthogonality = lambda params: go.orthogonality_penalty(params, labels_fn, config.omega)
  step_fn = functools.partial(
    train_step, learning_rate_fns=learning_rate_fns, orthogonality=orthogonality
  )
  eval_fn = functools.partial(eval_step, apply_fn=model.apply, k=config.k)
  return step_fn, eval_fn


def _prepare(config: Config):
  """Checks everything that can be checked before loading data; returns the devices."""
  initialize_distributed(config)
  devices = select_devices(config)
  create_model(config, num_classes=2)  # raises for an unknown model or a depth not 6N+4
  return devices


def _resume_point(config: Config, workdir: str) -> tuple[str, int] | None:
  """The checkpoint to start from, architecture-checked: the run's own, else ``--load``."""
  own = os.path.join(workdir, 'checkpoints')
  step = latest_checkpoint_step(own)
  source = (own, step) if step is not None else None
  if source is None and config.load:
    source = resolve_checkpoint(config.load)
  if source is not None:
    saved = read_checkpoint_config(*source)
    check_architecture(saved, config, None)
    _warn_changed_hyperparameters(saved, config)
  return source


class Checkpointer:
  """Orbax checkpoints in ``<run>/checkpoints``: the host copy of the state, plus the config."""

  def __init__(self, workdir: str, config: Config, num_classes: int, parallel: Parallel):
    self.manager = checkpoint_manager(os.path.join(workdir, 'checkpoints'), config, create=True)
    self.config = saved_config(config, num_classes)
    self.parallel = parallel

  def save(self, state: TrainState, step: int) -> None:
    if step in self.manager.all_steps():
      return
    payload = checkpoint_payload(self.parallel.get_state(state))
    self.manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(payload), config=ocp.args.JsonSave(self.config)
      ),
    )

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _initial_state(config, model, info, resume, rng) -> TrainState:
  tx = create_optimizer(config, info.num_train)
  state = create_train_state(rng, config, model, (1, *info.image_shape), tx)
  return state if resume is None else restore_state(state, *resume)


def _train_loop(config, parallel, state, data, num_steps, dropout_rng, writer, checkpointer):
  """Steps from ``state.step`` to ``num_steps``, logging, testing and saving on schedule.

  Returns the final (device) state and the last test metrics (None if no step was left).
  """
  train_ds, test_ds = data
  start_step = int(parallel.get_state(state.step))
  test_metrics, window = None, []
  progress = tqdm.tqdm(
    total=num_steps,
    initial=min(start_step, num_steps),
    disable=not (config.verbose and writer.enabled),
    desc='train',
    dynamic_ncols=True,
  )
  for step in range(start_step, num_steps):
    images, labels = input_pipeline.train_batch(train_ds, step, config.batch_size, config.seed)
    state, metrics = parallel.train_step(state, *parallel.put_batch(images, labels), dropout_rng)
    window.append(metrics)
    done = step + 1
    progress.update()
    if done % config.report_freq == 0 or done == num_steps:
      summary, window = _mean_metrics(window), []
      writer.write(done, 'train', summary)
      progress.set_postfix(
        loss=f'{summary["loss"]:.4f}',
        error=f'{summary["error"]:.4f}',
        lr=f'{summary["learning_rate"]:.3g}',
      )
    if done % config.vali_freq == 0 or done == num_steps:
      test_metrics = evaluate(parallel, _variables(state), test_ds, config)
      writer.write(done, 'test', test_metrics)
    if done % config.save_freq == 0 or done == num_steps:
      checkpointer.save(state, done)
  progress.close()
  return state, test_metrics


def _variables(state: TrainState) -> dict[str, Any]:
  return {'params': state.params, 'batch_stats': state.batch_stats}


def _result(metrics: Mapping[str, float], config: Config, steps: int, **extra) -> dict[str, Any]:
  return {
    'test_error': metrics['error'],
    'test_loss': metrics['loss'],
    f'test_top{config.k}_error': metrics[f'top{config.k}_error'],
    'steps': steps,
    **extra,
  }


def train_and_evaluate(config: Config) -> dict[str, Any]:
  """Trains (or, with ``task='test'``, evaluates) as configured; returns the final metrics.

  Writes to the run directory (``--train_path``, else ``<train_dir>/<run name>``): TensorBoard
  events, ``metrics.jsonl``, ``checkpoints/`` and ``summary.json``; prints
  ``final: test_error=... test_loss=... steps=...`` last. A run directory that holds a
  checkpoint is resumed from it; otherwise ``--load`` gives the starting checkpoint, if any.

  Returns:
    ``test_error``, ``test_loss``, ``test_top{k}_error``, ``steps``, ``train_dir`` and timings.

  Raises:
    ValueError: an inconsistent configuration, detected before training starts (and, for a
      checkpoint of another architecture, before anything is written).
    input_pipeline.DatasetNotPreparedError: a tfds dataset is missing and cannot be downloaded.
  """
  if config.task == 'test':
    return evaluate_checkpoint(config)
  devices = _prepare(config)
  workdir = run_directory(config)
  resume = _resume_point(config, workdir)
  train_ds, test_ds, info = _load_dataset(config)
  if resume is not None:
    check_architecture(read_checkpoint_config(*resume), config, info.num_classes)

  model = create_model(config, info.num_classes)
  init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
  state = _initial_state(config, model, info, resume, init_rng)
  start_step, num_steps = int(state.step), num_train_steps(config, info.num_train)
  parallel = make_parallel(config, devices, *_step_functions(config, model, info.num_train))
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0, start_step=start_step)
  checkpointer = Checkpointer(workdir, config, info.num_classes, parallel)

  started = time.perf_counter()
  state, test_metrics = _train_loop(
    config,
    parallel,
    parallel.put_state(state),
    (train_ds, test_ds),
    num_steps,
    dropout_rng,
    writer,
    checkpointer,
  )
  elapsed = time.perf_counter() - started
  if test_metrics is None:  # nothing was left to train
    test_metrics = evaluate(parallel, _variables(state), test_ds, config)
  checkpointer.close()
  writer.close()

  final_step = max(start_step, num_steps)
  result = _result(
    test_metrics,
    config,
    final_step,
    train_dir=workdir,
    train_seconds=elapsed,
    steps_per_second=(final_step - start_step) / elapsed if elapsed > 0 else 0.0,
  )
  if writer.enabled:
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump(result, f, indent=2)
    print(_final_line(test_metrics, final_step), flush=True)
  return result


def _load_dataset(config: Config):
  return input_pipeline.load_dataset(
    config.data,
    data_dir=config.data_dir,
    download=config.download,
    padding_size=config.padding_size,
    crop_size=config.crop_size,
  )


def _mean_metrics(window: list[dict[str, jax.Array]]) -> dict[str, float]:
  """Means over the report window; learning rates at its last step (a mean would blur decays)."""
  host = [
    {name: np.asarray(v).reshape(-1)[0] for name, v in m.items()} for m in jax.device_get(window)
  ]
  return {
    name: float(
      host[-1][name] if name.startswith('learning_rate') else np.mean([m[name] for m in host])
    )
    for name in host[0]
  }


def evaluate_checkpoint(config: Config) -> dict[str, Any]:
  """``--task=test``: evaluates the checkpoint of ``--load`` and prints the final line.

  Architecture flags not given on the command line are taken from the checkpoint; given ones
  must agree with it.
  """
  if not config.load:
    raise ValueError(
      '--task=test needs --load=<checkpoint>: a step directory, a checkpoints directory or a run '
      'directory'
    )
  directory, step = resolve_checkpoint(config.load)
  saved = read_checkpoint_config(directory, step)
  given = {name: getattr(config, name) for name in config.explicit}
  inherited = {
    name: saved[name]
    for name in (*config_lib.ARCHITECTURE_FIELDS, 'keep_prob')
    if name in saved and name not in given
  }
  config = config_lib.get_config(**inherited, **given)
  check_architecture(saved, config, None)
  devices = _prepare(config)
  _, test_ds, info = _load_dataset(config)
  check_architecture(saved, config, info.num_classes)
  model = create_model(config, info.num_classes)
  state, _ = load_checkpoint(os.path.join(directory, str(step)))
  _, eval_fn = _step_functions(config, model, info.num_train)
  parallel = make_parallel(config, devices, None, eval_fn)
  variables = parallel.put_state({'params': state['params'], 'batch_stats': state['batch_stats']})
  metrics = evaluate(parallel, variables, test_ds, config)
  print(_final_line(metrics, step), flush=True)
  return _result(metrics, config, step, checkpoint=os.path.join(directory, str(step)))
