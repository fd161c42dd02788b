"""Shared helpers of the training program's tests: tiny runs, subprocesses, prepared datasets."""

import contextlib
import os
import re
import subprocess
import sys

import jax
import numpy as np

from train import checkpoints
from train.__main__ import main

# WRN-10-1 on digits, batches of 8: a step takes milliseconds on CPU.
TINY = ['--depth=10', '--widen_factor=1', '--batch_size=8', '--vali_batch_size=150', '--verbose=0']
FINAL_LINE = re.compile(r'^final: test_error=(\S+) test_loss=(\S+) steps=(\d+)$')
REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(argv, capsys=None):
  """``main(argv)``; returns (exit code, stdout, stderr) when ``capsys`` is given."""
  code = main([str(arg) for arg in argv])
  if capsys is None:
    return code
  out, err = capsys.readouterr()
  return code, out, err


def final_state(path):
  """The ``state`` item of the newest checkpoint under ``path``, as NumPy arrays."""
  return checkpoints.load(str(path))[1]


def checkpoint_steps(run_dir):
  with checkpoints.checkpoint_manager(str(run_dir / 'checkpoints')) as manager:
    return list(manager.all_steps())


def assert_trees_close(actual, expected, *, rtol, atol):
  actual_leaves, actual_tree = jax.tree.flatten(actual)
  expected_leaves, expected_tree = jax.tree.flatten(expected)
  assert actual_tree == expected_tree
  for a, e in zip(actual_leaves, expected_leaves, strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol)


def directory_snapshot(path, exclude=()):
  """``{file: (size, mtime)}`` of every file under ``path``, but those named in ``exclude``."""
  snapshot = {}
  for root, _, names in os.walk(path):
    for name in set(names) - set(exclude):
      stat = os.stat(os.path.join(root, name))
      snapshot[os.path.join(root, name)] = (stat.st_size, stat.st_mtime_ns)
  return snapshot


def program(*argv, env=None, **kwargs):
  """``python -m train argv`` as a subprocess of the repository's code (a Popen)."""
  return subprocess.Popen(
    [sys.executable, '-m', 'train', *map(str, argv)],
    cwd=REPOSITORY,
    env={**os.environ, **(env or {})},
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    **kwargs,
  )


@contextlib.contextmanager
def prepared_tfds(data_dir, name, num_examples):
  """Serves ``num_examples`` fake examples of tfds dataset ``name`` as a prepared dataset.

  Writes the builder's real metadata into ``data_dir`` (which is what makes tfds consider the
  dataset prepared), then lets ``tfds.testing.mock_data`` generate the examples from it. No
  network is involved.
  """
  import tensorflow_datasets as tfds

  builder = tfds.builder(name, data_dir=str(data_dir))
  os.makedirs(builder.data_path, exist_ok=True)
  builder.info.write_to_directory(builder.data_path)
  with tfds.testing.mock_data(num_examples=num_examples, data_dir=str(data_dir)):
    yield str(data_dir)
