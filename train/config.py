"""Command line and recipes of the training program, as data.

The flags are those of the paper's TensorFlow ``train.py`` (SPEC §8.1), spelled the same way, so
that every command of its README runs unchanged, plus a few for JAX (parallelism, devices,
multi-host, seed, step cap). A flag that is not given takes its value from, in order:

1. ``RECIPES[(data, optimizer)]``: the paper's settings for that dataset and optimizer
   (SPEC §7.2), and the settings tuned for the small default dataset ``digits``;
2. ``MODEL_RECIPES[model]``: per-architecture exceptions (the README's VGG command gives no
   ``--keep_prob``, so VGG runs without dropout);
3. the flag's own default in ``FLAGS`` (the TF defaults, except ``data``, ``optimizer``,
   ``model`` and ``grassmann``, whose defaults here give a run that finishes in minutes).

An explicit flag always wins. :func:`parse_flags` turns a command line into a :class:`Config`;
:func:`get_config` builds one from keyword arguments (notebooks, tests).

References:
  Cho & Lee, "Riemannian approach to batch normalization", NeurIPS 2017, arXiv:1709.09603.
"""

import argparse
import dataclasses
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

from train import models

OPTIMIZERS = ('sgd', 'sgdg', 'adamg')
MODELS = models.MODEL_NAMES
PARALLEL = ('pmap', 'sharded')
TASKS = ('train', 'test')

# Architecture fields: a checkpoint restores only into a run that agrees on all of them.
ARCHITECTURE_FIELDS = ('data', 'model', 'depth', 'widen_factor', 'optimizer', 'grassmann')


def _boolean(text: str) -> bool:
  value = text.strip().lower()
  if value in ('true', '1', 'yes'):
    return True
  if value in ('false', '0', 'no'):
    return False
  raise argparse.ArgumentTypeError(f'expected True/False/true/false/1/0, got {text!r}')


def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
  def parse_or_none(text: str):
    return None if text.strip().lower() in ('none', '') else parse(text)

  parse_or_none.__name__ = parse.__name__
  return parse_or_none


def _int_list(text: str) -> tuple[int, ...]:
  return tuple(int(part) for part in text.replace('[', '').replace(']', '').split(',') if part)


@dataclasses.dataclass(frozen=True)
class Flag:
  """One command-line flag: name (as in the TF program), parser, default and help text."""

  name: str
  parse: Callable[[str], Any]
  default: Any
  help: str
  choices: tuple[str, ...] | None = None


_float = _optional(float)
_int = _optional(int)
_str = _optional(str)

