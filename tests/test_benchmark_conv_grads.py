"""experiments/benchmark_conv_grads.py runs end to end on a tiny shape and prints its JSON."""

import json
import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(__file__), '..', 'experiments', 'benchmark_conv_grads.py')


def test_prints_every_op_for_every_shape():
  done = subprocess.run([sys.executable, SCRIPT, '--shapes=4x2,2x3', '--batch=2', '--reps=1'],
                        capture_output=True, text=True, check=True, timeout=300)
  summary = json.loads(done.stdout.strip().splitlines()[-1])
  assert [(r['size'], r['channels']) for r in summary['rows']] == [(4, 2), (2, 3)]
  for row in summary['rows']:
    assert set(row['jax_ms']) == {'forward', 'weight_grad', 'input_grad'}
    assert all(ms > 0 for ms in row['jax_ms'].values())
    if 'torch_channels_last_ms' in row:  # PyTorch is optional.
      assert set(row['jax_over_torch']) == set(row['jax_ms'])


def test_weight_grad_variants_agree_with_xla_and_are_timed():
  done = subprocess.run([sys.executable, SCRIPT, '--shapes=5x3', '--batch=2', '--reps=1',
                         '--weight_grad_variants'],
                        capture_output=True, text=True, check=True, timeout=300)
  (row,) = json.loads(done.stdout.strip().splitlines()[-1])['rows']
  assert {'weight_grad_shifted_dots', 'weight_grad_im2col',
          'weight_grad_gemm_only'} <= set(row['jax_ms'])
