r"""Reads a checkpoint written by the reference BYOL's checkpointing, without plain unpickling.

    python -m byol_jax.reference_checkpoint --pkl=pretrain.pkl \
        --config=configs/byol.py[:preset] --workdir=W [--config.x=...]

writes the reference's training state as this project's Orbax checkpoint `W/checkpoints/<step>/`
(the reference's step), from which `byol_jax.main_loop` resumes (same --config and overrides),
`byol_jax.export` exports the encoder and `configs/eval.py` evaluates it.

The reference (DeepMind's `byol/utils/checkpointing.py`) writes `pretrain.pkl` with dill,
protocol 2: a dict `{'experiment_state': _ByolExperimentState(online_params, target_params,
online_state, target_state, opt_state), 'step': int, 'rng': key}`. A pickle is a program: plain
`pickle.load` (or `dill.load`) of a downloaded file runs whatever callable the file names. Here
`safe_load` runs a `pickle.Unpickler` whose `find_class` resolves a short allow-list of names
(`ALLOWED`) to NumPy's array and dtype rebuilders or to local, data-only stand-ins: nothing of
Haiku, optax, JAX internals or the reference is imported on the file's behalf, and any other
name stops the load with `ReferenceCheckpointError` before it is called.

Module names differ from this project's in two places (`convert_tree`): the encoder's top-level
module is named after the reference's class (`res_net50/~/...`, `tiny_res_net/~/...`) and is
`encoder/...` here; a block is `block_group_{g}/~/block_{b}/~/...` there and
`block_group_{g}/block_{b}/...` here. The heads (`projector`, `predictor`, `classifier`) and all
names below the block level are the same. The reference's LARS momentum
(`ScaleByLarsState.mu`) is this project's `optax.trace` state (`TraceState.trace`): both
accumulate mu <- momentum * mu + (decayed, trust-ratio-scaled gradient) before the learning rate
is applied.

No TensorFlow here.
"""

import _compat_pickle
import collections
import os
import pickle
import re
import types
from typing import Any, NamedTuple, Optional

import jax
import numpy as np
import optax

from byol_jax.core import byol_experiment, networks, target_ema
from byol_jax.runtime import checkpointing, parallel

# ---------------------------------------------------------------------------------------------
# Errors.


class ReferenceCheckpointError(ValueError):
  """A reference checkpoint that cannot (or must not) be read: one line naming the file."""


class _Refused(Exception):
  """Raised inside the unpickler; `safe_load` turns it into a ReferenceCheckpointError."""


one_line = checkpointing.one_line


# ---------------------------------------------------------------------------------------------
# Local stand-ins for the classes a reference checkpoint names. Same field names as the
# reference's NamedTuples; nothing of the reference is imported.


def _no_build(self, state):
  """A pickle's BUILD on an allow-listed class or builder would change it for the whole
  process (BUILD sets attributes); with this `__setstate__` it fails instead (on the class
  itself the call lacks an argument, on an instance it refuses)."""
  del self, state
  raise _Refused('it modifies an allow-listed object (BUILD)')


class ByolExperimentState(NamedTuple):
  """Stand-in for `byol.byol_experiment._ByolExperimentState`."""
  online_params: Any
  target_params: Any
  online_state: Any
  target_state: Any
  opt_state: Any
  __setstate__ = _no_build


class AddWeightDecayState(NamedTuple):
  """Stand-in for `byol.utils.optimizers.AddWeightDecayState` (no fields)."""
  __setstate__ = _no_build


class ScaleByLarsState(NamedTuple):
  """Stand-in for `byol.utils.optimizers.ScaleByLarsState`: `mu` is the LARS momentum."""
  mu: Any
  __setstate__ = _no_build


class OptaxEmptyState(NamedTuple):
  """Stand-in for optax's field-less states (`EmptyState`, the older `ScaleState`)."""
  __setstate__ = _no_build


