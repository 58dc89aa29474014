"""The device mesh, the mapped training step and global batch assembly.

The per-device step (named axis `core.axis.AXIS`) is mapped over a 1-D mesh of every
device of every process with `jax.shard_map`: what `jax.pmap` itself is built on in current JAX.
State is replicated; the batch is split along its leading axis.
"""

import hashlib

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from byol_jax.core.axis import AXIS


def make_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (AXIS,))


def check_batch_size(batch_size: int, mesh: Mesh, name: str = 'batch_size'):
  """One-line error, before anything compiles, when the batch cannot be split evenly."""
  devices, processes = mesh.devices.size, jax.process_count()
  if batch_size <= 0 or batch_size % devices or batch_size % processes:
    raise ValueError(f'{name}={batch_size} must be a positive multiple of the device count '
                     f'({devices} devices over {processes} processes).')


def map_step(step_fn, mesh: Mesh, donate_state: bool = True):
  """jit(shard_map(step_fn)): state replicated (P()), batch split on its leading axis."""
  mapped = jax.shard_map(step_fn, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()))
  return jax.jit(mapped, donate_argnums=(0,) if donate_state else ())


def replicate(tree, mesh: Mesh):
  """Places a tree (identical on every process) replicated over the mesh, as fresh buffers.

  Goes through host copies on purpose: `jax.device_put` of a device array may alias its
  buffer (even with may_alias=False over several devices, JAX 0.10), and the step donates
  the state, which would delete the caller's tree (main_loop reuses the initial state for
  the random-init kNN baseline). With several processes each one places its own copy on its
  own devices (no per-leaf cross-process equality check, which costs a collective per leaf)
  and a single digest comparison catches processes that did not start from the same state.
  """
  sharding = NamedSharding(mesh, P())
  host = jax.device_get(tree)
  if jax.process_count() > 1:
    _check_same_on_every_process(host)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_callback(
          np.shape(x), sharding, lambda index: np.array(np.asarray(x)[index])), host)


def _check_same_on_every_process(host_tree):
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  digest = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(host_tree):
    leaf = np.asarray(leaf)
    digest.update(f'{leaf.shape}{leaf.dtype}'.encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
  mine = np.frombuffer(digest.digest(), np.int32)
  everyone = np.asarray(multihost_utils.process_allgather(mine))
  differ = [i for i in range(everyone.shape[0]) if not np.array_equal(everyone[i], everyone[0])]
  if differ:
    raise ValueError(f'Processes {differ} start from a different state than process 0 (a '
                     f'different seed or config?); every process must replicate the same tree.')


def global_batch(host_batch, mesh: Mesh):
  """This process's share of the batch -> global arrays split over the mesh's devices."""
  sharding = NamedSharding(mesh, P(AXIS))
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), host_batch)
