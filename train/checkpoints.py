"""Checkpoints of a run, through Orbax's ``CheckpointManager`` in ``<run>/checkpoints``.

Each checkpoint ``<run>/checkpoints/<step>`` holds two items: ``state`` (step, parameters,
BatchNorm statistics, optimizer state, as host arrays) and ``config`` (every setting of the run as
JSON, plus the number of classes and, under ``train_window``, the sums of the training metrics
since the last report), so that a checkpoint tells what network it belongs to and with which
settings it was trained. Orbax writes a checkpoint under a temporary name and renames it
when complete, lists the complete ones (:meth:`~orbax.checkpoint.CheckpointManager.all_steps`),
keeps ``--max_to_keep`` of them, and removes the temporary directories a killed process left.

Writing. Saves are synchronous: a checkpoint is complete when :func:`save` returns, a failure (a
full disk, a file-size limit, a read-only folder) raises :class:`~train.workdir.WriteError` in the
caller, and no Orbax thread outlives :func:`checkpoint_manager`. (An asynchronous save would
overlap a few training steps; a failure in it would surface in a background thread.)

Checksums. Orbax keeps none. Once Orbax has written a step, :func:`save` adds
``<step>/sha256sums.txt``: the SHA-256 of every file of the step, in the format of ``sha256sum``
(``cd <step> && sha256sum -c sha256sums.txt`` checks it by hand). Every read verifies it first, so
a flipped byte makes a damaged checkpoint, not a different model. A checkpoint without the file
(an earlier version of the program wrote it, or the program stopped between the save and its
checksums) is read unverified, with a warning.

Reading. A checkpoint that cannot be read back (a file that does not match its checksum, any error
from Orbax or the file system) is skipped: :func:`restore` says why and falls back to the next
older one. In the run's own directory the unreadable checkpoints newer than the one resumed are
then moved to ``<run>/checkpoints.damaged/<step>-<time>``, kept as they are, so that the run can
save those steps again; when none is readable nothing is moved. A checkpoint that is intact but
does not fit this run is never called damaged: ``check_config`` and the comparison of its arrays
with this program's state raise :class:`~train.config.ConfigError`.

Readers beside a live run. A run deletes its old checkpoints as it saves a new one. While it
saves it holds an exclusive ``flock`` on the checkpoints directory, and a reader (``--task=test``,
``--load``, :func:`load`) holds a shared one while it lists, verifies and reads: it sees whole
checkpoints that stay until it is done, and the run waits for it at its next save. (Where the file
system has no ``flock`` on directories, a reader whose checkpoint vanished lists them again.)

Paths. Orbax reads ``*``, ``?`` and ``[`` in a directory's path as glob patterns; a directory
whose path holds them is handed to Orbax through a symbolic link with a plain name.

References:
  Cho & Lee, "Riemannian approach to batch normalization", NeurIPS 2017, arXiv:1709.09603.
"""

import contextlib
import datetime
import fcntl
import hashlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from train import config as config_lib
from train import workdir

CHECKSUMS = 'sha256sums.txt'
DAMAGED_DIRECTORY = 'checkpoints.damaged'
_GLOB_CHARACTERS = frozenset('*?[')
# A reader beside a live run lists the checkpoints again at most this many times.
_READ_ATTEMPTS = 5
_aliases: dict[str, str] = {}  # plain path handed to Orbax -> the directory it stands for


class DamagedCheckpointError(RuntimeError):
  """A checkpoint that Orbax lists cannot be read back; the message names it and why."""

  def __init__(self, message: str, reason: str):
    super().__init__(message)
    self.reason = reason


class NoIntactCheckpointError(RuntimeError):
  """Checkpoints exist, but none can be read; nothing was moved."""


class IncompatibleCheckpointError(config_lib.ConfigError):
  """An intact checkpoint whose arrays are not those of this run's state."""


