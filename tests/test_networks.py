"""Encoders and heads: the reference's parameter counts and names, BN scale init, shapes, stems."""

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from byol_jax.core import networks


def _model(encoder, width=1.0, v2=False, cifar_stem=False, zero_init_last_bn=True):
  return ml_collections.ConfigDict(dict(encoder=encoder, width=width, resnet_v2=v2,
                                        cifar_stem=cifar_stem, bn_decay=0.9, bn_eps=1e-5,
                                        zero_init_last_bn=zero_init_last_bn,
                                        compute_dtype='float32'))


def _init_shapes(model, image_size=32):
  f = hk.transform_with_state(lambda x: networks.make_encoder(model)(x, True))
  return jax.eval_shape(f.init, jax.random.PRNGKey(0),
                        jnp.zeros((2, image_size, image_size, 3)))


# The reference's encoders. Bottleneck ResNets equal torchvision's totals minus the classifier;
# the reference's ResNet-18/34 add a projection shortcut (1x1 conv + BN: 64*64 + 2*64 = 4,224
# parameters) to the first block of stage 0, which torchvision's do not have.
@pytest.mark.parametrize('encoder,width,count,features', [
    ('resnet18', 1, 11_176_512 + 4_224, 512),
    ('resnet34', 1, 21_284_672 + 4_224, 512),
    ('tiny_resnet', 1, 19_072, 8),
    ('resnet50', 1, 23_508_032, 2048),
    ('resnet101', 1, 42_500_160, 2048),
    ('resnet50', 2, 93_907_072, 4096),
])
def test_parameter_counts_match_the_standard_resnets(encoder, width, count, features):
  model = _model(encoder, width)
  params, _ = _init_shapes(model)
  assert networks.param_count(params) == count
  assert networks.encoder_feature_size(model) == features


def _scale_inits(model):
  """{module: initial BN scale value}. Initialisers are recorded during shape inference and
  evaluated afterwards (no compile)."""
  recorded = {}

  def creator(next_creator, shape, dtype, init, context):
    if context.full_name.endswith('/scale'):
      recorded[context.module_name] = (shape, dtype, init)
    return next_creator(shape, dtype, init)

  def fn(x):
    with hk.custom_creator(creator):
      return networks.make_encoder(model)(x, True)
  jax.eval_shape(hk.transform_with_state(fn).init, jax.random.PRNGKey(0),
                 jnp.zeros((2, 16, 16, 3)))
  inits = {}
  for name, (shape, dtype, init) in recorded.items():
    values = np.unique(np.asarray(init(shape, dtype)))
    assert len(values) == 1
    inits[name] = float(values[0])
  return inits


def test_last_bottleneck_batchnorm_scale_starts_at_zero_as_the_reference_code():
  inits = _scale_inits(_model('resnet50', 0.125))
  assert len(inits) == 53  # Stem + 3 per block * 16 blocks + 4 projection shortcuts.
  zero = sorted(name for name, value in inits.items() if value == 0.)
  assert len(zero) == 16 and all(name.endswith('/batchnorm_2') for name in zero)
  assert all(value == 1. for name, value in inits.items() if name not in zero)
  # The paper's numbers used 1 everywhere (reference README): the named option.
  assert set(_scale_inits(_model('resnet50', 0.125, zero_init_last_bn=False)).values()) == {1.}
  # Basic blocks have no zero-initialised BN in Haiku's BlockV1.
  assert set(_scale_inits(_model('resnet18', 0.125)).values()) == {1.}


@pytest.mark.parametrize('cifar_stem,image_size,expected_first_map', [(True, 16, 16),
                                                                      (False, 32, 8)])
def test_stems(cifar_stem, image_size, expected_first_map):
  model = _model('resnet18', 0.125, cifar_stem=cifar_stem)

  def fn(x):
    return networks.make_encoder(model)(x, True)
  f = hk.transform_with_state(fn)
  x = jnp.zeros((2, image_size, image_size, 3))
  params, state = jax.eval_shape(f.init, jax.random.PRNGKey(0), x)
  assert params['encoder/initial_conv']['w'].shape[:2] == ((3, 3) if cifar_stem else (7, 7))
  # Spatial size seen by the first block: stride-1 stem keeps it, 7x7/2 + max-pool quarter it.
  shapes = {}

  def record(next_f, args, kwargs, context):
    out = next_f(*args, **kwargs)
    if context.method_name == '__call__' and context.module.module_name.endswith(
        'block_group_0/block_0'):
      shapes['block'] = args[0].shape
    return out

  def intercepted(x):
    with hk.intercept_methods(record):
      return fn(x)
  jax.eval_shape(hk.transform_with_state(intercepted).apply, params, state, None, x)
  assert shapes['block'][1] == expected_first_map


@pytest.mark.slow
def test_resnet_v2_and_widths_build():
  # ResNet-50 v2 by shape inference only (compiling it would dominate the suite's time).
  params, _ = _init_shapes(_model('resnet50', 1, v2=True))
  assert networks.param_count(params) == 23_500_352  # v1 minus the stem BN, plus a final BN.
  for model in (_model('resnet18', 0.125, v2=True), _model('tiny')):
    f = hk.transform_with_state(lambda x, m=model: networks.make_encoder(m)(x, True))
    params, state = jax.jit(f.init)(jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 3)))
    out, _ = jax.jit(f.apply)(params, state, None, jnp.ones((2, 8, 8, 3)))
    assert out.ndim == 2 and np.all(np.isfinite(out))


def test_unknown_encoder_is_a_clear_error():
  with pytest.raises(ValueError, match='Unknown encoder'):
    hk.transform_with_state(lambda x: networks.make_encoder(_model('vgg16'))(x, True)).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))


def test_mlp_head_is_linear_bn_relu_linear():
  f = hk.transform_with_state(lambda x: networks.MLP(32, 8, name='projector')(x, True))
  params, state = f.init(jax.random.PRNGKey(0), jnp.zeros((4, 16)))
  # The reference's names; the output layer has no bias.
  assert set(params) == {'projector/linear', 'projector/batch_norm', 'projector/linear_1'}
  assert set(params['projector/linear']) == {'w', 'b'}
  assert set(params['projector/linear_1']) == {'w'}
  assert params['projector/linear_1']['w'].shape == (32, 8)


def test_images_are_normalised_with_imagenet_statistics():
  x = jnp.broadcast_to(jnp.asarray(networks.IMAGENET_MEAN), (1, 2, 2, 3))
  np.testing.assert_allclose(networks.normalize_images(x), 0., atol=1e-6)
