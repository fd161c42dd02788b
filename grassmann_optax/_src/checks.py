"""Input checks shared by the transforms, the aliases and the label functions.

They run on concrete shapes, dtypes and Python numbers, outside any trace (at construction, at
``init``, and when ``update`` is traced), so a bad parameter tree or hyper-parameter fails before
the first step with a message that names the offending leaf or argument. The one check of values
that ``init`` may see traced, the initial norms of ``radius='init'``, runs inside the compiled
``init`` instead (:func:`check_initial_norms`).
"""

import functools
import math
import numbers
import sys
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# The message of optax's own transforms that need params (``optax._src.base.NO_PARAMS_MSG``,
# not exported at the top level).
NO_PARAMS_MSG = (
  'You are using a transformation that requires the current value of parameters, but you are '
  'not passing `params` when calling `update`.'
)


def unboxed(path) -> tuple:
  """``path`` without the ``value`` attribute that ends the path of a leaf in a Flax box
  (``nnx.Param``, ``nn.Partitioned``)."""
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == 'value':
    return tuple(path[:-1])
  return tuple(path)


def leaf_name(path) -> str:
  """A readable name for a pytree path, e.g. ``params/conv0/kernel``.

  A Flax box's ``value`` is left out (:func:`unboxed`), so that trees matched by name (labels,
  point axes) match whether each side is boxed or not, as ``optax.partition`` matches them.
  """
  parts = []
  for key in unboxed(path):
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return '/'.join(parts) or '<root>'


