"""Helpers shared by several test modules (tests/ is on sys.path under pytest)."""

import os
import signal
import time

import numpy as np
import pytest

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'golden')


def golden(name):
  """A golden file of tests/golden, or a skip when it has not been generated."""
  path = os.path.join(GOLDEN, name)
  if not os.path.exists(path):
    pytest.skip(f'{path} is missing: run tests/golden/generate.py --reference=PATH')
  return np.load(path)


def set_overrides(config, overrides):
  """config['a.b.c'] = value for each dotted key of `overrides` (config already unlocked)."""
  for key, value in overrides.items():
    *parents, leaf = key.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def tiny_demo_config(image_size, **settings):
  """configs/byol.py:demo with the tiny encoder and small heads, then `settings` (top-level)."""
  import byol  # configs/byol.py  pylint: disable=g-import-not-at-top
  config = byol.get_config('demo')
  with config.unlocked():
    config.model.encoder = 'tiny'
    config.model.width = 1.0
    config.model.projector_hidden_size = config.model.predictor_hidden_size = 16
    config.model.projection_size = 8
    config.image_size = image_size
    for key, value in settings.items():
      config[key] = value
  return config


def short_run(config, **settings):
  """`config` for a short pretraining run: no periodic checkpoints, no final kNN, `settings`."""
  with config.unlocked():
    config.checkpoint_every_secs = 0
    config.checkpoint_every_steps = 0
    config.final_knn.enabled = False
    for key, value in settings.items():
      config[key] = value
  return config


def golden_tree(data, prefix):
  """{module: {name: array}} from a golden file's `prefix::module::name` keys, with this
  project's module names (reference_checkpoint's conversion of the encoder and the BYOL heads;
  other modules, e.g. the linear-evaluation head `linear`, keep their name)."""
  from byol_jax.runtime import reference_checkpoint  # pylint: disable=g-import-not-at-top
  converted = (*reference_checkpoint.ENCODER_MODULES, *reference_checkpoint.HEAD_MODULES)
  tree = {}
  for key in data.files:
    parts = key.split('::')
    if len(parts) == 3 and parts[0] == prefix:
      module = parts[1]
      if module.partition('/~/')[0].split('/')[0] in converted:
        module = reference_checkpoint.convert_module_name(module)
      tree.setdefault(module, {})[parts[2]] = data[key]
  assert tree, f'no {prefix}::* entries'
  return tree


def assert_trees_close(got, want, atol_fraction, what, scale_of=None):
  """Same modules and names; every float tensor within `atol_fraction` of its own largest entry
  (a single entry can nearly cancel), integer tensors exactly. `scale_of(module, name, want)`
  may name another scale for a tensor (e.g. a zero-gradient bias: its layer's weights)."""
  assert sorted(got) == sorted(want), what
  for module in want:
    assert sorted(got[module]) == sorted(want[module]), f'{what} {module}'
    for name, expected in want[module].items():
      actual = np.asarray(got[module][name])
      where = f'{what} {module}/{name}'
      assert actual.shape == expected.shape, where
      if not np.issubdtype(expected.dtype, np.floating):
        np.testing.assert_array_equal(actual, expected, err_msg=where)
        continue
      scale = max(float(np.abs(expected).max()), 1e-30)
      if scale_of is not None:
        scale = scale_of(module, name, want) or scale
      np.testing.assert_allclose(actual, expected, rtol=0, atol=atol_fraction * scale,
                                 err_msg=where)


def sigterm_once_logged(process, read_rows, step, timeout=600):
  """SIGTERMs a run once `read_rows()` shows `step`; returns (output, step it stopped at, line).

  The run must exit 0 with one 'Stopped by SIGTERM at step N: ...' line.
  """
  deadline = time.time() + timeout
  while not any(row['step'] == step for row in read_rows()):
    assert process.poll() is None, process.stdout.read()[-3000:]
    assert time.time() < deadline, f'the resumed run did not reach step {step} in time'
    time.sleep(0.1)
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate(timeout=timeout)
  assert process.returncode == 0, output[-3000:]
  [line] = [l for l in output.splitlines() if l.startswith('Stopped by SIGTERM')]
  return output, int(line.split(' at step ')[1].split(':')[0]), line
