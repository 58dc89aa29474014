"""Evaluation drivers end to end: `evaluate` through main_loop (linear and kNN configs on the
digits, a tiny encoder, a few steps), `train_classifier`, the pretraining-time kNN monitor,
config validation (one clear line), and xla_cpu_flags' decisions."""

import json
import sys

import eval as eval_configs  # configs/eval.py (tests/conftest.py puts configs/ on the path).
from helpers import short_run, tiny_demo_config  # tests/helpers.py
import jax
import numpy as np
import pytest

from byol_jax import main_loop
from byol_jax.core import byol_experiment
from byol_jax.evaluation import drivers
from byol_jax.runtime import xla_cpu_flags

SIZE = 8


def _pretraining_config(**settings):
  return short_run(tiny_demo_config(SIZE, batch_size=16, **settings), max_steps=2,
                   log_every_steps=1, eval_every_steps=0)


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """A 2-step digits pretraining workdir (its final checkpoint is what evaluation reads)."""
  workdir = tmp_path_factory.mktemp('pretrain')
  config = _pretraining_config()
  main_loop.validate_config(config)
  main_loop.train_byol(config, str(workdir))
  return str(workdir)


def _eval_config(preset, checkpoint, **settings):
  config = eval_configs.get_config(preset)
  with config.unlocked():
    config.checkpoint = checkpoint
    config.image_size = SIZE
    for key, value in settings.items():
      config[key] = value
  return config


def _run_main(config, workdir, monkeypatch):
  """main_loop.main as the command line runs it, with `config` as --config."""
  monkeypatch.setattr(main_loop, 'flags', _Flags(config, workdir))
  main_loop.main(['main_loop'])
  return json.loads((workdir / 'eval_results.json').read_text())


class _Flags:
  def __init__(self, config, workdir):
    self.FLAGS = type('F', (), dict(config=config, workdir=str(workdir)))()


@pytest.mark.slow
def test_linear_evaluation_through_main_loop(pretrained, tmp_path, monkeypatch):
  config = _eval_config('demo', pretrained, max_steps=3, batch_size=32)
  result = _run_main(config, tmp_path, monkeypatch)
  assert result['protocol'] == drivers.protocol_name(config)
  assert result['steps'] == 3 and result['checkpoint_step'] == 2
  assert 0.0 <= result['top1'] <= result['top5'] <= 1.0
  assert result['eval_examples'] > 0 and np.isfinite(result['eval_loss'])
  rows = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert rows and rows[-1]['step'] == 3


@pytest.mark.slow
def test_knn_evaluation_through_main_loop(pretrained, tmp_path, monkeypatch):
  config = _eval_config('demo,knn', pretrained)
  result = _run_main(config, tmp_path, monkeypatch)
  assert result['k'] == config.knn.k and 0.0 <= result['top1'] <= result['top5'] <= 1.0
  assert result['checkpoint_step'] == 2


@pytest.mark.slow
def test_train_classifier_learns_on_the_digits(pretrained, tmp_path):
  config = _eval_config('demo', pretrained, max_steps=4, batch_size=32)
  model_config, params, bn_state, _ = drivers.load_pretrained(pretrained)
  result = drivers.train_classifier(config, model_config, params, bn_state, str(tmp_path))
  assert result['steps'] == 4 and result['count'] > 0
  assert 0.0 <= result['top1'] <= 1.0 and np.isfinite(result['loss'])


@pytest.mark.slow
def test_knn_monitor_scores_the_validation_split(capsys):
  config = _pretraining_config()
  experiment = byol_experiment.ByolExperiment(config, train_examples=64)
  state = jax.device_get(experiment.init(jax.random.PRNGKey(0), SIZE))
  result = drivers.knn_monitor(config, experiment, state)
  assert set(result) == {'knn_top1', 'knn_top5'}
  assert 0.0 <= result['knn_top1'] <= result['knn_top5'] <= 1.0
  assert 'kNN monitor' in capsys.readouterr().out


@pytest.mark.parametrize('setting,value,message', [
    ('log_every_steps', 0, 'log_every_steps'),
    ('image_size', 0, 'image_size'),
    ('knn_every_steps', -1, 'knn_every_steps'),
    ('eval_batch_size', -1, 'eval_batch_size'),
])
def test_bad_pretraining_values_give_one_clear_line(setting, value, message):
  config = _pretraining_config()
  with config.unlocked():
    config[setting] = value
  with pytest.raises(ValueError, match=message) as error:
    main_loop.validate_config(config)
  assert '\n' not in str(error.value)


def test_bad_crop_sampler_gives_one_clear_line():
  config = _pretraining_config()
  with config.unlocked():
    config.augment.crop_sampler = 'nearest'
  with pytest.raises(ValueError, match='crop_sampler') as error:
    main_loop.validate_config(config)
  assert '\n' not in str(error.value)


def test_bad_eval_values_give_one_clear_line(tmp_path):
  config = _eval_config('demo,knn', str(tmp_path))
  with config.unlocked():
    config.knn.k = 0
  with pytest.raises(ValueError, match='knn.k') as error:
    drivers.validate_config(config)
  assert '\n' not in str(error.value)


def test_xla_cpu_flags_adds_the_flag_once_when_it_says_so():
  environ = {'JAX_PLATFORMS': 'cpu'}
  decision = xla_cpu_flags.configure(environ, probe=False)
  assert decision == xla_cpu_flags.last_decision()
  if decision.startswith('set'):
    assert environ['XLA_FLAGS'] == xla_cpu_flags.EIGEN_CONVOLUTIONS
    xla_cpu_flags.configure(environ, probe=False)  # Named already: not added twice.
    assert environ['XLA_FLAGS'] == xla_cpu_flags.EIGEN_CONVOLUTIONS
  else:
    assert 'XLA_FLAGS' not in environ


def test_xla_cpu_flags_opt_out_and_user_flags_win():
  opted_out = {'JAX_PLATFORMS': 'cpu', xla_cpu_flags.OPT_OUT_ENV: '0'}
  xla_cpu_flags.configure(opted_out, probe=False)
  assert 'XLA_FLAGS' not in opted_out
  user = {'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': f'{xla_cpu_flags.FLAG_NAME}=default'}
  xla_cpu_flags.configure(user, probe=False)
  assert user['XLA_FLAGS'] == f'{xla_cpu_flags.FLAG_NAME}=default'
  accelerator = {'JAX_PLATFORMS': 'cuda'}
  xla_cpu_flags.configure(accelerator, probe=False)
  assert 'XLA_FLAGS' not in accelerator


@pytest.mark.slow
def test_xla_cpu_flags_in_a_fresh_process():
  """Before JAX starts, configure() adds the flag (or says why not) and JAX still starts."""
  import subprocess  # pylint: disable=g-import-not-at-top
  code = ('import os; from byol_jax.runtime import xla_cpu_flags as x; '
          'os.environ.pop("XLA_FLAGS", None); os.environ["JAX_PLATFORMS"] = "cpu"; '
          'x.configure(); print(x.last_decision()); import jax; print(len(jax.devices()))')
  out = subprocess.run([sys.executable, '-c', code], check=True, capture_output=True,
                       text=True, timeout=300).stdout
  assert out.strip().splitlines()[-1] == '1'
