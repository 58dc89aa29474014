"""Disk full while saving (byol_jax/runtime/disk.py)."""

import errno
import os
from collections import namedtuple

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from byol_jax.runtime import disk

Usage = namedtuple('Usage', 'total used free')


def write_file(path, data: bytes):
  fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
  try:
    os.write(fd, data)
  finally:
    os.close(fd)


def raise_oserror(code):
  def write(fd, data):
    del fd, data
    raise OSError(code, os.strerror(code))
  return write


@pytest.mark.parametrize('code', disk.DISK_FULL_ERRNOS)
def test_enospc_during_a_write_becomes_one_line_disk_full_error(tmp_path, monkeypatch, code):
  monkeypatch.setattr(disk.shutil, 'disk_usage', lambda path: Usage(10 << 30, 10 << 30, 3 << 20))
  monkeypatch.setattr(os, 'write', raise_oserror(code))
  with pytest.raises(disk.DiskFullError) as error:
    with disk.disk_full_as_error(str(tmp_path), 'saving the checkpoint of step 7 failed'):
      write_file(tmp_path / 'x', b'data')
  message = str(error.value)
  assert message == (f'disk full: saving the checkpoint of step 7 failed ({os.strerror(code)}); '
                     f'3.0 MiB free in {tmp_path}.')
  assert isinstance(error.value, OSError) and error.value.errno == errno.ENOSPC
  assert error.value.free_bytes == 3 << 20
  assert isinstance(error.value.__cause__, OSError)  # The original stays chained.


def test_other_errors_pass_through(tmp_path, monkeypatch):
  monkeypatch.setattr(os, 'write', raise_oserror(errno.EIO))
  with pytest.raises(OSError) as error:
    with disk.disk_full_as_error(str(tmp_path)):
      write_file(tmp_path / 'x', b'data')
  assert not isinstance(error.value, disk.DiskFullError)
  with pytest.raises(KeyError):
    with disk.disk_full_as_error(str(tmp_path)):
      raise KeyError('x')


def test_wrapped_and_textual_disk_full_errors_are_recognised(tmp_path):
  # TensorStore reports I/O errors as ValueError text, Orbax re-raises them from threads.
  tensorstore_style = ValueError('Error writing local file "/ckpt/d/abc": [OS error 28: '
                                 'No space left on device]')
  assert disk.is_disk_full(tensorstore_style)
  try:
    try:
      raise OSError(errno.ENOSPC, 'No space left on device')
    except OSError as inner:
      raise RuntimeError('background save failed') from inner
  except RuntimeError as outer:
    assert disk.is_disk_full(outer)
  group = ExceptionGroup('commit', [KeyError('a'), OSError(errno.EDQUOT, 'quota')])
  assert disk.is_disk_full(group)
  assert not disk.is_disk_full(ValueError('shape mismatch'))
  assert not disk.is_disk_full(OSError(errno.EACCES, 'Permission denied'))
  converted = disk.as_disk_full(tensorstore_style, str(tmp_path))
  assert 'No space left on device' in str(converted) and '\n' not in str(converted)


def test_check_free_space_refuses_a_save_that_cannot_fit(tmp_path, monkeypatch):
  previous = tmp_path / 'checkpoints' / '1'
  (previous / 'state').mkdir(parents=True)
  (previous / 'state' / 'data').write_bytes(b'\0' * 5000)
  (previous / 'config').write_bytes(b'\0' * 120)
  size = disk.directory_size(str(previous))
  assert size == 5120
  assert disk.directory_size(str(tmp_path / 'absent')) == 0
  disk.check_free_space(str(tmp_path / 'checkpoints' / 'not-yet'), size)  # Real disk: fits.
  monkeypatch.setattr(disk.shutil, 'disk_usage', lambda path: Usage(1 << 30, 1 << 30, 4096))
  with pytest.raises(disk.DiskFullError) as error:
    disk.check_free_space(str(tmp_path / 'checkpoints'), size, 'the checkpoint of step 2')
  assert str(error.value) == (f'disk full: not saving the checkpoint of step 2, which needs '
                              f'about 5.0 KiB; 4.0 KiB free in {tmp_path}/checkpoints.')
  assert os.path.isdir(previous)


# Orbax's background threads may post callbacks to a closed loop after a failed write.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_orbax_keeps_the_previous_checkpoint_when_a_save_hits_enospc(tmp_path, monkeypatch):
  """With max_to_keep=1 Orbax deletes step 1 only after step 2 is finalized: a step-2 save
  that fails with ENOSPC (in the asynchronous commit) leaves step 1 intact and loadable."""
  directory = str(tmp_path / 'checkpoints')

  def manager():
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        max_to_keep=1, enable_async_checkpointing=True, create=True),
        item_names=('state', 'config'))

  def args(value):
    return ocp.args.Composite(state=ocp.args.StandardSave({'w': jnp.full(1000, value)}),
                              config=ocp.args.JsonSave({'value': value}))

  checkpoints = manager()
  checkpoints.save(1, args=args(1.0))
  checkpoints.wait_until_finished()

  async def full_disk(self, x, directory):
    del self, x, directory
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, '_save_fn', full_disk)
  with pytest.raises(disk.DiskFullError) as error:
    with disk.disk_full_as_error(directory, 'saving the checkpoint of step 2 failed'):
      checkpoints.save(2, args=args(2.0))
      checkpoints.wait_until_finished()
  assert str(error.value).startswith('disk full: saving the checkpoint of step 2 failed (No '
                                     'space left on device);')
  monkeypatch.undo()
  checkpoints.close()
  assert sorted(n for n in os.listdir(directory) if n.isdigit()) == ['1']
  checkpoints = manager()
  assert checkpoints.all_steps() == [1]
  restored = checkpoints.restore(1, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(), config=ocp.args.JsonRestore()))
  checkpoints.close()
  assert restored.config == {'value': 1.0}
  np.testing.assert_array_equal(restored.state['w'], np.full(1000, 1.0, np.float32))
