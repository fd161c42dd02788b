"""Training and test metrics: the per-step window, and where the numbers go.

The training step returns its loss and error as device scalars; :class:`TrainWindow` keeps them
until a report, a test evaluation or a checkpoint, then reads them all at once, so that no step
waits for the host. :class:`MetricWriter` writes TensorBoard scalars (tensorboardX) and the same
numbers to ``<run>/metrics.jsonl``, one JSON object a line, which a notebook reads with ``json``.

The TensorBoard events go through tensorboardX's ``EventsWriter`` in the calling thread, flushed at
each report, rather than through its ``SummaryWriter``: that one writes from a thread which a
failed write (a full disk) ends silently, after which its queue blocks the program and its exit
handler prints tracebacks. Here a failed write raises :class:`~train.workdir.WriteError` at once.
"""

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto import event_pb2
from tensorboardX.summary import scalar

from train import parallel as parallel_lib
from train.workdir import FIX_THE_CAUSE, WriteError, reason, replace_whole


class TrainWindow:
  """The training metrics of the steps since the last report.

  A step's metrics stay device arrays until a report, a test evaluation or a checkpoint reads
  them; then they are added to running sums (float64, in step order). The sums and their count
  (:meth:`state`) go into each checkpoint, and a resumed run starts from them
  (``TrainWindow(state)``), so that its first report averages the same steps as a run that was
  not interrupted. A checkpoint of an earlier version has none: the window starts empty.
  """

  def __init__(self, state: Mapping[str, Any] | None = None):
    self.steps: list[int] = []  # steps not read yet, and their metrics
    self.metrics: list[Mapping[str, Any]] = []
    state = state or {}
    self._sums: dict[str, float] = {name: float(v) for name, v in state.get('sums', {}).items()}
    self._count = int(state.get('count', 0))
    self._non_finite: tuple[int, float] | None = None

  def append(self, step: int, metrics: Mapping[str, Any]) -> None:
    self.steps.append(step)
    self.metrics.append(metrics)

  def first_non_finite(self) -> tuple[int, float] | None:
    """``(step, loss)`` of the first step whose loss is NaN or infinite, if any."""
    self._read()
    return self._non_finite

  def summary(self) -> dict[str, float]:
    """The mean of each metric over the window, which then starts afresh."""
    self._read()
    means = {name: total / self._count for name, total in self._sums.items()}
    self._sums, self._count, self._non_finite = {}, 0, None
    return means

  def state(self) -> dict[str, Any]:
    """The running sums and their count, as JSON: what a checkpoint keeps of the window."""
    self._read()
    return {'sums': dict(self._sums), 'count': self._count}

  def _read(self) -> None:
    for step, metrics in zip(self.steps, self.metrics, strict=True):
      values = {name: float(value) for name, value in parallel_lib.first_copy(metrics).items()}
      if self._non_finite is None and not math.isfinite(values['loss']):
        self._non_finite = (step, values['loss'])
      for name, value in values.items():
        self._sums[name] = self._sums.get(name, 0.0) + value
      self._count += 1
    self.steps, self.metrics = [], []


class MetricWriter:
  """TensorBoard scalars plus ``metrics.jsonl`` (``{"step", "split", name: value, ...}`` lines).

  A resumed run first drops the lines logged after its checkpoint (``start_step``), which the
  interrupted run wrote and this one is about to write again, and a last line that a killed
  process left unfinished (with a warning); every other line is kept as it is. Its new event file
  starts with TensorBoard's ``SessionLog.START`` at step ``start_step + 1``, which makes
  TensorBoard hide the events of the earlier files from that step on in the same way.
  ``enabled=False`` (processes other than the first) writes nothing. Used as a context manager it
  is closed however the block ends.

  Raises:
    WriteError: a file cannot be written (a full disk, a file-size limit, a read-only folder).
  """

  def __init__(self, directory: str, *, enabled: bool, start_step: int = 0):
    self.enabled = enabled
    if not enabled:
      return
    self.directory = directory
    path = os.path.join(directory, 'metrics.jsonl')
    with _writing(directory):
      if os.path.exists(path):
        _keep_lines_until(path, start_step)
      self.jsonl = open(path, 'a')
      # tensorboardX names an event file by the second (and opens it with 'wb'), so a run
      # resumed within the second its stopped run started in would truncate that run's file.
      # The suffix, nanoseconds of the same width for centuries, keeps every file apart and
      # sorted by its start, the order TensorBoard reads them in (its purge below relies on it).
      self.tensorboard = EventsWriter(
        os.path.join(directory, 'events'), filename_suffix=f'.{time.time_ns()}.{os.getpid()}'
      )
      # TensorBoard's purge: it hides the events of the steps from here on that earlier event
      # files hold (this run writes them again), as the lines dropped from metrics.jsonl.
      self.tensorboard.write_event(
        event_pb2.Event(
          step=start_step + 1,
          wall_time=time.time(),
          session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START),
        )
      )
      self.tensorboard.flush()

  def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    with _writing(self.directory):
      for name, value in metrics.items():
        summary = scalar(f'{split}/{name}', value)
        self.tensorboard.write_event(
          event_pb2.Event(summary=summary, step=step, wall_time=time.time())
        )
      self.tensorboard.flush()
      self.jsonl.write(json.dumps({'step': step, 'split': split, **metrics}) + '\n')
      self.jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self.enabled = False
      with _writing(self.directory):
        try:
          self.jsonl.close()
        finally:
          self.tensorboard.close()

  def __enter__(self) -> 'MetricWriter':
    return self

  def __exit__(self, kind, error, traceback) -> None:
    try:
      self.close()
    except (OSError, WriteError):
      if error is None:
        raise  # otherwise the error already on its way is the one to report


def _keep_lines_until(path: str, start_step: int) -> None:
  """Rewrites ``metrics.jsonl`` with the lines up to ``start_step``, whole or not at all."""
  with open(path) as f:
    lines = f.read().splitlines(keepends=True)
  kept = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      step = json.loads(line)['step']
    except (ValueError, KeyError, TypeError):
      if number == len(lines):
        print(
          f'warning: {path}: dropped its last line, which a stopped process left unfinished '
          f'({line.strip()[:80]!r})',
          file=sys.stderr,
        )
        continue
      print(
        f'warning: {path}: line {number} is not a metrics record; kept as it is', file=sys.stderr
      )
      kept.append(line if line.endswith('\n') else line + '\n')
      continue
    if step <= start_step:
      kept.append(line if line.endswith('\n') else line + '\n')
  replace_whole(path, ''.join(kept))


@contextlib.contextmanager
def _writing(directory: str) -> Iterator[None]:
  try:
    yield
  except OSError as error:
    raise WriteError(
      f'cannot write the metrics in {directory} ({reason(error)}); no checkpoint was touched. '
      f'{FIX_THE_CAUSE} and run the same command to resume'
    ) from error
