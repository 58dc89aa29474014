"""Data, augmentation and linear-evaluation code against golden files from the reference code.

`tests/golden/generate.py` runs DeepMind's BYOL code on fixed inputs and writes the files read
here; the reference itself is not needed (nor imported). Each test skips, naming the file, when
its golden file is missing, and the linear-evaluation tests skip while the project has no
`tiny_resnet` encoder (the reference's TinyResNet).

* crop_windows.npz: the reference's random-resized-crop sampler cannot be replayed (it draws
  from TF's stateful global generator), so its 4,000 windows per image size are compared with
  4,000 of ours IN DISTRIBUTION: means of area fraction, log aspect ratio, fraction of windows
  clipped to the image, and relative offsets, each within 5 standard errors of the difference
  of two independent sample means. The centre-crop windows are compared exactly.
* augment_ops.npz: the reference's colour / blur / solarize ops with explicit strengths, to a
  float32 tolerance.
* linear_eval.npz: the reference EvalExperiment's init and 3 updates of linear evaluation and of
  fine-tuning from the same TinyResNet backbone.
"""

import math
import os

import eval as eval_configs  # configs/eval.py (conftest puts configs/ on the path).
import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from byol_jax.data import augmentations
from byol_jax.evaluation import drivers, steps
from byol_jax.core import networks
from byol_jax.runtime import parallel

from helpers import assert_trees_close, golden, golden_tree  # tests/helpers.py


# ------------------------------------------------------------------------------------------
# Crops.


def _window_statistics(windows, height, width):
  """Per-window quantities whose means characterise a crop sampler."""
  y, x, h, w = (np.asarray(v, np.float64) for v in windows)
  stats = dict(area=h * w / (height * width), log_aspect=np.log(w / h),
               clipped=((h == height) | (w == width)).astype(np.float64))
  # Offsets uniform over the fitting positions: offset / room ~ U[0, 1] (discrete), mean 1/2.
  for name, offset, room in (('offset_y', y, height - h), ('offset_x', x, width - w)):
    stats[name] = offset[room > 0] / room[room > 0]
  return stats


@pytest.mark.parametrize('height, width', [(48, 64), (375, 500)])
def test_crop_windows_are_distributed_like_the_references(height, width):
  """Two independent samples of n = 4000 windows (the reference's, ours): for each statistic
  the difference of the means has standard error sqrt(var_ref / n_ref + var_ours / n_ours)
  (~0.0037 for the area fraction, whose std is ~0.235; ~0.0046 for the offsets' ~0.29); a
  sampler that agrees lies within 5 of them (a false alarm once in ~1.7 million). The old
  10-try sampler's mean area (0.43 vs 0.51) is ~20 standard errors away."""
  theirs_windows = golden('crop_windows.npz')[f'windows_{height}x{width}']
  theirs = _window_statistics(theirs_windows.T, height, width)
  ours_windows = augmentations.sample_crop_windows(
      tf.constant([3, 5], tf.int64), height, width, len(theirs_windows), (0.08, 1.0),
      (3 / 4, 4 / 3), 'reference')
  ours = _window_statistics([t.numpy() for t in ours_windows], height, width)
  assert np.all(theirs_windows[:, 2:] >= 1)
  for key in theirs:
    a, b = theirs[key], ours[key]
    se = math.sqrt(a.var() / len(a) + b.var() / len(b))
    assert abs(a.mean() - b.mean()) <= 5 * se, (key, a.mean(), b.mean(), se)
  assert 0.50 < theirs['area'].mean() < 0.53  # The issue's ~0.513.


def test_centre_windows_equal_the_references():
  data = golden('crop_windows.npz')
  for (height, width), expected in zip(data['center_sizes'], data['center_windows']):
    window = augmentations._center_window(  # pylint: disable=protected-access
        tf.constant(int(height)), tf.constant(int(width)), augmentations.CENTER_CROP_FRACTION)
    assert [int(v) for v in window] == expected.tolist(), (height, width)


# ------------------------------------------------------------------------------------------
# Colour, blur, solarize.

