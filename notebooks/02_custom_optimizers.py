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
# `go.sgdg` and `go.adamg` are short chains of the library's public transforms (sections 6 and 7
# of `docs/algorithm.md`, the project's write-up of the algorithm, whose equation numbers this
# notebook cites): an `optax.partition` over the labels `'grassmann'` / `'euclidean'`, the
# orthogonality term and one manifold step for the first group, and Nesterov momentum SGD for the
# second. The manifold steps, `go.grassmann_sgd` and `go.grassmann_adam`, each do a whole step of
# the paper's algorithms (Cho & Lee, NeurIPS 2017,
# [arXiv:1709.09603](https://arxiv.org/abs/1709.09603)): they project and clip the gradient,
# update their buffer, move every point along its geodesic and transport the buffer along that
# step. They take the learning rate and end their chain; before them, a chain can put any
# gradient transformation. This notebook
#
# 1. composes both optimizers from the transforms and checks that they are the aliases, and shows
#    why the manifold step owns its buffer: a momentum transform written as a separate link of
#    the chain cannot transport its buffer past a step of π/2, where `go.grassmann_sgd` is exact;
# 2. builds variants a researcher would try (a cosine schedule, no clipping, no orthogonality
#    term, `optax.lookahead` around SGD-G), compares them on a small BatchNorm CNN trained on
#    scikit-learn's digits, and changes a learning rate in the optimizer state through
#    `optax.inject_hyperparams`;
# 3. drives the same optimizer through a Flax NNX model with `nnx.Optimizer`.

# %%
import functools
import textwrap
import warnings

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
# wraps the parameters in `optax.LookaheadParams` and evaluates the slow weights, put back on the
# sphere by `go.project_params` (they are averages of points: see the variants below).


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
  final = go.project_params(params.slow) if lookahead else params
  return {'losses': np.array(losses), 'test_error': test_error(final, stats), 'state': opt_state}


labels = go.grassmann_labels(model.init(jax.random.key(0), x_train[:2])['params'])
for name, label in common.named_leaves(labels).items():
  print(f'{name:<18} {label}')


# %% [markdown]
# ## SGD-G and Adam-G, composed from the transforms
#
# The manifold chain, one transform per part of the paper's algorithms:
#
# | transform | SGD-G (Algorithm 1) | Adam-G (Algorithm 2) |
# | --- | --- | --- |
# | `add_orthogonality_gradient(ω)` | (S2): `g + 2ω(YYᵀY − Y)` (R2) | (A2) |
# | `grassmann_sgd(η_G, γ, grad_clip=ν)` | (S1), (S3)-(S7): (G3)-(G6) | |
# | `grassmann_adam(η_G, β1, β2, ε, grad_clip=ν)` | | (A1), (A3)-(A11): (G3)-(G5), (G7) |
#
# and the Euclidean part ((N1)-(N3)): coupled L2 decay on kernels (`ndim >= 2`), then Nesterov
# momentum SGD, here written with Optax's own transforms. A plain `optax.partition` joins the two
# (`go.grassmann_partition` is the same partition with the labels checked at `init`). The
# projection and the clipping are also transforms of their own, `project_to_tangent()` ((G3))
# and `grassmann_clip(ν)` ((G4)); put before the step (whose own clipping is then switched off
# with `grad_clip=None`) they change nothing but rounding, since the step projects again.
#
# The composed and the alias optimizers run side by side on the same batches from the same
# initialisation, in lockstep: at every step both get the same parameters and gradients (those of
# the alias's trajectory), and we print the largest difference between their updates. (Two
# independent runs would drift apart by more than round-off: float32 rounding differences of
# ~1e-8 are amplified by the training dynamics, Adam-G's normalisation by `√v` most of all, and
# that would measure the dynamics, not the optimizers.)


# %% tags=["alias-diff"]
def euclidean_chain(learning_rate, *, weight_decay=5e-4):
  kernels = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(
    optax.add_decayed_weights(weight_decay, mask=kernels),
    optax.sgd(learning_rate, momentum=0.9, nesterov=True),
  )


