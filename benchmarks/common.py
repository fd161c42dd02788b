"""What the benchmarks share: parameter trees, interleaved timing and ratios, the machine.

Only the public API of grassmann_optax and Optax is used, as a user would. Timings are medians of
interleaved repeats in one process: a repeat runs every candidate once, one after the other, so
each ratio compares samples taken close together on a shared machine, and the lowest and highest
ratio within a repeat show how far the machine's drift moves it.
"""

import argparse
import concurrent.futures
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import grassmann_optax as go

# Command lines -------------------------------------------------------------------------------


def check_names(parser: argparse.ArgumentParser, flag: str, value: str, choices) -> None:
  """Stops with a usage error naming each comma-separated name in ``value`` not in ``choices``,
  or named twice."""
  names = value.split(',')
  unknown = set(names) - set(choices)
  if unknown:
    parser.error(f'{flag}: unknown {sorted(unknown)}; choose from {",".join(choices)}')
  twice = sorted({name for name in names if names.count(name) > 1})
  if twice:
    parser.error(f'{flag}: {",".join(twice)} named twice')


def check_json(parser: argparse.ArgumentParser, path: Path | None) -> None:
  """Stops with a usage error before any timing where ``--json`` could not be written at the end."""
  if path is not None and (path.is_dir() or not path.parent.is_dir()):
    parser.error(f'--json={path}: give a file in an existing folder')


# Parameter trees, as shapes ------------------------------------------------------------------


def wide_resnet_shapes(depth: int = 28, widen_factor: int = 10, classes: int = 10) -> dict:
  """The parameter shapes of a Wide ResNet (depth 6N+4; the paper's WRN-28-10 by default).

  Flax layout: ``conv0``; per block ``bn1`` (on the block's input width), ``conv1``, ``bn2``,
  ``conv2`` and a 1x1 ``projection`` where the width or the stride changes; ``bn_final``, ``fc``.
  """
  array = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  norm = lambda width: {'scale': array(width), 'bias': array(width)}
  params: dict[str, Any] = {'conv0': {'kernel': array(3, 3, 3, 16)}}
  width_in = 16
  for group, width in enumerate((16 * widen_factor, 32 * widen_factor, 64 * widen_factor), 1):
    for block in range((depth - 4) // 6):
      stride = 2 if group > 1 and block == 0 else 1
      params[f'group{group}_block{block}'] = {
        'bn1': norm(width_in),
        'conv1': {'kernel': array(3, 3, width_in, width)},
        'bn2': norm(width),
        'conv2': {'kernel': array(3, 3, width, width)},
        **(
          {'projection': {'kernel': array(1, 1, width_in, width)}}
          if width_in != width or stride != 1
          else {}
        ),
      }
      width_in = width
  params['bn_final'] = norm(width_in)
  params['fc'] = {'kernel': array(width_in, classes), 'bias': array(classes)}
  return params


def gpt2_shapes(
  layers: int = 12, width: int = 768, heads: int = 12, vocab: int = 50257, context: int = 1024
) -> dict:
  """The parameter shapes of a GPT-2 style decoder (GPT-2 small by default: 124M parameters).

  Per layer: LayerNorms ``ln_1``, ``ln_2``; ``DenseGeneral`` query, key and value kernels
  ``(width, heads, head_dim)``, the output kernel ``(heads, head_dim, width)``, and the MLP's
  ``fc`` ``(width, 4 width)`` and ``proj`` ``(4 width, width)``, each with a bias.
  """
  array = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  norm = lambda: {'scale': array(width), 'bias': array(width)}
  head_dim = width // heads
  params: dict[str, Any] = {
    'wte': array(vocab, width),
    'wpe': array(context, width),
    'ln_f': norm(),
  }
  for index in range(layers):
    params[f'h{index}'] = {
      'ln_1': norm(),
      **{
        name: {'kernel': array(width, heads, head_dim), 'bias': array(heads, head_dim)}
        for name in ('query', 'key', 'value')
      },
      'out': {'kernel': array(heads, head_dim, width), 'bias': array(width)},
      'ln_2': norm(),
      'fc': {'kernel': array(width, 4 * width), 'bias': array(4 * width)},
      'proj': {'kernel': array(4 * width, width), 'bias': array(width)},
    }
  return params


def gpt2_groups(shapes: Any) -> tuple[Any, Any]:
  """Labels and point axes of a normalised Transformer (nGPT and QK-norm style): the rows of
  the embeddings, each head of the query, key and value kernels, the columns of the others."""

  def names(path):
    return [getattr(key, 'key', '') for key in path]

  def label(path, leaf):
    del leaf
    return go.GRASSMANN if names(path)[-1] in ('kernel', 'wte', 'wpe') else go.EUCLIDEAN

  def axes(path, leaf):
    del leaf
    name = names(path)
    if name[-1] in ('wte', 'wpe'):
      return (1,)
    if name[-1] == 'kernel' and name[-2] in ('query', 'key', 'value'):
      return (0, 2)
    return None

  with_path = jax.tree_util.tree_map_with_path
  return with_path(label, shapes), with_path(axes, shapes)


def many_leaves_shapes(count: int = 500, shape: tuple[int, ...] = (64, 16)) -> dict:
  """``count`` equal leaves, as a Transformer of many small layers has."""
  return {f'leaf{i:04d}': jax.ShapeDtypeStruct(shape, jnp.float32) for i in range(count)}


def parameters(shapes: Any, labels: Any, point_axes: Any = None, seed: int = 0) -> Any:
  """Random arrays of ``shapes``: unit points on the manifold leaves, ``0.05·N(0, 1)`` elsewhere.

  Drawn with NumPy and put on the device once, so no program is compiled per leaf shape.
  """
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree.flatten(shapes)
  label_leaves = treedef.flatten_up_to(labels)
  axes = [None] * len(leaves) if point_axes is None else treedef.flatten_up_to(point_axes)
  out = []
  for shape, label, spec in zip(leaves, label_leaves, axes, strict=True):
    x = rng.standard_normal(shape.shape).astype(np.float32)
    if label == go.GRASSMANN:
      reduce = tuple(range(x.ndim - 1)) if spec is None else spec
      x /= np.sqrt(np.sum(x * x, axis=reduce, keepdims=True))
    else:
      x *= 0.05
    out.append(jnp.asarray(x))
  return treedef.unflatten(out)


def gradients(params: Any, seed: int = 1) -> Any:
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda p: jnp.asarray(1e-2 * rng.standard_normal(p.shape).astype(np.float32)), params
  )


