"""Whatever a user passes, the library does the right thing or says clearly why it will not.

Each misuse gets a ``TypeError`` or ``ValueError`` that names the argument or the leaf and says
what to do; nothing is silently accepted and then ignored.
"""

import collections
import functools
import inspect
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import grassmann_optax as go

KERNEL = go.unit_initializer()(jax.random.key(0), (3, 3, 4, 8))


def _all_with_point_axes(point_axes):
  """Every public transform and alias that takes ``point_axes``."""
  labels = {'w': 'grassmann'}
  return {
    'add_orthogonality_gradient': lambda: go.add_orthogonality_gradient(0.1, point_axes=point_axes),
    'project_to_tangent': lambda: go.project_to_tangent(point_axes=point_axes),
    'grassmann_clip': lambda: go.grassmann_clip(0.1, point_axes=point_axes),
    'exp_map_update': lambda: go.exp_map_update(point_axes=point_axes),
    'grassmann_sgd': lambda: go.grassmann_sgd(0.1, point_axes=point_axes),
    'grassmann_adam': lambda: go.grassmann_adam(0.1, point_axes=point_axes),
    'sgdg': lambda: go.sgdg(0.1, 0.1, param_labels=labels, point_axes=point_axes),
    'adamg': lambda: go.adamg(0.1, 0.1, param_labels=labels, point_axes=point_axes),
  }


def _params_for(name):
  return {'w': KERNEL} if name in ('sgdg', 'adamg') else KERNEL


@pytest.mark.parametrize('point_axes', [1.5, (0, None), 'rows', [0, 1.0], True])
@pytest.mark.parametrize('name', sorted(_all_with_point_axes(None)))
def test_point_axes_that_are_no_axes_are_refused_at_construction(name, point_axes):
  with pytest.raises(TypeError, match='point_axes'):
    _all_with_point_axes(point_axes)[name]()


@pytest.mark.parametrize('name', sorted(_all_with_point_axes(None)))
def test_a_callable_point_axes_must_return_axes(name):
  tx = _all_with_point_axes(lambda params: 3.3)[name]()
  with pytest.raises(TypeError, match=r'point_axes\(params\)=3.3'):
    tx.init(_params_for(name))


@pytest.mark.parametrize('axes', [np.array([0, 1, 2]), np.int64(3), jnp.array([0, 1, 2])])
def test_numpy_and_jax_integer_axes_are_axes(axes):
  """An integer array names axes as a tuple would (not a pytree of one leaf)."""
  as_tuple = tuple(int(a) for a in np.ravel(axes))
  grads = jnp.ones_like(KERNEL)
  results = []
  for spec in (axes, as_tuple):
    tx = go.grassmann_adam(0.1, point_axes=spec)
    updates, _ = tx.update(grads, tx.init(KERNEL), KERNEL)
    results.append(updates)
  np.testing.assert_array_equal(*results)


def test_a_pytree_of_point_axes_with_a_bad_entry_names_it():
  with pytest.raises(TypeError, match=r"entry 1.5 for 'w'"):
    go.grassmann_sgd(0.1, point_axes={'w': 1.5})


def _all_with_radius(radius):
  labels = {'w': 'grassmann'}
  return {
    'exp_map_update': lambda: go.exp_map_update(radius=radius),
    'grassmann_sgd': lambda: go.grassmann_sgd(0.1, radius=radius),
    'grassmann_adam': lambda: go.grassmann_adam(0.1, radius=radius),
    'sgdg': lambda: go.sgdg(0.1, 0.1, param_labels=labels, radius=radius),
    'adamg': lambda: go.adamg(0.1, 0.1, param_labels=labels, radius=radius),
  }


@pytest.mark.parametrize(
  'radius, error',
  [
    (0, ValueError),
    (-1.0, ValueError),
    (float('inf'), ValueError),
    (float('nan'), ValueError),
    (1e20, ValueError),
    (1e-18, ValueError),
    (np.float32(1e16), ValueError),
    ('unit', TypeError),
    ('', TypeError),
    (True, TypeError),
    (jnp.ones(3), TypeError),
    (np.array([1.0, 2.0]), TypeError),
    ([1.0], TypeError),
  ],
)
@pytest.mark.parametrize('name', sorted(_all_with_radius(None)))
def test_every_radius_that_is_not_a_positive_number_is_refused(name, radius, error):
  with pytest.raises(error, match='radius'):
    _all_with_radius(radius)[name]()


@pytest.mark.parametrize('radius', [2, 2.0, np.float32(2.0), jnp.asarray(2.0)])
def test_a_scalar_radius_of_any_type_is_taken(radius):
  tx = go.grassmann_sgd(0.1, radius=radius)
  updates, _ = tx.update(jnp.ones_like(KERNEL), tx.init(2 * KERNEL), 2 * KERNEL)
  norms = jnp.linalg.norm((2 * KERNEL + updates).reshape(-1, 8), axis=0)
  np.testing.assert_allclose(norms, 2.0, rtol=1e-6)


@pytest.mark.parametrize('name', sorted(_all_with_radius(None)))
def test_radius_init_on_a_zero_point_is_refused_with_the_leaf_named(name):
  params = KERNEL.at[..., 3].set(0.0)
  tx = _all_with_radius('init')[name]()
  with pytest.raises(ValueError, match='point of norm 0'):
    tx.init({'w': params} if name in ('sgdg', 'adamg') else params)


@pytest.mark.parametrize(
  'scale, message',
  [
    (1e-25, 'point of norm 0'),  # its square underflows
    (1e-18, r'outside \[1e-15, 1e\+15\]'),  # left its sphere by 11% in three steps
    (1e17, r'outside \[1e-15, 1e\+15\]'),
    (1e20, r'outside \[1e-15, 1e\+15\]'),  # ‖w‖² overflows: NaN in the first step
    (float('nan'), 'not finite'),
  ],
)
@pytest.mark.parametrize('name', [*sorted(_all_with_radius(None)), 'hyperball_adam'])
def test_radius_init_refuses_the_norms_a_scalar_radius_may_not_have(name, scale, message):
  """radius='init' keeps the norms the params have at init: the same range as a number."""
  params = KERNEL * scale
  if name == 'hyperball_adam':
    tx = go.hyperball_adam(0.1)
  else:
    tx = _all_with_radius('init')[name]()
  with pytest.raises(ValueError, match=f'leaf .* {message}'):
    tx.init({'w': params} if name in ('sgdg', 'adamg') else params)


