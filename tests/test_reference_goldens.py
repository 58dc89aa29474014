"""The core against golden numbers from DeepMind's reference code (tests/golden/generate.py).

The golden files were written by the reference's own functions on fixed inputs; the reference is
not needed here. Regenerate with `python tests/golden/generate.py --reference=PATH`.

Tolerances. Initialisation draws the same random numbers through the same Haiku initialisers,
so it is compared bit for bit. Forward passes and updates run the same float32 mathematics
through differently structured XLA programs (a `shard_map` step instead of `pmap`, other fusion),
so sums are taken in other orders: each reduction of n terms may differ by ~n * 2^-24 of the
magnitude of its terms. The networks here reduce over at most a few thousand terms per output
(im2col of 3x3x64 channels, BatchNorm over 8 x 16 x 16 positions), so values agree to ~1e-5 of
their tensor's scale; differences are measured relative to each tensor's largest entry (a single
entry can nearly cancel). LARS' trust ratio and BatchNorm over a batch of 8 are well conditioned;
over 6 updates the differences stay at that level, which a tolerance of 1e-4 of the tensor's scale
covers with a margin of ~10x while any real departure (a bias, an init, a missing statistic
update, an EMA in the wrong place) moves values by 1e-3 or more.
"""

import os

import byol  # configs/byol.py (conftest puts configs/ on the path).
import jax
import numpy as np
import optax
import pytest

from byol_jax.core import byol_experiment, networks, schedules
from byol_jax.runtime import parallel, reference_checkpoint

from golden.inputs import update_batch  # tests/golden/inputs.py
from helpers import assert_trees_close, golden as _golden, golden_tree as _tree  # tests/helpers.py


# Biases of a Linear that feeds a training-mode BatchNorm: their true gradient is exactly zero
# (BN removes any per-channel shift), so what moves them is float32 cancellation noise, whose
# sign and size depend on the summation order. They are compared on the scale of the same
# layer's weights, where the noise (~1e-9 here) is far below any tolerance.
_ZERO_GRADIENT = (('projector/linear', 'b'), ('predictor/linear', 'b'))


def _assert_trees_close(got, want, rtol, what):
  """helpers.assert_trees_close, zero-gradient biases on their layer's weight scale."""
  def scale_of(module, name, tree):
    return float(np.abs(tree[module]['w']).max()) if (module, name) in _ZERO_GRADIENT else None
  assert_trees_close(got, want, rtol, what, scale_of=scale_of if rtol else None)


def _tiny_config(**optimizer):
  """The generator's TINY setting: the reference's TinyResNet, 32/16 heads, 10 classes."""
  config = byol.get_config('imagenet')
  with config.unlocked():
    config.num_classes = 10
    config.batch_size = 8
    config.max_steps = 10
    config.base_target_ema = 0.99
    config.model.encoder = 'tiny_resnet'
    config.model.projector_hidden_size = 32
    config.model.predictor_hidden_size = 32
    config.model.projection_size = 16
    config.optimizer.name = 'lars'
    config.optimizer.base_lr = 2.0
    config.optimizer.warmup_steps = 2
    config.optimizer.weight_decay = 1.5e-6
    config.optimizer.update(optimizer)
  return config


@pytest.fixture(scope='module')
def tiny():
  data = _golden('tiny_network.npz')
  experiment = byol_experiment.ByolExperiment(_tiny_config(), train_examples=80)
  # The reference initialises on its first batch: here the golden images and their mirror.
  batch = {'view1': data['images'], 'view2': data['view2']}
  mesh = parallel.make_mesh(jax.devices()[:1])
  state = experiment.init_from_batch(jax.random.PRNGKey(0), parallel.global_batch(batch, mesh),
                                     mesh)
  return data, experiment, jax.device_get(state)


