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

  out = {case: float(d) for case, d in differences().items()}
  out.update(jit_differences())
  print(json.dumps(out))


def jit_differences():
  """``jit`` over leaves split four ways (``--parallel=fsdp`` of the training program): two equal
  small kernels split by rows, stacked by the optimizers, beside one split by columns. The
  partitioner used to give the CPU kernel's products of the stack a layout that splits the mesh
  axis over two of their axes, and the step failed to compile."""
  from jax.sharding import NamedSharding  # noqa: PLC0415

  mesh = Mesh(np.array(jax.devices()[:4]), ('data',))
  shapes = {'k0': (3, 3, 16, 16), 'k1': (3, 3, 16, 16), 'k2': (3, 3, 16, 32)}
  specs = {
    'k0': P(None, None, 'data'),
    'k1': P(None, None, 'data'),
    'k2': P(None, None, None, 'data'),
  }
  params = {
    k: go.unit_initializer()(jax.random.key(i), s) for i, (k, s) in enumerate(shapes.items())
  }
  grads = [
    jax.tree.map(lambda p, i=i: jax.random.normal(jax.random.key(i), p.shape), params)
    for i in range(3)
  ]
  labels = {k: 'grassmann' for k in shapes}
  split = lambda tree: {
    k: jax.device_put(x, NamedSharding(mesh, specs[k])) for k, x in tree.items()
  }
  out = {}
  for name, tx in {
    'sgdg': go.sgdg(0.01, 0.2, param_labels=labels),
    'adamg': go.adamg(0.01, 0.05, param_labels=labels),
    'adamh': go.adamh(
      1e-3,
      0.05,
      param_labels={**labels, 'k2': 'euclidean'},
      point_axes={'k0': (2, 3), 'k1': (2, 3), 'k2': None},
    ),
  }.items():

    @jax.jit
    def step(params, state, g, tx=tx):
      updates, state = tx.update(g, state, params)
      return optax.apply_updates(params, updates), state

    results = []
    for put in (lambda tree: tree, split):
      p, state = put(params), tx.init(put(params))
      for g in grads:
        p, state = step(p, state, put(g))
      results.append(p)
    out[f'{name}, jit over four devices'] = max(
      float(np.abs(np.asarray(results[0][k]) - np.asarray(results[1][k])).max()) for k in shapes
    )
  # The orthogonality term of a stack laid out with the mesh axis over two of its axes, a layout
  # no PartitionSpec says: its partitioner gathers it (jax's decoding raised before).
  from jax._src import sharding_impls  # noqa: PLC0415
  from jax._src.lib import xla_client  # noqa: PLC0415

  tiled = sharding_impls.GSPMDSharding(
    tuple(mesh.devices.flat), xla_client.HloSharding.iota_tile((2, 1, 2))
  )
  stack = go.unit_initializer()(jax.random.key(5), (2, 16, 8))
  term = go.add_orthogonality_gradient(0.1, point_axes=(-2,))
  gradient = lambda w: term.update(jnp.zeros_like(w), term.init(w), w)[0]
  constrained = jax.jit(
    lambda w: gradient(jax.lax.with_sharding_constraint(w, tiled)),
    out_shardings=NamedSharding(mesh, P()),
  )
  got = constrained(jax.device_put(stack, NamedSharding(mesh, P(None, None, 'data'))))
  out['orthogonality term, a layout over two axes'] = float(np.abs(got - gradient(stack)).max())
  return out


if __name__ == '__main__':
  main()
