"""Linear evaluation / fine-tuning steps on a tiny encoder with generated arrays (no TF)."""

import functools

import jax
import ml_collections
import numpy as np
import pytest

import eval as eval_configs  # configs/eval.py (conftest puts configs/ on the path).
from byol_jax.evaluation import drivers, steps
from byol_jax.runtime import export, parallel

NUM_CLASSES, SIZE, BATCH = 4, 8, 32
MODEL = ml_collections.ConfigDict(dict(
    encoder='tiny', width=1.0, resnet_v2=False, cifar_stem=False, bn_decay=0.9, bn_eps=1e-5,
    compute_dtype='float32'))


@functools.lru_cache(maxsize=None)
def _setup(freeze_backbone=True, max_steps=60, base_lr=8.0, devices=2, cross_replica_bn=False):
  """(experiment, mapped train step, mapped eval step, mesh), compiled once per setting.

  The frozen problem gets a large LR so that 60 steps converge (features of a random tiny
  encoder are small).
  """
  config = eval_configs.get_config().copy_and_resolve_references()
  config.unlock()
  config.update(dict(num_classes=NUM_CLASSES, image_size=SIZE, batch_size=BATCH,
                     max_steps=max_steps, freeze_backbone=freeze_backbone,
                     cross_replica_bn=cross_replica_bn))
  config.optimizer.base_lr = base_lr
  mesh = parallel.make_mesh(jax.devices()[:devices])
  experiment = steps.EvalExperiment(config, MODEL, train_examples=1)
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
  return steps.accuracy(eval_fn, parallel.replicate(state, mesh), batches)


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


def test_cross_replica_fine_tuning_on_two_devices_matches_one_device():
  """Cross-replica BatchNorm and the gradient sum make the split batch equal the whole one."""
  images, labels = _separable(64, seed=0)
  two, _ = _train(_setup(False, 2, 0.2, devices=2, cross_replica_bn=True), images, labels,
                  steps=2)
  one, _ = _train(_setup(False, 2, 0.2, devices=1, cross_replica_bn=True), images, labels,
                  steps=2)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                         (two.encoder_params, two.encoder_state, two.head_params),
                         (one.encoder_params, one.encoder_state, one.head_params))


def test_fine_tuning_batchnorm_is_per_device_by_default():
  """The reference fine-tunes with per-device BatchNorm (no cross-replica axis) and evaluates
  with the first device's moving averages: after one step on 2 devices the state is what the
  encoder's training-mode forward gives on device 0's half of the batch alone."""
  images, labels = _separable(64, seed=0)
  experiment, _, _, _ = _setup(False, 2, 0.2, devices=2)
  assert not experiment.cross_replica_bn
  stepped, _ = _train(_setup(False, 2, 0.2, devices=2), images, labels, steps=1)
  params, state = _pretrained_encoder()
  _, expected = experiment.encoder.apply(params, state, None, images[:BATCH // 2], True)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         stepped.encoder_state, jax.device_get(expected))
  synced, _ = _train(_setup(False, 2, 0.2, devices=2, cross_replica_bn=True), images, labels,
                     steps=1)
  differs = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.abs(a - b) > 1e-4)),
                                   synced.encoder_state, stepped.encoder_state)
  assert any(jax.tree_util.tree_leaves(differs))


def test_head_is_a_fresh_haiku_linear_seeded_by_config_seed():
  """hk.Linear's default init (truncated normal, std 1/sqrt(fan_in) before truncation at 2
  std; zero bias), module 'linear', a pure function of config.seed (reference: random_seed)."""
  experiment = _setup()[0]
  head = experiment.init_head(512)
  assert list(head) == ['linear'] and head['linear']['w'].shape == (512, NUM_CLASSES)
  w, b = np.asarray(head['linear']['w']), np.asarray(head['linear']['b'])
  np.testing.assert_array_equal(b, 0)
  assert np.abs(w).max() <= 2 / np.sqrt(512)
  # Std of a normal truncated at +-2 std: 0.8796 x 1/sqrt(512); 2048 draws: ~2% error.
  assert abs(w.std() * np.sqrt(512) - 0.8796) < 0.05
  np.testing.assert_array_equal(w, experiment.init_head(512)['linear']['w'])


def test_balanced_subset_is_balanced_and_reproducible():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, 5000)
  subset = drivers.balanced_subset(labels, 0.1, seed=3)
  counts = np.bincount(labels[subset], minlength=10)
  assert np.all(counts == 50)  # round(0.1 * 5000 / 10).
  assert np.all(np.diff(subset) > 0)  # Sorted, no repeats.
  np.testing.assert_array_equal(subset, drivers.balanced_subset(labels, 0.1, seed=3))
  assert not np.array_equal(subset, drivers.balanced_subset(labels, 0.1, seed=4))
  # A tiny fraction still keeps one example of every class.
  assert len(drivers.balanced_subset(labels, 1e-5, seed=0)) == 10


@pytest.mark.parametrize('preset, protocol, frozen, fraction', [
    ('', 'linear', True, 1.0),
    ('knn', 'knn', True, 1.0),
    ('finetune', 'linear', False, 1.0),
    ('1pct', 'linear', False, 0.01),
    ('knn,10pct', 'knn', False, 0.1),
])
def test_presets(preset, protocol, frozen, fraction):
  config = eval_configs.get_config(preset)
  assert (config.protocol, config.freeze_backbone, config.labelled_fraction) == (
      protocol, frozen, fraction)
  # No data description of its own: it comes from the checkpoint.
  assert config.dataset is None and config.image_size is None and config.num_classes is None
  with pytest.raises(ValueError, match='Unknown preset'):
    eval_configs.get_config('knn,linear')
  with pytest.raises(ValueError, match='no dataset presets'):
    eval_configs.get_config('demo,knn')


