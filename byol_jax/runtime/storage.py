"""Every file of a workdir, on a local disk or in object storage (`gs://`), through one path layer.

Paths are strings. A local path keeps today's behaviour exactly: `os` calls, and atomic writes
through a temporary file that is fsynced and renamed over the target. A path with a scheme
(`gs://bucket/run`, also `s3://`, `az://`, `hf://`) goes through `etils.epath`, the layer Orbax
and TFDS use for the same paths (tf.io.gfile when TensorFlow is installed, else fsspec with
gcsfs / s3fs). `os.path` must never see such a path: `os.makedirs('gs://b/run')` makes a local
directory `gs:` and the run writes nowhere near the bucket.

What differs on object storage, and how this module handles it:
  * an object appears whole once its upload completes, never half-written: an atomic write is
    one upload (`write_bytes`), no temporary name and no rename;
  * there are no appends: `GrowingFile` (metrics.jsonl, TensorBoard events) keeps the file in
    memory and uploads it whole at most every `UPLOAD_EVERY_SECS` and on close, as tf.io.gfile
    does for its GCS files; a killed run loses at most that many seconds of metric rows;
  * there is no file system to ask for free space (disk.py's check is skipped by the caller);
  * there is no O_EXCL, flock or PID to check: the workdir lock uses the conditional writes of
    TensorStore, the library that writes Orbax's arrays (object_lock.py, `kvstore_spec`);
  * renaming a directory copies and deletes its objects: not atomic (used only to move an
    unreadable checkpoint aside).

API: is_remote, resolve, join, dirname, basename, exists, isdir, listdir, makedirs, remove,
rename, open, read_bytes, read_text, write_bytes, write_text, write_json, local_file,
GrowingFile, kvstore_spec.
"""

import contextlib
import io
import json
import os
import re
import shutil
import tempfile
import time
from typing import Iterator, Optional
from urllib import parse

from etils import epath

# How often a GrowingFile on object storage is uploaded whole (and always on close).
UPLOAD_EVERY_SECS = 30.0

_SCHEME = re.compile(r'^([A-Za-z][A-Za-z0-9+.-]*)://')


def is_remote(path: str) -> bool:
  """True for a URL with a scheme (`gs://bucket/x`); False for a local path."""
  return _SCHEME.match(os.fspath(path)) is not None


def _epath(path: str) -> epath.Path:
  """The epath of a URL; ValueError naming the scheme when epath does not know it (it would
  otherwise read `memory://x` as the relative local path `memory:/x`)."""
  path = os.fspath(path)
  try:
    converted = epath.Path(path)
  except (KeyError, NotImplementedError):  # epath's error for a scheme it has no class for.
    converted = None
  if converted is None or str(converted) != path.rstrip('/'):
    scheme = _SCHEME.match(path).group(1)
    raise ValueError(f'{path}: unsupported storage scheme {scheme}:// (use a local path or '
                     f'gs://, s3://, az://, hf://).')
  return converted


def resolve(path: str) -> str:
  """The canonical form: an absolute local path, or the URL without a trailing slash."""
  return str(_epath(path)) if is_remote(path) else os.path.abspath(path)


def join(path: str, *names: str) -> str:
  return str(_epath(path).joinpath(*names)) if is_remote(path) else os.path.join(path, *names)


def dirname(path: str) -> str:
  return str(_epath(path).parent) if is_remote(path) else os.path.dirname(path)


def basename(path: str) -> str:
  return _epath(path).name if is_remote(path) else os.path.basename(path)


def exists(path: str) -> bool:
  return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def listdir(path: str) -> list:
  """Names in a directory (FileNotFoundError when it does not exist)."""
  if is_remote(path):
    return [child.name for child in _epath(path).iterdir()]
  return os.listdir(path)


