"""The CPU kernel for the per-point inner products: exact, used where it should be, optional.

The kernel is built when the package is installed; nothing here builds it. Where the package was
installed without it, the tests that need it skip, and fail instead under CI's
``GRASSMANN_REQUIRE_CPU_KERNEL=1``.
"""

import hashlib
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib.version
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import grassmann_optax as go
from grassmann_optax._src import native

REQUIRE = os.environ.get('GRASSMANN_REQUIRE_CPU_KERNEL') == '1'


@pytest.fixture
def kernel():
  """Skips where the package was installed without the kernel; fails instead under CI's flag."""
  if not native.available():
    if os.environ.get(native.ENV_SWITCH) == '0':
      message = f'the CPU kernel is switched off ({native.ENV_SWITCH}=0)'
    else:
      message = (
        f'the CPU kernel is not installed ({native.MODULE} is missing: no C++ compiler at '
        f'install, or {native.ENV_BUILD}=0)'
      )
    if REQUIRE:
      pytest.fail(message + ' but GRASSMANN_REQUIRE_CPU_KERNEL=1')
    pytest.skip(message)


def random_arrays(shape, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return tuple(jax.random.normal(key, shape, jnp.float32) for key in keys)


def reference_products(w, g, b, point_axes=None):
  """The six products in float64, and the sums of their absolute terms (the scale of rounding).

  Each of the shape of ``w`` with the point axes (by default all but the last) set to 1.
  """
  axes = tuple(range(w.ndim - 1)) if point_axes is None else point_axes
  x = [np.asarray(a, np.float64) for a in (w, g, b)]
  products = [np.sum(x[i] * x[j], axis=axes, keepdims=True) for i, j in native._PAIRS]
  scales = [np.sum(np.abs(x[i] * x[j]), axis=axes, keepdims=True) for i, j in native._PAIRS]
  return products, scales


def assert_exact(products, expected, scales):
  """float32 summation: an error of a few ulps of the sum of the absolute terms."""
  for got, want, scale in zip(products, expected, scales, strict=True):
    assert got.shape == want.shape
    assert got.dtype == jnp.float32
    assert np.all(np.abs(np.asarray(got, np.float64) - want) <= 1e-6 * scale + 1e-30)


def hlo(fn, *args) -> str:
  return jax.jit(fn).lower(*args).compile().as_text()


@pytest.mark.parametrize(
  'shape', [(3, 3, 64, 128), (27, 16), (300, 1), (1, 7), (5,), (0, 5), (2, 3, 0)]
)
def test_kernel_equals_the_exact_products(kernel, shape):
  w, g, b = random_arrays(shape)
  products = jax.jit(native.column_products)(w, g, b)
  if w.size:  # XLA drops a call on empty operands
    assert 'grassmann_optax_column_gram' in hlo(native.column_products, w, g, b)
  expected, scales = reference_products(w, g, b)
  for got in products:
    assert got.shape == (1,) * (len(shape) - 1) + (shape[-1],)
  assert_exact(products, expected, scales)


# (shape, point_axes, the kernel's (O, N1, I, N2) view or None where XLA reduces).
LAYOUTS = [
  pytest.param((27, 16), None, (1, 27, 16, 1), id='columns'),
  pytest.param((27, 16), (0,), (1, 27, 16, 1), id='columns-explicit'),
  pytest.param((40, 30), (1,), (40, 1, 1, 30), id='rows'),
  pytest.param((40, 30), -1, (40, 1, 1, 30), id='rows-negative'),
  pytest.param((6, 7, 30), (0, 1, 2), (1, 1, 1, 1260), id='whole-leaf'),
  pytest.param((400, 400), (0, 1), (1, 1, 1, 160000), id='whole-leaf-chunks'),
  pytest.param((16, 3, 24), (0, 2), (1, 16, 3, 24), id='heads'),
  pytest.param((64, 4, 2, 64), (0, 3), (1, 64, 8, 64), id='qkv-heads'),
  pytest.param((3, 20, 9), (1,), (3, 20, 9, 1), id='stacked-columns'),
  pytest.param((3, 9, 20), (2,), (27, 1, 1, 20), id='stacked-rows'),
  pytest.param((2, 16, 3, 24), (1, 3), (2, 16, 3, 24), id='stacked-heads'),
  pytest.param((2, 256, 4, 128), (1, 3), (2, 256, 4, 128), id='stacked-heads-chunks'),
  pytest.param((300, 7, 5), (0, 2), (1, 300, 7, 5), id='short-runs'),
  pytest.param((30, 3, 12), (0, 2), (1, 30, 3, 12), id='short-runs-12'),
  pytest.param((30, 3, 21), (0, 2), (1, 30, 3, 21), id='runs-with-tail'),
  pytest.param((3, 1100), (1,), (3, 1, 1, 1100), id='runs-of-segments'),
  pytest.param((2, 33, 3, 517), (1, 3), (2, 33, 3, 517), id='segments-with-tail'),
  pytest.param((1, 7, 1, 30), (1, 3), (1, 1, 1, 210), id='size-1-axes'),
  pytest.param((300, 1), (0,), (1, 300, 1, 1), id='one-column'),
  pytest.param((1, 300), (1,), (1, 1, 1, 300), id='one-row'),
  pytest.param((5, 1), (1,), (1, 1, 5, 1), id='points-of-one'),
  pytest.param((5, 0), (1,), (1, 1, 5, 0), id='empty-points'),
  pytest.param((0, 4, 3), (1,), (0, 4, 3, 1), id='no-points'),
  pytest.param((3, 5, 2, 6, 4), (1, 3), None, id='outside-the-pattern'),
  pytest.param((40, 5), (1,), None, id='rows-of-5'),
]


@pytest.mark.parametrize('shape, point_axes, view', LAYOUTS)
def test_kernel_layouts(shape, point_axes, view):
  assert native.kernel_layout(shape, native.normalize_point_axes(len(shape), point_axes)) == view


@pytest.mark.parametrize('shape, point_axes, view', LAYOUTS)
def test_products_of_every_layout_are_exact(kernel, shape, point_axes, view):
  """Equal to float64 sums over the point axes; the kernel runs exactly where its view exists."""
  w, g, b = random_arrays(shape)
  products = jax.jit(lambda *x: native.column_products(*x, point_axes=point_axes))(w, g, b)
  axes = native.normalize_point_axes(len(shape), point_axes)
  expected, scales = reference_products(w, g, b, axes)
  assert_exact(products, expected, scales)
  if w.size:  # XLA drops a call on empty operands
    text = hlo(lambda *x: native.column_products(*x, point_axes=point_axes), w, g, b)
    assert ('grassmann_optax_column_gram' in text) == (view is not None)


def test_point_axes_none_is_all_axes_but_the_last(kernel):
  w, g, b = random_arrays((3, 4, 40, 24))
  default = jax.jit(native.column_products)(w, g, b)
  explicit = jax.jit(lambda *x: native.column_products(*x, point_axes=(2, 0, -3)))(w, g, b)
  for a, c in zip(default, explicit, strict=True):
    np.testing.assert_array_equal(a, c)


def test_point_axes_are_checked():
  w = jnp.ones((4, 5))
  with pytest.raises(ValueError, match='empty'):
    native.column_products(w, w, w, point_axes=())
  with pytest.raises(ValueError, match='point axis 2 of the array is out of range'):
    native.column_products(w, w, w, point_axes=(0, 2))
  with pytest.raises(ValueError, match='point axis -3 of the array is out of range'):
    native.column_products(w, w, w, point_axes=-3)
  with pytest.raises(ValueError, match='out of range'):
    native.column_products(jnp.ones(()), jnp.ones(()), jnp.ones(()), point_axes=0)
  with pytest.raises(TypeError, match='integers'):
    native.column_products(w, w, w, point_axes=(1.0,))
  with pytest.raises(TypeError, match='integers'):
    native.column_products(w, w, w, point_axes=True)
  with pytest.raises(TypeError, match='integers'):
    native.column_products(w, w, w, point_axes=1.0)
  assert native.normalize_point_axes(3, (2, 0)) == (0, 2)
  with pytest.raises(ValueError, match='twice'):
    native.normalize_point_axes(3, (2, -1, 0))
  assert native.normalize_point_axes(3, np.int64(-2)) == (1,)
  assert native.normalize_point_axes(3, None) == (0, 1)


def test_kernel_is_not_used_for_other_dtypes_or_when_disabled(kernel):
  w, g, b = random_arrays((9, 4))
  assert 'custom-call' not in hlo(
    lambda *x: native.column_products(*x), *(x.astype(jnp.float16) for x in (w, g, b))
  )
  assert 'custom-call' not in hlo(
    lambda *x: native.column_products(*x, allow_kernel=False), w, g, b
  )
  with native.disabled():
    assert 'custom-call' not in hlo(lambda *x: native.column_products(*x), w, g, b)
  assert 'custom-call' in hlo(lambda *x: native.column_products(*x), w, g, b)


def test_bfloat16_params_keep_the_xla_reductions(kernel):
  params = {'w': jax.random.normal(jax.random.key(0), (3, 3, 8, 16)).astype(jnp.bfloat16)}
  tx = go.grassmann_sgd(0.1)
  state = tx.init(params)
  text = hlo(lambda g, s, p: tx.update(g, s, p), params, state, params)
  assert 'grassmann_optax_column_gram' not in text


def run_steps(tx, params, num_steps=12):
  state = tx.init(params)

  @jax.jit
  def step(params, state, key):
    grads = jax.tree.map(lambda p: 0.3 * jax.random.normal(key, p.shape), params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for key in jax.random.split(jax.random.key(1), num_steps):
    params, state = step(params, state, key)
  return params, state


@pytest.mark.parametrize('name', ['sgdg', 'adamg'])
def test_kernel_and_xla_updates_agree(kernel, name):
  params = {
    'conv': go.unit_initializer()(jax.random.key(0), (3, 3, 8, 16)),
    'dense': go.unit_initializer()(jax.random.key(1), (40, 10)),
  }
  make = {
    'sgdg': lambda: optax.chain(go.add_orthogonality_gradient(0.1), go.grassmann_sgd(0.2)),
    'adamg': lambda: optax.chain(go.add_orthogonality_gradient(0.1), go.grassmann_adam(0.05)),
  }[name]
  tx = make()
  assert 'grassmann_optax_column_gram' in hlo(
    lambda g, s, p: tx.update(g, s, p), params, tx.init(params), params
  )
  with_kernel = run_steps(tx, params)
  with native.disabled():
    with_xla = run_steps(make(), params)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
  jax.tree.map(close, with_kernel, with_xla)


def test_update_is_differentiable_through_the_kernel(kernel):
  params = {'w': go.unit_initializer()(jax.random.key(0), (12, 5))}
  grads = {'w': 0.1 * jax.random.normal(jax.random.key(1), (12, 5))}

  def loss(learning_rate, grads):
    tx = go.grassmann_sgd(learning_rate)
    updates, _ = tx.update(grads, tx.init(params), params)
    return jnp.sum(jnp.sin(optax.apply_updates(params, updates)['w']))

  # Compiled, not op by op (the derivative of the update is many small operations); the switch
  # applies where the function is traced.
  with_kernel = jax.jit(jax.grad(loss, argnums=(0, 1)))(0.3, grads)
  with native.disabled():
    with_xla = jax.jit(jax.grad(loss, argnums=(0, 1)))(0.3, grads)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), with_kernel, with_xla
  )
  direction = {'w': jax.random.normal(jax.random.key(2), (12, 5))}
  jvp = jax.jit(lambda d: jax.jvp(lambda g: loss(0.3, g), (grads,), (d,))[1])(direction)
  np.testing.assert_allclose(jvp, jnp.vdot(with_xla[1]['w'], direction['w']), rtol=1e-4)
  assert abs(float(jvp)) > 1e-3


