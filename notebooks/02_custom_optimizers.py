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
# # 2. Custom optimizers from the transforms
#
# `go.sgdg` and `go.adamg` are short: an `optax.partition` over the labels `'grassmann'` /
# `'euclidean'`, a manifold step for the first group and Nesterov momentum SGD for the second
# (section 6 of `docs/algorithm.md`, the project's write-up of the algorithm, whose equation
# numbers this notebook cites). The manifold step is fused for speed, but it equals a chain of the
# library's public transforms, one per line of the paper's algorithms (Cho & Lee, NeurIPS 2017,
# [arXiv:1709.09603](https://arxiv.org/abs/1709.09603)). This notebook
#
# 1. rebuilds both optimizers from the transforms and checks that they match the aliases, and
#    shows where the chain stops being exact (a step of π/2) and the fused update does not;
# 2. builds variants a researcher would try (a cosine schedule through `optax.inject_hyperparams`,
#    no orthogonality term, `optax.lookahead` around Grassmann momentum) and compares them on a
#    small BatchNorm CNN trained on scikit-learn's digits;
# 3. drives the same optimizer through a Flax NNX model with `nnx.Optimizer`.

# %%
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx
from sklearn.model_selection import train_test_split

import grassmann_optax as go

import common

STEPS = 30 if common.QUICK else 400
BATCH = 64

x_train, x_test, y_train, y_test = train_test_split(
  *common.digits(), test_size=300, stratify=common.digits()[1], random_state=0
)
common.describe(training_images=len(x_train), test_images=len(x_test), steps=STEPS)


# %% [markdown]
# The model: three 3×3 convolutions without bias, each followed by BatchNorm and ReLU, then global
# average pooling and a dense head. The convs start with random unit columns
# (`go.unit_initializer`). With the paper's rule ((L1)) the first conv (fan-in 9 < 16 outputs)
# stays Euclidean and the other two live on G(1, n).
#
# `fit` trains with any Optax optimizer on a fixed sequence of batches (so every optimizer sees
# the same data) and returns the training losses and the final test error (with BatchNorm
# population statistics, as the training program does; `docs/training.md`). `lookahead=True`
# wraps the parameters in `optax.LookaheadParams` and evaluates the slow weights.


# %%
class SmallNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True):
    for width in (16, 32, 32):
      x = nn.Conv(width, (3, 3), use_bias=False, kernel_init=go.unit_initializer())(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    return nn.Dense(10)(x.mean((1, 2)))


model = SmallNet()
batch_order = np.random.default_rng(0).integers(0, len(x_train), (STEPS, BATCH))


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def loss_fn(params, stats, xb, yb):
  logits, new = model.apply({'params': params, 'batch_stats': stats}, xb, mutable=['batch_stats'])
  return cross_entropy(logits, yb), new['batch_stats']


gradient = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


@functools.partial(jax.jit, static_argnames=('tx', 'lookahead'))
def train_step(params, stats, opt_state, xb, yb, *, tx, lookahead):
  # optax.lookahead wants the gradient with respect to the fast weights only.
  fast = params.fast if lookahead else params
  (loss, stats), grads = gradient(fast, stats, xb, yb)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), stats, opt_state, loss


def test_error(params, stats):
  logits = model.apply({'params': params, 'batch_stats': stats}, x_test, train=False)
  return float(jnp.mean(jnp.argmax(logits, -1) != y_test))


def fit(tx, *, lookahead=False, steps=STEPS):
  variables = model.init(jax.random.key(0), x_train[:2])
  params, stats = variables['params'], variables['batch_stats']
  if lookahead:
    params = optax.LookaheadParams.init_synced(params)
  opt_state, losses = tx.init(params), []
  for batch in batch_order[:steps]:
    params, stats, opt_state, loss = train_step(
      params, stats, opt_state, x_train[batch], y_train[batch], tx=tx, lookahead=lookahead
    )
    losses.append(float(loss))
  final = params.slow if lookahead else params
  return {'losses': np.array(losses), 'test_error': test_error(final, stats), 'state': opt_state}


labels = go.grassmann_labels(model.init(jax.random.key(0), x_train[:2])['params'])
for name, label in common.named_leaves(labels).items():
  print(f'{name:<18} {label}')


