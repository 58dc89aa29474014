"""Workdirs on object storage (byol_jax/runtime/storage.py, object_lock.py).

There is no network here, so gs:// goes to tests/fake_gcs.py: etils.epath and TensorStore are
pointed at a local directory that follows object-storage rules (an object appears whole when
closed, no appends). The end-to-end test runs pretraining, resume, export and evaluation with
`--workdir=gs://...` through it; what the fake cannot show (TensorStore's own `gcs` driver,
GCS errors) is listed in its docstring.
"""

import glob
import json
import os
import shutil
import socket
import time

import pytest
from tensorboard.backend.event_processing import event_accumulator

import fake_gcs  # tests/fake_gcs.py
from helpers import short_run, tiny_demo_config  # tests/helpers.py
from byol_jax.runtime import metrics, object_lock, storage
from byol_jax.runtime.workdir_lock import WorkdirInUse


@pytest.fixture
def gcs(tmp_path, monkeypatch):
  """A fake GCS under tmp_path/gcs, the current directory tmp_path/cwd (where the classic bug,
  os.makedirs('gs://b/run'), would make a directory `gs:`)."""
  fake = fake_gcs.install(monkeypatch, tmp_path / 'gcs')
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  yield fake
  assert os.listdir(cwd) == [], 'a gs:// path was written as a local relative path'


# -- paths, no I/O ------------------------------------------------------------------------------