@pytest.mark.parametrize('scale, message', [(0.0, 'point of norm 0'), (1e20, 'outside')])
@pytest.mark.parametrize('name', [*sorted(_all_with_radius(None)), 'hyperball_adam'])
def test_radius_init_under_jit_refuses_the_same_norms_when_it_runs(name, scale, message):
  """``jax.jit(tx.init)`` (how sharded training makes its state) sees traced norms: the check
  runs with the compiled init and raises the same message, instead of keeping a radius of 0."""
  # A zero column; the hyperball's point is the whole matrix.
  zero_one = scale == 0 and name != 'hyperball_adam'
  params = KERNEL.at[..., 3].set(0.0) if zero_one else KERNEL * scale
  tx = go.hyperball_adam(0.1) if name == 'hyperball_adam' else _all_with_radius('init')[name]()
  keeps = 'the hyperball' if name == 'hyperball_adam' else "radius='init'"
  with pytest.raises(jax.errors.JaxRuntimeError, match=f'{keeps}.*leaf .*{message}'):
    state = jax.jit(tx.init)({'w': params} if name in ('sgdg', 'adamg') else params)
    jax.block_until_ready(state)
  # Good norms pass under jit, and give the radii of eager init.
  good = {'w': KERNEL} if name in ('sgdg', 'adamg') else KERNEL
  close = functools.partial(np.testing.assert_allclose, rtol=1e-6)
  jax.tree.map(close, jax.jit(tx.init)(good), tx.init(good))


@pytest.mark.parametrize('name', ['sgdg', 'adamg'])
def test_a_stack_whose_layers_have_no_more_rows_than_points_is_refused_with_omega(name):
  """(layers, 6, 8) with point axes (1,): 8 points of 6 elements per layer cannot be orthogonal."""
  params = {'w': jnp.ones((4, 6, 8))}
  factory = getattr(go, name)
  with pytest.raises(ValueError, match=r"'w'.*point size 6 < 8"):
    factory(0.1, 0.1, param_labels={'w': 'grassmann'}, point_axes=(1,)).init(params)
  with pytest.raises(ValueError, match=r"'<root>'.*point size 6 < 8"):
    go.add_orthogonality_gradient(0.1, point_axes=(1,)).init(params['w'])
  # Without the orthogonality term any layout is allowed.
  factory(0.1, 0.1, omega=0, param_labels={'w': 'grassmann'}, point_axes=(1,)).init(params)


def test_find_scale_invariant_skips_integer_leaves_and_refuses_non_finite_gradients():
  params = {'w': jax.random.normal(jax.random.key(1), (8, 4)), 'step': jnp.zeros((2, 2), jnp.int32)}
  x = jax.random.normal(jax.random.key(2), (32, 8))

  def loss(p, x):
    z = x @ p['w']
    z = (z - z.mean(0)) / z.std(0)
    return jnp.sum(jnp.sin(z)) + 0.0 * jnp.sum(p['step'])

  found = go.find_scale_invariant(loss, params, x)
  assert found.param_labels == {'w': 'grassmann', 'step': 'euclidean'}
  bad = lambda p, x: loss(p, x) * jnp.where(p['w'][0, 0] > -100, jnp.nan, 1.0)
  with pytest.raises(ValueError, match=r"gradient of leaf 'w' is not finite"):
    go.find_scale_invariant(bad, params, x)


def test_a_square_scale_invariant_kernel_is_not_labelled_undercomplete_only():
  """A conv followed by BatchNorm is invariant per column, but 9 columns of 9 elements cannot be
  orthogonal beyond a basis: with undercomplete_only (the default) it stays Euclidean."""
  key_w, key_x = jax.random.split(jax.random.key(3))
  params = {'w': jax.random.normal(key_w, (9, 9))}
  x = jax.random.normal(key_x, (64, 9))

  def loss(p, x):
    z = x @ p['w']
    z = (z - z.mean(0)) / z.std(0)
    return jnp.sum(jnp.sin(z) * jnp.arange(9.0))

  assert go.find_scale_invariant(loss, params, x).param_labels == {'w': 'euclidean'}
  loose = go.find_scale_invariant(loss, params, x, undercomplete_only=False)
  assert loose.param_labels == {'w': 'grassmann'}


def test_project_params_puts_averaged_points_back_on_the_sphere():
  params = {'w': KERNEL, 'b': jnp.ones(8)}
  averaged = jax.tree.map(lambda p: 0.5 * p + 0.5 * jnp.roll(p, 1, axis=-1), params)
  back = go.project_params(averaged, {'w': 'grassmann', 'b': 'euclidean'})
  np.testing.assert_allclose(jnp.linalg.norm(back['w'].reshape(-1, 8), axis=0), 1, rtol=1e-6)
  np.testing.assert_array_equal(back['b'], averaged['b'])
  twice = go.project_params(averaged, {'w': 'grassmann', 'b': 'euclidean'}, radius=2.0)
  np.testing.assert_allclose(twice['w'], 2 * back['w'], rtol=1e-6)
  with pytest.raises(ValueError, match='label'):
    go.project_params(averaged, {'w': 'grassmann'})


