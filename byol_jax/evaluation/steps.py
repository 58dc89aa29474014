"""Evaluation of a pretrained encoder: linear evaluation, fine-tuning, semi-supervised, kNN;
and the evaluation of the online classifier of a pretraining run.

Linear evaluation follows the reference's `eval_experiment.py` and `configs/eval.py`: the encoder
is frozen in inference mode (BatchNorm moving averages); a fresh `hk.Linear(num_classes)` in a
transform of its own, with Haiku's default initialisation (truncated normal, std 1/sqrt(fan_in);
zero bias) from PRNGKey(config.seed), is trained on the encoder's features with SGD + Nesterov
momentum 0.9, no weight decay, LR 0.2 x batch/256 with a cosine decay to 0 and no warmup, on
random crop + flip; the loss is the global batch mean of the softmax cross-entropy. Top-1 / top-5
and the mean cross-entropy are reported on `config.eval_split` with centre crops. Fine-tuning
(`freeze_backbone=False`) is the same with the encoder trainable and its BatchNorm in training
mode, per device as in the reference (its eval backbone has no cross-replica axis; see
`config.cross_replica_bn`). Semi-supervised evaluation is fine-tuning on a fixed, seeded,
class-balanced fraction of the training labels (`labelled_fraction`). kNN is a weighted vote of
the nearest training features (knn.py).

The online classifier (the linear probe trained during pretraining, module `classifier`) is
evaluated like the reference's pretraining eval worker: centre crops, inference-mode BatchNorm
with the online state, summed cross-entropy / top-1 / top-5 over a split (`online_eval_step`,
driven by `online_classifier_eval`).

The steps are per-device functions with named-axis collectives, mapped over the device mesh with
`parallel.map_step`, like the BYOL step. No TensorFlow and no data here: drivers.py feeds them.
"""

from typing import NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import optax

from byol_jax.core import networks, optimizers, schedules
from byol_jax.core.axis import AXIS

PROTOCOLS = ('linear', 'knn')


class EvalState(NamedTuple):
  step: jax.Array  # int32 scalar: number of updates applied so far.
  encoder_params: hk.Params  # From the pretrained online encoder; trained only when fine-tuning.
  encoder_state: hk.State  # BatchNorm moving averages; updated only when fine-tuning.
  head_params: hk.Params  # The fresh linear layer: {'linear': {'w', 'b'}}.
  opt_state: optax.OptState


def make_encoder_network(model_config, axis_name=None):
  """The encoder alone with float32 features (`networks.make_encoder_transform`)."""
  return networks.make_encoder_transform(model_config, axis_name, float32_features=True)


def encoder_embed(model_config):
  """Jitted embed(params, state, images) -> pooled features of the encoder, inference mode."""
  encoder = networks.make_encoder_transform(model_config)
  return jax.jit(lambda params, state, images: encoder.apply(params, state, None, images,
                                                             False)[0])


def make_head(num_classes: int):
  """The classifier: a separate `hk.transform` of `hk.Linear(num_classes)` (module 'linear')
  applied to the features, as the reference builds it; init(key, features) uses Haiku's default
  initialisation."""
  return hk.without_apply_rng(hk.transform(lambda features: hk.Linear(num_classes)(features)))


def classification_counts(logits, labels, mask=None) -> dict:
  """Sums over the real examples (mask True) of a batch, as the reference's eval step returns
  them before dividing by the example count: softmax cross-entropy `loss`, `top1` and `top5`
  hits, and `count`. No TensorFlow."""
  logits = logits.astype(jnp.float32)
  mask = jnp.ones(labels.shape, bool) if mask is None else mask
  xent = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  k = min(5, logits.shape[-1])
  top5 = jnp.any(jax.lax.top_k(logits, k)[1] == labels[:, None], axis=-1)
  top1 = jnp.argmax(logits, -1) == labels
  return dict(loss=jnp.sum(jnp.where(mask, xent, 0.)), top1=jnp.sum(mask & top1),
              top5=jnp.sum(mask & top5), count=jnp.sum(mask))


