"""Checkpoint integrity digests (byol_jax/runtime/integrity.py)."""

import gc
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from byol_jax.runtime import integrity


def small_tree():
  rng = np.random.default_rng(0)
  return {
      'params': {'w': rng.standard_normal((64, 32), dtype=np.float32),
                 'b': np.zeros(32, np.float32)},
      'bf16': rng.standard_normal((8, 8)).astype(ml_dtypes.bfloat16),
      'step': np.int32(7),
      'flags': np.array([True, False]),
  }


def test_digest_is_stable_across_calls_and_placements():
  tree = small_tree()
  digest = integrity.tree_digest(tree)
  assert digest.startswith('sha256:') and len(digest) == 7 + 64
  assert integrity.tree_digest(tree) == digest
  assert integrity.tree_digest(jax.tree_util.tree_map(np.copy, tree)) == digest
  for device in jax.devices():  # conftest gives 2 CPU devices.
    assert integrity.tree_digest(jax.device_put(tree, device)) == digest
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('d',))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  assert integrity.tree_digest(jax.device_put(tree, replicated)) == digest
  sharded = jax.device_put(tree['params']['w'], jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec('d')))
  assert integrity.tree_digest(dict(tree, params=dict(tree['params'], w=sharded))) == digest
  # Non-contiguous views hash as their C-order values.
  fortran = dict(tree, params=dict(tree['params'], w=np.asfortranarray(tree['params']['w'])))
  assert integrity.tree_digest(fortran) == digest


@pytest.mark.parametrize('path', ['params/w', 'params/b', 'bf16', 'step', 'flags'])
def test_one_flipped_bit_in_any_leaf_changes_the_digest(path):
  tree = small_tree()
  digest = integrity.tree_digest(tree)
  keys = path.split('/')
  parent = tree
  for key in keys[:-1]:
    parent = parent[key]
  leaf = np.array(parent[keys[-1]])
  raw = leaf.reshape(-1).view(np.uint8)
  raw[raw.size // 2] ^= 1
  parent[keys[-1]] = leaf
  assert integrity.tree_digest(tree) != digest


def test_dtype_shape_and_path_are_part_of_the_digest():
  base = {'a': np.zeros((2, 3), np.float32)}
  digest = integrity.tree_digest(base)
  same_bytes = [
      {'a': np.zeros((2, 3), np.int32)},                  # Dtype.
      {'a': np.zeros((3, 2), np.float32)},                # Shape.
      {'a': np.zeros(6, np.float32)},                     # Rank.
      {'b': np.zeros((2, 3), np.float32)},                # Path.
      {'a': np.zeros((2, 3), np.float16).view(ml_dtypes.bfloat16).astype(np.float32)},
  ]
  assert [integrity.tree_digest(t) == digest for t in same_bytes] == [
      False, False, False, False, True]
  # bfloat16 and float16 share dtype.str-like sizes; their names differ.
  assert (integrity.tree_digest({'a': np.zeros(4, ml_dtypes.bfloat16)})
          != integrity.tree_digest({'a': np.zeros(4, np.float16)}))
  # Moving bytes between leaves changes it (length-prefixed fields).
  assert (integrity.tree_digest({'a': np.zeros(2, np.uint8), 'b': np.zeros(4, np.uint8)})
          != integrity.tree_digest({'a': np.zeros(4, np.uint8), 'b': np.zeros(2, np.uint8)}))


def test_check_against_a_stored_digest():
  tree = small_tree()
  # No digest stored (an older checkpoint): accepted, flagged unverified.
  assert integrity.check_against(tree, None, 'metadata') == (True, False, None)
  assert not integrity.check_against(tree, 'garbage', 'metadata').ok
  stored = integrity.tree_digest(tree)
  assert integrity.check_against(tree, stored, 'm') == (True, True, None)
  tree['params']['b'][0] = 1
  reason = integrity.check_against(tree, stored, 'm').reason
  assert reason is not None and '\n' not in reason and 'do not match the digest in m ' in reason


def largest_file(directory):
  files = [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]
  return max(files, key=os.path.getsize)


def save_checkpoint(directory, tree):
  """Writes `tree` as checkpointing.py does: Orbax, the digest in the step's metadata."""
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      enable_async_checkpointing=False, create=True), item_names=('state',))
  manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(tree)),
               custom_metadata={'sha256': integrity.tree_digest(tree)})
  manager.wait_until_finished()
  manager.close()
  return os.path.join(directory, '1')


def restore_and_verify(directory, target):
  """('accepted'|'rejected: ...'|'restore failed: ...') for the checkpoint of step 1."""
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      read_only=True, create=False), item_names=('state',))
  try:
    restored = manager.restore(1, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target))).state
    stored = manager.metadata(1).custom_metadata['sha256']
  except Exception as e:  # pylint: disable=broad-except
    return f'restore failed: {type(e).__name__}'
  finally:
    manager.close()
  reason = integrity.check_against(restored, stored, 'metadata').reason
  return 'accepted' if reason is None else f'rejected: {reason}'


# A failed TensorStore read leaves objects that Python reports as unraisable; harmless.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.parametrize('damage', ['flip', 'truncate'])
def test_damaged_orbax_checkpoint_is_never_accepted_silently(tmp_path, damage):
  rng = np.random.default_rng(1)
  # Random values: incompressible, so the array file holds their raw bytes.
  tree = {'w': jnp.asarray(rng.standard_normal((256, 256), dtype=np.float32)),
          'b': jnp.zeros(16, jnp.float32)}
  target = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
  directory = str(tmp_path / 'checkpoints')
  step_dir = save_checkpoint(directory, tree)
  assert restore_and_verify(directory, target) == 'accepted'

  victim = largest_file(step_dir)
  data = bytearray(open(victim, 'rb').read())
  if damage == 'flip':
    data[len(data) // 2] ^= 0x10
  else:
    del data[len(data) // 2:]
  with open(victim, 'wb') as f:
    f.write(data)
  outcome = restore_and_verify(directory, target)
  gc.collect()  # Collects the failed read's leftovers here, under this test's filter.
  # Either Orbax/TensorStore itself notices (checksums, decompression, short read), or the
  # digest does; never 'accepted'.
  assert outcome.startswith(('restore failed', 'rejected: its arrays do not match')), outcome
  if damage == 'flip':
    # The middle of the largest file is raw array data: the restore succeeds and only the
    # digest catches the flip (the case this module exists for).
    assert outcome.startswith('rejected'), outcome
