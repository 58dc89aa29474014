"""Checkpoints: save/restore, fallback past corrupt checkpoints, bad input, and (as subprocesses
of main_loop) exact resume after SIGKILL and clean exit on SIGTERM.

Everything uses the tiny encoder, 32-wide heads and 8 px images so the whole file stays fast.
"""

import glob
import json
import os
import resource
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import set_overrides, sigterm_once_logged  # tests/helpers.py
from jax.sharding import NamedSharding, PartitionSpec as P

import byol  # configs/byol.py (conftest puts configs/ on the path).
from byol_jax.core import byol_experiment
from byol_jax.runtime import checkpointing, parallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  config = byol.get_config('demo')
  with config.unlocked():
    config.model.encoder = 'tiny'
    config.model.width = 1.0
    config.model.projector_hidden_size = 32
    config.model.predictor_hidden_size = 32
    config.model.projection_size = 16
    config.image_size = 8
    config.batch_size = 8
    config.max_steps = 20
    config.final_knn.enabled = False
    set_overrides(config, overrides)
  return config


def random_batch(rng, batch_size=8, image_size=8):
  """Two random views and labels in [0, 10): one training batch for tiny_config()."""
  shape = (batch_size, image_size, image_size, 3)
  return dict(view1=rng.random(shape, np.float32), view2=rng.random(shape, np.float32),
              labels=rng.integers(0, 10, batch_size).astype(np.int32))


@pytest.fixture(scope='module')
def mesh():
  return parallel.make_mesh()


@pytest.fixture(scope='module')
def trained_states(mesh):
  """(experiment, states after 1, 2 and 3 real training steps on random views (non-trivial
  BN and optimizer state), a freshly initialised state). Built once: each `init` compiles."""
  config = tiny_config()
  experiment = byol_experiment.ByolExperiment(config, 1000)
  initial = experiment.init(jax.random.PRNGKey(1), 8)  # What a resuming run would build.
  state = parallel.replicate(experiment.init(jax.random.PRNGKey(0), 8), mesh)
  step_fn = parallel.map_step(experiment.train_step, mesh, donate_state=False)
  rng = np.random.default_rng(0)
  states = []
  for _ in range(3):
    batch = random_batch(rng)
    state, _ = step_fn(state, parallel.global_batch(batch, mesh))
    states.append(state)
  return experiment, states, initial


def assert_trees_equal(a, b):
  a, b = jax.device_get(a), jax.device_get(b)
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def save_steps(workdir, config, states, steps=(1, 2, 3)):
  checkpoints = checkpointing.Checkpointer(workdir, config)
  for step in steps:
    checkpoints.save(step, states[step - 1])
  checkpoints.close()


def biggest_file(directory):
  files = [f for f in glob.glob(os.path.join(directory, '**'), recursive=True)
           if os.path.isfile(f)]
  return max(files, key=os.path.getsize)


