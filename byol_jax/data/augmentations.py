"""BYOL image augmentations (paper Table 6) as stateless TensorFlow ops.

Crops come in two forms, because images share a size only after cropping:

* one image of any size: `random_resized_crop`, `center_crop` (tf.image.resize, bicubic);
* a batch of same-size images: `random_resized_crop_batch`, `center_crop_batch` (the same
  bicubic resampling written as two matrix products per image; used for in-memory datasets,
  where it is much cheaper than one small graph per image).

Crop windows follow the reference's ImageNet pipeline: one random draw per window, clipped to
the image (`sample_crop_windows`, `config.augment.crop_sampler='reference'`; 'torchvision'
selects the 10-try-then-centre sampler instead), and evaluation's centre square of 224/256 of
the short side, truncated to whole pixels. The two views of an image are two independent
windows of the same decoded image.

The photometric ops (`flip`, `color_jitter`, `to_grayscale`, `gaussian_blur`, `solarize`, and
their composition `view`) take float32 batches [B, S, S, 3] in [0, 1]. Every random quantity
is drawn with shape [B], so each image gets its own parameters; a draw is never shared by the
batch. Working on whole batches keeps the per-image cost low on a few CPU cores.

All randomness is stateless (seeds.py), driven by an explicit seed: a shape-[2] seed for the
whole batch, or int64 [B, 2] per-image seeds, with which image i's crop and photometric draws
depend on its own seed only (not on the batch size). The same seed gives the same output, which
is what makes data batches a pure function of (seed, step) in `datasets.py`.
"""

import functools
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # Keep TF's C++ INFO/WARNING lines quiet.

import tensorflow as tf  # pylint: disable=g-import-not-at-top

from byol_jax.data import crops, seeds  # pylint: disable=g-import-not-at-top
# The crop API, re-exported: augmentations is the one module callers need for a view.
from byol_jax.data.crops import (  # pylint: disable=g-import-not-at-top,unused-import
    _center_window, CENTER_CROP_FRACTION, center_crop, center_crop_batch, crop_and_resize,
    CROP_SAMPLERS, random_resized_crop, random_resized_crop_batch, resize_windows,
    sample_crop_windows)
from byol_jax.data.seeds import derive_seed  # pylint: disable=g-import-not-at-top  (public here too)

# Distinct stream numbers, so that no two ops of a view consume the same random numbers.
_FLIP, _JITTER, _GRAYSCALE, _BLUR, _SOLARIZE = range(5)
# Colour-jitter op ids; _NO_OP marks images that skip jitter.
BRIGHTNESS, CONTRAST, SATURATION, HUE, _NO_OP = range(5)


def _select(mask, when_true, when_false):
  """Per-image choice between two batches. Rows of a 2-D view select much faster in TF than a
  [B, 1, 1, 1] mask broadcast over 4-D images."""
  shape = tf.shape(when_false)
  rows = lambda images: tf.reshape(images, [shape[0], -1])
  chosen = tf.where(mask[:, None], rows(when_true), rows(when_false))
  return tf.reshape(chosen, shape)



# ---------------------------------------------------------------------------------------------
# Photometric ops on batches. `images`: float32 [B, S, S, 3] in [0, 1].


def flip(images, seed, prob=0.5):
  """Mirrors each image left-right with probability `prob`."""
  return _select(seeds.coin(seed, tf.shape(images)[0], prob), tf.reverse(images, axis=[2]), images)


def _pixels(images):
  """[n, H*W, 3]: the layout in which per-image and per-channel scalars broadcast cheaply."""
  return tf.reshape(images, [tf.shape(images)[0], -1, 3])


def adjust_brightness(images, delta):
  """Adds delta[i] to every value of image i, then clips."""
  return crops.clip_unit(images + delta[:, None, None, None])


def adjust_contrast(images, factor):
  """Scales each channel's deviation from that channel's mean by factor[i] (as
  tf.image.adjust_contrast), then clips."""
  pixels = _pixels(images)
  mean = tf.reduce_mean(pixels, axis=1, keepdims=True)
  return tf.reshape(crops.clip_unit((pixels - mean) * factor[:, None, None] + mean), tf.shape(images))


