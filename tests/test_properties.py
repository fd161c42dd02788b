"""Properties of the manifold transforms and aliases that hold for any input."""

import chex
import jax
import jax.extend.core
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


def manifold_step(name, lr=None, **hp):
  if name == 'sgdg':
    return go.grassmann_sgd(0.2 if lr is None else lr, 0.9, **hp)
  return go.grassmann_adam(0.05 if lr is None else lr, **hp)


def manifold_chain(name, omega=0.1, **hp):
  """The README's chain: the orthogonality term, then the manifold step."""
  return optax.chain(go.add_orthogonality_gradient(omega), manifold_step(name, **hp))


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
def test_the_transported_buffer_is_tangent_at_the_current_point(name):
  """Decoded with its basis, the stored buffer is tangent at the point it has moved to, also
  after steps of about a right angle (where it is stored in a mixed basis)."""
  key_w, key_g = jax.random.split(jax.random.key(2))
  w = random_columns(key_w, (30, 4))
  tx = manifold_step(name, lr=1.6 if name == 'adamg' else 2.0, grad_clip=None)
  state = tx.init(w)
  for k in range(8):
    g = jax.random.normal(jax.random.fold_in(key_g, k), w.shape)
    updates, state = tx.update(g, state, w)
    w = optax.apply_updates(w, updates)
  buffer = state.trace if name == 'sgdg' else state.mu
  carried = state.basis.on_buffer * buffer + state.basis.on_point * w
  y, _ = manifold.unit(w)
  assert float(jnp.abs(carried).max()) > 0.1
  np.testing.assert_allclose(manifold.column_dot(y, carried), 0, atol=1e-5)


@pytest.mark.parametrize('scale', [1e-3, 0.5, 7.0, 1e3])
@pytest.mark.parametrize('name', ['sgdg', 'adamg'])
def test_scaling_a_manifold_leaf_leaves_the_trajectory_of_unit_w_unchanged(name, scale):
  """The optimizer works at unit(w) (S1): for the same gradients, c·w follows w.

  The first step lands on the unit sphere through ``w + (exp_y(d) − w)`` in float32, which rounds
  at ``ulp(c)``, so the tolerance grows with ``c`` for that reason alone.
  """
  key_w, key_g = jax.random.split(jax.random.key(4))
  w = random_columns(key_w, (3, 3, 2, 5))
  grads = [jax.random.normal(jax.random.fold_in(key_g, k), w.shape) for k in range(6)]

  def trajectory(w):
    tx = aliases()[name]()
    state = tx.init(w)
    update = jax.jit(tx.update)  # one program, not one per operation
    out = []
    for g in grads:
      updates, state = update(g, state, w)
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
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):  # jax.core lost it in 0.11
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


@pytest.mark.parametrize('zero', [0, 0.0])
def test_omega_zero_costs_nothing(zero):
  w = random_columns(jax.random.key(11), (27, 8))
  tx = go.sgdg(0.01, 0.2, omega=0, param_labels={'w': 'grassmann'})
  jaxpr = jax.make_jaxpr(tx.update)({'w': w}, tx.init({'w': w}), {'w': w})
  assert 'dot_general' not in str(jaxpr)
  identity = go.add_orthogonality_gradient(zero)
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
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape), params)
  updates, state = jax.jit(tx.update)(grads, state, params)
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  # The one branch that holds parameters does exactly what it does alone.
  if 'conv' in params:
    alone = manifold_chain(name, lr=0.2)
  else:
    alone = go.euclidean_sgd(0.1)
  expected, _ = jax.jit(alone.update)(grads, alone.init(params), params)
  chex.assert_trees_all_close(updates, expected, atol=1e-7, rtol=0)
  assert all(float(jnp.abs(u).max()) > 0 for u in jax.tree.leaves(updates))


# Clipping at the threshold: norms below, exactly at, and within (ν, 2ν] and beyond.
CLIP = 0.25
NORMS = (0.125, 0.25, 0.375, 0.5, 0.75)