FLAGS: tuple[Flag, ...] = (
  # What to run.
  Flag('task', str, 'train', 'train, or test (evaluate the checkpoint given by --load)', TASKS),
  Flag('data', str, 'digits', 'dataset: digits, cifar10, cifar100 or svhn'),
  Flag('optimizer', str, 'adamg', 'sgd (Nesterov SGD baseline), sgdg (SGD-G) or adamg (Adam-G)'),
  Flag('model', str, 'resnet', 'resnet (wide ResNet), vgg11, vgg13, vgg16 or vgg19'),
  Flag('depth', int, 10, 'resnet depth, 6N+4'),
  Flag('widen_factor', int, 1, 'resnet width multiplier k'),
  Flag('keep_prob', _float, None, 'dropout keep probability; None: no dropout layer'),
  # Optimizer (SPEC §3, §4, §6).
  Flag('learnRate', float, 0.1, 'initial learning rate of the Euclidean parameters'),
  Flag('learnRateG', float, 0.1, 'initial learning rate of the parameters on G(1,n)'),
  Flag('learnRateDecay', float, 0.2, 'factor applied to both learning rates at --decay_epochs'),
  Flag('decay_epochs', _int_list, None, 'epochs after which the learning rates decay, e.g. 60,120'),
  Flag('epochs', float, None, 'training length in epochs (the recipe: 200 for CIFAR)'),
  Flag('momentum', float, 0.9, 'momentum of the Euclidean parameters; also beta1 of Adam-G'),
  Flag('nesterov', _boolean, True, 'Nesterov momentum for the Euclidean parameters'),
  Flag('grassmann', _boolean, None, 'put undercomplete conv kernels on G(1,n) (sgdg/adamg: True)'),
  Flag('grad_clip', _float, None, 'per-column norm clipping threshold nu of the manifold gradient'),
  Flag('adam_beta2', float, 0.99, 'beta2 of Adam-G (honoured here; the TF program ignored it)'),
  Flag('adam_eps', float, 1e-8, 'epsilon of Adam-G, inside the square root'),
  Flag('omega', _float, None, 'orthogonality strength omega; None: no orthogonality term'),
  Flag('weightDecay', _float, None, 'L2 on non-manifold weights (kernels)'),
  Flag('biasDecay', _float, None, 'L2 on biases'),
  Flag('gammaDecay', _float, None, 'L2 on BatchNorm gamma'),
  Flag('betaDecay', _float, None, 'L2 on BatchNorm beta'),
  # Data.
  Flag('batch_size', int, 128, 'training batch, in total over all devices'),
  Flag('vali_batch_size', int, 250, 'test batch (padded up to a multiple of the device count)'),
  Flag('crop_size', int, 32, 'random crop size of the CIFAR augmentation'),
  Flag('padding_size', int, 4, 'reflection padding per side of the CIFAR augmentation'),
  Flag('data_dir', _str, None, 'tensorflow_datasets data directory; None: the tfds default'),
  Flag('download', _boolean, True, 'let tensorflow_datasets download a missing dataset'),
  Flag('seed', int, 0, 'seed of initialisation, data order and dropout'),
  # Schedule of the run.
  Flag('max_steps', _int, None, 'stop after this many steps (the schedule still follows --epochs)'),
  Flag('report_freq', int, 10, 'log training metrics every N steps'),
  Flag('vali_freq', int, 1000, 'evaluate on the test set every N steps (and at the end)'),
  Flag('save_freq', int, 10000, 'checkpoint every N steps (and at the end)'),
  Flag('k', int, 5, 'k of the top-k error'),
  # Where things go.
  Flag(
    'train_dir',
    str,
    './logs/',
    'log root: the run goes to <train_dir>/<data>_<arch>_<optimizer> and resumes from the '
    'checkpoint there, if any (other hyper-parameters are not in the name: use --train_path)',
  ),
  Flag('train_path', _str, None, 'run directory, used as is (overrides --train_dir)'),
  Flag('load', _str, None, 'checkpoint to start from / to test (step dir, checkpoints or run dir)'),
  Flag('max_to_keep', int, 1, 'checkpoints kept'),
  Flag('verbose', _boolean, True, 'show a progress bar'),
  # Devices.
  Flag(
    'parallel',
    str,
    'pmap',
    'pmap (replicated state, BN synced by axis name) or sharded (jit)',
    PARALLEL,
  ),
  Flag('num_devices', _int, None, 'local devices to use; default all (alias: --num_gpus)'),
  Flag('coordinator_address', _str, None, 'multi-host: address of process 0, host:port'),
  Flag('num_processes', _int, None, 'multi-host: number of processes'),
  Flag('process_id', _int, None, 'multi-host: index of this process'),
  Flag(
    'visible_devices',
    _str,
    None,
    'accepted for compatibility and ignored: set CUDA_VISIBLE_DEVICES instead',
  ),
  Flag('log_device_placement', _boolean, False, 'accepted for compatibility and ignored'),
)
FLAG_NAMES = tuple(flag.name for flag in FLAGS)
ALIASES = {'num_gpus': 'num_devices'}