def test_project_params_places_points_of_any_norm_and_keeps_zero_and_non_finite_ones():
  """Float32 squares overflow at 1e20 and underflow at 1e-30: those points are still placed on
  the sphere. A zero point has no direction and stays zero; a NaN or inf point stays as it is,
  so that a diverged average is seen, not turned into zeros."""
  w = KERNEL.reshape(-1, 8)
  w = w.at[:, 1].multiply(1e20).at[:, 2].multiply(1e-30).at[:, 3].multiply(3e38)
  w = w.at[:, 4].set(0.0).at[5, 5].set(jnp.nan).at[7, 6].set(jnp.inf)
  back = go.project_params({'w': w}, {'w': 'grassmann'})['w']
  norms = np.linalg.norm(np.asarray(back[:, [0, 1, 2, 3, 7]], np.float64), axis=0)
  np.testing.assert_allclose(norms, 1, rtol=1e-6)
  np.testing.assert_allclose(back[:, 1], KERNEL.reshape(-1, 8)[:, 1], rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(back[:, 4], 0.0)
  np.testing.assert_array_equal(back[:, 5:7], w[:, 5:7])


def test_project_params_takes_the_radii_a_hyperball_state_holds():
  # One matrix on the hyperball: its radius tree holds one scalar, which is still per point; the
  # point_axes apply to the manifold leaves only (the 1-D bias has no last two axes).
  params = {'w': 3.0 * KERNEL.reshape(3, 12, 8)[:, :, :6], 'b': jnp.ones(8)}
  labels = {'w': go.GRASSMANN, 'b': go.EUCLIDEAN}
  state = go.adamh(1e-3, 0.02, param_labels=labels).init(params)
  radius = state.inner_states['grassmann'].inner_state.radius
  # As docs/hyperball.md finds them: optax's tree_get reaches into the partition's state.
  assert optax.tree_utils.tree_get(state, 'radius') is radius
  moved = jax.tree.map(lambda p: 0.5 * p, params)
  back = go.project_params(moved, labels, radius=radius, point_axes=(-2, -1))
  np.testing.assert_allclose(jnp.linalg.norm(back['w'], axis=(1, 2)), radius['w'], rtol=1e-6)
  np.testing.assert_array_equal(back['b'], moved['b'])
  single = {'w': params['w'][0]}
  one = go.adamh(1e-3, 0.02, param_labels={'w': go.GRASSMANN}).init(single)
  one = one.inner_states['grassmann'].inner_state.radius
  assert jnp.ndim(one['w']) == 0
  back = go.project_params(
    {'w': 0.5 * single['w']}, {'w': go.GRASSMANN}, radius=one, point_axes=(-2, -1)
  )
  np.testing.assert_allclose(jnp.linalg.norm(back['w']), one['w'], rtol=1e-6)
  # Radii that are not one per point, or not one array per manifold leaf, are refused by name.
  with pytest.raises(ValueError, match=r"leaf 'w'.*not one per point"):
    go.project_params(moved, labels, radius=radius)
  with pytest.raises(ValueError, match='2 arrays of radii.*1 manifold leaves'):
    go.project_params(moved, labels, radius={'w': radius['w'], 'x': radius['w']})


def test_update_without_params_says_so_for_every_step():
  for tx in (go.grassmann_sgd(0.1), go.grassmann_adam(0.1)):
    with pytest.raises(ValueError, match='params'):
      tx.update(KERNEL, tx.init(KERNEL))


def test_extra_arguments_reach_every_transform_and_alias():
  """``value=`` and other extra arguments pass through (reduce_on_plateau, nnx.Optimizer)."""
  params = {'w': KERNEL, 'b': jnp.zeros(8)}
  labels = {'w': 'grassmann', 'b': 'euclidean'}
  grads = jax.tree.map(jnp.ones_like, params)
  for tx in (
    go.sgdg(0.1, 0.1, param_labels=labels),
    go.adamg(0.1, 0.1, param_labels=labels),
    go.euclidean_sgd(0.1),
    go.grassmann_partition(go.grassmann_adam(0.1), optax.adam(0.1), labels),
  ):
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    tx.update(grads, tx.init(params), params, value=jnp.ones([]), other='anything')
  for tx in (
    go.add_orthogonality_gradient(0.1),
    go.add_orthogonality_gradient(0),
    go.project_to_tangent(),
    go.grassmann_clip(0.1),
    go.grassmann_clip(None),
    go.exp_map_update(),
    go.grassmann_sgd(0.1),
    go.grassmann_adam(0.1),
    go.hyperball_step(0.1),
    go.hyperball_adam(0.1),
    go.hyperball_muon(0.1),
    go.scale_by_matrix_sign(),
  ):
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    tx.update(jnp.ones_like(KERNEL), tx.init(KERNEL), KERNEL, value=jnp.ones([]))
  for tx in (go.adamh(0.1, 0.1, param_labels=labels), go.muonh(0.1, 0.1, param_labels=labels)):
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    tx.update(grads, tx.init(params), params, value=jnp.ones([]), other='anything')


def test_every_public_transform_is_in_the_extra_arguments_test():
  # A public function that returns a transformation must be added to the test above.
  tested = {
    'sgdg', 'adamg', 'euclidean_sgd', 'grassmann_partition', 'add_orthogonality_gradient',
    'project_to_tangent', 'grassmann_clip', 'exp_map_update', 'grassmann_sgd', 'grassmann_adam',
    'hyperball_step', 'hyperball_adam', 'hyperball_muon', 'scale_by_matrix_sign', 'adamh',
    'muonh',
  }  # fmt: skip
  returning = {
    name
    for name in go.__all__
    if callable(getattr(go, name))
    and 'GradientTransformation' in str(inspect.signature(getattr(go, name)).return_annotation)
  }
  assert returning, 'no public function found that returns a transformation'
  assert returning <= tested, sorted(returning - tested)


def _hyperparameter_builders():
  """Every public factory and the hyper-parameter keyword it takes, with a valid call."""
  return {
    'sgdg': lambda **kw: go.sgdg(**{'learning_rate': 0.1, 'grassmann_learning_rate': 0.1, **kw}),
    'adamg': lambda **kw: go.adamg(**{'learning_rate': 0.1, 'grassmann_learning_rate': 0.1, **kw}),
    'grassmann_sgd': lambda **kw: go.grassmann_sgd(**{'learning_rate': 0.1, **kw}),
    'grassmann_adam': lambda **kw: go.grassmann_adam(**{'learning_rate': 0.1, **kw}),
    'adamh': lambda **kw: go.adamh(**{'learning_rate': 0.1, 'hyperball_learning_rate': 0.1, **kw}),
    'muonh': lambda **kw: go.muonh(**{'learning_rate': 0.1, 'hyperball_learning_rate': 0.1, **kw}),
    'hyperball_adam': lambda **kw: go.hyperball_adam(**{'learning_rate': 0.1, **kw}),
    'hyperball_muon': lambda **kw: go.hyperball_muon(**{'learning_rate': 0.1, **kw}),
    'hyperball_step': lambda **kw: go.hyperball_step(**{'learning_rate': 0.1, **kw}),
    'euclidean_sgd': lambda **kw: go.euclidean_sgd(**{'learning_rate': 0.1, **kw}),
    'scale_by_matrix_sign': lambda **kw: go.scale_by_matrix_sign(**kw),
    'add_orthogonality_gradient': lambda **kw: go.add_orthogonality_gradient(
      **{'omega': 0.1, **kw}
    ),
    'grassmann_clip': lambda **kw: go.grassmann_clip(**{'max_norm': 0.1, **kw}),
  }


_OUT_OF_RANGE = [
  ('sgdg', 'grad_clip', np.array(-1.0)),
  ('sgdg', 'momentum', np.float32(1.5)),
  ('sgdg', 'learning_rate', float('nan')),
  ('sgdg', 'grassmann_learning_rate', np.array(np.inf)),
  ('sgdg', 'omega', -0.1),
  ('adamg', 'b1', np.array(1.0)),
  ('adamg', 'eps', 0.0),
  ('adamg', 'eps', 1e-40),
  ('grassmann_adam', 'eps', np.float64(0.0)),
  ('grassmann_sgd', 'learning_rate', jnp.array(jnp.nan)),
  ('adamh', 'eps', 0.0),
  ('adamh', 'weight_decay', -1.0),
  ('adamh', 'hyperball_learning_rate', float('inf')),
  ('muonh', 'b1', 1.0),
  ('muonh', 'b2', -0.5),
  ('muonh', 'eps', 0.0),
  ('muonh', 'weight_decay', float('nan')),
  ('hyperball_adam', 'eps', 0.0),
  ('hyperball_step', 'learning_rate', float('nan')),
  ('euclidean_sgd', 'learning_rate', float('nan')),
  ('scale_by_matrix_sign', 'eps', 0.0),
  ('scale_by_matrix_sign', 'eps', -1e-8),
  ('add_orthogonality_gradient', 'omega', np.array(-0.1)),
  ('grassmann_clip', 'max_norm', np.array(0.0)),
  # In range as Python floats, out of it in float32, where the steps compute with them.
  ('adamg', 'b1', 1 - 1e-9),
  ('grassmann_adam', 'b2', 1 - 1e-9),
  ('hyperball_adam', 'b1', np.float64(1 - 1e-9)),
  ('sgdg', 'learning_rate', 1e39),
  ('grassmann_sgd', 'learning_rate', -1e39),
  ('sgdg', 'omega', 1e39),
  ('sgdg', 'weight_decay', 1e39),
  ('adamh', 'hyperball_learning_rate', 1e39),
]


@pytest.mark.parametrize(('name', 'argument', 'value'), _OUT_OF_RANGE)
def test_hyperparameters_out_of_range_are_refused_whatever_their_type(name, argument, value):
  """NumPy scalars, 0-d arrays and JAX arrays are checked as Python numbers are; the error
  names the argument as the function calls it."""
  with pytest.raises(ValueError, match=rf'^{argument}='):
    _hyperparameter_builders()[name](**{argument: value})


_NOT_A_NUMBER = [
  ('sgdg', 'learning_rate', '0.01'),
  ('sgdg', 'momentum', jnp.array([0.1, 0.2])),
  ('sgdg', 'grad_clip', '0.1'),
  ('adamg', 'b1', '0.9'),
  ('adamg', 'eps', 1e-8 + 0j),
  ('grassmann_sgd', 'momentum', True),
  ('adamh', 'b2', np.array([0.9, 0.95])),
  ('muonh', 'momentum', 'high'),
  ('hyperball_step', 'learning_rate', np.ones(3)),
  ('scale_by_matrix_sign', 'eps', '1e-8'),
  ('add_orthogonality_gradient', 'omega', [0.1]),
  ('grassmann_clip', 'max_norm', '0.1'),
]


@pytest.mark.parametrize(('name', 'argument', 'value'), _NOT_A_NUMBER)
def test_hyperparameters_that_are_not_one_number_are_refused_at_construction(name, argument, value):
  with pytest.raises(TypeError, match=rf'^{argument}[ =]'):
    _hyperparameter_builders()[name](**{argument: value})


@pytest.mark.parametrize('name', ['sgdg', 'adamg', 'euclidean_sgd', 'muonh', 'hyperball_muon'])
def test_nesterov_must_be_a_bool(name):
  with pytest.raises(TypeError, match='nesterov'):
    _hyperparameter_builders()[name](nesterov='False')


def test_schedules_and_traced_hyperparameters_are_still_taken():
  go.adamg(0.1, 0.1, b1=jnp.asarray(0.9, jnp.bfloat16), eps=np.float32(1e-8))
  schedule = optax.cosine_decay_schedule(0.1, 10)
  go.sgdg(schedule, schedule)
  go.adamh(schedule, schedule)
  tx = optax.inject_hyperparams(go.adamg)(learning_rate=0.1, grassmann_learning_rate=0.1, eps=1e-8)
  params = {'conv': KERNEL, 'bias': jnp.zeros(8)}
  state = tx.init(params)
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state, params)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def test_injected_array_hyperparameters_are_checked_without_a_deprecated_numpy_call():
  """inject_hyperparams hands the factory JAX arrays; reading their dtype must not go through
  ``np.result_type(array)``, which JAX deprecates (a warning now, an error in a later release)."""
  params = {'conv': KERNEL, 'bias': jnp.zeros(8)}
  with warnings.catch_warnings():
    warnings.simplefilter('error', DeprecationWarning)
    tx = optax.inject_hyperparams(go.adamg)(learning_rate=0.1, grassmann_learning_rate=0.1)
    state = tx.init(params)
    tx.update(jax.tree.map(jnp.ones_like, params), state, params)