def hybrid(manifold, euclidean):
  return optax.partition({go.GRASSMANN: manifold, go.EUCLIDEAN: euclidean}, go.grassmann_labels)


def steps(grad_clip):
  return {
    'SGD-G': go.grassmann_sgd(0.2, momentum=0.9, grad_clip=grad_clip),
    'Adam-G': go.grassmann_adam(0.05, b1=0.9, b2=0.99, eps=1e-8, grad_clip=grad_clip),
  }


composed = {
  (name, "the aliases' chain"): hybrid(
    optax.chain(go.add_orthogonality_gradient(0.1), step), euclidean_chain(0.05)
  )
  for name, step in steps(grad_clip=0.1).items()
}
composed |= {
  (name, 'projection and clipping as transforms'): hybrid(
    optax.chain(
      go.add_orthogonality_gradient(0.1), go.project_to_tangent(), go.grassmann_clip(0.1), step
    ),
    euclidean_chain(0.05),
  )
  for name, step in steps(grad_clip=None).items()
}
aliases = {'SGD-G': go.sgdg(0.05, 0.2), 'Adam-G': go.adamg(0.05, 0.05)}

compare_steps = 10 if common.QUICK else 50
for (name, how), tx in composed.items():
  variables = model.init(jax.random.key(0), x_train[:2])
  params, stats = variables['params'], variables['batch_stats']
  updaters = [jax.jit(aliases[name].update), jax.jit(tx.update)]
  states = [aliases[name].init(params), tx.init(params)]
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
  print(f'{name}, {how}: max |composed - alias| over {compare_steps} steps = {largest:.1e}')

# %% [markdown]
# The aliases' chain written out is the alias: the same transforms, so the same updates, to the
# last bit. With the projection and the clipping as separate transforms the updates differ by
# float32 round-off only.
#
# ## Why the manifold step owns its buffer
#
# Why not a momentum transform of its own, chained with `optax.scale_by_learning_rate` and
# `go.exp_map_update()` after it, as Optax builds `optax.sgd`? In an Optax chain a transform sees
# only the updates it is given and the current parameters. A momentum transform stores its buffer
# at the point `y` where it was computed, and at the next step it sees the new point `y'` but not
# the step that led there. The best it can do is to carry the buffer over from `y'` alone: project
# it onto the new tangent space and restore its norm, `‖b‖·P_{y'}(b)/‖P_{y'}(b)‖` ((T1)). That
# projection is `cos θ · pt(b)` for a step of `θ` radians: past `θ = π/2` it points backwards and
# the momentum reverses. `go.grassmann_sgd` knows the step, since it takes the learning rate and
# makes the step itself, and transports its buffer along it when it writes it ((G6)).
#
# The cell writes that momentum transform as a user would (a dozen lines), chains it, and runs two
# SGD-G steps on one column of R⁵ through that chain and through `go.grassmann_sgd`, without
# clipping, with `η = 1`, `γ = 0.9`, a first gradient that turns the column by `θ` and a second,
# random one. Both are compared with the same two steps computed in float64 from the formulas
# (G3), (G5), (G6) and (S5):


# %% tags=["large-steps"]
def momentum_from_new_point(decay):
  """Momentum whose buffer is carried to the new point from that point alone ((T1))."""

  def init_fn(params):
    return jnp.zeros_like(params)

  def update_fn(updates, buffer, params):
    y = params / jnp.linalg.norm(params, axis=0)
    projected = buffer - jnp.sum(y * buffer, axis=0) * y
    norm = jnp.linalg.norm(projected, axis=0)
    carried = projected * jnp.linalg.norm(buffer, axis=0) / jnp.where(norm > 0, norm, 1.0)
    buffer = decay * carried + updates
    return buffer, buffer

  return optax.GradientTransformation(init_fn, update_fn)


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
separate_momentum = optax.chain(
  go.project_to_tangent(),
  momentum_from_new_point(0.9),
  optax.scale_by_learning_rate(1.0),
  go.exp_map_update(),
)
manifold_step = go.grassmann_sgd(1.0, momentum=0.9, grad_clip=None)
print(f'{"first step (rad)":>16} {"|chain - exact|":>16} {"|grassmann_sgd - exact|":>24}')
for theta in (0.2, 1.0, 1.5, 1.6, 2.0, 3.0):
  gradients = [theta * direction, second]
  exact = exact_sgdg(y0, gradients, eta=1.0, gamma=0.9)
  errors = [
    np.abs(two_steps(tx, y0, gradients) - exact).max() for tx in (separate_momentum, manifold_step)
  ]
  print(f'{theta:16.1f} {errors[0]:16.1e} {errors[1]:24.1e}')

