"""Settings of one run, as data: :class:`Config`, the paper's recipes, and their checks.

The field names are the flags of the paper's TensorFlow ``train.py``, spelled the same way, plus a
few for JAX (parallelism, devices, multi-process, seed, step cap). A setting that is not given
takes its value from, in order:

1. ``RECIPES[(data, optimizer)]``: the paper's settings for that dataset and optimizer, and the
   settings tuned for the small default dataset ``digits``. Each is the dataset's recipe and
   learning rates (its entry in ``train/input_pipeline.py``'s ``DATASETS``) over the optimizer's
   own settings (``OPTIMIZER_RECIPES``);
2. ``MODEL_RECIPES[model]``: per-architecture exceptions, from the model's entry in
   ``train/models.py``'s ``MODELS`` (the paper's VGG command gives no ``--keep_prob``, so VGG runs
   without dropout);
3. the field's default in :class:`Config` (the TF defaults, except ``data``, ``optimizer``,
   ``model`` and ``grassmann``, whose defaults here give a run that finishes in a minute).

The datasets and models are registered once, in those two modules; the lists of names here (and
so the choices of ``--data`` and ``--model``) are theirs.

An explicit setting always wins. :func:`get_config` builds a checked :class:`Config` from keyword
arguments (the command line in ``train/flags.py`` calls it too); every value is checked before any
work starts, and a bad one raises :class:`ConfigError` naming the flag. The ranges include what
the program's arrays can hold: real settings are float32 on the device, the step counter and the
schedule's boundaries int32, the seed 32 bits.

A resumed run compares its settings with those stored in the checkpoint (:func:`check_resume`):
another network is refused (:func:`check_architecture`); a changed setting that shapes training
(a learning rate, a decay ...) must be named in ``--allow_changed``, and the batch size cannot
change at all; the settings
that only say how the run proceeds (how often it reports, where it writes, on which devices) may
change freely.

References:
  Cho & Lee, "Riemannian approach to batch normalization", NeurIPS 2017, arXiv:1709.09603.
"""

import dataclasses
import math
from typing import Any

import numpy as np

from train import input_pipeline, models

OPTIMIZERS = ('sgd', 'sgdg', 'adamg')
DATASETS = tuple(input_pipeline.DATASETS)
MODELS = tuple(models.MODELS)
PARALLEL = ('pmap', 'sharded', 'fsdp')
TASKS = ('train', 'test')


INT32_MAX = 2**31 - 1
SEED_MAX = 2**32 - 1  # jax.random.key keeps 32 bits of the seed
FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # the smallest normal float32


