"""Tests of the training program: flags and recipes, schedule and optimizer, end-to-end runs on
1 and 2 devices, exact resume, evaluation of a checkpoint, and the errors of the command line.

Runs are kept tiny (WRN-10-1, batches of 8, a few steps) so that the file takes a few minutes on
two CPU cores; ``conftest.py`` gives JAX two fake CPU devices. The run directory's lock, damaged
checkpoints, divergence and signals are in ``test_train_robustness.py``; several processes in
``test_multiprocess.py``.

Reference: Cho & Lee, "Riemannian approach to batch normalization", NeurIPS 2017,
arXiv:1709.09603 (the TF program's flags and recipes).
"""

import dataclasses
import json
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import grassmann_optax as go
from tests.train_helpers import (
  FINAL_LINE,
  SUBPROCESS_TIMEOUT_S,
  TINY,
  TINY_VGG,
  assert_trees_close,
  checkpoint_steps,
  directory_snapshot,
  final_state,
  prepared_tfds,
  program,
  run_main,
)
from train import checkpoints, input_pipeline, models
from train import config as config_lib
from train import flags as flags_lib
from train import train as train_lib

README_COMMANDS = (  # the TF README's commands, flag for flag
  '--model=resnet --depth=28 --widen_factor=10 --optimizer=sgdg --grassmann=True '
  '--learnRate=0.01 --learnRateG=0.2 --omega=0.1 --grad_clip=0.1 --weightDecay=0.0005 '
  '--keep_prob=0.7 --data=cifar10',
  '--model=resnet --depth=28 --widen_factor=10 --optimizer=sgd --learnRate=0.1 '
  '--weightDecay=0.0005 --biasDecay=0.0005 --gammaDecay=0.0005 --betaDecay=0.0005 '
  '--keep_prob=0.7 --data=cifar100',
  '--model=resnet --depth=22 --widen_factor=8 --optimizer=adamg --grassmann=True '
  '--learnRate=0.001 --learnRateG=0.005 --omega=0.1 --grad_clip=0.1 --weightDecay=0.0005 '
  '--keep_prob=0.6 --learnRateDecay=0.1 --data=svhn',
  '--model=resnet --depth=40 --widen_factor=10 --optimizer=adamg --grassmann=True '
  '--learnRate=0.01 --learnRateG=0.05 --omega=0.1 --grad_clip=0.1 --weightDecay=0.0005 '
  '--keep_prob=0.7 --data=cifar100 --vali_batch_size=200 --num_gpus=2',
  '--model=vgg19 --optimizer=adamg --grassmann=True --learnRate=0.01 --learnRateG=0.05 '
  '--omega=0.1 --grad_clip=0.1 --weightDecay=0.0005 --data=cifar100',
  '--model=resnet --depth=40 --widen_factor=10 --data=cifar100 --task=test --load=/some/checkpoint',
)
TFDS_DATASETS = [name for name, info in input_pipeline.DATASETS.items() if info.tfds is not None]


@pytest.fixture(scope='module')
def one_device_run(tmp_path_factory):
  """Digits, Adam-G, WRN-10-1, 3 steps on one device, no dropout: the shared reference run."""
  path = tmp_path_factory.mktemp('one_device')
  code = run_main(
    [*TINY, '--max_steps=3', '--num_devices=1', '--keep_prob=None', f'--train_path={path}']
  )
  assert code == 0
  return path


# ---------------------------------------------------------------------------------------------
# Flags and recipes.


@pytest.mark.parametrize('command', README_COMMANDS)
def test_readme_commands_parse(command):
  config = flags_lib.parse(command.split())
  given = dict(token[2:].split('=', 1) for token in command.split())
  given = {{'num_gpus': 'num_devices'}.get(name, name): value for name, value in given.items()}
  for name, text in given.items():
    value = getattr(config, name)
    expected = type(value)(text) if not isinstance(value, bool) else text == 'True'
    assert value == expected, name
  assert set(given) <= set(config.explicit)


def test_readme_vgg_command_gets_no_dropout_and_the_cifar_schedule():
  config = flags_lib.parse(README_COMMANDS[4].split())
  assert config.keep_prob is None and config.width_scale == 1.0
  assert (config.epochs, config.decay_epochs, config.learnRateDecay) == (200, (60, 120, 160), 0.2)
  assert (config.batch_size, config.vali_batch_size) == (128, 250)


