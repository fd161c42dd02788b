"""The run directory: where it is, and one process at a time in it.

A run writes everything under one directory (``--train_path``, else
``<train_dir>/<data>_<arch>_<optimizer>``): ``checkpoints/``, TensorBoard events,
``metrics.jsonl``, ``summary.json``. While a run is in it, it holds an exclusive ``flock`` on
``<run>/lock``; a second process on the same directory finds the lock taken and refuses before it
writes anything. The operating system releases the lock when the process ends, however it ends
(``SIGKILL`` included), so a stale lock never blocks the next run.
"""

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator

from train import config as config_lib

LOCK_FILE = 'lock'


class RunDirectoryBusyError(RuntimeError):
  """Another process holds the run directory's lock."""


def run_directory(config: config_lib.Config) -> str:
  """``--train_path`` as given, else ``<train_dir>/<run name>``; absolute."""
  path = config.train_path or os.path.join(config.train_dir, config_lib.run_name(config))
  return os.path.abspath(os.path.expanduser(path))


@contextlib.contextmanager
def locked(path: str) -> Iterator[None]:
  """Creates ``path`` if needed and holds its lock for the duration of the block.

  Raises:
    RunDirectoryBusyError: another process holds the lock (nothing was written).
    ConfigError: ``path`` cannot be created or written (a read-only location, a file in the way).
  """
  lock_path = os.path.join(path, LOCK_FILE)
  try:
    os.makedirs(path, exist_ok=True)
    descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as error:
    raise config_lib.ConfigError(
      f'cannot write the run directory {path} ({error.strerror}); choose another --train_dir '
      'or --train_path'
    ) from error
  try:
    try:
      fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(descriptor, 200, 0).decode(errors='replace').strip() or 'another process'
      raise RunDirectoryBusyError(
        f'the run directory {path} is in use by {holder}; wait for that run to end, or give this '
        'one its own --train_path'
      ) from None
    _write_holder(descriptor)
    yield
  finally:
    os.close(descriptor)  # releases the lock


def _write_holder(descriptor: int) -> None:
  """Records who holds the lock, for the message of a refused process."""
  try:
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f'process {os.getpid()} on {socket.gethostname()}\n'.encode(), 0)
  except OSError as error:
    raise config_lib.ConfigError(f'cannot write the run directory ({error.strerror})') from error
