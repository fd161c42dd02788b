"""Hyperball steps: every matrix on the sphere of its initial norm, a fixed relative step.

The Hyperball optimizers of Wen et al. (2025) keep every projection matrix ``W`` at its initial
Frobenius norm ``R`` and move it by a fixed fraction ``η`` of that norm, whatever the size of the
base update ``u``: ``W' = Norm(W − η‖W‖·u/max(‖u‖, 1e-10))·‖W‖``. AdamH takes Adam's ``u``,
MuonH Muon's. Here the radius is stored at ``init``, so ``‖W‖`` cannot drift, and the step can
also follow the great circle (``retraction='geodesic'``), with the buffers transported to the
new point as SGD-G and Adam-G transport theirs (Cho & Lee 2017); :mod:`sphere` has the
geometry.

As :func:`grassmann_adam` does, :func:`hyperball_adam` and :func:`hyperball_muon` own their
buffers and take the learning rate: a buffer that is transported must know the step its point
takes (``docs/algorithm.md``, section 7). :func:`hyperball_step` is the step alone, for chains.

References: Wen, Dang, Lyu, Ma, Liang, "Fantastic Pretraining Optimizers and Where to Find Them
2.1: Hyperball Optimization", 2025; Cho & Lee, "Riemannian approach to batch normalization",
NeurIPS 2017 (arXiv:1709.09603).
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from grassmann_optax._src import (
  checks,
  manifold,
  matrix_sign,
  native,
  points,
  sharding,
  sphere,
  stacks,
  steps,
  tuning,
)


class HyperballStepState(NamedTuple):
  """State of :func:`hyperball_step`.

  Attributes:
    count: number of updates so far, int32 (drives a learning-rate schedule).
    radius: the Frobenius norm of every point at ``init``, float32 or wider, shaped by the batch
      axes of each leaf (``()`` for a matrix, ``(layers,)`` for a stacked kernel).
  """

  count: jax.Array
  radius: optax.Params


class HyperballAdamState(NamedTuple):
  """State of :func:`hyperball_adam`.

  Attributes:
    count: number of updates so far (``t``), int32.
    mu: Adam's first moment, in the shape and dtype of the params; with ``'geodesic'``, a
      tangent vector at the current point.
    nu: Adam's elementwise second moment, in the shape and dtype of the params.
    radius: the Frobenius norm of every point at ``init``, shaped by the batch axes.
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  radius: optax.Params


class HyperballMuonState(NamedTuple):
  """State of :func:`hyperball_muon`.

  Attributes:
    count: number of updates so far, int32 (drives a learning-rate schedule).
    trace: the momentum buffer ``b`` (gradient units, as :func:`optax.trace`), in the shape and
      dtype of the params; with ``'geodesic'``, a tangent vector at the current point.
    radius: the Frobenius norm of every point at ``init``, shaped by the batch axes.
  """

  count: jax.Array
  trace: optax.Updates
  radius: optax.Params


def _zeros(params):
  return jax.tree.map(jnp.zeros_like, params)


class _Leaf(NamedTuple):
  """What a rule needs of one leaf besides its arrays: per-point values shaped to broadcast."""

  layout: points.Layout
  radius: jax.Array
  lr: jax.Array
  t: jax.Array  # the step count, in the compute dtype
  allow_kernel: bool  # False where the leaf is upcast from a narrower dtype
  previous: jax.Array | None  # a scalar of the leaf before, known once its products are reduced

  def products(self, w, u, m):
    return sphere.products(w, u, m, self.layout.point, allow_kernel=self.allow_kernel)

  def after_previous(self, x):
    """``x``, computed after the previous leaf's products (:func:`tuning.after`)."""
    return tuning.after(x, self.previous)


# ``rule(leaf, w, g, *buffers) -> (update, new buffers, mark)``, per leaf, every array in the
# compute dtype; the update is ``W' − W``; ``mark`` is a per-point value known once the leaf's
# products are reduced (the next leaf waits for it, :func:`tuning.after`).
LeafRule = Callable[..., tuple[jax.Array, tuple[jax.Array, ...], jax.Array]]


