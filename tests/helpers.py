"""Helpers shared by several test modules (tests/ is on sys.path under pytest)."""

import os

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
