"""The README's example runs as printed and trains."""

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / 'README.md'


def readme_example() -> str:
  text = README.read_text()
  match = re.search(r'<!-- readme-example[^>]*-->\s*```python\n(.*?)```', text, re.S)
  assert match, 'README lost its example block'
  return match.group(1)


def test_readme_example_trains():
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(readme_example(), 'README.md', 'exec'), {'__name__': 'readme'})
  loss = float(re.search(r'loss after 200 steps: ([0-9.]+)', out.getvalue()).group(1))
  assert loss < 0.8, f'the example should train (log(10) = 2.3 at the start); got {loss}'


def test_readme_commands_are_the_ci_commands():
  ci = (README.parent / '.ci' / 'run').read_text()
  text = README.read_text()
  assert "pip install -e '.[test]' && python -m pytest" in text
  assert "pip install --quiet -e '.[test]'" in ci and 'python -m pytest' in ci
