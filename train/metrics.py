"""Training and test metrics: the per-step window, and where the numbers go.

The training step returns its loss and error as device scalars; :class:`TrainWindow` keeps them
until a report, a test evaluation or a checkpoint, then reads them all at once, so that no step
waits for the host. :class:`MetricWriter` writes TensorBoard scalars (tensorboardX) and the same
numbers to ``<run>/metrics.jsonl``, one JSON object a line, which a notebook reads with ``json``.
"""

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from tensorboardX import SummaryWriter

from train import parallel as parallel_lib


class TrainWindow:
  """The metrics of the steps since the last report, as device arrays."""

  def __init__(self):
    self._clear()

  def _clear(self) -> None:
    self.steps: list[int] = []
    self.metrics: list[Mapping[str, Any]] = []
    self._host: list[Mapping[str, float]] = []

  def append(self, step: int, metrics: Mapping[str, Any]) -> None:
    self.steps.append(step)
    self.metrics.append(metrics)

  def first_non_finite(self) -> tuple[int, float] | None:
    """``(step, loss)`` of the first step whose loss is NaN or infinite, if any."""
    self._read()
    for step, metrics in zip(self.steps, self._host, strict=True):
      if not math.isfinite(metrics['loss']):
        return step, metrics['loss']
    return None

  def summary(self) -> dict[str, float]:
    """The mean of each metric over the window, which then starts afresh."""
    self._read()
    means = {name: float(np.mean([m[name] for m in self._host])) for name in self._host[0]}
    self._clear()
    return means

  def _read(self) -> None:
    self._host += [parallel_lib.first_copy(m) for m in self.metrics[len(self._host) :]]


class MetricWriter:
  """TensorBoard scalars plus ``metrics.jsonl`` (``{"step", "split", name: value, ...}`` lines).

  A resumed run first drops the lines logged after its checkpoint (``start_step``), which the
  interrupted run wrote and this one is about to write again. ``enabled=False`` (processes other
  than the first) writes nothing.
  """

  def __init__(self, directory: str, *, enabled: bool, start_step: int = 0):
    self.enabled = enabled
    if not enabled:
      return
    path = os.path.join(directory, 'metrics.jsonl')
    if os.path.exists(path):
      with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)['step'] <= start_step]
      with open(path, 'w') as f:
        f.writelines(kept)
    self.jsonl = open(path, 'a')
    self.tensorboard = SummaryWriter(directory)

  def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    for name, value in metrics.items():
      self.tensorboard.add_scalar(f'{split}/{name}', value, step)
    self.jsonl.write(json.dumps({'step': step, 'split': split, **metrics}) + '\n')
    self.jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self.tensorboard.close()
      self.jsonl.close()