@pytest.mark.slow
def test_initialisation_is_the_references(tiny):
  data, _, state = tiny
  # Parameters: the same random numbers through the same initialisers, bit for bit.
  _assert_trees_close(state.online_params, _tree(data, 'online_params'), 0., 'online params')
  _assert_trees_close(state.target.params, _tree(data, 'target_params'), 0., 'target params')
  # BatchNorm state: the first batch's statistics, computed (float32 rounding only).
  _assert_trees_close(state.online_state, _tree(data, 'online_state'), 1e-5, 'online state')
  _assert_trees_close(state.target_state, _tree(data, 'target_state'), 1e-5, 'target state')


@pytest.mark.slow
def test_forward_matches_the_reference(tiny):
  data, experiment, state = tiny
  apply = experiment.net.apply
  out1, bn = apply(state.online_params, state.online_state, None, data['images'], True)
  out2, bn = apply(state.online_params, bn, None, data['view2'], True)
  got = {'projection_view1': out1['projection'], 'prediction_view1': out1['prediction'],
         'logits_view1': out1['logits'], 'projection_view2': out2['projection'],
         'prediction_view2': out2['prediction']}
  for name, value in got.items():
    expected = data[f'train_out::{name}']
    np.testing.assert_allclose(value, expected, rtol=0, atol=1e-5 * np.abs(expected).max(),
                               err_msg=name)
  _assert_trees_close(jax.device_get(bn), _tree(data, 'train_state'), 1e-5, 'train_state')
  # Inference mode with the initial statistics, which come from 4 images: each BN divides by
  # sqrt(var + eps) of a 4-sample variance, and channels where that is small amplify the ~1e-6
  # relative rounding of the statistics about tenfold, layer after layer: 1e-4 of the scale.
  out, _ = apply(state.online_params, state.online_state, None, data['images'], False)
  for name in ('projection', 'prediction', 'logits'):
    expected = data[f'eval_out::{name}']
    np.testing.assert_allclose(out[name], expected, rtol=0, atol=1e-4 * np.abs(expected).max(),
                               err_msg=name)


def test_regression_loss_matches_the_reference():
  data = _golden('loss.npz')
  # Rows with a zero or a 1e-7-scaled vector exercise the normalisation's epsilon.
  np.testing.assert_allclose(byol_experiment.regression_loss(data['x'], data['y']), data['out'],
                             rtol=1e-6, atol=1e-6)