@pytest.mark.parametrize(
  ('data', 'optimizer', 'expected'),
  [
    (
      'cifar10',
      'sgd',
      dict(
        learnRate=0.1,
        grassmann=False,
        biasDecay=5e-4,
        gammaDecay=5e-4,
        betaDecay=5e-4,
        weightDecay=5e-4,
        keep_prob=0.7,
        omega=None,
      ),
    ),
    (
      'cifar100',
      'sgdg',
      dict(
        learnRate=0.01,
        learnRateG=0.2,
        grassmann=True,
        omega=0.1,
        grad_clip=0.1,
        weightDecay=5e-4,
        biasDecay=None,
        keep_prob=0.7,
      ),
    ),
    (
      'svhn',
      'adamg',
      dict(
        learnRate=0.001,
        learnRateG=0.005,
        learnRateDecay=0.1,
        epochs=160,
        decay_epochs=(60, 120),
        keep_prob=0.6,
        omega=0.1,
      ),
    ),
    ('svhn', 'sgdg', dict(learnRate=0.001, learnRateG=0.02)),
  ],
)
def test_recipes_fill_unspecified_flags(data, optimizer, expected):
  config = config_lib.get_config(data=data, optimizer=optimizer)
  assert {name: getattr(config, name) for name in expected} == expected


@pytest.mark.parametrize('command', [c for c in README_COMMANDS if '--task=test' not in c])
def test_the_recipes_are_the_readme_commands(command):
  """Given only the model, the optimizer and the dataset of a README command, the recipes supply
  every other setting the command spells out."""
  choices = ('model', 'depth', 'widen_factor', 'optimizer', 'data', 'vali_batch_size', 'num_gpus')
  tokens = command.split()
  full = flags_lib.parse(tokens)
  bare = flags_lib.parse([token for token in tokens if token[2:].split('=')[0] in choices])
  assert dataclasses.replace(bare, explicit=()) == dataclasses.replace(full, explicit=())


