"""Every example in the library's docstrings runs and prints what it shows."""

import doctest
import importlib
import pkgutil

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
