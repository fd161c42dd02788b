"""Speed and memory of SGD-G and Adam-G next to the Optax optimizers: ``python -m train.benchmark``.

Four measurements, all in one process so that every candidate sees the same machine:

1. **Optimizer update alone**: one jitted ``tx.update`` + ``optax.apply_updates`` with params and
   state donated, on the parameter tree of WRN-28-10 (36.5M parameters, 36.2M of them on the
   manifold by :func:`grassmann_optax.grassmann_labels`). :func:`grassmann_optax.sgdg` and
   :func:`grassmann_optax.adamg` (ω = 0 and ω = 0.1) against ``optax.sgd`` (Nesterov) and
   ``optax.adam``; against the same optimizers hand-assembled from the public transforms (what
   the fused manifold update buys) and with the CPU kernel for the column inner products
   switched off (what the kernel buys). A probe that only reads ``w``, ``g`` and the buffer once
   for those inner products times the pass that no SGD-G/Adam-G update can skip: every column's
   step depends on them, so each array is read once before any column moves. A second probe
   times the passes that follow it (new buffer, new weight) with the coefficients given, so that
   the update's time splits into its two parts.
2. **Full training step** (forward, backward, update; jitted, donated) of WRN-16-4 at batch 32
   with the paper's CIFAR hyper-parameters: Nesterov SGD with weight decay on every
   parameter against SGD-G and Adam-G with ω = 0.1. With a GPU backend (or ``--gpu``) also
   WRN-28-10 at batch 128 in images per second.
3. **Optimizer-state bytes** on the WRN-28-10 tree, from ``jax.eval_shape`` of ``init``.
4. **A Transformer**: the update of :func:`grassmann_optax.adamg` with ``point_axes`` on the
   parameter tree of GPT-2 small (124M parameters, 196 leaves of several layouts: rows of the
   embeddings, heads of the query, key and value kernels, columns of the others) against
   ``optax.adamw``, and the state bytes of both.
5. A table on stdout and the same figures as JSON (``--json``, default ``benchmark.json``).

Every time is the median over repeats; each repeat runs the candidates in a rotated order, so
that slow phases of a shared machine fall on all of them alike. Next to each ratio of medians the
table gives the lowest and highest ratio within one repeat, where the two candidates ran close
together in time. ``--quick`` measures smaller
networks with fewer repeats (under a minute on two CPU cores), and says so in the table.

References:
  Cho & Lee, "Riemannian approach to batch normalization", NeurIPS 2017, arXiv:1709.09603.
"""

import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import grassmann_optax as go

CIFAR_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
GRAD_CLIP = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
# The paper's CIFAR WRN-28-10 recipe: learning rates of the Euclidean and the manifold parameters.
SGD_LEARNING_RATE = 0.1
SGDG_LEARNING_RATES = (0.01, 0.2)
ADAMG_LEARNING_RATES = (0.01, 0.05)
ADAM_LEARNING_RATE = 0.01
ADAMG_B2 = 0.99
OMEGA = 0.1
KEEP_PROB = 0.7

# The project's speed targets: (numerator, denominator, largest ratio).
UPDATE_TARGETS = {
  'adamg(ω=0) / adam': ('adamg ω=0', 'optax.adam', 1.2),
  'sgdg(ω=0) / sgd-nesterov': ('sgdg ω=0', 'optax.sgd nesterov', 1.5),
}
TRAIN_STEP_TARGETS = {
  'sgdg(ω=0.1) / sgd': ('sgdg ω=0.1', 'sgd', 1.10),
  'adamg(ω=0.1) / sgd': ('adamg ω=0.1', 'sgd', 1.10),
}
# The probe that reads w, g and the buffer of every manifold leaf once for their six column inner
# products and does nothing else: the pass that SGD-G and Adam-G add to an optax update.
PRODUCTS_PASS = 'inner products only'
# The same three arrays read once by XLA and summed, nothing else: what reading them costs on this
# machine, the floor for the products pass.
READ_PASS = 'read w, g, b only'
# The passes that follow the inner products in the fused update, alone: with per-column
# coefficients given, the new buffer c0·b + c1·g + c2·w and the new weight w + c3·w + c4·(new
# buffer), as XLA:CPU compiles them (one loop per output).
COMBINE_PASS = 'new buffer and w only'
UPDATE_RATIOS = {
  **{name: (num, den) for name, (num, den, _) in UPDATE_TARGETS.items()},
  'inner products only / sgd-nesterov': (PRODUCTS_PASS, 'optax.sgd nesterov'),
  'inner products only / adam': (PRODUCTS_PASS, 'optax.adam'),
  'inner products only / read only': (PRODUCTS_PASS, READ_PASS),
  'read only / sgd-nesterov': (READ_PASS, 'optax.sgd nesterov'),
  'new buffer and w only / sgd-nesterov': (COMBINE_PASS, 'optax.sgd nesterov'),
  'sgdg(ω=0) XLA reductions / kernel': ('sgdg ω=0 XLA reductions', 'sgdg ω=0'),
  'adamg(ω=0) XLA reductions / kernel': ('adamg ω=0 XLA reductions', 'adamg ω=0'),
  'adamg(ω=0.1) / adam': ('adamg ω=0.1', 'optax.adam'),
  'sgdg(ω=0.1) / sgd-nesterov': ('sgdg ω=0.1', 'optax.sgd nesterov'),
  'adamg chain(ω=0) / adamg(ω=0)': ('adamg chain ω=0', 'adamg ω=0'),
  'sgdg chain(ω=0) / sgdg(ω=0)': ('sgdg chain ω=0', 'sgdg ω=0'),
}
# Sums of two probes over one candidate: (probes, denominator). The read plus the combination is
# what a fused update with this pass structure costs if its inner products ran at XLA's read
# speed and nothing overlapped.
FLOOR_RATIOS = {
  'read + new buffer and w / sgd-nesterov': ((READ_PASS, COMBINE_PASS), 'optax.sgd nesterov'),
  'read + new buffer and w / adam': ((READ_PASS, COMBINE_PASS), 'optax.adam'),
}


