"""The golden trajectories of the original optimizers (``tests/data/golden``), in Flax layout.

The files hold five steps of the original PyTorch ``SGDG``/``AdamG`` classes on a conv kernel
(on G(1, 27)), a bias and a dense kernel; ``tests/data/golden/README.md`` says how they were
made. They are part of the repository: a missing file fails the tests that need it.
"""

from pathlib import Path

import numpy as np

GOLDEN_DIR = Path(__file__).resolve().parent / 'data' / 'golden'
VARIANTS = ('base', 'omega', 'nonunit')
STEPS = 5


def conv_to_flax(w):
  """PyTorch ``[out, in, kh, kw]`` (optionally behind a step axis) to ``[kh, kw, in, out]``."""
  return np.transpose(w, (0, 3, 4, 2, 1)) if w.ndim == 5 else np.transpose(w, (2, 3, 1, 0))


def conv_rows_to_flax(rows):
  """PyTorch row buffers ``[steps, out, in·kh·kw]`` to kernels ``[steps, kh, kw, in, out]``."""
  steps, out, _ = rows.shape
  return conv_to_flax(rows.reshape(steps, out, 3, 3, 3))


def load(name: str) -> dict:
  with np.load(GOLDEN_DIR / f'golden_{name}.npz') as data:
    return dict(data)


def initial_params(data: dict, variant: str) -> dict:
  conv = data['init_conv_nonunit'] if variant == 'nonunit' else data['init_conv']
  return {
    'conv': conv_to_flax(conv).astype(np.float32),
    'bias': data['init_bias'].astype(np.float32),
    'fc': data['init_fc'].T.astype(np.float32),
  }


def gradients(data: dict, step: int) -> dict:
  """Loss gradients fed at ``step`` (1-based), without decay or orthogonality terms."""
  return {
    'conv': conv_to_flax(data['grads_conv'][step - 1]).astype(np.float32),
    'bias': data['grads_bias'][step - 1].astype(np.float32),
    'fc': data['grads_fc'][step - 1].T.astype(np.float32),
  }


def expected_params(data: dict, variant: str) -> dict:
  """Params after each step, leading axis = step."""
  return {
    'conv': conv_to_flax(data[f'{variant}_conv']),
    'bias': data[f'{variant}_bias'],
    'fc': np.transpose(data[f'{variant}_fc'], (0, 2, 1)),
  }


def hyperparams(data: dict, variant: str) -> dict:
  return {
    'learning_rate': float(data['hp_lr_e']),
    'grassmann_learning_rate': float(data['hp_lr_g']),
    'momentum': float(data['hp_momentum']),
    'grad_clip': float(data['hp_grad_clip']),
    'omega': float(data[f'hp_omega_{variant}']),
    'weight_decay': float(data['hp_weight_decay_fc']),
  }


LABELS = {'conv': 'grassmann', 'bias': 'euclidean', 'fc': 'euclidean'}
