"""Training and evaluation of a BatchNorm network with SGD-G / Adam-G (Cho & Lee, NeurIPS 2017).

Flat functions in the manner of flax ``examples/imagenet``. A run builds each thing once and
passes it on: the model, its parameter shapes, their labels (:func:`parameter_labels`, the one
place where model and optimizer meet), the learning-rate schedules, the optimizer, the state,
then the steps. What the TF program of the paper did, and this one repeats:

* both learning rates decay together, by step, with TF's boundary semantics, and the optimizer
  state persists across decays;
* undercomplete conv kernels get unit columns and live on G(1, n); the orthogonality gradient and
  the coupled L2 decay are part of the optimizer;
* the test set is evaluated every ``vali_freq`` steps and at the end with BN population
  statistics and no dropout: cross-entropy, top-1 and top-k error.

A run resumes exactly from its newest checkpoint: the batch of step ``s`` and its dropout key are
pure functions of ``(seed, s)``, and the checkpoint holds the step, parameters, BN statistics and
optimizer state. A resume with other training settings than the checkpoint's needs them named in
``--allow_changed``. The run stops at the first non-finite training loss, test loss or state
(:class:`TrainingDivergedError`), and on SIGINT/SIGTERM after saving the step in flight.

A checkpoint is written only from a state that is finite and from which the next step came out
finite too: the state of step ``t`` is held on the host and saved after step ``t + 1`` (the last
one after its test evaluation). A state can be finite and still lost (parameters near 1e19, whose
BatchNorm variance overflows at the next step); so after a divergence the newest checkpoint is
one that a run with a lower learning rate can continue, unless the loss had already grown far
from where it started before that step (``metrics.jsonl`` shows it): a finite state is not always
one that can still be trained.

References:
  Cho & Lee, "Riemannian approach to batch normalization", NeurIPS 2017, arXiv:1709.09603.
"""

import contextlib
import functools
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax.training import train_state

import grassmann_optax as go
from train import checkpoints, input_pipeline, interrupts, models, workdir
from train import config as config_lib
from train import metrics as metrics_lib
from train import parallel as parallel_lib

Config = config_lib.Config


class TrainState(train_state.TrainState):
  """Flax ``TrainState`` plus the BatchNorm population statistics."""

  batch_stats: Any = None


# The key of a checkpoint's settings under which it keeps the training metrics since the last
# report.
TRAIN_WINDOW = 'train_window'


class TrainingDivergedError(RuntimeError):
  """A loss or the state was NaN or infinite; nothing from that step on was saved."""


# ---------------------------------------------------------------------------------------------
# Model, labels, schedules, optimizer, state.


def create_model(config: Config, num_classes: int) -> nn.Module:
  """The model of ``--model``; BatchNorm synchronised by axis name under ``pmap`` only."""
  return models.create_model(
    config.model,
    num_classes=num_classes,
    depth=config.depth,
    widen_factor=config.widen_factor,
    width_scale=config.width_scale,
    keep_prob=config.keep_prob,
    bn_axis_name=parallel_lib.PMAP_AXIS if config.parallel == 'pmap' else None,
  )


def parameter_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> Any:
  """The model's parameters as ``jax.ShapeDtypeStruct`` (nothing is computed)."""
  images = jax.ShapeDtypeStruct(input_shape, jnp.float32)
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)[
    'params'
  ]


def parameter_labels(config: Config, params: Any) -> Any:
  """``'grassmann'``/``'euclidean'`` per parameter: the paper's rule with ``--grassmann``.

  The rule (:func:`grassmann_optax.grassmann_labels`): a conv kernel whose fan-in exceeds its
  number of outputs. Without ``--grassmann`` every parameter is Euclidean.
  """
  if config.grassmann:
    return go.grassmann_labels(params)
  return jax.tree.map(lambda _: go.EUCLIDEAN, params)


