"""Evaluation drivers: they feed the pure steps (steps.py) with data and devices.

`evaluate` (linear, fine-tune, semi-supervised, kNN protocols from configs/eval.py),
`train_classifier`, kNN over whole splits (their features from features.py: each process
embeds its shard), the pretraining-time kNN monitor and online-classifier evaluation. The data
pipeline (TensorFlow) is imported inside the functions that read data.
"""

import math

import jax
import numpy as np

from byol_jax.runtime import checkpointing, metrics, parallel, storage
from byol_jax.evaluation import classifier_checkpoints, features, knn, pretrained
from byol_jax.evaluation.steps import EvalExperiment, PROTOCOLS, accuracy, encoder_embed


def local_eval_batch(global_batch: int) -> int:
  """This process's share of an evaluation batch: global_batch / processes, rounded up to a
  multiple of the local device count (the batch is split over devices; padding examples are
  masked, so the size changes nothing but speed)."""
  devices = jax.local_device_count()
  per_process = math.ceil(global_batch / jax.process_count())
  return max(devices, math.ceil(per_process / devices) * devices)


def balanced_subset(labels, fraction: float, seed: int) -> np.ndarray:
  """Sorted indices of a class-balanced `fraction` of `labels`, a pure function of the seed.

  Every class gets the same number of examples, round(fraction x N / classes) (at least 1,
  at most what the class has), drawn uniformly without replacement with a generator seeded by
  `seed`, class by class in label order. ImageNet 1%: 13 per class (13,000 images).
  """
  labels = np.asarray(labels)
  classes = np.unique(labels)
  per_class = max(1, int(round(fraction * len(labels) / len(classes))))
  rng = np.random.default_rng(seed)
  chosen = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes]
  return np.sort(np.concatenate(chosen))


# ---------------------------------------------------------------------------------------------
# Over datasets (TensorFlow enters here, through `datasets`, imported where it is used).


def knn_evaluate(config, embed, params, bn_state, *, test_split, k, temperature,
                 labelled_fraction=1.0, center=False) -> dict:
  """Weighted kNN of `test_split` against the unaugmented labelled training split.

  `labelled_fraction` < 1 keeps a `balanced_subset` of the bank (semi-supervised kNN);
  `center` subtracts the bank mean first (raw pixels, which are all positive).

  Multi-host: each process embeds only its shard of both splits (features.py); the gathered
  bank and test features are the same arrays on every process, and every process computes the
  same kNN from them and returns the same result. (Computing it on process 0 alone would save
  no time, since the others would wait for it at their next collective, and would leave them
  without the result; the kNN is a small part of the cost next to embedding the bank.)
  """
  bank_x, bank_y = features.split_features(config, embed, params, bn_state, 'labelled_train')
  pretrained.check_labels(bank_y, config.num_classes, config.dataset)
  if labelled_fraction < 1:
    keep = balanced_subset(bank_y, labelled_fraction, config.seed)
    bank_x, bank_y = bank_x[keep], bank_y[keep]
  test_x, test_y = features.split_features(config, embed, params, bn_state, test_split)
  pretrained.check_labels(test_y, config.num_classes, config.dataset)
  if center:
    mean = bank_x.mean(axis=0)
    bank_x, test_x = bank_x - mean, test_x - mean
  result = knn.knn_accuracy(bank_x, bank_y, test_x, test_y, k=k, temperature=temperature,
                            num_classes=config.num_classes)
  return dict(result, count=len(test_y), train_examples=len(bank_y))


def _pixels(params, bn_state, images):
  del params, bn_state
  return np.reshape(images, (len(images), -1))


def knn_monitor(config, experiment, state) -> dict:
  """kNN top-1/top-5 of the online encoder on the validation split, during pretraining."""
  params, bn_state = jax.device_get((state.online_params, state.online_state))
  result = knn_evaluate(config, jax.jit(experiment.embed), params, bn_state,
                        test_split='validation', k=config.final_knn.k,
                        temperature=config.final_knn.temperature)
  if jax.process_index() == 0:
    print(f'kNN monitor (k={result["k"]}) at step {int(jax.device_get(state.step))}: top-1 '
          f'{100 * result["top1"]:.1f}% on {result["count"]} held-out images', flush=True)
  return dict(knn_top1=result['top1'], knn_top5=result['top5'])


