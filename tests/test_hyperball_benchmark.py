"""The Hyperball benchmark, run on a tiny GPT-2: its tree is the model it names, every candidate
compiles and runs, and the printed report carries every ratio, finite.

The figures themselves are not tested (the goal is printed beside each ratio, not asserted in a
timed test).
"""

import contextlib
import io
import math
import re
import shlex
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

import grassmann_optax as go
from benchmarks import hyperball

ROOT = Path(__file__).resolve().parents[1]
TINY = '--layers 1 --d_model 32 --heads 2 --vocab 64 --context 16 --repeats 2 --sample_s 0.01'
RATIO = re.compile(r'^  (step|compile): (.+?) / (.+?) +([0-9.eE+-]+|nan|inf) \(', re.M)
STATE = re.compile(r'^  state of (.+?) +([0-9,]+) = ([0-9.]+|nan|inf) × params', re.M)


def count(shapes) -> int:
  return sum(x.size for x in jax.tree.leaves(shapes))


def test_the_tree_is_gpt2_small():
  assert count(hyperball.gpt2_shapes()) == 124_439_808
  stacked = hyperball.gpt2_shapes(stacked=True)
  assert count(stacked) == 124_439_808
  assert stacked['h']['attn']['c_attn']['kernel'].shape == (12, 768, 2304)
  assert stacked['h']['mlp']['c_proj']['kernel'].shape == (12, 3072, 768)


def test_the_labels_put_the_projections_on_the_hyperball():
  shapes = hyperball.gpt2_shapes(2, 32, 2, 64, 16)
  labels = go.transformer_labels(shapes)
  kernels = [('attn', 'c_attn'), ('attn', 'c_proj'), ('mlp', 'c_fc'), ('mlp', 'c_proj')]
  assert all(labels['h']['0'][a][b]['kernel'] == go.GRASSMANN for a, b in kernels)
  assert all(labels['h']['1'][a][b]['bias'] == go.EUCLIDEAN for a, b in kernels)
  assert labels['wte']['embedding'] == labels['wpe']['embedding'] == go.EUCLIDEAN
  assert labels['h']['0']['ln_1']['scale'] == labels['ln_f']['bias'] == go.EUCLIDEAN


def test_a_tiny_run_reports_every_ratio_finite(tmp_path):
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    report = hyperball.main([*shlex.split(TINY), '--json', str(tmp_path / 'report.json')])
  text = out.getvalue()
  assert 'backend cpu' in text or 'backend gpu' in text or 'backend tpu' in text
  assert 'goal: each hyperball update at most 1.1× its unconstrained twin' in text
  ratios = {(kind, num, den): float(value) for kind, num, den, value in RATIO.findall(text)}
  expected = {
    (kind, f'{base}h {retraction}', twin)
    for kind in ('step', 'compile')
    for base, twin in (('adam', 'optax.adamw'), ('muon', 'optax.contrib.muon'))
    for retraction in ('geodesic', 'normalize')
  }
  reference = hyperball.REFERENCE
  expected |= {('step', reference, 'optax.adamw')}
  expected |= {
    ('step', f'adamh {retraction}', reference) for retraction in ('geodesic', 'normalize')
  }
  assert set(ratios) == expected, text
  assert all(math.isfinite(value) and value > 0 for value in ratios.values()), text
  assert text.count('goal ≤ 1.1: ') == 4  # each step ratio says whether it meets the goal
  states = {name: float(times) for name, _, times in STATE.findall(text)}
  twins = {'optax.adamw', 'optax.contrib.muon', reference}
  assert set(states) == twins | {name for _, name, _ in expected if name != reference}
  assert all(math.isfinite(times) and times > 0 for times in states.values()), text
  assert abs(states['optax.adamw'] - 2) < 0.01  # two moments per parameter, and a count
  assert (tmp_path / 'report.json').exists() and report['goal'] == 1.1


def test_the_commands_of_the_documents_parse():
  """Every ``python -m benchmarks.hyperball ...`` of the page and of the module is accepted."""
  command = re.compile(r'python -m benchmarks\.hyperball([^`\n#]*)')
  texts = [(ROOT / 'docs' / 'hyperball.md').read_text(), hyperball.__doc__]
  texts = [re.sub(r'\\\n\s*', ' ', text) for text in texts]  # a command continued on the next line
  found = [argv for text in texts for argv in command.findall(text)]
  assert len(found) >= 4 and any(argv.strip() for argv in found)
  for argv in found:
    hyperball.parse_args(shlex.split(argv))


def test_the_plain_jax_reference_is_adamh_as_published():
  """The reference the benchmark times is AdamH: one step equals ``go.adamh(retraction=
  'normalize')`` in float64 (the library keeps the radius, the reference takes ‖W‖ anew, which
  agree on the first step)."""
  with jax.enable_x64():
    array = lambda *shape: jax.ShapeDtypeStruct(shape, 'float64')
    shapes = {
      'wte': {'embedding': array(32, 16)},
      'h': {'mlp': {'c_fc': {'kernel': array(16, 64), 'bias': array(64)}}},
      'ln_f': {'scale': array(16)},
    }
    keys = iter(jax.random.split(jax.random.key(0), 64))
    params = jax.tree.map(lambda s: jax.random.normal(next(keys), s.shape, s.dtype), shapes)
    grads = jax.tree.map(lambda s: jax.random.normal(next(keys), s.shape, s.dtype), shapes)
    labels = go.transformer_labels(params)
    assert labels['h']['mlp']['c_fc']['kernel'] == go.GRASSMANN
    ours = go.adamh(
      hyperball.LR,
      hyperball.LR_HYPERBALL,
      b1=hyperball.B1,
      b2=hyperball.B2,
      weight_decay=hyperball.WEIGHT_DECAY,
      param_labels=labels,
      retraction='normalize',
    )
    reference = hyperball.published_adamh(labels)

    @jax.jit
    def step(params):
      results = []
      for tx in (ours, reference):
        updates, _ = tx.update(grads, tx.init(params), params)
        results.append(optax.apply_updates(params, updates))
      return results

    # Two steps' worth: from the params, then from where the first step put them.
    for _ in range(2):
      results = step(params)
      gaps = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), *results)
      assert max(jax.tree.leaves(gaps)) < 1e-12, gaps
      assert (
        max(
          jax.tree.leaves(
            jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), results[0], params)
          )
        )
        > 1e-3
      )
      params = results[0]
