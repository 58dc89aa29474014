"""BYOL: state, forward pass, loss and the per-device training step.

The step is written for one device with named-axis collectives (cross-replica BatchNorm, a
`pmean` of the loss), like the reference's pmap step, and mapped over a device mesh with
`jax.shard_map` by `parallel.py`. No TensorFlow here: this runs where TF is not installed.
"""

from typing import NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from byol_jax.core import networks, optimizers, schedules, target_ema
from byol_jax.core.axis import AXIS  # Re-exported: byol_experiment.AXIS.



class TrainState(NamedTuple):
  step: jax.Array  # int32 scalar: number of updates applied so far.
  online_params: hk.Params  # Encoder, projector, predictor and the online linear classifier.
  online_state: hk.State  # Online BatchNorm statistics.
  target: target_ema.TargetEmaState  # EMA of the online params (same tree).
  target_state: hk.State  # The target's own BatchNorm statistics (not averaged).
  opt_state: optax.OptState


def l2_normalize(x, eps=1e-12):
  """x / max(||x||, 1e-6): the reference's epsilon (1e-12 on the squared norm)."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def regression_loss(prediction, target):
  """||x^ - y^||^2 = 2 - 2 cos(x, y) per example; the target is not differentiated."""
  x, y = l2_normalize(prediction), l2_normalize(jax.lax.stop_gradient(target))
  return jnp.sum((x - y)**2, axis=-1)


def make_network(config, axis_name=None):
  """`hk.transform_with_state` of the whole BYOL network.

  apply(params, state, None, images, is_training, online) -> (outputs, state). The training
  step runs the whole network for both the online and the target parameters (the reference
  does); `online=False` runs only the encoder and projector, for embedding images.
  """
  model = config.model
  dtype = networks.compute_dtype(model)
  bn = dict(bn_decay=model.bn_decay, bn_eps=model.bn_eps, cross_replica_axis=axis_name)

  def forward(images, is_training, online=True):
    embedding = networks.make_encoder(model, axis_name)(images.astype(dtype), is_training)
    projector = networks.MLP(model.projector_hidden_size, model.projection_size,
                             name='projector', **bn)
    predictor = networks.MLP(model.predictor_hidden_size, model.projection_size,
                             name='predictor', **bn)
    classifier = hk.Linear(config.num_classes, name='classifier')
    projection = projector(embedding, is_training)
    if not online and not hk.running_init():
      return dict(embedding=embedding, projection=projection)
    # The online probe sees features but never sends gradients into the encoder.
    return dict(embedding=embedding, projection=projection,
                prediction=predictor(projection, is_training),
                logits=classifier(jax.lax.stop_gradient(embedding)))

  return hk.transform_with_state(forward)


def total_steps(config, train_examples: int) -> int:
  if config.max_steps > 0:
    return config.max_steps
  return max(1, config.num_epochs * train_examples // config.batch_size)


def warmup_steps(config, train_examples: int) -> int:
  if config.optimizer.warmup_steps >= 0:
    return config.optimizer.warmup_steps
  return config.optimizer.warmup_epochs * train_examples // config.batch_size


class ByolExperiment:
  """Builds the pieces from a config; `init` and `train_step` are pure functions."""

  def __init__(self, config, train_examples: int):
    self.config = config
    self.total_steps = total_steps(config, train_examples)
    self.warmup_steps = warmup_steps(config, train_examples)
    base_lr, weight_decay, base_tau = schedules.byol_hyperparameters(config)
    self.lr_schedule = lambda step: schedules.learning_rate(
        step, base_lr=base_lr, batch_size=config.batch_size,
        total_steps=self.total_steps, warmup_steps=self.warmup_steps)
    self.tau_schedule = lambda step: schedules.target_ema_decay(
        step, base_tau=base_tau, total_steps=self.total_steps)
    self.optimizer = optimizers.make_optimizer(config.optimizer, self.lr_schedule,
                                               weight_decay=weight_decay)
    self.target_ema = target_ema.target_ema(self.tau_schedule)
    self.net = make_network(config, axis_name=None)  # Init / single-device inference.
    self.net_parallel = make_network(config, axis_name=AXIS)  # Inside the mapped step.
    # Jitted once: op-by-op initialisation of a ResNet is tens of seconds on a small CPU.
    self._jitted_init = jax.jit(self._init, static_argnums=1)

  def init(self, rng, image_size: int) -> TrainState:
    """Online and target networks from *different* keys, as the reference does.

    The parameters are the reference's for the same key. The BatchNorm statistics are those of
    a forward pass of blank images: use `init_from_batch` to start a run as the reference does.
    """
    return self._jitted_init(rng, image_size)

  def _init(self, rng, image_size: int) -> TrainState:
    dummy = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
    return self._init_on_images(self.net, rng, dummy)

  def init_from_batch(self, rng, batch, mesh) -> TrainState:
    """The reference's initial state: parameters as `init`; BatchNorm state as Haiku's `init`
    leaves it after the reference's init pass over the first training batch: each moving
    average holds that batch's first-view statistics (cross-replica over `mesh`, as its pmapped
    init), with the EMA counter and hidden value still 0. `batch` is the global batch
    (`parallel.global_batch`); the state comes back replicated over `mesh`.
    """
    mapped = jax.jit(jax.shard_map(
        lambda key, view1: self._init_on_images(self.net_parallel, key, view1),
        mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P()))
    return mapped(rng, batch['view1'])

  def _init_on_images(self, net, rng, images) -> TrainState:
    online_key, target_key = jax.random.split(rng)
    init_name, target_init = init_settings(self.config)

    def init(key):
      params, state = net.init(key, images, True)
      if init_name == 'pytorch':
        params = pytorch_default_init(params, jax.random.fold_in(key, 1))
      return params, state

    online_params, online_state = init(online_key)
    if target_init == 'copy':
      target_params, target_state = online_params, online_state
    else:
      target_params, target_state = init(target_key)
    return TrainState(step=jnp.zeros((), jnp.int32), online_params=online_params,
                      online_state=online_state, target=self.target_ema.init(target_params),
                      target_state=target_state,
                      opt_state=self.optimizer.init(online_params))

  def train_step(self, state: TrainState, batch):
    """One BYOL update on this device's share of the batch; call under a mesh axis `AXIS`.

    Under `shard_map` gradients w.r.t. the replicated params are summed over devices
    automatically, so the *loss* is averaged with `pmean`, never the gradients.
    """
    apply = self.net_parallel.apply
    view1, view2, labels = batch['view1'], batch['view2'], batch['labels']

    # Target forward: no gradient ever flows here; its BN state updates on its own. The whole
    # network runs, predictor included, as in the reference: only the projection is used, but
    # the target's predictor BatchNorm statistics move with its forward passes.
    t1, target_state = apply(state.target.params, state.target_state, None, view1, True)
    t2, target_state = apply(state.target.params, target_state, None, view2, True)

    def loss_fn(online_params):
      o1, online_state = apply(online_params, state.online_state, None, view1, True)
      o2, online_state = apply(online_params, online_state, None, view2, True)
      # The two directions are summed (averaging them would halve the gradients).
      repr_loss = jnp.mean(regression_loss(o1['prediction'], t2['projection'])
                           + regression_loss(o2['prediction'], t1['projection']))
      labelled = labels >= 0
      xent = optax.softmax_cross_entropy_with_integer_labels(
          o1['logits'], jnp.maximum(labels, 0))
      count = jax.lax.psum(jnp.sum(labelled), AXIS)
      classifier_loss = jax.lax.psum(jnp.sum(jnp.where(labelled, xent, 0.)), AXIS) / jnp.maximum(
          count, 1)
      repr_loss = jax.lax.pmean(repr_loss, AXIS)
      correct = jnp.sum(jnp.where(labelled, jnp.argmax(o1['logits'], -1) == labels, False))
      top1 = jax.lax.psum(correct, AXIS) / jnp.maximum(count, 1)
      aux = dict(online_state=online_state, repr_loss=repr_loss,
                 classifier_loss=classifier_loss, top1=top1,
                 collapse=_collapse_metric(o1['projection']))
      return repr_loss + classifier_loss, aux

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.online_params)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.online_params)
    online_params = optax.apply_updates(state.online_params, updates)
    # After the optimizer step and outside jax.grad, with tau of the current step.
    target = self.target_ema.update(online_params, state.target, state.step)
    new_state = TrainState(step=state.step + 1, online_params=online_params,
                           online_state=aux['online_state'], target=target,
                           target_state=target_state, opt_state=opt_state)
    metrics = dict(loss=loss, repr_loss=aux['repr_loss'],
                   classifier_loss=aux['classifier_loss'], top1=aux['top1'],
                   collapse=aux['collapse'], tau=self.tau_schedule(state.step),
                   learning_rate=self.lr_schedule(state.step))
    return new_state, metrics

  def embed(self, params, state, images):
    """Encoder features in inference mode (BatchNorm moving averages)."""
    out, _ = self.net.apply(params, state, None, images, False, online=False)
    return out['embedding']

  def recalibrate_batchnorm(self, params, state, images):
    """One training-mode forward to refresh BN moving averages (no parameter change).

    Used to give a random-init encoder meaningful statistics before it is evaluated in
    inference mode, so baselines and trained encoders are measured the same way.
    """
    _, state = self.net.apply(params, state, None, images, True, online=False)
    return state


# `model.init`: 'reference' (Haiku's defaults, as the reference: kernels truncated normal with
# std 1/sqrt(fan_in), realised 0.88/sqrt(fan_in); biases 0) or 'pytorch' (`pytorch_default_init`).
INITS = ('reference', 'pytorch')
# `target_init`: 'separate' (the reference: the target from its own key) or 'copy' (the target
# starts as a copy of the online network, as most PyTorch implementations deep-copy it).
TARGET_INITS = ('separate', 'copy')


def init_settings(config):
  """(`model.init`, `target_init`) of a config, checked (one line for an unknown value); the
  reference's where a config predates them."""
  init_name = config.model.get('init', 'reference')
  target_init = config.get('target_init', 'separate')
  if init_name not in INITS:
    raise ValueError(f'Unknown model.init {init_name!r}: choose from {", ".join(INITS)}.')
  if target_init not in TARGET_INITS:
    raise ValueError(f'Unknown target_init {target_init!r}: choose from '
                     f'{", ".join(TARGET_INITS)}.')
  return init_name, target_init


