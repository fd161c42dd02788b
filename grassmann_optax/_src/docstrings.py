"""Text that many docstrings share, written once.

A docstring names a shared piece as ``{{name}}`` on a line of its own or at the end of an
``Args`` entry; :func:`fill` replaces it, indenting every line after the first like the line it
stands on, so the filled docstring reads as if it had been written out.
"""

import re
from collections.abc import Callable
from typing import TypeVar

PAPER = (
  'Cho & Lee, "Riemannian approach to batch normalization", NeurIPS 2017, '
  '`arXiv:1709.09603 <https://arxiv.org/abs/1709.09603>`_.'
)

SHARED = {
  'references': f'References:\n  {PAPER}',
  'point_axes': (
    'the axes of each leaf that form one point: ``None`` (all axes\n'
    'but the last: the columns of ``leaf.reshape(-1, leaf.shape[-1])``, as in the paper), an\n'
    'int or a tuple of ints (``(1,)`` for the rows of a Dense kernel, ``(0, 2)`` for the heads\n'
    'of an ``(embed, heads, head_dim)`` kernel), a pytree of those with the paths of the\n'
    'params (missing leaves take ``None``), or a callable ``params -> pytree``\n'
    '(``docs/algorithm.md``, section 10).'
  ),
  'radius': (
    '``None`` (unit points, as in the paper), a number ``R`` in\n'
    "``[1e-15, 1e15]``, or ``'init'``: each point keeps the norm it has when ``init`` is\n"
    'called (kept in the state; the same range). Points are stored at that norm; steps are\n'
    'angles.'
  ),
  'mesh_axes': (
    'inside ``jax.shard_map``, the mesh axes that split each leaf: the\n'
    '``PartitionSpec`` given to ``shard_map`` for it, a pytree of those with the paths of the\n'
    'params, or a callable ``params -> pytree``; ``None`` (the default) where nothing is split.\n'
    'Per-point sums are then all-reduced over the devices that split a point, and the\n'
    'orthogonality term all-reduces a Gram matrix (``docs/scaling.md``).'
  ),
  'grad_clip': (
    'ν > 0, the threshold of the per-point norm of the projected gradient\n'
    '(0.1 in the paper), or ``None`` for no clipping.'
  ),
}

_TOKEN = re.compile(r'^(?P<indent>[ \t]*)(?P<before>.*?)\{\{(?P<name>\w+)\}\}', re.MULTILINE)

F = TypeVar('F', bound=Callable)


def fill(fn: F) -> F:
  """Replaces the ``{{name}}`` tokens of ``fn.__doc__`` by the shared text of that name."""

  def replace(match: re.Match) -> str:
    indent, before = match['indent'], match['before']
    text = SHARED[match['name']]
    # An Args entry continues one level deeper than its first line; a block stays level.
    body = _block(text, indent + '  ' if before else indent)
    return f'{indent}{before}{body}'

  fn.__doc__ = _TOKEN.sub(replace, fn.__doc__ or '')
  return fn


def _block(text: str, indent: str) -> str:
  """``text`` with every line after the first indented by ``indent``."""
  first, *rest = text.split('\n')
  return '\n'.join([first, *(f'{indent}{line}' if line else line for line in rest)])
