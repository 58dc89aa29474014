"""One writer per workdir on object storage (gs://): the lock object `workdir/.lock`.

A bucket has no O_EXCL, no hard links and no flock, and a plain "look, then write" lets two
runs both believe they hold the lock. TensorStore, the library that writes Orbax's arrays (with
the same credentials), has conditional writes (GCS: `ifGenerationMatch`): a write happens only
if the object is still at the generation the writer read, "absent" included. So:

  * acquire: read `.lock`; absent -> create it on the condition that it is still absent (of
    two runs starting at once exactly one succeeds); present -> judged exactly as the local
    lock judges its file (workdir_lock.WorkdirLock._judge: a holder on this host is checked by
    PID, boot id and process start time; one on another host is live until its heartbeat is
    older than `stale_after_secs`, `lock_stale_after_secs` in the config); a stale or corrupt
    lock is replaced on the condition that it is still the one judged, with a warning;
  * refresh (at every checkpoint save): rewrites the record with a new `heartbeat_unix`, on
    the condition that it is still ours; if another run took it over meanwhile, a warning;
  * release: deletes it on the same condition.

The record is the local lock's JSON plus `heartbeat_unix` (object storage has no mtime that
every client can set). A run killed on another host blocks the workdir until its heartbeat
is `lock_stale_after_secs` old, as on a shared file system.
"""

import json
import time

import tensorstore

from byol_jax.runtime import storage, workdir_lock
from byol_jax.runtime.workdir_lock import LOCK_FILE, WorkdirInUse


def _heartbeat(holder) -> float:
  holder = holder or {}
  return float(holder.get('heartbeat_unix') or holder.get('started_at_unix') or 0.0)


class ObjectLock(workdir_lock.WorkdirLock):
  """WorkdirLock's API and judgement for a workdir on object storage (module docstring).

  Errors of the storage itself (no permission, no such bucket) are OSError naming the lock.
  """

  def __init__(self, workdir: str, **kwargs):
    super().__init__(workdir, **kwargs)
    self.workdir = storage.resolve(workdir)  # The base class made it an absolute local path.
    self.path = storage.join(self.workdir, LOCK_FILE)
    self._store = None
    self._generation = None  # Of our lock object while we hold it.

  @property
  def held(self) -> bool:
    return self._generation is not None

  def _call(self, what: str, future):
    try:
      return future.result()
    except ValueError as e:  # TensorStore reports I/O failures as ValueError.
      raise OSError(f'cannot {what} the workdir lock {self.path}: '
                    f'{" ".join(str(e).split())[:300]}') from e

  def _kvstore(self):
    if self._store is None:
      self._store = self._call('open', tensorstore.KvStore.open(
          storage.kvstore_spec(self.workdir)))
    return self._store

  def _read(self):
    """(record, or None when absent or corrupt; generation; whether the object exists)."""
    result = self._call('read', self._kvstore().read(LOCK_FILE))
    if result.state == 'missing':
      return None, result.stamp.generation, False
    try:
      record = json.loads(result.value)
    except ValueError:
      record = None
    if not isinstance(record, dict) or not isinstance(record.get('pid'), int):
      record = None
    return record, result.stamp.generation, True

  def _write_if(self, record: dict, generation: bytes) -> bool:
    """Writes `record` if the object is still at `generation`; True (and now ours) if done."""
    data = (json.dumps(record) + '\n').encode()
    stamp = self._call('write', self._kvstore().write(LOCK_FILE, data, if_equal=generation))
    if not stamp.generation:  # The condition failed: someone else wrote meanwhile.
      return False
    self._generation, self._record = stamp.generation, record
    return True

  def acquire(self) -> 'ObjectLock':
    if self.held:
      return self
    for _ in range(10):  # Retries only when racing with another run over the same lock.
      holder, generation, present = self._read()
      record = self._new_record()
      record['heartbeat_unix'] = record['started_at_unix']
      if not present:
        if self._write_if(record, generation):
          return self
        continue
      why = self._judge(holder, _heartbeat(holder))
      if why is None:
        raise self._refusal(holder)
      if self._write_if(record, generation):
        self.previous_holder = holder
        who = self._describe(holder) if holder else 'an unknown process'
        self._warn(f'taking over the lock of workdir {self.workdir} from {who}: {why}.')
        return self
    raise WorkdirInUse(f'workdir {self.workdir}: could not take its lock {self.path} '
                       f'(another process keeps replacing it).')

  def refresh(self):
    """Heartbeat: the record with a new `heartbeat_unix`, if the lock is still ours."""
    if not self.held:
      return
    record = dict(self._record, heartbeat_unix=time.time())
    if not self._write_if(record, self._generation):
      self._lost()

  def _lost(self):
    holder, _, _ = self._read()
    who = self._describe(holder) if holder else 'nobody (it was deleted)'
    self._warn(f'the lock {self.path} is now held by {who}: another run took this workdir '
               f'over; this run no longer holds it.')
    self._generation, self._record = None, None

  def release(self):
    """Deletes the lock object if it is still ours (never another run's)."""
    if not self.held:
      return
    stamp = self._call('delete', self._kvstore().write(LOCK_FILE, None,
                                                       if_equal=self._generation))
    if not stamp.generation:
      self._lost()
    self._generation, self._record = None, None


def read_lock(workdir: str):
  """The lock object's record (None when there is none or it is corrupt)."""
  return ObjectLock(workdir)._read()[0]  # pylint: disable=protected-access
