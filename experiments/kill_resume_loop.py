r"""kill -9 a pretraining run at random steps, resume it, and compare with an uninterrupted run.

    python experiments/kill_resume_loop.py --runs=5 [--steps=60] [--workdir=/tmp/kill_loop]
    python experiments/kill_resume_loop.py --eval --runs=5 [--steps=40]   # fine-tuning instead

Each trial runs `python -m byol_jax.main_loop` on the digits demo data (a tiny network, so a
trial takes about a minute on 2 CPU cores), sends SIGKILL once the run has logged a step
drawn at random past everything already saved or logged (so the kill lands in training, not in
start-up, and costs the steps since the last checkpoint), repeats that `--kills` times, then lets
the same command finish. The trial matches when its final checkpoint
equals the uninterrupted run's bit for bit and its metrics.jsonl has every logged step exactly
once. Prints one line per trial and a final JSON line: {"runs": N, "matched": M, ...}.

`--eval` does the same to fine-tuning (configs/eval.py:finetune, the larger evaluation state) of
a 2-step pretraining of the same tiny network: the trial matches when its final checkpoint
(compared through the SHA-256 digest stored with it) and its eval_results.json equal the
uninterrupted run's and its metrics.jsonl has every logged step exactly once. Each trial line
also says where each kill landed and from which step the final run resumed.
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'configs'))
sys.path.insert(0, REPO)  # byol_jax without an install (final_arrays reads checkpoints here).


def flags(steps):
  return ['--config=configs/byol.py:demo', '--config.model.encoder=tiny',
          '--config.image_size=8', '--config.batch_size=16', f'--config.max_steps={steps}',
          '--config.log_every_steps=1', '--config.checkpoint_every_steps=5',
          '--config.final_knn.enabled=False', '--config.final_eval=False',
          '--config.model.projector_hidden_size=32', '--config.model.predictor_hidden_size=32',
          '--config.model.projection_size=16']


def eval_flags(steps, pretrained):
  return ['--config=configs/eval.py:finetune', f'--config.checkpoint={pretrained}',
          '--config.batch_size=32', f'--config.max_steps={steps}', '--config.log_every_steps=1',
          '--config.checkpoint_every_steps=5', '--config.checkpoint_every_secs=0']


def command(workdir, steps, pretrained=None):
  chosen = flags(steps) if pretrained is None else eval_flags(steps, pretrained)
  return [sys.executable, '-m', 'byol_jax.main_loop', *chosen, f'--workdir={workdir}']


def run_to_end(workdir, steps, pretrained=None):
  result = subprocess.run(command(workdir, steps, pretrained), cwd=REPO, capture_output=True,
                          text=True, check=False)
  if result.returncode != 0:
    raise RuntimeError(f'run in {workdir} failed:\n{result.stderr[-3000:]}')
  return result.stdout


def saved_steps(workdir):
  try:
    return [int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit()]
  except FileNotFoundError:
    return []


def kill_at_a_random_step(command_line, workdir, steps, rng):
  """Runs `command_line` and SIGKILLs it once it has logged a step drawn uniformly past every
  step already saved or logged in `workdir`; the last step it logged (None: nothing left)."""
  done = max(saved_steps(workdir) + (logged_steps(workdir) if os.path.exists(
      os.path.join(workdir, 'metrics.jsonl')) else []), default=0)
  if done >= steps - 1:
    return None
  target = rng.randint(done + 1, steps - 1)
  process = subprocess.Popen(command_line, cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  while process.poll() is None:
    logged = logged_steps(workdir) if os.path.exists(
        os.path.join(workdir, 'metrics.jsonl')) else []
    if max(logged, default=0) >= target:
      process.send_signal(signal.SIGKILL)
      process.wait()
      return max(logged_steps(workdir))
    time.sleep(0.02)
  raise RuntimeError(f'the run in {workdir} ended (status {process.returncode}) before step '
                     f'{target}')


def resumed_from(stdout):
  """The step the run resumed from, 0 when it started afresh."""
  lines = [line for line in stdout.splitlines() if line.startswith('Resuming from checkpoint')]
  return int(lines[-1].rsplit('(step ', 1)[1].rstrip(').')) if lines else 0


def final_eval_outcome(workdir):
  """(SHA-256 digest stored with the latest checkpoint, eval_results.json) of an evaluation."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  manager = ocp.CheckpointManager(
      os.path.join(workdir, 'checkpoints'),
      options=ocp.CheckpointManagerOptions(read_only=True, create=False),
      item_names=('state', 'config'))
  try:
    digest = manager.metadata(manager.latest_step()).custom_metadata['sha256']
  finally:
    manager.close()
  with open(os.path.join(workdir, 'eval_results.json')) as f:
    return digest, json.load(f)