def adjust_saturation(images, factor):
  """Scales HSV saturation by factor[i], clipped to 1 (as tf.image.adjust_saturation).

  In HSV every channel is c = V - V * S * k(hue), so scaling S by f while keeping hue and value
  maps c to V - (V - c) * min(f, 1 / S), with V = max and V * S = max - min over the channels.
  That is computed directly, without the HSV round trip.
  """
  pixels = _pixels(images)
  value = tf.reduce_max(pixels, axis=-1, keepdims=True)
  chroma = value - tf.reduce_min(pixels, axis=-1, keepdims=True)
  factor = factor[:, None, None]
  limit = tf.math.divide_no_nan(value, chroma)  # 1 / S; gray pixels (chroma 0) do not change.
  scaled = value - (value - pixels) * tf.where(chroma > 0, tf.minimum(factor, limit), 1.0)
  return tf.reshape(crops.clip_unit(scaled), tf.shape(images))


def adjust_hue(images, delta):
  """Rotates HSV hue by delta[i] of a full turn (as tf.image.adjust_hue)."""
  hue, saturation, value = tf.unstack(tf.image.rgb_to_hsv(images), axis=-1)
  hue = tf.math.floormod(hue + delta[:, None, None], 1.0)
  return crops.clip_unit(tf.image.hsv_to_rgb(tf.stack([hue, saturation, value], axis=-1)))


def _blend(images, other, factor):
  """factor[i] * image + (1 - factor[i]) * other, clipped: torchvision's blend."""
  factor = factor[:, None, None, None]
  return crops.clip_unit(factor * images + (1.0 - factor) * other)


def _luma(images):
  return tf.image.rgb_to_grayscale(images)  # ITU-R 601, as torchvision's rgb_to_grayscale.


_ADJUST = {
    # The reference's (TF's) colour ops, `config.augment.color_jitter_style='reference'`.
    'reference': {BRIGHTNESS: adjust_brightness, CONTRAST: adjust_contrast,
                  SATURATION: adjust_saturation, HUE: adjust_hue},
    # torchvision's ColorJitter ('torchvision'), which most PyTorch implementations use:
    # brightness scales by a factor, contrast blends with the mean luma of the whole image,
    # saturation blends with each pixel's luma; hue is the same rotation.
    'torchvision': {
        BRIGHTNESS: lambda images, factor: _blend(images, 0.0, factor),
        CONTRAST: lambda images, factor: _blend(
            images, tf.reduce_mean(_luma(images), axis=[1, 2, 3], keepdims=True), factor),
        SATURATION: lambda images, factor: _blend(images, _luma(images), factor),
        HUE: adjust_hue},
}
COLOR_JITTER_STYLES = tuple(_ADJUST)


def sample_color_jitter(seed, batch_size, *, prob=0.8, brightness=0.4, contrast=0.4,
                        saturation=0.2, hue=0.1, style='reference'):
  """Per-image colour-jitter parameters: {'apply': bool [B], 'order': int32 [B, 4] (a random
  permutation of the op ids BRIGHTNESS, CONTRAST, SATURATION, HUE), and one strength [B] per
  op: brightness delta (style 'torchvision': factor in [max(0, 1 - b), 1 + b]), contrast
  factor, saturation factor, hue delta}."""
  apply_seed, order_seed, *strength_seeds = seeds.split_seed(seed, 6)
  brightness_range = ((-brightness, brightness) if style == 'reference' else
                      (max(0.0, 1 - brightness), 1 + brightness))
  ranges = {BRIGHTNESS: brightness_range, CONTRAST: (1 - contrast, 1 + contrast),
            SATURATION: (1 - saturation, 1 + saturation), HUE: (-hue, hue)}
  params = {op: seeds.uniform(strength_seeds[op], batch_size, (), low, high)
            for op, (low, high) in ranges.items()}
  params['apply'] = seeds.coin(apply_seed, batch_size, prob)
  # A uniformly random permutation per image: the argsort of i.i.d. uniforms.
  params['order'] = tf.argsort(
      seeds.uniform(order_seed, batch_size, [4]), axis=-1, stable=True)
  return params