def test_vmap_over_an_ensemble_runs_the_kernel_per_member(kernel):
  members = jax.vmap(lambda k: go.unit_initializer()(k, (10, 4)))(
    jax.random.split(jax.random.key(0), 3)
  )
  grads = 0.2 * jax.random.normal(jax.random.key(1), members.shape)
  tx = go.grassmann_adam(0.05)

  def one(w, g):
    updates, _ = tx.update({'w': g}, tx.init({'w': w}), {'w': w})
    return updates['w']

  batched = jax.jit(jax.vmap(one))(members, grads)
  for i in range(3):
    np.testing.assert_allclose(batched[i], one(members[i], grads[i]), rtol=0, atol=1e-7)


HEADS = (16, 3, 24)  # (embed, heads, head_dim): one point per head


def heads_products(w, g, b):
  return native.column_products(w, g, b, point_axes=(0, 2))


def test_jvp_and_grad_per_head(kernel):
  """The kernel's derivative over the point axes is that of the six XLA reductions."""
  primals = random_arrays(HEADS, seed=1)
  tangents = random_arrays(HEADS, seed=2)
  assert 'grassmann_optax_column_gram' in hlo(heads_products, *primals)
  got = jax.jvp(heads_products, primals, tangents)
  with native.disabled():
    want = jax.jvp(heads_products, primals, tangents)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # d(xᵀy) = dxᵀy + xᵀdy in float64, per head.
  x, dx = ([np.asarray(a, np.float64) for a in arrays] for arrays in (primals, tangents))
  for k, (i, j) in enumerate(native._PAIRS):
    exact = np.sum(dx[i] * x[j] + x[i] * dx[j], axis=(0, 2), keepdims=True)
    np.testing.assert_allclose(got[1][k], exact, rtol=1e-5, atol=1e-4)

  def loss(w, g, b):
    ww, wg, gg, wb, gb, bb = heads_products(w, g, b)
    return jnp.sum(jnp.sin(ww) * wg + gg * wb - gb * bb)

  with_kernel = jax.grad(loss, argnums=(0, 1, 2))(*primals)
  with native.disabled():
    with_xla = jax.grad(loss, argnums=(0, 1, 2))(*primals)
  np.testing.assert_allclose(with_kernel, with_xla, rtol=1e-4, atol=1e-3)
  assert float(jnp.max(jnp.abs(with_kernel[0]))) > 1.0