class _HaikuMapping(dict):
  """Stand-in for Haiku's immutable mappings (`FlatMapping`, `FlatMap`, `frozendict`).

  Their pickles call the class with one mapping (`__reduce__` returns `(cls, (mapping,))` in
  Haiku's 2020-2021 releases), which builds a dict here. A 2020 FlatMapping without
  `__reduce__` pickles as an empty object plus its attributes (`_leaves` and a nested-tuple
  `_structure`), rebuilt by `__setstate__`. `safe_load` returns plain dicts in their place.
  """

  def __setstate__(self, state):
    own, slots = state if isinstance(state, tuple) and len(state) == 2 else (state, None)
    fields = {**(own or {}), **(slots or {})}
    mapping = fields.get('_mapping')
    if mapping is None:
      mapping = fields.get('_storage')
    if mapping is None and '_leaves' in fields and isinstance(fields.get('_structure'), tuple):
      mapping = _unflatten_haiku_2020(fields['_leaves'], fields['_structure'])
    if not isinstance(mapping, dict):
      raise _Refused(f'a Haiku mapping with an unknown pickled state (fields '
                     f'{", ".join(sorted(map(str, fields)))})')
    self.update(mapping)


def _unflatten_haiku_2020(leaves, structure):
  """{key: value} from a 2020 FlatMapping's leaves and `(('key',), ('key', substructure))`."""
  leaves = iter(leaves)

  def build(nodes):
    out = {}
    for node in nodes:
      if not (isinstance(node, tuple) and node and isinstance(node[0], str) and len(node) <= 2):
        raise _Refused('a Haiku FlatMapping with a malformed structure')
      out[node[0]] = next(leaves) if len(node) == 1 else build(node[1])
    return out

  try:
    return build(structure)
  except StopIteration:
    raise _Refused('a Haiku FlatMapping with fewer leaves than its structure') from None


# ---------------------------------------------------------------------------------------------
# Safe builders for the callables a reference checkpoint names.


class _Builder:
  """A builder function as the unpickler sees it: callable, with no attributes to set."""
  __slots__ = ('_function',)

  def __init__(self, function):
    self._function = function

  def __call__(self, *args):
    return self._function(*args)

  __setstate__ = _no_build

  def __repr__(self):
    return f'<reference_checkpoint builder {self._function.__name__}>'


def _numpy_multiarray():
  try:
    from numpy._core import multiarray  # pylint: disable=g-import-not-at-top
  except ImportError:  # NumPy < 2.
    from numpy.core import multiarray  # pylint: disable=g-import-not-at-top
  return multiarray


_MULTIARRAY = _numpy_multiarray()
_RECONSTRUCT = _MULTIARRAY._reconstruct  # pylint: disable=protected-access


def _array_from_reduce(fun, args, state) -> np.ndarray:
  """An ndarray from the three parts of `ndarray.__reduce__`, whose `fun` was allow-listed."""
  if fun is not _RECONSTRUCT:
    raise _Refused(f'an array rebuilt with {getattr(fun, "__name__", type(fun).__name__)} '
                   f'instead of numpy _reconstruct')
  array = fun(*args)
  if type(array) is not np.ndarray:  # pylint: disable=unidiomatic-typecheck
    raise _Refused(f'an array of type {type(array).__name__}')
  array.__setstate__(state)
  return array


def _jax_reconstruct_array(fun, args, arr_state, aval_state):
  """`jax._src.array._reconstruct_array`: a jax.Array pickles as its NumPy value plus
  `aval_state` (`{'weak_type': bool}`); the NumPy value is what is kept."""
  if not isinstance(aval_state, dict):
    raise _Refused('a jax.Array with a malformed state')
  return _array_from_reduce(fun, args, arr_state)


def _dill_create_array(f, args, state, npdict=None):
  """`dill._dill._create_array`: dill's wrapper around `ndarray.__reduce__`."""
  if npdict:
    raise _Refused('an ndarray subclass carrying attributes')
  return _array_from_reduce(f, args, state)


