"""Points on any axes: rows, heads, stacked layers and whole leaves, and a fixed radius.

Every layout is held to the per-column maths: the same points laid out as the columns of a
matrix give the same trajectory.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import grassmann_optax as go
from tests import reference

STEPS = 6


def chain(name, lr, *, point_axes, omega=0.1, radius=None):
  """The README's chain with point axes: the orthogonality term, then the manifold step."""
  if name == 'sgdg':
    step = go.grassmann_sgd(lr, 0.9, point_axes=point_axes, radius=radius)
  else:
    step = go.grassmann_adam(lr, point_axes=point_axes, radius=radius)
  return optax.chain(go.add_orthogonality_gradient(omega, point_axes=point_axes), step)


def pieces(name, lr, *, point_axes, omega=0.1, radius=None):
  """The same with the projection and clipping as transforms of their own."""
  if name == 'sgdg':
    step = go.grassmann_sgd(lr, 0.9, grad_clip=None, point_axes=point_axes, radius=radius)
  else:
    step = go.grassmann_adam(lr, grad_clip=None, point_axes=point_axes, radius=radius)
  return optax.chain(
    go.add_orthogonality_gradient(omega, point_axes=point_axes),
    go.project_to_tangent(point_axes=point_axes),
    go.grassmann_clip(0.1, point_axes=point_axes),
    step,
  )


ROUTES = {'chain': chain, 'pieces': pieces}
LR = {'sgdg': 0.2, 'adamg': 0.05}


def trajectory(tx, w, grads):
  state = tx.init(w)
  step = jax.jit(tx.update)
  out = []
  for g in grads:
    updates, state = step(g, state, w)
    w = optax.apply_updates(w, updates)
    out.append(w)
  return out, state


def random_gradients(shape, seed=1):
  keys = jax.random.split(jax.random.key(seed), STEPS)
  return [10.0 ** (k % 3 - 2) * jax.random.normal(key, shape) for k, key in enumerate(keys)]


def unit_points(shape, point_axes, seed=0):
  w = jax.random.normal(jax.random.key(seed), shape)
  return w / jnp.sqrt(jnp.sum(w**2, axis=point_axes, keepdims=True))


# The same points as columns: (layout, to_columns) pairs.
LAYOUTS = {
  'rows of a dense kernel': ((5, 12), (1,), lambda x: x.T),
  'heads of (embed, heads, head_dim)': (
    (6, 3, 4),
    (0, 2),
    lambda x: jnp.transpose(x, (0, 2, 1)).reshape(24, 3),
  ),
  'whole leaf': ((4, 3, 2), (0, 1, 2), lambda x: x.reshape(24, 1)),
}


@pytest.mark.parametrize('layout', sorted(LAYOUTS))
@pytest.mark.parametrize('route', sorted(ROUTES))
@pytest.mark.parametrize('name', ['sgdg', 'adamg'])
def test_a_layout_follows_its_points_laid_out_as_columns(name, route, layout):
  shape, axes, to_columns = LAYOUTS[layout]
  w = unit_points(shape, axes)
  grads = random_gradients(shape)
  make = ROUTES[route]
  ours, state = trajectory(make(name, LR[name], point_axes=axes), w, grads)
  columns, _ = trajectory(
    make(name, LR[name], point_axes=None), to_columns(w), [to_columns(g) for g in grads]
  )
  for a, b in zip(ours, columns, strict=True):
    np.testing.assert_allclose(to_columns(a), b, atol=2e-6)
  if name == 'adamg':
    nu = state[-1].nu
    assert nu.shape == tuple(n for i, n in enumerate(shape) if i not in axes)


@pytest.mark.parametrize('route', sorted(ROUTES))
@pytest.mark.parametrize('name', ['sgdg', 'adamg'])
def test_a_stack_of_layers_follows_each_layer_alone(name, route):
  """(layers, in, out) with point axes (1,): the orthogonality term couples no two layers."""
  shape = (3, 10, 4)
  w = unit_points(shape, (1,))
  grads = random_gradients(shape)
  make = ROUTES[route]
  stacked, _ = trajectory(make(name, LR[name], point_axes=(1,)), w, grads)
  for layer in range(shape[0]):
    alone, _ = trajectory(
      make(name, LR[name], point_axes=None), w[layer], [g[layer] for g in grads]
    )
    for a, b in zip(stacked, alone, strict=True):
      np.testing.assert_allclose(a[layer], b, atol=2e-6)
  penalty = go.orthogonality_penalty({'w': w}, {'w': 'grassmann'}, 0.1, point_axes=(1,))
  separate = sum(
    go.orthogonality_penalty({'w': w[i]}, {'w': 'grassmann'}, 0.1) for i in range(shape[0])
  )
  np.testing.assert_allclose(penalty, separate, rtol=1e-6)


