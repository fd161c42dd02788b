"""The library against the original algorithm (``tests/reference.py``) outside the golden regime.

Large learning rates, no clipping, steps of more than π/2, long runs in float64, gradients up to
the dtype's maximum, non-finite gradients, and derivatives of the update.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import grassmann_optax as go
from tests import reference

N, P = 27, 8


def unit_columns(rs, n=N, p=P):
  w = rs.randn(n, p)
  return w / np.linalg.norm(w, axis=0)


def gradients(rs, steps, low=-2.0, high=1.0, n=N, p=P):
  """Gradient columns with norms spread over ``10**low .. 10**high`` (times about sqrt(n))."""
  return [rs.randn(n, p) * 10 ** rs.uniform(low, high, size=p) for _ in range(steps)]


def fused(name, lr, **hp):
  if name == 'sgdg':
    return go.sgdg_manifold_update(lr, momentum=0.9, **hp)
  return go.adamg_manifold_update(lr, **hp)


def alias(name, lr, *, omega=0.0, **hp):
  factory = go.sgdg if name == 'sgdg' else go.adamg
  return factory(0.01, lr, omega=omega, param_labels={'w': 'grassmann'}, **hp)


def chain(name, lr, *, grad_clip=0.1, omega=0.0):
  moments = go.grassmann_momentum(0.9) if name == 'sgdg' else go.grassmann_adam_moments()
  return optax.chain(
    go.add_orthogonality_gradient(omega),
    go.project_to_tangent(),
    go.grassmann_clip(grad_clip),
    moments,
    optax.scale_by_learning_rate(lr),
    go.exp_map_update(),
  )


def expected_points(name, w0, grads, lr, **hp):
  run = reference.sgdg_trajectory if name == 'sgdg' else reference.adamg_trajectory
  return [out[0] for out in run(w0, grads, lr, **hp)]


def library_points(tx, w0, grads, *, wrap=False, dtype=jnp.float64):
  """Points after each step; ``wrap`` puts the leaf in a dict (for the aliases)."""
  w = jnp.asarray(w0, dtype)
  params = {'w': w} if wrap else w
  state = tx.init(params)

  @jax.jit
  def step(params, state, g):
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  out = []
  for g in grads:
    g = jnp.asarray(g, dtype)
    params, state = step(params, state, {'w': g} if wrap else g)
    out.append(np.asarray(params['w'] if wrap else params, np.float64))
  return out


def max_difference(a, b):
  return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


# Exact for every step size ---------------------------------------------------------------------


@pytest.mark.parametrize(
  'name, lr, grad_clip, low, high, steps',
  [
    ('adamg', 2.0, 0.1, -2, 1, 40),  # every step turns each column by about 2 rad
    ('adamg', 1.2, None, -2, 1, 40),
    ('sgdg', 1.0, None, -1, 0, 12),  # unclipped gradients of norm 1-10: steps of several rad
    ('sgdg', 4.0, 0.1, -2, 1, 40),  # clipped, but η ν/(1 − γ) = 4 rad
  ],
)
@pytest.mark.parametrize('route', ['fused', 'alias'])
def test_large_steps_follow_the_original_algorithm(
  x64, route, name, lr, grad_clip, low, high, steps
):
  rs = np.random.RandomState(0)
  w0, grads = unit_columns(rs), gradients(rs, steps, low, high)
  expected = expected_points(name, w0, grads, lr, grad_clip=grad_clip)
  make = fused if route == 'fused' else alias
  got = library_points(make(name, lr, grad_clip=grad_clip), w0, grads, wrap=route == 'alias')
  assert max_difference(got, expected) < 1e-9


@pytest.mark.parametrize('name', ['sgdg', 'adamg'])
def test_steps_of_a_right_angle_are_exact(x64, name):
  """Steps whose angle is π/2 ± 1e-6 (where the stored buffer changes basis) and π exactly."""
  rs = np.random.RandomState(1)
  w0 = unit_columns(rs)
  grads = gradients(rs, 8, -1, 0)
  # Unclipped SGD-G with zero momentum turns column j by lr·‖h_j‖; Adam-G's first step by about
  # lr. Choose lr so that column 0 turns by exactly π/2 at step 1.
  if name == 'sgdg':
    y = w0 / (np.linalg.norm(w0, axis=0) + 1e-8)
    h = grads[0] - np.sum(y * grads[0], axis=0) * y
    lr = (np.pi / 2) / np.linalg.norm(h[:, 0])
    tx = go.sgdg_manifold_update(lr, momentum=0.5, grad_clip=None)
    expected = [
      o[0] for o in reference.sgdg_trajectory(w0, grads, lr, momentum=0.5, grad_clip=None)
    ]
  else:
    lr = np.pi / 2 + 1e-6
    tx = go.adamg_manifold_update(lr, grad_clip=None)
    expected = expected_points('adamg', w0, grads, lr, grad_clip=None)
  got = library_points(tx, w0, grads)
  assert max_difference(got, expected) < 1e-9


@pytest.mark.parametrize(
  'name, lr, omega', [('sgdg', 0.2, 0.1), ('adamg', 0.05, 0.1), ('sgdg', 0.02, 0.0)]
)
def test_300_float64_steps_at_the_paper_settings_stay_on_the_original(x64, name, lr, omega):
  rs = np.random.RandomState(2)
  w0, grads = unit_columns(rs), gradients(rs, 300, -4.5, 0.5)
  hp = {'grad_clip': 0.1, 'omega': omega}
  expected = expected_points(name, w0, grads, lr, **hp)
  got = library_points(fused(name, lr, **hp), w0, grads)
  assert max_difference(got, expected) < 1e-10


def test_fused_buffers_are_the_original_buffers_after_large_steps(x64):
  """The stored buffer, decoded with ``mix``, is the originals' transported buffer (τ = −η b)."""
  rs = np.random.RandomState(3)
  w0, grads = unit_columns(rs), gradients(rs, 10, -1, 0.5)
  lr = 1.5
  expected = reference.sgdg_trajectory(w0, grads, lr, grad_clip=None)
  tx = go.sgdg_manifold_update(lr, grad_clip=None)
  w = jnp.asarray(w0)
  state = tx.init(w)
  mixed = 0
  for g, (point, tau) in zip(grads, expected, strict=True):
    updates, state = jax.jit(tx.update)(jnp.asarray(g), state, w)
    w = w + updates
    buffer = state.mix[0] * state.trace + state.mix[1] * w
    mixed += int(jnp.sum(state.mix[0] != 1))
    np.testing.assert_allclose(w, point, atol=1e-10)
    np.testing.assert_allclose(-lr * buffer, tau, atol=1e-9)
  assert mixed > 0, 'no step came close enough to a right angle to use the mixed basis'