def _vector_schedule(count):
  return jnp.full((3,), 0.1) * (count + 1)


@pytest.mark.parametrize(
  'build',
  [
    lambda: go.grassmann_sgd(_vector_schedule),
    lambda: go.grassmann_adam(_vector_schedule),
    lambda: go.sgdg(0.1, _vector_schedule, param_labels={'w': 'grassmann'}),
    lambda: go.hyperball_step(_vector_schedule),
    lambda: go.adamh(0.1, _vector_schedule, param_labels={'w': 'grassmann'}),
  ],
  ids=['grassmann_sgd', 'grassmann_adam', 'sgdg', 'hyperball_step', 'adamh'],
)
def test_a_schedule_that_returns_an_array_is_refused_with_its_shape(build):
  tx = build()
  params = {'w': KERNEL}
  state = tx.init(params)
  with pytest.raises(TypeError, match=r'schedule returned an array of shape \(3,\)'):
    tx.update(jax.tree.map(jnp.ones_like, params), state, params)


@pytest.mark.parametrize('name', ['sgdg', 'adamg'])
def test_an_int_point_axes_need_not_fit_the_euclidean_leaves(name):
  """point_axes=1 (rows of a 2-D leaf) must not be resolved for a 1-D bias the step never sees."""
  w = go.unit_initializer()(jax.random.key(1), (8, 3))
  params = {'w': jnp.swapaxes(w, 0, 1), 'bias': jnp.zeros(3)}
  labels = {'w': 'grassmann', 'bias': 'euclidean'}
  tx = _hyperparameter_builders()[name](param_labels=labels, point_axes=1, omega=0.0)
  state = tx.init(params)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(jnp.linalg.norm(new['w'], axis=1), 1.0, rtol=1e-5)


