r"""One 3x3 stride-1 convolution's forward, weight gradient and input gradient: XLA:CPU beside
PyTorch (channels_last, the faster format on CPU), per feature-map size and channel count.

Where the BYOL step loses to PyTorch on CPU (issue #13): at the `cifar10_cpu` shapes the
encoder's forward is close to PyTorch's and its backward is not, and the weight gradient of
the narrow, large-map layers is the worst of the three. Default shapes: the four stages of
ResNet-18 x0.25 (CIFAR stem) at batch 64.

    python experiments/benchmark_conv_grads.py
    python experiments/benchmark_conv_grads.py --shapes=32x64,16x128 --batch=256
    python experiments/benchmark_conv_grads.py --weight_grad_variants

`--weight_grad_variants` also times the weight gradient written with other XLA operations
(each checked against XLA's own to 1e-5 of its largest entry), to show whether any
formulation reachable from JAX beats XLA:CPU's Eigen kernel: nine shifted slices each
contracted with the output gradient (`shifted_dots`), the same nine stacked into one patch
matrix and one product (`im2col`), and that product alone on a patch matrix built beforehand
(`gemm_only`: the matrix-multiply ceiling, not a usable method).

Each time is the median of --reps calls after one warm-up call (JAX: jitted, block_until_ready;
PyTorch: torch.no_grad, aten.convolution_backward with one output mask). The last line is JSON
with every time in ms and JAX / PyTorch per op (> 1: JAX slower). PyTorch is optional.
"""

import argparse
import importlib.util
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from byol_jax.runtime import xla_cpu_flags  # pylint: disable=g-import-not-at-top (no JAX)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--shapes', default='32x16,16x32,8x64,4x128',
                 help='Comma-separated SIZExCHANNELS: square maps, channels in = out.')
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--reps', type=int, default=21)
  p.add_argument('--weight_grad_variants', action='store_true',
                 help='Also time the weight gradient as shifted dots, im2col and GEMM alone.')
  return p.parse_args(argv)


def median_ms(fn, reps):
  fn()
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return round(1e3 * sorted(times)[len(times) // 2], 3)


def weight_grad_variants(x, dy):
  """{name: fn(x, dy) -> [3, 3, C, C]}: the 3x3 SAME weight gradient without a convolution."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  size = x.shape[1]

  def shifted(x):
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return [padded[:, i:i + size, j:j + size] for i in range(3) for j in range(3)]

  def shifted_dots(x, dy):
    grads = [jnp.einsum('nhwc,nhwo->co', s, dy) for s in shifted(x)]
    return jnp.stack(grads).reshape(3, 3, x.shape[-1], dy.shape[-1])

  def im2col(x, dy):
    patches = jnp.concatenate(shifted(x), axis=-1)  # [N, H, W, 9C]
    return jnp.einsum('nhwk,nhwo->ko', patches, dy).reshape(3, 3, x.shape[-1], dy.shape[-1])

  return dict(shifted_dots=shifted_dots, im2col=im2col)


def jax_times(size, channels, batch, reps, variants=False):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = jax.numpy.asarray(rng.random((batch, size, size, channels), np.float32))
  w = jax.numpy.asarray(rng.random((3, 3, channels, channels), np.float32))
  dy = jax.numpy.ones_like(x)

  def conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  ops = dict(forward=jax.jit(conv),
             weight_grad=jax.jit(lambda x, w, dy: jax.vjp(conv, x, w)[1](dy)[1]),
             input_grad=jax.jit(lambda x, w, dy: jax.vjp(conv, x, w)[1](dy)[0]))
  args = dict(forward=(x, w), weight_grad=(x, w, dy), input_grad=(x, w, dy))
  times = {name: median_ms(lambda f=f, a=args[name]: jax.block_until_ready(f(*a)), reps)
           for name, f in ops.items()}
  if variants:
    check_dy = jax.numpy.asarray(rng.standard_normal(x.shape, np.float32))
    expected = np.asarray(ops['weight_grad'](x, w, check_dy))
    scale = float(np.abs(expected).max())
    for name, fn in weight_grad_variants(x, dy).items():
      fn = jax.jit(fn)
      # float32 sums of N*H*W terms in another order: far inside 1e-5 of the largest entry.
      np.testing.assert_allclose(np.asarray(fn(x, check_dy)), expected, rtol=0,
                                 atol=1e-5 * scale)
      times[f'weight_grad_{name}'] = median_ms(lambda fn=fn: jax.block_until_ready(fn(x, dy)),
                                               reps)
    patches = jax.numpy.asarray(rng.random((9 * channels, batch * size * size), np.float32))
    rows = dy.reshape(-1, channels)
    gemm = jax.jit(lambda p, r: p @ r)
    times['weight_grad_gemm_only'] = median_ms(
        lambda: jax.block_until_ready(gemm(patches, rows)), reps)
  return times


def torch_times(size, channels, batch, reps):
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  fmt = torch.channels_last
  x = torch.rand(batch, channels, size, size).contiguous(memory_format=fmt)
  w = torch.rand(channels, channels, 3, 3).contiguous(memory_format=fmt)
  dy = torch.ones_like(F.conv2d(x, w, padding=1))

  def backward(mask):
    return lambda: torch.ops.aten.convolution_backward(
        dy, x, w, None, (1, 1), (1, 1), (1, 1), False, (0, 0), 1, mask)

  with torch.no_grad():
    return dict(forward=median_ms(lambda: F.conv2d(x, w, padding=1), reps),
                weight_grad=median_ms(backward((False, True, False)), reps),
                input_grad=median_ms(backward((True, False, False)), reps))


def main(argv=None):
  args = parse_args(argv)
  decision = xla_cpu_flags.configure()  # Eigen convolutions, as the training entry points.
  have_torch = importlib.util.find_spec('torch') is not None  # PyTorch is optional.
  rows = []
  for shape in args.shapes.split(','):
    size, channels = (int(v) for v in shape.split('x'))
    row = dict(size=size, channels=channels, batch=args.batch,
               jax_ms=jax_times(size, channels, args.batch, args.reps,
                                args.weight_grad_variants))
    if have_torch:
      row['torch_channels_last_ms'] = torch_times(size, channels, args.batch, args.reps)
      torch_ms = row['torch_channels_last_ms']
      # The weight-gradient variants are compared with PyTorch's weight gradient.
      row['jax_over_torch'] = {k: round(v / torch_ms.get(k, torch_ms['weight_grad']), 2)
                               for k, v in row['jax_ms'].items()}
    print(json.dumps(row), flush=True)
    rows.append(row)
  print(json.dumps(dict(rows=rows, xla_cpu_flags=decision,
                        xla_flags=os.environ.get('XLA_FLAGS', ''),
                        huge_pages=xla_cpu_flags.huge_pages_decision(os.environ),
                        cpus=os.cpu_count(), loadavg_1m=round(os.getloadavg()[0], 2),
                        date=time.strftime('%Y-%m-%d %H:%M:%S'))))


if __name__ == '__main__':
  xla_cpu_flags.restart_with_huge_pages()  # Re-executes this program once (see there).
  main()
