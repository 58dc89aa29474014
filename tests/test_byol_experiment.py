"""The BYOL step: loss formula, EMA outside the gradient, stop-gradients, 1 vs 2 devices."""

import byol  # configs/byol.py (conftest puts configs/ on the path).
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from byol_jax.core import byol_experiment
from byol_jax.runtime import parallel


def _config(optimizer='lars', batch_size=8):
  config = byol.get_config('demo')
  with config.unlocked():
    config.model.encoder = 'tiny'
    config.model.projector_hidden_size = 32
    config.model.predictor_hidden_size = 32
    config.model.projection_size = 16
    config.batch_size = batch_size
    config.max_steps = 10
    config.optimizer.name = optimizer
    config.optimizer.base_lr = 1.0
    config.optimizer.warmup_steps = 0  # A non-zero LR from the first step.
  return config


def _batch(seed=0, n=8, size=8):
  rng = np.random.RandomState(seed)
  return dict(view1=rng.rand(n, size, size, 3).astype(np.float32),
              view2=rng.rand(n, size, size, 3).astype(np.float32),
              labels=rng.randint(0, 10, n).astype(np.int32))


_STEPS = {}


def _run(experiment, state, batch, devices):
  mesh = parallel.make_mesh(jax.devices()[:devices])
  key = (id(experiment), devices)  # One compilation per experiment and mesh.
  if key not in _STEPS:
    _STEPS[key] = parallel.map_step(experiment.train_step, mesh, donate_state=False)
  step = _STEPS[key]
  new_state, metrics = step(parallel.replicate(state, mesh), parallel.global_batch(batch, mesh))
  return jax.device_get(new_state), jax.device_get(metrics)


@pytest.fixture(scope='module')
def setup():
  config = _config()
  experiment = byol_experiment.ByolExperiment(config, train_examples=80)
  state = experiment.init(jax.random.PRNGKey(0), image_size=8)
  return config, experiment, state


def test_regression_loss_is_two_minus_two_cosine():
  rng = np.random.RandomState(0)
  x, y = rng.randn(5, 7), rng.randn(5, 7)
  cos = np.sum(x * y, -1) / np.linalg.norm(x, axis=-1) / np.linalg.norm(y, axis=-1)
  np.testing.assert_allclose(byol_experiment.regression_loss(x, y), 2 - 2 * cos, rtol=1e-5)
  # Scale invariance: only directions matter.
  np.testing.assert_allclose(byol_experiment.regression_loss(3 * x, 0.1 * y), 2 - 2 * cos,
                             rtol=1e-5)


def test_online_and_target_start_from_different_keys(setup):
  _, _, state = setup
  w_online = state.online_params['encoder/conv_0']['w']
  w_target = state.target.params['encoder/conv_0']['w']
  assert not np.allclose(w_online, w_target)


def test_target_copy_starts_the_target_as_the_online_network():
  config = _config()
  with config.unlocked():
    config.target_init = 'copy'
  state = byol_experiment.ByolExperiment(config, train_examples=80).init(
      jax.random.PRNGKey(0), image_size=8)
  for online, target in zip(jax.tree.leaves(state.online_params),
                            jax.tree.leaves(state.target.params)):
    np.testing.assert_array_equal(online, target)


def test_pytorch_init_draws_kernels_and_biases_uniform_in_one_over_root_fan_in(setup):
  params = {'conv': {'w': np.zeros((3, 3, 64, 128), np.float32)},
            'linear': {'w': np.zeros((256, 512), np.float32), 'b': np.zeros(512, np.float32)},
            'batch_norm': {'scale': np.ones(8, np.float32), 'offset': np.zeros(8, np.float32)}}
  drawn = byol_experiment.pytorch_default_init(params, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(drawn['batch_norm']['scale'], 1.0)  # Norms untouched.
  np.testing.assert_array_equal(drawn['batch_norm']['offset'], 0.0)
  for values, fan_in in ((drawn['conv']['w'], 3 * 3 * 64), (drawn['linear']['w'], 256),
                         (drawn['linear']['b'], 256)):
    bound = 1 / np.sqrt(fan_in)
    assert np.abs(values).max() <= bound and values.dtype == np.float32
    # U(-a, a) has std a/sqrt(3); to 5 standard errors of a sample std (var of x^2: 4a^4/45).
    assert abs(values.std() / (bound / np.sqrt(3)) - 1) < 5 * np.sqrt(0.2 / values.size)
  # Through the experiment: every kernel and bias redrawn, online and target from their keys.
  _, _, reference = setup
  config = _config()
  with config.unlocked():
    config.model.init = 'pytorch'
  state = byol_experiment.ByolExperiment(config, train_examples=80).init(
      jax.random.PRNGKey(0), image_size=8)
  for name, module in state.online_params.items():
    for leaf in set(module) & {'w', 'b'}:
      bound = 1 / np.sqrt(np.prod(module['w'].shape[:-1]))
      assert np.abs(module[leaf]).max() <= bound
      assert not np.array_equal(module[leaf], reference.online_params[name][leaf]), name
  assert not np.allclose(state.online_params['projector/linear']['w'],
                         state.target.params['projector/linear']['w'])
  with pytest.raises(ValueError, match='model.init'):
    config.model.init = 'glorot'
    byol_experiment.init_settings(config)


@pytest.mark.slow
def test_step_loss_is_the_symmetric_sum(setup):
  config, experiment, state = setup
  batch = _batch()
  _, metrics = _run(experiment, state, batch, devices=1)
  apply = experiment.net.apply
  out = {}
  for name, params, bn in (('online', state.online_params, state.online_state),
                           ('target', state.target.params, state.target_state)):
    for view in ('view1', 'view2'):
      out[name, view], bn = apply(params, bn, None, batch[view], True)
  loss = lambda p, t: byol_experiment.regression_loss(p['prediction'], t['projection'])
  expected = np.mean(loss(out['online', 'view1'], out['target', 'view2'])
                     + loss(out['online', 'view2'], out['target', 'view1']))
  np.testing.assert_allclose(metrics['repr_loss'], expected, rtol=1e-5)
  assert 0 < metrics['repr_loss'] <= 8.  # Each direction is in [0, 4].


@pytest.mark.slow
def test_target_is_an_ema_applied_after_the_update(setup):
  config, experiment, state = setup
  new_state, metrics = _run(experiment, state, _batch(), devices=1)
  tau = float(metrics['tau'])
  np.testing.assert_allclose(tau, config.base_target_ema, rtol=1e-6)  # tau at step 0.
  expected = jax.tree_util.tree_map(lambda t, o: t + (1 - tau) * (o - t), state.target.params,
                                    new_state.online_params)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                         new_state.target.params, expected)
  assert int(new_state.step) == 1


