"""Training speed on whatever accelerator is present: images per second, and the update alone.

  python -m benchmarks.device           # WRN-28-10 at batch 128, each layout and optimizer
  python -m benchmarks.device --quick   # WRN-10-1 at batch 16 (a check that it runs)

The batch is split over the devices: by default as many of them as divide it (all 8 of a host of
8, 4 of a host of 6), or ``--num_devices``.

For each optimizer (the paper's SGD baseline, SGD-G and Adam-G with their CIFAR recipes, ω = 0.1)
and each layout of the training program (``pmap``: the state replicated, the batch split over the
devices; ``sharded``: one ``jit`` program, the batch split over a mesh; ``fsdp`` where the program
has it: parameters and optimizer state split too), one training step (forward, backward and
update) on synthetic CIFAR-sized images is timed, interleaved over repeats, and reported in images
per second with its ratio to SGD. The update alone is ``benchmarks.update``'s WRN section.
"""

import argparse
import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

import grassmann_optax as go
from benchmarks import common, update
from train import config as config_lib
from train import parallel as parallel_lib
from train import train as train_lib

OPTIMIZERS = ('sgd', 'sgdg', 'adamg')  # each with the training program's CIFAR-10 recipe
IMAGE_SHAPE = (32, 32, 3)
# (depth, widen factor, global batch)
QUICK, FULL = (10, 1, 16), (28, 10, 128)


def device_count(batch: int, available: int) -> int:
  """The most devices, of ``available``, that split ``batch`` evenly."""
  return max(count for count in range(1, available + 1) if batch % count == 0)


def layouts() -> tuple[str, ...]:
  return tuple(config_lib.PARALLEL)


def training_step(name: str, parallel: str, depth: int, width: int, batch: int, devices):
  """A compiled training step of ``name`` in layout ``parallel``; returns ``run(n)`` (s/step)."""
  config = config_lib.get_config(
    data='cifar10',
    optimizer=name,
    model='resnet',
    depth=depth,
    widen_factor=width,
    batch_size=batch,
    parallel=parallel,
    num_devices=len(devices),
  )
  model = train_lib.create_model(config, num_classes=10)
  shapes = train_lib.parameter_shapes(model, (1, *IMAGE_SHAPE))
  labels = train_lib.parameter_labels(config, shapes)
  schedules = train_lib.create_learning_rate_fns(config, num_train=50_000)
  tx = train_lib.create_optimizer(config, schedules, labels)
  state = train_lib.create_train_state(jax.random.key(0), model, (1, *IMAGE_SHAPE), labels, tx)
  layout = parallel_lib.create_parallel(config, devices, train_lib.train_step, train_lib.eval_step)
  state = layout.put_state(jax.device_get(state))
  rng = np.random.default_rng(0)
  images = rng.standard_normal((batch, *IMAGE_SHAPE)).astype(np.float32)
  targets = rng.integers(0, 10, batch).astype(np.int32)
  images, targets = layout.put_batch(images, targets)
  key = jax.random.key(1)
  start = time.perf_counter()
  state, metrics = layout.train_step(state, images, targets, key)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  box = [state]

  def run(steps: int) -> float:
    state = box[0]
    begin = time.perf_counter()
    for _ in range(steps):
      state, metrics = layout.train_step(state, images, targets, key)
    jax.block_until_ready(metrics)
    box[0] = state
    return (time.perf_counter() - begin) / steps

  return run, compile_s


def train_section(depth, width, batch, devices, *, repeats, sample_s, parallels=None) -> dict:
  parallels = parallels or layouts()
  runs, compile_s = {}, {}
  for parallel in parallels:
    for name in OPTIMIZERS:
      key = f'{name}, {parallel}'
      runs[key], compile_s[key] = training_step(name, parallel, depth, width, batch, devices)
  times = common.time_interleaved(runs, repeats=repeats, sample_s=sample_s)
  out = {
    'batch': batch,
    'devices': len(devices),
    'devices_present': len(jax.devices()),
    'images_per_s': {},
    'compile_s': compile_s,
  }
  for key, t in times.items():
    out['images_per_s'][key] = batch / t['median']
  out['ratios'] = {
    f'{name} / sgd, {parallel}': common.ratio(times, f'{name}, {parallel}', f'sgd, {parallel}')
    for parallel in parallels
    for name in ('sgdg', 'adamg')
  }
  return out


def run(
  quick: bool, parallels=None, with_update: bool = True, num_devices: int | None = None
) -> dict[str, Any]:
  repeats, sample_s = (3, 0.05) if quick else (7, 0.5)
  depth, width, batch = QUICK if quick else FULL
  devices = jax.devices()[: num_devices or device_count(batch, len(jax.devices()))]
  report: dict[str, Any] = {'machine': common.machine(), 'quick': quick}
  report[f'training step, WRN-{depth}-{width}'] = train_section(
    depth, width, batch, devices, repeats=repeats, sample_s=sample_s, parallels=parallels
  )
  if not with_update:
    return report
  shapes = common.wide_resnet_shapes(depth, width)
  labels = go.grassmann_labels(shapes)
  candidates = update.wide_resnet_candidates()
  report[f'update, WRN-{depth}-{width}'] = update.section(
    shapes, labels, None, candidates, update.WIDE_RESNET_RATIOS, repeats=repeats, sample_s=sample_s
  )
  return report


def format_report(report: dict) -> str:
  lines = [common.machine_line(report['machine'])]
  for title, result in report.items():
    if not isinstance(result, dict) or title == 'machine':
      continue
    if 'images_per_s' in result:
      present = result.get('devices_present', result['devices'])
      of = f' of {present}' if present != result['devices'] else ''
      lines += ['', f'{title}: global batch {result["batch"]} on {result["devices"]}{of} device(s)']
      for key, value in result['images_per_s'].items():
        lines.append(
          f'  {key:<18} {value:10.1f} images/s   compile {result["compile_s"][key]:.1f} s'
        )
      for key, r in result['ratios'].items():
        lines.append(
          f'  time per step, {key:<22} {r["ratio"]:.3f} ({r["low"]:.3f}-{r["high"]:.3f})'
        )
    else:
      lines += update.format_report({'machine': report['machine'], title: result}).split('\n')[1:]
  return '\n'.join(lines)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='WRN-10-1 at batch 16, few repeats')
  parser.add_argument('--json', type=Path, help='also write the figures to this file')
  parser.add_argument('--layouts', help=f'comma-separated, of {",".join(layouts())} (default: all)')
  parser.add_argument('--no_update', action='store_true', help='the training step only')
  parser.add_argument(
    '--num_devices',
    type=int,
    help='devices to split the batch over (default: as many as divide it)',
  )
  args = parser.parse_args(argv)
  if args.layouts:
    common.check_names(parser, '--layouts', args.layouts, layouts())
  common.check_json(parser, args.json)
  if args.num_devices is not None:
    batch, present = (QUICK if args.quick else FULL)[2], len(jax.devices())
    if not 1 <= args.num_devices <= present:
      parser.error(f'--num_devices={args.num_devices}: this process has {present} device(s)')
    if batch % args.num_devices:
      parser.error(f'--num_devices={args.num_devices} does not divide the global batch {batch}')
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  start = time.perf_counter()
  parallels = tuple(args.layouts.split(',')) if args.layouts else None
  report = run(args.quick, parallels, not args.no_update, args.num_devices)
  report['seconds'] = time.perf_counter() - start
  print(format_report(report))
  if args.json:
    args.json.write_text(json.dumps(report, indent=1, default=str))
  return report


if __name__ == '__main__':
  main()