def _dill_create_namedtuple(name, fieldnames, modulename, defaults=None):
  """`dill._dill._create_namedtuple`: dill writes NamedTuple classes by name and fields."""
  del defaults
  standin = _STANDINS.get((modulename, name))
  if standin is None:
    raise _Refused(f'it asks for the class {modulename}.{name} (through dill), which a '
                   f'reference BYOL checkpoint never holds')
  if tuple(fieldnames) != standin._fields:
    raise _Refused(f'its {modulename}.{name} has fields {tuple(fieldnames)}, expected '
                   f'{standin._fields}')
  return standin


def _safe_bytes(*args):
  """`bytes` as protocol-2 pickles use it: `bytes()` for b''. Nothing that allocates by count."""
  if not args:
    return b''
  if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
    return bytes(args[0])
  raise _Refused('a bytes object built from unexpected arguments')


def _dill_load_type(name):
  """`dill._dill._load_type`: dill writes the `bytes` type this way (for b'')."""
  if name != 'bytes':
    raise _Refused(f'it asks for the type {name!r} (through dill), which a reference BYOL '
                   f'checkpoint never holds')
  return _SAFE_BYTES


_SAFE_BYTES = _Builder(_safe_bytes)
_TEXT_ENCODINGS = ('latin1', 'latin-1', 'latin_1', 'iso-8859-1', 'iso8859-1')


def _codecs_encode(text, encoding='utf-8', errors='strict'):
  """`_codecs.encode(str, 'latin1')`: how protocol-2 pickles store bytes. Latin-1 only."""
  if (not isinstance(text, str) or not isinstance(encoding, str)
      or encoding.lower() not in _TEXT_ENCODINGS or errors != 'strict'):
    raise _Refused(f'_codecs.encode called with {type(text).__name__} and {encoding!r} '
                   f'(protocol-2 pickles use str and latin1)')
  return text.encode('latin-1')


# ---------------------------------------------------------------------------------------------
# The allow-list: (module, name) as the pickle names it -> what it resolves to. Anything else
# is refused.

_STANDINS = {
    ('byol.byol_experiment', '_ByolExperimentState'): ByolExperimentState,
    ('byol.utils.optimizers', 'AddWeightDecayState'): AddWeightDecayState,
    ('byol.utils.optimizers', 'ScaleByLarsState'): ScaleByLarsState,
    ('optax._src.base', 'EmptyState'): OptaxEmptyState,
    ('optax._src.transform', 'ScaleState'): OptaxEmptyState,
    ('optax', 'EmptyState'): OptaxEmptyState,
    ('optax', 'ScaleState'): OptaxEmptyState,
}


def _allow_list() -> dict:
  allowed = {}
  # Arrays: ndarray.__reduce__ is (_reconstruct, (ndarray, (0,), b'b'), state); the state holds
  # a dtype (numpy.dtype(...) + its __setstate__); NumPy scalars use `scalar(dtype, bytes)`.
  # NumPy 1.x wrote `numpy.core.multiarray`, NumPy 2 writes `numpy._core.multiarray`.
  for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
    allowed[(module, '_reconstruct')] = _RECONSTRUCT
    allowed[(module, 'scalar')] = _MULTIARRAY.scalar
  allowed[('numpy', 'ndarray')] = np.ndarray
  allowed[('numpy', 'dtype')] = np.dtype
  # Bytes in protocol 2: `_codecs.encode(str, 'latin1')`, and `bytes()` for b''.
  allowed[('_codecs', 'encode')] = _Builder(_codecs_encode)
  allowed[('builtins', 'bytes')] = _SAFE_BYTES
  # Older optax/Haiku containers.
  allowed[('collections', 'OrderedDict')] = collections.OrderedDict
  # Haiku's immutable mappings of 2020-2021 (params and state): a plain dict here.
  for module in ('haiku._src.data_structures', 'haiku.data_structures'):
    for name in ('FlatMapping', 'FlatMap', 'frozendict'):
      allowed[(module, name)] = _HaikuMapping
  # The reference's NamedTuple states and optax's field-less states: local stand-ins.
  allowed.update(_STANDINS)
  # The `rng` entry when written by current JAX: a jax.Array (its NumPy value is kept).
  allowed[('jax._src.array', '_reconstruct_array')] = _Builder(_jax_reconstruct_array)
  # dill's own helpers (what `dill.dump` writes for arrays, NamedTuple classes and `bytes`).
  for module in ('dill._dill', 'dill.dill'):
    allowed[(module, '_create_array')] = _Builder(_dill_create_array)
    allowed[(module, '_create_namedtuple')] = _Builder(_dill_create_namedtuple)
    allowed[(module, '_load_type')] = _Builder(_dill_load_type)
  return allowed


