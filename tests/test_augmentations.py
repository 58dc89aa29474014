"""Augmentations: paper Table 6 ranges and rates, per-image randomness, stateless seeds.

Rates are checked over a few thousand tiny images: an observed rate must lie within 4.5
binomial standard deviations of the configured probability (seeds are fixed, so the test is
deterministic; the bound only says the draws behave like the distribution they claim).
"""

import math

import byol  # configs/byol.py (tests/conftest.py puts configs/ on the path).
import numpy as np
import pytest
import tensorflow as tf

from byol_jax.data import augmentations

N = 3000  # Images per rate test (8x8 pixels each: a few milliseconds per op).


def paper_augment():
  return byol.get_config('imagenet').augment


def only(augment, *, flip=False, jitter=False, grayscale=False, blur=False, solarize=False):
  """A copy of `augment` with every random op off except the ones named (at their settings)."""
  augment = augment.copy_and_resolve_references()
  augment.flip = flip and augment.flip
  augment.color_jitter_prob = augment.color_jitter_prob if jitter else 0.0
  augment.grayscale_prob = augment.grayscale_prob if grayscale else 0.0
  for view in (augment.view1, augment.view2):
    view.blur_prob = view.blur_prob if blur else 0.0
    view.solarize_prob = view.solarize_prob if solarize else 0.0
  return augment


def assert_rate(observed, prob, n=N):
  rate = float(np.mean(observed))
  tolerance = 4.5 * math.sqrt(prob * (1 - prob) / n) + 1.0 / n
  assert abs(rate - prob) <= tolerance, (rate, prob, tolerance)


def colourful_images(n=N, size=8, seed=0):
  """Random colour images with a left-to-right ramp, so flips and blurs show."""
  rng = np.random.default_rng(seed)
  ramp = np.linspace(0.2, 0.8, size)[None, None, :, None]
  images = 0.5 * rng.uniform(size=(n, size, size, 3)) + 0.5 * ramp
  return tf.constant(images, tf.float32)


def changed(before, after, tol=1e-4):
  return np.any(np.abs(np.asarray(before) - np.asarray(after)) > tol, axis=(1, 2, 3))


SEED = tf.constant([7, 11], tf.int64)


# ------------------------------------------------------------------------------------------
# Geometry.


def crop_windows(height, width, num, sampler='reference', seed=SEED, scale=(0.08, 1.0),
                 ratio=(3 / 4, 4 / 3)):
  return tuple(t.numpy() for t in augmentations.sample_crop_windows(
      seed, height, width, num, scale, ratio, sampler))


def reference_crop_statistics(height, width, num, seed=0):
  """The reference sampler's algorithm (one draw: area U[0.08, 1) x H x W, log-uniform aspect
  in [3/4, 4/3], rounded sides clipped to the image) in float64 numpy, with its own generator:
  the distribution our TF sampler must reproduce."""
  rng = np.random.default_rng(seed)
  area = rng.uniform(0.08, 1.0, num) * height * width
  aspect = np.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3), num))
  w = np.minimum(np.round(np.sqrt(area * aspect)), width)
  h = np.minimum(np.round(np.sqrt(area / aspect)), height)
  return h, w


def window_statistics(h, w, height, width):
  """Per-window quantities whose means characterise a crop sampler."""
  return dict(area=h * w / (height * width), log_aspect=np.log(w / h),
              clipped=((h == height) | (w == width)).astype(float))


def test_reference_crop_windows_stay_inside_and_span_the_configured_ranges():
  height, width = 120, 160
  y, x, h, w = crop_windows(height, width, 4000)
  assert np.all((y >= 0) & (x >= 0) & (h >= 1) & (w >= 1))
  assert np.all((y + h <= height) & (x + w <= width))
  area = h * w / (height * width)
  ratio = w / h
  clipped = (h == height) | (w == width)
  # One draw, no retry: windows that do not fit are clipped to the image, not redrawn, so a
  # good share (here ~1/4) spans the whole height or width.
  assert 0.1 < clipped.mean() < 0.5
  # Unclipped windows keep their area and ratio up to rounding (~1 px on each side).
  assert area.min() >= 0.08 * 0.9 and area.max() <= 1.0
  assert ratio[~clipped].min() >= 0.75 * 0.95 and ratio[~clipped].max() <= 4 / 3 * 1.05
  assert area.min() < 0.12 and area.max() > 0.85
  assert ratio.min() < 0.8 and ratio.max() > 1.25
  # Offsets are spread over the image, not pinned to a corner or the centre.
  assert len(np.unique(y)) > 50 and len(np.unique(x)) > 50