def apply_color_jitter(images, params, style='reference'):
  """Runs, for each image with params['apply'], its four colour ops (of `style`) in its own
  order.

  At each of the 4 positions the batch is partitioned by the op each image's permutation puts
  there, each op runs on its own images only, and the batch is stitched back together.
  """
  image_ids = tf.range(tf.shape(images)[0])
  for position in range(4):
    op_here = tf.where(params['apply'], params['order'][:, position], _NO_OP)
    ids = tf.dynamic_partition(image_ids, op_here, 5)
    groups = tf.dynamic_partition(images, op_here, 5)
    for op, adjust in _ADJUST[style].items():
      groups[op] = adjust(groups[op], tf.gather(params[op], ids[op]))
    images = tf.reshape(tf.dynamic_stitch(ids, groups), tf.shape(images))
  return images


def color_jitter(images, seed, *, prob=0.8, brightness=0.4, contrast=0.4, saturation=0.2,
                 hue=0.1, style='reference'):
  """With probability `prob` per image, the four colour ops in a random order per image.

  style 'reference' (the reference's TF ops): brightness adds delta ~ U[-brightness,
  brightness]; contrast scales by U[1 - contrast, 1 + contrast] around each channel's mean;
  saturation scales HSV saturation by U[1 - saturation, 1 + saturation]; hue rotates by
  U[-hue, hue] of a turn. style 'torchvision' (torchvision's ColorJitter): brightness multiplies
  by U[1 - brightness, 1 + brightness]; contrast blends with the image's mean luma, saturation
  with each pixel's luma, by the same factor ranges; the same hue rotation. Values are clipped
  to [0, 1] after every op. Each image draws its own order and strengths.
  """
  params = sample_color_jitter(
      seed, tf.shape(images)[0], prob=prob, brightness=brightness, contrast=contrast,
      saturation=saturation, hue=hue, style=style)
  return apply_color_jitter(images, params, style)


def to_grayscale(images, seed, prob=0.2):
  """Replaces each image, with probability `prob`, by its luma (ITU-R 601) in all channels."""
  gray = tf.tile(tf.image.rgb_to_grayscale(images), [1, 1, 1, 3])
  return _select(seeds.coin(seed, tf.shape(images)[0], prob), gray, images)


def blur_kernel_size(image_size, kernel_fraction):
  """Odd kernel side from `kernel_fraction` of the image side: 23 at 224 px, 3 at 32 px."""
  return 2 * int(kernel_fraction * image_size / 2) + 1


def gaussian_blur(images, seed, *, prob, sigma_range=(0.1, 2.0), kernel_size):
  """Blurs each image with probability `prob` by a Gaussian with sigma ~ U[sigma_range].

  A separable kernel of `kernel_size` taps with 'SAME' zero padding (taps past the border
  read 0), as the TF/JAX reference code does. Only the images drawn for blurring are touched.
  """
  batch_size = tf.shape(images)[0]
  apply_seed, sigma_seed = seeds.split_seed(seed, 2)
  apply = seeds.coin(apply_seed, batch_size, prob)
  sigma = seeds.uniform(sigma_seed, batch_size, (), *sigma_range)
  return _apply_to_some(apply, lambda some, sigma: _blur(some, sigma, kernel_size),
                        images, sigma)


def _apply_to_some(mask, fn, images, *per_image):
  """fn(images[mask], *[p[mask] for p in per_image]) put back in place; other images as is."""
  chosen = tf.cast(mask, tf.int32)
  ids = tf.dynamic_partition(tf.range(tf.shape(images)[0]), chosen, 2)
  groups = tf.dynamic_partition(images, chosen, 2)
  groups[1] = fn(groups[1], *(tf.gather(values, ids[1]) for values in per_image))
  return tf.reshape(tf.dynamic_stitch(ids, groups), tf.shape(images))


