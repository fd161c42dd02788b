"""Which parameters of a Transformer go on the hyperball: labels, point axes and decay, by name.

The Hyperball optimizers (Wen et al. 2025) keep the projection matrices of attention and MLP at
a fixed norm and leave embeddings, norms, biases and the output head to AdamW. Flax names these
parameters the same way across models, so the rules read the path of each leaf (lower-cased, an
``nnx.Variable``'s own ``value`` key dropped):

1. A leaf on a path with a part ``head``, ``lm_head``, ``unembed``, ``unembedding``,
   ``classifier``, ending in ``_head`` or containing ``logit`` (``logitdense`` in Flax's lm1b
   example, ``logits_dense``), or under a top-level ``output`` (Meta's Llama), is the output
   head: its kernels go on the hyperball with ``head=True`` (a bias or a vector never does);
   otherwise it is Euclidean.
2. A leaf on a path with a part that contains ``embed`` (``embedding``, ``Embed_0``,
   ``tok_embeddings``), is ``wte`` or ``wpe``, or has ``emb`` as a ``_``-separated word
   (``pos_emb``) is an embedding: Euclidean.
3. Scalars, vectors (any leaf of one axis) and leaves named ``bias`` or ``scale`` (norms and
   biases, including the ``(heads, head_dim)`` biases of ``DenseGeneral``) are Euclidean.
4. A leaf named ``kernel`` goes on the hyperball: a Dense kernel ``(in, out)``, a kernel of
   ``nn.scan``'ed layers ``(layers, in, out)``, and the ``DenseGeneral`` kernels of Flax's
   attention (under ``query``, ``key``, ``value``, ``out``: ``(embed, heads, head_dim)``,
   ``(heads, head_dim, embed)``, and those with a leading ``layers`` axis).
5. Anything else is refused with a ValueError naming the leaf: a leaf of two axes or more with
   another name, a kernel of four axes or more outside attention (a convolution), a kernel that
   is not real floating-point.

A point is one matrix: the last two axes (one per layer of a stacked kernel), and for the
``DenseGeneral`` kernels of attention one per head, ``(embed, head_dim)`` for the query, key and
value and ``(head_dim, embed)`` for the output (:func:`point_axes`), so that Muon orthogonalises
each head's projection and each head keeps its norm. A stacked *plain* Dense named ``query`` etc.
(``(layers, in, out)`` under a ``query`` module) would be read as a ``DenseGeneral`` kernel:
give its ``point_axes`` (``(1, 2)``) explicitly; and a ``DenseGeneral`` kernel of three axes
under another name (``q_proj``, ``wq``) is read as a stack of layers: give its per-head axes.
"""

from typing import Any

import jax
import jax.numpy as jnp

from grassmann_optax._src import checks
from grassmann_optax._src import labels as labels_lib

_HEADS = ('head', 'lm_head', 'unembed', 'unembedding', 'classifier')
_ATTENTION = ('query', 'key', 'value', 'out')
_EMBEDDINGS = ('wte', 'wpe')


def _name(key) -> str:
  return checks.leaf_name((key,)).lower()


def _parts(path) -> list[str]:
  """The lower-cased parts of a path, without the ``value`` key of a Flax box."""
  return [_name(key) for key in checks.unboxed(path)]


def _is_head(parts: list[str]) -> bool:
  # A top-level 'output' is Meta's Llama head; deeper, 'output' is a projection (BERT's
  # attention/output/dense).
  top = parts[1:2] if parts[:1] == ['params'] else parts[:1]
  return top == ['output'] or any(p in _HEADS or p.endswith('_head') or 'logit' in p for p in parts)


def _is_embedding(parts: list[str]) -> bool:
  return any('embed' in p or p in _EMBEDDINGS or 'emb' in p.split('_') for p in parts)


def _attention(parts: list[str]) -> str | None:
  """``'in'`` for a query/key/value kernel, ``'out'`` for an output kernel, else None."""
  if len(parts) < 2 or parts[-2] not in _ATTENTION:
    return None
  return 'out' if parts[-2] == 'out' else 'in'


def _is_floating(leaf) -> bool:
  return jnp.issubdtype(getattr(leaf, 'dtype', jnp.float32), jnp.floating)


def _classify(path, leaf, head: bool) -> str:
  parts = _parts(path)
  name = '/'.join(parts) or '<root>'
  ndim = len(getattr(leaf, 'shape', ()))
  last = parts[-1] if parts else ''
  if ndim <= 1 or last in ('bias', 'scale'):
    return labels_lib.EUCLIDEAN
  if _is_head(parts):
    if not (head and last == 'kernel' and ndim <= 3):
      return labels_lib.EUCLIDEAN
  elif _is_embedding(parts):
    return labels_lib.EUCLIDEAN
  elif last != 'kernel':
    raise ValueError(
      f'transformer_labels: cannot classify the leaf {name!r} of shape {tuple(leaf.shape)}: it is '
      "neither a 'kernel' nor an embedding, head, norm scale or bias by name. Pass param_labels "
      '(e.g. lambda p: go.transformer_labels(...) with your own labels for it), or rename it.'
    )
  if not _is_floating(leaf):
    raise ValueError(
      f'transformer_labels: the kernel {name!r} has dtype {jnp.dtype(leaf.dtype).name} and cannot '
      'be a hyperball point (a real floating-point matrix).'
    )
  if ndim > (4 if _attention(parts) else 3):
    raise ValueError(
      f'transformer_labels: cannot classify the kernel {name!r} of shape {tuple(leaf.shape)}: a '
      'Transformer projection has two axes (Dense), three (stacked Dense, or DenseGeneral in '
      'attention) or four (stacked DenseGeneral in attention); this looks like a convolution. '
      'Pass param_labels.'
    )
  return labels_lib.GRASSMANN


