"""Learning-rate and target-EMA schedules of the reference, as functions of the step."""

import jax.numpy as jnp


def learning_rate(step, *, base_lr: float, batch_size: int, total_steps: int,
                  warmup_steps: int):
  """Linear warmup to base_lr * batch_size / 256, then cosine to 0 at total_steps."""
  scaled = base_lr * batch_size / 256.
  step = jnp.asarray(step, jnp.float32)
  warmup = scaled * step / max(warmup_steps, 1)
  progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
  cosine = scaled * 0.5 * (1. + jnp.cos(jnp.pi * jnp.clip(progress, 0., 1.)))
  return jnp.where(step < warmup_steps, warmup, cosine)


def target_ema_decay(step, *, base_tau: float, total_steps: int):
  """tau = 1 - (1 - base_tau) * (cos(pi k / K) + 1) / 2: base_tau at step 0, 1 at the end."""
  step = jnp.asarray(step, jnp.float32)
  progress = jnp.clip(step / max(total_steps, 1), 0., 1.)
  return 1. - (1. - base_tau) * (jnp.cos(jnp.pi * progress) + 1.) / 2.
