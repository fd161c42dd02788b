"""Sphinx configuration of the documentation site: the API reference from the docstrings, and the
Markdown pages of docs/ as its narrative pages (MyST).

Build it with ``sphinx-build -W --keep-going -b html docs docs/_build/html``.
"""

import sys
from importlib import metadata
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path[:0] = [str(DOCS.parent), str(DOCS / '_ext')]

project = 'grassmann_optax'
author = 'grassmann_optax developers'
release = metadata.version('grassmann_optax')
version = release

extensions = [
  'myst_parser',
  'sphinx.ext.autodoc',
  'sphinx.ext.autosummary',
  'sphinx.ext.mathjax',
  'sphinx.ext.napoleon',
  'sphinx.ext.viewcode',
  'public_api',
]
source_suffix = {'.md': 'markdown'}
exclude_patterns = ['_build', '_ext']

# Google-style docstrings, as the library writes them. Signatures show names and defaults: the
# docstrings say what each argument takes, and JAX's type aliases (ArrayLike) would be printed
# expanded into unions of a dozen types.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_typehints = 'none'
napoleon_attr_annotations = False
autodoc_member_order = 'bysource'
autosummary_generate = False
add_module_names = False

# The pages link each other as files (`algorithm.md#10-points-on-any-axes-and-a-radius`), which
# GitHub renders too; MyST resolves them with GitHub's heading anchors.
myst_heading_anchors = 3
myst_enable_extensions = ['colon_fence']

html_theme = 'furo'
html_title = f'grassmann_optax {release}'