@pytest.mark.parametrize('eps', [1e-8, 0.5])
def test_adams_settings_reach_adamg(eps):
  """``--adam_eps`` and ``--adam_beta2`` reach Adam-G: the program's optimizer steps as
  ``go.adamg`` with those settings."""
  config = config_lib.get_config(
    optimizer='adamg', adam_eps=eps, adam_beta2=0.9, omega=None, weightDecay=None
  )
  params = {'conv': {'kernel': go.unit_initializer()(jax.random.key(0), (3, 3, 4, 8))}}
  labels = {'conv': {'kernel': go.GRASSMANN}}
  rates = {name: (lambda count: 0.01) for name in train_lib.create_learning_rate_fns(config, 100)}
  tx = train_lib.create_optimizer(config, rates, labels)
  expected = go.adamg(
    0.01,
    0.01,
    b1=config.momentum,
    b2=0.9,
    eps=eps,
    grad_clip=config.grad_clip,
    omega=0.0,
    weight_decay=None,
    param_labels=labels,
  )
  grads = jax.tree.map(lambda x: 0.01 * jnp.cos(3 * x), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  reference, _ = expected.update(grads, expected.init(params), params)
  np.testing.assert_allclose(
    updates['conv']['kernel'], reference['conv']['kernel'], rtol=1e-6, atol=1e-8
  )


@pytest.mark.parametrize('count', [1, 2, 4])
def test_the_processes_rows_tile_the_global_batch(monkeypatch, count):
  """Each process puts its own block of the global batch on its devices (the two-process runs
  of ``test_multiprocess`` are slow)."""
  from train import parallel as parallel_lib

  batch = np.arange(8 * 3).reshape(8, 3)
  blocks = []
  monkeypatch.setattr(jax, 'process_count', lambda: count)
  for index in range(count):
    monkeypatch.setattr(jax, 'process_index', lambda index=index: index)
    blocks.append(parallel_lib._process_rows(batch))
  np.testing.assert_array_equal(np.concatenate(blocks), batch)


def test_explicit_flags_override_recipes_and_defaults():
  config = flags_lib.parse(
    [
      '--data=cifar10',
      '--learnRateG=0.3',
      '--grassmann=false',
      '--keep_prob=None',
      '--decay_epochs=5,7',
      '--num_gpus',
      '2',
      '--allow_changed=learnRate, learnRateG,',
    ]
  )
  assert (config.learnRateG, config.grassmann, config.keep_prob) == (0.3, False, None)
  assert (config.num_devices, config.decay_epochs) == (2, (5, 7))
  assert config.allow_changed == ('learnRate', 'learnRateG')  # spaces and a trailing comma
  assert config.learnRate == 0.01  # cifar10 / adamg recipe
  assert config_lib.get_config(num_gpus=2).num_devices == 2


def test_program_defaults_are_adamg_on_digits():
  config = flags_lib.parse([])
  assert (config.data, config.model, config.optimizer, config.grassmann) == (
    'digits',
    'resnet',
    'adamg',
    True,
  )
  assert (config.depth, config.widen_factor, config.explicit) == (10, 4, ())


@pytest.mark.parametrize('text', ['True', 'true', '1', 'False', 'false', '0'])
def test_boolean_flags(text):
  assert flags_lib.parse([f'--nesterov={text}']).nesterov == (text in ('True', 'true', '1'))


def test_help_documents_every_flag(capsys):
  assert run_main(['--help']) == 0
  out = capsys.readouterr().out
  for name in (*config_lib.FIELDS, 'num_gpus'):
    assert f'--{name}:' in out or f'--[no]{name}:' in out, name
  assert "(default: '0.99')" in out  # adam_beta2
  assert 'svhn/adamg: epochs=160 decay_epochs=(60, 120) learnRateDecay=0.1' in out
  # A flag that the recipes set says what the run without flags takes, beside absl's default.
  default = config_lib.get_config()
  text = ' '.join(out.split())
  for name in ('learnRate', 'batch_size', 'widen_factor', 'epochs'):
    value = getattr(default, name)
    entry = re.search(rf'--{name}: (.*?)\(default: ', text).group(1)
    assert entry.endswith(f'digits/adamg: {value}), else '), (name, entry)


def test_width_scale_narrows_vgg_and_is_part_of_the_architecture():
  config = config_lib.get_config(model='vgg11', width_scale=0.125)
  assert models.vgg_widths(0.125) == (8, 16, 32, 64, 64)
  assert config_lib.run_name(config) == 'digits_vgg11-x0.125_adamg'
  assert config_lib.architecture(config)['width_scale'] == 0.125
  model = train_lib.create_model(config, num_classes=10)
  shapes = train_lib.parameter_shapes(model, (1, 8, 8, 1))
  assert shapes['group0']['conv0']['kernel'].shape == (3, 3, 1, 8)
  assert shapes['group4']['conv1']['kernel'].shape == (3, 3, 64, 64)
  assert shapes['fc0']['kernel'].shape == (64, 64)
  saved = config_lib.to_json(config_lib.get_config(model='vgg11'), 10)
  with pytest.raises(config_lib.ConfigError, match='width_scale=1.0 .* this run is vgg11 width'):
    config_lib.check_architecture(saved, config, 10)
  with pytest.raises(config_lib.ConfigError, match='applies to VGG only'):
    config_lib.get_config(width_scale=0.5)


def test_another_models_checkpoint_names_the_model_not_the_fields_it_does_not_take():
  """A VGG checkpoint holds the defaults of --depth and --widen_factor, which describe no VGG: the
  message names the model that differs, not those."""
  resnet = config_lib.get_config(depth=10, widen_factor=4)
  vgg = config_lib.get_config(model='vgg11', width_scale=0.5)
  for saved, config, differ in (
    (vgg, resnet, '(--model=vgg11 -> resnet)'),
    (resnet, vgg, '(--model=resnet -> vgg11)'),
  ):
    with pytest.raises(config_lib.ConfigError) as raised:
      config_lib.check_architecture(config_lib.to_json(saved, 10), config, 10)
    assert differ in str(raised.value)


def test_vgg_takes_no_resnet_flags():
  """A given --depth or --widen_factor would change nothing for VGG: refused, and no 6N+4 check.
  (test_tfds_datasets_and_models_run evaluates a VGG checkpoint with --task=test.)"""
  assert config_lib.get_config(model='vgg11').depth == 10  # the default, not given
  for flag in ({'depth': 10}, {'widen_factor': 8}):
    with pytest.raises(config_lib.ConfigError, match='applies to the wide ResNet only'):
      config_lib.get_config(model='vgg11', **flag)


# ---------------------------------------------------------------------------------------------
# Schedule, labels and optimizer.


def test_schedule_boundaries_match_tf_program():
  """CIFAR, B=128: decays after steps 23437, 46875, 62500; 78125 steps."""
  config = config_lib.get_config(data='cifar10', optimizer='sgd')
  assert train_lib.decay_steps(config.decay_epochs, 50_000, 128) == [23437, 46875, 62500]
  assert train_lib.num_train_steps(config, 50_000) == 78125
  schedule = train_lib.create_learning_rate_fn(0.1, config, 50_000)
  expected = {
    0: 0.1,
    23437: 0.1,
    23438: 0.02,
    46875: 0.02,
    46876: 0.004,
    62500: 0.004,
    62501: 0.0008,
    78124: 0.0008,
  }
  actual = {step: float(schedule(jnp.asarray(step))) for step in expected}
  np.testing.assert_allclose(list(actual.values()), list(expected.values()), rtol=1e-6)


def test_schedule_multiplies_coinciding_boundaries():
  config = config_lib.get_config(decay_epochs=(1, 1), learnRateDecay=0.5, batch_size=10)
  schedule = train_lib.create_learning_rate_fn(1.0, config, 10)
  assert float(schedule(1)) == 1.0 and float(schedule(2)) == 0.25


def _shapes(model_name, **settings):
  config = config_lib.get_config(model=model_name, **settings)
  return train_lib.parameter_shapes(train_lib.create_model(config, 10), (1, 32, 32, 3))


def _optimizer(config, params, num_train=100):
  labels = train_lib.parameter_labels(config, params)
  fns = train_lib.create_learning_rate_fns(config, num_train)
  return train_lib.create_optimizer(config, fns, labels), labels


def test_decay_classes_tell_bias_from_beta():
  resnet = train_lib.decay_classes(_shapes('resnet', depth=10, widen_factor=1))
  assert resnet['fc'] == {'kernel': 'weight', 'bias': 'bias'}
  assert resnet['bn_final'] == {'scale': 'gamma', 'bias': 'beta'}
  vgg = train_lib.decay_classes(_shapes('vgg11', width_scale=0.125))
  assert vgg['group0']['bn0'] == {'bias': 'beta'}  # VGG BatchNorm has no gamma
  assert vgg['fc2']['bias'] == 'bias'


@pytest.mark.parametrize('optimizer', ['sgd', 'adamg'])
@pytest.mark.parametrize('kind', ['biasDecay', 'gammaDecay', 'betaDecay'])
def test_class_decays_reach_only_their_class(optimizer, kind):
  """With zero gradients only the chosen class moves, and nothing on the manifold."""
  shapes = _shapes('resnet', depth=10, widen_factor=1)
  params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes)
  decays = {'weightDecay': None, 'biasDecay': None, 'gammaDecay': None, 'betaDecay': None}
  config = config_lib.get_config(optimizer=optimizer, **{**decays, kind: 0.1})
  tx, labels = _optimizer(config, params)
  # Compiled, as the training step is: one program, not one per operation.
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  target = {'biasDecay': 'bias', 'gammaDecay': 'gamma', 'betaDecay': 'beta'}[kind]
  classes = train_lib.decay_classes(params)
  for update, cls, label in zip(
    jax.tree.leaves(updates), jax.tree.leaves(classes), jax.tree.leaves(labels), strict=True
  ):
    if label == go.GRASSMANN:
      continue  # moved by the orthogonality term, never by a decay
    # Nesterov: b = λθ, update = -lr (λθ + γ b) = -1.9 lr λ.
    expected = -1.9 * config.learnRate * 0.1 if cls == target else 0.0
    np.testing.assert_allclose(np.asarray(update), expected, rtol=1e-6, atol=0)