def _blur(images, sigma, kernel_size):
  """Gaussian blur of each image i with sigma[i]: rows[i] @ image @ columns[i]^T, where the
  matrices hold the kernel on their diagonal band and taps past the border are dropped."""
  shape = tf.shape(images)

  def band(length):
    distance = tf.cast(tf.range(length)[None, :] - tf.range(length)[:, None], tf.float32)
    spread = 2.0 * tf.square(sigma)[:, None, None]
    radius = kernel_size // 2
    taps = tf.range(-radius, radius + 1, dtype=tf.float32)
    total = tf.reduce_sum(tf.exp(-tf.square(taps)[None, None, :] / spread), axis=-1,
                          keepdims=True)
    in_kernel = tf.cast(tf.abs(distance) <= radius, tf.float32)
    return tf.exp(-tf.square(distance) / spread) * in_kernel / total

  return crops.clip_unit(crops.separable(images, band(shape[1]), band(shape[2])))


def solarize(images, seed, prob=0.2):
  """With probability `prob` per image, maps x to (x < 0.5 ? x : 1 - x), i.e. min(x, 1 - x)."""
  solarized = tf.minimum(images, 1.0 - images)
  return _select(seeds.coin(seed, tf.shape(images)[0], prob), solarized, images)


# ---------------------------------------------------------------------------------------------
# Compositions.


def _traced(op, seed, **settings):
  """op(images, seed, **settings) as a tf.function traced once per process and settings, for
  float32 images of any shape.

  A pipeline's graph then holds one call per view instead of ~800 ops: every new pipeline
  (a resumed run, linear evaluation, each test) would otherwise re-trace them, which took
  seconds on a busy 2-core machine.
  """
  return _traced_op(op, seed.shape.rank, tuple(sorted(settings.items())))


@functools.lru_cache(maxsize=None)
def _traced_op(op, seed_rank, settings):
  seed_shape = [2] if seed_rank == 1 else [None, 2]  # A batch seed, or per-image seeds.
  any_batch = [tf.TensorSpec([None, None, None, 3], tf.float32),
               tf.TensorSpec(seed_shape, tf.int64)]
  return tf.function(functools.partial(op, **dict(settings)), autograph=False,
                     input_signature=any_batch)


def _view_ops(images, seed, *, flip_images, jitter, grayscale_prob, blur, solarize_prob):
  """`view` with its settings as plain Python values (hashable: they key the traced function)."""
  images = tf.convert_to_tensor(images, tf.float32)
  if flip_images:
    images = flip(images, derive_seed(seed, _FLIP))
  jitter_prob, brightness, contrast, saturation, hue, style = jitter
  if jitter_prob > 0:
    images = color_jitter(images, derive_seed(seed, _JITTER), prob=jitter_prob,
                          brightness=brightness, contrast=contrast, saturation=saturation,
                          hue=hue, style=style)
  if grayscale_prob > 0:
    images = to_grayscale(images, derive_seed(seed, _GRAYSCALE), grayscale_prob)
  blur_prob, sigma_range, kernel_size = blur
  if blur_prob > 0 and kernel_size > 1:
    images = gaussian_blur(images, derive_seed(seed, _BLUR), prob=blur_prob,
                           sigma_range=sigma_range, kernel_size=kernel_size)
  if solarize_prob > 0:
    images = solarize(images, derive_seed(seed, _SOLARIZE), solarize_prob)
  return images


