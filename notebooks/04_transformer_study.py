# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 4. A Transformer study: AdamW, Adam-G on the groups the network has, and a sphere
#
# Cho & Lee (*Riemannian approach to batch normalization*, NeurIPS 2017,
# [arXiv:1709.09603](https://arxiv.org/abs/1709.09603)) put the weight vectors that feed a
# BatchNorm on the sphere. Transformers have no BatchNorm, but they have other normalisations,
# and with them other scale invariances ((P1)-(P4) in `docs/algorithm.md`, the project's write-up
# of the algorithm, whose equation numbers this notebook cites):
#
# * **QK-norm**, an RMSNorm on each head of the queries and keys: the loss does not change when
#   the weights of one head of the query (or key) projection are scaled, so each head of a
#   `(embed, heads, head_dim)` kernel is one point, the point axes `(0, 2)`;
# * a projection followed by a **LayerNorm** over its outputs: only the whole matrix is free of
#   scale, one point with all axes;
# * everything else (values, attention output, MLP, head) feeds the residual stream or the logits
#   and is not scale-invariant at all.
#
# This notebook trains a small Vision Transformer on scikit-learn's 8×8 digits (no download) with
#
# 1. **AdamW**, the usual baseline, with a few learning rates;
# 2. **Adam-G on the groups that `go.find_scale_invariant` finds**, every other parameter with
#    the same AdamW;
# 3. **Adam-G as the library's alias builds it**, `go.adamg(lr, lr_g, **found._asdict())`: the
#    same groups, every other parameter with the paper's Nesterov SGD;
# 4. **a whole-matrix sphere, Hyperball-style**: every kernel on the sphere as one point at its
#    initial norm (`point_axes` all axes, `radius='init'`, `omega=0`), whether or not the network
#    is invariant to its scale, the rest with AdamW;
#
# over several seeds, with the learning rates chosen on a held-out split, and reports the medians
# of the test metrics, the training loss and the constraint over training.

# %%
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from sklearn.model_selection import train_test_split

import grassmann_optax as go

import common

# Quick mode: 2 seeds, 30 steps, one learning rate per optimizer.
SEEDS = 2 if common.QUICK else 5
STEPS, WARMUP = (30, 5) if common.QUICK else (800, 50)
BATCH = 64

images, labels = common.digits()
x_rest, x_test, y_rest, y_test = train_test_split(
  images, labels, test_size=300, stratify=labels, random_state=0
)
x_train, x_val, y_train, y_val = train_test_split(
  x_rest, y_rest, test_size=300, stratify=y_rest, random_state=0
)
x_train, y_train = jnp.asarray(x_train), jnp.asarray(y_train)
common.describe(
  seeds=SEEDS, steps=STEPS, images=f'{len(x_train)} training, {len(x_val)} validation, 300 test'
)

# %% [markdown]
# ## The model
#
# Each 8×8 image is cut into 16 patches of 2×2 pixels. A bias-free `embed` projection to width
# 32 is followed by a LayerNorm (an embedding norm), then a learned position embedding is added.
# Two pre-LayerNorm blocks follow: attention with 4 heads whose query and key projections are
# `nn.DenseGeneral` kernels `(embed, heads, head_dim)` = `(32, 4, 8)`, each followed by a per-head
# `nn.RMSNorm` (QK-norm), and a GELU MLP of width 64. A final LayerNorm, the mean over the
# patches, and a dense head give the 10 logits. The sizes are fields of the module.


# %%
class Block(nn.Module):
  width: int
  heads: int
  mlp: int

  @nn.compact
  def __call__(self, x):
    head_dim = self.width // self.heads
    project = lambda name: nn.DenseGeneral((self.heads, head_dim), use_bias=False, name=name)
    h = nn.LayerNorm(name='attention_norm')(x)
    q = nn.RMSNorm(name='query_norm')(project('query')(h))  # QK-norm: over head_dim, per head
    k = nn.RMSNorm(name='key_norm')(project('key')(h))
    attention = nn.dot_product_attention(q, k, project('value')(h))
    x = x + nn.DenseGeneral(self.width, axis=(-2, -1), use_bias=False, name='out')(attention)
    h = nn.gelu(nn.Dense(self.mlp, name='mlp_in')(nn.LayerNorm(name='mlp_norm')(x)))
    return x + nn.Dense(self.width, name='mlp_out')(h)