# ---------------------------------------------------------------------------------------------
# Parameter trees.


def wide_resnet_param_shapes(
  depth: int, widen_factor: int, num_classes: int = NUM_CLASSES, dtype=jnp.float32
) -> dict[str, Any]:
  """The parameter shapes of ``train.models.WideResNet``, built without the model.

  Names and shapes follow the Flax module: ``conv0``; per block ``bn1`` (on the block's input
  width), ``conv1``, ``bn2``, ``conv2`` and a 1x1 ``projection`` where the width or the stride
  changes; ``bn_final`` and ``fc``.
  """

  def kernel(*shape):
    return {'kernel': jax.ShapeDtypeStruct(shape, dtype)}

  def batch_norm(width):
    return {name: jax.ShapeDtypeStruct((width,), dtype) for name in ('scale', 'bias')}

  blocks_per_group = (depth - 4) // 6
  params: dict[str, Any] = {'conv0': kernel(3, 3, CIFAR_SHAPE[-1], 16)}
  width_in = 16
  for group, width in enumerate((16 * widen_factor, 32 * widen_factor, 64 * widen_factor), 1):
    for block in range(blocks_per_group):
      stride = 2 if group > 1 and block == 0 else 1
      params[f'group{group}_block{block}'] = {
        'bn1': batch_norm(width_in),
        'conv1': kernel(3, 3, width_in, width),
        'bn2': batch_norm(width),
        'conv2': kernel(3, 3, width, width),
        **(
          {'projection': kernel(1, 1, width_in, width)} if width_in != width or stride != 1 else {}
        ),
      }
      width_in = width
  params['bn_final'] = batch_norm(width_in)
  params['fc'] = {
    'kernel': jax.ShapeDtypeStruct((width_in, num_classes), dtype),
    'bias': jax.ShapeDtypeStruct((num_classes,), dtype),
  }
  return params


def create_wide_resnet(depth: int, widen_factor: int, keep_prob: float | None = None):
  """``train.models``' WideResNet, or ``None`` where that module is missing."""
  try:
    from train import models
  except ImportError:
    return None
  return models.create_model(
    'resnet',
    depth=depth,
    widen_factor=widen_factor,
    num_classes=NUM_CLASSES,
    keep_prob=keep_prob,
  )


def model_variable_shapes(model) -> dict[str, Any]:
  """``{'params': ..., 'batch_stats': ...}`` of a Flax model, as shapes (nothing is computed)."""
  image = jnp.zeros((1, *CIFAR_SHAPE), jnp.float32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), image, train=False))


def wide_resnet_shapes(depth: int, widen_factor: int) -> tuple[dict[str, Any], str]:
  """The parameter shapes of WRN-depth-k and where they came from (the model, or the fallback).

  Raises a ValueError if the model's tree differs from :func:`wide_resnet_param_shapes`.
  """
  fallback = wide_resnet_param_shapes(depth, widen_factor)
  model = create_wide_resnet(depth, widen_factor)
  if model is None:
    return fallback, 'built from shapes (train.models not found)'
  shapes = dict(model_variable_shapes(model)['params'])
  if describe_tree(shapes) != describe_tree(fallback):
    raise ValueError('train.models.WideResNet no longer has the parameter tree of WRN-d-k.')
  return shapes, 'train.models.WideResNet'


def describe_tree(shapes: Any) -> list[tuple[str, tuple[int, ...], str]]:
  """``(path, shape, dtype)`` of every leaf, for comparing trees of arrays or shapes."""
  return [
    (jax.tree_util.keystr(path), tuple(leaf.shape), str(leaf.dtype))
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]
  ]


def manifold_flags(labels: Any) -> list[bool]:
  """Per leaf of ``labels``, in leaf order: whether it is on the manifold."""
  return [label == go.GRASSMANN for label in jax.tree.leaves(labels)]


def manifold_leaves(tree: Any, labels: Any) -> list[Any]:
  """The leaves of ``tree`` that ``labels`` puts on the manifold, in leaf order."""
  leaves = zip(jax.tree.leaves(tree), manifold_flags(labels), strict=True)
  return [leaf for leaf, manifold in leaves if manifold]


def count_parameters(shapes: Any) -> tuple[int, int]:
  """``(all parameters, those on the manifold)`` by :func:`grassmann_optax.grassmann_labels`."""
  total = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))
  manifold = sum(
    int(np.prod(leaf.shape)) for leaf in manifold_leaves(shapes, go.grassmann_labels(shapes))
  )
  return total, manifold


def random_tree(seed: int, shapes: Any, scale: float = 0.05) -> Any:
  """Random arrays of ``shapes``: unit columns on the manifold, ``scale·N(0, 1)`` elsewhere."""
  return random_points(seed, shapes, go.grassmann_labels(shapes), None, scale)