def test_schedules_match_the_reference():
  data = _golden('schedules.npz')
  lr = schedules.learning_rate(data['steps'], base_lr=0.3, batch_size=512, total_steps=20,
                               warmup_steps=5)
  tau = schedules.target_ema_decay(data['steps'], base_tau=0.99, total_steps=20)
  np.testing.assert_allclose(lr, data['learning_rate'], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(tau, data['tau'], rtol=1e-6)


@pytest.mark.slow
def test_six_byol_updates_with_lars_match_the_reference():
  data = _golden('update.npz')
  experiment = byol_experiment.ByolExperiment(_tiny_config(), train_examples=80)
  mesh = parallel.make_mesh(jax.devices()[:1])
  first = update_batch(0)
  state = jax.device_get(experiment.init_from_batch(
      jax.random.PRNGKey(0), parallel.global_batch(first, mesh), mesh))
  for prefix, tree in (('init_online_params', state.online_params),
                       ('init_target_params', state.target.params),
                       ('init_online_state', state.online_state),
                       ('init_target_state', state.target_state)):
    _assert_trees_close(tree, _tree(data, prefix), 1e-5 if 'state' in prefix else 0., prefix)
  step = parallel.map_step(experiment.train_step, mesh, donate_state=False)
  logs = {}
  for k in range(6):
    batch = update_batch(k)
    state, metrics = step(parallel.replicate(state, mesh), parallel.global_batch(batch, mesh))
    state, metrics = jax.device_get((state, metrics))
    for ours, theirs in (('loss', 'loss'), ('repr_loss', 'repr_loss'),
                         ('classifier_loss', 'classif_loss'), ('top1', 'top1_accuracy'),
                         ('learning_rate', 'learning_rate'), ('tau', 'tau')):
      logs.setdefault(theirs, []).append(float(metrics[ours]))
    if k == 1:  # `after1_`: after steps 0 and 1 (step 0 has LR 0 in the warmup).
      _assert_trees_close(state.online_params, _tree(data, 'after1_online_params'), 1e-4,
                          'after two steps: online params')
  for name, values in logs.items():
    np.testing.assert_allclose(values, data[f'logs::{name}'], rtol=1e-5, atol=1e-6,
                               err_msg=name)
  assert int(state.step) == 6
  _assert_trees_close(state.online_params, _tree(data, 'online_params'), 1e-4, 'online params')
  _assert_trees_close(state.target.params, _tree(data, 'target_params'), 1e-4, 'target params')
  _assert_trees_close(state.online_state, _tree(data, 'online_state'), 1e-4, 'online BN state')
  _assert_trees_close(state.target_state, _tree(data, 'target_state'), 1e-4, 'target BN state')
  is_trace = lambda x: isinstance(x, optax.TraceState)
  trace = [s for s in jax.tree_util.tree_leaves(state.opt_state, is_leaf=is_trace)
           if is_trace(s)]
  assert len(trace) == 1
  _assert_trees_close(trace[0].trace, _tree(data, 'opt_mu'), 1e-4, 'LARS momentum')


@pytest.mark.slow
def test_resnet50_initialisation_and_forward_match_the_reference():
  data = _golden('resnet50_init.npz')
  config = byol.get_config('imagenet')
  experiment = byol_experiment.ByolExperiment(config, train_examples=1_281_167)
  mesh = parallel.make_mesh(jax.devices()[:1])
  first = {'view1': data['images'], 'view2': data['images'][:, :, ::-1]}
  state = jax.device_get(experiment.init_from_batch(
      jax.random.PRNGKey(0), parallel.global_batch(first, mesh), mesh))
  encoder = {m: v for m, v in state.online_params.items() if m.startswith('encoder/')}
  assert networks.param_count(encoder) == int(data['encoder_param_count']) == 23_508_032
  for prefix, tree in (('online_params', state.online_params),
                       ('online_state', state.online_state)):
    stats = {}
    for key in data.files:
      parts = key.split('::')
      if parts[0] == prefix:
        stats.setdefault(parts[1], {}).setdefault(parts[2], {})[parts[3]] = data[key]
    stats = reference_checkpoint.convert_tree(stats)
    assert sorted(stats) == sorted(tree)
    for module, names in stats.items():
      assert sorted(names) == sorted(tree[module])
      for name, want in names.items():
        value = np.asarray(tree[module][name])
        where = f'{prefix} {module}/{name}'
        assert list(value.shape) == list(want['shape']), where
        flat = value.astype(np.float64).ravel()
        if prefix == 'online_params':  # Drawn: bit for bit.
          np.testing.assert_array_equal(value.ravel()[:16], want['first'], err_msg=where)
          np.testing.assert_allclose(flat.sum(), want['sum'], rtol=1e-9, atol=1e-9,
                                     err_msg=where)
          np.testing.assert_allclose(np.sum(flat * flat), want['sumsq'], rtol=1e-9,
                                     err_msg=where)
        else:  # BatchNorm statistics of the first batch: computed, float32 rounding.
          scale = max(float(np.abs(want['first']).max()), 1e-30)
          np.testing.assert_allclose(value.ravel()[:16], want['first'], rtol=0,
                                     atol=1e-4 * scale, err_msg=where)
          np.testing.assert_allclose(np.sum(flat * flat), want['sumsq'], rtol=1e-4,
                                     atol=1e-12, err_msg=where)
  out, _ = experiment.net.apply(state.online_params, state.online_state, None, data['images'],
                                True)
  for name in ('projection', 'prediction', 'logits'):
    expected = data[f'train_out::{name}_view1']
    # ResNet-50 reductions reach 3x3x512 and 1x1x2048 terms: still ~1e-5 of the scale.
    np.testing.assert_allclose(out[name], expected, rtol=0, atol=1e-4 * np.abs(expected).max(),
                               err_msg=name)
