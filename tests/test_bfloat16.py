"""config.model.compute_dtype='bfloat16': activations in bf16, parameters and BN in float32.

A few BYOL steps of the tiny encoder on one fixed batch, through the same mapped step training
uses, must reduce the loss and leave finite float32 parameters, optimizer state and BN
statistics; the convolutions must really run in bfloat16.
"""

import byol  # configs/byol.py (tests/conftest.py puts configs/ on the path).
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from byol_jax.core import byol_experiment
from byol_jax.runtime import parallel


def _config(dtype):
  config = byol.get_config('demo')
  with config.unlocked():
    config.image_size = 16
    config.batch_size = 16
    config.max_steps = 100
    config.model.encoder = 'tiny'
    config.model.compute_dtype = dtype
    config.model.projector_hidden_size = 64
    config.model.predictor_hidden_size = 64
    config.model.projection_size = 16
    config.optimizer.name = 'adamw'
    config.optimizer.base_lr = 1e-2
    config.optimizer.warmup_steps = 0
  return config


def _batch(config):
  rng = np.random.default_rng(0)
  shape = (config.batch_size, config.image_size, config.image_size, 3)
  return dict(view1=rng.random(shape, np.float32), view2=rng.random(shape, np.float32),
              labels=rng.integers(0, config.num_classes, config.batch_size).astype(np.int32))


@pytest.mark.slow
def test_bfloat16_step_trains_with_float32_params():
  config = _config('bfloat16')
  experiment = byol_experiment.ByolExperiment(config, train_examples=1_000)
  mesh = parallel.make_mesh()
  init = jax.jit(experiment.init, static_argnums=1)
  state = parallel.replicate(init(jax.random.PRNGKey(0), config.image_size), mesh)
  batch = parallel.global_batch(_batch(config), mesh)

  # The convolutions run in bf16 (not silently upcast by the network).
  jaxpr = str(jax.make_jaxpr(experiment.net.apply, static_argnums=(4,))(
      state.online_params, state.online_state, None, batch['view1'], True))
  assert 'conv_general_dilated' in jaxpr and 'bf16[' in jaxpr

  step = parallel.map_step(experiment.train_step, mesh)
  losses, repr_losses = [], []
  for _ in range(8):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
    repr_losses.append(float(metrics['repr_loss']))
  assert np.all(np.isfinite(losses)), losses
  assert losses[-1] < losses[0], losses
  assert repr_losses[-1] < repr_losses[0], repr_losses

  for name, tree in (('online params', state.online_params), ('target', state.target),
                     ('online BN state', state.online_state),
                     ('target BN state', state.target_state), ('optimizer', state.opt_state)):
    for leaf in jax.tree_util.tree_leaves(jax.device_get(tree)):  # numpy: no compilations.
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        assert leaf.dtype == np.float32, (name, leaf.dtype)
        assert np.all(np.isfinite(leaf)), name