@pytest.mark.parametrize('height, width', [(375, 500), (48, 64), (64, 48), (32, 32)])
def test_reference_crop_sampler_matches_the_reference_algorithm_in_distribution(height, width):
  """Means of area fraction, log aspect ratio and clipped fraction over n = 4000 windows lie
  within 5 standard errors of the same algorithm simulated in float64 numpy (200,000 draws,
  whose own error is sqrt(4000 / 200000) ~ 0.14 of ours, folded into the bound: the standard
  error of the difference is se x sqrt(1 + 4000/200000))."""
  n, n_ref = 4000, 200_000
  ours = window_statistics(*crop_windows(height, width, n)[2:], height, width)
  theirs = window_statistics(*reference_crop_statistics(height, width, n_ref), height, width)
  for key in ours:
    se = np.std(theirs[key]) / math.sqrt(n) * math.sqrt(1 + n / n_ref)
    assert abs(ours[key].mean() - theirs[key].mean()) <= 5 * se, (key, ours[key].mean(),
                                                                   theirs[key].mean(), se)
  if (height, width) == (375, 500):  # ImageNet's most common shape: the 0.51.
    assert 0.50 < theirs['area'].mean() < 0.53


def test_offsets_are_uniform_over_the_fitting_positions():
  """A fixed window size leaves room + 1 positions; each is drawn with probability 1/(room+1).
  Scale and ratio pinned: area 0.25 of 40 x 40, ratio 1 -> 20 x 20 windows, 21 positions."""
  n = 8400
  y, x, h, w = crop_windows(40, 40, n, scale=(0.25, 0.25), ratio=(1.0, 1.0))
  assert np.all(h == 20) and np.all(w == 20)
  for offsets in (y, x):
    counts = np.bincount(offsets, minlength=21)
    assert len(counts) == 21
    # Each count ~ Binomial(8400, 1/21): mean 400, sd sqrt(400 x 20/21) = 19.5; 5 sd = 98.
    assert np.all(np.abs(counts - 400) <= 98), counts


def test_reference_crop_on_extreme_images_is_clipped_not_recentred():
  # 1 x 40: every drawn window is taller than 1 pixel and is clipped to the image height.
  y, x, h, w = crop_windows(1, 40, 200)
  assert np.all(h == 1) and np.all(y == 0)
  assert np.all((w >= 1) & (x + w <= 40)) and len(np.unique(x)) > 5
  # 1 x 1: windows of at least one pixel, never empty.
  np.testing.assert_array_equal(crop_windows(1, 1, 50), np.array([[0] * 50, [0] * 50,
                                                                   [1] * 50, [1] * 50]))


def test_torchvision_sampler_falls_back_to_a_centre_crop_on_extreme_images():
  # 1 x 40: no window with a ratio in [3/4, 4/3] has area >= 8% of it; fallback is centred.
  y, x, h, w = (int(t[0]) for t in crop_windows(1, 40, 1, 'torchvision'))
  assert (h, y) == (1, 0) and w == 1 and x == (40 - 1) // 2
  # Retrying until a window fits favours small crops: mean area ~0.43 vs ~0.51 in one draw.
  area = window_statistics(*crop_windows(375, 500, 4000, 'torchvision')[2:], 375, 500)['area']
  assert 0.41 < area.mean() < 0.45
  with pytest.raises(ValueError, match='Unknown crop sampler'):
    crop_windows(8, 8, 1, 'inception')


@pytest.mark.parametrize('height, width', [(64, 96), (11, 20), (20, 11), (375, 500), (5, 3),
                                           (1, 7), (224, 224), (257, 300)])
