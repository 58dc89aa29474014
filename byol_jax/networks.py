"""Haiku networks of BYOL: ResNet encoders, MLP heads, a tiny test encoder.

All modules are meant to run inside `hk.transform_with_state`. Images arrive NHWC in [0, 1] and
are normalised here with the ImageNet mean/std, as the reference does.

Layout facts for converting the weights elsewhere (see README "Checkpoints and resume"):
convolution kernels are HWIO, activations NHWC, padding is TF/Haiku SAME (for stride 2 the extra
pixel of padding goes on the bottom/right, unlike PyTorch's symmetric padding).
"""

from typing import Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Blocks per stage and whether the blocks are bottlenecks.
RESNET_DEPTHS = {
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
    152: ((3, 8, 36, 3), True),
    200: ((3, 24, 36, 3), True),
}
ENCODERS = tuple(f'resnet{d}' for d in RESNET_DEPTHS) + ('tiny',)


def normalize_images(images: jax.Array) -> jax.Array:
  mean = jnp.asarray(IMAGENET_MEAN, images.dtype)
  std = jnp.asarray(IMAGENET_STD, images.dtype)
  return (images - mean) / std


def _same_padding(size: int, kernel: int, stride: int):
  """TF SAME padding (low, high) along one spatial axis."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def _conv_im2col(x, w, stride):
  """SAME convolution as gathered taps + one matmul.

  Mathematically the convolution itself; used only when the kernel window is larger than the
  feature map, where XLA:CPU rewrites the convolution into a very slow naive loop (see
  README "Performance"). Taps that can only read padding are dropped: they add exact zeros.
  """
  kh, kw, cin, cout = w.shape
  _, h, wd, _ = x.shape
  (pt, pb), (pl, pr) = _same_padding(h, kh, stride), _same_padding(wd, kw, stride)
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  oh, ow = -(-h // stride), -(-wd // stride)
  patches, taps = [], []
  for i in range(kh):
    rows = np.arange(oh) * stride + i - pt  # Unpadded row each output reads at tap i.
    if not np.any((rows >= 0) & (rows < h)):
      continue
    for j in range(kw):
      cols = np.arange(ow) * stride + j - pl
      if not np.any((cols >= 0) & (cols < wd)):
        continue
      patches.append(xp[:, i:i + (oh - 1) * stride + 1:stride,
                        j:j + (ow - 1) * stride + 1:stride, :])
      taps.append(w[i, j])
  patches = jnp.concatenate(patches, axis=-1)  # [N, oh, ow, taps * cin]
  kernel = jnp.concatenate(taps, axis=0)  # [taps * cin, cout]
  return jnp.einsum('nhwk,kc->nhwc', patches, kernel)


def _use_im2col(height: int, width: int, kernel: int, stride: int) -> bool:
  """True where XLA:CPU would emit a naive loop for the conv or one of its gradients.

  That is when the window is larger than the input map or than the output map: the second case
  is a strided conv producing a tiny map (e.g. 4x4 -> 2x2), whose input gradient is a
  convolution of the tiny output gradient with the window.
  """
  if kernel == 1:
    return False
  out_h, out_w = -(-height // stride), -(-width // stride)
  return kernel > min(height, width, out_h, out_w)


class Conv2D(hk.Module):
  """SAME conv without bias, kernel HWIO named `w` (same names as `hk.Conv2D`)."""

  def __init__(self, channels: int, kernel: int, stride: int = 1, name: Optional[str] = None):
    super().__init__(name=name)
    self.channels, self.kernel, self.stride = channels, kernel, stride

  def __call__(self, x):
    cin = x.shape[-1]
    w_init = hk.initializers.VarianceScaling(1.0, 'fan_in', 'truncated_normal')
    w = hk.get_parameter('w', (self.kernel, self.kernel, cin, self.channels), jnp.float32,
                         init=w_init)
    w = w.astype(x.dtype)
    if _use_im2col(x.shape[1], x.shape[2], self.kernel, self.stride):
      return _conv_im2col(x, w, self.stride)
    return jax.lax.conv_general_dilated(
        x, w, (self.stride, self.stride), 'SAME',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


class BatchNorm(hk.BatchNorm):
  """BatchNorm with the reference's settings; statistics in float32 whatever the input dtype."""

  def __init__(self, decay: float, eps: float, cross_replica_axis: Optional[str],
               name: Optional[str] = None):
    super().__init__(create_scale=True, create_offset=True, decay_rate=decay, eps=eps,
                     scale_init=jnp.ones, cross_replica_axis=cross_replica_axis, name=name)

  def __call__(self, x, is_training):
    dtype = x.dtype
    return super().__call__(x.astype(jnp.float32), is_training).astype(dtype)


