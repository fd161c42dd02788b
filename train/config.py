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
work starts, and a bad one raises :class:`ConfigError` naming the flag.

References:
  Cho & Lee, "Riemannian approach to batch normalization", NeurIPS 2017, arXiv:1709.09603.
"""

import dataclasses
import math
from typing import Any

from train import input_pipeline, models

OPTIMIZERS = ('sgd', 'sgdg', 'adamg')
DATASETS = tuple(input_pipeline.DATASETS)
MODELS = tuple(models.MODELS)
PARALLEL = ('pmap', 'sharded')
TASKS = ('train', 'test')


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
  values = {**RECIPES[(data, optimizer)], **MODEL_RECIPES.get(model, {}), **overrides}
  values['decay_epochs'] = tuple(values.get('decay_epochs') or ())
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


def validate(config: Config) -> None:
  """Raises :class:`ConfigError` for the first setting out of range, naming its flag."""
  for name, choices in (('task', TASKS), ('parallel', PARALLEL)):
    _check_choice(name, getattr(config, name), choices)
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
    'seed': 0,
  }
  for name, low in at_least.items():
    value = getattr(config, name)
    _check(_is_int(value) and value >= low, name, value, f'must be an integer >= {low}')
  for name in ('max_steps', 'num_devices', 'num_processes'):
    value = getattr(config, name)
    _check(value is None or (_is_int(value) and value >= 1), name, value, 'must be >= 1 or None')
  _check((config.depth - 4) % 6 == 0, 'depth', config.depth, 'must be 6N+4 (10, 16, 22, 28, ...)')
  _check(_is_number(config.epochs) and config.epochs > 0, 'epochs', config.epochs, 'must be > 0')
  for name in ('learnRate', 'learnRateG', 'learnRateDecay', 'adam_eps'):
    value = getattr(config, name)
    _check(_is_number(value) and value >= 0, name, value, 'must be a finite number >= 0')
  for name in ('omega', 'weightDecay', 'biasDecay', 'gammaDecay', 'betaDecay'):
    value = getattr(config, name)
    _check(value is None or (_is_number(value) and value >= 0), name, value, 'must be >= 0 or None')
  for name in ('momentum', 'adam_beta2'):
    value = getattr(config, name)
    _check(_is_number(value) and 0 <= value < 1, name, value, 'must be in [0, 1)')
  _check(
    config.keep_prob is None or (_is_number(config.keep_prob) and 0 < config.keep_prob <= 1),
    'keep_prob',
    config.keep_prob,
    'must be in (0, 1], or None for no dropout layer',
  )
  _check(
    config.grad_clip is None or (_is_number(config.grad_clip) and config.grad_clip > 0),
    'grad_clip',
    config.grad_clip,
    'must be > 0, or None for no clipping',
  )
  _check(
    _is_number(config.width_scale) and config.width_scale > 0,
    'width_scale',
    config.width_scale,
    'must be > 0',
  )
  _check(
    config.width_scale == 1 or config.model != 'resnet',
    'width_scale',
    config.width_scale,
    'applies to VGG only; a wide ResNet takes --widen_factor',
  )
  for epoch in config.decay_epochs:
    _check(_is_number(epoch) and epoch >= 0, 'decay_epochs', epoch, 'must be >= 0')
  _check(
    config.process_id is None or (_is_int(config.process_id) and config.process_id >= 0),
    'process_id',
    config.process_id,
    'must be >= 0 or None',
  )
  if config.process_id is not None and config.num_processes is not None:
    _check(
      config.process_id < config.num_processes,
      'process_id',
      config.process_id,
      f'must be below --num_processes={config.num_processes}',
    )
  image_size = _AUGMENTED_IMAGE_SIZE.get(config.data)
  if image_size is not None:
    _check(
      config.crop_size <= image_size + 2 * config.padding_size,
      'crop_size',
      config.crop_size,
      f'exceeds the padded image ({image_size} + 2 * --padding_size={config.padding_size})',
    )
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


def architecture(config: Config) -> dict[str, Any]:
  """The fields a checkpoint must agree on: resnet depth and width, or the VGG width scale."""
  fields = {name: getattr(config, name) for name in ARCHITECTURE_FIELDS}
  if config.model == 'resnet':
    fields.pop('width_scale')
  else:
    fields.pop('depth')
    fields.pop('widen_factor')
  return fields


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


# Settings that a resumed run normally keeps; a change is reported, not refused.
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


def to_json(config: Config, num_classes: int) -> dict[str, Any]:
  """The settings stored with each checkpoint and summary: every field, and the class count."""
  fields = dataclasses.asdict(config)
  fields.pop('explicit')
  return {**fields, 'decay_epochs': list(config.decay_epochs), 'num_classes': num_classes}


def check_architecture(saved: dict[str, Any], config: Config, num_classes: int) -> None:
  """Raises ConfigError naming the difference if ``saved`` settings describe another network."""
  expected = {**architecture(config), 'num_classes': num_classes}
  found = {name: saved.get(name, 1.0 if name == 'width_scale' else None) for name in expected}
  if found != expected:
    raise ConfigError(
      f'checkpoint was written for {describe_architecture(saved)} with '
      f'{saved.get("num_classes")} classes; this run is {describe_architecture(expected)} with '
      f'{num_classes} classes'
    )


def changed_settings(saved: dict[str, Any], config: Config) -> list[str]:
  """``name: old -> new`` for each of ``RESUME_FIELDS`` that differs from the ``saved`` one."""
  now = to_json(config, 0)
  return [
    f'{name}: {saved[name]} -> {now[name]}'
    for name in RESUME_FIELDS
    if name in saved and saved[name] != now[name]
  ]
