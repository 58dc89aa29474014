"""Checkpoint integrity: a SHA-256 digest of a tree of arrays, stored next to a checkpoint.

Self-contained (standard library, numpy, jax only) so it can be hooked into any checkpoint
writer. API:

  tree_digest(tree) -> str            'sha256:<64 hex digits>'
  write_digest(directory, digest)     `directory/DIGEST_FILE`, written atomically
  read_digest(directory) -> str|None  None when the file is absent (older checkpoints)
  check(tree, directory) -> Verdict   (ok, verified, reason)
  check_against(tree, expected, where) -> Verdict   the same for a digest stored elsewhere,
                                      e.g. Orbax's per-step custom_metadata (None: absent)
  verify(tree, directory) -> str|None None when it matches (or cannot be checked), else a
                                      one-line reason

What is hashed. For every leaf, in the order of `jax.tree_util.tree_flatten_with_path`: its
path (`jax.tree_util.keystr`), its dtype name (`bfloat16`, `float32`, ...: the name, not
`dtype.str`, which is the ambiguous `<V2` for ml_dtypes' types), its shape and its bytes in
C order, each field length-prefixed so that no two different trees hash alike. Leaves are
copied to the host with `np.asarray(jax.device_get(leaf))`, so the digest depends only on the
values, never on the devices or the sharding the arrays live on. Bytes are host order
(little-endian on every platform JAX runs on).

Multi-host: the state is replicated, so every process computes the digest on its own host
copy (identical everywhere: no communication) and process 0 alone writes the file; on restore
every process may verify its own copy (the caller then agrees the outcome over processes).
A leaf that is sharded across hosts (not fully addressable and not fully replicated) has no
complete host copy: `tree_digest` raises ValueError for it.

Missing digest file. Checkpoints written before this module existed have no digest. `verify`
returns None for them (they cannot be told from good ones, and refusing them would strand
every existing run), and `check` reports `verified=False` so that the caller can log
"unverified". A digest file that exists but cannot be parsed is NOT treated as missing: it is
a reason (a damaged checkpoint directory), like a mismatch.
"""

import hashlib
import json
import os
import struct
import tempfile
from typing import NamedTuple, Optional

import jax
import numpy as np

DIGEST_FILE = 'digest.json'
FORMAT = 'byol_jax.tree_digest.v1'
_PREFIX = 'sha256:'


def _host_copy(leaf) -> np.ndarray:
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    if not leaf.is_fully_replicated:
      raise ValueError('tree_digest needs a complete host copy of every leaf; got an array '
                       f'sharded across processes ({leaf.sharding}).')
    leaf = leaf.addressable_shards[0].data
  return np.asarray(jax.device_get(leaf))


def _field(hasher, data: bytes):
  hasher.update(struct.pack('<Q', len(data)))
  hasher.update(data)


def tree_digest(tree) -> str:
  """'sha256:<hex>' of every leaf's path, dtype, shape and bytes (see the module docstring)."""
  hasher = hashlib.sha256()
  hasher.update(FORMAT.encode())
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  hasher.update(struct.pack('<Q', len(leaves)))
  for path, leaf in leaves:
    array = np.ascontiguousarray(_host_copy(leaf))
    _field(hasher, jax.tree_util.keystr(path).encode())
    _field(hasher, array.dtype.name.encode())
    _field(hasher, struct.pack(f'<{array.ndim}Q', *array.shape))
    # A flat uint8 view: hashlib reads it without a copy, whatever the dtype (bfloat16 too).
    data = array.reshape(-1).view(np.uint8)
    hasher.update(struct.pack('<Q', data.size))
    hasher.update(memoryview(data))
  return _PREFIX + hasher.hexdigest()


def _fsync_directory(directory: str):
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return  # Some platforms cannot open directories; the rename is still atomic.
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def write_digest(directory: str, digest: str, **extra):
  """Writes `directory/digest.json` atomically: a temporary file, fsync, rename, fsync of the
  directory. A reader sees either no file or the complete one. `extra` (JSON values) is
  stored alongside, e.g. step=... ."""
  if not digest.startswith(_PREFIX):
    raise ValueError(f'Not a tree_digest: {digest!r}')
  record = dict(format=FORMAT, digest=digest, **extra)
  fd, tmp = tempfile.mkstemp(prefix=f'.{DIGEST_FILE}.', suffix='.tmp', dir=directory)
  try:
    with os.fdopen(fd, 'w') as f:
      json.dump(record, f)
      f.write('\n')
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, DIGEST_FILE))
  except BaseException:
    try:
      os.remove(tmp)
    except OSError:
      pass
    raise
  _fsync_directory(directory)


class DigestFileError(ValueError):
  """The digest file exists but cannot be read or parsed."""


def read_digest(directory: str) -> Optional[str]:
  """The stored digest; None when there is no digest file; DigestFileError when it is damaged."""
  path = os.path.join(directory, DIGEST_FILE)
  try:
    with open(path) as f:
      text = f.read()
  except FileNotFoundError:
    return None
  except OSError as e:
    raise DigestFileError(f'{path} cannot be read ({e.strerror or e})') from e
  try:
    record = json.loads(text)
    digest = record['digest']
    if record.get('format') != FORMAT or not (isinstance(digest, str)
                                             and digest.startswith(_PREFIX)):
      raise ValueError(f'unknown format {record.get("format")!r}')
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise DigestFileError(f'{path} is not a valid digest file ({e})') from e
  return digest


class Verdict(NamedTuple):
  ok: bool                # Accept the checkpoint.
  verified: bool          # A digest was found and compared (False: an older checkpoint).
  reason: Optional[str]   # One line when not ok.


def check_against(tree, expected: Optional[str], where: str) -> Verdict:
  """Compares `tree` with `expected` (None: no digest was stored, an older checkpoint);
  `where` names the digest's location in the reason."""
  if expected is None:
    return Verdict(True, False, None)
  if not (isinstance(expected, str) and expected.startswith(_PREFIX)):
    return Verdict(False, False, f'the digest in {where} is not valid ({expected!r:.40})')
  actual = tree_digest(tree)
  if actual != expected:
    return Verdict(False, True, f'its arrays do not match the digest in {where} (stored '
                                f'{expected[:19]}..., restored {actual[:19]}...)')
  return Verdict(True, True, None)


def check(tree, directory: str) -> Verdict:
  """Compares `tree` (as restored) with the digest stored in `directory`."""
  try:
    expected = read_digest(directory)
  except DigestFileError as e:
    return Verdict(False, False, str(e))
  return check_against(tree, expected, os.path.join(directory, DIGEST_FILE))


def verify(tree, directory: str) -> Optional[str]:
  """None when `tree` matches the digest in `directory` (or there is none: see `check` for the
  `verified` flag), else a one-line reason to reject the checkpoint."""
  return check(tree, directory).reason
