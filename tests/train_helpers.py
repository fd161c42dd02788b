"""Shared helpers of the training program's tests: tiny runs, subprocesses, prepared datasets."""

import atexit
import contextlib
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

from train import checkpoints
from train.__main__ import main

# WRN-10-1 on digits, batches of 8: a step takes milliseconds on CPU.
TINY = ['--depth=10', '--widen_factor=1', '--batch_size=8', '--vali_batch_size=150', '--verbose=0']
# The same for VGG, which takes no --depth or --widen_factor.
TINY_VGG = [arg for arg in TINY if not arg.startswith(('--depth=', '--widen_factor='))]
# How long a test waits for a subprocess of the program.
SUBPROCESS_TIMEOUT_S = 120
FINAL_LINE = re.compile(r'^final: test_error=(\S+) test_loss=(\S+) steps=(\d+)$')
REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The suite's persistent compilation cache (tests/conftest.py sets it before JAX starts), with
# which the program's subprocesses (and the tests that ask for it, :func:`compilation_cache`)
# compile each function once and load it afterwards.
COMPILATION_CACHE = os.environ['JAX_COMPILATION_CACHE_DIR']
# What the test session shares: the runs of :func:`shared_run`.
_SESSION = tempfile.mkdtemp(prefix='grassmann-tests-')
atexit.register(shutil.rmtree, _SESSION, ignore_errors=True)


@functools.cache
def shared_run(*argv):
  """The directory of a finished run of ``argv``, run once per test session; copy it to change it.

  Test modules that start from the same run share it instead of training it again.
  """
  path = Path(tempfile.mkdtemp(prefix='run-', dir=_SESSION))
  with compilation_cache():
    assert run_main([*argv, f'--train_path={path}']) == 0
  return path


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
  if not (run_dir / 'checkpoints').is_dir():
    return []
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


def program(*argv, env=None, prefix=(), **kwargs):
  """``python -m train argv`` as a subprocess of the repository's code (a Popen).

  It uses the suite's persistent compilation cache; ``prefix`` goes before the command (such
  as :func:`unprivileged`).
  """
  cache = {
    'JAX_COMPILATION_CACHE_DIR': COMPILATION_CACHE,
    'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
  }
  return subprocess.Popen(
    [*prefix, sys.executable, '-m', 'train', *map(str, argv)],
    cwd=REPOSITORY,
    env={**os.environ, **cache, **(env or {})},
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


@contextlib.contextmanager
def compilation_cache():
  """This process's compilations go through the suite's persistent cache inside the block.

  Each run of the program builds its compiled steps afresh; with the cache, runs of one shape
  after the first load them instead of compiling them again.
  """
  from jax.experimental.compilation_cache import compilation_cache as cache

  previous = {
    name: getattr(jax.config, name)
    for name in ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs')
  }
  jax.config.update('jax_compilation_cache_dir', COMPILATION_CACHE)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  cache.reset_cache()
  try:
    yield
  finally:
    for name, value in previous.items():
      jax.config.update(name, value)
    cache.reset_cache()


def unprivileged():
  """A command prefix under which permission bits bind this user, or None if there is none.

  Root writes into a read-only folder anyway; ``setpriv`` takes that power away for one command.
  """
  if os.geteuid() != 0:
    return []
  setpriv = shutil.which('setpriv')
  return [setpriv, '--bounding-set=-dac_override,-dac_read_search'] if setpriv else None
