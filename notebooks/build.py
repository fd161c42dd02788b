"""Writes each notebook from its source and, with ``--execute``, runs it in full mode.

Every notebook has one source, the jupytext percent file ``notebooks/NN_name.py``: Python with
the Markdown cells as comments, which ruff lints and formats. It is paired with
``notebooks/NN_name.ipynb``, committed with the outputs of its last full run. Usage, from the
repository root::

  python notebooks/build.py               # update every .ipynb from its source, keeping outputs
  python notebooks/build.py --execute     # and execute them in full mode
  python notebooks/build.py --execute 03  # only the notebooks whose names start with 03

Without ``--execute``, cells whose source is unchanged keep their outputs and ids (as
``jupytext --to ipynb --update`` does); edited cells lose theirs. Execution runs in
``notebooks/`` on a kernel of this interpreter that imports this repository's code; full mode
saves the figures and tables to ``notebooks/figures/``. The quick mode of the tests
(``GRASSMANN_NOTEBOOK_QUICK=1``) shrinks every run and writes nothing.
"""

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jupytext
import nbformat
from jupytext.combine import combine_inputs_with_outputs

NOTEBOOKS_DIR = Path(__file__).resolve().parent
REPOSITORY = NOTEBOOKS_DIR.parent
QUICK_VARIABLE = 'GRASSMANN_NOTEBOOK_QUICK'
KERNEL_NAME = 'grassmann-optax-notebooks'


def sources() -> list[Path]:
  """The notebooks' sources, ``notebooks/NN_name.py``, in order."""
  return sorted(NOTEBOOKS_DIR.glob('[0-9][0-9]_*.py'))


def paired(source: Path) -> Path:
  """The ``.ipynb`` that ``source`` is paired with."""
  return source.with_suffix('.ipynb')


def build(source: Path) -> nbformat.NotebookNode:
  """The notebook of ``source``, with the outputs of the committed ``.ipynb`` where they fit."""
  nb = jupytext.read(source)
  if paired(source).exists():
    committed = nbformat.read(paired(source), as_version=4)
    nb = combine_inputs_with_outputs(nb, committed, fmt='ipynb')
  return nb


@contextlib.contextmanager
def kernel_manager():
  """An async kernel manager whose kernel runs on this interpreter (``sys.executable``)."""
  from jupyter_client.kernelspec import KernelSpecManager
  from jupyter_client.manager import AsyncKernelManager

  with tempfile.TemporaryDirectory() as tmp:
    spec = Path(tmp) / KERNEL_NAME
    spec.mkdir()
    argv = [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}']
    (spec / 'kernel.json').write_text(
      json.dumps({'argv': argv, 'display_name': 'Python 3', 'language': 'python'})
    )
    specs = KernelSpecManager(kernel_dirs=[tmp])
    yield AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)


def kernel_environment(quick: bool) -> dict[str, str]:
  """This process's environment for the kernel, which imports this repository's packages first.

  The kernel sees one CPU device, as a user does (the tests' fake devices are dropped), and the
  run mode.
  """
  env = dict(os.environ)
  flags = [f for f in env.get('XLA_FLAGS', '').split() if 'force_host_platform' not in f]
  env['XLA_FLAGS'] = ' '.join(flags)
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(REPOSITORY), env.get('PYTHONPATH')]))
  env[QUICK_VARIABLE] = '1' if quick else '0'
  return env


def execute(nb: nbformat.NotebookNode, *, quick: bool, timeout: int = 1800):
  """Executes ``nb`` in ``notebooks/`` (full mode writes ``notebooks/figures``); returns it."""
  from nbclient import NotebookClient

  with kernel_manager() as km:
    client = NotebookClient(
      nb,
      km=km,
      timeout=timeout,
      record_timing=False,
      resources={'metadata': {'path': str(NOTEBOOKS_DIR)}},
    )
    client.execute(env=kernel_environment(quick))
  return nb


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--execute', action='store_true', help='execute in full mode, save outputs')
  parser.add_argument('names', nargs='*', help='prefixes of the notebooks to build (default: all)')
  args = parser.parse_args()
  chosen = [s for s in sources() if not args.names or any(s.name.startswith(n) for n in args.names)]
  if not chosen:
    parser.error(f'no notebook source in {NOTEBOOKS_DIR} starts with {" or ".join(args.names)}')
  for source in chosen:
    nb = build(source)
    if args.execute:
      started = time.perf_counter()
      execute(nb, quick=False)
      print(f'{paired(source).name}: executed in {time.perf_counter() - started:.0f} s')
    jupytext.write(nb, paired(source), fmt='ipynb')


if __name__ == '__main__':
  main()