def _combine(w, u, on_w, on_u, *, after=None):
  """``(on_w − 1)·w + on_u·u``, the update to ``W' = on_w·w + on_u·u``, in one element pass, and
  the materialised ``on_w − 1`` (a mark for the next leaf).

  The per-point coefficients are materialised first (:func:`tuning.per_point`), so that the
  per-point maths runs once per point, not once per element. ``after`` is an array written from
  ``w`` in another pass (the transported buffer): the update's pass reads it, with no effect on
  the result (it is added only where ``on_w`` is NaN, where the update is NaN already), so that
  XLA orders the two passes and writes the new params in place of donated ones instead of
  copying them first.
  """
  on_w, on_u = tuning.per_point(on_w - 1, on_u)
  update = on_w * w + on_u * u
  if after is not None:
    update = update + jnp.where(jnp.isnan(on_w), after, 0)
  return update, on_w


def _transported(w, u, m, wm, um, transport: sphere.Transport) -> jax.Array:
  """The buffer ``m`` carried along the geodesic step (:class:`sphere.Transport`), in one element
  pass; ``wm = w·m`` and ``um = u·m``."""
  on_u, on_w = tuning.per_point(*transport.coefficients(wm, um))
  return m + on_u * u + on_w * w


def _sphere_rule(base: Callable, retraction: str) -> LeafRule:
  """The leaf rule that moves each point on its sphere along ``base``'s update.

  ``base(leaf, h, *buffers) -> (u, new buffers)`` is the unconstrained step (Adam's, Muon's) on
  the gradient ``h``. ``'normalize'`` feeds it the raw gradient; ``'geodesic'`` the gradient
  projected on the tangent space, and transports the first buffer (the momentum) along the step.
  """

  def normalize(leaf, w, g, *buffers):
    u, buffers = base(leaf, g, *buffers)
    ww, wu, uu = leaf.products(w, u, u)[:3]
    on, _ = sphere.normalize_step(ww, wu, uu, leaf.radius, leaf.lr)
    update, mark = _combine(w, u, *on)
    return update, buffers, mark

  def geodesic(leaf, w, g, *buffers):
    ww, wg = leaf.products(w, g, g)[:2]
    (c,) = tuning.per_point(leaf.after_previous(sphere.radial_coefficient(ww, wg)))
    u, (m, *rest) = base(leaf, g - c * w, *buffers)
    _, wu, uu, wm, um, _ = leaf.products(w, u, m)
    on, transport = sphere.geodesic_step(ww, wu, uu, leaf.radius, leaf.lr)
    m = _transported(w, u, m, wm, um, transport)
    update, mark = _combine(w, u, *on, after=m)
    return update, (m, *rest), mark

  return geodesic if retraction == 'geodesic' else normalize


