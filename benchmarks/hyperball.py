r"""The Hyperball optimizers against their unconstrained twins: update time, compile time and state.

  python -m benchmarks.hyperball               # GPT-2 small (124M parameters), both retractions
  python -m benchmarks.hyperball --stacked     # the same with the layers stacked, (12, ...) kernels
  python -m benchmarks.hyperball --layers 2 --d_model 64 --heads 4 --vocab 512 --context 64 \
    --repeats 3                                # a small tree (0.1M parameters), in seconds

Each candidate is a jitted ``update`` + ``apply_updates`` with params and state donated, timed as
the median of interleaved repeats after a warm-up, so that every ratio compares samples taken in
the same run. ``adamh`` is timed against ``optax.adamw`` and ``muonh`` against
``optax.contrib.muon`` (Newton-Schulz on the same matrices, AdamW on the other leaves), each with
both retractions. The goal of each hyperball update is at most 1.1 times its twin's time.
AdamH as Wen et al. write it, in plain JAX and Optax (:func:`published_adamh`), is timed beside
them: what the algorithm costs without this library.
"""

import argparse
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

import grassmann_optax as go
from benchmarks import common, update

LR, LR_HYPERBALL, LR_MUON = 3e-4, 0.02, 0.02
B1, B2, WEIGHT_DECAY = 0.9, 0.95, 0.1
GOAL = 1.1
REFERENCE = 'AdamH in plain JAX'  # the published formula, in plain JAX and Optax
RETRACTIONS = ('geodesic', 'normalize')
SECTIONS = ('adam', 'muon')


def gpt2_shapes(
  layers: int = 12,
  d_model: int = 768,
  heads: int = 12,
  vocab: int = 50257,
  context: int = 1024,
  *,
  stacked: bool = False,
) -> dict:
  """The parameter shapes of GPT-2 (GPT-2 small by default: 124,439,808 parameters).

  The layout of the Flax GPT-2: embeddings ``wte`` and ``wpe``; per layer LayerNorms ``ln_1``,
  ``ln_2``, the attention's fused query, key and value kernel ``c_attn`` ``(d, 3d)`` and its output
  ``c_proj`` ``(d, d)``, the MLP's ``c_fc`` ``(d, 4d)`` and ``c_proj`` ``(4d, d)``, each with a
  bias; ``ln_f``. The output head is ``wte`` (tied). With ``stacked``, the layers are one subtree
  whose leaves have a leading axis of ``layers``, as ``nn.scan`` lays them out. ``heads`` only has
  to divide ``d_model``: the fused kernels do not show it.
  """
  if d_model % heads:
    raise ValueError(f'heads={heads} does not divide d_model={d_model}')
  lead = (layers,) if stacked else ()
  array = lambda *shape: jax.ShapeDtypeStruct(lead + shape, jnp.float32)
  dense = lambda n_in, n_out: {'kernel': array(n_in, n_out), 'bias': array(n_out)}
  norm = lambda: {'scale': array(d_model), 'bias': array(d_model)}

  def block():
    return {
      'ln_1': norm(),
      'attn': {'c_attn': dense(d_model, 3 * d_model), 'c_proj': dense(d_model, d_model)},
      'ln_2': norm(),
      'mlp': {'c_fc': dense(d_model, 4 * d_model), 'c_proj': dense(4 * d_model, d_model)},
    }

  layer_tree = block() if stacked else {str(index): block() for index in range(layers)}
  table = lambda rows: {'embedding': jax.ShapeDtypeStruct((rows, d_model), jnp.float32)}
  return {
    'wte': table(vocab),
    'wpe': table(context),
    'h': layer_tree,
    'ln_f': {
      'scale': jax.ShapeDtypeStruct((d_model,), jnp.float32),
      'bias': jax.ShapeDtypeStruct((d_model,), jnp.float32),
    },
  }


def muon_dimension_numbers(labels: Any, shapes: Any) -> Any:
  """Newton-Schulz on the hyperball leaves of ``muonh`` (the last two axes; a leading axis of
  stacked layers is a batch axis), ``None`` (AdamW) on the others, as ``muonh`` splits them."""

  def numbers(label, shape):
    if label != go.GRASSMANN:
      return None
    rank = len(shape.shape)
    return optax.contrib.MuonDimensionNumbers(reduction_axis=rank - 2, output_axis=rank - 1)

  return jax.tree.map(numbers, labels, shapes)