def test_centre_window_truncates_like_the_reference(height, width):
  """Side int(0.875 x short side) (truncated: 11 -> 9, where rounding gives 10), offsets
  ((H - side) + 1) // 2, at least one pixel."""
  window = [int(v) for v in augmentations._center_window(  # pylint: disable=protected-access
      tf.constant(height), tf.constant(width), augmentations.CENTER_CROP_FRACTION)]
  side = max(int(np.float32(0.875) * np.float32(min(height, width))), 1)
  assert window == [(height - side + 1) // 2, (width - side + 1) // 2, side, side]


@pytest.mark.parametrize('shape', [(37, 53, 3), (5, 3, 3), (1, 1, 3)])
def test_random_resized_crop_shape_dtype_range(shape):
  image = tf.constant(np.random.default_rng(0).integers(0, 256, shape), tf.uint8)
  crop = augmentations.random_resized_crop(image, SEED, 16)
  assert crop.shape == (16, 16, 3) and crop.dtype == tf.float32
  assert 0.0 <= float(tf.reduce_min(crop)) and float(tf.reduce_max(crop)) <= 1.0


@pytest.mark.parametrize('sampler', augmentations.CROP_SAMPLERS)
def test_batched_crop_resamples_exactly_like_tf_image_resize(sampler):
  images = tf.constant(np.random.default_rng(1).integers(0, 256, (24, 20, 28, 3)), tf.uint8)
  windows = augmentations.sample_crop_windows(SEED, 20, 28, 24, (0.08, 1.0), (3 / 4, 4 / 3),
                                              sampler)
  for size in (16, 40):  # Down- and upsampling.
    batched = augmentations.resize_windows(images, windows, size)
    for i in range(24):
      one = augmentations.crop_and_resize(images[i], [w[i] for w in windows], size)
      np.testing.assert_allclose(batched[i], one, atol=2e-6)


def test_centre_crop_keeps_the_middle_seven_eighths():
  image = np.zeros((64, 96, 3), np.uint8)
  image[:, 40:56] = 255  # A bright band in the middle: kept; the dark sides are cropped.
  crop = augmentations.center_crop(tf.constant(image), 56)
  assert crop.shape == (56, 56, 3)
  # Side 0.875 * 64 = 56 pixels, centred: columns 20..75 of the source, band at 20..35.
  np.testing.assert_allclose(crop[:, 22:34], 1.0, atol=1e-6)
  np.testing.assert_allclose(crop[:, :18], 0.0, atol=1e-6)
  batched = augmentations.center_crop_batch(tf.constant(image[None]), 56)
  np.testing.assert_allclose(batched[0], crop, atol=2e-6)


def test_whole_image_evaluation_keeps_a_square_image_as_it_is():
  # data.eval_crop_fraction=1.0 (the small-image presets): a 32 px image evaluated at 32 px is
  # the image itself (bicubic weights at whole-pixel positions are exactly 1 and 0).
  image = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  whole = augmentations.center_crop(tf.constant(image), 32, fraction=1.0)
  np.testing.assert_allclose(whole, image / 255.0, atol=1e-6)
  batched = augmentations.center_crop_batch(tf.constant(image[None]), 32, fraction=1.0)
  np.testing.assert_allclose(batched[0], image / 255.0, atol=1e-6)
  # The reference's 0.875 crop keeps the middle 28 px and upsamples them: not the image.
  cropped = augmentations.center_crop(tf.constant(image), 32)
  assert np.abs(cropped - image / 255.0).max() > 0.1
  # A non-square image: the whole short side, centred.
  wide = np.zeros((16, 24, 3), np.uint8)
  wide[:, 4:20] = image[:16, :16]
  np.testing.assert_allclose(augmentations.center_crop(tf.constant(wide), 16, fraction=1.0),
                             image[:16, :16] / 255.0, atol=1e-6)


@pytest.mark.parametrize('fraction', [0.0, -0.5, 1.5, 'whole', None])
def test_eval_crop_fraction_outside_0_1_is_one_clear_line(fraction):
  data = byol.get_config('cifar10').data.copy_and_resolve_references()
  with data.ignore_type():
    data.eval_crop_fraction = fraction
  with pytest.raises(ValueError, match='data.eval_crop_fraction') as error:
    augmentations.eval_crop_fraction(data)
  assert '\n' not in str(error.value)


def test_eval_crop_fraction_of_the_presets():
  fractions = {preset: augmentations.eval_crop_fraction(byol.get_config(preset).data)
               for preset in ('imagenet', 'cifar10', 'cifar10_cpu', 'demo')}
  # The reference's centre crop for ImageNet and digits (measured better there); whole images
  # for the CIFAR presets, as CIFAR peers evaluate.
  assert fractions == dict(imagenet=0.875, cifar10=1.0, cifar10_cpu=1.0, demo=0.875)
  # A config that predates the setting is evaluated as it was: the reference's crop.
  old = byol.get_config('cifar10').data.to_dict()
  del old['eval_crop_fraction']
  assert augmentations.eval_crop_fraction(old) == augmentations.CENTER_CROP_FRACTION == 0.875


def test_each_image_of_a_batch_gets_its_own_crop():
  same = tf.tile(colourful_images(1, 16), [8, 1, 1, 1])
  crops = augmentations.random_resized_crop_batch(same, SEED, 16).numpy()
  distinct = {crops[i].tobytes() for i in range(8)}
  assert len(distinct) == 8


# ------------------------------------------------------------------------------------------
# Photometric ops.


def test_colour_ops_match_tf_image():
  images = colourful_images(6, 8)
  factors = tf.constant([0.6, 0.8, 1.0, 1.2, 1.4, 3.0])
  deltas = tf.constant([-0.1, -0.05, 0.0, 0.03, 0.1, 0.5])
  for i in range(6):
    image = images[i]
    np.testing.assert_allclose(
        augmentations.adjust_saturation(images, factors)[i],
        tf.image.adjust_saturation(image, factors[i]), atol=2e-6)
    np.testing.assert_allclose(
        augmentations.adjust_hue(images, deltas)[i],
        tf.clip_by_value(tf.image.adjust_hue(image, deltas[i]), 0, 1), atol=2e-6)
    np.testing.assert_allclose(
        augmentations.adjust_contrast(images, factors)[i],
        tf.clip_by_value(tf.image.adjust_contrast(image, factors[i]), 0, 1), atol=2e-6)
    np.testing.assert_allclose(
        augmentations.adjust_brightness(images, deltas)[i],
        tf.clip_by_value(image + deltas[i], 0, 1), atol=2e-6)


def test_colour_jitter_parameters_follow_the_paper():
  augment = paper_augment()
  params = augmentations.sample_color_jitter(
      SEED, N, prob=augment.color_jitter_prob, brightness=augment.brightness,
      contrast=augment.contrast, saturation=augment.saturation, hue=augment.hue)
  assert_rate(params['apply'], 0.8)
  ranges = {augmentations.BRIGHTNESS: (-0.4, 0.4), augmentations.CONTRAST: (0.6, 1.4),
            augmentations.SATURATION: (0.8, 1.2), augmentations.HUE: (-0.1, 0.1)}
  for op, (low, high) in ranges.items():
    values = params[op].numpy()
    assert low <= values.min() < low + 0.01 and high - 0.01 < values.max() <= high
  order = params['order'].numpy()
  np.testing.assert_array_equal(np.sort(order, axis=1), np.tile(np.arange(4), (N, 1)))
  for position in range(4):  # Every op is equally likely at every position.
    for op in range(4):
      assert_rate(order[:, position] == op, 0.25)


def test_colour_jitter_runs_each_images_ops_in_its_own_order():
  images = colourful_images(64, 8)
  params = augmentations.sample_color_jitter(SEED, 64, prob=0.8, brightness=0.4,
                                             contrast=0.4, saturation=0.2, hue=0.1)
  jittered = augmentations.apply_color_jitter(images, params).numpy()
  adjust = {augmentations.BRIGHTNESS: augmentations.adjust_brightness,
            augmentations.CONTRAST: augmentations.adjust_contrast,
            augmentations.SATURATION: augmentations.adjust_saturation,
            augmentations.HUE: augmentations.adjust_hue}
  for i in range(64):
    expected = images[i:i + 1]
    if params['apply'][i]:
      for op in params['order'][i].numpy():
        expected = adjust[op](expected, params[op][i:i + 1])
    np.testing.assert_allclose(jittered[i], expected[0], atol=1e-5)


def _torchvision_colour_op(op, image, strength):
  """torchvision.transforms.functional's adjust_* on one float HWC image in [0, 1], written
  from its source (transforms/_functional_tensor.py: _blend, rgb_to_grayscale 0.2989 / 0.587 /
  0.114), in NumPy: an independent statement of what the 'torchvision' style must compute."""
  luma = image @ np.array([0.2989, 0.587, 0.114])
  blend = lambda other: np.clip(strength * image + (1 - strength) * other, 0, 1)
  if op == augmentations.BRIGHTNESS:
    return blend(0.0)
  if op == augmentations.CONTRAST:
    return blend(luma.mean())
  if op == augmentations.SATURATION:
    return blend(luma[..., None])
  return np.asarray(augmentations.adjust_hue(tf.constant(image[None], tf.float32),
                                             tf.constant([strength], tf.float32))[0])


def test_torchvision_colour_jitter_is_torchvisions_colorjitter():
  images = colourful_images(64, 8)
  params = augmentations.sample_color_jitter(SEED, 64, prob=0.8, brightness=0.4, contrast=0.4,
                                             saturation=0.2, hue=0.1, style='torchvision')
  # Brightness is a factor here (an offset in the reference style); the others are unchanged.
  brightness = params[augmentations.BRIGHTNESS].numpy()
  assert 0.6 <= brightness.min() < 0.65 and 1.35 < brightness.max() <= 1.4
  jittered = augmentations.apply_color_jitter(images, params, 'torchvision').numpy()
  reference = augmentations.apply_color_jitter(images, params).numpy()
  assert np.abs(jittered - reference).max() > 0.1  # The two styles differ.
  for i in range(64):
    expected = images[i].numpy().astype(np.float64)
    if params['apply'][i]:
      for op in params['order'][i].numpy():
        expected = _torchvision_colour_op(op, expected, float(params[op][i]))
    np.testing.assert_allclose(jittered[i], expected, atol=1e-5)
  augment = paper_augment()
  with augment.unlocked():
    augment.color_jitter_style = 'pil'
  with pytest.raises(ValueError, match='color_jitter_style'):
    augmentations.color_jitter_style(augment)


def test_view_rates_match_the_configured_probabilities():
  """Each op alone, detected from the output, at the rate its config says, for both views."""
  augment = paper_augment()
  images = colourful_images()
  view_configs = {'view1': augment.view1, 'view2': augment.view2}
  for name, view_config in view_configs.items():
    seed = augmentations.derive_seed(SEED, len(name))
    cases = {
        'flip': (only(augment, flip=True), 0.5, lambda out: changed(images, out)),
        'jitter': (only(augment, jitter=True), 0.8, lambda out: changed(images, out)),
        'grayscale': (only(augment, grayscale=True), 0.2,
                      lambda out: np.all(np.ptp(np.asarray(out), axis=3) < 1e-6, axis=(1, 2))),
        'blur': (only(augment, blur=True), view_config.blur_prob,
                 lambda out: changed(images, out)),
        'solarize': (only(augment, solarize=True), view_config.solarize_prob,
                     lambda out: changed(images, out)),
    }
    for op, (op_augment, prob, detect) in cases.items():
      if op == 'blur':
        op_augment.blur_sigma = (1.0, 2.0)  # Visible on 8 px; the coin is what is tested.
        op_augment.blur_kernel_fraction = 0.4  # A 3-tap kernel at 8 px.
      out = augmentations.view(images, seed, op_augment, getattr(op_augment, name))
      assert out.shape == images.shape and out.dtype == tf.float32
      assert_rate(detect(out), prob)


def test_solarize_grayscale_and_blur_do_what_the_table_says():
  images = colourful_images(4, 9)
  solarized = augmentations.solarize(images, SEED, prob=1.0)
  np.testing.assert_allclose(solarized, np.where(images < 0.5, images, 1 - images))
  gray = augmentations.to_grayscale(images, SEED, prob=1.0)
  np.testing.assert_allclose(gray, tf.tile(tf.image.rgb_to_grayscale(images), [1, 1, 1, 3]))
  # Blur: a depthwise 'SAME' (zero-padded) convolution with a normalised 5-tap Gaussian.
  sigma = 1.3
  blurred = augmentations.gaussian_blur(images, SEED, prob=1.0, sigma_range=(sigma, sigma),
                                        kernel_size=5)
  taps = np.exp(-np.arange(-2, 3) ** 2 / (2 * sigma ** 2))
  taps = tf.constant(taps / taps.sum(), tf.float32)
  vertical = tf.tile(tf.reshape(taps, [5, 1, 1, 1]), [1, 1, 3, 1])
  expected = tf.nn.depthwise_conv2d(images, vertical, [1] * 4, 'SAME')
  expected = tf.nn.depthwise_conv2d(expected, tf.reshape(vertical, [1, 5, 3, 1]), [1] * 4,
                                    'SAME')
  np.testing.assert_allclose(blurred, expected, atol=1e-6)
  assert augmentations.blur_kernel_size(224, 0.1) == 23
  assert augmentations.blur_kernel_size(32, 0.1) == 3


def test_blur_sigma_range():
  # A unit impulse blurred with sigma s keeps exp(0)/sum of its kernel at the centre: the
  # centre value decreases with sigma, so it brackets the drawn sigmas.
  impulse = np.zeros((N, 9, 9, 3), np.float32)
  impulse[:, 4, 4] = 1.0
  out = augmentations.gaussian_blur(tf.constant(impulse), SEED, prob=1.0,
                                    sigma_range=(0.1, 2.0), kernel_size=9).numpy()
  centre = out[:, 4, 4, 0]

  def centre_value(sigma):
    taps = np.exp(-np.arange(-4, 5) ** 2 / (2 * sigma ** 2))
    return (1 / taps.sum()) ** 2

  assert centre.max() <= centre_value(0.1) + 1e-6 and centre.min() >= centre_value(2.0) - 1e-6
  assert centre.min() < centre_value(1.9) and centre.max() > centre_value(0.2)


def test_full_view_output_and_per_image_randomness():
  augment = paper_augment()
  same = tf.tile(colourful_images(1, 16), [32, 1, 1, 1])
  for view_config in (augment.view1, augment.view2):
    out = augmentations.view(same, SEED, augment, view_config).numpy()
    assert out.shape == (32, 16, 16, 3) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert len({out[i].tobytes() for i in range(32)}) > 20  # Not one draw for the batch.


def test_same_seed_same_output_other_seed_other_output():
  augment = paper_augment()
  images = colourful_images(16, 16)
  first = augmentations.view(images, SEED, augment, augment.view2).numpy()
  again = augmentations.view(images, SEED, augment, augment.view2).numpy()
  other = augmentations.view(images, SEED + 1, augment, augment.view2).numpy()
  np.testing.assert_array_equal(first, again)
  assert not np.allclose(first, other)
  crop = augmentations.random_resized_crop(images[0], SEED, 8).numpy()
  np.testing.assert_array_equal(crop, augmentations.random_resized_crop(images[0], SEED, 8))


def test_linear_eval_view_only_flips():
  augment = paper_augment()
  images = colourful_images(200, 8)
  out = augmentations.linear_eval_view(images, SEED, augment).numpy()
  mirrored = np.all(np.isclose(out, images.numpy()[:, :, ::-1]), axis=(1, 2, 3))
  unchanged = np.all(out == images.numpy(), axis=(1, 2, 3))
  assert np.all(mirrored | unchanged) and 0.3 < mirrored.mean() < 0.7
  augment.flip = False
  np.testing.assert_array_equal(augmentations.linear_eval_view(images, SEED, augment), images)
