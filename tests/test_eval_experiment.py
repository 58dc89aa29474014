"""Linear evaluation / fine-tuning steps on a tiny encoder with generated arrays (no TF)."""

import functools

import jax
import ml_collections
import numpy as np
import pytest

import eval as eval_configs  # configs/eval.py (conftest puts configs/ on the path).
from byol_jax import eval_experiment, export, parallel

NUM_CLASSES, SIZE, BATCH = 4, 8, 32
MODEL = ml_collections.ConfigDict(dict(
    encoder='tiny', width=1.0, resnet_v2=False, cifar_stem=False, bn_decay=0.9, bn_eps=1e-5,
    compute_dtype='float32'))


@functools.lru_cache(maxsize=None)
def _setup(freeze_backbone=True, max_steps=60, base_lr=8.0, devices=2):
  """(experiment, mapped train step, mapped eval step, mesh), compiled once per setting.

  The frozen problem gets a large LR so that 60 steps converge (features of a random tiny
  encoder are small).
  """
  config = eval_configs.get_config('demo').copy_and_resolve_references()
  config.unlock()
  config.update(dict(num_classes=NUM_CLASSES, image_size=SIZE, batch_size=BATCH,
                     max_steps=max_steps, freeze_backbone=freeze_backbone))
  config.optimizer.base_lr = base_lr
  mesh = parallel.make_mesh(jax.devices()[:devices])
  experiment = eval_experiment.EvalExperiment(config, MODEL, train_examples=1)
  return (experiment, parallel.map_step(experiment.train_step, mesh),
          parallel.map_step(experiment.eval_step, mesh, donate_state=False), mesh)


def _separable(n, seed):
  """Each class is a flat colour plus noise: trivially separable by any random encoder."""
  rng = np.random.default_rng(seed)
  colours = np.array([[.9, .1, .1], [.1, .9, .1], [.1, .1, .9], [.5, .5, .5]], np.float32)
  labels = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
  images = colours[labels][:, None, None, :] + 0.05 * rng.standard_normal((n, SIZE, SIZE, 3))
  return np.clip(images, 0, 1).astype(np.float32), labels


def _pretrained_encoder():
  """A random tiny encoder standing in for a checkpoint (params + BN state).

  Filled with numpy by shape: compiling JAX's random initialisers costs seconds on a busy CPU.
  """
  rng = np.random.default_rng(1)
  shapes = jax.eval_shape(
      lambda x: export.make_encoder_fn(MODEL).init(jax.random.PRNGKey(0), x, True),
      jax.ShapeDtypeStruct((2, SIZE, SIZE, 3), np.float32))

  def fill(path, x):
    name = '/'.join(getattr(p, 'key', str(p)) for p in path)
    if name.endswith('/w'):  # He-style conv kernel.
      return (rng.standard_normal(x.shape) / np.sqrt(np.prod(x.shape[:-1]))).astype(x.dtype)
    ones = name.endswith('/scale') or 'var_ema/' in name  # BN scale 1, moving variance 1.
    return (np.ones if ones else np.zeros)(x.shape, x.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _train(setup, images, labels, steps):
  experiment, step_fn, _, mesh = setup
  state = experiment.init(*_pretrained_encoder(), SIZE)
  state = parallel.replicate(state, mesh)
  for step in range(steps):
    start = (step * BATCH) % (len(labels) - BATCH + 1)
    batch = dict(images=images[start:start + BATCH], labels=labels[start:start + BATCH])
    state, metrics = step_fn(state, parallel.global_batch(batch, mesh))
  return jax.device_get(state), metrics


def _held_out_accuracy(setup, state, images, labels):
  _, _, eval_fn, mesh = setup
  # The last batch is padded with wrong labels that the mask must exclude.
  pad = (-len(labels)) % BATCH + BATCH // 2
  images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], np.float32)])
  mask = np.arange(len(images)) < len(labels)
  labels = np.concatenate([labels, np.full(pad, 3, np.int32)])
  batches = (parallel.global_batch(dict(images=images[i:i + BATCH], labels=labels[i:i + BATCH],
                                        mask=mask[i:i + BATCH]), mesh)
             for i in range(0, len(labels), BATCH))
  return eval_experiment.accuracy(eval_fn, parallel.replicate(state, mesh), batches)


