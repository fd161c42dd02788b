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
# # 1. Why the manifold: scale invariance and the geometry of G(1, n)
#
# Cho & Lee, *Riemannian approach to batch normalization* (NeurIPS 2017,
# [arXiv:1709.09603](https://arxiv.org/abs/1709.09603)), start from one observation: a weight
# vector `w` whose output goes straight into BatchNorm can be scaled by any `c > 0` without
# changing anything after the BatchNorm, because BN divides by the standard deviation it just
# measured. So only the direction of `w` matters. The set of directions (lines through the
# origin) is the Grassmann manifold G(1, n), and the paper represents each point by a unit vector
# (`y = unit(w)`, (S1) in the project's write-up of the algorithm, `docs/algorithm.md`, whose
# equation numbers this notebook cites).
#
# Two consequences, both checked below on a Flax Linen `Conv` followed by `BatchNorm`:
#
# * `L(c·w) = L(w)`, hence `∂L/∂(c·w) = (1/c)·∂L/∂w`: the gradient shrinks as the weight grows,
#   so plain SGD's effective step size depends on a norm that carries no information;
# * `⟨∂L/∂w, w⟩ = 0` (Euler's theorem for a function homogeneous of degree 0): the gradient is
#   orthogonal to the column, i.e. already a tangent vector of the sphere.
#
# Then the notebook draws the steps of one SGD-G update on the sphere S² with the library's
# public transforms, and lets `grassmann_optax.find_scale_invariant` find the scale-invariant
# weights of a small model, and how their points are grouped.

# %%
import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import grassmann_optax as go

import common

images, targets = common.digits()
x, y = jnp.asarray(images[:256]), jnp.asarray(targets[:256])
common.describe(batch=x.shape)

# %% [markdown]
# ## Conv + BatchNorm is scale-invariant
#
# A `Conv` without bias feeds a `BatchNorm` in training mode (batch statistics). We scale one
# output unit's weight vector, column `j = 3` of the kernel viewed as `W = kernel.reshape(-1, 8)`,
# by `c` and compare the loss and the gradient with those at `c = 1`. BatchNorm adds `ε` to the
# variance before dividing (`ε = 1e-5` in Flax and in the paper's TF code; `docs/training.md`),
# which breaks the invariance slightly once `c²·Var` approaches `ε`; so the check runs with
# `ε = 1e-5` and `ε = 0`.


# %% tags=["scale-invariance"]
class ConvBN(nn.Module):
  epsilon: float

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3), use_bias=False, name='conv')(x)
    x = nn.BatchNorm(use_running_average=False, epsilon=self.epsilon, name='bn')(x)
    return nn.Dense(10, name='head')(nn.relu(x).mean((1, 2)))


