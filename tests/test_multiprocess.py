"""Two processes on localhost train one model: the result equals one process on the same batch.

Each process of ``python -m train --parallel=sharded --num_processes=2`` (or ``fsdp``, the state
split over both processes) has one CPU device;
JAX's CPU collectives (gloo) carry the gradient and BatchNorm sums between them. Every process
computes the same global batch and feeds its half, so the update is that of one process holding
both halves, up to the order of float32 sums.
"""

import json
import socket

import jax
import numpy as np
import pytest

from tests.train_helpers import TINY, assert_trees_close, final_state, program, run_main
from train import config as config_lib
from train import parallel

TIMEOUT_S = 180
FLAGS = [*TINY, '--max_steps=3', '--keep_prob=None']


def _free_port() -> int:
  with socket.socket() as probe:
    probe.bind(('localhost', 0))
    return probe.getsockname()[1]


@pytest.mark.slow  # two processes compile and train each: about a minute
@pytest.mark.parametrize('parallel', ['sharded', 'fsdp'])
def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path, parallel):
  run = tmp_path / 'two_processes'
  env = {
    'JAX_PLATFORMS': 'cpu',
    'JAX_CPU_COLLECTIVES_IMPLEMENTATION': 'gloo',
    'XLA_FLAGS': '--xla_force_host_platform_device_count=1',
  }
  address = f'localhost:{_free_port()}'
  processes = [
    program(
      *FLAGS,
      f'--parallel={parallel}',
      f'--coordinator_address={address}',
      '--num_processes=2',
      f'--process_id={index}',
      f'--train_path={run}',
      env=env,
    )
    for index in range(2)
  ]
  outputs = []
  try:
    for process in processes:
      outputs.append(process.communicate(timeout=TIMEOUT_S))
  finally:
    for process in processes:
      process.kill()
  for process, (_, err) in zip(processes, outputs, strict=True):
    assert process.returncode == 0, err[-3000:]
  assert outputs[0][0].strip().splitlines()[-1].startswith('final: ')
  assert 'final: ' not in outputs[1][0]  # only the first process reports

  assert jax.device_count() == 2
  one_process = [*FLAGS, '--parallel=sharded', '--num_devices=2']
  assert run_main([*one_process, f'--train_path={tmp_path / "one_process"}']) == 0
  reference, actual = final_state(tmp_path / 'one_process'), final_state(run)
  assert int(actual['step']) == int(reference['step']) == 3
  assert_trees_close(actual['params'], reference['params'], rtol=1e-5, atol=1e-6)
  assert_trees_close(actual['batch_stats'], reference['batch_stats'], rtol=1e-5, atol=1e-6)
  largest = max(
    float(np.max(np.abs(a - b)))
    for a, b in zip(
      jax.tree.leaves(actual['params']), jax.tree.leaves(reference['params']), strict=True
    )
  )
  assert largest < 1e-6
  summaries = [
    json.loads((path / 'summary.json').read_text()) for path in (run, tmp_path / 'one_process')
  ]
  assert summaries[0]['test_error'] == pytest.approx(summaries[1]['test_error'], abs=1e-6)
  assert summaries[0]['test_loss'] == pytest.approx(summaries[1]['test_loss'], rel=1e-5)


def test_the_compilation_cache_is_turned_off_where_cached_collectives_hang(monkeypatch, capsys):
  """Under jax 0.12, CPU processes that load programs with collectives from the persistent cache
  wait forever (the test above hangs there on its second run): the program turns the cache off,
  with a warning. Here the version bound is lowered so that the rule runs under any jax."""
  assert jax.config.jax_compilation_cache_dir  # the suite's cache (tests/conftest.py)
  monkeypatch.setattr(parallel, '_CACHED_COLLECTIVES_HANG', (0, 0))
  assert not parallel.avoid_cached_collectives()  # one process: nothing to avoid
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  try:
    assert parallel.avoid_cached_collectives()
    assert not jax.config.jax_enable_compilation_cache
    assert 'the persistent compilation cache' in capsys.readouterr().err
    assert not parallel.avoid_cached_collectives()  # already off
  finally:
    jax.config.update('jax_enable_compilation_cache', True)


def test_pmap_is_refused_in_a_run_of_several_processes(monkeypatch):
  """pmap maps over one process's devices: each process trained a model of its own, exited 0,
  and the first reported the metrics of its model on its part of the test set."""
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  for task in ('train', 'test'):
    load = {'load': '/runs/a'} if task == 'test' else {}
    config = config_lib.get_config(parallel='pmap', task=task, **load)
    with pytest.raises(config_lib.ConfigError, match='each would train a model of its own'):
      parallel.select_devices(config)
    config = config_lib.get_config(parallel='sharded', task=task, **load)
    assert parallel.select_devices(config) == jax.devices()
