"""grassmann_optax: SGD-G and Adam-G on the Grassmann manifold as composable Optax transforms.

Cho & Lee, "Riemannian approach to batch normalization", NeurIPS 2017 (arXiv:1709.09603).
"""

# The optional CPU kernel's switches, as a namespace of their own (as optax.contrib).
from grassmann_optax import cpu_kernel as cpu_kernel
from grassmann_optax._src.alias import adamg, euclidean_sgd, grassmann_partition, sgdg
from grassmann_optax._src.fused import (
  AdamgManifoldState,
  SgdgManifoldState,
  adamg_manifold_update,
  sgdg_manifold_update,
)
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
from grassmann_optax._src.transforms import (
  ExpMapUpdateState,
  GrassmannAdamMomentsState,
  GrassmannMomentumState,
  add_orthogonality_gradient,
  exp_map_update,
  grassmann_adam_moments,
  grassmann_clip,
  grassmann_momentum,
  project_to_tangent,
)

__version__ = '0.1.0'

__all__ = (
  'AdamgManifoldState',
  'EUCLIDEAN',
  'ExpMapUpdateState',
  'GRASSMANN',
  'GrassmannAdamMomentsState',
  'GrassmannMomentumState',
  'ScaleInvariance',
  'SgdgManifoldState',
  'add_orthogonality_gradient',
  'adamg',
  'adamg_manifold_update',
  'euclidean_sgd',
  'exp_map_update',
  'find_scale_invariant',
  'grassmann_adam_moments',
  'grassmann_clip',
  'grassmann_labels',
  'grassmann_momentum',
  'grassmann_partition',
  'is_undercomplete_conv',
  'orthogonality_penalty',
  'project_to_tangent',
  'sgdg',
  'sgdg_manifold_update',
  'unit_initializer',
)
