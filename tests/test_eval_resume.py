"""Linear evaluation and fine-tuning checkpoint and resume exactly (classifier_checkpoints.py).

In process: a run stopped by a real SIGTERM, resumed, crashed between two checkpoints, and
resumed again ends with the uninterrupted run's final checkpoint bit for bit and the same
eval_results.json and metric rows (timing fields aside). Bit for bit, not to a tolerance: every
run executes the same compiled XLA:CPU programs on the same bytes (the batches are a pure
function of (seed, step); the restored state is the saved one, digest-checked), and XLA:CPU is
deterministic for a fixed program, so there is no arithmetic that could round differently.
As subprocesses of main_loop (slow): SIGKILL at a step, SIGTERM from outside (exit 0, the
checkpoint named), then the same command finishes with the uninterrupted run's results.
A checkpoint trained on another pretrained encoder is refused in one line.

Tiny encoder, 8 px digits, a 2-step pretraining, 8 evaluation steps at batch 32.
"""

import json
import os
import signal
import subprocess
import sys

import eval as eval_configs  # configs/eval.py (tests/conftest.py puts configs/ on the path).
from helpers import set_overrides, short_run, sigterm_once_logged, tiny_demo_config  # tests/helpers.py
from test_checkpointing import DRIVER, run_env  # The main_loop driver with kill hooks.
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from byol_jax import main_loop
from byol_jax.evaluation import classifier_checkpoints, drivers, steps
from byol_jax.evaluation import pretrained as pretrained_module
from byol_jax.runtime import checkpointing, parallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE, TOTAL, EVERY = 8, 8, 2
SETTINGS = dict(max_steps=TOTAL, batch_size=32, log_every_steps=1,
                checkpoint_every_steps=EVERY, checkpoint_every_secs=0)
TIMING = ('images_per_s', 'eta_s')


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """A 2-step digits pretraining workdir (its final checkpoint is what evaluation reads)."""
  workdir = str(tmp_path_factory.mktemp('pretrain'))
  config = short_run(tiny_demo_config(SIZE, batch_size=16), max_steps=2, log_every_steps=1,
                     eval_every_steps=0, final_eval=False)
  main_loop.validate_config(config)
  main_loop.train_byol(config, workdir)
  return workdir


def eval_config(preset, checkpoint, **settings):
  config = eval_configs.get_config(preset)
  with config.unlocked():
    config.checkpoint = checkpoint
    set_overrides(config, {**SETTINGS, **settings})
  return config


def final_state(workdir, config):
  """(step, EvalState) of the latest checkpoint of an evaluation workdir."""
  model_config, params, bn_state, meta = drivers.load_pretrained(config.checkpoint)
  config = pretrained_module.resolve(config, pretrained_module.describe(config.checkpoint, meta),
                                     say=lambda _: None)
  experiment = steps.EvalExperiment(config, model_config, train_examples=1000)
  shapes = jax.eval_shape(lambda: experiment.init(params, bn_state, SIZE))
  target = checkpointing.abstract_state(shapes, NamedSharding(parallel.make_mesh(), P()))
  step, state, _ = checkpointing.restore_state(workdir, target)
  return step, jax.device_get(state)


def assert_trees_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [{k: v for k, v in json.loads(line).items() if not k.endswith(TIMING)} for line in f]


def results(workdir):
  with open(os.path.join(workdir, 'eval_results.json')) as f:
    return json.load(f)


def saved_steps(workdir):
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit())


SHOULD_SAVE = checkpointing.SaveSchedule.should_save


class Crash(Exception):
  """Stands for a kill between two checkpoints (the subprocess test sends a real SIGKILL)."""


def interrupt(monkeypatch, *, sigterm_at=None, crash_at=None):
  """Hooks SaveSchedule.should_save (called after every step): a real SIGTERM to this process
  at `sigterm_at`, a Crash at `crash_at` (replacing any earlier hook)."""
  should_save = SHOULD_SAVE

  def hooked(self, step):
    if step == sigterm_at:
      os.kill(os.getpid(), signal.SIGTERM)
    if step == crash_at:
      raise Crash(step)
    return should_save(self, step)
  monkeypatch.setattr(checkpointing.SaveSchedule, 'should_save', hooked)


