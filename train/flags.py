"""The command line of ``python -m train``: absl flags with the TF program's spellings.

The paper's TensorFlow program read its settings through ``tf.app.flags``, which is absl.flags;
the flags here are defined the same way and spelled the same (``--learnRate``,
``--grassmann=True``, ``--num_gpus`` ...), so each command of the paper's README runs unchanged.
A flag's default is that of :class:`train.config.Config`; a flag that is not given takes the
recipe of ``--data``/``--optimizer`` instead, where the recipe has one (:func:`parse`).

References:
  Cho & Lee, "Riemannian approach to batch normalization", NeurIPS 2017, arXiv:1709.09603.
"""

import textwrap
from collections.abc import Sequence

from absl import flags

from train import config as config_lib

FLAGS = flags.FLAGS
HELP_FLAGS = ('--help', '-h', '--helpshort', '--helpfull')
_DEFAULT = config_lib.Config()
_DEFAULT_RECIPE = config_lib.recipe(_DEFAULT.data, _DEFAULT.optimizer, _DEFAULT.model)


class _NumberOrNone(flags.ArgumentParser):
  """An absl number parser that also reads ``None`` (the TF program's unset optional settings)."""

  def __init__(self, parser: flags.ArgumentParser):
    self._parser = parser

  def parse(self, argument):
    if isinstance(argument, str) and argument.strip().lower() == 'none':
      return None
    return self._parser.parse(argument)

  def flag_type(self) -> str:
    return self._parser.flag_type() + ' or None'


def _help(name: str, text: str) -> str:
  """The flag's text; for a flag that the recipes set, what the run without flags takes.

  absl appends the flag's own default, which is :class:`train.config.Config`'s and applies only
  where the recipe of ``--data``/``--optimizer`` has no value for it.
  """
  if not any(name in row for row in config_lib.RECIPES.values()):
    return text
  if name in _DEFAULT_RECIPE:
    value = _DEFAULT_RECIPE[name]
    value = ','.join(map(str, value)) if isinstance(value, tuple | list) else value
    taken = f' (the run without flags, {_DEFAULT.data}/{_DEFAULT.optimizer}: {value})'
  else:
    taken = ''
  text = f'{text}; the recipe of --data/--optimizer sets it unless given{taken}'
  # absl shows a default of None or () as nothing.
  return f'{text}, else' if getattr(_DEFAULT, name) not in (None, ()) else text


def _float(name: str, text: str, *, optional: bool = False) -> None:
  parser = _NumberOrNone(flags.FloatParser()) if optional else flags.FloatParser()
  flags.DEFINE(parser, name, getattr(_DEFAULT, name), _help(name, text))


def _integer(name: str, text: str, *, optional: bool = False) -> None:
  parser = _NumberOrNone(flags.IntegerParser()) if optional else flags.IntegerParser()
  flags.DEFINE(parser, name, getattr(_DEFAULT, name), _help(name, text))


def _bool(name: str, text: str) -> None:
  flags.DEFINE_bool(name, getattr(_DEFAULT, name), _help(name, text))


def _string(name: str, text: str) -> None:
  flags.DEFINE_string(name, getattr(_DEFAULT, name), _help(name, text))


def _enum(name: str, choices: Sequence[str], text: str) -> None:
  flags.DEFINE_enum(name, getattr(_DEFAULT, name), choices, _help(name, text))


