"""Reading checkpoints written by the reference's checkpointing (byol_jax/runtime/reference_checkpoint.py).

The golden `tests/golden/reference_pretrain_tiny.pkl` was written by the reference's own save
code (tests/golden/generate.py). The other pickles here are written by hand with the class paths
a reference checkpoint uses (`_RefPickler` below names any `module.name` without importing it),
to test the restricted unpickler on the variants the golden does not cover: dill's helpers,
old NumPy names, Haiku's 2020 mappings, and malicious files.
"""

import importlib.util
import io
import os
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import set_overrides  # tests/helpers.py

from byol_jax.core import byol_experiment, networks
from byol_jax.runtime import checkpointing, export
from byol_jax.runtime import reference_checkpoint as rc, reference_pickle

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(REPO, 'tests', 'golden', 'reference_pretrain_tiny.pkl')
GOLDEN_EMBEDDINGS = os.path.join(REPO, 'tests', 'golden', 'reference_pretrain_tiny_embeddings.npz')

# The golden's network: the reference's TinyResNet, projector 32 -> 16, predictor 32, 10 classes.
TINY_OVERRIDES = {
    'model.encoder': 'tiny_resnet',
    'model.width': 1.0,
    'model.cifar_stem': False,
    'model.projector_hidden_size': 32,
    'model.projection_size': 16,
    'model.predictor_hidden_size': 32,
    'optimizer.name': 'lars',
    'num_classes': 10,
    'image_size': 32,
}


def _require(path):
  if not os.path.exists(path):
    pytest.skip(f'{os.path.relpath(path, REPO)} is missing (written by tests/golden/generate.py)')


def _require_tiny_resnet():
  if 'tiny_resnet' not in networks.ENCODERS:
    pytest.skip('networks has no tiny_resnet encoder (the reference\'s TinyResNet) yet')