def test_vmap_per_head_runs_the_kernel_per_member(kernel):
  members = random_arrays((3, *HEADS), seed=3)
  batched = jax.jit(jax.vmap(heads_products))
  assert 'grassmann_optax_column_gram' in batched.lower(*members).compile().as_text()
  got = batched(*members)
  for m in range(3):
    one = heads_products(*(x[m] for x in members))
    for a, c in zip(got, one, strict=True):
      np.testing.assert_array_equal(a[m], c)
  # One operand shared by the members: broadcast, the same products.
  shared = jax.vmap(heads_products, in_axes=(0, None, 0))(members[0], members[1][0], members[2])
  for m in range(3):
    one = heads_products(members[0][m], members[1][0], members[2][m])
    for a, c in zip(shared, one, strict=True):
      np.testing.assert_array_equal(a[m], c)


def run_python(code: str, **env) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, '-W', 'always', '-c', textwrap.dedent(code)],
    env={**os.environ, **env},
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )


# Put before the script's imports, this makes the extension module unimportable, as it is where
# the package was installed without it.
WITHOUT_THE_MODULE = f"""
  import sys
  sys.modules[{native.MODULE!r}] = None
"""

UPDATE_SCRIPT = """
  import hashlib, sys
  import jax, jax.numpy as jnp, numpy as np
  import grassmann_optax as go
  from grassmann_optax._src import native
  params = {'w': go.unit_initializer()(jax.random.key(0), (3, 3, 4, 6))}
  grads = {'w': jnp.cos(jnp.arange(216.0)).reshape(3, 3, 4, 6)}
  tx = go.sgdg(0.1, 0.2)
  updates, _ = tx.update(grads, tx.init(params), params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)  # traced again: no second warning
  print('loaded', bool(native._loaded), sys.modules.get(native.MODULE) is not None)
  print('available', go.cpu_kernel.available(), go.cpu_kernel.variant())
  print('update', hashlib.sha256(np.asarray(updates['w']).tobytes()).hexdigest())
"""
UNAVAILABLE = 'the CPU kernel for the per-point inner products is unavailable'


