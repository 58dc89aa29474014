r"""kill -9 a pretraining run at random moments, resume it, and compare with an uninterrupted run.

    python experiments/kill_resume_loop.py --runs=5 [--steps=60] [--workdir=/tmp/kill_loop]

Each trial runs `python -m byol_jax.main_loop` on the digits demo data (a tiny network, so a
trial takes about a minute on 2 CPU cores), sends SIGKILL after a random delay, repeats that
`--kills` times, then lets the same command finish. The trial matches when its final checkpoint
equals the uninterrupted run's bit for bit and its metrics.jsonl has every logged step exactly
once. Prints one line per trial and a final JSON line: {"runs": N, "matched": M, ...}.
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


def flags(steps):
  return ['--config=configs/byol.py:demo', '--config.model.encoder=tiny',
          '--config.image_size=8', '--config.batch_size=16', f'--config.max_steps={steps}',
          '--config.log_every_steps=1', '--config.checkpoint_every_steps=5',
          '--config.final_knn.enabled=False', '--config.final_eval=False',
          '--config.model.projector_hidden_size=32', '--config.model.predictor_hidden_size=32',
          '--config.model.projection_size=16']


def command(workdir, steps):
  return [sys.executable, '-m', 'byol_jax.main_loop', *flags(steps), f'--workdir={workdir}']


def run_to_end(workdir, steps):
  result = subprocess.run(command(workdir, steps), cwd=REPO, capture_output=True, text=True,
                          check=False)
  if result.returncode != 0:
    raise RuntimeError(f'run in {workdir} failed:\n{result.stderr[-3000:]}')


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
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line)['step'] for line in f if '"loss"' in line]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--runs', type=int, default=5)
  parser.add_argument('--kills', type=int, default=2, help='SIGKILLs per trial')
  parser.add_argument('--steps', type=int, default=60)
  parser.add_argument('--workdir', default='/tmp/byol_kill_loop')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  shutil.rmtree(args.workdir, ignore_errors=True)
  rng = random.Random(args.seed)

  reference = os.path.join(args.workdir, 'uninterrupted')
  start = time.time()
  run_to_end(reference, args.steps)
  duration = time.time() - start
  expected_arrays = final_arrays(reference, args.steps)
  expected_steps = logged_steps(reference)

  matched = 0
  for trial in range(args.runs):
    workdir = os.path.join(args.workdir, f'trial{trial}')
    delays = []
    for _ in range(args.kills):
      delay = rng.uniform(0.2, 1.0) * duration
      process = subprocess.Popen(command(workdir, args.steps), cwd=REPO,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
      try:
        process.wait(timeout=delay)
      except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
      delays.append(round(delay, 1))
    run_to_end(workdir, args.steps)
    same_state = all(np.array_equal(a, b) for a, b in
                     zip(final_arrays(workdir, args.steps), expected_arrays))
    same_steps = logged_steps(workdir) == expected_steps
    matched += same_state and same_steps
    print(f'trial {trial}: SIGKILL after {delays} s; final state '
          f'{"identical" if same_state else "DIFFERENT"}; metrics.jsonl steps '
          f'{"complete, no duplicates" if same_steps else "WRONG"}', flush=True)
  print(json.dumps(dict(runs=args.runs, matched=matched, kills_per_run=args.kills,
                        steps=args.steps, uninterrupted_secs=round(duration, 1))))


if __name__ == '__main__':
  main()