def transformer_param_shapes(
  layers: int = 12,
  width: int = 768,
  heads: int = 12,
  vocab: int = 50257,
  context: int = 1024,
  dtype=jnp.float32,
) -> dict[str, Any]:
  """The parameter shapes of a GPT-2 style decoder (GPT-2 small by default: 124M parameters).

  Per layer: LayerNorms ``ln_1``, ``ln_2``; ``DenseGeneral`` query, key and value kernels
  ``(width, heads, head_dim)``, the output kernel ``(heads, head_dim, width)``, and the MLP's
  ``fc`` ``(width, 4 width)`` and ``proj`` ``(4 width, width)``, each with a bias.
  """

  def array(*shape):
    return jax.ShapeDtypeStruct(shape, dtype)

  def layer_norm():
    return {'scale': array(width), 'bias': array(width)}

  head_dim = width // heads
  params: dict[str, Any] = {
    'wte': array(vocab, width),
    'wpe': array(context, width),
    'ln_f': layer_norm(),
  }
  for index in range(layers):
    attention = {
      name: {'kernel': array(width, heads, head_dim), 'bias': array(heads, head_dim)}
      for name in ('query', 'key', 'value')
    }
    params[f'h{index}'] = {
      'ln_1': layer_norm(),
      **attention,
      'out': {'kernel': array(heads, head_dim, width), 'bias': array(width)},
      'ln_2': layer_norm(),
      'fc': {'kernel': array(width, 4 * width), 'bias': array(4 * width)},
      'proj': {'kernel': array(4 * width, width), 'bias': array(width)},
    }
  return params


def transformer_groups(shapes: Any) -> tuple[Any, Any]:
  """Labels and point axes of a normalised Transformer (nGPT and QK-norm style).

  The embedding tables' rows, each head of the query, key and value kernels, and the columns of
  the other kernels are points; biases and LayerNorm parameters are Euclidean.
  """

  def label(path, leaf):
    del leaf
    names = [getattr(key, 'key', '') for key in path]
    return go.GRASSMANN if names[-1] in ('kernel', 'wte', 'wpe') else go.EUCLIDEAN

  def axes(path, leaf):
    del leaf
    names = [getattr(key, 'key', '') for key in path]
    if names[-1] in ('wte', 'wpe'):
      return (1,)
    if names[-1] == 'kernel' and names[-2] in ('query', 'key', 'value'):
      return (0, 2)
    return None

  with_path = jax.tree_util.tree_map_with_path
  return with_path(label, shapes), with_path(axes, shapes)


def random_points(seed: int, shapes: Any, labels: Any, point_axes: Any, scale=0.05) -> Any:
  """Random arrays: unit points on the manifold (by ``point_axes``), ``scale·N(0, 1)`` elsewhere.

  Drawn with NumPy and put on the device once: no program to compile per leaf shape.
  """
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree.flatten(shapes)
  specs = treedef.flatten_up_to(point_axes) if point_axes is not None else [None] * len(leaves)

  def draw(shape, label, spec):
    x = rng.standard_normal(tuple(shape.shape), dtype=np.float32)
    if label != go.GRASSMANN:
      return scale * x
    axes = tuple(range(x.ndim - 1)) if spec is None else spec
    return x / np.sqrt(np.sum(x * x, axis=axes, keepdims=True))

  arrays = [
    draw(leaf, label, spec)
    for leaf, label, spec in zip(leaves, treedef.flatten_up_to(labels), specs, strict=True)
  ]
  return jax.device_put(treedef.unflatten(arrays))


# ---------------------------------------------------------------------------------------------
# Optimizers.