def script_lines(result: subprocess.CompletedProcess) -> dict[str, str]:
  assert result.returncode == 0, result.stderr
  return dict(line.split(' ', 1) for line in result.stdout.splitlines())


def xla_update_digest() -> str:
  """The update of UPDATE_SCRIPT with the XLA reductions, in this process."""
  params = {'w': go.unit_initializer()(jax.random.key(0), (3, 3, 4, 6))}
  grads = {'w': jnp.cos(jnp.arange(216.0)).reshape(3, 3, 4, 6)}
  tx = go.sgdg(0.1, 0.2)
  with native.disabled():
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  return hashlib.sha256(np.asarray(updates['w']).tobytes()).hexdigest()


def test_without_the_kernel_the_update_uses_xla_and_warns_once():
  """Installed without the kernel: XLA's results, and one warning that says what to do."""
  result = run_python(WITHOUT_THE_MODULE + UPDATE_SCRIPT)
  lines = script_lines(result)
  assert lines['available'] == 'False None'
  assert lines['update'] == xla_update_digest()
  assert result.stderr.count(UNAVAILABLE) == 1, result.stderr
  assert 'installed without it' in result.stderr
  assert 'GRASSMANN_OPTAX_CPU_KERNEL=0' in result.stderr


def test_other_backends_never_load_the_kernel():
  """A GPU or TPU process neither imports the kernel nor warns that it is missing."""
  pretend = "\n  import jax\n  jax.default_backend = lambda: 'gpu'"
  for prefix in ('', WITHOUT_THE_MODULE):
    result = run_python(prefix + pretend + UPDATE_SCRIPT)
    lines = script_lines(result)
    assert lines['loaded'] == 'False False'
    assert UNAVAILABLE not in result.stderr


