"""``python -m train``: the paper's TF command lines, run with JAX.

With no flags it trains Adam-G on a WRN-10-4 on scikit-learn's digits (about a minute on a laptop
CPU). The paper's commands run as they are, e.g.::

  python -m train --model=resnet --depth=28 --widen_factor=10 --optimizer=sgdg \\
    --grassmann=True --learnRate=0.01 --learnRateG=0.2 --omega=0.1 --grad_clip=0.1 \\
    --weightDecay=0.0005 --keep_prob=0.7 --data=cifar10

Flags: ``python -m train --help``; the program: docs/training.md. Reference: Cho & Lee,
"Riemannian approach to batch normalization", NeurIPS 2017, arXiv:1709.09603.
"""

import os
import signal
import sys

# SIGINT outside the training loop (which saves the step in flight first): one line, exit 130.
STOPPED_OUTSIDE_TRAINING = 'stopped by SIGINT outside the training loop; nothing was saved'
EXIT_SIGINT = 130


def _stop_at_once(signum, frame) -> None:
  """Ends the program on SIGINT while it starts or evaluates: nothing is written then."""
  os.write(2, f'{STOPPED_OUTSIDE_TRAINING}\n'.encode())
  os._exit(EXIT_SIGINT)


if __name__ == '__main__':
  # Before the imports (E402), which take seconds. A KeyboardInterrupt would not do: raised in a
  # garbage collector's callback (JAX has one) it is printed with its traceback and dropped.
  signal.signal(signal.SIGINT, _stop_at_once)

from collections.abc import Sequence  # noqa: E402

from absl import flags as absl_flags  # noqa: E402

from train import checkpoints, input_pipeline, interrupts, workdir  # noqa: E402
from train import config as config_lib  # noqa: E402
from train import flags as flags_lib  # noqa: E402
from train import train as train_lib  # noqa: E402

# Exit status of each way a run can end (0: it finished); the message is one line on stderr.
EXIT_CODES = (
  (absl_flags.Error, 2),  # a malformed or unknown flag
  (config_lib.ConfigError, 2),  # a setting out of range or that cannot work here
  (input_pipeline.DatasetNotPreparedError, 2),
  (train_lib.TrainingDivergedError, 3),
  (checkpoints.NoIntactCheckpointError, 4),
  (workdir.RunDirectoryBusyError, 5),
  (workdir.WriteError, 6),  # a checkpoint or metrics file could not be written mid-run
)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
  argv = sys.argv[1:] if argv is None else list(argv)
  if any(arg in flags_lib.HELP_FLAGS for arg in argv):
    print(flags_lib.help_text())
    return 0
  try:
    train_lib.train_and_evaluate(flags_lib.parse(argv))
  except interrupts.Interrupted as stopped:
    print(stopped, file=sys.stderr)
    return stopped.exit_code
  except KeyboardInterrupt:  # called from Python, while it starts or evaluates (--task=test)
    print(STOPPED_OUTSIDE_TRAINING, file=sys.stderr)
    return EXIT_SIGINT
  except tuple(error for error, _ in EXIT_CODES) as error:
    print(f'error: {error}', file=sys.stderr)
    return next(code for kind, code in EXIT_CODES if isinstance(error, kind))
  return 0


if __name__ == '__main__':
  sys.exit(main())