def transformer_labels(params: Any, *, head: bool = False) -> Any:
  """Labels the projection matrices of a Transformer ``'grassmann'`` (hyperball), the rest
  ``'euclidean'``.

  The rules, by the name of each leaf's path (lower-cased):

  * head (a part ``head``, ``lm_head``, ``unembed``, ``unembedding``, ``classifier``,
    ``*_head`` or one containing ``logit``, as ``logitdense`` or ``logits_dense``, or a
    top-level ``output``): its kernel on the hyperball only with ``head=True``;
  * embeddings (a part containing ``embed``, or ``wte``, ``wpe``, or with the word ``emb``),
    norm scales and biases (``scale``, ``bias``) and every leaf of fewer than two axes:
    Euclidean;
  * ``kernel`` leaves of two axes (Dense), three (stacked layers, or the ``DenseGeneral``
    kernels of attention under ``query``/``key``/``value``/``out``) or four (stacked
    ``DenseGeneral``): hyperball.

  A leaf of two axes or more that none of these names, or a kernel that cannot be a hyperball
  point (not floating-point, a convolution's four axes outside attention), raises a ValueError
  naming it. :func:`adamh` and :func:`muonh` read the ``DenseGeneral`` kernels per head by
  default; for the step transforms give those point axes yourself (``(0, 2)`` for
  ``(embed, heads, head_dim)``, ``(1, 2)`` for ``(heads, head_dim, embed)``, one more for a
  leading layers axis). A kernel of three axes under another name is read as ``(layers, in,
  out)``: a ``DenseGeneral`` projection named ``q_proj`` needs its per-head ``point_axes``.

  Works on Linen ``dict``/``FrozenDict`` trees and on ``flax.nnx.State`` (``nnx.Param``-boxed
  leaves): the result has the structure of ``params``.

  Args:
    params: a parameter pytree.
    head: put the output head's kernel on the hyperball too (Wen et al. keep it on AdamW).

  Returns:
    A pytree of ``'grassmann'``/``'euclidean'`` with the structure of ``params``.

  Example:
    >>> import jax.numpy as jnp, grassmann_optax as go
    >>> params = {'wte': {'embedding': jnp.ones((50, 8))},
    ...           'mlp': {'kernel': jnp.ones((8, 32)), 'bias': jnp.ones(32)},
    ...           'lm_head': {'kernel': jnp.ones((8, 50))}}
    >>> go.transformer_labels(params)['mlp'], go.transformer_labels(params)['lm_head']
    ({'bias': 'euclidean', 'kernel': 'grassmann'}, {'kernel': 'euclidean'})
    >>> go.transformer_labels(params, head=True)['lm_head']
    {'kernel': 'grassmann'}

  References:
    Wen, Dang, Lyu, Ma, Liang, "Fantastic Pretraining Optimizers and Where to Find Them 2.1:
    Hyperball Optimization", 2025.
  """
  checks.check_bool(head=head)
  return jax.tree_util.tree_map_with_path(lambda path, leaf: _classify(path, leaf, head), params)


def point_axes(params: Any) -> dict[str, tuple[int, int]] | None:
  """The point axes the Transformer rules give the ``DenseGeneral`` kernels of attention, one
  point per head, as a dict from leaf names (``checks.leaf_name``) to specs; every other leaf
  takes the default, the last two axes. A flat dict, so that it is matched by name to any tree
  the partition hands on (``nnx.Variable`` boxes around masked leaves included)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    parts = _parts(path)
    ndim = len(getattr(leaf, 'shape', ()))
    kind = _attention(parts)
    if kind is None or parts[-1] != 'kernel' or ndim not in (3, 4):
      continue
    first = ndim - 3  # 1 with a leading layers axis
    out[checks.leaf_name(path)] = (first, first + 2) if kind == 'in' else (first + 1, first + 2)
  return out or None  # None: the default for every leaf


def transformer_point_axes(params: Any) -> dict[str, tuple[int, int]]:
  """The point axes of the leaves of two axes or more, as :func:`adamh` and :func:`muonh` read them.

  With their default ``point_axes``, the Hyperball aliases read each matrix of two axes or more
  as its last two axes (one point per layer of a stacked kernel), and the ``DenseGeneral``
  kernels of Flax's attention as one point per head (the rules of :func:`transformer_labels`).
  This gives those axes for every leaf, by name, as the transforms take ``point_axes``: pass it
  to :func:`project_params` with the radii of an alias's state to put averaged or interpolated
  params back on their spheres.

  Args:
    params: a parameter pytree (Flax Linen or NNX).

  Returns:
    A dict from leaf names to point axes, for every leaf of two axes or more.

  Example:
    >>> import jax.numpy as jnp, grassmann_optax as go
    >>> attention = {'query': {'kernel': jnp.ones((8, 2, 4))}}  # (embed, heads, head_dim)
    >>> params = {'attn': attention, 'mlp': {'kernel': jnp.ones((8, 16))}}
    >>> go.transformer_point_axes(params)
    {'attn/query/kernel': (0, 2), 'mlp/kernel': (0, 1)}
  """
  heads = point_axes(params) or {}
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    ndim = len(getattr(leaf, 'shape', ()))
    name = checks.leaf_name(path)
    if ndim >= 2:
      out[name] = heads.get(name, (ndim - 2, ndim - 1))
  return out


def decays(params: Any) -> Any:
  """AdamW's weight-decay mask: leaves of two axes or more, except biases and norm scales."""

  def decay(path, leaf):
    parts = _parts(path)
    return len(getattr(leaf, 'shape', ())) >= 2 and (parts[-1] if parts else '') not in (
      'bias',
      'scale',
    )

  return jax.tree_util.tree_map_with_path(decay, params)