def nbytes(tree: Any) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, 'dtype'))


# Timing ----------------------------------------------------------------------------------------


def update_step(tx: optax.GradientTransformation) -> Callable:
  """``(params, state, grads) -> (params, state)``: jitted, params and state donated."""

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(0, 1))


def compile_updates(candidates: Mapping[str, Callable], params: Any, grads: Sequence[Any]) -> dict:
  """``{name: (run, compile_seconds)}``: each candidate's update compiled on its own params.

  ``run(n)`` runs ``n`` steps from the carried state, taking the gradient trees of ``grads`` in
  turn, and returns the seconds per step. Two random gradients in turn, not one: steps of one
  fixed gradient turn every manifold point towards it within tens of steps, until the gradient
  lies along the point, which a weight that feeds a BatchNorm never sees (its gradient is
  orthogonal to it) and which the G(1, n) steps meet with an extra pass ((F13) of
  ``docs/algorithm.md``). XLA compiles outside the GIL, so the candidates compile on all cores
  at once; each compile time is its own wall time.
  """

  def build(item):
    name, make = item
    tx = make()
    own = jax.tree.map(jnp.copy, params)
    state = tx.init(own)
    start = time.perf_counter()
    compiled = update_step(tx).lower(own, state, grads[0]).compile()
    return name, compiled, [(own, state), 0], time.perf_counter() - start

  def runner(compiled, box):
    def run(steps: int) -> float:
      carry, done = box  # the gradients take turns across calls too (a call may be one step)
      start = time.perf_counter()
      for i in range(done, done + steps):
        carry = compiled(*carry, grads[i % len(grads)])
      jax.block_until_ready(carry)
      box[:] = carry, done + steps
      return (time.perf_counter() - start) / steps

    return run

  out = {}
  with concurrent.futures.ThreadPoolExecutor(max_workers=usable_cores()) as pool:
    for name, compiled, box, seconds in pool.map(build, candidates.items()):
      out[name] = (runner(compiled, box), seconds)
  return out


def time_interleaved(runs: Mapping[str, Callable], *, repeats: int, sample_s: float) -> dict:
  """Seconds per step of each run: median, and the samples (one per repeat)."""
  names = list(runs)
  per_sample = {}
  for name in names:
    warm = min(runs[name](1) for _ in range(2))
    per_sample[name] = max(1, round(sample_s / warm))
  samples: dict[str, list[float]] = {name: [] for name in names}
  for repeat in range(repeats):
    for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
      samples[name].append(runs[name](per_sample[name]))
  return {name: {'median': statistics.median(s), 'samples': s} for name, s in samples.items()}


def ratio(times: Mapping[str, Any], num: str, den: str) -> dict:
  """``median(num)/median(den)`` and its lowest and highest value within one repeat."""
  per_repeat = [a / b for a, b in zip(times[num]['samples'], times[den]['samples'], strict=True)]
  return {
    'ratio': times[num]['median'] / times[den]['median'],
    'low': min(per_repeat),
    'high': max(per_repeat),
  }


def usable_cores() -> int:
  """The cores this process may run on (``taskset`` and cgroups included), not the machine's."""
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1


def machine_line(m: Mapping[str, Any]) -> str:
  """The first line of every report: what ran it (:func:`machine`)."""
  load = m['load_average']
  load = 'unknown' if load is None else ', '.join(f'{value:.2f}' for value in load)
  return (
    f'machine: {m["processor"]} ({m["cpu_count"]} cores), backend {m["backend"]} '
    f'({m["devices"]} × {m["device"]}), jax {m["jax"]}, optax {m["optax"]}, '
    f'CPU kernel {m["cpu_kernel"]}, load average {load}'
  )


def machine() -> dict[str, Any]:
  processor = platform.processor()
  if os.path.exists('/proc/cpuinfo'):
    with open('/proc/cpuinfo') as cpuinfo:
      found = [line.split(':', 1)[1].strip() for line in cpuinfo if line.startswith('model name')]
    processor = found[0] if found else processor
  devices = jax.devices()
  return {
    'processor': processor,
    'cpu_count': usable_cores(),
    'backend': jax.default_backend(),
    'device': devices[0].device_kind if devices else '',
    'devices': len(devices),
    'jax': jax.__version__,
    'optax': optax.__version__,
    'cpu_kernel': go.cpu_kernel.variant(),
    'load_average': list(os.getloadavg()) if hasattr(os, 'getloadavg') else None,
  }
