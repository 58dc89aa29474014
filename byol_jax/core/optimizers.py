"""LARS in the reference's order, AdamW for small runs, and the bias/norm exclusion mask.

Reference order for each parameter tensor p with gradient g (REFERENCE.md):
  u = g + wd * p;  u *= eta * ||p|| / ||u|| (1 if either norm is 0);  mu = 0.9 mu + u;  p -= lr mu
Biases and normalisation parameters skip the first two steps. `optax.lars` scales by the
learning rate *before* the momentum accumulator, which differs from this under a schedule.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax


def decay_and_adapt_mask(params):
  """True for the tensors that get weight decay and the trust ratio: weights, not biases/norms.

  Haiku names conv/linear kernels `w`; biases are `b` and BatchNorm has `scale`/`offset`.
  """
  def is_weight(path, _):
    return getattr(path[-1], 'key', None) == 'w'
  return jax.tree_util.tree_map_with_path(is_weight, params)


class _NoState(NamedTuple):
  pass


def scale_by_trust_ratio(eta: float) -> optax.GradientTransformation:
  """u <- u * eta * ||p|| / ||u|| per tensor (Frobenius norms), 1 when either norm is 0."""
  def init(params):
    del params
    return _NoState()

  def update(updates, state, params):
    def scale(u, p):
      p_norm, u_norm = jnp.linalg.norm(p), jnp.linalg.norm(u)
      ratio = jnp.where((p_norm > 0) & (u_norm > 0), eta * p_norm / u_norm, 1.)
      return u * ratio.astype(u.dtype)
    return jax.tree_util.tree_map(scale, updates, params), state

  return optax.GradientTransformation(init, update)


def lars(learning_rate: Callable, *, weight_decay: float, momentum: float = 0.9,
         eta: float = 1e-3) -> optax.GradientTransformation:
  """The reference's LARS: decay -> trust ratio (masked) -> momentum -> -lr."""
  return optax.chain(
      optax.masked(optax.add_decayed_weights(weight_decay), decay_and_adapt_mask),
      optax.masked(scale_by_trust_ratio(eta), decay_and_adapt_mask),
      optax.trace(decay=momentum, nesterov=False),
      optax.scale_by_learning_rate(learning_rate),
  )


def make_optimizer(optimizer_config, learning_rate: Callable,
                   weight_decay: float) -> optax.GradientTransformation:
  """The optimizer named by `config.optimizer.name` (lars or adamw)."""
  if optimizer_config.name == 'lars':
    return lars(learning_rate, weight_decay=weight_decay,
                momentum=optimizer_config.momentum, eta=optimizer_config.trust_coefficient)
  if optimizer_config.name == 'adamw':
    return optax.adamw(learning_rate, weight_decay=weight_decay,
                       mask=decay_and_adapt_mask)
  raise ValueError(f'Unknown optimizer.name {optimizer_config.name!r}: choose lars or adamw.')
