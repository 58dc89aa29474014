"""What a pretraining run says about its data, and the evaluation config completed from it.

configs/eval.py leaves the data description unset (None): `describe(path)` reads it from the
checkpoint (the run's config stored with each step) or from an export file's metadata (dataset,
image_size, num_classes; the rest from the workdir it names as `source`, when readable), and
`resolve(config, run)` fills every unset key from it. Explicit settings win. The data pipeline
(TensorFlow) is imported only to choose `eval_split`.
"""

import ml_collections

from byol_jax.core import networks
from byol_jax.runtime import checkpointing, export, storage

# Used when the run's full config is unknown (an export file whose workdir is gone).
# A run that predates data.eval_crop_fraction was scored with the reference's 0.875 crop.
FALLBACKS = {'data.data_dir': '', 'data.skip_corrupt_images': False,
             'data.eval_crop_fraction': 0.875,
             'data.shuffle_buffer': 10_000, 'augment.crop_scale': (0.08, 1.0),
             'augment.flip': True, 'knn.k': 200, 'knn.temperature': 0.1, 'batch_size': 256}
# Never guessed: they decide which images were held out of pretraining.
REQUIRED = ('data.validation_examples', 'data.train_on_validation')
MIN_BATCH = 128  # The small CPU presets pretrain at 64; 80 epochs of a linear layer need fewer steps.


def _saved_config(path, step=None):
  try:
    return checkpointing.read_saved_config(path, step)[1]
  except Exception:  # pylint: disable=broad-except  (gone, moved, unreadable: not there)
    return None


def describe(path: str, meta: dict) -> dict:
  """The pretraining run's settings for the checkpoint at `path` (meta: load_pretrained's).

  A workdir: its config at meta['step']. An export file: its metadata, plus the config of the
  workdir it was exported from when that can still be read (else `config_source` is None).
  """
  run = None
  source = path if storage.isdir(path) else meta.get('source')
  if source and storage.isdir(source):
    run = _saved_config(source, meta.get('step') if source == path else None)
  described = dict(run or {}, config_source=source if run else None)
  described.update({key: meta[key] for key in ('dataset', 'image_size', 'num_classes')
                    if key in meta})
  return described


def _get(tree: dict, key: str):
  for part in key.split('.'):
    if not isinstance(tree, dict) or part not in tree:
      return None
    tree = tree[part]
  return tree


def _set(config, key: str, value):
  *parents, leaf = key.split('.')
  node = config
  for parent in parents:
    node = node[parent]
  node[leaf] = value


def _current(config, key: str):
  node = config
  for part in key.split('.'):
    node = node[part]
  return node


def resolve(config, run: dict, say=print):
  """`config` (configs/eval.py) with every unset (None) key taken from `run` (`describe`).

  Raises ValueError (one line) for what cannot be decided: an export without the hold-out
  settings, an encoder this code cannot build.
  """
  config = config.copy_and_resolve_references()
  config.unlock()
  taken = {'dataset': run.get('dataset'), 'image_size': run.get('image_size'),
           'num_classes': run.get('num_classes')}
  for key in ('data.data_dir', 'data.validation_examples', 'data.train_on_validation',
              'data.eval_crop_fraction', 'data.skip_corrupt_images', 'data.shuffle_buffer',
              'augment.flip'):
    taken[key] = _get(run, key)
  crop_scale = _get(run, 'augment.crop_scale')
  taken['augment.crop_scale'] = tuple(crop_scale) if crop_scale is not None else None
  taken['knn.k'], taken['knn.temperature'] = _get(run, 'final_knn.k'), _get(
      run, 'final_knn.temperature')
  batch = run.get('batch_size')
  taken['batch_size'] = max(int(batch), MIN_BATCH) if batch else None

  missing = []
  for key, value in taken.items():
    if _current(config, key) is not None:
      continue  # Set explicitly: it wins.
    if value is None:
      value = FALLBACKS.get(key)
    if value is None:
      missing.append(key)
    else:
      _set(config, key, value)
  if missing:
    raise ValueError(f'{config.checkpoint} does not say {", ".join(missing)} (an export file '
                     f'whose pretraining workdir is gone): pass '
                     f'{" ".join(f"--config.{key}=..." for key in missing)}.')

  if config.image_size != run.get('image_size'):
    say(f'Note: the encoder was pretrained at {run.get("image_size")} px and is evaluated at '
        f'{config.image_size} px (it is convolutional with global pooling, so any size runs; '
        f'its BatchNorm statistics are those of {run.get("image_size")} px).')
  if config.dataset != run.get('dataset'):
    say(f'Note: pretrained on {run.get("dataset")}, evaluated on {config.dataset} '
        f'({config.num_classes} classes).')

  if config.eval_split is None:
    from byol_jax.data import datasets  # TensorFlow: the data is read next anyway.
    try:
      has_test = datasets.has_split(config, 'test')
    except (ValueError, FileNotFoundError) as e:
      raise type(e)(f'dataset {config.dataset!r}: {checkpointing.one_line(e)}') from None
    config.eval_split = 'test' if has_test else 'validation'
  config.lock()
  return config


def check_encoder(model_config):
  """One line when the checkpoint's encoder is not one this code builds."""
  if model_config.encoder not in networks.ENCODERS:
    raise ValueError(f'The checkpoint\'s encoder {model_config.encoder!r} is not one of '
                     f'{", ".join(networks.ENCODERS)}.')


def check_labels(labels, num_classes: int, dataset: str):
  """One line when `labels` fall outside [0, num_classes)."""
  if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f'{dataset} has label {int(labels.max())} but num_classes={num_classes}: '
                     f'pass --config.num_classes={int(labels.max()) + 1} (the head is fresh, '
                     f'any number of classes works).')


def load(path: str):
  """(model_config, params, state, meta) of the online encoder at `path` (workdir or export)."""
  if storage.isdir(path):
    params, state, meta = export.read_checkpoint_encoder(path)
    return ml_collections.ConfigDict(meta['model']), params, state, meta
  model_config, params, state = export.load_encoder(path)
  return model_config, params, state, export.load_metadata(path)