def sgdg_chain(omega: float) -> optax.GradientTransformation:
  """SGD-G assembled from the public transforms (what :func:`grassmann_optax.sgdg` fuses)."""
  manifold = optax.chain(
    go.add_orthogonality_gradient(omega),
    go.project_to_tangent(),
    go.grassmann_clip(GRAD_CLIP),
    go.grassmann_momentum(MOMENTUM),
    optax.scale_by_learning_rate(SGDG_LEARNING_RATES[1]),
    go.exp_map_update(),
  )
  euclidean = go.euclidean_sgd(SGDG_LEARNING_RATES[0], momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
  return go.grassmann_partition(manifold, euclidean, None)


def adamg_chain(omega: float) -> optax.GradientTransformation:
  """Adam-G assembled from the public transforms (what :func:`grassmann_optax.adamg` fuses)."""
  manifold = optax.chain(
    go.add_orthogonality_gradient(omega),
    go.project_to_tangent(),
    go.grassmann_clip(GRAD_CLIP),
    go.grassmann_adam_moments(MOMENTUM, ADAMG_B2),
    optax.scale_by_learning_rate(ADAMG_LEARNING_RATES[1]),
    go.exp_map_update(),
  )
  euclidean = go.euclidean_sgd(
    ADAMG_LEARNING_RATES[0], momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
  )
  return go.grassmann_partition(manifold, euclidean, None)


def sgdg(omega: float) -> optax.GradientTransformation:
  return go.sgdg(*SGDG_LEARNING_RATES, momentum=MOMENTUM, grad_clip=GRAD_CLIP, omega=omega)


def adamg(omega: float) -> optax.GradientTransformation:
  return go.adamg(*ADAMG_LEARNING_RATES, b1=MOMENTUM, b2=ADAMG_B2, grad_clip=GRAD_CLIP, omega=omega)


def sgd_nesterov() -> optax.GradientTransformation:
  return optax.sgd(SGD_LEARNING_RATE, momentum=MOMENTUM, nesterov=True)


def sgd_baseline() -> optax.GradientTransformation:
  """The paper's SGD baseline: L2 decay on every parameter, then Nesterov momentum."""
  return optax.chain(optax.add_decayed_weights(WEIGHT_DECAY), sgd_nesterov())


def without_cpu_kernel(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """``tx`` with its column inner products left to XLA (six reductions) instead of the kernel."""

  def update_fn(updates, state, params=None):
    with go.cpu_kernel.disabled():
      return tx.update(updates, state, params)

  return optax.GradientTransformation(tx.init, update_fn)


def update_candidates() -> dict[str, Callable[[], optax.GradientTransformation]]:
  """The optimizers whose update is timed, by the names the table uses."""
  return {
    'optax.sgd nesterov': sgd_nesterov,
    'optax.adam': lambda: optax.adam(ADAM_LEARNING_RATE),
    'sgdg ω=0': lambda: sgdg(0.0),
    'adamg ω=0': lambda: adamg(0.0),
    'sgdg ω=0 XLA reductions': lambda: without_cpu_kernel(sgdg(0.0)),
    'adamg ω=0 XLA reductions': lambda: without_cpu_kernel(adamg(0.0)),
    'sgdg ω=0.1': lambda: sgdg(OMEGA),
    'adamg ω=0.1': lambda: adamg(OMEGA),
    'sgdg chain ω=0': lambda: sgdg_chain(0.0),
    'adamg chain ω=0': lambda: adamg_chain(0.0),
  }


ADAMW_LEARNING_RATE = 1e-3
TRANSFORMER_RATIOS = {
  'adamg(point_axes) / adamw': ('adamg point_axes', 'optax.adamw'),
  'adamg(point_axes) / adam': ('adamg point_axes', 'optax.adam'),
}


def transformer_candidates(labels, point_axes) -> dict[str, Callable[[], Any]]:
  """AdamW and Adam against Adam-G on the Transformer's points (ω = 0: no orthogonality)."""
  return {
    'optax.adamw': lambda: optax.adamw(ADAMW_LEARNING_RATE, weight_decay=0.1),
    'optax.adam': lambda: optax.adam(ADAMW_LEARNING_RATE),
    'adamg point_axes': lambda: go.adamg(
      ADAMW_LEARNING_RATE,
      ADAMG_LEARNING_RATES[1],
      omega=0.0,
      param_labels=labels,
      point_axes=point_axes,
    ),
  }


def train_step_candidates() -> dict[str, Callable[[], optax.GradientTransformation]]:
  return {
    'sgd': sgd_baseline,
    'sgdg ω=0.1': lambda: sgdg(OMEGA),
    'adamg ω=0.1': lambda: adamg(OMEGA),
  }


# ---------------------------------------------------------------------------------------------
# Steps.


@jax.jit
def copy_tree(tree: Any) -> Any:
  """Fresh device buffers for ``tree``, so that each candidate can donate its own."""
  return jax.tree.map(jnp.copy, tree)


def make_update_step(tx: optax.GradientTransformation) -> Callable:
  """``(params, state, grads) -> (params, state)``, jitted, params and state donated."""

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(0, 1))


def make_products_step(labels: Any, *, read_only: bool = False) -> Callable:
  """``(params, sums, grads, buffers) -> (params, sums)``: a pass over every manifold leaf.

  The buffer is a copy of the gradient, so the step reads three manifold-sized arrays as SGD-G
  and Adam-G do, computes ``wᵀw, wᵀg, gᵀg, wᵀb, gᵀb, bᵀb`` per column the way the fused update
  does (the CPU kernel where it is available), and passes ``params`` through. With
  ``read_only`` it only sums ``w + g + b`` per column in one XLA reduction: the same reads with
  as little arithmetic as possible, for the memory system's share of the time.
  """
  is_manifold = manifold_flags(labels)

  def read(w, g, b):
    return (jnp.sum(w + g + b, axis=tuple(range(w.ndim - 1))),)

  reduce = read if read_only else go.cpu_kernel.column_products

  def step(params, sums, grads, buffers):
    leaves = zip(*map(jax.tree.leaves, (params, grads, buffers)), strict=True)
    sums = [
      reduce(w, g, b) for (w, g, b), manifold in zip(leaves, is_manifold, strict=True) if manifold
    ]
    return params, sums

  return jax.jit(step, donate_argnums=(0, 1))


def make_combination_step(labels: Any) -> Callable:
  """``(params, buffers, grads, coefficients) -> (params, buffers)``: the update's last passes.

  For each manifold leaf, with its per-column coefficients ``c`` (shape ``(5, p)``, in the order
  of the manifold leaves) given as an input, writes the new buffer ``b' = c0·b + c1·g + c2·w`` and
  the new weight ``w + c3·w + c4·b'``: what :func:`grassmann_optax.sgdg` and
  :func:`grassmann_optax.adamg` write once the inner products are known, without the
  inner products and the per-column maths. Euclidean leaves pass through. Params and buffers are
  donated, as in the update.
  """
  is_manifold = manifold_flags(labels)

  def step(params, buffers, grads, coefficients):
    treedef = jax.tree.structure(params)
    leaves = zip(*map(jax.tree.leaves, (params, buffers, grads)), strict=True)
    column = iter(coefficients)
    new_params, new_buffers = [], []
    for (w, b, g), manifold in zip(leaves, is_manifold, strict=True):
      if manifold:
        c = next(column)
        b = c[0] * b + c[1] * g + c[2] * w
        w = w + c[3] * w + c[4] * b
      new_params.append(w)
      new_buffers.append(b)
    return jax.tree.unflatten(treedef, new_params), jax.tree.unflatten(treedef, new_buffers)

  return jax.jit(step, donate_argnums=(0, 1))


def combination_coefficients(params: Any, labels: Any) -> list[jax.Array]:
  """Per-column coefficients for :func:`make_combination_step` that keep the values bounded."""
  values = jnp.asarray([0.9, 1.0, -1e-3, -1e-4, -1e-2], jnp.float32)[:, None]
  return [jnp.broadcast_to(values, (5, w.shape[-1])) for w in manifold_leaves(params, labels)]


def make_train_step(model, tx: optax.GradientTransformation) -> Callable:
  """``(params, batch_stats, state, images, labels, rng) -> (params, batch_stats, state)``.

  Forward in train mode (batch statistics, dropout), backward, update; jitted, with params,
  BatchNorm statistics and optimizer state donated.
  """

  def step(params, batch_stats, state, images, labels, rng):
    def loss_fn(params):
      logits, updates = model.apply(
        {'params': params, 'batch_stats': batch_stats},
        images,
        train=True,
        rngs={'dropout': rng},
        mutable=['batch_stats'],
      )
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, updates['batch_stats']

    grads, batch_stats = jax.grad(loss_fn, has_aux=True)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), batch_stats, state

  return jax.jit(step, donate_argnums=(0, 1, 2))


