"""Fault matrix of the pretraining checkpoints: each injected fault loses nothing.

The rows not covered here live in test_checkpointing.py: SIGKILL and SIGTERM then resume
(`test_sigkill_and_sigterm_then_resume_equals_uninterrupted_run`), a truncated array file
(`test_corrupt_latest_falls_back_with_warning`), ENOSPC in the middle of a save
(`test_disk_full_during_save_keeps_previous_checkpoint`), a NaN state
(`test_nan_state_is_never_saved`). metrics.jsonl after a resume: test_metrics.py.
"""

import glob
import json
import os
import subprocess
import sys

import pytest

from test_checkpointing import (DRIVER, REPO, RUN_FLAGS, TOTAL_STEPS, assert_trees_equal,  # pylint: disable=unused-import
                                mesh, run_env, run_main_loop, save_steps, saved_steps,
                                tiny_config, trained_states)
from byol_jax.runtime import checkpointing, disk


def _array_files(checkpoint):
  return [f for f in glob.glob(os.path.join(checkpoint, 'state', '**', 'd', '*'), recursive=True)
          if os.path.getsize(f) > 0]


# A failed TensorStore read leaves objects that Python reports as unraisable; harmless.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_flipped_byte_is_detected_and_the_previous_checkpoint_used(tmp_path, mesh,
                                                                   trained_states, capsys):
  _, states, initial = trained_states
  config = tiny_config()
  save_steps(str(tmp_path), config, states)
  # One bit in the middle of each array-data file of the newest checkpoint (Orbax's OCDBT
  # format keeps small arrays in the b-tree of `state/d/`, larger ones in per-process files).
  # Where the flip lands in raw array bytes Orbax restores without complaint, values simply
  # wrong, and only the digest can tell; where it lands in framing, the read itself fails.
  for target in _array_files(tmp_path / 'checkpoints' / '3'):
    with open(target, 'r+b') as f:
      f.seek(os.path.getsize(target) // 2)
      byte = f.read(1)
      f.seek(-1, os.SEEK_CUR)
      f.write(bytes([byte[0] ^ 0x10]))
  checkpoints = checkpointing.Checkpointer(str(tmp_path), config)
  step, restored = checkpoints.restore_or_init(initial, mesh)
  checkpoints.close()
  err = capsys.readouterr().err
  assert step == 2, err
  assert_trees_equal(restored, states[1])
  # Named, either as corrupt (digest) or unreadable (if the flip broke the file's framing).
  assert f'{tmp_path}/checkpoints/3' in err and 'falling back to the previous one' in err


def test_a_second_run_on_a_workdir_in_use_stops_at_once(tmp_path):
  config = tiny_config()
  first = checkpointing.Checkpointer(str(tmp_path), config)
  try:
    # Another process: the message names the holder on one line.
    code = ('import sys; sys.path.insert(0, "tests"); sys.path.insert(0, "configs");'
            'from test_checkpointing import tiny_config;'
            'from byol_jax.runtime import checkpointing;'
            f'checkpointing.Checkpointer({str(tmp_path)!r}, tiny_config())')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            timeout=300, check=False)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert 'CheckpointError' in last and f'is in use by pid {os.getpid()}' in last, last
  finally:
    first.close()
  assert not os.path.exists(tmp_path / '.lock')  # Released on close.


def test_a_lock_left_by_a_dead_process_does_not_block_a_resume(tmp_path, mesh, trained_states,
                                                               capsys):
  _, states, initial = trained_states
  config = tiny_config()
  save_steps(str(tmp_path), config, states, steps=(1,))
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  with open(tmp_path / '.lock', 'w') as f:  # What a run killed with SIGKILL leaves behind.
    json.dump(dict(pid=dead.pid, hostname=os.uname().nodename, started_at='earlier',
                   argv=['python'], token='x'), f)
  checkpoints = checkpointing.Checkpointer(str(tmp_path), config)
  step, restored = checkpoints.restore_or_init(initial, mesh)
  checkpoints.close()
  assert step == 1
  assert_trees_equal(restored, states[0])
  assert str(dead.pid) in capsys.readouterr().err  # The take-over is reported.


