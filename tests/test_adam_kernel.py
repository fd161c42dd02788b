"""The CPU kernel of AdamH's moments and products: exact, in place, and used where it applies.

``native.adam_products`` computes Adam's two moments and the per-point inner products of its
update in one pass (``grassmann_optax/_src/adam_products.cc``). Each result is checked against
float64 arithmetic on the same float32 inputs.
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import grassmann_optax as go
from grassmann_optax._src import native, tuning
from tests.test_native import kernel, run_python  # noqa: F401 (kernel: a fixture)

# Skips where the package was installed without the kernel (fails instead under CI's flag).
pytestmark = pytest.mark.usefixtures('kernel')

B1, B2, EPS = 0.9, 0.95, 1e-8


def operands(shape, seed=0):
  w, g, mu, nu = (
    jax.random.normal(key, shape, jnp.float32) for key in jax.random.split(jax.random.key(seed), 4)
  )
  return w, g, mu, jnp.abs(nu)


def call(w, g, mu, nu, point_axes, tangent=None, t=3.0):
  return native.adam_products(
    w, g, mu, nu, b1=B1, b2=B2, eps=EPS, t=jnp.float32(t), point_axes=point_axes, tangent=tangent
  )


def expected(w, g, mu, nu, point_axes, tangent=None, t=3.0):
  """The moments as NumPy computes them in float32 (the same correctly rounded operations), and
  a function that gives the float64 sums (with the scale of their rounding) of given moments."""
  f32 = np.float32
  w, g, mu, nu = (np.asarray(a) for a in (w, g, mu, nu))
  h = g if tangent is None else g - np.asarray(tangent) * w
  m = f32(B1) * mu + f32(1 - B1) * h
  v = f32(B2) * nu + (f32(1 - B2) * h) * h
  w64 = np.asarray(w, np.float64)

  def sums(m, v):
    m, v = np.asarray(m, np.float64), np.asarray(v, np.float64)
    u = (m / (1 - B1**t)) / (np.sqrt(v / (1 - B2**t)) + EPS)
    pairs = ((w64, w64), (w64, u), (u, u), (w64, m), (u, m))
    total = [np.sum(a * b, axis=point_axes, keepdims=True) for a, b in pairs]
    scale = [np.sum(np.abs(a * b), axis=point_axes, keepdims=True) for a, b in pairs]
    return total, scale

  return m, v, sums


LAYOUTS = [
  ((64, 48), (0, 1)),  # a matrix, one chunk
  ((3, 40, 70001), (1, 2)),  # stacked: many chunks per point, the last one shorter, a tail of 5
  ((500, 4, 5), (1, 2)),  # many small points per task, each with a tail
  ((7,), (0,)),  # fewer elements than lanes
  ((2, 1, 9), (1, 2)),  # an axis of size 1
  ((4, 1, 30), (2,)),  # rows, with an axis of size 1 between
]


@pytest.mark.parametrize('with_tangent', [False, True])
@pytest.mark.parametrize('shape, point_axes', LAYOUTS)
def test_moments_and_sums_are_exact(shape, point_axes, with_tangent):
  w, g, mu, nu = operands(shape)
  tangent = None
  if with_tangent:
    batch = tuple(1 if a in point_axes else n for a, n in enumerate(shape))
    tangent = jax.random.normal(jax.random.key(9), batch, jnp.float32)
  got = jax.jit(functools.partial(call, point_axes=point_axes, tangent=tangent))(w, g, mu, nu)
  assert got is not None
  m, v, sums = expected(w, g, mu, nu, point_axes, tangent)
  np.testing.assert_array_equal(got[0], m)
  np.testing.assert_array_equal(got[1], v)
  total, scale = sums(got[0], got[1])
  if with_tangent:  # u, as XLA computes it from the moments, to an ulp or two
    u = (got[0] / (1 - B1**3.0)) / (jnp.sqrt(got[1] / (1 - B2**3.0)) + EPS)
    np.testing.assert_allclose(got[2], u, rtol=6e-7, atol=0)
  else:
    assert got[2] is None
  assert len(got[3]) == 5
  for value, want, size in zip(got[3], total, scale, strict=True):
    assert value.shape == want.shape and value.dtype == jnp.float32
    assert np.all(np.abs(np.asarray(value, np.float64) - want) <= 2e-6 * size + 1e-30)


def test_layouts_without_contiguous_points_are_left_to_xla():
  w, g, mu, nu = operands((8, 4))
  assert native.contiguous_points((8, 4), (0,)) is None  # columns
  assert call(w, g, mu, nu, (0,)) is None
  assert native.contiguous_points((8, 4), (1,)) == (8, 4)  # rows
  assert call(w.astype(jnp.bfloat16), g, mu, nu, (0, 1)) is None
  with go.cpu_kernel.disabled():
    assert call(w, g, mu, nu, (0, 1)) is None


def test_the_moments_are_written_in_place():
  """The kernel's moments alias its operands, so that a donated state is updated where it is."""
  w, g, mu, nu = operands((16, 40))
  fn = jax.jit(lambda *x: call(*x, point_axes=(0, 1))[:2], donate_argnums=(2, 3))
  text = fn.lower(w, g, mu, nu).compile().as_text()
  assert native.ADAM_TARGET in text
  assert 'output_to_operand_aliasing={{0}: (2, {}), {1}: (3, {})}' in text
  assert ' copy(' not in text


