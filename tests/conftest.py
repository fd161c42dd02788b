"""Shared test setup: two fake CPU devices and one compilation cache, before JAX is imported.

The multi-device paths (pmap and sharded data parallelism) are tested on CPU with fake devices,
so the tests need more than one device; XLA reads the flag once, at backend start.

Most of the suite's time is XLA compiling: many tests build the same optimizer on the same shapes
(a new closure each time, so JAX's in-memory cache misses), and the training tests build the same
steps in this process and in subprocesses. A persistent cache, new and empty for each session and
shared with every subprocess through the environment, compiles each program once.
"""

import atexit
import os
import shutil
import tempfile

# The suite's programs are tiny, so XLA:CPU spends longer compiling them than running them; the
# tests compare results, never speed, so LLVM optimises at level 1, not 3 (a fifth less time for
# the optimizer tests, and the training runs are no slower). XLA:CPU keeps IEEE semantics at every
# level (no fast math), and every bit-for-bit comparison is between two programs compiled alike.
# GRASSMANN_TESTS_OPTIMIZED=1 compiles as users do; CI's second step runs that way.
_FAST_COMPILE = (
  ['--xla_backend_optimization_level=1']
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

if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache = tempfile.mkdtemp(prefix='grassmann-jax-cache-')
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
