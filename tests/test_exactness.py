"""The library against the original algorithm (``tests/reference.py``) outside the golden regime.

Every route a user takes: the README's chain, the same with the projection and clipping as
transforms of their own, and the aliases. Large learning rates, no clipping, steps of more than
π/2, long runs in float64, radial, tiny and huge gradients, gradients up to the dtype's maximum,
zero points, non-finite gradients, and derivatives of the update.
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


def step(name, lr, *, grad_clip=0.1):
  if name == 'sgdg':
    return go.grassmann_sgd(lr, 0.9, grad_clip=grad_clip)
  return go.grassmann_adam(lr, grad_clip=grad_clip)


def chain(name, lr, *, grad_clip=0.1, omega=0.0):
  """The README's chain: the orthogonality term, then the manifold step."""
  return optax.chain(go.add_orthogonality_gradient(omega), step(name, lr, grad_clip=grad_clip))


def pieces(name, lr, *, grad_clip=0.1, omega=0.0):
  """The same with the projection and clipping as transforms of their own."""
  return optax.chain(
    go.add_orthogonality_gradient(omega),
    go.project_to_tangent(),
    go.grassmann_clip(grad_clip),
    step(name, lr, grad_clip=None),
  )


def alias(name, lr, *, omega=0.0, **hp):
  factory = go.sgdg if name == 'sgdg' else go.adamg
  return factory(0.01, lr, omega=omega, param_labels={'w': 'grassmann'}, **hp)


ROUTES = {'chain': chain, 'pieces': pieces, 'alias': alias}


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
@pytest.mark.parametrize('route', sorted(ROUTES))
def test_large_steps_follow_the_original_algorithm(
  x64, route, name, lr, grad_clip, low, high, steps
):
  rs = np.random.RandomState(0)
  w0, grads = unit_columns(rs), gradients(rs, steps, low, high)
  expected = expected_points(name, w0, grads, lr, grad_clip=grad_clip)
  tx = ROUTES[route](name, lr, grad_clip=grad_clip)
  got = library_points(tx, w0, grads, wrap=route == 'alias')
  # Projecting twice (the piece, then the step) removes the originals' ε-sized normal part of h
  # twice: a difference of about 1e-8 per step.
  assert max_difference(got, expected) < (1e-6 if route == 'pieces' else 1e-9)


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
    tx = go.grassmann_sgd(lr, 0.5, grad_clip=None)
    expected = [
      o[0] for o in reference.sgdg_trajectory(w0, grads, lr, momentum=0.5, grad_clip=None)
    ]
  else:
    lr = np.pi / 2 + 1e-6
    tx = go.grassmann_adam(lr, grad_clip=None)
    expected = expected_points('adamg', w0, grads, lr, grad_clip=None)
  got = library_points(tx, w0, grads)
  assert max_difference(got, expected) < 1e-9


@pytest.mark.parametrize('route', ['chain', 'alias'])
@pytest.mark.parametrize(
  'name, lr, omega', [('sgdg', 0.2, 0.1), ('adamg', 0.05, 0.1), ('sgdg', 0.02, 0.0)]
)
def test_300_float64_steps_at_the_paper_settings_stay_on_the_original(x64, route, name, lr, omega):
  rs = np.random.RandomState(2)
  w0, grads = unit_columns(rs), gradients(rs, 300, -4.5, 0.5)
  hp = {'grad_clip': 0.1, 'omega': omega}
  expected = expected_points(name, w0, grads, lr, **hp)
  got = library_points(ROUTES[route](name, lr, **hp), w0, grads, wrap=route == 'alias')
  assert max_difference(got, expected) < 1e-10