def truncate_array_data(checkpoint):
  """Cuts the array-data files of a checkpoint in half, as a crash or a bad disk would.

  All of them: Orbax's OCDBT format stores small arrays inline in the b-tree of `state/d/`
  (the per-process files are then not read), large ones in `state/ocdbt.process_*/d/`.
  """
  files = glob.glob(os.path.join(checkpoint, 'state', '**', 'd', '*'), recursive=True)
  assert files
  for data in files:
    with open(data, 'r+b') as f:
      f.truncate(os.path.getsize(data) // 2)


# --- Config comparison. ------------------------------------------------------------------------


def test_config_differences_names_keys_and_ignores_allowed_ones():
  saved = checkpointing.config_to_dict(tiny_config())
  current = checkpointing.config_to_dict(tiny_config(
      log_every_steps=7, checkpoint_every_secs=1, keep_checkpoints=9, **{
          'final_knn.k': 3, 'data.data_dir': '/elsewhere', 'model.width': 2.0,
          'optimizer.base_lr': 0.5}))
  differences = checkpointing.config_differences(saved, current)
  assert [d.split(' ')[0] for d in differences] == ['model.width', 'optimizer.base_lr']
  assert 'model.width (1.0 -> 2.0)' in differences
  del current['seed']
  assert 'seed (0 -> <absent>)' in checkpointing.config_differences(saved, current)
  # A run saved before data.eval_crop_fraction existed resumes with it (evaluation only).
  del saved['data']['eval_crop_fraction']
  assert checkpointing.config_differences(saved, checkpointing.config_to_dict(tiny_config())) == []
  # ... and one saved before augment.view_size existed trained on image_size views: it resumes
  # with the default (0), not with smaller views.
  del saved['augment']['view_size']
  assert checkpointing.config_differences(saved, checkpointing.config_to_dict(tiny_config())) == []
  assert checkpointing.config_differences(saved, checkpointing.config_to_dict(tiny_config(
      **{'augment.view_size': 8}))) == ['augment.view_size (0 -> 8)']


# --- Save / restore. ---------------------------------------------------------------------------


def test_restore_is_exact_and_keeps_last_k(tmp_path, mesh, trained_states):
  experiment, states, initial = trained_states
  config = tiny_config(keep_checkpoints=2)
  save_steps(str(tmp_path), config, states)
  checkpoints = checkpointing.Checkpointer(str(tmp_path), config)
  assert checkpoints.steps() == [2, 3]
  step, restored = checkpoints.restore_or_init(initial, mesh)
  checkpoints.close()
  assert step == 3
  assert_trees_equal(restored, states[2])
  assert restored.online_params['encoder/conv_0']['w'].sharding == NamedSharding(mesh, P())
  with open(os.path.join(tmp_path, 'checkpoints', '3', 'config', 'metadata')) as f:
    assert json.load(f)['model']['encoder'] == 'tiny'  # The config is saved as plain JSON.


@pytest.mark.slow
def test_async_save_is_immune_to_the_next_donating_steps(tmp_path, mesh, trained_states):
  """The training step donates the state's buffers: an asynchronous save must have copied
  them before `save` returns, or the checkpoint would hold a later step's values."""
  experiment, states, initial = trained_states
  step_fn = parallel.map_step(experiment.train_step, mesh, donate_state=True)
  state = jax.tree_util.tree_map(lambda x: x.copy(), states[0])
  expected = jax.device_get(state)
  checkpoints = checkpointing.Checkpointer(str(tmp_path), tiny_config())
  checkpoints.save(1, state)
  rng = np.random.default_rng(5)
  for _ in range(3):
    batch = random_batch(rng)
    state, _ = step_fn(state, parallel.global_batch(batch, mesh))
  checkpoints.close()
  _, restored, _ = checkpointing.restore_state(
      str(tmp_path), checkpointing.train_state_target(byol_experiment.state_shapes(tiny_config())))
  assert_trees_equal(restored, expected)


def test_fresh_workdir_starts_at_step_zero(tmp_path, mesh, trained_states):
  _, _, initial = trained_states
  checkpoints = checkpointing.Checkpointer(str(tmp_path / 'new'), tiny_config())
  step, state = checkpoints.restore_or_init(initial, mesh)
  checkpoints.close()
  assert step == 0
  assert_trees_equal(state, initial)


def test_half_written_checkpoint_is_ignored(tmp_path, mesh, trained_states):
  experiment, states, initial = trained_states
  config = tiny_config()
  save_steps(str(tmp_path), config, states, steps=(1, 2))
  # What a save killed midway leaves behind: Orbax's temporary directory, never renamed.
  partial = tmp_path / 'checkpoints' / '3.orbax-checkpoint-tmp'
  os.makedirs(partial / 'state')
  (partial / 'state' / 'manifest.ocdbt').write_bytes(b'\0' * 10)
  checkpoints = checkpointing.Checkpointer(str(tmp_path), config)
  step, restored = checkpoints.restore_or_init(initial, mesh)
  checkpoints.close()
  assert step == 2
  assert_trees_equal(restored, states[1])


# A failed TensorStore read leaves objects that Python reports as unraisable; harmless.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_corrupt_latest_falls_back_with_warning(tmp_path, mesh, trained_states, capsys):
  experiment, states, initial = trained_states
  config = tiny_config()
  save_steps(str(tmp_path), config, states)
  truncate_array_data(tmp_path / 'checkpoints' / '3')
  checkpoints = checkpointing.Checkpointer(str(tmp_path), config)
  step, restored = checkpoints.restore_or_init(initial, mesh)
  assert step == 2
  assert_trees_equal(restored, states[1])
  err = capsys.readouterr().err
  assert f'checkpoint {tmp_path}/checkpoints/3 cannot be read' in err
  assert 'falling back to the previous one' in err
  # The unreadable one is kept aside, freeing step 3 for the resumed run to save again.
  assert len(os.listdir(tmp_path / 'checkpoints.unreadable')) == 1
  checkpoints.save(3, states[2])
  checkpoints.close()
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1', '2', '3']


def test_no_readable_checkpoint_refuses_to_start_from_scratch(tmp_path, mesh, trained_states):
  experiment, states, initial = trained_states
  config = tiny_config()
  save_steps(str(tmp_path), config, states, steps=(1, 2))
  for step in (1, 2):
    os.remove(tmp_path / 'checkpoints' / str(step) / 'config' / 'metadata')
  checkpoints = checkpointing.Checkpointer(str(tmp_path), config)
  with pytest.raises(checkpointing.CheckpointError, match='not starting from scratch'):
    checkpoints.restore_or_init(initial, mesh)
  checkpoints.close()

  checkpoints = checkpointing.Checkpointer(str(tmp_path), tiny_config(restart_from_scratch=True))
  step, _ = checkpoints.restore_or_init(initial, mesh)
  checkpoints.close()
  assert step == 0
  assert glob.glob(str(tmp_path / 'checkpoints.old-*' / '2'))  # Moved aside, not deleted.


def test_incompatible_config_is_one_clear_error(tmp_path, mesh, trained_states):
  experiment, states, initial = trained_states
  save_steps(str(tmp_path), tiny_config(), states, steps=(1,))
  # Allowed differences resume.
  checkpoints = checkpointing.Checkpointer(str(tmp_path), tiny_config(log_every_steps=3))
  assert checkpoints.restore_or_init(initial, mesh)[0] == 1
  checkpoints.close()
  checkpoints = checkpointing.Checkpointer(
      str(tmp_path), tiny_config(seed=5, **{'optimizer.base_lr': 0.1}))
  with pytest.raises(checkpointing.CheckpointError) as error:
    checkpoints.restore_or_init(initial, mesh)
  checkpoints.close()
  message = str(error.value)
  assert '\n' not in message
  assert 'optimizer.base_lr (0.004 -> 0.1); seed (0 -> 5)' in message
  assert 'restart_from_scratch' in message


def test_unwritable_workdir(tmp_path):
  not_a_dir = tmp_path / 'file'
  not_a_dir.write_text('x')
  with pytest.raises(checkpointing.CheckpointError, match='Cannot write checkpoints to'):
    checkpointing.Checkpointer(str(not_a_dir / 'run'), tiny_config())


# After a failed write, Orbax's background threads still post callbacks to an asyncio loop it
# has closed; Python reports them as unraisable. Harmless here (the save is over either way).
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_disk_full_during_save_keeps_previous_checkpoint(tmp_path, mesh, trained_states):
  experiment, states, initial = trained_states
  config = tiny_config()
  checkpoints = checkpointing.Checkpointer(str(tmp_path), config)
  checkpoints.save(1, states[0])
  checkpoints.wait()
  # A file-size limit makes the next data file fail to write, as a full disk does.
  largest = os.path.getsize(biggest_file(tmp_path / 'checkpoints' / '1' / 'state'))
  previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (largest // 2, hard))
  try:
    with pytest.raises(checkpointing.CheckpointError) as error:
      checkpoints.save(2, states[1])
      checkpoints.wait()
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous_handler)
    checkpoints.close()  # Releases Orbax and the workdir lock (the failure was reported).
  assert 'step 2' in str(error.value)
  assert 'the previous checkpoint (step 1) is intact' in str(error.value)
  checkpoints = checkpointing.Checkpointer(str(tmp_path), config)
  step, restored = checkpoints.restore_or_init(initial, mesh)
  checkpoints.close()
  assert step == 1
  assert_trees_equal(restored, states[0])


def test_nan_state_is_never_saved(tmp_path, trained_states):
  _, states, _ = trained_states
  bad = states[0]._replace(online_params=jax.tree_util.tree_map(
      lambda x: x * np.nan, states[0].online_params))
  checkpoints = checkpointing.Checkpointer(str(tmp_path), tiny_config())
  with pytest.raises(FloatingPointError, match='not saving'):
    checkpoints.save(1, bad)
  checkpoints.close()
  assert checkpoints.steps() == []


def test_restore_state_reads_latest_without_a_live_run(tmp_path, trained_states):
  _, states, _ = trained_states
  config = tiny_config()
  save_steps(str(tmp_path), config, states, steps=(1, 2))
  step, state, saved = checkpointing.restore_state(
      str(tmp_path), checkpointing.train_state_target(byol_experiment.state_shapes(config)))
  assert step == 2 and saved['model']['encoder'] == 'tiny'
  assert_trees_equal(state, states[1])
  with pytest.raises(FileNotFoundError):
    checkpointing.restore_state(str(tmp_path / 'none'), checkpointing.train_state_target(byol_experiment.state_shapes(config)))


# --- Save schedule and signals. ----------------------------------------------------------------


def test_save_schedule_steps_time_and_signal(monkeypatch):
  clock = [100.0]
  monkeypatch.setattr(checkpointing.time, 'monotonic', lambda: clock[0])
  schedule = checkpointing.SaveSchedule(
      tiny_config(checkpoint_every_steps=5, checkpoint_every_secs=60), sync_every=1)
  try:
    assert [s for s in range(1, 12) if schedule.should_save(s)] == [5, 10]
    clock[0] += 61
    assert schedule.should_save(12) and not schedule.should_save(13)  # Timer restarts.
    assert not schedule.stop_requested
    os.kill(os.getpid(), signal.SIGTERM)  # Handled: sets a flag instead of terminating.
    assert schedule.should_save(14) and schedule.stop_reason == 'SIGTERM'
  finally:
    schedule.close()
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


# --- End to end: main_loop as a subprocess. ----------------------------------------------------

TOTAL_STEPS = 24
RUN_FLAGS = [
    '--config=configs/byol.py:demo',
    '--config.model.encoder=tiny',
    '--config.model.width=1.0',
    '--config.model.projector_hidden_size=32',
    '--config.model.predictor_hidden_size=32',
    '--config.model.projection_size=16',
    '--config.image_size=8',
    '--config.batch_size=16',
    f'--config.max_steps={TOTAL_STEPS}',
    '--config.log_every_steps=4',
    '--config.checkpoint_every_steps=8',
    '--config.checkpoint_every_secs=0',
    '--config.final_knn.enabled=False',
]


# `python -m byol_jax.main_loop` (its __main__ block, run by runpy) with test-only hooks on
# `SaveSchedule.should_save`, which the loop calls after every step: KILL_AT_STEP sends the
# process SIGKILL at that step (saves are then made synchronous, so which checkpoints exist by
# then is certain); SLOW_AFTER_STEP sleeps 0.5 s per step past it, so that a signal sent from
# outside surely lands mid-run.
DRIVER = """
import os, runpy, signal, sys, time
from byol_jax.runtime import checkpointing
kill_at, slow_after = (int(os.environ.get(k, -1)) for k in ('KILL_AT_STEP', 'SLOW_AFTER_STEP'))
should_save, save = checkpointing.SaveSchedule.should_save, checkpointing.Checkpointer.save
def hooked_should_save(self, step):
  if step == kill_at:
    os.kill(os.getpid(), signal.SIGKILL)
  if 0 <= slow_after < step:
    time.sleep(0.5)
  return should_save(self, step)
def synchronous_save(self, step, state):
  save(self, step, state)
  self.wait()
checkpointing.SaveSchedule.should_save = hooked_should_save
if kill_at >= 0:
  checkpointing.Checkpointer.save = synchronous_save
sys.argv[0] = 'main_loop'
runpy.run_module('byol_jax.main_loop', run_name='__main__', alter_sys=True)
"""


def main_loop_command(workdir, *extra, driver=False):
  program = ['-c', DRIVER] if driver else ['-m', 'byol_jax.main_loop']
  return [sys.executable, *program, *RUN_FLAGS, f'--workdir={workdir}', *extra]


def run_env(**hooks):
  """Unoptimised XLA:CPU code for every run of the comparison alike: compiling the step drops
  from tens of seconds to a few, and the runs stay bit-identical to each other."""
  xla_flags = os.environ.get('XLA_FLAGS', '') + (
      ' --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true')
  return {**os.environ, 'XLA_FLAGS': xla_flags.strip(), **hooks}


def run_main_loop(workdir, *extra, env=None, expect_rc=0):
  result = subprocess.run(main_loop_command(workdir, *extra, driver=env is not None), cwd=REPO,
                          capture_output=True, text=True, timeout=900,
                          env=run_env(**(env or {})))
  assert result.returncode == expect_rc, result.stdout[-2000:] + result.stderr[-3000:]
  return result


def final_state(workdir):
  config = tiny_config(batch_size=16, max_steps=TOTAL_STEPS)
  return checkpointing.restore_state(workdir, checkpointing.train_state_target(byol_experiment.state_shapes(config)))


def metric_rows(workdir):
  if not os.path.exists(os.path.join(workdir, 'metrics.jsonl')):
    return []
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if '"loss"' in line]