class ViT(nn.Module):
  width: int = 32
  depth: int = 2
  heads: int = 4
  mlp: int = 64
  patch: int = 2

  @nn.compact
  def __call__(self, images):
    p, n = self.patch, images.shape[1] // self.patch
    patches = images.reshape(-1, n, p, n, p).transpose(0, 1, 3, 2, 4).reshape(-1, n * n, p * p)
    x = nn.Dense(self.width, use_bias=False, name='embed')(patches)
    x = nn.LayerNorm(name='embed_norm')(x)
    x = x + self.param('position', nn.initializers.normal(0.02), (n * n, self.width))
    for i in range(self.depth):
      x = Block(self.width, self.heads, self.mlp, name=f'block{i}')(x)
    return nn.Dense(10, name='head')(nn.LayerNorm(name='final_norm')(x).mean(1))


model = ViT()


def init(key):
  return model.init(key, x_train[:1])['params']


def loss_fn(params, xb, yb):
  logits = model.apply({'params': params}, xb)
  return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()


num_params = sum(w.size for w in jax.tree.leaves(init(jax.random.key(0))))
print(f'{num_params} parameters')

# %% [markdown]
# ## What `find_scale_invariant` finds
#
# `go.find_scale_invariant(loss_fn, params, batch)` evaluates two gradients (at the parameters and
# at a point near them) and tests Euler's
# relation `⟨∂L/∂w_j, w_j⟩ = 0` on every grouping of each leaf's axes into points; the passing
# grouping with the most points wins ((P4)). It runs on a real batch of 256 images, at random
# parameters (Flax's zero biases drawn from N(0, 1), as notebook 1 explains).
#
# Its default tolerance on the cosine, `tol=1e-3`, is sized for BatchNorm, whose `ε = 1e-5`
# leaves cosines up to ~5e-4 on invariant kernels. LayerNorm and RMSNorm here have `ε = 1e-6`
# against unit-scale activations, so invariant leaves show cosines of ~1e-7; we pass `tol=1e-5`.
# The table gives, for every matrix, the label and point axes found, the number of points, the
# largest cosine over those points, and the cosines of the other two natural groupings: the
# columns (largest over them) and the whole leaf. The lines below it repeat the search at three
# random draws of parameters and batch, with `tol=1e-5` and with the default `tol=1e-3`.


# %% tags=["found"]
def cosines(w, g, axes):
  """|cos(w_j, g_j)| of every point ``j`` of the leaf ``w`` with point axes ``axes``."""
  inner = jnp.abs(jnp.sum(w * g, axis=axes))
  return inner / jnp.maximum(jnp.sqrt(jnp.sum(w * w, axis=axes) * jnp.sum(g * g, axis=axes)), 1e-30)


def draw(seed):
  params = common.with_random_biases(init(jax.random.key(seed)), jax.random.key(100 + seed))
  batch = slice(256 * seed, 256 * (seed + 1))
  return params, x_train[batch], y_train[batch]


def manifold_names(found):
  labels = common.named_leaves(found.param_labels)
  return [name for name, label in labels.items() if label == go.GRASSMANN]


jit_loss = jax.jit(loss_fn)  # the search differentiates it once per draw
params, xb, yb = draw(0)
found = go.find_scale_invariant(jit_loss, params, xb, yb, tol=1e-5)
labels_of, axes_of = common.named_leaves(found.param_labels), common.named_leaves(found.point_axes)
gradient_of = common.named_leaves(jax.grad(loss_fn)(params, xb, yb))
print(
  f'{"leaf":<22} {"shape":<9} {"found":<10} {"points":>6} {"max|cos|":>9} '
  f'{"columns":>9} {"whole":>9}'
)
for name, w in common.named_leaves(params).items():
  if w.ndim < 2:
    continue  # vectors (biases, norm scales) are never on a sphere
  g, axes = gradient_of[name], axes_of[name]
  axes = tuple(range(w.ndim - 1)) if axes is None else axes
  columns, whole = cosines(w, g, tuple(range(w.ndim - 1))), cosines(w, g, tuple(range(w.ndim)))
  if labels_of[name] == go.GRASSMANN:
    where, points = ','.join(map(str, axes)), cosines(w, g, axes)
    found_cells = f'{where:<10} {points.size:6d} {float(points.max()):9.1e}'
  else:
    found_cells = f'{"-":<10} {"-":>6} {"-":>9}'
  shape = 'x'.join(map(str, w.shape))
  print(f'{name:<22} {shape:<9} {found_cells} {float(columns.max()):9.1e} {float(whole):9.1e}')

