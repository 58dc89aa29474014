"""Encoder export: checkpoint -> .npz (no pickle) -> load_encoder -> same features as the live
model, for the file and for a workdir read directly."""

import json
import os
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest

from byol_jax import byol_experiment, checkpointing, export, parallel
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


def test_export_round_trip_gives_the_live_features(tmp_path, run):
  workdir, experiment, state = run
  out = str(tmp_path / 'encoder.npz')
  meta = export.export_encoder(workdir, out)
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


def test_export_file_is_plain_npz_without_pickles(tmp_path, run):
  workdir, _, _ = run
  out = str(tmp_path / 'encoder.npz')
  export.export_encoder(workdir, out)
  with np.load(out, allow_pickle=False) as data:  # Would raise on an object array.
    assert all(data[key].dtype != object for key in data.files)
    assert json.loads(str(data['meta']))['format'] == export.FORMAT
  with zipfile.ZipFile(out) as archive:
    assert 'params/encoder/conv_0/w.npy' in archive.namelist()


def test_load_encoder_reads_a_workdir_directly(run):
  workdir, experiment, state = run
  images = np.random.default_rng(2).random((3, 8, 8, 3), np.float32)
  live, features = live_and_loaded_features(experiment, state, export.load_encoder(workdir),
                                            images)
  np.testing.assert_array_equal(features, live)


def test_bad_inputs(tmp_path):
  with pytest.raises(FileNotFoundError):
    export.load_encoder(str(tmp_path / 'missing.npz'))
  not_export = tmp_path / 'other.npz'
  np.savez(not_export, x=np.zeros(3))
  with pytest.raises(ValueError, match='not a byol_jax encoder export'):
    export.load_encoder(str(not_export))
  garbage = tmp_path / 'garbage.npz'
  garbage.write_bytes(b'PK\x03\x04 truncated')
  with pytest.raises(ValueError, match='not a readable encoder export'):
    export.load_encoder(str(garbage))
  with pytest.raises(FileNotFoundError):
    export.export_encoder(str(tmp_path / 'no_run'), str(tmp_path / 'out.npz'))


def test_command_line(tmp_path, run):
  workdir, _, _ = run
  out = tmp_path / 'sub' / 'encoder.npz'
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