@pytest.mark.slow
@pytest.mark.parametrize('preset', ['', 'finetune'])
def test_stopped_and_crashed_evaluation_resumes_to_the_uninterrupted_result(
    pretrained, tmp_path, monkeypatch, capsys, preset):
  config = eval_config(preset, pretrained)
  reference, workdir = str(tmp_path / 'uninterrupted'), str(tmp_path / 'interrupted')
  drivers.evaluate(config, reference)
  assert saved_steps(reference) == [6, 8]  # Every 2 steps; keep_checkpoints=2.

  interrupt(monkeypatch, crash_at=1)  # Before the first checkpoint: starts again at 0.
  with pytest.raises(Crash):
    drivers.evaluate(config, workdir)
  handler = signal.getsignal(signal.SIGTERM)
  interrupt(monkeypatch, sigterm_at=3)
  assert drivers.evaluate(config, workdir) is None  # Saved at step 3, nothing to report yet.
  assert signal.getsignal(signal.SIGTERM) == handler  # The handlers are put back.
  out = capsys.readouterr().out
  assert f'Stopped by SIGTERM at step 3: checkpoint saved to {workdir}/checkpoints/3.' in out
  assert saved_steps(workdir) == [2, 3]
  assert not os.path.exists(os.path.join(workdir, 'eval_results.json'))

  interrupt(monkeypatch, crash_at=5)  # After the checkpoint of step 4: step 5 is lost.
  with pytest.raises(Crash):
    drivers.evaluate(config, workdir)
  assert saved_steps(workdir) == [3, 4]
  assert [row['step'] for row in rows(workdir)] == [1, 2, 3, 4, 5]

  monkeypatch.undo()
  drivers.evaluate(config, workdir)
  assert f'Resuming from checkpoint {workdir}/checkpoints/4 (step 4).' in capsys.readouterr().out
  step, state = final_state(workdir, config)
  reference_step, reference_state = final_state(reference, config)
  assert step == reference_step == TOTAL
  assert_trees_equal(state, reference_state)
  assert results(workdir) == results(reference)
  assert rows(workdir) == rows(reference)  # Steps 1..8 once each, then the evaluation row.


def test_a_resumed_evaluation_forgets_the_rows_logged_after_its_checkpoint(tmp_path):
  logged = [dict(step=1, train_loss=2.0), dict(step=2, train_loss=1.5),
            dict(step=3, train_loss=1.2), dict(step=4, train_loss=1.0),
            dict(step=4, validation_top1=0.5, validation_loss=1.1)]
  text = ''.join(json.dumps(row) + '\n' for row in logged) + '{"step": 5, "train_lo'  # Cut.
  (tmp_path / 'metrics.jsonl').write_text(text)
  assert classifier_checkpoints.forget_logged_after(str(tmp_path), 4) == 2
  assert rows(str(tmp_path)) == logged[:4]  # The final evaluation's row is logged again.
  assert classifier_checkpoints.forget_logged_after(str(tmp_path), 2) == 2
  assert rows(str(tmp_path)) == logged[:2]
  assert classifier_checkpoints.forget_logged_after(str(tmp_path), 0) == 2
  assert rows(str(tmp_path)) == []