class _Block(hk.Module):
  """Residual block, v1 (post-activation) or v2 (pre-activation); stride on the 3x3 conv."""

  def __init__(self, channels, stride, bottleneck, use_projection, v2, bn, name=None):
    super().__init__(name=name)
    self.channels, self.stride, self.bottleneck = channels, stride, bottleneck
    self.use_projection, self.v2, self.bn = use_projection, v2, bn

  def __call__(self, x, is_training):
    c = self.channels
    if self.bottleneck:
      convs = [(c // 4, 1, 1), (c // 4, 3, self.stride), (c, 1, 1)]
    else:
      convs = [(c, 3, self.stride), (c, 3, 1)]
    shortcut = x
    if self.v2:
      x = jax.nn.relu(self.bn(name='preact_bn')(x, is_training))
      if self.use_projection:
        shortcut = Conv2D(c, 1, self.stride, name='shortcut_conv')(x)
      for i, (ch, k, s) in enumerate(convs):
        if i:
          x = jax.nn.relu(self.bn(name=f'bn_{i - 1}')(x, is_training))
        x = Conv2D(ch, k, s, name=f'conv_{i}')(x)
      return x + shortcut
    if self.use_projection:
      shortcut = Conv2D(c, 1, self.stride, name='shortcut_conv')(x)
      shortcut = self.bn(name='shortcut_bn')(shortcut, is_training)
    for i, (ch, k, s) in enumerate(convs):
      x = Conv2D(ch, k, s, name=f'conv_{i}')(x)
      x = self.bn(name=f'bn_{i}')(x, is_training)  # Scale initialised to 1, as the reference.
      if i < len(convs) - 1:
        x = jax.nn.relu(x)
    return jax.nn.relu(x + shortcut)


class ResNet(hk.Module):
  """ResNet-18..200 encoder returning globally pooled features (no classifier)."""

  def __init__(self, depth: int, width: float = 1.0, v2: bool = False, cifar_stem: bool = False,
               bn_decay: float = 0.9, bn_eps: float = 1e-5,
               cross_replica_axis: Optional[str] = None, name: Optional[str] = None):
    super().__init__(name=name)
    if depth not in RESNET_DEPTHS:
      raise ValueError(f'Unknown ResNet depth {depth}: choose from {sorted(RESNET_DEPTHS)}.')
    self.blocks, self.bottleneck = RESNET_DEPTHS[depth]
    self.width, self.v2, self.cifar_stem = width, v2, cifar_stem
    self.bn = lambda name: BatchNorm(bn_decay, bn_eps, cross_replica_axis, name=name)

  def __call__(self, images, is_training):
    x = normalize_images(images)
    stem = max(1, int(64 * self.width))
    if self.cifar_stem:
      x = Conv2D(stem, 3, 1, name='stem_conv')(x)
    else:
      x = Conv2D(stem, 7, 2, name='stem_conv')(x)
    if not self.v2:
      x = jax.nn.relu(self.bn('stem_bn')(x, is_training))
    if not self.cifar_stem:
      x = hk.max_pool(x, window_shape=(1, 3, 3, 1), strides=(1, 2, 2, 1), padding='SAME')
    expansion = 4 if self.bottleneck else 1
    for stage, num_blocks in enumerate(self.blocks):
      channels = max(1, int(64 * self.width * 2**stage)) * expansion
      for b in range(num_blocks):
        stride = 2 if (b == 0 and stage > 0) else 1
        x = _Block(channels, stride, self.bottleneck,
                   use_projection=(b == 0 and (stage > 0 or self.bottleneck
                                               or channels != stem)),
                   v2=self.v2, bn=self.bn, name=f'stage{stage}_block{b}')(x, is_training)
    if self.v2:
      x = jax.nn.relu(self.bn('final_bn')(x, is_training))
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


class TinyEncoder(hk.Module):
  """Two convs + BN for fast tests; same interface as ResNet."""

  def __init__(self, channels: int = 8, bn_decay: float = 0.9, bn_eps: float = 1e-5,
               cross_replica_axis: Optional[str] = None, name: Optional[str] = None):
    super().__init__(name=name)
    self.channels = channels
    self.bn = lambda name: BatchNorm(bn_decay, bn_eps, cross_replica_axis, name=name)

  def __call__(self, images, is_training):
    x = normalize_images(images)
    x = jax.nn.relu(self.bn('bn_0')(Conv2D(self.channels, 3, 1, name='conv_0')(x), is_training))
    x = jax.nn.relu(self.bn('bn_1')(Conv2D(2 * self.channels, 3, 2, name='conv_1')(x),
                                    is_training))
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


class MLP(hk.Module):
  """Projector / predictor: Linear -> BN -> ReLU -> Linear (no BN on the output)."""

  def __init__(self, hidden_size: int, output_size: int, bn_decay: float = 0.9,
               bn_eps: float = 1e-5, cross_replica_axis: Optional[str] = None,
               name: Optional[str] = None):
    super().__init__(name=name)
    self.hidden_size, self.output_size = hidden_size, output_size
    self.bn = BatchNorm(bn_decay, bn_eps, cross_replica_axis, name='bn')

  def __call__(self, x, is_training):
    x = hk.Linear(self.hidden_size, name='linear_0')(x)
    x = jax.nn.relu(self.bn(x, is_training))
    return hk.Linear(self.output_size, name='linear_1')(x)


def make_encoder(model_config, cross_replica_axis: Optional[str] = None, name='encoder'):
  """Builds the encoder named by `model_config.encoder` (inside a Haiku transform)."""
  kind = model_config.encoder
  bn = dict(bn_decay=model_config.bn_decay, bn_eps=model_config.bn_eps,
            cross_replica_axis=cross_replica_axis)
  if kind == 'tiny':
    return TinyEncoder(max(1, int(8 * model_config.width)), name=name, **bn)
  if kind.startswith('resnet') and kind[len('resnet'):].isdigit():
    return ResNet(int(kind[len('resnet'):]), width=model_config.width,
                  v2=model_config.resnet_v2, cifar_stem=model_config.cifar_stem,
                  name=name, **bn)
  raise ValueError(f'Unknown encoder {kind!r}: choose from {", ".join(ENCODERS)}.')


def compute_dtype(model_config):
  names = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
  if model_config.compute_dtype not in names:
    raise ValueError(f'Unknown model.compute_dtype {model_config.compute_dtype!r}: '
                     f'choose float32 or bfloat16.')
  return names[model_config.compute_dtype]


def param_count(params) -> int:
  return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))


def encoder_feature_size(model_config, image_size: int = 32) -> int:
  """Width of the pooled features (e.g. 2048 for ResNet-50 1x), by shape inference."""
  def fn(x):
    return make_encoder(model_config)(x, is_training=True)
  f = hk.transform_with_state(fn)
  x = jax.ShapeDtypeStruct((2, image_size, image_size, 3), jnp.float32)
  params, state = jax.eval_shape(f.init, jax.random.PRNGKey(0), x)
  out, _ = jax.eval_shape(lambda p, s, x: f.apply(p, s, None, x), params, state, x)
  return int(out.shape[-1])