def test_a_python_scalar_leaf_is_euclidean_and_does_not_crash_the_aliases():
  params = {'conv': KERNEL, 'scale': 1.0}
  assert go.grassmann_labels(params) == {'conv': 'grassmann', 'scale': 'euclidean'}
  tx = go.sgdg(0.1, 0.1)
  state = tx.init(params)
  updates, _ = tx.update({'conv': jnp.ones_like(KERNEL), 'scale': 1.0}, state, params)
  assert updates['conv'].shape == KERNEL.shape


def test_an_integer_conv_kernel_is_not_labelled_grassmann():
  params = {'conv': jnp.ones((3, 3, 4, 8), jnp.int32), 'float': KERNEL}
  assert go.grassmann_labels(params) == {'conv': 'euclidean', 'float': 'grassmann'}


@pytest.mark.parametrize('name', ['adamg', 'grassmann_adam', 'adamh', 'hyperball_adam'])
def test_a_zero_gradient_point_stays_finite_with_the_smallest_eps_allowed(name):
  eps = float(np.finfo(np.float32).tiny)
  w = go.unit_initializer()(jax.random.key(2), (16, 4))
  params = {'w': w}
  kw = {'eps': eps}
  if name in ('adamg', 'adamh'):
    kw['param_labels'] = {'w': 'grassmann'}
  if name == 'adamg':
    kw['omega'] = 0.0
  tx = _hyperparameter_builders()[name](**kw)
  state = tx.init(params)
  updates, _ = tx.update({'w': jnp.zeros_like(w)}, state, params)
  assert bool(jnp.all(jnp.isfinite(updates['w'])))


@pytest.mark.parametrize('name', ['hyperball_adam', 'hyperball_muon', 'hyperball_step'])
def test_a_stack_of_zero_layers_is_stepped_as_nothing(name):
  params = {
    'empty': jnp.zeros((0, 8, 4)),
    'w': jax.random.normal(jax.random.key(3), (8, 4)),
  }
  tx = _hyperparameter_builders()[name]()
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  assert updates['empty'].shape == (0, 8, 4)
  np.testing.assert_allclose(
    jnp.linalg.norm(params['w'] + updates['w']), jnp.linalg.norm(params['w']), rtol=1e-5
  )


def test_project_params_refuses_unknown_labels_unfit_leaves_and_bad_radii():
  params = {'conv': KERNEL * 2, 'bias': jnp.zeros(8)}
  with pytest.raises(ValueError, match="^project_params: unknown label 'Grassmann'"):
    go.project_params(params, {'conv': 'Grassmann', 'bias': 'euclidean'})
  with pytest.raises(ValueError, match="'bias'"):
    go.project_params(params, {'conv': 'grassmann', 'bias': 'grassmann'})
  ints = {'conv': jnp.ones((3, 3, 4, 8), jnp.int32)}
  with pytest.raises(ValueError, match='not floating-point'):
    go.project_params(ints, {'conv': 'grassmann'})
  labels = {'conv': 'grassmann', 'bias': 'euclidean'}
  for bad in (-jnp.ones(8), jnp.full(8, jnp.inf), jnp.zeros(8)):
    with pytest.raises(ValueError, match='positive'):
      go.project_params(params, labels, radius={'conv': bad})


@pytest.mark.parametrize(
  'make',
  [
    lambda: go.hyperball_step(0.1),
    lambda: go.exp_map_update(radius='init'),
  ],
  ids=['hyperball_step', 'exp_map_update'],
)
def test_a_step_without_buffers_names_the_leaf_that_differs_from_init(make):
  tx = make()
  params = {'a': go.unit_initializer()(jax.random.key(4), (2, 8, 4)), 'b': KERNEL}
  state = tx.init(params)
  # More matrices for the Hyperball step, more columns for exp_map_update: more points.
  other = {'a': go.unit_initializer()(jax.random.key(5), (3, 8, 5)), 'b': KERNEL}
  with pytest.raises(ValueError, match="leaf 'a'.*init"):
    tx.update(jax.tree.map(jnp.ones_like, other), state, other)
  fewer = {'b': KERNEL}
  with pytest.raises(ValueError, match="'a'"):
    tx.update(jax.tree.map(jnp.ones_like, fewer), state, fewer)


@pytest.mark.parametrize('name', ['adamh', 'muonh'])
def test_a_point_axes_key_that_names_no_leaf_is_refused_by_the_hyperball_aliases(name):
  params = {'mlp': {'kernel': jax.random.normal(jax.random.key(6), (8, 16))}}
  tx = _hyperparameter_builders()[name](point_axes={'mlp/kernal': (0, 1)})
  with pytest.raises(ValueError, match=f"^{name}: point_axes names 'mlp/kernal'"):
    tx.init(params)