@pytest.mark.parametrize('name', ['sgdg', 'adamg'])
def test_rows_follow_the_original_maths_for_large_steps(name):
  """Per-row points against tests/reference.py, in float64, with steps beyond π/2."""
  with jax.enable_x64(True):
    rs = np.random.RandomState(0)
    w0 = rs.randn(7, 20)
    w0 /= np.linalg.norm(w0, axis=1, keepdims=True)
    grads = [rs.randn(7, 20) * 10 ** rs.uniform(-1, 1, size=(7, 1)) for _ in range(10)]
    lr = 2.0 if name == 'adamg' else 1.0
    if name == 'sgdg':
      tx = go.grassmann_sgd(lr, grad_clip=None, point_axes=1)
      expected = [
        o[0] for o in reference.sgdg_trajectory(w0.T, [g.T for g in grads], lr, grad_clip=None)
      ]
    else:
      tx = go.grassmann_adam(lr, grad_clip=None, point_axes=-1)
      expected = [
        o[0] for o in reference.adamg_trajectory(w0.T, [g.T for g in grads], lr, grad_clip=None)
      ]
    got, _ = trajectory(tx, jnp.asarray(w0), [jnp.asarray(g) for g in grads])
    for a, b in zip(got, expected, strict=True):
      np.testing.assert_allclose(np.asarray(a).T, b, atol=1e-10)


@pytest.mark.parametrize('route', sorted(ROUTES))
@pytest.mark.parametrize('name', ['sgdg', 'adamg'])
def test_a_radius_keeps_every_point_at_that_norm(name, route):
  shape, axes = (5, 12), (1,)
  w = unit_points(shape, axes)
  grads = random_gradients(shape)
  make = ROUTES[route]
  unit, _ = trajectory(make(name, LR[name], point_axes=axes), w, grads)
  scaled, _ = trajectory(make(name, LR[name], point_axes=axes, radius=3.0), 3.0 * w, grads)
  for a, b in zip(unit, scaled, strict=True):
    np.testing.assert_allclose(jnp.linalg.norm(b, axis=1), 3.0, rtol=1e-6)
    np.testing.assert_allclose(b / 3.0, a, atol=2e-6)
  # 'init': each point keeps the norm it had at init.
  norms = jnp.arange(1.0, 6.0)[:, None]
  kept, state = trajectory(make(name, LR[name], point_axes=axes, radius='init'), norms * w, grads)
  for a, b in zip(unit, kept, strict=True):
    np.testing.assert_allclose(b / norms, a, atol=2e-6)
  radius = state[-1].radius
  np.testing.assert_allclose(radius, norms[:, 0], rtol=1e-6)


