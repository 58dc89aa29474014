"""Training metrics: a progress line (step, images/s, ETA), JSONL and TensorBoard event files.

TensorBoard files are written with the `tensorboard` package's record format, so no TensorFlow
is needed here. Every file goes through storage.py, so a workdir on gs:// works like a local
one (there a file is uploaded whole every storage.UPLOAD_EVERY_SECS and on close). Only
process 0 writes (multi-host runs call this on every process).
"""

import itertools
import json
import math
import os
import socket
import time

import jax
import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from byol_jax.runtime import storage


def _format_seconds(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


def drop_rows(workdir: str, drop, filename: str = 'metrics.jsonl') -> int:
  """Removes the rows of `workdir/filename` for which `drop(row)` is true; returns how many.

  For a resumed run: the rows logged after the checkpoint it resumes from describe steps it
  runs (and logs) again. Process 0 only; the kept rows go to a temporary file renamed over the
  old one, so a kill in between leaves the old file whole. A line that is not JSON (the end
  of a line cut short by a kill) is dropped too: it is no row.
  """
  path = storage.join(workdir, filename)
  if jax.process_index() != 0 or not storage.exists(path):
    return 0
  lines = storage.read_text(path).splitlines(keepends=True)
  kept = []
  for line in lines:
    try:
      row = json.loads(line)
    except ValueError:
      continue
    if not drop(row):
      kept.append(line if line.endswith('\n') else line + '\n')
  if len(kept) == len(lines):
    return 0
  storage.write_text(path, ''.join(kept))  # Atomic: a temporary file renamed, or one upload.
  return len(lines) - len(kept)


_event_files = itertools.count()


class EventFile:
  """A TensorBoard event file in `logdir` (tensorboard's file name, first event and record
  framing, as its EventFileWriter), written synchronously through storage.GrowingFile."""

  def __init__(self, logdir: str):
    name = 'events.out.tfevents.%010d.%s.%s.%s' % (time.time(), socket.gethostname(),
                                                   os.getpid(), next(_event_files))
    self._file = storage.GrowingFile(storage.join(logdir, name), append=False)
    self._records = RecordWriter(self._file)
    self.add_event(event_pb2.Event(
        wall_time=time.time(), file_version='brain.Event:2',
        source_metadata=event_pb2.SourceMetadata(writer='byol_jax.runtime.metrics')))
    self.flush()

  def add_event(self, event):
    self._records.write(event.SerializeToString())

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


class MetricWriter:
  """Writes one JSON object per log step to `workdir/metrics.jsonl` and TensorBoard events."""

  def __init__(self, workdir: str, total_steps: int, images_per_step: int,
               filename: str = 'metrics.jsonl'):
    self.total_steps, self.images_per_step = total_steps, images_per_step
    self.enabled = jax.process_index() == 0
    self._last_time, self._last_step = None, None
    if self.enabled:
      self._jsonl = storage.GrowingFile(storage.join(workdir, filename), append=True)
      self._events = EventFile(storage.join(workdir, 'tensorboard'))

  def start(self, step: int):
    """Marks the clock at `step` so the first images/s is not polluted by compilation."""
    self._last_time, self._last_step = time.time(), step

  def restart(self, step: int):
    """Tells TensorBoard that the run (re)starts after `step`: a SessionLog START event at
    step + 1, on which TensorBoard discards the events of steps >= step + 1 read before it (the
    steps an interrupted run logged past its last checkpoint, logged again now). The JSONL rows
    are dropped with `drop_rows` before the writer opens the file."""
    if self.enabled:
      self._events.add_event(event_pb2.Event(
          wall_time=time.time(), step=int(step) + 1,
          session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
      self._events.flush()

  def write(self, step: int, metrics: dict, prefix: str = '') -> dict:
    """Adds images/s since the last call and writes; returns the scalars written."""
    now = time.time()
    scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
    if self._last_time is not None and step > self._last_step:
      steps = step - self._last_step
      seconds = max(now - self._last_time, 1e-9)
      scalars['images_per_s'] = steps * self.images_per_step / seconds
      scalars['eta_s'] = (self.total_steps - step) * seconds / steps
    self._last_time, self._last_step = now, step
    if self.enabled:
      record = {'step': int(step), **{prefix + k: v for k, v in scalars.items()}}
      self._jsonl.write((json.dumps(record) + '\n').encode())
      self._jsonl.flush()
      summary = summary_pb2.Summary(value=[
          summary_pb2.Summary.Value(tag=prefix + k, simple_value=v)
          for k, v in scalars.items() if math.isfinite(v)])
      self._events.add_event(event_pb2.Event(wall_time=now, step=int(step), summary=summary))
      self._events.flush()
      print(self.progress_line(step, scalars), flush=True)
    return scalars

  def progress_line(self, step: int, scalars: dict) -> str:
    parts = [f'step {step}/{self.total_steps}']
    for key in ('loss', 'repr_loss', 'top1', 'collapse', 'tau', 'learning_rate'):
      if key in scalars:
        parts.append(f'{key} {scalars[key]:.4g}')
    if 'images_per_s' in scalars:
      parts.append(f'{scalars["images_per_s"]:.1f} img/s')
      parts.append(f'ETA {_format_seconds(scalars["eta_s"])}')
    return ' | '.join(parts)

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._events.close()
