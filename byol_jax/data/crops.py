"""Crops for BYOL views and evaluation, as stateless TensorFlow ops (augmentations.py has the
photometric ops and re-exports these).

Two forms, because images share a size only after cropping: one image of any size
(`random_resized_crop`, `center_crop`: tf.image.resize, bicubic), and a batch of same-size
images (`random_resized_crop_batch`, `center_crop_batch`: the same bicubic resampling written as
two matrix products per image). Windows follow the reference's ImageNet pipeline
(`sample_crop_windows`). Seeds are a batch seed [2] or per-image seeds [B, 2] (seeds.py).
"""

import math

import tensorflow as tf

from byol_jax.data import seeds

# Proportion of the short side kept by evaluation centre crops (the reference's 224 / 256).
CENTER_CROP_FRACTION = 0.875
# Random-resized-crop samplers (`sample_crop_windows`): the reference's single draw, or
# torchvision's 10 candidate windows before falling back to a centre crop.
CROP_SAMPLERS = ('reference', 'torchvision')
_TORCHVISION_CROP_ATTEMPTS = 10
# tf.image.resize (bicubic) looks its cubic weights up in a table of this many fractional
# positions; the batched crop rounds the same way so that both crop paths agree.
_BICUBIC_TABLE_SIZE = 1024


