"""Notebook 5, the hyperball study: its committed outputs, and what its text claims.

The committed checks read ``notebooks/05_hyperball_study.ipynb`` and ``figures/05_table.md``; the
slow test executes the source in quick mode (40 steps, one rate, one seed) and checks the claims
that hold on any machine: the hyperball keeps every matrix's norm, the loss goes down, the table
has its six rows.
"""

import re

import numpy as np
import pytest

from tests.test_notebooks import (
  FIGURES,
  NUMBER,
  assert_same_printout,
  committed,
  images,
  markdown_table,
  number,
  run_quick,
  tagged_text,
)

NAME = '05_hyperball_study'
OPTIMIZERS = ['AdamW', 'Muon', 'AdamH', 'AdamH (geodesic)', 'MuonH', 'MuonH (geodesic)']
HYPERBALL = OPTIMIZERS[2:]
COLUMNS = [
  'optimizer',
  'matrix rate',
  'AdamW rate',
  'validation loss',
  'min-max',
  'matrix norms: max rel. change',
]


def table_rows(text: str) -> dict[str, dict[str, float]]:
  """The table's rows by optimizer: rates, median, min, max, norm change; checks the columns."""
  header, rows = markdown_table(text)
  assert header == COLUMNS
  assert list(rows) == OPTIMIZERS
  out = {}
  for name, (matrix_rate, adamw_rate, median, spread, norm_change) in rows.items():
    low, high = map(float, spread.split('-'))
    out[name] = {
      'matrix rate': float(matrix_rate),
      'AdamW rate': float(adamw_rate),
      'median': float(median),
      'min': low,
      'max': high,
      'norm change': float(norm_change),
    }
  return out


def check_table(text: str) -> dict[str, dict[str, float]]:
  """What holds for any run, quick or full: finite losses below the initial one, norms kept."""
  rows = table_rows(text)
  initial = number(r'\(initial ' + NUMBER + r'\)', text)
  assert 5 < initial < 6.5, initial  # about log(256) = 5.55 nats per byte at initialisation
  for name, row in rows.items():
    assert np.all(np.isfinite([row['median'], row['min'], row['max']])), name
    assert row['min'] <= row['median'] <= row['max'], (name, row)
    assert row['max'] < initial, (name, row)  # every seed's loss went down
    if name in HYPERBALL:  # each matrix stays at its initial norm, to float32 round-off
      assert row['norm change'] < 1e-5, (name, row)
    else:  # AdamW and Muon let the norms drift
      assert row['norm change'] > 1e-3, (name, row)
  assert len({row['AdamW rate'] for row in rows.values()}) == 1  # one AdamW rate for all
  assert rows['AdamW']['AdamW rate'] == rows['AdamW']['matrix rate']
  return rows


def tuning(text: str) -> dict[str, tuple[list[float], list[float], float]]:
  """Per optimizer: the rates tried, their validation losses, the rate kept."""
  out, name = {}, None
  for line in text.splitlines():
    match = re.match(r'\s+rate (\S+)\s+validation loss (\S+)(\s+<- kept)?', line)
    if match is None:
      name = line.strip()
      out[name] = ([], [], None)
      continue
    rates, losses, kept = out[name]
    rates.append(float(match.group(1)))
    losses.append(float(match.group(2)))
    out[name] = (rates, losses, float(match.group(1)) if match.group(3) else kept)
  return out


def check_tuning(text: str, rows: dict[str, dict[str, float]], grid_size: int) -> None:
  tried = tuning(text)
  assert list(tried) == OPTIMIZERS
  for name, (rates, losses, kept) in tried.items():
    assert len(rates) == grid_size, name
    assert kept == rates[int(np.argmin(losses))], name  # the rate of the lowest loss is kept
    assert kept == rows[name]['matrix rate'], name
  assert rows['AdamW']['AdamW rate'] == tried['AdamW'][2]


def overlap(a: dict[str, float], b: dict[str, float]) -> bool:
  return a['min'] <= b['max'] and b['min'] <= a['max']


def test_committed_hyperball_study():
  nb = committed(NAME)
  assert images(nb) >= 1 and (FIGURES / '05_training.png').exists()
  assert 'quick mode: False' in ''.join(o.get('text', '') for o in nb.cells[1].outputs)
  text = tagged_text(nb, 'table')
  assert text == (FIGURES / '05_table.md').read_text()  # the same full run
  assert 'seeds 1, 2, 3' in text and '400 steps' in text and 'tuned on seed 0' in text
  rows = check_table(text)
  check_tuning(tagged_text(nb, 'tuning'), rows, grid_size=4)
  for name, (rates, _, kept) in tuning(tagged_text(nb, 'tuning')).items():
    assert rates[0] < kept < rates[-1], name  # 'every kept rate is inside its grid'

  # The conclusions. Muon's step beats Adam's, on every seed:
  muon_group, adam_group = ('Muon', 'MuonH'), ('AdamW', 'AdamH', 'AdamH (geodesic)')
  assert max(rows[n]['max'] for n in muon_group) < min(rows[n]['min'] for n in adam_group)
  # no difference within a group that three seeds can show:
  assert overlap(rows['Muon'], rows['MuonH'])
  assert overlap(rows['AdamW'], rows['AdamH']) and overlap(rows['AdamH'], rows['AdamH (geodesic)'])
  # AdamW and AdamH (geodesic): ranges that just miss, by less than either's spread.
  gap = rows['AdamH (geodesic)']['min'] - rows['AdamW']['max']
  spread = lambda row: row['max'] - row['min']
  assert 0 < gap < min(spread(rows['AdamW']), spread(rows['AdamH (geodesic)']))
  # MuonH (geodesic) below MuonH on every seed, above AdamW on none:
  assert rows['MuonH']['max'] < rows['MuonH (geodesic)']['min']
  assert rows['MuonH (geodesic)']['max'] < rows['AdamW']['min']
  # the norms: kept on the hyperball (check_table), moved by tens of percent otherwise.
  assert rows['AdamW']['norm change'] > 0.3 and rows['Muon']['norm change'] > 0.3


@pytest.mark.slow
def test_hyperball_study_runs():
  nb = committed(NAME)
  fresh = run_quick(NAME)
  assert_same_printout(tagged_text(fresh, 'labels'), tagged_text(nb, 'labels'))
  labels = tagged_text(fresh, 'labels')
  assert '18 hyperball matrices' in labels
  for line in labels.splitlines()[:-1]:
    name, _, label = line.split()
    projection = name.endswith(
      tuple(f'{p}/kernel' for p in ('query', 'key', 'value', 'out', 'mlp_in', 'mlp_out'))
    )
    assert label == ('grassmann' if projection else 'euclidean'), line

  text = tagged_text(fresh, 'table')
  rows = check_table(text)
  assert 'seeds 0 ' in text and '40 steps' in text
  check_tuning(tagged_text(fresh, 'tuning'), rows, grid_size=1)