def _transform(
  name: str,
  make_state: Callable,
  buffer_fields: tuple[str, ...],
  rule: LeafRule,
  *,
  learning_rate,
  point_axes,
) -> optax.GradientTransformationExtraArgs:
  """A hyperball step with buffers: what differs between the optimizers is ``rule``.

  ``make_state(count, buffers, radius)`` builds the state from the buffers named
  ``buffer_fields``. ``update`` returns ``W' − W`` and the new buffers, per leaf.
  """
  checks.check_hyperparameters(learning_rate=learning_rate)
  points.check_spec_tree(point_axes)

  def init_fn(params):
    layouts = sphere.resolve(params, point_axes)
    checks.check_manifold_leaves(params, name, layouts, kind=checks.HYPERBALL_POINTS)
    steps.warn_if_wrapped(name)
    radius = sphere.initial_radius(params, layouts, name)
    buffers = [_zeros(params) for _ in buffer_fields]
    return make_state(jnp.zeros([], jnp.int32), buffers, radius)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(checks.NO_PARAMS_MSG)
    checks.check_state(state, ('count', 'radius', *buffer_fields), name)
    if buffer_fields:
      checks.check_update_trees(updates, params, getattr(state, buffer_fields[0]), name)
    else:
      checks.check_same_tree(updates, params, 'the updates', 'the params', name)
      checks.check_real_updates(updates, name)
    sphere.check_not_split(params, name)
    layouts = sphere.resolve(params, point_axes)
    checks.check_radii(params, state.radius, layouts, name)
    lr = checks.scheduled(learning_rate, state.count, name)
    count = optax.safe_increment(state.count)
    treedef = jax.tree.structure(params)
    buffers = [treedef.flatten_up_to(getattr(state, f)) for f in buffer_fields]
    radii = treedef.flatten_up_to(state.radius)
    w_leaves, g_leaves = jax.tree.leaves(params), treedef.flatten_up_to(updates)
    new_updates = [None] * len(w_leaves)
    new_buffers = [[None] * len(w_leaves) for _ in buffer_fields]
    previous = None
    # Equal small leaves are stepped as one stack, each leaf a point (or points) of its own on a
    # new leading batch axis (tuning): a few arrays for XLA instead of hundreds.
    for stack in stacks.plan(layouts, w_leaves, g_leaves, *buffers):
      w, g = stack.pick(w_leaves), stack.pick(g_leaves)
      layout = stack.layout(layouts)
      dtype = manifold.compute_dtype(w)
      leaf = _Leaf(
        layout=layout,
        radius=sphere.per_point(stack.pick(radii).astype(dtype), layout, w.shape),
        lr=jnp.asarray(lr, dtype),
        t=count.astype(dtype),
        allow_kernel=w.dtype == dtype and g.dtype == dtype,
        previous=previous,
      )
      own = [stack.pick(b).astype(dtype) for b in buffers]
      update, own, mark = rule(leaf, w.astype(dtype), g.astype(dtype), *own)
      if mark.size:  # a stack of zero layers has no point to mark
        previous = mark.reshape(-1)[0]
      stack.scatter(update.astype(w.dtype), new_updates)
      for new, old, out in zip(own, buffers, new_buffers, strict=True):
        stack.scatter(new.astype(old[stack.first].dtype), out)
    new_state = make_state(count, [treedef.unflatten(b) for b in new_buffers], state.radius)
    return treedef.unflatten(new_updates), new_state

  return optax.GradientTransformationExtraArgs(init_fn, sharding.explicit_axes_as_auto(update_fn))


