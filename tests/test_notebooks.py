"""The notebooks run, and their committed outputs come from the current code.

Each notebook is executed headlessly in quick mode (``GRASSMANN_NOTEBOOK_QUICK=1``: fewer steps
and seeds, no figures written) on a kernel started with this interpreter. The committed notebooks
(executed in full mode by ``python notebooks/_build.py --execute``) must have the cells that
``notebooks/_build.py`` writes, no errors, and numbers that agree with the fresh run wherever the
two modes compute the same thing; where they do not (the study's error rates), the layout must
agree and the committed values must be plausible.
"""

import importlib.util
import re
from pathlib import Path

import nbformat
import numpy as np
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / 'notebooks'
FIGURES = NOTEBOOKS / 'figures'
REBUILD = 'python notebooks/_build.py --execute'
NUMBER = r'([-+]?\d+(?:\.\d*)?(?:e[-+]?\d+)?)'


def _load_build_module():
  spec = importlib.util.spec_from_file_location('notebook_build', NOTEBOOKS / '_build.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


build = _load_build_module()


def committed(name: str) -> nbformat.NotebookNode:
  return nbformat.read(NOTEBOOKS / name, as_version=4)


def figure_stamps() -> dict[str, int]:
  return {path.name: path.stat().st_mtime_ns for path in FIGURES.glob('*')}


def run_quick(name: str) -> nbformat.NotebookNode:
  """Executes the notebook as ``_build.py`` writes it, in quick mode; checks it wrote nothing."""
  before = figure_stamps()
  nb = build.execute(build.build(name), quick=True, timeout=600)
  assert figure_stamps() == before, 'quick mode must not write figures'
  return nb


def tagged_text(nb: nbformat.NotebookNode, tag: str) -> str:
  """The printed text of the code cell tagged ``tag``."""
  cells = [c for c in nb.cells if tag in c.get('metadata', {}).get('tags', [])]
  assert len(cells) == 1, f'expected one cell tagged {tag!r}, found {len(cells)}'
  return ''.join(o.get('text', '') for o in cells[0].outputs if o.output_type == 'stream')


def number(pattern: str, text: str) -> float:
  match = re.search(pattern, text)
  assert match, f'{pattern!r} not found in:\n{text}'
  return float(match.group(1))


def check_committed(name: str) -> nbformat.NotebookNode:
  """The committed notebook has the current cells, all executed, without errors."""
  nb = committed(name)
  sources = [cell.source for cell in nb.cells]
  assert sources == [cell.source for cell in build.build(name).cells], (
    f'{name} differs from notebooks/_build.py; run `{REBUILD} {name}`'
  )
  for cell in nb.cells:
    if cell.cell_type != 'code':
      continue
    assert cell.execution_count is not None, f'{name} has an unexecuted cell; run `{REBUILD}`'
    errors = [o for o in cell.outputs if o.output_type == 'error']
    assert not errors, f'{name} was committed with an error: {errors[0].get("evalue")}'
    assert 'quick mode: True' not in ''.join(o.get('text', '') for o in cell.outputs), (
      f'{name} was committed from a quick run; run `{REBUILD} {name}`'
    )
  return nb


def images(nb: nbformat.NotebookNode) -> int:
  return sum('image/png' in o.get('data', {}) for c in nb.cells for o in c.get('outputs', []))


# ---------------------------------------------------------------------------------------------
# 01_geometry


def scale_invariance(text: str) -> dict[str, float]:
  cos = r'max \|cos\(w_j, dL/dw_j\)\| over the 8 columns, epsilon={}: ' + NUMBER
  no_eps = text.split('BatchNorm epsilon = 0\n')[1]
  loss_changes = [
    float(line.split()[1]) for line in no_eps.splitlines() if re.match(r'\s+\d', line)
  ]
  return {
    'cos_eps': number(cos.format('1e-05'), text),
    'cos_no_eps': number(cos.format('0'), text),
    'loss_change_no_eps': max(abs(v) for v in loss_changes),
  }


def sphere_numbers(text: str) -> dict[str, float]:
  pairs = (line.rsplit(':', 1) for line in text.splitlines() if ':' in line)
  return {name.strip(): float(value) for name, value in pairs}


def label_rows(text: str) -> dict[str, tuple[str, ...]]:
  rows = [line.split() for line in text.splitlines()[1:] if line.strip()]
  return {row[0]: tuple(row[-3:]) for row in rows}


def test_geometry_notebook():
  nb = check_committed('01_geometry.ipynb')
  assert images(nb) >= 1 and (FIGURES / '01_sphere.png').exists()
  fresh = run_quick('01_geometry.ipynb')

  for run in (nb, fresh):
    numbers = scale_invariance(tagged_text(run, 'scale-invariance'))
    assert numbers['cos_no_eps'] < 1e-5  # exact invariance: gradient orthogonal to the column
    assert numbers['loss_change_no_eps'] < 1e-5
    assert numbers['cos_eps'] < 1e-3  # BatchNorm's epsilon: approximate

  committed_sphere = sphere_numbers(tagged_text(nb, 'sphere-numbers'))
  fresh_sphere = sphere_numbers(tagged_text(fresh, 'sphere-numbers'))
  assert committed_sphere.keys() == fresh_sphere.keys()
  for key, value in fresh_sphere.items():
    assert value == pytest.approx(committed_sphere[key], abs=1e-5), key
  assert fresh_sphere['y.h'] == pytest.approx(0, abs=1e-6)
  assert fresh_sphere['|clipped h|'] == pytest.approx(0.6, abs=1e-6)
  assert fresh_sphere['|exp_y(d)|'] == pytest.approx(1, abs=1e-6)
  assert fresh_sphere['angle(y, exp_y(d))'] == pytest.approx(fresh_sphere['|d|'], abs=1e-5)
  assert fresh_sphere["y'.pt(b)"] == pytest.approx(0, abs=1e-6)
  assert fresh_sphere["cos(pt(d), geodesic velocity at y')"] == pytest.approx(1, abs=1e-5)

  labels = label_rows(tagged_text(fresh, 'labels'))
  assert labels == label_rows(tagged_text(nb, 'labels'))
  # (find_scale_invariant, ... with undercomplete_only=False, grassmann_labels)
  assert labels['conv_bn_a/kernel'] == ('euclidean', 'grassmann', 'euclidean')
  assert labels['conv_bn_b/kernel'] == ('grassmann', 'grassmann', 'grassmann')
  assert labels['conv_bn_wide/kernel'] == ('euclidean', 'grassmann', 'euclidean')
  assert labels['conv_relu/kernel'] == ('euclidean', 'euclidean', 'grassmann')
  assert labels['dense_bn/kernel'] == ('grassmann', 'grassmann', 'euclidean')
  assert labels['head/kernel'] == ('euclidean', 'euclidean', 'euclidean')


# ---------------------------------------------------------------------------------------------
# 02_custom_optimizers


def test_custom_optimizers_notebook():
  nb = check_committed('02_custom_optimizers.ipynb')
  assert images(nb) >= 1 and (FIGURES / '02_loss_curves.png').exists()
  fresh = run_quick('02_custom_optimizers.ipynb')

  for run in (nb, fresh):
    diffs = tagged_text(run, 'alias-diff')
    for name in ('SGD-G', 'Adam-G'):
      assert number(rf'{name}: max \|rebuilt - alias\| over \d+ steps = ' + NUMBER, diffs) < 1e-6
    nnx_text = tagged_text(run, 'nnx')
    assert number(r'max \| \|w_j\| - 1 \| over the manifold kernels: ' + NUMBER, nnx_text) < 1e-5

  def nnx_labels(run):
    return [line for line in tagged_text(run, 'nnx').splitlines() if line.endswith('mann')]

  def euclidean_or_grassmann(line):
    return line.split()[-1]

  assert nnx_labels(fresh) == nnx_labels(nb)
  assert sorted(map(euclidean_or_grassmann, nnx_labels(fresh))).count('grassmann') == 2


# ---------------------------------------------------------------------------------------------
# 03_paper_study


def markdown_table(text: str) -> tuple[list[str], dict[str, list[float]]]:
  lines = [line for line in text.splitlines() if line.startswith('|')]
  cells = [[cell.strip() for cell in line.strip('|').split('|')] for line in lines]
  header, rows = cells[0], cells[2:]
  return header, {row[0]: [float(value) for value in row[1:]] for row in rows}


def test_paper_study_notebook():
  nb = check_committed('03_paper_study.ipynb')
  for figure in ('03_learning_curves.png', '03_orthogonality.png', '03_table.md'):
    assert (FIGURES / figure).exists(), figure
  assert images(nb) >= 2
  fresh = run_quick('03_paper_study.ipynb')

  committed_text = tagged_text(nb, 'table')
  header, table = markdown_table(committed_text)
  fresh_header, fresh_table = markdown_table(tagged_text(fresh, 'table'))
  assert header == fresh_header == ['model', 'SGD', 'SGD-G', 'Adam-G']
  assert list(table) == list(fresh_table) == ['WRN-10-1', 'VGG-11 (1/8 width)']
  assert 'over 5 seed(s)' in committed_text
  values = np.array(list(table.values()))
  assert np.all((values >= 0) & (values <= 20)), f'implausible median test errors (%): {table}'
  assert np.all(np.array(list(fresh_table.values())) <= 100)
  assert markdown_table((FIGURES / '03_table.md').read_text()) == (header, table)

  for run in (nb, fresh):
    penalties = tagged_text(run, 'orthogonality')
    for model in table:
      line = next(line for line in penalties.splitlines() if line.startswith(model))
      start = number(r'SGD ' + NUMBER + ' ->', line)
      for optimizer in ('SGD-G', 'Adam-G'):
        assert number(rf'{optimizer} at the end ' + NUMBER, line) < start