def test_grassmann_false_puts_nothing_on_the_manifold_and_uses_the_euclidean_optimizer():
  shapes = _shapes('resnet', depth=10, widen_factor=1)
  params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes)
  on = train_lib.parameter_labels(config_lib.get_config(), params)
  assert go.GRASSMANN in jax.tree.leaves(on)
  for optimizer in ('sgdg', 'adamg'):
    config = config_lib.get_config(optimizer=optimizer, grassmann=False, weightDecay=0.1)
    tx, labels = _optimizer(config, params)
    assert set(jax.tree.leaves(labels)) == {go.EUCLIDEAN}
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    # Nesterov SGD with coupled decay on the kernels only: -1.9 lr λ there, 0 elsewhere.
    fc = -1.9 * config.learnRate * 0.1
    np.testing.assert_allclose(updates['fc']['kernel'], fc, rtol=1e-6)
    np.testing.assert_allclose(updates['conv0']['kernel'], fc, rtol=1e-6)
    np.testing.assert_array_equal(updates['fc']['bias'], 0.0)


def test_create_train_state_puts_manifold_kernels_on_the_sphere():
  config = config_lib.get_config(depth=10, widen_factor=1)
  model = train_lib.create_model(config, 10)
  labels = train_lib.parameter_labels(config, train_lib.parameter_shapes(model, (1, 8, 8, 1)))
  tx = train_lib.create_optimizer(config, train_lib.create_learning_rate_fns(config, 100), labels)
  state = train_lib.create_train_state(jax.random.key(0), model, (1, 8, 8, 1), labels, tx)
  kernels = [
    w
    for w, label in zip(jax.tree.leaves(state.params), jax.tree.leaves(labels), strict=True)
    if label == go.GRASSMANN
  ]
  assert kernels
  for w in kernels:
    norms = np.linalg.norm(np.asarray(w).reshape(-1, w.shape[-1]), axis=0)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
  assert int(state.step) == 0


def test_learning_rate_schedule_is_what_the_optimizer_uses():
  """The logged rate and the optimizer's rate are one schedule, counted from step 0."""
  config = config_lib.get_config(
    optimizer='sgd',
    decay_epochs=(1,),
    learnRateDecay=0.5,
    batch_size=2,
    weightDecay=None,
    biasDecay=None,
    gammaDecay=None,
    betaDecay=None,
    momentum=0.0,
  )
  params = {'w': jnp.zeros(())}
  fns = train_lib.create_learning_rate_fns(config, num_train=4)  # decay step 2
  tx = train_lib.create_optimizer(config, fns, {'w': go.EUCLIDEAN})
  state = tx.init(params)
  steps = []
  for _ in range(4):
    updates, state = tx.update({'w': jnp.ones(())}, state, params)
    steps.append(-float(updates['w']))
  np.testing.assert_allclose(steps, [0.1, 0.1, 0.1, 0.05], rtol=1e-6)
  np.testing.assert_allclose([float(fns['learning_rate'](s)) for s in range(4)], steps, rtol=1e-6)