def decay_mask(params: Any) -> Any:
  """Where AdamW decays: the matrices, not the biases and norm scales (as ``adamh``'s AdamW)."""

  def decays(path, leaf):
    return leaf.ndim >= 2 and getattr(path[-1], 'key', None) not in ('bias', 'scale')

  return jax.tree_util.tree_map_with_path(decays, params)


def published_step(learning_rate: float) -> optax.GradientTransformation:
  """Wen et al.'s step as they write it, ``Norm(W − η‖W‖u/max(‖u‖, 1e-10))·‖W‖`` per matrix (the
  last two axes), in a few lines of JAX: what the algorithm costs written directly, without
  this library (no stored radius, no transport)."""

  def norm(x):
    return jnp.sqrt(jnp.sum(x * x, axis=(-2, -1), keepdims=True))

  def step(w, u):
    radius = norm(w)
    moved = w - learning_rate * radius * u / jnp.maximum(norm(u), 1e-10)
    return moved / norm(moved) * radius - w

  def update_fn(updates, state, params):
    return jax.tree.map(step, params, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def published_adamh(labels: Any) -> optax.GradientTransformation:
  """AdamH as published, in plain JAX and Optax: ``optax.scale_by_adam`` then
  :func:`published_step` on the hyperball leaves, ``optax.adamw`` on the others."""
  hyperball = optax.chain(optax.scale_by_adam(B1, B2, eps=1e-8), published_step(LR_HYPERBALL))
  euclidean = optax.adamw(LR, b1=B1, b2=B2, weight_decay=WEIGHT_DECAY, mask=decay_mask)
  return optax.partition({go.GRASSMANN: hyperball, go.EUCLIDEAN: euclidean}, labels)


def adam_candidates(labels: Any) -> dict[str, Any]:
  candidates = {
    'optax.adamw': lambda: optax.adamw(
      LR, b1=B1, b2=B2, weight_decay=WEIGHT_DECAY, mask=decay_mask
    ),
    REFERENCE: lambda: published_adamh(labels),
  }
  for retraction in RETRACTIONS:
    candidates[f'adamh {retraction}'] = lambda retraction=retraction: go.adamh(
      LR,
      LR_HYPERBALL,
      b1=B1,
      b2=B2,
      weight_decay=WEIGHT_DECAY,
      param_labels=labels,
      retraction=retraction,
    )
  return candidates


def muon_candidates(labels: Any, shapes: Any) -> dict[str, Any]:
  dimension_numbers = muon_dimension_numbers(labels, shapes)
  candidates = {
    'optax.contrib.muon': lambda: optax.contrib.muon(
      LR_MUON,
      beta=0.95,
      weight_decay=WEIGHT_DECAY,
      adam_b1=B1,
      adam_b2=B2,
      adam_weight_decay=WEIGHT_DECAY,
      adam_learning_rate=LR,
      muon_weight_dimension_numbers=dimension_numbers,
    ),
  }
  for retraction in RETRACTIONS:
    candidates[f'muonh {retraction}'] = lambda retraction=retraction: go.muonh(
      LR,
      LR_MUON,
      momentum=0.95,
      b1=B1,
      b2=B2,
      weight_decay=WEIGHT_DECAY,
      param_labels=labels,
      retraction=retraction,
    )
  return candidates


def twin_ratios(candidates: dict[str, Any]) -> dict[str, tuple[str, str, float | None]]:
  """``{name: (numerator, denominator, goal)}``: each hyperball candidate over the first (its
  twin), held to the goal; the published formula in plain JAX, where there is one, over the
  twin and under each of ours, with no goal."""
  twin, *others = candidates
  hyperball = [name for name in others if name != REFERENCE]
  ratios = {f'step: {name} / {twin}': (name, twin, GOAL) for name in hyperball}
  if REFERENCE in candidates:
    ratios[f'step: {REFERENCE} / {twin}'] = (REFERENCE, twin, None)
    ratios |= {f'step: {name} / {REFERENCE}': (name, REFERENCE, None) for name in hyperball}
  ratios |= {f'compile: {name} / {twin}': (name, twin, None) for name in hyperball}
  return ratios


def state_elements(shapes: Any, candidates: dict[str, Any]) -> dict[str, int]:
  """Elements of each candidate's optimizer state (every array leaf, counts included)."""
  elements = lambda tree: sum(x.size for x in jax.tree.leaves(tree) if hasattr(x, 'shape'))
  return {name: elements(jax.eval_shape(make().init, shapes)) for name, make in candidates.items()}


def section(shapes, candidates, *, repeats, sample_s) -> dict:
  """Times, compile times and state of ``candidates`` on random parameters of ``shapes``."""
  # Every leaf 0.05·N(0, 1), labelled Euclidean for ``common.parameters`` so that no leaf is made
  # of unit columns: the hyperball keeps each point at the norm it has when ``init`` is called.
  everywhere = jax.tree.map(lambda _: go.EUCLIDEAN, shapes)
  result = update.section(
    shapes,
    everywhere,
    None,
    candidates,
    twin_ratios(candidates),
    repeats=repeats,
    sample_s=sample_s,
  )
  result['state_elements'] = state_elements(shapes, candidates)
  return result


def run(args: argparse.Namespace) -> dict:
  shapes = gpt2_shapes(
    args.layers, args.d_model, args.heads, args.vocab, args.context, stacked=args.stacked
  )
  labels = go.transformer_labels(shapes)
  report: dict[str, Any] = {'machine': common.machine(), 'goal': GOAL}
  layout = 'stacked layers' if args.stacked else 'one subtree per layer'
  title = f'GPT-2 ({args.layers} layers, d_model {args.d_model}, {layout})'
  report['hyperball leaves'] = sum(label == go.GRASSMANN for label in jax.tree.leaves(labels))
  sections = {
    'adam': lambda: adam_candidates(labels),
    'muon': lambda: muon_candidates(labels, shapes),
  }
  for name in args.sections.split(','):
    report[f'{title}, {name}'] = section(
      shapes, sections[name](), repeats=args.repeats, sample_s=args.sample_s
    )
  return report


def format_report(report: dict) -> str:
  machine, *body = update.format_report(report).split('\n')
  lines = [
    machine,
    f'goal: each hyperball update at most {report["goal"]}× its unconstrained twin',
    f'leaves on the hyperball: {report["hyperball leaves"]}',
    *body,
    '',
  ]
  for title, result in report.items():
    if not isinstance(result, dict) or 'state_elements' not in result:
      continue
    twin = next(iter(result['state_elements']))
    lines.append(f'{title}: optimizer state in elements')
    for name, size in result['state_elements'].items():
      relative = size / result['state_elements'][twin]
      lines.append(
        f'  state of {name:<24} {size:14,d} = {size / result["parameters"]:.4f} × params '
        f'= {relative:.4f} × {twin}'
      )
  return '\n'.join(lines)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--layers', type=int, default=12)
  parser.add_argument('--d_model', type=int, default=768)
  parser.add_argument('--heads', type=int, default=12)
  parser.add_argument('--vocab', type=int, default=50257)
  parser.add_argument('--context', type=int, default=1024)
  parser.add_argument('--stacked', action='store_true', help='layers stacked on a leading axis')
  parser.add_argument('--repeats', type=int, default=7, help='interleaved repeats (median)')
  parser.add_argument(
    '--sample_s', type=float, default=0.3, help='seconds of steps per sample (at least one step)'
  )
  parser.add_argument(
    '--sections',
    default=','.join(SECTIONS),
    help=f'comma-separated, of {",".join(SECTIONS)} (default: all)',
  )
  parser.add_argument('--json', type=Path, help='also write the figures to this file')
  args = parser.parse_args(argv)
  common.check_names(parser, '--sections', args.sections, SECTIONS)
  common.check_json(parser, args.json)
  for name in ('layers', 'd_model', 'heads', 'vocab', 'context', 'repeats'):
    if getattr(args, name) < 1:
      parser.error(f'--{name}={getattr(args, name)} must be at least 1')
  if not args.sample_s > 0:
    parser.error(f'--sample_s={args.sample_s} must be positive')
  if args.d_model % args.heads:
    parser.error(f'--heads={args.heads} does not divide --d_model={args.d_model}')
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  start = time.perf_counter()
  report = run(args)
  report['seconds'] = time.perf_counter() - start
  print(format_report(report))
  print(f'\n{report["seconds"]:.0f} s in all')
  if args.json:
    args.json.write_text(json.dumps(report, indent=1, default=str))
  return report


if __name__ == '__main__':
  main()