@pytest.mark.parametrize('route', ['chain', 'alias'])
@pytest.mark.parametrize('name', ['sgdg', 'adamg'])
@pytest.mark.parametrize('scale', [1e-30, 1e-12, 1e12, 1e30])
def test_tiny_and_huge_gradients_follow_the_original(x64, route, name, scale):
  """Gradients many orders of magnitude from 1, 30 steps. Unclipped SGD-G steps of a huge
  gradient turn a point by about 1e11 rad and more, an angle whose last bits decide where the
  point lands (in the originals too), so it is compared clipped only."""
  rs = np.random.RandomState(10)
  w0 = unit_columns(rs)
  grads = [g * scale for g in gradients(rs, 30, -1, 1)]
  lr = 0.2 if name == 'sgdg' else 0.05
  clips = (0.1,) if name == 'sgdg' and scale > 1 else (0.1, None)
  for grad_clip in clips:
    expected = expected_points(name, w0, grads, lr, grad_clip=grad_clip)
    tx = ROUTES[route](name, lr, grad_clip=grad_clip)
    got = library_points(tx, w0, grads, wrap=route == 'alias')
    assert max_difference(got, expected) < 1e-6, grad_clip


@pytest.mark.parametrize('route', ['chain', 'alias'])
@pytest.mark.parametrize('name', ['sgdg', 'adamg'])
def test_radial_gradients_follow_the_original(x64, route, name):
  """Gradients along the current points (their tangent part is the originals' ε and rounding)
  plus a small tangent noise, 300 steps, from points of norm 1 and 3."""
  rs = np.random.RandomState(11)
  w0 = unit_columns(rs) * np.where(np.arange(P) % 2, 1.0, 3.0)
  sizes = rs.uniform(1, 10, size=(300, P))
  noise = rs.randn(300, N, P) * 1e-3
  gradient = lambda k, w: sizes[k] * np.asarray(w) + noise[k]
  lr = 0.2 if name == 'sgdg' else 0.05
  # The original, step by step.
  w, buffer, v = reference.columns(w0), np.zeros((N, P)), np.zeros((1, P))
  expected = []
  for k in range(300):
    if name == 'sgdg':
      w, buffer = reference.sgdg_step(w, gradient(k, w), buffer, lr)
    else:
      w, buffer, v = reference.adamg_step(w, gradient(k, w), buffer, v, k + 1, lr)
    expected.append(w)
  # The library.
  tx = ROUTES[route](name, lr)
  params = {'w': jnp.asarray(w0)} if route == 'alias' else jnp.asarray(w0)
  state, update = tx.init(params), jax.jit(tx.update)
  got = []
  for k in range(300):
    w = params['w'] if route == 'alias' else params
    g = jnp.asarray(gradient(k, w))
    updates, state = update({'w': g} if route == 'alias' else g, state, params)
    params = optax.apply_updates(params, updates)
    got.append(np.asarray(params['w'] if route == 'alias' else params))
  assert max_difference(got, expected) < 1e-6


@pytest.mark.parametrize('route', ['chain', 'alias'])
@pytest.mark.parametrize('name', ['sgdg', 'adamg'])
def test_a_mostly_radial_gradient_keeps_float32_precision(x64, route, name):
  """A radial part 1,000 (Adam-G) or 10,000 (SGD-G) times the tangent one, in float32: ‖h‖²
  from the products would lose digits to cancellation (an Adam-G step 1e-3 away from the
  original's, columns off the sphere by 3e-4; SGD-G 1e-5 away); the gradient is projected
  explicitly instead (F13), as the originals compute it, and the steps are as close to the
  original as float32 rounding allows (Adam-G's bias-corrected step amplifies it)."""
  rs = np.random.RandomState(12)
  w0 = unit_columns(rs)
  tangent, tolerance = (1e-4, 2e-6) if name == 'sgdg' else (1e-3, 1e-5)
  grads = [w0 + rs.randn(N, P) * tangent / np.sqrt(N) for _ in range(3)]
  lr = 0.2 if name == 'sgdg' else 0.05
  expected = expected_points(name, w0, grads, lr, grad_clip=0.1)
  tx = ROUTES[route](name, lr, grad_clip=0.1)
  got = library_points(tx, w0, grads, wrap=route == 'alias', dtype=jnp.float32)
  assert max_difference(got, expected) < tolerance
  np.testing.assert_allclose(np.linalg.norm(got[-1], axis=0), 1, atol=1e-6)