# Images are in [0, 1]; each op is a handful of float32 operations (HSV round trips ~20, a
# contrast mean over 1,024 pixels, a blur of 23 taps per axis), each rounding by at most
# 2^-24 of values <= 1, and both sides round differently (TF vs JAX kernels, another formula
# for the saturation scaling): a few 1e-7, bounded by ~50 x 2^-24 = 3e-6. An op that differs
# in substance (another grayscale weighting, a mean over all channels, clipping at another
# point, a kernel off by one tap) moves values by 1e-3 or more.
OPS_ATOL = 3e-6


def test_colour_ops_equal_the_references():
  data = golden('augment_ops.npz')
  images = tf.constant(data['images'])
  # Brightness and contrast: the reference clips after every jitter op; our ops clip.
  cases = {
      'brightness': augmentations.adjust_brightness(images, tf.constant(data['brightness::delta'])),
      'contrast': augmentations.adjust_contrast(images, tf.constant(data['contrast::factor'])),
      'saturation': augmentations.adjust_saturation(images,
                                                    tf.constant(data['saturation::factor'])),
      'hue': augmentations.adjust_hue(images, tf.constant(data['hue::delta'])),
      'grayscale': augmentations.to_grayscale(images, tf.constant([0, 0], tf.int64), prob=1.0),
      'solarize': augmentations.solarize(images, tf.constant([0, 0], tf.int64), prob=1.0),
  }
  for op, ours in cases.items():
    np.testing.assert_allclose(ours, np.clip(data[f'{op}::out'], 0, 1), rtol=0, atol=OPS_ATOL,
                               err_msg=op)
  # Saturation x2.5 of image 0 pushes S past 1: both clip S, not the colours.
  assert np.abs(np.clip(data['saturation::out'], 0, 1) - data['images']).max() > 0.1


def test_blur_equals_the_references():
  data = golden('augment_ops.npz')
  # 32 px: the reference's kernel "size" 32 / 10 = 3.2 means radius int(1.6) = 1, 3 taps.
  kernel_size = augmentations.blur_kernel_size(32, 0.1)
  assert kernel_size == int(data['blur::effective_kernel_size']) == 3
  for prefix, images, size in (('blur', data['images'], kernel_size),
                               ('blur64', data['blur64::images'], 23)):
    ours = augmentations._blur(  # pylint: disable=protected-access
        tf.constant(images), tf.constant(data[f'{prefix}::sigma']), size)
    np.testing.assert_allclose(ours, data[f'{prefix}::out'], rtol=0, atol=OPS_ATOL,
                               err_msg=prefix)


def test_flip_mirrors_the_width_axis_like_the_reference():
  data = golden('augment_ops.npz')
  images, flipped, out = data['images'], data['flip::flipped'], data['flip::out']
  ours = augmentations.flip(tf.constant(images), tf.constant([0, 0], tf.int64), prob=1.0)
  np.testing.assert_array_equal(np.asarray(ours)[flipped], out[flipped])
  np.testing.assert_array_equal(images[~flipped], out[~flipped])


# ------------------------------------------------------------------------------------------
# Linear evaluation and fine-tuning.


def _linear_eval_golden():
  data = golden('linear_eval.npz')
  if 'tiny_resnet' not in networks.ENCODERS:
    pytest.skip("networks.py has no 'tiny_resnet' encoder (the reference's TinyResNet) yet")
  return data


TINY_RESNET = ml_collections.ConfigDict(dict(
    encoder='tiny_resnet', width=1.0, resnet_v2=False, cifar_stem=False, bn_decay=0.9,
    bn_eps=1e-5, compute_dtype='float32', zero_init_last_bn=True))


def _experiment(freeze_backbone):
  """The generator's setting: batch 8, 10 steps, base LR 0.2, 10 classes, seed 0."""
  config = eval_configs.get_config().copy_and_resolve_references()
  with config.unlocked():
    config.update(dict(num_classes=10, image_size=32, batch_size=8, max_steps=10, seed=0,
                       freeze_backbone=freeze_backbone))
  assert config.optimizer.base_lr == 0.2 and config.optimizer.nesterov
  assert not config.cross_replica_bn  # The reference's per-device BatchNorm.
  return steps.EvalExperiment(config, TINY_RESNET, train_examples=1)