def test_the_switch_turns_the_kernel_off_without_loading_it():
  result = run_python(UPDATE_SCRIPT, **{native.ENV_SWITCH: '0'})
  lines = script_lines(result)
  assert lines['available'] == 'False None'
  assert lines['update'] == xla_update_digest()
  assert lines['loaded'] == 'True False'  # looked at the switch, never imported the module
  assert UNAVAILABLE not in result.stderr


# Put before the script's imports, this makes the installed module say it was built against a
# jaxlib newer than this process's: built without build isolation, then jax downgraded.
BUILT_AGAINST_A_NEWER_JAXLIB = f"""
  import importlib
  importlib.import_module({native.MODULE!r}).build_jaxlib = '99.0.0'
"""


def test_a_kernel_built_against_a_newer_jaxlib_is_not_loaded(kernel):
  """XLA would refuse it and with it the whole CPU backend: XLA's products and a warning instead.

  The warning names both jaxlib versions and how to rebuild the kernel.
  """
  result = run_python(BUILT_AGAINST_A_NEWER_JAXLIB + UPDATE_SCRIPT)
  lines = script_lines(result)
  assert lines['available'] == 'False None'
  assert lines['update'] == xla_update_digest()
  assert result.stderr.count(UNAVAILABLE) == 1, result.stderr
  assert (
    f'built against jaxlib 99.0.0, which may be newer than the jaxlib {jaxlib.version.__version__}'
    in (result.stderr)
  )
  assert '--no-build-isolation' in result.stderr


def test_the_installed_kernel_says_which_jaxlib_it_was_built_against(kernel):
  module = sys.modules[native.MODULE]
  assert native._release(module.build_jaxlib) <= native._release(jaxlib.version.__version__)
  assert native._newer_than_runtime(module.build_jaxlib) is None
  assert native._newer_than_runtime(None) is not None  # a module from before the check
  assert native._newer_than_runtime('99.0.0') is not None
  assert native._newer_than_runtime('0.0.1') is None
  assert native._newer_than_runtime('0.10') is not None  # unreadable: too new
  assert native._release('0.12.1.dev20261201') == native._release('0.12.1+cuda') == (0, 12, 1)


def test_the_kernel_is_the_installed_module_and_nothing_is_compiled(kernel, tmp_path):
  """The kernel comes from the package's own extension module, imported as any module is.

  With no compiler on the ``PATH`` and an empty home directory, a process still has the kernel
  and writes nothing there: it is not built, nor cached, at import or trace.
  """
  module = sys.modules[native.MODULE]
  assert module.__spec__.name == native.MODULE
  assert Path(module.__file__).parent in [Path(path) for path in go._src.__path__]
  assert module.variant() == native.variant()
  home = tmp_path / 'home'
  home.mkdir()
  no_programs = tmp_path / 'no-programs'
  no_programs.mkdir()
  result = run_python(
    UPDATE_SCRIPT,
    PATH=str(no_programs),
    CXX='c++',
    HOME=str(home),
    XDG_CACHE_HOME=str(home / '.cache'),
  )
  lines = script_lines(result)
  assert lines['available'] == f'True {native.variant()}'
  assert lines['loaded'] == 'True True'
  assert UNAVAILABLE not in result.stderr
  assert list(home.iterdir()) == []


@pytest.mark.parametrize(
  'spec, reduction', [(P(None, None, None, 'x'), False), (P(None, None, 'x', None), True)]
)
def test_sharded_jit_keeps_the_shards(kernel, spec, reduction):
  """Columns sharded: each device sums its own columns. Rows sharded: partial sums, one psum."""
  mesh = Mesh(np.array(jax.devices()[:2]), ('x',))
  sharding = NamedSharding(mesh, spec)
  w, g, b = (jax.device_put(x, sharding) for x in random_arrays((3, 3, 8, 16)))
  step = jax.jit(native.column_products)
  text = step.lower(w, g, b).compile().as_text()
  assert 'grassmann_optax_column_gram' in text
  assert 'all-gather' not in text
  assert ('all-reduce' in text) == reduction
  expected, scales = reference_products(w, g, b)
  for got, want, scale in zip(step(w, g, b), expected, scales, strict=True):
    assert np.all(np.abs(np.ravel(got) - want) <= 1e-6 * scale + 1e-30)


