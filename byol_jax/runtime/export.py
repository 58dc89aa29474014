r"""Exports the online encoder of a pretraining run:
`python -m byol_jax.export --workdir=DIR --out=PATH [--format=native|torchvision] [--step=N]`.

Both formats are `.safetensors` files: a JSON header and raw little-endian arrays, no pickle
(loading never executes code), memory-mappable, read by `safetensors.numpy`, `safetensors.torch`,
`safetensors.flax` and any other safetensors reader. They hold only the online encoder (no target
network, no projector/predictor/classifier heads, no optimizer state). The metadata is in the
header's `__metadata__` (string values; the numbers and the model config as JSON text).

**native** (default; format `byol_jax.encoder`, format_version 3), read back by `load_encoder`:

  params/<module>/<name>   the encoder's Haiku parameters, float32, e.g.
                           params/encoder/initial_conv/w          HWIO conv kernel [kh, kw, in, out]
                           params/encoder/initial_batchnorm/scale BatchNorm scale  [1, 1, 1, C]
                           params/encoder/initial_batchnorm/offset BatchNorm offset [1, 1, 1, C]
  state/<module>/<name>    BatchNorm statistics, e.g.
                           state/encoder/initial_batchnorm/~/mean_ema/average  moving mean
                           state/encoder/initial_batchnorm/~/var_ema/average   moving variance
                           (plus the EMAs' `hidden` and `counter`, which inference ignores)
  __metadata__             format, format_version, step, dataset, image_size, num_classes, seed,
                           source, and `model` (JSON of the config.model needed to rebuild the
                           encoder with `networks.make_encoder`).

`<module>` is the Haiku module path (it may contain `/` and `~`); `<name>` is the last
component. Conventions: inputs NHWC float in [0, 1] (the encoder normalises with the ImageNet
mean/std itself), kernels HWIO, TF/Haiku SAME padding (for stride 2 the extra padding pixel goes
bottom/right, unlike PyTorch's symmetric padding), BatchNorm y = (x - mean) / sqrt(var + eps) *
scale + offset with eps = model.bn_eps. Output: globally average-pooled features.

Files of format_version 2 (NumPy `.npz`, metadata in a `meta` entry; written before the move to
safetensors) still load. Version-1 files (module names before the reference's) are refused.

**torchvision** (format `byol_jax.torchvision`): the state dict of a `torchvision.models.ResNet`
whose `fc` is `torch.nn.Identity()`: `conv1.weight`, `bn1.*`,
`layer{g+1}.{b}.conv{i+1}.weight`, `layer{g+1}.{b}.bn{i+1}.{weight,bias,running_mean,running_var,
num_batches_tracked}`, `layer{g+1}.{b}.downsample.{0,1}.*`; kernels OIHW. Inputs NCHW,
normalised as for torchvision's ImageNet models. `byol_jax.torchvision_resnet` builds the module
(ResNet-18/34 get the stage-0 projection torchvision lacks, widths other than 1 and the CIFAR stem
their channels) and reproduces SAME padding exactly; see docs/checkpoints.md. Writing it needs
no PyTorch.
"""

import io
import json
import re
import zipfile
from typing import Optional

import jax
import ml_collections
import numpy as np
import safetensors
import safetensors.numpy

from byol_jax.runtime import checkpointing, storage
from byol_jax.core import byol_experiment, networks

FORMAT = 'byol_jax.encoder'
# 3: version 2's arrays and names in a .safetensors file, metadata in its header.
# 2: the reference's module names and architecture (stage-0 projection for ResNet-18/34, the
#    reference's initial kernels), in an .npz with a JSON `meta` entry. Still read.
# Version-1 files name their modules differently.
FORMAT_VERSION = 3
NPZ_FORMAT_VERSION = 2
TORCHVISION_FORMAT = 'byol_jax.torchvision'
TORCHVISION_FORMAT_VERSION = 1
FORMATS = ('native', 'torchvision')
_PARAMS, _STATE, _META = 'params/', 'state/', 'meta'
# Metadata values that are stored as plain text in the header; all others are JSON text.
_JSON_KEYS = frozenset({'format_version', 'step', 'image_size', 'num_classes', 'seed', 'model',
                        'torchvision'})

# What the torchvision export expects and returns, also written into its header.
TORCHVISION_INPUT = ('NCHW float32 RGB, scaled to [0, 1] then normalised as for torchvision\'s '
                     'ImageNet models: (x - mean) / std with mean (0.485, 0.456, 0.406) and std '
                     '(0.229, 0.224, 0.225), per channel')
TORCHVISION_OUTPUT = ('the global average pool (model.fc = torch.nn.Identity(); the encoder has '
                      'no classifier)')