def hyperball_step(
  learning_rate: optax.ScalarOrSchedule,
  *,
  retraction: str = 'geodesic',
  point_axes: points.PointAxes = None,
) -> optax.GradientTransformationExtraArgs:
  r"""The fixed relative step of the Hyperball optimizers: each point on its initial sphere.

  For every point ``W`` (by default the matrix of the last two axes; leading axes index stacked
  layers), with ``R`` its Frobenius norm at ``init`` (kept in the state), ``y = W/‖W‖`` and
  ``u`` the incoming update:

  .. math::
    \texttt{'normalize'}:\quad W' = R\,\mathrm{Norm}\Big(y - \eta\,\frac{u}{\max(\lVert u\rVert,
    10^{-10})}\Big), \qquad \mathrm{Norm}(x) = x/\lVert x\rVert,

  Wen et al.'s step ``Norm(W − η‖W‖u/max(‖u‖, 1e-10))·‖W‖`` with the stored ``R`` for ``‖W‖``;

  .. math::
    \texttt{'geodesic'}:\quad u_\perp = u - (u\cdot y)\,y, \quad
    \theta = \arctan\frac{\eta\lVert u_\perp\rVert}{\max(\lVert u_\perp\rVert, 10^{-10})},
    \quad W' = R\Big(\cos\theta\,y - \sin\theta\,\frac{u_\perp}{\lVert u_\perp\rVert}\Big),

  the great circle in the direction ``−u⊥`` by the angle that ``'normalize'`` takes for a tangent
  ``u`` (so the two agree wherever ``u`` is tangent; ``η`` is ``tan θ``). Above the floor of
  ``1e-10`` only the direction of ``u`` counts: every finite ``u`` with ``‖u‖ ≥ 1e-10`` takes the
  step of ``u/‖u‖``, also where ``‖u‖²`` overflows (its products are then taken of ``u`` divided
  by a power of two), and a point whose ``u`` holds NaN becomes NaN. The update is ``W' − W``, so
  that :func:`optax.apply_updates` puts every point at ``R``: its norm cannot drift over a run, as
  it is set anew at each step. Chained after :func:`optax.scale_by_adam` with ``'normalize'``
  this is AdamH; after :func:`optax.trace` and :func:`scale_by_matrix_sign`, MuonH. With a buffer
  before it, prefer :func:`hyperball_adam` / :func:`hyperball_muon` for ``'geodesic'``: they
  transport the buffer along the step, which a chain cannot.

  Args:
    learning_rate: η, the step relative to the radius (``tan θ`` of the angle), or a schedule.
    retraction: ``'geodesic'`` or ``'normalize'`` (the published step).
    point_axes: the axes of each leaf that form one point: ``None`` (the last two axes; a leaf of
      one axis is one point), an int or a tuple of ints, a pytree of those with the paths of the
      params, or a callable ``params -> pytree``.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` that needs ``params``; its state is a
    :class:`HyperballStepState`. ``init`` raises a ValueError naming the leaf that is not real
    floating-point, has points of fewer than 2 elements, or a point of norm 0; ``update`` one
    for a leaf split across devices inside ``jax.shard_map``.

  Example:
    >>> import jax, jax.numpy as jnp, grassmann_optax as go
    >>> w = jax.random.normal(jax.random.key(0), (16, 8))
    >>> tx = go.hyperball_step(0.1)
    >>> u, state = tx.update(jnp.ones_like(w), tx.init(w), w)
    >>> bool(jnp.isclose(jnp.linalg.norm(w + u), jnp.linalg.norm(w)))
    True

  References:
    Wen, Dang, Lyu, Ma, Liang, "Fantastic Pretraining Optimizers and Where to Find Them 2.1:
    Hyperball Optimization", 2025.

    Cho & Lee, "Riemannian approach to batch normalization", NeurIPS 2017,
    `arXiv:1709.09603 <https://arxiv.org/abs/1709.09603>`_.
  """
  step = sphere.retraction_of(retraction)

  def make_state(count, buffers, radius):
    del buffers
    return HyperballStepState(count=count, radius=radius)

  def rule(leaf, w, u):
    ww, wu, uu = leaf.products(w, u, u)[:3]

    # The step depends on u's direction only. An incoming update is any finite array (a plain
    # momentum of large gradients, say): where ‖u‖² is too large for the per-point maths, the
    # products are those of u divided by a power of two near its largest element (exact), as the
    # G(1, n) steps rescue their gradients (F10), and the step combines w with that scaled u (its
    # coefficient times the scale could be subnormal, which XLA:CPU flushes to zero).
    rescaled = lambda scaled: jnp.stack(leaf.products(w, scaled, scaled)[1:3])
    _, inverse, (wu, uu) = manifold.rescued(u, uu, jnp.stack([wu, uu]), rescaled, leaf.layout.point)
    (on_w, on_u), _ = step(ww, wu, uu, leaf.radius, leaf.lr)
    update, mark = _combine(w, u * inverse, on_w, on_u)
    return update, (), mark

  return _transform(
    'hyperball_step', make_state, (), rule, learning_rate=learning_rate, point_axes=point_axes
  )


