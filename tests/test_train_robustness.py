"""How runs end when something goes wrong: a busy or unwritable run directory, a save cut short,
a checkpoint of another state layout, an unreadable checkpoint given to ``--task=test``, SIGINT
and SIGTERM. The faults of long runs (divergence, changed settings, damaged files, failed writes,
odd paths, two processes) are in ``test_faults.py``.

Each test checks what a user sees (exit status, one line on stderr, no traceback) and what stays
on disk. Runs are tiny (WRN-10-1 on digits, batches of 8).
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.train_helpers import (
  REPOSITORY,
  SUBPROCESS_TIMEOUT_S,
  TINY,
  assert_trees_close,
  checkpoint_steps,
  compilation_cache,
  directory_snapshot,
  final_state,
  program,
  run_main,
  shared_run,
)
from train import checkpoints
from train import config as config_lib
from train import train as train_lib

SAVE_EVERY_STEP = [*TINY, '--save_freq=1', '--max_to_keep=3', '--report_freq=1']


@pytest.fixture(scope='module', autouse=True)
def _compilation_cache():
  with compilation_cache():
    yield


@pytest.fixture(scope='module')
def three_steps():
  """A run with checkpoints at steps 1, 2 and 3 (shared; copy it to change it)."""
  return shared_run(*SAVE_EVERY_STEP, '--max_steps=3')


@pytest.fixture(scope='module')
def four_steps():
  """The same run straight to step 4: what every resumed run must equal bit for bit."""
  return final_state(shared_run(*SAVE_EVERY_STEP, '--max_steps=4'))


def _copy(run, tmp_path):
  target = tmp_path / 'run'
  shutil.copytree(run, target)
  return target


def _one_error_line(err):
  lines = err.strip().splitlines()
  assert 'Traceback' not in err, err
  return lines[-1]


# ---------------------------------------------------------------------------------------------
# One run per run directory.


def _hold_lock(path):
  """A process that holds ``path``'s lock until it is killed, as a running run does."""
  code = (
    'import sys, time\n'
    'from train import workdir\n'
    'with workdir.locked(sys.argv[1]):\n'
    "  print('locked', flush=True)\n"
    '  time.sleep(600)\n'
  )
  holder = subprocess.Popen(
    [sys.executable, '-c', code, str(path)],
    cwd=REPOSITORY,
    stdout=subprocess.PIPE,
    text=True,
  )
  assert holder.stdout.readline().strip() == 'locked'
  return holder


def test_second_process_on_a_busy_run_directory_refuses_and_touches_nothing(
  tmp_path, three_steps, capsys
):
  run = _copy(three_steps, tmp_path)
  holder = _hold_lock(run)
  try:
    before = directory_snapshot(run)
    code, out, err = run_main(
      [*SAVE_EVERY_STEP, '--max_steps=5', '--learnRate=0.2', f'--train_path={run}'], capsys
    )
    assert code == 5
    line = _one_error_line(err)
    assert line == err.strip() and not out
    assert line.startswith(f'error: the run directory {run} is in use by process {holder.pid}')
    assert directory_snapshot(run) == before
  finally:
    holder.kill()
    holder.wait()
    holder.stdout.close()
  # The lock died with its process: the next run proceeds.
  assert run_main([*SAVE_EVERY_STEP, '--max_steps=4', f'--train_path={run}']) == 0
  assert checkpoint_steps(run) == [2, 3, 4]


def test_unwritable_run_directory_is_found_before_training(tmp_path, capsys):
  (tmp_path / 'file').write_text('not a directory')
  code, out, err = run_main([*TINY, f'--train_dir={tmp_path / "file"}'], capsys)
  assert code == 2 and not out
  assert _one_error_line(err).startswith(f'error: cannot write the run directory {tmp_path}')

  read_only = tmp_path / 'read_only'
  read_only.mkdir(mode=0o555)
  if os.access(read_only, os.W_OK):  # root writes anyway
    return
  code, _, err = run_main([*TINY, f'--train_dir={read_only}'], capsys)
  assert code == 2 and 'cannot write the run directory' in err


# ---------------------------------------------------------------------------------------------
# Checkpoints.