TORCHVISION_PADDING = ('TF SAME: byol_jax.runtime.torchvision_resnet.same_padding_(model) reproduces it; '
                       'torchvision\'s symmetric padding shifts every stride-2 conv and the '
                       'max-pool by one pixel on even-sized maps')


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
  """The encoder alone (`networks.make_encoder_transform`): apply(params, state, None, images,
  is_training) -> (features, state); is_training=False uses the BatchNorm moving averages."""
  return networks.make_encoder_transform(model_config)


def _meta(step: int, saved_config: dict, source: str) -> dict:
  return dict(format=FORMAT, format_version=FORMAT_VERSION, step=int(step),
              dataset=saved_config['dataset'], image_size=saved_config['image_size'],
              num_classes=saved_config['num_classes'], seed=saved_config['seed'],
              source=storage.resolve(source), model=saved_config['model'])


def read_checkpoint_encoder(path: str, step: Optional[int] = None):
  """(params, state, meta) of the online encoder in a run's checkpoint (latest readable)."""
  _, saved_config = checkpointing.read_saved_config(path, step)
  config = ml_collections.ConfigDict(saved_config)
  step, train_state, saved_config = checkpointing.restore_state(
      path, checkpointing.train_state_target(byol_experiment.state_shapes(config)), step)
  params = jax.device_get(_encoder_entries(train_state.online_params))
  state = jax.device_get(_encoder_entries(train_state.online_state))
  return params, state, _meta(step, saved_config, path)


# ---------------------------------------------------------------------------------------------
# Writing.


def _header(meta: dict) -> dict:
  """safetensors `__metadata__` (str -> str): text as is, everything else as JSON."""
  return {key: value if isinstance(value, str) and key not in _JSON_KEYS
          else json.dumps(_plain(value), sort_keys=True) for key, value in meta.items()}


def _parse_header(header: dict) -> dict:
  return {key: json.loads(value) if key in _JSON_KEYS else value
          for key, value in header.items()}


