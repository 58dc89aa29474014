"""The online classifier's evaluation inside a pretraining run (main_loop.train_byol).

A tiny encoder at 8 px on the digits (no test split: the validation hold-out is scored, and
the log says so), 4 steps, an evaluation every 2 steps and at the end.
"""

import json

import byol  # configs/byol.py (tests/conftest.py puts configs/ on the path).
from helpers import short_run, tiny_demo_config  # tests/helpers.py
import pytest

from byol_jax import main_loop


@pytest.mark.slow
def test_pretraining_evaluates_the_online_classifier(tmp_path, capsys):
  config = short_run(tiny_demo_config(8, batch_size=16), max_steps=4, log_every_steps=2,
                     eval_every_steps=2, eval_batch_size=100)
  main_loop.validate_config(config)
  main_loop.train_byol(config, str(tmp_path))

  rows = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  evals = [row for row in rows if 'online_validation_top1' in row]
  assert [row['step'] for row in evals] == [2, 4]  # Every 2 steps (not twice at the end).
  for row in evals:
    assert 0 <= row['online_validation_top1'] <= row['online_validation_top5'] <= 1
    assert row['online_validation_loss'] > 0
  result = json.loads((tmp_path / 'online_eval_results.json').read_text())
  assert result['split'] == 'validation' and result['count'] == 297  # Digits: no test split.
  assert result['step'] == 4 and result['classifier'] == 'online'
  assert result['top1'] == evals[-1]['online_validation_top1']
  output = capsys.readouterr().out
  assert 'Online classifier at step 4 on digits validation (297 images): top-1' in output


def test_config_errors_name_the_setting():
  config = byol.get_config('imagenet')
  main_loop.validate_config(config)  # The reference preset is valid as it is.
  for key, value, message in [('eval_every_steps', -1, 'eval_every_steps must be >= 0'),
                              ('eval_batch_size', 0, 'eval_batch_size must be positive'),
                              ('knn_every_steps', 100, 'data.train_on_validation=False')]:
    bad = byol.get_config('imagenet')
    with bad.unlocked():
      bad[key] = value
    with pytest.raises(ValueError, match=message):
      main_loop.validate_config(bad)
  bad = byol.get_config('imagenet')
  bad.augment.crop_sampler = 'inception'
  with pytest.raises(ValueError, match='Unknown augment.crop_sampler'):
    main_loop.validate_config(bad)
