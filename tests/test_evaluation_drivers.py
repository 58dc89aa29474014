"""Evaluation drivers end to end: `evaluate` through main_loop (linear and kNN configs on the
digits, a tiny encoder, a few steps), `train_classifier`, the pretraining-time kNN monitor,
config validation (one clear line), and xla_cpu_flags' decisions."""

import json
import sys

import eval as eval_configs  # configs/eval.py (tests/conftest.py puts configs/ on the path).
from helpers import set_overrides, short_run, tiny_demo_config  # tests/helpers.py
import jax
import numpy as np
import pytest

from byol_jax import main_loop
from byol_jax.core import byol_experiment
from byol_jax.evaluation import drivers
from byol_jax.evaluation import pretrained as pretrained_module
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
  """configs/eval.py[:preset] on `checkpoint`, `settings` (dotted keys) set explicitly."""
  config = eval_configs.get_config(preset)
  with config.unlocked():
    config.checkpoint = checkpoint
    set_overrides(config, settings)
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
  config = _eval_config('', pretrained, max_steps=3)
  result = _run_main(config, tmp_path, monkeypatch)
  # The data description is the pretraining run's (tiny_demo_config: digits at 8 px, 297
  # held out and left out of training); the batch the run's 16, raised to 128.
  assert (result['dataset'], result['image_size'], result['num_classes']) == ('digits', SIZE, 10)
  assert (result['eval_split'], result['eval_examples']) == ('validation', 297)
  assert not result['train_on_validation'] and result['batch_size'] == 128
  assert result['protocol'] == drivers.protocol_name(config)
  assert result['steps'] == 3 and result['checkpoint_step'] == 2
  assert 0.0 <= result['top1'] <= result['top5'] <= 1.0
  assert result['eval_examples'] > 0 and np.isfinite(result['eval_loss'])
  rows = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert rows and rows[-1]['step'] == 3


@pytest.mark.slow
def test_knn_evaluation_through_main_loop(pretrained, tmp_path, monkeypatch):
  config = _eval_config('knn', pretrained)
  result = _run_main(config, tmp_path, monkeypatch)
  assert result['k'] == 20  # The run's final_knn.k (configs/byol.py:demo).
  assert 0.0 <= result['top1'] <= result['top5'] <= 1.0
  assert result['checkpoint_step'] == 2 and result['eval_examples'] == 297


@pytest.mark.slow
def test_train_classifier_learns_on_the_digits(pretrained, tmp_path):
  model_config, params, bn_state, meta = drivers.load_pretrained(pretrained)
  config = pretrained_module.resolve(_eval_config('', pretrained, max_steps=4, batch_size=32),
                                     pretrained_module.describe(pretrained, meta))
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
  config = _eval_config('knn', str(tmp_path))
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


def test_huge_pages_restart_follows_the_same_rules():
  """Opt-out, the user's tunable, a preloaded allocator, accelerators, old glibc, THP off and
  an unknown command line all mean no restart; otherwise 'restart'."""
  cpu = {'JAX_PLATFORMS': 'cpu'}
  facts = dict(glibc=(2, 36), thp_mode='madvise', argv=['python', 'x.py'])
  decide = xla_cpu_flags.huge_pages_decision
  assert decide(cpu, **facts) == 'restart'
  assert decide({**cpu, 'GLIBC_TUNABLES': 'glibc.malloc.check=3'}, **facts) == 'restart'
  for environ, changed, reason in (
      ({**cpu, xla_cpu_flags.OPT_OUT_ENV: '0'}, {}, 'turns it off'),
      ({**cpu, 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, {}, 'already names'),
      ({**cpu, 'LD_PRELOAD': 'libjemalloc.so'}, {}, 'LD_PRELOAD'),
      ({'JAX_PLATFORMS': 'cuda'}, {}, 'accelerator'),
      (cpu, dict(glibc=(2, 31)), 'glibc >= 2.35'),
      (cpu, dict(thp_mode='never'), 'never'),
      (cpu, dict(argv=[]), 'command line')):
    decision = decide(environ, **{**facts, **changed})
    assert decision.startswith('not set') and reason in decision, decision
  assert decide({**cpu, xla_cpu_flags.RESTARTED_ENV: '1'}, **facts).startswith('set')


_RESTART_PROBE = """
import os, sys
from byol_jax.runtime import xla_cpu_flags as x
print('run', os.getpid(), sys.argv[1:], flush=True)
print(x.restart_with_huge_pages())
print(os.environ.get('GLIBC_TUNABLES'))
"""


def test_restart_with_huge_pages_reexecutes_once_with_the_same_arguments():
  """The program runs again from the start in the same process (same pid, same arguments) with
  the tunable added to the user's GLIBC_TUNABLES, and says so; it never restarts twice."""
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  env = {k: v for k, v in os.environ.items()
         if k not in ('LD_PRELOAD', xla_cpu_flags.OPT_OUT_ENV, xla_cpu_flags.RESTARTED_ENV)}
  env.update(JAX_PLATFORMS='cpu', GLIBC_TUNABLES='glibc.malloc.check=0')
  expected = xla_cpu_flags.huge_pages_decision(env)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  lines = subprocess.run([sys.executable, '-c', _RESTART_PROBE, 'a b', '--c=1'], check=True,
                         capture_output=True, text=True, timeout=120, cwd=repo,
                         env=env).stdout.strip().splitlines()
  if expected != 'restart':
    assert lines[1] == expected and lines[2] == 'glibc.malloc.check=0'
    pytest.skip(f'no restart on this machine: {expected}')
  runs = [line.split(' ', 2) for line in lines if line.startswith('run ')]
  assert len(runs) == 2 and runs[0] == runs[1]  # Same pid and arguments, twice, no more.
  assert runs[0][2] == "['a b', '--c=1']"
  assert lines[-2].startswith('set (restarted')
  assert lines[-1] == 'glibc.malloc.check=0:' + xla_cpu_flags.HUGE_PAGES_TUNABLE


# ------------------------------------------------------------------------------------------
# Evaluation from the checkpoint alone: the data description is the pretraining run's.


@pytest.mark.slow
def test_knn_from_the_checkpoint_alone_on_the_command_line(pretrained, tmp_path):
  """Only --config.checkpoint and --workdir: dataset, image size, classes and hold-out come
  from the checkpoint's stored config."""
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, '-m', 'byol_jax.main_loop', '--config=configs/eval.py:knn',
                  f'--config.checkpoint={pretrained}', f'--workdir={tmp_path}'],
                 check=True, cwd=repo, capture_output=True, timeout=600)
  result = json.loads((tmp_path / 'eval_results.json').read_text())
  assert (result['dataset'], result['image_size'], result['num_classes']) == ('digits', SIZE, 10)
  assert (result['eval_split'], result['eval_examples'], result['k']) == ('validation', 297, 20)


