"""The library reproduces the original SGDG/AdamG trajectories (tests/data/golden) to 1e-6.

Three routes, each over all six golden runs, in float32: the public aliases; the README's chain
(the orthogonality term and a manifold step inside a plain ``optax.partition``, with Optax's own
Nesterov SGD); and the same with the projection and clipping done by the standalone transforms
before the step. Parameters are compared at every step, and so are the buffers: the Euclidean
momentum as stored, the manifold buffers transported to the current point (decoded from the
stored buffer and its per-point basis).
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


def manifold_step(name: str, hp: dict, grad_clip):
  if name == 'sgdg':
    return go.grassmann_sgd(hp['grassmann_learning_rate'], hp['momentum'], grad_clip=grad_clip)
  return go.grassmann_adam(hp['grassmann_learning_rate'], hp['momentum'], grad_clip=grad_clip)


def _partition(manifold, hp):
  euclidean = optax.chain(
    optax.add_decayed_weights(hp['weight_decay'], mask={'conv': False, 'bias': False, 'fc': True}),
    optax.sgd(hp['learning_rate'], momentum=hp['momentum'], nesterov=True),
  )
  return optax.partition({'grassmann': manifold, 'euclidean': euclidean}, golden.LABELS)


def readme_chain(name: str, hp: dict) -> optax.GradientTransformation:
  """SGD-G / Adam-G assembled from the public transforms, as the README shows."""
  manifold = optax.chain(
    go.add_orthogonality_gradient(hp['omega']), manifold_step(name, hp, hp['grad_clip'])
  )
  return _partition(manifold, hp)


def pieces_chain(name: str, hp: dict) -> optax.GradientTransformation:
  """The same, with projection and clipping as transforms of their own before the step."""
  manifold = optax.chain(
    go.add_orthogonality_gradient(hp['omega']),
    go.project_to_tangent(),
    go.grassmann_clip(hp['grad_clip']),
    manifold_step(name, hp, None),
  )
  return _partition(manifold, hp)


def alias(name: str, hp: dict) -> optax.GradientTransformation:
  factory = go.sgdg if name == 'sgdg' else go.adamg
  return factory(**hp, param_labels=golden.LABELS)


ROUTES = {'alias': alias, 'chain': readme_chain, 'pieces': pieces_chain}


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


def manifold_buffers(name: str, state, params) -> tuple[jax.Array, jax.Array | None]:
  """The manifold buffer transported to the current point (gradient units), and Adam-G's ``v``."""
  cls = go.GrassmannSgdState if name == 'sgdg' else go.GrassmannAdamState
  (step,) = _states_of(state, cls)
  buffer = step.trace['conv'] if name == 'sgdg' else step.mu['conv']
  basis = jax.tree.map(lambda tree: tree['conv'], step.basis, is_leaf=lambda x: isinstance(x, dict))
  transported = basis.on_buffer * buffer + basis.on_point * params['conv']
  return transported, None if name == 'sgdg' else step.nu['conv']


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
    buffer, v = manifold_buffers(name, state, params)
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