@contextlib.contextmanager
def checkpoint_manager(
  directory: str, *, max_to_keep: int | None = None
) -> Iterator[ocp.CheckpointManager]:
  """Orbax's manager of ``directory`` with this program's items ``state`` and ``config``.

  With ``max_to_keep`` (a run's own directory) it deletes the oldest checkpoints beyond that
  number as it saves, and the temporary directories that a killed save left. Nothing is created
  before the first save. The manager is closed when the block ends, however it ends.
  """
  _quiet_orbax()
  options = ocp.CheckpointManagerOptions(
    max_to_keep=max_to_keep,
    create=False,
    cleanup_tmp_directories=max_to_keep is not None,
    enable_async_checkpointing=False,
  )
  handlers = {'state': ocp.StandardCheckpointHandler(), 'config': ocp.JsonCheckpointHandler()}
  with _plain_path(os.path.abspath(directory)) as path:
    for attempt in range(_READ_ATTEMPTS):
      try:
        manager = ocp.CheckpointManager(path, options=options, item_handlers=handlers)
        break
      except OSError as error:
        # Orbax lists the steps, then reads each one's metadata: a live run that deletes an old
        # checkpoint in between makes a step vanish under the listing. List them again.
        vanished = isinstance(error, FileNotFoundError) and os.path.isdir(path)
        if vanished and attempt + 1 < _READ_ATTEMPTS:
          time.sleep(0.05 * (attempt + 1))
          continue
        raise NoIntactCheckpointError(
          f'cannot read the checkpoints in {directory} ({workdir.reason(error)})'
        ) from error
    try:
      yield manager
    finally:
      manager.close()


def save(
  manager: ocp.CheckpointManager, step: int, state: Mapping[str, Any], config: Mapping[str, Any]
) -> None:
  """Saves host ``state`` (a dict of arrays) and the JSON ``config`` as checkpoint ``step``.

  Raises:
    WriteError: Orbax could not write the checkpoint, or its checksums could not be written;
      the checkpoints saved before are untouched.
  """
  if step in manager.all_steps():
    return
  args = ocp.args.Composite(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config))
  try:
    # Process 0 deletes the old checkpoints; the others only write their part of the new one.
    lock = _locked(directory(manager), exclusive=True) if jax.process_index() == 0 else None
    with lock or contextlib.nullcontext():
      manager.save(step, args=args)
      if jax.process_index() == 0:
        write_checksums(_path(manager, step))
  except Exception as error:
    if step in manager.all_steps():  # Orbax wrote it; its checksums failed
      raise workdir.WriteError(
        f'cannot write the checksums of checkpoint {_path(manager, step)} '
        f'({workdir.reason(error)}); the checkpoint is complete and will be read unverified'
      ) from error
    earlier = [s for s in manager.all_steps() if s < step]
    kept = f'the newest checkpoint is still step {max(earlier)}' if earlier else 'none was saved'
    raise workdir.WriteError(
      f'cannot write checkpoint {step} in {directory(manager)} ({workdir.reason(error)}); '
      f'{kept}. {workdir.FIX_THE_CAUSE} and run the same command to resume'
    ) from error


def write_checksums(step_directory: str) -> None:
  """Writes ``sha256sums.txt`` into a complete step: the SHA-256 of each of its files."""
  lines = [
    f'{_sha256(os.path.join(step_directory, name))}  {name}\n' for name in _files(step_directory)
  ]
  temporary = os.path.join(step_directory, CHECKSUMS + '.tmp')
  with open(temporary, 'w') as f:
    f.writelines(lines)
    f.flush()
    os.fsync(f.fileno())
  os.replace(temporary, os.path.join(step_directory, CHECKSUMS))


def verify_checksums(step_directory: str) -> bool:
  """Whether the step has checksums; each file they list must match.

  Raises:
    ValueError: a listed file is missing or differs (the message names it), or the list itself
      is malformed.
  """
  path = os.path.join(step_directory, CHECKSUMS)
  if not os.path.exists(path):
    return False
  with open(path, encoding='utf-8') as f:
    listed = [line.rstrip('\n').split('  ', 1) for line in f]
  if not listed or any(len(entry) != 2 for entry in listed):
    raise ValueError(f'{CHECKSUMS} is malformed')
  for digest, name in listed:
    file = os.path.join(step_directory, name)
    if not os.path.isfile(file):
      raise ValueError(f'{name} is missing')
    if _sha256(file) != digest:
      raise ValueError(f'{name} does not match its checksum')
  return True