@pytest.mark.parametrize(
  'shape, point_axes, spec, reduction',
  [
    ((8, 4, 16), (0, 2), P(None, 'x', None), False),  # heads sharded
    ((8, 4, 16), (0, 2), P('x', None, None), True),  # embed (a point axis) sharded
    ((8, 4, 16), (0, 2), P(None, None, 'x'), True),  # head_dim (a point axis) sharded
    ((4, 24, 10), (1,), P('x', None, None), False),  # stacked layers sharded
    ((4, 24, 10), (1,), P(None, None, 'x'), False),  # their columns sharded
    ((6, 40), (1,), P('x', None), False),  # rows sharded
    ((6, 40), (1,), P(None, 'x'), True),  # each row split
    ((6, 24), (1,), P(None, 'x'), True),  # each row split into rows of 12: XLA sums the shards
  ],
)
def test_sharded_jit_keeps_the_shards_of_any_layout(kernel, shape, point_axes, spec, reduction):
  """Batch axes stay sharded in the output; shards of point axes are added with one psum."""
  mesh = Mesh(np.array(jax.devices()[:2]), ('x',))
  sharding = NamedSharding(mesh, spec)
  w, g, b = (jax.device_put(x, sharding) for x in random_arrays(shape))
  step = jax.jit(lambda *x: native.column_products(*x, point_axes=point_axes))
  text = step.lower(w, g, b).compile().as_text()
  # Rows of 24 split in two are rows of 12 on each device: too short for the kernel.
  assert ('grassmann_optax_column_gram' in text) == (shape != (6, 24))
  assert 'all-gather' not in text
  assert ('all-reduce' in text) == reduction
  products = step(w, g, b)
  batch_spec = tuple(None if axis in point_axes else entry for axis, entry in enumerate(spec))
  assert products[0].sharding.is_equivalent_to(NamedSharding(mesh, P(*batch_spec)), len(shape))
  assert_exact(products, *reference_products(w, g, b, point_axes))


def test_inside_shard_map_data_parallel(kernel):
  """The usual data-parallel step: gradients averaged over devices, the update run on each."""
  mesh = Mesh(np.array(jax.devices()[:2]), ('data',))
  params = {'conv': go.unit_initializer()(jax.random.key(0), (3, 3, 4, 8))}
  grads = {'conv': 0.1 * jax.random.normal(jax.random.key(1), (2, 3, 3, 4, 8))}
  tx = go.sgdg(0.1, 0.2)
  state = tx.init(params)

  def step(params, state, grads):
    grads = jax.lax.pmean(jax.tree.map(lambda g: g[0], grads), 'data')
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  sharded = jax.jit(
    jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P('data')), out_specs=(P(), P()))
  )
  assert 'grassmann_optax_column_gram' in sharded.lower(params, state, grads).as_text('hlo')
  got, _ = sharded(params, state, grads)
  mean = {'conv': grads['conv'].mean(0)}
  updates, _ = tx.update(mean, state, params)
  np.testing.assert_allclose(
    got['conv'], optax.apply_updates(params, updates)['conv'], rtol=0, atol=1e-6
  )


VARIANT_SCRIPT = """
  import hashlib, jax, numpy as np
  from grassmann_optax._src import native
  print('variant', native.variant())
  layouts = [
    ((3, 3, 64, 128), None), ((130, 13), None), ((1, 640), None), ((5, 3, 7), None),
    ((768, 1200), None), ((300, 70), (1,)), ((64, 5, 37), (0, 2)), ((2, 40, 3, 1029), (1, 3)),
    ((400, 400), (0, 1)), ((90, 7, 6), (0, 2)), ((4, 30, 9), (1,)), ((20, 1029), (1,)),
  ]

  def random(shape, seed):
    return [jax.random.normal(key, shape) for key in jax.random.split(jax.random.key(seed), 3)]

  def fixed(shape, seed):
    # Float32 values made by integer arithmetic and one exact division: the same on every machine.
    n = int(np.prod(shape))
    i = np.arange(3 * n, dtype=np.int64) + 7919 * seed
    x = (((i * 2654435761) % 1000003) - 500001).astype(np.float64) / 262144.0
    return [x[k * n:(k + 1) * n].astype(np.float32).reshape(shape) for k in range(3)]

  digests = {'random': hashlib.sha256(), 'fixed': hashlib.sha256()}
  for seed, (shape, point_axes) in enumerate(layouts):
    axes = native.normalize_point_axes(len(shape), point_axes)
    assert native.kernel_layout(shape, axes) is not None, shape  # the kernel, not XLA
    products = jax.jit(lambda *x: native.column_products(*x, point_axes=point_axes))
    for name, arrays in (('random', random), ('fixed', fixed)):
      for product in products(*arrays(shape, seed)):
        digests[name].update(np.asarray(product).tobytes())
  for name, digest in digests.items():
    print(name, digest.hexdigest())
"""
# The products of the fixed arrays as the kernel returned them when it was compiled at first use
# with g++ 12 -O3 -ffp-contract=off, in both variants: the kernel does the same float32 operations
# in the same order on any machine and with any compiler that keeps the source's order.
FIXED_DIGEST = '62809725cb3a1162b72a84e6ffdfe930826f3efbd420fd9acad8d08d461d255c'


