"""The optimizer update against Optax's: time, compile time and state, as ratios from one run.

  python -m benchmarks.update            # WRN-28-10, 500 small leaves, GPT-2 small
  python -m benchmarks.update --quick    # smaller trees and fewer repeats (about a minute)

Each candidate is a jitted ``update`` + ``apply_updates`` with params and state donated. The
manifold optimizers run with ω = 0 where they are compared with Optax's, because the
orthogonality term is two matrix products per leaf that Adam does not compute; a line with
ω = 0.1 shows its cost. Ratios print next to the goals they are held to.
"""

import argparse
import json
import time
from pathlib import Path
from typing import Any

import jax
import optax

import grassmann_optax as go
from benchmarks import common

LR, LR_G_SGD, LR_G_ADAM = 0.01, 0.2, 0.05


def readme_chain(omega: float) -> optax.GradientTransformation:
  """The README's chain: Adam-G on the manifold leaves, Optax's Nesterov SGD elsewhere."""
  manifold = optax.chain(
    go.add_orthogonality_gradient(omega), go.grassmann_adam(LR_G_ADAM, grad_clip=0.1)
  )
  euclidean = optax.sgd(LR, 0.9, nesterov=True)
  return optax.partition({'grassmann': manifold, 'euclidean': euclidean}, go.grassmann_labels)


def wide_resnet_candidates() -> dict[str, Any]:
  return {
    'optax.sgd nesterov': lambda: optax.sgd(LR, 0.9, nesterov=True),
    'optax.adam': lambda: optax.adam(LR),
    'sgdg ω=0': lambda: go.sgdg(LR, LR_G_SGD, omega=0),
    'adamg ω=0': lambda: go.adamg(LR, LR_G_ADAM, omega=0),
    'README chain ω=0': lambda: readme_chain(0.0),
    'adamg ω=0.1': lambda: go.adamg(LR, LR_G_ADAM, omega=0.1),
    'README chain ω=0.1': lambda: readme_chain(0.1),
  }


# (numerator, denominator, goal or None)
WIDE_RESNET_RATIOS = {
  'README chain / optax.adam': ('README chain ω=0', 'optax.adam', 1.3),
  'README chain / adamg': ('README chain ω=0', 'adamg ω=0', 1.15),
  'adamg / optax.adam': ('adamg ω=0', 'optax.adam', 1.26),
  'sgdg / optax.sgd nesterov': ('sgdg ω=0', 'optax.sgd nesterov', 1.76),
  'README chain ω=0.1 / adamg ω=0.1': ('README chain ω=0.1', 'adamg ω=0.1', 1.15),
}


def section(shapes, labels, point_axes, candidates, ratios, *, repeats, sample_s) -> dict:
  params = common.parameters(shapes, labels, point_axes)
  grads = [common.gradients(params, seed) for seed in (1, 2)]
  compiled = common.compile_updates(candidates, params, grads)
  times = common.time_interleaved(
    {name: run for name, (run, _) in compiled.items()}, repeats=repeats, sample_s=sample_s
  )
  out = {
    'parameters': sum(x.size for x in jax.tree.leaves(params)),
    'leaves': len(jax.tree.leaves(params)),
    'ms': {name: 1e3 * t['median'] for name, t in times.items()},
    'compile_s': {name: seconds for name, (_, seconds) in compiled.items()},
    'ratios': {},
  }
  for name, (num, den, goal) in ratios.items():
    if name.startswith('compile'):
      value = out['compile_s'][num] / out['compile_s'][den]
      out['ratios'][name] = {'ratio': value, 'low': value, 'high': value, 'goal': goal}
    else:
      out['ratios'][name] = {**common.ratio(times, num, den), 'goal': goal}
  return out


def state_sizes(shapes, labels, point_axes, candidates) -> dict:
  params = jax.eval_shape(lambda: common.parameters(shapes, labels, point_axes))
  size = common.nbytes(params)
  return {
    name: common.nbytes(jax.eval_shape(make().init, params)) / size
    for name, make in candidates.items()
  }


SECTIONS = ('wrn', 'leaves', 'gpt2')


def run(quick: bool, sections=SECTIONS) -> dict:
  repeats, sample_s = (5, 0.1) if quick else (11, 0.3)
  report: dict[str, Any] = {'machine': common.machine(), 'quick': quick}
  if 'wrn' in sections:
    _wide_resnet(report, quick, repeats, sample_s)
  if 'leaves' in sections:
    _many_leaves(report, quick, repeats, sample_s)
  if 'gpt2' in sections:
    _gpt2(report, quick, repeats, sample_s)
  return report