def read_config(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """The settings stored with checkpoint ``step``.

  Raises:
    DamagedCheckpointError: the ``config`` item is missing or unreadable.
  """
  with _reading(manager, step, 'config'):
    restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return dict(restored['config'])


def restore_state(
  manager: ocp.CheckpointManager, step: int, target: Any, changes: Sequence[str] = ()
) -> Any:
  """The ``state`` item of checkpoint ``step``, in the structure of ``target``, as host arrays.

  Arrays are matched to ``target``'s leaves by name, shape and dtype, so that parts of the
  optimizer state without arrays (a transform that keeps no state) may differ. ``target=None``
  restores the arrays as they were saved, in nested dicts and lists. ``changes`` (the settings
  that differ from the checkpoint's) go into the message of a mismatch.

  Raises:
    IncompatibleCheckpointError: the checkpoint is intact but its arrays are not those of
      ``target``.
    DamagedCheckpointError: the item or its metadata is missing, or an array cannot be read.
  """
  with _reading(manager, step, 'state'):
    saved = manager.item_metadata(step)['state']
    if saved is None:
      raise FileNotFoundError('its metadata is missing')
    saved_arrays = _saved_arrays(saved)
  differ = set() if target is None else _arrays(target) ^ saved_arrays
  if differ:
    name, shape, dtype = min(differ)
    cause = (
      f'the changed settings ({"; ".join(changes)}) give the state other arrays; resume with the '
      "checkpoint's settings"
      if changes
      else 'another version of the program wrote it; resume it with that version'
    )
    raise IncompatibleCheckpointError(
      f"checkpoint {_path(manager, step)} holds other arrays than this run's state "
      f'({len(differ)} differ, e.g. {name} {shape} {dtype}): {cause}, or start a new run with '
      '--train_path'
    )
  with _reading(manager, step, 'state'):
    # Whole arrays on this process's first device, whatever layout saved them (a run with its
    # state split over devices and processes, --parallel=fsdp, too); the program lays them out.
    whole = jax.sharding.make_single_device_sharding(jax.local_devices()[0])
    abstract = jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=whole), saved
    )
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    restored = manager.restore(step, args=args)['state']
  if target is None:
    return restored
  by_name = {_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]}
  return jax.tree_util.tree_map_with_path(lambda path, _: by_name[_name(path)], target)


def restore(
  manager: ocp.CheckpointManager,
  target: Any,
  check_config: Callable[[Mapping[str, Any]], Sequence[str]],
  *,
  step: int | None = None,
  move_damaged: bool,
) -> tuple[int, Any, dict[str, Any]] | None:
  """``(step, state, settings)`` of checkpoint ``step``, else of the newest readable one.

  None if there is no checkpoint at all. Each candidate's checksums are verified, then its
  settings go to ``check_config``, which raises ConfigError for settings this run cannot resume
  and returns the accepted changes (``'name: old -> new'``). Every process of a multi-process run
  reads the same checkpoint: one that some process cannot read is skipped by all. An unreadable
  checkpoint is reported on stderr; with ``move_damaged`` (the run's own directory), those newer
  than the one restored are then moved aside so that the run can save their steps again.

  Raises:
    NoIntactCheckpointError: checkpoints exist but none of the candidates can be read (nothing
      was moved).
  """
  for _ in range(_READ_ATTEMPTS):
    listed = list(manager.all_steps())
    candidates = sorted(listed, reverse=True) if step is None else [s for s in listed if s == step]
    unreadable = []
    for candidate in candidates:
      try:
        found = _read_everywhere(manager, candidate, target, check_config)
      except DamagedCheckpointError as error:
        if _listing_changed(manager, listed):
          break  # a live run saved and deleted checkpoints meanwhile: list them again
        print(f'warning: {error}', file=sys.stderr)
        unreadable.append((candidate, error.reason))
        continue
      if move_damaged:
        for damaged, _ in unreadable:
          move_aside(manager, damaged)
      return found
    else:
      if not unreadable:
        return None
      tried = ', '.join(str(s) for s, _ in unreadable)
      advice = (
        f'start from another checkpoint with --load and a new --train_path, or move '
        f'{directory(manager)} away to start again from step 0'
        if move_damaged
        else 'choose another --load'
      )
      raise NoIntactCheckpointError(
        f'no intact checkpoint in {directory(manager)} (tried step {tried}, each reported above); '
        f'nothing was moved or deleted; {advice}'
      )
  raise NoIntactCheckpointError(
    f'the checkpoints in {directory(manager)} changed under every one of {_READ_ATTEMPTS} '
    'attempts to read them; try again'
  )