# %% [markdown]
# Below π/2 ≈ 1.571 both match the exact steps to float32 round-off; past it, the chain's carried
# momentum points the wrong way and its second step lands far from the exact point, while
# `go.grassmann_sgd` stays within 2e-6 of it at every angle, in float32. Hence the library's rule
# (section 7 of `docs/algorithm.md`): the transforms that keep a buffer take the learning rate
# and end the chain. The pieces without a buffer compose freely:
# `optax.chain(go.project_to_tangent(), go.grassmann_clip(ν), optax.scale_by_learning_rate(η),
# go.exp_map_update())` is Riemannian SGD without momentum, exact for every step.
#
# ## Variants
#
# Once the optimizer is a chain, variants are one-line changes. Each is joined by
# `go.grassmann_partition`, which checks the labels at `init`, with `go.euclidean_sgd` (coupled
# L2 and Nesterov SGD, the `euclidean_chain` above) for the other leaves:
#
# * **Adam-G, cosine schedule**: an Optax schedule as the learning rate of `go.grassmann_adam` and
#   of `go.euclidean_sgd`; the step count in the step's state drives it.
# * **Adam-G without clipping** (`grad_clip=None`): Adam-G normalises its step by `√v` anyway;
#   this measures what the paper's `ν = 0.1` adds.
# * **Adam-G without the orthogonality term**: the chain without `add_orthogonality_gradient`.
#   The paper adds `ω/2‖YᵀY − I‖²` (R1) to push different output units apart; this measures what
#   it buys here.
# * **SGD-G inside `optax.lookahead`** (Zhang et al., 2019): `go.sgdg` is the fast optimizer;
#   every 5 steps the slow weights move half-way to the fast ones. The interpolation is a chord,
#   not a geodesic, so the slow weights are not unit vectors: `init` warns (printed below), the
#   fast weights' next step starts from their unit vectors ((S1); with momentum it ends slightly
#   off the sphere, as docs/composition.md measures), and `fit` evaluates
#   `go.project_params(params.slow)`, the slow weights put back on the sphere.
# * Plain **SGD** (Nesterov, L2 on everything, as the paper's baseline) as a reference.

# %% tags=["variants"]
cosine = lambda peak: optax.cosine_decay_schedule(peak, STEPS)


def adamg_variant(manifold, learning_rate=0.05):
  return go.grassmann_partition(manifold, go.euclidean_sgd(learning_rate), go.grassmann_labels)


variants = {
  'SGD (Nesterov)': optax.chain(
    optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9, nesterov=True)
  ),
  'SGD-G': go.sgdg(0.05, 0.2),
  'Adam-G': go.adamg(0.05, 0.05),
  'Adam-G, cosine schedule': adamg_variant(
    optax.chain(go.add_orthogonality_gradient(0.1), go.grassmann_adam(cosine(0.05))),
    learning_rate=cosine(0.05),
  ),
  'Adam-G, no clipping': adamg_variant(
    optax.chain(go.add_orthogonality_gradient(0.1), go.grassmann_adam(0.05, grad_clip=None))
  ),
  'Adam-G, no orthogonality': adamg_variant(go.grassmann_adam(0.05)),
  'SGD-G in lookahead': optax.lookahead(go.sgdg(0.05, 0.2), sync_period=5, slow_step_size=0.5),
}
results = {}
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter('always')
  for name, tx in variants.items():
    results[name] = fit(tx, lookahead='lookahead' in name)
    tail = results[name]['losses'][-20:].mean()
    print(
      f'{name:<26} mean loss of the last 20 steps {tail:.4f}   '
      f'test error {100 * results[name]["test_error"]:.1f}%'
    )