def _plain(value):
  """A ConfigDict (or dict of them) as plain JSON-able values."""
  if isinstance(value, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
    return value.to_dict()
  return value


def _write_atomically(out: str, arrays: dict, header: dict):
  """The file appears complete or not at all (storage.write_bytes: a temporary name renamed,
  or one upload to object storage)."""
  arrays = {key: np.ascontiguousarray(value) for key, value in arrays.items()}
  storage.write_bytes(out, safetensors.numpy.save(arrays, metadata=header))


def write_native(out: str, params, state, meta: dict) -> dict:
  """Writes encoder `params`/`state` (Haiku dicts) in the native format; returns the metadata."""
  meta = dict(meta, format=FORMAT, format_version=FORMAT_VERSION)
  _write_atomically(out, {**_flatten(_PARAMS, params), **_flatten(_STATE, state)}, _header(meta))
  return meta


def _architecture(model_config):
  """(blocks, channels, bottleneck) of a ResNet encoder config, or ValueError for others."""
  kind = model_config['encoder']
  if kind == 'tiny_resnet':
    return networks.TINY_RESNET
  if kind.startswith('resnet') and kind[len('resnet'):].isdigit():
    depth = int(kind[len('resnet'):])
    if depth in networks.RESNET_DEPTHS:
      return networks.RESNET_DEPTHS[depth]
  raise ValueError(f'--format=torchvision needs a ResNet encoder (resnet18/34/50/101/152/200 or '
                   f'tiny_resnet); model.encoder is {kind!r}.')


def torchvision_architecture(model_config) -> dict:
  """How to build the torchvision ResNet that takes this encoder's weights (JSON-able).

  block/layers/planes are torchvision's `ResNet(block, layers)` and `_make_layer(block, planes,
  ...)` arguments; `stock` names the `torchvision.models` constructor that builds exactly this
  network (width 1, ImageNet stem, bottleneck blocks, eps 1e-5), or None.
  """
  if model_config.get('resnet_v2', False):
    raise ValueError('--format=torchvision cannot represent model.resnet_v2=True: torchvision has '
                     'no pre-activation ResNet (its blocks are post-activation, and v2\'s '
                     'final_batchnorm has no place in its state dict). Use the native format.')
  blocks, channels, bottleneck = _architecture(model_config)
  expansion = 4 if bottleneck else 1
  width = model_config['width']
  # The same arithmetic as networks.ResNet: channels of group g = planes[g] * expansion.
  planes = [max(1, int(c // expansion * width)) for c in channels]
  stem = max(1, int(64 * width))
  cifar = bool(model_config.get('cifar_stem', False))
  bn_eps = float(model_config.get('bn_eps', 1e-5))
  depth = model_config['encoder'][len('resnet'):]
  standard = (bottleneck and width == 1 and not cifar and bn_eps == 1e-5
              and depth in ('50', '101', '152'))
  return dict(
      block='Bottleneck' if bottleneck else 'BasicBlock', layers=list(blocks), planes=planes,
      stem_channels=stem, stem_kernel=3 if cifar else 7, stem_stride=1 if cifar else 2,
      max_pool=not cifar, bn_eps=bn_eps,
      # torchvision's _make_layer projects only where the shape changes; BYOL projects every
      # group's first block. The torchvision module needs these extra `downsample`s.
      added_downsample=['layer1.0'] if stem == planes[0] * expansion else [],
      stock=f'resnet{depth}' if standard else None)


_BLOCK_MODULE = re.compile(r'encoder/block_group_(\d+)/block_(\d+)/'
                           r'(conv_(\d+)|batchnorm_(\d+)|shortcut_conv|shortcut_batchnorm)$')


def _torchvision_module(module: str) -> str:
  """torchvision's name of a Haiku module of the encoder (ValueError for one it lacks)."""
  if module == 'encoder/initial_conv':
    return 'conv1'
  if module == 'encoder/initial_batchnorm':
    return 'bn1'
  match = _BLOCK_MODULE.match(module)
  if not match:
    raise ValueError(f'The encoder module {module!r} has no counterpart in torchvision\'s ResNet.')
  group, block, kind, conv, bn = match.groups()
  prefix = f'layer{int(group) + 1}.{block}'
  if conv is not None:
    return f'{prefix}.conv{int(conv) + 1}'
  if bn is not None:
    return f'{prefix}.bn{int(bn) + 1}'
  return f'{prefix}.downsample.{0 if kind == "shortcut_conv" else 1}'


def torchvision_state_dict(params, state, model_config) -> dict:
  """The encoder's weights as a torchvision ResNet state dict of NumPy arrays (no fc).

  Conv kernels HWIO -> OIHW; BatchNorm scale/offset -> weight/bias, the moving mean/variance ->
  running_mean/running_var and the EMA's update counter -> num_batches_tracked (int64).
  """
  torchvision_architecture(model_config)  # Refuses what torchvision cannot hold.
  out = {}
  for module, values in params.items():
    name = _torchvision_module(module)
    if set(values) == {'w'}:
      out[f'{name}.weight'] = np.asarray(values['w'], np.float32).transpose(3, 2, 0, 1)
    elif set(values) == {'scale', 'offset'}:
      mean_ema, var_ema = state[f'{module}/~/mean_ema'], state[f'{module}/~/var_ema']
      out[f'{name}.weight'] = np.asarray(values['scale'], np.float32).reshape(-1)
      out[f'{name}.bias'] = np.asarray(values['offset'], np.float32).reshape(-1)
      out[f'{name}.running_mean'] = np.asarray(mean_ema['average'], np.float32).reshape(-1)
      out[f'{name}.running_var'] = np.asarray(var_ema['average'], np.float32).reshape(-1)
      out[f'{name}.num_batches_tracked'] = np.asarray(mean_ema.get('counter', 0), np.int64)
    else:
      raise ValueError(f'Unexpected parameters {sorted(values)} in {module!r}.')
  return out


def write_torchvision(out: str, params, state, meta: dict) -> dict:
  """Writes encoder `params`/`state` as a torchvision ResNet state dict; returns the metadata."""
  model_config = meta['model']
  meta = dict(meta, format=TORCHVISION_FORMAT, format_version=TORCHVISION_FORMAT_VERSION,
              torchvision=torchvision_architecture(model_config), input=TORCHVISION_INPUT,
              output=TORCHVISION_OUTPUT, padding=TORCHVISION_PADDING)
  _write_atomically(out, torchvision_state_dict(params, state, model_config), _header(meta))
  return meta


def export_encoder(workdir: str, out: str, step: Optional[int] = None,
                   format: str = 'native') -> dict:  # pylint: disable=redefined-builtin
  """Writes the online encoder of `workdir`'s latest (or `step`'s) checkpoint to `out`.

  `format` is 'native' (for `load_encoder`) or 'torchvision'. The file appears complete or not
  at all. Returns the metadata written.
  """
  if format not in FORMATS:
    raise ValueError(f'Unknown export format {format!r}: choose from {", ".join(FORMATS)}.')
  params, state, meta = read_checkpoint_encoder(workdir, step)
  if format == 'torchvision':
    return write_torchvision(out, params, state, meta)
  return write_native(out, params, state, meta)


# ---------------------------------------------------------------------------------------------
# Reading.


def _container(path: str) -> str:
  """'safetensors' or 'npz' from the file's first bytes; ValueError naming the file otherwise."""
  if not storage.exists(path):
    raise FileNotFoundError(f'No encoder export or workdir at {path}.')
  with storage.open(path, 'rb') as f:
    head = f.read(9)
  if head.startswith(b'PK\x03\x04'):
    return 'npz'
  if head.startswith(b'\x93NUMPY'):
    raise ValueError(f'{path} is a single .npy array, not an encoder export.')
  if len(head) == 9 and head[8:9] == b'{':  # u64 header length, then the JSON header.
    return 'safetensors'
  raise ValueError(f'{path} is not a readable encoder export: neither a .safetensors nor an '
                   f'.npz file.')


def _open_npz(path: str):
  """np.load without pickles; an unreadable file is a ValueError naming it."""
  try:
    if storage.is_remote(path):  # NpzFile reads lazily: give it the bytes, not a temporary.
      return np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False)
    return np.load(path, allow_pickle=False)
  except (ValueError, OSError, zipfile.BadZipFile) as e:
    raise ValueError(f'{path} is not a readable encoder export: {e}') from None


def _safetensors_header(path: str) -> dict:
  try:
    with storage.local_file(path) as local, safetensors.safe_open(local, framework='numpy') as f:
      return f.metadata() or {}
  except (safetensors.SafetensorError, OSError) as e:
    raise ValueError(f'{path} is not a readable encoder export: {e}') from None


def _read_metadata(path: str, container: str) -> dict:
  if container == 'npz':
    with _open_npz(path) as data:
      if _META not in data.files:
        raise ValueError(f'{path} is not a byol_jax encoder export (no `meta` entry).')
      meta = json.loads(str(data[_META]))
  else:
    header = _safetensors_header(path)
    if 'format' not in header:
      raise ValueError(f'{path} is not a byol_jax encoder export (no `format` in its '
                       f'safetensors metadata).')
    try:
      meta = _parse_header(header)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path} has unreadable metadata: {e}') from None
  expected = {
      ('npz', FORMAT): NPZ_FORMAT_VERSION,
      ('safetensors', FORMAT): FORMAT_VERSION,
      ('safetensors', TORCHVISION_FORMAT): TORCHVISION_FORMAT_VERSION}
  key = (container, meta.get('format'))
  if key not in expected:
    raise ValueError(f'{path} has format {meta.get("format")!r}, expected {FORMAT!r}.')
  version = meta.get('format_version', 0)
  if version != expected[key]:
    raise ValueError(f'{path} has format_version {version}; this code reads '
                     f'{FORMAT_VERSION} (.safetensors) and {NPZ_FORMAT_VERSION} (.npz) '
                     f'(version 1 predates the reference module names: re-export with the '
                     f'byol_jax version that wrote it).')
  return meta


def load_metadata(path: str) -> dict:
  """The metadata (format, step, dataset, image_size, num_classes, model, ...) of an export
  file (either format), or of the latest readable checkpoint of a workdir."""
  if storage.isdir(path):
    return _meta(*checkpointing.read_saved_config(path), path)
  return _read_metadata(path, _container(path))


def load_encoder(path: str):
  """(model_config, params, state) of an exported encoder, for `make_encoder_fn`.

  `path` is a native export file (.safetensors, or a version-2 .npz), or a pretraining workdir
  (or its `checkpoints` directory), whose latest readable checkpoint is read. `model_config` is
  a ConfigDict (config.model of the run); params and state are Haiku dicts of numpy arrays.
  `load_metadata` gives the rest (image_size, dataset, step, ...).
  """
  if storage.isdir(path):
    params, state, meta = read_checkpoint_encoder(path)
    return ml_collections.ConfigDict(meta['model']), params, state
  container = _container(path)
  meta = _read_metadata(path, container)
  if meta['format'] == TORCHVISION_FORMAT:
    raise ValueError(f'{path} is a torchvision export ({TORCHVISION_FORMAT}): load it in PyTorch '
                     f'(byol_jax.runtime.torchvision_resnet.load), or export the native format for JAX.')
  if container == 'npz':
    with _open_npz(path) as data:
      arrays = {key: data[key] for key in data.files if key != _META}
  else:
    try:
      with storage.local_file(path) as local:
        arrays = safetensors.numpy.load_file(local)
    except (safetensors.SafetensorError, OSError) as e:
      raise ValueError(f'{path} is not a readable encoder export: {e}') from None
  return (ml_collections.ConfigDict(meta['model']), _unflatten(_PARAMS, arrays),
          _unflatten(_STATE, arrays))