@pytest.mark.parametrize('name', ['sgdg', 'adamg'])
def test_the_chain_is_exact_below_a_right_angle_and_says_so_beyond(x64, name):
  """The documented limit of the chain's lazy transport, on both sides."""
  rs = np.random.RandomState(4)
  w0, grads = unit_columns(rs), gradients(rs, 6, -1, 0)
  # Below: Adam-G steps of about 1 rad; SGD-G clipped, at most η ν/(1 − γ) = 1 rad.
  lr_below = 1.0
  hp = {'grad_clip': 0.1}
  below = max_difference(
    library_points(chain(name, lr_below, **hp), w0, grads),
    expected_points(name, w0, grads, lr_below, **hp),
  )
  assert below < 1e-6
  # Beyond: steps of 1.5 to 3 rad.
  lr_beyond = 2.0 if name == 'adamg' else 15.0
  beyond = max_difference(
    library_points(chain(name, lr_beyond, **hp), w0, grads),
    expected_points(name, w0, grads, lr_beyond, **hp),
  )
  assert beyond > 0.1
  assert go.grassmann_momentum.__doc__.count('π/2') >= 2
  assert go.grassmann_adam_moments.__doc__.count('π/2') >= 2


# Overflow --------------------------------------------------------------------------------------


def _big_and_small(dtype, rs):
  """Gradients whose largest element is the dtype's maximum, and the same scaled down."""
  g = rs.randn(N, P)
  g[:, 3] *= 1e-3  # columns of different sizes
  big = jnp.asarray(g / np.abs(g).max() * float(jnp.finfo(dtype).max), dtype)
  small = (big.astype(jnp.float32) * 2.0**-120).astype(dtype)
  return big, small


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('make', [fused, alias], ids=['fused', 'alias'])
@pytest.mark.parametrize('name', ['sgdg', 'adamg'])
def test_gradients_up_to_the_dtype_maximum_give_the_clipped_step(name, make, dtype):
  rs = np.random.RandomState(5)
  w = jnp.asarray(unit_columns(rs), dtype)
  big, small = _big_and_small(dtype, rs)
  tx = make(name, 0.2, grad_clip=0.1, omega=0.0)
  wrap = make is alias
  params = {'w': w} if wrap else w

  def update(g):
    updates, state = jax.jit(tx.update)({'w': g} if wrap else g, tx.init(params), params)
    return updates['w'] if wrap else updates

  u_big, u_small = update(big), update(small)
  assert bool(jnp.all(jnp.isfinite(u_big.astype(jnp.float32))))
  np.testing.assert_allclose(
    u_big.astype(jnp.float32), u_small.astype(jnp.float32), atol=1e-6 if dtype == jnp.float32 else 0
  )


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_the_chain_clips_huge_gradients_like_small_ones(dtype):
  """Norms and inner products of the chain do not overflow (gradients up to 2^127)."""
  rs = np.random.RandomState(6)
  w = jnp.asarray(unit_columns(rs), dtype)
  g = rs.randn(N, P)
  small = jnp.asarray(g / np.abs(g).max(), dtype)
  big = (small.astype(jnp.float32) * 2.0**126).astype(dtype)
  tx = optax.chain(go.project_to_tangent(), go.grassmann_clip(0.1))
  (h_big, _), (h_small, _) = (tx.update(x, tx.init(w), w) for x in (big, small))
  assert bool(jnp.all(jnp.isfinite(h_big.astype(jnp.float32))))
  np.testing.assert_allclose(h_big.astype(jnp.float32), h_small.astype(jnp.float32), atol=1e-6)