ALLOWED = types.MappingProxyType(_allow_list())


def _python3_name(module: str, name: str):
  """Python 2 names that protocol-2 pickles use (`__builtin__`, `copy_reg`) -> Python 3's."""
  if (module, name) in _compat_pickle.NAME_MAPPING:
    return _compat_pickle.NAME_MAPPING[(module, name)]
  return _compat_pickle.IMPORT_MAPPING.get(module, module), name


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only the names in ALLOWED; everything else stops the load before it is used."""

  def find_class(self, module, name):
    module, name = _python3_name(module, name)
    target = ALLOWED.get((module, name))
    if target is None:
      raise _Refused(f'it asks for {module}.{name}, which a reference BYOL checkpoint never '
                     f'holds')
    return target

  def persistent_load(self, pid):
    raise _Refused('it holds a persistent id, which a reference BYOL checkpoint never holds')


def _plain(obj):
  """Haiku mappings and OrderedDicts -> dicts, recursively (NamedTuple stand-ins are kept)."""
  if isinstance(obj, dict):
    return {key: _plain(value) for key, value in obj.items()}
  if isinstance(obj, tuple) and hasattr(obj, '_fields'):
    return type(obj)(*[_plain(value) for value in obj])
  if isinstance(obj, (list, tuple)):
    return type(obj)(_plain(value) for value in obj)
  return obj


def _source(path_or_file) -> str:
  if isinstance(path_or_file, (str, os.PathLike)):
    return os.fspath(path_or_file)
  return str(getattr(path_or_file, 'name', '<stream>'))


def safe_load(path_or_file):
  """The object in a reference checkpoint (a path or a binary file), read without running code.

  Only the names in ALLOWED are resolved; anything else raises ReferenceCheckpointError naming
  the refused `module.name` and the file, before that name is called. Haiku mappings come
  back as plain dicts, arrays (jax.Array included) as NumPy arrays, the reference's and optax's
  states as the stand-ins of this module.
  """
  source = _source(path_or_file)
  try:
    if isinstance(path_or_file, (str, os.PathLike)):
      with open(path_or_file, 'rb') as f:
        obj = _RestrictedUnpickler(f).load()
    else:
      obj = _RestrictedUnpickler(path_or_file).load()
    return _plain(obj)
  except _Refused as e:
    raise ReferenceCheckpointError(
        f'Refusing to load {source}: {e} (nothing from the file was run; it is corrupt or '
        f'not a reference BYOL checkpoint).') from None
  except FileNotFoundError:
    raise FileNotFoundError(f'No reference checkpoint at {source}.') from None
  except RecursionError:
    raise ReferenceCheckpointError(f'{source} is not a readable reference checkpoint (nested '
                                   f'too deeply, or holding a cycle).') from None
  except Exception as e:  # pylint: disable=broad-except
    # Truncated or corrupt: EOFError, UnpicklingError, or an allowed builder given bad data.
    if isinstance(e, OSError):  # Reading the file itself failed (a directory, no permission).
      raise
    reason = one_line(e, 200) or type(e).__name__
    raise ReferenceCheckpointError(f'{source} is not a readable reference checkpoint '
                                   f'(truncated or corrupt: {reason}).') from None


# ---------------------------------------------------------------------------------------------
# Module names: reference -> this project.

# The reference names its encoder module after the class (Haiku's default module name).
ENCODER_MODULES = {
    'tiny_res_net': 'tiny_resnet',
    'res_net18': 'resnet18',
    'res_net34': 'resnet34',
    'res_net50': 'resnet50',
    'res_net101': 'resnet101',
    'res_net152': 'resnet152',
    'res_net200': 'resnet200',
}
HEAD_MODULES = ('projector', 'predictor', 'classifier')
_BLOCK = re.compile(r'block_group_(\d+)/~/block_(\d+)/~/')


def convert_module_name(name: str) -> str:
  """`res_net50/~/block_group_1/~/block_0/~/conv_0` -> `encoder/block_group_1/block_0/conv_0`."""
  top, separator, rest = name.partition('/~/')
  if top in ENCODER_MODULES and separator:
    block = _BLOCK.match(rest)
    if block:
      rest = f'block_group_{block[1]}/block_{block[2]}/' + rest[block.end():]
    return 'encoder/' + rest
  if name.split('/')[0] in HEAD_MODULES:
    return name
  raise ReferenceCheckpointError(
      f'Unknown module {name!r} in the reference checkpoint: expected an encoder module '
      f'({", ".join(ENCODER_MODULES)}) followed by "/~/", or {", ".join(HEAD_MODULES)}.')


def reference_encoder(tree) -> Optional[str]:
  """The reference's encoder module name in a Haiku tree (e.g. 'res_net50'), or None."""
  tops = sorted({key.partition('/~/')[0] for key in tree
                 if isinstance(key, str) and key.partition('/~/')[0] in ENCODER_MODULES})
  if len(tops) > 1:
    raise ReferenceCheckpointError(f'The reference checkpoint holds several encoders: '
                                   f'{", ".join(tops)}.')
  return tops[0] if tops else None