def test_a_save_the_disk_cannot_hold_is_refused_before_writing(tmp_path, mesh, trained_states,
                                                               monkeypatch):
  _, states, initial = trained_states
  config = tiny_config()
  checkpoints = checkpointing.Checkpointer(str(tmp_path), config)
  checkpoints.save(1, states[0])
  checkpoints.wait()
  monkeypatch.setattr(disk, 'free_bytes', lambda directory: 1024)
  with pytest.raises(checkpointing.CheckpointError) as error:
    checkpoints.save(2, states[1])
  message = str(error.value)
  assert '\n' not in message and 'disk full' in message
  assert 'the previous checkpoint (step 1) is intact' in message
  checkpoints.close()
  monkeypatch.undo()
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1']
  checkpoints = checkpointing.Checkpointer(str(tmp_path), config)
  step, restored = checkpoints.restore_or_init(initial, mesh)
  checkpoints.close()
  assert step == 1
  assert_trees_equal(restored, states[0])


def test_a_digest_mismatch_falls_back_and_names_the_checkpoint(tmp_path, mesh, trained_states,
                                                               capsys, monkeypatch):
  """The wiring of the digest check: arrays that restore but differ from what was saved (the
  silent case of a flipped bit in raw array bytes, see test_integrity.py) are rejected."""
  _, states, initial = trained_states
  config = tiny_config()
  save_steps(str(tmp_path), config, states)
  real = checkpointing.Checkpointer._stored_digest  # pylint: disable=protected-access

  def tampered(self, step):
    digest = real(self, step)
    return digest[:-4] + '0000' if step == 3 else digest
  monkeypatch.setattr(checkpointing.Checkpointer, '_stored_digest', tampered)
  checkpoints = checkpointing.Checkpointer(str(tmp_path), config)
  step, restored = checkpoints.restore_or_init(initial, mesh)
  checkpoints.close()
  err = capsys.readouterr().err
  assert step == 2
  assert_trees_equal(restored, states[1])
  assert f'checkpoint {tmp_path}/checkpoints/3 is corrupt (its arrays do not match' in err
  assert 'falling back to the previous one' in err


# Before test_checkpointing's DRIVER: from the save of step DISK_FULL_AT_STEP on, Orbax's
# asynchronous commit fails with ENOSPC (as in test_disk.py, where the config item is written),
# so the error surfaces a few log steps later, at the next save, as on a real full disk.
DISK_FULL_HOOK = """
import errno, os
from orbax import checkpoint as ocp
from byol_jax.runtime import checkpointing
full_from, saving = int(os.environ['DISK_FULL_AT_STEP']), [0]
real_save, real_json_save = checkpointing.Checkpointer.save, ocp.handlers.JsonCheckpointHandler._save_fn
def save(self, step, state):
  saving[0] = step
  return real_save(self, step, state)
async def json_save(self, x, directory):
  if saving[0] >= full_from:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  return await real_json_save(self, x, directory)
checkpointing.Checkpointer.save = save
ocp.handlers.JsonCheckpointHandler._save_fn = json_save
"""


@pytest.mark.slow
def test_disk_full_stop_then_resume_logs_every_step_once(tmp_path):
  """ENOSPC while saving step 16 (checkpoints every 8 steps, rows every 4): the error surfaces
  at the next save, once steps 20 and 24 are logged; the run stops with one line, step 8 stays
  the checkpoint; the same command resumes there and metrics.jsonl ends with every step once."""
  workdir = str(tmp_path)
  failed = subprocess.run([sys.executable, '-c', DISK_FULL_HOOK + DRIVER, *RUN_FLAGS,
                           f'--workdir={workdir}'], cwd=REPO, capture_output=True, text=True,
                          timeout=900, env=run_env(DISK_FULL_AT_STEP='16'))
  assert failed.returncode == 1, failed.stdout[-2000:] + failed.stderr[-3000:]
  # One line says it all. (Orbax's own threads log the failure with tracebacks around it.)
  [line] = [l for l in failed.stderr.splitlines() if l.startswith('error: ')]
  assert line.startswith('error: Saving the checkpoint of step 16 to ') and 'disk full' in line
  assert 'the previous checkpoint (step 8) is intact' in line, line
  assert saved_steps(workdir) == [8]
  rows = lambda: [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [r['step'] for r in rows() if 'loss' in r] == [4, 8, 12, 16, 20, 24]  # Then stopped.

  resumed = run_main_loop(workdir)
  assert f'Resuming from checkpoint {workdir}/checkpoints/8 (step 8)' in resumed.stdout
  assert saved_steps(workdir) == [8, 16, TOTAL_STEPS]
  assert [r['step'] for r in rows() if 'loss' in r] == list(range(4, TOTAL_STEPS + 1, 4))
  assert 'dropped 4 rows logged after step 8' in resumed.stdout
  keys = [(r['step'], tuple(sorted(r))) for r in rows()]
  assert len(keys) == len(set(keys)), keys  # No row twice, the final evaluation's included.
