"""SIGINT and SIGTERM as requests to stop at the next step boundary.

While :func:`deferred` is active, the first SIGINT (Ctrl-C) or SIGTERM (what a scheduler sends
before it stops a job) is only recorded; the training loop sees it after the step in flight,
saves a checkpoint of that step and raises :class:`Interrupted`, and the program exits with
``128 + signal number`` (130, 143). A second signal, of either kind, ends the process at once
with the same status and a one-line message, without saving: the newest checkpoint is complete
(a save cut short leaves only Orbax's temporary directory, removed at the next start).

Python runs a signal handler only when its main thread executes Python code, and merges signals
that arrive while it waits in compiled code, a save or a collective. The second signal is
therefore counted by a small thread that reads the signal numbers which Python's C-level handler
writes, one byte per signal, to :func:`signal.set_wakeup_fd`.
"""

import contextlib
import os
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
    request.signum = request.signum or signum

  read_end, write_end = os.pipe()
  os.set_blocking(write_end, False)
  previous_wakeup = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
  counter = threading.Thread(target=_end_on_second_signal, args=(read_end,), daemon=True)
  counter.start()
  for signum in SIGNALS:
    signal.signal(signum, record)
  try:
    yield request
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)
    signal.set_wakeup_fd(previous_wakeup)
    os.close(write_end)  # ends the counter
    counter.join()
    os.close(read_end)


def _end_on_second_signal(read_end: int) -> None:
  """Reads the signal numbers written to the wakeup pipe; exits the process at the second."""
  received = 0
  while chunk := os.read(read_end, 16):
    for signum in chunk:
      if signum in SIGNALS:
        received += 1
        if received >= 2:
          os.write(2, b'stopped at once by a second signal, without saving\n')
          os._exit(128 + signum)
