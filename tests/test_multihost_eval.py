"""Multi-host evaluation: two JAX processes on localhost (CPU devices, gloo) each embed only
their own shard of a split, every process ends with the features one process computes (same
rows, same order), kNN gives one process's result on both, and only process 0 writes files.

The digits splits do not divide evenly: the hold-out has 297 images (shards of 148 and 149,
batches of 64: 64 + 64 + 20 and 64 + 64 + 21 real images) and the labelled training split 1,500
(shards of 750: 64 x 11 + 46). Raw pixels are compared bit for bit (no arithmetic: any dropped,
repeated or misplaced image shows); the encoder's features within float32 summation order
(each process batches different images together; see `test_two_processes_embed_their_shards`).

The file is also the worker: `python tests/test_multihost_eval.py --out=DIR --export=FILE
[--coordinator ...]` runs the checks' computations and saves what it saw to DIR/result.npz;
its evaluation workdir is DIR/work, one per process as on separate hosts.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import pytest

from test_multihost import REPO, free_port, run_all, subprocess_env  # tests/test_multihost.py

SIZE = 8
BATCH = 64  # Per process, for the feature checks (evaluate itself uses features.EVAL_BATCH).
SPLITS = {'validation': 297, 'labelled_train': 1500}


# ----------------------------------------------------------------------------- worker side.

def _eval_config(export_path):
  sys.path.insert(0, os.path.join(REPO, 'configs'))
  import eval as eval_configs  # configs/eval.py  pylint: disable=g-import-not-at-top
  config = eval_configs.get_config('knn')
  with config.unlocked():
    config.checkpoint = export_path
    config.data.validation_examples = 297  # The export's workdir is gone: say the hold-out.
    config.data.train_on_validation = False
    config.knn.k = 20
  return config


def _pretraining_config():
  sys.path[:0] = [os.path.join(REPO, 'tests'), os.path.join(REPO, 'configs')]
  from helpers import tiny_demo_config  # pylint: disable=g-import-not-at-top
  config = tiny_demo_config(SIZE, batch_size=16)
  with config.unlocked():
    config.final_knn.k = 20
  return config


def worker(args):
  from byol_jax.runtime import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(distributed.Settings(
      mode='on' if args.coordinator else 'off', coordinator_address=args.coordinator,
      num_processes=args.num_processes, process_id=args.process_id, timeout_s=120), log=False)
  import jax  # pylint: disable=g-import-not-at-top
  from byol_jax.core import byol_experiment  # pylint: disable=g-import-not-at-top
  from byol_jax.evaluation import drivers, features, pretrained, steps  # pylint: disable=g-import-not-at-top
  from byol_jax.runtime import parallel  # pylint: disable=g-import-not-at-top

  start = time.time()
  config = _eval_config(args.export)
  model_config, params, bn_state, meta = pretrained.load(args.export)
  resolved = pretrained.resolve(config, pretrained.describe(args.export, meta), say=lambda _: 0)
  encoder = steps.encoder_embed(model_config)
  embedded = {}  # Rows given to each embed function, padding included.

  def counting(name, embed):
    def counted(p, s, images):
      embedded[name] = embedded.get(name, 0) + len(images)
      return embed(p, s, images)
    return counted

  saved = {}
  for split in SPLITS:
    for name, embed in (('pixels', drivers._pixels), ('encoder', encoder)):  # pylint: disable=protected-access
      local = features.shard_features(resolved, counting(f'{split}/{name}', embed), params,
                                      bn_state, split, batch_size=BATCH)
      gathered = parallel.gather_rows(local)
      saved[f'{split}/{name}/local_count'] = len(local[0])
      saved[f'{split}/{name}/embedded'] = embedded[f'{split}/{name}']
      saved[f'{split}/{name}/features'], saved[f'{split}/{name}/labels'] = gathered
    saved[f'{split}/labels'] = features.split_labels(resolved, split, batch_size=BATCH)

  record = drivers.evaluate(config, os.path.join(args.out, 'work'))
  for key in ('top1', 'top5', 'eval_examples', 'train_examples'):
    saved[f'evaluate/{key}'] = record[key]

  # The pretraining-time kNN (online encoder, random-init baseline, raw pixels) of a fresh
  # state: the random-init baseline recalibrates BatchNorm on training batches first.
  pretraining = _pretraining_config()
  experiment = byol_experiment.ByolExperiment(pretraining, train_examples=1500)
  state = jax.jit(experiment.init, static_argnums=1)(jax.random.PRNGKey(0), SIZE)
  baselines = []  # What pretraining_knn's random-init baseline is, kept for the comparison.
  real_baseline = drivers.random_init_baseline
  drivers.random_init_baseline = lambda *a: baselines.append(real_baseline(*a)) or baselines[-1]
  results = drivers.pretraining_knn(pretraining, experiment, state, state)
  [(_, calibrated)] = baselines
  for path, leaf in jax.tree_util.tree_flatten_with_path(calibrated)[0]:
    saved[f'calibrated{jax.tree_util.keystr(path)}'] = np.asarray(leaf)
  for name, result in results.items():
    saved[f'pretraining_knn/{name}/top1'] = result['top1']
    saved[f'pretraining_knn/{name}/count'] = result['count']
  np.savez(os.path.join(args.out, 'result.npz'), **saved)
  print(f'process {jax.process_index()} of {jax.process_count()}: done in '
        f'{time.time() - start:.1f}s', flush=True)


# ----------------------------------------------------------------------------- test side.

def _write_export(path):
  """A random-init tiny encoder as an export file whose pretraining workdir is gone."""
  import jax  # pylint: disable=g-import-not-at-top
  from byol_jax.core import networks  # pylint: disable=g-import-not-at-top
  from byol_jax.runtime import export  # pylint: disable=g-import-not-at-top
  model_config = _pretraining_config().model
  encoder = networks.make_encoder_transform(model_config)
  params, state = jax.jit(encoder.init, static_argnums=2)(
      jax.random.PRNGKey(0), np.zeros((1, SIZE, SIZE, 3), np.float32), True)
  export.write_native(str(path), jax.device_get(params), jax.device_get(state), dict(
      step=0, dataset='digits', image_size=SIZE, num_classes=10, seed=0,
      source=str(path.parent / 'gone'), model=model_config.to_dict()))


def _files(directory):
  return sorted(os.path.relpath(os.path.join(root, name), directory)
                for root, _, names in os.walk(directory) for name in names)


@pytest.mark.slow
def test_two_processes_embed_their_shards(tmp_path):
  pytest.importorskip('tensorflow')
  export_path = tmp_path / 'encoder.safetensors'
  _write_export(export_path)
  address = f'127.0.0.1:{free_port()}'
  outs = {name: tmp_path / name for name in ('single', 'proc0', 'proc1')}
  for out in outs.values():
    out.mkdir()
  argv = lambda out: [sys.executable, os.path.abspath(__file__), f'--out={out}',
                      f'--export={export_path}']
  commands = [(argv(outs['single']), subprocess_env(1))]
  commands += [(argv(outs[f'proc{i}']) + [f'--coordinator={address}', '--num_processes=2',
                                          f'--process_id={i}'], subprocess_env(1))
               for i in range(2)]
  t0 = time.time()
  results = run_all(commands, tmp_path)
  elapsed = time.time() - t0
  for (rc, output), name in zip(results, outs):
    assert rc == 0, f'{name} failed (rc={rc}):\n{output[-4000:]}'
  single, p0, p1 = (dict(np.load(outs[name] / 'result.npz')) for name in outs)

  for split, n in SPLITS.items():
    shards = [n // 2, n - n // 2]  # contiguous_shard: [i * n // 2, (i + 1) * n // 2).
    padded = lambda count: -(-count // BATCH) * BATCH  # Every batch is embedded whole.
    for name in ('pixels', 'encoder'):
      key = f'{split}/{name}'
      # Each process embedded only its shard, once; one process embeds the whole split.
      assert [int(p[f'{key}/local_count']) for p in (p0, p1)] == shards, key
      assert int(single[f'{key}/local_count']) == n
      assert int(p0[f'{key}/embedded']) == int(p1[f'{key}/embedded']) == padded(max(shards))
      assert int(single[f'{key}/embedded']) == padded(n)
      # Both processes hold the same gathered arrays (gloo copies bytes)...
      for what in ('features', 'labels'):
        np.testing.assert_array_equal(p0[f'{key}/{what}'], p1[f'{key}/{what}'], err_msg=key)
      # ...which are the single process's rows, in its order.
      assert len(p0[f'{key}/labels']) == n
      np.testing.assert_array_equal(p0[f'{key}/labels'], single[f'{key}/labels'], err_msg=key)
    np.testing.assert_array_equal(p0[f'{split}/pixels/features'],
                                  single[f'{split}/pixels/features'], err_msg=split)
    # The encoder computes each image alone (inference-mode BatchNorm), but XLA may sum an
    # image's products in another order when its batch differs: float32 rounding, ~1e-7 of
    # each accumulated magnitude per addition over the tiny net's few hundred-term sums. 1e-5
    # of the largest feature is ~100x that; a dropped, repeated or swapped image is O(1).
    got, want = p0[f'{split}/encoder/features'], single[f'{split}/encoder/features']
    assert got.shape == want.shape and want.shape[0] == n
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max(), err_msg=split)
    np.testing.assert_array_equal(p0[f'{split}/labels'], single[f'{split}/labels'])

  # kNN: both processes compute it on the same gathered arrays, so they agree exactly; with
  # one process's features (raw pixels bit for bit) the result is one process's.
  for key in single:
    if key.startswith(('evaluate/', 'pretraining_knn/')):
      assert p0[key] == p1[key], key
  assert p0['pretraining_knn/raw_pixels/top1'] == single['pretraining_knn/raw_pixels/top1']
  # The random-init baseline's BatchNorm statistics: every process refreshes them on the same
  # batches, one process's, so each process embeds its shard with the same network.
  calibrated = [key for key in single if key.startswith('calibrated')]
  assert calibrated
  for key in calibrated:
    np.testing.assert_array_equal(p0[key], single[key], err_msg=key)
    np.testing.assert_array_equal(p1[key], single[key], err_msg=key)
  encoder_identical = all(
      np.array_equal(p0[f'{s}/encoder/features'], single[f'{s}/encoder/features'])
      for s in SPLITS)
  if encoder_identical:  # Same features, same program: the same result, exactly.
    assert p0['evaluate/top1'] == single['evaluate/top1']
    assert p0['evaluate/top5'] == single['evaluate/top5']
  assert int(p0['evaluate/eval_examples']) == 297
  assert int(p0['evaluate/train_examples']) == 1500
  assert int(p0['pretraining_knn/byol/count']) == 297

  # Only process 0 writes: eval_results.json, metrics.jsonl, TensorBoard events.
  written = _files(outs['proc0'] / 'work')
  assert 'eval_results.json' in written and 'metrics.jsonl' in written, written
  assert json.loads((outs['proc0'] / 'work' / 'eval_results.json').read_text())['top1'] == (
      p0['evaluate/top1'])
  assert not (outs['proc1'] / 'work').exists(), _files(outs['proc1'] / 'work')
  print(f'3 processes in {elapsed:.1f}s; encoder features bit-identical to one process: '
        f'{encoder_identical}; kNN top-1 {float(p0["evaluate/top1"]):.4f} (1 process '
        f'{float(single["evaluate/top1"]):.4f})')


if __name__ == '__main__':
  parser = argparse.ArgumentParser()
  parser.add_argument('--out', required=True)
  parser.add_argument('--export', required=True)
  parser.add_argument('--coordinator')
  parser.add_argument('--num_processes', type=int)
  parser.add_argument('--process_id', type=int)
  worker(parser.parse_args())
