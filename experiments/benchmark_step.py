r"""Step throughput of the full BYOL training step on random data (no TensorFlow).

The step timed is the one training runs: `ByolExperiment.train_step` mapped over all devices by
`parallel.map_step` (shard_map + jit, state donated), with the config's optimizer (LARS) and the
full 4096/256 projector and predictor unless flags say otherwise. Inputs are two batches of random
views in [0, 1] and random labels, assembled with `parallel.global_batch` and placed on the
devices before timing, then used in turn (input transfer is not timed, as with a prefetching
pipeline). Each timed step ends with `block_until_ready`; images/s = batch / median step time.

    python experiments/benchmark_step.py --encoder=resnet18_cifar --image_size=32 --batch_size=256
    python experiments/benchmark_step.py --encoder=resnet50 --image_size=224 --batch_size=256 \
        --compute_dtype=bfloat16

`--encoder` is resnet18/34/50/101/152/200 (ImageNet stem: 7x7/2 conv + max-pool) or tiny; a
`_cifar` suffix selects the CIFAR stem (3x3 stride 1, no max-pool). The last line printed is JSON
with images_per_s (batch / median warm step time), median CPU seconds per step (all threads;
steadier than wall time on a shared machine), the configuration, the jax version, the XLA_FLAGS
in force, whether the run restarted with huge pages (as main_loop does; see
byol_jax/runtime/xla_cpu_flags.py) and peak memory (max RSS of this process).
experiments/benchmark_vs_torch.py runs it beside the PyTorch yardstick for every issue row.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, 'configs')]

from byol_jax.runtime import xla_cpu_flags  # pylint: disable=g-import-not-at-top


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--encoder', default='resnet18_cifar',
                 help='resnet18..resnet200 or tiny; suffix _cifar for the CIFAR stem.')
  p.add_argument('--image_size', type=int, default=32)
  p.add_argument('--batch_size', type=int, default=256, help='Global batch, over all devices.')
  p.add_argument('--width', type=float, default=1.0, help='Encoder channel multiplier.')
  p.add_argument('--compute_dtype', default='float32', choices=['float32', 'bfloat16'])
  p.add_argument('--hidden_size', type=int, default=4096,
                 help='Projector and predictor hidden width.')
  p.add_argument('--projection_size', type=int, default=256)
  p.add_argument('--optimizer', default='lars', choices=['lars', 'adamw'])
  p.add_argument('--steps', type=int, default=5, help='Warm steps timed (after the warmup).')
  p.add_argument('--warmup_steps', type=int, default=1,
                 help='Untimed steps first (the first one compiles).')
  p.add_argument('--max_seconds', type=float, default=120.,
                 help='Stop after the warm step that ends this long after the warmup (at least '
                      'one warm step is timed; the PyTorch yardstick does the same).')
  p.add_argument('--no_xla_cpu_flags', action='store_true',
                 help="Do not add the project's XLA:CPU flags nor restart with huge pages "
                      "(byol_jax/runtime/xla_cpu_flags.py).")
  p.add_argument('--json_out', default='', help='Also write the JSON record to this file.')
  args = p.parse_args(argv)
  if args.warmup_steps < 1 or args.steps < 1:
    p.error('--warmup_steps and --steps must be at least 1.')
  return args


def make_config(args):
  import byol  # configs/byol.py  pylint: disable=g-import-not-at-top
  config = byol.get_config('imagenet')
  encoder, cifar = args.encoder, False
  if encoder.endswith('_cifar'):
    encoder, cifar = encoder[:-len('_cifar')], True
  with config.unlocked():
    config.dataset = 'random'
    config.image_size = args.image_size
    config.batch_size = args.batch_size
    config.max_steps = 10_000
    config.model.encoder = encoder
    config.model.cifar_stem = cifar
    config.model.width = args.width
    config.model.compute_dtype = args.compute_dtype
    config.model.projector_hidden_size = args.hidden_size
    config.model.predictor_hidden_size = args.hidden_size
    config.model.projection_size = args.projection_size
    config.optimizer.name = args.optimizer
    config.optimizer.warmup_steps = 10
  return config


def peak_rss_bytes() -> int:
  # ru_maxrss is in KiB on Linux, bytes on macOS.
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(rss if sys.platform == 'darwin' else rss * 1024)


def main(argv=None):
  args = parse_args(argv)
  if args.no_xla_cpu_flags:
    os.environ[xla_cpu_flags.OPT_OUT_ENV] = '0'
  flags_decision = xla_cpu_flags.configure()  # Before JAX starts its backends.

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from byol_jax.core import byol_experiment, networks  # pylint: disable=g-import-not-at-top
  from byol_jax.runtime import parallel  # pylint: disable=g-import-not-at-top

  config = make_config(args)
  networks.compute_dtype(config.model)  # One-line error for a bad dtype.
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  experiment = byol_experiment.ByolExperiment(config, train_examples=50_000)

  t0 = time.perf_counter()
  init = jax.jit(experiment.init, static_argnums=1)
  state = parallel.replicate(init(jax.random.PRNGKey(0), config.image_size), mesh)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0
  params = networks.param_count(state.online_params)
  step_fn = parallel.map_step(experiment.train_step, mesh)

  # Two different random batches, placed on the devices before timing (as a prefetching input
  # pipeline would), used in turn: the time measured is the step's alone.
  rng = np.random.default_rng(0)
  shape = (config.batch_size, config.image_size, config.image_size, 3)
  batches = [parallel.global_batch(dict(
      view1=rng.random(shape, np.float32), view2=rng.random(shape, np.float32),
      labels=rng.integers(0, config.num_classes, (config.batch_size,)).astype(np.int32)), mesh)
             for _ in range(2)]

  times, cpu_times, first_s, start = [], [], None, None
  for i in range(args.warmup_steps + args.steps):
    t0, c0 = time.perf_counter(), time.process_time()
    state, metrics = step_fn(state, batches[i % 2])
    jax.block_until_ready((state, metrics))
    elapsed = time.perf_counter() - t0
    if i == 0:
      first_s = elapsed
    if i + 1 == args.warmup_steps:
      start = time.perf_counter()
    if i >= args.warmup_steps:
      times.append(elapsed)
      cpu_times.append(time.process_time() - c0)
      if time.perf_counter() - start > args.max_seconds:
        break
  loss = float(np.asarray(metrics['loss']))
  median = statistics.median(times)
  record = dict(
      impl='jax', images_per_s=round(config.batch_size / median, 2),
      encoder=args.encoder, image_size=args.image_size, batch_size=args.batch_size,
      width=args.width, compute_dtype=args.compute_dtype, hidden_size=args.hidden_size,
      optimizer=args.optimizer, devices=mesh.devices.size,
      platform=jax.devices()[0].platform, device_kind=jax.devices()[0].device_kind,
      jax=jax.__version__, jaxlib=__import__('jaxlib').__version__,
      xla_flags=os.environ.get('XLA_FLAGS', ''), xla_cpu_flags=flags_decision,
      huge_pages=xla_cpu_flags.huge_pages_decision(os.environ),
      steps=len(times), median_step_s=round(median, 4),
      min_step_s=round(min(times), 4), max_step_s=round(max(times), 4),
      # CPU seconds of all this process's threads per step: less sensitive than wall time to
      # other programs on the machine (both cores busy = 2 CPU-s per wall second).
      median_step_cpu_s=round(statistics.median(cpu_times), 4),
      first_step_s=round(first_s, 2), init_s=round(init_s, 2), params=params,
      loss=round(loss, 4), peak_rss_bytes=peak_rss_bytes(),
      peak_rss_gb=round(peak_rss_bytes() / 1e9, 3),
      tensorflow_imported='tensorflow' in sys.modules,
      loadavg_1m=round(os.getloadavg()[0], 2), cpus=os.cpu_count(),
      host=platform.node(), date=time.strftime('%Y-%m-%d %H:%M:%S'))
  if record['platform'] != 'cpu':
    stats = jax.devices()[0].memory_stats() or {}
    if 'peak_bytes_in_use' in stats:
      record['device_peak_bytes'] = int(stats['peak_bytes_in_use'])
  line = json.dumps(record)
  if args.json_out:
    with open(args.json_out, 'w') as f:
      f.write(line + '\n')
  print(line, flush=True)
  return record


if __name__ == '__main__':
  if '--no_xla_cpu_flags' not in sys.argv:
    xla_cpu_flags.restart_with_huge_pages()  # Re-executes this script once (see there).
  main()