def test_the_instruction_set_variants_return_the_same_bits(kernel):
  """The AVX2 loops (where the processor has them) and the portable loops agree bit for bit.

  And both return the bits the kernel returned before it was built at install time. The layouts
  take the column loop (with panels of columns: 1200), the run loop (with tails and segments: 37,
  1029; per row: 70, 1029) and the column loop for short runs (6, 9), with one chunk or several.
  """
  runs = {
    name: run_python(VARIANT_SCRIPT, **env)
    for name, env in {'auto': {}, 'baseline': {native.ENV_VARIANT: 'baseline'}}.items()
  }
  for result in runs.values():
    assert result.returncode == 0, result.stderr
  lines = {name: dict(line.split() for line in r.stdout.splitlines()) for name, r in runs.items()}
  assert lines['baseline']['variant'] == 'baseline'
  assert lines['auto']['variant'] in ('avx2', 'baseline')
  if REQUIRE and platform.machine() in ('x86_64', 'AMD64') and 'avx2' in cpu_flags():
    assert lines['auto']['variant'] == 'avx2'
  assert lines['auto']['random'] == lines['baseline']['random']
  assert lines['auto']['fixed'] == lines['baseline']['fixed'] == FIXED_DIGEST


def cpu_flags() -> str:
  try:
    with open('/proc/cpuinfo') as cpuinfo:
      return next((line for line in cpuinfo if line.startswith('flags')), '')
  except OSError:
    return ''


def test_the_switches_are_a_namespace_of_their_own():
  """``grassmann_optax.cpu_kernel``, each with a runnable example; none at the API root."""
  assert go.cpu_kernel.__all__ == ('available', 'column_products', 'disabled', 'variant')
  for name in go.cpu_kernel.__all__:
    assert '>>>' in getattr(go.cpu_kernel, name).__doc__, name
  for name in ('column_products', 'cpu_kernel_disabled', 'cpu_kernel_variant'):
    assert name not in go.__all__ and not hasattr(go, name)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16, jnp.int32, jnp.bool_])
@pytest.mark.parametrize('shape', [(5, 3, 4), (7,), (3, 0, 2), (1, 6)])
def test_unstack_copies_out_every_slice_in_one_call(kernel, dtype, shape):
  x = jnp.asarray(np.arange(np.prod(shape)).reshape(shape) % 11 - 4.5).astype(dtype)
  step = jax.jit(native.unstack)
  text = step.lower(x).compile().as_text()
  if x.size:  # XLA writes empty results without calling anything
    assert text.count(f'custom_call_target="{native.UNSTACK_TARGET}"') == 1
  assert ' slice(' not in text
  pieces = step(x)
  assert len(pieces) == shape[0]
  for i, piece in enumerate(pieces):
    assert piece.dtype == x.dtype and piece.shape == shape[1:]
    np.testing.assert_array_equal(np.asarray(piece), np.asarray(x[i]))


def test_unstack_without_the_kernel_is_the_slices():
  x = jnp.arange(12.0).reshape(4, 3)
  with native.disabled():
    text = jax.jit(native.unstack).lower(x).compile().as_text()
    pieces = jax.jit(native.unstack)(x)
  assert native.UNSTACK_TARGET not in text
  for i, piece in enumerate(pieces):
    np.testing.assert_array_equal(piece, x[i])


def test_unstack_under_vmap_jvp_and_grad(kernel):
  x = jax.random.normal(jax.random.key(0), (3, 4, 5))  # vmap over 3 stacks of 4 leaves
  batched = jax.jit(jax.vmap(native.unstack))(x)
  for i in range(4):
    np.testing.assert_array_equal(batched[i], x[:, i])
  weights = jnp.arange(1.0, 5.0)

  def loss(x):
    return sum(w * jnp.sum(piece**2) for w, piece in zip(weights, native.unstack(x), strict=True))

  grad = jax.jit(jax.grad(loss))(x[0])
  np.testing.assert_allclose(grad, 2 * weights[:, None] * x[0], rtol=1e-6)
  _, tangent = jax.jvp(native.unstack, (x[0],), (jnp.ones_like(x[0]),))
  assert all(bool(jnp.all(t == 1)) for t in tangent)