def test_batchnorm_statistics_are_not_averaged_into_the_target(setup):
  _, experiment, state = setup
  new_state, _ = _run(experiment, state, _batch(), devices=1)
  key = 'encoder/bn_0/~/mean_ema'
  # The target's BN state moved by its own forward passes, not towards the online one.
  assert not np.allclose(new_state.target_state[key]['average'],
                         new_state.online_state[key]['average'])
  assert not np.allclose(new_state.target_state[key]['average'],
                         state.target_state[key]['average'])


@pytest.mark.slow
def test_no_gradient_reaches_the_target_or_the_encoder_from_the_probe(setup):
  config, experiment, state = setup
  batch = _batch()
  apply = experiment.net.apply

  def classifier_loss(online_params):
    out, _ = apply(online_params, state.online_state, None, batch['view1'], True)
    return jnp.mean(out['logits'])
  grads = jax.grad(classifier_loss)(state.online_params)
  assert all(np.all(g == 0) for g in jax.tree_util.tree_leaves(grads['encoder/conv_0']))
  assert np.any(grads['classifier']['w'] != 0)

  def byol_loss(target_params):
    o, _ = apply(state.online_params, state.online_state, None, batch['view1'], True)
    t, _ = apply(target_params, state.target_state, None, batch['view2'], True, online=False)
    return jnp.mean(byol_experiment.regression_loss(o['prediction'], t['projection']))
  target_grads = jax.grad(byol_loss)(state.target.params)
  assert all(np.all(g == 0) for g in jax.tree_util.tree_leaves(target_grads))


@pytest.mark.slow
@pytest.mark.parametrize('optimizer', ['lars', 'adamw'])
def test_two_devices_give_the_one_device_update(optimizer):
  experiment = byol_experiment.ByolExperiment(_config(optimizer), train_examples=80)
  state = experiment.init(jax.random.PRNGKey(0), image_size=8)
  batch = _batch()
  one, m1 = _run(experiment, state, batch, devices=1)
  two, m2 = _run(experiment, state, batch, devices=2)
  for key in m1:
    np.testing.assert_allclose(m1[key], m2[key], rtol=1e-5, atol=1e-6)
  if optimizer == 'adamw':
    # Adam divides by sqrt(v), so a parameter whose true gradient is 0 takes a sign(noise)-sized
    # step: compare the optimizer's first moment instead, which is linear in the gradient.
    one_mu, two_mu = one.opt_state[0].mu, two.opt_state[0].mu
    # The bias of a Linear feeding a training-mode BatchNorm has an exactly zero gradient (BN
    # removes any per-channel shift); what is computed there is float32 cancellation noise of
    # the batch sum, which differs with the summation order. Its size is set by the terms that
    # cancel, i.e. the same layer's weight gradient: with a few hundred terms of relative
    # rounding 6e-8 each, the noise is < 1e-5 of the weight moment's scale on any CPU.
    for head in ('projector', 'predictor'):
      for mu in (one_mu, two_mu):
        bias, weight = mu[f'{head}/linear']['b'], mu[f'{head}/linear']['w']
        assert np.abs(bias).max() <= 1e-5 * np.abs(weight).max()
      for mu in (one_mu, two_mu):
        del mu[f'{head}/linear']['b']
    # Every other leaf carries a real gradient: relative agreement, scaled by each tensor's
    # largest entry (single entries may nearly cancel).
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max()),
        one_mu, two_mu)
    return
  # float32 reductions in another order (per-device BN moments, psum of gradients): ~1e-6.
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                         one, two)
  # The update moved the parameters far more than the tolerance (not two no-ops). Biases and
  # BN parameters take plain momentum-SGD steps, so a gradient summed instead of averaged over
  # devices would show there (LARS' trust ratio hides gradient scale for the weights).
  moved = np.abs(one.online_params['projector/batch_norm']['offset']
                 - state.online_params['projector/batch_norm']['offset'])
  assert moved.max() > 1e-3


def test_collapse_metric():
  def metric(z):
    f = jax.shard_map(byol_experiment._collapse_metric, mesh=parallel.make_mesh(),
                      in_specs=jax.sharding.PartitionSpec(byol_experiment.AXIS),
                      out_specs=jax.sharding.PartitionSpec())
    return float(f(z))
  rng = np.random.RandomState(0)
  healthy = metric(rng.randn(4096, 64).astype(np.float32))
  np.testing.assert_allclose(healthy, 1 / np.sqrt(64), rtol=0.05)
  collapsed = metric(np.tile(rng.randn(1, 64), (4096, 1)).astype(np.float32))
  assert collapsed < 1e-3


def test_batch_not_divisible_by_devices_is_a_clear_error():
  with pytest.raises(ValueError, match='multiple of the device count'):
    parallel.check_batch_size(7, parallel.make_mesh())
