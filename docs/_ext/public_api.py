"""``public-api``: the API reference of a module, generated from its ``__all__``.

A reStructuredText directive (in a MyST page, inside an ``eval-rst`` block).

The reference follows the public names as they are, so that renaming, adding or removing one
changes the site without editing a page. Names are grouped by the private module that defines
them, under the first line of that module's docstring, in the order of ``:order:`` (module names;
modules it does not name come after, and names it lists that no longer exist are ignored).
A public submodule (``cpu_kernel``) gets a section of its own ``__all__``. Values that are not
functions, classes or modules (string constants) come last, each described by the ``#:`` comment
above its assignment.
"""

import importlib
import inspect
import re
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

CONSTANTS = 'Constants'


def _title(module_name: str) -> str:
  """The first line of a module's docstring, without its trailing references and period."""
  doc = inspect.getdoc(importlib.import_module(module_name)) or module_name
  line = doc.splitlines()[0].split(' ((')[0].rstrip('.')
  return re.sub(r':\w+:`~?([^`]+)`', r'``\1``', line)  # no cross-references in a title


def _groups(module, order: list[str]) -> dict[str, list[str]]:
  """``{defining module (or CONSTANTS): [public names]}``, in reading order."""
  groups: dict[str, list[str]] = {}
  for name in module.__all__:
    obj = getattr(module, name)
    if inspect.ismodule(obj):  # a public submodule: a section of its own public names
      home = obj.__name__
    elif callable(obj):
      home = getattr(obj, '__module__', None) or module.__name__
    else:
      home = CONSTANTS
    groups.setdefault(home, []).append(name)

  def rank(home: str) -> tuple[int, str]:
    short = home.rsplit('.', 1)[-1]
    if home == CONSTANTS:
      return (len(order) + 1, home)
    return (order.index(short) if short in order else len(order), home)

  return {home: groups[home] for home in sorted(groups, key=rank)}


def _constant_doc(module, name: str) -> list[str]:
  """The ``#:`` comment lines above ``name = ...`` in the module that assigns it, unindented."""
  package = module.__name__.split('.')[0]
  for path in sorted(Path(importlib.import_module(package).__file__).parent.rglob('*.py')):
    found = re.search(rf'((?:^#:.*\n)+)^{name} = ', path.read_text(), re.M)
    if found:
      return [line[2:].strip() for line in found[1].splitlines()]
  return []


def _entry(module, name: str, obj) -> list[str]:
  target = f'{module.__name__}.{name}'
  if inspect.isclass(obj):
    return [f'.. autoclass:: {target}', '']
  if callable(obj):
    return [f'.. autofunction:: {target}', '']
  doc = ['   ' + line for line in _constant_doc(module, name)]
  return [f'.. py:data:: {name}', f'   :value: {obj!r}', '', *doc, '']


class PublicApi(SphinxDirective):
  required_arguments = 1
  option_spec = {'order': directives.unchanged}

  def run(self) -> list[nodes.Node]:
    module_name = self.arguments[0]
    module = importlib.import_module(module_name)
    order = self.options.get('order', '').split()
    groups = _groups(module, order)
    lines = ['.. currentmodule:: ' + module_name, '', '.. autosummary::', '   :nosignatures:', '']
    for home, names in groups.items():
      for name in names:
        obj = getattr(module, name)
        if inspect.ismodule(obj):
          lines += [f'   {name}.{sub}' for sub in obj.__all__]
        elif home != CONSTANTS:
          lines.append(f'   {name}')
    lines.append('')
    for home, names in groups.items():
      title = CONSTANTS if home == CONSTANTS else _title(home)
      for name in names:
        obj = getattr(module, name)
        if inspect.ismodule(obj):
          title = f'``{module_name}.{name}``: {title[0].lower()}{title[1:]}'
          lines += [title, '-' * len(title), '', f'.. py:module:: {obj.__name__}', '']
          lines += [f'.. currentmodule:: {obj.__name__}', '']
          for sub in obj.__all__:
            lines += _entry(obj, sub, getattr(obj, sub))
          lines += [f'.. currentmodule:: {module_name}', '']
          break
      else:
        lines += [title, '-' * len(title), '']
        for name in names:
          lines += _entry(module, name, getattr(module, name))
    container = nodes.section()
    container.document = self.state.document
    nested_parse_with_titles(self.state, StringList(lines, source='public-api'), container)
    return container.children


def setup(app):
  app.add_directive('public-api', PublicApi)
  return {'parallel_read_safe': True, 'parallel_write_safe': True}