print()
for seed in range(3):
  strict = go.find_scale_invariant(jit_loss, *draw(seed), tol=1e-5)
  loose = go.find_scale_invariant(jit_loss, *draw(seed), tol=1e-3)
  same = strict == found
  extra = sorted(set(manifold_names(loose)) - set(manifold_names(strict)))
  print(
    f'draw {seed}: tol=1e-5 finds the same groups: {same}; tol=1e-3 adds: {", ".join(extra) or "-"}'
  )

# %% [markdown]
# As expected from the architecture:
#
# * the **query and key** kernels of both blocks are found **per head** (point axes `0,2`, 4
#   points of 32·8 = 256 weights each): the RMSNorm of QK-norm normalises each head's output, so
#   each head's weights are free of scale, but not each column (the column cosines are of order
#   0.1) and not only the whole leaf (which also passes, with 1 point instead of 4);
# * the bias-free **embedding** followed by its LayerNorm is found as a **whole** leaf (`0,1`): a
#   LayerNorm over the 32 outputs removes a common scale of all of them, not the scale of one
#   column;
# * values, attention outputs, MLP kernels, the head and the position embedding are not
#   invariant: their whole-leaf cosines are 3e-4 to 1e-1.
#
# The repeated draws show two things. With `tol=1e-5` the result does not depend on the draw.
# With the default `tol=1e-3`, a draw can put non-invariant matrices on the sphere as whole
# leaves: a whole leaf is one point, a single inner product `⟨g, w⟩` between two vectors of
# thousands of elements, and a cosine of a few 1e-4 happens by chance where the invariant leaves
# are at 1e-7. So for LayerNorm and RMSNorm networks, pass a `tol` near the invariant leaves'
# cosines, and compare a few draws: the test is necessary, not sufficient.
#
# ## The optimizers
#
# All learning rates follow the same schedule: a linear warm-up over 50 steps, then a cosine decay
# to zero at the last step; each optimizer's peak rate is chosen on the validation split.
#
# * **AdamW** (`optax.adamw`, β = (0.9, 0.999), decoupled weight decay 0.05 on the kernels),
#   peak rate among 3e-3, 1e-2 and 3e-2.
# * **Adam-G + AdamW**: the found groups get Adam-G, the chain of
#   `go.add_orthogonality_gradient(ω)` and `go.grassmann_adam(η_G, radius='init')` with the found
#   point axes (the paper's β = (0.9, 0.99), `ν = 0.1`, `ω = 0.1`); every other leaf the AdamW
#   above at its chosen rate, so that only the treatment of the found groups differs. They are
#   joined by `go.grassmann_partition`, which checks the labels and point axes. Peak `η_G` among
#   0.01, 0.03, 0.1, 0.3 and 1 (radians per step, before the schedule; `go.grassmann_adam` is
#   exact for any step).
# * **Adam-G (alias)**: `go.adamg(lr, lr_g, **found._asdict(), radius='init')`, the paper's
#   hybrid, whose Euclidean leaves (here most of the network: values, MLPs, head, norms, the
#   position embedding) get Nesterov momentum SGD with coupled L2 5e-4. `η_G` is the one chosen
#   for Adam-G + AdamW; the SGD rate is chosen among 0.03, 0.1 and 0.3.
# * **Sphere + AdamW** (Hyperball-style): every kernel on the sphere as a whole leaf at its initial
#   norm, updated by the same chain with `ω = 0`, where `go.add_orthogonality_gradient` is the
#   identity (one point per leaf, nothing to make orthogonal); the position embedding, norm
#   scales and biases get the AdamW above. Peak `η_G` among 0.01, 0.03, 0.1 and 0.3.
#
# `radius='init'` ((P3)) keeps each point at the norm it had at initialisation, so that one
# measure of the constraint serves every optimizer: for a set of points, the largest relative
# deviation `max_j |‖w_j(t)‖ / ‖w_j(0)‖ − 1|` of their norms from the initial ones. For the
# invariant groups the radius changes nothing in the network.