def test_gs_paths_are_kept_as_urls_and_local_paths_as_before(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert storage.is_remote('gs://bucket/run') and not storage.is_remote('gs:/bucket/run')
  assert storage.resolve('gs://bucket/run/') == 'gs://bucket/run'
  assert storage.join('gs://bucket/run', 'checkpoints', '3') == 'gs://bucket/run/checkpoints/3'
  assert storage.dirname('gs://bucket/run/a.json') == 'gs://bucket/run'
  assert storage.basename('gs://bucket/run/a.json') == 'a.json'
  assert storage.resolve('run') == os.path.join(str(tmp_path), 'run')
  assert storage.join('run', 'checkpoints') == os.path.join('run', 'checkpoints')
  assert storage.kvstore_spec('gs://bucket/run') == {'driver': 'gcs', 'bucket': 'bucket',
                                                     'path': 'run/'}
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('url', ['memory://bucket/run', 'file:///tmp/run', 'http://host/run'])
def test_a_scheme_epath_does_not_know_is_one_line(url):
  with pytest.raises(ValueError, match=r'unsupported storage scheme .*://') as error:
    storage.resolve(url)
  assert '\n' not in str(error.value)


def test_a_checkpointer_on_gs_never_makes_a_local_directory(gcs):
  from byol_jax.runtime import checkpointing  # pylint: disable=g-import-not-at-top
  config = short_run(tiny_demo_config(8), max_steps=2)
  checkpoints = checkpointing.Checkpointer('gs://bucket/run', config)
  try:
    assert checkpoints.directory == 'gs://bucket/run/checkpoints'
    assert checkpoints.step_path(3) == 'gs://bucket/run/checkpoints/3'
    assert object_lock.read_lock('gs://bucket/run')['pid'] == os.getpid()
  finally:
    checkpoints.close()
  assert object_lock.read_lock('gs://bucket/run') is None
  assert ('open_wb', 'gs://bucket/run/checkpoints/.write_test.%d' % os.getpid()) in gcs.operations


# -- local files behave as before ---------------------------------------------------------------


def test_local_write_is_atomic_and_replaces(tmp_path):
  path = str(tmp_path / 'deep' / 'results.json')
  storage.write_json(path, {'top1': 0.5})
  storage.write_json(path, {'top1': 0.75})
  assert json.loads(open(path).read()) == {'top1': 0.75}
  assert os.listdir(tmp_path / 'deep') == ['results.json']  # No temporary left.


def test_local_growing_file_appends_and_flushes_at_once(tmp_path):
  path = str(tmp_path / 'metrics.jsonl')
  for text in (b'a\n', b'b\n'):
    f = storage.GrowingFile(path)
    f.write(text)
    f.flush()
    assert open(path, 'rb').read().endswith(text)  # Visible before close.
    f.close()
  assert open(path, 'rb').read() == b'a\nb\n'


# -- object storage -----------------------------------------------------------------------------


def test_remote_growing_file_uploads_whole_and_resumes(gcs):
  path = 'gs://bucket/run/metrics.jsonl'
  f = storage.GrowingFile(path, upload_every_secs=3600)
  f.write(b'a\n')
  f.flush()  # The first flush uploads.
  assert storage.read_bytes(path) == b'a\n'
  f.write(b'b\n')
  f.flush()  # Not due for an hour.
  assert storage.read_bytes(path) == b'a\n'
  f.close()
  assert storage.read_bytes(path) == b'a\nb\n'
  f = storage.GrowingFile(path)  # A resumed run continues the object.
  f.write(b'c\n')
  f.close()
  assert storage.read_bytes(path) == b'a\nb\nc\n'
  assert not any(op.startswith('open_a') for op, _ in gcs.operations)  # Never appends.


def test_remote_write_appears_whole_and_local_file_reads_it(gcs):
  storage.write_bytes('gs://bucket/x/blob.bin', b'\x00' * 10)
  assert storage.listdir('gs://bucket/x') == ['blob.bin']
  with storage.local_file('gs://bucket/x/blob.bin') as local:
    assert not storage.is_remote(local) and open(local, 'rb').read() == b'\x00' * 10
  assert not os.path.exists(local)
  with pytest.raises(FileNotFoundError):
    with storage.local_file('gs://bucket/x/absent.bin'):
      pass


def test_metrics_and_tensorboard_on_gs(gcs):
  writer = metrics.MetricWriter('gs://bucket/run', total_steps=10, images_per_step=4)
  writer.write(1, {'loss': 2.0})
  writer.write(2, {'loss': 1.5})
  writer.close()
  rows = [json.loads(line) for line in
          storage.read_text('gs://bucket/run/metrics.jsonl').splitlines()]
  assert [(r['step'], r['loss']) for r in rows] == [(1, 2.0), (2, 1.5)]
  events = glob.glob(str(gcs.root / 'bucket' / 'run' / 'tensorboard' / 'events.out.tfevents.*'))
  assert len(events) == 1
  accumulator = event_accumulator.EventAccumulator(events[0])
  accumulator.Reload()
  assert [(e.step, e.value) for e in accumulator.Scalars('loss')] == [(1, 2.0), (2, 1.5)]


# -- the lock on object storage -----------------------------------------------------------------


def _warnings():
  messages = []
  return messages, messages.append


def _put_lock(**fields):
  record = dict(pid=12345, hostname='other-host', started_at='2024-01-01T00:00:00+00:00',
                started_at_unix=time.time(), heartbeat_unix=time.time(), argv=['train.py'],
                token='x')
  record.update(fields)
  storage.write_json('gs://bucket/run/.lock', record)


def test_object_lock_is_exclusive_and_released(gcs):
  with object_lock.ObjectLock('gs://bucket/run') as lock:
    assert lock.held and object_lock.read_lock('gs://bucket/run')['hostname'] == (
        socket.gethostname())
    with pytest.raises(WorkdirInUse, match=r'workdir gs://bucket/run is in use by pid'):
      object_lock.ObjectLock('gs://bucket/run').acquire()
  assert object_lock.read_lock('gs://bucket/run') is None
  with object_lock.ObjectLock('gs://bucket/run'):  # Free again.
    pass


def test_a_lock_created_meanwhile_wins_the_conditional_write(gcs):
  """Two runs that both saw no lock: the second conditional create fails."""
  first, second = object_lock.ObjectLock('gs://bucket/run'), object_lock.ObjectLock(
      'gs://bucket/run')
  _, absent, present = second._read()  # pylint: disable=protected-access
  assert not present
  first.acquire()
  assert not second._write_if(second._new_record(), absent)  # pylint: disable=protected-access
  assert object_lock.read_lock('gs://bucket/run')['token'] == first._record['token']  # pylint: disable=protected-access
  first.release()


def test_a_live_lock_from_another_host_blocks_until_its_heartbeat_is_stale(gcs):
  _put_lock()
  with pytest.raises(WorkdirInUse, match='pid 12345 on host other-host'):
    object_lock.ObjectLock('gs://bucket/run', stale_after_secs=3600).acquire()
  _put_lock(heartbeat_unix=time.time() - 7200)
  warnings, warn = _warnings()
  with object_lock.ObjectLock('gs://bucket/run', stale_after_secs=3600, warn=warn) as lock:
    assert lock.previous_holder['pid'] == 12345
  assert 'taking over' in warnings[0] and 'heartbeat is 7200 s old' in warnings[0]


def test_a_lock_of_a_dead_process_on_this_host_and_a_corrupt_lock_are_taken_over(gcs):
  _put_lock(hostname=socket.gethostname(), pid=2 ** 22 + 7)  # No such PID.
  warnings, warn = _warnings()
  with object_lock.ObjectLock('gs://bucket/run', warn=warn):
    pass
  assert 'is dead' in warnings[0]
  storage.write_bytes('gs://bucket/run/.lock', b'{not json')
  with object_lock.ObjectLock('gs://bucket/run', warn=warn):
    pass
  assert 'unreadable or corrupt' in warnings[1]


def test_a_lock_taken_over_meanwhile_is_reported_and_left_alone(gcs):
  warnings, warn = _warnings()
  lock = object_lock.ObjectLock('gs://bucket/run', warn=warn).acquire()
  lock.refresh()  # Ours: a new heartbeat.
  assert object_lock.read_lock('gs://bucket/run')['heartbeat_unix'] >= lock._record[  # pylint: disable=protected-access
      'started_at_unix']
  _put_lock(token='other')  # Another run took it over (e.g. judged ours stale).
  lock.refresh()
  assert not lock.held and 'no longer holds it' in warnings[0]
  lock.release()
  assert object_lock.read_lock('gs://bucket/run')['token'] == 'other'  # Not deleted.


# -- end to end ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_whole_run_on_gs_writes_resumes_exports_and_evaluates(gcs, capsys):
  """Pretraining, resume, export and kNN evaluation with every workdir on gs://."""
  # pylint: disable=g-import-not-at-top
  import eval as eval_configs  # configs/eval.py
  from byol_jax import main_loop
  from byol_jax.evaluation import drivers
  from byol_jax.runtime import export

  workdir = 'gs://bucket/pretrain'
  config = short_run(tiny_demo_config(8, batch_size=16), max_steps=2, log_every_steps=1,
                     eval_every_steps=0, checkpoint_every_steps=1)
  main_loop.validate_config(config)
  main_loop.train_byol(config, workdir)
  root = gcs.root / 'bucket' / 'pretrain'
  assert sorted(os.listdir(root / 'checkpoints')) == ['1', '2']
  assert os.path.exists(root / 'checkpoints' / '2' / 'commit_success.txt')  # Orbax's GCS mode.
  assert not os.path.exists(root / '.lock')
  assert json.loads(storage.read_text(workdir + '/online_eval_results.json'))['step'] == 2

  # As if killed before its last save: the same command resumes from step 1.
  shutil.rmtree(root / 'checkpoints' / '2')
  main_loop.train_byol(config, workdir)
  assert f'Resuming from checkpoint {workdir}/checkpoints/1 (step 1).' in capsys.readouterr().out
  assert os.path.exists(root / 'checkpoints' / '2' / 'commit_success.txt')
  rows = [json.loads(line) for line in storage.read_text(workdir + '/metrics.jsonl').splitlines()]
  steps = [r['step'] for r in rows if 'repr_loss' in r]
  assert steps[0] == 1 and steps[-1] == 2  # The first run's rows, then the resumed run's.

  out = 'gs://bucket/exports/encoder.safetensors'
  meta = export.export_encoder(workdir, out)
  assert meta['step'] == 2 and meta['source'] == workdir
  model_config, params, _ = export.load_encoder(out)
  assert model_config.encoder == 'tiny' and params

  eval_config = eval_configs.get_config('knn')
  with eval_config.unlocked():
    eval_config.checkpoint = out
  drivers.validate_config(eval_config)
  record = drivers.evaluate(eval_config, 'gs://bucket/knn')
  saved = json.loads(storage.read_text('gs://bucket/knn/eval_results.json'))
  assert saved['checkpoint'] == out and saved['checkpoint_step'] == 2
  assert saved['top1'] == record['top1'] and saved['eval_examples'] == 297