def convert_tree(tree) -> dict:
  """A Haiku tree `{module: {name: value}}` with the reference's module names -> this project's.

  Values are kept as they are. Unknown top-level modules raise ReferenceCheckpointError.
  """
  if not isinstance(tree, dict):
    raise ReferenceCheckpointError(f'Expected a Haiku tree {{module: {{name: array}}}}, got a '
                                   f'{type(tree).__name__}.')
  reference_encoder(tree)  # At most one encoder.
  converted = {}
  for module, values in tree.items():
    if not isinstance(module, str):
      raise ReferenceCheckpointError(f'Haiku module names are strings, got {module!r}.')
    new = convert_module_name(module)
    if new in converted:
      raise ReferenceCheckpointError(f'Two modules of the reference checkpoint map to {new}.')
    converted[new] = values
  return converted


# ---------------------------------------------------------------------------------------------
# The checkpoint.


class ReferenceCheckpoint(NamedTuple):
  """A reference checkpoint with this project's module names; NumPy arrays throughout."""
  online_params: dict
  online_state: dict
  target_params: dict
  target_state: dict
  momentum: dict  # The LARS momentum (ScaleByLarsState.mu): same tree as online_params.
  step: int
  encoder: str  # This project's model.encoder for the checkpoint's encoder, e.g. 'resnet50'.
  source: str


_STATE_FIELDS = ByolExperimentState._fields