class ConfigError(ValueError):
  """A setting is out of range or inconsistent with another; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class Config:
  """All settings of one run; one field per flag of ``python -m train``.

  ``explicit`` names the settings that were given (the rest came from a recipe or a default).
  """

  # What to run.
  task: str = 'train'
  data: str = 'digits'
  optimizer: str = 'adamg'
  model: str = 'resnet'
  depth: int = 10
  widen_factor: int = 1
  width_scale: float = 1.0
  keep_prob: float | None = None
  # Optimizer.
  learnRate: float = 0.1
  learnRateG: float = 0.1
  learnRateDecay: float = 0.2
  decay_epochs: tuple[int, ...] = ()
  epochs: float = 200.0
  momentum: float = 0.9
  nesterov: bool = True
  grassmann: bool = False
  grad_clip: float | None = None
  adam_beta2: float = 0.99
  adam_eps: float = 1e-8
  omega: float | None = None
  weightDecay: float | None = None
  biasDecay: float | None = None
  gammaDecay: float | None = None
  betaDecay: float | None = None
  # Data.
  batch_size: int = 128
  vali_batch_size: int = 250
  crop_size: int = 32
  padding_size: int = 4
  data_dir: str | None = None
  download: bool = True
  seed: int = 0
  # Schedule of the run.
  max_steps: int | None = None
  report_freq: int = 10
  vali_freq: int = 1000
  save_freq: int = 10000
  k: int = 5
  # Where things go.
  train_dir: str = './logs/'
  train_path: str | None = None
  load: str | None = None
  allow_changed: tuple[str, ...] = ()
  max_to_keep: int = 1
  verbose: bool = True
  # Devices.
  parallel: str = 'pmap'
  num_devices: int | None = None
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  visible_devices: str | None = None
  log_device_placement: bool = False
  explicit: tuple[str, ...] = ()


FIELDS = tuple(field.name for field in dataclasses.fields(Config) if field.name != 'explicit')

# The optimizers' own settings in the paper's recipes; the dataset's entry adds the rest.
_SGD = {
  'grassmann': False,
  'weightDecay': 5e-4,
  'biasDecay': 5e-4,
  'gammaDecay': 5e-4,
  'betaDecay': 5e-4,
}
_GRASSMANN = {'grassmann': True, 'omega': 0.1, 'grad_clip': 0.1, 'weightDecay': 5e-4}
OPTIMIZER_RECIPES: dict[str, dict[str, Any]] = {
  'sgd': _SGD,
  'sgdg': _GRASSMANN,
  'adamg': _GRASSMANN,
}

RECIPES: dict[tuple[str, str], dict[str, Any]] = {
  (data, optimizer): {
    **info.recipe,
    **OPTIMIZER_RECIPES[optimizer],
    **info.learning_rates[optimizer],
  }
  for data, info in input_pipeline.DATASETS.items()
  for optimizer in OPTIMIZERS
}
MODEL_RECIPES: dict[str, dict[str, Any]] = {
  name: dict(entry.recipe) for name, entry in models.MODELS.items() if entry.recipe
}

# The image sizes of the augmented datasets, for the check of --crop_size.
_AUGMENTED_IMAGE_SIZE = {
  data: min(info.image_shape[:2]) for data, info in input_pipeline.DATASETS.items() if info.augment
}


def recipe(data: str, optimizer: str, model: str) -> dict[str, Any]:
  """The settings that the recipes give a run of ``data``, ``optimizer`` and ``model`` (1. and 2.
  of the module's order); the fields they leave out take :class:`Config`'s defaults."""
  return {**RECIPES[(data, optimizer)], **MODEL_RECIPES.get(model, {})}


def get_config(**overrides: Any) -> Config:
  """The checked :class:`Config` for settings ``overrides``, the rest from recipes/defaults.

  ``num_gpus`` is accepted as the TF program's name of ``num_devices``.

  Raises:
    ConfigError: for an unknown setting, a value out of range, or an inconsistent combination
      (e.g. ``grassmann=True`` with ``optimizer='sgd'``); the message names the flag.
  """
  if 'num_gpus' in overrides:
    overrides['num_devices'] = overrides.pop('num_gpus')
  unknown = sorted(set(overrides) - set(FIELDS))
  if unknown:
    raise ConfigError(f'unknown flag(s): {", ".join("--" + name for name in unknown)}')
  data = overrides.get('data', Config.data)
  optimizer = overrides.get('optimizer', Config.optimizer)
  model = overrides.get('model', Config.model)
  _check_choice('data', data, DATASETS)
  _check_choice('optimizer', optimizer, OPTIMIZERS)
  _check_choice('model', model, MODELS)
  values = {**recipe(data, optimizer, model), **overrides}
  values['decay_epochs'] = tuple(values.get('decay_epochs') or ())
  values['allow_changed'] = tuple(values.get('allow_changed') or ())
  config = Config(**values, explicit=tuple(sorted(overrides)))
  validate(config)
  return config


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ConfigError(f'--{name}={value!r}: choose one of {", ".join(choices)}')


def _check(condition: bool, name: str, value: Any, requirement: str) -> None:
  if not condition:
    raise ConfigError(f'--{name}={value} {requirement}')


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_float32(value: Any) -> bool:
  """A finite number that float32 holds as a finite number too."""
  return _is_number(value) and abs(value) <= FLOAT32_MAX


def _float32(value: float) -> float:
  """``value`` as the device sees it: rounded to float32."""
  return float(np.float32(value))


def validate(config: Config) -> None:
  """Raises :class:`ConfigError` for the first setting out of range, naming its flag."""
  _check_choices(config)
  _check_integers(config)
  _check_numbers(config)
  _check_paths(config)
  _check_widths(config)
  _check_decay_epochs(config)
  _check_rates(config)
  _check_allow_changed(config)
  _check_process(config)
  _check_augmentation(config)
  _check_combinations(config)


def _check_choices(config: Config) -> None:
  """The named choices, and the architecture flags that the model takes."""
  for name, choices in (('task', TASKS), ('parallel', PARALLEL)):
    _check_choice(name, getattr(config, name), choices)
  if config.model != 'resnet':
    for name in unused_fields(config.model):
      _check(
        name not in config.explicit,
        name,
        getattr(config, name),
        f'applies to the wide ResNet only; --model={config.model} takes --width_scale',
      )


def _check_integers(config: Config) -> None:
  """Counts and sizes: integers in their ranges, and a wide ResNet's depth of 6N+4."""
  at_least = {
    'batch_size': 1,
    'vali_batch_size': 1,
    'report_freq': 1,
    'vali_freq': 1,
    'save_freq': 1,
    'max_to_keep': 1,
    'k': 1,
    'crop_size': 1,
    'padding_size': 0,
    'widen_factor': 1,
    'depth': 10,
  }
  for name, low in at_least.items():
    value = getattr(config, name)
    _check(
      _is_int(value) and low <= value <= INT32_MAX,
      name,
      value,
      f'must be an integer in [{low}, {INT32_MAX}]',
    )
  _check(
    _is_int(config.seed) and 0 <= config.seed <= SEED_MAX,
    'seed',
    config.seed,
    f'must be an integer in [0, {SEED_MAX}] (JAX keeps 32 bits of a seed)',
  )
  for name in ('max_steps', 'num_devices', 'num_processes'):
    value = getattr(config, name)
    _check(
      value is None or (_is_int(value) and 1 <= value <= INT32_MAX),
      name,
      value,
      f'must be an integer in [1, {INT32_MAX}], or None',
    )
  if config.model == 'resnet':
    _check((config.depth - 4) % 6 == 0, 'depth', config.depth, 'must be 6N+4 (10, 16, 22, 28, ...)')


def _check_numbers(config: Config) -> None:
  """Rates, decays and probabilities: finite numbers in range, also as float32 rounds them."""
  _check(
    _is_float32(config.epochs) and config.epochs > 0,
    'epochs',
    config.epochs,
    f'must be a number in (0, {FLOAT32_MAX:.4g}]',
  )
  for name in ('learnRate', 'learnRateG', 'learnRateDecay'):
    value = getattr(config, name)
    _check(
      _is_float32(value) and value >= 0,
      name,
      value,
      f'must be a number in [0, {FLOAT32_MAX:.4g}] (float32)',
    )
  # Adam's ε divides: the library takes the float32 normal numbers (a smaller one is lost to
  # rounding next to the second moment's root, or flushed to zero).
  _check(
    _is_float32(config.adam_eps) and config.adam_eps >= FLOAT32_TINY,
    'adam_eps',
    config.adam_eps,
    f'must be a number in [{FLOAT32_TINY:.4g}, {FLOAT32_MAX:.4g}] (float32 normal numbers)',
  )
  for name in ('omega', 'weightDecay', 'biasDecay', 'gammaDecay', 'betaDecay'):
    value = getattr(config, name)
    _check(
      value is None or (_is_float32(value) and value >= 0),
      name,
      value,
      f'must be a number in [0, {FLOAT32_MAX:.4g}] (float32), or None',
    )
  for name in ('momentum', 'adam_beta2'):
    value = getattr(config, name)
    _check(
      _is_number(value) and 0 <= value and _float32(value) < 1,
      name,
      value,
      'must be in [0, 1), also in float32 (1 - 1e-8 rounds to 1)',
    )
  _check(
    config.keep_prob is None
    or (_is_number(config.keep_prob) and _float32(config.keep_prob) > 0 and config.keep_prob <= 1),
    'keep_prob',
    config.keep_prob,
    'must be in (0, 1], also in float32, or None for no dropout layer',
  )
  _check(
    config.grad_clip is None or (_is_float32(config.grad_clip) and _float32(config.grad_clip) > 0),
    'grad_clip',
    config.grad_clip,
    f'must be in (0, {FLOAT32_MAX:.4g}], also in float32, or None for no clipping',
  )


def _check_paths(config: Config) -> None:
  for name in ('train_dir', 'train_path', 'load', 'data_dir'):
    value = getattr(config, name, None)
    _check(
      value is None or value.strip() != '',
      name,
      repr(value),
      'is empty: give a directory, or leave the flag out',
    )


def _check_widths(config: Config) -> None:
  """Width flags: each for its model, the widest layer within int32."""
  _check(
    _is_number(config.width_scale) and config.width_scale > 0,
    'width_scale',
    config.width_scale,
    'must be > 0',
  )
  _check(
    512 * config.width_scale <= INT32_MAX,
    'width_scale',
    config.width_scale,
    f'must be at most {INT32_MAX // 512} (the widest VGG layer, 512 x width_scale channels, must '
    'fit int32)',
  )
  _check(
    config.width_scale == 1 or config.model != 'resnet',
    'width_scale',
    config.width_scale,
    'applies to VGG only; a wide ResNet takes --widen_factor',
  )
  _check(
    16 * 4 * config.widen_factor <= INT32_MAX,
    'widen_factor',
    config.widen_factor,
    f'must be at most {INT32_MAX // 64} (the widest layer, 64 x widen_factor channels, must fit '
    'int32)',
  )


def _check_decay_epochs(config: Config) -> None:
  for epoch in config.decay_epochs:
    _check(
      _is_int(epoch) and 0 <= epoch <= INT32_MAX,
      'decay_epochs',
      epoch,
      f'must be integers in [0, {INT32_MAX}]',
    )


def _check_allow_changed(config: Config) -> None:
  if 'batch_size' in config.allow_changed:
    raise ConfigError(
      '--allow_changed=batch_size: a resumed run keeps its batch size (its step counter, the '
      'schedule of --epochs and --decay_epochs and its position in the data are counted in '
      'batches); to train with another, start from step 0 in a new run directory'
    )
  unknown = sorted(set(config.allow_changed) - set(TRAINING_FIELDS))
  if unknown:
    raise ConfigError(
      f'--allow_changed={",".join(config.allow_changed)}: {", ".join(unknown)} is not a setting '
      f'that a resumed run compares; choose among {", ".join(TRAINING_FIELDS)}'
    )


def _check_process(config: Config) -> None:
  _check(
    config.process_id is None
    or (_is_int(config.process_id) and 0 <= config.process_id <= INT32_MAX),
    'process_id',
    config.process_id,
    f'must be an integer in [0, {INT32_MAX}], or None',
  )
  if config.process_id is not None and config.num_processes is not None:
    _check(
      config.process_id < config.num_processes,
      'process_id',
      config.process_id,
      f'must be below --num_processes={config.num_processes}',
    )


def _check_augmentation(config: Config) -> None:
  """Padding and crop fit the dataset's images."""
  image_size = _AUGMENTED_IMAGE_SIZE.get(config.data)
  if image_size is not None:
    _check(
      config.padding_size < image_size,
      'padding_size',
      config.padding_size,
      f'must be below the image size {image_size} (reflection padding mirrors the image)',
    )
    _check(
      config.crop_size <= image_size + 2 * config.padding_size,
      'crop_size',
      config.crop_size,
      f'exceeds the padded image ({image_size} + 2 * --padding_size={config.padding_size})',
    )


def _check_combinations(config: Config) -> None:
  if config.optimizer == 'sgd' and config.grassmann:
    raise ConfigError(
      '--grassmann=True needs a Riemannian optimizer: use --optimizer=sgdg or --optimizer=adamg'
    )
  if config.task == 'test' and not config.load:
    raise ConfigError(
      '--task=test needs --load=<checkpoint>: a step directory, a checkpoints directory or a run '
      'directory'
    )


# Architecture fields: a checkpoint restores only into a run that agrees on all of them.
ARCHITECTURE_FIELDS = (
  'data',
  'model',
  'depth',
  'widen_factor',
  'width_scale',
  'optimizer',
  'grassmann',
)


def unused_fields(model: str) -> tuple[str, ...]:
  """The architecture fields that ``model`` does not take: a wide ResNet's width is
  ``widen_factor``, a VGG's depth is its variant and its width ``width_scale``."""
  return ('width_scale',) if model == 'resnet' else ('depth', 'widen_factor')


def architecture(config: Config) -> dict[str, Any]:
  """The fields a checkpoint must agree on: resnet depth and width, or the VGG width scale."""
  unused = unused_fields(config.model)
  return {name: getattr(config, name) for name in ARCHITECTURE_FIELDS if name not in unused}


def describe_architecture(fields: dict[str, Any]) -> str:
  """E.g. ``resnet depth=16 width=4 data=digits optimizer=adamg grassmann=True``."""
  parts = [str(fields.get('model'))]
  if fields.get('model') == 'resnet':
    parts += [f'depth={fields.get("depth")}', f'width={fields.get("widen_factor")}']
  else:
    parts += [f'width_scale={fields.get("width_scale", 1.0)}']
  parts += [f'{name}={fields.get(name)}' for name in ('data', 'optimizer', 'grassmann')]
  return ' '.join(parts)


def run_name(config: Config) -> str:
  """Directory name of a run under ``--train_dir``: dataset, architecture and optimizer."""
  if config.model == 'resnet':
    arch = f'wrn-{config.depth}-{config.widen_factor}'
  else:
    arch = config.model + (f'-x{config.width_scale:g}' if config.width_scale != 1 else '')
  euclidean = config.optimizer != 'sgd' and not config.grassmann
  return f'{config.data}_{arch}_{config.optimizer}' + ('-euclidean' if euclidean else '')


# Settings that say how a run proceeds, not what it trains: a resumed run may change them freely.
OPERATIONAL_FIELDS = (
  'task',
  'vali_batch_size',
  'data_dir',
  'download',
  'max_steps',
  'report_freq',
  'vali_freq',
  'save_freq',
  'k',
  'train_dir',
  'train_path',
  'load',
  'allow_changed',
  'max_to_keep',
  'verbose',
  'parallel',
  'num_devices',
  'coordinator_address',
  'num_processes',
  'process_id',
  'visible_devices',
  'log_device_placement',
)
# Settings that shape training: a resumed run that changes one must name it in --allow_changed.
TRAINING_FIELDS = tuple(
  name for name in FIELDS if name not in (*ARCHITECTURE_FIELDS, *OPERATIONAL_FIELDS)
)


def to_json(config: Config, num_classes: int) -> dict[str, Any]:
  """The settings stored with each checkpoint and summary: every field, and the class count."""
  fields = dataclasses.asdict(config)
  fields.pop('explicit')
  return {
    **fields,
    'decay_epochs': list(config.decay_epochs),
    'allow_changed': list(config.allow_changed),
    'num_classes': num_classes,
  }


def check_schedule(config: Config, num_train: int) -> None:
  """Raises ConfigError unless the run is at least one step and its steps fit int32.

  The step counter and the schedule's decay boundaries are int32 on the device; the number of
  steps is ``epochs * num_train / batch_size``.
  """
  steps = config.epochs * num_train / config.batch_size
  _check(
    steps >= 1,
    'epochs',
    config.epochs,
    f'of {num_train} {config.data} images at --batch_size={config.batch_size} is less than one '
    'step',
  )
  _check(
    steps <= INT32_MAX,
    'epochs',
    config.epochs,
    f'is {steps:.4g} steps of {num_train} {config.data} images at --batch_size='
    f'{config.batch_size}; the step counter holds at most {INT32_MAX}',
  )
  for epoch in config.decay_epochs:
    _check(
      epoch * num_train / config.batch_size <= INT32_MAX,
      'decay_epochs',
      epoch,
      f'is step {epoch * num_train / config.batch_size:.4g}; the step counter holds at most '
      f'{INT32_MAX}',
    )
  _check(
    config.batch_size <= num_train,
    'batch_size',
    config.batch_size,
    f'exceeds the {num_train} training images of {config.data}',
  )


def _check_rates(config: Config) -> None:
  """Each learning rate stays finite in float32 through every decay of the schedule."""
  for name in ('learnRate', 'learnRateG'):
    rate = getattr(config, name)
    for count in range(1, len(config.decay_epochs) + 1):
      rate *= config.learnRateDecay
      _check(
        _is_float32(rate),
        'learnRateDecay',
        config.learnRateDecay,
        f'takes --{name}={getattr(config, name)} beyond float32 after {count} decay(s)',
      )


def check_architecture(
  saved: dict[str, Any],
  config: Config,
  num_classes: int,
  advice: str = "give the checkpoint's values, or start a new run with --train_path",
) -> None:
  """Raises ConfigError naming each difference if ``saved`` settings describe another network.

  ``advice`` ends the message: what to do instead.
  """
  expected = {**architecture(config), 'num_classes': num_classes}
  found = {name: saved.get(name, 1.0 if name == 'width_scale' else None) for name in expected}
  if found != expected:
    # A field that the checkpoint's model does not take holds a flag's default there, no width.
    ignored = unused_fields(found['model']) if found['model'] != expected['model'] else ()
    names = [name for name in expected if found[name] != expected[name] and name not in ignored]
    if names != ['num_classes']:  # it follows from --data, named then; it is no flag
      names = [name for name in names if name != 'num_classes']
    differ = ', '.join(f'--{name}={found[name]} -> {expected[name]}' for name in names)
    raise ConfigError(
      f'checkpoint was written for {describe_architecture(saved)} with '
      f'{saved.get("num_classes")} classes; this run is {describe_architecture(expected)} with '
      f'{num_classes} classes ({differ}); its state does not fit this network: {advice}'
    )


def check_resume(saved: dict[str, Any], config: Config) -> list[str]:
  """The changed training settings (``name: old -> new``) if ``--allow_changed`` names them all.

  The batch size never changes: the step counter, the schedule and the position in the data are
  counted in batches.

  Raises:
    ConfigError: a changed training setting is not named in ``--allow_changed``, or the batch
      size changed; the message lists each with its old and new value.
  """
  now = to_json(config, 0)
  if 'batch_size' in saved and saved['batch_size'] != now['batch_size']:
    raise ConfigError(
      f'the checkpoint was trained with --batch_size={saved["batch_size"]}, this run has '
      f'--batch_size={now["batch_size"]}: its step counter, the schedule of --epochs and '
      '--decay_epochs and its position in the data are counted in batches of '
      f'{saved["batch_size"]}, so the batch size cannot change (not even with --allow_changed); '
      f'continue with --batch_size={saved["batch_size"]}, or train with the new batch size from '
      'step 0 in a new run directory (--train_path, without --load)'
    )
  changed = [name for name in TRAINING_FIELDS if name in saved and saved[name] != now[name]]
  refused = [name for name in changed if name not in config.allow_changed]
  if refused:
    listed = '; '.join(f'--{name}={saved[name]} -> {now[name]}' for name in refused)
    raise ConfigError(
      f'the checkpoint was trained with other settings than this run ({listed}); to continue it '
      f'with the new values add --allow_changed={",".join(changed)}, or give the old values, or '
      'start a new run with --train_path'
    )
  return [f'{name}: {saved[name]} -> {now[name]}' for name in changed]
