r"""Throughput of the full two-view pretraining input pipeline (`datasets.pretrain_batches`).

Times what the training loop consumes: host-local numpy batches with two augmented views of
every image (crop, flip, colour jitter, grayscale, blur, solarize), on one process. The dataset
is loaded (and, for small folders, decoded into memory) before timing; the first batches
(graph tracing, tf.data warm-up) are not timed.

    python experiments/benchmark_input.py --dataset=folder:../shared/data/cifar10 \
        --image_size=32 --batch_size=256

The last line printed is JSON with images_per_s (source images per wall-clock second; each
gives two views), views_per_s, images_per_cpu_s (per CPU-second used by this process, which
says what the pipeline costs when other programs share the cores), load times, the machine's
CPU count and load average.
"""

import argparse
import json
import os
import resource
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, 'configs')]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--dataset', default='digits',
                 help='digits, a TFDS name, or folder:/root (root/train/<class>/<image>).')
  p.add_argument('--preset', default='cifar10', help='configs/byol.py preset for the rest.')
  p.add_argument('--image_size', type=int, default=32)
  p.add_argument('--batch_size', type=int, default=256, help='Images per batch (one process).')
  p.add_argument('--validation_examples', type=int, default=-1,
                 help='Held-out examples; -1: the preset value, capped at 10% of the data.')
  p.add_argument('--steps', type=int, default=40, help='Batches timed (after the warmup).')
  p.add_argument('--warmup_steps', type=int, default=5, help='Untimed batches first.')
  p.add_argument('--max_seconds', type=float, default=120.,
                 help='Stop timing after this long (at least one batch is timed).')
  p.add_argument('--json_out', default='', help='Also write the JSON record to this file.')
  return p.parse_args(argv)


def make_config(args):
  import byol  # configs/byol.py  pylint: disable=g-import-not-at-top
  config = byol.get_config(args.preset)
  config.dataset = args.dataset
  config.image_size = args.image_size
  config.batch_size = args.batch_size
  if args.validation_examples >= 0:
    config.data.validation_examples = args.validation_examples
  return config


def main(argv=None):
  args = parse_args(argv)
  from byol_jax.data import datasets  # pylint: disable=g-import-not-at-top
  config = make_config(args)

  start = time.perf_counter()
  try:
    train_examples = datasets.num_examples(config, 'train')
  except ValueError as error:
    if args.validation_examples >= 0 or 'validation_examples' not in str(error):
      raise
    config.data.validation_examples = 0  # The preset's hold-out is larger than this dataset.
    train_examples = datasets.num_examples(config, 'train')
  load_s = time.perf_counter() - start
  print(f'{config.dataset}: {train_examples} training images loaded in {load_s:.1f} s',
        flush=True)

  start = time.perf_counter()
  batches = datasets.pretrain_batches(config, process_index=0, process_count=1)
  for _ in range(max(args.warmup_steps, 1)):
    batch = next(batches)
  warmup_s = time.perf_counter() - start
  assert batch['view1'].shape == (args.batch_size, args.image_size, args.image_size, 3)

  timed = 0
  start, cpu_start = time.perf_counter(), time.process_time()
  while timed < args.steps:
    next(batches)
    timed += 1
    if time.perf_counter() - start > args.max_seconds:
      break
  wall_s = time.perf_counter() - start
  cpu_s = time.process_time() - cpu_start
  images = timed * args.batch_size
  record = dict(
      benchmark='input_pipeline', dataset=config.dataset, image_size=args.image_size,
      batch_size=args.batch_size, batches_timed=timed,
      images_per_s=round(images / wall_s, 1), views_per_s=round(2 * images / wall_s, 1),
      images_per_cpu_s=round(images / cpu_s, 1), train_examples=train_examples,
      load_s=round(load_s, 2), warmup_s=round(warmup_s, 2), cpu_count=os.cpu_count(),
      load_average_1min=round(os.getloadavg()[0], 2),
      max_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
  print(f'{record["images_per_s"]:.0f} images/s ({record["views_per_s"]:.0f} views/s) over '
        f'{timed} batches of {args.batch_size}; {record["images_per_cpu_s"]:.0f} images per '
        f'CPU-second; load average {record["load_average_1min"]}', flush=True)
  if args.json_out:
    with open(args.json_out, 'w') as f:
      json.dump(record, f)
  print(json.dumps(record), flush=True)


if __name__ == '__main__':
  main()
