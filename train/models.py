"""Wide ResNet and VGG with batch normalisation, as trained in Cho & Lee (2017).

The architectures and parameter names follow the TF code the paper's numbers come from: 3x3
convolutions are named ``conv*``, the 1x1 shortcut ``projection``, the dense layers ``fc*``. Which
kernels go on the manifold is decided by shape, not by name: the paper's rule, as
:func:`grassmann_optax.grassmann_labels` applies it, takes every conv kernel (4 axes) whose fan-in
exceeds its number of outputs. That is every 3x3 convolution whose ``9 * c_in`` exceeds ``c_out``,
never a 1x1 shortcut (each widens: ``c_in < c_out``) nor a dense layer (2 axes).

The models know nothing of the optimizer; the training program re-initialises manifold kernels.

Reference: Cho & Lee, "Riemannian approach to batch normalization", NeurIPS 2017,
arXiv:1709.09603.
"""

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

# TF `variance_scaling_initializer()` (factor 2, fan-in, truncated normal), as in the TF code.
kernel_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'truncated_normal')

VGG_CONVS_PER_GROUP = {
  'vgg11': (1, 1, 2, 2, 2),
  'vgg13': (2, 2, 2, 2, 2),
  'vgg16': (2, 2, 3, 3, 3),
  'vgg19': (2, 2, 4, 4, 4),
}
VGG_WIDTHS = (64, 128, 256, 512, 512)  # the paper's widths, at width_scale=1


def _batch_norm(train: bool, axis_name: str | None, dtype: Any, **kwargs) -> functools.partial:
  # TF batch_norm.py: population statistics pop <- 0.99 pop + 0.01 batch, eps 1e-5.
  return functools.partial(
    nn.BatchNorm,
    use_running_average=not train,
    momentum=0.99,
    epsilon=1e-5,
    axis_name=axis_name,
    dtype=dtype,
    **kwargs,
  )


class WideResNetBlock(nn.Module):
  """Pre-activation block; the shortcut projects the pre-activated input, as in the TF code."""

  features: int
  strides: int
  keep_prob: float | None
  bn_axis_name: str | None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=kernel_init, dtype=self.dtype)
    norm = _batch_norm(train, self.bn_axis_name, self.dtype)
    strides = (self.strides, self.strides)

    o1 = nn.relu(norm(name='bn1')(x))
    y = conv(self.features, (3, 3), strides, name='conv1')(o1)
    o2 = nn.relu(norm(name='bn2')(y))
    if self.keep_prob is not None:
      o2 = nn.Dropout(rate=1.0 - self.keep_prob, deterministic=not train)(o2)
    z = conv(self.features, (3, 3), name='conv2')(o2)

    if x.shape[-1] == self.features and self.strides == 1:
      shortcut = x
    else:
      shortcut = conv(self.features, (1, 1), strides, name='projection')(o1)
    return z + shortcut