def _numeric_tree(tree, what: str, source: str) -> dict:
  """{module: {name: ndarray}} with numeric arrays, or a one-line error naming the bad entry."""
  if not isinstance(tree, dict):
    raise ReferenceCheckpointError(f'{source}: {what} is a {type(tree).__name__}, not a Haiku '
                                   f'tree of arrays.')
  out = {}
  for module, values in tree.items():
    if not isinstance(values, dict):
      raise ReferenceCheckpointError(f'{source}: {what} {module} is a {type(values).__name__}, '
                                     f'not a mapping of arrays.')
    out[module] = {}
    for name, value in values.items():
      array = np.asarray(value) if isinstance(value, (np.ndarray, np.generic, int, float)) else None
      if array is None or array.dtype.kind not in 'biuf':
        kind = type(value).__name__ if array is None else f'{array.dtype} array'
        raise ReferenceCheckpointError(f'{source}: {what} {module}/{name} is a {kind}, not a '
                                       f'numeric array.')
      out[module][name] = array
  return out


def _find_lars_state(opt_state, source):
  found = []

  def visit(node):
    if isinstance(node, ScaleByLarsState):
      found.append(node)
    elif isinstance(node, (list, tuple)) and not hasattr(node, '_fields'):
      for child in node:
        visit(child)

  visit(opt_state)
  if len(found) != 1:
    raise ReferenceCheckpointError(
        f'{source}: expected one LARS state (ScaleByLarsState) in opt_state, found {len(found)}: '
        f'not a checkpoint of the reference\'s LARS pretraining.')
  return found[0].mu


def load_reference_checkpoint(path, config=None) -> ReferenceCheckpoint:
  """Reads a reference `pretrain.pkl` (with `safe_load`) into this project's module names.

  With `config` (a pretraining ConfigDict), the checkpoint is also checked against the network
  that config builds: the encoder, the number of classes and every online/target parameter
  and state leaf, shape by shape (a mismatch is one line naming the leaf).
  """
  source = _source(path)
  data = safe_load(path)
  if not isinstance(data, dict):
    raise ReferenceCheckpointError(
        f'{source} is not a reference BYOL checkpoint: it holds a {type(data).__name__}, not a '
        f'dict with experiment_state, step and rng.')
  missing = [key for key in ('experiment_state', 'step') if key not in data]
  if missing:
    raise ReferenceCheckpointError(
        f'{source} is not a reference BYOL checkpoint: no {" or ".join(missing)} (it has '
        f'{", ".join(map(str, data)) or "no keys"}).')
  state = data['experiment_state']
  if isinstance(state, dict):
    absent = [f for f in _STATE_FIELDS if f not in state]
    if absent:
      raise ReferenceCheckpointError(f'{source}: experiment_state has no '
                                     f'{", ".join(absent)}.')
    state = ByolExperimentState(**{f: state[f] for f in _STATE_FIELDS})
  if not isinstance(state, ByolExperimentState):
    raise ReferenceCheckpointError(
        f'{source} is not a reference BYOL checkpoint: experiment_state is a '
        f'{type(state).__name__}, not a _ByolExperimentState.')
  step = np.asarray(data['step'])
  if step.shape != () or step.dtype.kind not in 'iu' or int(step) < 0:
    raise ReferenceCheckpointError(f'{source}: step is {data["step"]!r}, not a step count.')

  def tree(value, what):
    try:
      return _numeric_tree(convert_tree(value), what, source)
    except ReferenceCheckpointError as e:
      message = str(e)
      raise ReferenceCheckpointError(
          message if message.startswith(source) else f'{source}: {what}: {message}') from None

  online_params = tree(state.online_params, 'online_params')
  encoder = reference_encoder(state.online_params)
  if encoder is None:
    raise ReferenceCheckpointError(
        f'{source}: online_params hold no encoder module ({", ".join(ENCODER_MODULES)}).')
  reference = ReferenceCheckpoint(
      online_params=online_params,
      online_state=tree(state.online_state, 'online_state'),
      target_params=tree(state.target_params, 'target_params'),
      target_state=tree(state.target_state, 'target_state'),
      momentum=tree(_find_lars_state(state.opt_state, source), 'momentum'),
      step=int(step), encoder=ENCODER_MODULES[encoder], source=source)
  if config is not None:
    check_against_config(reference, config)
  return reference


# ---------------------------------------------------------------------------------------------
# Matching against this project's network.


