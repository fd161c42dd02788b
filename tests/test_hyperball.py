"""AdamH and MuonH: the published step (``tests/hyperball_reference.py``), the geodesic variant,
the norm over long runs, devices, state size, Transformer labels and Optax wrappers."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import grassmann_optax as go
from grassmann_optax._src import checks
from tests import hyperball_reference as reference

LR = 0.05
CASES = {'matrix': (6, 4), 'stacked': (3, 5, 4), 'tall': (9, 3)}
FACTORIES = {'adamh': go.hyperball_adam, 'muonh': go.hyperball_muon}
RETRACTIONS = ('geodesic', 'normalize')


def run(tx, params, grads, **extra):
  """The params after each step, and the last state."""
  state, update, out = tx.init(params), jax.jit(tx.update), []
  for g in grads:
    updates, state = update(g, state, params, **extra)
    params = optax.apply_updates(params, updates)
    out.append(params)
  return out, state


def matrix_norms(w):
  return np.linalg.norm(np.asarray(w, np.float64), axis=(-2, -1))


def angle(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  across = a - b * np.vdot(a, b) / np.vdot(b, b)  # the part of a orthogonal to b
  return np.arctan2(np.linalg.norm(across) * np.linalg.norm(b), np.vdot(a, b))


def random_problem(shape, steps, seed=0, dtype=np.float64):
  rs = np.random.RandomState(seed)
  return rs.randn(*shape).astype(dtype), [rs.randn(*shape).astype(dtype) for _ in range(steps)]


# The published step.


@pytest.mark.parametrize('route', ['step', 'alias'])
@pytest.mark.parametrize('case', CASES)
@pytest.mark.parametrize('name', FACTORIES)
def test_normalize_is_the_published_step_in_float64(name, case, route):
  with jax.enable_x64(True):
    w, grads = random_problem(CASES[case], 20)
    expected = getattr(reference, name)(w, grads, LR)
    if route == 'step':
      tx = FACTORIES[name](LR, retraction='normalize')
      got, _ = run(tx, jnp.asarray(w), [jnp.asarray(g) for g in grads])
    else:
      tx = getattr(go, name)(1e-3, LR, param_labels={'w': 'grassmann'}, retraction='normalize')
      got, _ = run(tx, {'w': jnp.asarray(w)}, [{'w': jnp.asarray(g)} for g in grads])
      got = [p['w'] for p in got]
    assert got[-1].dtype == jnp.float64
    error = max(float(np.abs(np.asarray(a) - b).max()) for a, b in zip(got, expected, strict=True))
    assert error < 1e-6, error


def test_normalize_is_the_published_chain_of_optax_transforms():
  w, grads = random_problem((3, 8, 5), 10, dtype=np.float32)
  chains = {
    'adamh': optax.chain(
      optax.scale_by_adam(0.9, 0.95, 1e-8), go.hyperball_step(LR, retraction='normalize')
    ),
    'muonh': optax.chain(
      optax.trace(0.95, nesterov=True),
      go.scale_by_matrix_sign(5),
      go.hyperball_step(LR, retraction='normalize'),
    ),
  }
  for name, chain in chains.items():
    expected, _ = run(chain, w, grads)
    got, _ = run(FACTORIES[name](LR, retraction='normalize'), w, grads)
    np.testing.assert_allclose(got[-1], expected[-1], atol=2e-6, err_msg=name)


@pytest.mark.parametrize(
  'shape, axes, numbers',
  [
    ((16, 8), None, None),
    ((8, 16), None, None),
    ((3, 9, 5), None, (1, 2)),
    ((8, 2, 4), (0, 2), (0, 2)),  # one matrix per head of a DenseGeneral kernel
  ],
)
def test_matrix_sign_is_optax_contribs_newton_schulz(shape, axes, numbers):
  muon = pytest.importorskip('optax.contrib._muon')
  u = jax.random.normal(jax.random.key(0), shape)
  tx = go.scale_by_matrix_sign(point_axes=axes)
  got, _ = tx.update(u, tx.init(u))
  dimension_numbers = None
  if numbers is not None:
    dimension_numbers = muon.MuonDimensionNumbers(reduction_axis=numbers[0], output_axis=numbers[1])
  expected = muon.orthogonalize_via_newton_schulz(
    u, jnp.asarray(reference.NS), 5, 'frobenius', 1e-8, dimension_numbers
  )
  np.testing.assert_allclose(got, expected, atol=5e-6)


@pytest.mark.parametrize('shape', [(9, 4), (4, 9)])
def test_matrix_sign_is_the_reference_newton_schulz_in_float64(shape):
  u = np.random.RandomState(1).randn(*shape)
  with jax.enable_x64(True):
    tx = go.scale_by_matrix_sign()
    got, _ = tx.update(jnp.asarray(u), tx.init(u))
    assert got.dtype == jnp.float64
  np.testing.assert_allclose(got, reference.newton_schulz(u), atol=1e-12)


# The geodesic.


@pytest.mark.parametrize('shape', [(6, 4), (3, 5, 4)])
def test_a_geodesic_step_keeps_the_norm_and_turns_by_arctan_of_the_rate(shape):
  w, grads = random_problem(shape, 5, dtype=np.float32)
  for lr in (0.05, 0.3, 3.0):
    got, _ = run(go.hyperball_step(lr), w, grads)
    for before, after in zip([w, *got], got, strict=False):
      np.testing.assert_allclose(matrix_norms(after), matrix_norms(w), rtol=1e-6)
      for a, b in zip(before.reshape(-1, *shape[-2:]), after.reshape(-1, *shape[-2:]), strict=True):
        assert angle(a, b) == pytest.approx(np.arctan(lr), abs=2e-6)


@pytest.mark.parametrize('name', FACTORIES)
def test_every_geodesic_step_of_both_optimizers_turns_by_arctan_of_the_rate(name):
  w, grads = random_problem((3, 5, 4), 6, dtype=np.float32)
  got, _ = run(FACTORIES[name](0.2), w, grads)
  for before, after in zip([w, *got], got, strict=False):
    np.testing.assert_allclose(matrix_norms(after), matrix_norms(w), rtol=1e-6)
    for a, b in zip(before, after, strict=True):
      assert angle(a, b) == pytest.approx(np.arctan(0.2), abs=2e-6)


def tangent_to(w, *vectors):
  """``w`` made orthogonal to every vector (Gram–Schmidt), so that they are tangent at it."""
  basis = []
  for v in vectors:
    v = v - sum(np.vdot(v, b) * b for b in basis)
    basis.append(v / np.linalg.norm(v))
  return w - sum(np.vdot(w, b) * b for b in basis)


def test_both_retractions_agree_for_a_tangent_update():
  rs = np.random.RandomState(0)
  w = rs.randn(6, 4)
  # hyperball_step: any tangent update, several steps.
  ws = {r: w.astype(np.float32) for r in RETRACTIONS}
  for _ in range(4):
    u = rs.randn(6, 4)
    for r in RETRACTIONS:
      tx = go.hyperball_step(0.3, retraction=r)
      u_t = (u - np.vdot(u, ws[r]) / np.vdot(ws[r], ws[r]) * ws[r]).astype(np.float32)
      step, _ = tx.update(u_t, tx.init(ws[r]), ws[r])
      ws[r] = ws[r] + np.asarray(step)
  np.testing.assert_allclose(ws['geodesic'], ws['normalize'], atol=2e-6)
  # Adam from zero state: a gradient of equal magnitudes makes Adam's update tangent too.
  signs = np.sign(rs.randn(6, 4))
  w_adam = tangent_to(w, signs).astype(np.float32)
  # Muon from zero state: the gradient and its matrix sign both tangent.
  g = rs.randn(6, 4)
  w_muon = tangent_to(w, g, reference.newton_schulz(1.95 * g)).astype(np.float32)
  for name, w0, grad in (('adamh', w_adam, 0.3 * signs), ('muonh', w_muon, g)):
    grad = grad.astype(np.float32)
    points = {}
    for r in RETRACTIONS:
      tx = FACTORIES[name](0.3, retraction=r)
      update, _ = tx.update(grad, tx.init(w0), w0)
      points[r] = w0 + np.asarray(update)
    np.testing.assert_allclose(points['geodesic'], points['normalize'], atol=2e-6, err_msg=name)


@pytest.mark.parametrize('name', FACTORIES)
def test_the_transported_buffer_is_tangent_at_the_new_point_with_its_norm_kept(name):
  rs = np.random.RandomState(2)
  w = rs.randn(2, 6, 4)
  g = rs.randn(2, 6, 4)
  y = w / np.linalg.norm(w, axis=(1, 2), keepdims=True)
  h = g - np.sum(g * y, axis=(1, 2), keepdims=True) * y
  with jax.enable_x64(True):
    tx = FACTORIES[name](0.7)
    update, state = tx.update(jnp.asarray(g), tx.init(jnp.asarray(w)), jnp.asarray(w))
    new = w + np.asarray(update)
    buffer = np.asarray(state.mu if name == 'adamh' else state.trace)
  before = (1 - 0.9) * h if name == 'adamh' else h
  np.testing.assert_allclose(matrix_norms(buffer), matrix_norms(before), rtol=1e-12)
  cosines = np.sum(buffer * new, axis=(1, 2)) / (matrix_norms(buffer) * matrix_norms(new))
  np.testing.assert_allclose(cosines, 0, atol=1e-12)
  # The transport moved it: the component along the step turned with the point.
  assert float(np.abs(buffer - before).max()) > 1e-3


def norm_drift(factory, retraction, steps):
  """The largest relative drift of any point's norm over ``steps`` float32 steps."""
  w = jax.random.normal(jax.random.key(0), (2, 16, 8))
  radius = jnp.linalg.norm(w, axis=(1, 2))
  tx = factory(0.05, retraction=retraction)

  def step(carry, key):
    w, state, drift = carry
    updates, state = tx.update(jax.random.normal(key, w.shape), state, w)
    w = optax.apply_updates(w, updates)
    drift = jnp.maximum(drift, jnp.max(jnp.abs(jnp.linalg.norm(w, axis=(1, 2)) / radius - 1)))
    return (w, state, drift), None

  keys = jax.random.split(jax.random.key(1), steps)
  scan = jax.jit(lambda carry: jax.lax.scan(step, carry, keys)[0])
  w, _, drift = scan((w, tx.init(w), jnp.zeros([])))
  assert w.dtype == jnp.float32
  return float(drift)