@pytest.mark.parametrize('name', ['sgdg', 'adamg'])
def test_a_square_kernel_under_injected_omega_says_to_make_omega_static(name):
  params = {'conv': go.unit_initializer()(jax.random.key(7), (1, 1, 8, 8))}
  factory = getattr(go, name)
  tx = optax.inject_hyperparams(factory)(0.1, 0.1, omega=0.0, param_labels={'conv': 'grassmann'})
  with pytest.raises(ValueError, match=r"static_args=\('omega',\)"):
    tx.init(params)
  tx = optax.inject_hyperparams(factory, static_args=('omega',))(
    0.1, 0.1, omega=0.0, param_labels={'conv': 'grassmann'}
  )
  tx.init(params)


def test_mesh_axes_outside_shard_map_change_nothing():
  """Outside shard_map a leaf is the whole array: the mesh axes split nothing."""
  from jax.sharding import PartitionSpec as P

  params = {'conv': KERNEL, 'bias': jnp.zeros(8)}
  grads = jax.tree.map(lambda x: jnp.cos(jnp.arange(x.size).reshape(x.shape)), params)
  results = []
  for mesh_axes in (None, P(None, None, None, 'model')):
    tx = go.adamg(0.1, 0.1, mesh_axes=mesh_axes)
    updates, _ = tx.update(grads, tx.init(params), params)
    results.append(updates)
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True):
    np.testing.assert_array_equal(a, b)


def test_minor_misuses_get_clear_errors():
  with pytest.raises(TypeError, match='int32 is not real floating-point'):
    go.unit_initializer()(jax.random.key(0), (4, 3), jnp.int32)
  sign = go.scale_by_matrix_sign()
  for u in (jnp.ones((4, 3), jnp.int32), jnp.ones((4, 3), jnp.complex64)):
    with pytest.raises(TypeError, match='real floating-point updates'):
      sign.update(u, sign.init(u))
  with pytest.raises(ValueError, match='is a scalar'):
    sign.update(jnp.ones(()), sign.init(jnp.ones(())))
  clip = go.grassmann_clip(0.1)
  with pytest.raises(TypeError, match='real floating-point updates'):
    clip.update(jnp.ones((4, 3), jnp.int32), clip.init(KERNEL), KERNEL)


@pytest.mark.parametrize(
  'name', ['sgdg', 'adamg', 'grassmann_sgd', 'grassmann_adam', 'adamh', 'hyperball_adam']
)
def test_the_state_of_another_optimizer_is_refused_with_a_type_error(name):
  w = go.unit_initializer()(jax.random.key(8), (16, 4))
  on_tree = name in ('sgdg', 'adamg', 'adamh')
  params = {'w': w} if on_tree else w
  kw = {'param_labels': {'w': 'grassmann'}} if on_tree else {}
  tx = _hyperparameter_builders()[name](**kw)
  with pytest.raises(TypeError, match=f"state that {name}'s init returns"):
    tx.update(params, optax.adam(0.1).init(params), params)
  if name in ('grassmann_sgd', 'grassmann_adam'):  # the fields of an Optax state, and no more
    foreign = collections.namedtuple('Foreign', ['count', 'trace', 'mu'])(0, params, params)
    with pytest.raises(TypeError, match=f"without 'per_point', not the state that {name}'s"):
      tx.update(params, foreign, params)


@pytest.mark.parametrize('scale', [1e-3, 1e19, 1e30, 'max'])
def test_the_matrix_sign_of_huge_updates_is_the_matrix_sign_of_small_ones(scale):
  """Sums of squares that overflow float32 are rescaled first: the direction is kept."""
  u = jax.random.normal(jax.random.key(9), (2, 16, 8))
  sign = go.scale_by_matrix_sign()
  expected, _ = sign.update(u, sign.init(u))
  scaled = u / jnp.max(jnp.abs(u)) * 3e38 if scale == 'max' else u * scale
  got, _ = sign.update(scaled, sign.init(u))
  np.testing.assert_allclose(got, expected, atol=2e-5)


# Two leaves whose keys join to one name ('a/b' against a nested a -> b).
_COLLIDING = {'a/b': KERNEL, 'a': {'b': KERNEL}}


@pytest.mark.parametrize(
  'build',
  [
    lambda: go.adamg(0.1, 0.1, param_labels={'a/b': 'grassmann', 'a': {'b': 'euclidean'}}),
    lambda: go.grassmann_adam(0.1, point_axes={'a/b': (0, 1, 2), 'a': {'b': None}}),
    lambda: go.hyperball_adam(0.1, point_axes={'a/b': (0, 1, 2), 'a': {'b': None}}),
  ],
  ids=['labels', 'point_axes', 'hyperball point_axes'],
)
def test_a_tree_of_two_leaves_of_one_name_is_refused(build):
  """Labels and point axes are matched to the params by name: two entries of one name would
  give both leaves one of them, silently."""
  with pytest.raises(ValueError, match=r"same name 'a/b'.*rename the key"):
    build().init({'a': {'b': KERNEL}})


def test_params_of_two_leaves_of_one_name_are_refused_where_matched_by_name():
  """The params' own names must be unique where a tree is matched to them by name, and need
  not be elsewhere."""
  for tx in (
    go.grassmann_sgd(0.1, point_axes={'a': {'b': None}}),
    go.adamg(0.1, 0.1, param_labels={'a/b': 'grassmann', 'a': 'euclidean'}),
  ):
    with pytest.raises(ValueError, match="the params.*same name 'a/b'"):
      tx.init(_COLLIDING)
  # Labels of the params' own structure, or one spec for all, are not matched by name.
  labels = {'a/b': 'grassmann', 'a': {'b': 'euclidean'}}
  for tx in (go.adamg(0.1, 0.1, param_labels=labels), go.grassmann_sgd(0.1, point_axes=None)):
    state = tx.init(_COLLIDING)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, _COLLIDING), state, _COLLIDING)
    assert jax.tree.structure(updates) == jax.tree.structure(_COLLIDING)