def make_runner(step: Callable, carry: tuple, *args) -> Callable[[int], float]:
  """``run(n)``: ``n`` steps from the carried state on; returns the seconds per step."""
  box = [carry]

  def run(num_steps: int) -> float:
    carry = box[0]
    start = time.perf_counter()
    for _ in range(num_steps):
      carry = step(*carry, *args)
    jax.block_until_ready(carry)
    box[0] = carry
    return (time.perf_counter() - start) / num_steps

  return run


def compile_runners(
  steps: Mapping[str, tuple[Callable, tuple, tuple]],
) -> tuple[dict[str, Callable[[int], float]], dict[str, float]]:
  """Compiles every ``name: (jitted step, carry, args)`` ahead of time, on all cores at once.

  Returns the runners and the seconds each compilation took. XLA compiles outside the GIL, so
  a thread per core shortens the wait without touching what is measured.
  """

  def compile_one(item):
    name, (step, carry, args) = item
    start = time.perf_counter()
    compiled = step.lower(*carry, *args).compile()
    return name, compiled, time.perf_counter() - start

  runners, compile_s = {}, {}
  with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
    for name, compiled, seconds in pool.map(compile_one, steps.items()):
      step, carry, args = steps[name]
      runners[name], compile_s[name] = make_runner(compiled, carry, *args), seconds
  return runners, compile_s


def time_interleaved(
  runners: Mapping[str, Callable[[int], float]],
  *,
  repeats: int,
  warmup: int = 2,
  min_sample_s: float = 0.2,
) -> dict[str, dict[str, Any]]:
  """Median seconds per step of each runner, the candidates interleaved across repeats.

  The warm-up steps also fix, per candidate, how many steps one sample runs (enough for
  ``min_sample_s``). Repeat ``r`` starts at candidate ``r``.
  """
  names = list(runners)
  steps_per_sample = {}
  for name in names:
    warm = min(runners[name](1) for _ in range(max(warmup, 1)))
    steps_per_sample[name] = max(1, round(min_sample_s / warm))
  samples: dict[str, list[float]] = {name: [] for name in names}
  for repeat in range(repeats):
    for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
      samples[name].append(runners[name](steps_per_sample[name]))
  return {
    name: {
      'median_ms': 1e3 * statistics.median(samples[name]),
      'min_ms': 1e3 * min(samples[name]),
      'steps_per_sample': steps_per_sample[name],
      'samples_ms': [1e3 * s for s in samples[name]],
    }
    for name in names
  }


def ratios(times: Mapping[str, Mapping[str, float]], pairs: Mapping[str, Sequence[str]]):
  """``{name: median(num) / median(den)}`` for the pairs whose candidates were timed."""
  return {
    name: times[num]['median_ms'] / times[den]['median_ms']
    for name, (num, den, *_) in pairs.items()
    if num in times and den in times
  }


def repeat_ratio_ranges(
  times: Mapping[str, Mapping[str, Any]], pairs: Mapping[str, Sequence]
) -> dict[str, list[float]]:
  """``{name: [lowest, highest]}`` of ``num / den`` sample by sample, one ratio per repeat.

  A repeat times every candidate once, one right after the other, so each of its ratios compares
  samples taken close together; the range shows how far a shared machine's drift moves a ratio.
  """
  ranges = {}
  for name, (num, den, *_) in pairs.items():
    if num in times and den in times:
      per_repeat = [
        a / b for a, b in zip(times[num]['samples_ms'], times[den]['samples_ms'], strict=True)
      ]
      ranges[name] = [min(per_repeat), max(per_repeat)]
  return ranges


def floor_ratios(times: Mapping[str, Mapping[str, float]], sums: Mapping[str, Sequence]):
  """``{name: sum(median(probe) for probe in probes) / median(den)}`` where all were timed."""
  return {
    name: sum(times[probe]['median_ms'] for probe in probes) / times[den]['median_ms']
    for name, (probes, den) in sums.items()
    if den in times and all(probe in times for probe in probes)
  }


def target_results(measured: Mapping[str, float], targets: Mapping[str, Sequence]) -> dict:
  return {
    name: {'ratio': measured[name], 'limit': limit, 'met': bool(measured[name] <= limit)}
    for name, (*_, limit) in targets.items()
    if name in measured
  }


# ---------------------------------------------------------------------------------------------
# The measurements.


def update_steps(candidates, params: Any, grads: Any) -> dict[str, tuple]:
  """One donated update step per candidate, each on its own copy of ``params``."""
  steps = {}
  for name, make_tx in candidates.items():
    tx = make_tx()
    own_params = copy_tree(params)
    steps[name] = (make_update_step(tx), (own_params, tx.init(own_params)), (grads,))
  return steps


