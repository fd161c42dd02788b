"""The aliases under ``jax.pmap`` and under ``jit`` with sharded params, on 2 fake CPU devices.

conftest.py starts JAX with ``--xla_force_host_platform_device_count=2``. Each result is compared
with the same update on one device; the only differences are reordered float32 sums.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import grassmann_optax as go

OPTIMIZERS = {'sgdg': lambda: go.sgdg(0.01, 0.2), 'adamg': lambda: go.adamg(0.01, 0.05)}


@pytest.fixture(scope='module', autouse=True)
def two_devices():
  assert jax.device_count() >= 2, 'conftest.py must start JAX with 2 fake CPU devices'


def problem():
  keys = jax.random.split(jax.random.key(0), 4)
  params = {
    'conv': go.unit_initializer()(keys[0], (3, 3, 8, 16)),
    'dense': jax.random.normal(keys[1], (16, 4)),
    'bias': jnp.zeros(4),
  }
  # One gradient per device; their mean is what a data-parallel step applies.
  grads = jax.tree.map(lambda p: jax.random.normal(keys[2], (2, *p.shape)), params)
  return params, grads


def reference(tx, params, grads, steps=3):
  state = tx.init(params)
  mean = jax.tree.map(lambda g: g.mean(0), grads)
  for _ in range(steps):
    updates, state = jax.jit(tx.update)(mean, state, params)
    params = optax.apply_updates(params, updates)
  return params


@pytest.mark.parametrize('name', sorted(OPTIMIZERS))
def test_pmap_replicated_update_matches_one_device(name):
  tx = OPTIMIZERS[name]()
  params, grads = problem()
  devices = jax.local_devices()[:2]

  step = jax.pmap(_data_parallel_step(tx), axis_name='batch', devices=devices)
  replicate = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (2, *x.shape)), tree)
  replicated, state = replicate(params), replicate(tx.init(params))
  for _ in range(3):
    replicated, state = step(replicated, state, grads)
  expected = reference(tx, params, grads)
  for key in params:
    np.testing.assert_allclose(replicated[key][0], replicated[key][1], rtol=0, atol=0)
    np.testing.assert_allclose(replicated[key][0], expected[key], atol=1e-6)


def _data_parallel_step(tx):
  def step(params, state, grads):
    grads = jax.lax.pmean(grads, axis_name='batch')
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


@pytest.mark.parametrize('spec', [P(None, None, None, 'model'), P(None, None, 'model', None)])
@pytest.mark.parametrize('name', sorted(OPTIMIZERS))
def test_jit_with_sharded_params_matches_one_device(name, spec):
  """Columns split across devices (local norms) or rows split (all-reduced norms)."""
  tx = OPTIMIZERS[name]()
  params, grads = problem()
  mesh = Mesh(np.array(jax.local_devices()[:2]), ('model',))
  shardings = {
    'conv': NamedSharding(mesh, spec),
    'dense': NamedSharding(mesh, P(None, 'model')),
    'bias': NamedSharding(mesh, P()),
  }
  mean = jax.tree.map(lambda g: g.mean(0), grads)
  sharded = jax.device_put(params, shardings)
  state = tx.init(sharded)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(3):
    sharded, state = step(sharded, state, jax.device_put(mean, shardings))
  assert sharded['conv'].sharding.is_equivalent_to(shardings['conv'], 4)
  expected = reference(tx, params, grads)
  for key in params:
    np.testing.assert_allclose(sharded[key], expected[key], atol=1e-6)
