r"""Entry point: `python -m byol_jax.main_loop --config=configs/byol.py[:preset] --workdir=DIR`.

Overrides follow ml_collections: `--config.batch_size=64 --config.model.encoder=resnet18`.
The loop, top to bottom: validate the config, build the mesh and experiment, initialise,
iterate over (seed, step)-determined batches, log, evaluate the online classifier every
`eval_every_steps` and at the end (`final_eval`; top-1/top-5 on the test split, or on the
validation hold-out when the dataset has no test split, as WORKDIR/online_eval_results.json),
and report representation quality with kNN when the config asks for it. `configs/eval.py`
(experiment 'linear_eval') runs an evaluation protocol on a pretrained encoder instead
(evaluation/drivers.py).
"""

import itertools
import sys

from absl import app, flags
import jax
import numpy as np
from ml_collections import config_flags

from byol_jax.core import byol_experiment, networks
from byol_jax.runtime import (checkpointing, config_errors, distributed, metrics, parallel,
                              storage)
from byol_jax.evaluation import drivers, steps


def _define_flags():
  """Defined only when run as a program: importing this module (tests, other entry points)
  must not clash with the importer's own --config / --workdir."""
  config_flags.DEFINE_config_file('config', None,
                                  'Config file (configs/byol.py or configs/eval.py).',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory for metrics and checkpoints.')


def validate_config(config):
  """One-line errors for bad values, before anything is compiled."""
  if config.model.encoder not in networks.ENCODERS:
    raise ValueError(f'Unknown model.encoder {config.model.encoder!r}: choose from '
                     f'{", ".join(networks.ENCODERS)}.')
  networks.compute_dtype(config.model)
  byol_experiment.init_settings(config)  # Raises for an unknown model.init / target_init.
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
  if config.knn_every_steps < 0:
    raise ValueError(f'knn_every_steps must be >= 0 (0: off), got {config.knn_every_steps}.')
  if config.eval_every_steps < 0:
    raise ValueError(f'eval_every_steps must be >= 0 (0: off), got {config.eval_every_steps}.')
  if (config.final_knn.enabled or config.knn_every_steps) and config.data.train_on_validation:
    raise ValueError('kNN is measured on the validation split, which data.train_on_validation='
                     'True also puts in the kNN bank (and in pretraining): set '
                     'data.train_on_validation=False, or turn kNN off (final_knn.enabled=False, '
                     'knn_every_steps=0).')
  if config.eval_batch_size <= 0:
    raise ValueError(f'eval_batch_size must be positive, got {config.eval_batch_size}.')
  from byol_jax.data import augmentations  # TensorFlow: the input pipeline needs it next anyway.
  augmentations.crop_sampler(config.augment)  # Raises for an unknown sampler.
  augmentations.color_jitter_style(config.augment)  # Raises for an unknown style.
  augmentations.eval_crop_fraction(config.data)  # Raises outside (0, 1].
  augmentations.view_size(config.augment, config.image_size)  # Raises unless an int >= 0.


def _check_finite(step: int, metrics_at_step: dict):
  loss = float(np.asarray(metrics_at_step['loss']))
  if not np.isfinite(loss):
    raise FloatingPointError(f'Loss is {loss} at step {step}: stopping; no checkpoint of this '
                             f'state was written.')


def _forget_logged_after(workdir: str, step: int, total: int):
  """Drops the metrics.jsonl rows a run resumed at `step` logs again, so that every row is
  there once, however the previous run ended (SIGKILL, a disk-full or other error surfacing
  one or more log steps after the failed save, a NaN): those of later steps and, when `step`
  is the final step, the final evaluations' rows (written after the final save; its training
  row, which has a plain `loss`, came before it). TensorBoard is told the same by
  MetricWriter.restart."""
  def logged_after(row):
    logged = row.get('step', 0)
    return logged > step or (logged == step == total and 'loss' not in row)
  dropped = metrics.drop_rows(workdir, logged_after)
  if dropped and jax.process_index() == 0:
    print(f'metrics.jsonl: dropped {dropped} rows logged after step {step}; they are logged '
          f'again as the run repeats those steps.', flush=True)


def train_byol(config, workdir: str):
  # TensorFlow enters only with the input pipeline.
  from byol_jax.data import augmentations, datasets

  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  train_examples = datasets.num_examples(config, 'train')
  experiment = byol_experiment.ByolExperiment(config, train_examples)
  total = experiment.total_steps
  if jax.process_index() == 0:
    views = augmentations.view_size(config.augment, config.image_size)
    print(f'BYOL: {config.model.encoder} x{config.model.width} on {config.dataset} '
          f'({train_examples} training images), batch {config.batch_size} over '
          f'{mesh.devices.size} devices, {total} steps' +
          (f', {views} px views (evaluated at {config.image_size} px).'
           if views != config.image_size else '.'), flush=True)

  checkpoints = checkpointing.Checkpointer(workdir, config)  # Fails now if it cannot write.
  initial_state = experiment.init(jax.random.PRNGKey(config.seed), config.image_size)
  # The latest complete checkpoint, if any: its step drives the LR/tau schedules and the
  # (seed, step)-determined batches, so the resumed run is the uninterrupted one.
  start_step, state = checkpoints.restore_or_init(initial_state, mesh)
  _forget_logged_after(workdir, start_step, total)  # Before the writer opens the file.
  step_fn = parallel.map_step(experiment.train_step, mesh)
  batches = datasets.pretrain_batches(config, start_step=start_step)
  if start_step == 0:
    # As the reference: the parameters of `initial_state`, BatchNorm statistics from the first
    # batch (its init pass runs on that batch).
    first = next(batches)
    state = experiment.init_from_batch(jax.random.PRNGKey(config.seed),
                                       parallel.global_batch(first, mesh), mesh)
    batches = itertools.chain([first], batches)
  writer = metrics.MetricWriter(workdir, total, config.batch_size)
  writer.restart(start_step)

  online_eval_fn = parallel.map_step(steps.online_eval_step(experiment), mesh,
                                     donate_state=False)

  def online_eval(step):
    result = drivers.online_classifier_eval(config, online_eval_fn, state, mesh)
    writer.start(step)  # The evaluation pass is not training time: keep it out of images/s.
    writer.write(step, {key: result[key] for key in ('top1', 'top5', 'loss')},
                 prefix=f'online_{result["split"]}_')
    return result

  save_schedule = checkpointing.SaveSchedule(config, sync_every=config.log_every_steps)
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
    if config.knn_every_steps and (step + 1) % config.knn_every_steps == 0 and step + 1 < total:
      knn_metrics = drivers.knn_monitor(config, experiment, state)
      writer.start(step + 1)  # The kNN pass is not training time: keep it out of images/s.
      writer.write(step + 1, knn_metrics)
    if (config.eval_every_steps and (step + 1) % config.eval_every_steps == 0
        and step + 1 < total):
      online_eval(step + 1)
    if step + 1 < total and save_schedule.should_save(step + 1):
      _check_finite(*previous)  # Only a state whose loss was checked finite is saved.
      checkpoints.save(step + 1, state)
      if save_schedule.stop_requested:
        checkpoints.close()  # Waits until the checkpoint is complete on disk.
        save_schedule.close()
        writer.close()
        print(f'Stopped by {save_schedule.stop_reason} at step {step + 1}: checkpoint saved to '
              f'{checkpoints.step_path(step + 1)}. Rerun the same command to resume.', flush=True)
        return state
  if previous is not None:  # None when resuming a run that had already finished.
    _check_finite(*previous)
  if checkpoints.latest_step() != total:
    checkpoints.save(total, state)
  checkpoints.close()
  save_schedule.close()  # From here a signal stops at once: the final state is saved.

  if config.final_eval:
    result = online_eval(total)
    if jax.process_index() == 0:
      storage.write_json(storage.join(workdir, 'online_eval_results.json'),
                         dict(step=total, dataset=config.dataset, classifier='online', **result))

  if config.final_knn.enabled:
    results = drivers.pretraining_knn(config, experiment, state, initial_state)
    writer.write(total, {f'knn_{name}_top1': r['top1'] for name, r in results.items()})
    if jax.process_index() == 0:
      storage.write_json(storage.join(workdir, 'knn_results.json'),
                         dict(step=total, dataset=config.dataset, **results))
  writer.close()
  return state


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  if config is None:
    sys.exit('error: --config is required, e.g. --config=configs/byol.py:demo')
  if not workdir:
    sys.exit('error: --workdir is required.')
  try:
    # Multi-host: connect the processes before anything touches a device (docs/multihost.md).
    distributed.initialize_from_flags()
    if config.experiment == 'byol':
      validate_config(config)
      train_byol(config, workdir)
    elif config.experiment == 'linear_eval':  # configs/eval.py: all evaluation protocols.
      drivers.validate_config(config)
      drivers.evaluate(config, workdir)
    else:
      raise ValueError(f'Unknown experiment {config.experiment!r}.')
  except (ValueError, FileNotFoundError, FloatingPointError, distributed.DistributedError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  from byol_jax.runtime import xla_cpu_flags  # Faster CPU convolutions; set before JAX starts.
  xla_cpu_flags.restart_with_huge_pages()  # Re-executes this program once (see there).
  xla_cpu_flags.configure()
  _define_flags()
  config_errors.run(main)  # app.run, with one line for a bad --config. key.