def make_loss(model, batch_stats):
  def loss(params):
    logits, _ = model.apply(
      {'params': params, 'batch_stats': batch_stats}, x, mutable=['batch_stats']
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return jax.jit(loss), jax.jit(jax.grad(loss))


def with_column_scaled(params, j, c):
  kernel = params['conv']['kernel']
  return {**params, 'conv': {'kernel': kernel.at[..., j].multiply(c)}}


def column_cosines(w, g):
  w, g = w.reshape(-1, w.shape[-1]), g.reshape(-1, g.shape[-1])
  norms = jnp.linalg.norm(w, axis=0) * jnp.linalg.norm(g, axis=0)
  return jnp.sum(w * g, 0) / jnp.maximum(norms, 1e-30)  # 0 for a column without gradient


j = 3
for epsilon in (1e-5, 0.0):
  model = ConvBN(epsilon)
  variables = jax.jit(model.init)(jax.random.key(0), x)
  params, (loss, grad_fn) = variables['params'], make_loss(model, variables['batch_stats'])
  loss_at_1, grad_at_1 = loss(params), grad_fn(params)['conv']['kernel'][..., j]
  print(f'BatchNorm epsilon = {epsilon:g}')
  print(f'{"c":>8} {"L(c w_j) - L(w_j)":>18} {"c |dL/d(c w_j)| / |dL/dw_j|":>28}')
  for c in (0.01, 0.1, 0.5, 2.0, 10.0, 100.0):
    scaled = with_column_scaled(params, j, c)
    grad = grad_fn(scaled)['conv']['kernel'][..., j]
    ratio = c * jnp.linalg.norm(grad) / jnp.linalg.norm(grad_at_1)
    print(f'{c:8g} {float(loss(scaled) - loss_at_1):18.2e} {float(ratio):28.6f}')
  cosines = column_cosines(params['conv']['kernel'], grad_fn(params)['conv']['kernel'])
  print(
    f'max |cos(w_j, dL/dw_j)| over the 8 columns, epsilon={epsilon:g}: '
    f'{float(jnp.max(jnp.abs(cosines))):.1e}\n'
  )

# %% [markdown]
# With `ε = 0` the loss does not move beyond float32 round-off for any `c`, the gradient scales
# as `1/c` to about 1e-6, and every column is orthogonal to its gradient (cosines below 1e-6).
# With the usual `ε = 1e-5` this holds only while the column's output variance is well above
# `ε`: from `c = 0.5` up the gradient ratio is 1 to about 2e-5, but at `c = 0.1` it is already
# off by about 6e-4, at `c = 0.01` by 5%, and the cosines reach about 6e-5. Keeping `‖w‖ = 1`, as
# SGD-G and Adam-G do, keeps every column far from that regime.
#
# Because the gradient is orthogonal to `w`, a plain SGD step can only **grow** the norm:
# `‖w − ηg‖² = ‖w‖² + η²‖g‖²`. The norm grows, the gradient shrinks as `1/‖w‖`, and the effective
# angular step `η‖g‖/‖w‖` decays as `1/‖w‖²` for reasons unrelated to the loss. Plain SGD on
# every parameter shows it in the kernel's columns:

# %% tags=["sgd-norms"]
model = ConvBN(1e-5)
variables = jax.jit(model.init)(jax.random.key(0), x)
params, (loss, grad_fn) = variables['params'], make_loss(model, variables['batch_stats'])
sgd = optax.sgd(2.0)
state = sgd.init(params)
for step in range(51):
  if step % 10 == 0:
    norms = jnp.linalg.norm(params['conv']['kernel'].reshape(-1, 8), axis=0)
    print(f'step {step:2d}: loss {float(loss(params)):.4f}, mean column norm {norms.mean():.4f}')
  updates, state = sgd.update(grad_fn(params), state)
  params = optax.apply_updates(params, updates)

# %% [markdown]
# ## One SGD-G step on the sphere S²
#
# On G(1, 3) each point is a unit vector of R³, so a whole update can be drawn. The library's
# transforms act on every column of an array, so a `(3, 1)` array is one point. One SGD-G step
# ((S1)-(S7); paper Algorithm 1) is one transform, `go.grassmann_sgd(η, γ, grad_clip=ν)`; the
# pieces without a buffer are public transforms too, and draw the vectors in between:
#
# 1. `project_to_tangent`: the Riemannian gradient `h = g − (yᵀg)·y` ((G3), paper Eq. 6): the
#    radial part of `g` is dropped; by the previous section it is ~0 for a real BN network anyway;
# 2. `grassmann_clip(ν)`: `ĥ = h·min(1, ν/‖h‖)` per column ((G4), (S4)), so one step turns a
#    column by at most `η·ν` (at most `η·ν/(1 − γ)` with momentum);
# 3. the buffer `B = γ·b + ĥ` ((S5), in gradient units; `b = 0` at the first step);
# 4. `exp_map_update`: moves along the great circle, `exp_y(d) = y cos‖d‖ + d/‖d‖ sin‖d‖` with
#    `d = −η·B` ((G5), paper Eq. 7), returned as the additive update `exp_y(d) − w`;
# 5. the parallel transport of the buffer to the new point along the geodesic ((G6), paper
#    Eq. 9).
#
# `grassmann_sgd` projects and clips the gradient itself and does steps 3-5 in one transform:
# it takes the learning rate because it must know the step `d` to transport its buffer along
# it, which it does when it writes the buffer, exactly for every step length (notebook 2 shows
# what goes wrong past a right angle when a momentum transform does not know the step). Its
# state holds the transported buffer (`GrassmannSgdState`: `basis.on_buffer·trace +
# basis.on_point·w` at the new point `w`). Below, its step is compared with the exponential map
# of `d = −η·ĥ` built from the pieces, and, with `γ = 1`, a second step with a zero gradient
# shows the momentum alone.
#
# The numbers are exaggerated (`ν = 0.6`, `η = 1.5`) so that the picture shows something.


# %% tags=["sphere-numbers"]
def transform(tx, updates, params):
  out, _ = tx.update(updates, tx.init(params), params)
  return out


def move(point, step):  # the point exp_y(step), through the additive update of exp_map_update
  return optax.apply_updates(point, transform(go.exp_map_update(), step, point))


nu, eta = 0.6, 1.5
point = jnp.array([[0.35], [-0.45], [0.82]])
point = point / jnp.linalg.norm(point)
grad = jnp.array([[0.7], [0.45], [0.9]])

tangent = transform(go.project_to_tangent(), grad, point)
clipped = transform(go.grassmann_clip(nu), tangent, point)
step = -eta * clipped  # d = −η B, with B = ĥ at the first step

sgdg = go.grassmann_sgd(eta, momentum=1.0, grad_clip=nu)
updates, state = sgdg.update(grad, sgdg.init(point), point)
new_point = optax.apply_updates(point, updates)
carried = state.basis.on_buffer * state.trace + state.basis.on_point * new_point  # pt(B) at y'
updates, _ = sgdg.update(jnp.zeros_like(point), state, new_point)  # momentum alone: B = pt(B)
second_point = optax.apply_updates(new_point, updates)

# The velocity of the geodesic t -> exp_y(t d) at t = 1, by central differences.
velocity = (move(point, 1.001 * step) - move(point, 0.999 * step)) / 0.002
velocity_cos = jnp.vdot(velocity, -eta * carried) / (
  jnp.linalg.norm(velocity) * jnp.linalg.norm(eta * carried)
)

numbers = {
  'y.g': jnp.vdot(point, grad),
  'y.h': jnp.vdot(point, tangent),
  '|h|': jnp.linalg.norm(tangent),
  '|clipped h|': jnp.linalg.norm(clipped),
  '|grassmann_sgd step - exp_y(d)|': jnp.max(jnp.abs(new_point - move(point, step))),
  '|exp_y(d)|': jnp.linalg.norm(new_point),
  'angle(y, exp_y(d))': jnp.arccos(jnp.vdot(point, new_point)),
  '|d|': jnp.linalg.norm(step),
  "y'.pt(B)": jnp.vdot(new_point, carried),
  '|pt(B)| - |B|': jnp.linalg.norm(carried) - jnp.linalg.norm(clipped),
  "cos(pt(d), geodesic velocity at y')": velocity_cos,
  "angle(y, y'') after a step with g = 0": jnp.arccos(jnp.vdot(point, second_point)),
}
for name, value in numbers.items():
  print(f'{name:>38}: {round(float(value), 6) + 0.0:+.6f}')  # + 0.0: no '-0.000000'

# %% [markdown]
# The projection removed the radial part (`y·h = 0`), the clip cut `‖h‖` down to `ν = 0.6`, the
# step of `grassmann_sgd` is the exponential map of `d = −η·ĥ` and stays on the sphere, turning
# the point by exactly `‖d‖ = η·ν = 0.9` radians, and the transported buffer is tangent at the
# new point `y'`, has the norm it had, and points along the geodesic's velocity at `y'`:
# momentum keeps pushing along the same great circle. With `γ = 1` and a zero gradient, the
# second step is that buffer alone, and it turns the point by another 0.9 radians along the same
# great circle (`y''` in the figure, 1.8 radians from `y`).


# %%
def geodesic(t_values):
  return np.stack([np.asarray(move(point, t * step))[:, 0] for t in t_values])


def arrow(ax, base, vector, color, label, style='-', width=2.0):
  base, vector = np.ravel(base), np.ravel(vector)
  ax.quiver(*base, *vector, color=color, linestyle=style, linewidth=width, arrow_length_ratio=0.12)
  ax.plot([], [], color=color, linestyle=style, linewidth=width, label=label)


fig = plt.figure(figsize=(8, 7.5))
ax = fig.add_subplot(projection='3d', computed_zorder=False)  # drawn in order
u, v = np.mgrid[0 : 2 * np.pi : 48j, 0 : np.pi : 24j]
ax.plot_wireframe(
  np.cos(u) * np.sin(v), np.sin(u) * np.sin(v), np.cos(v), color='0.8', linewidth=0.4
)
path, beyond = geodesic(np.linspace(0, 1, 40)), geodesic(np.linspace(1, 2.2, 40))
ax.plot(*path.T, color='crimson', linewidth=3, label='geodesic exp_y(t d), 0 ≤ t ≤ 1')
ax.plot(*beyond.T, color='crimson', linewidth=1, linestyle=':', label='… the same great circle')
arrow(ax, point, grad, 'tab:gray', 'gradient g')
radial = np.stack([np.ravel(point + tangent), np.ravel(point + grad)])
ax.plot(*radial.T, color='tab:gray', linestyle=':', label='radial part (yᵀg) y, removed')
arrow(ax, point, tangent, 'tab:blue', 'projection h (G3)')
arrow(ax, point, clipped, 'tab:green', 'clipped ĥ, |ĥ| = ν (G4)', width=4.0)
arrow(ax, point, step, 'black', 'step d = −η ĥ, tangent at y', style='--')
arrow(ax, new_point, -eta * carried, 'tab:purple', "transported step pt(d) at y' (G6)")
ax.scatter(*np.ravel(point), color='black', s=40)
ax.scatter(*np.ravel(new_point), color='crimson', s=40)
ax.scatter(*np.ravel(second_point), color='tab:purple', s=40, label="y'': next step, g = 0")
ax.text(*(np.ravel(point) * 1.12), 'y', fontsize=14)
ax.text(*(np.ravel(new_point) * 1.1 + [0.0, 0.0, -0.22]), "y' = exp_y(d)", fontsize=13)
ax.text(*(np.ravel(second_point) * 1.1), "y''", fontsize=13)
ax.set_box_aspect((1, 1, 1))
ax.set(xlim=(-1.1, 1.1), ylim=(-1.1, 1.1), zlim=(-1.1, 1.1), xlabel='x', ylabel='y', zlabel='z')
ax.view_init(elev=22, azim=-35)
ax.legend(loc='upper left', fontsize=9, framealpha=0.9)
ax.set_title('One SGD-G step on S² = G(1, 3): project, clip, exp map, transport')
fig.tight_layout()
common.save('01_sphere.png', fig)
plt.show()

# %% [markdown]
# ## Finding the scale-invariant weights
#
# Which weights should live on the manifold? The paper's code uses a naming rule ((L1)): conv
# kernels whose fan-in is larger than their number of outputs; `grassmann_labels` implements it.
# `find_scale_invariant` asks the network instead ((P4)): gradients in training
# mode, and Euler's test above on every grouping of each leaf's axes into points ((P1): the
# columns, the rows, the heads of a 3-D kernel, the whole leaf, ...). A leaf is labelled
# `'grassmann'` when every point of some grouping is orthogonal to its gradient within `tol`, and
# among the groupings that pass, the one with the most points wins: a leaf invariant per column is
# also invariant as a whole, and the columns are the finer structure. It returns a
# `ScaleInvariance(param_labels, point_axes)` that `go.sgdg` and `go.adamg` take as they are
# (`go.adamg(lr, lr_g, **found._asdict())`). With `undercomplete_only=True` (the default), the
# finest invariant grouping must also have more elements per point than points per group, so that
# the points can be mutually orthogonal, the target of the orthogonality penalty (R1); a leaf
# whose finest grouping fails it stays Euclidean rather than being constrained along a coarser
# grouping. `groupings='columns'` keeps to the paper's columns.
#
# The model below mixes all cases: convs that feed a BatchNorm, a conv with a bias followed only
# by a ReLU, an over-complete conv (fan-in 9·32 = 288 < 512 outputs) that feeds a BatchNorm, a
# dense layer that feeds a BatchNorm (as VGG's `fc0`/`fc1` do), and the dense head. The test
# must run at random parameters: Flax initialises biases to zero, and at a zero bias a ReLU is
# positively homogeneous, so `conv_relu`, followed by the next conv and its BatchNorm, would pass
# as a whole. The cell draws the biases from N(0, 1) and prints the zero-bias case too.


# %% tags=["labels"]
class Mixed(nn.Module):
  @nn.compact
  def __call__(self, x):
    bn = lambda name: nn.BatchNorm(use_running_average=False, name=name)
    x = nn.relu(bn('bn_a')(nn.Conv(16, (3, 3), use_bias=False, name='conv_bn_a')(x)))
    x = nn.relu(nn.Conv(16, (3, 3), name='conv_relu')(x))  # bias, no BatchNorm
    x = nn.relu(bn('bn_b')(nn.Conv(32, (3, 3), use_bias=False, name='conv_bn_b')(x)))
    x = nn.relu(bn('bn_wide')(nn.Conv(512, (3, 3), use_bias=False, name='conv_bn_wide')(x)))
    x = x.mean((1, 2))
    x = nn.relu(bn('bn_fc')(nn.Dense(64, use_bias=False, name='dense_bn')(x)))
    return nn.Dense(10, name='head')(x)


mixed = Mixed()
x_small, y_small = x[:64], y[:64]  # one batch of 64 is enough for the test
mixed_variables = jax.jit(mixed.init)(jax.random.key(1), x_small)


mixed_params = common.with_random_biases(mixed_variables['params'], jax.random.key(2))


@jax.jit
def mixed_loss(params, images, targets):
  logits, _ = mixed.apply(
    {'params': params, 'batch_stats': mixed_variables['batch_stats']},
    images,
    mutable=['batch_stats'],
  )
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


# tol: BatchNorm's epsilon leaves cosines of order epsilon / Var (see above), up to ~5e-4 here.
find = lambda params, **options: go.find_scale_invariant(
  mixed_loss, params, x_small, y_small, tol=1e-3, **options
)
found = find(mixed_params)
columns_only = find(mixed_params, groupings='columns')
any_shape = find(mixed_params, groupings='columns', undercomplete_only=False)
at_zero_bias = find(mixed_variables['params'])
paper_rule = go.grassmann_labels(mixed_params)
grads = jax.grad(mixed_loss)(mixed_params, x_small, y_small)


def label(found, name):
  tag = common.named_leaves(found.param_labels)[name]
  axes = common.named_leaves(found.point_axes)[name]
  if tag == go.EUCLIDEAN:
    return tag
  return f'{tag}:{"columns" if axes is None else ",".join(map(str, axes))}'


header = ('leaf', 'shape', 'max|cos|', 'found', 'columns', 'columns,any', 'paper rule')
widths = (19, 11, 8, 17, 17, 17, 0)
print(' '.join(f'{h:<{w}}' for h, w in zip(header, widths, strict=True)))
gradient_of = common.named_leaves(grads)
for name, leaf in common.named_leaves(mixed_params).items():
  if leaf.ndim < 2:
    continue  # vectors (biases, BatchNorm parameters) are never on G(1, n)
  shape = 'x'.join(map(str, leaf.shape))
  cos = float(jnp.max(jnp.abs(column_cosines(leaf, gradient_of[name]))))
  cells = [label(f, name) for f in (found, columns_only, any_shape)]
  print(
    f'{name:<19} {shape:<11} {cos:8.1e} {cells[0]:<17} {cells[1]:<17} {cells[2]:<17} '
    f'{common.named_leaves(paper_rule)[name]}'
  )


def whole_cosine(params, name='conv_relu'):
  g, w = jax.grad(mixed_loss)(params, x_small, y_small)[name]['kernel'], params[name]['kernel']
  return float(jnp.vdot(g, w) / (jnp.linalg.norm(g) * jnp.linalg.norm(w)))


for case, params, result in [('random', mixed_params, found), ('zero', None, at_zero_bias)]:
  params = mixed_variables['params'] if params is None else params
  print(
    f'conv_relu/kernel at {case} biases: cos(w, dL/dw) of the whole kernel '
    f'{abs(whole_cosine(params)):.1e} -> {label(result, "conv_relu/kernel")}'
  )

# %% [markdown]
# Reading the table (labels and point axes: `columns`, or the axes that form one point; `found`
# is `find_scale_invariant` with its defaults, then with `groupings='columns'`, then with
# `groupings='columns', undercomplete_only=False`; `max|cos|` is the largest cosine between a
# column and its gradient; the non-invariant kernels have cosines of order 0.1):
#
# * `conv_bn_b` feeds a BatchNorm and is under-complete: found per column, and picked by the
#   paper's rule.
# * `conv_bn_a` is scale-invariant per column, but its fan-in 9 is smaller than its 16 outputs:
#   16 unit columns cannot be mutually orthogonal in R⁹, so the paper's rule and
#   `find_scale_invariant` with `undercomplete_only=True` (with any grouping, or the columns
#   only) keep it Euclidean; only `undercomplete_only=False` puts its columns on the sphere. The
#   whole leaf, one point of 144 weights, is invariant too (a leaf invariant per column is
#   invariant as a whole), but the default does not fall back to it: it would constrain the leaf
#   along a coarser grouping than the one the network has. `conv_bn_wide` (fan-in 288 < 512
#   outputs) is the same case.
# * `conv_relu` has cosines of order 0.1 per column and of a few 1e-3 as a whole kernel, above
#   `tol`: not invariant. At Flax's initialisation its bias is zero, ReLU is then positively
#   homogeneous, and the whole kernel passes the test (cosine ~1e-7, last line): the test is
#   necessary, not sufficient, and must run at random parameters. The paper's rule looks only at
#   the shape (a 4-D kernel with fan-in > outputs) and would put it on the manifold, where the
#   projection would throw away a radial gradient that matters.
# * `dense_bn` feeds a BatchNorm and is found; the paper's rule never puts dense layers on the
#   manifold (the original code tests for `conv` in the variable name), which is why VGG's
#   `fc0`/`fc1` stay Euclidean in the paper ((L1)).
# * `head` is not invariant; biases and BatchNorm parameters are vectors and never on G(1, n).
#
# So `find_scale_invariant` is a tool to check a label tree, not to replace thinking about the
# architecture. Pass its result to `go.sgdg` / `go.adamg` (`**found._asdict()`), or a label tree
# of your own as `param_labels=` (with `point_axes=` where the points are not the columns).
# Notebook 4 runs it on a Transformer, where the points are attention heads and whole matrices.
