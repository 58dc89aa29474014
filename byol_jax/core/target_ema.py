"""The target network's parameters as an optax-style EMA of the online parameters.

`update` runs after the optimizer has updated the online parameters and outside `jax.grad`,
over the whole parameter tree: target <- target + (1 - tau) * (online - target).
BatchNorm statistics are *not* averaged: the target keeps its own (REFERENCE.md).
"""

from typing import Callable, NamedTuple

import jax


class TargetEmaState(NamedTuple):
  params: object  # Same tree as the online parameters.


class TargetEma(NamedTuple):
  init: Callable
  update: Callable


def target_ema(tau_schedule: Callable) -> TargetEma:
  """`tau_schedule(step) -> tau`; the target starts from its own (separately seeded) params."""

  def init(target_params) -> TargetEmaState:
    return TargetEmaState(params=target_params)

  def update(online_params, state: TargetEmaState, step) -> TargetEmaState:
    tau = tau_schedule(step)
    new = jax.tree_util.tree_map(
        lambda t, o: t + (1. - tau) * (jax.lax.stop_gradient(o) - t), state.params,
        online_params)
    return TargetEmaState(params=new)

  return TargetEma(init, update)