# %% [markdown]
# ## SGD-G and Adam-G, rebuilt from the transforms
#
# The manifold chain, one transform per step of the paper's algorithms:
#
# | transform | SGD-G (Algorithm 1) | Adam-G (Algorithm 2) |
# | --- | --- | --- |
# | `add_orthogonality_gradient(ω)` | (S2): `g + 2ω(YYᵀY − Y)` (R2) | (A2) |
# | `project_to_tangent()` | (S3), (G3) | (A3) |
# | `grassmann_clip(ν)` | (S4), (G4) | (A4) |
# | `grassmann_momentum(γ)` | (S5), (S7), (G6) | |
# | `grassmann_adam_moments(β1, β2, ε)` | | (A5)-(A8), (A10)-(A11), (G7) |
# | `optax.scale_by_learning_rate(η_G)` | the `−η` of (S5) | the `−η` of (A8) |
# | `exp_map_update()` | (S6), (G5) | (A9), (G5) |
#
# and the Euclidean part ((N1)-(N3)): coupled L2 decay on kernels (`ndim >= 2`), then Nesterov
# momentum SGD. The rebuilt and the alias optimizers run side by side on the same batches from the
# same initialisation, in lockstep: at every step both get the same parameters and gradients (those
# of the alias's trajectory), and we print the largest difference between their updates. (Two
# independent runs would drift apart by more than round-off: float32 rounding differences of
# ~1e-8 are amplified by the training dynamics, Adam-G's normalisation by `√v` most of all, and
# that would measure the dynamics, not the optimizers.)


# %% tags=["alias-diff"]
def manifold_chain(moments, learning_rate, *, omega=0.1, grad_clip=0.1):
  return optax.chain(
    go.add_orthogonality_gradient(omega),
    go.project_to_tangent(),
    go.grassmann_clip(grad_clip),
    moments,
    optax.scale_by_learning_rate(learning_rate),
    go.exp_map_update(),
  )


def euclidean_chain(learning_rate, *, weight_decay=5e-4):
  kernels = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(
    optax.add_decayed_weights(weight_decay, mask=kernels),
    optax.sgd(learning_rate, momentum=0.9, nesterov=True),
  )


def hybrid(manifold, euclidean):
  return optax.partition({go.GRASSMANN: manifold, go.EUCLIDEAN: euclidean}, go.grassmann_labels)


rebuilt = {
  'SGD-G': hybrid(manifold_chain(go.grassmann_momentum(0.9), 0.2), euclidean_chain(0.05)),
  'Adam-G': hybrid(
    manifold_chain(go.grassmann_adam_moments(b1=0.9, b2=0.99, eps=1e-8), 0.05),
    euclidean_chain(0.05),
  ),
}
aliases = {'SGD-G': go.sgdg(0.05, 0.2), 'Adam-G': go.adamg(0.05, 0.05)}

compare_steps = 10 if common.QUICK else 50
for name in rebuilt:
  variables = model.init(jax.random.key(0), x_train[:2])
  params, stats = variables['params'], variables['batch_stats']
  updaters = [jax.jit(aliases[name].update), jax.jit(rebuilt[name].update)]
  states = [aliases[name].init(params), rebuilt[name].init(params)]
  largest = 0.0
  for batch in batch_order[:compare_steps]:
    (_, stats), grads = gradient(params, stats, x_train[batch], y_train[batch])
    updates = []
    for k, update in enumerate(updaters):
      step_updates, states[k] = update(grads, states[k], params)
      updates.append(step_updates)
    diff = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), *updates)
    largest = max(largest, float(max(jax.tree.leaves(diff))))
    params = optax.apply_updates(params, updates[0])
  print(f'{name}: max |rebuilt - alias| over {compare_steps} steps = {largest:.1e}')

# %% [markdown]
# The two agree to float32 round-off. The fused update in the aliases computes the same algorithm
# from per-column inner products instead of one transform at a time (section 9 of
# `docs/algorithm.md`, (F1)-(F11)), and it carries the momentum buffer to the new point when it
# writes it (eager transport, as the original implementations do), where the chain's
# `grassmann_momentum` carries it at the start of the next update from the new point alone (lazy
# transport, (T1)). The two transports agree while every step turns each column by less than π/2,
# which clipping guarantees in the paper's settings: at most `η_G ν/(1 − γ)` = 0.2 rad per step
# here for SGD-G.
#
# ## Beyond a right angle
#
# The lazy transport reads the buffer's direction from its projection on the new tangent space,
# `cos θ · pt(b)`; past `θ = π/2` that projection points backwards and the chain reverses the
# momentum. The fused update has no such limit ((F9)). Two SGD-G steps on one column of R⁵,
# without clipping, with `η = 1`, `γ = 0.9`, a first gradient that turns the column by `θ` and a
# second, random one, compared with the same two steps computed in float64 from the formulas
# (G3), (G5), (G6) and (S5):


# %% tags=["large-steps"]
def exp_map(y, d):  # (G5), and the unit direction and angle of the step
  theta = np.linalg.norm(d)
  u = d / theta
  return y * np.cos(theta) + u * np.sin(theta), u, theta