# What to run.
_enum('task', config_lib.TASKS, 'train, or test (evaluate the checkpoint given by --load)')
_enum('data', config_lib.DATASETS, 'dataset')
_enum('optimizer', config_lib.OPTIMIZERS, 'sgd (Nesterov SGD), sgdg (SGD-G) or adamg (Adam-G)')
_enum('model', config_lib.MODELS, 'resnet (wide ResNet) or VGG')
_integer('depth', 'resnet depth, 6N+4')
_integer('widen_factor', 'resnet width multiplier k')
_float('width_scale', 'VGG channel widths (64 ... 512) times this factor, rounded; VGG only')
_float('keep_prob', 'dropout keep probability in (0, 1]; None: no dropout layer', optional=True)
# Optimizer.
_float('learnRate', 'initial learning rate of the Euclidean parameters')
_float('learnRateG', 'initial learning rate of the parameters on G(1,n)')
_float('learnRateDecay', 'factor applied to both learning rates at --decay_epochs')
flags.DEFINE_list(
  'decay_epochs',
  None,
  _help('decay_epochs', 'epochs after which the rates decay, e.g. 60,120'),
)
_float('epochs', 'training length in epochs')
_float('momentum', 'momentum of the Euclidean parameters, in [0, 1); also beta1 of Adam-G')
_bool('nesterov', 'Nesterov momentum for the Euclidean parameters')
_bool('grassmann', 'put undercomplete conv kernels on G(1,n) (needs sgdg or adamg)')
_float(
  'grad_clip', 'per-column norm threshold nu of the manifold gradient; None: none', optional=True
)
_float('adam_beta2', 'beta2 of Adam-G, in [0, 1)')
_float('adam_eps', 'epsilon of Adam-G, inside the square root')
_float('omega', 'orthogonality strength omega; None: no orthogonality term', optional=True)
_float('weightDecay', 'L2 on non-manifold weights (kernels)', optional=True)
_float('biasDecay', 'L2 on biases', optional=True)
_float('gammaDecay', 'L2 on BatchNorm gamma', optional=True)
_float('betaDecay', 'L2 on BatchNorm beta', optional=True)
# Data.
_integer('batch_size', 'training batch, in total over all devices')
_integer('vali_batch_size', 'test batch (padded up to a multiple of the device count)')
_integer('crop_size', 'random crop size of the CIFAR augmentation')
_integer('padding_size', 'reflection padding per side of the CIFAR augmentation')
_string('data_dir', 'tensorflow_datasets data directory; default: the tfds default')
_bool('download', 'let tensorflow_datasets download a missing dataset')
_integer('seed', 'seed of initialisation, data order and dropout')
# Schedule of the run.
_integer('max_steps', 'stop after this many steps (the schedule follows --epochs)', optional=True)
_integer('report_freq', 'log training metrics every N steps')
_integer('vali_freq', 'evaluate on the test set every N steps (and at the end)')
_integer('save_freq', 'checkpoint every N steps (and at the end)')
_integer('k', 'k of the top-k error')
# Where things go.
_string(
  'train_dir',
  'log root: the run goes to <train_dir>/<data>_<arch>_<optimizer> (-euclidean after sgdg or '
  'adamg without --grassmann, -x<scale> after a VGG of another --width_scale) and resumes from the '
  'checkpoint there, if any (other settings are not in the name: use --train_path)',
)
_string('train_path', 'run directory, used as is (overrides --train_dir)')
_string('load', 'checkpoint to start from / to test (step dir, checkpoints or run dir)')
flags.DEFINE_list(
  'allow_changed',
  None,
  'training settings that a resumed run may change from its checkpoint, e.g. '
  'learnRate,learnRateG (a change not named here is refused)',
)
_integer('max_to_keep', 'checkpoints kept')
_bool('verbose', 'show a progress bar')
# Devices.
_enum(
  'parallel',
  config_lib.PARALLEL,
  'pmap (replicated state; one process only), sharded (jit over a mesh, replicated state) or '
  'fsdp (jit over a mesh, parameters and optimizer state split over it)',
)
_integer('num_devices', 'local devices to use; default: all', optional=True)
flags.DEFINE_alias('num_gpus', 'num_devices')
_string('coordinator_address', 'multi-process: address of process 0, host:port')
_integer('num_processes', 'multi-process: number of processes', optional=True)
_integer('process_id', 'multi-process: index of this process', optional=True)
_string('visible_devices', 'accepted for compatibility and ignored: set CUDA_VISIBLE_DEVICES')
_bool('log_device_placement', 'accepted for compatibility and ignored')


def parse(argv: Sequence[str]) -> config_lib.Config:
  """The checked :class:`~train.config.Config` of a command line (without the program name).

  Raises:
    flags.Error: a malformed or unknown flag (absl's message names it).
    train.config.ConfigError: a value out of range, or an unexpected argument.
  """
  FLAGS.unparse_flags()
  rest = FLAGS(['python -m train', *argv])[1:]
  if rest:
    raise config_lib.ConfigError(f'unexpected argument(s): {" ".join(rest)}')
  given = {name: FLAGS[name].value for name in config_lib.FIELDS if FLAGS[name].present}
  if 'decay_epochs' in given:
    given['decay_epochs'] = _integers('decay_epochs', given['decay_epochs'])
  if 'allow_changed' in given:
    given['allow_changed'] = tuple(n.strip() for n in given['allow_changed'] if n.strip())
  return config_lib.get_config(**given)


def _integers(name: str, texts: Sequence[str]) -> tuple[int, ...]:
  try:
    return tuple(int(text) for text in texts)
  except ValueError:
    raise config_lib.ConfigError(
      f'--{name}={",".join(texts)}: expected integers separated by commas'
    ) from None


def help_text() -> str:
  """Usage, every flag with its default, and the recipes."""
  recipes = []
  for (data, optimizer), row in config_lib.RECIPES.items():
    values = ' '.join(f'{name}={value}' for name, value in row.items())
    recipes.append(
      textwrap.fill(values, 96, initial_indent=f'  {data}/{optimizer}: ', subsequent_indent='    ')
    )
  return '\n'.join(
    [
      'usage: python -m train [--flag=value ...]',
      '',
      'Train or test a wide ResNet / VGG with SGD-G or Adam-G (Cho & Lee, NeurIPS 2017,',
      'arXiv:1709.09603). A flag not given takes the recipe of --data/--optimizer, then its',
      'default. Exit codes and more: docs/training.md.',
      FLAGS.module_help(__name__),
      '',
      'recipes (--data/--optimizer: the values of the flags not given; vgg* has no dropout):',
      *recipes,
    ]
  )