def _check_omega(config: Config, shapes: Any, labels: Any) -> None:
  """Refuses an ω whose orthogonality term can overflow float32 on this model.

  With unit columns, a kernel of ``p`` columns has ``‖WᵀW − I‖² ≤ p(p − 1)`` and gradient entries
  ``|2ω(WWᵀW − W)| ≤ 2ωp``. An infinite gradient would leave its columns where they are (the
  optimizer keeps a point whose gradient is not finite), so the run would end with the manifold
  weights untrained.

  Raises:
    ConfigError: ``ω`` times either bound exceeds the largest float32.
  """
  widths = [
    shape.shape[-1]
    for shape, label in zip(jax.tree.leaves(shapes), jax.tree.leaves(labels), strict=True)
    if label == go.GRASSMANN
  ]
  if not widths or not config.omega:
    return
  bound = max(sum(p * (p - 1) / 2 for p in widths), 2 * max(widths))
  largest = config_lib.FLOAT32_MAX / bound
  if config.omega > largest:
    raise config_lib.ConfigError(
      f'--omega={config.omega:g} is too large for this model: its orthogonality penalty or '
      f'gradient can exceed the largest float32 (kernels of up to {max(widths)} columns); '
      f'choose --omega <= {largest:.3g} (the paper uses 0.1)'
    )


def decay_steps(decay_epochs, num_train: int, batch_size: int) -> list[int]:
  """``floor(E_k · num_train / batch_size)`` for each decay epoch ``E_k``."""
  return [math.floor(epoch * num_train / batch_size) for epoch in decay_epochs]


def num_train_steps(config: Config, num_train: int) -> int:
  """``floor(epochs · num_train / batch_size)``, capped by ``max_steps`` when given."""
  steps = math.floor(config.epochs * num_train / config.batch_size)
  return steps if config.max_steps is None else min(steps, config.max_steps)


def create_learning_rate_fn(
  base_learning_rate: float, config: Config, num_train: int
) -> optax.Schedule:
  """Step decay with the TF program's semantics.

  At 0-based step ``s`` the rate is ``base · decay^#{k : s > decay_step_k}``. The optax schedule
  scales from ``count >= boundary`` on, so each boundary is ``decay_step_k + 1``; coinciding
  boundaries (tiny datasets) multiply their factors.
  """
  boundaries: dict[int, float] = {}
  for step in decay_steps(config.decay_epochs, num_train, config.batch_size):
    boundaries[step + 1] = boundaries.get(step + 1, 1.0) * config.learnRateDecay
  return optax.piecewise_constant_schedule(base_learning_rate, boundaries)


def create_learning_rate_fns(config: Config, num_train: int) -> dict[str, optax.Schedule]:
  """``learning_rate`` (Euclidean) and, for SGD-G / Adam-G, ``learning_rate_g`` (manifold)."""
  fns = {'learning_rate': create_learning_rate_fn(config.learnRate, config, num_train)}
  if config.optimizer != 'sgd':
    fns['learning_rate_g'] = create_learning_rate_fn(config.learnRateG, config, num_train)
  return fns