def pytorch_default_init(params, key):
  """PyTorch's default nn.Conv2d / nn.Linear initialisation in place of Haiku's: every kernel
  `w` and bias `b` ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform with a = sqrt(5); std
  0.58/sqrt(fan_in), 0.66x Haiku's), fan_in = the product of the kernel's input dimensions
  (HWI of an HWIO conv kernel, the rows of a Linear). BatchNorm parameters are left as they are
  (scale 1 or the configured zero, offset 0), as in PyTorch."""
  new = {}
  for i, name in enumerate(sorted(params)):
    module = dict(params[name])
    if 'w' in module:
      bound = 1. / np.sqrt(np.prod(module['w'].shape[:-1]))
      kernel_key, bias_key = jax.random.split(jax.random.fold_in(key, i))
      for leaf, leaf_key in (('w', kernel_key), ('b', bias_key)):
        if leaf in module:
          module[leaf] = jax.random.uniform(leaf_key, module[leaf].shape, module[leaf].dtype,
                                            -bound, bound)
    new[name] = module
  return new


def _collapse_metric(projection):
  """Mean over dims of the batch std of L2-normalised projections, over the global batch.

  ~1/sqrt(dim) for a healthy representation, -> 0 when every image maps to one point.
  """
  z = l2_normalize(projection)
  mean = jax.lax.pmean(jnp.mean(z, axis=0), AXIS)
  mean_sq = jax.lax.pmean(jnp.mean(z * z, axis=0), AXIS)
  return jnp.mean(jnp.sqrt(jnp.maximum(mean_sq - mean * mean, 0.)))


def state_shapes(config):
  """The TrainState's shapes and dtypes for a run of `config`, without building it."""
  experiment = ByolExperiment(config, train_examples=1)
  return jax.eval_shape(lambda key: experiment.init(key, config.image_size),
                        jax.random.PRNGKey(0))
