"""The run directory: where it is, and one process at a time in it.

A run writes everything under one directory (``--train_path``, else
``<train_dir>/<data>_<arch>_<optimizer>``): ``checkpoints/``, TensorBoard events,
``metrics.jsonl``, ``summary.json``. While a run is in it, it holds an exclusive ``flock`` on
``<run>/lock``; a second process on the same directory finds the lock taken and refuses before it
writes anything. The operating system releases the lock when the process ends, however it ends
(``SIGKILL`` included), so a stale lock never blocks the next run.

A file of the run that cannot be written once the run has started (a full disk, a file-size
limit, a folder made read-only) raises :class:`WriteError`: the program stops with one line and
every checkpoint written before stays as it was.
"""

import contextlib
import errno
import fcntl
import json
import os
import re
import socket
from collections.abc import Iterator
from typing import Any

from train import config as config_lib

LOCK_FILE = 'lock'


class RunDirectoryBusyError(RuntimeError):
  """Another process holds the run directory's lock."""


class WriteError(RuntimeError):
  """A file of the run could not be written; the message names it, the reason and what is kept."""


# What a write error asks of the user, before "and run the same command ...".
FIX_THE_CAUSE = 'Fix the cause (free space, raise the file-size limit, make the folder writable)'


def reason(error: BaseException) -> str:
  """What went wrong, in a few words: the operating system's reason where the error carries one
  (``No space left on device``; TensorStore, which writes Orbax's arrays, puts its code at the end
  of a long message), else the first line of the message, at most 200 characters.
  """
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  text = str(error)
  code = re.search(r"os_error_code='(\d+)'", text)
  if code:
    return os.strerror(int(code.group(1)))
  return text.splitlines()[0][:200] if text.strip() else type(error).__name__


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
    WriteError: the same, for a full disk or a file-size limit: the same command may work later.
  """
  lock_path = os.path.join(path, LOCK_FILE)
  try:
    os.makedirs(path, exist_ok=True)
    descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as error:
    raise _start_error(f'the run directory {path}', error) from error
  try:
    try:
      fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(descriptor, 200, 0).decode(errors='replace').strip() or 'another process'
      raise RunDirectoryBusyError(
        f'the run directory {path} is in use by {holder}; wait for that run to end, or give this '
        'one its own --train_path'
      ) from None
    try:
      _write_holder(descriptor)
    except OSError as error:
      raise _start_error(lock_path, error) from error
    yield
  finally:
    os.close(descriptor)  # releases the lock


def check_directory(path: str) -> None:
  """Raises ConfigError if ``path`` exists but is no directory that this process can write."""
  if not os.path.lexists(path):
    return
  if not os.path.isdir(path):
    raise config_lib.ConfigError(
      f'{path} is in the way: the run keeps its checkpoints there but it is not a directory; '
      'move it away or choose another --train_path'
    )
  if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
    raise config_lib.ConfigError(
      f'cannot write {path} (read-only or not permitted); make it writable or choose another '
      '--train_path'
    )


def _write_holder(descriptor: int) -> None:
  """Records who holds the lock, for the message of a refused process."""
  os.ftruncate(descriptor, 0)
  os.pwrite(descriptor, f'process {os.getpid()} on {socket.gethostname()}\n'.encode(), 0)


# Errors of a disk that is full or failing now, which a later run of the same command may not
# meet; others (read-only, not permitted, a file in the way) are the choice of the directory.
_PASSING = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO}


def _start_error(what: str, error: OSError) -> Exception:
  """The error of a run that could not start writing ``what``; nothing was trained or saved."""
  if error.errno in _PASSING:
    return WriteError(
      f'cannot write {what} ({reason(error)}); the run did not start, nothing was trained or '
      'saved. Fix the cause (free space or quota, raise the file-size limit, check the disk) and '
      'run the same command'
    )
  return config_lib.ConfigError(
    f'cannot write {what} ({reason(error)}); choose another --train_dir or --train_path'
  )


def replace_whole(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` whole or not at all, through a temporary file that a failed
  write removes.

  Raises:
    OSError: the file cannot be written (a full disk, a file-size limit, a read-only folder).
  """
  temporary = f'{path}.tmp'
  try:
    with open(temporary, 'w') as f:
      f.write(text)
    os.replace(temporary, path)
  except OSError:
    with contextlib.suppress(OSError):
      os.remove(temporary)
    raise


def write_json(path: str, value: Any) -> None:
  """Writes ``value`` as JSON to ``path`` whole or not at all (:func:`replace_whole`).

  Raises:
    WriteError: the file cannot be written (a full disk, a file-size limit, a read-only folder).
  """
  try:
    replace_whole(path, json.dumps(value, indent=2))
  except OSError as error:
    raise WriteError(f'cannot write {path} ({reason(error)})') from error
