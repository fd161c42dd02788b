"""Every example in the library's docstrings runs and prints what it shows."""

import doctest
import importlib
import inspect
import pkgutil
import re

import pytest

import grassmann_optax
from grassmann_optax import _src

MODULES = sorted(f'{_src.__name__}.{info.name}' for info in pkgutil.iter_modules(_src.__path__)) + [
  grassmann_optax.__name__
]


@pytest.mark.parametrize('name', MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False)
  assert result.failed == 0, f'{result.failed} of {result.attempted} examples failed in {name}'


def test_every_public_function_has_an_example():
  missing = [
    name
    for name in grassmann_optax.__all__
    if callable(obj := getattr(grassmann_optax, name))
    and not isinstance(obj, type)
    and '>>>' not in (obj.__doc__ or '')
  ]
  assert not missing, f'public functions without a runnable example: {missing}'


def test_docstring_templates_are_filled():
  """Shared docstring text (``{{name}}`` in the source) is filled in every public docstring."""
  unfilled = {
    name: re.findall(r'\{\{\w+\}\}', doc)
    for name in grassmann_optax.__all__
    if '{{' in (doc := getattr(grassmann_optax, name).__doc__ or '')
  }
  assert not unfilled, f'unfilled docstring templates: {unfilled}'


def _documented_arguments(doc: str) -> set[str] | None:
  """The names of a Google-style ``Args:`` section, or None where there is none."""
  section = re.search(r'^Args:\n((?:(?:  .*)?\n)+)', doc + '\n', re.M)
  if section is None:
    return None
  return {name.lstrip('*') for name in re.findall(r'^  (\*{0,2}\w+)[^:\n]*:', section[1], re.M)}


def test_docstring_arguments_are_the_signature():
  """Where a public function documents its arguments, it documents exactly those it takes: the
  site shows both the signature and the ``Args:`` section."""
  wrong = {}
  for name in grassmann_optax.__all__:
    obj = getattr(grassmann_optax, name)
    if not callable(obj) or isinstance(obj, type):
      continue
    documented = _documented_arguments(inspect.getdoc(obj) or '')
    parameters = set(inspect.signature(obj).parameters)
    if documented is not None and documented != parameters:
      wrong[name] = (sorted(documented - parameters), sorted(parameters - documented))
  assert not wrong, f'(documented but not taken, taken but not documented): {wrong}'


def test_documented_arguments_are_read():
  doc = 'Sums.\n\nArgs:\n  x: an array.\n  *args: more.\n  axis (int): where,\n    if any.\n\n'
  doc += 'Returns:\n  y.'
  assert _documented_arguments(doc) == {'x', 'args', 'axis'}
  assert _documented_arguments('Sums.\n\nReturns:\n  y.') is None
