"""Both aliases inside ``jax.shard_map`` on a 2 x 4 mesh of fake CPU devices, against one device.

Run by tests/test_sharding.py in a process of its own, because the device count is fixed when
JAX starts (the suite's other tests run on two devices). Prints one JSON line: for each
optimizer and each way of splitting the manifold leaf, the largest difference from the unsharded
run after 20 steps.
"""

import functools
import json
import os

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
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


def state_specs(state, spec):
  """The state's specs: buffers as the leaf, per-point values as its points, the rest whole."""

  def one(path, x):
    if x.ndim == 2:
      return spec
    if x.ndim == 1 and x.shape[0] == 32 and 'grassmann' in jax.tree_util.keystr(path):
      return P(spec[1])
    return P()

  return jax.tree_util.tree_map_with_path(one, state)


def main():
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ('x', 'y'))
  params = {'w': go.unit_initializer()(jax.random.key(0), (64, 32)), 'b': jnp.zeros(32)}
  labels = {'w': 'grassmann', 'b': 'euclidean'}
  keys = jax.random.split(jax.random.key(1), STEPS)
  grads = [jax.tree.map(lambda p, k=k: jax.random.normal(k, p.shape), params) for k in keys]
  rates = {'sgdg': 0.2, 'adamg': 0.05}
  out = {}
  for name, rate in rates.items():
    make = functools.partial(getattr(go, name), 0.01, rate, omega=0.1, param_labels=labels)
    plain = make()
    reference, state = params, plain.init(params)
    for g in grads:
      updates, state = plain.update(g, state, reference)
      reference = optax.apply_updates(reference, updates)
    for split, spec in SPLITS.items():
      specs = {'w': spec, 'b': P()}
      tx = make(mesh_axes=specs)
      state = tx.init(params)
      state_spec = state_specs(state, spec)

      def step(params, state, grads, tx=tx):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

      sharded = jax.jit(
        jax.shard_map(
          step, mesh=mesh, in_specs=(specs, state_spec, specs), out_specs=(specs, state_spec)
        )
      )
      got = params
      for g in grads:
        got, state = sharded(got, state, g)
      out[f'{name}, {split}'] = float(jnp.abs(got['w'] - reference['w']).max())
  print(json.dumps(out))


if __name__ == '__main__':
  main()