def _run(data, freeze_backbone, devices):
  experiment = _experiment(freeze_backbone)
  state = experiment.init(golden_tree(data, 'backbone_params'), golden_tree(data, 'backbone_state'), 32)
  mesh = parallel.make_mesh(jax.devices()[:devices])
  step_fn = parallel.map_step(experiment.train_step, mesh)
  state = parallel.replicate(state, mesh)
  losses = []
  for k in range(3):
    batch = dict(images=data[f'steps::{k}::images'], labels=data[f'steps::{k}::labels'])
    state, metrics = step_fn(state, parallel.global_batch(batch, mesh))
    losses.append(float(metrics['loss']))
  return jax.device_get(state), np.array(losses)


def _delta(after, before):
  return {m: {n: np.asarray(v) - before[m][n] for n, v in after[m].items()} for m in after}


def test_linear_head_init_equals_the_references():
  """A separate hk.transform of hk.Linear(10) initialised from PRNGKey(0): the same Haiku
  initialiser on the same key, so bit for bit."""
  data = _linear_eval_golden()
  head = _experiment(True).init_head(feature_size=8)
  want = golden_tree(data, 'init_classif')
  assert sorted(head) == sorted(want) == ['linear']
  for name in ('w', 'b'):
    np.testing.assert_array_equal(head['linear'][name], want['linear'][name])


# Tolerance of the three updates. The backbone forward runs the same float32 mathematics through
# a differently fused XLA program; its largest reductions (BatchNorm statistics over 8 x 16 x 16
# positions, the 3 x 3 x 64 convolution taps) have n <= 2,048 terms, so features agree within
# n x 2^-24 ~ 1.2e-4 of their scale at worst (~sqrt(n) x 2^-24 ~ 3e-6 typically). The head's
# gradient is linear in the features, and 3 SGD steps accumulate 3 such errors: the UPDATES
# (params after minus params before) are compared to 5e-4 of their own scale, the worst case with
# a margin (measured on x86-64: 3e-7 for linear evaluation, 2e-5 for fine-tuning, whose
# backbone gradients pass through training-mode BatchNorm). Losses: 1e-5 relative (measured
# 7e-7). A real difference moves the updates by far more: momentum without Nesterov by 0.2 of
# their scale, the LR schedule one step late by 0.06.
UPDATE_ATOL = 5e-4


@pytest.mark.parametrize('devices', [1, 2])
def test_linear_eval_updates_equal_the_references(devices):
  """Frozen backbone in inference mode; on 1 device (the generator's) and split over 2 (the
  global batch mean makes them equal)."""
  data = _linear_eval_golden()
  state, losses = _run(data, freeze_backbone=True, devices=devices)
  init = golden_tree(data, 'init_classif')
  assert_trees_close(_delta(state.head_params, init), _delta(golden_tree(data, 'classif'), init),
                UPDATE_ATOL, 'head update')
  np.testing.assert_allclose(losses, data['train_loss'], rtol=1e-5)
  assert_trees_close(state.encoder_params, golden_tree(data, 'backbone_params'), 0, 'frozen params')
  assert_trees_close(state.encoder_state, golden_tree(data, 'backbone_state'), 0, 'frozen state')


@pytest.mark.slow
def test_fine_tuning_updates_equal_the_references():
  """Backbone trained, BatchNorm in training mode per device, on the generator's one device."""
  data = _linear_eval_golden()
  state, losses = _run(data, freeze_backbone=False, devices=1)
  init = golden_tree(data, 'init_classif')
  assert_trees_close(_delta(state.head_params, init), _delta(golden_tree(data, 'ft_classif'), init),
                UPDATE_ATOL, 'head update')
  backbone = golden_tree(data, 'backbone_params')
  assert_trees_close(_delta(state.encoder_params, backbone),
                _delta(golden_tree(data, 'ft_backbone_params'), backbone), UPDATE_ATOL,
                'backbone update')
  assert_trees_close(state.encoder_state, golden_tree(data, 'ft_backbone_state'), UPDATE_ATOL,
                'backbone BatchNorm state')
  np.testing.assert_allclose(losses, data['ft_train_loss'], rtol=1e-5)