def hyperball_adam(
  learning_rate: optax.ScalarOrSchedule,
  *,
  b1: ArrayLike = 0.9,
  b2: ArrayLike = 0.95,
  eps: ArrayLike = 1e-8,
  retraction: str = 'geodesic',
  point_axes: points.PointAxes = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AdamH's step: Adam's update, then the fixed relative step on each point's sphere.

  For every point ``W`` with radius ``R`` (its norm at ``init``), ``y = W/‖W‖`` and step ``t``:

  .. math::
    h = P(g), \quad m \leftarrow \beta_1 m + (1-\beta_1) h, \quad
    v \leftarrow \beta_2 v + (1-\beta_2) h^2, \quad
    u = \frac{m/(1-\beta_1^t)}{\sqrt{v/(1-\beta_2^t)} + \epsilon},

  elementwise (ε outside the square root, as :func:`optax.scale_by_adam`), then ``W'`` by the
  step of :func:`hyperball_step`. With ``retraction='normalize'``, ``P(g) = g`` and this is the
  published AdamH, ``optax.chain(optax.scale_by_adam(b1, b2, eps),
  hyperball_step(learning_rate, retraction='normalize'))``, to round-off. With ``'geodesic'``,
  ``P(g) = g − (g·y) y`` (the gradient on the sphere), the point moves along the great circle,
  and ``m`` is carried to the new point by the sphere's parallel transport
  ``m + (m·d)((cos θ − 1) d − sin θ y)``, ``d`` the unit direction and ``θ`` the angle of the
  step, as Adam-G transports its first moment (Cho & Lee 2017). The second moment ``v`` is a
  per-element magnitude, not a tangent vector, so it is kept as it is. On CPU, for float32
  matrices, one pass of a C++ kernel writes both moments and reduces the products of ``u`` that
  the step needs (``docs/kernel.md``); elsewhere XLA computes the same.

  Args:
    learning_rate: η, the step relative to the radius, or a schedule.
    b1: β1, the decay of the first moment.
    b2: β2, the decay of the second moment (0.95 in Wen et al.).
    eps: ε, added to the square root of the second moment.
    retraction: ``'geodesic'`` or ``'normalize'`` (the published AdamH).
    point_axes: the axes of each leaf that form one point, as in :func:`hyperball_step` (by
      default the last two axes).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` that needs ``params``; its state is a
    :class:`HyperballAdamState`, whose ``count`` also drives the schedule.

  Example:
    >>> import jax, jax.numpy as jnp, optax, grassmann_optax as go
    >>> w = jax.random.normal(jax.random.key(0), (3, 16, 8))  # three stacked layers
    >>> tx = go.hyperball_adam(0.05)
    >>> state = tx.init(w)
    >>> u, state = tx.update(jnp.ones_like(w), state, w)
    >>> state.radius.shape, bool(jnp.allclose(jnp.linalg.norm(w + u, axis=(1, 2)), state.radius))
    ((3,), True)

  References:
    Wen, Dang, Lyu, Ma, Liang, "Fantastic Pretraining Optimizers and Where to Find Them 2.1:
    Hyperball Optimization", 2025.

    Cho & Lee, "Riemannian approach to batch normalization", NeurIPS 2017,
    `arXiv:1709.09603 <https://arxiv.org/abs/1709.09603>`_.
  """
  checks.check_hyperparameters(b1=b1, b2=b2, eps=eps)
  sphere.retraction_of(retraction)

  def make_state(count, buffers, radius):
    mu, nu = buffers
    return HyperballAdamState(count=count, mu=mu, nu=nu, radius=radius)

  def update(mu, nu, t):
    c1, c2 = manifold.bias_correction(b1, t), manifold.bias_correction(b2, t)
    return (mu / c1) / (jnp.sqrt(nu / c2) + eps)

  def adam(leaf, h, mu, nu):
    mu = b1 * mu + (1 - b1) * h
    nu = b2 * nu + (1 - b2) * h * h
    return update(mu, nu, leaf.after_previous(leaf.t)), (mu, nu)

  rule = _sphere_rule(adam, retraction)

  def fused(leaf, w, g, mu, nu):
    """The step with the moments and the products of ``u`` from one pass on CPU (the kernel of
    :func:`native.adam_products`); where it does not apply, :func:`_sphere_rule`'s.

    The kernel writes the moments in place and, for ``'normalize'``, no array besides: the
    leaves need no ordering (:func:`tuning.after`) to keep temporary memory small, and without it
    XLA overlaps one leaf's kernel with another's element pass.
    """
    allow_kernel = leaf.allow_kernel and tuning.use_cpu_kernel()
    axes = leaf.layout.point
    if not native.adam_kernel_applies(w, g, mu, nu, point_axes=axes, allow_kernel=allow_kernel):
      return rule(leaf, w, g, mu, nu)
    geodesic = retraction == 'geodesic'
    tangent = None
    if geodesic:
      ww, wg = leaf.products(w, g, g)[:2]
      (tangent,) = tuning.per_point(leaf.after_previous(sphere.radial_coefficient(ww, wg)))
    moments = native.adam_products(
      w, g, mu, nu, b1=b1, b2=b2, eps=eps, t=leaf.t, point_axes=axes, tangent=tangent
    )
    mu, nu, u, (ww, wu, uu, wm, um) = moments
    u = update(mu, nu, leaf.t) if u is None else u
    if not geodesic:
      on, _ = sphere.normalize_step(ww, wu, uu, leaf.radius, leaf.lr)
      step, mark = _combine(w, u, *on)
      return step, (mu, nu), mark
    on, transport = sphere.geodesic_step(ww, wu, uu, leaf.radius, leaf.lr)
    mu = _transported(w, u, mu, wm, um, transport)
    step, mark = _combine(w, u, *on, after=mu)
    return step, (mu, nu), mark

  return _transform(
    'hyperball_adam',
    make_state,
    ('mu', 'nu'),
    fused,
    learning_rate=learning_rate,
    point_axes=point_axes,
  )


def hyperball_muon(
  learning_rate: optax.ScalarOrSchedule,
  *,
  momentum: ArrayLike = 0.95,
  nesterov: bool = True,
  ns_steps: int = 5,
  retraction: str = 'geodesic',
  point_axes: points.PointAxes = None,
) -> optax.GradientTransformationExtraArgs:
  r"""MuonH's step: Muon's orthogonalised momentum, then the fixed relative step on the sphere.

  For every point ``W`` (a matrix) with radius ``R`` and ``y = W/‖W‖``:

  .. math::
    h = P(g), \quad b \leftarrow \mu b + h, \quad
    u = \mathrm{NS}(\mu b + h) \ \text{(Nesterov; else } \mathrm{NS}(b)\text{)},

  with ``NS`` the Newton–Schulz orthogonalisation of :func:`scale_by_matrix_sign`, then ``W'``
  by the step of :func:`hyperball_step`. With ``retraction='normalize'``, ``P(g) = g`` and this
  is the published MuonH, ``optax.chain(optax.trace(momentum, nesterov),
  scale_by_matrix_sign(ns_steps), hyperball_step(learning_rate, retraction='normalize'))``, to
  round-off. With ``'geodesic'``, ``P(g) = g − (g·y) y``, the point moves along the great
  circle, and ``b`` is carried to the new point by the sphere's parallel transport, as SGD-G
  transports its momentum (Cho & Lee 2017).

  Args:
    learning_rate: η, the step relative to the radius, or a schedule.
    momentum: μ, the decay of the momentum buffer (0.95).
    nesterov: Nesterov momentum (``u`` from ``μb + h``), as in Muon.
    ns_steps: the number of Newton–Schulz iterations (5).
    retraction: ``'geodesic'`` or ``'normalize'`` (the published MuonH).
    point_axes: the axes of each leaf that form one point, as in :func:`scale_by_matrix_sign`
      (by default the last two axes).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` that needs ``params``; its state is a
    :class:`HyperballMuonState`: one buffer.

  Example:
    >>> import jax, jax.numpy as jnp, grassmann_optax as go
    >>> w = jax.random.normal(jax.random.key(0), (16, 8))
    >>> tx = go.hyperball_muon(0.05)
    >>> g = jax.random.normal(jax.random.key(1), (16, 8))
    >>> u, state = tx.update(g, tx.init(w), w)
    >>> bool(jnp.isclose(jnp.linalg.norm(w + u), jnp.linalg.norm(w)))
    True

  References:
    Wen, Dang, Lyu, Ma, Liang, "Fantastic Pretraining Optimizers and Where to Find Them 2.1:
    Hyperball Optimization", 2025.

    Cho & Lee, "Riemannian approach to batch normalization", NeurIPS 2017,
    `arXiv:1709.09603 <https://arxiv.org/abs/1709.09603>`_.
  """
  checks.check_hyperparameters(momentum=momentum)
  checks.check_bool(nesterov=nesterov)
  matrix_sign.check_steps(ns_steps)
  sphere.retraction_of(retraction)

  def make_state(count, buffers, radius):
    (trace,) = buffers
    return HyperballMuonState(count=count, trace=trace, radius=radius)

  def muon(leaf, h, trace):
    decay = leaf.after_previous(jnp.asarray(momentum, h.dtype))
    trace = decay * trace + h
    u = decay * trace + h if nesterov else trace
    return matrix_sign.matrix_sign(u, leaf.layout, ns_steps, 1e-8), (trace,)

  rule = _sphere_rule(muon, retraction)

  return _transform(
    'hyperball_muon',
    make_state,
    ('trace',),
    rule,
    learning_rate=learning_rate,
    point_axes=point_axes,
  )
