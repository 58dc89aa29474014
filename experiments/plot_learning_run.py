r"""Plots a pretraining run: loss, collapse metric and kNN accuracy over training, as one PNG.

    python experiments/plot_learning_run.py --workdir=/tmp/byol_cifar_cpu \
        --out=docs/images/cifar10_cpu_learning.png

Reads `metrics.jsonl` (written by byol_jax.main_loop; a resumed run appends, and the last record
of a step wins) and `knn_results.json` (the final kNN next to its baselines) from the workdir.
The kNN panel draws the monitor's points and the final BYOL point, with the random-init encoder
and raw pixels as horizontal lines. Prints a final JSON line with what was plotted.
"""

import argparse
import json
import os

import matplotlib

matplotlib.use('Agg')  # Files only; no display on servers.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top


def read_metrics(workdir: str) -> dict:
  """{step: merged record}; later records of a step update earlier ones."""
  by_step = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      if line.strip():
        record = json.loads(line)
        by_step.setdefault(record['step'], {}).update(record)
  return dict(sorted(by_step.items()))


def series(records: dict, key: str):
  points = [(step, r[key]) for step, r in records.items() if key in r]
  return [p[0] for p in points], [p[1] for p in points]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--out', required=True, help='PNG path.')
  parser.add_argument('--title', default='')
  args = parser.parse_args()

  records = read_metrics(args.workdir)
  knn_path = os.path.join(args.workdir, 'knn_results.json')
  final = json.load(open(knn_path)) if os.path.exists(knn_path) else None

  fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), dpi=80)
  steps, loss = series(records, 'repr_loss')
  axes[0].plot(steps, loss, color='tab:blue')
  axes[0].set(title='BYOL loss (2 - 2cos, two directions)', xlabel='step', ylabel='loss')
  steps, collapse = series(records, 'collapse')
  axes[1].plot(steps, collapse, color='tab:purple')
  axes[1].axhline(1 / 256 ** 0.5, color='gray', linestyle=':', label='1/sqrt(256): no collapse')
  axes[1].set(title='collapse: std of normalised projections', xlabel='step', ylim=(0, None))
  axes[1].legend(loc='lower right', fontsize=8)

  knn_steps, knn_top1 = series(records, 'knn_top1')
  knn_top1 = [100 * v for v in knn_top1]
  if final is not None:
    knn_steps.append(final['step'])
    knn_top1.append(100 * final['byol']['top1'])
    for name, color in (('random_init', 'tab:orange'), ('raw_pixels', 'tab:green')):
      axes[2].axhline(100 * final[name]['top1'], color=color, linestyle='--',
                      label=f'{name.replace("_", " ")} {100 * final[name]["top1"]:.1f}%')
  axes[2].plot(knn_steps, knn_top1, 'o-', color='tab:red', label='BYOL online encoder')
  k = final['byol']['k'] if final is not None else ''
  axes[2].set(title=f'kNN top-1 (k={k}) on held-out images', xlabel='step', ylabel='%')
  axes[2].legend(loc='lower right', fontsize=8)
  if args.title:
    fig.suptitle(args.title, fontsize=10)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  fig.savefig(args.out)
  print(json.dumps(dict(out=args.out, bytes=os.path.getsize(args.out), steps=len(records),
                        knn_points=list(zip(knn_steps, knn_top1)),
                        final=None if final is None else {
                            name: final[name]['top1'] for name in
                            ('byol', 'random_init', 'raw_pixels')})))


if __name__ == '__main__':
  main()