def tangent_columns():
  """Unit columns ``w = e_0`` and tangent gradients ``h_j = NORMS[j]·e_{j+1}`` (exact norms)."""
  n, p = 8, len(NORMS)
  w = jnp.zeros((n, p)).at[0].set(1.0)
  h = jnp.zeros((n, p)).at[jnp.arange(1, p + 1), jnp.arange(p)].set(jnp.asarray(NORMS))
  return w, h


@pytest.mark.parametrize('jit', [True, False], ids=['jit', 'eager'])
def test_the_chain_clips_each_column_above_the_threshold_only(jit):
  w, h = tangent_columns()
  tx = go.grassmann_clip(CLIP)
  update = jax.jit(tx.update) if jit else tx.update
  clipped, _ = update(h, tx.init(w))
  np.testing.assert_array_equal(column_norms(clipped), np.minimum(NORMS, CLIP))
  np.testing.assert_array_equal(clipped[:, :2], h[:, :2])  # at or below ν: untouched
  np.testing.assert_allclose(clipped * column_norms(h) / column_norms(clipped), h, rtol=1e-7)


@pytest.mark.parametrize('jit', [True, False], ids=['jit', 'eager'])
@pytest.mark.parametrize('route', ['step', 'riemannian-sgd'])
def test_the_first_sgdg_step_turns_each_column_by_the_clipped_norm(route, jit):
  """Momentum 0 and rate 1: column j turns by min(‖h_j‖, ν) radians; Riemannian SGD built from
  the pieces without a buffer does the same."""
  w, h = tangent_columns()
  if route == 'step':
    tx = go.grassmann_sgd(1.0, 0.0, grad_clip=CLIP)
  else:
    tx = optax.chain(
      go.project_to_tangent(),
      go.grassmann_clip(CLIP),
      optax.scale_by_learning_rate(1.0),
      go.exp_map_update(),
    )
  update = jax.jit(tx.update) if jit else tx.update
  updates, _ = update(h, tx.init(w), w)
  angle = np.minimum(NORMS, CLIP)  # along −h_j: y' = cos(angle)·e_0 − sin(angle)·e_{j+1}
  expected = np.cos(angle) * np.asarray(w) - np.sin(angle) * np.asarray(h) / np.asarray(NORMS)
  np.testing.assert_allclose(w + updates, expected, atol=1e-7)


@pytest.mark.parametrize('route', ['step', 'pieces'])
def test_adamg_second_moment_sees_the_clipped_gradient(route):
  w, h = tangent_columns()
  if route == 'step':
    tx = go.grassmann_adam(0.1, grad_clip=CLIP)
    _, state = tx.update(h, tx.init(w), w)
  else:
    tx = optax.chain(go.grassmann_clip(CLIP), go.grassmann_adam(0.1, grad_clip=None))
    _, (_, state) = tx.update(h, tx.init(w), w)
  np.testing.assert_allclose(state.nu, 0.01 * np.minimum(NORMS, CLIP) ** 2, rtol=1e-6)


@pytest.mark.parametrize('omega', [0.0, 0.1])
@pytest.mark.parametrize('name', ['sgdg', 'adamg'])
def test_projection_and_clipping_as_pieces_equal_the_step_doing_them(name, omega):
  """20 steps with ω, clipping, a schedule and columns that start off the sphere."""
  key_w, key_g = jax.random.split(jax.random.key(13))
  w = 2.5 * random_columns(key_w, (3, 3, 4, 8))
  schedule = optax.piecewise_constant_schedule(0.2 if name == 'sgdg' else 0.05, {10: 0.5})
  step = manifold_chain(name, omega, lr=schedule, grad_clip=0.1)
  pieces = optax.chain(
    go.add_orthogonality_gradient(omega),
    go.project_to_tangent(),
    go.grassmann_clip(0.1),
    manifold_step(name, lr=schedule, grad_clip=None),
  )
  params = {'step': w, 'pieces': w}
  states = {'step': step.init(w), 'pieces': pieces.init(w)}
  for k in range(20):
    g = 10 ** (k % 4 - 2) * jax.random.normal(jax.random.fold_in(key_g, k), w.shape)
    for route, tx in (('step', step), ('pieces', pieces)):
      updates, states[route] = jax.jit(tx.update)(g, states[route], params[route])
      params[route] = optax.apply_updates(params[route], updates)
  assert float(jnp.abs(params['step'] - w).max()) > 0.1
  chex.assert_trees_all_close(params['step'], params['pieces'], atol=2e-6, rtol=0)