def test_linear_eval_separates_separable_classes():
  images, labels = _separable(512, seed=0)
  state, metrics = _train(_setup(), images, labels, steps=60)
  test_images, test_labels = _separable(200, seed=1)
  result = _held_out_accuracy(_setup(), state, test_images, test_labels)
  assert result['count'] == 200
  assert result['top1'] >= 0.97, result
  assert result['top5'] == 1.0
  assert np.isfinite(float(metrics['loss']))


def test_linear_eval_stays_at_chance_on_random_labels():
  images, _ = _separable(512, seed=0)
  rng = np.random.default_rng(2)
  random_labels = rng.integers(0, NUM_CLASSES, 512).astype(np.int32)
  state, _ = _train(_setup(), images, random_labels, steps=60)
  test_images, _ = _separable(400, seed=1)
  test_labels = rng.integers(0, NUM_CLASSES, 400).astype(np.int32)
  result = _held_out_accuracy(_setup(), state, test_images, test_labels)
  assert 0.15 <= result['top1'] <= 0.37, result  # Chance is 0.25; 400 examples: std ~0.02.


def test_frozen_encoder_is_untouched_and_fine_tuning_moves_it():
  images, labels = _separable(64, seed=0)
  before_params, before_state = _pretrained_encoder()
  frozen, _ = _train(_setup(), images, labels, steps=3)
  jax.tree_util.tree_map(np.testing.assert_array_equal, frozen.encoder_params, before_params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, frozen.encoder_state, before_state)
  assert any(np.any(w != 0) for w in jax.tree_util.tree_leaves(frozen.head_params))

  tuned, _ = _train(_setup(False, 2, 0.2), images, labels, steps=2)
  changed = jax.tree_util.tree_map(lambda a, b: bool(np.any(a != b)), tuned.encoder_params,
                                   before_params)
  assert all(jax.tree_util.tree_leaves(changed))
  moved_stats = jax.tree_util.tree_map(lambda a, b: bool(np.any(a != b)), tuned.encoder_state,
                                       before_state)
  assert any(jax.tree_util.tree_leaves(moved_stats))


def test_fine_tuning_on_two_devices_matches_one_device():
  """Cross-replica BatchNorm and the gradient sum make the split batch equal the whole one."""
  images, labels = _separable(64, seed=0)
  two, _ = _train(_setup(False, 2, 0.2, devices=2), images, labels, steps=2)
  one, _ = _train(_setup(False, 2, 0.2, devices=1), images, labels, steps=2)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                         (two.encoder_params, two.encoder_state, two.head_params),
                         (one.encoder_params, one.encoder_state, one.head_params))


def test_balanced_subset_is_balanced_and_reproducible():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, 5000)
  subset = eval_experiment.balanced_subset(labels, 0.1, seed=3)
  counts = np.bincount(labels[subset], minlength=10)
  assert np.all(counts == 50)  # round(0.1 * 5000 / 10).
  assert np.all(np.diff(subset) > 0)  # Sorted, no repeats.
  np.testing.assert_array_equal(subset, eval_experiment.balanced_subset(labels, 0.1, seed=3))
  assert not np.array_equal(subset, eval_experiment.balanced_subset(labels, 0.1, seed=4))
  # A tiny fraction still keeps one example of every class.
  assert len(eval_experiment.balanced_subset(labels, 1e-5, seed=0)) == 10


@pytest.mark.parametrize('preset, protocol, frozen, fraction', [
    ('imagenet', 'linear', True, 1.0),
    ('demo,knn', 'knn', True, 1.0),
    ('cifar10,finetune', 'linear', False, 1.0),
    ('imagenet,1pct', 'linear', False, 0.01),
])
def test_presets(preset, protocol, frozen, fraction):
  config = eval_configs.get_config(preset)
  assert (config.protocol, config.freeze_backbone, config.labelled_fraction) == (
      protocol, frozen, fraction)
  with pytest.raises(ValueError, match='Unknown preset'):
    eval_configs.get_config('demo,cifar10')