@pytest.mark.parametrize('radial', [0.0, 1000.0])
def test_an_unclipped_gradient_whose_squares_overflow_takes_a_finite_step(radial):
  """Float32 gradients near 1e20 (1e23 with a radial part 1,000 times the tangent one), no
  clipping: (F10) divides them by their scale and the unclipped step multiplies it back, so the
  norm of the step's direction is taken on scaled coefficients. It used to be NaN: SGD-G's for
  every such gradient, and Adam-G's once (F13) projected the radial ones."""
  rs = np.random.RandomState(13)
  w = unit_columns(rs)
  t = rs.randn(N, P)
  t -= w * (w * t).sum(0)
  g = (t / np.linalg.norm(t, axis=0) + radial * w) * 1e20
  w32, g32 = jnp.asarray(w, jnp.float32), jnp.asarray(g, jnp.float32)
  points = {}
  for name, tx in {
    'sgdg': go.grassmann_sgd(1e-30, grad_clip=None),
    'adamg': go.grassmann_adam(0.05, grad_clip=None),
  }.items():
    updates, _ = jax.jit(tx.update)(g32, tx.init(w32), w32)
    points[name] = np.asarray(w32 + updates, np.float64)
    np.testing.assert_allclose(np.linalg.norm(points[name], axis=0), 1, atol=1e-6)
  zero = np.zeros((N, P))
  expected, _ = reference.sgdg_step(reference.columns(w), g, zero, 1e-30, grad_clip=None)
  np.testing.assert_allclose(points['sgdg'], expected, atol=1e-6)
  # Adam-G's second moment overflows float32, as in the originals: its step is 0.
  np.testing.assert_allclose(points['adamg'], w32, atol=1e-6)


def test_buffers_are_the_original_buffers_after_large_steps(x64):
  """The stored buffer, decoded with its basis, is the originals' transported buffer (τ = −η b)."""
  rs = np.random.RandomState(3)
  w0, grads = unit_columns(rs), gradients(rs, 10, -1, 0.5)
  lr = 1.5
  expected = reference.sgdg_trajectory(w0, grads, lr, grad_clip=None)
  tx = go.grassmann_sgd(lr, grad_clip=None)
  w = jnp.asarray(w0)
  state = tx.init(w)
  mixed = 0
  for g, (point, tau) in zip(grads, expected, strict=True):
    updates, state = jax.jit(tx.update)(jnp.asarray(g), state, w)
    w = w + updates
    buffer = state.basis.on_buffer * state.trace + state.basis.on_point * w
    mixed += int(jnp.sum(state.basis.on_buffer != 1))
    np.testing.assert_allclose(w, point, atol=1e-10)
    np.testing.assert_allclose(-lr * buffer, tau, atol=1e-9)
  assert mixed > 0, 'no step came close enough to a right angle to use the mixed basis'


# Scale: overflow and zero points ---------------------------------------------------------------


def _clipped_gradient(rs, n=N, p=P):
  """Gradients whose every column has a tangent part far above ν = 0.1, so it is clipped."""
  g = rs.randn(n, p)
  g[:, 3] *= 1e-1
  return g


