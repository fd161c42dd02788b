"""Label trees, scale-invariance detection, the penalty and the initializer; bad input."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.core import freeze

import grassmann_optax as go
from grassmann_optax._src.checks import leaf_name


class SmallNet(nn.Module):
  """conv_bn feeds a BatchNorm (scale-invariant); conv_plain and head do not."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(16, (3, 3), use_bias=False, name='conv_bn')(x)
    x = nn.relu(nn.BatchNorm(use_running_average=False, name='bn')(x))
    x = nn.Conv(16, (3, 3), use_bias=False, name='conv_plain')(x)
    x = nn.relu(x)
    return nn.Dense(10, name='head')(x.mean((1, 2)))


def small_net():
  model = SmallNet()
  x = jax.random.normal(jax.random.key(0), (16, 8, 8, 3))
  variables = jax.jit(model.init)(jax.random.key(1), x)  # one program, not one per operation
  return model, variables, x


def test_grassmann_labels_follows_the_paper_rule():
  params = {
    'conv0': jnp.zeros((3, 3, 3, 16)),  # 27 > 16: manifold
    'conv1': jnp.zeros((3, 3, 16, 160)),  # 144 <= 160: Euclidean
    'conv2': jnp.zeros((3, 3, 160, 160)),  # manifold
    'projection': jnp.zeros((1, 1, 16, 160)),  # Euclidean
    'fc': jnp.zeros((640, 10)),  # dense kernels never
    'bias': jnp.zeros(10),
  }
  assert go.grassmann_labels(params) == {
    'conv0': 'grassmann',
    'conv1': 'euclidean',
    'conv2': 'grassmann',
    'projection': 'euclidean',
    'fc': 'euclidean',
    'bias': 'euclidean',
  }
  custom = go.grassmann_labels(params, predicate=lambda path, leaf: leaf.ndim == 2)
  assert custom['fc'] == 'grassmann' and custom['conv0'] == 'euclidean'


def _train_one_step(tx, params):
  grads = jax.tree.map(lambda p: 0.01 * jnp.ones_like(p), params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  return optax.apply_updates(params, updates)


def test_labels_and_aliases_work_on_dict_and_frozendict():
  _, variables, _ = small_net()
  params = variables['params']
  for tree in (dict(params), freeze(params)):
    labels = go.grassmann_labels(tree)
    assert jax.tree.structure(labels) == jax.tree.structure(jax.tree.map(lambda _: 0, tree)), type(
      tree
    )
    assert labels['conv_bn']['kernel'] == 'grassmann'
    assert labels['head']['kernel'] == 'euclidean'
    new = _train_one_step(go.adamg(0.01, 0.05), tree)
    np.testing.assert_allclose(
      jnp.linalg.norm(new['conv_bn']['kernel'].reshape(-1, 16), axis=0), 1, atol=1e-6
    )
  # A plain-dict label tree for FrozenDict params is rebuilt in their structure.
  new = _train_one_step(
    go.sgdg(0.01, 0.2, param_labels=go.grassmann_labels(dict(params))), freeze(params)
  )
  assert float(jnp.abs(new['head']['kernel'] - params['head']['kernel']).max()) > 0


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.fc = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, x):
    return self.fc(nnx.relu(self.bn(self.conv(x))).mean((1, 2)))