@pytest.mark.parametrize('name', ['sgdg', 'adamg'])
def test_many_equal_small_leaves_step_as_each_leaf_alone(name):
  """Small leaves of one shape are stacked into one array for speed (tuning); the steps equal
  those of each leaf alone, with the tuning switched off."""
  from grassmann_optax._src import tuning

  keys = jax.random.split(jax.random.key(20), 12)
  params = {f'leaf{i}': random_columns(k, (9, 4)) for i, k in enumerate(keys)}
  params['other'] = random_columns(jax.random.key(21), (3, 3, 2, 5))

  def run(params):
    # A transform of its own per run: jax.jit reuses the trace of a function it has seen, and
    # the tuning applies where the update is traced.
    tx = manifold_chain(name, omega=0.1)
    state = tx.init(params)
    step = jax.jit(tx.update)
    for k in range(4):
      grads = jax.tree.map(lambda p, k=k: jnp.cos(p * (k + 1)) + 0.1 * k, params)
      updates, state = step(grads, state, params)
      params = optax.apply_updates(params, updates)
    return params, state

  stacked = run(params)
  with tuning.disabled():
    alone = run(params)
  chex.assert_trees_all_close(stacked, alone, atol=2e-6, rtol=0)


@pytest.mark.parametrize('name', ['sgdg', 'adamg'])
def test_equal_small_leaves_of_two_dtypes_step_as_each_leaf_alone(name):
  """Leaves of one shape but different dtypes are not stacked together: each keeps its dtype
  and the step equals that of each leaf alone."""
  from grassmann_optax._src import tuning

  keys = jax.random.split(jax.random.key(0), 6)
  dtypes = (jnp.float32, jnp.bfloat16)
  params = {f'w{i}': random_columns(k, (9, 4), dtypes[i % 2]) for i, k in enumerate(keys)}
  labels = jax.tree.map(lambda _: go.GRASSMANN, params)
  grads = jax.tree.map(lambda p: jnp.cos(3 * p.astype(jnp.float32)).astype(p.dtype), params)

  def run():
    tx = getattr(go, name)(0.01, 0.05, param_labels=labels, omega=0.1)
    return jax.jit(tx.update)(grads, tx.init(params), params)

  updates, state = run()
  with tuning.disabled():
    alone_updates, alone_state = run()
  assert jax.tree.map(lambda x: x.dtype, updates) == jax.tree.map(lambda x: x.dtype, params)
  assert jax.tree.map(lambda x: x.dtype, state) == jax.tree.map(lambda x: x.dtype, alone_state)
  as32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)
  chex.assert_trees_all_close(as32(updates), as32(alone_updates), atol=1e-6, rtol=0)