def test_a_value_that_rounds_out_of_range_in_float32_says_so():
  with pytest.raises(ValueError, match=r'^b1=0.999999999 is out of range in float32.*it is 1.0'):
    go.grassmann_adam(0.1, b1=1 - 1e-9)
  # inject_hyperparams hands the factory float32 arrays: the message shows the number.
  tx = optax.inject_hyperparams(go.grassmann_adam)(learning_rate=0.1, b2=1 - 1e-9)
  with pytest.raises(ValueError, match=r'^b2=1.0 \(a float32 array\) is out of range'):
    tx.init(KERNEL)


def _column_norms(w):
  return np.linalg.norm(np.asarray(w, np.float64).reshape(-1, w.shape[-1]), axis=0)


@pytest.mark.parametrize('learning_rate', [1e30, 1e38, -1e38])
def test_a_geodesic_step_of_a_huge_angle_stays_on_the_sphere(learning_rate):
  """1/(θ + ε) is below the smallest float32 above θ = 8.5e37 and was flushed to 0: the point
  shrank to |cos θ|. An angle that overflows float32 gives NaN, as in the originals."""
  tx = go.grassmann_sgd(learning_rate, grad_clip=None)
  grads = 2 * go.unit_initializer()(jax.random.key(3), KERNEL.shape)  # θ up to 2·|η|
  updates, _ = tx.update(grads, tx.init(KERNEL), KERNEL)
  np.testing.assert_allclose(_column_norms(KERNEL + updates), 1, atol=2e-6)


@pytest.mark.parametrize('retraction', ['normalize', 'geodesic'])
@pytest.mark.parametrize('rate', [2.0, 2e19, 1e30, -3e38])
def test_a_hyperball_step_longer_than_the_point_keeps_its_radius(retraction, rate):
  """(η·u/‖u‖)² overflowed float32 above η = 1.8e19, and 'normalize' sent the point to 0."""
  w = jax.random.normal(jax.random.key(4), (6, 4))
  tx = go.hyperball_step(rate, retraction=retraction)
  updates, _ = tx.update(jax.random.normal(jax.random.key(5), w.shape), tx.init(w), w)
  np.testing.assert_allclose(jnp.linalg.norm(w + updates), jnp.linalg.norm(w), rtol=1e-6)


def _real_and_imaginary(shape):
  real = jax.random.normal(jax.random.key(6), shape)
  return (real + 1j * real[..., ::-1]).astype(jnp.complex64)


@pytest.mark.parametrize(
  'build',
  [
    go.project_to_tangent,
    lambda: go.add_orthogonality_gradient(0.1),
    go.exp_map_update,
    lambda: go.grassmann_clip(0.1),
    lambda: go.grassmann_sgd(0.1),
    lambda: go.grassmann_adam(0.1),
    lambda: go.hyperball_step(0.1),
    lambda: go.hyperball_adam(0.1),
    lambda: go.hyperball_muon(0.1),
    go.scale_by_matrix_sign,
  ],
)
def test_complex_gradients_are_refused_by_every_transform(build):
  """The steps took the complex gradient into their norms and products and gave neither the step
  of its real part nor an error."""
  tx = build()
  with pytest.raises(TypeError, match="leaf '<root>' has dtype complex64.*real floating-point"):
    tx.update(_real_and_imaginary(KERNEL.shape), tx.init(KERNEL), KERNEL)


@pytest.mark.parametrize('dtype', [jnp.complex64, jnp.int32])
def test_a_gradient_of_another_dtype_is_refused_for_its_dtype_inside_the_partitions(dtype):
  """optax.partition calls a label function on the updates, where go.grassmann_labels does not
  label a complex or integer kernel 'grassmann': the step then refused a leaf missing since init.
  The aliases and grassmann_partition label by the params; a plain optax.partition says why."""
  params = {'conv': KERNEL, 'bias': jnp.zeros(8)}
  grads = {'conv': jnp.ones(KERNEL.shape, dtype), 'bias': jnp.zeros(8)}
  for tx in (
    go.adamg(0.1, 0.1),
    go.sgdg(0.1, 0.1, omega=0.0),
    go.grassmann_partition(go.grassmann_adam(0.1), optax.sgd(0.1), None),
    go.grassmann_partition(go.grassmann_sgd(0.1), optax.sgd(0.1), go.grassmann_labels),
  ):
    with pytest.raises(TypeError, match=f"leaf 'conv' has dtype {jnp.dtype(dtype).name}"):
      tx.update(grads, tx.init(params), params)
  chain = optax.partition(
    {'grassmann': go.grassmann_adam(0.1), 'euclidean': optax.sgd(0.1)}, go.grassmann_labels
  )
  with pytest.raises(ValueError, match="no leaf 'conv'.*moved the leaf to another branch"):
    chain.update(grads, chain.init(params), params)


def test_callables_that_inject_hyperparams_would_call_as_schedules_say_to_name_them_static():
  """Optax calls every callable argument with the step count: a mask gave one bool for every
  leaf (no decay at all, silently), a point_axes function an empty dict."""
  params = {'conv': KERNEL, 'dense': jnp.ones((8, 3)), 'bias': jnp.zeros(3)}
  grads = jax.tree.map(jnp.zeros_like, params)
  mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)
  tx = optax.inject_hyperparams(go.adamg)(0.1, 0.05, weight_decay=0.5, weight_decay_mask=mask)
  with pytest.raises(ValueError, match=r"single bool False .* static_args=\('weight_decay_mask',"):
    tx.init(params)
  tx = optax.inject_hyperparams(go.adamg, static_args=('weight_decay_mask',))(
    0.1, 0.05, weight_decay=0.5, weight_decay_mask=mask
  )
  updates, _ = tx.update(grads, tx.init(params), params)
  assert float(updates['dense'][0, 0]) == pytest.approx(-0.1 * 0.5 * 1.9)  # decay, with Nesterov
  assert float(updates['bias'][0]) == 0.0
  with pytest.raises(ValueError, match='single bool True'):  # the same without inject_hyperparams
    go.sgdg(0.1, 0.1, weight_decay_mask=True).init(params)
  go.sgdg(0.1, 0.1, weight_decay_mask=True).init({'conv': KERNEL})  # one leaf: the whole mask
  gpt = {'mlp': {'kernel': jnp.ones((8, 16))}, 'ln': {'scale': jnp.ones(8)}}
  tx = optax.inject_hyperparams(go.adamh)(0.1, 0.1, point_axes=go.transformer_point_axes)
  with pytest.raises(TypeError, match=r"point_axes=\{\}: .*static_args=\('point_axes',"):
    tx.init(gpt)