def test_labels_and_optimizer_work_on_nnx_state():
  model = NnxNet(nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  labels = go.grassmann_labels(state)
  unboxed = jax.tree.map(
    lambda v: v.get_value(), labels, is_leaf=lambda v: isinstance(v, nnx.Variable)
  )
  flat = {leaf_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(unboxed)[0]}
  assert flat == {
    'bn/bias': 'euclidean',
    'bn/scale': 'euclidean',
    'conv/kernel': 'grassmann',
    'fc/bias': 'euclidean',
    'fc/kernel': 'euclidean',
  }
  optimizer = nnx.Optimizer(model, go.adamg(0.01, 0.05, param_labels=labels), wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(0), (4, 6, 6, 3))
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
  optimizer.update(model, grads)
  norms = jnp.linalg.norm(model.conv.kernel[...].reshape(-1, 8), axis=0)
  np.testing.assert_allclose(norms, 1, atol=1e-6)


def test_point_axes_found_on_nnx_state_drive_nnx_optimizer():
  # find_scale_invariant on an nnx.State returns boxed trees; its point axes (one point per head
  # of a LinearGeneral) used to raise an AttributeError inside Flax when given to an alias.
  class Heads(nnx.Module):
    def __init__(self, rngs):
      self.q = nnx.LinearGeneral(8, (2, 4), use_bias=False, rngs=rngs)  # kernel (8, 2, 4)
      self.norm = nnx.RMSNorm(4, use_scale=False, rngs=rngs)  # per head: QK-norm
      self.out = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
      h = self.norm(self.q(x))
      return self.out(h.reshape(*h.shape[:-2], 8))

  model = Heads(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (16, 8))
  graphdef, state = nnx.split(model, nnx.Param)
  loss = lambda s, x: jnp.mean(nnx.merge(graphdef, s)(x) ** 2)
  found = go.find_scale_invariant(loss, state, x)
  optimizer = nnx.Optimizer(model, go.adamg(0.01, 0.05, **found._asdict()), wrt=nnx.Param)

  @nnx.jit  # one program, not one per operation
  def step(model, optimizer):
    optimizer.update(model, nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model))

  step(model, optimizer)
  norms = jnp.linalg.norm(model.q.kernel[...], axis=(0, 2))  # each head's (8, 4) matrix
  np.testing.assert_allclose(norms, 1, atol=1e-6)


def test_labels_and_point_axes_match_params_in_linen_partitioning_boxes():
  # Params boxed by nn.with_partitioning take the plain trees that optax.partition takes; the
  # boxes used to make the names end in '/value', so neither tree matched.
  rs = np.random.RandomState(0)
  raw = {'conv': {'kernel': jnp.asarray(rs.randn(3, 3, 4, 8), jnp.float32)}, 'b': jnp.ones(8)}
  boxed = {**raw, 'conv': {'kernel': nn.Partitioned(raw['conv']['kernel'], (None,) * 3 + ('m',))}}
  labels = {'conv': {'kernel': 'grassmann'}, 'b': 'euclidean'}
  for kwargs in ({'param_labels': labels}, {'point_axes': {'conv': {'kernel': None}, 'b': None}}):
    tx = go.adamg(0.01, 0.05, **kwargs)
    grads = jax.tree.map(jnp.ones_like, raw)
    expected, _ = tx.update(grads, tx.init(raw), raw)
    boxed_grads = jax.tree.map(jnp.ones_like, boxed)
    got, _ = tx.update(boxed_grads, tx.init(boxed), boxed)
    assert isinstance(got['conv']['kernel'], nn.Partitioned)
    np.testing.assert_array_equal(got['conv']['kernel'].value, expected['conv']['kernel'])


