"""Tests for train/models.py: shapes, parameter names, and which kernels the library puts on the
manifold (:func:`grassmann_optax.grassmann_labels`, the paper's rule: a conv kernel whose fan-in
exceeds its number of outputs).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import grassmann_optax as go
from train import models


def _init(model, image_shape, batch=2):
  # Jitted: op-by-op execution of a whole network costs seconds per call on CPU.
  init = jax.jit(functools.partial(model.init, train=False))
  return init(jax.random.key(0), jnp.zeros((batch, *image_shape)))


def _params(model, image_shape):
  """Parameter shapes without allocating them."""
  return jax.eval_shape(lambda: _init(model, image_shape))['params']


def _names(tree):
  return {
    '/'.join(k.key for k in path): leaf
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _shapes(model, image_shape):
  return {name: tuple(leaf.shape) for name, leaf in _names(_params(model, image_shape)).items()}


def _manifold_kernels(model, image_shape):
  """The names the library labels ``'grassmann'``."""
  labels = _names(go.grassmann_labels(_params(model, image_shape)))
  return {name for name, label in labels.items() if label == go.GRASSMANN}


def _batch_norm_settings(model, image_shape):
  """(momentum, epsilon, use_scale, use_bias, axis_name) of every BatchNorm the model calls."""
  settings = set()

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.BatchNorm):
      m = context.module
      settings.add((m.momentum, m.epsilon, m.use_scale, m.use_bias, m.axis_name))
    return next_fun(*args, **kwargs)

  x = jnp.zeros((2, *image_shape))
  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda: model.apply(_init(model, image_shape), x, train=False))
  return settings


# The 3x3 convolutions of each model at its defaults, counted from the papers rather than the
# code (WRN-10-k: the stem and 3 groups of one block of two; VGG-n: n layers, 3 of them dense): a
# model added to models.MODELS gets its entry here.
CONVOLUTIONS = {'resnet': 1 + 3 * 2, 'vgg11': 8, 'vgg13': 10, 'vgg16': 13, 'vgg19': 16}


def test_every_model_is_registered():
  assert list(models.MODELS) == list(CONVOLUTIONS)


@pytest.mark.parametrize('image_shape', [(32, 32, 3), (8, 8, 1)])
@pytest.mark.parametrize('name', list(models.MODELS))
def test_every_model_builds_its_convolutions_and_logits(name, image_shape):
  model = models.create_model(name, num_classes=7)
  shapes = _shapes(model, image_shape)
  assert len([shape for shape in shapes.values() if shape[:2] == (3, 3)]) == CONVOLUTIONS[name]
  x = jnp.zeros((3, *image_shape))
  logits = jax.eval_shape(lambda: model.apply(_init(model, image_shape), x, train=False))
  assert logits.shape == (3, 7)
  assert logits.dtype == jnp.float32


def test_vgg_forward_on_digits_sized_input():
  model = models.create_model('vgg11', num_classes=10)
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
  logits = jax.jit(functools.partial(model.apply, train=False))(_init(model, (8, 8, 1)), x)
  assert logits.shape == (4, 10)
  assert np.all(np.isfinite(logits))
  assert np.ptp(np.asarray(logits), axis=0).max() > 0  # Different inputs, different logits.


@pytest.mark.parametrize('depth', [27, 4, 9, 12])
def test_bad_depth_raises_at_construction(depth):
  with pytest.raises(ValueError, match=rf'6N\+4.*got {depth}'):
    models.WideResNet(depth=depth, widen_factor=1, num_classes=10)


def test_unknown_model_name_lists_valid_names():
  with pytest.raises(ValueError, match=', '.join(CONVOLUTIONS)):
    models.create_model('vgg12', num_classes=10)


def test_wrn_28_10_kernels_and_manifold_set():
  model = models.create_model('resnet', num_classes=10, depth=28, widen_factor=10)
  shapes = _shapes(model, (32, 32, 3))
  # Written out from the architecture (N = 4 blocks per group, widths 160, 320, 640), not from
  # the model code.
  widths = {1: 160, 2: 320, 3: 640}
  expected_kernels = {'conv0/kernel': (3, 3, 3, 16), 'fc/kernel': (640, 10)}
  for group, width in widths.items():
    for block in range(4):
      c_in = {1: 16, 2: 160, 3: 320}[group] if block == 0 else width
      prefix = f'group{group}_block{block}'
      expected_kernels[f'{prefix}/conv1/kernel'] = (3, 3, c_in, width)
      expected_kernels[f'{prefix}/conv2/kernel'] = (3, 3, width, width)
      if block == 0:
        expected_kernels[f'{prefix}/projection/kernel'] = (1, 1, c_in, width)
  kernels = {name: shape for name, shape in shapes.items() if name.endswith('kernel')}
  assert kernels == expected_kernels
  assert len([n for n in kernels if 'conv' in n]) == 25

  # conv0 (27 > 16) is on the manifold, group-1 block-0 conv1 (144 < 160) is not, every other
  # 3x3 conv is, projections and fc are not.
  three_by_three = {n for n, s in kernels.items() if s[:2] == (3, 3)}
  selected = _manifold_kernels(model, (32, 32, 3))
  assert selected == three_by_three - {'group1_block0/conv1/kernel'}
  assert len(selected) == 24


@pytest.mark.parametrize(
  'depth, widen_factor, first_conv_manifold',
  [(16, 4, True), (22, 8, True), (10, 9, False), (28, 10, False)],
)
def test_wrn_first_group_conv_selection(depth, widen_factor, first_conv_manifold):
  # 3x3x16 -> 64 (144 > 64) and -> 128 (144 > 128) are manifold; -> 144 (fan-in equal to the
  # outputs: the rule is strict) and -> 160 are not.
  model = models.create_model('resnet', num_classes=10, depth=depth, widen_factor=widen_factor)
  shapes = _shapes(model, (32, 32, 3))
  assert shapes['group1_block0/conv1/kernel'] == (3, 3, 16, 16 * widen_factor)
  selected = _manifold_kernels(model, (32, 32, 3))
  assert ('group1_block0/conv1/kernel' in selected) == first_conv_manifold
  # The second conv of the block is 3x3x16k -> 16k (fan-in 9 times the outputs): always manifold.
  assert 'group1_block0/conv2/kernel' in selected


def test_vgg19_kernels_and_manifold_set():
  model = models.create_model('vgg19', num_classes=100)
  shapes = _shapes(model, (32, 32, 3))
  convs_per_group = (2, 2, 4, 4, 4)
  widths = (64, 128, 256, 512, 512)
  expected_kernels = {'fc0/kernel': (512, 512), 'fc1/kernel': (512, 512), 'fc2/kernel': (512, 100)}
  c_in = 3
  for group, (num_convs, width) in enumerate(zip(convs_per_group, widths, strict=True)):
    for i in range(num_convs):
      expected_kernels[f'group{group}/conv{i}/kernel'] = (3, 3, c_in, width)
      c_in = width
  kernels = {name: shape for name, shape in shapes.items() if name.endswith('kernel')}
  assert kernels == expected_kernels
  conv_names = {n for n in kernels if 'conv' in n}
  assert len(conv_names) == 16
  # First conv 27 <= 64 stays Euclidean; the fc kernels have 2 axes, never a conv's 4.
  assert _manifold_kernels(model, (32, 32, 3)) == conv_names - {'group0/conv0/kernel'}


@pytest.mark.parametrize(('width_scale', 'first'), [(0.125, 8), (0.5, 32), (2.0, 128)])
def test_vgg_width_scale_multiplies_every_width(width_scale, first):
  shapes = _shapes(models.create_model('vgg11', num_classes=10, width_scale=width_scale), (8, 8, 1))
  widths = [round(w * width_scale) for w in models.VGG_WIDTHS]
  assert widths[0] == first
  assert shapes['group0/conv0/kernel'] == (3, 3, 1, widths[0])
  assert shapes['group4/conv1/kernel'] == (3, 3, widths[4], widths[4])
  assert shapes['fc1/kernel'] == (widths[4], widths[4])


def test_no_conv_bias_and_vgg_bn_has_no_scale():
  wrn = _shapes(models.create_model('resnet', num_classes=10, depth=16, widen_factor=2), (8, 8, 1))
  vgg = _shapes(models.create_model('vgg13', num_classes=10), (8, 8, 1))
  for shapes in (wrn, vgg):
    conv_params = [n for n in shapes if 'conv' in n or 'projection' in n]
    assert conv_params and all(n.endswith('/kernel') for n in conv_params)
  # Every WRN bias is a BN beta (next to its gamma) or the fc bias.
  wrn_betas = {n.replace('/scale', '/bias') for n in wrn if n.endswith('/scale')}
  assert {n for n in wrn if n.endswith('/bias')} == wrn_betas | {'fc/bias'}
  # VGG BN layers are shift-only: a bias and no scale (TF vgg.py, scale=False).
  assert not [n for n in vgg if n.endswith('scale')]
  assert {n for n in vgg if n.endswith('bias')} == (
    {f'group{g}/bn{i}/bias' for g, k in enumerate((2, 2, 2, 2, 2)) for i in range(k)}
    | {'fc0_bn/bias', 'fc1_bn/bias', 'fc2/bias'}
  )
  # 2 BNs per block (3 groups x 2 blocks for WRN-16) plus the final one.
  assert len(wrn_betas) == 13


def test_batch_norm_momentum_and_epsilon():
  model = models.create_model('resnet', num_classes=10)
  x = jax.random.normal(jax.random.key(2), (16, 8, 8, 3)) * 3.0 + 1.0
  variables = _init(model, (8, 8, 3))
  _, updates = jax.jit(functools.partial(model.apply, train=True, mutable=['batch_stats']))(
    variables, x
  )
  # conv0 feeds group1_block0/bn1 directly, so its batch moments can be recomputed here.
  y = jax.lax.conv_general_dilated(
    x,
    variables['params']['conv0']['kernel'],
    (1, 1),
    'SAME',
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
  )
  stats = updates['batch_stats']['group1_block0']['bn1']
  # pop <- 0.99 pop + 0.01 batch, starting from mean 0, var 1 (biased batch variance).
  np.testing.assert_allclose(stats['mean'], 0.01 * y.mean((0, 1, 2)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats['var'], 0.99 + 0.01 * y.var((0, 1, 2)), rtol=1e-4)

  assert _batch_norm_settings(model, (8, 8, 3)) == {(0.99, 1e-5, True, True, None)}


@pytest.mark.parametrize('name', ['resnet', 'vgg11'])
def test_batch_norm_settings(name):
  model = models.create_model(name, num_classes=10, bn_axis_name='batch')
  use_scale = name == 'resnet'  # VGG's BN layers are shift-only (TF vgg.py, scale=False).
  assert _batch_norm_settings(model, (8, 8, 3)) == {(0.99, 1e-5, use_scale, True, 'batch')}


@pytest.mark.parametrize(
  'make',
  [
    lambda keep_prob: models.WideResNet(
      depth=10, widen_factor=1, num_classes=10, keep_prob=keep_prob
    ),
    # VGG's dropout lives in its groups; one small group keeps the test fast.
    lambda keep_prob: models.VGGGroup(
      features=8, num_convs=1, keep_prob=keep_prob, bn_axis_name=None
    ),
  ],
  ids=['resnet', 'vgg_group'],
)
def test_dropout_only_in_train_mode(make):
  model = make(0.5)
  x = jax.random.normal(jax.random.key(3), (4, 8, 8, 3))
  variables = _init(model, (8, 8, 3))

  @functools.partial(jax.jit, static_argnames='train')
  def output(train, key):
    out, _ = model.apply(variables, x, train=train, rngs={'dropout': key}, mutable=['batch_stats'])
    return out

  def run(train, seed):
    return np.asarray(output(train, jax.random.key(seed)))

  assert np.all(np.isfinite(run(False, 0)))
  np.testing.assert_array_equal(run(False, 0), run(False, 1))
  np.testing.assert_array_equal(run(True, 0), run(True, 0))
  assert not np.allclose(run(True, 0), run(True, 1))

  # Without keep_prob there is no dropout layer: training needs no 'dropout' rng.
  plain = make(None)
  plain_vars = jax.eval_shape(lambda: _init(plain, (8, 8, 3)))
  out = jax.eval_shape(
    lambda v: plain.apply(v, x, train=True, mutable=['batch_stats'])[0], plain_vars
  )
  assert out.shape[0] == 4