@pytest.mark.parametrize('retraction', RETRACTIONS)
@pytest.mark.parametrize('name', FACTORIES)
def test_the_norm_does_not_drift_over_10000_float32_steps(name, retraction):
  drift = norm_drift(FACTORIES[name], retraction, 10_000)
  assert drift < 1e-6, drift


def assert_tuning_changes_nothing(name, retraction, shapes, *, steps, seed):
  """Steps ``steps`` random gradients with and without the CPU tuning; both agree to float32
  round-off. Returns the params, the gradients and the tuned run's last params."""
  from grassmann_optax._src import tuning

  rs = np.random.RandomState(seed)
  params = {k: jnp.asarray(rs.randn(*s), jnp.float32) for k, s in shapes.items()}
  grads = [
    {k: jnp.asarray(rs.randn(*s), jnp.float32) for k, s in shapes.items()} for _ in range(steps)
  ]
  tuned, tuned_state = run(FACTORIES[name](LR, retraction=retraction), params, grads)
  with tuning.disabled():  # a transform of its own: jax.jit reuses the trace of one it has seen
    plain, plain_state = run(FACTORIES[name](LR, retraction=retraction), params, grads)
  close = functools.partial(np.testing.assert_allclose, atol=2e-6, rtol=0)
  jax.tree.map(close, tuned[-1], plain[-1])
  jax.tree.map(close, tuned_state, plain_state)
  return params, grads, tuned[-1]