def test_find_scale_invariant_finds_the_kernels_that_feed_batchnorm():
  model, variables, x = small_net()
  labels_y = jax.random.randint(jax.random.key(2), (x.shape[0],), 0, 10)

  def loss(params, x, y):
    logits, _ = model.apply(
      {'params': params, **{k: v for k, v in variables.items() if k != 'params'}},
      x,
      mutable=['batch_stats'],
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  found = go.find_scale_invariant(loss, variables['params'], x, labels_y)
  labels = found.param_labels
  assert labels['conv_bn']['kernel'] == 'grassmann'
  assert labels['conv_plain']['kernel'] == 'euclidean'
  assert labels['head']['kernel'] == 'euclidean'
  assert labels['bn']['scale'] == 'euclidean'
  assert found.point_axes['conv_bn']['kernel'] is None  # the columns


def test_find_scale_invariant_leaves_an_unused_kernel_euclidean():
  """A zero gradient satisfies Euler's relation trivially and tells nothing."""
  k1, k2, k3 = jax.random.split(jax.random.key(4), 3)
  params = {
    'used': jax.random.normal(k1, (8, 4)),
    'unused': jax.random.normal(k2, (8, 4)),
    'head': jax.random.normal(k3, (4, 2)),
  }

  def loss(p, x):
    z = x @ p['used']
    z = (z - z.mean(0)) / z.std(0)
    return jnp.sum(jnp.sin(z @ p['head'])) + 0.0 * jnp.sum(p['unused'])

  x = jax.random.normal(jax.random.key(5), (32, 8))
  found = go.find_scale_invariant(loss, params, x)
  assert found.param_labels == {'used': 'grassmann', 'unused': 'euclidean', 'head': 'euclidean'}


def test_orthogonality_penalty_value():
  w = go.unit_initializer()(jax.random.key(3), (3, 3, 4, 8))
  cols = np.asarray(w).reshape(-1, 8)
  expected = 0.05 * np.sum((cols.T @ cols - np.eye(8)) ** 2)
  params = {'w': w, 'b': jnp.ones(3)}
  got = go.orthogonality_penalty(params, go.grassmann_labels(params), 0.1)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  np.testing.assert_allclose(go.orthogonality_penalty(params, go.grassmann_labels, 0.1), got)
  # Point axes that fit the manifold leaves only, as the aliases take them: the rows of a Dense
  # kernel beside a bias (the bias used to be refused as having no axis 1).
  dense = {'w': jnp.asarray(cols[:, :6].T), 'b': jnp.ones(3)}  # rows: 6 points of 36
  labels = {'w': 'grassmann', 'b': 'euclidean'}
  rows = go.orthogonality_penalty(dense, labels, 0.1, point_axes=1)
  np.testing.assert_allclose(rows, 0.05 * np.sum((cols[:, :6].T @ cols[:, :6] - np.eye(6)) ** 2))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_unit_initializer_gives_unit_columns(dtype):
  w = go.unit_initializer()(jax.random.key(4), (5, 5, 3, 12), dtype)
  assert w.shape == (5, 5, 3, 12) and w.dtype == dtype
  norms = jnp.linalg.norm(w.reshape(-1, 12).astype(jnp.float32), axis=0)
  np.testing.assert_allclose(norms, 1, atol=1e-6 if dtype == jnp.float32 else 1e-2)
  assert float(jnp.std(w.astype(jnp.float32))) > 0.05  # random directions, not a constant


# --- bad input: a ValueError that names the offending leaf -------------------------------------

PARAMS = {'conv': {'kernel': jnp.ones((3, 3, 4, 8))}, 'head': {'bias': jnp.ones(8)}}


def test_label_tree_that_does_not_match_the_params():
  with pytest.raises(ValueError, match=r"no label for the leaf 'head/bias'"):
    go.sgdg(0.1, 0.1, param_labels={'conv': {'kernel': 'grassmann'}}).init(PARAMS)
  extra = {'conv': {'kernel': 'grassmann', 'bias': 'euclidean'}, 'head': {'bias': 'euclidean'}}
  with pytest.raises(ValueError, match=r"'conv/bias' names no parameter"):
    go.adamg(0.1, 0.1, param_labels=extra).init(PARAMS)


def test_unknown_label_and_unfit_leaf_name_the_optimizer_and_the_leaf():
  labels = {'conv': {'kernel': 'grassman'}, 'head': {'bias': 'euclidean'}}
  with pytest.raises(
    ValueError, match=r"^sgdg: unknown label 'grassman' for the leaf 'conv/kernel'"
  ):
    go.sgdg(0.1, 0.1, param_labels=labels).init(PARAMS)
  one_row = {'w': jnp.ones((1, 4))}
  with pytest.raises(ValueError, match=r"^adamg: the grassmann leaf 'w' of shape \(1, 4\)"):
    go.adamg(0.1, 0.1, param_labels={'w': 'grassmann'}).init(one_row)
  with pytest.raises(ValueError, match=r"^orthogonality_penalty: the grassmann leaf 'w'"):
    go.orthogonality_penalty(one_row, {'w': 'grassmann'}, 0.1)


def test_grassmann_leaf_with_fewer_than_two_rows():
  labels = {'conv': {'kernel': 'grassmann'}, 'head': {'bias': 'grassmann'}}
  with pytest.raises(ValueError, match=r"'head/bias'.*at least 2 rows"):
    go.adamg(0.1, 0.1, param_labels=labels).init(PARAMS)
  for transform in (go.project_to_tangent(), go.grassmann_sgd(0.1), go.exp_map_update()):
    with pytest.raises(ValueError, match=r"leaf 'x'.*at least 2 rows"):
      transform.init({'x': jnp.ones((1, 4))})


@pytest.mark.parametrize('outputs', [144, 160])
def test_grassmann_leaf_whose_fan_in_is_not_larger_than_its_outputs(outputs):
  params = {'wide': jnp.ones((3, 3, 16, outputs))}
  assert go.grassmann_labels(params) == {'wide': 'euclidean'}
  reason = (  # only fewer rows than outputs makes orthogonal columns impossible
    'fan-in 144 = 144 points per group: the paper keeps such square groups Euclidean'
    if outputs == 144
    else 'fan-in 144 < 160 points per group: its 160 unit points cannot be mutually orthogonal'
  )
  with pytest.raises(ValueError, match=f"'wide'.*{reason}"):
    go.sgdg(0.1, 0.1, param_labels={'wide': 'grassmann'}).init(params)
  # One row fewer per output and the same kernel is a manifold leaf.
  narrower = {'wide': jnp.ones((3, 3, 16, 143))}
  assert go.grassmann_labels(narrower) == {'wide': 'grassmann'}
  go.sgdg(0.1, 0.1, param_labels={'wide': 'grassmann'}).init(narrower)


@pytest.mark.parametrize(
  'dtype, kind',
  [
    (jnp.int32, 'not floating-point'),
    (jnp.bool_, 'not floating-point'),
    (jnp.complex64, 'complex'),
  ],
)
def test_manifold_leaves_must_be_real_floating_point(dtype, kind):
  params = {'conv': {'kernel': jnp.ones((3, 3, 4, 8), dtype)}, 'head': {'bias': jnp.ones(8)}}
  labels = {'conv': {'kernel': 'grassmann'}, 'head': {'bias': 'euclidean'}}
  for factory in (go.sgdg, go.adamg):
    with pytest.raises(ValueError, match=rf"'conv/kernel'.*{kind}"):
      factory(0.1, 0.1, param_labels=labels).init(params)
  transforms = [
    go.add_orthogonality_gradient(0.1),
    go.project_to_tangent(),
    go.exp_map_update(),
    go.grassmann_sgd(0.1),
    go.grassmann_adam(0.1),
  ]
  for transform in transforms:
    with pytest.raises(ValueError, match=rf"leaf 'kernel'.*{kind}"):
      transform.init(params['conv'])


@pytest.mark.parametrize('factory', [go.sgdg, go.adamg])
def test_a_tree_with_no_manifold_leaf_warns_and_says_what_to_do(factory):
  params = {'dense': {'kernel': jnp.ones((32, 10))}, 'bias': jnp.zeros(10)}
  with pytest.warns(UserWarning, match='no leaf of the params') as caught:
    factory(0.1, 0.1).init(params)
  (warning,) = caught
  for remedy in ('param_labels', 'grassmann_labels', 'predicate', 'find_scale_invariant'):
    assert remedy in str(warning.message)
  assert warning.filename == __file__  # the user's line, not the library's
  with pytest.warns(UserWarning, match='no leaf of the params') as caught:
    jax.jit(factory(0.1, 0.1).init)(params)  # raised while jax traces
  assert [w.filename for w in caught] == [__file__]
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    factory(0.1, 0.1).init({'conv': jnp.ones((3, 3, 4, 8)), 'bias': jnp.zeros(8)})


def _update_with(tx, init_params, params, grads):
  return tx.update(grads, tx.init(init_params), params)


@pytest.mark.parametrize(
  'make, labelled',
  [
    (
      lambda: go.sgdg(0.1, 0.1, param_labels=lambda p: {'conv': 'grassmann', 'bias': 'euclidean'}),
      1,
    ),
    (
      lambda: go.adamg(0.1, 0.1, param_labels=lambda p: {'conv': 'grassmann', 'bias': 'euclidean'}),
      1,
    ),
    (lambda: go.grassmann_sgd(0.1), 0),
    (lambda: go.grassmann_adam(0.1), 0),
    (lambda: go.project_to_tangent(), 0),
    (lambda: go.exp_map_update(), 0),
    (lambda: go.euclidean_sgd(0.1), 0),
  ],
)
def test_update_on_other_trees_than_at_init_names_the_leaf(make, labelled):
  tx = make()
  kernel = go.unit_initializer()(jax.random.key(0), (3, 3, 4, 8))
  params = {'conv': kernel, 'bias': jnp.zeros(8)} if labelled else {'conv': kernel}
  # Gradients of another shape than the params.
  grads = {**params, 'conv': jnp.ones((3, 3, 4, 9))}
  with pytest.raises(ValueError, match=r"leaf 'conv' has shape \(3, 3, 4, 9\)"):
    _update_with(tx, params, params, grads)
  # Params and gradients of another shape than at init (not checked by transforms without state).
  if make().init(params) == optax.EmptyState():
    return
  other = {**params, 'conv': go.unit_initializer()(jax.random.key(1), (3, 3, 4, 6))}
  with pytest.raises(ValueError, match=r"leaf 'conv' has shape \(3, 3, 4, 6\)"):
    _update_with(tx, params, other, other)
  # A leaf missing.
  fewer = {key: value for key, value in params.items() if key != 'conv'} or {'x': kernel}
  with pytest.raises(ValueError, match="'conv'"):
    _update_with(tx, params, fewer, fewer)


@pytest.mark.parametrize(
  'make, message',
  [
    (lambda: go.sgdg(0.1, 0.1, grad_clip=-1.0), 'grad_clip=-1.0'),
    (lambda: go.sgdg(0.1, 0.1, grad_clip=0.0), 'grad_clip=0.0'),
    (lambda: go.adamg(0.1, 0.1, b1=1.0), 'b1=1.0'),
    (lambda: go.adamg(0.1, 0.1, b2=1.5), 'b2=1.5'),
    (lambda: go.adamg(0.1, 0.1, eps=-1e-8), 'eps=-1e-08'),
    (lambda: go.sgdg(0.1, 0.1, omega=-0.1), 'omega=-0.1'),
    (lambda: go.sgdg(0.1, 0.1, momentum=1.5), 'momentum=1.5'),
    (lambda: go.grassmann_sgd(0.1, -0.1), 'momentum=-0.1'),
    (lambda: go.sgdg(0.1, 0.1, weight_decay=float('nan')), 'weight_decay=nan'),
    (lambda: go.grassmann_clip(-0.1), 'max_norm=-0.1'),
    (lambda: go.grassmann_adam(0.1, b2=1.0), 'b2=1.0'),
  ],
)
def test_hyperparameters_outside_their_range_are_refused(make, message):
  with pytest.raises(ValueError, match=message.replace('(', r'\(')):
    make()


@pytest.mark.parametrize(
  'make, name',
  [
    (lambda: go.sgdg(0.1, 0.1, momentum=None), 'momentum'),
    (lambda: go.grassmann_sgd(0.1, None), 'momentum'),
    (lambda: go.adamg(0.1, 0.1, b1=None), 'b1'),
    (lambda: go.adamg(0.1, 0.1, eps=None), 'eps'),
    (lambda: go.adamg(0.1, 0.1, omega=None), 'omega'),
    (lambda: go.adamg(0.1, None), 'grassmann_learning_rate'),
    (lambda: go.muonh(1e-3, 0.1, momentum=None), 'momentum'),
  ],
)
def test_none_for_a_hyperparameter_that_needs_a_number_is_refused_at_construction(make, name):
  # They used to be accepted, then fail at the first update with a raw TypeError.
  with pytest.raises(TypeError, match=f'{name}=None: expected a real number'):
    make()


def test_none_means_none_where_optax_says_so():
  params = {'w': jnp.ones((4, 3))}
  grads = {'w': jnp.full((4, 3), 2.0)}
  tx = go.euclidean_sgd(0.1, momentum=None, weight_decay=None)  # as optax.sgd(momentum=None)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates['w'], -0.2)
  go.sgdg(0.1, 0.1, grad_clip=None, weight_decay=None)


@pytest.mark.parametrize('zero', [0, 0.0, np.float32(0), np.array(0.0)])
def test_a_zero_omega_of_any_static_kind_turns_the_orthogonality_term_off(zero):
  # A square kernel needs omega = 0 (the paper keeps square kernels Euclidean); NumPy zeros were
  # taken for values that could change, and the kernel was refused.
  params = {'w': jnp.eye(6)}
  tx = go.adamg(0.1, 0.1, omega=zero, param_labels={'w': 'grassmann'})
  tx.update(params, tx.init(params), params)


@pytest.mark.parametrize(
  'transform',
  [
    go.add_orthogonality_gradient(0.1),
    go.project_to_tangent(),
    go.grassmann_sgd(0.1),
    go.grassmann_adam(0.1),
    go.exp_map_update(),
    go.sgdg(0.1, 0.1),
    go.adamg(0.1, 0.1),
  ],
)
def test_transforms_that_need_params_say_so(transform):
  params = (
    PARAMS if transform.init.__qualname__.startswith('grassmann_partition') else PARAMS['conv']
  )
  state = transform.init(params)
  with pytest.raises(ValueError, match='params'):
    transform.update(params, state)


def test_callable_labels_under_inject_hyperparams_need_static_args():
  labels_fn = go.grassmann_labels
  params = {'k': go.unit_initializer()(jax.random.key(0), (3, 3, 4, 8)), 'b': jnp.zeros(8)}
  wrong = optax.inject_hyperparams(go.adamg)(0.01, 0.05, param_labels=labels_fn)
  with pytest.raises(ValueError, match='static_args'):
    wrong.init(params)
  right = optax.inject_hyperparams(go.adamg, static_args=('param_labels',))(
    0.01, 0.05, param_labels=labels_fn
  )
  new = _train_one_step(right, params)
  np.testing.assert_allclose(jnp.linalg.norm(new['k'].reshape(-1, 8), axis=0), 1, atol=1e-6)


def test_find_scale_invariant_does_not_take_a_chance_orthogonality_for_invariance():
  """A gradient orthogonal to w at one point, by construction, but not at points near it."""
  rs = np.random.RandomState(0)
  w = rs.randn(6, 5)
  a = rs.randn(6, 5)
  a -= np.sum(a * w, axis=0) * w / np.sum(w * w, axis=0)  # each column of a ⊥ that of w
  params = {'w': jnp.asarray(w)}
  loss = lambda p: jnp.sum(jnp.asarray(a) * p['w'])
  once = go.find_scale_invariant(loss, params, draws=1, undercomplete_only=False)
  assert once.param_labels == {'w': 'grassmann'}
  found = go.find_scale_invariant(loss, params, undercomplete_only=False)
  assert found.param_labels == {'w': 'euclidean'}