def move_aside(manager: ocp.CheckpointManager, step: int) -> str:
  """Renames checkpoint ``step`` into ``<run>/checkpoints.damaged/<step>-<UTC time>``."""
  stamp = datetime.datetime.now(datetime.UTC).strftime('%Y%m%dT%H%M%S.%fZ')
  root = os.path.join(os.path.dirname(directory(manager)), DAMAGED_DIRECTORY)
  target = os.path.join(root, f'{step}-{stamp}')
  if jax.process_index() == 0:
    try:
      os.makedirs(root, exist_ok=True)
      os.rename(_path(manager, step), target)
    except OSError as error:
      raise workdir.WriteError(
        f'cannot move the unreadable checkpoint {_path(manager, step)} aside to {target} '
        f'({workdir.reason(error)}); nothing was changed'
      ) from error
    print(
      f'warning: moved the unreadable checkpoint {step} to {target}, so that this run can save '
      'that step again',
      file=sys.stderr,
    )
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(f'checkpoint {step} moved aside')
  manager.reload()
  return target


def resolve(path: str) -> tuple[str, int | None]:
  """``(checkpoints directory, step or None)`` for a step, checkpoints or run directory.

  None stands for "the newest readable one".
  """
  path = os.path.abspath(os.path.expanduser(path.rstrip('/')))
  name = os.path.basename(path)
  if name.isdigit() and os.path.isdir(os.path.join(path, 'state')):
    return os.path.dirname(path), int(name)
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    path = os.path.join(path, 'checkpoints')
  return path, None


def load(path: str) -> tuple[int, dict[str, Any], dict[str, Any]]:
  """``(step, state, settings)`` of a checkpoint as NumPy arrays and JSON, for analysis.

  ``path`` is a step directory, a checkpoints directory or a run directory (its newest readable
  checkpoint). Nothing is moved or written; a run may be saving into the directory meanwhile.

  Raises:
    FileNotFoundError: ``path`` holds no checkpoint.
    NoIntactCheckpointError: what it holds cannot be read.
  """
  location, step = resolve(path)
  if not os.path.isdir(location):
    raise FileNotFoundError(f'no checkpoint at {path}')
  with reading(location) as manager:
    found = restore(manager, None, lambda settings: (), step=step, move_damaged=False)
  if found is None:
    raise FileNotFoundError(f'no checkpoint at {path}')
  step, state, settings = found
  return step, jax.tree.map(np.asarray, state), settings


@contextlib.contextmanager
def reading(location: str) -> Iterator[ocp.CheckpointManager]:
  """A manager of another run's checkpoints directory, which no save changes while it is open."""
  with _locked(location, exclusive=False), checkpoint_manager(location) as manager:
    yield manager


def directory(manager: ocp.CheckpointManager) -> str:
  """The checkpoints directory of ``manager`` as the user named it (not Orbax's plain alias)."""
  path = os.path.normpath(str(manager.directory))
  return _aliases.get(path, path)


def _read_everywhere(manager, step, target, check_config):
  """:func:`_read` on every process; a checkpoint that one process cannot read fails on all."""
  error = None
  try:
    found = _read(manager, step, target, check_config)
  except DamagedCheckpointError as failure:
    error = failure
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    failed = multihost_utils.process_allgather(np.int32(error is not None))
    if error is None and np.any(failed):
      reason = 'another process cannot read it'
      error = DamagedCheckpointError(f'checkpoint {_path(manager, step)}: {reason}', reason)
  if error is not None:
    raise error
  return found


def _read(manager, step, target, check_config):
  """``(step, state, settings)`` of checkpoint ``step``: checksums, settings, then arrays."""
  step_directory = _path(manager, step)
  try:
    verified = verify_checksums(step_directory)
  except Exception as error:
    reason = workdir.reason(error)
    raise DamagedCheckpointError(
      f'checkpoint {step_directory} is damaged: {reason}', reason
    ) from error
  settings = read_config(manager, step)
  changes = check_config(settings)
  state = restore_state(manager, step, target, changes)
  if not verified:
    print(
      f'warning: checkpoint {step_directory} has no {CHECKSUMS} (an earlier version of the '
      'program wrote it, or the program stopped right after saving it); it was read unverified',
      file=sys.stderr,
    )
  return step, state, settings