@pytest.mark.slow
def test_explicit_settings_win_over_the_checkpoint(pretrained, tmp_path, monkeypatch, capsys):
  config = _eval_config('knn', pretrained, image_size=12, **{'knn.k': 5})
  result = _run_main(config, tmp_path, monkeypatch)
  assert (result['image_size'], result['k'], result['dataset']) == (12, 5, 'digits')
  assert 'pretrained at 8 px and is evaluated at 12 px' in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize('settings, message', [
    (dict(dataset='folder:/nonexistent/images'), '/nonexistent/images'),
    (dict(dataset='imagenett'), 'imagenett'),
    (dict(num_classes=5), 'num_classes=5'),  # The digits have 10 classes.
])
def test_a_bad_override_is_one_line(pretrained, tmp_path, monkeypatch, settings, message):
  config = _eval_config('knn', pretrained, **settings)
  with pytest.raises(SystemExit) as stop:
    _run_main(config, tmp_path, monkeypatch)
  text = str(stop.value.code)
  assert text.startswith('error: ') and message in text and '\n' not in text, text


@pytest.mark.slow
def test_knn_from_an_export_file(pretrained, tmp_path, monkeypatch):
  """An export stores dataset, image_size and num_classes; the hold-out comes from the workdir
  it names as its source."""
  from byol_jax.runtime import export  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / 'encoder.safetensors')
  export.export_encoder(pretrained, out)
  result = _run_main(_eval_config('knn', out), tmp_path, monkeypatch)
  assert (result['dataset'], result['image_size'], result['eval_examples']) == (
      'digits', SIZE, 297)


def test_an_export_without_its_workdir_needs_the_hold_out_settings():
  run = dict(dataset='digits', image_size=SIZE, num_classes=10, config_source=None)
  config = _eval_config('knn', '/exports/encoder.safetensors', eval_split='validation')
  with pytest.raises(ValueError, match='data.validation_examples, data.train_on_validation') as e:
    pretrained_module.resolve(config, run)
  assert '\n' not in str(e.value)
  with config.unlocked():
    set_overrides(config, {'data.validation_examples': 297, 'data.train_on_validation': False})
  resolved = pretrained_module.resolve(config, run)
  assert (resolved.dataset, resolved.batch_size, resolved.knn.k, resolved.augment.flip) == (
      'digits', pretrained_module.FALLBACKS['batch_size'], 200, True)


def test_the_batch_size_follows_the_pretraining_run():
  import byol  # configs/byol.py  pylint: disable=g-import-not-at-top
  batches = {}
  for preset in ('imagenet', 'cifar10', 'demo'):
    config = _eval_config('', 'ckpt', eval_split='test')
    batches[preset] = pretrained_module.resolve(
        config, byol.get_config(preset).to_dict(), say=lambda _: None).batch_size
  assert batches == dict(imagenet=4096, cifar10=512, demo=128)


def test_evaluation_crops_as_the_pretraining_run_did():
  """data.eval_crop_fraction comes from the run (whole images for the small-image presets, the
  reference's 0.875 crop for imagenet and for runs that predate the setting); explicit wins."""
  import byol  # configs/byol.py  pylint: disable=g-import-not-at-top

  def resolved(run, **settings):
    config = _eval_config('knn', 'ckpt', eval_split='test', **settings)
    return pretrained_module.resolve(config, run, say=lambda _: None).data.eval_crop_fraction

  runs = {preset: byol.get_config(preset).to_dict() for preset in ('imagenet', 'cifar10_cpu')}
  assert (resolved(runs['imagenet']), resolved(runs['cifar10_cpu'])) == (0.875, 1.0)
  del runs['cifar10_cpu']['data']['eval_crop_fraction']  # A run from before the setting.
  assert resolved(runs['cifar10_cpu']) == 0.875
  assert resolved(runs['imagenet'], **{'data.eval_crop_fraction': 1.0}) == 1.0


def test_bad_eval_crop_fraction_gives_one_clear_line(tmp_path):
  pretraining = _pretraining_config()
  with pretraining.unlocked():
    pretraining.data.eval_crop_fraction = 1.2
  evaluation = _eval_config('knn', str(tmp_path), **{'data.eval_crop_fraction': 0.0})
  for config, validate in ((pretraining, main_loop.validate_config),
                           (evaluation, drivers.validate_config)):
    with pytest.raises(ValueError, match='data.eval_crop_fraction') as error:
      validate(config)
    assert '\n' not in str(error.value)
