"""``python -m train`` / ``grassmann-train``: the paper's TF command lines, run with JAX.

Example (the default: Adam-G on the small digits set, a few minutes on a laptop CPU)::

  python -m train
  python -m train --model=resnet --depth=28 --widen_factor=10 --optimizer=sgdg \\
    --grassmann=True --learnRate=0.01 --learnRateG=0.2 --omega=0.1 --grad_clip=0.1 \\
    --weightDecay=0.0005 --keep_prob=0.7 --data=cifar10

Flags: ``python -m train --help`` and :mod:`train.config`. Reference: Cho & Lee, "Riemannian
approach to batch normalization", NeurIPS 2017, arXiv:1709.09603.
"""

import sys
from collections.abc import Sequence

from train import config as config_lib
from train import input_pipeline
from train import train as train_lib

USAGE_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
  """Parses ``argv`` (default ``sys.argv[1:]``), runs, and returns the exit code.

  Configuration problems (bad flag values, a checkpoint of another architecture, a dataset that
  is not prepared offline, ...) print ``error: <message>`` and return 2, without a traceback;
  malformed flags get argparse's usage message and 2, ``--help`` 0.
  """
  try:
    config = config_lib.parse_flags(sys.argv[1:] if argv is None else argv)
    train_lib.train_and_evaluate(config)
  except (ValueError, input_pipeline.DatasetNotPreparedError) as error:
    print(f'error: {error}', file=sys.stderr)
    return USAGE_ERROR
  except SystemExit as exit_request:  # argparse: --help, or a malformed flag
    return exit_request.code if isinstance(exit_request.code, int) else USAGE_ERROR
  return 0


if __name__ == '__main__':
  sys.exit(main())
