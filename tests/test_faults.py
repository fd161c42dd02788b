"""Faults that a long run meets, provoked on a tiny model: what the program does, and that the
newest checkpoint then resumes.

Each test checks the exit status, the one line on stderr and what stays on disk; the table of
docs/training.md lists the same faults. Runs are WRN-10-1 on digits, batches of 8, a few steps,
through one persistent compilation cache. Subprocesses only where a real process is needed: two
signals, ``kill -9``, a file-size limit, a read-only folder, two processes.
"""

import errno
import json
import os
import shutil
import signal
import socket
import struct
import sys
import time

import pytest

from tests.train_helpers import (
  TINY,
  assert_trees_close,
  checkpoint_steps,
  compilation_cache,
  directory_snapshot,
  final_state,
  program,
  run_main,
  shared_run,
  unprivileged,
)
from train import checkpoints, input_pipeline, metrics, workdir
from train import config as config_lib
from train import train as train_lib

SAVE_EVERY_STEP = [*TINY, '--save_freq=1', '--max_to_keep=3', '--report_freq=1']
TIMEOUT_S = 120


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


def _last_line(err):
  """The last line of stderr, which must be the only error line: no traceback above it."""
  assert 'Traceback' not in err, err
  return err.strip().splitlines()[-1]


def _flip_byte(path, offset=None):
  data = bytearray(path.read_bytes())
  offset = len(data) // 2 if offset is None else offset
  data[offset] ^= 0x40
  path.write_bytes(bytes(data))


def _largest_file(step_dir):
  return max((path for path in step_dir.rglob('*') if path.is_file()), key=os.path.getsize)


def _communicate(process):
  try:
    return process.communicate(timeout=TIMEOUT_S)
  finally:
    process.kill()


def _wait_for(condition, process, what):
  deadline = time.monotonic() + TIMEOUT_S
  while not condition():
    assert process.poll() is None, process.communicate()
    assert time.monotonic() < deadline, f'the run did not reach {what}'
    time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# Divergence.


@pytest.mark.parametrize(
  ('flags', 'advice'),
  [
    ({'optimizer': 'adamg', 'grad_clip': None}, True),
    ({'optimizer': 'adamg', 'grad_clip': 0.1}, False),  # already set
    ({'optimizer': 'sgd', 'grad_clip': None}, False),  # clips the manifold's gradient only
  ],
)
def test_the_divergence_advice_names_only_flags_that_can_help(flags, advice):
  class Manager:
    directory = '/runs/a/checkpoints'

    def latest_step(self):
      return None

  config = config_lib.get_config(**flags)
  message = str(train_lib._diverged(config, Manager(), 5, 'training loss=nan'))
  assert message.startswith('training diverged at step 5 (training loss=nan); no checkpoint')
  assert ('--grad_clip' in message) == advice, message
  assert ('--learnRateG' in message) == (flags['optimizer'] != 'sgd'), message
  # A run that started from --load starts from it again, not afresh.
  loaded = str(
    train_lib._diverged(config_lib.get_config(**flags, load='/runs/b'), Manager(), 5, '-')
  )
  assert '; the run started from --load=/runs/b; to start from it again, run again' in loaded
  assert 'afresh' not in loaded and '--allow_changed=learnRate' in loaded


def test_a_diverging_run_keeps_a_checkpoint_that_resumes(tmp_path, three_steps, four_steps, capsys):
  """Adam-G at a rate of 1e10 overflows the BatchNorm variance at step 5; step 4, finite but
  already lost (its next step is not), is not saved either."""
  run = _copy(three_steps, tmp_path)
  rates = ['--learnRate=1e10', '--learnRateG=1e10', '--allow_changed=learnRate,learnRateG']
  code, out, err = run_main(
    [*SAVE_EVERY_STEP, '--max_steps=8', *rates, f'--train_path={run}'], capsys
  )
  assert code == 3 and not out
  line = _last_line(err)
  assert line.startswith('error: training diverged at step 5 (non-finite BatchNorm statistics')
  assert f'the newest checkpoint in {run}/checkpoints is step 3' in line
  assert '--allow_changed=learnRate,learnRateG; if the training loss had already grown' in line
  assert line.endswith('that state is lost too: train anew with lower rates in a new --train_path')
  assert '--grad_clip' not in line  # it is set
  assert checkpoint_steps(run) == [1, 2, 3]
  assert train_lib.non_finite_arrays(final_state(run)) == ''
  # The earlier run's summary is gone: it would describe a result that this run did not reach.
  assert not (run / 'summary.json').exists()
  # It resumes: with the rates it had, exactly as the run that never diverged.
  assert run_main([*SAVE_EVERY_STEP, '--max_steps=4', f'--train_path={run}']) == 0
  assert_trees_close(final_state(run), four_steps, rtol=0, atol=0)


