r"""Exports the online encoder of a pretraining run: `python -m byol_jax.export --workdir=DIR --out=PATH`.

The file is a NumPy `.npz` (a zip of `.npy` arrays) that is read with `allow_pickle=False`:
loading it never executes code. It holds only the online encoder (no target network, no
projector/predictor/classifier heads, no optimizer state):

  params/<module>/<name>   the encoder's Haiku parameters, float32, e.g.
                           params/encoder/initial_conv/w          HWIO conv kernel [kh, kw, in, out]
                           params/encoder/initial_batchnorm/scale BatchNorm scale  [1, 1, 1, C]
                           params/encoder/initial_batchnorm/offset BatchNorm offset [1, 1, 1, C]
  state/<module>/<name>    BatchNorm statistics, e.g.
                           state/encoder/initial_batchnorm/~/mean_ema/average  moving mean
                           state/encoder/initial_batchnorm/~/var_ema/average   moving variance
                           (plus the EMAs' `hidden` and `counter`, which inference ignores)
  meta                     a 0-d string: JSON with format, format_version, step, dataset,
                           image_size, num_classes, seed, source, and `model` (the config.model
                           needed to rebuild the encoder with `networks.make_encoder`).

`<module>` is the Haiku module path (it may contain `/` and `~`); `<name>` is the last
component. Conventions: inputs NHWC float in [0, 1] (the encoder normalises with the ImageNet
mean/std itself), kernels HWIO, TF/Haiku SAME padding (for stride 2 the extra padding pixel goes
bottom/right, unlike PyTorch's symmetric padding), BatchNorm y = (x - mean) / sqrt(var + eps) *
scale + offset with eps = model.bn_eps. Output: globally average-pooled features.
"""

import json
import os
import sys
import zipfile
from typing import Optional

from absl import app, flags
import haiku as hk
import jax
import ml_collections
import numpy as np

from byol_jax import checkpointing, networks

FORMAT = 'byol_jax.encoder'
# 2: the reference's module names and architecture (stage-0 projection for ResNet-18/34, the
# reference's initial kernels). Version-1 files name their modules differently.
FORMAT_VERSION = 2
_PARAMS, _STATE, _META = 'params/', 'state/', 'meta'


def _encoder_entries(tree) -> dict:
  """The encoder's modules of a Haiku dict of the whole BYOL network (module path 'encoder')."""
  return {module: dict(values) for module, values in tree.items()
          if module.split('/')[0] == 'encoder'}


def _flatten(prefix: str, tree) -> dict:
  return {f'{prefix}{module}/{name}': np.asarray(value)
          for module, values in tree.items() for name, value in values.items()}


def _unflatten(prefix: str, arrays) -> dict:
  tree = {}
  for key, value in arrays.items():
    if key.startswith(prefix):
      module, name = key[len(prefix):].rsplit('/', 1)
      tree.setdefault(module, {})[name] = value
  return tree


def make_encoder_fn(model_config):
  """`hk.transform_with_state` of the encoder alone, with the same module names as in training.

  apply(params, state, None, images, is_training) -> (features, state); use is_training=False
  for features with the BatchNorm moving averages, as linear evaluation does.
  """
  dtype = networks.compute_dtype(model_config)

  def forward(images, is_training):
    return networks.make_encoder(model_config)(images.astype(dtype), is_training)

  return hk.transform_with_state(forward)


def _meta(step: int, saved_config: dict, source: str) -> dict:
  return dict(format=FORMAT, format_version=FORMAT_VERSION, step=int(step),
              dataset=saved_config['dataset'], image_size=saved_config['image_size'],
              num_classes=saved_config['num_classes'], seed=saved_config['seed'],
              source=os.path.abspath(source), model=saved_config['model'])


def read_checkpoint_encoder(path: str, step: Optional[int] = None):
  """(params, state, meta) of the online encoder in a run's checkpoint (latest readable)."""
  _, saved_config = checkpointing.read_saved_config(path, step)
  config = ml_collections.ConfigDict(saved_config)
  step, train_state, saved_config = checkpointing.restore_state(
      path, checkpointing.train_state_target(config), step)
  params = jax.device_get(_encoder_entries(train_state.online_params))
  state = jax.device_get(_encoder_entries(train_state.online_state))
  return params, state, _meta(step, saved_config, path)