@pytest.mark.parametrize('grad_clip', [0.1, 10.0])
@pytest.mark.parametrize('make', [chain, alias], ids=['chain', 'alias'])
@pytest.mark.parametrize('name', ['sgdg', 'adamg'])
def test_the_clipped_step_is_the_same_at_every_scale(name, make, grad_clip):
  """``c·g`` gives the update of ``g`` for every finite ``c`` at which ``g`` is clipped: the
  overflow rescue is exact at every scale, including where squares are finite but their products
  are not (about 1e19 in float32). With ν = 10 the rescued gradient's norm (of order 1 once
  divided by a power of two) is below ν: the test of ``‖h‖ > ν`` must be on the true norm."""
  rs = np.random.RandomState(5)
  w = jnp.asarray(unit_columns(rs), jnp.float32)
  g = _clipped_gradient(rs)
  g = g / np.abs(g).max()
  w64 = np.asarray(w, np.float64)
  tangent = np.linalg.norm(g - w64 * np.sum(w64 * g, axis=0), axis=0)
  wrap = make is alias
  tx = make(name, 0.2, grad_clip=grad_clip)
  params = {'w': w} if wrap else w
  update = jax.jit(tx.update)

  def step(c):
    grads = jnp.asarray(g * c, jnp.float32)
    updates, _ = update({'w': grads} if wrap else grads, tx.init(params), params)
    return np.asarray(updates['w'] if wrap else updates)

  scales = (1.0, 10.0, 1e3, 1e10, 1e17, 1e19, 3e19, 1e25, 1e30, 2.0**126)
  scales = [c for c in (*scales, float(np.finfo(np.float32).max)) if c * tangent.min() > grad_clip]
  reference_update = step(scales[0])
  for c in scales[1:]:
    got = step(c)
    assert np.all(np.isfinite(got)), c
    np.testing.assert_allclose(got, reference_update, atol=1e-6, err_msg=f'scale {c:g}')


@pytest.mark.parametrize('name', ['sgdg', 'adamg'])
def test_one_column_near_the_float32_maximum_is_clipped_among_normal_ones(name):
  """Partial overflow: one column's squares overflow, the others are ordinary; every column's
  tangent gradient is still clipped to ν, and the ordinary ones move as without that column."""
  rs = np.random.RandomState(12)
  w = jnp.asarray(unit_columns(rs), jnp.float32)
  g = rs.randn(N, P)
  big = g.copy()
  big[:, 4] = g[:, 4] / np.abs(g[:, 4]).max() * 2.0**126
  h_norm = lambda x: np.linalg.norm(x - np.sum(np.asarray(w) * x, axis=0) * np.asarray(w), axis=0)
  assert np.all(h_norm(g) > 0.1)
  tx = step(name, 1.0, grad_clip=0.1)
  state = tx.init(w)
  if name == 'sgdg':  # with zero momentum at step 1, the step is η·clip(h): θ = ν per column
    (u_big, _), (u_g, _) = (tx.update(jnp.asarray(x, jnp.float32), state, w) for x in (big, g))
    angles = np.arccos(np.clip(np.sum(np.asarray(w + u_big) * np.asarray(w), axis=0), -1, 1))
    np.testing.assert_allclose(angles, 0.1, atol=1e-4)
  else:
    (u_big, _), (u_g, _) = (tx.update(jnp.asarray(x, jnp.float32), state, w) for x in (big, g))
  others = np.arange(P) != 4
  np.testing.assert_allclose(np.asarray(u_big)[:, others], np.asarray(u_g)[:, others], atol=1e-6)
  # The big column moved like the same column scaled down.
  scaled = g.copy()
  scaled[:, 4] = g[:, 4] / np.abs(g[:, 4]).max()
  u_scaled, _ = tx.update(jnp.asarray(scaled, jnp.float32), state, w)
  np.testing.assert_allclose(np.asarray(u_big)[:, 4], np.asarray(u_scaled)[:, 4], atol=1e-6)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_the_standalone_pieces_clip_huge_gradients_like_small_ones(dtype):
  """Norms and inner products of project_to_tangent and grassmann_clip do not overflow."""
  rs = np.random.RandomState(6)
  w = jnp.asarray(unit_columns(rs), dtype)
  g = rs.randn(N, P)
  small = jnp.asarray(g / np.abs(g).max(), dtype)
  big = (small.astype(jnp.float32) * 2.0**126).astype(dtype)
  tx = optax.chain(go.project_to_tangent(), go.grassmann_clip(0.1))
  (h_big, _), (h_small, _) = (tx.update(x, tx.init(w), w) for x in (big, small))
  assert bool(jnp.all(jnp.isfinite(h_big.astype(jnp.float32))))
  np.testing.assert_allclose(h_big.astype(jnp.float32), h_small.astype(jnp.float32), atol=1e-6)


