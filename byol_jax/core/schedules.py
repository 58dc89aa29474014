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


# The paper's ImageNet table (batch 4096), epochs -> (base LR, weight decay, tau_base): the
# reference's presets for 40, 100, 300 and 1000 epochs.
PAPER_IMAGENET_ROWS = {
    40: (0.45, 1e-6, 0.97),
    100: (0.45, 1e-6, 0.99),
    300: (0.3, 1e-6, 0.99),
    1000: (0.2, 1.5e-6, 0.996),
}


def byol_hyperparameters(config):
  """(base LR, weight decay, tau_base) of a pretraining config.

  A negative value in `optimizer.base_lr`, `optimizer.weight_decay` or `base_target_ema` means
  "the paper's row for `num_epochs`" (the imagenet preset's default), so that
  `--config.num_epochs=300` gives the 300-epoch row; explicit values are used as they are.
  """
  given = (config.optimizer.base_lr, config.optimizer.weight_decay, config.base_target_ema)
  if min(given) >= 0:
    return given
  if config.num_epochs not in PAPER_IMAGENET_ROWS:
    raise ValueError(
        f'num_epochs={config.num_epochs} has no row in the paper\'s ImageNet table '
        f'({", ".join(map(str, PAPER_IMAGENET_ROWS))} epochs): set optimizer.base_lr, '
        f'optimizer.weight_decay and base_target_ema explicitly.')
  row = PAPER_IMAGENET_ROWS[config.num_epochs]
  return tuple(paper if value < 0 else value for value, paper in zip(given, row))