def makedirs(path: str):
  """The directory and its parents (on object storage: placeholder objects, or nothing)."""
  if is_remote(path):
    _epath(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def remove(path: str):
  """Removes a file (FileNotFoundError when there is none)."""
  if is_remote(path):
    _epath(path).unlink()
  else:
    os.remove(path)


def rename(path: str, destination: str):
  """Moves a file or directory; the destination's parent is created. Atomic on a local disk
  only (object storage copies, then deletes)."""
  makedirs(dirname(destination))
  if is_remote(path):
    _epath(path).rename(destination)
  else:
    os.rename(path, destination)


def open(path: str, mode: str = 'r'):  # pylint: disable=redefined-builtin
  """A file object; on object storage a written file appears only when it is closed."""
  if is_remote(path):
    return _epath(path).open(mode)
  return io.open(path, mode)  # pylint: disable=unspecified-encoding


def read_bytes(path: str) -> bytes:
  with open(path, 'rb') as f:
    return f.read()


def read_text(path: str) -> str:
  return read_bytes(path).decode('utf-8')


def write_bytes(path: str, data: bytes):
  """Writes `data` so that `path` is complete or absent, never half-written (parents created).

  Local: a temporary file beside it, fsynced, renamed over it. Object storage: one upload,
  which becomes visible only once complete."""
  makedirs(dirname(path) or '.')
  if is_remote(path):
    _epath(path).write_bytes(data)
    return
  temporary = f'{path}.tmp-{os.getpid()}'
  try:
    with io.open(temporary, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, path)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)


def write_text(path: str, text: str):
  write_bytes(path, text.encode('utf-8'))


def write_json(path: str, value, indent: Optional[int] = 1):
  write_text(path, json.dumps(value, indent=indent))


@contextlib.contextmanager
def local_file(path: str) -> Iterator[str]:
  """A local path holding the file at `path`, for libraries that read only local files
  (safetensors.safe_open, np.load, pickle): `path` itself, or a downloaded temporary copy."""
  if not is_remote(path):
    yield path
    return
  if not exists(path):
    raise FileNotFoundError(f'No file at {path}.')
  suffix = os.path.splitext(basename(path))[1]
  with tempfile.NamedTemporaryFile(suffix=suffix) as copy:
    with open(path, 'rb') as source:
      shutil.copyfileobj(source, copy)
    copy.flush()
    yield copy.name


class GrowingFile:
  """A binary file written by appending: metrics.jsonl, TensorBoard event files.

  Local: the file opened for appending (`append=True`) or anew, flushed at every `flush()`,
  as a plain file. Object storage, which cannot append: the whole content is kept in memory
  (starting from the existing object when `append=True`, e.g. a resumed run's metrics) and
  uploaded whole by `flush()` when `UPLOAD_EVERY_SECS` have passed since the last upload, and
  always by `close()` and `flush(force=True)`.
  """

  def __init__(self, path: str, append: bool = True,
               upload_every_secs: Optional[float] = None):
    self.path = path
    self.remote = is_remote(path)
    self._every = UPLOAD_EVERY_SECS if upload_every_secs is None else upload_every_secs
    makedirs(dirname(path) or '.')
    if self.remote:
      self._buffer = bytearray(read_bytes(path) if append and exists(path) else b'')
      self._uploaded = None  # Never: the first flush uploads.
      self._dirty = not append
      self._file = None
    else:
      self._file = io.open(path, 'ab' if append else 'wb')

  def write(self, data: bytes):
    if self.remote:
      self._buffer += data
      self._dirty = True
    else:
      self._file.write(data)

  def flush(self, force: bool = False):
    if not self.remote:
      self._file.flush()
      return
    due = self._uploaded is None or time.monotonic() - self._uploaded >= self._every
    if self._dirty and (force or due):
      _epath(self.path).write_bytes(bytes(self._buffer))
      self._uploaded, self._dirty = time.monotonic(), False

  def close(self):
    if self.remote:
      self.flush(force=True)
    elif not self._file.closed:
      self._file.close()


def kvstore_spec(path: str) -> dict:
  """The TensorStore key-value store of a directory (what Orbax writes arrays through): the
  `gcs` driver for gs:// (TENSORSTORE_GCS_BACKEND picks another, as in Orbax), `s3` for s3://,
  `file` for a local path. ValueError for other schemes."""
  path = resolve(path)
  if not is_remote(path):
    return {'driver': 'file', 'path': path + '/'}
  url = parse.urlparse(path)
  drivers = {'gs': os.environ.get('TENSORSTORE_GCS_BACKEND', 'gcs'), 's3': 's3'}
  if url.scheme not in drivers:
    raise ValueError(f'{path}: no TensorStore driver for {url.scheme}:// (gs:// and s3:// '
                     f'have one).')
  return {'driver': drivers[url.scheme], 'bucket': url.netloc,
          'path': url.path.lstrip('/') + '/'}