@pytest.mark.parametrize('make', ['sgdg', 'adamg', 'exp_map'])
@pytest.mark.parametrize('size', [0.0, 1e-38, 1e-41, 1e-12])
def test_a_zero_or_tiny_point_is_on_the_sphere_after_its_first_step(make, size):
  """A point shorter than the ε of unit() has no direction; its first step puts it on the sphere
  (in the direction of the step), and the other points move as without it."""
  rs = np.random.RandomState(13)
  w = np.asarray(unit_columns(rs), np.float32)
  w[:, 2] = size
  w = jnp.asarray(w)
  g = jnp.asarray(rs.randn(N, P), jnp.float32)
  if make == 'exp_map':
    tx = optax.chain(go.project_to_tangent(), optax.scale(-0.1), go.exp_map_update(radius=2.0))
    radius = 2.0
  else:
    tx = step('sgdg' if make == 'sgdg' else 'adamg', 0.05)
    radius = 1.0
  state = tx.init(w)
  u, state = jax.jit(tx.update)(g, state, w)
  new = w + u
  norms = np.linalg.norm(np.asarray(new), axis=0)
  np.testing.assert_allclose(norms, radius, rtol=1e-6)
  # The new point lies along the descent direction −g of that column (its projection at a zero
  # point is g itself).
  cosine = np.dot(np.asarray(new[:, 2]), -np.asarray(g[:, 2])) / (
    norms[2] * np.linalg.norm(g[:, 2])
  )
  assert cosine > 0.999
  if make != 'exp_map':  # and the next step goes on from there, staying on the sphere
    u, _ = jax.jit(tx.update)(g, state, new)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(new + u), axis=0), 1.0, rtol=1e-6)


# Non-finite gradients --------------------------------------------------------------------------


@pytest.mark.parametrize('name', ['sgdg', 'adamg'])
def test_a_non_finite_column_is_held_and_does_not_spread(name):
  rs = np.random.RandomState(7)
  params = {'w': jnp.asarray(unit_columns(rs), jnp.float32)}
  grads = [jnp.asarray(g, jnp.float32) for g in gradients(rs, 3)]
  tx = alias(name, 0.2, omega=0.1)
  update = jax.jit(tx.update)
  state = tx.init(params)
  updates, state = update({'w': grads[0]}, state, params)
  params = optax.apply_updates(params, updates)
  # Step 2: one NaN element in column 2; every other column moves as with a finite gradient.
  bad = grads[1].at[5, 2].set(jnp.nan)
  clean = grads[1].at[:, 2].set(0.0)
  u_bad, state_bad = update({'w': bad}, state, params)
  u_clean, _ = update({'w': clean}, state, params)
  others = np.arange(P) != 2
  # The orthogonality term couples the columns: a NaN column's term is NaN for the others too,
  # unless it is held out, which the test then shows.
  np.testing.assert_allclose(u_bad['w'][:, others], u_clean['w'][:, others], atol=1e-6)
  np.testing.assert_array_equal(u_bad['w'][:, 2], 0)
  manifold_state = state_bad.inner_states['grassmann'].inner_state[1]
  old_state = state.inner_states['grassmann'].inner_state[1]
  buffer = 'trace' if name == 'sgdg' else 'mu'
  np.testing.assert_array_equal(
    getattr(manifold_state, buffer)['w'][:, 2], getattr(old_state, buffer)['w'][:, 2]
  )
  # Step 3, through the orthogonality term that couples the columns: still all finite.
  params = optax.apply_updates(params, u_bad)
  updates, _ = update({'w': grads[2]}, state_bad, params)
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


