"""One writer per workdir: an exclusive lock file `workdir/.lock`.

Self-contained (standard library only). API:

  lock = WorkdirLock(workdir, stale_after_secs=None, override=False, warn=None)
  lock.acquire()   # raises WorkdirInUse (a RuntimeError, one line) if another run holds it
  lock.refresh()   # touches the file: the heartbeat other hosts judge staleness by
  lock.release()   # removes the file only if it is still ours
  with WorkdirLock(workdir): ...
  read_lock(workdir) -> dict | None

The lock file holds JSON {pid, hostname, boot_id, proc_start, started_at, started_at_unix,
argv, token}. It is created complete and atomically: the JSON is written to a temporary file
which is then hard-linked to `.lock` (`link` fails with EEXIST when `.lock` exists, exactly
like O_CREAT|O_EXCL, but a reader can never see a half-written lock). The file is also held
with `fcntl.flock` for as long as the lock is held: a second guard that the kernel drops when
the holder dies, however it dies (on local file systems; on NFS Linux maps it to POSIX locks,
which work when the lock daemon does, and elsewhere it may be a no-op, hence the PID check).

When `.lock` exists:
  * flock held by someone           -> in use (WorkdirInUse);
  * written on this host (same hostname): the holder is alive if `os.kill(pid, 0)` succeeds,
    the machine has not rebooted since (same /proc boot_id) and the process with that PID
    started at the recorded time (/proc/<pid>/stat start ticks, so a recycled PID is not
    taken for the holder) -> in use; otherwise dead -> taken over, with a warning;
  * unreadable or corrupt (e.g. a crash of a foreign tool, or an empty file) -> taken over,
    with a warning;
  * written on another host: its liveness cannot be checked from here. Refused, unless the
    lock's last heartbeat (file mtime; the holder calls `refresh()`, e.g. at every checkpoint)
    is older than `stale_after_secs` (None: never), or `override=True`. A run that moved to
    another host after a preemption therefore needs one of the two.
`override=True` takes over any lock (with a warning naming the previous holder).

Taking over renames the stale file aside first (atomic: of two processes taking over at once
exactly one succeeds) and checks that what it renamed is the file it judged stale.

Multi-host jobs: only process 0 should take the lock (the other processes of the same job
would otherwise see it as held by another run); the caller decides, e.g.
`WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()`, and should
make the other processes stop too when process 0's acquire fails.
"""

import datetime
import errno
import json
import os
import socket
import sys
import tempfile
import time
import uuid
from typing import Callable, Optional

try:
  import fcntl
except ImportError:  # Not POSIX: the lock file alone.
  fcntl = None

LOCK_FILE = '.lock'


class WorkdirInUse(RuntimeError):
  """Another live run holds the workdir. The message is one line."""

  def __init__(self, message: str, holder: Optional[dict] = None):
    super().__init__(message)
    self.holder = holder


def _default_warn(message: str):
  print(f'warning: {message}', file=sys.stderr, flush=True)


def _read(path: str) -> str:
  with open(path) as f:
    return f.read()


def _boot_id() -> Optional[str]:
  try:
    return _read('/proc/sys/kernel/random/boot_id').strip()
  except OSError:
    return None


def _proc_start(pid: int) -> Optional[int]:
  """Start time of process `pid` in clock ticks since boot (/proc/<pid>/stat field 22)."""
  try:
    stat = _read(f'/proc/{pid}/stat')
  except OSError:
    return None
  try:
    # The command name (field 2) is in parentheses and may hold spaces or ')'.
    return int(stat[stat.rindex(')') + 2:].split()[19])
  except (ValueError, IndexError):
    return None


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # Exists, owned by another user.
  except OSError:
    return False
  return True


def read_lock(workdir: str) -> Optional[dict]:
  """The lock's record, None when there is no lock; ValueError when it is corrupt."""
  try:
    text = _read(os.path.join(workdir, LOCK_FILE))
  except FileNotFoundError:
    return None
  record = json.loads(text)
  if not isinstance(record, dict) or not isinstance(record.get('pid'), int):
    raise ValueError('not a lock record')
  return record


def _flock_held(path: str) -> bool:
  """True when another open file description holds a flock on `path` (False if unknowable)."""
  if fcntl is None:
    return False
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return False
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    return e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
  else:
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False
  finally:
    os.close(fd)


