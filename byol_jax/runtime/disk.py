"""Disk full while saving: one clear error, and a refusal before a save that cannot fit.

Self-contained (standard library only). API:

  DiskFullError(directory, free_bytes, detail)   an OSError (errno ENOSPC), str() is one line
  is_disk_full(error) -> bool          ENOSPC / EDQUOT anywhere in the exception's chain
  as_disk_full(error, directory) -> DiskFullError | None
  with disk_full_as_error(directory): ...   re-raises a disk-full error as DiskFullError
  free_bytes(directory) -> int          space available to this user (shutil.disk_usage)
  directory_size(path) -> int           bytes of the files under `path`
  check_free_space(directory, needed_bytes, what=...)   DiskFullError before starting a save

Why both. Checkpoints are written into a temporary directory and renamed when complete, so a
save that runs out of space never damages the previous checkpoint; and Orbax deletes the
checkpoints beyond `max_to_keep` (preservation policy) only after the new one is finalized
(`CheckpointManager._finalize`: it waits for the write, which re-raises its error, before
`_checkpoint_deleter.delete_steps`). So an ENOSPC costs no checkpoint, only the hours of
training since the last one if the run then dies; `check_free_space` with the previous
checkpoint's size stops it before it tries, with the previous checkpoint intact.

Orbax writes arrays through TensorStore (C++): its I/O errors arrive as ValueError / other
exceptions whose text holds the OS message ("No space left on device"), not as OSError with
an errno, often wrapped (async threads, ExceptionGroup). `is_disk_full` therefore walks
__cause__, __context__ and ExceptionGroup members, and matches errno or the OS message.
"""

import contextlib
import errno
import os
import shutil
from typing import Optional

DISK_FULL_ERRNOS = tuple(
    code for code in (errno.ENOSPC, getattr(errno, 'EDQUOT', None)) if code is not None)
_DISK_FULL_TEXTS = tuple(os.strerror(code) for code in DISK_FULL_ERRNOS)


def _human(n: float) -> str:
  for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
    if abs(n) < 1024 or unit == 'TiB':
      return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
    n /= 1024
  return f'{n:.1f} TiB'


def _existing_ancestor(path: str) -> str:
  path = os.path.abspath(path)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  return path


def free_bytes(directory: str) -> int:
  """Bytes available to this user on the file system of `directory` (or of its nearest
  existing ancestor when it does not exist yet)."""
  return shutil.disk_usage(_existing_ancestor(directory)).free


def directory_size(path: str) -> int:
  """Total size of the regular files under `path` (0 when it does not exist)."""
  total = 0
  for root, _, files in os.walk(path):
    for name in files:
      try:
        total += os.lstat(os.path.join(root, name)).st_size
      except OSError:
        pass
  return total


class DiskFullError(OSError):
  """No space (or quota) left to write under `directory`. `str()` is one line."""

  def __init__(self, directory: str, free: Optional[int], detail: str):
    self.directory = directory
    self.free_bytes = free
    free_text = 'unknown' if free is None else _human(free)
    self.message = ' '.join(f'disk full: {detail}; {free_text} free in {directory}.'.split())
    super().__init__(errno.ENOSPC, self.message)

  def __str__(self):
    return self.message

  def __reduce__(self):
    return (type(self), (self.directory, self.free_bytes, self.message))


def _chain(error: BaseException):
  """`error` and every exception it wraps (cause, context, ExceptionGroup members)."""
  seen, stack = set(), [error]
  while stack:
    e = stack.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    yield e
    stack.extend((e.__cause__, e.__context__))
    stack.extend(getattr(e, 'exceptions', ()) or ())


def is_disk_full(error: BaseException) -> bool:
  for e in _chain(error):
    if isinstance(e, DiskFullError):
      return True
    if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
      return True
    if any(text in str(e) for text in _DISK_FULL_TEXTS):
      return True
  return False


def _free_or_none(directory: str) -> Optional[int]:
  try:
    return free_bytes(directory)
  except OSError:
    return None


def as_disk_full(error: BaseException, directory: str,
                 what: str = 'writing failed') -> Optional[DiskFullError]:
  """A DiskFullError for `error` if it is a disk-full error, else None."""
  if not is_disk_full(error):
    return None
  for e in _chain(error):
    if isinstance(e, DiskFullError):
      return e
  reason = next((text for e in _chain(error) for text in _DISK_FULL_TEXTS if text in str(e)
                 or (isinstance(e, OSError) and e.strerror == text)), _DISK_FULL_TEXTS[0])
  return DiskFullError(directory, _free_or_none(directory), f'{what} ({reason})')


@contextlib.contextmanager
def disk_full_as_error(directory: str, what: str = 'writing failed'):
  """Re-raises any disk-full error from the body as a one-line DiskFullError (chained to the
  original); other errors pass through unchanged."""
  try:
    yield
  except DiskFullError:
    raise
  except BaseException as e:  # pylint: disable=broad-except
    converted = as_disk_full(e, directory, what)
    if converted is None:
      raise
    raise converted from e


def check_free_space(directory: str, needed_bytes: int, what: str = 'a checkpoint'):
  """Raises DiskFullError when fewer than `needed_bytes` are free for `directory`.

  Call before a save with the size of the previous checkpoint (`directory_size`): the new one
  is about as large, and failing here, before writing anything, keeps the previous checkpoint
  untouched and makes the run stop with a clear message instead of a write error.
  """
  free = free_bytes(directory)
  if free < needed_bytes:
    raise DiskFullError(directory, free,
                        f'not saving {what}, which needs about {_human(needed_bytes)}')