# ------------------------------------------------------------------------------------------
# The online classifier of a pretraining run (the reference's pretraining eval).


def _fill(shapes, seed):
  """Params / BN state by shape, with numpy (compiling JAX's initialisers costs seconds): kernels
  normal with std 1/sqrt(fan_in), BN scales and moving variances 1, everything else 0."""
  rng = np.random.default_rng(seed)

  def fill(path, x):
    name = '/'.join(getattr(p, 'key', str(p)) for p in path)
    if name.endswith('/w'):
      return (rng.standard_normal(x.shape) / np.sqrt(np.prod(x.shape[:-1]))).astype(x.dtype)
    ones = name.endswith('/scale') or 'var_ema/' in name
    return (np.ones if ones else np.zeros)(x.shape, x.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _tiny_byol():
  """A ByolExperiment on the tiny encoder at 8 px and random online (params, state)."""
  from byol_jax.core import byol_experiment  # pylint: disable=g-import-not-at-top
  from helpers import tiny_demo_config  # tests/helpers.py  pylint: disable=g-import-not-at-top
  config = tiny_demo_config(SIZE, num_classes=7)
  experiment = byol_experiment.ByolExperiment(config, train_examples=64)
  shapes = jax.eval_shape(lambda x: experiment.net.init(jax.random.PRNGKey(0), x, True),
                          jax.ShapeDtypeStruct((2, SIZE, SIZE, 3), np.float32))
  return experiment, _fill(shapes, seed=3)


def test_online_classifier_counts_are_the_references_summed_eval_scalars():
  """Summed softmax cross-entropy, top-1 and top-5 hits of the `classifier` logits in
  inference mode, over the real (masked-in) examples; the mapped step adds devices' sums."""
  experiment, (params, bn_state) = _tiny_byol()
  rng = np.random.default_rng(0)
  images = rng.random((12, SIZE, SIZE, 3), np.float32)
  labels = rng.integers(0, 7, 12).astype(np.int32)

  @jax.jit
  def logits_and_counts(params, bn_state, images, labels):
    outputs, _ = experiment.net.apply(params, bn_state, None, images, False, online=True)
    return outputs['logits'], steps.online_classifier_counts(
        experiment, params, bn_state, images, labels)

  logits, counts = logits_and_counts(params, bn_state, images, labels)
  logits = np.asarray(logits, np.float64)
  log_softmax = logits - logits.max(-1, keepdims=True)
  log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
  ranks = np.argsort(-logits, axis=-1)
  expected = dict(loss=-log_softmax[np.arange(12), labels].sum(),
                  top1=np.sum(ranks[:, 0] == labels),
                  top5=np.sum(np.any(ranks[:, :5] == labels[:, None], axis=-1)), count=12)
  assert {k: int(counts[k]) for k in ('top1', 'top5', 'count')} == {
      k: int(expected[k]) for k in ('top1', 'top5', 'count')}
  np.testing.assert_allclose(float(counts['loss']), expected['loss'], rtol=1e-5)
  assert 0 < expected['top1'] < expected['top5'] < 12  # Not a degenerate case.

  # Mapped over 2 devices, with 4 padding examples (mask False) that must not count.
  mesh = parallel.make_mesh(jax.devices()[:2])
  step = parallel.map_step(steps.online_eval_step(experiment), mesh,
                           donate_state=False)
  pad = lambda x: np.concatenate([x, np.zeros((4,) + x.shape[1:], x.dtype)])
  batch = dict(images=pad(images), labels=pad(labels), mask=np.arange(16) < 12)
  model = parallel.replicate((params, bn_state), mesh)
  result = steps.accuracy(step, model, [parallel.global_batch(batch, mesh)])
  assert result['count'] == 12
  assert (result['top1'], result['top5']) == (expected['top1'] / 12, expected['top5'] / 12)
  np.testing.assert_allclose(result['loss'], expected['loss'] / 12, rtol=1e-5)


def test_eval_steps_import_no_tensorflow():
  """The pure evaluation functions run where TensorFlow is not installed."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  code = ('import sys; import byol_jax.evaluation.steps, byol_jax.main_loop; '
          'assert not [m for m in sys.modules if m.startswith("tensorflow")]')
  subprocess.run([sys.executable, '-c', code], check=True)


def test_eval_config_refuses_to_score_training_images(tmp_path):
  config = eval_configs.get_config()
  config.checkpoint = str(tmp_path)
  drivers.validate_config(config)  # Unset data settings (from the checkpoint) pass.
  config.data.train_on_validation = True  # configs/byol.py:imagenet (TRAIN_AND_VALID).
  drivers.validate_config(config)
  config.eval_split = 'validation'
  with pytest.raises(ValueError, match='train_on_validation'):
    drivers.validate_config(config)
  config.data.train_on_validation = False
  drivers.validate_config(config)


def test_encoder_embed_gives_pooled_features_in_inference_mode():
  params, state = _pretrained_encoder()
  images, _ = _separable(4, seed=0)
  features = steps.encoder_embed(MODEL)(params, state, images)
  expected, _ = _setup()[0].encoder.apply(params, state, None, images, False)
  assert features.shape == expected.shape and features.shape[0] == 4
  np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)
