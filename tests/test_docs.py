"""The README and docs/ stay true: their code runs, their commands parse, their links resolve,
the library names and arguments they use exist, and the documentation site builds."""

import ast
import builtins
import contextlib
import inspect
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
def test_python_blocks_run(block, tmp_path):
  document, _, code, run = block
  # Examples that write a run directory under /tmp write it in this test's own directory, and
  # those that train for 10 steps train the training tests' tiny network for 3 (whose programs
  # they then find in the compilation cache): the suite compiles without LLVM's optimisations
  # (conftest.py), where a step of the default model takes seconds.
  code = code.replace("'/tmp/", f"'{tmp_path}/").replace(
    'max_steps=10,', 'max_steps=3, widen_factor=1, batch_size=8, vali_batch_size=150,'
  )
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

  argv = shlex.split(command[1], comments=True)[3:]
  if argv != ['--help']:
    flags.parse(argv)  # raises, naming the flag, for anything it would refuse


BENCHMARKS = ('update', 'hyperball', 'kernel', 'device')


@pytest.mark.parametrize(
  'command',
  [c for name in BENCHMARKS for c in commands(f'benchmarks.{name}')],
  ids=lambda c: c[1],
)
def test_benchmark_commands_parse(command):
  """Every benchmark command in the documents is accepted as it is written (argparse exits 2,
  naming the flag, for anything it refuses)."""
  import importlib

  argv = shlex.split(command[1], comments=True)
  module = importlib.import_module(argv[2])
  module.parse_args(argv[3:])


# Library calls in the documents' code: `go.name(...)` in Python blocks and in inline code, and
# a bare `name(...)` in inline code. A bare snake_case `name(...)` must be a public name (so that
# a renamed function is caught), unless it is notation (the geometry of docs/algorithm.md) or
# another library's function (docs/comparison.md), named here.
NOTATION = {'proj_y', 'exp_y', 'pt_y', 'component_inner', 'tangent_inner', 'addcmul_'}
PUBLIC = set(grassmann_optax.__all__)
INLINE_CALL = re.compile(r'`((?:go\.|grassmann_optax\.)?)(\w+)\(([^`]*)\)[^`]*`')


def _signature(name: str) -> inspect.Signature:
  return inspect.signature(getattr(grassmann_optax, name))


def _argument_problems(name: str, positional: int, keywords: list[str]) -> list[str]:
  """What a call of public ``name`` with these arguments gets wrong about its signature."""
  parameters = _signature(name).parameters.values()
  kinds = {p.kind for p in parameters}
  problems = []
  if inspect.Parameter.VAR_KEYWORD not in kinds:
    accepted = {p.name for p in parameters if p.kind is not inspect.Parameter.POSITIONAL_ONLY}
    problems += [f'{name}() has no argument {k!r}' for k in keywords if k not in accepted]
  if inspect.Parameter.VAR_POSITIONAL not in kinds:
    slots = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if positional > len(slots):
      problems.append(f'{name}() takes {len(slots)} positional arguments, given {positional}')
  return problems


def _library_aliases(tree: ast.AST) -> tuple[set[str], dict[str, str]]:
  """Names bound to the package (``import grassmann_optax as go``), and names imported from it."""
  modules, names = set(), {}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      modules |= {a.asname or a.name for a in node.names if a.name == 'grassmann_optax'}
    elif isinstance(node, ast.ImportFrom) and node.module == 'grassmann_optax':
      names |= {a.asname or a.name: a.name for a in node.names}
  return modules, names


def code_problems(code: str) -> list[str]:
  """Unknown public names, and arguments their signatures lack, in a block of Python."""
  tree = ast.parse(code)
  modules, imported = _library_aliases(tree)
  problems = [
    f'grassmann_optax has no {name!r}' for name in imported.values() if name not in PUBLIC
  ]
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute) and getattr(node.value, 'id', None) in modules:
      if node.attr not in PUBLIC:
        problems.append(f'grassmann_optax has no {node.attr!r}')
    if not isinstance(node, ast.Call):
      continue
    func = node.func
    if isinstance(func, ast.Attribute) and getattr(func.value, 'id', None) in modules:
      name = func.attr
    elif isinstance(func, ast.Name) and func.id in imported:
      name = imported[func.id]
    else:
      continue
    if name in PUBLIC:
      positional = sum(not isinstance(a, ast.Starred) for a in node.args)
      keywords = [k.arg for k in node.keywords if k.arg is not None]  # not **mapping
      problems += _argument_problems(name, positional, keywords)
  return problems


