r"""Entry point: `python -m byol_jax.main_loop --config=configs/byol.py[:preset] --workdir=DIR`.

Overrides follow ml_collections: `--config.batch_size=64 --config.model.encoder=resnet18`.
The loop, top to bottom: validate the config, build the mesh and experiment, initialise,
iterate over (seed, step)-determined batches, log, and at the end report representation
quality with kNN when the config asks for it.
"""

import json
import os
import sys

from absl import app, flags
import jax
import numpy as np
from ml_collections import config_flags

from byol_jax import byol_experiment, knn, metrics, networks, parallel

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/byol.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for metrics and checkpoints.')


def validate_config(config):
  """One-line errors for bad values, before anything is compiled."""
  if config.model.encoder not in networks.ENCODERS:
    raise ValueError(f'Unknown model.encoder {config.model.encoder!r}: choose from '
                     f'{", ".join(networks.ENCODERS)}.')
  networks.compute_dtype(config.model)
  if config.optimizer.name not in ('lars', 'adamw'):
    raise ValueError(f'Unknown optimizer.name {config.optimizer.name!r}: choose lars or adamw.')
  if config.max_steps < 0 or (config.max_steps == 0 and config.num_epochs <= 0):
    raise ValueError(f'Training length must be positive: max_steps={config.max_steps}, '
                     f'num_epochs={config.num_epochs}.')
  if config.image_size <= 0 or config.num_classes <= 0:
    raise ValueError(f'image_size ({config.image_size}) and num_classes '
                     f'({config.num_classes}) must be positive.')
  if config.log_every_steps <= 0:
    raise ValueError(f'log_every_steps must be positive, got {config.log_every_steps}.')


def _check_finite(step: int, metrics_at_step: dict):
  loss = float(np.asarray(metrics_at_step['loss']))
  if not np.isfinite(loss):
    raise FloatingPointError(f'Loss is {loss} at step {step}: stopping; no checkpoint of this '
                             f'state was written.')


def train_byol(config, workdir: str):
  from byol_jax import datasets  # TensorFlow enters only with the input pipeline.

  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  train_examples = datasets.num_examples(config, 'train')
  experiment = byol_experiment.ByolExperiment(config, train_examples)
  total = experiment.total_steps
  print(f'BYOL: {config.model.encoder} x{config.model.width} on {config.dataset} '
        f'({train_examples} training images), batch {config.batch_size} over '
        f'{mesh.devices.size} devices, {total} steps.', flush=True)

  initial_state = experiment.init(jax.random.PRNGKey(config.seed), config.image_size)
  start_step = 0
  state = parallel.replicate(initial_state, mesh)
  step_fn = parallel.map_step(experiment.train_step, mesh)
  batches = datasets.pretrain_batches(config, start_step=start_step)
  writer = metrics.MetricWriter(workdir, total, config.batch_size)

  previous = None  # (step, metrics): checked one step late so the device never waits on us.
  for step in range(start_step, total):
    state, step_metrics = step_fn(state, parallel.global_batch(next(batches), mesh))
    if previous is not None:
      _check_finite(*previous)
    previous = (step + 1, step_metrics)
    if step == start_step:
      writer.start(step + 1)  # Excludes compilation from images/s.
    if (step + 1) % config.log_every_steps == 0 or step + 1 == total:
      _check_finite(*previous)
      writer.write(step + 1, step_metrics)
  _check_finite(*previous)

  if config.final_knn.enabled:
    results = final_knn(config, experiment, state, initial_state)
    writer.write(total, {f'knn_{name}_top1': r['top1'] for name, r in results.items()})
    if jax.process_index() == 0:
      with open(os.path.join(workdir, 'knn_results.json'), 'w') as f:
        json.dump(dict(step=total, dataset=config.dataset, **results), f, indent=1)
  writer.close()
  return state


def _features(experiment, params, bn_state, batches):
  embed = jax.jit(experiment.embed)
  feats, labels = [], []
  for batch in batches:
    out = np.asarray(embed(params, bn_state, batch['images']))
    feats.append(out[batch['mask']])
    labels.append(batch['labels'][batch['mask']])
  return np.concatenate(feats), np.concatenate(labels)


def final_knn(config, experiment, state, initial_state) -> dict:
  """kNN top-1 on the validation split: BYOL's online encoder vs two baselines.

  Baselines computed by the same code: the random-init encoder of this very run (its BN
  moving averages refreshed on training batches first, since a fresh BN state is meaningless in
  inference mode) and raw pixels (centred, cosine). The bank is the train split, unaugmented.
  """
  from byol_jax import datasets

  k, temperature = config.final_knn.k, config.final_knn.temperature
  eval_batch = 256
  bank = lambda: datasets.eval_batches(config, 'train', eval_batch)
  test = lambda: datasets.eval_batches(config, 'validation', eval_batch)
  online = jax.device_get((state.online_params, state.online_state))

  random_params, random_state = initial_state.online_params, initial_state.online_state
  recalibrate = jax.jit(experiment.recalibrate_batchnorm)
  calibration = datasets.pretrain_batches(config, start_step=0)
  for _ in range(30):
    random_state = recalibrate(random_params, random_state, next(calibration)['view1'])

  results = {}
  for name, (params, bn_state) in (('byol', online), ('random_init', (random_params,
                                                                     random_state))):
    bank_x, bank_y = _features(experiment, params, bn_state, bank())
    test_x, test_y = _features(experiment, params, bn_state, test())
    results[name] = knn.knn_accuracy(bank_x, bank_y, test_x, test_y, k=k,
                                     temperature=temperature, num_classes=config.num_classes)
  pixels = lambda batches: (np.concatenate([b['images'][b['mask']].reshape(
      int(b['mask'].sum()), -1) for b in batches]), np.concatenate(
          [b['labels'][b['mask']] for b in batches]))
  bank_x, bank_y = pixels(bank())
  test_x, test_y = pixels(test())
  centre = bank_x.mean(axis=0)
  results['raw_pixels'] = knn.knn_accuracy(bank_x - centre, bank_y, test_x - centre, test_y,
                                           k=k, temperature=temperature,
                                           num_classes=config.num_classes)
  print(f'Representation quality, kNN top-1 (k={k}, T={temperature}) on {len(test_y)} '
        f'held-out images: BYOL {100 * results["byol"]["top1"]:.1f}% | random-init encoder '
        f'{100 * results["random_init"]["top1"]:.1f}% | raw pixels '
        f'{100 * results["raw_pixels"]["top1"]:.1f}%', flush=True)
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config, workdir = _CONFIG.value, _WORKDIR.value
  if config is None:
    sys.exit('error: --config is required, e.g. --config=configs/byol.py:demo')
  if not workdir:
    sys.exit('error: --workdir is required.')
  try:
    validate_config(config)
    if config.experiment == 'byol':
      train_byol(config, workdir)
    else:
      raise ValueError(f'Unknown experiment {config.experiment!r}.')
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main)
