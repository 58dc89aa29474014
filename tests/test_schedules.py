"""LR warmup + cosine with batch/256 scaling, the tau cosine schedule, the paper's table rows."""

import math

import byol  # configs/byol.py (conftest puts configs/ on the path).
import numpy as np
import pytest

from byol_jax.core import byol_experiment, schedules


def test_learning_rate_warmup_then_cosine():
  kw = dict(base_lr=0.2, batch_size=4096, total_steps=1000, warmup_steps=100)
  scaled = 0.2 * 4096 / 256
  assert float(schedules.learning_rate(0, **kw)) == 0.
  np.testing.assert_allclose(schedules.learning_rate(50, **kw), scaled * 50 / 100, rtol=1e-6)
  np.testing.assert_allclose(schedules.learning_rate(100, **kw), scaled, rtol=1e-6)
  for k in (250, 550, 999):
    expected = scaled * 0.5 * (1 + math.cos(math.pi * (k - 100) / 900))
    np.testing.assert_allclose(schedules.learning_rate(k, **kw), expected, rtol=1e-5,
                               atol=1e-7)
  np.testing.assert_allclose(schedules.learning_rate(1000, **kw), 0., atol=1e-6)


def test_learning_rate_without_warmup_starts_at_peak():
  np.testing.assert_allclose(
      schedules.learning_rate(0, base_lr=1.0, batch_size=256, total_steps=10, warmup_steps=0),
      1.0, rtol=1e-6)


@pytest.mark.parametrize('base_tau', [0.99, 0.996])
def test_target_ema_decay_cosine_from_base_to_one(base_tau):
  K = 500
  np.testing.assert_allclose(schedules.target_ema_decay(0, base_tau=base_tau, total_steps=K),
                             base_tau, rtol=1e-7)
  np.testing.assert_allclose(schedules.target_ema_decay(K, base_tau=base_tau, total_steps=K),
                             1., rtol=1e-7)
  for k in (1, 125, 250, 400):
    expected = 1 - (1 - base_tau) * (math.cos(math.pi * k / K) + 1) / 2
    np.testing.assert_allclose(
        schedules.target_ema_decay(k, base_tau=base_tau, total_steps=K), expected, rtol=1e-6)


@pytest.mark.parametrize('epochs,row', [(40, (0.45, 1e-6, 0.97)), (100, (0.45, 1e-6, 0.99)),
                                        (300, (0.3, 1e-6, 0.99)), (1000, (0.2, 1.5e-6, 0.996))])
def test_every_row_of_the_paper_table_is_reachable_by_epochs(epochs, row):
  config = byol.get_config('imagenet')
  with config.unlocked():
    config.num_epochs = epochs
  assert schedules.byol_hyperparameters(config) == row
  experiment = byol_experiment.ByolExperiment(config, train_examples=1_281_167)
  assert experiment.total_steps == epochs * 1_281_167 // 4096
  np.testing.assert_allclose(experiment.tau_schedule(0), row[2], rtol=1e-6)
  peak = row[0] * 4096 / 256
  np.testing.assert_allclose(experiment.lr_schedule(experiment.warmup_steps), peak, rtol=1e-6)


def test_explicit_values_override_the_row_and_unknown_epochs_are_a_clear_error():
  config = byol.get_config('imagenet')
  with config.unlocked():
    config.num_epochs = 300
    config.optimizer.base_lr = 0.25
  assert schedules.byol_hyperparameters(config) == (0.25, 1e-6, 0.99)
  with config.unlocked():
    config.num_epochs = 200
  with pytest.raises(ValueError, match='num_epochs=200 has no row'):
    schedules.byol_hyperparameters(config)
  # Presets with their own values do not depend on the table.
  cifar = byol.get_config('cifar10')
  with cifar.unlocked():
    cifar.num_epochs = 200
  assert schedules.byol_hyperparameters(cifar) == (1.0, 1e-5, 0.99)
