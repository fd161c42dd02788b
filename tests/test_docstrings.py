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


def _documented_arguments(doc: str, section: str = 'Args') -> set[str] | None:
  """The names of a Google-style ``Args:`` (or other ``section``), or None where there is none."""
  section = re.search(rf'^{section}:\n((?:(?:  .*)?\n)+)', doc + '\n', re.M)
  if section is None:
    return None
  return {name.lstrip('*') for name in re.findall(r'^  (\*{0,2}\w+)[^:\n]*:', section[1], re.M)}


def _public_functions():
  """``(name, function)`` for every public function: the package root's and ``cpu_kernel``'s."""
  modules = (('', grassmann_optax), ('cpu_kernel.', grassmann_optax.cpu_kernel))
  for prefix, module in modules:
    for name in module.__all__:
      obj = getattr(module, name)
      if callable(obj) and not isinstance(obj, type):
        yield prefix + name, obj


def test_docstring_arguments_are_the_signature():
  """Every public function that takes arguments documents exactly those it takes in an
  ``Args:`` section: the site shows both the signature and that section."""
  wrong = {}
  for name, function in _public_functions():
    documented = _documented_arguments(inspect.getdoc(function) or '') or set()
    parameters = set(inspect.signature(function).parameters)
    if documented != parameters:
      wrong[name] = (sorted(documented - parameters), sorted(parameters - documented))
  assert not wrong, f'(documented but not taken, taken but not documented): {wrong}'


def test_public_state_classes_describe_their_fields():
  """Each field of a public named tuple (the optimizer states, :class:`ScaleInvariance`) has an
  entry in its ``Attributes:`` section, which the site shows."""
  wrong = {}
  for name in grassmann_optax.__all__:
    cls = getattr(grassmann_optax, name)
    if isinstance(cls, type) and hasattr(cls, '_fields'):
      documented = _documented_arguments(inspect.getdoc(cls) or '', 'Attributes') or set()
      if documented != set(cls._fields):
        wrong[name] = (sorted(documented - set(cls._fields)), sorted(set(cls._fields) - documented))
  assert not wrong, f'(documented but no field, field but not documented): {wrong}'


def test_documented_arguments_are_read():
  doc = 'Sums.\n\nArgs:\n  x: an array.\n  *args: more.\n  axis (int): where,\n    if any.\n\n'
  doc += 'Returns:\n  y.'
  assert _documented_arguments(doc) == {'x', 'args', 'axis'}
  assert _documented_arguments('Sums.\n\nReturns:\n  y.') is None
