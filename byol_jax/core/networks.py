"""Haiku networks of BYOL: ResNet encoders, MLP heads, a tiny test encoder.

All modules are meant to run inside `hk.transform_with_state`. Images arrive NHWC in [0, 1] and
are normalised here with the ImageNet mean/std, as the reference does.

Layout facts for converting the weights elsewhere (see README "Checkpoints and resume"):
convolution kernels are HWIO, activations NHWC, padding is TF/Haiku SAME (for stride 2 the extra
pixel of padding goes on the bottom/right, unlike PyTorch's symmetric padding).
"""

import functools
from typing import Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# depth -> (blocks per group, channels per group, bottleneck), as the reference's ResNet classes
# (channels at width 1; a bottleneck block's inner convs have a quarter of them).
RESNET_DEPTHS = {
    18: ((2, 2, 2, 2), (64, 128, 256, 512), False),
    34: ((3, 4, 6, 3), (64, 128, 256, 512), False),
    50: ((3, 4, 6, 3), (256, 512, 1024, 2048), True),
    101: ((3, 4, 23, 3), (256, 512, 1024, 2048), True),
    152: ((3, 8, 36, 3), (256, 512, 1024, 2048), True),
    200: ((3, 24, 36, 3), (256, 512, 1024, 2048), True),
}
# The reference's TinyResNet (its network for local runs and tests): one basic block per group,
# 8 channels everywhere, the full 64-channel 7x7 stem.
TINY_RESNET = ((1, 1, 1, 1), (8, 8, 8, 8), False)
ENCODERS = tuple(f'resnet{d}' for d in RESNET_DEPTHS) + ('tiny_resnet', 'tiny')


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
  """SAME conv without bias, kernel HWIO named `w`: `hk.Conv2D`'s names and initialisation.

  The kernel starts as `hk.Conv2D`'s default, as in the reference: a normal truncated at two
  standard deviations with stddev 1/sqrt(fan_in) and no correction for the truncation (the
  realised std is 0.88/sqrt(fan_in); VarianceScaling would be 1.137x wider).
  """

  def __init__(self, channels: int, kernel: int, stride: int = 1, name: Optional[str] = None):
    super().__init__(name=name)
    self.channels, self.kernel, self.stride = channels, kernel, stride

  def __call__(self, x):
    cin = x.shape[-1]
    w_init = hk.initializers.TruncatedNormal(stddev=1. / np.sqrt(self.kernel * self.kernel * cin))
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
               zero_scale: bool = False, name: Optional[str] = None):
    super().__init__(create_scale=True, create_offset=True, decay_rate=decay, eps=eps,
                     scale_init=jnp.zeros if zero_scale else jnp.ones,
                     cross_replica_axis=cross_replica_axis, name=name)

  def __call__(self, x, is_training):
    dtype = x.dtype
    return super().__call__(x.astype(jnp.float32), is_training).astype(dtype)