def test_point_axes_as_a_pytree_a_callable_and_through_the_aliases():
  params = {
    'conv': unit_points((3, 3, 4, 8), (0, 1, 2)),
    'dense': unit_points((6, 16), (1,)),
    'bias': jnp.zeros(6),
  }
  labels = {'conv': 'grassmann', 'dense': 'grassmann', 'bias': 'euclidean'}
  grads = jax.tree.map(lambda p: 0.1 * jnp.cos(jnp.arange(p.size).reshape(p.shape)), params)
  tree = {'dense': (1,)}  # the conv takes the default, the bias is not on the manifold
  as_callable = lambda p: {'dense': (1,)} if 'dense' in p else {}
  results = []
  for point_axes in (tree, as_callable):
    tx = go.adamg(0.01, 0.05, param_labels=labels, point_axes=point_axes)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(jnp.linalg.norm(new['dense'], axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(jnp.linalg.norm(new['conv'].reshape(-1, 8), axis=0), 1, atol=1e-6)
    results.append(new)
  jax.tree.map(np.testing.assert_array_equal, *results)
  with pytest.raises(ValueError, match="'dens'"):
    go.adamg(0.01, 0.05, param_labels=labels, point_axes={'dens': (1,)}).init(params)


@pytest.mark.parametrize(
  'point_axes, message',
  [((2,), 'out of range'), ((), 'empty'), ((0, -2), 'twice')],
)
def test_bad_point_axes_are_refused_with_the_leaf_named(point_axes, message):
  with pytest.raises(ValueError, match=message):
    go.grassmann_sgd(0.1, point_axes=point_axes).init({'w': jnp.ones((4, 3))})


def test_the_undercomplete_rule_counts_points_per_group():
  params = {'w': jnp.ones((6, 8))}
  # Rows: 6 points of 8 elements: fine. Columns: 8 points of 6 elements: refused.
  go.sgdg(0.1, 0.1, param_labels={'w': 'grassmann'}, point_axes=(1,)).init(params)
  with pytest.raises(ValueError, match='fan-in 6 < 8'):
    go.sgdg(0.1, 0.1, param_labels={'w': 'grassmann'}).init(params)
  with pytest.raises(ValueError, match='point size 8 < 12'):
    go.sgdg(0.1, 0.1, param_labels={'w': 'grassmann'}, point_axes=(1,)).init(
      {'w': jnp.ones((12, 8))}
    )
  # Without the orthogonality term, nothing asks for orthogonal points: an embedding table's
  # rows (more rows than elements per row) are fine.
  go.adamg(0.1, 0.1, omega=0, param_labels={'w': 'grassmann'}, point_axes=(1,)).init(
    {'w': jnp.ones((12, 8))}
  )


class NormalisedNet(nn.Module):
  """One leaf per kind of scale invariance, and one leaf with none."""

  @nn.compact
  def __call__(self, x):  # x: (batch, 8)
    columns = nn.BatchNorm(use_running_average=False)(nn.Dense(6, use_bias=False, name='bn')(x))
    whole = nn.LayerNorm(use_scale=False, use_bias=False)(
      nn.Dense(10, use_bias=False, name='ln')(columns)
    )
    heads = nn.DenseGeneral((3, 4), use_bias=False, name='qk')(whole)  # (batch, heads, head_dim)
    heads = heads * jax.lax.rsqrt(jnp.mean(heads**2, axis=-1, keepdims=True) + 1e-6)  # QK-norm
    rows = self.param('rows', nn.initializers.normal(1.0), (5, 12))  # normalised rows
    rows = rows / jnp.linalg.norm(rows, axis=1, keepdims=True)
    mixed = heads.reshape(x.shape[0], 12) @ rows.T
    return nn.Dense(3, name='head')(jnp.tanh(mixed))


def test_find_scale_invariant_finds_columns_rows_heads_and_whole_leaves():
  model = NormalisedNet()
  x = jax.random.normal(jax.random.key(0), (64, 8))
  variables = jax.jit(model.init)(jax.random.key(1), x)  # one program, not one per operation
  y = jax.random.randint(jax.random.key(2), (64,), 0, 3)

  def loss(params):
    logits, _ = model.apply(
      {'params': params, 'batch_stats': variables['batch_stats']}, x, mutable=['batch_stats']
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  found = go.find_scale_invariant(loss, variables['params'], undercomplete_only=False)
  labels, axes = found.param_labels, found.point_axes
  assert labels['bn']['kernel'] == 'grassmann' and axes['bn']['kernel'] is None
  assert labels['ln']['kernel'] == 'grassmann' and axes['ln']['kernel'] == (0, 1)
  assert labels['qk']['kernel'] == 'grassmann' and axes['qk']['kernel'] == (0, 2)
  assert labels['rows'] == 'grassmann' and axes['rows'] == (1,)
  assert labels['head']['kernel'] == 'euclidean' and labels['head']['bias'] == 'euclidean'
  # What it found goes into the aliases as it is.
  tx = go.adamg(0.01, 0.05, omega=0.0, **found._asdict())
  params = variables['params']
  grads = jax.jit(jax.grad(loss))(params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
  columns_only = go.find_scale_invariant(loss, variables['params'], groupings='columns')
  assert columns_only.param_labels['qk']['kernel'] == 'euclidean'


def test_find_scale_invariant_takes_losses_that_need_concrete_values():
  """The gradient is compiled once for all draws; a loss that branches in Python on an array
  argument, or takes a flag, still gets its answer (op by op, for the first)."""
  w = go.unit_initializer()(jax.random.key(0), (6, 3))
  x = jax.random.normal(jax.random.key(1), (5, 6))

  def normalised(params, x, *, flag):
    h = x @ params['w']
    h = h / jnp.linalg.norm(params['w'], axis=0)
    return jnp.sum(jnp.sin(h)) + (params['b'] ** 2).sum() if flag else 0.0

  def branching(params, x):
    if float(x.sum()) > -1e9:  # a Python branch on an array argument
      return normalised(params, x, flag=True)
    return 0.0

  params = {'w': w, 'b': jnp.ones(3)}
  flagged = lambda p, x, flag: normalised(p, x, flag=flag)
  for loss_fn, args in ((flagged, (x, True)), (branching, (x,))):
    found = go.find_scale_invariant(loss_fn, params, *args)
    assert found.param_labels == {'w': go.GRASSMANN, 'b': go.EUCLIDEAN}