class WideResNet(nn.Module):
  """WRN-depth-k (Zagoruyko & Komodakis) with widths 16k, 32k, 64k."""

  depth: int
  widen_factor: int
  num_classes: int
  keep_prob: float | None = None
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32

  def __post_init__(self):
    # Fail at construction, not deep inside init, so a bad flag is reported before any tracing.
    if self.depth < 10 or (self.depth - 4) % 6:
      raise ValueError(f'depth must be 6N+4 (10, 16, 22, 28, 40, ...); got {self.depth}')
    super().__post_init__()

  @nn.compact
  def __call__(self, x, *, train: bool):
    blocks_per_group = (self.depth - 4) // 6
    widths = [16 * self.widen_factor, 32 * self.widen_factor, 64 * self.widen_factor]

    x = nn.Conv(
      16, (3, 3), use_bias=False, kernel_init=kernel_init, dtype=self.dtype, name='conv0'
    )(x)
    for group, width in enumerate(widths, start=1):
      for block in range(blocks_per_group):
        x = WideResNetBlock(
          features=width,
          strides=2 if group > 1 and block == 0 else 1,
          keep_prob=self.keep_prob,
          bn_axis_name=self.bn_axis_name,
          dtype=self.dtype,
          name=f'group{group}_block{block}',
        )(x, train=train)

    x = nn.relu(_batch_norm(train, self.bn_axis_name, self.dtype)(name='bn_final')(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, kernel_init=kernel_init, dtype=self.dtype, name='fc')(x)


class VGGGroup(nn.Module):
  """Convs of one resolution, each followed by a shift-only BN (no gamma, as in TF vgg.py)."""

  features: int
  num_convs: int
  keep_prob: float | None
  bn_axis_name: str | None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    norm = _batch_norm(train, self.bn_axis_name, self.dtype, use_scale=False)
    for i in range(self.num_convs):
      x = nn.Conv(
        self.features,
        (3, 3),
        use_bias=False,
        kernel_init=kernel_init,
        dtype=self.dtype,
        name=f'conv{i}',
      )(x)
      x = nn.relu(norm(name=f'bn{i}')(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2), padding='SAME')
    if self.keep_prob is not None:
      x = nn.Dropout(rate=1.0 - self.keep_prob, deterministic=not train)(x)
    return x


def vgg_widths(width_scale: float) -> tuple[int, ...]:
  """The channel widths of the five VGG groups: the paper's times ``width_scale``, rounded."""
  return tuple(max(1, round(width * width_scale)) for width in VGG_WIDTHS)


class VGG(nn.Module):
  """VGG-11/13/16/19 with BN after every conv and hidden fc layer.

  ``width_scale`` multiplies every channel width (64 ... 512 at 1, the paper's); the two hidden
  fc layers are as wide as the last group.
  """

  variant: str
  num_classes: int
  width_scale: float = 1.0
  keep_prob: float | None = None
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32

  def __post_init__(self):
    if self.variant not in VGG_CONVS_PER_GROUP:
      raise ValueError(f'variant must be one of {tuple(VGG_CONVS_PER_GROUP)}; got {self.variant!r}')
    super().__post_init__()

  @nn.compact
  def __call__(self, x, *, train: bool):
    widths = vgg_widths(self.width_scale)
    for group, (width, num_convs) in enumerate(
      zip(widths, VGG_CONVS_PER_GROUP[self.variant], strict=True)
    ):
      x = VGGGroup(
        features=width,
        num_convs=num_convs,
        keep_prob=self.keep_prob,
        bn_axis_name=self.bn_axis_name,
        dtype=self.dtype,
        name=f'group{group}',
      )(x, train=train)

    # Five SAME poolings leave 1x1 for 32x32 and 8x8 inputs, where the mean is TF's flatten; for
    # larger inputs it keeps fc0 at the last group's width.
    x = jnp.mean(x, axis=(1, 2))
    norm = _batch_norm(train, self.bn_axis_name, self.dtype, use_scale=False)
    dense = functools.partial(nn.Dense, kernel_init=kernel_init, dtype=self.dtype)
    for i in range(2):
      x = dense(widths[-1], use_bias=False, name=f'fc{i}')(x)
      x = nn.relu(norm(name=f'fc{i}_bn')(x))
    return dense(self.num_classes, name='fc2')(x)


def _wide_resnet(*, width_scale: float, **settings) -> WideResNet:
  del width_scale  # a wide ResNet's width is --widen_factor
  return WideResNet(**settings)


def _vgg(variant: str, *, depth: int, widen_factor: int, **settings) -> VGG:
  del depth, widen_factor  # a VGG's depth is its variant, its width --width_scale
  return VGG(variant=variant, **settings)


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  """One ``--model``: how to build it, and its exceptions to the dataset's recipe.

  Attributes:
    build: ``(*, num_classes, depth, widen_factor, width_scale, keep_prob, bn_axis_name)`` to the
      Flax module; each model uses the settings that apply to it.
    recipe: settings that replace the dataset's recipe for this model (an explicit flag still
      wins).
  """

  build: Callable[..., nn.Module]
  recipe: Mapping[str, Any] = dataclasses.field(default_factory=dict)


MODELS = {
  'resnet': ModelEntry(_wide_resnet),
  # The paper's VGG command passes no --keep_prob: no dropout layer.
  **{
    variant: ModelEntry(functools.partial(_vgg, variant), recipe={'keep_prob': None})
    for variant in VGG_CONVS_PER_GROUP
  },
}


def create_model(
  name: str,
  *,
  num_classes: int,
  depth: int = 10,
  widen_factor: int = 1,
  width_scale: float = 1.0,
  keep_prob: float | None = None,
  bn_axis_name: str | None = None,
) -> nn.Module:
  """Returns the model the TF ``--model`` flag names, as its entry in ``MODELS`` builds it.

  ``depth``/``widen_factor`` apply to resnet only, ``width_scale`` to VGG only.
  """
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r}; valid names: {", ".join(MODELS)}')
  return MODELS[name].build(
    num_classes=num_classes,
    depth=depth,
    widen_factor=widen_factor,
    width_scale=width_scale,
    keep_prob=keep_prob,
    bn_axis_name=bn_axis_name,
  )
