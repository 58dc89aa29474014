"""networks.Conv2D: its im2col path is the SAME convolution, outputs and both gradients.

The im2col path exists only for speed on XLA:CPU (tiny feature maps, see experiments/RESULTS.md);
here it is compared with `lax.conv_general_dilated` on every case where Conv2D takes it, and
the dispatch itself is checked, so that a later change cannot silently alter the mathematics.
"""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from byol_jax.core import networks

# (map height, map width, kernel, stride, cin, cout): shapes the ResNets meet on small images.
CASES = [
    (1, 1, 3, 1, 8, 6),  # ResNet-18 ImageNet stem at 32 px, stage 3.
    (2, 2, 3, 1, 8, 6),  # ... stage 2; ResNet-50 at 64 px, stage 3.
    (4, 4, 3, 2, 8, 6),  # Stride-2 conv producing a 2x2 map (its input gradient is the slow one).
    (3, 3, 3, 2, 5, 4),  # Odd size, stride 2 -> 2x2.
    (2, 3, 7, 2, 3, 4),  # Non-square, 7x7 stem window on a tiny image.
]


def _reference(x, w, stride):
  return jax.lax.conv_general_dilated(x, w, (stride, stride), 'SAME',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                      precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize('h,wd,k,stride,cin,cout', CASES)
def test_im2col_matches_convolution_and_gradients(h, wd, k, stride, cin, cout):
  rng = np.random.default_rng(h * 100 + wd * 10 + k + stride)  # numpy: no RNG compilations.
  x = rng.standard_normal((3, h, wd, cin), np.float32)
  w = rng.standard_normal((k, k, cin, cout), np.float32)
  out_shape = jax.eval_shape(lambda x, w: _reference(x, w, stride), x, w).shape
  g = rng.standard_normal(out_shape, np.float32)  # A fixed cotangent for the VJPs.

  @jax.jit
  def both(x, w, g):  # One compilation for both paths: value, input and weight gradients.
    results = []
    for conv in (networks._conv_im2col, _reference):
      y, vjp = jax.vjp(lambda x, w, conv=conv: conv(x, w, stride), x, w)
      results.append((y,) + vjp(g))
    return results

  with jax.default_matmul_precision('highest'):
    (y, dx, dw), (y_ref, dx_ref, dw_ref) = both(x, w, g)

  assert y.shape == y_ref.shape
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-5)


def _conv_module(channels, kernel, stride, x):
  f = hk.transform(lambda x: networks.Conv2D(channels, kernel, stride, name='conv')(x))
  params = jax.jit(f.init)(jax.random.PRNGKey(0), x)
  return f, params


@pytest.mark.parametrize('h,k,stride,im2col', [
    (1, 3, 1, True), (2, 3, 1, True), (4, 3, 2, True), (2, 7, 2, True),
    (3, 3, 1, False), (4, 3, 1, False), (8, 3, 2, False), (32, 7, 2, False), (1, 1, 1, False),
])
def test_conv2d_dispatch_and_parameters(h, k, stride, im2col):
  """Conv2D takes im2col exactly where intended; parameters keep Haiku's name and HWIO shape."""
  x = jax.ShapeDtypeStruct((2, h, h, 4), jnp.float32)
  f = hk.transform(lambda x: networks.Conv2D(5, k, stride, name='conv')(x))
  params = jax.eval_shape(f.init, jax.random.PRNGKey(0), x)
  assert jax.tree_util.tree_map(lambda p: p.shape, params) == {'conv': {'w': (k, k, 4, 5)}}
  assert networks._use_im2col(h, h, k, stride) == im2col
  hlo = jax.jit(lambda p, x: f.apply(p, None, x)).lower(params, x).as_text()
  assert ('convolution' in hlo) != im2col


def test_conv2d_bfloat16_casts_kernel_to_activation_dtype():
  rng = np.random.default_rng(2)
  f, params = _conv_module(5, 3, 1, np.zeros((2, 2, 2, 4), np.float32))
  assert params['conv']['w'].dtype == jnp.float32
  for shape in ((2, 2, 2, 4), (2, 8, 8, 4)):  # im2col path and convolution path.
    x = rng.standard_normal(shape, np.float32)
    y = jax.jit(f.apply)(params, None, x.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(y.astype(jnp.float32), _reference(x, params['conv']['w'], 1),
                               rtol=5e-2, atol=1e-1)
