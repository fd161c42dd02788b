"""grassmann_optax: SGD-G and Adam-G on the Grassmann manifold as composable Optax transforms.

Cho & Lee, "Riemannian approach to batch normalization", NeurIPS 2017 (arXiv:1709.09603). Also
the Hyperball optimizers AdamH and MuonH (Wen et al., 2025), with a geodesic variant.
"""

# The optional CPU kernel's switches, as a namespace of their own (as optax.contrib).
from grassmann_optax import cpu_kernel as cpu_kernel
from grassmann_optax._src.alias import adamg, euclidean_sgd, grassmann_partition, sgdg
from grassmann_optax._src.hyperball import (
  HyperballAdamState,
  HyperballMuonState,
  HyperballStepState,
  hyperball_adam,
  hyperball_muon,
  hyperball_step,
)
from grassmann_optax._src.hyperball_alias import adamh, muonh
from grassmann_optax._src.initializers import unit_initializer
from grassmann_optax._src.labels import (
  EUCLIDEAN,
  GRASSMANN,
  ScaleInvariance,
  find_scale_invariant,
  grassmann_labels,
  is_undercomplete_conv,
)
from grassmann_optax._src.matrix_sign import scale_by_matrix_sign
from grassmann_optax._src.orthogonality import orthogonality_penalty
from grassmann_optax._src.steps import (
  Basis,
  GrassmannAdamState,
  GrassmannSgdState,
  grassmann_adam,
  grassmann_sgd,
)
from grassmann_optax._src.transformer_labels import transformer_labels, transformer_point_axes
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
  'HyperballAdamState',
  'HyperballMuonState',
  'HyperballStepState',
  'ScaleInvariance',
  'add_orthogonality_gradient',
  'adamg',
  'adamh',
  'cpu_kernel',
  'euclidean_sgd',
  'exp_map_update',
  'find_scale_invariant',
  'grassmann_adam',
  'grassmann_clip',
  'grassmann_labels',
  'grassmann_partition',
  'grassmann_sgd',
  'hyperball_adam',
  'hyperball_muon',
  'hyperball_step',
  'is_undercomplete_conv',
  'muonh',
  'orthogonality_penalty',
  'project_params',
  'project_to_tangent',
  'scale_by_matrix_sign',
  'sgdg',
  'transformer_labels',
  'transformer_point_axes',
  'unit_initializer',
)