def random_init_baseline(config, experiment, initial_state):
  """(params, BatchNorm state) of the random-init encoder, its BN moving averages refreshed on
  30 training batches (a fresh BN state is meaningless in inference mode). Every process uses
  the same (global) batches, those of a single process: each embeds its shard of the splits,
  so all must hold the same statistics."""
  from byol_jax.data import datasets
  params, state = jax.device_get((initial_state.online_params, initial_state.online_state))
  recalibrate = jax.jit(experiment.recalibrate_batchnorm)
  calibration = datasets.pretrain_batches(config, start_step=0, process_index=0,
                                          process_count=1)
  for _ in range(30):
    state = recalibrate(params, state, next(calibration)['view1'])
  return params, jax.device_get(state)


def pretraining_knn(config, experiment, state, initial_state) -> dict:
  """kNN top-1 on the validation split: BYOL's online encoder vs two baselines.

  Baselines computed by the same code: the random-init encoder of this very run (its BN
  moving averages refreshed on training batches first, since a fresh BN state is meaningless in
  inference mode) and raw pixels (centred, cosine). The bank is the labelled training split,
  unaugmented.
  """
  k, temperature = config.final_knn.k, config.final_knn.temperature
  random_params, random_state = random_init_baseline(config, experiment, initial_state)
  embed = jax.jit(experiment.embed)
  evaluate = lambda embed, params, bn_state, **kw: knn_evaluate(
      config, embed, params, bn_state, test_split='validation', k=k, temperature=temperature,
      **kw)
  results = dict(
      byol=evaluate(embed, *jax.device_get((state.online_params, state.online_state))),
      random_init=evaluate(embed, random_params, random_state),
      raw_pixels=evaluate(_pixels, None, None, center=True))
  if jax.process_index() == 0:
    print(f'Representation quality, kNN top-1 (k={k}, T={temperature}) on '
          f'{results["byol"]["count"]} held-out images: BYOL '
          f'{100 * results["byol"]["top1"]:.1f}% | random-init encoder '
          f'{100 * results["random_init"]["top1"]:.1f}% | raw pixels '
          f'{100 * results["raw_pixels"]["top1"]:.1f}%', flush=True)
  return results


def online_eval_split(config) -> str:
  """Where the online classifier is evaluated: the dataset's test split (ImageNet: the 50,000
  TFDS validation images, the reference's TEST), else the validation hold-out."""
  from byol_jax.data import datasets
  return 'test' if datasets.has_split(config, 'test') else 'validation'


def online_classifier_eval(config, step_fn, state, mesh) -> dict:
  """The online classifier of a pretraining `state` (TrainState) on `online_eval_split`: one
  pass of centre-cropped batches of `config.eval_batch_size` (global), `step_fn` being
  `online_eval_step` mapped over `mesh`. Returns top1, top5 (fractions), loss (mean
  cross-entropy), count and split."""
  from byol_jax.data import datasets
  split = online_eval_split(config)
  batches = (parallel.global_batch(batch, mesh) for batch in datasets.eval_batches(
      config, split, local_eval_batch(config.eval_batch_size)))
  result = accuracy(step_fn, (state.online_params, state.online_state), batches)
  step = int(jax.device_get(state.step))
  if jax.process_index() == 0:
    print(f'Online classifier at step {step} on {config.dataset} {split} ({result["count"]} '
          f'images): top-1 {100 * result["top1"]:.2f}%, top-5 {100 * result["top5"]:.2f}%, '
          f'loss {result["loss"]:.4f}', flush=True)
  return dict(result, split=split)


def load_pretrained(path: str):
  """(model_config, params, state, meta) of the online encoder at `path`.

  `path` is a pretraining workdir (its latest readable checkpoint) or an export file; meta
  holds step, dataset, image_size and the pretraining `model` config.
  """
  return pretrained.load(path)


def protocol_name(config) -> str:
  if config.protocol == 'knn':
    return 'knn'
  return 'linear_eval' if config.freeze_backbone else 'fine_tune'