def test_a_run_whose_last_state_is_not_finite_never_exits_0(tmp_path, capsys):
  rates = ['--learnRate=1e10', '--learnRateG=1e10']  # those of the test above: no new compilation
  code, out, err = run_main(
    [*SAVE_EVERY_STEP, '--max_steps=2', *rates, f'--train_path={tmp_path}'], capsys
  )
  assert code == 3 and not out
  line = _last_line(err)
  assert line.startswith('error: training diverged at step 2 (non-finite BatchNorm statistics')
  assert 'no checkpoint was saved' in line and 'to start afresh' in line
  assert checkpoint_steps(tmp_path) == [] and not (tmp_path / 'summary.json').exists()


# ---------------------------------------------------------------------------------------------
# Settings changed on resume.


def test_a_changed_training_setting_is_refused_by_name_until_allowed(tmp_path, three_steps, capsys):
  """A decay switched on and one switched off: refused with both named, then allowed."""
  run = _copy(three_steps, tmp_path)
  before = directory_snapshot(run, exclude=['lock'])
  changes = ['--biasDecay=0.0005', '--weightDecay=None']
  code, out, err = run_main(
    [*SAVE_EVERY_STEP, '--max_steps=4', *changes, f'--train_path={run}'], capsys
  )
  assert code == 2 and not out
  line = _last_line(err)
  assert line == err.strip()
  assert '(--weightDecay=0.0005 -> None; --biasDecay=None -> 0.0005)' in line
  assert 'add --allow_changed=weightDecay,biasDecay' in line
  assert directory_snapshot(run, exclude=['lock']) == before  # nothing moved, nothing written
  code, out, err = run_main(
    [*SAVE_EVERY_STEP, '--max_steps=4', *changes, '--allow_changed=weightDecay,biasDecay']
    + [f'--train_path={run}'],
    capsys,
  )
  assert code == 0, err
  assert err.strip() == (
    'note: continuing with changed settings (--allow_changed): weightDecay: 0.0005 -> None; '
    'biasDecay: None -> 0.0005'
  )
  assert checkpoint_steps(run) == [2, 3, 4]
  saved = checkpoints.load(str(run))[2]
  assert (saved['weightDecay'], saved['biasDecay']) == (None, 0.0005)


def test_settings_that_shape_training_are_compared_and_the_others_are_free():
  saved = config_lib.to_json(config_lib.get_config(), 10)
  free = config_lib.get_config(
    max_steps=7, report_freq=3, save_freq=2, vali_batch_size=50, train_path='/elsewhere', k=3
  )
  assert config_lib.check_resume(saved, free) == []
  with pytest.raises(config_lib.ConfigError, match=r'\(--adam_beta2=0.99 -> 0.9; --seed=0 -> 1\)'):
    config_lib.check_resume(saved, config_lib.get_config(adam_beta2=0.9, seed=1))
  allowed = config_lib.get_config(
    adam_eps=1e-3, nesterov=False, allow_changed=('adam_eps', 'nesterov')
  )
  assert config_lib.check_resume(saved, allowed) == [
    'nesterov: True -> False',
    'adam_eps: 1e-08 -> 0.001',
  ]
  # The step counter, the schedule and the data position count batches: never another size,
  # and --allow_changed cannot name it.
  with pytest.raises(
    config_lib.ConfigError, match=r'--batch_size=64, this run has --batch_size=8: its step counter'
  ) as error:
    config_lib.check_resume(saved, config_lib.get_config(batch_size=8))
  assert str(error.value).endswith(
    'continue with --batch_size=64, or train with the new batch size from step 0 in a new run '
    'directory (--train_path, without --load)'
  )
  with pytest.raises(config_lib.ConfigError, match='--allow_changed=batch_size: a resumed run'):
    config_lib.get_config(batch_size=8, allow_changed=('batch_size',))
  with pytest.raises(config_lib.ConfigError, match='--allow_changed=depth: depth is not a setting'):
    config_lib.get_config(allow_changed=('depth',))
  assert set(config_lib.TRAINING_FIELDS).isdisjoint(config_lib.ARCHITECTURE_FIELDS)


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints.


