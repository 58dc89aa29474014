"""LARS in the reference's order, checked step by step against the formulas by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from byol_jax.core import optimizers

WD, ETA, MOMENTUM = 1e-2, 1e-3, 0.9


def _params():
  rng = np.random.RandomState(0)
  return {'linear': {'w': jnp.asarray(rng.randn(3, 4), jnp.float32),
                     'b': jnp.asarray(rng.randn(4), jnp.float32)},
          'bn': {'scale': jnp.ones((4,)), 'offset': jnp.asarray(rng.randn(4), jnp.float32)}}


def _grads(seed):
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_map(lambda p: jnp.asarray(rng.randn(*p.shape), jnp.float32),
                                _params())


def _by_hand(params, grads_per_step, lrs):
  """Reference order per tensor: decay -> trust ratio -> momentum -> -lr (numpy)."""
  params = jax.tree_util.tree_map(np.asarray, params)
  mu = jax.tree_util.tree_map(np.zeros_like, params)
  for grads, lr in zip(grads_per_step, lrs):
    new_params, new_mu = {}, {}
    for module in params:
      new_params[module], new_mu[module] = {}, {}
      for name, p in params[module].items():
        u = np.asarray(grads[module][name], np.float64)
        if name == 'w':  # Biases and norm parameters skip decay and adaptation.
          u = u + WD * p
          p_norm, u_norm = np.linalg.norm(p), np.linalg.norm(u)
          u = u * (ETA * p_norm / u_norm if p_norm > 0 and u_norm > 0 else 1.)
        m = MOMENTUM * mu[module][name] + u
        new_mu[module][name] = m
        new_params[module][name] = p - lr * m
    params, mu = new_params, new_mu
  return params


def test_mask_selects_weights_only():
  mask = optimizers.decay_and_adapt_mask(_params())
  assert mask == {'linear': {'w': True, 'b': False}, 'bn': {'scale': False, 'offset': False}}


def test_lars_matches_reference_order_under_a_schedule():
  lrs = [0.5, 0.1, 2.0]  # A changing LR tells "lr after momentum" from optax.lars' order.
  opt = optimizers.lars(lambda step: jnp.asarray(lrs)[step], weight_decay=WD,
                        momentum=MOMENTUM, eta=ETA)
  params = _params()
  state = opt.init(params)
  grads = [_grads(s) for s in (1, 2, 3)]
  for g in grads:
    updates, state = opt.update(g, state, params)
    params = optax.apply_updates(params, updates)
  expected = _by_hand(_params(), grads, lrs)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6),
                         params, expected)


def test_lars_differs_from_optax_lars_under_a_schedule():
  # Documents why optax.lars is not used: it applies the LR before the momentum trace.
  lrs = jnp.asarray([0.5, 0.1, 2.0])
  ours = optimizers.lars(lambda s: lrs[s], weight_decay=WD, momentum=MOMENTUM, eta=ETA)
  theirs = optax.lars(lambda s: lrs[s], weight_decay=WD, trust_coefficient=ETA,
                      momentum=MOMENTUM, weight_decay_mask=optimizers.decay_and_adapt_mask,
                      trust_ratio_mask=optimizers.decay_and_adapt_mask)
  results = []
  for opt in (ours, theirs):
    params, state = _params(), opt.init(_params())
    for seed in (1, 2, 3):
      updates, state = opt.update(_grads(seed), state, params)
      params = optax.apply_updates(params, updates)
    results.append(params['linear']['w'])
  assert not np.allclose(results[0], results[1], rtol=1e-3)


def test_trust_ratio_is_one_for_zero_norms():
  opt = optimizers.scale_by_trust_ratio(ETA)
  zeros = {'w': jnp.zeros((2, 2))}
  g = {'w': jnp.ones((2, 2))}
  updates, _ = opt.update(g, opt.init(zeros), zeros)
  np.testing.assert_array_equal(updates['w'], g['w'])


def test_adamw_skips_decay_on_biases_and_norms():
  opt = optimizers.make_optimizer(
      type('C', (), dict(name='adamw'))(), lambda s: 1.0, weight_decay=0.5)
  params = _params()
  zero_grads = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = opt.update(zero_grads, opt.init(params), params)
  np.testing.assert_allclose(updates['linear']['w'], -0.5 * params['linear']['w'], rtol=1e-6)
  for module, name in (('linear', 'b'), ('bn', 'scale'), ('bn', 'offset')):
    np.testing.assert_array_equal(updates[module][name], 0.)
