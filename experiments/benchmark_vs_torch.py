r"""Every throughput row of issue #13: this project's BYOL step beside the PyTorch yardstick.

For each row it runs, as separate processes one after the other, `benchmark_step.py` (the JAX
step training runs: LARS or AdamW, online classifier) and the PyTorch yardstick in both memory
formats (NCHW and `--channels_last`), on the same shapes, alternating which side goes first from
round to round so that a drift in the machine's load does not favour one side. JAX is compared
with the better of the two PyTorch formats (per round, then the median over rounds).

    python experiments/benchmark_vs_torch.py                 # all rows, 1 round
    python experiments/benchmark_vs_torch.py --rows=cifar10_cpu,r18_cifar --rounds=3

The PyTorch side is `experiments/torch_byol_step_r50.py`: the shared yardstick
(../shared/bench/torch_byol_step.py, read-only) unchanged plus a ResNet-50 (`--arch r50`),
because the shared file has only ResNet-18. PyTorch must be importable by `--torch_python`
(default: this interpreter).

Each child's last stdout line is its JSON record. The last line printed here is JSON: per row
the JAX and PyTorch images/s of every round, their medians, JAX / best PyTorch, whether the
issue's 1.2x is met, JAX's peak RSS, and the load average before and after the row.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TORCH_SCRIPT = os.path.join(HERE, 'torch_byol_step_r50.py')
TARGET = 1.2  # JAX / best PyTorch, issue #13.

# name -> (benchmark_step.py args, yardstick args, warm steps timed). Same shapes on both sides.
ROWS = {
    'r18_cifar': (['--encoder=resnet18_cifar', '--image_size=32', '--batch_size=256'],
                  ['--arch', 'r18_cifar', '--size', '32', '--batch', '256'], 3),
    'r18_imagenet_32': (['--encoder=resnet18', '--image_size=32', '--batch_size=256'],
                        ['--arch', 'r18_imagenet', '--size', '32', '--batch', '256'], 8),
    'r18_imagenet_96': (['--encoder=resnet18', '--image_size=96', '--batch_size=128'],
                        ['--arch', 'r18_imagenet', '--size', '96', '--batch', '128'], 3),
    'r50_64': (['--encoder=resnet50', '--image_size=64', '--batch_size=128'],
               ['--arch', 'r50', '--size', '64', '--batch', '128'], 3),
    # configs/byol.py:cifar10_cpu: width 0.25, 1024-wide heads, AdamW, batch 64.
    'cifar10_cpu': (['--encoder=resnet18_cifar', '--image_size=32', '--batch_size=64',
                     '--width=0.25', '--hidden_size=1024', '--optimizer=adamw'],
                    ['--arch', 'r18_cifar', '--size', '32', '--batch', '64', '--width', '0.25',
                     '--hidden', '1024'], 30),
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--rows', default=','.join(ROWS), help=f'Comma-separated: {", ".join(ROWS)}.')
  p.add_argument('--rounds', type=int, default=1, help='Times each row runs on both sides.')
  p.add_argument('--steps', type=int, default=0, help='Warm steps per run (0: per-row default).')
  p.add_argument('--max_seconds', type=float, default=120.,
                 help='Each run stops after the warm step that ends this long after warm-up.')
  p.add_argument('--torch_python', default=sys.executable,
                 help='Interpreter with PyTorch for the yardstick.')
  p.add_argument('--jax_extra', default='', help='Extra benchmark_step.py flags, space-separated.')
  args = p.parse_args(argv)
  unknown = [r for r in args.rows.split(',') if r not in ROWS]
  if unknown:
    p.error(f'unknown row(s) {unknown}: choose from {", ".join(ROWS)}.')
  return args


def run_child(cmd):
  """Runs one benchmark process; returns its last JSON line (or an error record)."""
  t0 = time.time()
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith('{')]
  if proc.returncode != 0 or not lines:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return dict(error=f'exit {proc.returncode}: {" | ".join(tail)}', cmd=' '.join(cmd))
  record = json.loads(lines[-1])
  record['wall_s'] = round(time.time() - t0, 1)
  return record


def main(argv=None):
  args = parse_args(argv)
  rows = args.rows.split(',')
  results = {}
  for r, name in enumerate(rows):
    jax_args, torch_args, steps = ROWS[name]
    steps = args.steps or steps
    jax_cmd = [sys.executable, os.path.join(HERE, 'benchmark_step.py'), *jax_args,
               f'--steps={steps}', f'--max_seconds={args.max_seconds}',
               *args.jax_extra.split()]
    torch_cmd = [args.torch_python, TORCH_SCRIPT, *torch_args, '--steps', str(steps),
                 '--max_seconds', str(args.max_seconds)]
    runs = dict(jax=[], torch_nchw=[], torch_channels_last=[])
    load_before = os.getloadavg()[0]
    for k in range(args.rounds):
      order = [('jax', jax_cmd), ('torch_nchw', torch_cmd),
               ('torch_channels_last', torch_cmd + ['--channels_last'])]
      if (r + k) % 2:
        order.reverse()
      for side, cmd in order:
        record = run_child(cmd)
        runs[side].append(record)
        print(f'[{name} round {k}] {side}: '
              f'{record.get("images_per_s", record.get("error"))} img/s '
              f'(load {os.getloadavg()[0]:.1f})', flush=True)
    ips = {side: [rec.get('images_per_s') for rec in recs] for side, recs in runs.items()}
    ok = all(v is not None for vals in ips.values() for v in vals)
    row = dict(images_per_s=ips, load_1m_before=round(load_before, 2),
               load_1m_after=round(os.getloadavg()[0], 2),
               jax_peak_rss_gb=max((rec.get('peak_rss_gb', 0) for rec in runs['jax']), default=0),
               xla_flags=runs['jax'][-1].get('xla_flags'),
               errors=[rec['error'] for recs in runs.values() for rec in recs if 'error' in rec])
    if ok:
      best = [max(a, b) for a, b in zip(ips['torch_nchw'], ips['torch_channels_last'])]
      jax_med, best_med = statistics.median(ips['jax']), statistics.median(best)
      row.update(jax_images_per_s=jax_med, torch_best_images_per_s=best_med,
                 ratio=round(jax_med / best_med, 3), met=jax_med / best_med >= TARGET)
    results[name] = row
    print(f'== {name}: JAX {row.get("jax_images_per_s")} vs PyTorch best '
          f'{row.get("torch_best_images_per_s")} img/s -> {row.get("ratio")}x '
          f'(target {TARGET}x: {"met" if row.get("met") else "NOT met"})', flush=True)
  summary = dict(target_ratio=TARGET, rounds=args.rounds, cpus=os.cpu_count(),
                 date=time.strftime('%Y-%m-%d %H:%M:%S'), rows=results,
                 all_met=all(row.get('met') for row in results.values()))
  print(json.dumps(summary), flush=True)
  return summary


if __name__ == '__main__':
  main()