@pytest.mark.parametrize('name', ['sgdg', 'adamg'])
def test_a_tree_of_many_equal_leaves_compiles_no_kernel_per_leaf(kernel, name):
  """The step of many equal small leaves: their stacks are split by the unstack kernel, so the
  compiled program has as many slices for 60 leaves as for 30 (each was a kernel LLVM compiled on
  its own), and no reduction that XLA:CPU hands to YNNPACK (50x slower on these shapes)."""

  def compiled(count):
    params = {
      f'leaf{i:02d}': go.unit_initializer()(jax.random.key(i), (8, 4)) for i in range(count)
    }
    labels = jax.tree.map(lambda _: go.GRASSMANN, params)
    make = {'sgdg': go.sgdg, 'adamg': go.adamg}[name]
    tx = make(0.01, 0.05, omega=0, param_labels=labels)  # no products WᵀW: no dot for YNNPACK

    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    return jax.jit(step).lower(params, tx.init(params), params).compile().as_text()

  few, many = compiled(30), compiled(60)
  assert many.count(f'custom_call_target="{native.UNSTACK_TARGET}"') >= 2  # updates, buffers
  assert many.count(' slice(') == few.count(' slice(')


@pytest.mark.parametrize('name', ['sgdg', 'adamg'])
def test_the_overflow_rescue_reserves_memory_for_one_leaf_at_a_time(name):
  """All leaves of a dtype share one per-point computation, but each leaf tests its own sums for
  overflow and rescales its own gradient (F10): a ``lax.cond`` reserves memory for its rare
  branch too, and one test for the whole group reserved a scaled copy of every gradient at
  once (138 MiB on WRN-28-10, against 14 MiB)."""
  leaves = 6
  params = {
    f'leaf{i}': go.unit_initializer()(jax.random.key(i), (64, 1200)) for i in range(leaves)
  }  # 76,800 elements each: not stacked
  labels = jax.tree.map(lambda _: go.GRASSMANN, params)
  tx = {'sgdg': go.sgdg, 'adamg': go.adamg}[name](0.01, 0.05, omega=0, param_labels=labels)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params).compile()
  leaf_bytes = 64 * 1200 * 4
  assert compiled.memory_analysis().temp_size_in_bytes < 3 * leaf_bytes


@pytest.mark.parametrize('barrier', ['materialized', 'per_point'])
def test_the_fusion_barriers_stay_with_xla(barrier):
  """The trivial reductions that keep the element passes apart stay reductions in the compiled
  program, and XLA:CPU's own (a sum there went to YNNPACK: 5.3 ms against 0.1 ms here)."""
  from grassmann_optax._src import tuning

  x = jax.random.normal(jax.random.key(0), (500, 64, 16))
  fn = {
    'materialized': lambda x: tuning.materialized(2 * x)[3] + 1,
    'per_point': lambda x: tuning.per_point(x[0] + 1, 2 * x[1], x[2])[1:] * x[4],
  }[barrier]
  text = jax.jit(fn).lower(x).compile().as_text()
  assert ' reduce(' in text
  assert '__ynn_fusion' not in text
  np.testing.assert_array_equal(jax.jit(fn)(x), fn(x))


@pytest.mark.parametrize(
  'spec, gathered', [(P(None, 'x', None), False), (P(None, None, 'x'), False), (P('x'), True)]
)
def test_sharded_unstack_keeps_the_shards(kernel, spec, gathered):
  """Each device splits its own shard; only a stack axis that is itself sharded is gathered."""
  mesh = Mesh(np.array(jax.devices()[:2]), ('x',))
  x = jax.device_put(jnp.arange(4 * 8 * 6.0).reshape(4, 8, 6), NamedSharding(mesh, spec))
  step = jax.jit(native.unstack)
  text = step.lower(x).compile().as_text()
  assert native.UNSTACK_TARGET in text
  assert ('all-gather' in text) == gathered
  pieces = step(x)
  for i, piece in enumerate(pieces):
    np.testing.assert_array_equal(piece, np.asarray(x)[i])
    if not gathered:
      assert piece.sharding.is_equivalent_to(NamedSharding(mesh, P(*spec[1:])), 2)