def exact_sgdg(y, gradients, eta, gamma):  # (G3), (S5), (G5), (G6) in float64, by hand
  buffer = np.zeros_like(y)
  for g in gradients:
    h = g - (y @ g) * y  # (G3)
    d = -eta * (gamma * buffer + h)  # (S5), the buffer in gradient units
    new_y, u, theta = exp_map(y, d)
    buffer = -theta * (u * np.cos(theta) - y * np.sin(theta)) / eta  # (G6)
    y = new_y
  return y


def two_steps(tx, y, gradients):
  params = jnp.asarray(y, jnp.float32)[:, None]  # one column
  state = tx.init(params)
  for g in gradients:
    updates, state = tx.update(jnp.asarray(g, jnp.float32)[:, None], state, params)
    params = optax.apply_updates(params, updates)
  return np.asarray(params[:, 0], np.float64)


rng = np.random.default_rng(0)
y0 = rng.normal(size=5)
y0 /= np.linalg.norm(y0)
direction = rng.normal(size=5)
direction -= (y0 @ direction) * y0
direction /= np.linalg.norm(direction)
second = 0.3 * rng.normal(size=5)
chain = optax.chain(
  go.project_to_tangent(),
  go.grassmann_momentum(0.9),
  optax.scale_by_learning_rate(1.0),
  go.exp_map_update(),
)
fused = go.sgdg_manifold_update(1.0, momentum=0.9, grad_clip=None)
print(f'{"first step (rad)":>16} {"|chain - exact|":>16} {"|fused - exact|":>16}')
for theta in (0.2, 1.0, 1.5, 1.6, 2.0, 3.0):
  gradients = [theta * direction, second]
  exact = exact_sgdg(y0, gradients, eta=1.0, gamma=0.9)
  errors = [np.abs(two_steps(tx, y0, gradients) - exact).max() for tx in (chain, fused)]
  print(f'{theta:16.1f} {errors[0]:16.1e} {errors[1]:16.1e}')

# %% [markdown]
# Below π/2 ≈ 1.571 both match the exact steps to float32 round-off; past it, the chain's
# transported momentum points the wrong way and its second step lands far from the exact point,
# while the fused update stays exact. Hence the rule of thumb of (T1): build variants from the
# chain where steps are small (clipping, small rates), and use `go.sgdg_manifold_update` /
# `go.adamg_manifold_update` (or the aliases) where a step may be large.
#
# ## Variants
#
# Once the optimizer is a chain, variants are one-line changes:
#
# * **Adam-G, cosine schedule.** `optax.inject_hyperparams(go.adamg)` turns both learning rates
#   into schedules stored in the optimizer state, where a training loop can read or change them.
#   A *callable* `param_labels` must be named in `static_args`: `inject_hyperparams` treats
#   every callable argument as a schedule and would call `go.grassmann_labels(step)` (see the
#   error below). The default `param_labels=None` needs nothing.
# * **Adam-G without the orthogonality term** (`omega=0`): the paper adds
#   `ω/2‖YᵀY − I‖²` (R1) to push different output units apart; this measures what it buys here.
# * **SGD-G inside `optax.lookahead`** (Zhang et al., 2019): the chain with Grassmann momentum is
#   the fast optimizer; every 5 steps the slow weights move half-way to the fast ones. The
#   interpolation is a chord, not a geodesic, so slow weights are not unit vectors, but the loss
#   does not see the norm (notebook 1) and `exp_map_update` re-normalises the fast weights at their
#   next step ((S1)).
# * Plain **SGD** (Nesterov, L2 on everything, as the paper's baseline) as a reference.

# %%
try:
  optax.inject_hyperparams(go.adamg)(
    learning_rate=0.05, grassmann_learning_rate=0.05, param_labels=go.grassmann_labels
  ).init(model.init(jax.random.key(0), x_train[:2])['params'])
except ValueError as error:
  print('without static_args:', str(error).split('.')[0])

# %%
cosine = lambda peak: optax.cosine_decay_schedule(peak, STEPS)
variants = {
  'SGD (Nesterov)': optax.chain(
    optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9, nesterov=True)
  ),
  'SGD-G': go.sgdg(0.05, 0.2),
  'Adam-G': go.adamg(0.05, 0.05),
  'Adam-G, cosine schedule': optax.inject_hyperparams(go.adamg, static_args=('param_labels',))(
    learning_rate=cosine(0.05),
    grassmann_learning_rate=cosine(0.05),
    param_labels=go.grassmann_labels,
  ),
  'Adam-G, omega = 0': go.adamg(0.05, 0.05, omega=0.0),
  'SGD-G chain in lookahead': optax.lookahead(
    hybrid(manifold_chain(go.grassmann_momentum(0.9), 0.2), euclidean_chain(0.05)),
    sync_period=5,
    slow_step_size=0.5,
  ),
}
results = {}
for name, tx in variants.items():
  results[name] = fit(tx, lookahead='lookahead' in name)
  tail = results[name]['losses'][-20:].mean()
  print(
    f'{name:<26} mean loss of the last 20 steps {tail:.4f}   '
    f'test error {100 * results[name]["test_error"]:.1f}%'
  )

