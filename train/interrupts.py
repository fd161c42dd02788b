"""SIGINT and SIGTERM as requests to stop at the next step boundary.

While :func:`deferred` is active, the first SIGINT (Ctrl-C) or SIGTERM (what a scheduler sends
before it stops a job) is only recorded; the training loop sees it after the step in flight,
saves a checkpoint of that step and raises :class:`Interrupted`, and the program exits with
``128 + signal number`` (130, 143). A second signal acts at once, as it would without the handler.
"""

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
  """The run stopped on a signal after saving a checkpoint of the current step."""

  def __init__(self, signum: int, step: int, directory: str):
    self.signum, self.step = signum, step
    name = signal.Signals(signum).name
    super().__init__(
      f'stopped by {name} at step {step}; checkpoint saved in {directory}, run the same command '
      'to resume'
    )

  @property
  def exit_code(self) -> int:
    return 128 + self.signum


class StopRequest:
  """The signal received while :func:`deferred` was active, if any."""

  signum: int | None = None


@contextlib.contextmanager
def deferred() -> Iterator[StopRequest]:
  """Records SIGINT/SIGTERM in the returned request instead of acting on them.

  Outside the main thread (where Python cannot handle signals) the request never fills.
  """
  request = StopRequest()
  if threading.current_thread() is not threading.main_thread():
    yield request
    return
  previous = {signum: signal.getsignal(signum) for signum in SIGNALS}

  def record(signum, frame):
    request.signum = signum
    signal.signal(signum, previous[signum])  # a second one acts at once

  for signum in SIGNALS:
    signal.signal(signum, record)
  try:
    yield request
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)