for warning in caught:
  print(f'\n{warning.category.__name__}:', textwrap.fill(str(warning.message), 96))

# %%
smooth = common.smooth
fig, ax = plt.subplots(figsize=(8, 4.5))
for name, result in results.items():
  label = f'{name} (test error {100 * result["test_error"]:.1f}%)'
  ax.plot(np.arange(len(smooth(result['losses']))) + 10, smooth(result['losses']), label=label)
ax.set(yscale='log', xlabel='step', ylabel='training loss (moving average of 10 steps)')
ax.set_title("Small BatchNorm CNN on digits: the paper's optimizers and five variants")
ax.grid(alpha=0.3)
ax.legend(fontsize=9)
fig.tight_layout()
common.save('02_loss_curves.png', fig)
plt.show()


# %% [markdown]
# One seed and one small problem: the curves show that each variant trains and how it behaves, not
# which optimizer is better in general (notebook 3 repeats the paper's comparison over five seeds).
#
# ## Rates in the state: `optax.inject_hyperparams`
#
# `optax.inject_hyperparams(go.adamg)` stores both learning rates (and `b1`, `b2`, `eps`,
# `grad_clip`, `omega`) in the optimizer state, where a training loop can read or change them
# between steps. A *callable* `param_labels` must be named in `static_args`: `inject_hyperparams`
# treats every callable argument as a schedule and would call `go.grassmann_labels(step)` (the
# error below). The default `param_labels=None` needs nothing. Adam-G's first step turns every
# point by about its learning rate (at `t = 1`, (A7) and (A8) give `d ≈ −η ĥ/‖ĥ‖`), so a rate
# set to 0.01 in the state shows in the angles of the first step.

# %% tags=["inject"]
params = model.init(jax.random.key(0), x_train[:2])['params']
try:
  optax.inject_hyperparams(go.adamg)(
    learning_rate=0.05, grassmann_learning_rate=0.05, param_labels=go.grassmann_labels
  ).init(params)
except ValueError as error:
  print('without static_args:', textwrap.fill(str(error), 96, subsequent_indent='  '))

injected = optax.inject_hyperparams(go.adamg, static_args=('param_labels',))(
  learning_rate=0.05, grassmann_learning_rate=0.05, param_labels=go.grassmann_labels
)
state = injected.init(params)
state.hyperparams['grassmann_learning_rate'] = jnp.asarray(0.01)
stats = model.init(jax.random.key(0), x_train[:2])['batch_stats']
_, grads = gradient(params, stats, x_train[batch_order[0]], y_train[batch_order[0]])
updates, state = injected.update(grads, state, params)
moved = optax.apply_updates(params, updates)


def column_angles(w, w_new):  # the angle each column turned by, from the chord of unit vectors
  w, w_new = (a.reshape(-1, a.shape[-1]) for a in (w, w_new))
  chord = w_new / jnp.linalg.norm(w_new, axis=0) - w / jnp.linalg.norm(w, axis=0)
  return 2 * jnp.arcsin(jnp.linalg.norm(chord, axis=0) / 2)


angles = jnp.concatenate(
  [
    column_angles(w, w_new)
    for w, w_new, label in zip(
      jax.tree.leaves(params), jax.tree.leaves(moved), jax.tree.leaves(labels), strict=True
    )
    if label == go.GRASSMANN
  ]
)
print(
  f'grassmann_learning_rate set to {float(state.hyperparams["grassmann_learning_rate"]):g} in the '
  f'state; first step: every manifold column turned by {float(angles.min()):.5f} to '
  f'{float(angles.max()):.5f} rad'
)


# %% [markdown]
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