def clip_unit(images):
  return tf.clip_by_value(images, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Geometry.


def sample_crop_windows(seed, height, width, num, scale, ratio, sampler='reference'):
  """Draws `num` random-resized-crop windows (y, x, h, w), each int32 [num].

  `sampler` (`config.augment.crop_sampler`):

  * 'reference' (default; BYOL's own ImageNet pipeline): ONE draw per window. The area is a
    uniform fraction in `scale` of height x width, the aspect ratio w / h is log-uniform in
    `ratio`, w = round(sqrt(area x ratio)) and h = round(sqrt(area / ratio)), each then clipped
    to the image side (and to at least 1 pixel). No retries and no fallback: a draw that does
    not fit is clipped, so large crops of the whole width or height are common. Mean area
    fraction ~0.51 at scale (0.08, 1) on ImageNet-shaped images.
  * 'torchvision' (torchvision's RandomResizedCrop, used by many peers): of 10 such draws the
    first that fits inside the image unclipped is kept; if none fits (extreme ratios, tiny
    images) the window is the largest centred one with an allowed ratio. Mean area ~0.43.

  Offsets are uniform over the positions where the window fits.
  """
  if sampler == 'reference':
    attempts = 1
  elif sampler == 'torchvision':
    attempts = _TORCHVISION_CROP_ATTEMPTS
  else:
    raise ValueError(f'Unknown crop sampler {sampler!r}: choose from {", ".join(CROP_SAMPLERS)}.')
  area_seed, ratio_seed, offset_seed = seeds.split_seed(seed, 3)
  height_f, width_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  area = height_f * width_f * seeds.uniform(area_seed, num, [attempts], *scale)
  aspect = tf.exp(seeds.uniform(ratio_seed, num, [attempts], math.log(ratio[0]),
                                math.log(ratio[1])))
  crop_w = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
  crop_h = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
  if seeds.is_per_image(offset_seed):
    offsets = tf.transpose(seeds.uniform(offset_seed, num, [2]))
  else:
    offsets = tf.random.stateless_uniform([2, num], offset_seed)

  def offset(draw, room):
    return tf.minimum(tf.cast(draw * tf.cast(room + 1, tf.float32), tf.int32), room)

  if sampler == 'reference':
    crop_h = tf.clip_by_value(crop_h[:, 0], 1, height)
    crop_w = tf.clip_by_value(crop_w[:, 0], 1, width)
    return offset(offsets[0], height - crop_h), offset(offsets[1], width - crop_w), crop_h, crop_w

  fits = (crop_w > 0) & (crop_h > 0) & (crop_w <= width) & (crop_h <= height)
  first_fit = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)
  any_fit = tf.reduce_any(fits, axis=1)
  crop_h = tf.gather(crop_h, first_fit, batch_dims=1)
  crop_w = tf.gather(crop_w, first_fit, batch_dims=1)
  # Fallback: the whole image, narrowed to the nearest allowed aspect ratio.
  image_ratio = width_f / height_f
  fallback_w = tf.where(image_ratio > ratio[1], tf.round(height_f * ratio[1]), width_f)
  fallback_h = tf.where(image_ratio < ratio[0], tf.round(width_f / ratio[0]), height_f)
  fallback_w = tf.clip_by_value(tf.cast(fallback_w, tf.int32), 1, width)
  fallback_h = tf.clip_by_value(tf.cast(fallback_h, tf.int32), 1, height)
  crop_h = tf.where(any_fit, crop_h, fallback_h)
  crop_w = tf.where(any_fit, crop_w, fallback_w)
  offset_y = tf.where(any_fit, offset(offsets[0], height - crop_h), (height - crop_h) // 2)
  offset_x = tf.where(any_fit, offset(offsets[1], width - crop_w), (width - crop_w) // 2)
  return offset_y, offset_x, crop_h, crop_w


def _center_window(height, width, fraction):
  """A centred square of `fraction` of the short side, as the reference computes it: the side
  is the float32 product truncated to an integer (not rounded), at least one pixel; the offsets
  are ((H - side) + 1) // 2 and ((W - side) + 1) // 2."""
  short_side = tf.cast(tf.minimum(height, width), tf.float32)
  side = tf.maximum(tf.cast(short_side * fraction, tf.int32), 1)
  return (height - side + 1) // 2, (width - side + 1) // 2, side, side


def crop_and_resize(image, window, size):
  """Crops `window` out of one [H, W, C] image, resizes it bicubically to size x size."""
  offset_y, offset_x, crop_h, crop_w = window
  crop = image[offset_y:offset_y + crop_h, offset_x:offset_x + crop_w]
  crop = tf.image.convert_image_dtype(crop, tf.float32)  # uint8 -> [0, 1]; float unchanged.
  # Bicubic interpolation overshoots at sharp edges; the network expects [0, 1].
  return clip_unit(tf.image.resize(crop, [size, size], method='bicubic'))


def random_resized_crop(image, seed, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                        sampler='reference'):
  """A random crop (area fraction in `scale`, aspect ratio in `ratio`, drawn by `sampler`: see
  `sample_crop_windows`) resized to size x size.

  `image` is one [H, W, 3] image of any size (uint8, or float in [0, 1]); images smaller than
  the output are upsampled. Returns float32 [size, size, 3] in [0, 1].
  """
  shape = tf.shape(image)
  windows = sample_crop_windows(seed, shape[0], shape[1], 1, scale, ratio, sampler)
  return crop_and_resize(image, [w[0] for w in windows], size)


def center_crop(image, size, fraction=CENTER_CROP_FRACTION):
  """Evaluation preprocessing of one image: centred square of `fraction` of the short side,
  resized to size x size. Returns float32 in [0, 1]."""
  shape = tf.shape(image)
  return crop_and_resize(image, _center_window(shape[0], shape[1], fraction), size)


def _keys_cubic(distance):
  """Keys' cubic convolution kernel with a = -0.5, the kernel of tf.image.resize 'bicubic'."""
  d = tf.abs(distance)
  near = (1.5 * d - 2.5) * d * d + 1.0
  far = ((-0.5 * d + 2.5) * d - 4.0) * d + 2.0
  return tf.where(d <= 1.0, near, tf.where(d < 2.0, far, 0.0))


def _bicubic_matrix(offset, length, size, full_length):
  """[B, size, full_length] matrices resampling the windows [offset, offset + length) of an
  axis to `size` samples exactly as tf.image.resize(method='bicubic') resamples a crop:
  half-pixel centres; taps outside the window get weight 0 and the rest are renormalised."""
  length_f = tf.cast(length, tf.float32)[:, None, None]
  position = (tf.range(size, dtype=tf.float32)[None, :, None] + 0.5) * length_f / size - 0.5
  base = tf.floor(position)
  position = base + tf.round((position - base) * _BICUBIC_TABLE_SIZE) / _BICUBIC_TABLE_SIZE
  # Source pixel l sits at l - offset inside the window; the kernel is 0 beyond distance 2.
  inside = tf.range(full_length)[None, None, :] - offset[:, None, None]
  weights = _keys_cubic(tf.cast(inside, tf.float32) - position)
  weights *= tf.cast((inside >= 0) & (inside < length[:, None, None]), tf.float32)
  return weights / tf.reduce_sum(weights, axis=-1, keepdims=True)


def separable(images, rows, columns):
  """out[b] = rows[b] @ images[b] @ columns[b]^T per channel: any per-image separable linear
  map (resampling a window, blurring). Two products are cheaper in TF than one 3-way einsum."""
  images = tf.einsum('bih,bhwc->biwc', rows, images)
  return tf.einsum('bjw,biwc->bijc', columns, images)


def resize_windows(images, windows, size):
  """Per-image windows of a same-size batch [B, H, W, 3], each resized bicubically to
  size x size. Returns float32 in [0, 1]."""
  offset_y, offset_x, crop_h, crop_w = windows
  shape = tf.shape(images)
  rows = _bicubic_matrix(offset_y, crop_h, size, shape[1])
  columns = _bicubic_matrix(offset_x, crop_w, size, shape[2])
  return clip_unit(separable(tf.image.convert_image_dtype(images, tf.float32), rows, columns))


def random_resized_crop_batch(images, seed, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                              sampler='reference'):
  """`random_resized_crop` for a batch of same-size images; each image draws its own window.

  Returns float32 [B, size, size, 3] in [0, 1].
  """
  shape = tf.shape(images)
  windows = sample_crop_windows(seed, shape[1], shape[2], shape[0], scale, ratio, sampler)
  return resize_windows(images, windows, size)


def center_crop_batch(images, size, fraction=CENTER_CROP_FRACTION):
  """`center_crop` for a batch of same-size images."""
  shape = tf.shape(images)
  window = _center_window(shape[1], shape[2], fraction)
  return resize_windows(images, [tf.fill([shape[0]], v) for v in window], size)
