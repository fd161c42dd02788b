"""The library reproduces the original SGDG/AdamG trajectories (tests/data/golden) to 1e-6.

Three routes, each over all six golden runs, in float32: the public aliases (fused manifold
step), a chain assembled by hand from the public transforms, and the fused manifold transforms
inside a hand-built partition. Parameters are compared at every step, and so are the buffers:
the Euclidean momentum as stored, the manifold buffers after transport (the fused state holds
them transported; the chain's lazily-stored ones are transported here, independently).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import grassmann_optax as go
from tests import golden, reference

ATOL = 1e-6


def hand_chain(name: str, hp: dict) -> optax.GradientTransformation:
  """SGD-G / Adam-G assembled from the public transforms, as a user would."""
  moments = (
    go.grassmann_momentum(hp['momentum'])
    if name == 'sgdg'
    else go.grassmann_adam_moments(b1=hp['momentum'], b2=0.99, eps=1e-8)
  )
  manifold = optax.chain(
    go.add_orthogonality_gradient(hp['omega']),
    go.project_to_tangent(),
    go.grassmann_clip(hp['grad_clip']),
    moments,
    optax.scale_by_learning_rate(hp['grassmann_learning_rate']),
    go.exp_map_update(),
  )
  euclidean = optax.chain(
    optax.add_decayed_weights(hp['weight_decay'], mask={'conv': False, 'bias': False, 'fc': True}),
    optax.sgd(hp['learning_rate'], momentum=hp['momentum'], nesterov=True),
  )
  return optax.partition({'grassmann': manifold, 'euclidean': euclidean}, golden.LABELS)


def fused_partition(name: str, hp: dict) -> optax.GradientTransformation:
  if name == 'sgdg':
    manifold = go.sgdg_manifold_update(
      hp['grassmann_learning_rate'],
      momentum=hp['momentum'],
      grad_clip=hp['grad_clip'],
      omega=hp['omega'],
    )
  else:
    manifold = go.adamg_manifold_update(
      hp['grassmann_learning_rate'], b1=hp['momentum'], grad_clip=hp['grad_clip'], omega=hp['omega']
    )
  euclidean = go.euclidean_sgd(
    hp['learning_rate'], momentum=hp['momentum'], weight_decay=hp['weight_decay']
  )
  return go.grassmann_partition(manifold, euclidean, golden.LABELS)


def alias(name: str, hp: dict) -> optax.GradientTransformation:
  factory = go.sgdg if name == 'sgdg' else go.adamg
  return factory(**hp, param_labels=golden.LABELS)


ROUTES = {'alias': alias, 'chain': hand_chain, 'fused': fused_partition}


def run(tx, data, variant):
  params = jax.tree.map(jnp.asarray, golden.initial_params(data, variant))
  state = tx.init(params)
  step = jax.jit(tx.update)
  history = []
  for k in range(1, golden.STEPS + 1):
    updates, state = step(golden.gradients(data, k), state, params)
    params = optax.apply_updates(params, updates)
    history.append((params, state))
  return history


@pytest.mark.parametrize('route', sorted(ROUTES))
@pytest.mark.parametrize('variant', golden.VARIANTS)
@pytest.mark.parametrize('name', ['sgdg', 'adamg'])
def test_parameters_match_golden(name, variant, route):
  data = golden.load(name)
  hp = golden.hyperparams(data, variant)
  history = run(ROUTES[route](name, hp), data, variant)
  expected = golden.expected_params(data, variant)
  for k, (params, _) in enumerate(history):
    for key in ('conv', 'bias', 'fc'):
      assert params[key].dtype == jnp.float32
      np.testing.assert_allclose(
        params[key], expected[key][k], rtol=0, atol=ATOL, err_msg=f'{key} after step {k + 1}'
      )


def _states_of(state, cls):
  found = []
  jax.tree.map(
    lambda s: found.append(s) if isinstance(s, cls) else None,
    state,
    is_leaf=lambda s: isinstance(s, cls),
  )
  return found


def manifold_buffers(route: str, name: str, state, params) -> tuple[jax.Array, jax.Array | None]:
  """The manifold buffer transported to the current point (gradient units), and Adam-G's ``v``."""
  if route == 'chain':
    y, _ = go_unit(params['conv'])
    if name == 'sgdg':
      (momentum,) = _states_of(state, go.GrassmannMomentumState)
      return transport(y, momentum.trace['conv']), None
    (moments,) = _states_of(state, go.GrassmannAdamMomentsState)
    return transport(y, moments.mu['conv']), moments.nu['conv']
  if name == 'sgdg':
    (fused,) = _states_of(state, go.SgdgManifoldState)
    buffer, mix = fused.trace['conv'], fused.mix['conv']
    return mix[0] * buffer + mix[1] * params['conv'], None
  (fused,) = _states_of(state, go.AdamgManifoldState)
  buffer, mix = fused.mu['conv'], fused.mix['conv']
  return mix[0] * buffer + mix[1] * params['conv'], fused.nu['conv']