def named_leaves(tree: Any) -> list[tuple[str, Any]]:
  return [(leaf_name(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def by_name(pairs, what: str) -> dict[str, Any]:
  """``{leaf_name(path): value}`` for ``(path, value)`` pairs, refusing two paths of one name.

  Trees given beside the params (labels, point axes, mesh axes) are matched to its leaves by
  name, so that a flat dict of names or another container type works; a key holding ``/`` (or
  the keys ``1`` and ``'1'``) could make two leaves one name and silently share one entry.

  Raises:
    ValueError: two leaves of ``what`` have the same name.
  """
  out, paths = {}, {}
  for path, value in pairs:
    name = leaf_name(path)
    if name in out:
      first, second = (jax.tree_util.keystr(tuple(p)) for p in (paths[name], path))
      raise ValueError(
        f'{what}: the leaves at {first} and {second} have the same name {name!r}. Trees given '
        'beside the params are matched to its leaves by name (the keys joined with "/"), so '
        'each name must be one leaf: rename the key that holds "/".'
      )
    out[name], paths[name] = value, path
  return out


def pick_by_name(given: dict[str, Any], names: list[str], missing, extra) -> list[Any]:
  """``given[name]`` for each of ``names``, which must be exactly the keys of ``given``.

  Raises:
    ValueError: with the message ``missing(name)`` for the first name not in ``given``, or
      ``extra(key)`` for the first key of ``given`` not in ``names``.
  """
  for name in names:
    if name not in given:
      raise ValueError(missing(name))
  rest = sorted(set(given) - set(names))
  if rest:
    raise ValueError(extra(rest[0]))
  return [given[name] for name in names]


def unique_names(tree: Any, what: str, is_leaf=None) -> list[str]:
  """The names of the leaves of ``tree`` in order, refusing two leaves of one name."""
  pairs = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return list(by_name(pairs, what))


def entries_by_name(tree: Any, given: Any, what: str, is_leaf) -> list[Any]:
  """Per leaf of ``tree``, in order, the entry of the pytree ``given`` (``what``, whose leaves
  ``is_leaf`` tells) of the same name, or None where it has none. Two leaves of one name, in
  either tree, are refused (:func:`by_name`)."""
  entries = by_name(jax.tree_util.tree_flatten_with_path(given, is_leaf=is_leaf)[0], what)
  names = unique_names(tree, f'the params, matched to {what} by name')
  return [entries.get(name) for name in names]


def fan_in_and_out(shape: tuple[int, ...]) -> tuple[int, int]:
  """``(n, p)`` of the column view ``reshape(-1, shape[-1])``: rows (fan-in) and columns."""
  if not shape:
    return 1, 1
  return math.prod(shape[:-1]), shape[-1]


class PointKind(NamedTuple):
  """How the messages of a geometry name its points."""

  point: str  # what one point is
  default: str  # what the default point axes make a point
  refused: str  # what a leaf that cannot hold them cannot do


GRASSMANN_POINTS = PointKind(
  'a point of G(1, n)',
  'with the default point axes, the columns of reshape(-1, shape[-1]) need at least 2 rows',
  'cannot lie on G(1, n)',
)
HYPERBALL_POINTS = PointKind(
  'a hyperball point',
  'by default a point is the matrix of the last two axes',
  'cannot be a hyperball point',
)


def manifold_leaf_problem(dtype, point_size: int, kind: PointKind = GRASSMANN_POINTS) -> str | None:
  """Why a leaf of this dtype, with points of ``point_size`` elements, cannot hold points of
  ``kind``."""
  point, default, _ = kind
  if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
    number = 'complex' if jnp.issubdtype(dtype, jnp.complexfloating) else 'not floating-point'
    return (
      f'has dtype {jnp.dtype(dtype).name} ({number}); {point} is a real vector, and needs a real '
      'floating-point leaf (float32, bfloat16, float64, ...)'
    )
  if point_size < 2:
    return (
      f'has points of {point_size} element along its point axes, and {point} needs at least 2 '
      f'({default})'
    )
  return None


def undercomplete_problem(shape: tuple[int, ...], layout) -> str | None:
  """Why a group of ``p`` points of ``n`` elements is refused where the rule of (L1) holds: unless
  ``n > p`` (the paper's rule: a conv kernel's fan-in must exceed its outputs); else None.

  With ``n < p`` the unit points cannot be mutually orthogonal, the target of (R1); with ``n = p``
  they can (a square orthogonal matrix), and the refusal is the originals' rule alone.
  """
  from grassmann_optax._src import sharding  # sharding reads leaf names from here

  # Inside shard_map, a split leaf's block counts for the whole leaf.
  n = layout.point_size(shape) * sharding.axis_size(layout.point_mesh)
  p = layout.points_per_group(shape) * sharding.axis_size(layout.member_mesh)
  if n > p:
    return None
  what = 'fan-in' if layout.point == tuple(range(len(shape) - 1)) else 'point size'
  if n < p:
    return (
      f'has {what} {n} < {p} points per group: its {p} unit points cannot be mutually '
      f'orthogonal in R^{n}, the target of the orthogonality term'
    )
  return (
    f'has {what} {n} = {p} points per group: the paper keeps such square groups Euclidean (its '
    'rule: more elements per point than points)'
  )


def check_manifold_leaves(
  tree: Any,
  transform_name: str,
  layouts,
  *,
  undercomplete: bool = False,
  kind: PointKind = GRASSMANN_POINTS,
) -> None:
  """Every leaf must be real floating-point, with points of at least 2 elements.

  ``layouts``: the :class:`points.Layout` of each leaf, in order. With ``undercomplete``, the
  points of each group must also have more elements than the group has points. ``kind``: the
  geometry, as :func:`manifold_leaf_problem` takes it.
  """
  for (name, leaf), layout in zip(named_leaves(tree), layouts, strict=True):
    shape = tuple(getattr(leaf, 'shape', ()))
    problem = manifold_leaf_problem(getattr(leaf, 'dtype', None), layout.point_size(shape), kind)
    if problem is None and undercomplete:
      problem = undercomplete_problem(shape, layout)
    if problem:
      raise ValueError(
        f'{transform_name}: leaf {name!r} of shape {shape} {kind.refused}: it {problem}. '
        'Label it as euclidean, or choose other point_axes.'
      )


def _describe(tree: Any) -> dict[str, tuple[int, ...]]:
  return {name: tuple(getattr(leaf, 'shape', ())) for name, leaf in named_leaves(tree)}


def check_same_tree(
  tree: Any, reference: Any, what: str, reference_what: str, name: str, hint: str = ''
) -> None:
  """Raises a ValueError naming the first leaf where ``tree`` and ``reference`` differ.

  Compares the leaf paths and their shapes (a stand-in for the params at ``init``, such as a
  buffer of the same shape, serves as ``reference``). ``hint`` ends the message of a leaf that
  one of them lacks.
  """
  got, expected = _describe(tree), _describe(reference)
  if got == expected and jax.tree.structure(tree) == jax.tree.structure(reference):
    return
  hint = f' {hint}' if hint else ''
  for leaf, shape in expected.items():
    if leaf not in got:
      raise ValueError(f'{name}: {what} have no leaf {leaf!r}, which {reference_what} have.{hint}')
    if got[leaf] != shape:
      raise ValueError(
        f'{name}: leaf {leaf!r} has shape {got[leaf]} in {what} but {shape} in {reference_what}.'
      )
  extra = next(iter(set(got) - set(expected)), None)
  if extra is not None:
    raise ValueError(
      f'{name}: {what} have a leaf {extra!r} that {reference_what} do not have.{hint}'
    )
  raise ValueError(f'{name}: {what} and {reference_what} are different trees.')


# Where a step's leaves at update are not those of init inside a partition.
_RELABELLED = (
  'Inside optax.partition this means the labels moved the leaf to another branch since init: '
  'a callable label function is called on the updates at every update, so an update of another '
  'dtype than its param (a complex or integer gradient) can change its label; '
  'go.grassmann_partition and the aliases label by the params.'
)


def check_update_trees(updates: Any, params: Any, buffers: Any, name: str) -> None:
  """``updates`` and ``params`` must have the leaves, and shapes, of the params at ``init``.

  ``buffers`` is the transform's state tree that has the shape of the params at ``init``.
  """
  check_same_tree(updates, params, 'the updates', 'the params', name)
  check_same_tree(params, buffers, 'the params', 'the params given to init', name, _RELABELLED)
  check_real_updates(updates, name)


def check_radii(params: Any, radii: Any, layouts, name: str) -> None:
  """The per-point radii a state took at ``init`` must fit ``params``, leaf by leaf.

  ``layouts``: the :class:`points.Layout` of each leaf of ``params``. Raises a ValueError naming
  the first leaf that has no radii, or radii of another shape than its points.
  """
  leaves = named_leaves(params)
  if jax.tree.structure(radii) == jax.tree.structure(params):
    found = jax.tree.leaves(radii)
  else:
    got = by_name(jax.tree_util.tree_flatten_with_path(radii)[0], f'{name}: the radii in the state')
    names = unique_names(params, f'{name}: the params, matched to the radii in the state by name')
    found = pick_by_name(
      got,
      names,
      lambda leaf: (
        f'{name}: the params have a leaf {leaf!r} that the params given to init did not have '
        '(the state holds no radius for it). Call init with the params you update.'
      ),
      lambda leaf: (
        f'{name}: the params given to init had a leaf {leaf!r} that these params do not have.'
      ),
    )
  for (leaf, w), layout, radius in zip(leaves, layouts, found, strict=True):
    expected = layout.batch_shape(tuple(np.shape(w)))
    if tuple(np.shape(radius)) != expected:
      raise ValueError(
        f'{name}: leaf {leaf!r} has {math.prod(expected)} points of shape {expected} now, but '
        f'the state holds radii of shape {tuple(np.shape(radius))} from init. Call init with '
        'the params you update.'
      )


def check_state(state: Any, fields: tuple[str, ...], name: str) -> None:
  """Raises a TypeError unless ``state`` has ``fields``: it is not this optimizer's state."""
  missing = [field for field in fields if not hasattr(state, field)]
  if missing:
    raise TypeError(
      f'{name}: the state is a {type(state).__name__} without {missing[0]!r}, not the state '
      f"that {name}'s init returns. Pass the state made by this optimizer's init (a state of "
      'another optimizer, or one restored from a checkpoint without a target, does not fit).'
    )


def static_args_hint(argument: str) -> str:
  """The advice for a callable ``argument`` that ``optax.inject_hyperparams`` called as a
  schedule, with the step count, instead of passing it on."""
  return (
    f'Under optax.inject_hyperparams, name a callable {argument} in static_args (Optax treats '
    'every callable as a schedule), e.g. inject_hyperparams(go.adamg, '
    f"static_args=('{argument}',))."
  )


def check_real_updates(tree: Any, name: str) -> None:
  """Raises a TypeError naming the first leaf of ``tree`` that is not real floating-point."""
  for leaf_name, leaf in named_leaves(tree):
    dtype = _dtype(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
        f'{name}: the update of leaf {leaf_name!r} has dtype {jnp.dtype(dtype).name}; the '
        'per-point norms need real floating-point updates (float32, bfloat16, float64, ...).'
      )


def _dtype(value) -> np.dtype:
  """The dtype of an array or number (``np.result_type`` of a JAX array is deprecated)."""
  return np.dtype(value.dtype) if hasattr(value, 'dtype') else np.result_type(value)


def scheduled(learning_rate, count, name: str):
  """``learning_rate`` at step ``count``: the value of a schedule, or the number itself.

  A schedule's value is checked as a constant rate is (:func:`check_hyperparameters`) where it
  is concrete (an eager ``update``); traced (under ``jit``), its type and shape are.

  Raises:
    TypeError: the schedule returned an array with axes (a rate is one number for every point),
      or something that is not a real number (a string, a bool, a complex number, ``None``).
    ValueError: a concrete value that is NaN or infinite (in float32, where x64 is off).
  """
  if not callable(learning_rate):
    return learning_rate
  value = learning_rate(count)
  returned = f'{name}: the learning_rate schedule returned'
  if np.shape(value) != ():
    raise TypeError(
      f'{returned} an array of shape {np.shape(value)}; a learning rate is one number, the same '
      'for every point. Return a scalar.'
    )
  if isinstance(value, jax.core.Tracer):
    if not _is_real(value.dtype):
      raise TypeError(f'{returned} a value of dtype {value.dtype}; return a real number.')
    return value
  try:
    check_hyperparameters(learning_rate=value)
  except (TypeError, ValueError) as error:
    raise type(error)(f'{returned} {_shown(value)}, not a learning rate: {error}') from None
  return value


def checked_schedule(learning_rate, name: str):
  """``learning_rate``, a schedule wrapped so that each of its values goes through
  :func:`scheduled` (for the Optax transforms of the Euclidean leaves); a number as it is."""
  if not callable(learning_rate):
    return learning_rate
  return lambda count: scheduled(learning_rate, count, name)


def check_mask(mask: Any, name: str) -> None:
  """A mask is a callable or a tree of bools (a string or a number would mask every leaf in)."""
  if callable(mask):
    return
  for leaf in jax.tree.leaves(mask):
    is_bool = isinstance(leaf, bool | np.bool_) or (
      isinstance(leaf, np.ndarray | jax.Array) and leaf.dtype == bool and leaf.shape == ()
    )
    if not is_bool:
      raise TypeError(
        f'{name}: expected a tree of bools (True where the leaf gets decay) or a callable '
        f'params -> such a tree; it has a leaf {leaf!r}.'
      )


def _is_real(dtype) -> bool:
  """A dtype whose values are real numbers: floating-point or integer (not bool or complex)."""
  return jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)


def _concrete(value, name: str = 'value') -> float | None:
  """``value`` as a Python float if it is a concrete real number; ``None`` if it is traced.

  Python numbers, NumPy scalars and 0-d NumPy or JAX arrays are concrete.

  Raises:
    TypeError: a string, a bool, a complex or non-numeric value, or an array with axes (a
      hyper-parameter is one number for every point).
  """
  if isinstance(value, jax.core.Tracer):
    return None
  if isinstance(value, str | bool | np.bool_) or not isinstance(
    value, numbers.Real | np.ndarray | np.generic | jax.Array
  ):
    raise TypeError(f'{name}={value!r}: expected a real number, got {type(value).__name__}.')
  if isinstance(value, numbers.Real) and not isinstance(value, np.generic):
    return float(value)
  dtype, shape = _dtype(value), np.shape(value)
  if shape != ():
    raise TypeError(
      f'{name} is an array of shape {shape}: expected one real number (a scalar), the same for '
      'every point.'
    )
  if not _is_real(dtype):
    raise TypeError(f'{name}={_shown(value)}: expected a real number, got dtype {dtype}.')
  return float(value)


# The smallest normal float32: an eps below it is flushed to zero on CPUs and accelerators, and a
# point whose gradient is zero would then divide 0 by 0.
_TINY = float(np.finfo(np.float32).tiny)

_RULES = {
  'learning_rate': ('finite', math.isfinite),
  'momentum': ('in [0, 1]', lambda v: 0 <= v <= 1),
  'b1': ('in [0, 1)', lambda v: 0 <= v < 1),
  'b2': ('in [0, 1)', lambda v: 0 <= v < 1),
  'eps': (
    f'finite and >= {_TINY:.4g}, the smallest normal float32 (a smaller eps is flushed to 0, '
    'and a point with a zero gradient would divide 0 by 0)',
    lambda v: math.isfinite(v) and v >= _TINY,
  ),
  'grad_clip': ('finite and > 0, or None', lambda v: math.isfinite(v) and v > 0),
  'omega': ('finite and >= 0', lambda v: math.isfinite(v) and v >= 0),
  'weight_decay': ('finite and >= 0, or None', lambda v: math.isfinite(v) and v >= 0),
  'tol': ('finite and >= 0', lambda v: math.isfinite(v) and v >= 0),
}
_RULES['max_norm'] = _RULES['grad_clip']  # grassmann_clip's name for it
# The hyper-parameters for which None means "none" (no clipping, no decay).
_OPTIONAL = ('grad_clip', 'max_norm', 'weight_decay')


def check_hyperparameters(**values) -> None:
  """Raises a TypeError or ValueError for a concrete hyper-parameter outside its range.

  Values that are traced (``optax.inject_hyperparams``) are not checked, nor ``None`` where it
  means "none" (``grad_clip``, ``weight_decay``); a ``learning_rate`` may also be a schedule.
  Outside these ranges the optimizers would not compute SGD-G/Adam-G: a negative ``grad_clip``
  flips the clipped gradient, ``b1 = 1`` divides by zero in the bias correction, a NaN learning
  rate makes every parameter NaN. Unless x64 is enabled, the value rounded to float32 must be in
  range too (:func:`_in_compute_dtype`).

  Raises:
    TypeError: a value that is not one real number (a string, a bool, an array with axes, or
      ``None`` for an argument that needs a number).
    ValueError: a number outside the range of its argument.
  """
  for name, value in values.items():
    if name.endswith('learning_rate') and callable(value):
      continue
    description, valid = _RULES['learning_rate' if name.endswith('learning_rate') else name]
    if value is None:
      if name in _OPTIONAL:
        continue
      hint = ' (0 for none)' if name == 'momentum' else ''
      raise TypeError(f'{name}=None: expected a real number, {description}{hint}.')
    number = _concrete(value, name)
    if number is None:
      continue
    if not valid(number):
      raise ValueError(f'{name}={_shown(value)} is out of range: it must be {description}.')
    rounded = _in_compute_dtype(number)
    if not valid(rounded):
      raise ValueError(
        f'{name}={_shown(value)} is out of range in float32, the dtype that JAX computes in '
        f'without jax_enable_x64: it is {rounded!r} there, and it must be {description}.'
      )


def _shown(value) -> str:
  """``value`` for a message: a 0-d array as its number and dtype (``optax.inject_hyperparams``
  hands the hyper-parameters over as float32 arrays, rounded)."""
  if isinstance(value, np.ndarray | jax.Array) and np.shape(value) == ():
    return f'{value.item()!r} (a {np.dtype(value.dtype).name} array)'
  return repr(value)


def _in_compute_dtype(number: float) -> float:
  """``number`` as the steps compute with it: rounded to float32 unless x64 is enabled.

  A hyper-parameter enters the maths as a weakly typed number, so in float32 where x64 is off:
  ``b1 = 1 − 1e-9`` is 1 there (its bias correction divides by zero) and ``1e39`` is infinite.
  """
  if jax.config.jax_enable_x64:
    return number
  with np.errstate(over='ignore'):
    return float(np.float32(number))


def check_bool(**values) -> None:
  """Raises a TypeError for a flag that is not a bool (``nesterov='False'`` would be true)."""
  for name, value in values.items():
    if not isinstance(value, bool | np.bool_):
      raise TypeError(f'{name}={value!r}: expected True or False.')


# The scalar radii whose per-point products (radius², and sums of squared elements) float32 holds
# to its precision: at 1e17 Adam-G's step is off the sphere by 5e-4, at 1e-18 by 5e-3.
RADIUS_RANGE = (1e-15, 1e15)


def check_radius(radius) -> None:
  """``radius`` is None, ``'init'``, or a positive finite number (a scalar, or a traced one).

  Raises:
    TypeError: a string other than ``'init'``, a bool, or an array with axes.
    ValueError: a number that is not finite and > 0, or outside ``RADIUS_RANGE``.
  """
  if radius is None or (isinstance(radius, str) and radius == 'init'):
    return
  expected = "expected None, 'init' or a positive finite number"
  if isinstance(radius, str | bool) or not (
    isinstance(radius, numbers.Real) or getattr(radius, 'shape', None) == ()
  ):
    shape = getattr(radius, 'shape', None)
    what = f'an array of shape {shape}' if shape is not None else repr(radius)
    raise TypeError(
      f'radius={what}: {expected} (one radius for every point). For a radius per point, '
      "use radius='init': each point keeps its norm at init."
    )
  number = _concrete(radius, 'radius')
  if number is not None and not (math.isfinite(number) and number > 0):
    raise ValueError(f'radius={radius!r} is out of range: it must be finite and > 0.')
  if number is not None and not RADIUS_RANGE[0] <= number <= RADIUS_RANGE[1]:
    raise ValueError(
      f'radius={radius!r} is out of range: it must be in [{RADIUS_RANGE[0]:g}, '
      f'{RADIUS_RANGE[1]:g}]. The steps compute per-point inner products such as ‖w‖² = radius² '
      'in float32, which overflow or lose their precision outside it. Rescale the model (a '
      'scale-invariant weight works at any radius).'
    )


# What keeps each point at its norm at init, as the errors of :func:`check_initial_norms` say.
INIT_RADIUS = "radius='init' keeps each point at its norm at init"
HYPERBALL_RADIUS = 'the hyperball keeps each point at its norm at init'


def check_initial_norms(
  norm, w, leaf: str, name: str, zero_advice: str, keeps: str = INIT_RADIUS
) -> None:
  """The norms that ``radius='init'`` keeps (``norm``, one per point of the leaf ``w`` named
  ``leaf``) must be in ``RADIUS_RANGE``, as a scalar radius must. ``keeps`` opens the errors:
  what keeps the norms (``INIT_RADIUS`` or ``HYPERBALL_RADIUS``).

  Concrete values are checked here. Traced ones (``jax.jit(tx.init)``, as sharded training
  makes its state) are checked when the compiled init runs, by a host callback that raises the
  same error, so that a zero point cannot get a radius of 0 silently.

  Raises:
    ValueError: a non-finite leaf, a point of norm 0 (``zero_advice`` says what to do) or a norm
      out of the range.
  """
  if not jnp.size(norm):
    return  # a stack of zero layers has no points
  # Reduced where the norms live (they may be sharded across processes); only scalars come back.
  finite, low, high = jnp.all(jnp.isfinite(w)), jnp.min(norm), jnp.max(norm)
  check = functools.partial(
    _raise_for_initial_norms, leaf=leaf, name=name, advice=zero_advice, keeps=keeps
  )
  if any(isinstance(x, jax.core.Tracer) for x in (finite, low, high)):
    jax.debug.callback(check, finite, low, high)
  else:
    check(finite, low, high)


def _raise_for_initial_norms(
  finite, low, high, *, leaf: str, name: str, advice: str, keeps: str
) -> None:
  if not bool(finite):
    raise ValueError(
      f'{name}: {keeps}, but leaf {leaf!r} holds a value that is not finite (NaN or inf).'
    )
  low, high = float(low), float(high)
  if not low > 0:
    raise ValueError(
      f'{name}: {keeps}, but leaf {leaf!r} has a point of norm 0 (or so small that its square '
      f'is 0), which has no radius. {advice}'
    )
  if not (RADIUS_RANGE[0] <= low and high <= RADIUS_RANGE[1]):
    raise ValueError(
      f'{name}: {keeps}, but leaf {leaf!r} has '
      f'points of norm {low:g} to {high:g}, outside [{RADIUS_RANGE[0]:g}, {RADIUS_RANGE[1]:g}]: '
      'the steps compute per-point inner products such as ‖w‖² in float32, which overflow or '
      'lose their precision there. Rescale the leaf at init (a scale-invariant weight works at '
      'any radius).'
    )


# Frames of these packages are not where a user's code meets a warning: a warning raised while
# jax traces, or inside an Optax wrapper, is attributed to the first frame outside them.
_LIBRARY_MODULES = (
  'grassmann_optax',
  'optax',
  'jax',
  'jaxlib',
  'flax',
  'chex',
  'functools',
  'contextlib',
)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
  """``warnings.warn``, attributed to the user's line that led to it.

  ``stacklevel`` counts from the caller, so a fixed one names a file of jax (under ``jax.jit``)
  or of Optax (inside a wrapper) as often as the user's. Python 3.12's ``skip_file_prefixes``
  does this; the project supports 3.11.
  """
  frame, level = sys._getframe(1), 2
  while frame is not None and frame.f_globals.get('__name__', '').partition('.')[0] in (
    _LIBRARY_MODULES
  ):
    frame, level = frame.f_back, level + 1
  warnings.warn(message, category, stacklevel=level if frame is not None else 2)