def total_steps(config, train_examples: int) -> int:
  if config.max_steps > 0:
    return config.max_steps
  return max(1, config.num_epochs * train_examples // config.batch_size)


def _from_first_device(tree):
  """Device 0's values on every device (inside a mapped step). Per-device BatchNorm leaves each
  device its own moving averages; the reference evaluates with the first device's
  (`helpers.get_first`), and in training mode the averages do not affect the step."""
  first = jax.lax.axis_index(AXIS) == 0
  return jax.tree_util.tree_map(
      lambda x: jax.lax.psum(jnp.where(first, x, jnp.zeros_like(x)), AXIS), tree)


class EvalExperiment:
  """Linear evaluation / fine-tuning from a config; `init`, `train_step`, `eval_step` are pure.

  `config` is the evaluation config (configs/eval.py); `model_config` is the pretraining run's
  `config.model`, so the encoder is rebuilt exactly as it was trained.
  """

  def __init__(self, config, model_config, train_examples: int):
    self.fine_tune = not config.freeze_backbone
    self.seed = config.seed
    self.total_steps = total_steps(config, train_examples)
    opt = config.optimizer
    self.lr_schedule = lambda step: schedules.learning_rate(
        step, base_lr=opt.base_lr, batch_size=config.batch_size,
        total_steps=self.total_steps, warmup_steps=0)
    # Weight decay (0 in the reference) would skip biases and BatchNorm, as in pretraining.
    self.optimizer = optax.chain(
        optax.masked(optax.add_decayed_weights(opt.weight_decay),
                     optimizers.decay_and_adapt_mask),
        optax.sgd(self.lr_schedule, momentum=opt.momentum, nesterov=opt.nesterov))
    # Fine-tuning's BatchNorm: per device (reference) or across devices (cross_replica_bn).
    self.cross_replica_bn = bool(config.cross_replica_bn)
    self.encoder = make_encoder_network(
        model_config, axis_name=AXIS if self.cross_replica_bn else None)
    self.head = make_head(config.num_classes)

  def _trainable(self, encoder_params, head_params):
    return (encoder_params, head_params) if self.fine_tune else head_params

  def init_head(self, feature_size: int) -> hk.Params:
    """The head as the reference initialises it: Haiku's default init from PRNGKey(seed)."""
    features = jnp.zeros((1, feature_size), jnp.float32)
    return self.head.init(jax.random.PRNGKey(self.seed), features)

  def init(self, encoder_params, encoder_state, image_size: int) -> EvalState:
    """The pretrained encoder with a fresh head."""
    dummy = jax.ShapeDtypeStruct((2, image_size, image_size, 3), jnp.float32)
    features = jax.eval_shape(
        lambda x: self.encoder.apply(encoder_params, encoder_state, None, x, False)[0], dummy)
    head_params = self.init_head(features.shape[-1])
    return EvalState(step=jnp.zeros((), jnp.int32), encoder_params=encoder_params,
                     encoder_state=encoder_state, head_params=head_params,
                     opt_state=self.optimizer.init(self._trainable(encoder_params,
                                                                   head_params)))

  def logits(self, encoder_params, encoder_state, head_params, images, is_training):
    features, encoder_state = self.encoder.apply(encoder_params, encoder_state, None, images,
                                                 is_training)
    return self.head.apply(head_params, features), encoder_state

  def train_step(self, state: EvalState, batch):
    """One update on this device's share of {'images', 'labels'}; call under mesh axis AXIS.

    Frozen: gradients are taken w.r.t. the head only, so the encoder is a constant of the step
    (no backward pass through it) and runs in inference mode. The loss is this device's batch
    mean averaged over devices (`pmean`), and shard_map sums the gradients of the replicated
    params: the gradient of the global batch mean, as the reference's loss / device_count
    followed by a `psum` of the gradients.
    """
    def loss_fn(trainable):
      encoder_params, head_params = (trainable if self.fine_tune
                                     else (state.encoder_params, trainable))
      logits, encoder_state = self.logits(encoder_params, state.encoder_state, head_params,
                                          batch['images'], self.fine_tune)
      xent = optax.softmax_cross_entropy_with_integer_labels(logits, batch['labels'])
      top1 = jnp.mean(jnp.argmax(logits, -1) == batch['labels'])
      return jax.lax.pmean(jnp.mean(xent), AXIS), (encoder_state, jax.lax.pmean(top1, AXIS))

    trainable = self._trainable(state.encoder_params, state.head_params)
    (loss, (encoder_state, top1)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    encoder_params, head_params = (trainable if self.fine_tune
                                   else (state.encoder_params, trainable))
    if not self.fine_tune:
      encoder_state = state.encoder_state  # Inference mode left it as it was; say so.
    elif not self.cross_replica_bn:
      encoder_state = _from_first_device(encoder_state)
    new_state = EvalState(step=state.step + 1, encoder_params=encoder_params,
                          encoder_state=encoder_state, head_params=head_params,
                          opt_state=opt_state)
    return new_state, dict(loss=loss, top1=top1, learning_rate=self.lr_schedule(state.step))

  def eval_step(self, state: EvalState, batch):
    """Sums of cross-entropy and top-1 / top-5 hits, and the count of real examples, over the
    global batch (mask False: padding); inference mode."""
    logits, _ = self.logits(state.encoder_params, state.encoder_state, state.head_params,
                            batch['images'], False)
    counts = classification_counts(logits, batch['labels'], batch['mask'])
    return jax.tree_util.tree_map(lambda c: jax.lax.psum(c, AXIS), counts), {}


def online_classifier_counts(experiment, params, bn_state, images, labels, mask=None) -> dict:
  """`classification_counts` of the pretraining run's online classifier (module `classifier`
  on the online encoder's features) on a batch of eval-preprocessed images: inference-mode
  BatchNorm with the online state, as the reference's pretraining eval. No TensorFlow.

  `experiment` is a `byol_experiment.ByolExperiment`; `params`, `bn_state` its online ones.
  """
  outputs, _ = experiment.net.apply(params, bn_state, None, images, False, online=True)
  return classification_counts(outputs['logits'], labels, mask)


def online_eval_step(experiment):
  """Per-device step(model, batch) -> (summed counts over the global batch, {}), where model is
  (online_params, online_state); map it with `parallel.map_step(..., donate_state=False)`."""
  def step(model, batch):
    params, bn_state = model
    counts = online_classifier_counts(experiment, params, bn_state, batch['images'],
                                      batch['labels'], batch['mask'])
    return jax.tree_util.tree_map(lambda c: jax.lax.psum(c, AXIS), counts), {}
  return step


def accuracy(step_fn, state, batches) -> dict:
  """Top-1 / top-5 (fractions) and mean cross-entropy `loss` over one pass of global batches,
  with a mapped step that returns `classification_counts` sums."""
  totals = dict(loss=0.0, top1=0, top5=0, count=0)
  for batch in batches:
    counts, _ = step_fn(state, batch)
    for key, value in jax.device_get(counts).items():
      totals[key] += float(value) if key == 'loss' else int(value)
  count = max(totals['count'], 1)
  return dict(top1=totals['top1'] / count, top5=totals['top5'] / count,
              loss=totals['loss'] / count, count=totals['count'])