def _listing_changed(manager: ocp.CheckpointManager, listed: list[int]) -> bool:
  manager.reload()
  return list(manager.all_steps()) != listed


@contextlib.contextmanager
def _reading(manager: ocp.CheckpointManager, step: int, item: str) -> Iterator[None]:
  """Turns any failure to read ``item`` of checkpoint ``step`` into a DamagedCheckpointError.

  ConfigError passes: a checkpoint that does not fit the run is not unreadable.
  """
  try:
    yield
  except config_lib.ConfigError:
    raise
  except Exception as error:
    reason = f'its {item} cannot be read: {workdir.reason(error)}'
    raise DamagedCheckpointError(
      f'checkpoint {_path(manager, step)} cannot be read ({reason})', reason
    ) from error


@contextlib.contextmanager
def _locked(path: str, *, exclusive: bool) -> Iterator[None]:
  """Holds a ``flock`` on the directory ``path``, if it exists and the file system allows it."""
  try:
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
  except OSError:
    yield  # not there yet: nothing to read, nothing to delete
    return
  try:
    with contextlib.suppress(OSError):  # no flock on directories here: go on unlocked
      fcntl.flock(descriptor, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    yield
  finally:
    os.close(descriptor)  # releases the lock


@contextlib.contextmanager
def _plain_path(path: str) -> Iterator[str]:
  """``path``, or a symbolic link to it without glob characters for as long as the block runs."""
  if not _GLOB_CHARACTERS & set(path):
    yield path
    return
  parent, name = os.path.split(path)
  target, tail = (path, '') if _GLOB_CHARACTERS & set(name) else (parent, name)
  with tempfile.TemporaryDirectory(prefix='grassmann-checkpoints-') as links:
    link = os.path.join(links, 'directory')
    os.symlink(target, link)
    alias = os.path.normpath(os.path.join(link, tail))
    _aliases[alias] = path
    try:
      yield alias
    finally:
      del _aliases[alias]


class _DropReraisedErrors(logging.Filter):
  """Drops Orbax's log of an exception that its thread hands on to the caller anyway."""

  def filter(self, record: logging.LogRecord) -> bool:
    return 'raised an exception' not in str(record.msg)


def _quiet_orbax() -> None:
  """Keeps a failed read or write to the one line the program prints about it.

  Orbax logs each error of its I/O threads with a traceback before it re-raises it in the
  caller; after a failed read, the reads still in flight end on a closed event loop and report it
  through ``sys.unraisablehook`` and the ``asyncio`` logger, a screenful per checkpoint.
  """
  absl_logger = logging.getLogger('absl')
  if not any(isinstance(f, _DropReraisedErrors) for f in absl_logger.filters):
    absl_logger.addFilter(_DropReraisedErrors())
  logging.getLogger('asyncio').setLevel(logging.CRITICAL)
  if getattr(sys.unraisablehook, '_drops_closed_loops', False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    if not (
      isinstance(unraisable.exc_value, RuntimeError)
      and str(unraisable.exc_value) == 'Event loop is closed'
    ):
      previous(unraisable)

  hook._drops_closed_loops = True
  sys.unraisablehook = hook


def _files(step_directory: str) -> list[str]:
  """Every file of a step, relative to it, but its checksums."""
  found = []
  for root, _, names in os.walk(step_directory):
    for name in names:
      relative = os.path.relpath(os.path.join(root, name), step_directory)
      if relative not in (CHECKSUMS, CHECKSUMS + '.tmp'):
        found.append(relative)
  return sorted(found)


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def _name(path: Any) -> str:
  """A leaf's name as Orbax names it: its keys joined by dots."""
  return '.'.join(ocp.tree.str_keypath(path))


def _arrays(tree: Any) -> set[tuple[str, tuple[int, ...], str]]:
  """``(name, shape, dtype)`` of every array of ``tree``."""
  return {
    (_name(path), tuple(leaf.shape), str(np.dtype(leaf.dtype)))
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _saved_arrays(metadata: Any) -> set[tuple[str, tuple[int, ...], str]]:
  """``(name, shape, dtype)`` of every array in Orbax's metadata of a saved tree."""
  return {
    (leaf.name, tuple(leaf.shape), str(np.dtype(leaf.dtype))) for leaf in jax.tree.leaves(metadata)
  }


def _path(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(directory(manager), str(step))