@pytest.mark.parametrize('retraction', RETRACTIONS)
@pytest.mark.parametrize('name', FACTORIES)
def test_the_cpu_tuning_changes_nothing_beyond_round_off(name, retraction):
  """The CPU kernel's products, the barriers and the leaves ordered one after another (tuning)
  give the steps of plain XLA reductions, to float32 round-off."""
  shapes = {'a': (24, 16), 'b': (3, 20, 8), 'c': (16, 24)}
  assert_tuning_changes_nothing(name, retraction, shapes, steps=5, seed=4)


@pytest.mark.parametrize('retraction', RETRACTIONS)
@pytest.mark.parametrize('name', FACTORIES)
def test_many_equal_small_leaves_step_as_each_leaf_alone(name, retraction):
  """Equal small leaves are stepped as one stack (tuning), each leaf its own point: the steps
  equal those of each leaf alone, and the compiled step does not grow a slice per leaf."""
  from grassmann_optax._src import native

  shapes = {f'leaf{i:02d}': (12, 8) for i in range(10)} | {'stacked': (3, 12, 8)}
  params, grads, stacked = assert_tuning_changes_nothing(name, retraction, shapes, steps=4, seed=5)
  assert float(jnp.abs(stacked['leaf00'] - params['leaf00']).max()) > 1e-3
  if native.available():
    tx = FACTORIES[name](LR, retraction=retraction)
    text = jax.jit(tx.update).lower(grads[0], tx.init(params), params).as_text()
    assert native.UNSTACK_TARGET in text


# Devices.

LABELS = {'w': 'grassmann', 'b': 'euclidean'}


