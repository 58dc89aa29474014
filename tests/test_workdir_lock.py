"""One writer per workdir (byol_jax/runtime/workdir_lock.py)."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from byol_jax.runtime import workdir_lock
from byol_jax.runtime.workdir_lock import WorkdirInUse, WorkdirLock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A second process trying the lock: prints OK, or the one-line refusal.
TRY_LOCK = """
import sys
from byol_jax.runtime.workdir_lock import WorkdirLock, WorkdirInUse
try:
  with WorkdirLock(sys.argv[1]):
    print('OK')
except WorkdirInUse as e:
  print('IN USE:', e)
"""


def try_lock_in_subprocess(workdir):
  result = subprocess.run([sys.executable, '-c', TRY_LOCK, str(workdir)], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=True)
  return result.stdout.strip()


def warnings_list():
  messages = []
  return messages, messages.append


def dead_pid():
  child = subprocess.Popen([sys.executable, '-c', 'pass'])
  child.wait()
  return child.pid


def write_lock(workdir, **fields):
  record = dict(pid=os.getpid(), hostname=socket.gethostname(),
                boot_id=workdir_lock._boot_id(),  # pylint: disable=protected-access
                proc_start=workdir_lock._proc_start(os.getpid()),  # pylint: disable=protected-access
                started_at='2024-01-01T00:00:00+00:00', argv=['train.py'], token='x')
  record.update(fields)
  (workdir / '.lock').write_text(json.dumps(record))


def test_lock_holds_the_record_and_release_removes_it(tmp_path):
  with WorkdirLock(str(tmp_path / 'run')) as lock:
    record = workdir_lock.read_lock(str(tmp_path / 'run'))
    assert record['pid'] == os.getpid()
    assert record['hostname'] == socket.gethostname()
    assert record['argv'] == sys.argv
    assert lock.held
    assert sorted(os.listdir(tmp_path / 'run')) == ['.lock']  # No temporary left.
  assert not lock.held
  assert os.listdir(tmp_path / 'run') == []
  with WorkdirLock(str(tmp_path / 'run')):  # Free again.
    pass


def test_second_acquire_in_the_same_process_is_refused(tmp_path):
  with WorkdirLock(str(tmp_path)):
    with pytest.raises(WorkdirInUse) as error:
      WorkdirLock(str(tmp_path)).acquire()
  message = str(error.value)
  assert '\n' not in message
  assert f'workdir {tmp_path} is in use by pid {os.getpid()} on host {socket.gethostname()}' \
      in message
  assert 'since ' in message and 'stop that run' in message
  assert error.value.holder['pid'] == os.getpid()


def test_second_acquire_in_another_process_is_refused(tmp_path):
  with WorkdirLock(str(tmp_path)):
    output = try_lock_in_subprocess(tmp_path)
  assert output.startswith(f'IN USE: workdir {tmp_path} is in use by pid {os.getpid()}')
  assert len(output.splitlines()) == 1
  assert try_lock_in_subprocess(tmp_path) == 'OK'  # Released.


def test_live_holder_is_detected_without_flock(tmp_path, monkeypatch):
  """The PID check alone (file systems where flock is a no-op) also refuses."""
  monkeypatch.setattr(workdir_lock, '_flock_held', lambda path: False)
  write_lock(tmp_path)  # This very process, alive.
  with pytest.raises(WorkdirInUse):
    WorkdirLock(str(tmp_path)).acquire()


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
  pid = dead_pid()
  write_lock(tmp_path, pid=pid, proc_start=None)
  messages, warn = warnings_list()
  with WorkdirLock(str(tmp_path), warn=warn) as lock:
    assert workdir_lock.read_lock(str(tmp_path))['pid'] == os.getpid()
    assert lock.previous_holder['pid'] == pid
  assert len(messages) == 1
  assert f'from pid {pid} on host {socket.gethostname()}' in messages[0]
  assert f'process {pid} is dead' in messages[0]
  assert os.listdir(tmp_path) == []  # The stale file was removed, not left aside.


def test_recycled_pid_is_not_taken_for_the_holder(tmp_path):
  # Our own PID (alive) but a different process start time: the PID was reused.
  start = workdir_lock._proc_start(os.getpid())  # pylint: disable=protected-access
  if start is None:
    pytest.skip('no /proc on this platform')
  write_lock(tmp_path, proc_start=start - 1)
  messages, warn = warnings_list()
  with WorkdirLock(str(tmp_path), warn=warn):
    pass
  assert 'its PID now belongs to another process' in messages[0]


def test_lock_from_before_a_reboot_is_taken_over(tmp_path):
  if workdir_lock._boot_id() is None:  # pylint: disable=protected-access
    pytest.skip('no boot id on this platform')
  write_lock(tmp_path, boot_id='another-boot')
  messages, warn = warnings_list()
  with WorkdirLock(str(tmp_path), warn=warn):
    pass
  assert 'rebooted' in messages[0]


@pytest.mark.parametrize('content', ['', '{"pid": ', '[]', '{"hostname": "h"}'])
def test_corrupt_lock_file_is_taken_over(tmp_path, content):
  (tmp_path / '.lock').write_text(content)
  messages, warn = warnings_list()
  with WorkdirLock(str(tmp_path), warn=warn):
    assert workdir_lock.read_lock(str(tmp_path))['pid'] == os.getpid()
  assert 'unreadable or corrupt' in messages[0]


def test_lock_from_another_host_needs_staleness_or_override(tmp_path):
  write_lock(tmp_path, hostname='elsewhere', pid=1)
  with pytest.raises(WorkdirInUse) as error:
    WorkdirLock(str(tmp_path), override_hint='pass --override_lock').acquire()
  message = str(error.value)
  assert 'in use by pid 1 on host elsewhere' in message
  assert 'cannot be checked from here' in message and 'pass --override_lock' in message
  # A recent heartbeat: still refused with a staleness limit.
  with pytest.raises(WorkdirInUse):
    WorkdirLock(str(tmp_path), stale_after_secs=3600).acquire()
  # An old heartbeat: taken over.
  old = time.time() - 7200
  os.utime(tmp_path / '.lock', (old, old))
  messages, warn = warnings_list()
  with WorkdirLock(str(tmp_path), stale_after_secs=3600, warn=warn):
    pass
  assert 'last heartbeat is 7200 s old' in messages[0]
  # Override: taken over whatever its age.
  write_lock(tmp_path, hostname='elsewhere', pid=1)
  messages, warn = warnings_list()
  with WorkdirLock(str(tmp_path), override=True, warn=warn):
    pass
  assert 'override requested' in messages[0]


def test_refresh_updates_the_heartbeat(tmp_path):
  with WorkdirLock(str(tmp_path)) as lock:
    old = time.time() - 100
    os.utime(lock.path, (old, old))
    lock.refresh()
    assert time.time() - os.stat(lock.path).st_mtime < 50


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path):
  messages, warn = warnings_list()
  lock = WorkdirLock(str(tmp_path), warn=warn).acquire()
  os.remove(lock.path)  # E.g. removed by hand, and another run locked the workdir since.
  write_lock(tmp_path, token='someone else')
  lock.release()
  assert workdir_lock.read_lock(str(tmp_path))['token'] == 'someone else'
  assert 'leaving it' in messages[0]


def test_finalizer_works_when_module_globals_are_gone(tmp_path, monkeypatch):
  # At interpreter shutdown a module's globals may already be None when a lock that was never
  # released is collected; the finalizer must still drop the file descriptor, silently.
  lock = WorkdirLock(str(tmp_path))
  lock.acquire()
  fd = lock._fd
  monkeypatch.setattr(workdir_lock, 'os', None)
  lock.__del__()
  monkeypatch.undo()
  with pytest.raises(OSError):
    os.fstat(fd)  # Closed by the finalizer.
  lock._fd = None
