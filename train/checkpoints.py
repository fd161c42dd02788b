"""Checkpoints of a run, through Orbax's ``CheckpointManager`` in ``<run>/checkpoints``.

Each checkpoint ``<run>/checkpoints/<step>`` holds two items: ``state`` (step, parameters,
BatchNorm statistics, optimizer state, as host arrays) and ``config`` (every setting of the run as
JSON, plus the number of classes), so that a checkpoint tells what network it belongs to. Orbax
writes a checkpoint under a temporary name and renames it when complete, lists the complete ones
(:meth:`~orbax.checkpoint.CheckpointManager.all_steps`), keeps ``--max_to_keep`` of them, and
removes the temporary directories a killed process left behind.

A checkpoint that Orbax lists but cannot read back (a truncated file, a missing item or metadata)
is damaged: :func:`restore` names it, moves it to ``<run>/checkpoints.damaged/<step>-<time>``
(kept, and no longer counted toward ``--max_to_keep``) and falls back to the next older one.

References:
  Cho & Lee, "Riemannian approach to batch normalization", NeurIPS 2017, arXiv:1709.09603.
"""

import contextlib
import datetime
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from train import config as config_lib

DAMAGED_DIRECTORY = 'checkpoints.damaged'


class DamagedCheckpointError(RuntimeError):
  """A checkpoint that Orbax lists cannot be read back; the message names it and why."""


class NoIntactCheckpointError(RuntimeError):
  """Every checkpoint of a run directory is damaged (they were moved aside and kept)."""


class IncompatibleCheckpointError(config_lib.ConfigError):
  """An intact checkpoint whose state has another layout than this program's (another version)."""


def checkpoint_manager(directory: str, *, max_to_keep: int | None = None) -> ocp.CheckpointManager:
  """Orbax's manager of ``directory`` with this program's two items, ``state`` and ``config``.

  With ``max_to_keep`` (a run's own directory) it deletes the oldest checkpoints beyond that
  number as it saves, and the temporary directories that a killed save left. Nothing is created
  before the first save.
  """
  options = ocp.CheckpointManagerOptions(
    max_to_keep=max_to_keep, create=False, cleanup_tmp_directories=max_to_keep is not None
  )
  handlers = {'state': ocp.StandardCheckpointHandler(), 'config': ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def save(
  manager: ocp.CheckpointManager, step: int, state: Mapping[str, Any], config: Mapping[str, Any]
) -> None:
  """Saves host ``state`` (a dict of arrays) and the JSON ``config`` as checkpoint ``step``."""
  if step in manager.all_steps():
    return
  manager.save(
    step,
    args=ocp.args.Composite(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config)),
  )


def read_config(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """The settings stored with checkpoint ``step``.

  Raises:
    DamagedCheckpointError: the ``config`` item is missing or unreadable.
  """
  with _reading(manager, step, 'config'):
    restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return dict(restored['config'])


def restore_state(manager: ocp.CheckpointManager, step: int, target: Any) -> Any:
  """The ``state`` item of checkpoint ``step``, in the structure and dtypes of ``target``.

  ``target=None`` restores the arrays as they were saved, in nested dicts and lists.

  Raises:
    IncompatibleCheckpointError: the checkpoint is intact but its arrays are not those of
      ``target`` (a program with another optimizer-state layout wrote it).
    DamagedCheckpointError: the item or its metadata is missing, or an array cannot be read.
  """
  with _reading(manager, step, 'state'):
    saved = manager.item_metadata(step)['state']
    if saved is None:
      raise FileNotFoundError('its metadata is missing')
  differ = set() if target is None else _arrays(target) ^ _saved_arrays(saved)
  if differ:
    example = min(differ)
    raise IncompatibleCheckpointError(
      f"checkpoint {_path(manager, step)} holds other arrays than this program's state "
      f'({len(differ)} differ, e.g. {example[0]} {example[1]}): another version of the program '
      'wrote it; resume it with that version, or start a new run with --train_path'
    )
  abstract = None if target is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  with _reading(manager, step, 'state'):
    restored = manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    )
    return restored['state']