def device_problem(steps=3):
  rs = np.random.RandomState(3)
  params = {'w': jnp.asarray(rs.randn(6, 4), jnp.float32), 'b': jnp.zeros(4)}
  grads = [
    {'w': jnp.asarray(rs.randn(2, 6, 4), jnp.float32), 'b': jnp.asarray(rs.randn(2, 4))}
    for _ in range(steps)
  ]  # one gradient per device
  return params, grads


def single_device(tx, params, grads):
  means = [jax.tree.map(lambda g: g.mean(0), g) for g in grads]
  return run(tx, params, means)[0][-1]


@pytest.mark.parametrize('name', ['adamh', 'muonh'])
def test_pmap_and_shard_map_data_parallel_equal_one_device(name):
  assert jax.device_count() >= 2, 'conftest.py must start JAX with 2 fake CPU devices'
  tx = getattr(go, name)(1e-2, 0.1, param_labels=LABELS)
  params, grads = device_problem()
  expected = single_device(tx, params, grads)

  def step(params, state, grads):
    grads = jax.lax.pmean(grads, 'data')
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  replicate = lambda tree: jax.tree.map(lambda x: jnp.stack([x, x]), tree)
  p, s = replicate(params), replicate(tx.init(params))
  pmapped = jax.pmap(step, axis_name='data')
  for g in grads:
    p, s = pmapped(p, s, g)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b, atol=1e-6), p, expected)

  mesh = Mesh(np.array(jax.devices()[:2]), ('data',))
  local = lambda params, state, grads: step(params, state, jax.tree.map(lambda g: g[0], grads))
  sharded = jax.jit(
    jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P('data')), out_specs=(P(), P()))
  )
  p, s = params, tx.init(params)
  for g in grads:
    p, s = sharded(p, s, g)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), p, expected)


@pytest.mark.parametrize('name', ['adamh', 'muonh'])
def test_a_split_leaf_inside_shard_map_is_refused_naming_it(name):
  mesh = Mesh(np.array(jax.devices()[:2]), ('model',))
  tx = getattr(go, name)(1e-2, 0.1, param_labels=LABELS)
  params, _ = device_problem()
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)
  specs = {'w': P('model', None), 'b': P()}
  state_specs = jax.tree.map(lambda x: P('model', None) if x.shape == (6, 4) else P(), state)
  sharded = jax.shard_map(
    lambda p, s, g: tx.update(g, s, p),
    mesh=mesh,
    in_specs=(specs, state_specs, specs),
    out_specs=(specs, state_specs),
  )
  with pytest.raises(ValueError, match=r"leaf 'w'.*mesh axes \['model'\].*Replicate"):
    sharded(params, state, grads)


# State size.


def size(tree):
  return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


def test_adamh_keeps_no_more_state_than_adam_and_muonh_one_buffer():
  params = {'stacked': jnp.ones((3, 8, 4)), 'matrix': jnp.ones((6, 5))}
  n, num_points = size(params), 3 + 1
  adam = size(optax.scale_by_adam().init(params))
  assert adam == 1 + 2 * n
  assert size(go.hyperball_adam(0.1).init(params)) == adam + num_points
  assert size(go.hyperball_muon(0.1).init(params)) == 1 + n + num_points
  assert size(go.hyperball_step(0.1).init(params)) == 1 + num_points
  labels = {'stacked': 'grassmann', 'matrix': 'grassmann', 'bias': 'euclidean'}
  full = {**params, 'bias': jnp.ones(5)}
  adamw = size(optax.adamw(1e-3).init(full))
  # One more step count: each part of the partition counts its steps.
  assert size(go.adamh(1e-3, 0.1, param_labels=labels).init(full)) == adamw + num_points + 1
  muon = size(go.muonh(1e-3, 0.1, param_labels=labels).init(full))
  assert muon == adamw - 2 * n + n + num_points + 1


# Transformer labels.


class LinenBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _=None):
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, name='attn')(h, h)
    h = nn.LayerNorm()(x)
    x = x + nn.Dense(8, name='down')(nn.gelu(nn.Dense(16, name='up')(h)))
    return x, None


class LinenGPT(nn.Module):
  scan: bool = False

  @nn.compact
  def __call__(self, tokens):
    wpe = self.param('wpe', nn.initializers.normal(0.02), (tokens.shape[-1], 8))
    x = nn.Embed(32, 8, name='wte')(tokens) + wpe
    if self.scan:
      stack = nn.scan(
        LinenBlock, variable_axes={'params': 0}, split_rngs={'params': True}, length=2
      )
      x, _ = stack(name='blocks')(x, None)
    else:
      for i in range(2):
        x, _ = LinenBlock(name=f'block{i}')(x)
    return nn.Dense(32, name='lm_head')(nn.LayerNorm(name='ln_f')(x))