def time_steps(steps: dict[str, tuple], *, repeats: int, min_sample_s: float) -> dict:
  """Compiles ``steps`` (emptied on the way, to free their buffers) and times them interleaved."""
  runners, compile_s = compile_runners(steps)
  steps.clear()
  times = time_interleaved(runners, repeats=repeats, min_sample_s=min_sample_s)
  for name, seconds in compile_s.items():
    times[name]['compile_s'] = seconds
  return times


def benchmark_update(
  shapes: Any,
  candidates: Mapping[str, Callable[[], optax.GradientTransformation]],
  *,
  repeats: int,
  min_sample_s: float = 0.2,
  seed: int = 0,
  with_products_pass: bool = True,
) -> dict[str, Any]:
  """Times ``update`` + ``apply_updates`` of each candidate on random params of ``shapes``.

  With ``with_products_pass``, also times :func:`make_products_step`: the one extra read of
  the manifold arrays that any SGD-G/Adam-G update needs before it can move a column, the
  same reads done by XLA with nothing computed (the floor of that pass on this machine), and
  :func:`make_combination_step`, the passes that write the new buffer and weight.
  """
  params = random_tree(seed, shapes)
  grads = random_tree(seed + 1, shapes, scale=1e-2)
  steps = update_steps(candidates, params, grads)
  if with_products_pass:
    labels = go.grassmann_labels(params)
    for name, read_only in ((PRODUCTS_PASS, False), (READ_PASS, True)):
      step = make_products_step(labels, read_only=read_only)
      own_params = copy_tree(params)
      sums = jax.eval_shape(step, own_params, None, grads, grads)[1]
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums)
      steps[name] = (step, (own_params, zeros), (grads, copy_tree(grads)))
    steps[COMBINE_PASS] = (
      make_combination_step(labels),
      (copy_tree(params), copy_tree(grads)),
      (grads, combination_coefficients(params, labels)),
    )
  del params
  times = time_steps(steps, repeats=repeats, min_sample_s=min_sample_s)
  measured = ratios(times, UPDATE_RATIOS)
  measured.update(floor_ratios(times, FLOOR_RATIOS))
  num_params, num_manifold = count_parameters(shapes)
  return {
    'num_params': num_params,
    'num_manifold_params': num_manifold,
    'times': times,
    'ratios': measured,
    'ratio_ranges': repeat_ratio_ranges(times, UPDATE_RATIOS),
    'targets': target_results(measured, UPDATE_TARGETS),
  }


def benchmark_transformer(shapes: Any, *, repeats: int, min_sample_s: float = 0.2) -> dict:
  """Times the update of each Transformer candidate; the state bytes of each."""
  labels, point_axes = transformer_groups(shapes)
  params = random_points(0, shapes, labels, point_axes)
  grads = random_points(1, shapes, labels, None, scale=1e-3)
  candidates = transformer_candidates(labels, point_axes)
  steps = update_steps(candidates, params, grads)
  del params
  times = time_steps(steps, repeats=repeats, min_sample_s=min_sample_s)
  leaves = jax.tree.leaves(shapes)
  return {
    'num_params': sum(int(np.prod(leaf.shape)) for leaf in leaves),
    'num_leaves': len(leaves),
    'num_manifold_params': sum(
      int(np.prod(leaf.shape)) for leaf in manifold_leaves(shapes, labels)
    ),
    'times': times,
    'ratios': ratios(times, TRANSFORMER_RATIOS),
    'ratio_ranges': repeat_ratio_ranges(times, TRANSFORMER_RATIOS),
    'targets': {},
    'state_bytes': {
      name: tree_nbytes(jax.eval_shape(make_tx().init, shapes))
      for name, make_tx in candidates.items()
    },
    'param_bytes': tree_nbytes(shapes),
  }


def benchmark_train_step(
  depth: int,
  widen_factor: int,
  batch_size: int,
  candidates: Mapping[str, Callable[[], optax.GradientTransformation]],
  *,
  repeats: int,
  min_sample_s: float = 0.5,
  seed: int = 0,
) -> dict[str, Any]:
  """Times forward + backward + update of WRN-depth-k at ``batch_size`` for each candidate.

  The manifold kernels start with unit columns, as in the training program.
  """
  model = create_wide_resnet(depth, widen_factor, keep_prob=KEEP_PROB)
  if model is None:
    return {'skipped': 'train.models not found'}
  shapes = model_variable_shapes(model)
  params = random_tree(seed, shapes['params'])
  batch_stats = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), shapes['batch_stats'])
  rng = np.random.default_rng(seed + 1)
  images = jax.device_put(rng.standard_normal((batch_size, *CIFAR_SHAPE), dtype=np.float32))
  labels = jax.device_put(np.arange(batch_size, dtype=np.int32) % NUM_CLASSES)
  dropout_key = jax.random.key(seed)
  steps = {}
  for name, make_tx in candidates.items():
    tx = make_tx()
    own = copy_tree((params, batch_stats))
    steps[name] = (
      make_train_step(model, tx),
      (*own, tx.init(own[0])),
      (images, labels, dropout_key),
    )
  times = time_steps(steps, repeats=repeats, min_sample_s=min_sample_s)
  for result in times.values():
    result['images_per_s'] = 1e3 * batch_size / result['median_ms']
  measured = ratios(times, TRAIN_STEP_TARGETS)
  return {
    'model': f'WRN-{depth}-{widen_factor}',
    'batch_size': batch_size,
    'num_params': count_parameters(shapes['params'])[0],
    'times': times,
    'ratios': measured,
    'ratio_ranges': repeat_ratio_ranges(times, TRAIN_STEP_TARGETS),
    'targets': target_results(measured, TRAIN_STEP_TARGETS),
  }