# Non-finite gradients --------------------------------------------------------------------------


@pytest.mark.parametrize('name', ['sgdg', 'adamg'])
def test_a_non_finite_column_is_held_and_does_not_spread(name):
  rs = np.random.RandomState(7)
  params = {'w': jnp.asarray(unit_columns(rs), jnp.float32)}
  grads = [jnp.asarray(g, jnp.float32) for g in gradients(rs, 3)]
  tx = alias(name, 0.2, omega=0.1)
  step = jax.jit(tx.update)
  state = tx.init(params)
  updates, state = step({'w': grads[0]}, state, params)
  params = optax.apply_updates(params, updates)
  # Step 2: one NaN element in column 2; every other column moves as with a finite gradient.
  bad = grads[1].at[5, 2].set(jnp.nan)
  clean = grads[1].at[:, 2].set(0.0)
  u_bad, state_bad = step({'w': bad}, state, params)
  u_clean, _ = step({'w': clean}, state, params)
  others = np.arange(P) != 2
  np.testing.assert_array_equal(u_bad['w'][:, others], u_clean['w'][:, others])
  np.testing.assert_array_equal(u_bad['w'][:, 2], 0)
  manifold_state = state_bad.inner_states['grassmann'].inner_state
  old_state = state.inner_states['grassmann'].inner_state
  buffer = 'trace' if name == 'sgdg' else 'mu'
  np.testing.assert_array_equal(
    getattr(manifold_state, buffer)['w'][:, 2], getattr(old_state, buffer)['w'][:, 2]
  )
  # Step 3, through the orthogonality term that couples the columns: still all finite.
  params = optax.apply_updates(params, u_bad)
  updates, _ = step({'w': grads[2]}, state_bad, params)
  assert bool(jnp.all(jnp.isfinite(optax.apply_updates(params, updates)['w'])))


@pytest.mark.parametrize('name', ['sgdg', 'adamg'])
def test_apply_if_finite_skips_a_step_with_a_non_finite_gradient(name):
  """The remedy docs/usage.md shows: the whole step is skipped and counted."""
  rs = np.random.RandomState(8)
  params = {'w': jnp.asarray(unit_columns(rs), jnp.float32), 'b': jnp.zeros(P)}
  labels = {'w': 'grassmann', 'b': 'euclidean'}
  factory = go.sgdg if name == 'sgdg' else go.adamg
  tx = optax.apply_if_finite(factory(0.01, 0.2, param_labels=labels), max_consecutive_errors=5)
  state = tx.init(params)
  grads = {'w': jnp.full((N, P), jnp.inf).at[0, 0].set(1.0), 'b': jnp.ones(P)}
  updates, state = jax.jit(tx.update)(grads, state, params)
  assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates))
  assert int(state.notfinite_count) == 1 and not bool(state.last_finite)
  grads = {'w': jnp.asarray(rs.randn(N, P), jnp.float32), 'b': jnp.ones(P)}
  updates, state = jax.jit(tx.update)(grads, state, params)
  assert float(jnp.abs(updates['w']).max()) > 0 and int(state.notfinite_count) == 0


# Derivatives -----------------------------------------------------------------------------------


@pytest.mark.parametrize('route', ['fused', 'alias', 'chain'])
@pytest.mark.parametrize('name', ['sgdg', 'adamg'])
def test_the_update_is_differentiable_at_a_zero_buffer_and_a_zero_gradient_column(name, route):
  rs = np.random.RandomState(9)
  w = jnp.asarray(unit_columns(rs), jnp.float32)
  g = jnp.asarray(rs.randn(N, P), jnp.float32).at[:, 1].set(0.0)
  tx = {'fused': fused, 'alias': alias, 'chain': chain}[route](name, 0.2, omega=0.1)
  wrap = route == 'alias'

  def moved(w):  # a meta-learning style objective of the updated parameters
    params, grads = ({'w': w}, {'w': g}) if wrap else (w, g)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    return jnp.sum(jnp.sin(3 * (new['w'] if wrap else new)))

  grad = jax.grad(moved)(w)
  assert bool(jnp.all(jnp.isfinite(grad)))
  # And it is the derivative: a central difference along a random direction agrees.
  direction = jnp.asarray(rs.randn(N, P), jnp.float32)
  delta = 1e-3
  numeric = (moved(w + delta * direction) - moved(w - delta * direction)) / (2 * delta)
  np.testing.assert_allclose(jnp.sum(grad * direction), numeric, rtol=2e-2)