@pytest.mark.parametrize(
  ('value', 'error', 'message'),
  [
    (jnp.nan, ValueError, 'returned nan, not a learning rate'),
    (jnp.inf, ValueError, 'returned inf'),
    (1e39, ValueError, r'returned 1e\+39, .* in float32'),
    (0.1 + 0.1j, TypeError, 'returned'),
    ('0.1', TypeError, 'returned'),
    (None, TypeError, 'returned'),
    (True, TypeError, 'returned'),
    (jnp.array(0.1 + 0.1j), TypeError, r'returned \(0.1\d*\+0.1\d*j\) \(a complex64 array\)'),
    (np.array('x'), TypeError, "returned 'x'"),
  ],
)
@pytest.mark.parametrize('name', ['grassmann_sgd', 'grassmann_adam', 'hyperball_step'])
def test_a_schedule_value_is_checked_as_a_constant_rate_is(name, value, error, message):
  tx = getattr(go, name)(lambda count: value)
  with pytest.raises(error, match=f'{name}: the learning_rate schedule {message}'):
    tx.update(jnp.ones_like(KERNEL), tx.init(KERNEL), KERNEL)


@pytest.mark.parametrize('name', ['grassmann_sgd', 'hyperball_step'])
def test_a_traced_schedule_value_is_checked_for_its_type(name):
  tx = getattr(go, name)(lambda count: (count + 1) * (0.1 + 0.1j))
  with pytest.raises(TypeError, match='schedule returned a value of dtype complex64'):
    jax.jit(tx.update)(jnp.ones_like(KERNEL), tx.init(KERNEL), KERNEL)


@pytest.mark.parametrize(
  'build',
  [
    lambda schedule: go.sgdg(schedule, 0.1, param_labels={'w': 'grassmann', 'b': 'euclidean'}),
    lambda schedule: go.adamh(schedule, 0.1, param_labels={'w': 'grassmann', 'b': 'euclidean'}),
  ],
  ids=['sgdg', 'adamh'],
)
def test_the_euclidean_schedule_is_checked_as_the_manifold_one(build):
  """Optax broadcast a schedule value of shape (1,) over the Euclidean leaves."""
  params = {'w': KERNEL, 'b': jnp.zeros(8)}
  grads = jax.tree.map(jnp.ones_like, params)
  for schedule, error in (
    (lambda c: jnp.full((1,), 0.1), TypeError),
    (lambda c: jnp.nan, ValueError),
  ):
    tx = build(schedule)
    with pytest.raises(error, match='learning_rate schedule returned'):
      tx.update(grads, tx.init(params), params)


@pytest.mark.parametrize('name', ['adamh', 'muonh'])
def test_weight_decay_none_is_no_decay_in_the_hyperball_aliases(name):
  params = {'mlp': {'kernel': jnp.ones((6, 4))}, 'embedding': jnp.ones((5, 4))}
  grads = jax.tree.map(jnp.zeros_like, params)
  updates = {}
  for weight_decay in (None, 0.0):
    tx = getattr(go, name)(1e-3, 0.1, weight_decay=weight_decay)
    updates[weight_decay], _ = tx.update(grads, tx.init(params), params)
  jax.tree.map(np.testing.assert_array_equal, updates[None], updates[0.0])


def test_a_weight_decay_mask_that_is_no_tree_of_bools_is_refused():
  with pytest.raises(TypeError, match="weight_decay_mask: expected a tree of bools.*'x'"):
    go.euclidean_sgd(0.1, weight_decay_mask='x')
  with pytest.raises(TypeError, match='weight_decay_mask'):
    go.sgdg(0.1, 0.1, weight_decay_mask={'w': 1.0})
  for zero in (None, 0, 0.0, np.float32(0), np.array(0.0)):  # no decay: the mask is never read
    go.euclidean_sgd(0.1, weight_decay=zero, weight_decay_mask='x')
  params = {'w': jnp.ones((2, 2)), 'b': jnp.ones(2)}
  partial = go.euclidean_sgd(0.1, weight_decay=0.5, weight_decay_mask={'b': False})
  with pytest.raises(ValueError, match='weight_decay_mask does not match the params'):
    partial.init(params)
  masked = go.euclidean_sgd(
    0.1, momentum=0.0, weight_decay=0.5, weight_decay_mask={'w': True, 'b': False}
  )
  updates, _ = masked.update(jax.tree.map(jnp.zeros_like, params), masked.init(params), params)
  assert float(updates['w'][0, 0]) == pytest.approx(-0.05) and float(updates['b'][0]) == 0


@pytest.mark.parametrize('shape', [(0, 5), (5, 0), (2, 0, 3), (0, 3, 4)])
@pytest.mark.parametrize('build', [lambda: go.grassmann_clip(0.1), go.scale_by_matrix_sign])
def test_leaves_without_elements_pass_the_clip_and_the_matrix_sign(build, shape):
  tx = build()
  empty = jnp.zeros(shape)
  updates, _ = tx.update(empty, tx.init(empty), empty)
  assert updates.shape == shape


def test_label_arguments_of_the_wrong_type_are_refused():
  params = {'w': KERNEL}
  with pytest.raises(TypeError, match='predicate=True: expected a callable'):
    go.grassmann_labels(params, predicate=True)
  with pytest.raises(TypeError, match="head='no': expected True or False"):
    go.transformer_labels(params, head='no')
  loss = lambda p, x: jnp.sum(x @ p['w'].reshape(-1, 8))
  for argument in ({'draws': 2.5}, {'draws': '2'}, {'seed': 'a'}):
    with pytest.raises(TypeError, match=f'find_scale_invariant: {next(iter(argument))}='):
      go.find_scale_invariant(loss, params, jnp.ones((2, 36)), **argument)