def tree_nbytes(tree: Any) -> int:
  return sum(
    int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree)
  )


def state_bytes(shapes: Any) -> dict[str, Any]:
  """Bytes of the optimizer state of each optimizer on ``shapes``, from ``eval_shape(init)``."""
  optimizers = {
    'optax.sgd nesterov': sgd_nesterov(),
    'optax.adam': optax.adam(ADAM_LEARNING_RATE),
    'sgdg': sgdg(OMEGA),
    'adamg': adamg(OMEGA),
  }
  manifold = manifold_leaves(shapes, go.grassmann_labels(shapes))
  return {
    'param_bytes': tree_nbytes(shapes),
    'manifold_param_bytes': tree_nbytes(manifold),
    'manifold_columns': sum(leaf.shape[-1] for leaf in manifold),
    'state_bytes': {
      name: tree_nbytes(jax.eval_shape(tx.init, shapes)) for name, tx in optimizers.items()
    },
  }


# ---------------------------------------------------------------------------------------------
# Report.


def machine_info() -> dict[str, Any]:
  processor = platform.processor()
  if not processor and os.path.exists('/proc/cpuinfo'):
    with open('/proc/cpuinfo') as cpuinfo:
      names = [line.split(':', 1)[1].strip() for line in cpuinfo if line.startswith('model name')]
    processor = names[0] if names else ''
  return {
    'processor': processor,
    'machine': platform.machine(),
    'cpu_count': os.cpu_count(),
    'python': platform.python_version(),
    'jax': jax.__version__,
    'optax': optax.__version__,
    'backend': jax.default_backend(),
    'devices': [str(device) for device in jax.devices()],
    'xla_flags': os.environ.get('XLA_FLAGS', ''),
    'cpu_kernel': go.cpu_kernel.variant() if jax.default_backend() == 'cpu' else None,
  }


def load_average() -> list[float] | None:
  return list(os.getloadavg()) if hasattr(os, 'getloadavg') else None


def format_times(title: str, result: Mapping[str, Any], unit: str = 'ms') -> list[str]:
  lines = [
    title,
    f'  {"candidate":28s} {"median " + unit:>12s} {"min " + unit:>10s} {"compile s":>10s}',
  ]
  for name, t in result['times'].items():
    extra = f'  {t["images_per_s"]:8.1f} img/s' if 'images_per_s' in t else ''
    lines.append(
      f'  {name:28s} {t["median_ms"]:12.2f} {t["min_ms"]:10.2f} {t["compile_s"]:10.2f}{extra}'
    )
  for name, value in result['ratios'].items():
    target = result['targets'].get(name)
    verdict = (
      f'  (target ≤ {target["limit"]:.2f}: {"met" if target["met"] else "MISSED"})'
      if target
      else ''
    )
    low_high = result.get('ratio_ranges', {}).get(name)
    spread = f'  (repeats {low_high[0]:.2f}-{low_high[1]:.2f})' if low_high else ''
    lines.append(f'  {name:40s} {value:6.2f}×{spread}{verdict}')
  return lines


def format_header(report: Mapping[str, Any]) -> list[str]:
  machine = report['machine']
  mode = ' (--quick: smaller networks, fewer repeats)' if report['quick'] else ''
  return [
    f'grassmann_optax benchmark{mode}',
    f'machine: {machine["processor"] or "?"} ({machine["machine"]}), {machine["cpu_count"]} CPUs, '
    f'backend {machine["backend"]}, jax {machine["jax"]}, optax {machine["optax"]}, '
    f'python {machine["python"]}, CPU kernel {machine["cpu_kernel"] or "off"}',
    f'load average (1, 5, 15 min): start {report["load_average"]["start"]}, '
    f'end {report["load_average"]["end"]}',
  ]


def format_update(update: Mapping[str, Any]) -> list[str]:
  title = (
    f'1. optimizer update + apply_updates (jit, donated) on {update["tree"]}: '
    f'{update["num_params"] / 1e6:.2f}M params, {update["num_manifold_params"] / 1e6:.2f}M on the '
    f'manifold; {update["repeats"]} repeats, {update["elapsed_s"]:.0f} s'
  )
  return format_times(title, update)


def format_train_step(section: Mapping[str, Any]) -> list[str]:
  if 'skipped' in section:
    return [f'{section["title"]}: not run: {section["skipped"]}']
  return format_times(f'{section["title"]}, {section["elapsed_s"]:.0f} s', section)


def format_state(state: Mapping[str, Any]) -> list[str]:
  params = state['param_bytes']
  lines = [
    f'3. optimizer state on {state["tree"]} (eval_shape of init): params {params / 2**20:.2f} '
    f'MiB, of which {state["manifold_param_bytes"] / 2**20:.2f} MiB on the manifold in '
    f'{state["manifold_columns"]} columns'
  ]
  for name, nbytes in state['state_bytes'].items():
    lines.append(
      f'  {name:28s} {nbytes / 2**20:10.2f} MiB  = {nbytes / params:.4f}× params '
      f'(params {nbytes - params:+,d} bytes)'
    )
  return lines