@pytest.mark.parametrize('route', sorted(ROUTES))
@pytest.mark.parametrize('variant', golden.VARIANTS)
@pytest.mark.parametrize('name', ['sgdg', 'adamg'])
def test_buffers_match_golden(name, variant, route):
  """Euclidean momentum is stored as in the originals; manifold buffers after transport."""
  data = golden.load(name)
  hp = golden.hyperparams(data, variant)
  history = run(ROUTES[route](name, hp), data, variant)
  for k, (params, state) in enumerate(history):
    (trace,) = _states_of(state, optax.TraceState)
    chex.assert_trees_all_close(
      {'bias': trace.trace['bias'], 'fc': trace.trace['fc']},
      {'bias': data[f'{variant}_bias_mom'][k], 'fc': data[f'{variant}_fc_mom'][k].T},
      atol=ATOL,
      rtol=0,
    )
    buffer, v = manifold_buffers('chain' if route == 'chain' else 'fused', name, state, params)
    if name == 'sgdg':  # the originals' buffer holds the learning rate: τ = −η_G b
      expected = golden.conv_rows_to_flax(data[f'{variant}_conv_mom'])[k]
      np.testing.assert_allclose(-hp['grassmann_learning_rate'] * buffer, expected, atol=ATOL)
    else:
      expected = golden.conv_rows_to_flax(data[f'{variant}_conv_m'])[k]
      np.testing.assert_allclose(buffer, expected, atol=ATOL)
      np.testing.assert_allclose(v, data[f'{variant}_conv_v'][k, :, 0], rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize('variant', golden.VARIANTS)
@pytest.mark.parametrize('name', ['sgdg', 'adamg'])
def test_the_reference_transcription_reproduces_the_original(name, variant):
  """``tests/reference.py``, which the exactness tests trust far beyond five steps, is checked
  here against the original code's own output."""
  data = golden.load(name)
  init = data['init_conv_nonunit'] if variant == 'nonunit' else data['init_conv']
  rows = lambda x: x.reshape(x.shape[0], -1).T  # PyTorch rows are the points: use columns
  grads = [rows(g) for g in data['grads_conv']]
  hp = {'grad_clip': float(data['hp_grad_clip']), 'omega': float(data[f'hp_omega_{variant}'])}
  lr = float(data['hp_lr_g'])
  if name == 'sgdg':
    out = reference.sgdg_trajectory(rows(init), grads, lr, **hp)
    buffers = data[f'{variant}_conv_mom']
  else:
    out = reference.adamg_trajectory(rows(init), grads, lr, **hp)
    buffers = data[f'{variant}_conv_m']
  for k, (point, buffer, *_) in enumerate(out):
    np.testing.assert_allclose(point, rows(data[f'{variant}_conv'][k]), atol=2e-7, rtol=0)
    np.testing.assert_allclose(buffer, buffers[k].T, atol=2e-8, rtol=0)


def go_unit(w):
  norm = jnp.linalg.norm(w.reshape(-1, w.shape[-1]), axis=0)
  return w / (norm + 1e-8), norm


def transport(y_new, b):
  """(T1): ‖b‖ P(b)/‖P(b)‖ at the new point, computed independently of the library."""
  cols_y, cols_b = y_new.reshape(-1, y_new.shape[-1]), b.reshape(-1, b.shape[-1])
  projected = cols_b - jnp.sum(cols_y * cols_b, axis=0) * cols_y
  p_norm = jnp.linalg.norm(projected, axis=0)
  scale = jnp.where(
    p_norm > 0, jnp.linalg.norm(cols_b, axis=0) / jnp.where(p_norm > 0, p_norm, 1), 0
  )
  return (projected * scale).reshape(b.shape)
