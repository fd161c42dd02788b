"""Properties of the manifold transforms and aliases that hold for any input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import grassmann_optax as go
from grassmann_optax._src import manifold


def random_columns(key, shape, dtype=jnp.float32):
  return go.unit_initializer()(key, shape, dtype)


def column_norms(x):
  return jnp.linalg.norm(x.reshape(-1, x.shape[-1]).astype(jnp.float32), axis=0)


def aliases():
  return {
    'sgdg': lambda **kw: go.sgdg(
      0.01, 0.2, param_labels=lambda p: jax.tree.map(lambda _: 'grassmann', p), **kw
    ),
    'adamg': lambda **kw: go.adamg(
      0.01, 0.05, param_labels=lambda p: jax.tree.map(lambda _: 'grassmann', p), **kw
    ),
  }


def manifold_chain(name, **hp):
  moments = go.grassmann_momentum(0.9) if name == 'sgdg' else go.grassmann_adam_moments()
  lr = 0.2 if name == 'sgdg' else 0.05
  return optax.chain(
    go.add_orthogonality_gradient(hp.get('omega', 0.1)),
    go.project_to_tangent(),
    go.grassmann_clip(0.1),
    moments,
    optax.scale_by_learning_rate(hp.get('lr', lr)),
    go.exp_map_update(),
  )


@pytest.mark.parametrize('route', ['alias', 'chain'])
@pytest.mark.parametrize('name', ['sgdg', 'adamg'])
def test_columns_stay_unit_over_10000_float32_steps(name, route):
  key = jax.random.key(0)
  params = {'a': random_columns(key, (3, 3, 4, 8)), 'b': random_columns(key, (40, 6))}
  tx = aliases()[name]() if route == 'alias' else manifold_chain(name)
  state = tx.init(params)

  def step(carry, key):
    params, state, worst = carry
    keys = jax.random.split(key, 2)
    # Gradients of every scale, some far above the clipping threshold.
    grads = {
      k: 10 ** jax.random.uniform(kk, (), minval=-6, maxval=2) * jax.random.normal(kk, p.shape)
      for (k, p), kk in zip(sorted(params.items()), keys, strict=True)
    }
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    err = jnp.max(jnp.concatenate([jnp.abs(column_norms(p) - 1) for p in params.values()]))
    return (params, state, jnp.maximum(worst, err)), None

  (params, _, worst), _ = jax.lax.scan(
    step, (params, state, jnp.zeros([])), jax.random.split(key, 10_000)
  )
  assert params['a'].dtype == jnp.float32
  assert float(worst) < 1e-6, f'column norm drifted by {float(worst):.2e}'


def test_projected_updates_are_tangent():
  key_w, key_g = jax.random.split(jax.random.key(1))
  w = 3.0 * random_columns(key_w, (5, 5, 3, 7))  # stored weight need not be unit
  g = jax.random.normal(key_g, w.shape)
  tx = go.project_to_tangent()
  h, _ = tx.update(g, tx.init(w), w)
  y, _ = manifold.unit(w)
  np.testing.assert_allclose(manifold.column_dot(y, h), 0, atol=1e-6)
  # ... and the projection only removed the radial part.
  np.testing.assert_allclose(h + manifold.column_dot(y, g) * y, g, atol=1e-6)


@pytest.mark.parametrize('name', ['sgdg', 'adamg'])
def test_buffer_stays_tangent_and_transport_preserves_norm(name):
  key_w, key_g = jax.random.split(jax.random.key(2))
  w = random_columns(key_w, (30, 4))
  tx = manifold_chain(name)
  state = tx.init(w)
  for k in range(5):
    g = jax.random.normal(jax.random.fold_in(key_g, k), w.shape)
    updates, state = tx.update(g, state, w)
    w = optax.apply_updates(w, updates)
  buffer = state[3].trace if name == 'sgdg' else state[3].mu
  y, _ = manifold.unit(w)
  carried = manifold.transport_to(y, buffer)
  np.testing.assert_allclose(column_norms(carried), column_norms(buffer), rtol=1e-6)
  np.testing.assert_allclose(manifold.column_dot(y, carried), 0, atol=1e-6)


def test_lazy_transport_equals_parallel_transport_along_the_step():
  """SPEC §10: for a step along −b, ‖b‖P(b)/‖P(b)‖ at the new point equals Eq. 8 (E7)."""
  key_y, key_b = jax.random.split(jax.random.key(3))
  y = random_columns(key_y, (20, 6))
  b = manifold.project(y, jax.random.normal(key_b, y.shape))
  for scale in (1e-4, 0.1, 1.0):  # step angles up to > 1 rad, all below π/2
    d = -scale * b / column_norms(b)
    y_new = manifold.exp_map(y, d)
    eager = manifold.transport(y, b, d)
    np.testing.assert_allclose(manifold.transport_to(y_new, b), eager, atol=2e-6)


@pytest.mark.parametrize('scale', [1e-3, 0.5, 7.0, 1e3])
@pytest.mark.parametrize('name', ['sgdg', 'adamg'])
def test_scaling_a_manifold_leaf_leaves_the_trajectory_of_unit_w_unchanged(name, scale):
  """The optimizer works at unit(w) (SPEC S1): for the same gradients, c·w follows w.

  The first step lands on the unit sphere through ``w + (exp_y(d) − w)`` in float32, which rounds
  at ``ulp(c)``, so the tolerance grows with ``c`` for that reason alone.
  """
  key_w, key_g = jax.random.split(jax.random.key(4))
  w = random_columns(key_w, (3, 3, 2, 5))
  grads = [jax.random.normal(jax.random.fold_in(key_g, k), w.shape) for k in range(6)]

  def trajectory(w):
    tx = aliases()[name]()
    state = tx.init(w)
    out = []
    for g in grads:
      updates, state = tx.update(g, state, w)
      w = optax.apply_updates(w, updates)
      out.append(manifold.unit(w)[0])
    return out

  for a, b in zip(trajectory(w), trajectory(scale * w), strict=True):
    ulp = float(jnp.finfo(jnp.float32).eps) * scale
    np.testing.assert_allclose(a, b, atol=max(1e-6, 4 * ulp))


def _reduction_dtypes(jaxpr):
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ('reduce_sum', 'dot_general'):
      found.extend(v.aval.dtype for v in eqn.invars)
    for sub in jax.core.jaxprs_in_params(eqn.params):
      found.extend(_reduction_dtypes(sub))
  return found


@pytest.mark.parametrize('route', ['alias', 'chain'])
@pytest.mark.parametrize('name', ['sgdg', 'adamg'])
def test_bfloat16_params_stay_bfloat16_with_float32_norms(name, route):
  w = random_columns(jax.random.key(5), (3, 3, 8, 16), jnp.bfloat16)
  g = jax.random.normal(jax.random.key(6), w.shape, jnp.bfloat16)
  tx = aliases()[name]() if route == 'alias' else manifold_chain(name)
  state = tx.init(w)
  updates, state = tx.update(g, state, w)
  new = optax.apply_updates(w, updates)
  assert updates.dtype == jnp.bfloat16 and new.dtype == jnp.bfloat16
  assert all(x.dtype in (jnp.bfloat16, jnp.float32, jnp.int32) for x in jax.tree.leaves(state))
  np.testing.assert_allclose(column_norms(new), 1, atol=1e-2)
  jaxpr = jax.make_jaxpr(tx.update)(g, state, w)
  dtypes = _reduction_dtypes(jaxpr.jaxpr)
  assert dtypes and all(d == jnp.float32 for d in dtypes), dtypes


@pytest.mark.parametrize('name', ['sgdg', 'adamg'])
def test_float64_params_stay_float64(name):
  with jax.enable_x64(True):
    w = random_columns(jax.random.key(7), (12, 3), jnp.float64)
    tx = aliases()[name]()
    state = tx.init(w)
    for k in range(3):
      g = jax.random.normal(jax.random.key(k), w.shape, jnp.float64)
      updates, state = jax.jit(tx.update)(g, state, w)
      w = optax.apply_updates(w, updates)
    assert w.dtype == jnp.float64
    assert all(x.dtype in (jnp.float64, jnp.int32) for x in jax.tree.leaves(state))
    np.testing.assert_allclose(column_norms(w).astype(jnp.float64), 1, atol=1e-12)


@pytest.mark.parametrize('route', ['alias', 'chain'])
@pytest.mark.parametrize('name', ['sgdg', 'adamg'])
def test_no_recompilation_after_the_first_jitted_step(name, route):
  params = {'k': random_columns(jax.random.key(8), (3, 3, 4, 8)), 'b': jnp.zeros(8)}
  schedule = optax.piecewise_constant_schedule(0.1, {2: 0.5})
  tx = (go.sgdg if name == 'sgdg' else go.adamg)(0.01, schedule)
  if route == 'chain':
    tx = optax.partition(
      {'grassmann': manifold_chain(name), 'euclidean': optax.sgd(0.01)},
      go.grassmann_labels(params),
    )

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for k in range(4):
    grads = jax.tree.map(lambda p, k=k: jnp.full_like(p, 0.1 * (k + 1)), params)
    params, state = step(params, state, grads)
  assert step._cache_size() == 1


def test_works_inside_inject_hyperparams():
  params = {'k': random_columns(jax.random.key(9), (3, 3, 4, 8)), 'b': jnp.ones(8)}
  grads = jax.tree.map(lambda p: 0.05 * jnp.ones_like(p), params)
  plain = go.adamg(0.01, 0.05, omega=0.1)
  injected = optax.inject_hyperparams(go.adamg)(
    learning_rate=0.01, grassmann_learning_rate=0.05, omega=0.1
  )
  u_plain, _ = plain.update(grads, plain.init(params), params)
  state = injected.init(params)
  u_injected, state = jax.jit(injected.update)(grads, state, params)
  for a, b in zip(jax.tree.leaves(u_plain), jax.tree.leaves(u_injected), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-7)
  # A changed hyper-parameter takes effect: zero manifold learning rate, zero manifold step.
  state.hyperparams['grassmann_learning_rate'] = jnp.zeros([])
  updates, _ = jax.jit(injected.update)(grads, state, params)
  np.testing.assert_allclose(updates['k'], 0, atol=1e-7)
  assert float(jnp.abs(updates['b']).max()) > 0


@pytest.mark.parametrize('name', ['sgdg', 'adamg'])
def test_schedules_drive_both_learning_rates(name):
  """A schedule that drops to zero after 2 steps freezes the parameters from step 3 on."""
  params = {'k': random_columns(jax.random.key(10), (3, 3, 4, 8)), 'b': jnp.ones(8)}
  stop = optax.piecewise_constant_schedule(0.05, {2: 0.0})
  tx = (go.sgdg if name == 'sgdg' else go.adamg)(stop, stop)
  state = tx.init(params)
  history = []
  for k in range(4):
    grads = jax.tree.map(lambda p, k=k: jnp.sin(jnp.arange(p.size) + k).reshape(p.shape), params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    params = optax.apply_updates(params, updates)
    history.append(params)
  for key in ('k', 'b'):
    assert float(jnp.abs(history[1][key] - history[0][key]).max()) > 1e-4
    np.testing.assert_allclose(history[3][key], history[1][key], atol=1e-6)


def test_omega_zero_costs_nothing():
  assert go.add_orthogonality_gradient(0) is not None
  w = random_columns(jax.random.key(11), (27, 8))
  tx = go.sgdg(0.01, 0.2, omega=0, param_labels={'w': 'grassmann'})
  jaxpr = jax.make_jaxpr(tx.update)({'w': w}, tx.init({'w': w}), {'w': w})
  assert 'dot_general' not in str(jaxpr)
  identity = go.add_orthogonality_gradient(0.0)
  g, _ = identity.update(w, identity.init(w), w)
  assert g is w


def test_orthogonality_gradient_is_the_gradient_of_the_penalty():
  w = random_columns(jax.random.key(12), (3, 3, 4, 8))
  labels = {'w': 'grassmann'}
  auto = jax.grad(lambda p: go.orthogonality_penalty(p, labels, 0.1))({'w': w})['w']
  tx = go.add_orthogonality_gradient(0.1)
  added, _ = tx.update(jnp.zeros_like(w), tx.init(w), w)
  np.testing.assert_allclose(added, auto, atol=1e-6)
  assert float(jnp.abs(added).max()) > 1e-3


@pytest.mark.parametrize('name', ['sgdg', 'adamg'])
@pytest.mark.parametrize(
  'shapes', [{'dense': (6, 3)}, {'conv': (3, 3, 4, 6)}], ids=['no-manifold-leaf', 'only-manifold']
)
def test_an_empty_branch_of_the_partition_is_fine(name, shapes):
  params = {key: random_columns(jax.random.key(0), shape) for key, shape in shapes.items()}
  tx = getattr(go, name)(0.1, 0.2)
  if 'conv' in params:
    state = tx.init(params)
  else:
    with pytest.warns(UserWarning, match='no leaf of the params'):
      state = tx.init(params)
  updates, state = jax.jit(tx.update)(params, state, params)
  new_params = optax.apply_updates(params, updates)
  assert jax.tree.structure(new_params) == jax.tree.structure(params)
  moved = jax.tree.leaves(
    jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new_params, params)
  )
  assert all(np.isfinite(moved)) and all(m > 0 for m in moved)