@pytest.mark.parametrize('route', ['chain', 'alias'])
@pytest.mark.parametrize('name', ['sgdg', 'adamg'])
def test_the_update_is_differentiable_at_a_zero_buffer_and_a_zero_gradient_column(name, route):
  rs = np.random.RandomState(9)
  w = jnp.asarray(unit_columns(rs), jnp.float32)
  g = jnp.asarray(rs.randn(N, P), jnp.float32).at[:, 1].set(0.0)
  tx = ROUTES[route](name, 0.2, omega=0.1)
  wrap = route == 'alias'

  def moved(w):  # a meta-learning style objective of the updated parameters
    params, grads = ({'w': w}, {'w': g}) if wrap else (w, g)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    return jnp.sum(jnp.sin(3 * (new['w'] if wrap else new)))

  grad = jax.jit(jax.grad(moved))(w)  # compiled: op by op, the derivative takes seconds
  assert bool(jnp.all(jnp.isfinite(grad)))
  # And it is the derivative: a central difference along a random direction agrees.
  direction = jnp.asarray(rs.randn(N, P), jnp.float32)
  delta = 1e-3
  value = jax.jit(moved)
  numeric = (value(w + delta * direction) - value(w - delta * direction)) / (2 * delta)
  np.testing.assert_allclose(jnp.sum(grad * direction), numeric, rtol=2e-2)


@pytest.mark.parametrize('b2', [0.99, 0.999, 0.9999, np.array(0.999)], ids=str)
@pytest.mark.parametrize('route', ['step', 'alias'])
def test_the_adam_step_length_has_float32_precision_from_the_first_step(route, b2):
  """(A7) in float32: ``1 − β2**t`` rounded β2 first (relative error 1.3e-5 at β2 = 0.999, t = 1)
  and the step's angle carried it; the originals compute it in double precision. A tangent
  gradient keeps the products well conditioned, so the angle is the bias correction's."""
  rs = np.random.RandomState(7)
  w = unit_columns(rs)
  g = rs.randn(N, P)
  g -= w * np.sum(w * g, axis=0)  # tangent: no cancellation in the products
  lr, b1, eps = 0.5, 0.9, 1e-8
  tx = (
    go.grassmann_adam(lr, b1=b1, b2=b2, eps=eps, grad_clip=None)
    if route == 'step'
    else go.adamg(
      0.01, lr, b1=b1, b2=b2, eps=eps, grad_clip=None, omega=0.0, param_labels={'w': 'grassmann'}
    )
  )
  params = jnp.asarray(w, jnp.float32) if route == 'step' else {'w': jnp.asarray(w, jnp.float32)}
  grads = jnp.asarray(g, jnp.float32) if route == 'step' else {'w': jnp.asarray(g, jnp.float32)}
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  moved = np.asarray(jax.tree.leaves(optax.apply_updates(params, updates))[0], np.float64)
  w32 = np.asarray(jnp.asarray(w, jnp.float32), np.float64)
  g32 = np.asarray(jnp.asarray(g, jnp.float32), np.float64)
  g32 -= w32 * np.sum(w32 * g32, axis=0)
  # (A5)-(A8) at t = 1 in float64: m̃ = (1 − β1) h, ṽ = (1 − β2)‖h‖², θ = α₁η‖m̃‖/sqrt(ṽ + ε).
  h = np.linalg.norm(g32, axis=0)
  theta = np.sqrt(1 - b2) / (1 - b1) * lr * (1 - b1) * h / np.sqrt((1 - b2) * h**2 + eps)
  along = np.sum(w32 * moved, axis=0)
  across = np.linalg.norm(moved - w32 * along, axis=0)
  np.testing.assert_allclose(np.arctan2(across, along), theta, rtol=1e-6)


