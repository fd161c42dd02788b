"""How runs end when something goes wrong: a busy or unwritable run directory, damaged
checkpoints, a diverging loss, SIGINT and SIGTERM.

Each test checks what a user sees (exit status, one line on stderr, no traceback) and what stays
on disk. Runs are tiny (WRN-10-1 on digits, batches of 8).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.train_helpers import (
  REPOSITORY,
  TINY,
  assert_trees_close,
  checkpoint_steps,
  directory_snapshot,
  final_state,
  program,
  run_main,
)
from train import checkpoints
from train import config as config_lib

SAVE_EVERY_STEP = [*TINY, '--save_freq=1', '--max_to_keep=3', '--report_freq=1']
SUBPROCESS_TIMEOUT_S = 120


@pytest.fixture(scope='module')
def three_steps(tmp_path_factory):
  """A run with checkpoints at steps 1, 2 and 3."""
  path = tmp_path_factory.mktemp('three_steps')
  assert run_main([*SAVE_EVERY_STEP, '--max_steps=3', f'--train_path={path}']) == 0
  return path


@pytest.fixture(scope='module')
def four_steps(tmp_path_factory):
  """The same run straight to step 4: what every resumed run must equal bit for bit."""
  path = tmp_path_factory.mktemp('four_steps')
  assert run_main([*SAVE_EVERY_STEP, '--max_steps=4', f'--train_path={path}']) == 0
  return final_state(path)


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
# Damaged checkpoints.


def _truncate_arrays(step_dir):
  for root, _, names in os.walk(step_dir / 'state'):
    for name in names:
      if os.path.basename(root) == 'd':
        path = os.path.join(root, name)
        os.truncate(path, os.path.getsize(path) // 2)


DAMAGE = {
  'truncated arrays': _truncate_arrays,
  'no array metadata': lambda step_dir: os.remove(step_dir / 'state' / '_METADATA'),
  'no state': lambda step_dir: shutil.rmtree(step_dir / 'state'),
  'unreadable config': lambda step_dir: (step_dir / 'config' / 'metadata').write_text('{'),
}


@pytest.mark.parametrize('damage', list(DAMAGE))
def test_damaged_newest_checkpoint_is_moved_aside_and_the_run_resumes_from_the_previous(
  tmp_path, three_steps, four_steps, capsys, damage
):
  run = _copy(three_steps, tmp_path)
  DAMAGE[damage](run / 'checkpoints' / '3')
  code, out, err = run_main([*SAVE_EVERY_STEP, '--max_steps=4', f'--train_path={run}'], capsys)
  assert code == 0, err
  assert 'Traceback' not in err and 'Event loop is closed' not in err
  warnings = [line for line in err.splitlines() if 'is damaged' in line]
  assert len(warnings) == 1, err
  assert warnings[0].startswith(f'warning: checkpoint {run}/checkpoints/3 is damaged')
  moved = os.listdir(run / 'checkpoints.damaged')
  assert len(moved) == 1 and moved[0].startswith('3-')
  assert f'moved to {run}/checkpoints.damaged/{moved[0]}' in warnings[0]
  # Kept as it was; not counted toward --max_to_keep=3 (step 2 survives); step 3 saved anew.
  assert 'commit_success.txt' in os.listdir(run / 'checkpoints.damaged' / moved[0])
  assert checkpoint_steps(run) == [2, 3, 4]
  assert_trees_close(final_state(run), four_steps, rtol=0, atol=0)
  assert out.strip().splitlines()[-1].endswith('steps=4')


def test_no_intact_checkpoint_is_its_own_error(tmp_path, three_steps, capsys):
  run = _copy(three_steps, tmp_path)
  for step in (1, 2, 3):
    shutil.rmtree(run / 'checkpoints' / str(step) / 'config')
  code, out, err = run_main([*SAVE_EVERY_STEP, '--max_steps=4', f'--train_path={run}'], capsys)
  assert code == 4 and not out
  line = _one_error_line(err)
  assert line.startswith(f'error: no intact checkpoint in {run}/checkpoints (damaged: step 3, 2, 1')
  assert 'run again to start from step 0' in line
  assert len(os.listdir(run / 'checkpoints.damaged')) == 3
  assert checkpoint_steps(run) == []
  # As it says: the next start trains from step 0.
  assert run_main([*SAVE_EVERY_STEP, '--max_steps=1', f'--train_path={run}']) == 0
  assert checkpoint_steps(run) == [1]


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
  """An intact checkpoint that another version of the program wrote is refused, not moved."""
  directory = str(tmp_path / 'checkpoints')
  with checkpoints.checkpoint_manager(directory, max_to_keep=1) as manager:
    checkpoints.save(manager, 1, {'a': np.ones(3), 'b': np.zeros(2)}, {'depth': 10})
  with checkpoints.checkpoint_manager(directory, max_to_keep=1) as manager:
    with pytest.raises(checkpoints.IncompatibleCheckpointError, match='1 differ, e.g. b') as error:
      checkpoints.restore(manager, {'a': np.ones(3)}, lambda saved: None, move_damaged=True)
    assert isinstance(error.value, config_lib.ConfigError)
    assert manager.all_steps() == [1]
    step, restored, settings = checkpoints.restore(
      manager, {'a': np.ones(3), 'b': np.ones(2)}, lambda saved: None, move_damaged=True
    )
  assert step == 1 and restored['b'].tolist() == [0.0, 0.0] and settings == {'depth': 10}


# ---------------------------------------------------------------------------------------------
# Divergence.


@pytest.mark.parametrize(('save_freq', 'kept'), [(2, [2]), (100, [])])
def test_divergence_stops_the_run_at_the_step_and_keeps_the_last_good_checkpoint(
  tmp_path, capsys, save_freq, kept
):
  """SGD at a rate of 1e10 overflows at step 3; its loss is read at the next report or save."""
  code, out, err = run_main(
    [
      *TINY,
      '--optimizer=sgd',
      '--learnRate=1e10',
      '--num_devices=1',
      '--max_steps=20',
      '--report_freq=5',
      f'--save_freq={save_freq}',
      f'--train_path={tmp_path}',
    ],
    capsys,
  )
  assert code == 3 and not out
  line = _one_error_line(err)
  assert line.startswith('error: training diverged at step 3 (loss=nan)'), err
  assert (f'the newest checkpoint is step {kept[0]}' if kept else 'no checkpoint') in line
  assert checkpoint_steps(tmp_path) == kept
  assert not (tmp_path / 'summary.json').exists()
  for record in (tmp_path / 'metrics.jsonl').read_text().splitlines():
    assert all(np.isfinite(v) for v in json.loads(record).values() if isinstance(v, float))


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


def test_evaluating_a_damaged_checkpoint_moves_nothing(tmp_path, three_steps, capsys):
  run = _copy(three_steps, tmp_path)
  _truncate_arrays(run / 'checkpoints' / '3')
  code, out, err = run_main(['--task=test', f'--load={run}/checkpoints/3', '--verbose=0'], capsys)
  assert code == 4 and not out
  assert f'warning: checkpoint {run}/checkpoints/3 is damaged' in err
  line = _one_error_line(err)
  assert line.startswith(f'error: no intact checkpoint in {run}/checkpoints (damaged: step 3)')
  assert line.endswith('choose another --load')
  # A run directory: its newest intact checkpoint, step 2.
  code, out, err = run_main(['--task=test', f'--load={run}', '--verbose=0'], capsys)
  assert code == 0 and out.strip().splitlines()[-1].endswith('steps=2')
  assert f'warning: checkpoint {run}/checkpoints/3 is damaged' in err
  assert checkpoint_steps(run) == [1, 2, 3] and not (run / 'checkpoints.damaged').exists()