def test_vmap_jvp_and_grad():
  shape, axes = (6, 40), (0, 1)
  w, g, mu, nu = operands((3, *shape))

  def member(w, g, mu, nu):
    return call(w, g, mu, nu, axes, tangent=jnp.full((1, 1), 0.25))

  with go.cpu_kernel.disabled():
    assert member(w[0], g[0], mu[0], nu[0]) is None
  batched = jax.jit(jax.vmap(member))
  assert native.ADAM_TARGET in batched.lower(w, g, mu, nu).as_text()
  got = batched(w, g, mu, nu)
  for i in range(3):
    # Compiled as the batch is: XLA folds the constant bias corrections at compile time.
    one = jax.jit(member)(w[i], g[i], mu[i], nu[i])
    jax.tree.map(lambda a, b, i=i: np.testing.assert_array_equal(a[i], b), got, one)

  def loss(w, g, mu, nu, fused=True):
    if fused:
      m, v, u, sums = member(w, g, mu, nu)
    else:
      m, v, u, sums = native._xla_adam(w, g, mu, nu, jnp.full((), 0.25), scalars(), axes, True)
    return jnp.sum(m * v) + jnp.sum(u * u) + sum(jnp.sum(s) for s in sums)

  args = (w[0], g[0], mu[0], nu[0])
  tangents = operands(shape, seed=1)
  _, fused_tangent = jax.jvp(loss, args, tangents)
  _, xla_tangent = jax.jvp(functools.partial(loss, fused=False), args, tangents)
  np.testing.assert_allclose(fused_tangent, xla_tangent, rtol=1e-5)
  for a, b in zip(
    jax.grad(loss, argnums=(0, 1))(*args),
    jax.grad(functools.partial(loss, fused=False), argnums=(0, 1))(*args),
    strict=True,
  ):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def scalars(t=3.0):
  return jnp.stack([jnp.float32(x) for x in (B1, 1 - B1, B2, 1 - B2, EPS, 1 - B1**t, 1 - B2**t)])


