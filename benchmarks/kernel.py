"""The CPU kernel's pass of inner products against XLA reading the same arrays, as ratios.

  python -m benchmarks.kernel            # leaves of (3, 3, 640, 640), WRN-28-10's largest
  python -m benchmarks.kernel --quick    # smaller leaves and fewer repeats

Every fused SGD-G/Adam-G step first reads each manifold leaf's ``w``, ``g`` and buffer ``b`` for
the six inner products of each point ((F1) of ``docs/algorithm.md``; Cho & Lee, "Riemannian
approach to batch normalization", NeurIPS 2017, arXiv:1709.09603). This times that pass alone:
``go.cpu_kernel.column_products`` on one leaf, and on two in one jitted call (the two cores then
share the memory), against a jitted XLA loop that reads the same three arrays and reduces them
per column (one sum, ``Σ w·g + b·b``): what reading them costs XLA. A ratio near 1 says the
kernel's pass is bound by memory, as the rest of the update is.
"""

import argparse
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

import grassmann_optax as go
from benchmarks import common


def _runner(fn: Callable, args) -> Callable[[int], float]:
  def run(count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
      out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / count

  return run


def run(quick: bool) -> dict:
  shape = (3, 3, 64, 64) if quick else (3, 3, 640, 640)
  keys = jax.random.split(jax.random.key(0), 6)
  arrays = [jax.random.normal(key, shape) for key in keys]
  columns = tuple(range(len(shape) - 1))
  kernel = go.cpu_kernel.column_products
  read = lambda w, g, b: jnp.sum(w * g + b * b, axis=columns)
  runs = {}
  for leaves, label in ((1, '1 leaf'), (2, '2 leaves')):
    args = arrays[: 3 * leaves]
    for name, fn in (('kernel', kernel), ('XLA read', read)):
      step = jax.jit(lambda *a, fn=fn: [fn(*a[i : i + 3]) for i in range(0, len(a), 3)])
      jax.block_until_ready(step(*args))
      runs[f'{name}, {label}'] = _runner(step, args)
  times = common.time_interleaved(runs, repeats=3 if quick else 15, sample_s=0.05 if quick else 0.3)
  gigabytes = 3 * 4 * jnp.size(arrays[0]) / 1e9
  return {
    'machine': common.machine(),
    'shape': shape,
    'times': {name: t['median'] for name, t in times.items()},
    'read_gb_per_s': {
      name: gigabytes * (2 if '2 leaves' in name else 1) / t['median'] for name, t in times.items()
    },
    'ratios': {
      f'kernel / XLA read, {n}': common.ratio(times, f'kernel, {n}', f'XLA read, {n}')
      for n in ('1 leaf', '2 leaves')
    },
  }


def format_report(report: dict) -> str:
  lines = [
    common.machine_line(report['machine']),
    f'leaves of {report["shape"]}, three float32 arrays each',
  ]
  for name, seconds in report['times'].items():
    rate = report['read_gb_per_s'][name]
    lines.append(f'  {name:24s} {seconds * 1e3:8.3f} ms   {rate:5.1f} GB/s read')
  for name, r in report['ratios'].items():
    lines.append(f'  {name:32s} {r["ratio"]:.3f} ({r["low"]:.3f}-{r["high"]:.3f})')
  return '\n'.join(lines)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='smaller leaves, fewer repeats')
  return parser.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  if not go.cpu_kernel.available():
    raise SystemExit(
      'The CPU kernel is not installed or is switched off (see docs/kernel.md): nothing to time.'
    )
  report = run(args.quick)
  print(format_report(report))
  return report


if __name__ == '__main__':
  main()