def view(images, seed, augment, view_config):
  """The photometric part of one BYOL view, for a batch of already-cropped images.

  Order as in the reference: flip, colour jitter, grayscale, blur, solarize. `augment` is
  `config.augment`; `view_config` is `config.augment.view1` or `.view2` (blur_prob,
  solarize_prob). Ops with probability 0 are left out of the graph. The images' side must be
  static (it sets the blur kernel).
  """
  images = tf.convert_to_tensor(images, tf.float32)
  kernel_size = blur_kernel_size(images.shape[1], augment.blur_kernel_fraction)
  seed = tf.cast(seed, tf.int64)
  run = _traced(
      _view_ops, seed, flip_images=bool(augment.flip),
      jitter=tuple(float(v) for v in (augment.color_jitter_prob, augment.brightness,
                                      augment.contrast, augment.saturation, augment.hue)) + (
                                          color_jitter_style(augment),),
      grayscale_prob=float(augment.grayscale_prob),
      blur=(float(view_config.blur_prob), tuple(map(float, augment.blur_sigma)), kernel_size),
      solarize_prob=float(view_config.solarize_prob))
  return tf.ensure_shape(run(images, seed), images.shape)


def _checked_choice(augment, key: str, choices) -> str:
  """`augment.<key>`, checked ('reference' where a config predates the setting)."""
  value = augment.get(key, 'reference')
  if value not in choices:
    raise ValueError(f'Unknown augment.{key} {value!r}: choose from {", ".join(choices)}.')
  return value


def crop_sampler(augment):
  """`augment.crop_sampler`: one clipped draw ('reference') or torchvision's 10 tries."""
  return _checked_choice(augment, 'crop_sampler', CROP_SAMPLERS)


def color_jitter_style(augment):
  """`augment.color_jitter_style`: the reference's ops or torchvision's ColorJitter."""
  return _checked_choice(augment, 'color_jitter_style', COLOR_JITTER_STYLES)


def eval_crop_fraction(data):
  """`data.eval_crop_fraction`, checked: the share of the short side that evaluation keeps.

  0.875 (the reference's 224/256 ImageNet rule, and what a config that predates the setting
  gets); 1.0 scores the whole image (the short side's square, e.g. a 32 px CIFAR image as it
  is), as CIFAR-sized peers evaluate.
  """
  fraction = data.get('eval_crop_fraction', CENTER_CROP_FRACTION)
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (
      0 < fraction <= 1):
    raise ValueError(f'data.eval_crop_fraction must be in (0, 1] (0.875: the reference\'s '
                     f'centre crop; 1.0: the whole image), got {fraction!r}.')
  return float(fraction)


def view_size(augment, image_size):
  """`augment.view_size`, checked: the side in pixels of the pretraining views.

  0 (the default, and what a config that predates the setting gets): `image_size`, as the
  reference. A smaller side trains on cheaper views (compute scales with the pixel count) while
  evaluation still sees `image_size`: the random resized crop already enlarges objects, so
  shrinking the views brings their apparent size closer to the evaluation images'.
  """
  size = augment.get('view_size', 0)
  if isinstance(size, bool) or not isinstance(size, int) or size < 0:
    raise ValueError(f'augment.view_size must be a whole number of pixels >= 0 (0: the '
                     f'pretraining views are image_size, as the reference), got {size!r}.')
  return size or image_size


def pretraining_crop(image, seed, augment, size):
  """The geometric part of a BYOL view for one image: `augment`'s random resized crop."""
  return random_resized_crop(
      image, seed, size, tuple(augment.crop_scale), tuple(augment.crop_ratio),
      crop_sampler(augment))


def pretraining_crop_batch(images, seed, augment, size):
  """`pretraining_crop` for a batch of same-size images."""
  seed = tf.cast(seed, tf.int64)
  run = _traced(random_resized_crop_batch, seed, size=size,
                scale=tuple(map(float, augment.crop_scale)),
                ratio=tuple(map(float, augment.crop_ratio)), sampler=crop_sampler(augment))
  images = tf.image.convert_image_dtype(images, tf.float32)
  return tf.ensure_shape(run(images, seed), [images.shape[0], size, size, 3])


def linear_eval_view(images, seed, augment):
  """Linear-evaluation training augmentation after the crop: a horizontal flip only.

  Follows `augment.flip`, so a preset that turns flips off for pretraining (digits, where a
  mirrored digit is another symbol) keeps them off here too.
  """
  images = tf.convert_to_tensor(images, tf.float32)
  return flip(images, derive_seed(seed, _FLIP)) if augment.flip else images
