"""A stand-in for Google Cloud Storage that needs no network, for tests of gs:// workdirs.

`install(monkeypatch, root)` sends every `gs://BUCKET/KEY` to `root/BUCKET/KEY`:
  * etils.epath's gs:// paths (storage.py and Orbax's own file operations) get a backend that
    follows object-storage rules: an object written through `open` appears only once it is
    closed (it is staged elsewhere, then moved in whole) and there is no append mode;
  * TensorStore (Orbax's array writes, object_lock.py's conditional writes) gets its `file`
    driver at the same place instead of the `gcs` driver (Orbax's `get_kvstore_for_gcs` and
    `storage.kvstore_spec` are patched), and Orbax's hierarchical-namespace probe answers no.
So Orbax runs its GCS code path (a checkpoint is finalised by a `commit_success.txt` file,
not by renaming a temporary directory). What it does not imitate: TensorStore's `gcs` driver
itself, GCS's HTTP errors and latency, and directories (here they are real ones).

`FakeGcs.operations` lists (operation, gs path) for every epath call, so a test can show
that a file went through the object-storage route.
"""

import io
import os
import pathlib
import shutil
import uuid

from etils import epath
from etils.epath import backend as backend_lib
from etils.epath import gpath


class FakeGcs(backend_lib.Backend):
  """An epath backend for gs:// over a local directory (see the module docstring)."""

  def __init__(self, root: str):
    self.root = pathlib.Path(os.path.abspath(root))
    self.staging = os.path.join(self.root, '.staging')  # Outside every bucket's listing.
    os.makedirs(self.staging, exist_ok=True)
    self.operations = []
    self._os = backend_lib.os_backend

  def local(self, path) -> str:
    path = os.fspath(path)
    assert path.startswith('gs://'), path
    return os.path.join(self.root, path[len('gs://'):])

  def url(self, local: str) -> str:
    return 'gs://' + os.path.relpath(local, self.root)

  def _log(self, operation, path):
    self.operations.append((operation, os.fspath(path)))

  def open(self, path, mode):
    self._log('open_' + mode, path)
    if 'a' in mode or '+' in mode:
      raise NotImplementedError(f'object storage cannot open {path} in mode {mode!r}')
    if 'w' in mode:
      return _Upload(self.local(path), os.path.join(self.staging, uuid.uuid4().hex), mode)
    return self._os.open(self.local(path), mode)

  def exists(self, path):
    self._log('exists', path)
    return self._os.exists(self.local(path))

  def isdir(self, path):
    self._log('isdir', path)
    return self._os.isdir(self.local(path))

  def listdir(self, path):
    self._log('listdir', path)
    return self._os.listdir(self.local(path))

  def glob(self, path):
    self._log('glob', path)
    return [self.url(p) for p in self._os.glob(self.local(path))]

  def walk(self, top, *, top_down=True, on_error=None):
    self._log('walk', top)
    for directory, dirs, files in self._os.walk(self.local(top), top_down=top_down,
                                                on_error=on_error):
      yield self.url(os.fspath(directory)), dirs, files

  def makedirs(self, path, *, exist_ok=False, mode=None):
    self._log('makedirs', path)
    self._os.makedirs(self.local(path), exist_ok=exist_ok)

  def mkdir(self, path, *, exist_ok=False, mode=None):
    self._log('mkdir', path)
    self._os.mkdir(self.local(path), exist_ok=exist_ok)

  def rmtree(self, path):
    self._log('rmtree', path)
    self._os.rmtree(self.local(path))

  def remove(self, path):
    self._log('remove', path)
    self._os.remove(self.local(path))

  def rename(self, path, dst):
    self._log('rename', path)
    self._os.rename(self.local(path), self.local(dst))

  def replace(self, path, dst):
    self._log('replace', path)
    self._os.replace(self.local(path), self.local(dst))

  def copy(self, path, dst, overwrite):
    self._log('copy', path)
    self._os.copy(self.local(path), self.local(dst), overwrite)

  def stat(self, path):
    self._log('stat', path)
    return self._os.stat(self.local(path))


class _Upload(io.RawIOBase):
  """A file being uploaded: invisible at its name until closed, then there whole."""

  def __init__(self, final: str, staged: str, mode: str):
    super().__init__()
    self._final, self._staged = final, staged
    self._file = open(staged, 'wb')  # pylint: disable=consider-using-with
    self._text = 'b' not in mode

  def writable(self):
    return True

  def write(self, data):
    self._file.write(data.encode('utf-8') if self._text else data)
    return len(data)

  def close(self):
    if not self.closed:
      self._file.close()
      os.makedirs(os.path.dirname(self._final), exist_ok=True)
      shutil.move(self._staged, self._final)
    super().close()


def install(monkeypatch, root) -> FakeGcs:
  """Routes gs:// to a FakeGcs over `root` for the rest of the test; returns it."""
  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.path import gcs_utils
  from byol_jax.runtime import storage

  fake = FakeGcs(root)
  original = gpath._GPath._backend  # pylint: disable=protected-access
  monkeypatch.setattr(gpath._GPath, '_backend', property(  # pylint: disable=protected-access
      lambda self: fake if self._uri_scheme == 'gs' else original.fget(self)))

  def file_kvstore(path):  # As get_kvstore_for_gcs: the key prefix exactly as given.
    path = str(path)
    local = fake.local(path.rstrip('/'))
    return {'driver': 'file', 'path': local + ('/' if path.endswith('/') else '')}

  monkeypatch.setattr(gcs_utils, 'get_kvstore_for_gcs', file_kvstore)
  monkeypatch.setattr(gcs_utils, 'is_hierarchical_namespace_enabled', lambda path: False)
  real_spec = storage.kvstore_spec
  monkeypatch.setattr(storage, 'kvstore_spec', lambda path: (
      file_kvstore(storage.resolve(path) + '/') if storage.is_remote(path)
      else real_spec(path)))
  assert isinstance(epath.Path('gs://bucket/x')._backend, FakeGcs)  # pylint: disable=protected-access
  return fake