def _demo_config(**overrides):
  """configs/byol.py:demo with overrides; loaded from its file (the module name `byol` is
  left alone: configs/ is on sys.path and other tests import it under that name)."""
  spec = importlib.util.spec_from_file_location('_reference_test_byol_config',
                                                os.path.join(REPO, 'configs', 'byol.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config('demo')
  with config.unlocked():
    set_overrides(config, overrides)
  return config


@pytest.fixture(scope='module')
def tiny_config():
  _require_tiny_resnet()
  return _demo_config(**TINY_OVERRIDES)


@pytest.fixture(scope='module')
def tiny_experiment(tiny_config):
  return byol_experiment.ByolExperiment(tiny_config, train_examples=1)


# ---------------------------------------------------------------------------------------------
# Writing reference-style pickles by hand.


class _Global:
  """Pickles as the GLOBAL `module name` (nothing is imported)."""

  def __init__(self, module, name):
    self.module, self.name = module, name

  def __call__(self, *args):  # The pickler only checks that a reduce function is callable.
    raise TypeError(f'{self.module}.{self.name} is only a name to pickle')


class _Call:
  """Pickles as `func(*args)`, then BUILD with `state` if given."""

  def __init__(self, func, args, state=None):
    self.func, self.args, self.state = func, tuple(args), state


class _New:
  """Pickles as NEWOBJ `cls.__new__(cls, *args)` (how NamedTuples pickle), then BUILD."""

  def __init__(self, cls, args=(), state=None):
    self.cls, self.args, self.state = cls, tuple(args), state


class _RefPickler(pickle._Pickler):  # pylint: disable=protected-access
  """The pure-Python pickler, writing protocol 2 with the names a reference checkpoint uses.

  `dill_style`: arrays through `dill._dill._create_array`, NamedTuple classes through
  `dill._dill._create_namedtuple`, b'' through `dill._dill._load_type` (what dill.dump writes).
  `old_numpy`: arrays rebuilt by `numpy.core.multiarray._reconstruct` (NumPy 1.x).
  """

  dispatch = dict(pickle._Pickler.dispatch)  # pylint: disable=protected-access

  def __init__(self, file, dill_style=False, old_numpy=False):
    super().__init__(file, protocol=2)
    self.dill_style, self.old_numpy = dill_style, old_numpy

  def _save_global_ref(self, obj):
    self.write(pickle.GLOBAL + f'{obj.module}\n{obj.name}\n'.encode())
    self.memoize(obj)

  def _save_new(self, obj):
    cls = obj.cls
    if self.dill_style and cls.namedtuple:
      cls = _Call(_Global('dill._dill', '_create_namedtuple'), (cls.name, cls.fields, cls.module))
    else:
      cls = _Global(cls.module, cls.name)
    self.save(cls)
    self.save(obj.args)
    self.write(pickle.NEWOBJ)
    self.memoize(obj)
    if obj.state is not None:
      self.save(obj.state)
      self.write(pickle.BUILD)

  dispatch[_Global] = _save_global_ref
  dispatch[_New] = _save_new

  def reducer_override(self, obj):
    if isinstance(obj, _Call):
      return (obj.func, obj.args, obj.state)
    if type(obj) is np.ndarray:  # pylint: disable=unidiomatic-typecheck
      fun, args, state = obj.__reduce__()
      if self.old_numpy:
        fun = _Global('numpy.core.multiarray', '_reconstruct')
      if self.dill_style:
        return (_Global('dill._dill', '_create_array'), (fun, args, state, None))
      return (fun, args, state)
    return NotImplemented

  def save_global(self, obj, name=None):
    if self.dill_style and obj is bytes:
      self.save_reduce(_Global('dill._dill', '_load_type'), ('bytes',), obj=obj)
      return
    super().save_global(obj, name)


class _Class:
  """A class named by module path (and, for a NamedTuple, its fields)."""

  def __init__(self, module, name, fields=(), namedtuple=True):
    self.module, self.name, self.fields = module, name, tuple(fields)
    self.namedtuple = namedtuple

  def __call__(self, *args):
    return _New(self, args)


BYOL_STATE = _Class('byol.byol_experiment', '_ByolExperimentState',
                    ('online_params', 'target_params', 'online_state', 'target_state',
                     'opt_state'))
ADD_WEIGHT_DECAY_STATE = _Class('byol.utils.optimizers', 'AddWeightDecayState')
SCALE_BY_LARS_STATE = _Class('byol.utils.optimizers', 'ScaleByLarsState', ('mu',))
OPTAX_EMPTY_STATE = _Class('optax._src.base', 'EmptyState')


def _flat_mapping(tree):
  """Haiku's FlatMapping / frozendict of 2020-2021: `(cls, (mapping,))`."""
  return _Call(_Global('haiku._src.data_structures', 'FlatMapping'), (dict(tree),))


def _frozendict(tree):
  return _Call(_Global('haiku._src.data_structures', 'frozendict'), (dict(tree),))


def _dumps(obj, **kwargs) -> bytes:
  buffer = io.BytesIO()
  _RefPickler(buffer, **kwargs).dump(obj)
  return buffer.getvalue()


def _to_reference_name(module, encoder='tiny_res_net'):
  """This project's module name -> the reference's (the inverse of convert_module_name)."""
  if not module.startswith('encoder/'):
    return module
  rest = module[len('encoder/'):]
  parts = rest.split('/')
  if len(parts) > 2 and parts[0].startswith('block_group_') and parts[1].startswith('block_'):
    rest = f'{parts[0]}/~/{parts[1]}/~/' + '/'.join(parts[2:])
  return f'{encoder}/~/{rest}'


def _reference_tree(tree, container):
  return container({_to_reference_name(m): {n: np.asarray(v) for n, v in values.items()}
                    for m, values in tree.items()})


@pytest.fixture(scope='module')
def synthetic(tiny_experiment):
  """A reference-style checkpoint of a known state: the tiny_resnet network's tree (shapes
  from `init`, nothing compiled) filled with distinct random values; step 6."""
  shapes = jax.eval_shape(lambda: tiny_experiment.init(jax.random.PRNGKey(0), 32))
  rng = np.random.RandomState(0)

  def fill(x):
    if np.issubdtype(x.dtype, np.integer):
      return rng.randint(0, 100, x.shape).astype(x.dtype)
    return rng.standard_normal(x.shape).astype(x.dtype)

  state = jax.tree_util.tree_map(fill, shapes)
  momentum = jax.tree_util.tree_map(fill, shapes.online_params)
  # Haiku's two mapping classes in the places the 2020 checkpoints had them.
  experiment_state = BYOL_STATE(
      _reference_tree(state.online_params, _flat_mapping),
      _reference_tree(state.target.params, _flat_mapping),
      _reference_tree(state.online_state, _frozendict),
      _reference_tree(state.target_state, _frozendict),
      [ADD_WEIGHT_DECAY_STATE(), SCALE_BY_LARS_STATE(_reference_tree(momentum, _flat_mapping)),
       OPTAX_EMPTY_STATE()])
  checkpoint = dict(experiment_state=experiment_state, step=6, rng=jax.random.PRNGKey(6))
  return dict(state=state, momentum=momentum, checkpoint=checkpoint)


def _assert_trees_equal(actual, expected):
  assert (jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual),
                          jax.tree_util.tree_leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


# ---------------------------------------------------------------------------------------------
# Module names.


@pytest.mark.parametrize('reference, ours', [
    ('res_net50/~/initial_conv', 'encoder/initial_conv'),
    ('res_net50/~/initial_batchnorm/~/mean_ema', 'encoder/initial_batchnorm/~/mean_ema'),
    ('res_net50/~/block_group_1/~/block_0/~/shortcut_batchnorm',
     'encoder/block_group_1/block_0/shortcut_batchnorm'),
    ('res_net50/~/block_group_1/~/block_0/~/batchnorm_2/~/var_ema',
     'encoder/block_group_1/block_0/batchnorm_2/~/var_ema'),
    ('res_net200/~/block_group_2/~/block_35/~/conv_1', 'encoder/block_group_2/block_35/conv_1'),
    ('tiny_res_net/~/block_group_3/~/block_0/~/conv_0', 'encoder/block_group_3/block_0/conv_0'),
    ('projector/linear', 'projector/linear'),
    ('projector/batch_norm', 'projector/batch_norm'),
    ('projector/linear_1', 'projector/linear_1'),
    ('predictor/batch_norm/~/mean_ema', 'predictor/batch_norm/~/mean_ema'),
    ('classifier', 'classifier'),
])
def test_convert_module_name(reference, ours):
  assert rc.convert_module_name(reference) == ours
  assert _to_reference_name(ours, reference.partition('/~/')[0]) == reference  # The test's own.


def test_convert_tree_refuses_unknown_modules_and_two_encoders():
  assert rc.convert_tree({'res_net18/~/initial_conv': {'w': 1}, 'classifier': {'b': 2}}) == {
      'encoder/initial_conv': {'w': 1}, 'classifier': {'b': 2}}
  with pytest.raises(rc.ReferenceCheckpointError, match="Unknown module 'vit/~/patch'"):
    rc.convert_tree({'vit/~/patch': {'w': 1}})
  with pytest.raises(rc.ReferenceCheckpointError, match="Unknown module 'res_net50'"):
    rc.convert_tree({'res_net50': {'w': 1}})  # Never a module of its own in the reference.
  with pytest.raises(rc.ReferenceCheckpointError, match='several encoders: res_net18, res_net50'):
    rc.convert_tree({'res_net50/~/initial_conv': {}, 'res_net18/~/initial_conv': {}})


# ---------------------------------------------------------------------------------------------
# The golden: written by the reference's own save code.


def test_golden_safe_load():
  _require(GOLDEN)
  data = reference_pickle.safe_load(GOLDEN)
  assert sorted(data) == ['experiment_state', 'rng', 'step']
  assert data['step'] == 6
  np.testing.assert_array_equal(data['rng'], np.asarray(jax.random.PRNGKey(6)))
  state = data['experiment_state']
  assert isinstance(state, reference_pickle.ByolExperimentState)
  assert [type(s) for s in state.opt_state] == [reference_pickle.AddWeightDecayState, reference_pickle.ScaleByLarsState,
                                                reference_pickle.OptaxEmptyState]
  assert 'tiny_res_net/~/block_group_0/~/block_0/~/conv_0' in state.online_params
  with open(GOLDEN, 'rb') as f:  # A file object works too.
    assert reference_pickle.safe_load(f)['step'] == 6


def test_golden_matches_the_tiny_resnet_network(tiny_config, tiny_experiment):
  _require(GOLDEN)
  reference = rc.load_reference_checkpoint(GOLDEN, tiny_config)
  assert (reference.step, reference.encoder) == (6, 'tiny_resnet')
  shapes = jax.eval_shape(lambda: tiny_experiment.init(jax.random.PRNGKey(0), 32))
  for ours, theirs in ((shapes.online_params, reference.online_params),
                       (shapes.online_state, reference.online_state),
                       (shapes.target.params, reference.target_params),
                       (shapes.target_state, reference.target_state),
                       (shapes.online_params, reference.momentum)):
    assert {(m, n): v.shape for m, vs in theirs.items() for n, v in vs.items()} == {
        (m, n): v.shape for m, vs in ours.items() for n, v in vs.items()}


def test_golden_embeddings(tiny_experiment):
  _require(GOLDEN)
  _require(GOLDEN_EMBEDDINGS)
  reference = rc.load_reference_checkpoint(GOLDEN)
  golden = np.load(GOLDEN_EMBEDDINGS)
  embeddings = np.asarray(tiny_experiment.embed(reference.online_params, reference.online_state,
                                                golden['images']))
  # Same weights, same operations: only the float32 summation order differs (XLA's conv and
  # reduction tiling here vs. the reference's run) through ~a dozen layers (7x7 stem, four
  # blocks of two 3x3 convs, BatchNorms, the pool), ~1e-7 relative per layer.
  expected = golden['embeddings']
  np.testing.assert_allclose(embeddings, expected, rtol=1e-5,
                             atol=1e-5 * np.abs(expected).max())


# ---------------------------------------------------------------------------------------------
# Hand-written reference-style pickles.


@pytest.mark.parametrize('style', [dict(), dict(dill_style=True), dict(old_numpy=True),
                                   dict(dill_style=True, old_numpy=True)],
                         ids=['pickle', 'dill', 'old-numpy', 'dill-old-numpy'])
def test_synthetic_checkpoint_converts_exactly(synthetic, tiny_experiment, tmp_path, style):
  path = tmp_path / 'pretrain.pkl'
  path.write_bytes(_dumps(synthetic['checkpoint'], **style))
  reference = rc.load_reference_checkpoint(path)
  assert (reference.step, reference.encoder) == (6, 'tiny_resnet')
  state = rc.to_train_state(tiny_experiment, reference)
  expected = synthetic['state']
  _assert_trees_equal(state.online_params, expected.online_params)
  _assert_trees_equal(state.online_state, expected.online_state)
  _assert_trees_equal(state.target.params, expected.target.params)
  _assert_trees_equal(state.target_state, expected.target_state)
  trace = [s for s in state.opt_state if hasattr(s, 'trace')]
  assert len(trace) == 1
  _assert_trees_equal(trace[0].trace, synthetic['momentum'])
  assert int(state.step) == 6
  assert int(state.opt_state[-1].count) == 6  # The learning-rate schedule continues at step 6.
  # The same structure and dtypes as the experiment's own state: it can be trained and saved.
  shapes = jax.eval_shape(lambda: tiny_experiment.init(jax.random.PRNGKey(0), 32))
  assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(shapes)
  for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(shapes)):
    assert (a.shape, a.dtype) == (b.shape, b.dtype)


def test_haiku_containers_and_empty_bytes():
  leaves = (np.arange(3, dtype=np.float32), np.zeros((0,), np.float32))
  # A 2020 FlatMapping without __reduce__: an empty object, then its attributes (BUILD).
  old_flat_mapping = _New(_Class('haiku._src.data_structures', 'FlatMapping', namedtuple=False), (),
                          {'_leaves': leaves, '_structure': (('a', (('w',),)), ('b',)),
                           '_index': {}})
  data = reference_pickle.safe_load(io.BytesIO(_dumps(dict(
      old=old_flat_mapping, new=_flat_mapping({'m': {'w': leaves[0]}}),
      frozen=_frozendict({'m': _frozendict({'b': 1})}), empty=b''), dill_style=True)))
  assert type(data['old']) is dict and type(data['frozen']['m']) is dict
  np.testing.assert_array_equal(data['old']['a']['w'], leaves[0])
  assert data['old']['b'].shape == (0,)
  np.testing.assert_array_equal(data['new']['m']['w'], leaves[0])
  assert data['frozen'] == {'m': {'b': 1}} and data['empty'] == b''
  assert reference_pickle.safe_load(io.BytesIO(pickle.dumps(b'', protocol=2))) == b''  # builtins.bytes()


def test_old_numpy_names_load():
  array = np.arange(6, dtype=np.float32).reshape(2, 3)
  data = pickle.dumps(dict(a=array, s=np.float32(2.5), i=np.int64(7)), protocol=2)
  assert b'numpy._core.multiarray' in data
  old = data.replace(b'numpy._core.multiarray', b'numpy.core.multiarray')
  loaded = reference_pickle.safe_load(io.BytesIO(old))
  np.testing.assert_array_equal(loaded['a'], array)
  assert loaded['s'] == np.float32(2.5) and loaded['s'].dtype == np.float32
  assert loaded['i'] == 7


# ---------------------------------------------------------------------------------------------
# Refusals.


class _System:

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


class _Eval:

  def __init__(self, expression):
    self.expression = expression

  def __reduce__(self):
    return (eval, (self.expression,))


@pytest.mark.parametrize('protocol', [2, pickle.HIGHEST_PROTOCOL])
def test_malicious_pickles_are_refused(tmp_path, protocol):
  marker = tmp_path / 'MARKER'
  attacks = {
      'system': _System(f'touch {marker}'),
      'eval': _Eval(f"__import__('os').system('touch {marker}')"),
      # Inside an otherwise plausible checkpoint.
      'nested': dict(experiment_state=[_System(f'touch {marker}')], step=1, rng=None),
  }
  for kind, attack in attacks.items():
    path = tmp_path / f'{kind}.pkl'
    path.write_bytes(pickle.dumps(attack, protocol=protocol))
    with pytest.raises(rc.ReferenceCheckpointError) as error:
      rc.load_reference_checkpoint(path)
    message = str(error.value)
    assert '\n' not in message and str(path) in message
    if kind == 'eval':
      assert 'builtins.eval' in message
    else:
      assert f'{os.system.__module__}.system' in message  # posix.system (nt on Windows).
  assert not marker.exists()


def test_allowed_names_cannot_be_misused():
  def refused(data, match):
    with pytest.raises(rc.ReferenceCheckpointError, match=match):
      reference_pickle.safe_load(io.BytesIO(data))

  # Only latin-1 text through _codecs.encode (protocol 2's bytes).
  refused(_dumps(_Call(_Global('_codecs', 'encode'), ('x', 'rot13'))), '_codecs.encode')
  # dill may only name the reference's classes.
  refused(_dumps(_Call(_Global('dill._dill', '_create_namedtuple'), ('Popen', ('a',),
                                                                      'subprocess'))),
          'subprocess.Popen')
  refused(_dumps(_Call(_Global('dill._dill', '_load_type'), ('CodeType',))), 'CodeType')
  # An array must be rebuilt by numpy's _reconstruct.
  refused(_dumps(_Call(_Global('dill._dill', '_create_array'),
                       (_Global('_codecs', 'encode'), ('x', 'latin1'), None, None))),
          'instead of numpy _reconstruct')
  # BUILD on an allow-listed object would change it for the whole process: refused, unchanged.
  for target in (_Global('_codecs', 'encode'), _Global('byol.utils.optimizers',
                                                       'ScaleByLarsState')):
    data = (b'\x80\x02' + pickle.GLOBAL + f'{target.module}\n{target.name}\n'.encode()
            + pickle.dumps((None, {'_fields': ('x',), '__doc__': 'x'}), protocol=2)[2:-1]
            + pickle.BUILD + pickle.STOP)
    with pytest.raises(rc.ReferenceCheckpointError):
      reference_pickle.safe_load(io.BytesIO(data))
  assert reference_pickle.ScaleByLarsState._fields == ('mu',)
  assert reference_pickle.safe_load(io.BytesIO(pickle.dumps(b'ab', protocol=2))) == b'ab'


def test_truncated_and_wrong_files(tmp_path, synthetic):
  data = _dumps(synthetic['checkpoint'])
  for name, content in (('truncated.pkl', data[:len(data) // 2]), ('empty.pkl', b''),
                        ('text.pkl', b'not a pickle\n')):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(rc.ReferenceCheckpointError,
                       match='is not a readable reference checkpoint') as error:
      reference_pickle.safe_load(path)
    assert '\n' not in str(error.value) and name in str(error.value)
  with pytest.raises(FileNotFoundError, match='No reference checkpoint at'):
    reference_pickle.safe_load(tmp_path / 'absent.pkl')

  def load(obj):
    path = tmp_path / 'wrong.pkl'
    path.write_bytes(_dumps(obj))
    return rc.load_reference_checkpoint(path)

  with pytest.raises(rc.ReferenceCheckpointError, match='holds a list, not a dict'):
    load([1, 2])
  with pytest.raises(rc.ReferenceCheckpointError, match='no step'):
    load(dict(experiment_state=synthetic['checkpoint']['experiment_state']))
  without_lars = dict(synthetic['checkpoint'])
  state = without_lars['experiment_state']
  without_lars['experiment_state'] = _New(state.cls, state.args[:4] + ([OPTAX_EMPTY_STATE()],))
  with pytest.raises(rc.ReferenceCheckpointError, match='expected one LARS state'):
    load(without_lars)


def test_config_mismatches_are_one_line(synthetic, tmp_path):
  path = tmp_path / 'pretrain.pkl'
  path.write_bytes(_dumps(synthetic['checkpoint']))
  cases = [
      (dict(num_classes=100), 'has a 10-class classifier, the config has num_classes=100'),
      (dict({'model.projection_size': 8}),
       r'online_params predictor/linear/w has shape \(16, 32\) in the checkpoint, the '
       r'config\'s network expects \(8, 32\)'),
      (dict({'model.encoder': 'resnet18'}), 'holds a tiny_resnet encoder, the config has '
                                            'model.encoder=resnet18'),
      # Pre-activation blocks: their first BatchNorm sees the block's input.
      (dict({'model.resnet_v2': True}), r'online_params encoder/block_group_0/block_0/'
                                        r'batchnorm_0/offset has shape \(1, 1, 1, 8\)'),
  ]
  for overrides, match in cases:
    config = _demo_config(**{**TINY_OVERRIDES, **overrides})
    with pytest.raises(rc.ReferenceCheckpointError, match=match) as error:
      rc.load_reference_checkpoint(path, config)
    assert '\n' not in str(error.value)
  # A module missing from the checkpoint.
  checkpoint = dict(synthetic['checkpoint'])
  state = checkpoint['experiment_state']
  online = dict(state.args[0].args[0])
  del online['projector/linear_1']
  checkpoint['experiment_state'] = _New(state.cls, (_flat_mapping(online),) + state.args[1:])
  path.write_bytes(_dumps(checkpoint))
  with pytest.raises(rc.ReferenceCheckpointError,
                     match="online_params has no projector/linear_1 \\(w\\), which the config's "
                           'network has'):
    rc.load_reference_checkpoint(path, _demo_config(**TINY_OVERRIDES))
  path.write_bytes(_dumps(synthetic['checkpoint']))
  adamw = _demo_config(**{**TINY_OVERRIDES, 'optimizer.name': 'adamw'})
  with pytest.raises(rc.ReferenceCheckpointError, match='--config.optimizer.name=lars'):
    rc.to_train_state(byol_experiment.ByolExperiment(adamw, 1), rc.load_reference_checkpoint(path))


# ---------------------------------------------------------------------------------------------
# The command line: reference pickle -> workdir -> restore / export.


@pytest.mark.slow
def test_cli_writes_a_resumable_workdir(tmp_path, tiny_config, tiny_experiment):
  _require(GOLDEN)
  workdir = tmp_path / 'work'
  command = [sys.executable, '-m', 'byol_jax.reference_checkpoint', f'--pkl={GOLDEN}',
             f'--config={os.path.join(REPO, "configs", "byol.py")}:demo',
             f'--workdir={workdir}'] + [f'--config.{k}={v}' for k, v in TINY_OVERRIDES.items()]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'reference step 6' in result.stdout

  # Restored as main_loop / export / evaluation restore it: same leaves as the conversion.
  step, state, saved_config = checkpointing.restore_state(
      str(workdir), checkpointing.train_state_target(byol_experiment.state_shapes(tiny_config)))
  assert step == 6 and int(state.step) == 6
  assert checkpointing.config_differences(saved_config,
                                          checkpointing.config_to_dict(tiny_config)) == []
  expected = rc.to_train_state(tiny_experiment, rc.load_reference_checkpoint(GOLDEN))
  _assert_trees_equal(jax.device_get(state), expected)

  # The export holds the converted encoder (test_golden_embeddings checks what it computes).
  out = tmp_path / 'encoder.npz'
  meta = export.export_encoder(str(workdir), str(out))
  assert meta['step'] == 6 and meta['model']['encoder'] == 'tiny_resnet'
  model_config, params, bn_state = export.load_encoder(str(out))
  assert model_config.encoder == 'tiny_resnet'
  encoder = lambda tree: {m: v for m, v in tree.items() if m.startswith('encoder/')}
  _assert_trees_equal(params, encoder(expected.online_params))
  _assert_trees_equal(bn_state, encoder(expected.online_state))

  # A second conversion into the same workdir is refused (it would mix two runs).
  with pytest.raises(rc.ReferenceCheckpointError, match='already holds checkpoints'):
    rc.write_workdir(GOLDEN, tiny_config, str(workdir))