def test_each_device_draws_its_own_dropout_mask_under_pmap():
  """The step's dropout key folds in the device index: the same input, different masks."""
  rng = jax.random.key(3)

  def mask(x):
    key = train_lib.dropout_rng(rng, jnp.int32(5), 'batch')
    return nn.Dropout(0.5, deterministic=False).apply({}, x, rngs={'dropout': key})

  masks = jax.pmap(mask, axis_name='batch')(jnp.ones((2, 256)))
  assert not np.array_equal(masks[0], masks[1])
  one = jax.jit(lambda: train_lib.dropout_rng(rng, jnp.int32(5)))()
  assert not np.array_equal(jax.random.key_data(one), jax.random.key_data(rng))


# ---------------------------------------------------------------------------------------------
# End-to-end runs.


def test_digits_default_end_to_end(tmp_path, capsys, monkeypatch):
  """The default program, a few steps, into ``<train_dir>/<run name>`` given relative.

  Also: the training step is traced once (no recompilation after the first step), and the
  orthogonality penalty, computed only at report steps, is that of the parameters at that step.
  """
  traces = []
  step = train_lib.train_step
  monkeypatch.setattr(train_lib, 'train_step', lambda *a, **k: traces.append(1) or step(*a, **k))
  monkeypatch.chdir(tmp_path)
  argv = [
    *TINY,
    '--max_steps=4',
    '--report_freq=2',
    '--vali_freq=2',
    '--save_freq=2',
    '--max_to_keep=2',
    '--train_dir=logs',
  ]
  code, out, _ = run_main(argv, capsys)
  assert len(traces) == 1
  run_dir = tmp_path / 'logs' / 'digits_wrn-10-1_adamg'
  assert code == 0
  match = FINAL_LINE.match(out.strip().splitlines()[-1])
  assert match, out
  summary = json.loads((run_dir / 'summary.json').read_text())
  assert summary['steps'] == int(match.group(3)) == 4
  assert summary['config']['learnRate'] == 0.05 and summary['config']['num_classes'] == 10
  assert float(match.group(1)) == pytest.approx(summary['test_error'], rel=1e-5)
  assert float(match.group(2)) == pytest.approx(summary['test_loss'], rel=1e-5)
  assert 0.0 <= summary['test_error'] <= 1.0 and np.isfinite(summary['test_loss'])
  records = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
  assert [(r['step'], r['split']) for r in records] == [
    (2, 'train'),
    (2, 'test'),
    (4, 'train'),
    (4, 'test'),
  ]
  assert {'loss', 'error', 'learning_rate', 'learning_rate_g', 'orthogonality'} <= set(records[0])
  assert records[0]['learning_rate'] == pytest.approx(0.05)
  assert records[-1]['error'] == pytest.approx(summary['test_error'])
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(run_dir))
  assert checkpoint_steps(run_dir) == [2, 4]
  for record in (records[0], records[2]):
    params = checkpoints.load(str(run_dir / 'checkpoints' / str(record['step'])))[1]['params']
    penalty = go.orthogonality_penalty(params, go.grassmann_labels(params), 0.1)
    assert record['orthogonality'] == pytest.approx(float(penalty), rel=1e-5)


@pytest.mark.parametrize(
  ('data', 'model'),
  [*((data, 'resnet') for data in TFDS_DATASETS), ('cifar10', 'vgg11')],
)
def test_tfds_datasets_and_models_run(tmp_path, capsys, data, model):
  config = flags_lib.parse(
    [
      *(TINY if model == 'resnet' else TINY_VGG),
      f'--data={data}',
      f'--model={model}',
      '--max_steps=2',
      '--vali_batch_size=8',
      f'--train_path={tmp_path / "run"}',
      f'--data_dir={tmp_path / "data"}',
      *(['--width_scale=0.125'] if model != 'resnet' else []),
    ]
  )
  info = input_pipeline.DATASETS[data]
  with prepared_tfds(tmp_path / 'data', info.tfds.name, num_examples=16):
    result = train_lib.train_and_evaluate(config)
    if model == 'vgg11':  # --task=test reads a VGG checkpoint's architecture, with no depth
      load = [f'--load={tmp_path / "run"}', f'--data_dir={tmp_path / "data"}', '--verbose=0']
      code, out, err = run_main(['--task=test', *load, '--vali_batch_size=8'], capsys)
      assert code == 0 and out.strip().endswith('steps=2'), err
      code, _, err = run_main(['--task=test', *load, '--depth=16'], capsys)
      assert code == 2 and '--depth=16 applies to the wide ResNet only' in err, err
  assert result['steps'] == 2
  assert 0.0 <= result['test_error'] <= 1.0 and np.isfinite(result['test_loss'])
  step, state, saved = checkpoints.load(str(tmp_path / 'run'))
  assert step == 2 and saved['num_classes'] == info.num_classes
  head = state['params']['fc' if model == 'resnet' else 'fc2']['kernel']
  assert head.shape[-1] == info.num_classes