def _fill(template, got, what: str, source: str) -> dict:
  """`got` as NumPy arrays in `template`'s structure and dtypes; a one-line error for the first
  module or leaf that is missing, extra or of another shape."""
  out = {}
  for module in sorted(set(template) | set(got)):
    if module not in got:
      raise ReferenceCheckpointError(
          f'{source}: {what} has no {module} ({", ".join(sorted(template[module]))}), which '
          f'the config\'s network has.')
    if module not in template:
      raise ReferenceCheckpointError(
          f'{source}: {what} has {module}, which the config\'s network does not.')
    out[module] = {}
    for name in sorted(set(template[module]) | set(got[module])):
      leaf = f'{what} {module}/{name}'
      if name not in got[module] or name not in template[module]:
        where = 'the checkpoint' if name not in got[module] else 'the config\'s network'
        raise ReferenceCheckpointError(f'{source}: {leaf} is missing from {where}.')
      expected, value = template[module][name], np.asarray(got[module][name])
      if tuple(value.shape) != tuple(expected.shape):
        raise ReferenceCheckpointError(
            f'{source}: {leaf} has shape {tuple(value.shape)} in the checkpoint, the config\'s '
            f'network expects {tuple(expected.shape)}.')
      dtype = np.dtype(expected.dtype)
      if value.dtype != dtype:
        if np.dtype(value.dtype).kind != dtype.kind and not (
            value.dtype.kind in 'iu' and dtype.kind in 'iu'):
          raise ReferenceCheckpointError(
              f'{source}: {leaf} is {value.dtype} in the checkpoint, the config\'s network '
              f'expects {dtype}.')
        value = value.astype(dtype)
      out[module][name] = value
  return out


def _check_encoder_and_classes(reference: ReferenceCheckpoint, config):
  if reference.encoder != config.model.encoder:
    raise ReferenceCheckpointError(
        f'{reference.source} holds a {reference.encoder} encoder, the config has '
        f'model.encoder={config.model.encoder}: pass --config.model.encoder={reference.encoder}.')
  classifier = reference.online_params.get('classifier', {}).get('w')
  if classifier is not None and classifier.shape[-1] != config.num_classes:
    raise ReferenceCheckpointError(
        f'{reference.source} has a {classifier.shape[-1]}-class classifier, the config has '
        f'num_classes={config.num_classes}: pass --config.num_classes={classifier.shape[-1]}.')


def _state_shapes(experiment, image_size: int):
  """The TrainState of `experiment.init` as ShapeDtypeStructs (nothing is computed)."""
  return jax.eval_shape(lambda: experiment.init(jax.random.PRNGKey(0), image_size))


def check_against_config(reference: ReferenceCheckpoint, config, image_size=None):
  """Raises ReferenceCheckpointError unless the checkpoint fits the network of `config`."""
  _check_encoder_and_classes(reference, config)
  # train_examples only sets the length of the schedules, not the state's shapes.
  experiment = byol_experiment.ByolExperiment(config, train_examples=1)
  shapes = _state_shapes(experiment, image_size or config.image_size)
  _fill(shapes.online_params, reference.online_params, 'online_params', reference.source)
  _fill(shapes.online_state, reference.online_state, 'online_state', reference.source)
  _fill(shapes.target.params, reference.target_params, 'target_params', reference.source)
  _fill(shapes.target_state, reference.target_state, 'target_state', reference.source)