# The paper's recipes (SPEC §7.2). Shared parts first, then one row per (data, optimizer).
_CIFAR = {'epochs': 200, 'decay_epochs': (60, 120, 160), 'learnRateDecay': 0.2, 'keep_prob': 0.7}
_SVHN = {'epochs': 160, 'decay_epochs': (60, 120), 'learnRateDecay': 0.1, 'keep_prob': 0.6}
_DIGITS = {
  'epochs': 20,
  'decay_epochs': (10, 16),
  'learnRateDecay': 0.2,
  'keep_prob': None,
  'batch_size': 64,
  'vali_batch_size': 400,
  'vali_freq': 200,
  'depth': 10,
  'widen_factor': 4,
}
_SGD = {
  'grassmann': False,
  'weightDecay': 5e-4,
  'biasDecay': 5e-4,
  'gammaDecay': 5e-4,
  'betaDecay': 5e-4,
}
_GRASSMANN = {'grassmann': True, 'omega': 0.1, 'grad_clip': 0.1, 'weightDecay': 5e-4}

RECIPES: dict[tuple[str, str], dict[str, Any]] = {
  ('cifar10', 'sgd'): {**_CIFAR, **_SGD, 'learnRate': 0.1},
  ('cifar10', 'sgdg'): {**_CIFAR, **_GRASSMANN, 'learnRate': 0.01, 'learnRateG': 0.2},
  ('cifar10', 'adamg'): {**_CIFAR, **_GRASSMANN, 'learnRate': 0.01, 'learnRateG': 0.05},
  ('cifar100', 'sgd'): {**_CIFAR, **_SGD, 'learnRate': 0.1},
  ('cifar100', 'sgdg'): {**_CIFAR, **_GRASSMANN, 'learnRate': 0.01, 'learnRateG': 0.2},
  ('cifar100', 'adamg'): {**_CIFAR, **_GRASSMANN, 'learnRate': 0.01, 'learnRateG': 0.05},
  ('svhn', 'sgd'): {**_SVHN, **_SGD, 'learnRate': 0.01},
  ('svhn', 'sgdg'): {**_SVHN, **_GRASSMANN, 'learnRate': 0.001, 'learnRateG': 0.02},
  ('svhn', 'adamg'): {**_SVHN, **_GRASSMANN, 'learnRate': 0.001, 'learnRateG': 0.005},
  ('digits', 'sgd'): {**_DIGITS, **_SGD, 'learnRate': 0.1},
  ('digits', 'sgdg'): {**_DIGITS, **_GRASSMANN, 'learnRate': 0.05, 'learnRateG': 0.2},
  ('digits', 'adamg'): {**_DIGITS, **_GRASSMANN, 'learnRate': 0.05, 'learnRateG': 0.05},
}
DATASETS = tuple(dict.fromkeys(data for data, _ in RECIPES))

# The README's VGG command passes no --keep_prob: no dropout layer (SPEC §7.2).
MODEL_RECIPES: dict[str, dict[str, Any]] = {
  name: {'keep_prob': None} for name in MODELS if name.startswith('vgg')
}

Config = dataclasses.make_dataclass(
  'Config',
  [(flag.name, Any, dataclasses.field(default=flag.default)) for flag in FLAGS]
  + [('explicit', tuple, dataclasses.field(default=()))],
  frozen=True,
)
Config.__doc__ = """All settings of one run: one field per flag of ``FLAGS``.

``explicit`` names the flags that were given (the rest came from a recipe or a default).
"""


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ValueError(f'unknown {name} {value!r}; choose one of {", ".join(choices)}')


def get_config(**overrides: Any) -> Config:
  """The :class:`Config` for explicit settings ``overrides``, the rest from recipes/defaults.

  Raises:
    ValueError: for an unknown flag, dataset, optimizer, model, task or parallel mode, or an
      inconsistent combination (``--grassmann=True`` with ``--optimizer=sgd``).
  """
  overrides = {ALIASES.get(name, name): value for name, value in overrides.items()}
  unknown = sorted(set(overrides) - set(FLAG_NAMES))
  if unknown:
    raise ValueError(f'unknown flag(s): {", ".join(unknown)}')
  defaults = {flag.name: flag.default for flag in FLAGS}
  data = overrides.get('data', defaults['data'])
  optimizer = overrides.get('optimizer', defaults['optimizer'])
  model = overrides.get('model', defaults['model'])
  _check_choice('dataset', data, DATASETS)
  _check_choice('optimizer', optimizer, OPTIMIZERS)
  _check_choice('model', model, MODELS)
  values = {**defaults, **RECIPES[(data, optimizer)], **MODEL_RECIPES.get(model, {}), **overrides}
  for flag in FLAGS:
    if flag.choices is not None:
      _check_choice(flag.name, values[flag.name], flag.choices)
  if optimizer == 'sgd' and values['grassmann']:
    raise ValueError(
      '--grassmann=True needs a Riemannian optimizer: use --optimizer=sgdg or --optimizer=adamg'
    )
  values['grassmann'] = bool(values['grassmann'])
  values['decay_epochs'] = tuple(values['decay_epochs'] or ())
  return Config(**values, explicit=tuple(sorted(overrides)))