def _wide_resnet(report, quick, repeats, sample_s) -> None:
  depth, width = (16, 4) if quick else (28, 10)
  shapes = common.wide_resnet_shapes(depth, width)
  labels = go.grassmann_labels(shapes)
  candidates = wide_resnet_candidates()
  report[f'WRN-{depth}-{width}'] = section(
    shapes, labels, None, candidates, WIDE_RESNET_RATIOS, repeats=repeats, sample_s=sample_s
  )
  report[f'WRN-{depth}-{width}']['state'] = state_sizes(shapes, labels, None, candidates)


def _many_leaves(report, quick, repeats, sample_s) -> None:
  count = 100 if quick else 500
  shapes = common.many_leaves_shapes(count, (64, 16))
  labels = jax.tree.map(lambda _: go.GRASSMANN, shapes)
  candidates = {
    'optax.adamw': lambda: optax.adamw(LR),
    'adamg ω=0': lambda: go.adamg(LR, LR_G_ADAM, omega=0, param_labels=labels),
    'adamg ω=0.1': lambda: go.adamg(LR, LR_G_ADAM, omega=0.1, param_labels=labels),
  }
  ratios = {
    'step: adamg / optax.adamw': ('adamg ω=0', 'optax.adamw', 1.5),
    'compile: adamg / optax.adamw': ('adamg ω=0', 'optax.adamw', 2.0),
    'step: adamg ω=0.1 / optax.adamw': ('adamg ω=0.1', 'optax.adamw', None),
    'compile: adamg ω=0.1 / optax.adamw': ('adamg ω=0.1', 'optax.adamw', None),
  }
  report[f'{count} leaves of (64, 16)'] = section(
    shapes, labels, None, candidates, ratios, repeats=repeats, sample_s=sample_s
  )


def _gpt2(report, quick, repeats, sample_s) -> None:
  shapes = common.gpt2_shapes(layers=2 if quick else 12, vocab=5000 if quick else 50257)
  labels, point_axes = common.gpt2_groups(shapes)
  candidates = {
    'optax.adamw': lambda: optax.adamw(LR),
    'adamg ω=0': lambda: go.adamg(
      LR, LR_G_ADAM, omega=0, param_labels=labels, point_axes=point_axes
    ),
  }
  ratios = {'adamg (rows, heads, columns) / optax.adamw': ('adamg ω=0', 'optax.adamw', None)}
  name = 'GPT-2 small' if not quick else 'GPT-2 (2 layers)'
  report[name] = section(
    shapes, labels, point_axes, candidates, ratios, repeats=repeats, sample_s=sample_s
  )
  report[name]['state'] = state_sizes(shapes, labels, point_axes, candidates)


def format_report(report: dict) -> str:
  lines = [common.machine_line(report['machine'])]
  for title, result in report.items():
    if not isinstance(result, dict) or 'ms' not in result:
      continue
    lines += ['', f'{title}: {result["parameters"]:,} parameters in {result["leaves"]} leaves']
    for name, ms in result['ms'].items():
      lines.append(f'  {name:<28} {ms:10.2f} ms/step   compile {result["compile_s"][name]:6.1f} s')
    width = max(map(len, result['ratios']), default=0)
    for name, r in result['ratios'].items():
      goal = (
        ''
        if r['goal'] is None
        else f'  goal ≤ {r["goal"]}: {"met" if r["ratio"] <= r["goal"] else "NOT MET"}'
      )
      lines.append(f'  {name:<{width}} {r["ratio"]:.3f} ({r["low"]:.3f}-{r["high"]:.3f}){goal}')
    for name, size in result.get('state', {}).items():
      lines.append(f'  state of {name:<28} {size:.4f} × params')
  return '\n'.join(lines)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='smaller trees, fewer repeats')
  parser.add_argument('--json', type=Path, help='also write the figures to this file')
  parser.add_argument(
    '--sections',
    default=','.join(SECTIONS),
    help=f'comma-separated, of {",".join(SECTIONS)} (default: all)',
  )
  args = parser.parse_args(argv)
  common.check_names(parser, '--sections', args.sections, SECTIONS)
  common.check_json(parser, args.json)
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  start = time.perf_counter()
  report = run(args.quick, tuple(args.sections.split(',')))
  report['seconds'] = time.perf_counter() - start
  print(format_report(report))
  if args.json:
    args.json.write_text(json.dumps(report, indent=1, default=str))
  return report


if __name__ == '__main__':
  main()