def export_encoder(workdir: str, out: str, step: Optional[int] = None) -> dict:
  """Writes the online encoder of `workdir`'s latest (or `step`'s) checkpoint to `out`.

  The file appears complete or not at all (written to a temporary name, then renamed).
  Returns the metadata written.
  """
  params, state, meta = read_checkpoint_encoder(workdir, step)
  arrays = {**_flatten(_PARAMS, params), **_flatten(_STATE, state),
            _META: np.asarray(json.dumps(meta, sort_keys=True))}
  out_dir = os.path.dirname(os.path.abspath(out))
  os.makedirs(out_dir, exist_ok=True)
  temporary = f'{out}.tmp-{os.getpid()}'
  try:
    with open(temporary, 'wb') as f:  # A file object: np.savez would append '.npz' to a name.
      np.savez(f, **arrays)
    os.replace(temporary, out)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)
  return meta


def _open(path: str):
  """np.load without pickles; a file that is not an .npz is a ValueError naming it."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'No encoder export or workdir at {path}.')
  try:
    return np.load(path, allow_pickle=False)
  except (ValueError, OSError, zipfile.BadZipFile) as e:
    raise ValueError(f'{path} is not a readable encoder export: {e}') from None


def load_metadata(path: str) -> dict:
  """The metadata (format, step, dataset, image_size, num_classes, model, ...) of an export
  file, or of the latest readable checkpoint of a workdir."""
  if os.path.isdir(path):
    return _meta(*checkpointing.read_saved_config(path), path)
  data = _open(path)
  if not isinstance(data, np.lib.npyio.NpzFile):
    raise ValueError(f'{path} is a single .npy array, not an encoder export (.npz).')
  with data:
    return _parse_meta(data, path)


def _parse_meta(data, path) -> dict:
  if _META not in data.files:
    raise ValueError(f'{path} is not a byol_jax encoder export (no `meta` entry).')
  meta = json.loads(str(data[_META]))
  if meta.get('format') != FORMAT:
    raise ValueError(f'{path} has format {meta.get("format")!r}, expected {FORMAT!r}.')
  if meta.get('format_version', 0) != FORMAT_VERSION:
    raise ValueError(f'{path} has format_version {meta.get("format_version")}; this code reads '
                     f'{FORMAT_VERSION} (version 1 predates the reference module names: '
                     f're-export with the byol_jax version that wrote it).')
  return meta


def load_encoder(path: str):
  """(model_config, params, state) of an exported encoder, for `make_encoder_fn`.

  `path` is an export file, or a pretraining workdir (or its `checkpoints` directory), whose
  latest readable checkpoint is read. `model_config` is a ConfigDict (config.model of the run);
  params and state are Haiku dicts of numpy arrays. `load_metadata` gives the rest (image_size,
  dataset, step, ...).
  """
  if os.path.isdir(path):
    params, state, meta = read_checkpoint_encoder(path)
    return ml_collections.ConfigDict(meta['model']), params, state
  meta = load_metadata(path)
  with _open(path) as data:
    arrays = {key: data[key] for key in data.files if key != _META}
  return (ml_collections.ConfigDict(meta['model']), _unflatten(_PARAMS, arrays),
          _unflatten(_STATE, arrays))


def _define_flags():
  """Defined only when run as a program: importing this module (evaluation does) must not
  clash with the importer's own --workdir."""
  flags.DEFINE_string('workdir', None, 'Pretraining workdir (reads its checkpoints).')
  flags.DEFINE_string('out', None, 'Output file, e.g. /tmp/encoder.npz.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest readable).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  workdir, out, step = flags.FLAGS.workdir, flags.FLAGS.out, flags.FLAGS.step
  if not workdir or not out:
    sys.exit('error: --workdir and --out are required, e.g. --workdir=/tmp/byol_demo '
             '--out=/tmp/byol_demo_encoder.npz')
  try:
    meta = export_encoder(workdir, out, step)
    _, params, _ = load_encoder(out)  # Reads back what was written.
  except (ValueError, OSError) as e:  # OSError covers FileNotFoundError and a full disk.
    sys.exit(f'error: {e}')
  print(f'Exported the online encoder ({meta["model"]["encoder"]}, '
        f'{networks.param_count(params):,} parameters) of step {meta["step"]} to {out}.')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
