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
