"""The optimizers inside the Optax and Flax wrappers users put around optimizers.

``docs/composition.md`` has the table these tests stand behind: each wrapper either keeps every
point on its sphere, or the library warns once (at run time) and names ``go.project_params``,
which maps the params that the wrapper hands back onto the manifold.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import grassmann_optax as go
from grassmann_optax._src import steps

LABELS = {'w': 'grassmann', 'b': 'euclidean'}


def params_and_grads(seed=0):
  key_w, key_g = jax.random.split(jax.random.key(seed))
  params = {'w': go.unit_initializer()(key_w, (3, 3, 4, 8)), 'b': jnp.zeros(8)}
  grads = [
    jax.tree.map(lambda p, k=k: jax.random.normal(jax.random.fold_in(key_g, k), p.shape), params)
    for k in range(6)
  ]
  return params, grads


def run(tx, params, grads, **extra):
  state = tx.init(params)
  update = jax.jit(tx.update)
  for g in grads:
    updates, state = update(g, state, params, **extra)
    params = optax.apply_updates(params, updates)
  return params, state


def norms(w):
  return np.linalg.norm(np.asarray(w).reshape(-1, w.shape[-1]), axis=0)


@pytest.fixture
def warnings_once_more():
  """The wrapper warning is once per wrapper and process; let each test see it afresh."""
  steps._warned_wrappers.clear()
  yield
  steps._warned_wrappers.clear()


def test_inject_hyperparams_on_the_step_and_the_alias():
  params, grads = params_and_grads()
  plain, _ = run(go.adamg(0.01, 0.05, param_labels=LABELS), params, grads)
  injected = optax.inject_hyperparams(go.adamg, static_args=('param_labels',))(
    learning_rate=0.01, grassmann_learning_rate=0.05, param_labels=LABELS
  )
  got, state = run(injected, params, grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), plain, got)
  step = optax.inject_hyperparams(go.grassmann_sgd)(learning_rate=0.2, momentum=0.9)
  w, _ = run(step, params['w'], [g['w'] for g in grads])
  np.testing.assert_allclose(norms(w), 1, atol=1e-6)
  assert float(state.hyperparams['grassmann_learning_rate']) == pytest.approx(0.05)


def test_multi_steps_applies_the_mean_gradient_every_k_steps():
  params, grads = params_and_grads()
  tx = optax.MultiSteps(go.adamg(0.01, 0.05, param_labels=LABELS), every_k_schedule=2)
  got, _ = run(tx, params, grads)
  means = [jax.tree.map(lambda a, b: (a + b) / 2, *grads[k : k + 2]) for k in (0, 2, 4)]
  expected, _ = run(go.adamg(0.01, 0.05, param_labels=LABELS), params, means)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got, expected)
  np.testing.assert_allclose(norms(got['w']), 1, atol=1e-6)


def test_apply_if_finite_and_global_norm_clipping_before_the_partition():
  params, grads = params_and_grads()
  grads = [jax.tree.map(lambda g: 100 * g, g) for g in grads]
  grads[2] = {**grads[2], 'w': grads[2]['w'].at[0, 0, 0, 0].set(jnp.nan)}
  inner = go.sgdg(0.01, 0.2, param_labels=LABELS)
  tx = optax.apply_if_finite(optax.chain(optax.clip_by_global_norm(1.0), inner), 3)
  got, state = run(tx, params, grads)
  clipped = [optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())[0] for g in grads]
  expected, _ = run(inner, params, clipped[:2] + clipped[3:])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got, expected)
  assert int(state.total_notfinite) == 1


def test_schedule_free_warns_once_and_project_params_maps_its_evaluation_params_back(
  warnings_once_more,
):
  params, grads = params_and_grads()
  tx = optax.contrib.schedule_free(go.adamg(0.01, 0.05, b1=0.0, param_labels=LABELS), 0.05)
  with pytest.warns(UserWarning, match='project_params') as caught:
    got, state = run(tx, params, grads)
    tx.init(params)  # once
  (warning,) = [w for w in caught if 'off the manifold' in str(w.message)]
  assert warning.filename == __file__  # the user's line, not optax's
  evaluation = optax.contrib.schedule_free_eval_params(state, got)
  assert float(np.abs(norms(evaluation['w']) - 1).max()) > 1e-4
  back = go.project_params(evaluation, LABELS)
  np.testing.assert_allclose(norms(back['w']), 1, atol=1e-6)


def test_lookahead_warns_and_its_slow_params_map_back(warnings_once_more):
  params, grads = params_and_grads()
  tx = optax.lookahead(go.sgdg(0.01, 0.2, param_labels=LABELS), 2, 0.5)
  start = optax.LookaheadParams.init_synced(params)
  with pytest.warns(UserWarning, match='optax.lookahead.*off the manifold'):
    got, _ = run(tx, start, grads)
  assert float(np.abs(norms(got.slow['w']) - 1).max()) > 1e-3
  np.testing.assert_allclose(norms(go.project_params(got.slow, LABELS)['w']), 1, atol=1e-6)


def test_a_hyperball_alias_in_lookahead_warns_and_its_points_map_back_to_their_radii(
  warnings_once_more,
):
  """The alias's points, matrices and the heads of attention kernels, are what
  ``go.transformer_point_axes`` gives ``project_params``, with the radii of its state."""
  keys = jax.random.split(jax.random.key(0), 4)
  params = {
    'attn': {'query': {'kernel': jax.random.normal(keys[0], (8, 2, 4))}},
    'mlp': {'kernel': jax.random.normal(keys[1], (8, 16))},
  }
  grads = [
    jax.tree.map(lambda p, i=i: jax.random.normal(keys[2 + i], p.shape), params) for i in (0, 1)
  ]
  inner = go.adamh(1e-3, 0.1)
  radius = inner.init(params).inner_states['grassmann'].inner_state.radius
  tx = optax.lookahead(inner, 2, 0.5)
  with pytest.warns(UserWarning, match='adam.*optax.lookahead.*off the manifold'):
    got, _ = run(tx, optax.LookaheadParams.init_synced(params), grads)
  heads = lambda tree: jnp.linalg.norm(tree['attn']['query']['kernel'], axis=(0, 2))
  assert float(np.abs(heads(got.slow) - radius['attn']['query']['kernel']).max()) > 1e-4
  back = go.project_params(
    got.slow, go.transformer_labels, radius=radius, point_axes=go.transformer_point_axes
  )
  np.testing.assert_allclose(heads(back), radius['attn']['query']['kernel'], rtol=1e-6)
  np.testing.assert_allclose(
    jnp.linalg.norm(back['mlp']['kernel']), radius['mlp']['kernel'], rtol=1e-6
  )


def test_reduce_on_plateau_gets_the_loss_and_scales_the_step():
  """Chained after the optimizer it scales the update, the chord of the geodesic step: the
  points come off the sphere by about s(1 − s)θ²/2, and stay about that far off while s < 1."""
  params, grads = params_and_grads()
  tx = optax.chain(
    go.adamg(0.01, 0.2, param_labels=LABELS),
    optax.contrib.reduce_on_plateau(factor=0.5, patience=1),
  )
  got, state = run(tx, params, grads, value=jnp.ones([]))  # a plateau from the start
  assert float(state[1].scale) < 1
  assert 1e-6 < float(np.abs(norms(got['w']) - 1).max()) < 1e-2


def test_no_warning_where_nothing_moves_the_params(warnings_once_more):
  params, grads = params_and_grads()
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    for tx in (go.adamg(0.01, 0.05, param_labels=LABELS), go.sgdg(0.01, 0.2, param_labels=LABELS)):
      run(optax.MultiSteps(tx, 2), jax.tree.map(lambda p: 3 * p, params), grads)


class Net(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 8, (3, 3), use_bias=False, kernel_init=go.unit_initializer(), rngs=rngs)
    self.norm = nnx.BatchNorm(8, rngs=rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.norm(self.conv(x))).mean((1, 2)))


def _alias_with_boxed_labels(model):
  labels = go.grassmann_labels(
    nnx.state(model, nnx.Param), predicate=lambda path, leaf: leaf.ndim == 4
  )
  return go.adamg(0.01, 0.05, param_labels=labels)


def _readme_chain_with_callable_labels(model):
  """A plain optax.partition matches labels by tree structure: the callable labels the raw
  arrays that nnx.Optimizer hands it (docs/composition.md)."""
  manifold = optax.chain(go.add_orthogonality_gradient(0.1), go.grassmann_adam(0.05, grad_clip=0.1))
  euclidean = optax.sgd(0.01, 0.9, nesterov=True)
  return optax.partition({'grassmann': manifold, 'euclidean': euclidean}, go.grassmann_labels)


@pytest.mark.parametrize('build', [_alias_with_boxed_labels, _readme_chain_with_callable_labels])
def test_nnx_optimizer_with_labels_from_the_state_and_the_loss_as_value(build):
  model = Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, build(model), wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (16, 6, 6, 1))
  y = jnp.arange(16) % 3

  @nnx.jit
  def train_step(model, optimizer, x, y):
    def loss_fn(model):
      logits = model(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads, value=loss)
    return loss

  losses = [float(train_step(model, optimizer, x, y)) for _ in range(20)]
  assert losses[-1] < losses[0]
  np.testing.assert_allclose(norms(model.conv.kernel.get_value()), 1, atol=1e-6)


@pytest.mark.parametrize('alias', [go.sgdg, go.adamg], ids=['sgdg', 'adamg'])
@pytest.mark.parametrize(
  'shape, point_axes',
  [((3, 3, 4, 8), None), ((16, 2, 4), (0, 2)), ((12, 3), (0, 1))],
  ids=['columns', 'heads', 'whole'],
)
def test_vmap_over_runs_equals_a_loop(alias, shape, point_axes):
  """``jax.vmap`` over independent runs (a sweep of seeds and rates in one program, as the
  notebooks do) equals running them one by one, orthogonality term included."""
  runs, rates = 3, jnp.asarray([0.02, 0.05, 0.1])
  keys = jax.random.split(jax.random.key(1), runs)
  labels = {'w': 'grassmann', 'b': 'euclidean'}

  def one_run(rate, key):
    key_w, key_g = jax.random.split(key)
    params = {'w': go.unit_initializer()(key_w, shape), 'b': jnp.zeros(shape[-1])}
    tx = alias(0.01, rate, omega=0.1, param_labels=labels, point_axes={'w': point_axes})

    def step(k, carry):  # a loop, not three copies of the step: a third of the compile time
      params, state = carry
      g = jax.tree.map(lambda p: jax.random.normal(jax.random.fold_in(key_g, k), p.shape), params)
      updates, state = tx.update(g, state, params)
      return optax.apply_updates(params, updates), state

    return jax.lax.fori_loop(0, 3, step, (params, tx.init(params)))[0]

  batched = jax.jit(jax.vmap(one_run))(rates, keys)
  for i in range(runs):
    alone = jax.jit(one_run)(rates[i], keys[i])
    for name in alone:
      np.testing.assert_allclose(batched[name][i], alone[name], rtol=2e-5, atol=2e-6)
