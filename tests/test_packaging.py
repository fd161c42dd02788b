"""The wheel people install: the library alone, typed, licensed, with one version, and it imports.

The wheel is the one CI built with ``python -m build`` (named by ``GRASSMANN_OPTAX_WHEEL``), or
else one built here from the checkout without the CPU kernel
(``GRASSMANN_OPTAX_BUILD_CPU_KERNEL=0``: no CMake, no compiler, a second or two). It is installed
into a fresh virtual environment without anything downloaded: pip installs the wheel alone, and
the environment sees the dependencies of the one running the tests.
"""

import email.parser
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import grassmann_optax as go
from grassmann_optax._src import native

ROOT = Path(__file__).resolve().parents[1]
REQUIRE_KERNEL = os.environ.get('GRASSMANN_REQUIRE_CPU_KERNEL') == '1'
TIMEOUT_S = 600


def run(*command, **kwargs) -> subprocess.CompletedProcess:
  result = subprocess.run(
    [str(part) for part in command],
    capture_output=True,
    text=True,
    timeout=TIMEOUT_S,
    check=False,
    **kwargs,
  )
  assert result.returncode == 0, f'{command} failed:\n{result.stdout}\n{result.stderr}'
  return result


@pytest.fixture(scope='module')
def wheel(tmp_path_factory) -> Path:
  if given := os.environ.get('GRASSMANN_OPTAX_WHEEL'):
    return Path(given)
  out = tmp_path_factory.mktemp('dist')
  run(
    sys.executable,
    *('-m', 'pip', 'wheel', '--quiet', '--no-deps', '--no-build-isolation', '--no-index'),
    *('--wheel-dir', out, ROOT),
    env={**os.environ, native.ENV_BUILD: '0'},
  )
  (built,) = out.glob('*.whl')
  return built


@pytest.fixture(scope='module')
def names(wheel) -> list[str]:
  with zipfile.ZipFile(wheel) as archive:
    return archive.namelist()


@pytest.fixture(scope='module')
def metadata(wheel, names):
  (path,) = [name for name in names if name.endswith('.dist-info/METADATA')]
  with zipfile.ZipFile(wheel) as archive:
    return email.parser.Parser().parsestr(archive.read(path).decode())


def has_kernel(names) -> bool:
  return any(name.startswith('grassmann_optax/_src/_column_gram.') for name in names)


def test_the_wheel_holds_the_library_only(wheel, names, metadata):
  """No ``train`` package, no console script, no C++ source or header; the licence and py.typed."""
  dist_info = f'grassmann_optax-{metadata["Version"]}.dist-info'
  assert {name.split('/')[0] for name in names} == {'grassmann_optax', dist_info}
  assert 'grassmann_optax/__init__.py' in names and 'grassmann_optax/py.typed' in names
  assert f'{dist_info}/entry_points.txt' not in names
  assert not [name for name in names if name.endswith(('.cc', '.h'))]
  with zipfile.ZipFile(wheel) as archive:
    assert archive.read(f'{dist_info}/licenses/LICENSE') == (ROOT / 'LICENSE').read_bytes()
  if REQUIRE_KERNEL and 'GRASSMANN_OPTAX_WHEEL' in os.environ:
    assert has_kernel(names), 'the wheel built by CI, where a compiler exists, has no CPU kernel'


def test_the_metadata_matches_the_source(metadata):
  assert metadata['Name'] == 'grassmann_optax'
  assert metadata['Version'] == go.__version__
  assert metadata['License-Expression'] == 'Apache-2.0'
  assert metadata['Requires-Python'] == '>=3.11'  # jax>=0.10.2 needs 3.11
  assert 'Typing :: Typed' in metadata.get_all('Classifier')
  assert metadata.get_all('Project-URL')
  license_text = ' '.join((ROOT / 'LICENSE').read_text().split())
  assert license_text.startswith('Apache License Version 2.0, January 2004')
  assert 'END OF TERMS AND CONDITIONS' in license_text


INSTALLED_SCRIPT = """
import importlib.metadata, importlib.resources, importlib.util, sys
import jax, jax.numpy as jnp
import grassmann_optax as go
print('file', go.__file__)
print('version', go.__version__, importlib.metadata.version('grassmann_optax'))
print('typed', importlib.resources.files('grassmann_optax').joinpath('py.typed').is_file())
print('train', importlib.util.find_spec('train') is not None)
print('kernel', go.cpu_kernel.available())
w = go.unit_initializer()(jax.random.key(0), (27, 16))
ww, wg, *_ = go.cpu_kernel.column_products(w, 2 * w, jnp.zeros_like(w))
print('products', float(jnp.max(jnp.abs(ww - 1))), float(jnp.max(jnp.abs(wg - 2))))
"""


def test_the_wheel_installs_into_a_fresh_environment_and_imports(wheel, names, tmp_path):
  venv = tmp_path / 'venv'
  run(sys.executable, '-m', 'venv', '--without-pip', venv)
  python = venv / 'bin' / 'python'
  where = 'import sysconfig; print(sysconfig.get_path("purelib"))'
  purelib = Path(run(python, '-c', where).stdout.strip())
  # This environment's packages, after the fresh environment's own (.pth directories are not
  # scanned for .pth files, so this environment's editable install stays out of sight).
  ours = sorted({sysconfig.get_path('purelib'), sysconfig.get_path('platlib')})
  (purelib / 'dependencies.pth').write_text('\n'.join(ours) + '\n')
  run(
    sys.executable,
    *('-m', 'pip', '--python', python, 'install', '--quiet', '--no-deps', '--no-index', wheel),
  )
  env = {key: value for key, value in os.environ.items() if key != 'PYTHONPATH'}
  result = run(python, '-W', 'ignore', '-c', INSTALLED_SCRIPT, cwd=tmp_path, env=env)
  lines = dict(line.split(' ', 1) for line in result.stdout.splitlines())
  assert Path(lines['file']).is_relative_to(purelib)
  installed, recorded = lines['version'].split()
  assert installed == recorded == go.__version__
  assert lines['typed'] == 'True'
  assert lines['train'] == 'False'
  assert lines['kernel'] == str(has_kernel(names))
  assert all(float(error) < 1e-6 for error in lines['products'].split())