@pytest.mark.parametrize('parallel', ['pmap', 'sharded', 'fsdp'])
def test_two_devices_match_one(tmp_path, one_device_run, parallel):
  """Two devices with the same global batch give the one-device parameters, statistics and
  test metrics.

  BatchNorm moments are averaged over both devices (pmap axis name, or the global batch under
  sharded jit) and gradients are averaged, so the step is the same function; only float32
  reductions are reordered. After 3 steps the largest absolute difference is ~1.2e-7 (one ulp
  at 1), so atol=1e-6 holds with margin; relative differences are only large on entries near 0,
  hence the loose rtol. Without synchronised BatchNorm the parameters differ by ~3e-2. No
  dropout, whose masks legitimately differ per device.
  """
  assert jax.device_count() == 2
  code = run_main(
    [
      *TINY,
      '--max_steps=3',
      '--num_devices=2',
      f'--parallel={parallel}',
      '--keep_prob=None',
      f'--train_path={tmp_path}',
    ]
  )
  assert code == 0
  reference, actual = final_state(one_device_run), final_state(tmp_path)
  assert int(actual['step']) == int(reference['step']) == 3
  for part in ('params', 'batch_stats', 'opt_state'):
    assert_trees_close(actual[part], reference[part], rtol=1e-5, atol=1e-6)
  summaries = [
    json.loads((path / 'summary.json').read_text()) for path in (one_device_run, tmp_path)
  ]
  for name in ('test_error', 'test_loss', 'test_top5_error'):
    assert summaries[1][name] == pytest.approx(summaries[0][name], rel=1e-5, abs=1e-6), name


@pytest.mark.parametrize('parallel', ['pmap', pytest.param('fsdp', marks=pytest.mark.slow)])
def test_resume_continues_exactly(tmp_path, parallel):
  """3 steps, then a restart to 6 steps, equals 6 straight steps, dropout on.

  The batch and the dropout key of step s are functions of (seed, s) and the checkpoint holds
  the step, parameters, BN statistics and optimizer state, so both runs execute the same
  compiled steps on the same values: bit-for-bit equal on CPU.
  """
  flags = [
    *TINY,
    '--keep_prob=0.5',
    '--optimizer=sgdg',
    '--report_freq=1',
    f'--parallel={parallel}',
  ]
  assert run_main([*flags, '--max_steps=3', f'--train_path={tmp_path / "resumed"}']) == 0
  assert checkpoint_steps(tmp_path / 'resumed') == [3]
  # A run killed after its checkpoint had logged steps that the resumed run logs again.
  with open(tmp_path / 'resumed' / 'metrics.jsonl', 'a') as log:
    log.write(json.dumps({'step': 4, 'split': 'train', 'loss': 9.0}) + '\n')
  assert run_main([*flags, '--max_steps=6', f'--train_path={tmp_path / "resumed"}']) == 0
  assert run_main([*flags, '--max_steps=6', f'--train_path={tmp_path / "straight"}']) == 0
  resumed, straight = final_state(tmp_path / 'resumed'), final_state(tmp_path / 'straight')
  assert int(resumed['step']) == int(straight['step']) == 6
  assert_trees_close(resumed, straight, rtol=0, atol=0)
  records = (tmp_path / 'resumed' / 'metrics.jsonl').read_text().splitlines()
  assert [json.loads(r)['step'] for r in records if '"train"' in r] == [1, 2, 3, 4, 5, 6]


def test_fsdp_splits_the_state_and_equals_pmap_over_20_steps(tmp_path):
  """``--parallel=fsdp``: parameters and optimizer state split over the devices; 20 Adam-G steps
  (ω = 0.1, so the orthogonality Gram crosses devices) equal ``--parallel=pmap`` up to the order
  of float32 sums."""
  from jax.sharding import PartitionSpec as P

  from train import parallel as parallel_lib

  assert parallel_lib.fsdp_spec((3, 3, 16, 16), 2) == P(None, None, 'data', None)
  assert parallel_lib.fsdp_spec((3, 3, 16, 160), 2) == P(None, None, None, 'data')
  assert parallel_lib.fsdp_spec((16,), 2) == P()  # too small to split
  assert parallel_lib.fsdp_spec((3, 3, 3, 1023), 2) == P()  # no axis the devices divide
  layout = parallel_lib.create_parallel(
    config_lib.get_config(parallel='fsdp'), jax.devices()[:2], None, lambda *a, **k: {}
  )
  placed = layout.put_state({'kernel': np.ones((3, 3, 16, 16), np.float32)})['kernel']
  assert placed.sharding.spec == P(None, None, 'data', None)
  assert {shard.data.shape for shard in placed.addressable_shards} == {(3, 3, 8, 16)}

  # Checkpoints every 7 steps: each waits, split on the devices, for its next step to come out
  # finite, while that step is given (and donates) the state.
  flags = [
    *TINY,
    '--max_steps=20',
    '--num_devices=2',
    '--keep_prob=None',
    '--omega=0.1',
    '--save_freq=7',
    '--max_to_keep=3',
  ]
  for parallel in ('pmap', 'fsdp'):
    assert run_main([*flags, f'--parallel={parallel}', f'--train_path={tmp_path / parallel}']) == 0
    assert checkpoint_steps(tmp_path / parallel) == [7, 14, 20]
  reference, actual = final_state(tmp_path / 'pmap'), final_state(tmp_path / 'fsdp')
  assert int(actual['step']) == int(reference['step']) == 20
  for part in ('params', 'batch_stats', 'opt_state'):
    assert_trees_close(actual[part], reference[part], rtol=1e-4, atol=2e-5)