def _help_text(flag: Flag) -> str:
  in_recipe = any(flag.name in row for row in RECIPES.values())
  return f'{flag.help} (default: {flag.default}' + (", or the recipe's)" if in_recipe else ')')


def _recipes_text() -> str:
  lines = [
    'recipes (--data/--optimizer: values of the flags not given; MODEL_RECIPES: vgg* has '
    'no dropout):'
  ]
  for (data, optimizer), row in RECIPES.items():
    values = ' '.join(f'{name}={value}' for name, value in row.items())
    lines.append(
      textwrap.fill(
        values, 96, initial_indent=f'  {data}/{optimizer}: ', subsequent_indent='      '
      )
    )
  return '\n'.join(lines)


def make_parser() -> argparse.ArgumentParser:
  """The argparse parser of ``python -m train``; a flag not given is absent from the result."""
  parser = argparse.ArgumentParser(
    prog='python -m train',
    description=(
      'Train or test a wide ResNet / VGG with SGD-G or Adam-G (Cho & Lee, NeurIPS 2017, '
      'arXiv:1709.09603). Flags not given take the recipe of --data/--optimizer, then the '
      'defaults below.'
    ),
    epilog=_recipes_text(),
    formatter_class=argparse.RawDescriptionHelpFormatter,
    allow_abbrev=False,
  )
  for flag in FLAGS:
    names = [f'--{flag.name}'] + [f'--{alias}' for alias, to in ALIASES.items() if to == flag.name]
    parser.add_argument(
      *names,
      dest=flag.name,
      type=flag.parse,
      default=argparse.SUPPRESS,
      choices=flag.choices,
      metavar=flag.name.upper(),
      help=_help_text(flag),
    )
  return parser


def parse_flags(argv: Sequence[str] | None = None) -> Config:
  """Parses a command line (without the program name) into a :class:`Config`.

  Raises:
    SystemExit: code 2 with a usage message for a malformed flag (argparse).
    ValueError: see :func:`get_config`.
  """
  return get_config(**vars(make_parser().parse_args(argv)))


def architecture(config: Config) -> dict[str, Any]:
  """The fields a checkpoint must agree on; resnet depth/width only matter for resnet."""
  fields = {name: getattr(config, name) for name in ARCHITECTURE_FIELDS}
  if config.model != 'resnet':
    fields.pop('depth')
    fields.pop('widen_factor')
  return fields


def describe_architecture(fields: dict[str, Any]) -> str:
  """E.g. ``resnet depth=16 width=4 data=digits optimizer=adamg grassmann=True``."""
  parts = [str(fields.get('model'))]
  if fields.get('model') == 'resnet':
    parts += [f'depth={fields.get("depth")}', f'width={fields.get("widen_factor")}']
  parts += [f'{name}={fields.get(name)}' for name in ('data', 'optimizer', 'grassmann')]
  return ' '.join(parts)


def run_name(config: Config) -> str:
  """Directory name of a run under ``--train_dir``: dataset, architecture and optimizer."""
  arch = f'wrn-{config.depth}-{config.widen_factor}' if config.model == 'resnet' else config.model
  euclidean = config.optimizer != 'sgd' and not config.grassmann
  optimizer = config.optimizer + ('-euclidean' if euclidean else '')
  return f'{config.data}_{arch}_{optimizer}'
