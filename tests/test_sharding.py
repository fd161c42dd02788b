"""Leaves split across devices: ``shard_map`` with ``mesh_axes``, and ``jit`` over sharded leaves.

The two-device tests run in the suite's process (conftest.py gives JAX two fake CPU devices);
the 2 x 4 mesh runs in a process of its own (tests/shard_map_checks.py).
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import grassmann_optax as go

ROOT = Path(__file__).resolve().parent.parent
LABELS = {'w': 'grassmann', 'b': 'euclidean'}


@pytest.fixture(scope='module')
def mesh():
  assert jax.device_count() >= 2, 'conftest.py must start JAX with 2 fake CPU devices'
  return Mesh(np.array(jax.devices()[:2]), ('model',))


def params_and_grads(n=48, p=24):
  params = {'w': go.unit_initializer()(jax.random.key(0), (n, p)), 'b': jnp.zeros(p)}
  grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape), params)
  return params, grads


def test_both_aliases_inside_shard_map_equal_one_device_on_a_2_by_4_mesh():
  # The process sets its own device count, and keeps the suite's other XLA flags.
  flags = re.sub(r'--xla_force_host_platform_device_count=\S*', '', os.environ.get('XLA_FLAGS', ''))
  env = {**os.environ, 'PYTHONPATH': str(ROOT), 'XLA_FLAGS': flags.strip()}
  result = subprocess.run(
    [sys.executable, '-m', 'tests.shard_map_checks'],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  differences = json.loads(result.stdout.strip().splitlines()[-1])
  assert len(differences) == 12
  for case, difference in differences.items():
    assert difference <= 1e-5, (case, difference)


@pytest.mark.parametrize('name', ['sgdg', 'adamg'])
def test_a_split_leaf_without_mesh_axes_is_refused_naming_the_argument(mesh, name):
  params, grads = params_and_grads()
  tx = getattr(go, name)(0.01, 0.1, param_labels=LABELS)
  state = tx.init(params)
  specs = {'w': P('model', None), 'b': P()}
  state_specs = jax.tree.map(lambda x: P('model', None) if x.shape == (48, 24) else P(), state)

  def step(params, state, grads):
    return tx.update(grads, state, params)

  sharded = jax.shard_map(
    step, mesh=mesh, in_specs=(specs, state_specs, specs), out_specs=(specs, state_specs)
  )
  with pytest.raises(ValueError, match=r"'w'.*mesh axes \['model'\].*mesh_axes="):
    sharded(params, state, grads)


@pytest.mark.parametrize('spec', [P('model', None), P(None, 'model')], ids=['rows', 'columns'])
def test_jit_over_a_sharded_leaf_all_reduces_a_gram_and_gathers_no_leaf(mesh, spec):
  params, grads = params_and_grads()
  sharding = {'w': NamedSharding(mesh, spec), 'b': NamedSharding(mesh, P())}
  params_s, grads_s = jax.device_put(params, sharding), jax.device_put(grads, sharding)
  tx = go.sgdg(0.01, 0.2, omega=0.1, param_labels=LABELS)
  state = jax.jit(tx.init)(params_s)
  step = jax.jit(lambda p, s, g: tx.update(g, s, p))
  text = step.lower(params_s, state, grads_s).compile().as_text()
  gathered = re.findall(r'= f32\[([\d,]*)\][^ ]* all-gather\(', text)
  reduced = re.findall(r'= f32\[([\d,]*)\][^ ]* all-reduce\(', text)
  assert gathered == [], gathered
  gram = '1,24,24' if spec == P('model', None) else '1,48,48'
  assert gram in reduced, reduced
  sharded, _ = step(params_s, state, grads_s)
  expected, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(sharded['w'], expected['w'], atol=1e-6)


@pytest.mark.parametrize('spec', [P('model', None), P(None, 'model')], ids=['rows', 'columns'])
def test_without_jax_private_layout_decoder_the_sharded_update_is_still_right(
  mesh, spec, monkeypatch
):
  """The sharding rule decodes an operand's layout with a private jax function; should a jax
  release move it, the operand is taken whole and the update is the same."""
  from jax._src import sharding_impls

  calls = []

  def moved(*args):
    calls.append(args)
    raise AttributeError('parse_flatten_op_sharding moved')

  monkeypatch.setattr(sharding_impls, 'parse_flatten_op_sharding', moved)
  # Compiled here, not found in the persistent compilation cache, so that the rule runs.
  cached = jax.config.jax_enable_compilation_cache
  jax.config.update('jax_enable_compilation_cache', False)
  try:
    params, grads = params_and_grads(40, 20)
    sharding = {'w': NamedSharding(mesh, spec), 'b': NamedSharding(mesh, P())}
    params_s, grads_s = jax.device_put(params, sharding), jax.device_put(grads, sharding)
    tx = go.sgdg(0.01, 0.2, omega=0.1, param_labels=LABELS)
    sharded, _ = jax.jit(lambda p, s, g: tx.update(g, s, p))(
      params_s, jax.jit(tx.init)(params_s), grads_s
    )
  finally:
    jax.config.update('jax_enable_compilation_cache', cached)
  assert calls, 'the sharding rule did not run'
  expected, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(sharded['w'], expected['w'], atol=1e-6)


@pytest.mark.parametrize(
  'spec', [P(None, None, 'model', None), P(None, None, None, 'model')], ids=['rows', 'columns']
)
def test_explicit_mesh_axes_give_the_auto_mesh_results_and_keep_each_layout(spec):
  """On a mesh with ``Explicit`` axes (``jax.make_mesh``'s default) the shardings are part of the
  types, and reshaping a split kernel into its points or taking its Gram is an error there; the
  transforms run such leaves as on an ``Auto`` mesh and hand every result back in its input's
  layout. From jax 0.11 on this also checks that the custom partitionings (the CPU kernel, the
  orthogonality term) trace their per-device work on an ``Auto`` view of the mesh
  (``sharding.on_auto_axes``): without it they fail to compile under ``jax.set_mesh`` here."""
  devices = np.array(jax.devices()[:2])
  explicit, auto = (
    Mesh(devices, ('model',), axis_types=(k,)) for k in (AxisType.Explicit, AxisType.Auto)
  )
  kernel = go.unit_initializer()(jax.random.key(0), (3, 3, 8, 16))
  params = {'w': kernel, 'b': jnp.zeros(16)}
  grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape), params)
  hyperball = lambda p: {'w': 'grassmann', 'b': 'euclidean'}
  optimizers = {
    'sgdg': go.sgdg(0.01, 0.2, param_labels=LABELS),
    'adamg': go.adamg(0.01, 0.05, radius='init', param_labels=LABELS),
    'chain': optax.partition(
      {
        'grassmann': optax.chain(
          go.add_orthogonality_gradient(0.1), go.grassmann_adam(0.05, grad_clip=0.1)
        ),
        'euclidean': optax.sgd(0.05, 0.9, nesterov=True),
      },
      LABELS,
    ),
    'adamh': go.adamh(1e-3, 0.02, param_labels=hyperball),
    'muonh': go.muonh(1e-3, 0.02, param_labels=hyperball),
  }
  results = {}
  for mesh in (explicit, auto):
    layout = {'w': NamedSharding(mesh, spec), 'b': NamedSharding(mesh, P())}
    with jax.set_mesh(mesh):
      p, g = jax.device_put(params, layout), jax.device_put(grads, layout)
      for name, tx in optimizers.items():
        step = jax.jit(lambda p, s, g, tx=tx: tx.update(g, s, p))
        state = jax.jit(tx.init)(p)
        updates, state = step(p, state, g)
        updates, _ = step(p, state, g)
        assert updates['w'].sharding.spec == spec, name
        results[mesh.axis_types, name] = updates['w']
        if name == 'sgdg':
          # No leaf is gathered; per-point values may be, into the layout of the state given.
          text = step.lower(p, state, g).compile().as_text()
          gathered = re.findall(r'= f32\[([\d,]*)\][^ ]* all-gather\(', text)
          assert all(math.prod(map(int, shape.split(','))) <= 2 * 16 for shape in gathered), (
            gathered
          )
      penalty = jax.jit(jax.value_and_grad(lambda p: go.orthogonality_penalty(p, LABELS, 0.1)))
      results[mesh.axis_types, 'penalty'] = penalty(p)
      products = jax.jit(go.cpu_kernel.column_products)(p['w'], g['w'], g['w'])
      results[mesh.axis_types, 'products'] = products
  for name in (*optimizers, 'penalty', 'products'):
    chex.assert_trees_all_close(
      results[explicit.axis_types, name], results[auto.axis_types, name], atol=1e-6
    )


def test_the_standalone_pieces_take_mesh_axes_too(mesh):
  """Riemannian SGD from the pieces on a leaf split by rows equals one device."""
  params, grads = params_and_grads()
  w, g = params['w'], grads['w']

  def riemannian_sgd(**kw):
    return optax.chain(
      go.project_to_tangent(**kw),
      go.grassmann_clip(0.1, **kw),
      optax.scale_by_learning_rate(0.5),
      go.exp_map_update(**kw),
    )

  plain = riemannian_sgd()
  expected, _ = jax.jit(plain.update)(g, plain.init(w), w)
  tx = riemannian_sgd(mesh_axes=P('model', None))
  split = jax.shard_map(
    lambda g, w: tx.update(g, tx.init(w), w)[0],
    mesh=mesh,
    in_specs=(P('model', None),) * 2,
    out_specs=P('model', None),
  )
  np.testing.assert_allclose(jax.jit(split)(g, w), expected, atol=1e-6)
  back = jax.shard_map(
    lambda w: go.project_params({'w': w}, {'w': 'grassmann'}, mesh_axes=P('model', None))['w'],
    mesh=mesh,
    in_specs=P('model', None),
    out_specs=P('model', None),
  )
  back = jax.jit(back)(3 * w)
  np.testing.assert_allclose(jnp.linalg.norm(back, axis=0), 1, rtol=1e-6)


def test_mesh_axes_that_are_no_partition_spec_are_refused():
  with pytest.raises(TypeError, match='mesh_axes'):
    go.adamg(0.01, 0.05, mesh_axes=3)
  with pytest.raises(TypeError, match=r"entry 'model' for 'w'"):
    go.grassmann_sgd(0.1, mesh_axes={'w': 'model'})


ROWS, COLUMNS, WHOLE = P('model', None), P(None, 'model'), P()


@pytest.mark.parametrize(
  'layouts',
  [[ROWS] * 4, [COLUMNS] * 4, [WHOLE] * 4, [ROWS, COLUMNS, WHOLE, COLUMNS, ROWS]],
  ids=['rows', 'columns', 'whole', 'mixed'],
)
def test_equal_small_leaves_inside_shard_map_step_as_under_jit(mesh, layouts):
  """Equal small leaves are stacked for the step and split again by the CPU kernel; inside
  shard_map each device splits its own block, and the step is the one of one device. Leaves
  split differently (column- and row-parallel layers side by side, and a leaf of another shape)
  keep shard_map's check that each result varies only along its leaf's mesh axes."""
  shapes = [(48, 24)] * 4 + [(40, 8)]
  params = {
    f'w{i}': go.unit_initializer()(jax.random.key(i), shape)
    for i, shape in enumerate(shapes[: len(layouts)])
  }
  labels = jax.tree.map(lambda _: go.GRASSMANN, params)
  grads = jax.tree.map(lambda p: jnp.sin(5 * p), params)
  specs = dict(zip(params, layouts, strict=True))
  tx = go.adamg(0.01, 0.05, param_labels=labels, mesh_axes=specs)
  reference = go.adamg(0.01, 0.05, param_labels=labels)
  state = tx.init(params)

  def state_spec(path, leaf):
    names = [key.key for key in path if isinstance(key, jax.tree_util.DictKey)]
    spec = specs[names[-1]] if names and names[-1] in specs else None
    if spec is None:
      return P()
    if 'per_point' in jax.tree_util.keystr(path):  # (values, columns)
      return P(None, spec[1] if len(spec) > 1 else None)
    return spec

  def step(tx):
    def run(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    return run

  state_specs = jax.tree_util.tree_map_with_path(state_spec, state)
  sharded = jax.jit(
    jax.shard_map(
      step(tx), mesh=mesh, in_specs=(specs, state_specs, specs), out_specs=(specs, state_specs)
    )
  )
  got = sharded(params, state, grads)
  want = jax.jit(step(reference))(params, reference.init(params), grads)
  chex.assert_trees_all_close(got[0], want[0], atol=2e-6, rtol=0)
  chex.assert_trees_all_close(got[1].inner_states, want[1].inner_states, atol=2e-6, rtol=0)


@pytest.mark.parametrize('name', ['grassmann_sgd', 'grassmann_adam', 'add_orthogonality_gradient'])
def test_a_leaf_split_along_its_batch_beside_a_replicated_one_inside_shard_map(mesh, name):
  """A stack of layers split by layer (each device holds whole points of its layers) beside a
  replicated leaf of the same local shape: not stacked together (their results vary along
  different mesh axes), and the CPU kernel leaves the split one to XLA's reductions."""
  params = {
    'a': go.unit_initializer()(jax.random.key(0), (8, 16, 8)),
    'b': go.unit_initializer()(jax.random.key(1), (4, 16, 8)),
  }
  grads = jax.tree.map(lambda p: jnp.sin(5 * p), params)
  specs = {'a': P('model', None, None), 'b': P()}
  make = {
    'grassmann_sgd': lambda **k: go.grassmann_sgd(0.1, 0.9, point_axes=(-2,), **k),
    'grassmann_adam': lambda **k: go.grassmann_adam(0.1, point_axes=(-2,), **k),
    'add_orthogonality_gradient': lambda **k: go.add_orthogonality_gradient(
      0.1, point_axes=(-2,), **k
    ),
  }[name]
  tx, reference = make(mesh_axes=specs), make()

  def update(params, grads):
    return tx.update(grads, tx.init(params), params)[0]

  got = jax.jit(jax.shard_map(update, mesh=mesh, in_specs=(specs, specs), out_specs=specs))(
    params, grads
  )
  want = reference.update(grads, reference.init(params), params)[0]
  chex.assert_trees_all_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize('name', ['grassmann_sgd', 'grassmann_adam', 'exp_map_update'])
def test_radius_init_inside_shard_map_is_the_norm_of_the_whole_point(mesh, name):
  """With rows split across devices each device holds half of every column: the radius kept by
  ``init`` is the norm of the whole column, the same on both devices."""
  spec = P('model', None)
  w = 3 * jax.random.normal(jax.random.key(0), (48, 24))
  args = () if name == 'exp_map_update' else (0.1,)
  tx = getattr(go, name)(*args, radius='init', mesh_axes=spec)
  radius = jax.shard_map(lambda w: tx.init(w).radius, mesh=mesh, in_specs=spec, out_specs=P())(w)
  np.testing.assert_allclose(radius, jnp.linalg.norm(w, axis=0), rtol=1e-6)


def test_mesh_axes_of_two_leaves_of_one_name_are_refused_at_init():
  """mesh_axes are matched to the params by name, as labels and point axes are, and are checked
  when the state is made, before any step."""
  kernel = go.unit_initializer()(jax.random.key(0), (48, 24))
  for tx in (
    go.grassmann_adam(0.1, mesh_axes={'a/b': P(), 'a': {'b': P('model', None)}}),
    go.adamg(
      0.1, 0.1, param_labels={'a': {'b': 'grassmann'}}, mesh_axes={'a/b': P(), 'a': {'b': P()}}
    ),
  ):
    with pytest.raises(ValueError, match=r"mesh_axes: the leaves at .* have the same name 'a/b'"):
      tx.init({'a': {'b': kernel}})
