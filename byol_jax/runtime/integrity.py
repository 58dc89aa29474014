"""Checkpoint integrity: a SHA-256 digest of a tree of arrays.

Orbax does not verify array bytes: a flipped bit in an array file restores silently. The
Checkpointer stores `tree_digest(state)` in each step's Orbax metadata (written inside the
step's temporary directory, so it is part of the atomic checkpoint) and checks the restored
state against it:

  tree_digest(tree) -> str                            'sha256:<64 hex digits>'
  check_against(tree, expected, where) -> Verdict     (ok, verified, reason); expected None:
                                                      no digest stored (an older checkpoint)

What is hashed. For every leaf, in the order of `jax.tree_util.tree_flatten_with_path`: its
path (`jax.tree_util.keystr`), its dtype name (`bfloat16`, `float32`, ...: the name, not
`dtype.str`, which is the ambiguous `<V2` for ml_dtypes' types), its shape and its bytes in
C order, each field length-prefixed so that no two different trees hash alike. Leaves are
copied to the host with `np.asarray(jax.device_get(leaf))`, so the digest depends only on the
values, never on the devices or the sharding the arrays live on. Bytes are host order
(little-endian on every platform JAX runs on).

Multi-host: the state is replicated, so every process computes the digest on its own host
copy (identical everywhere: no communication); on restore every process verifies its own copy
and the caller agrees the outcome over processes.
A leaf that is sharded across hosts (not fully addressable and not fully replicated) has no
complete host copy: `tree_digest` raises ValueError for it.

Missing digest. Checkpoints written before this module existed have none: they are accepted
(they cannot be told from good ones, and refusing them would strand every existing run) with
`verified=False`, so that the caller can log "unverified". A stored digest that is not a
digest string is a reason to reject, like a mismatch.
"""

import hashlib
import struct
from typing import NamedTuple, Optional

import jax
import numpy as np

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
