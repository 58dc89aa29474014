"""Metrics: JSONL rows with `step`, TensorBoard events readable, progress line with ETA."""

import glob
import json
import os

from tensorboard.backend.event_processing import event_accumulator

from byol_jax.runtime import metrics


def test_jsonl_tensorboard_and_progress(tmp_path, capsys):
  writer = metrics.MetricWriter(str(tmp_path), total_steps=100, images_per_step=64)
  writer.start(0)
  writer.write(10, {'loss': 1.5, 'top1': 0.25})
  writer.write(20, {'loss': 1.25, 'top1': 0.5})
  writer.close()

  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert [r['step'] for r in rows] == [10, 20]
  assert rows[1]['loss'] == 1.25 and rows[1]['images_per_s'] > 0 and rows[1]['eta_s'] >= 0

  events = glob.glob(os.path.join(tmp_path, 'tensorboard', 'events.out.tfevents.*'))
  assert len(events) == 1
  acc = event_accumulator.EventAccumulator(events[0])
  acc.Reload()
  assert [(e.step, e.value) for e in acc.Scalars('loss')] == [(10, 1.5), (20, 1.25)]

  out = capsys.readouterr().out
  assert 'step 20/100' in out and 'img/s' in out and 'ETA' in out


def test_resumed_run_appends(tmp_path):
  for step in (5, 6):
    writer = metrics.MetricWriter(str(tmp_path), total_steps=10, images_per_step=1)
    writer.write(step, {'loss': float(step)})
    writer.close()
  assert [json.loads(l)['step'] for l in open(tmp_path / 'metrics.jsonl')] == [5, 6]


def _run_logging(workdir, steps, value, *, resumed_at=None, extra=()):
  """A run writing a `loss` row every 4 steps of `steps` (value + step), resumed as main_loop
  resumes (dropping the rows it logs again, TensorBoard told), and rows `extra` after them."""
  from byol_jax import main_loop  # pylint: disable=g-import-not-at-top
  if resumed_at is not None:
    main_loop._forget_logged_after(str(workdir), resumed_at, total=24)  # pylint: disable=protected-access
  writer = metrics.MetricWriter(str(workdir), total_steps=24, images_per_step=1)
  writer.restart(resumed_at or 0)
  for step in steps:
    if step % 4 == 0:
      writer.write(step, {'loss': value + step})
  for step, row in extra:
    writer.write(step, row)
  writer.close()


def _rows(workdir):
  return [json.loads(line) for line in open(workdir / 'metrics.jsonl')]


def test_a_resumed_run_logs_every_step_once(tmp_path):
  """Killed (or stopped by a failed save) at step 19 with its last checkpoint at 8: the
  resumed run repeats steps 9..24; metrics.jsonl and TensorBoard show each step once, with the
  resumed run's values. A line cut short by the kill is no row."""
  _run_logging(tmp_path, range(1, 20), 0.0, extra=[(8, {'knn_top1': 0.5})])
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 20, "lo')  # SIGKILL in the middle of a write.
  _run_logging(tmp_path, range(9, 25), 100.0, resumed_at=8)

  rows = _rows(tmp_path)
  assert [r['step'] for r in rows if 'loss' in r] == [4, 8, 12, 16, 20, 24]
  assert [r['loss'] for r in rows if 'loss' in r] == [4, 8, 112, 116, 120, 124]
  assert [r['step'] for r in rows if 'knn_top1' in r] == [8]  # Logged before the checkpoint.
  acc = event_accumulator.EventAccumulator(str(tmp_path / 'tensorboard'))
  acc.Reload()
  assert [(e.step, e.value) for e in acc.Scalars('loss')] == [
      (4, 4), (8, 8), (12, 112), (16, 116), (20, 120), (24, 124)]


def test_rerunning_a_finished_run_logs_its_final_evaluations_once(tmp_path):
  """The final evaluations come after the final checkpoint: a run killed during them (or run
  again once finished) resumes at the last step and writes them again."""
  final = [(24, {'online_validation_top1': 0.5}), (24, {'knn_byol_top1': 0.25})]
  _run_logging(tmp_path, range(1, 25), 0.0, extra=final)
  _run_logging(tmp_path, (), 0.0, resumed_at=24, extra=final)
  timing = ('images_per_s', 'eta_s')
  assert [sorted(k for k in r if k not in timing) for r in _rows(tmp_path)] == (
      [['loss', 'step']] * 6 + [['online_validation_top1', 'step'], ['knn_byol_top1', 'step']])