def flat_labels(labels):
  return dict(checks.named_leaves(labels))


def train(tx, loss_fn, params, steps=4):
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params, value=loss)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(steps):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  return params, losses


@pytest.mark.parametrize('scan', [False, True], ids=['layers', 'scanned'])
def test_transformer_labels_on_a_linen_gpt_and_muonh_keeps_each_point_norm(scan):
  model = LinenGPT(scan=scan)
  tokens = jnp.arange(12).reshape(2, 6) % 32
  params = jax.jit(model.init)(jax.random.key(0), tokens)['params']  # one program, not one per op
  labels = flat_labels(go.transformer_labels(params))
  on_ball = sorted(name for name, label in labels.items() if label == 'grassmann')
  block = 'blocks' if scan else 'block0'
  kernels = [f'{block}/{m}/kernel' for m in ('attn/key', 'attn/out', 'attn/query', 'attn/value')]
  kernels += [f'{block}/{m}/kernel' for m in ('down', 'up')]
  if not scan:
    kernels = sorted(kernels + [k.replace('block0', 'block1') for k in kernels])
  assert on_ball == kernels
  assert labels['lm_head/kernel'] == 'euclidean'
  assert flat_labels(go.transformer_labels(params, head=True))['lm_head/kernel'] == 'grassmann'
  assert (
    labels['wte/embedding'] == labels['wpe'] == labels[f'{block}/attn/query/bias'] == ('euclidean')
  )

  def loss_fn(p):
    logits = model.apply({'params': p}, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()

  new, _ = train(go.muonh(1e-2, 0.05), loss_fn, params)
  q, out = (new[block]['attn'][m]['kernel'] for m in ('query', 'out'))
  q0, out0 = (params[block]['attn'][m]['kernel'] for m in ('query', 'out'))
  up, up0 = new[block]['up']['kernel'], params[block]['up']['kernel']
  lead = 1 if scan else 0
  per_head_in, per_head_out = (lead, lead + 2), (lead + 1, lead + 2)
  for a, b, axes in ((q, q0, per_head_in), (out, out0, per_head_out), (up, up0, (-2, -1))):
    assert not np.allclose(a, b)
    np.testing.assert_allclose(
      jnp.linalg.norm(a, axis=axes), jnp.linalg.norm(b, axis=axes), rtol=1e-5
    )
  assert not np.allclose(jnp.linalg.norm(new['wte']['embedding']), 0)


class NnxBlock(nnx.Module):
  def __init__(self, rngs):
    self.ln1 = nnx.LayerNorm(8, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(2, 8, 8, decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(8, rngs=rngs)
    self.up = nnx.Linear(8, 16, rngs=rngs)
    self.down = nnx.Linear(16, 8, rngs=rngs)

  def __call__(self, x):
    h = self.ln1(x)
    x = x + self.attn(h, h)
    return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class NnxGPT(nnx.Module):
  def __init__(self, rngs):
    self.wte = nnx.Embed(32, 8, rngs=rngs)
    self.wpe = nnx.Param(0.02 * jax.random.normal(rngs.params(), (6, 8)))
    self.blocks = nnx.List([NnxBlock(rngs) for _ in range(2)])
    self.ln_f = nnx.LayerNorm(8, rngs=rngs)
    self.lm_head = nnx.Linear(8, 32, rngs=rngs)

  def __call__(self, tokens):
    x = self.wte(tokens) + self.wpe[...]
    for block in self.blocks:
      x = block(x)
    return self.lm_head(self.ln_f(x))


@pytest.mark.parametrize('name', ['adamh', 'muonh'])
def test_transformer_labels_on_an_nnx_gpt_through_nnx_optimizer(name):
  model = NnxGPT(nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  labels = flat_labels(go.transformer_labels(state))
  on_ball = sorted(k.removesuffix('/value') for k, v in labels.items() if v == 'grassmann')
  per_block = ['attn/key', 'attn/out', 'attn/query', 'attn/value', 'down', 'up']
  assert on_ball == sorted(f'blocks/{i}/{m}/kernel' for i in range(2) for m in per_block)
  q0 = model.blocks[0].attn.query.kernel.get_value()
  optimizer = nnx.Optimizer(model, getattr(go, name)(1e-2, 0.05), wrt=nnx.Param)
  tokens = jnp.arange(12).reshape(2, 6) % 32

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      logits = model(tokens)
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads, value=loss)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(5)]
  assert losses[-1] < losses[0]
  q = model.blocks[0].attn.query.kernel.get_value()
  assert not np.allclose(q, q0)
  np.testing.assert_allclose(
    jnp.linalg.norm(q, axis=(0, 2)), jnp.linalg.norm(q0, axis=(0, 2)), rtol=1e-5
  )


def _nested(shapes):
  """A nested dict of arrays from ``{'a/b/kernel': shape}``."""
  tree = {}
  for name, shape in shapes.items():
    *parents, leaf = name.split('/')
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = jnp.ones(shape)
  return tree


# Parameter names as six Flax codebases write them (nested paths flattened with '/'), with what
# the rules make of each: 'ball' on the hyperball, 'head' there only with head=True, '' Euclidean.
_CODEBASE_TREES = {
  'flax lm1b example': {
    'decoder/Embed_0/embedding': ((64, 8), ''),
    'decoder/block_0/SelfAttention_0/query/kernel': ((8, 2, 4), 'ball'),
    'decoder/block_0/SelfAttention_0/out/kernel': ((2, 4, 8), 'ball'),
    'decoder/block_0/MlpBlock_0/Dense_0/kernel': ((8, 32), 'ball'),
    'decoder/block_0/LayerNorm_0/scale': ((8,), ''),
    'decoder/logitdense/kernel': ((8, 64), 'head'),
  },
  'transformers GPT-2': {
    'transformer/wte/embedding': ((64, 8), ''),
    'transformer/wpe/embedding': ((16, 8), ''),
    'transformer/h/0/attn/c_attn/kernel': ((8, 24), 'ball'),
    'transformer/h/0/attn/c_proj/kernel': ((8, 8), 'ball'),
    'transformer/h/0/ln_1/scale': ((8,), ''),
    'transformer/h/0/mlp/c_fc/bias': ((32,), ''),
    'transformer/h/0/mlp/c_fc/kernel': ((8, 32), 'ball'),
  },
  'transformers Llama': {
    'model/embed_tokens/embedding': ((64, 8), ''),
    'model/layers/0/self_attn/q_proj/kernel': ((8, 8), 'ball'),
    'model/layers/0/mlp/gate_proj/kernel': ((8, 32), 'ball'),
    'model/layers/0/input_layernorm/weight': ((8,), ''),
    'lm_head/kernel': ((8, 64), 'head'),
  },
  'Meta Llama': {
    'tok_embeddings/embedding': ((64, 8), ''),
    'layers/0/attention/wq/kernel': ((8, 8), 'ball'),
    'layers/0/feed_forward/w1/kernel': ((8, 32), 'ball'),
    'layers/0/attention_norm/scale': ((8,), ''),
    'output/kernel': ((8, 64), 'head'),
  },
  'transformers BERT classifier': {
    'bert/embeddings/word_embeddings/embedding': ((64, 8), ''),
    'bert/encoder/layer/0/attention/self/query/kernel': ((8, 8), 'ball'),
    'bert/encoder/layer/0/attention/output/dense/kernel': ((8, 8), 'ball'),
    'bert/encoder/layer/0/output/dense/kernel': ((32, 8), 'ball'),
    'classifier/kernel': ((8, 3), 'head'),
  },
  'stacked layers, logits_dense': {
    'token_embedder/embedding': ((64, 8), ''),
    'decoder/layers/mlp/wi/kernel': ((3, 8, 32), 'ball'),
    'decoder/decoder_norm/scale': ((8,), ''),
    'decoder/logits_dense/kernel': ((8, 64), 'head'),
  },
}


@pytest.mark.parametrize('codebase', sorted(_CODEBASE_TREES))
def test_transformer_labels_read_the_names_of_common_codebases(codebase):
  leaves = _CODEBASE_TREES[codebase]
  params = _nested({name: shape for name, (shape, _) in leaves.items()})
  on = lambda labels: {n for n, label in flat_labels(labels).items() if label == go.GRASSMANN}
  expected = lambda kinds: {name for name, (_, kind) in leaves.items() if kind in kinds}
  assert on(go.transformer_labels(params)) == expected(('ball',))
  assert on(go.transformer_labels(params, head=True)) == expected(('ball', 'head'))


@pytest.mark.parametrize(
  'params, match',
  [
    ({'proj': {'w': jnp.ones((4, 4))}}, r"classify the leaf 'proj/w'"),
    ({'conv': {'kernel': jnp.ones((3, 3, 4, 8))}}, r"classify the kernel 'conv/kernel'"),
    ({'mlp': {'kernel': jnp.ones((4, 4), jnp.int32)}}, r"'mlp/kernel' has dtype int32"),
  ],
)
def test_transformer_labels_refuse_what_they_cannot_classify(params, match):
  with pytest.raises(ValueError, match=match):
    go.transformer_labels(params)


def test_the_head_option_takes_the_head_kernels_only():
  """``head=True`` puts a head's kernel of at most three axes on the hyperball; another head
  leaf (a table named ``w``, a bias) and a four-axis head kernel stay Euclidean."""
  params = {
    'lm_head': {'kernel': jnp.ones((8, 50)), 'w': jnp.ones((8, 50)), 'bias': jnp.ones(50)},
    'classifier': {'kernel': jnp.ones((2, 2, 8, 10))},
    'mlp': {'kernel': jnp.ones((8, 8))},
  }
  labels = go.transformer_labels(params, head=True)
  assert labels['lm_head'] == {'kernel': 'grassmann', 'w': 'euclidean', 'bias': 'euclidean'}
  assert labels['classifier']['kernel'] == 'euclidean'
  assert labels['mlp']['kernel'] == 'grassmann'


@pytest.mark.parametrize('name', ['adamh', 'muonh'])
def test_the_hyperball_aliases_decay_the_euclidean_matrices_only(name):
  """AdamW's decay reaches the Euclidean matrices (embeddings), not the biases and norm scales,
  whatever their number of axes: with zero gradients the update is ``−η·λ·w`` there, 0 elsewhere."""
  params = {
    'wte': {'embedding': jnp.ones((8, 4))},
    'ln': {'scale': jnp.ones((2, 4))},
    'attn': {'query': {'bias': jnp.ones((2, 4))}},
    'mlp': {'kernel': jax.random.normal(jax.random.key(0), (4, 6)), 'bias': jnp.ones(6)},
  }
  lr, decay = 0.1, 0.5
  tx = getattr(go, name)(lr, 0.01, weight_decay=decay)
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates['wte']['embedding'], -lr * decay, rtol=1e-6)
  for leaf in (updates['ln']['scale'], updates['attn']['query']['bias'], updates['mlp']['bias']):
    np.testing.assert_array_equal(leaf, 0.0)


def test_an_integer_head_kernel_is_refused_when_the_head_goes_on_the_hyperball():
  params = {'lm_head': {'kernel': jnp.ones((4, 8), jnp.int32)}}
  assert go.transformer_labels(params) == {'lm_head': {'kernel': 'euclidean'}}
  with pytest.raises(ValueError, match=r"'lm_head/kernel' has dtype int32"):
    go.transformer_labels(params, head=True)


@pytest.mark.parametrize(
  'params, match',
  [
    ({'w': jnp.ones((4, 4), jnp.int32)}, r"leaf 'w'.*dtype int32"),
    ({'w': jnp.ones((5, 1, 1))}, r"leaf 'w'.*points of 1 element"),
    ({'w': jnp.zeros((4, 4))}, r"leaf 'w' has a point of norm 0"),
    ({'w': jnp.ones((3, 4, 4)).at[1].set(0)}, r"leaf 'w' has a point of norm 0"),
  ],
)
@pytest.mark.parametrize('name', ['adamh', 'muonh'])
def test_leaves_that_cannot_be_on_a_sphere_are_refused_naming_them(name, params, match):
  with pytest.raises(ValueError, match=match) as error:
    getattr(go, name)(1e-3, 0.1, param_labels={'w': 'grassmann'}).init(params)
  assert 'radius=' not in str(error.value)  # the Hyperball aliases take no radius argument


@pytest.mark.parametrize('retraction', RETRACTIONS)
@pytest.mark.parametrize('name', FACTORIES)
def test_a_nan_in_the_gradient_makes_its_point_nan_and_moves_the_others(name, retraction):
  w, grads = random_problem((3, 6, 4), 2, dtype=np.float32)
  tx = FACTORIES[name](LR, retraction=retraction)
  finite, _ = run(tx, jnp.asarray(w), [jnp.asarray(g) for g in grads])
  bad = grads[1].copy()
  bad[1, 2, 3] = np.nan
  got, _ = run(tx, jnp.asarray(w), [jnp.asarray(grads[0]), jnp.asarray(bad)])
  # The published step divides by the update's norm, NaN here: the whole point is NaN (it used
  # to be a point at the origin with one NaN element), and the other points are untouched by it.
  assert np.isnan(np.asarray(got[-1][1])).all()
  np.testing.assert_array_equal(np.asarray(got[-1])[[0, 2]], np.asarray(finite[-1])[[0, 2]])


@pytest.mark.parametrize('retraction', RETRACTIONS)
@pytest.mark.parametrize('peak', [1e10, 1e20, 3e38])
def test_hyperball_step_takes_the_same_step_for_any_finite_scale_of_the_update(retraction, peak):
  rs = np.random.RandomState(5)
  w = jnp.asarray(rs.randn(3, 6, 4), jnp.float32)
  u = rs.randn(3, 6, 4)
  u = u / np.abs(u).max(axis=(1, 2), keepdims=True)
  u[1] *= peak  # one point whose ‖u‖² overflows float32 (from 1e20), beside normal ones
  tx = go.hyperball_step(LR, retraction=retraction)
  small = u / np.abs(u).max(axis=(1, 2), keepdims=True)  # the same directions
  expected, _ = run(tx, w, [jnp.asarray(small, jnp.float32)])
  got, _ = run(tx, w, [jnp.asarray(u, jnp.float32)])
  np.testing.assert_allclose(got[-1], expected[-1], atol=1e-6)
  np.testing.assert_allclose(matrix_norms(got[-1]), matrix_norms(w), rtol=1e-6)


def test_bad_arguments_are_refused():
  with pytest.raises(ValueError, match='retraction'):
    go.hyperball_step(0.1, retraction='exp')
  with pytest.raises(TypeError, match='ns_steps'):
    go.hyperball_muon(0.1, ns_steps=2.5)
  with pytest.raises(ValueError, match='ns_steps'):
    go.hyperball_muon(0.1, ns_steps=-1)
  with pytest.raises(ValueError, match='b2'):
    go.adamh(1e-3, 0.1, b2=1.0)
  with pytest.raises(ValueError, match='params'):
    go.hyperball_adam(0.1).update(jnp.ones((3, 3)), go.hyperball_adam(0.1).init(jnp.ones((3, 3))))
  with pytest.raises(ValueError, match="unknown label 'sphere'"):
    go.adamh(1e-3, 0.1, param_labels={'w': 'sphere'}).init({'w': jnp.ones((3, 3))})


# Optax wrappers.


def wrapper_problem():
  rs = np.random.RandomState(4)
  params = {'w': jnp.asarray(rs.randn(2, 6, 4), jnp.float32), 'b': jnp.zeros(4)}
  grads = [
    jax.tree.map(lambda p: jnp.asarray(rs.randn(*p.shape), jnp.float32), params) for _ in range(4)
  ]
  return params, grads


def assert_trees_close(a, b, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=atol), a, b)


