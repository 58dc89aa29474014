"""The restricted unpickler for the reference's `pretrain.pkl` (reference_checkpoint.py has the
name conversion and the load into a TrainState).

`safe_load` runs a `pickle.Unpickler` whose `find_class` resolves a short allow-list of names
(`ALLOWED`) to NumPy's array and dtype rebuilders or to local, data-only stand-ins for the
reference's state records: nothing of Haiku, optax, JAX internals or the reference is imported
on the file's behalf, and any other name stops the load with `ReferenceCheckpointError` before
it is called. No TensorFlow here.
"""

import _compat_pickle
import collections
import os
import pickle
import types
from typing import Any, NamedTuple

import numpy as np

from byol_jax.runtime import storage
from byol_jax.runtime.checkpointing import one_line


# ---------------------------------------------------------------------------------------------
# Errors.


class ReferenceCheckpointError(ValueError):
  """A reference checkpoint that cannot (or must not) be read: one line naming the file."""


class _Refused(Exception):
  """Raised inside the unpickler; `safe_load` turns it into a ReferenceCheckpointError."""


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


def source_name(path_or_file) -> str:
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
  source = source_name(path_or_file)
  try:
    if isinstance(path_or_file, (str, os.PathLike)):
      with storage.open(os.fspath(path_or_file), 'rb') as f:  # A local path or gs://.
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