def final_arrays(workdir, steps):
  import byol  # pylint: disable=g-import-not-at-top
  from byol_jax.core import byol_experiment  # pylint: disable=g-import-not-at-top
  from byol_jax.runtime import checkpointing  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,unused-import
  config = byol.get_config('demo')
  with config.unlocked():
    for flag in flags(steps)[1:]:
      key, value = flag[len('--config.'):].split('=')
      node = config
      *path, last = key.split('.')
      for part in path:
        node = node[part]
      node[last] = type(node[last])(value) if not isinstance(node[last], bool) else value == 'True'
  target = checkpointing.train_state_target(byol_experiment.state_shapes(config))
  state = checkpointing.restore_state(workdir, target)
  import jax  # pylint: disable=g-import-not-at-top
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(state)]


def logged_steps(workdir):
  """Steps of the training rows of metrics.jsonl (a line still being written is skipped)."""
  steps = []
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      if 'loss"' in line and line.endswith('\n'):
        steps.append(json.loads(line)['step'])
  return steps


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--runs', type=int, default=5)
  parser.add_argument('--kills', type=int, default=2, help='SIGKILLs per trial')
  parser.add_argument('--steps', type=int, default=60)
  parser.add_argument('--workdir', default='/tmp/byol_kill_loop')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--eval', action='store_true', help='kill fine-tuning, not pretraining')
  args = parser.parse_args()
  shutil.rmtree(args.workdir, ignore_errors=True)
  rng = random.Random(args.seed)

  pretrained = None
  if args.eval:
    pretrained = os.path.join(args.workdir, 'pretrained')
    run_to_end(pretrained, 2)
  outcome = (final_arrays if pretrained is None
             else lambda workdir, steps: final_eval_outcome(workdir))
  reference = os.path.join(args.workdir, 'uninterrupted')
  start = time.time()
  run_to_end(reference, args.steps, pretrained)
  duration = time.time() - start
  expected = outcome(reference, args.steps)
  expected_steps = logged_steps(reference)

  matched = 0
  for trial in range(args.runs):
    workdir = os.path.join(args.workdir, f'trial{trial}')
    killed_at = [kill_at_a_random_step(command(workdir, args.steps, pretrained), workdir,
                                       args.steps, rng) for _ in range(args.kills)]
    resumed = resumed_from(run_to_end(workdir, args.steps, pretrained))
    if pretrained is None:
      same_state = all(np.array_equal(a, b) for a, b in
                       zip(final_arrays(workdir, args.steps), expected))
    else:
      same_state = outcome(workdir, args.steps) == expected  # Digest and eval_results.json.
    same_steps = logged_steps(workdir) == expected_steps
    matched += same_state and same_steps
    print(f'trial {trial}: SIGKILL after logged steps {killed_at}, final run resumed from '
          f'step {resumed}; '
          f'final state{" and eval_results.json" if args.eval else ""} '
          f'{"identical" if same_state else "DIFFERENT"}; metrics.jsonl steps '
          f'{"complete, no duplicates" if same_steps else "WRONG"}', flush=True)
  print(json.dumps(dict(mode='eval' if args.eval else 'pretrain', runs=args.runs,
                        matched=matched, kills_per_run=args.kills, steps=args.steps,
                        uninterrupted_secs=round(duration, 1))))


if __name__ == '__main__':
  main()