def _truncate_arrays(step_dir):
  for root, _, names in os.walk(step_dir / 'state'):
    for name in names:
      if os.path.basename(root) == 'd':
        path = os.path.join(root, name)
        os.truncate(path, os.path.getsize(path) // 2)


def test_interrupted_save_leaves_no_trace(tmp_path, three_steps, four_steps):
  """A save killed half-way leaves Orbax's temporary directory: ignored, then removed."""
  run = _copy(three_steps, tmp_path)
  partial = run / 'checkpoints' / '4.orbax-checkpoint-tmp-1234567'
  (partial / 'state').mkdir(parents=True)
  assert run_main([*SAVE_EVERY_STEP, '--max_steps=4', f'--train_path={run}']) == 0
  assert not partial.exists()
  assert checkpoint_steps(run) == [2, 3, 4]
  assert_trees_close(final_state(run), four_steps, rtol=0, atol=0)


def test_checkpoint_of_another_state_layout_is_not_damaged(tmp_path):
  """An intact checkpoint whose arrays differ from the state's is refused, not moved; one that
  differs only where a state holds no arrays (an optimizer step that keeps none) restores."""
  directory = str(tmp_path / 'checkpoints')
  with checkpoints.checkpoint_manager(directory, max_to_keep=1) as manager:
    saved = {'a': np.ones(3), 'b': np.zeros(2), 'c': [(), {'d': np.arange(2)}]}
    checkpoints.save(manager, 1, saved, {'depth': 10})
  with checkpoints.checkpoint_manager(directory, max_to_keep=1) as manager:
    with pytest.raises(
      checkpoints.IncompatibleCheckpointError, match=r'\(1 differ, e.g. b \(2,\)'
    ) as error:
      checkpoints.restore(
        manager,
        {'a': np.ones(3), 'c': [None, {'d': np.arange(2)}]},
        lambda saved: [],
        move_damaged=True,
      )
    assert isinstance(error.value, config_lib.ConfigError)
    assert 'another version of the program wrote it' in str(error.value)
    assert manager.all_steps() == [1]
    target = {'a': np.ones(3), 'b': np.ones(2), 'c': [{}, {'d': np.ones(2, int)}]}
    step, restored, settings = checkpoints.restore(
      manager, target, lambda saved: [], move_damaged=True
    )
  assert step == 1 and settings == {'depth': 10}
  assert restored['b'].tolist() == [0.0, 0.0] and restored['c'][1]['d'].tolist() == [0, 1]
  assert restored['c'][0] == {}


# ---------------------------------------------------------------------------------------------
# Signals.


def _interrupt(tmp_path, signum, flags):
  """Starts a long run, sends ``signum`` once it logged two steps; returns (process, stderr)."""
  run = program(*flags, '--max_steps=5000', f'--train_path={tmp_path}')
  metrics = tmp_path / 'metrics.jsonl'
  deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
  while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
    assert run.poll() is None, run.communicate()
    assert time.monotonic() < deadline, 'the run logged nothing'
    time.sleep(0.1)
  run.send_signal(signum)
  _, err = run.communicate(timeout=SUBPROCESS_TIMEOUT_S)
  return run, err


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_the_current_step_and_the_next_start_resumes_exactly(tmp_path, signum):
  flags = [*TINY, '--num_devices=1', '--optimizer=sgdg', '--keep_prob=0.5', '--report_freq=1']
  run, err = _interrupt(tmp_path / 'resumed', signum, [*flags, '--save_freq=1000'])
  assert run.returncode == 128 + signum, err
  line = _one_error_line(err)
  assert line.startswith(f'stopped by {signal.Signals(signum).name} at step '), err
  step = int(line.split(' at step ')[1].split(';')[0])
  assert step >= 2 and checkpoint_steps(tmp_path / 'resumed') == [step]
  if signum != signal.SIGINT:
    return  # one exact comparison is enough
  for name in ('resumed', 'straight'):
    path = tmp_path / name
    assert run_main([*flags, f'--max_steps={step + 2}', f'--train_path={path}']) == 0
  resumed, straight = final_state(tmp_path / 'resumed'), final_state(tmp_path / 'straight')
  assert int(resumed['step']) == step + 2
  assert_trees_close(resumed, straight, rtol=0, atol=0)


def _program_interrupting_itself(setup: str, run: Path) -> subprocess.CompletedProcess:
  """Runs ``python -m train`` on ``run`` after ``setup``, which sends the process a SIGINT."""
  code = (
    f'import os, runpy, signal, sys\n{setup}'
    "sys.argv = ['train', *sys.argv[1:]]\n"
    "runpy.run_module('train', run_name='__main__', alter_sys=True)\n"
  )
  return subprocess.run(
    [sys.executable, '-c', code, *TINY, f'--train_path={run}'],
    cwd=REPOSITORY,
    capture_output=True,
    text=True,
    timeout=SUBPROCESS_TIMEOUT_S,
  )


def test_sigint_outside_the_training_loop_ends_in_one_line(tmp_path, capsys, monkeypatch):
  """Ctrl-C while the program imports and starts (or evaluates): exit 130 and one line, in a
  process of its own and from Python."""
  expected = 'stopped by SIGINT outside the training loop; nothing was saved'
  # The signal arrives while the program imports JAX, seconds before the training loop.
  process = _program_interrupting_itself(
    'import builtins\n'
    'real_import = builtins.__import__\n'
    'def importing(name, *args, **kwargs):\n'
    "  if name == 'jax':\n"
    '    os.kill(os.getpid(), signal.SIGINT)\n'
    '  return real_import(name, *args, **kwargs)\n'
    'builtins.__import__ = importing\n',
    tmp_path / 'run',
  )
  assert process.returncode == 130, process.stderr
  assert process.stderr.strip() == expected and not process.stdout
  assert not (tmp_path / 'run').exists()

  # And while it restores and loads the data, after it took the run directory: no step is
  # trained or saved (not the first step, trained and saved as if the signal came in the loop).
  process = _program_interrupting_itself(
    'from train import train\n'
    'load = train._load_dataset\n'
    'def loading(config):\n'
    '  os.kill(os.getpid(), signal.SIGINT)\n'
    '  return load(config)\n'
    'train._load_dataset = loading\n',
    tmp_path / 'started',
  )
  assert process.returncode == 130, process.stderr
  assert process.stderr.strip() == expected and not process.stdout
  assert checkpoint_steps(tmp_path / 'started') == []

  def interrupted(config):
    raise KeyboardInterrupt

  monkeypatch.setattr(train_lib, 'train_and_evaluate', interrupted)
  assert run_main(TINY, capsys) == (130, '', expected + '\n')


def test_evaluating_a_damaged_checkpoint_moves_nothing(tmp_path, three_steps, capsys):
  run = _copy(three_steps, tmp_path)
  _truncate_arrays(run / 'checkpoints' / '3')
  code, out, err = run_main(['--task=test', f'--load={run}/checkpoints/3', '--verbose=0'], capsys)
  assert code == 4 and not out
  assert f'warning: checkpoint {run}/checkpoints/3 is damaged: state/' in err
  line = _one_error_line(err)
  assert line == (
    f'error: no intact checkpoint in {run}/checkpoints (tried step 3, each reported above); '
    'nothing was moved or deleted; choose another --load'
  )
  # A run directory: its newest intact checkpoint, step 2.
  code, out, err = run_main(['--task=test', f'--load={run}', '--verbose=0'], capsys)
  assert code == 0 and out.strip().splitlines()[-1].endswith('steps=2')
  assert f'warning: checkpoint {run}/checkpoints/3 is damaged: state/' in err
  assert checkpoint_steps(run) == [1, 2, 3] and not (run / 'checkpoints.damaged').exists()


def test_evaluating_a_checkpoint_whose_test_loss_is_not_finite_fails(
  three_steps, capsys, monkeypatch
):
  """``--task=test`` never prints a final line for a NaN loss: it exits 3 naming the checkpoint."""
  evaluate = train_lib.evaluate

  def nan_loss(*args, **kwargs):
    return {**evaluate(*args, **kwargs), 'loss': float('nan')}

  monkeypatch.setattr(train_lib, 'evaluate', nan_loss)
  code, out, err = run_main(['--task=test', f'--load={three_steps}', '--verbose=0'], capsys)
  assert code == 3 and not out
  assert _one_error_line(err) == f'error: checkpoint step 3 in {three_steps}: test loss=nan'