def test_a_flipped_byte_in_any_file_of_a_checkpoint_is_found(tmp_path, three_steps):
  step_dir = tmp_path / '3'
  shutil.copytree(three_steps / 'checkpoints' / '3', step_dir)
  assert checkpoints.verify_checksums(str(step_dir))
  names = sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob('*') if p.is_file())
  assert checkpoints.CHECKSUMS in names and len(names) > 5
  for name in names:
    original = (step_dir / name).read_bytes()
    _flip_byte(step_dir / name)
    expected = 'malformed|does not match|is missing' if name == checkpoints.CHECKSUMS else name
    with pytest.raises(ValueError, match=expected):
      checkpoints.verify_checksums(str(step_dir))
    (step_dir / name).write_bytes(original)
  (step_dir / names[0]).unlink()
  with pytest.raises(ValueError, match=f'{names[0]} is missing'):
    checkpoints.verify_checksums(str(step_dir))


def _truncate_arrays(step_dir):
  for path in step_dir.rglob('*'):
    if path.is_file() and path.parent.name == 'd':
      os.truncate(path, path.stat().st_size // 2)


def _unverified(damage):
  """Damage with the checksums removed: what the reading itself finds."""

  def apply(step_dir):
    (step_dir / checkpoints.CHECKSUMS).unlink()
    damage(step_dir)

  return apply


DAMAGE = {
  'flipped byte': lambda step_dir: _flip_byte(_largest_file(step_dir / 'state')),
  'truncated arrays': _truncate_arrays,
  'unverified, truncated arrays': _unverified(_truncate_arrays),
  'unverified, no array metadata': _unverified(lambda d: (d / 'state' / '_METADATA').unlink()),
  'unverified, no state': _unverified(lambda d: shutil.rmtree(d / 'state')),
  'unverified, unreadable config': _unverified(
    lambda d: (d / 'config' / 'metadata').write_text('{')
  ),
  'unreadable file': lambda step_dir: _largest_file(step_dir / 'state').chmod(0),
}


@pytest.mark.parametrize('damage', list(DAMAGE))
def test_every_read_failure_falls_back_to_the_previous_checkpoint(
  tmp_path, three_steps, capsys, damage
):
  run = _copy(three_steps, tmp_path)
  if damage == 'unreadable file' and os.geteuid() == 0:
    pytest.skip('root reads any file')
  DAMAGE[damage](run / 'checkpoints' / '3')
  target = final_state(three_steps)
  with checkpoints.checkpoint_manager(str(run / 'checkpoints'), max_to_keep=3) as manager:
    step, state, _ = checkpoints.restore(manager, target, lambda saved: [], move_damaged=True)
    assert step == 2 and list(manager.all_steps()) == [1, 2]
  err = capsys.readouterr().err
  assert 'Traceback' not in err and 'Event loop is closed' not in err, err
  warning, moved = err.strip().splitlines()
  assert warning.startswith(f'warning: checkpoint {run}/checkpoints/3 ')
  assert ('is damaged: state/' if 'unverified' not in damage else 'cannot be read (its ') in warning
  assert moved.startswith(
    f'warning: moved the unreadable checkpoint 3 to {run}/checkpoints.damaged/3-'
  )
  assert int(state['step']) == 2


def test_a_step_that_vanishes_while_orbax_lists_them_is_listed_again(
  tmp_path, three_steps, monkeypatch
):
  """A live run deletes its oldest checkpoint while a reader's Orbax lists them (seen in CI:
  ``FileNotFoundError`` on the vanished step's metadata): the reader lists them again instead of
  reporting them unreadable; a directory that keeps failing is still reported, by name."""
  run = _copy(three_steps, tmp_path)
  real = checkpoints.ocp.CheckpointManager
  failures = {'left': 2}

  def vanishing(*args, **kwargs):
    if failures['left']:
      failures['left'] -= 1
      raise FileNotFoundError(2, 'No such file or directory', str(run / 'checkpoints' / '1'))
    return real(*args, **kwargs)

  monkeypatch.setattr(checkpoints.ocp, 'CheckpointManager', vanishing)
  with checkpoints.checkpoint_manager(str(run / 'checkpoints')) as manager:
    assert list(manager.all_steps()) == [1, 2, 3]
  assert failures['left'] == 0
  failures['left'] = 100
  with pytest.raises(checkpoints.NoIntactCheckpointError, match='cannot read the checkpoints in'):
    with checkpoints.checkpoint_manager(str(run / 'checkpoints')):
      pass


def test_a_damaged_newest_checkpoint_and_a_cut_metrics_line_cost_nothing(
  tmp_path, three_steps, four_steps, capsys
):
  run = _copy(three_steps, tmp_path)
  _flip_byte(_largest_file(run / 'checkpoints' / '3' / 'state'))
  records = (run / 'metrics.jsonl').read_text()
  with open(run / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 4, "split": "tr')  # a kill in the middle of a line
  code, out, err = run_main([*SAVE_EVERY_STEP, '--max_steps=4', f'--train_path={run}'], capsys)
  assert code == 0, err
  assert out.strip().splitlines()[-1].endswith('steps=4')
  warnings = err.strip().splitlines()
  assert len(warnings) == 3, err
  assert warnings[0].startswith(f'warning: checkpoint {run}/checkpoints/3 is damaged: state/')
  assert warnings[0].endswith('does not match its checksum')
  assert warnings[1].startswith('warning: moved the unreadable checkpoint 3 to ')
  assert warnings[2] == (
    f'warning: {run}/metrics.jsonl: dropped its last line, which a stopped process left '
    """unfinished ('{"step": 4, "split": "tr')"""
  )
  assert checkpoint_steps(run) == [2, 3, 4]
  assert_trees_close(final_state(run), four_steps, rtol=0, atol=0)
  lines = (run / 'metrics.jsonl').read_text().splitlines()
  # The records of steps 1 and 2 are kept; step 3's are written again, and step 4's.
  kept = [line for line in records.splitlines() if json.loads(line)['step'] <= 2]
  assert lines[: len(kept)] == kept
  assert [json.loads(line)['step'] for line in lines[len(kept) :]] == [3, 4, 4]


def test_when_no_checkpoint_can_be_read_nothing_is_moved(tmp_path, three_steps, capsys):
  run = _copy(three_steps, tmp_path)
  for step in (1, 2, 3):
    _flip_byte(_largest_file(run / 'checkpoints' / str(step) / 'state'))
  before = directory_snapshot(run, exclude=['lock'])
  code, out, err = run_main([*SAVE_EVERY_STEP, '--max_steps=4', f'--train_path={run}'], capsys)
  assert code == 4 and not out
  line = _last_line(err)
  assert line == (
    f'error: no intact checkpoint in {run}/checkpoints (tried step 3, 2, 1, each reported above); '
    f'nothing was moved or deleted; start from another checkpoint with --load and a new '
    f'--train_path, or move {run}/checkpoints away to start again from step 0'
  )
  assert len(err.strip().splitlines()) == 4
  assert directory_snapshot(run, exclude=['lock']) == before


# ---------------------------------------------------------------------------------------------
# Failed writes: one line, a non-zero status within seconds, every earlier checkpoint intact.


def test_a_file_in_place_of_the_checkpoints_folder_is_refused(tmp_path, capsys):
  tmp_path.joinpath('checkpoints').write_text('')
  code, out, err = run_main([*TINY, f'--train_path={tmp_path}'], capsys)
  assert code == 2 and not out
  assert (
    _last_line(err)
    == err.strip()
    == (
      f'error: {tmp_path}/checkpoints is in the way: the run keeps its checkpoints there but it is '
      'not a directory; move it away or choose another --train_path'
    )
  )


# ``ulimit -f 256`` for the command that follows (through exec, not a fork of this process).
LIMIT_FILE_SIZE = [
  sys.executable,
  '-c',
  'import os, resource, sys; '
  'resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, resource.RLIM_INFINITY)); '
  'os.execv(sys.argv[1], sys.argv[1:])',
]


def test_a_file_size_limit_during_a_save_ends_the_run_and_keeps_the_checkpoints(
  tmp_path, three_steps, four_steps
):
  """``ulimit -f``: the same failure as a full disk (EFBIG instead of ENOSPC), for any user."""
  run = _copy(three_steps, tmp_path)
  process = program(
    *SAVE_EVERY_STEP, '--max_steps=6', f'--train_path={run}', prefix=LIMIT_FILE_SIZE
  )
  _, err = _communicate(process)
  assert process.returncode == 6, err
  assert _last_line(err) == (
    f'error: cannot write checkpoint 4 in {run}/checkpoints (File too large); the newest '
    'checkpoint is still step 3. Fix the cause (free space, raise the file-size limit, make the '
    'folder writable) and run the same command to resume'
  )
  assert checkpoint_steps(run) == [1, 2, 3]
  assert checkpoints.verify_checksums(str(run / 'checkpoints' / '3'))
  assert run_main([*SAVE_EVERY_STEP, '--max_steps=4', f'--train_path={run}']) == 0
  assert_trees_close(final_state(run), four_steps, rtol=0, atol=0)


def _no_space_to_replace(monkeypatch, suffix: str) -> None:
  """Makes ``os.replace`` of a file whose name ends with ``suffix`` fail as on a full disk."""
  real_replace = os.replace

  def replace(source, target):
    if str(source).endswith(suffix):
      raise OSError(errno.ENOSPC, 'No space left on device')
    return real_replace(source, target)

  monkeypatch.setattr(os, 'replace', replace)


def test_a_summary_that_cannot_be_written_says_that_training_is_done(
  tmp_path, three_steps, monkeypatch, capsys
):
  run = _copy(three_steps, tmp_path)
  _no_space_to_replace(monkeypatch, 'summary.json.tmp')
  code, out, err = run_main([*SAVE_EVERY_STEP, '--max_steps=3', f'--train_path={run}'], capsys)
  assert code == 6 and not out
  assert _last_line(err) == (
    f'error: cannot write {run}/summary.json (No space left on device); training reached step 3, '
    'whose checkpoint is kept. Fix the cause and run the same command: it evaluates that '
    'checkpoint and writes the summary'
  )
  assert not (run / 'summary.json').exists() and not (run / 'summary.json.tmp').exists()
  monkeypatch.undo()
  code, out, _ = run_main([*SAVE_EVERY_STEP, '--max_steps=3', f'--train_path={run}'], capsys)
  assert code == 0 and out.strip().splitlines()[-1].startswith('final: ')
  assert json.loads((run / 'summary.json').read_text())['steps'] == 3


def test_a_full_disk_when_a_run_starts_is_a_write_error_that_names_the_file(
  tmp_path, monkeypatch, capsys
):
  """Not a setting to change (exit 2): the same command works once there is space (exit 6)."""
  real_pwrite = os.pwrite

  def full_disk(descriptor, data, offset):
    if data.startswith(b'process '):  # the lock file's holder
      raise OSError(errno.ENOSPC, 'No space left on device')
    return real_pwrite(descriptor, data, offset)

  monkeypatch.setattr(os, 'pwrite', full_disk)
  code, out, err = run_main([*TINY, f'--train_path={tmp_path}'], capsys)
  assert code == 6 and not out
  assert _last_line(err) == (
    f'error: cannot write {tmp_path}/lock (No space left on device); the run did not start, '
    'nothing was trained or saved. Fix the cause (free space or quota, raise the file-size limit, '
    'check the disk) and run the same command'
  )


def test_a_read_only_checkpoints_folder_is_refused_at_once_and_ends_a_run_that_meets_it(tmp_path):
  prefix = unprivileged()
  if prefix is None:
    pytest.skip('running as root without setpriv: permission bits do not bind')
  flags = [*TINY, '--save_freq=1', '--max_to_keep=2']
  run = tmp_path / 'run'
  process = program(*flags, '--max_steps=100000', f'--train_path={run}', prefix=prefix)
  _wait_for(lambda: (run / 'checkpoints' / '2').is_dir(), process, 'step 2')
  (run / 'checkpoints').chmod(0o555)
  try:
    _check_read_only_runs(run, process, flags, prefix)
  finally:
    (run / 'checkpoints').chmod(0o755)
  # A read-only run directory whose lock and checkpoints can still be written: refused the same
  # way, before a metrics file or summary.json meets it.
  run.chmod(0o555)
  try:
    process = program(*flags, '--max_steps=100000', f'--train_path={run}', prefix=prefix)
    _, err = _communicate(process)
  finally:
    run.chmod(0o755)
  assert process.returncode == 2, err
  assert _last_line(err) == (
    f'error: cannot write {run} (read-only or not permitted); make it writable or choose another '
    '--train_path'
  )


def _check_read_only_runs(run, process, flags, prefix):
  _, err = _communicate(process)
  assert process.returncode == 6, err
  line = _last_line(err)
  assert line.startswith('error: cannot write checkpoint ') and '(Permission denied)' in line
  newest = checkpoint_steps(run)[-1]
  assert f'the newest checkpoint is still step {newest}.' in line
  assert checkpoints.verify_checksums(str(run / 'checkpoints' / str(newest)))
  # Started on the read-only folder, a run stops before it trains.
  process = program(*flags, '--max_steps=100000', f'--train_path={run}', prefix=prefix)
  _, err = _communicate(process)
  assert process.returncode == 2, err
  assert (
    _last_line(err)
    == err.strip()
    == (
      f'error: cannot write {run}/checkpoints (read-only or not permitted); make it writable or '
      'choose another --train_path'
    )
  )


# ---------------------------------------------------------------------------------------------
# Paths, flags, a bad archive.


def test_a_run_directory_named_with_glob_characters_works(tmp_path, capsys):
  run = tmp_path / 'r[1]*x**y?'
  assert run_main([*SAVE_EVERY_STEP, '--max_steps=1', f'--train_path={run}']) == 0
  code, out, err = run_main([*SAVE_EVERY_STEP, '--max_steps=2', f'--train_path={run}'], capsys)
  assert code == 0 and not err, err
  assert out.strip().endswith('steps=2')
  assert checkpoint_steps(run) == [1, 2]
  assert checkpoints.load(str(run))[0] == 2


@pytest.mark.parametrize(
  ('flags', 'message'),
  [
    (['--epochs=1e308'], '--epochs=1e+308 must be a number in (0, 3.403e+38]'),
    (['--epochs=1e30'], '--epochs=1e+30 is 2.339e+31 steps of 1497 digits images at'),
    (['--seed=18446744073709551616'], '--seed=18446744073709551616 must be an integer in [0,'),
    (['--seed=4294967296'], '--seed=4294967296 must be an integer in [0, 4294967295]'),
    (['--decay_epochs=10' + '0' * 23], '--decay_epochs=1' + '0' * 24 + ' must be integers in'),
    (['--decay_epochs=300000000'], '--decay_epochs=300000000 is step 7.017e+09;'),
    (['--model=vgg11', '--width_scale=1e308'], '--width_scale=1e+308 must be at most 4194303'),
    (['--vali_batch_size=' + '1' + '0' * 20], '--vali_batch_size=1' + '0' * 20 + ' must be an'),
    (['--learnRateDecay=1e308'], '--learnRateDecay=1e+308 must be a number in [0, 3.403e+38]'),
    (['--learnRateDecay=1e30'], '--learnRateDecay=1e+30 takes --learnRate=0.05 beyond float32'),
    (['--learnRate=1e39'], '--learnRate=1e+39 must be a number in [0, 3.403e+38] (float32)'),
    (['--adam_beta2=0.99999999999'], '--adam_beta2=0.99999999999 must be in [0, 1), also in'),
    (['--keep_prob=1e-50'], '--keep_prob=1e-50 must be in (0, 1], also in float32'),
    (['--max_steps=3000000000'], '--max_steps=3000000000 must be an integer in [1, 2147483647]'),
    (['--batch_size=5000'], '--batch_size=5000 exceeds the 1497 training images of digits'),
  ],
)
def test_numbers_beyond_what_the_program_can_hold_are_refused(tmp_path, capsys, flags, message):
  code, out, err = run_main([*flags, f'--train_path={tmp_path / "run"}'], capsys)
  assert code == 2 and not out
  assert err.strip() == _last_line(err) and err.startswith(f'error: {message}'), err
  assert not (tmp_path / 'run').exists()


def test_a_truncated_manually_downloaded_archive_is_named(tmp_path):
  manual = tmp_path / 'downloads' / 'manual'
  manual.mkdir(parents=True)
  (manual / 'cifar-10-binary.tar.gz').write_bytes(os.urandom(1000))
  with pytest.raises(input_pipeline.DatasetNotPreparedError) as error:
    input_pipeline.load_dataset('cifar10', data_dir=str(tmp_path), download=False)
  message = str(error.value)
  assert message.startswith(f'the manually downloaded archive {manual}/cifar-10-binary.tar.gz (')
  assert 'the original is 162.17 MiB) is incomplete or damaged' in message
  assert message.endswith(
    'Delete it and download it again from '
    'https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz, then run again'
  )


def test_metrics_keep_every_line_but_an_unfinished_last_one(tmp_path, capsys):
  lines = [json.dumps({'step': step, 'split': 'train', 'loss': 1.0}) + '\n' for step in (1, 2, 3)]
  (tmp_path / 'metrics.jsonl').write_text(''.join(lines) + '{"step": 4, "spl')
  with metrics.MetricWriter(str(tmp_path), enabled=True, start_step=2) as writer:
    writer.write(3, 'train', {'loss': 0.5})
  assert (tmp_path / 'metrics.jsonl').read_text().splitlines() == [
    *[line.strip() for line in lines[:2]],
    '{"step": 3, "split": "train", "loss": 0.5}',
  ]
  assert 'dropped its last line' in capsys.readouterr().err


def test_a_run_resumed_within_the_same_second_keeps_the_earlier_event_file(tmp_path, monkeypatch):
  """tensorboardX names event files by the second: the resumed run's file must not replace the
  stopped run's, and must sort after it (TensorBoard reads them in that order)."""
  monkeypatch.setattr(time, 'time', lambda: 1796670140.0)  # one second for both writers
  with metrics.MetricWriter(str(tmp_path), enabled=True) as writer:
    for step in (1, 2, 3):
      writer.write(step, 'train', {'loss': float(step)})
  with metrics.MetricWriter(str(tmp_path), enabled=True, start_step=2) as writer:
    writer.write(3, 'train', {'loss': 30.0})
    writer.write(4, 'train', {'loss': 40.0})
  assert len(list(tmp_path.glob('events.out.tfevents.1796670140.*'))) == 2
  assert _tensorboard_scalars(tmp_path) == {
    ('train/loss', 1): 1.0,
    ('train/loss', 2): 2.0,
    ('train/loss', 3): 30.0,
    ('train/loss', 4): 40.0,
  }


def test_a_failed_rewrite_of_the_metrics_leaves_no_temporary_file(tmp_path, monkeypatch):
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1, "split": "train", "loss": 1.0}\n')
  _no_space_to_replace(monkeypatch, 'metrics.jsonl.tmp')
  with pytest.raises(workdir.WriteError, match='No space left on device'):
    metrics.MetricWriter(str(tmp_path), enabled=True, start_step=0)
  assert sorted(path.name for path in tmp_path.iterdir()) == ['metrics.jsonl']


def _tensorboard_scalars(run):
  """``{(tag, step): value}`` of the run's event files, read in order as TensorBoard does, with
  its purge: a ``SessionLog.START`` at step ``s`` hides the events of step ``s`` on read before.
  A (tag, step) found twice fails."""
  from tensorboardX.proto import event_pb2

  scalars = {}
  for path in sorted(run.glob('events.out.tfevents.*')):
    data, offset = path.read_bytes(), 0
    while offset < len(data):
      (length,) = struct.unpack('Q', data[offset : offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
      offset += 12 + length + 4  # the length, its checksum, the event, its checksum
      if event.session_log.status == event_pb2.SessionLog.START:
        scalars = {key: value for key, value in scalars.items() if key[1] < event.step}
      for value in event.summary.value:
        assert (value.tag, event.step) not in scalars, (path.name, value.tag, event.step)
        scalars[value.tag, event.step] = value.simple_value
  return scalars


def test_a_resumed_run_logs_what_an_uninterrupted_one_logs(tmp_path):
  """Killed after step 5 with checkpoint 2 left, between two reports (every 3 steps): the
  resumed run's first report averages steps 1 to 3 too, from the sums kept in checkpoint 2, and
  TensorBoard hides the events of steps 3 and 5 that the killed run wrote."""
  flags = [*TINY, '--save_freq=2', '--report_freq=3', '--max_to_keep=3', '--max_steps=5']
  straight = shared_run(*flags)
  run = _copy(straight, tmp_path)
  for step in (4, 5):
    shutil.rmtree(run / 'checkpoints' / str(step))
  assert run_main([*flags, f'--train_path={run}']) == 0
  assert (run / 'metrics.jsonl').read_text() == (straight / 'metrics.jsonl').read_text()
  assert final_state(run)['step'] == 5
  logged = {}
  for line in (run / 'metrics.jsonl').read_text().splitlines():
    record = json.loads(line)
    step, split = record.pop('step'), record.pop('split')
    logged.update({(f'{split}/{name}', step): value for name, value in record.items()})
  scalars = _tensorboard_scalars(run)
  assert sorted(scalars) == sorted(logged)
  assert scalars == pytest.approx(logged, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Beside a live run; kill -9; two signals.


def test_readers_beside_a_live_run_and_its_kill_9(tmp_path, capsys):
  """A run saves every step and deletes the one before; readers always find a whole checkpoint.
  Then ``kill -9``, and the next start resumes from the newest."""
  run = tmp_path / 'run'
  live = program(
    *TINY, '--save_freq=1', '--report_freq=50', '--max_steps=100000', f'--train_path={run}'
  )
  try:
    _wait_for(lambda: len(checkpoint_steps(run)) > 0, live, 'its first checkpoint')
    loaded = []
    while len(set(loaded)) < 3:  # while the run saves two more checkpoints
      loaded.append(checkpoints.load(str(run))[0])
      assert live.poll() is None
    assert loaded == sorted(loaded), loaded
    assert not capsys.readouterr().err
    code, out, err = run_main(['--task=test', f'--load={run}', '--verbose=0'], capsys)
    assert code == 0 and not err, err
  finally:
    live.kill()
    live.communicate()
  newest = checkpoint_steps(run)[-1]
  code, out, err = run_main(
    [*TINY, '--save_freq=1', f'--max_steps={newest + 1}', f'--train_path={run}'], capsys
  )
  assert code == 0 and 'cannot be read' not in err and 'damaged' not in err, err
  assert out.strip().endswith(f'steps={newest + 1}')


def test_a_second_signal_ends_the_run_at_once(tmp_path):
  run = tmp_path / 'run'
  process = program(
    *TINY, '--save_freq=1', '--report_freq=1', '--max_steps=100000', f'--train_path={run}'
  )
  metrics_file = run / 'metrics.jsonl'
  _wait_for(
    lambda: metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 2,
    process,
    'step 2',
  )
  # Two kinds: two signals of one kind that arrive together are one for the kernel.
  process.send_signal(signal.SIGINT)
  process.send_signal(signal.SIGTERM)
  started = time.monotonic()
  _, err = _communicate(process)
  assert time.monotonic() - started < 10
  assert process.returncode in (130, 143), err
  assert _last_line(err) == 'stopped at once by a second signal, without saving'
  newest = checkpoint_steps(run)[-1]
  assert run_main([*TINY, '--save_freq=1', f'--max_steps={newest + 1}', f'--train_path={run}']) == 0


# ---------------------------------------------------------------------------------------------
# Two processes.


def _free_port():
  with socket.socket() as probe:
    probe.bind(('localhost', 0))
    return probe.getsockname()[1]


def _two_processes(run, max_steps):
  env = {
    'JAX_PLATFORMS': 'cpu',
    'JAX_CPU_COLLECTIVES_IMPLEMENTATION': 'gloo',
    'XLA_FLAGS': '--xla_force_host_platform_device_count=1',
  }
  address = f'localhost:{_free_port()}'
  flags = [*TINY, '--keep_prob=None', '--parallel=sharded', '--save_freq=2', '--report_freq=1']
  return [
    program(
      *flags,
      f'--max_steps={max_steps}',
      f'--coordinator_address={address}',
      '--num_processes=2',
      f'--process_id={index}',
      f'--train_path={run}',
      env=env,
    )
    for index in range(2)
  ]


@pytest.mark.slow  # four two-process starts
def test_two_processes_killed_either_way_resume_from_the_same_step(tmp_path, capsys):
  """``kill -9`` of process 1, then (after a restart) of process 0; each time the job ends, and
  both processes of the next start resume from the newest checkpoint."""
  run = tmp_path / 'run'
  newest = 0
  for victim in (1, 0):
    processes = _two_processes(run, 100000)
    try:
      target = [newest + 2]
      _wait_for(lambda: checkpoint_steps(run)[-1:] >= target, processes[0], 'one more save')  # noqa: B023
      processes[victim].kill()
    finally:
      for process in processes:  # the survivor would wait for its peer: a scheduler ends the job
        process.kill()
        process.communicate()
    records = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
    resumed_at = [r['step'] for r in records if r['split'] == 'train']
    assert resumed_at == list(range(1, len(resumed_at) + 1))  # no step lost, none twice
    newest = checkpoint_steps(run)[-1]
  processes = _two_processes(run, newest + 1)
  outputs = [_communicate(process) for process in processes]
  for process, (_, err) in zip(processes, outputs, strict=True):
    assert process.returncode == 0, err[-3000:]
    assert 'cannot be read' not in err and 'damaged' not in err, err
  assert outputs[0][0].strip().endswith(f'steps={newest + 1}')
  # Both processes held the same parameters: the test metrics that they computed together are
  # those of the saved parameters, evaluated here by one process.
  summary = json.loads((run / 'summary.json').read_text())
  code, out, _ = run_main(['--task=test', f'--load={run}', '--verbose=0'], capsys)
  assert code == 0 and out.strip().endswith(f'steps={newest + 1}')
  test_loss = float(out.split('test_loss=')[1].split()[0])
  assert test_loss == pytest.approx(summary['test_loss'], rel=1e-5)