def restore(
  manager: ocp.CheckpointManager,
  target: Any,
  check_config: Callable[[Mapping[str, Any]], None],
  *,
  step: int | None = None,
  move_damaged: bool,
) -> tuple[int, Any, dict[str, Any]] | None:
  """``(step, state, settings)`` of checkpoint ``step``, else of the newest intact one.

  None if there is no checkpoint at all.

  Each candidate's settings go to ``check_config`` first (which raises for a checkpoint of another
  network). A damaged checkpoint is reported on stderr and, with ``move_damaged`` (the run's own
  directory), moved aside so that the next save can take its place.

  Raises:
    NoIntactCheckpointError: checkpoints exist but every candidate is damaged.
  """
  damaged = []
  steps = manager.all_steps()
  candidates = sorted(steps, reverse=True) if step is None else [s for s in steps if s == step]
  for candidate in candidates:
    try:
      settings = read_config(manager, candidate)
      check_config(settings)
      return candidate, restore_state(manager, candidate, target), settings
    except DamagedCheckpointError as error:
      where = move_aside(manager, candidate) if move_damaged else None
      print(f'warning: {error}' + (f'; moved to {where}' if where else ''), file=sys.stderr)
      damaged.append(str(candidate))
  if damaged:
    moved = f'; they are kept in {_damaged_root(manager)}' if move_damaged else ''
    raise NoIntactCheckpointError(
      f'no intact checkpoint in {manager.directory} (damaged: step {", ".join(damaged)}{moved}); '
      + ('run again to start from step 0' if move_damaged else 'choose another --load')
    )
  return None


def move_aside(manager: ocp.CheckpointManager, step: int) -> str:
  """Renames checkpoint ``step`` into ``<run>/checkpoints.damaged/<step>-<UTC time>``."""
  stamp = datetime.datetime.now(datetime.UTC).strftime('%Y%m%dT%H%M%S.%fZ')
  target = os.path.join(_damaged_root(manager), f'{step}-{stamp}')
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.rename(_path(manager, step), target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(f'checkpoint {step} moved aside')
  manager.reload()
  return target


def resolve(path: str) -> tuple[str, int | None]:
  """``(checkpoints directory, step or None)`` for a step, checkpoints or run directory.

  None stands for "the newest intact one".
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

  ``path`` is a step directory, a checkpoints directory or a run directory (its newest intact
  checkpoint). Nothing is moved or written.

  Raises:
    FileNotFoundError: ``path`` holds no checkpoint.
    NoIntactCheckpointError: what it holds cannot be read.
  """
  directory, step = resolve(path)
  with checkpoint_manager(directory) as manager:
    found = restore(manager, None, lambda settings: None, step=step, move_damaged=False)
  if found is None:
    raise FileNotFoundError(f'no checkpoint at {path}')
  step, state, settings = found
  return step, jax.tree.map(np.asarray, state), settings


@contextlib.contextmanager
def _reading(manager: ocp.CheckpointManager, step: int, item: str) -> Iterator[None]:
  """Turns a failure to read ``item`` of checkpoint ``step`` into a DamagedCheckpointError."""
  try:
    yield
  except (OSError, ValueError, KeyError) as error:
    _quiet_orbax_readers()
    reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
    raise DamagedCheckpointError(
      f'checkpoint {_path(manager, step)} is damaged: its {item} cannot be read ({reason})'
    ) from error


def _quiet_orbax_readers() -> None:
  """Drops the reports that Orbax's I/O threads repeat for each unreadable array.

  After a failed read, the reads still in flight end on a closed event loop and report it through
  ``sys.unraisablehook`` and the ``asyncio`` logger, a screenful per damaged checkpoint; the
  program has already said which checkpoint is damaged.
  """
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


def _arrays(tree: Any) -> set[tuple[str, tuple[int, ...], str]]:
  """``(name, shape, dtype)`` of every array of ``tree``, named as Orbax names them."""
  return {
    ('.'.join(ocp.tree.str_keypath(path)), tuple(leaf.shape), str(np.dtype(leaf.dtype)))
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _saved_arrays(metadata: Any) -> set[tuple[str, tuple[int, ...], str]]:
  """``(name, shape, dtype)`` of every array in Orbax's metadata of a saved tree."""
  return {
    (leaf.name, tuple(leaf.shape), str(np.dtype(leaf.dtype))) for leaf in jax.tree.leaves(metadata)
  }


def _path(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(manager.directory), str(step))


def _damaged_root(manager: ocp.CheckpointManager) -> str:
  return os.path.join(os.path.dirname(str(manager.directory)), DAMAGED_DIRECTORY)