def saved_steps(workdir):
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit())


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  run_main_loop(workdir)
  assert saved_steps(workdir) == [8, 16, 24]  # Every 8 steps, and the final state.
  return workdir


@pytest.mark.slow
def test_sigkill_and_sigterm_then_resume_equals_uninterrupted_run(tmp_path, uninterrupted):
  """One run, interrupted twice (4 processes in all, to keep the test short):

  1. SIGKILL at step 11, three steps after the checkpoint of step 8: those steps are lost;
  2. the same command resumes at step 8; SIGTERM once it has logged step 12: it saves at the
     next step boundary and exits with 0, naming the checkpoint;
  3. the same command resumes there and finishes. Final state: bit-exact on CPU (same program,
     same inputs) with the run that was never interrupted, and so is the last metrics row.
  """
  workdir = str(tmp_path)
  run_main_loop(workdir, env=dict(KILL_AT_STEP='11'), expect_rc=-signal.SIGKILL)
  assert saved_steps(workdir) == [8]

  process = subprocess.Popen(main_loop_command(workdir, driver=True), cwd=REPO,
                             env=run_env(SLOW_AFTER_STEP='12'),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  output, stopped_at, line = sigterm_once_logged(process, lambda: metric_rows(workdir), 12)
  assert f'Resuming from checkpoint {workdir}/checkpoints/8 (step 8)' in output
  assert 12 < stopped_at < 16, line
  assert f'checkpoint saved to {workdir}/checkpoints/{stopped_at}. Rerun' in line
  assert saved_steps(workdir) == [8, stopped_at]

  result = run_main_loop(workdir)
  assert f'(step {stopped_at})' in result.stdout
  step, state, _ = final_state(workdir)
  reference_step, reference, _ = final_state(uninterrupted)
  assert step == reference_step == TOTAL_STEPS
  assert_trees_equal(state, reference)
  timing = ('images_per_s', 'eta_s')
  drop = lambda row: {k: v for k, v in row.items() if k not in timing}
  assert drop(metric_rows(workdir)[-1]) == drop(metric_rows(uninterrupted)[-1])