@pytest.mark.parametrize('radial', [0.0, 2.0])
@pytest.mark.parametrize('name', ['sgdg', 'adamg'])
def test_a_moment_that_cancels_the_gradient_keeps_the_point_on_the_sphere(name, radial):
  """(F13) ``‖B‖`` from the products keeps κ² times fewer digits, κ = Σ|cᵢ|‖vᵢ‖/‖B‖: where the
  new gradient cancels the moment to 1e-3 (κ ≈ 1000) it was off by a few percent, and so was
  the new point's norm. Such points take their norm from ``B`` itself; with a radial part in the
  gradient (``radial`` times its tangent norm, along ``w``: far from the mostly-radial branch),
  ``B`` has a component along ``w`` that its norm must include."""
  rs = np.random.RandomState(11)
  w = jnp.asarray(unit_columns(rs), jnp.float32)
  first = jnp.asarray(rs.randn(N, P), jnp.float32)
  first -= w * jnp.sum(w * first, axis=0)
  # A tiny first step, then one of rate 20 whose gradient undoes 99.9% of the moment.
  schedule = lambda count: jnp.where(count == 0, 1e-6, 20.0)
  tx = step(name, schedule, grad_clip=None)
  state = tx.init(w)
  updates, state = tx.update(first, state, w)
  w = optax.apply_updates(w, updates)
  decay = 0.9
  second = -(1 - 1e-3) * decay * first  # the moment is 0.9·first in both
  second -= w * jnp.sum(w * second, axis=0)
  second += radial * w * jnp.linalg.norm(second, axis=0)
  updates, _ = tx.update(second, state, w)
  moved = np.asarray(optax.apply_updates(w, updates), np.float64)
  # B itself, formed in float32, keeps κ times fewer digits, as the originals' (2.5e-5 and 1e-3
  # from the products; 3e-6 from B; 2.2e-5 with the radial part, whose cancellation in the
  # projection adds its own rounding).
  np.testing.assert_allclose(np.linalg.norm(moved, axis=0), 1, atol=1e-5 if radial == 0 else 1e-4)


@pytest.mark.parametrize('name', ['sgdg', 'adamg'])
def test_derivatives_at_a_learning_rate_of_zero_are_finite(name):
  """A warm-up from 0: the step's coefficients once divided ε by |σ|, whose derivative at σ = 0
  was 0·∞."""
  rs = np.random.RandomState(12)
  w = jnp.asarray(unit_columns(rs), jnp.float32)
  g = jnp.asarray(rs.randn(N, P), jnp.float32)

  def moved(lr, g):
    tx = step(name, lr)
    updates, _ = tx.update(g, tx.init(w), w)
    return jnp.sum(jnp.sin(3 * optax.apply_updates(w, updates)))

  by_rate, by_gradient = jax.jit(jax.grad(moved, argnums=(0, 1)))(jnp.float32(0.0), g)
  assert bool(jnp.isfinite(by_rate)) and bool(jnp.all(jnp.isfinite(by_gradient)))


def test_the_explicit_norm_is_read_for_cancelled_buffers_only(monkeypatch):
  """An infinite gradient makes its point's lengths infinite; such a point is held, and must not
  send its dtype group to the second read."""
  from grassmann_optax._src import manifold

  reads = []
  real = manifold.column_norm

  def counted(x, *args, **kwargs):
    jax.debug.callback(lambda: reads.append(1))
    return real(x, *args, **kwargs)

  monkeypatch.setattr(manifold, 'column_norm', counted)
  rs = np.random.RandomState(13)
  w = jnp.asarray(unit_columns(rs), jnp.float32)
  g = jnp.asarray(rs.randn(N, P), jnp.float32)
  tx = go.grassmann_adam(0.1)
  updates, state = tx.update(g, tx.init(w), w)
  w = optax.apply_updates(w, updates)
  for gradient, expected in ((g.at[0, 3].set(jnp.inf), 0), (-(1 - 1e-3) * 0.9 * g, 1)):
    reads.clear()
    jax.block_until_ready(tx.update(gradient, state, w))
    jax.effects_barrier()
    assert len(reads) == expected