def inline_code(text: str) -> str:
  """The text outside fenced blocks, and each line of a plain block (a signature) as inline code."""
  plain = [m.group(3) for m in FENCE.finditer(text) if not m.group(2).strip()]
  lines = [line.strip() for block in plain for line in block.splitlines() if line.strip()]
  return '\n'.join([FENCE.sub('', text), *(f'`{line}`' for line in lines)])


def inline_problems(text: str) -> list[str]:
  """The same for ``go.name(...)`` and ``name(...)`` written in a document's inline code."""
  problems = []
  text = inline_code(text)
  for prefix, name, arguments in INLINE_CALL.findall(text):
    if name not in PUBLIC:
      if prefix or ('_' in name.strip('_') and name not in NOTATION | set(dir(builtins))):
        problems.append(f'`{prefix}{name}(` is not a public name of grassmann_optax')
      continue
    try:  # a call: `go.adamg(0.01, 0.05, omega=0.0)`
      call = ast.parse(f'f({arguments})', mode='eval').body
      positional = len(call.args)
      keywords = [k.arg for k in call.keywords if k.arg is not None]
    except SyntaxError:  # a signature: `sgdg(learning_rate, *, momentum=0.9)`
      try:
        args = ast.parse(f'def f({arguments}): pass').body[0].args
      except SyntaxError:
        continue  # prose, such as `omega(...)`
      positional = len(args.posonlyargs) + len(args.args)
      keywords = [a.arg for a in args.args + args.kwonlyargs]
    problems += _argument_problems(name, positional, keywords)
  for name in re.findall(r'`[^`]*?\bgo\.(\w+)[^`]*`', text):
    if name not in PUBLIC:
      problems.append(f'`go.{name}` is not a public name of grassmann_optax')
  return problems


@pytest.mark.parametrize('path', DOCUMENTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_documents_use_public_names_and_their_arguments(path):
  text = path.read_text()
  problems = inline_problems(text)
  for _, _, code, _ in (block for block in blocks('python') if block[0] == _relative(path)):
    problems += code_problems(code)
  assert not problems, f'{path.name}: {sorted(set(problems))}'


def _relative(path: Path) -> str:
  return path.relative_to(ROOT).as_posix()


def test_public_names_and_arguments_check_can_fail():
  assert code_problems('import grassmann_optax as go\ngo.adamg(0.01, 0.05, b3=0.5)') == [
    "adamg() has no argument 'b3'"
  ]
  assert code_problems('import grassmann_optax as go\ngo.grassmann_clip(0.1, 0.2)') == [
    'grassmann_clip() takes 1 positional arguments, given 2'
  ]
  assert code_problems('from grassmann_optax import riemannian_sgd') == [
    "grassmann_optax has no 'riemannian_sgd'"
  ]
  assert inline_problems('`go.sgdg(0.01, 0.2, lr=1)` and `grassmann_sgd(0.1, beta=1)`') == [
    "sgdg() has no argument 'lr'",
    "grassmann_sgd() has no argument 'beta'",
  ]
  assert inline_problems('`find_scale_invariant(loss_fn, params, *args, tol=1e-3, groups=2)`') == [
    "find_scale_invariant() has no argument 'groups'"
  ]
  assert inline_problems('`scale_by_grassmann(0.1)`, `go.unit_init`') == [
    '`scale_by_grassmann(` is not a public name of grassmann_optax',
    '`go.unit_init` is not a public name of grassmann_optax',
  ]


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
  anchors = []
  for name in grassmann_optax.__all__:
    obj = getattr(grassmann_optax, name)
    if inspect.ismodule(obj):  # a public submodule: its section and each of its own names
      anchors.append(f'module-{obj.__name__}')
      anchors += [f'{obj.__name__}.{sub}' for sub in obj.__all__]
    else:
      anchors.append(f'grassmann_optax.{name}')
  missing = [anchor for anchor in anchors if f'id="{anchor}"' not in api]
  assert not missing, f'the API page does not document {missing}'
  assert str(ROOT) not in api, 'the API page shows a local path'