def test_task_test_evaluates_a_checkpoint(one_device_run, capsys):
  summary = json.loads((one_device_run / 'summary.json').read_text())
  before = directory_snapshot(one_device_run)
  for load in (one_device_run, one_device_run / 'checkpoints' / '3'):
    # Architecture flags left out are read from the checkpoint.
    code, out, _ = run_main(['--task=test', f'--load={load}', '--verbose=0'], capsys)
    assert code == 0
    match = FINAL_LINE.match(out.strip().splitlines()[-1])
    assert match and int(match.group(3)) == 3
    assert float(match.group(1)) == pytest.approx(summary['test_error'], abs=1e-6)
    assert float(match.group(2)) == pytest.approx(summary['test_loss'], rel=1e-4)
  assert directory_snapshot(one_device_run) == before


# ---------------------------------------------------------------------------------------------
# Errors: one line, exit code 2, no traceback, nothing written.


@pytest.mark.parametrize(
  ('argv', 'message'),
  [
    (['--depth=27'], '--depth=27 must be 6N+4'),
    (['--batch_size=3', '--num_devices=2'], '--batch_size=3 does not split over 2 devices'),
    (['--model=alexnet'], 'flag --model=alexnet: value should be one of'),
    (['--data=mnist'], 'flag --data=mnist: value should be one of'),
    (['--optimizer=adam'], 'flag --optimizer=adam: value should be one of'),
    (['--task=test'], '--task=test needs --load'),
    (['--optimizer=sgd', '--grassmann=True'], '--grassmann=True needs a Riemannian optimizer'),
    (['--num_devices=3'], '--num_devices (--num_gpus)=3, but this process sees 2 device(s)'),
    (['--num_gpus=3'], '--num_devices (--num_gpus)=3, but this process sees 2 device(s)'),
    (['--grassmann=maybe'], 'flag --grassmann=maybe: '),
    (['--bogus=1'], "Unknown command line flag 'bogus'"),
    (['--decay_epochs=60,x'], '--decay_epochs=60,x: expected integers'),
    (['extra'], 'unexpected argument(s): extra'),
    (['--width_scale=0.5'], '--width_scale=0.5 applies to VGG only'),
    (['--model=vgg11', '--width_scale=0'], '--width_scale=0.0 must be > 0'),
    (['--model=vgg11', '--widen_factor=8'], '--widen_factor=8 applies to the wide ResNet only;'),
    (['--model=vgg13', '--depth=12'], '--depth=12 applies to the wide ResNet only; --model=vgg13'),
    (['--process_id=2', '--num_processes=2'], '--process_id=2 must be below --num_processes=2'),
    (['--adam_eps=0'], '--adam_eps=0.0 must be a number in [1.175e-38, 3.403e+38]'),
    (['--train_dir='], "--train_dir='' is empty: give a directory, or leave the flag out"),
    (['--load= '], "--load=' ' is empty"),
    (['--omega=3e38'], '--omega=3e+38 is too large for this model: its orthogonality penalty'),
    (['--data=cifar10', '--crop_size=41'], '--crop_size=41 exceeds the padded image'),
    (['--epochs=0.01'], '--epochs=0.01 of 1497 digits images at --batch_size=64 is less than'),
    (['--task=test', '--load=/nonexistent/run'], '--load=/nonexistent/run: no checkpoint there'),
  ],
)
def test_usage_errors(tmp_path, capsys, argv, message):
  code, out, err = run_main([*argv, f'--train_path={tmp_path / "run"}'], capsys)
  assert code == 2
  assert err.startswith('error: ') and message in err, err
  assert len(err.strip().splitlines()) == 1 and not out
  assert not (tmp_path / 'run').exists()