def to_train_state(experiment, reference: ReferenceCheckpoint, image_size=None):
  """A `byol_experiment.TrainState` (NumPy leaves) for `experiment` from a reference checkpoint.

  The structure is `experiment.init`'s; every leaf comes from the checkpoint: the online and
  target parameters and BatchNorm states, the LARS momentum as the `optax.trace` state (found by
  type) and the step, also as the count of the learning-rate schedule's state, so that the
  run continues from the reference's step. Every leaf must match in shape (one line naming
  the first that does not).
  """
  config, source = experiment.config, reference.source
  if config.optimizer.name != 'lars':
    raise ReferenceCheckpointError(
        f'{source} holds LARS momentum (the reference\'s optimizer); the config has '
        f'optimizer.name={config.optimizer.name}: pass --config.optimizer.name=lars.')
  _check_encoder_and_classes(reference, config)
  shapes = _state_shapes(experiment, image_size or config.image_size)

  traces = []

  def replace(node):
    if isinstance(node, optax.TraceState):
      traces.append(node)
      return optax.TraceState(trace=_fill(node.trace, reference.momentum, 'momentum', source))
    if isinstance(node, optax.ScaleByScheduleState):  # The LR schedule's step.
      return optax.ScaleByScheduleState(count=np.asarray(reference.step, node.count.dtype))
    return node

  opt_state = jax.tree_util.tree_map(
      replace, shapes.opt_state,
      is_leaf=lambda n: isinstance(n, (optax.TraceState, optax.ScaleByScheduleState)))
  if len(traces) != 1:
    raise ReferenceCheckpointError(
        f'The optimizer of this config has {len(traces)} momentum (optax.trace) states, '
        f'expected the one of LARS.')
  for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state):
    if isinstance(leaf, jax.ShapeDtypeStruct):
      raise ReferenceCheckpointError(
          f'The optimizer state leaf {jax.tree_util.keystr(path)} has no counterpart in '
          f'{source} (it stores only the LARS momentum).')

  return byol_experiment.TrainState(
      step=np.asarray(reference.step, shapes.step.dtype),
      online_params=_fill(shapes.online_params, reference.online_params, 'online_params',
                          source),
      online_state=_fill(shapes.online_state, reference.online_state, 'online_state', source),
      target=target_ema.TargetEmaState(params=_fill(
          shapes.target.params, reference.target_params, 'target_params', source)),
      target_state=_fill(shapes.target_state, reference.target_state, 'target_state', source),
      opt_state=opt_state)


# ---------------------------------------------------------------------------------------------
# Writing a workdir.


def write_workdir(pkl: str, config, workdir: str) -> int:
  """Writes the reference checkpoint `pkl` as `workdir/checkpoints/<step>/` for `config`.

  The state is saved the way `main_loop` saves it (replicated over this process's device
  mesh, through `checkpointing.Checkpointer`, the config stored beside it), so main_loop
  resumes from it with the same config and `export` / `configs/eval.py` read it. Refuses a
  workdir that already holds checkpoints. Returns the step.
  """
  if config.get('experiment', 'byol') != 'byol':
    raise ReferenceCheckpointError(f'--config must be a pretraining config (configs/byol.py), '
                                   f'got experiment={config.experiment!r}.')
  if config.model.encoder not in networks.ENCODERS:
    raise ReferenceCheckpointError(f'Unknown model.encoder {config.model.encoder!r}: choose '
                                   f'from {", ".join(networks.ENCODERS)}.')
  directory = os.path.join(workdir, checkpointing.CHECKPOINT_DIR)
  if os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory)):
    raise ReferenceCheckpointError(f'{os.path.abspath(directory)} already holds checkpoints: '
                                   f'choose a new --workdir.')
  reference = load_reference_checkpoint(pkl)
  # train_examples sets only the length of the schedules (main_loop reads it from the data).
  experiment = byol_experiment.ByolExperiment(config, train_examples=1)
  state = to_train_state(experiment, reference)
  checkpoints = checkpointing.Checkpointer(workdir, config)
  try:
    existing = checkpoints.steps()
    if existing:
      raise ReferenceCheckpointError(
          f'{checkpoints.directory} already holds checkpoints (steps '
          f'{", ".join(map(str, sorted(existing)))}): choose a new --workdir.')
    checkpoints.save(reference.step, parallel.replicate(state, parallel.make_mesh()))
  finally:
    checkpoints.close()
  return reference.step
