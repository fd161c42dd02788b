"""What the notebooks of this folder share: the run mode, the figures folder, the digits.

``GRASSMANN_NOTEBOOK_QUICK=1`` (``tests/test_notebooks.py`` sets it) selects the quick mode:
every run shrinks and nothing is written. Otherwise (``python notebooks/build.py --execute``, or
a notebook opened in Jupyter) the notebooks run in full mode and save their figures and tables
to ``notebooks/figures/``.
"""

import os
from pathlib import Path

import jax
import numpy as np
from sklearn.datasets import load_digits

QUICK = os.environ.get('GRASSMANN_NOTEBOOK_QUICK') == '1'
FIGURES = Path(__file__).resolve().parent / 'figures'


def describe(**facts) -> None:
  """Prints the mode, the JAX version and devices, and ``facts`` (the size of the runs)."""
  devices = f'{jax.device_count()} {jax.devices()[0].platform} device(s)'
  extra = ''.join(f'; {name.replace("_", " ")} {value}' for name, value in facts.items())
  print(f'quick mode: {QUICK}; jax {jax.__version__} on {devices}{extra}')


def save(name: str, what) -> None:
  """Saves a matplotlib figure or a text as ``figures/<name>``, in full mode only."""
  if QUICK:
    return
  FIGURES.mkdir(exist_ok=True)
  if isinstance(what, str):
    (FIGURES / name).write_text(what)
  else:
    what.savefig(FIGURES / name, dpi=110)


def digits() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's 1,797 8×8 digits: standardised float32 images ``(N, 8, 8, 1)``, labels."""
  images, labels = load_digits(return_X_y=True)
  images = (images - images.mean()) / images.std()  # as the training program does (train/)
  return images.reshape(-1, 8, 8, 1).astype(np.float32), labels


def leaf_name(path) -> str:
  """``'block/kernel'`` for a pytree path: its dict keys and sequence indices.

  Attribute keys (the ``value`` of an ``nnx.Param`` in an ``nnx.State``) are left out.
  """
  keys = (getattr(key, 'key', getattr(key, 'idx', None)) for key in path)
  return '/'.join(str(key) for key in keys if key is not None)


def named_leaves(tree) -> dict:
  """``{name: leaf}``; ``None`` and tuples (the point axes of a leaf) count as leaves."""
  is_leaf = lambda x: x is None or isinstance(x, tuple)
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return {leaf_name(path): leaf for path, leaf in flat}


def with_random_biases(params, key):
  """``params`` with every leaf that Flax initialises to zero (the biases) drawn from N(0, 1).

  ``find_scale_invariant`` must see random parameters: at a zero bias a ReLU is positively
  homogeneous, and a layer followed by one can pass Euler's test by accident (notebook 1).
  """
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  draw = lambda leaf, k: jax.random.normal(k, leaf.shape, leaf.dtype) if not np.any(leaf) else leaf
  return treedef.unflatten([draw(leaf, k) for leaf, k in zip(leaves, keys, strict=True)])


def smooth(values, window: int = 10) -> np.ndarray:
  """The moving average of ``values`` over ``window`` steps (``valid`` part only)."""
  window = min(window, len(values))
  return np.convolve(values, np.ones(window) / window, mode='valid')
