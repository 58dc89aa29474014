"""Encoder export: checkpoint -> .safetensors (no pickle) -> load_encoder -> same features as the
live model, for the file and for a workdir read directly; version-2 .npz exports still load."""

import json
import os
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy

from byol_jax.core import byol_experiment
from byol_jax.runtime import checkpointing, export, parallel
# One tiny-model config and batch for both test files.
from test_checkpointing import random_batch, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A workdir whose checkpoint holds a state after two real steps (non-trivial BN stats)."""
  workdir = str(tmp_path_factory.mktemp('run'))
  config = tiny_config(max_steps=10)
  mesh = parallel.make_mesh()
  experiment = byol_experiment.ByolExperiment(config, 100)
  state = parallel.replicate(experiment.init(jax.random.PRNGKey(0), 8), mesh)
  step_fn = parallel.map_step(experiment.train_step, mesh)
  rng = np.random.default_rng(0)
  for _ in range(2):
    batch = random_batch(rng)
    state, _ = step_fn(state, parallel.global_batch(batch, mesh))
  checkpoints = checkpointing.Checkpointer(workdir, config)
  checkpoints.save(2, state)
  checkpoints.close()
  return workdir, experiment, jax.device_get(state)


def live_and_loaded_features(experiment, state, loaded, images):
  model_config, params, bn_state = loaded
  live = experiment.embed(state.online_params, state.online_state, images)
  encoder = export.make_encoder_fn(model_config)
  features, _ = encoder.apply(params, bn_state, None, images, False)
  return np.asarray(live), np.asarray(features)


@pytest.mark.slow
def test_export_round_trip_gives_the_live_features(tmp_path, run):
  workdir, experiment, state = run
  out = str(tmp_path / 'encoder.safetensors')
  meta = export.export_encoder(workdir, out)
  assert meta['format'] == 'byol_jax.encoder' and meta['format_version'] == 3
  assert meta['step'] == 2 and meta['image_size'] == 8 and meta['dataset'] == 'digits'
  assert meta['model']['encoder'] == 'tiny' and meta['num_classes'] == 10

  loaded = export.load_encoder(out)
  model_config, params, bn_state = loaded
  assert model_config.encoder == 'tiny'
  # Only the online encoder: no heads, no target, no optimizer state.
  assert sorted(params) == ['encoder/bn_0', 'encoder/bn_1', 'encoder/conv_0', 'encoder/conv_1']
  assert params['encoder/conv_0']['w'].shape == (3, 3, 3, 8)  # HWIO.
  assert sorted(bn_state) == ['encoder/bn_0/~/mean_ema', 'encoder/bn_0/~/var_ema',
                              'encoder/bn_1/~/mean_ema', 'encoder/bn_1/~/var_ema']
  for module, values in params.items():
    for name, value in values.items():
      np.testing.assert_array_equal(value, state.online_params[module][name])

  images = np.random.default_rng(1).random((5, 8, 8, 3), np.float32)
  live, features = live_and_loaded_features(experiment, state, loaded, images)
  assert features.shape == (5, 16)
  np.testing.assert_array_equal(features, live)
  assert export.load_metadata(out) == meta == export.load_metadata(workdir)


def read_safetensors_by_hand(path):
  """(metadata, {key: array}) parsed with json and NumPy alone: the format is a little-endian
  u64 header length, a JSON header, then the raw arrays (what makes it memory-mappable)."""
  with open(path, 'rb') as f:
    (length,) = struct.unpack('<Q', f.read(8))
    header = json.loads(f.read(length))
  dtypes = {'F32': np.float32, 'I32': np.int32, 'I64': np.int64}
  arrays = {}
  for key, entry in header.items():
    if key != '__metadata__':
      begin, end = entry['data_offsets']
      arrays[key] = np.memmap(path, dtypes[entry['dtype']], 'r', 8 + length + begin,
                              tuple(entry['shape'])) if end > begin else None
  return header.get('__metadata__'), arrays


@pytest.mark.slow
def test_export_file_is_safetensors_with_its_metadata_in_the_header(tmp_path, run):
  workdir, _, state = run
  out = str(tmp_path / 'encoder.safetensors')
  export.export_encoder(workdir, out)
  metadata, arrays = read_safetensors_by_hand(out)
  assert all(isinstance(value, str) for value in metadata.values())
  assert metadata['format'] == 'byol_jax.encoder' and metadata['format_version'] == '3'
  assert metadata['step'] == '2' and metadata['dataset'] == 'digits'
  assert metadata['image_size'] == '8' and metadata['num_classes'] == '10'
  assert json.loads(metadata['model'])['encoder'] == 'tiny'
  assert set(metadata) == {'format', 'format_version', 'step', 'dataset', 'image_size',
                           'num_classes', 'seed', 'source', 'model'}
  np.testing.assert_array_equal(arrays['params/encoder/conv_0/w'],
                                state.online_params['encoder/conv_0']['w'])
  loaded = safetensors.numpy.load_file(out)
  assert set(loaded) == set(arrays)
  assert loaded['state/encoder/bn_0/~/mean_ema/counter'].dtype == np.int32


def write_version2_npz(path, params, state, meta):
  """An export as the byol_jax version before safetensors wrote it (format_version 2)."""
  # pylint: disable=protected-access
  arrays = {**export._flatten('params/', params), **export._flatten('state/', state),
            'meta': np.asarray(json.dumps(dict(meta, format_version=2), sort_keys=True))}
  with open(path, 'wb') as f:
    np.savez(f, **arrays)


@pytest.mark.slow
def test_version2_npz_exports_still_load_and_version1_is_refused(tmp_path, run):
  workdir, experiment, state = run
  params, bn_state, meta = export.read_checkpoint_encoder(workdir)
  old = str(tmp_path / 'encoder.npz')
  write_version2_npz(old, params, bn_state, meta)
  images = np.random.default_rng(3).random((4, 8, 8, 3), np.float32)
  live, features = live_and_loaded_features(experiment, state, export.load_encoder(old), images)
  np.testing.assert_array_equal(features, live)
  assert export.load_metadata(old) == dict(meta, format_version=2)

  version1 = str(tmp_path / 'version1.npz')
  np.savez(version1, meta=np.asarray(json.dumps(dict(meta, format_version=1))))
  with pytest.raises(ValueError, match='format_version 1.*version 1 predates the reference'):
    export.load_encoder(version1)
  # A version-2 header in a .safetensors file (or 3 in an .npz) is not a file this code wrote.
  mixed = str(tmp_path / 'mixed.safetensors')
  safetensors.numpy.save_file({'x': np.zeros(1)}, mixed,
                              metadata=dict(format=export.FORMAT, format_version='2'))
  with pytest.raises(ValueError, match='format_version 2; this code reads 3'):
    export.load_metadata(mixed)


@pytest.mark.slow
def test_load_encoder_reads_a_workdir_directly(run):
  workdir, experiment, state = run
  images = np.random.default_rng(2).random((3, 8, 8, 3), np.float32)
  live, features = live_and_loaded_features(experiment, state, export.load_encoder(workdir),
                                            images)
  np.testing.assert_array_equal(features, live)


@pytest.mark.slow
def test_bad_inputs(tmp_path, run):
  with pytest.raises(FileNotFoundError):
    export.load_encoder(str(tmp_path / 'missing.safetensors'))
  not_export = tmp_path / 'other.npz'
  np.savez(not_export, x=np.zeros(3))
  with pytest.raises(ValueError, match='not a byol_jax encoder export'):
    export.load_encoder(str(not_export))
  garbage = tmp_path / 'garbage.npz'
  garbage.write_bytes(b'PK\x03\x04 truncated')
  with pytest.raises(ValueError, match='not a readable encoder export'):
    export.load_encoder(str(garbage))
  truncated = tmp_path / 'truncated.safetensors'
  truncated.write_bytes(struct.pack('<Q', 500) + b'{"x": ')
  with pytest.raises(ValueError, match='not a readable encoder export'):
    export.load_encoder(str(truncated))
  other = tmp_path / 'other.safetensors'
  safetensors.numpy.save_file({'x': np.zeros(3)}, str(other))
  with pytest.raises(ValueError, match='not a byol_jax encoder export'):
    export.load_encoder(str(other))
  single = tmp_path / 'single.npy'
  np.save(single, np.zeros(3))
  with pytest.raises(ValueError, match='single .npy array'):
    export.load_metadata(str(single))
  text = tmp_path / 'notes.txt'
  text.write_text('hello, world')
  with pytest.raises(ValueError, match='neither a .safetensors nor an .npz'):
    export.load_encoder(str(text))
  with pytest.raises(FileNotFoundError):
    export.export_encoder(str(tmp_path / 'no_run'), str(tmp_path / 'out.safetensors'))
  workdir, _, _ = run
  with pytest.raises(ValueError, match="needs a ResNet encoder.*model.encoder is 'tiny'"):
    export.export_encoder(workdir, str(tmp_path / 'tv.safetensors'), format='torchvision')
  with pytest.raises(ValueError, match='Unknown export format'):
    export.export_encoder(workdir, str(tmp_path / 'x.safetensors'), format='onnx')
  assert not list(tmp_path.glob('*.safetensors.tmp-*'))


@pytest.mark.slow
def test_command_line(tmp_path, run):
  workdir, _, _ = run
  out = tmp_path / 'sub' / 'encoder.safetensors'
  result = subprocess.run([sys.executable, '-m', 'byol_jax.export', f'--workdir={workdir}',
                           f'--out={out}'], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert f'of step 2 to {out}' in result.stdout and out.exists()
  result = subprocess.run([sys.executable, '-m', 'byol_jax.export',
                           f'--workdir={tmp_path / "none"}', f'--out={out}'], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith('error: No checkpoint directory')
