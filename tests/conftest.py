"""Shared test setup: two fake CPU devices and one compilation cache, before JAX is imported.

The multi-device paths (pmap and sharded data parallelism) are tested on CPU with fake devices,
so the tests need more than one device; XLA reads the flag once, at backend start.

More than half of the suite's time is XLA compiling: many tests build the same optimizer on the same
shapes (a new closure each time, so JAX's in-memory cache misses), and the training tests build the
same steps in this process and in subprocesses. A persistent compilation cache, shared with every
subprocess through the environment, compiles each program once; it lives in the checkout's
``.pytest_cache`` and is kept between runs, so a second run of the suite compiles only what changed
(8.2 min for the first run on the project's 2-core machine, 4.1 min for the next).
``pytest --cache-clear`` empties it; ``JAX_COMPILATION_CACHE_DIR`` in the environment replaces it.
Its key is the compiled program, the compiler's flags and the jax and jaxlib versions, so an entry
is only ever reused for the same program; the CPU kernel's handlers are looked up by name when an
executable is loaded, so a rebuilt kernel is the one that runs.
"""

import atexit
import os
import shutil
import tempfile

# The suite's programs are tiny, so XLA:CPU spends longer compiling them than running them; the
# tests compare results, never speed, so XLA's backend optimisation level is 0, not the default 3:
# about a third less time than at level 1 for compile-bound tests (21 s against 28-32 s for two
# of them, cold), and the tiny models of the training tests run as fast; a step of the default
# model takes seconds (a docs example trains it: test_docs.py shortens that run). XLA:CPU keeps
# IEEE semantics at every level (no fast math), and every bit-for-bit comparison is between two
# programs compiled alike.
# GRASSMANN_TESTS_OPTIMIZED=1 compiles as users do; CI's second step runs that way.
_FAST_COMPILE = (
  ['--xla_backend_optimization_level=0']
  if os.environ.get('GRASSMANN_TESTS_OPTIMIZED', '0').lower() in ('0', 'false', 'no', 'off', '')
  else []
)
os.environ['XLA_FLAGS'] = ' '.join(
  filter(
    None,
    [os.environ.get('XLA_FLAGS', ''), '--xla_force_host_platform_device_count=2', *_FAST_COMPILE],
  )
)
os.environ['JAX_PLATFORMS'] = 'cpu'


def _compilation_cache() -> str:
  """The checkout's cache under ``.pytest_cache/d`` (which ``--cache-clear`` removes), or, where
  the checkout cannot be written, a new one for this session only."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  path = os.path.join(root, '.pytest_cache', 'd', 'jax-compilation-cache')
  try:
    os.makedirs(path, exist_ok=True)
    if os.access(path, os.W_OK):
      return path
  except OSError:
    pass
  path = tempfile.mkdtemp(prefix='grassmann-jax-cache-')
  atexit.register(shutil.rmtree, path, ignore_errors=True)
  return path


if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _compilation_cache()
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  # A run of the suite adds about 45 MB. JAX can evict the oldest entries itself, but its
  # bookkeeping (a file lock, and a listing of the folder, at every entry written) made a run
  # slower than one without the cache; so the session that starts the workers empties the cache
  # once it holds more than 1 GiB.
  if 'PYTEST_XDIST_WORKER' not in os.environ:
    _entries = list(os.scandir(os.environ['JAX_COMPILATION_CACHE_DIR']))
    if sum(entry.stat().st_size for entry in _entries if entry.is_file()) > 1 << 30:
      for entry in _entries:
        if entry.is_file():
          os.remove(entry.path)
