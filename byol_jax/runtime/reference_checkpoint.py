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

import re
from typing import NamedTuple, Optional

import jax
import numpy as np
import optax

from byol_jax.core import byol_experiment, networks, target_ema
from byol_jax.runtime import checkpointing, parallel, storage
from byol_jax.runtime.reference_pickle import (  # pylint: disable=unused-import  (the API)
    ALLOWED, ByolExperimentState, source_name, ReferenceCheckpointError, ScaleByLarsState, safe_load)

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
  source = source_name(path)
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
  directory = storage.join(workdir, checkpointing.CHECKPOINT_DIR)
  if storage.isdir(directory) and any(name.isdigit() for name in storage.listdir(directory)):
    raise ReferenceCheckpointError(f'{storage.resolve(directory)} already holds checkpoints: '
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