class _Block(hk.Module):
  """Residual block, v1 (post-activation) or v2 (pre-activation); stride on the 3x3 conv.

  Module names and creation order follow Haiku's BlockV1 / BlockV2, which the reference uses,
  so that the same key gives the same initial weights and the reference's checkpoints map
  onto this tree by name (reference_checkpoint.py).
  """

  def __init__(self, channels, stride, *, use_projection, bottleneck, v2, bn, zero_init_last_bn,
               name=None):
    super().__init__(name=name)
    self.channels, self.stride, self.bottleneck = channels, stride, bottleneck
    self.use_projection, self.v2, self.bn = use_projection, v2, bn
    self.zero_init_last_bn = zero_init_last_bn

  def __call__(self, x, is_training):
    c = self.channels
    if self.bottleneck:
      convs = [(c // 4, 1, 1), (c // 4, 3, self.stride), (c, 1, 1)]
    else:
      convs = [(c, 3, self.stride), (c, 3, 1)]
    shortcut = x
    if self.v2:
      for i, (ch, k, s) in enumerate(convs):
        x = jax.nn.relu(self.bn(f'batchnorm_{i}')(x, is_training))
        if i == 0 and self.use_projection:
          shortcut = Conv2D(c, 1, self.stride, name='shortcut_conv')(x)
        x = Conv2D(ch, k, s, name=f'conv_{i}')(x)
      return x + shortcut
    if self.use_projection:
      shortcut = Conv2D(c, 1, self.stride, name='shortcut_conv')(x)
      shortcut = self.bn('shortcut_batchnorm')(shortcut, is_training)
    for i, (ch, k, s) in enumerate(convs):
      last = i == len(convs) - 1
      x = Conv2D(ch, k, s, name=f'conv_{i}')(x)
      # Haiku's BlockV1 (the reference code) starts the last BN of a bottleneck at scale 0
      # (Goyal et al.); the paper's numbers used 1 (reference README). model.zero_init_last_bn.
      zero = last and self.bottleneck and self.zero_init_last_bn
      x = self.bn(f'batchnorm_{i}', zero_scale=zero)(x, is_training)
      if not last:
        x = jax.nn.relu(x)
    return jax.nn.relu(x + shortcut)


class _BlockGroup(hk.Module):
  """The blocks of one stage (Haiku's BlockGroup): the first strides and projects."""

  def __init__(self, channels, num_blocks, stride, make_block, name=None):
    super().__init__(name=name)
    self.channels, self.num_blocks, self.stride = channels, num_blocks, stride
    self.make_block = make_block

  def __call__(self, x, is_training):
    for b in range(self.num_blocks):
      # The reference projects the shortcut of every group's first block, stage 0 included
      # (use_projection=(True,) * 4), even where the shapes would allow an identity.
      x = self.make_block(self.channels, self.stride if b == 0 else 1,
                          use_projection=b == 0, name=f'block_{b}')(x, is_training)
    return x


class ResNet(hk.Module):
  """ResNet encoder returning globally pooled features (no classifier), the reference's torso.

  `blocks`, `channels` (at width 1, per group) and `bottleneck` describe the architecture
  (RESNET_DEPTHS, TINY_RESNET). Module names mirror the reference's (`initial_conv`,
  `initial_batchnorm`, `block_group_{g}/block_{b}/conv_{i}`, `batchnorm_{i}`, `shortcut_conv`,
  `shortcut_batchnorm`, `final_batchnorm`).
  """

  def __init__(self, blocks, channels, bottleneck, width: float = 1.0, v2: bool = False,
               cifar_stem: bool = False, zero_init_last_bn: bool = True,
               bn_decay: float = 0.9, bn_eps: float = 1e-5,
               cross_replica_axis: Optional[str] = None, name: Optional[str] = None):
    super().__init__(name=name)
    self.blocks, self.channels, self.bottleneck = blocks, channels, bottleneck
    self.width, self.v2, self.cifar_stem = width, v2, cifar_stem
    self.zero_init_last_bn = zero_init_last_bn
    self.bn = lambda name, zero_scale=False: BatchNorm(
        bn_decay, bn_eps, cross_replica_axis, zero_scale=zero_scale, name=name)

  def __call__(self, images, is_training):
    x = normalize_images(images)
    stem = max(1, int(64 * self.width))
    if self.cifar_stem:  # A departure for 32-64 px images; the reference has only the 7x7.
      x = Conv2D(stem, 3, 1, name='initial_conv')(x)
    else:
      x = Conv2D(stem, 7, 2, name='initial_conv')(x)
    if not self.v2:
      x = jax.nn.relu(self.bn('initial_batchnorm')(x, is_training))
    if not self.cifar_stem:
      x = hk.max_pool(x, window_shape=(1, 3, 3, 1), strides=(1, 2, 2, 1), padding='SAME')
    expansion = 4 if self.bottleneck else 1
    # A plain function, not a method: a module built inside a method of this module would be
    # named after the method (`encoder/~_block/...`).
    make_block = functools.partial(_Block, bottleneck=self.bottleneck, v2=self.v2, bn=self.bn,
                                   zero_init_last_bn=self.zero_init_last_bn)
    for group, (num_blocks, channels) in enumerate(zip(self.blocks, self.channels)):
      channels = max(1, int(channels // expansion * self.width)) * expansion
      x = _BlockGroup(channels, num_blocks, 1 if group == 0 else 2, make_block,
                      name=f'block_group_{group}')(x, is_training)
    if self.v2:
      x = jax.nn.relu(self.bn('final_batchnorm')(x, is_training))
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
  """Projector / predictor: Linear -> BN -> ReLU -> Linear without bias (no BN on the output).

  As the reference: `linear` (with bias), `batch_norm`, `linear_1` (`with_bias=False`), Haiku's
  default Linear initialisation (truncated normal, stddev 1/sqrt(fan_in)).
  """

  def __init__(self, hidden_size: int, output_size: int, bn_decay: float = 0.9,
               bn_eps: float = 1e-5, cross_replica_axis: Optional[str] = None,
               name: Optional[str] = None):
    super().__init__(name=name)
    self.hidden_size, self.output_size = hidden_size, output_size
    self.bn_args = (bn_decay, bn_eps, cross_replica_axis)

  def __call__(self, x, is_training):
    x = hk.Linear(self.hidden_size, name='linear')(x)
    x = jax.nn.relu(BatchNorm(*self.bn_args, name='batch_norm')(x, is_training))
    return hk.Linear(self.output_size, with_bias=False, name='linear_1')(x)


def make_encoder(model_config, cross_replica_axis: Optional[str] = None, name='encoder'):
  """Builds the encoder named by `model_config.encoder` (inside a Haiku transform).

  The one place an encoder is built: pretraining, evaluation, export and feature-size
  inference all come here.
  """
  kind = model_config.encoder
  bn = dict(bn_decay=model_config.bn_decay, bn_eps=model_config.bn_eps,
            cross_replica_axis=cross_replica_axis)
  if kind == 'tiny':
    return TinyEncoder(max(1, int(8 * model_config.width)), name=name, **bn)
  if kind == 'tiny_resnet':
    architecture = TINY_RESNET
  elif kind.startswith('resnet') and kind[len('resnet'):].isdigit():
    depth = int(kind[len('resnet'):])
    if depth not in RESNET_DEPTHS:
      raise ValueError(f'Unknown ResNet depth {depth}: choose from {sorted(RESNET_DEPTHS)}.')
    architecture = RESNET_DEPTHS[depth]
  else:
    raise ValueError(f'Unknown encoder {kind!r}: choose from {", ".join(ENCODERS)}.')
  return ResNet(*architecture, width=model_config.width, v2=model_config.resnet_v2,
                cifar_stem=model_config.cifar_stem,
                zero_init_last_bn=model_config.get('zero_init_last_bn', True), name=name, **bn)


def compute_dtype(model_config):
  names = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
  if model_config.compute_dtype not in names:
    raise ValueError(f'Unknown model.compute_dtype {model_config.compute_dtype!r}: '
                     f'choose float32 or bfloat16.')
  return names[model_config.compute_dtype]


def param_count(params) -> int:
  return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))


def make_encoder_transform(model_config, axis_name=None, float32_features=False):
  """`hk.transform_with_state` of the encoder alone, apply(params, state, None, images,
  is_training) -> (features, state), with the module names of pretraining ('encoder'), so
  checkpointed encoder params plug in unchanged.

  Images are cast to the model's compute dtype; `float32_features` casts the features back.
  `axis_name`: BatchNorm statistics across devices in training mode (None: per device).
  """
  dtype = compute_dtype(model_config)

  def forward(images, is_training):
    features = make_encoder(model_config, axis_name)(images.astype(dtype), is_training)
    return features.astype(jnp.float32) if float32_features else features

  return hk.transform_with_state(forward)


def encoder_feature_size(model_config, image_size: int = 32) -> int:
  """Width of the pooled features (e.g. 2048 for ResNet-50 1x), by shape inference."""
  f = make_encoder_transform(model_config)
  x = jax.ShapeDtypeStruct((2, image_size, image_size, 3), jnp.float32)
  params, state = jax.eval_shape(lambda key, x: f.init(key, x, True), jax.random.PRNGKey(0), x)
  out, _ = jax.eval_shape(lambda p, s, x: f.apply(p, s, None, x, True), params, state, x)
  return int(out.shape[-1])