def test_incomplete_process_flags_are_a_usage_error(tmp_path):
  # In a process of its own: JAX's distributed setup must come before its backend starts.
  run = program('--process_id=0', f'--train_path={tmp_path / "run"}')
  out, err = run.communicate(timeout=SUBPROCESS_TIMEOUT_S)
  assert run.returncode == 2 and not out, err
  assert err.startswith('error: --process_id=0: several processes need --coordinator_address')
  assert len(err.strip().splitlines()) == 1 and not (tmp_path / 'run').exists()


@pytest.mark.parametrize(
  ('flag', 'value'),
  [
    ('batch_size', '0'),
    ('batch_size', '-4'),
    ('vali_batch_size', '0'),
    ('save_freq', '0'),
    ('vali_freq', '0'),
    ('report_freq', '0'),
    ('max_to_keep', '0'),
    ('k', '0'),
    ('epochs', '0'),
    ('epochs', 'inf'),
    ('max_steps', '0'),
    ('max_steps', '-5'),
    ('learnRate', 'nan'),
    ('learnRate', '-0.1'),
    ('learnRateG', '-1'),
    ('learnRateG', 'inf'),
    ('learnRateDecay', 'nan'),
    ('keep_prob', '0'),
    ('keep_prob', '1.5'),
    ('grad_clip', '-1'),
    ('grad_clip', '0'),
    ('momentum', '1'),
    ('adam_beta2', '1.5'),
    ('adam_beta2', '-0.1'),
    ('adam_eps', '-1e-8'),
    ('omega', '-0.1'),
    ('weightDecay', '-5e-4'),
    ('betaDecay', 'nan'),
    ('seed', '-1'),
    ('num_devices', '0'),
    ('widen_factor', '0'),
  ],
)
def test_flags_out_of_range_are_refused_before_any_work(tmp_path, capsys, flag, value):
  code, out, err = run_main([f'--{flag}={value}', f'--train_path={tmp_path / "run"}'], capsys)
  assert code == 2, err
  assert err.startswith(f'error: --{flag}=') and len(err.strip().splitlines()) == 1, err
  assert 'Traceback' not in err and not out
  assert not (tmp_path / 'run').exists()


def test_get_config_checks_like_the_command_line():
  with pytest.raises(config_lib.ConfigError, match='--keep_prob=0 must be in'):
    config_lib.get_config(keep_prob=0)
  with pytest.raises(config_lib.ConfigError, match='unknown flag'):
    config_lib.get_config(learning_rate=0.1)
  with pytest.raises(config_lib.ConfigError, match='--data=.mnist.: choose one of'):
    config_lib.get_config(data='mnist')
  assert config_lib.get_config(keep_prob=1.0, grad_clip=None, omega=0.0).keep_prob == 1.0


def test_checkpoint_of_another_architecture_is_refused(tmp_path, one_device_run, capsys):
  # The refused runs hold the lock for a moment, and write their process id into it.
  before = directory_snapshot(one_device_run, exclude=['lock'])
  code, _, err = run_main(
    [*TINY, '--depth=16', '--widen_factor=2', '--max_steps=3', f'--train_path={one_device_run}'],
    capsys,
  )
  assert code == 2
  assert 'checkpoint was written for resnet depth=10 width=1' in err, err
  assert 'this run is resnet depth=16 width=2' in err
  code, _, err = run_main(
    [*TINY_VGG, '--model=vgg11', f'--load={one_device_run}', f'--train_path={tmp_path / "new"}'],
    capsys,
  )
  assert code == 2 and 'this run is vgg11' in err, err
  assert directory_snapshot(one_device_run, exclude=['lock']) == before
  # Evaluated: the advice is to leave the flags out, and only flags are named as flags.
  code, _, err = run_main(['--task=test', f'--load={one_device_run}', '--depth=16'], capsys)
  assert code == 2 and '(--depth=10 -> 16)' in err, err
  assert err.strip().endswith(
    'leave out the architecture flags: --task=test reads them from the checkpoint'
  )
  saved = config_lib.to_json(config_lib.get_config(), 10)
  with pytest.raises(config_lib.ConfigError, match=r'\(--data=digits -> cifar100, ') as refused:
    config_lib.check_architecture(saved, config_lib.get_config(data='cifar100'), 100)
  assert 'num_classes' not in str(refused.value) and 'with 100 classes' in str(refused.value)
  # The new run directory holds its lock file and nothing else.
  assert os.listdir(tmp_path / 'new') == ['lock']


def test_unprepared_tfds_dataset_fails_offline_without_network(tmp_path, capsys, monkeypatch):
  probed = []
  monkeypatch.setattr(
    input_pipeline, '_host_reachable', lambda host, port: probed.append(host) or False
  )
  code, _, err = run_main(
    ['--data=cifar10', f'--data_dir={tmp_path}', *TINY, f'--train_path={tmp_path / "run"}'], capsys
  )
  assert code == 2
  assert err.startswith('error: ') and 'not prepared' in err, err
  assert probed == ['www.cs.toronto.edu']