def validate_config(config):
  """One-line errors for bad evaluation settings, before anything is loaded or compiled."""
  if not config.checkpoint:
    raise ValueError('--config.checkpoint is required: a pretraining workdir or an export '
                     'file (python -m byol_jax.export).')
  if not storage.exists(config.checkpoint):
    raise FileNotFoundError(f'No pretraining workdir or export file at {config.checkpoint}.')
  if config.protocol not in PROTOCOLS:
    raise ValueError(f'Unknown protocol {config.protocol!r}: choose from '
                     f'{", ".join(PROTOCOLS)}.')
  if not 0 < config.labelled_fraction <= 1:
    raise ValueError(f'labelled_fraction must be in (0, 1], got {config.labelled_fraction}.')
  if config.max_steps < 0 or (config.max_steps == 0 and config.num_epochs <= 0):
    raise ValueError(f'Training length must be positive: max_steps={config.max_steps}, '
                     f'num_epochs={config.num_epochs}.')
  sizes = (config.image_size, config.num_classes, config.batch_size, config.eval_batch_size,
           config.log_every_steps)  # None: from the checkpoint (checked again once resolved).
  if min(size for size in sizes if size is not None) <= 0:
    raise ValueError('image_size, num_classes, batch_size, eval_batch_size and '
                     'log_every_steps must be positive.')
  if config.eval_split == 'validation' and config.data.train_on_validation:
    raise ValueError('eval_split=validation with data.train_on_validation=True would score '
                     'images that training (and the kNN bank) also reads: set '
                     'data.train_on_validation=False (as the pretraining run had it).')
  if config.data.eval_crop_fraction is not None:  # None: from the checkpoint.
    from byol_jax.data import augmentations  # TensorFlow: the data is read next anyway.
    augmentations.eval_crop_fraction(config.data)  # Raises outside (0, 1].
  if any(v is not None and v <= 0 for v in (config.knn.k, config.knn.temperature)):
    raise ValueError(f'knn.k ({config.knn.k}) and knn.temperature ({config.knn.temperature}) '
                     f'must be positive.')


def train_classifier(config, model_config, params, bn_state, workdir: str):
  """Linear evaluation or fine-tuning; returns held-out top-1/top-5 and the split sizes, or
  None when SIGTERM / SIGINT stopped it (after saving a checkpoint the same command resumes
  from; classifier_checkpoints.py says why the resumed run is the uninterrupted one)."""
  from byol_jax.data import datasets
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  subset = None
  if config.labelled_fraction < 1:
    subset = balanced_subset(features.split_labels(config, 'labelled_train'),
                             config.labelled_fraction, config.seed)
  train_examples = (datasets.num_examples(config, 'labelled_train') if subset is None
                    else len(subset))
  experiment = EvalExperiment(config, model_config, train_examples)
  total = experiment.total_steps
  print(f'{protocol_name(config)}: {model_config.encoder} x{model_config.width} on '
        f'{config.dataset} ({train_examples} labelled training images), batch '
        f'{config.batch_size} over {mesh.devices.size} devices, {total} steps.', flush=True)

  config = classifier_checkpoints.checkpoint_config(config, params, bn_state)
  classifier_checkpoints.check_same_encoder(workdir, config)
  checkpoints = checkpointing.Checkpointer(workdir, config)
  start_step, state = checkpoints.restore_or_init(
      experiment.init(params, bn_state, config.image_size), mesh)
  classifier_checkpoints.forget_logged_after(workdir, start_step)
  step_fn = parallel.map_step(experiment.train_step, mesh)
  # Random crop + flip of the labelled split, or of the subset (positions in its read order),
  # from `start_step` on: batch k is a pure function of (seed, step, process).
  batches = datasets.linear_eval_batches(
      config, 'train', config.batch_size // jax.process_count(), start_step=start_step,
      indices=subset)
  writer = metrics.MetricWriter(workdir, total, config.batch_size)
  writer.restart(start_step)  # TensorBoard, too, forgets what was logged after the checkpoint.
  save_schedule = checkpointing.SaveSchedule(config, sync_every=config.log_every_steps)
  try:
    state = _train_steps(config, step_fn, state, batches, mesh, writer, start_step, total,
                         checkpoints, save_schedule)
  finally:
    save_schedule.close()  # From here a signal stops at once: the final state is saved.
    checkpoints.close()  # Waits until the last checkpoint is on disk.
  if state is None:
    writer.close()
    return None

  eval_fn = parallel.map_step(experiment.eval_step, mesh, donate_state=False)
  held_out = (parallel.global_batch(batch, mesh) for batch in datasets.eval_batches(
      config, config.eval_split, local_eval_batch(config.eval_batch_size)))
  result = accuracy(eval_fn, state, held_out)
  writer.start(total)  # The next write is not a training interval: no images/s for it.
  writer.write(total, dict(top1=result['top1'], top5=result['top5'], loss=result['loss']),
               prefix=f'{config.eval_split}_')
  writer.close()
  return dict(result, train_examples=train_examples, steps=total)