@pytest.mark.slow
def test_another_pretrained_encoder_is_refused_and_a_moved_one_resumes(pretrained, tmp_path,
                                                                      monkeypatch, capsys):
  config = eval_config('', pretrained)
  workdir = str(tmp_path / 'eval')
  interrupt(monkeypatch, sigterm_at=2)
  assert drivers.evaluate(config, workdir) is None
  monkeypatch.undo()

  model_config, params, bn_state, meta = drivers.load_pretrained(pretrained)
  resolved = pretrained_module.resolve(config, pretrained_module.describe(pretrained, meta))
  changed = jax.tree_util.tree_map(lambda x: x, params)
  module = sorted(changed)[0]
  name = sorted(changed[module])[0]
  changed[module][name] = np.asarray(changed[module][name]) + 1e-3
  with pytest.raises(checkpointing.CheckpointError, match='another pretrained encoder') as error:
    drivers.train_classifier(resolved, model_config, changed, bn_state, workdir)
  assert '\n' not in str(error.value) and pretrained in str(error.value)

  # The same encoder under another path (a moved or linked workdir) is the same evaluation.
  moved = str(tmp_path / 'moved')
  os.symlink(pretrained, moved)
  capsys.readouterr()
  drivers.evaluate(eval_config('', moved), workdir)
  assert f'Resuming from checkpoint {workdir}/checkpoints/2 (step 2).' in capsys.readouterr().out
  assert results(workdir)['steps'] == TOTAL


# --- Subprocesses of main_loop: SIGKILL, then SIGTERM from outside, then the end. --------------

# DRIVER: `python -m byol_jax.main_loop` with test-only hooks on SaveSchedule.should_save:
# KILL_AT_STEP (SIGKILL at that step; saves synchronous, so which checkpoints exist then is
# certain) and SLOW_AFTER_STEP (0.5 s per step past it, so a signal from outside lands mid-run).


def command(pretrained, workdir, driver):
  program = ['-c', DRIVER] if driver else ['-m', 'byol_jax.main_loop']
  flags = [f'--config.{key}={value}' for key, value in SETTINGS.items()]
  return [sys.executable, *program, '--config=configs/eval.py:finetune',
          f'--config.checkpoint={pretrained}', *flags, f'--workdir={workdir}']


def run(pretrained, workdir, env=None, expect_rc=0):
  result = subprocess.run(command(pretrained, workdir, driver=env is not None), cwd=REPO,
                          capture_output=True, text=True, timeout=900, env=run_env(**(env or {})))
  assert result.returncode == expect_rc, result.stdout[-2000:] + result.stderr[-3000:]
  return result


@pytest.mark.slow
def test_sigkill_and_sigterm_then_resume_equals_the_uninterrupted_evaluation(pretrained,
                                                                              tmp_path):
  """Fine-tuning (the larger state: encoder, its BatchNorm statistics, both momenta):
  1. SIGKILL at step 3, one step after the checkpoint of step 2;
  2. the same command resumes at 2; SIGTERM once step 4 is logged (steps 4-7 take 0.5 s
     more each, so it lands mid-run): it saves at the next step
     boundary and exits 0 naming the checkpoint, writing no eval_results.json;
  3. the same command finishes: final classifier and encoder bit for bit, eval_results.json
     and metric rows equal to the run never interrupted (all runs are subprocesses alike).
  """
  reference, workdir = str(tmp_path / 'uninterrupted'), str(tmp_path / 'interrupted')
  run(pretrained, reference)

  run(pretrained, workdir, env=dict(KILL_AT_STEP='3'), expect_rc=-signal.SIGKILL)
  assert saved_steps(workdir) == [2]

  process = subprocess.Popen(command(pretrained, workdir, driver=True), cwd=REPO,
                             env=run_env(SLOW_AFTER_STEP='3'), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
  output, stopped_at, line = sigterm_once_logged(process, lambda: rows(workdir), 4)
  assert f'Resuming from checkpoint {workdir}/checkpoints/2 (step 2).' in output
  assert 4 <= stopped_at < TOTAL, line
  assert f'checkpoint saved to {workdir}/checkpoints/{stopped_at}. Rerun' in line
  assert not os.path.exists(os.path.join(workdir, 'eval_results.json'))

  result = run(pretrained, workdir)
  assert f'(step {stopped_at}).' in result.stdout
  config = eval_config('finetune', pretrained)
  step, state = final_state(workdir, config)
  reference_step, reference_state = final_state(reference, config)
  assert step == reference_step == TOTAL
  assert_trees_equal(state, reference_state)
  assert results(workdir) == results(reference)
  assert rows(workdir) == rows(reference)
