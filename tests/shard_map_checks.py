"""Both aliases inside ``jax.shard_map`` on a 2 x 4 mesh of fake CPU devices, against one device.

Run by tests/test_sharding.py in a process of its own, because the device count is fixed when
JAX starts (the suite's other tests run on two devices). Prints one JSON line: for each
optimizer and each way of splitting the manifold leaf, the largest difference from the unsharded
run after 20 steps.

The 20 steps of every run are a ``lax.scan``, and all ten runs (two optimizers, each unsharded
and split four ways) are one jitted program: XLA compiles once, instead of once per run and per
operation of the unsharded runs.
"""

import functools
import json
import os

# The test passes on the suite's other XLA flags (such as its optimisation level), not its
# device count.
os.environ['XLA_FLAGS'] = ' '.join(
  [os.environ.get('XLA_FLAGS', ''), '--xla_force_host_platform_device_count=8']
).strip()
os.environ['JAX_PLATFORMS'] = 'cpu'

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import grassmann_optax as go  # noqa: E402

STEPS = 20
SPLITS = {
  'columns': P(None, 'y'),
  'rows': P('y', None),
  'rows and columns': P('x', 'y'),
  'rows over both axes': P(('x', 'y'), None),
}
RATES = {'sgdg': 0.2, 'adamg': 0.05}


def state_specs(state, spec):
  """The state's specs: buffers as the leaf, per-point values as its points, the rest whole."""

  def one(path, x):
    key = jax.tree_util.keystr(path)
    if 'grassmann' in key and 'per_point' in key:  # (values, points)
      return P(None, spec[1])
    if x.ndim == 2:
      return spec
    if x.ndim == 1 and x.shape[0] == 32 and 'grassmann' in key:
      return P(spec[1])
    return P()

  return jax.tree_util.tree_map_with_path(one, state)


def train(tx, params, grads, mesh=None, spec=None):
  """``params`` after one step of ``tx`` per gradient of ``grads`` (stacked), from ``tx.init``.

  With a mesh, each step runs inside ``jax.shard_map``: the manifold leaf split as ``spec``.
  """

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  if mesh is not None:
    specs = {'w': spec, 'b': P()}
    state_spec = state_specs(state, spec)
    step = jax.shard_map(
      step, mesh=mesh, in_specs=(specs, state_spec, specs), out_specs=(specs, state_spec)
    )
  (params, _), _ = jax.lax.scan(lambda carry, g: (step(*carry, g), None), (params, state), grads)
  return params


def main():
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ('x', 'y'))
  labels = {'w': 'grassmann', 'b': 'euclidean'}

  @jax.jit
  def differences():
    params = {'w': go.unit_initializer()(jax.random.key(0), (64, 32)), 'b': jnp.zeros(32)}
    keys = jax.random.split(jax.random.key(1), STEPS)
    grads = jax.vmap(lambda k: jax.tree.map(lambda p: jax.random.normal(k, p.shape), params))(keys)
    out = {}
    for name, rate in RATES.items():
      make = functools.partial(getattr(go, name), 0.01, rate, omega=0.1, param_labels=labels)
      reference = train(make(), params, grads)
      for split, spec in SPLITS.items():
        tx = make(mesh_axes={'w': spec, 'b': P()})
        got = train(tx, params, grads, mesh, spec)
        out[f'{name}, {split}'] = jnp.abs(got['w'] - reference['w']).max()
    return out

  print(json.dumps({case: float(d) for case, d in differences().items()}))


if __name__ == '__main__':
  main()