@pytest.mark.parametrize(
  'spec, reduction',
  [
    (P('x', None, None), False),  # stacked points sharded: each device steps its own
    (P(None, 'x', None), True),  # each point split: partial sums, one psum
    (P(None, None, 'x'), True),
  ],
)
@pytest.mark.parametrize('with_tangent', [False, True])
def test_sharded_jit_keeps_the_shards(spec, reduction, with_tangent):
  mesh = Mesh(np.array(jax.devices()[:2]), ('x',))
  sharding = NamedSharding(mesh, spec)
  shape, axes = (4, 24, 16), (1, 2)
  arrays = operands(shape)
  sharded = [jax.device_put(x, sharding) for x in arrays]
  tangent = jnp.linspace(-1, 1, 4, dtype=jnp.float32).reshape(4, 1, 1) if with_tangent else None
  fn = jax.jit(lambda *x: call(*x, point_axes=axes, tangent=tangent))
  text = fn.lower(*sharded).compile().as_text()
  assert native.ADAM_TARGET in text
  assert 'all-gather' not in text
  assert ('all-reduce' in text) == reduction
  got = fn(*sharded)
  assert got[0].sharding.is_equivalent_to(sharding, 3)
  want = jax.jit(lambda *x: call(*x, point_axes=axes, tangent=tangent))(*arrays)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])
  if with_tangent:
    np.testing.assert_array_equal(got[2], want[2])
  else:
    assert got[2] is None and want[2] is None
  for a, b in zip(got[3], want[3], strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('retraction', ['normalize', 'geodesic'])
def test_adamh_steps_through_the_kernel_and_inside_shard_map(retraction):
  """Both retractions of ``hyperball_adam`` use the kernel on float32 matrices; inside
  ``shard_map`` with replicated params it steps as on one device."""
  params = {'a': go.unit_initializer()(jax.random.key(0), (24, 16)), 'b': jnp.ones((3, 8, 12))}
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), (2, *p.shape)), params)
  tx = go.hyperball_adam(0.05, retraction=retraction)
  state = tx.init(params)
  mean = jax.tree.map(lambda g: g.mean(0), grads)
  assert native.ADAM_TARGET in jax.jit(tx.update).lower(mean, state, params).as_text()

  def step(params, state, grads):
    grads = jax.lax.pmean(jax.tree.map(lambda g: g[0], grads), 'data')
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  mesh = Mesh(np.array(jax.devices()[:2]), ('data',))
  sharded = jax.jit(
    jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P('data')), out_specs=(P(), P()))
  )
  got, got_state = sharded(params, state, grads)
  want, want_state = jax.jit(one_step(tx))(params, state, mean)
  close = functools.partial(np.testing.assert_allclose, rtol=0, atol=1e-6)
  jax.tree.map(close, got, want)
  jax.tree.map(close, got_state, want_state)


def one_step(tx):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def test_adamh_with_and_without_the_kernel_agree():
  """Many steps of both retractions: the kernel's AdamH and the XLA one agree to round-off."""
  shapes = {'a': (48, 40), 'b': (3, 20, 70), 'c': (200,)}
  rs = np.random.RandomState(0)
  params = {k: jnp.asarray(rs.randn(*s), jnp.float32) for k, s in shapes.items()}
  grads = [{k: jnp.asarray(rs.randn(*s), jnp.float32) for k, s in shapes.items()} for _ in range(6)]
  for retraction in ('normalize', 'geodesic'):
    results = []
    for use_kernel in (True, False):
      with contextlib.nullcontext() if use_kernel else tuning.disabled():
        tx = go.hyperball_adam(0.1, retraction=retraction)
        step = jax.jit(one_step(tx))
        p, s = params, tx.init(params)
        for g in grads:
          p, s = step(p, s, g)
      results.append((p, s))
    (p1, s1), (p2, s2) = results
    close = functools.partial(np.testing.assert_allclose, rtol=0, atol=3e-6)
    jax.tree.map(close, p1, p2)
    jax.tree.map(close, s1, s2)


VARIANT_SCRIPT = """
  import hashlib, jax, jax.numpy as jnp, numpy as np
  from grassmann_optax._src import native
  digest = hashlib.sha256()
  layouts = [((64, 48), (0, 1)), ((3, 40, 70001), (1, 2)), ((500, 4, 5), (1, 2)), ((7,), (0,))]
  for seed, (shape, axes) in enumerate(layouts):
    n = int(np.prod(shape))
    i = np.arange(4 * n, dtype=np.int64) + 7919 * seed
    x = (((i * 2654435761) % 1000003) - 500001).astype(np.float64) / 262144.0
    w, g, mu, nu = (x[k * n:(k + 1) * n].astype(np.float32).reshape(shape) for k in range(4))
    batch = tuple(1 if a in axes else s for a, s in enumerate(shape))
    for tangent in (None, np.full(batch, 0.375, np.float32)):
      out = jax.jit(lambda w, g, mu, nu: native.adam_products(
        w, g, mu, nu, b1=0.9, b2=0.95, eps=1e-8, t=jnp.float32(4), point_axes=axes,
        tangent=tangent))(w, g, mu, np.abs(nu))
      for array in jax.tree.leaves(out):
        digest.update(np.asarray(array).tobytes())
  print(native.variant(), digest.hexdigest())
"""


def test_the_instruction_set_variants_return_the_same_bits():
  runs = [run_python(VARIANT_SCRIPT, **env) for env in ({}, {native.ENV_VARIANT: 'baseline'})]
  for result in runs:
    assert result.returncode == 0, result.stderr
  (auto_variant, auto), (baseline_variant, baseline) = (r.stdout.split() for r in runs)
  assert baseline_variant == 'baseline'
  assert auto_variant in ('avx2', 'baseline')
  assert auto == baseline