@pytest.mark.parametrize('name', ['adamh', 'muonh'])
def test_inside_multi_steps_inject_hyperparams_and_apply_if_finite(name):
  params, grads = wrapper_problem()
  make = functools.partial(getattr(go, name), param_labels=LABELS)
  plain, _ = run(make(1e-2, 0.1), params, grads, value=jnp.ones([]))

  injected = optax.inject_hyperparams(make)(learning_rate=1e-2, hyperball_learning_rate=0.1)
  got, state = run(injected, params, grads, value=jnp.ones([]))
  assert_trees_close(got[-1], plain[-1])
  assert float(state.hyperparams['hyperball_learning_rate']) == pytest.approx(0.1)

  multi, _ = run(optax.MultiSteps(make(1e-2, 0.1), every_k_schedule=2), params, grads)
  means = [jax.tree.map(lambda a, b: (a + b) / 2, *grads[k : k + 2]) for k in (0, 2)]
  expected, _ = run(make(1e-2, 0.1), params, means)
  assert_trees_close(multi[-1], expected[-1])

  bad = [*grads[:2], {**grads[2], 'w': grads[2]['w'].at[0, 0, 0].set(jnp.nan)}, grads[3]]
  finite, state = run(optax.apply_if_finite(make(1e-2, 0.1), 3), params, bad)
  skipped, _ = run(make(1e-2, 0.1), params, [*grads[:2], grads[3]])
  assert_trees_close(finite[-1], skipped[-1])
  assert int(state.total_notfinite) == 1
  np.testing.assert_allclose(matrix_norms(finite[-1]['w']), matrix_norms(params['w']), rtol=1e-6)


def test_a_schedule_drives_the_relative_step():
  w, grads = random_problem((5, 4), 3, dtype=np.float32)
  schedule = optax.linear_schedule(0.3, 0.1, 2)
  got, _ = run(go.hyperball_step(schedule), w, grads)
  for before, after, lr in zip([w, *got], got, (0.3, 0.2, 0.1), strict=False):
    assert angle(before, after) == pytest.approx(np.arctan(lr), abs=2e-6)