# %% tags=["groups"]
UNIT_SCHEDULE = optax.warmup_cosine_decay_schedule(0.0, 1.0, WARMUP, STEPS)


def schedule(peak):  # the peak may be traced: the runs of several rates are vectorised
  return lambda count: peak * UNIT_SCHEDULE(count)


params = init(jax.random.key(0))
kernel_mask = lambda params: jax.tree_util.tree_map_with_path(
  lambda path, w: common.leaf_name(path).endswith('kernel'), params
)
sphere = go.ScaleInvariance(
  param_labels=jax.tree.map(lambda k: go.GRASSMANN if k else go.EUCLIDEAN, kernel_mask(params)),
  point_axes=jax.tree.map(
    lambda w, k: tuple(range(w.ndim)) if k else None, params, kernel_mask(params)
  ),
)


def adamw(lr):
  return optax.adamw(schedule(lr), weight_decay=0.05, mask=kernel_mask)


def adamg_with(groups, omega, euclidean):
  def build(lr_g):
    manifold = optax.chain(
      go.add_orthogonality_gradient(omega, point_axes=groups.point_axes),
      go.grassmann_adam(schedule(lr_g), point_axes=groups.point_axes, radius='init'),
    )
    return go.grassmann_partition(
      manifold, euclidean, groups.param_labels, point_axes=groups.point_axes
    )

  return build


def adamg_alias(lr_g):
  def build(lr):
    return go.adamg(schedule(lr), schedule(lr_g), **found._asdict(), radius='init')

  return build


for title, groups in (('found', found), ('sphere', sphere)):
  names = manifold_names(groups)
  print(f'{title}: {len(names)} manifold leaves, {", ".join(names)}')


# %% [markdown]
# `train` runs one optimizer for every (peak rate, seed) pair at once: `jax.vmap` over the pairs
# of a `jax.lax.scan` over the steps, compiled once per optimizer. Seed `s` fixes the
# initialisation and the order of the batches, so the optimizers see the same data. Each step
# records the training loss and the constraint of the two sets of points: the found groups and
# the whole kernels.


# %%
def point_norms(params, groups):
  norms = []
  for name, w in common.named_leaves(params).items():
    if common.named_leaves(groups.param_labels)[name] == go.GRASSMANN:
      axes = common.named_leaves(groups.point_axes)[name]
      axes = tuple(range(w.ndim - 1)) if axes is None else axes
      norms.append(jnp.sqrt(jnp.sum(w * w, axis=axes)).ravel())
  return jnp.concatenate(norms)


def deviation(params, reference):
  return jnp.stack(
    [
      jnp.max(jnp.abs(point_norms(params, groups) / ref - 1))
      for groups, ref in zip((found, sphere), reference, strict=True)
    ]
  )


def evaluate(params, x, y):
  logits = model.apply({'params': params}, x)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return {'loss': loss, 'accuracy': jnp.mean(jnp.argmax(logits, -1) == y)}


def train(build, rates):
  """Runs ``build(rate)`` for every rate and seed; returns the per-run arrays, runs first."""

  def one_run(rate, key, order):
    params = init(key)
    tx = build(rate)
    reference = [point_norms(params, groups) for groups in (found, sphere)]

    def step(carry, batch):
      params, state = carry
      loss, grads = jax.value_and_grad(loss_fn)(params, x_train[batch], y_train[batch])
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
      return (params, state), (loss, deviation(params, reference))

    (params, _), (losses, deviations) = jax.lax.scan(step, (params, tx.init(params)), order)
    return {
      'loss': losses,
      'deviation': deviations,
      'validation': evaluate(params, x_val, y_val),
      'test': evaluate(params, x_test, y_test),
    }

  seeds = np.tile(np.arange(SEEDS), len(rates))
  orders = [np.random.default_rng(s).integers(0, len(x_train), (STEPS, BATCH)) for s in seeds]
  args = (
    jnp.repeat(jnp.asarray(rates, jnp.float32), SEEDS),
    jax.vmap(jax.random.key)(jnp.asarray(seeds)),
    jnp.asarray(np.stack(orders)),
  )
  result = jax.jit(jax.vmap(one_run))(*args)
  return jax.tree.map(lambda a: np.asarray(a).reshape(len(rates), SEEDS, *a.shape[1:]), result)


