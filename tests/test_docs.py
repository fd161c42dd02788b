"""The README and docs/ stay true: their code runs, their commands parse, their links resolve,
and the documentation site builds."""

import contextlib
import io
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import grassmann_optax

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
# A fenced block and its info string: a language (```python) or a MyST directive (```{toctree}).
FENCE = re.compile(r'^([ \t]*)```([^`\n]*)\n(.*?)^[ \t]*```', re.M | re.S)
# Put right before a fence, this marks a block that the tests compile but do not run.
COMPILE_ONLY = '<!-- compile-only'


def blocks(language: str) -> list[tuple[str, int, str, bool]]:
  """``(document, index, code, run)`` of every fenced block in ``language``."""
  found = []
  for path in DOCUMENTS:
    text = path.read_text()
    for index, match in enumerate(FENCE.finditer(text)):
      indent, info, code = match.groups()
      if info.strip() == language:
        code = textwrap.dedent(code) if indent else code
        before = text[: match.start()].rstrip().rsplit('\n', 1)[-1]
        run = not before.startswith(COMPILE_ONLY)
        found.append((path.relative_to(ROOT).as_posix(), index, code, run))
  return found


def block_id(block) -> str:
  return f'{block[0]}#{block[1]}'


def test_the_documents_have_code_to_check():
  assert len(blocks('python')) >= 2 and len(blocks('bash')) >= 3


@pytest.mark.parametrize('block', blocks('python'), ids=block_id)
def test_python_blocks_run(block):
  document, _, code, run = block
  compiled = compile(code, document, 'exec')
  if not run:
    return
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compiled, {'__name__': 'docs'})
  if 'loss after 200 steps' in code:  # the README's example trains
    loss = float(re.search(r'loss after 200 steps: ([0-9.]+)', out.getvalue()).group(1))
    assert loss < 0.8, f'the example should train (log(10) = 2.3 at the start); got {loss}'


def test_readme_commands_are_the_ci_commands():
  ci = (ROOT / '.ci' / 'run').read_text()
  text = (ROOT / 'README.md').read_text()
  assert "pip install -e '.[test]' && python -m pytest" in text
  assert "pip install --quiet -e '.[test]'" in ci and 'python -m pytest' in ci


LINK = re.compile(r'\]\(([^)#\s]*)(#[^)\s]*)?\)')


def github_anchors(path: Path) -> set[str]:
  """The anchors GitHub (and the site, through MyST) gives the headings of a Markdown file."""
  text = FENCE.sub('', path.read_text())
  headings = re.findall(r'^#{1,6} +(.+?) *$', text, re.M)
  return {re.sub(r'[^\w\- ]', '', heading.lower()).replace(' ', '-') for heading in headings}


@pytest.mark.parametrize('path', DOCUMENTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_local_links_resolve(path):
  """Every relative link names a file that exists, and a heading of it where it names one."""
  broken = []
  for target, anchor in LINK.findall(path.read_text()):
    if re.match(r'[a-z]+://', target):
      continue
    file = (path.parent / target) if target else path
    if not file.exists():
      broken.append(f'{target} (no such file)')
    elif anchor and file.suffix == '.md' and anchor[1:] not in github_anchors(file):
      broken.append(f'{target}{anchor} (no such heading)')
  assert not broken, f'{path.name} has broken links: {broken}'


def commands(program: str) -> list[tuple[str, str]]:
  """``(document, command)`` of every ``python -m <program> ...`` in a bash block or inline code."""
  found = []
  pattern = re.compile(rf'python -m {re.escape(program)}(?:\s[^`\n]*)?$')
  for path in DOCUMENTS:
    text = path.read_text()
    lines = [line.strip() for block in FENCE.finditer(text) for line in block.group(3).split('\n')]
    lines += re.findall(r'`([^`\n]+)`', text)
    for line in lines:
      for part in line.split('&&'):
        part = part.strip()
        if pattern.match(part):
          found.append((path.relative_to(ROOT).as_posix(), part))
  return found


@pytest.mark.parametrize('command', commands('train'), ids=lambda c: f'{c[0]}: {c[1][:60]}')
def test_training_commands_parse(command):
  """Every command of the training program in the documents is accepted as it is written."""
  from train import flags

  argv = shlex.split(command[1])[3:]
  if argv != ['--help']:
    flags.parse(argv)  # raises, naming the flag, for anything it would refuse


@pytest.mark.parametrize('command', commands('train.benchmark'), ids=lambda c: c[1])
def test_benchmark_commands_parse(command):
  from train import benchmark

  benchmark.parse_args(shlex.split(command[1])[3:])


def test_site_builds_without_warnings(tmp_path):
  """The documentation site (Sphinx: the API from the docstrings, the pages of docs/) builds
  with warnings as errors, as CI builds it."""
  build = subprocess.run(
    [sys.executable, '-m', 'sphinx', '-W', '--keep-going', '-q', '-b', 'html', 'docs', tmp_path],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert build.returncode == 0, build.stderr[-4000:]
  api = (tmp_path / 'api.html').read_text()
  missing = [name for name in grassmann_optax.__all__ if f'id="grassmann_optax.{name}"' not in api]
  assert not missing, f'the API page does not document {missing}'