@pytest.mark.parametrize('mask', ['default', 'vectors'])
@pytest.mark.parametrize('nesterov', [True, False])
@pytest.mark.parametrize('name', ['sgdg', 'adamg'])
def test_the_aliases_hand_their_euclidean_options_on(name, nesterov, mask):
  """``nesterov`` and ``weight_decay_mask`` reach the Euclidean part: over three steps its
  updates are those of ``go.euclidean_sgd`` with the same options."""
  params = {
    'conv': random_columns(jax.random.key(1), (3, 3, 4, 8)),
    'dense': jax.random.normal(jax.random.key(2), (8, 4)),
    'bias': jnp.ones(4),
  }
  decay_mask = None
  if mask == 'vectors':  # the opposite of the default
    decay_mask = lambda p: jax.tree.map(lambda x: jnp.ndim(x) == 1, p)
  options = dict(momentum=0.9, nesterov=nesterov, weight_decay=0.1, weight_decay_mask=decay_mask)
  tx = getattr(go, name)(0.05, 0.01, **options)
  reference = go.euclidean_sgd(0.05, **options)
  euclidean = {'dense': params['dense'], 'bias': params['bias']}
  state, reference_state = tx.init(params), reference.init(euclidean)
  for k in range(3):
    grads = jax.tree.map(lambda x, k=k: jnp.sin(x + k), params)
    updates, state = tx.update(grads, state, params)
    expected, reference_state = reference.update(
      {'dense': grads['dense'], 'bias': grads['bias']}, reference_state, euclidean
    )
    for leaf in ('dense', 'bias'):
      np.testing.assert_allclose(updates[leaf], expected[leaf], rtol=1e-6, atol=1e-7)


def test_the_penalty_of_a_bfloat16_leaf_is_computed_in_float32():
  w = random_columns(jax.random.key(3), (3, 3, 8, 16), jnp.bfloat16)
  labels = {'w': go.GRASSMANN}
  got = go.orthogonality_penalty({'w': w}, labels, 0.1)
  expected = go.orthogonality_penalty({'w': w.astype(jnp.float32)}, labels, 0.1)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), float(expected), rtol=1e-5)


def test_the_state_has_as_many_arrays_as_adamw():
  """Each array of the state is a buffer that every jitted step hands over, whatever its size:
  Adam-G keeps its per-point values in one array per leaf, so it has AdamW's count of arrays."""
  params = {f'leaf{i}': random_columns(jax.random.key(i), (9, 4)) for i in range(7)}
  labels = jax.tree.map(lambda _: go.GRASSMANN, params)
  state = go.adamg(0.01, 0.05, param_labels=labels).init(params)
  assert len(jax.tree.leaves(state)) == len(jax.tree.leaves(optax.adamw(0.01).init(params)))
  inner = go.grassmann_adam(0.05).init(params)
  assert inner.per_point['leaf0'].shape == (3, 4)
  np.testing.assert_array_equal(inner.basis.on_buffer['leaf0'], np.ones(4))
  np.testing.assert_array_equal(inner.basis.on_point['leaf0'], np.zeros(4))
  np.testing.assert_array_equal(inner.nu['leaf0'], np.zeros(4))


@pytest.mark.parametrize('point_axes', [None, (0, 1)], ids=['columns', 'whole leaves'])
def test_orthogonality_of_many_equal_small_leaves_as_each_leaf_alone(point_axes):
  """Equal small leaves get their orthogonality term as one stack (two batched products, not two
  per leaf); each leaf stays a group of its own, whole-leaf points too (no coupling)."""
  from grassmann_optax._src import tuning

  params = {f'leaf{i:02d}': random_columns(jax.random.key(i), (9, 4)) for i in range(12)}
  grads = jax.tree.map(lambda p: jnp.cos(3 * p), params)
  tx = go.add_orthogonality_gradient(0.1, point_axes=point_axes)

  def run():
    fresh = go.add_orthogonality_gradient(0.1, point_axes=point_axes)  # traced anew
    return jax.jit(fresh.update)(grads, fresh.init(params), params)[0]

  def dots(count):
    few = {k: params[k] for k in list(params)[:count]}
    lowered = jax.jit(tx.update).lower({k: grads[k] for k in few}, tx.init(few), few)
    return lowered.compile().as_text().count(' dot(')

  stacked = run()
  with tuning.disabled():
    alone = run()
  chex.assert_trees_all_close(stacked, alone, atol=1e-6, rtol=0)
  assert float(jnp.abs(stacked['leaf00'] - grads['leaf00']).max()) > 1e-3 or point_axes
  if point_axes is None:
    assert dots(6) == dots(12)