# %% [markdown]
# ## Training
#
# For each optimizer, every peak rate runs with every seed, and the rate with the lowest median
# validation loss is kept (a rate whose runs diverged never is): on 300 validation images the
# accuracy moves in steps of 0.33%, too coarse to choose by. The test split is looked at only for
# the kept rate. The searches are not equal: AdamW and the alias's SGD rate get three rates,
# the sphere four and Adam-G + AdamW five; every kept rate lies inside its grid. (With five rates
# for every optimizer, one run of this notebook kept AdamW's largest, 0.1, at a median validation
# loss of 0.076 against 0.078 at 0.01, and the alias diverged at SGD rates of 1 and 3: between
# near-equal rates the choice is noise here.)


# %% tags=["runs"]
def grid(*rates):
  return [rates[(len(rates) - 1) // 2]] if common.QUICK else list(rates)


def choose(name, build, rates):
  started = time.perf_counter()
  result = train(build, rates)
  validation = result['validation']
  accuracy, loss = (np.median(validation[key], axis=1) for key in ('accuracy', 'loss'))
  best = int(np.argmin(np.where(np.isfinite(loss), loss, np.inf)))  # a diverged rate is never kept
  print(f'{name}: {len(rates) * SEEDS} runs in {time.perf_counter() - started:.0f} s')
  for i, rate in enumerate(rates):
    mark = '  <- kept' if i == best else ''
    scores = f'validation loss {loss[i]:.3f}, accuracy {100 * accuracy[i]:5.2f}%'
    print(f'  peak rate {rate:<6g} {scores}{mark}')
  return rates[best], jax.tree.map(lambda a: a[best], result)


started = time.perf_counter()
runs, rates = {}, {}
rates['AdamW'], runs['AdamW'] = choose('AdamW', adamw, grid(3e-3, 1e-2, 3e-2))
euclidean = adamw(rates['AdamW'])
rates['Adam-G + AdamW'], runs['Adam-G + AdamW'] = choose(
  'Adam-G + AdamW', adamg_with(found, 0.1, euclidean), grid(0.01, 0.03, 0.1, 0.3, 1.0)
)
rates['Adam-G (alias)'], runs['Adam-G (alias)'] = choose(
  'Adam-G (alias), SGD rate', adamg_alias(rates['Adam-G + AdamW']), grid(0.03, 0.1, 0.3)
)
rates['Sphere + AdamW'], runs['Sphere + AdamW'] = choose(
  'Sphere + AdamW', adamg_with(sphere, 0.0, euclidean), grid(0.01, 0.03, 0.1, 0.3)
)
wall_time = time.perf_counter() - started

# %% [markdown]
# ## Medians over the seeds
#
# At each optimizer's kept rate: test accuracy (median, and the range over the seeds) and loss
# (300 images; one image is 0.33%), the final training loss (mean of the last 20 steps), and the
# constraint at the end for the found groups and for the whole kernels.


# %% tags=["table"]
def median(values):
  return float(np.median(values))


columns = (
  'optimizer',
  'peak rate',
  'test accuracy (%)',
  'range',
  'test loss',
  'train loss',
  'found groups: max dev.',
  'whole kernels: max dev.',
)
lines = ['| ' + ' | '.join(columns) + ' |', '| --- |' + ' ---: |' * (len(columns) - 1)]
for name, run in runs.items():
  cells = [
    f'{rates[name]:g}',
    f'{100 * median(run["test"]["accuracy"]):.2f}',
    f'{100 * run["test"]["accuracy"].min():.2f}-{100 * run["test"]["accuracy"].max():.2f}',
    f'{median(run["test"]["loss"]):.3f}',
    f'{median(run["loss"][:, -20:].mean(1)):.4f}',
    f'{median(run["deviation"][:, -1, 0]):.1e}',
    f'{median(run["deviation"][:, -1, 1]):.1e}',
  ]
  lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
table = '\n'.join(lines)
caption = (
  f'Medians over {SEEDS} seeds; ViT ({num_params} parameters) on digits, {STEPS} steps of '
  f'batch {BATCH}; all runs in {wall_time:.0f} s on {jax.device_count()} '
  f'{jax.devices()[0].platform} device(s).'
)
print(table)
print()
print(caption)
common.save('04_table.md', table + '\n\n' + caption + '\n')

# %%
colors = dict(zip(runs, ('tab:gray', 'tab:red', 'tab:orange', 'tab:blue'), strict=True))
fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
for name, run in runs.items():
  losses = np.stack([common.smooth(seed_losses, 20) for seed_losses in run['loss']])
  steps = np.arange(losses.shape[1]) + 20
  axes[0].plot(steps, np.median(losses, 0), color=colors[name], label=name)
  axes[0].fill_between(steps, losses.min(0), losses.max(0), color=colors[name], alpha=0.2)
  for ax, k in zip(axes[1:], (0, 1), strict=True):
    values = np.maximum(run['deviation'][:, :, k], 1e-9)  # 0 where a norm is exactly kept
    steps = np.arange(1, values.shape[1] + 1)
    ax.plot(steps, np.median(values, 0), color=colors[name], label=name)
    ax.fill_between(steps, values.min(0), values.max(0), color=colors[name], alpha=0.2)
axes[0].set(yscale='log', xlabel='step', ylabel='training loss (moving average of 20 steps)')
axes[1].set(title='found groups (query/key heads, embedding)')
axes[2].set(title='whole kernels')
for ax in axes[1:]:
  ax.set(yscale='log', xlabel='step', ylabel='max_j | |w_j(t)| / |w_j(0)| - 1 |')
for ax in axes:
  ax.grid(alpha=0.3)
axes[0].legend(fontsize=9)
fig.suptitle(f'ViT on digits: median and range over {SEEDS} seeds, each at its kept peak rate')
fig.tight_layout()
common.save('04_training.png', fig)
plt.show()

# %% [markdown]
# ## What happens
#
# (About the committed full run; the test suite's quick run trains 30 steps with one rate.)
#
# * **Accuracy: no winner over AdamW.** All four reach median test accuracies of 96-98%. The
#   medians put the alias first (97.67%), then Adam-G + AdamW (97.00%), the sphere (96.67%) and
#   AdamW (96.33%), and the three manifold variants end with lower median test losses than AdamW
#   (0.073, 0.090 and 0.088 against 0.121). But the medians differ by at most four test images
#   out of 300, and AdamW's range over the seeds (95.33-98.00%) overlaps every other: on this
#   problem none of them is shown to be better than AdamW, nor AdamW better than them.
# * **Training loss.** Every optimizer ends at 1.3e-3-1.9e-3. AdamW gets there first: it is below
#   1e-2 by step 400, the others by step 600.
# * **The rate of the found groups matters little here.** Adam-G + AdamW's median validation
#   loss stays between 0.039 and 0.080 for peak rates from 0.03 to 1 radian per step, without a
#   trend, and is higher only at 0.01 (0.104): the network is not very sensitive to how fast its
#   query and key heads turn on this task. The sphere, which also constrains matrices the network
#   is not invariant to, degrades at 0.3.
# * **Nesterov SGD or AdamW elsewhere: not settled.** With the same found groups and the same
#   `η_G`, the alias, whose other parameters get Nesterov SGD, has the best median here (97.67%,
#   range 97.67-98.33%, against 96.67-97.67% for Adam-G + AdamW). A run of this notebook with the
#   library of 2026-12-05 kept the SGD rate 0.3 instead and put the alias last (96.33%): with
#   three rates and five seeds, which partner is better on this problem does not hold from one
#   run to the next.
# * **The constraint.** Where a constraint is imposed it holds to float32 round-off throughout
#   (at most 1.8e-07 at the end, a few 1e-7 at every step): the found groups under both Adam-G
#   variants, the whole kernels under the sphere. Under AdamW with decoupled weight decay the same
#   norms drift: by 16% for the query/key heads and the embedding, by 69% for the whole kernels
#   (and by 120% under the alias's SGD with L2; medians over the seeds of the largest deviation
#   at the end). For the query/key heads and the embedding this drift changes nothing in the
#   network; it only changes AdamW's effective angular step, which Adam-G sets directly.