class WorkdirLock:
  """Exclusive lock of a workdir by one run (see the module docstring)."""

  def __init__(self, workdir: str, stale_after_secs: Optional[float] = None,
               override: bool = False, warn: Optional[Callable[[str], None]] = None,
               override_hint: str = 'pass override=True'):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self.stale_after_secs = stale_after_secs
    self.override = override
    self.override_hint = override_hint
    self._warn = warn or _default_warn
    self._fd = None
    self._record = None
    self.previous_holder = None  # The record of a lock taken over, if any.

  @property
  def held(self) -> bool:
    return self._fd is not None

  # -- acquiring --------------------------------------------------------------------------------

  def _new_record(self) -> dict:
    now = time.time()
    return dict(pid=os.getpid(), hostname=socket.gethostname(), boot_id=_boot_id(),
                proc_start=_proc_start(os.getpid()),
                started_at=datetime.datetime.fromtimestamp(now).astimezone().isoformat(
                    timespec='seconds'),
                started_at_unix=now, argv=list(sys.argv), token=uuid.uuid4().hex)

  def _try_create(self, record: dict) -> bool:
    """Publishes `record` as the lock if there is none; False if there is one."""
    fd, tmp = tempfile.mkstemp(prefix=LOCK_FILE + '.', suffix='.tmp', dir=self.workdir)
    try:
      with os.fdopen(os.dup(fd), 'w') as f:
        json.dump(record, f)
        f.write('\n')
        f.flush()
        os.fsync(f.fileno())
      if fcntl is not None:
        try:
          fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # Held on the inode `.lock` will be.
        except OSError:
          pass  # File system without flock: the lock file alone.
      try:
        os.link(tmp, self.path)
      except FileExistsError:
        os.close(fd)
        return False
      except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
          raise
        # No hard links (some FUSE / SMB mounts): O_CREAT|O_EXCL, then the content.
        os.close(fd)
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        os.write(fd, (json.dumps(record) + '\n').encode())
        os.fsync(fd)
        if fcntl is not None:
          try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
          except OSError:
            pass
      self._fd, self._record = fd, record
      return True
    except BaseException:
      if self._fd != fd:
        try:
          os.close(fd)
        except OSError:
          pass
      raise
    finally:
      try:
        os.remove(tmp)
      except OSError:
        pass

  def _describe(self, holder: dict) -> str:
    argv = ' '.join(' '.join(map(str, holder.get('argv') or [])).split())  # One line.
    argv = argv if len(argv) <= 80 else argv[:77] + '...'
    return (f'pid {holder.get("pid")} on host {holder.get("hostname")} since '
            f'{holder.get("started_at")}' + (f' ({argv})' if argv else ''))

  def _judge(self, holder: Optional[dict], mtime: float) -> Optional[str]:
    """Why the existing lock may be taken over, or None when it is (possibly) live."""
    if holder is None:
      return 'the lock file is unreadable or corrupt'
    if self.override:
      return 'override requested'
    if holder.get('hostname') == socket.gethostname():
      pid = holder['pid']
      if holder.get('boot_id') and _boot_id() and holder['boot_id'] != _boot_id():
        return 'this host has rebooted since'
      if not _pid_alive(pid):
        return f'process {pid} is dead'
      if holder.get('proc_start') is not None:
        start = _proc_start(pid)
        if start is not None and start != holder['proc_start']:
          return f'process {pid} is dead (its PID now belongs to another process)'
      return None
    age = time.time() - mtime
    if self.stale_after_secs is not None and age > self.stale_after_secs:
      return (f'its last heartbeat is {age:.0f} s old (> stale_after_secs='
              f'{self.stale_after_secs:g}; liveness on another host cannot be checked)')
    return None

  def _refusal(self, holder: dict) -> WorkdirInUse:
    other_host = holder.get('hostname') != socket.gethostname()
    how = ('stop that run, or, if it is gone (its host cannot be checked from here), '
           f'{self.override_hint}' if other_host else
           'stop that run first, or use another workdir')
    return WorkdirInUse(f'workdir {self.workdir} is in use by {self._describe(holder)}; '
                        f'{how}.', holder)

  def acquire(self) -> 'WorkdirLock':
    if self.held:
      return self
    os.makedirs(self.workdir, exist_ok=True)
    for _ in range(10):  # Retries only when racing with another process over a stale lock.
      record = self._new_record()
      if self._try_create(record):
        return self
      try:
        stat = os.stat(self.path)
      except FileNotFoundError:
        continue  # Released meanwhile.
      if _flock_held(self.path):
        try:
          holder = read_lock(self.workdir)
        except (OSError, ValueError):
          holder = None
        if not self.override:
          raise self._refusal(holder or {'pid': '?', 'hostname': '?', 'started_at': '?'})
      try:
        holder = read_lock(self.workdir)
      except FileNotFoundError:
        continue
      except (OSError, ValueError):
        holder = None
      why = self._judge(holder, stat.st_mtime)
      if why is None:
        raise self._refusal(holder)
      if self._take_over(stat):
        self.previous_holder = holder
        who = self._describe(holder) if holder else 'an unknown process'
        self._warn(f'taking over the lock of workdir {self.workdir} from {who}: {why}.')
    raise WorkdirInUse(f'workdir {self.workdir}: could not take its lock {self.path} '
                       f'(another process keeps replacing it).')

  def _take_over(self, judged: os.stat_result) -> bool:
    """Moves the stale lock aside if it is still the file that was judged; True if done."""
    aside = f'{self.path}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}'
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return False  # Another process took it over first.
    moved = os.stat(aside)
    if (moved.st_ino, moved.st_dev) != (judged.st_ino, judged.st_dev):
      # A fresh lock appeared between the judgement and the rename: put it back.
      try:
        os.link(aside, self.path)
      except FileExistsError:
        pass
      os.remove(aside)
      return False
    os.remove(aside)
    return True

  # -- holding and releasing --------------------------------------------------------------------

  def refresh(self):
    """Heartbeat: updates the lock file's mtime (what other hosts judge staleness by)."""
    if self.held:
      os.utime(self.path)

  def _still_ours(self) -> bool:
    try:
      same_file = os.path.samestat(os.fstat(self._fd), os.stat(self.path))
      return same_file and read_lock(self.workdir).get('token') == self._record['token']
    except (OSError, ValueError, AttributeError):
      return False

  def release(self):
    """Removes the lock file if it is still ours (never another run's), then unlocks."""
    if not self.held:
      return
    try:
      if self._still_ours():
        os.remove(self.path)
      else:
        self._warn(f'the lock {self.path} was taken over by another process; leaving it.')
    finally:
      os.close(self._fd)  # Drops the flock.
      self._fd, self._record = None, None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
    return False

  def __del__(self, _close=os.close):
    # `_close` is bound at definition: at interpreter shutdown the module's `os` may already be
    # None, and a lock never released (a script that did not close its Checkpointer) would
    # print an AttributeError traceback on exit.
    if getattr(self, '_fd', None) is not None:
      try:
        _close(self._fd)
      except OSError:
        pass
