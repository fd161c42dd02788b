"""The benchmarks' parameter trees and timing, on trees small enough for the suite.

The figures themselves are not tested (speed targets live in the benchmarks' printed ratios, not
in timed tests); what is tested is that the trees are the models they name, that every candidate
compiles and runs on them, and that the report says whether each goal is met.
"""

import math

import jax
import pytest

import grassmann_optax as go
from benchmarks import common, kernel, update


def count(shapes) -> int:
  return sum(x.size for x in jax.tree.leaves(shapes))


def test_the_trees_are_the_models_they_name():
  assert count(common.wide_resnet_shapes(28, 10)) == 36_479_194  # WRN-28-10 on 10 classes
  labels = go.grassmann_labels(common.wide_resnet_shapes(28, 10))
  assert sum(label == go.GRASSMANN for label in jax.tree.leaves(labels)) == 24
  gpt = common.gpt2_shapes()
  assert count(gpt) == 124_439_808  # GPT-2 small with its position table
  labels, axes = common.gpt2_groups(gpt)
  assert axes['wte'] == (1,) and axes['h0']['query']['kernel'] == (0, 2)
  assert labels['h0']['ln_1']['scale'] == go.EUCLIDEAN
  assert len(common.many_leaves_shapes(500)) == 500


def test_every_candidate_runs_and_the_report_states_the_goals():
  shapes = common.wide_resnet_shapes(10, 1)
  labels = go.grassmann_labels(shapes)
  candidates = {
    name: make
    for name, make in update.wide_resnet_candidates().items()
    if name in ('optax.adam', 'adamg ω=0', 'README chain ω=0')
  }
  ratios = {
    name: spec for name, spec in update.WIDE_RESNET_RATIOS.items() if name.startswith('README')
  }
  ratios = {name: spec for name, spec in ratios.items() if spec[1] in candidates}
  result = update.section(shapes, labels, None, candidates, ratios, repeats=2, sample_s=0.01)
  assert set(result['ms']) == set(candidates) and all(ms > 0 for ms in result['ms'].values())
  chain = result['ratios']['README chain / adamg']
  assert chain['low'] <= chain['ratio'] <= chain['high'] and chain['goal'] == 1.15
  result['state'] = update.state_sizes(shapes, labels, None, candidates)
  assert abs(result['state']['optax.adam'] - 2) < 1e-3 and result['state']['adamg ω=0'] < 1.02
  text = update.format_report({'machine': common.machine(), 'WRN-10-1': result})
  assert 'README chain / adamg' in text and ('met' in text or 'NOT MET' in text)


@pytest.mark.skipif(not go.cpu_kernel.available(), reason='the CPU kernel is not installed')
def test_the_kernel_benchmark_reports_a_ratio_for_one_and_two_leaves():
  report = kernel.main(['--quick'])
  assert set(report['ratios']) == {'kernel / XLA read, 1 leaf', 'kernel / XLA read, 2 leaves'}
  for r in report['ratios'].values():
    assert math.isfinite(r['ratio']) and r['low'] <= r['ratio'] <= r['high']


def test_the_readme_chain_of_the_benchmark_is_the_alias():
  """The benchmark's README chain and ``adamg`` compute the same update (ω = 0)."""
  shapes = common.wide_resnet_shapes(10, 1)
  labels = go.grassmann_labels(shapes)
  params = common.parameters(shapes, labels)
  grads = common.gradients(params)
  chain = update.readme_chain(0.0)
  alias = go.adamg(update.LR, update.LR_G_ADAM, omega=0, weight_decay=None)
  # Compiled, as the benchmark runs them: one program each, not one per operation.
  u_chain, _ = jax.jit(chain.update)(grads, chain.init(params), params)
  u_alias, _ = jax.jit(alias.update)(grads, alias.init(params), params)
  differences = jax.tree.map(lambda a, b: float(abs(a - b).max()), u_chain, u_alias)
  assert max(jax.tree.leaves(differences)) < 1e-6


def test_the_device_report_names_every_layout_and_optimizer():
  from benchmarks import device

  layouts = device.layouts()
  assert {'pmap', 'sharded'} <= set(layouts)
  times = {
    f'{name}, {parallel}': {'median': 0.1 * (i + 1), 'samples': [0.1 * (i + 1)] * 2}
    for i, name in enumerate(device.OPTIMIZERS)
    for parallel in layouts
  }
  section = {
    'batch': 128,
    'devices': 1,
    'images_per_s': {key: 128 / t['median'] for key, t in times.items()},
    'compile_s': {key: 1.0 for key in times},
    'ratios': {
      f'{name} / sgd, {p}': common.ratio(times, f'{name}, {p}', f'sgd, {p}')
      for p in layouts
      for name in ('sgdg', 'adamg')
    },
  }
  text = device.format_report({'machine': common.machine(), 'training step, WRN-28-10': section})
  assert 'adamg, pmap' in text and 'images/s' in text and 'adamg / sgd, sharded' in text
  assert device.parse_args(['--quick']).quick


def test_the_device_benchmark_splits_its_batch_over_as_many_devices_as_divide_it():
  """The batch of 128 was handed to every device present: on a host of 6 the step raised
  'cannot reshape array of size ... into shape (6, ...)'."""
  from benchmarks import device

  assert [device.device_count(128, n) for n in (1, 3, 6, 8, 12)] == [1, 2, 4, 8, 8]
  assert device.device_count(16, 3) == 2


def test_a_misspelt_section_or_layout_is_refused_by_name(capsys, tmp_path):
  """Refused before anything is timed: a report that could not be completed or written."""
  from benchmarks import device, hyperball

  for parse, argv, name in (
    (update.parse_args, ['--sections', 'wrn,wrm'], "--sections: unknown ['wrm']"),
    (device.parse_args, ['--layouts', 'shard'], "--layouts: unknown ['shard']"),
    (hyperball.parse_args, ['--sections', 'adam,adam'], '--sections: adam named twice'),
    (hyperball.parse_args, ['--layers', '0'], '--layers=0 must be at least 1'),
    (hyperball.parse_args, ['--repeats', '-3'], '--repeats=-3 must be at least 1'),
    (hyperball.parse_args, ['--sample_s', '0'], '--sample_s=0.0 must be positive'),
    (update.parse_args, ['--json', str(tmp_path / 'no' / 'r.json')], 'give a file in an existing'),
    (device.parse_args, ['--json', str(tmp_path)], 'give a file in an existing folder'),
    (device.parse_args, ['--num_devices', '0'], '--num_devices=0: this process has'),
    (device.parse_args, ['--num_devices', '9999'], '--num_devices=9999: this process has'),
  ):
    with pytest.raises(SystemExit) as exit_info:
      parse(argv)
    assert exit_info.value.code == 2 and name in capsys.readouterr().err
