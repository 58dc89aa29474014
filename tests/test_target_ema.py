"""The target EMA: formula, tau from the schedule, no gradient through it."""

import jax
import jax.numpy as jnp
import numpy as np

from byol_jax.core import schedules, target_ema


def test_update_is_target_plus_one_minus_tau_times_difference():
  tau_of = lambda step: schedules.target_ema_decay(step, base_tau=0.9, total_steps=10)
  ema = target_ema.target_ema(tau_of)
  target = {'w': jnp.asarray([1., 2.]), 'b': jnp.asarray(0.)}
  online = {'w': jnp.asarray([3., -2.]), 'b': jnp.asarray(1.)}
  state = ema.init(target)
  for step in (0, 4):
    tau = float(tau_of(step))
    expected = jax.tree_util.tree_map(lambda t, o: t + (1 - tau) * (o - t), state.params, online)
    state = ema.update(online, state, step)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                           state.params, expected)


def test_tau_one_freezes_and_tau_zero_copies():
  target, online = {'w': jnp.ones(3)}, {'w': jnp.zeros(3)}
  frozen = target_ema.target_ema(lambda s: 1.).update(online, target_ema.TargetEmaState(target), 0)
  copied = target_ema.target_ema(lambda s: 0.).update(online, target_ema.TargetEmaState(target), 0)
  np.testing.assert_array_equal(frozen.params['w'], 1.)
  np.testing.assert_array_equal(copied.params['w'], 0.)


def test_no_gradient_flows_through_the_ema_into_the_online_params():
  ema = target_ema.target_ema(lambda s: 0.5)
  grad = jax.grad(lambda o: jnp.sum(ema.update(o, ema.init({'w': jnp.ones(2)}), 0).params['w']))
  np.testing.assert_array_equal(grad({'w': jnp.zeros(2)})['w'], 0.)
