"""A bad `--config.KEY` is one line naming the nearest valid key (runtime/config_errors.py)."""

import os
import subprocess
import sys

import pytest

from byol_jax.runtime import config_errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BYOL = os.path.join(REPO, 'configs', 'byol.py')
EVAL = os.path.join(REPO, 'configs', 'eval.py')


@pytest.mark.parametrize('argv, expected', [
    ([f'--config={BYOL}:demo', '--config.optimiser.base_lr=1'],
     '--config.optimiser.base_lr is not a config key; did you mean --config.optimizer.base_lr?'),
    ([f'--config={BYOL}:demo', '--config.data.validaton_examples', '3'],
     'did you mean --config.data.validation_examples?'),
    ([f'--config={EVAL}:knn', '--noconfig.data.train_on_valdation'],
     'did you mean --config.data.train_on_validation?'),
    ([f'--config={EVAL}', '--config.checkpoint=/x', '--config.zzzqqq=1'],
     '--config.zzzqqq is not a config key'),
])
def test_bad_override_names_the_nearest_key(argv, expected):
  message = config_errors.bad_override(['prog'] + argv)
  assert expected in message and '\n' not in message
  if 'zzzqqq' in expected:
    assert 'did you mean' not in message


def test_good_overrides_pass():
  argv = ['prog', f'--config={EVAL}:knn', '--config.checkpoint=/x', '--config.knn.k=5',
          '--config.dataset=digits', '--workdir=/tmp/x']
  assert config_errors.bad_override(argv) is None


@pytest.mark.slow
def test_main_loop_says_it_in_one_line_with_exit_code_2(tmp_path):
  process = subprocess.run(
      [sys.executable, '-m', 'byol_jax.main_loop', '--config=configs/byol.py:demo',
       '--config.optimiser.base_lr=1', f'--workdir={tmp_path}'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert process.returncode == config_errors.USAGE_ERROR == 2
  lines = [line for line in process.stderr.splitlines() if line.startswith('error:')]
  assert lines == ['error: --config.optimiser.base_lr is not a config key; did you mean '
                   '--config.optimizer.base_lr?'], process.stderr
  assert 'Traceback' not in process.stderr
