"""grassmann_optax: SGD-G and Adam-G on the Grassmann manifold as composable Optax transforms.

Cho & Lee, "Riemannian approach to batch normalization", NeurIPS 2017 (arXiv:1709.09603).
"""

# The optional CPU kernel's switches, as a namespace of their own (as optax.contrib).
from grassmann_optax import cpu_kernel as cpu_kernel
from grassmann_optax._src.alias import adamg, euclidean_sgd, grassmann_partition, sgdg
from grassmann_optax._src.initializers import unit_initializer
from grassmann_optax._src.labels import (
  EUCLIDEAN,
  GRASSMANN,
  ScaleInvariance,
  find_scale_invariant,
  grassmann_labels,
  is_undercomplete_conv,
)
from grassmann_optax._src.orthogonality import orthogonality_penalty
from grassmann_optax._src.steps import (
  Basis,
  GrassmannAdamState,
  GrassmannSgdState,
  grassmann_adam,
  grassmann_sgd,
)
from grassmann_optax._src.transforms import (
  ExpMapUpdateState,
  add_orthogonality_gradient,
  exp_map_update,
  grassmann_clip,
  project_params,
  project_to_tangent,
)

__version__ = '0.1.0'

__all__ = (
  'Basis',
  'EUCLIDEAN',
  'ExpMapUpdateState',
  'GRASSMANN',
  'GrassmannAdamState',
  'GrassmannSgdState',
  'ScaleInvariance',
  'add_orthogonality_gradient',
  'adamg',
  'cpu_kernel',
  'euclidean_sgd',
  'exp_map_update',
  'find_scale_invariant',
  'grassmann_adam',
  'grassmann_clip',
  'grassmann_labels',
  'grassmann_partition',
  'grassmann_sgd',
  'is_undercomplete_conv',
  'orthogonality_penalty',
  'project_params',
  'project_to_tangent',
  'sgdg',
  'unit_initializer',
)
