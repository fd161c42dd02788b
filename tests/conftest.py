"""Shared test setup: two fake CPU devices, configured before JAX is imported anywhere.

The multi-device paths (pmap and sharded data parallelism) are tested on CPU with fake devices,
so the tests need more than one device; XLA reads the flag once, at backend start.
"""

import os

os.environ['XLA_FLAGS'] = ' '.join(
  filter(None, [os.environ.get('XLA_FLAGS', ''), '--xla_force_host_platform_device_count=2'])
)
os.environ['JAX_PLATFORMS'] = 'cpu'
