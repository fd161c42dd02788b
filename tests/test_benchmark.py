"""The benchmark's machinery on tiny trees, and the properties its timings rely on.

The timings of ``python -m train.benchmark`` mean something only if the jitted steps compile
once and never wait on the host, so both are checked here on the library's aliases.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import grassmann_optax as go
from train import benchmark

TINY_SHAPES = {
  'conv': {'kernel': jax.ShapeDtypeStruct((3, 3, 4, 8), jnp.float32)},
  'bn': {'bias': jax.ShapeDtypeStruct((8,), jnp.float32)},
}


ALL_UPDATE_CANDIDATES = benchmark.update_candidates()


def tiny_candidates():
  names = ('optax.sgd nesterov', 'optax.adam', 'sgdg ω=0', 'adamg ω=0')
  return {name: ALL_UPDATE_CANDIDATES[name] for name in names}


def aliases():
  return {
    'sgdg ω=0': benchmark.sgdg(0.0),
    'sgdg ω=0.1': benchmark.sgdg(0.1),
    'adamg ω=0': benchmark.adamg(0.0),
    'adamg ω=0.1': benchmark.adamg(0.1),
  }


def test_update_benchmark_reports_times_and_ratios():
  result = benchmark.benchmark_update(TINY_SHAPES, tiny_candidates(), repeats=1, min_sample_s=0)

  assert (result['num_params'], result['num_manifold_params']) == (3 * 3 * 4 * 8 + 8, 288)
  assert set(result['times']) == {
    *tiny_candidates(),
    benchmark.PRODUCTS_PASS,
    benchmark.READ_PASS,
    benchmark.COMBINE_PASS,
  }
  for times in result['times'].values():
    assert times['median_ms'] > 0 and times['compile_s'] > 0
    assert len(times['samples_ms']) == 1
  assert set(result['ratios']) == {
    'adamg(ω=0) / adam',
    'sgdg(ω=0) / sgd-nesterov',
    'inner products only / sgd-nesterov',
    'inner products only / adam',
    'inner products only / read only',
    'read only / sgd-nesterov',
    'new buffer and w only / sgd-nesterov',
    'read + new buffer and w / sgd-nesterov',
    'read + new buffer and w / adam',
  }
  for ratio in result['ratios'].values():
    assert math.isfinite(ratio) and ratio > 0
  # One repeat: each range is that repeat's ratio; the floors have none (sums of two probes).
  assert set(result['ratio_ranges']) == set(result['ratios']) - set(benchmark.FLOOR_RATIOS)
  for name, (low, high) in result['ratio_ranges'].items():
    assert low == high == pytest.approx(result['ratios'][name])
  times = {name: t['median_ms'] for name, t in result['times'].items()}
  floor = (times[benchmark.READ_PASS] + times[benchmark.COMBINE_PASS]) / times['optax.adam']
  assert result['ratios']['read + new buffer and w / adam'] == pytest.approx(floor)
  for name, target in result['targets'].items():
    ratio = result['ratios'][name]
    assert target['ratio'] == ratio
    assert target['met'] == (ratio <= target['limit'])
  json.dumps(result)


def test_interleaving_rotates_the_order_of_candidates():
  calls = []
  runners = {name: (lambda n, name=name: calls.append(name) or 1e-3) for name in 'abc'}
  times = benchmark.time_interleaved(runners, repeats=3, warmup=1, min_sample_s=0)

  assert calls[3:] == list('abc') + list('bca') + list('cab')
  assert all(t['median_ms'] == pytest.approx(1.0) for t in times.values())


@pytest.mark.parametrize('depth,widen_factor', [(28, 10), (16, 4), (10, 1)])
def test_fallback_tree_matches_the_model(depth, widen_factor):
  model = benchmark.create_wide_resnet(depth, widen_factor)
  from_model = benchmark.model_variable_shapes(model)['params']
  built = benchmark.wide_resnet_param_shapes(depth, widen_factor)

  assert benchmark.describe_tree(built) == benchmark.describe_tree(from_model)


def test_wrn_28_10_has_the_paper_network_size():
  shapes, source = benchmark.wide_resnet_shapes(28, 10)

  assert source == 'train.models.WideResNet'
  assert benchmark.count_parameters(shapes) == (36_479_194, 36_173_232)


def test_state_bytes_of_the_manifold_optimizers():
  shapes = benchmark.wide_resnet_param_shapes(16, 4)
  result = benchmark.state_bytes(shapes)
  state, params = result['state_bytes'], result['param_bytes']

  assert state['optax.sgd nesterov'] == params
  assert state['optax.adam'] == 2 * params + 4
  # One buffer the size of the params (the manifold's and the Euclidean momentum), a step count,
  # and two float32 per manifold column: the basis of the stored buffer.
  columns = result['manifold_columns']
  assert state['sgdg'] == params + 8 * columns + 4
  # Adam-G: the same, plus one float32 second moment per manifold column.
  assert state['adamg'] == params + 12 * columns + 4


def random_step_inputs(tx):
  params = benchmark.random_tree(0, TINY_SHAPES)
  grads = benchmark.random_tree(1, TINY_SHAPES, scale=1e-2)
  return params, tx.init(params), grads


@pytest.mark.parametrize('name', list(aliases()))
def test_jitted_alias_compiles_once(name):
  tx = aliases()[name]
  step = benchmark.make_update_step(tx)
  params, state, grads = random_step_inputs(tx)
  params, state = step(params, state, grads)
  compilations = []

  def listener(event, duration, **kwargs):
    if event == '/jax/core/compile/backend_compile_duration':
      compilations.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for _ in range(3):
      params, state = step(params, state, grads)
    jax.block_until_ready(params)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)

  assert compilations == []
  assert step._cache_size() == 1


@pytest.mark.parametrize('name', list(aliases()))
def test_jitted_alias_step_stays_on_device(name):
  tx = aliases()[name]
  step = benchmark.make_update_step(tx)
  params, state, grads = random_step_inputs(tx)
  before = jax.tree.map(np.asarray, params)

  with jax.transfer_guard('disallow'):
    for _ in range(2):
      params, state = step(params, state, grads)
    jax.block_until_ready(params)

  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), params, before)
  assert moved['conv']['kernel'] > 0


def test_main_writes_the_table_and_json(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(
    benchmark.SETTINGS,
    'quick',
    dict(
      update_net=(10, 1),
      train_net=(10, 1, 2),
      transformer=dict(layers=1, width=32, heads=2, vocab=64, context=16),
      repeats=1,
      sample_s=(0.0, 0.0),
    ),
  )
  monkeypatch.setattr(benchmark, 'update_candidates', tiny_candidates)
  monkeypatch.setattr(benchmark, 'train_step_candidates', lambda: {'sgd': benchmark.sgd_baseline})
  path = tmp_path / 'bench.json'

  report = benchmark.main(['--quick', '--json', str(path)])

  written = json.loads(path.read_text())
  assert written == json.loads(json.dumps(report, ensure_ascii=False))
  assert set(written) >= {'machine', 'load_average', 'update', 'train_step', 'state', 'transformer'}
  transformer = written['transformer']
  assert set(transformer['times']) == {'optax.adamw', 'optax.adam', 'adamg point_axes'}
  assert transformer['ratios']['adamg(point_axes) / adamw'] > 0
  assert written['machine']['backend'] == jax.default_backend()
  assert written['machine']['cpu_count'] > 0
  assert written['train_step']['times']['sgd']['images_per_s'] > 0
  if jax.default_backend() != 'gpu':
    assert 'no GPU' in written['gpu_train_step']['skipped']
  table = capsys.readouterr().out
  assert 'adamg(ω=0) / adam' in table and 'load average' in table and 'WRN-10-1' in table
  assert 'adamg(point_axes) / adamw' in table


def test_sgd_baseline_decays_every_parameter():
  params = {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)}
  tx = benchmark.sgd_baseline()
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)

  lr_times_decay = benchmark.SGD_LEARNING_RATE * benchmark.WEIGHT_DECAY
  for leaf in jax.tree.leaves(optax.apply_updates(params, updates)):
    # Nesterov: the first step moves by lr·(1 + momentum)·λθ.
    np.testing.assert_allclose(leaf, 1 - lr_times_decay * (1 + benchmark.MOMENTUM), rtol=1e-6)


def test_chain_and_xla_candidates_equal_the_fused_aliases():
  shapes = {'conv': {'kernel': jax.ShapeDtypeStruct((3, 3, 8, 4), jnp.float32)}}
  grads = benchmark.random_tree(1, shapes)
  for fused, *others in [
    (
      benchmark.sgdg(0.1),
      benchmark.sgdg_chain(0.1),
      benchmark.without_cpu_kernel(benchmark.sgdg(0.1)),
    ),
    (
      benchmark.adamg(0.1),
      benchmark.adamg_chain(0.1),
      benchmark.without_cpu_kernel(benchmark.adamg(0.1)),
    ),
  ]:
    results = []
    for tx in (fused, *others):
      params = benchmark.random_tree(0, shapes)
      state = tx.init(params)
      step = benchmark.make_update_step(tx)
      for _ in range(3):
        params, state = step(params, state, grads)
      results.append(params['conv']['kernel'])
    for other in results[1:]:
      np.testing.assert_allclose(results[0], other, atol=1e-5)


def test_products_probe_reads_the_manifold_leaves_and_passes_params_through():
  shapes = {
    'conv': {'kernel': jax.ShapeDtypeStruct((3, 3, 8, 4), jnp.float32)},
    'dense': {'kernel': jax.ShapeDtypeStruct((4, 10), jnp.float32)},
  }
  params, grads = benchmark.random_tree(0, shapes), benchmark.random_tree(1, shapes)
  step = benchmark.make_products_step(go.grassmann_labels(params))
  expected = np.asarray(params['conv']['kernel'])
  out, sums = step(benchmark.copy_tree(params), None, grads, grads)
  np.testing.assert_array_equal(out['conv']['kernel'], expected)
  assert len(sums) == 1 and len(sums[0]) == 6  # the conv only: the dense layer is Euclidean
  w, g = (np.asarray(t['conv']['kernel']).reshape(-1, 4) for t in (params, grads))
  np.testing.assert_allclose(np.ravel(sums[0][1]), np.sum(w * g, axis=0), rtol=1e-5)

  read = benchmark.make_products_step(go.grassmann_labels(params), read_only=True)
  out, sums = read(benchmark.copy_tree(params), None, grads, grads)
  np.testing.assert_array_equal(out['conv']['kernel'], expected)
  assert len(sums) == 1 and len(sums[0]) == 1
  np.testing.assert_allclose(np.ravel(sums[0][0]), np.sum(w + 2 * g, axis=0), rtol=1e-5)


def test_combination_probe_writes_the_new_buffer_and_weight_of_manifold_leaves_only():
  shapes = {
    'conv': {'kernel': jax.ShapeDtypeStruct((3, 3, 8, 4), jnp.float32)},
    'dense': {'kernel': jax.ShapeDtypeStruct((4, 10), jnp.float32)},
  }
  params, grads = benchmark.random_tree(0, shapes), benchmark.random_tree(1, shapes)
  buffers = benchmark.random_tree(2, shapes)
  labels = go.grassmann_labels(params)
  coefficients = benchmark.combination_coefficients(params, labels)
  assert [c.shape for c in coefficients] == [(5, 4)]
  c = np.asarray(coefficients[0])[:, None]
  w, g, b = (np.asarray(t['conv']['kernel']).reshape(-1, 4) for t in (params, grads, buffers))
  dense = (np.asarray(params['dense']['kernel']), np.asarray(buffers['dense']['kernel']))

  step = benchmark.make_combination_step(labels)
  out, new_buffers = step(
    benchmark.copy_tree(params), benchmark.copy_tree(buffers), grads, coefficients
  )

  new_b = c[0] * b + c[1] * g + c[2] * w
  close = {'rtol': 1e-5, 'atol': 1e-7}
  np.testing.assert_allclose(new_buffers['conv']['kernel'].reshape(-1, 4), new_b, **close)
  np.testing.assert_allclose(
    out['conv']['kernel'].reshape(-1, 4), w + c[3] * w + c[4] * new_b, **close
  )
  np.testing.assert_array_equal(out['dense']['kernel'], dense[0])
  np.testing.assert_array_equal(new_buffers['dense']['kernel'], dense[1])


def test_gpu_section_times_the_three_optimizers_in_images_per_second(monkeypatch):
  # No GPU here: the section's own code runs on CPU with a tiny network in place of WRN-28-10.
  monkeypatch.setattr(benchmark.jax, 'default_backend', lambda: 'gpu')
  monkeypatch.setattr(benchmark, 'GPU_TRAIN_NET', (10, 1, 2))

  section = benchmark.timed(lambda: benchmark.gpu_section(requested=True, repeats=1))

  assert 'skipped' not in section
  assert section['title'].startswith('2b. training step') and 'WRN-10-1' in section['title']
  assert set(section['times']) == {'sgd', 'sgdg ω=0.1', 'adamg ω=0.1'}
  for times in section['times'].values():
    assert times['images_per_s'] == pytest.approx(2e3 / times['median_ms'])
  assert set(section['targets']) == set(benchmark.TRAIN_STEP_TARGETS)
  table = '\n'.join(benchmark.format_train_step(section))
  assert table.count('img/s') == 3 and table.count('(repeats ') == 2


def test_repeat_ratio_ranges_pair_the_samples_of_each_repeat():
  times = {
    'a': {'samples_ms': [2.0, 3.0, 8.0]},
    'b': {'samples_ms': [1.0, 3.0, 4.0]},
  }
  ranges = benchmark.repeat_ratio_ranges(times, {'a / b': ('a', 'b'), 'a / c': ('a', 'c')})

  assert ranges == {'a / b': [1.0, 2.0]}


def test_the_transformer_tree_is_gpt2_small_with_every_layout():
  shapes = benchmark.transformer_param_shapes()
  leaves = jax.tree.leaves(shapes)
  assert sum(int(np.prod(leaf.shape)) for leaf in leaves) == 124_439_808
  assert len(leaves) == 196
  labels, point_axes = benchmark.transformer_groups(shapes)
  assert labels['wte'] == 'grassmann' and point_axes['wte'] == (1,)
  assert point_axes['h0']['query']['kernel'] == (0, 2)
  assert point_axes['h0']['fc']['kernel'] is None and labels['h0']['fc']['bias'] == 'euclidean'
  tiny = benchmark.transformer_param_shapes(layers=1, width=8, heads=2, vocab=10, context=4)
  labels, point_axes = benchmark.transformer_groups(tiny)
  params = benchmark.random_points(0, tiny, labels, point_axes)
  np.testing.assert_allclose(np.linalg.norm(params['wte'], axis=1), 1, rtol=1e-6)
  query = np.asarray(params['h0']['query']['kernel'])
  np.testing.assert_allclose(np.sqrt(np.sum(query**2, axis=(0, 2))), 1, rtol=1e-6)
  tx = benchmark.transformer_candidates(labels, point_axes)['adamg point_axes']()
  grads = benchmark.random_points(1, tiny, labels, None, scale=1e-2)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(np.linalg.norm(new['wte'], axis=1), 1, rtol=1e-5)
