"""LR warmup + cosine with batch/256 scaling, and the tau cosine schedule, against formulas."""

import math

import numpy as np
import pytest

from byol_jax import schedules


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