def decay_classes(tree: Mapping[str, Any]) -> Any:
  """Labels each leaf with its TF decay class: ``weight``, ``bias``, ``gamma`` or ``beta``.

  Only the names count, so ``tree`` can be the parameters, their shapes or their labels.
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

  return {key: classify(key, value, tree) for key, value in tree.items()}


def _decay_mask(labels: Any, kind: str) -> Any:
  """True on the Euclidean leaves of decay class ``kind``."""
  return jax.tree.map(
    lambda cls, label: cls == kind and label == go.EUCLIDEAN, decay_classes(labels), labels
  )


def create_optimizer(
  config: Config, learning_rate_fns: Mapping[str, optax.Schedule], labels: Any
) -> optax.GradientTransformation:
  """The optimizer of ``--optimizer`` with the given schedules, for parameters with ``labels``.

  ``sgd``: the TF baseline, Nesterov momentum SGD on every parameter with coupled L2 per class
  (``weightDecay``, ``biasDecay``, ``gammaDecay``, ``betaDecay``). ``sgdg`` / ``adamg``: the
  library's hybrid optimizer; Euclidean kernels get ``weightDecay``, manifold kernels no decay,
  biases and BatchNorm parameters their own decay if given (none in the paper's recipes).
  Adam-G's β1 is ``--momentum``, as in the TF program; β2 is ``--adam_beta2``. Where no parameter
  is on the manifold (``--grassmann=False``), SGD-G and Adam-G are their Euclidean part alone:
  Nesterov SGD with coupled decay on the kernels.
  """

  def decay(rate, kind):
    return optax.add_decayed_weights(rate, _decay_mask(labels, kind)) if rate else optax.identity()

  learning_rate = learning_rate_fns['learning_rate']
  class_decays = [decay(config.biasDecay, 'bias'), decay(config.gammaDecay, 'gamma')]
  class_decays.append(decay(config.betaDecay, 'beta'))
  if config.optimizer == 'sgd':
    sgd = optax.sgd(learning_rate, momentum=config.momentum, nesterov=config.nesterov)
    return optax.chain(decay(config.weightDecay, 'weight'), *class_decays, sgd)
  options = dict(
    momentum=config.momentum,
    nesterov=config.nesterov,
    weight_decay=config.weightDecay,
    weight_decay_mask=_decay_mask(labels, 'weight'),
  )
  if go.GRASSMANN not in jax.tree.leaves(labels):
    return optax.chain(*class_decays, go.euclidean_sgd(learning_rate, **options))
  options.update(grad_clip=config.grad_clip, omega=config.omega or 0.0, param_labels=labels)
  learning_rate_g = learning_rate_fns['learning_rate_g']
  if config.optimizer == 'sgdg':
    hybrid = go.sgdg(learning_rate, learning_rate_g, **options)
  else:
    betas = dict(b1=config.momentum, b2=config.adam_beta2, eps=config.adam_eps)
    hybrid = go.adamg(learning_rate, learning_rate_g, **betas, **options)
  return optax.chain(*class_decays, hybrid)


def put_on_manifold(rng: jax.Array, params: Any, labels: Any) -> Any:
  """Gives every ``'grassmann'`` leaf random unit columns (the TF ``unit_initializer``)."""
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
  model: nn.Module,
  input_shape: tuple[int, ...],
  labels: Any,
  tx: optax.GradientTransformation,
) -> TrainState:
  """Initialises the model, gives its manifold kernels unit columns, and the optimizer state."""

  # Compiled at the lowest backend optimisation level: it runs once, and compiling every random
  # initialiser at full optimisation takes seconds on CPU.
  @functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})
  def init(rng):
    init_rng, unit_rng = jax.random.split(rng)
    variables = model.init(init_rng, jnp.zeros(input_shape, jnp.float32), train=False)
    params = put_on_manifold(unit_rng, variables['params'], labels)
    state = TrainState.create(
      apply_fn=model.apply, params=params, tx=tx, batch_stats=variables['batch_stats']
    )
    return state.replace(step=jnp.zeros([], jnp.int32))

  return init(rng)


# ---------------------------------------------------------------------------------------------
# Steps.


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def dropout_rng(rng: jax.Array, step: jax.Array, axis_name: str | None = None) -> jax.Array:
  """The dropout key of ``step``: ``fold_in(rng, step)``, and the device index under ``pmap``.

  A resumed run draws the same masks; under ``pmap`` each device draws its own.
  """
  rng = jax.random.fold_in(rng, step)
  return rng if axis_name is None else jax.random.fold_in(rng, jax.lax.axis_index(axis_name))


def train_step(
  state: TrainState,
  images: jax.Array,
  labels: jax.Array,
  rng: jax.Array,
  *,
  axis_name: str | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One update on a batch (the local shard under ``pmap``); returns its loss and error.

  Under ``pmap`` the gradients and metrics are averaged over ``axis_name``; the model's
  BatchNorm averages its batch moments over the same axis.
  """

  def loss_fn(params):
    logits, updates = state.apply_fn(
      {'params': params, 'batch_stats': state.batch_stats},
      images,
      train=True,
      rngs={'dropout': dropout_rng(rng, state.step, axis_name)},
      mutable=['batch_stats'],
    )
    return jnp.mean(cross_entropy(logits, labels)), (logits, updates['batch_stats'])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  metrics = {'loss': loss, 'error': jnp.mean(jnp.argmax(logits, -1) != labels)}
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

  BatchNorm uses its population statistics and dropout is off. With ``k`` at least the number of
  classes the top-k error is 0.
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


def evaluate(
  parallel: parallel_lib.Parallel,
  variables: Any,
  test_ds: input_pipeline.ArrayDataset,
  batch_size: int,
) -> dict[str, float]:
  """Mean cross-entropy, top-1 and top-k error over the whole test set.

  Batches of ``batch_size`` (at most the test set) rounded up to a multiple of the device count;
  the padding is masked out, so one compiled step serves every batch and no example counts twice.
  """
  # No batch larger than the test set: the padding would only cost memory.
  batch_size = min(batch_size, len(test_ds))
  batch_size = -(-batch_size // parallel.num_devices) * parallel.num_devices
  sums = [
    parallel.eval_step(variables, *parallel.put_batch(*batch))
    for batch in input_pipeline.eval_batches(test_ds, batch_size)
  ]
  # Every device holds the same psum-ed totals: one copy of each, summed over batches on host.
  sums = [parallel_lib.first_copy(s) for s in sums]
  totals = {name: sum(float(s[name]) for s in sums) for name in sums[0]}
  count = totals.pop('count')
  return {name: value / count for name, value in totals.items()}


# ---------------------------------------------------------------------------------------------
# The program.


def train_and_evaluate(config: Config) -> dict[str, Any]:
  """Trains (or, with ``task='test'``, evaluates) as configured; returns the final metrics.

  Writes to the run directory (:func:`train.workdir.run_directory`): ``checkpoints/``,
  TensorBoard events, ``metrics.jsonl`` and ``summary.json``; prints
  ``final: test_error=... test_loss=... steps=...`` last. A run directory that holds a
  checkpoint is resumed from its newest intact one; otherwise ``--load`` gives the starting
  checkpoint, if any.

  Returns:
    ``test_error``, ``test_loss``, ``test_top{k}_error``, ``steps``, ``train_dir``, timings.

  Raises:
    ConfigError: a setting that cannot work (another architecture's checkpoint, too many
      devices, an unwritable run directory), found before training starts.
    input_pipeline.DatasetNotPreparedError: a tfds dataset is missing and cannot be downloaded.
    workdir.RunDirectoryBusyError: another process trains in the run directory.
    checkpoints.NoIntactCheckpointError: none of the run's checkpoints can be read.
    workdir.WriteError: a checkpoint or metrics file could not be written.
    TrainingDivergedError: a loss or the state was not finite.
    interrupts.Interrupted: SIGINT or SIGTERM; the step in flight was saved.
  """
  if config.task == 'test':
    return evaluate_checkpoint(config)
  config_lib.check_schedule(config, input_pipeline.DATASETS[config.data].num_train)
  parallel_lib.initialize_distributed(config)
  devices = parallel_lib.select_devices(config)
  info = input_pipeline.DATASETS[config.data]
  model = create_model(config, info.num_classes)
  shapes = parameter_shapes(model, (1, *info.image_shape))
  labels = parameter_labels(config, shapes)
  _check_omega(config, shapes, labels)
  run_dir = workdir.run_directory(config)
  lock = workdir.locked(run_dir) if jax.process_index() == 0 else contextlib.nullcontext()
  with lock:
    for directory in (run_dir, os.path.join(run_dir, 'checkpoints')):
      workdir.check_directory(directory)
    return _train(config, devices, run_dir, model, labels)


def _train(config, devices, run_dir, model, labels) -> dict[str, Any]:
  info = input_pipeline.DATASETS[config.data]
  input_shape = (1, *info.image_shape)
  learning_rate_fns = create_learning_rate_fns(config, info.num_train)
  tx = create_optimizer(config, learning_rate_fns, labels)
  init_rng, rng = jax.random.split(jax.random.key(config.seed))
  state = create_train_state(init_rng, model, input_shape, labels, tx)

  checkpoints_dir = os.path.join(run_dir, 'checkpoints')
  with checkpoints.checkpoint_manager(checkpoints_dir, max_to_keep=config.max_to_keep) as manager:
    state, window_state = _restore(config, manager, state, info.num_classes)
    train_ds, test_ds, _ = _load_dataset(config)
    parallel = parallel_lib.create_parallel(
      config, devices, train_step, functools.partial(eval_step, apply_fn=model.apply, k=config.k)
    )
    orthogonality = _compiled_penalty(parallel, labels, config.omega)
    start_step, num_steps = int(state.step), num_train_steps(config, info.num_train)
    saved_config = config_lib.to_json(config, info.num_classes)
    summary_path = os.path.join(run_dir, 'summary.json')
    if jax.process_index() == 0:
      _remove_summary(summary_path)  # there again only once this run finishes
    writer = metrics_lib.MetricWriter(
      run_dir, enabled=jax.process_index() == 0, start_step=start_step
    )
    progress = tqdm.tqdm(
      total=num_steps,
      initial=min(start_step, num_steps),
      disable=not (config.verbose and writer.enabled),
      desc='train',
      dynamic_ncols=True,
    )
    state, test_metrics = parallel.put_state(state), None
    window = metrics_lib.TrainWindow(window_state)
    diverged = functools.partial(_diverged, config, manager)
    # (step, host state, settings and window) of a save that waits for its next step to come out
    # finite; the window's sums are those of that step.
    pending = None
    started = time.perf_counter()
    with writer, progress:
      # SIGINT and SIGTERM stop at a step boundary, after saving it, only in the loop: before it
      # (restoring, loading the data) and after it, SIGINT ends the program at once.
      with interrupts.deferred() as stop:
        for step in range(start_step, num_steps):
          batch = input_pipeline.train_batch(train_ds, step, config.batch_size, config.seed)
          state, metrics = parallel.train_step(state, *parallel.put_batch(*batch), rng)
          if step == start_step:  # compiled: the bar's rate and estimate leave the compilation out
            progress.unpause()
          done = step + 1
          window.append(done, metrics)
          progress.update()
          report = done % config.report_freq == 0 or done == num_steps
          test = done % config.vali_freq == 0 or done == num_steps
          save = done % config.save_freq == 0 or done == num_steps
          signum = _stop_signal(stop, report)
          if not (report or test or save or signum or pending):
            continue
          found = window.first_non_finite()
          if found is not None:
            raise diverged(found[0], f'training loss={found[1]}')
          if save or signum or pending:
            host_state = _finite_host_state(parallel, state, done, diverged)
          if pending:
            checkpoints.save(manager, *pending)
            pending = None
          if report:
            summary = _train_summary(window, step, state, learning_rate_fns, orthogonality)
            writer.write(done, 'train', summary)
            progress.set_postfix(
              loss=f'{summary["loss"]:.4f}',
              error=f'{summary["error"]:.4f}',
              lr=f'{summary["learning_rate"]:.3g}',
            )
          if test:
            test_metrics = _finite_evaluation(
              parallel, _variables(state), test_ds, config, functools.partial(diverged, done)
            )
            writer.write(done, 'test', test_metrics)
          if signum or done == num_steps:  # no next step to wait for; the test loss was finite
            checkpoints.save(manager, done, host_state, _with_window(saved_config, window))
          elif save:
            pending = (done, host_state, _with_window(saved_config, window))
          if signum:
            raise interrupts.Interrupted(signum, done, checkpoints.directory(manager))
      elapsed = time.perf_counter() - started
      if test_metrics is None:  # nothing was left to train
        test_metrics = _finite_evaluation(
          parallel, _variables(state), test_ds, config, functools.partial(diverged, start_step)
        )

  final_step = max(start_step, num_steps)
  result = _result(
    test_metrics,
    config,
    final_step,
    train_dir=run_dir,
    train_seconds=elapsed,
    steps_per_second=(final_step - start_step) / elapsed if elapsed > 0 else 0.0,
  )
  if jax.process_index() == 0:
    _write_summary(summary_path, {**result, 'config': saved_config}, final_step)
    print(_final_line(test_metrics, final_step), flush=True)
  return result


def _compiled_penalty(parallel, labels: Any, omega: float | None):
  """The orthogonality penalty of the params, compiled for reporting; None where there is none."""
  if go.GRASSMANN not in jax.tree.leaves(labels) or not omega:
    return None
  return parallel.compile_scalar(lambda params: go.orthogonality_penalty(params, labels, omega))


def _finite_evaluation(parallel, variables, test_ds, config: Config, error) -> dict[str, float]:
  """The test metrics of ``variables``; raises ``error('test loss=...')`` if the loss is not
  finite."""
  metrics = evaluate(parallel, variables, test_ds, config.vali_batch_size)
  if not math.isfinite(metrics['loss']):
    raise error(f'test loss={metrics["loss"]}')
  return metrics


def _write_summary(path: str, summary: dict[str, Any], final_step: int) -> None:
  try:
    workdir.write_json(path, summary)
  except workdir.WriteError as error:
    raise workdir.WriteError(
      f'{error}; training reached step {final_step}, whose checkpoint is kept. Fix the cause '
      'and run the same command: it evaluates that checkpoint and writes the summary'
    ) from error.__cause__


def _with_window(saved_config: dict[str, Any], window: metrics_lib.TrainWindow) -> dict[str, Any]:
  """A checkpoint's ``config`` item: the settings, and the training metrics since the last
  report (:meth:`~train.metrics.TrainWindow.state`) under ``train_window``."""
  return {**saved_config, TRAIN_WINDOW: window.state()}


def _remove_summary(path: str) -> None:
  """Removes the ``summary.json`` of an earlier run in this directory, if any.

  A continued run that then fails (it diverges, is stopped or cannot write) must not leave the
  earlier run's final result in place, as if it were its own.

  Raises:
    WriteError: the file is there but cannot be removed.
  """
  try:
    os.remove(path)
  except FileNotFoundError:
    pass
  except OSError as error:
    raise workdir.WriteError(
      f'cannot remove {path}, the summary of an earlier run ({workdir.reason(error)}); make the '
      'run directory writable and run the same command again'
    ) from error


def _train_summary(window, step, state, learning_rate_fns, orthogonality) -> dict[str, float]:
  """Mean loss and error over the window, the rates of ``step`` and the penalty ``L_O`` after it.

  ``L_O`` is computed here only, at report steps, by its own small compiled function.
  """
  summary = window.summary()
  summary.update({name: float(fn(step)) for name, fn in learning_rate_fns.items()})
  if orthogonality is not None:
    summary['orthogonality'] = orthogonality(state.params)
  return summary


def _stop_signal(stop: interrupts.StopRequest, report: bool) -> int | None:
  """The signal to stop on now, if any; several processes agree on it at report steps."""
  if jax.process_count() == 1:
    return stop.signum
  if not report:
    return None
  from jax.experimental import multihost_utils

  signals = multihost_utils.process_allgather(np.int32(stop.signum or 0))
  return int(np.max(signals)) or None


_STATE_PARTS = {
  'params': 'parameters',
  'batch_stats': 'BatchNorm statistics',
  'opt_state': 'optimizer state',
}


def non_finite_arrays(state: Mapping[str, Any]) -> str:
  """Which parts of a ``state`` hold a NaN or an infinity, e.g. ``'parameters'``; or ''.

  Host arrays are checked on the host; device arrays (split over devices and processes under
  ``--parallel=fsdp``) where they are, without gathering them.
  """
  parts = []
  for name, tree in state.items():
    leaves = [leaf for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    on_device = [leaf for leaf in leaves if isinstance(leaf, jax.Array)]
    on_host = [leaf for leaf in leaves if not isinstance(leaf, jax.Array)]
    finite = all(np.all(np.isfinite(leaf)) for leaf in on_host)
    if finite and on_device:
      finite = bool(_all_finite(on_device))
    if not finite:
      parts.append(_STATE_PARTS.get(name, name))
  return ', '.join(parts)


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def _finite_host_state(parallel, state: TrainState, step: int, diverged) -> dict[str, Any]:
  """What a checkpoint of ``state`` holds (a host copy, or the split device arrays under
  ``--parallel=fsdp``); raises ``diverged`` if it is not finite."""
  host_state = checkpoint_payload(parallel.get_state(state))
  non_finite = non_finite_arrays(host_state)
  if non_finite:
    raise diverged(step, f'non-finite {non_finite} after it')
  return host_state


def _diverged(config: Config, manager, step: int, what: str) -> TrainingDivergedError:
  """The error for a run that diverged at ``step``, saying how to continue from what is kept."""
  newest = manager.latest_step()
  lower = {name: getattr(config, name) / 10 for name in ('learnRate', 'learnRateG')}
  if config.optimizer == 'sgd':
    lower.pop('learnRateG')
  flags = ' '.join(f'--{name}={value:g}' for name, value in lower.items())
  allow = f'--allow_changed={",".join(lower)}'
  if newest is None and config.load:
    kept = (
      f'no checkpoint was saved in {checkpoints.directory(manager)}; the run started from '
      f'--load={config.load}'
    )
    advice = f'to start from it again, run again with lower learning rates, e.g. {flags} {allow}'
  elif newest is None:
    kept = f'no checkpoint was saved in {checkpoints.directory(manager)}'
    advice = f'run again with lower learning rates (e.g. {flags}) to start afresh'
  else:
    kept = (
      f'the newest checkpoint in {checkpoints.directory(manager)} is step {newest}, whose next '
      'step was still finite'
    )
    advice = f'to continue from it, run again with lower learning rates, e.g. {flags} {allow}'
  if config.optimizer != 'sgd' and config.grad_clip is None:  # it clips the manifold's gradient
    advice += ' (or set --grad_clip)'
  if newest is not None:
    advice += (
      '; if the training loss had already grown far above its start by then (metrics.jsonl), '
      'that state is lost too: train anew with lower rates in a new --train_path'
    )
  return TrainingDivergedError(f'training diverged at step {step} ({what}); {kept}; {advice}')


def _restore(
  config: Config, manager, state: TrainState, num_classes: int
) -> tuple[TrainState, dict[str, Any] | None]:
  """``state`` restored from the run's newest readable checkpoint, else from ``--load``, and
  the training metrics that the checkpoint kept since its last report (None: none).

  The checkpoint's settings must describe the same network and, for the settings that shape
  training, agree with this run's or be named in ``--allow_changed``.
  """

  def check(saved):
    config_lib.check_architecture(saved, config, num_classes)
    return config_lib.check_resume(saved, config)

  target = checkpoint_payload(state)
  found = checkpoints.restore(manager, target, check, move_damaged=True)
  if found is None and config.load:
    directory, step = checkpoints.resolve(config.load)
    if not os.path.isdir(directory):
      raise config_lib.ConfigError(f'--load={config.load}: no checkpoint there')
    with checkpoints.reading(directory) as source:
      found = checkpoints.restore(source, target, check, step=step, move_damaged=False)
    if found is None:
      raise config_lib.ConfigError(f'--load={config.load}: no checkpoint there')
  if found is None:
    return state, None
  _, restored, saved = found
  changes = config_lib.check_resume(saved, config)  # passed in restore: only lists them
  if changes:
    print(
      'note: continuing with changed settings (--allow_changed): ' + '; '.join(changes),
      file=sys.stderr,
    )
  return state.replace(**restored), saved.get(TRAIN_WINDOW)


def checkpoint_payload(state: TrainState) -> dict[str, Any]:
  """What a checkpoint's ``state`` item holds."""
  return {
    'step': state.step,
    'params': state.params,
    'batch_stats': state.batch_stats,
    'opt_state': state.opt_state,
  }


def _load_dataset(config: Config):
  return input_pipeline.load_dataset(
    config.data,
    data_dir=config.data_dir,
    download=config.download,
    padding_size=config.padding_size,
    crop_size=config.crop_size,
  )


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


def _final_line(metrics: Mapping[str, float], steps: int) -> str:
  return f'final: test_error={metrics["error"]:.6g} test_loss={metrics["loss"]:.6g} steps={steps}'


def evaluate_checkpoint(config: Config) -> dict[str, Any]:
  """``--task=test``: evaluates the checkpoint of ``--load`` and prints the final line.

  Architecture settings not given explicitly are taken from the checkpoint; given ones must
  agree with it. Nothing is written.
  """
  parallel_lib.initialize_distributed(config)
  try:
    step, state, saved = checkpoints.load(config.load)
  except FileNotFoundError:
    raise config_lib.ConfigError(f'--load={config.load}: no checkpoint there') from None
  given = {name: getattr(config, name) for name in config.explicit}
  # Only the settings of the model evaluated: VGG takes no depth or widen factor, resnet no scale.
  model = given.get('model', saved.get('model'))
  unused = config_lib.unused_fields(model)
  inherited = {
    name: saved[name]
    for name in (*config_lib.ARCHITECTURE_FIELDS, 'keep_prob')
    if name in saved and name not in given and name not in unused
  }
  config = config_lib.get_config(**inherited, **given)
  info = input_pipeline.DATASETS[config.data]
  config_lib.check_architecture(
    saved,
    config,
    info.num_classes,
    advice='leave out the architecture flags: --task=test reads them from the checkpoint',
  )
  devices = parallel_lib.select_devices(config)
  _, test_ds, _ = _load_dataset(config)
  model = create_model(config, info.num_classes)
  steps = functools.partial(eval_step, apply_fn=model.apply, k=config.k)
  parallel = parallel_lib.create_parallel(config, devices, None, steps)
  variables = parallel.put_state({'params': state['params'], 'batch_stats': state['batch_stats']})
  metrics = _finite_evaluation(
    parallel,
    variables,
    test_ds,
    config,
    lambda what: TrainingDivergedError(f'checkpoint step {step} in {config.load}: {what}'),
  )
  if jax.process_index() == 0:  # as training prints it
    print(_final_line(metrics, step), flush=True)
  return _result(metrics, config, step, checkpoint=config.load)