def _train_steps(config, step_fn, state, batches, mesh, writer, start_step, total, checkpoints,
                 save_schedule):
  """Steps start_step..total of train_classifier, saving as `save_schedule` says and at the
  end; the final state, or None when a stop signal ended the loop after its save."""
  for step in range(start_step, total):
    batch = next(batches)
    pretrained.check_labels(batch['labels'], config.num_classes, config.dataset)
    state, step_metrics = step_fn(state, parallel.global_batch(batch, mesh))
    if step == start_step:
      writer.start(step + 1)  # Excludes compilation from images/s.
    if (step + 1) % config.log_every_steps == 0 or step + 1 == total:
      scalars = writer.write(step + 1, step_metrics, prefix='train_')
      if not np.isfinite(scalars['loss']):
        raise FloatingPointError(f'Loss is {scalars["loss"]} at step {step + 1}: stopping.')
    if step + 1 < total and save_schedule.should_save(step + 1):
      checkpoints.save(step + 1, state)  # Refuses a state holding NaN or Inf.
      if save_schedule.stop_requested:
        checkpoints.wait()
        print(f'Stopped by {save_schedule.stop_reason} at step {step + 1}: checkpoint saved to '
              f'{checkpoints.step_path(step + 1)}. Rerun the same command to resume.', flush=True)
        return None
  if checkpoints.latest_step() != total:
    checkpoints.save(total, state)
  return state


def evaluate(config, workdir: str) -> dict:
  """Runs `config.protocol` on `config.checkpoint`; writes and returns WORKDIR/eval_results.json.

  The data settings left unset in `config` come from the pretraining run (pretrained.resolve).
  """
  model_config, params, bn_state, meta = load_pretrained(config.checkpoint)
  pretrained.check_encoder(model_config)
  config = pretrained.resolve(config, pretrained.describe(config.checkpoint, meta))
  validate_config(config)
  print(f'Evaluating the online encoder of {config.checkpoint} ({model_config.encoder} '
        f'x{model_config.width}, pretraining step {meta["step"]} on {meta["dataset"]}).',
        flush=True)
  if config.protocol == 'knn':
    result = knn_evaluate(config, encoder_embed(model_config), params, bn_state,
                          test_split=config.eval_split, k=config.knn.k,
                          temperature=config.knn.temperature,
                          labelled_fraction=config.labelled_fraction)
    step = int(meta['step'])  # Logged at the pretraining step it measures.
    writer = metrics.MetricWriter(workdir, total_steps=step, images_per_step=0)
    writer.write(step, dict(top1=result['top1'], top5=result['top5']),
                 prefix=f'{config.eval_split}_')
    writer.close()
  else:
    result = train_classifier(config, model_config, params, bn_state, workdir)
    if result is None:  # Stopped by a signal after saving: nothing to report yet.
      return None
  record = dict(
      protocol=protocol_name(config), top1=result['top1'], top5=result['top5'],
      eval_loss=result.get('loss'),
      checkpoint=storage.resolve(config.checkpoint), checkpoint_step=int(meta['step']),
      encoder=model_config.to_dict(), pretrain_dataset=meta['dataset'],
      dataset=config.dataset, image_size=config.image_size, eval_split=config.eval_split,
      num_classes=config.num_classes, validation_examples=config.data.validation_examples,
      train_on_validation=bool(config.data.train_on_validation),
      eval_examples=result['count'], train_examples=result['train_examples'],
      labelled_fraction=config.labelled_fraction, seed=config.seed)
  if config.protocol == 'knn':
    record.update(k=result['k'], temperature=result['temperature'])
  else:
    record.update(steps=result['steps'], batch_size=config.batch_size,
                  base_lr=config.optimizer.base_lr,
                  cross_replica_bn=bool(config.cross_replica_bn))
  print(f'{record["protocol"]} on {config.dataset} {config.eval_split} '
        f'({record["eval_examples"]} images): top-1 {100 * record["top1"]:.2f}%, top-5 '
        f'{100 * record["top5"]:.2f}% (training examples {record["train_examples"]}, '
        f'pretraining step {record["checkpoint_step"]}).', flush=True)
  if jax.process_index() == 0:
    storage.write_json(storage.join(workdir, 'eval_results.json'), record)
  return record
