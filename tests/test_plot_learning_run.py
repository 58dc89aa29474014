"""experiments/plot_learning_run.py on a small synthetic workdir (resumed run, final kNN)."""

import json
import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(__file__), '..', 'experiments', 'plot_learning_run.py')


def test_plots_a_resumed_run_with_its_final_knn(tmp_path):
  records = [dict(step=s, loss=3.0, repr_loss=2.0 - s / 100, collapse=0.04) for s in (10, 20)]
  records.append(dict(step=20, knn_top1=0.25, knn_top5=0.7))  # kNN monitor at step 20.
  records.append(dict(step=20, repr_loss=9.0, collapse=0.05))  # Resumed: step 20 logged again.
  records.append(dict(step=30, repr_loss=1.5, collapse=0.04))
  with open(tmp_path / 'metrics.jsonl', 'w') as f:
    f.write(''.join(json.dumps(r) + '\n' for r in records))
  result = lambda top1: dict(top1=top1, top5=0.9, k=200, temperature=0.1, count=50)
  json.dump(dict(step=30, byol=result(0.31), random_init=result(0.23), raw_pixels=result(0.40)),
            open(tmp_path / 'knn_results.json', 'w'))
  out = tmp_path / 'plots' / 'run.png'
  done = subprocess.run([sys.executable, SCRIPT, f'--workdir={tmp_path}', f'--out={out}'],
                        capture_output=True, text=True, check=True)
  summary = json.loads(done.stdout.strip().splitlines()[-1])
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert summary['steps'] == 3  # Steps 10, 20, 30: the repeated step 20 merged.
  assert summary['knn_points'] == [[20, 25.0], [30, 31.0]]  # Monitor, then the final kNN.
  assert summary['final'] == dict(byol=0.31, random_init=0.23, raw_pixels=0.40)