hyperparams = results['Adam-G, cosine schedule']['state'].hyperparams
print(
  f'\ncosine variant, G learning rate in the state after {STEPS} steps: '
  f'{float(hyperparams["grassmann_learning_rate"]):.2e}'
)

# %%
smooth = common.smooth
fig, ax = plt.subplots(figsize=(8, 4.5))
for name, result in results.items():
  label = f'{name} (test error {100 * result["test_error"]:.1f}%)'
  ax.plot(np.arange(len(smooth(result['losses']))) + 10, smooth(result['losses']), label=label)
ax.set(yscale='log', xlabel='step', ylabel='training loss (moving average of 10 steps)')
ax.set_title("Small BatchNorm CNN on digits: the paper's optimizers and three variants")
ax.grid(alpha=0.3)
ax.legend(fontsize=9)
fig.tight_layout()
common.save('02_loss_curves.png', fig)
plt.show()


# %% [markdown]
# One seed and one small problem: the curves show that each variant trains and how it behaves, not
# which optimizer is better in general (notebook 3 repeats the paper's comparison over five seeds).
#
# ## The same optimizer with Flax NNX
#
# NNX models hold their parameters as `nnx.Param` variables. `go.grassmann_labels` works directly
# on `nnx.state(model, nnx.Param)`: it returns an `nnx.State` of label strings, which the optimizer
# matches to the raw arrays that `nnx.Optimizer` passes to Optax. `nnx.Optimizer(model, tx,
# wrt=nnx.Param)` then keeps the optimizer state next to the model, and `optimizer.update(model,
# grads)` applies one step in place.


# %% tags=["nnx"]
class SmallNNXNet(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    widths = (1, 16, 32, 32)
    self.convs = nnx.List(
      [
        nnx.Conv(a, b, (3, 3), use_bias=False, kernel_init=go.unit_initializer(), rngs=rngs)
        for a, b in zip(widths[:-1], widths[1:], strict=True)
      ]
    )
    self.norms = nnx.List([nnx.BatchNorm(b, momentum=0.9, rngs=rngs) for b in widths[1:]])
    self.head = nnx.Linear(widths[-1], 10, rngs=rngs)

  def __call__(self, x):
    for conv, norm in zip(self.convs, self.norms, strict=True):
      x = nnx.relu(norm(conv(x)))
    return self.head(x.mean((1, 2)))


nnx_model = SmallNNXNet(nnx.Rngs(0))
nnx_labels = go.grassmann_labels(nnx.state(nnx_model, nnx.Param))
for name, label in common.named_leaves(nnx_labels).items():
  print(f'{name:<18} {label}')

optimizer = nnx.Optimizer(nnx_model, go.adamg(0.05, 0.05, param_labels=nnx_labels), wrt=nnx.Param)


@nnx.jit
def nnx_train_step(model, optimizer, xb, yb):
  loss, grads = nnx.value_and_grad(lambda m: cross_entropy(m(xb), yb))(model)
  optimizer.update(model, grads)
  return loss


nnx_losses = []
for batch in batch_order:
  nnx_losses.append(float(nnx_train_step(nnx_model, optimizer, x_train[batch], y_train[batch])))
nnx_model.eval()
nnx_error = float(jnp.mean(jnp.argmax(nnx_model(x_test), -1) != y_test))
manifold_kernels = [conv.kernel[...] for conv in nnx_model.convs[1:]]
norm_deviation = max(
  float(jnp.max(jnp.abs(jnp.linalg.norm(k.reshape(-1, k.shape[-1]), axis=0) - 1)))
  for k in manifold_kernels
)
print(
  f'\nNNX Adam-G: loss {np.mean(nnx_losses[:10]):.3f} (first 10 steps) -> '
  f'{np.mean(nnx_losses[-20:]):.3f} (last 20), test error {100 * nnx_error:.1f}%'
)
print(f'max | |w_j| - 1 | over the manifold kernels: {norm_deviation:.1e}')

# %% [markdown]
# The labels are those of the Linen model above, the manifold kernels still have unit columns after
# training (the exponential map keeps them on the sphere), and the loss falls as with Linen. Nothing
# in the optimizer knows which Flax API built the model: the label tree is the only place where
# model and optimizer meet.