def format_transformer(section: Mapping[str, Any]) -> list[str]:
  title = (
    f'4. optimizer update + apply_updates (jit, donated) on {section["tree"]}: '
    f'{section["num_params"] / 1e6:.2f}M params in {section["num_leaves"]} leaves, '
    f'{section["num_manifold_params"] / 1e6:.2f}M on the manifold; {section["repeats"]} '
    f'repeats, {section["elapsed_s"]:.0f} s'
  )
  lines = format_times(title, section)
  params = section['param_bytes']
  lines.append('  optimizer state:')
  for name, nbytes in section['state_bytes'].items():
    lines.append(f'  {name:28s} {nbytes / 2**20:10.2f} MiB  = {nbytes / params:.4f}× params')
  return lines


def format_report(report: Mapping[str, Any]) -> str:
  sections = [
    format_header(report),
    format_update(report['update']),
    format_train_step(report['train_step']),
    format_train_step(report['gpu_train_step']),
    format_state(report['state']),
    format_transformer(report['transformer']),
  ]
  return '\n\n'.join('\n'.join(lines) for lines in sections)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog='python -m train.benchmark', description=__doc__.split('\n')[0]
  )
  parser.add_argument('--quick', action='store_true', help='smaller networks, fewer repeats')
  parser.add_argument('--json', default='benchmark.json', help='where to write the figures')
  parser.add_argument('--repeats', type=int, default=None, help='timed samples per candidate')
  parser.add_argument(
    '--gpu',
    action='store_true',
    help='time the WRN-28-10 batch-128 training step (automatic on a GPU backend)',
  )
  return parser.parse_args(argv)


# What each mode measures: (depth, widen factor) of the update tree, (depth, widen factor, batch)
# of the training step, repeats, and the shortest timed sample of each section.
SETTINGS = {
  'full': dict(
    update_net=(28, 10),
    train_net=(16, 4, 32),
    transformer={},
    repeats=9,
    sample_s=(0.3, 0.5),
  ),
  'quick': dict(
    update_net=(16, 4),
    train_net=(10, 4, 16),
    transformer=dict(layers=2, width=256, heads=4, vocab=4096, context=256),
    repeats=3,
    sample_s=(0.05, 0.0),
  ),
}
GPU_TRAIN_NET = (28, 10, 128)


def timed(section: Callable[[], dict[str, Any]]) -> dict[str, Any]:
  start = time.perf_counter()
  result = section()
  return {**result, 'elapsed_s': time.perf_counter() - start}


def update_section(depth: int, widen_factor: int, repeats: int, sample_s: float) -> dict:
  shapes, source = wide_resnet_shapes(depth, widen_factor)
  tree = f'WRN-{depth}-{widen_factor} ({source})'
  print(f'1. optimizer update on {tree} ...', flush=True)
  result = benchmark_update(shapes, update_candidates(), repeats=repeats, min_sample_s=sample_s)
  return {'tree': tree, 'repeats': repeats, **result}


def train_step_section(
  number: str, depth: int, widen_factor: int, batch_size: int, repeats: int, sample_s: float
) -> dict:
  title = (
    f'{number}. training step (forward, backward, update; jit, donated) of WRN-{depth}-'
    f'{widen_factor} at batch {batch_size} on {jax.default_backend()}; {repeats} repeats'
  )
  print(title + ' ...', flush=True)
  result = benchmark_train_step(
    depth,
    widen_factor,
    batch_size,
    train_step_candidates(),
    repeats=repeats,
    min_sample_s=sample_s,
  )
  return {'title': title, **result}


def transformer_section(config: Mapping[str, int], repeats: int, sample_s: float) -> dict:
  shapes = transformer_param_shapes(**config)
  tree = (
    'GPT-2 small'
    if not config
    else 'a small GPT-2 ({})'.format(', '.join(f'{name} {value}' for name, value in config.items()))
  )
  print(f'4. optimizer update on {tree} ...', flush=True)
  return {
    'tree': tree,
    'repeats': repeats,
    **benchmark_transformer(shapes, repeats=repeats, min_sample_s=sample_s),
  }


def gpu_section(requested: bool, repeats: int) -> dict:
  depth, widen_factor, batch_size = GPU_TRAIN_NET
  if jax.default_backend() != 'gpu':
    title = f'2b. training step of WRN-{depth}-{widen_factor} at batch {batch_size} (images/s)'
    reason = f'no GPU backend (jax backend: {jax.default_backend()})'
    if requested:
      reason += '; --gpu needs a jax with CUDA and a visible GPU'
    return {'title': title, 'skipped': reason}
  return train_step_section('2b', depth, widen_factor, batch_size, repeats, 0.5)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  settings = SETTINGS['quick' if args.quick else 'full']
  repeats = args.repeats or settings['repeats']
  update_sample_s, train_sample_s = settings['sample_s']
  print(f'backend {jax.default_backend()}, load average {load_average()}', flush=True)
  report: dict[str, Any] = {
    'machine': machine_info(),
    'load_average': {'start': load_average()},
    'quick': args.quick,
  }
  report['update'] = timed(
    lambda: update_section(*settings['update_net'], repeats, update_sample_s)
  )
  report['train_step'] = timed(
    lambda: train_step_section('2', *settings['train_net'], repeats, train_sample_s)
  )
  report['gpu_train_step'] = timed(lambda: gpu_section(args.gpu, repeats))
  report['state'] = {'tree': 'WRN-28-10', **state_bytes(wide_resnet_shapes(28, 10)[0])}
  report['transformer'] = timed(
    lambda: transformer_section(settings['transformer'], repeats, update_sample_s)
  )
  report['load_average']['end'] = load_average()

  print()
  print(format_report(report))
  with open(args.json, 'w') as file:
    json.dump(report, file, indent=2, ensure_ascii=False)
  print(f'\nwrote {os.path.abspath(args.json)}')
  return report


if __name__ == '__main__':
  main(sys.argv[1:])
