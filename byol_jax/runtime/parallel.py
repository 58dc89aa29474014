"""The device mesh, the mapped training step, global batch assembly and gathering rows from
every process.

The per-device step (named axis `core.axis.AXIS`) is mapped over a 1-D mesh of every
device of every process with `jax.shard_map`: what `jax.pmap` itself is built on in current JAX.
State is replicated; the batch is split along its leading axis.
"""

import hashlib
import math

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


# Gathering passes through device memory (every local device of every process receives the
# whole gathered piece), so a large bank (ImageNet: 1.28M x 2048 float32, 10 GB) goes in pieces.
GATHER_BYTES = 256 << 20


def gather_rows(local, max_bytes: int = GATHER_BYTES):
  """Every process's rows of `local` (a tuple of arrays with one leading length per process),
  concatenated in process order: the same tuple of numpy arrays on every process.

  Processes may hold different numbers of rows (an uneven last shard): each pads its rows to
  the longest count, and the padding is cut off again per process, so no row is dropped or
  repeated. With one process, `local` is returned as it is.
  """
  local = tuple(np.asarray(x) for x in local)
  count = jax.process_count()
  if count == 1:
    return local
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  counts = np.asarray(multihost_utils.process_allgather(np.int32(len(local[0])))).reshape(-1)
  most = int(counts.max())
  if most == 0:
    return local
  row_bytes = sum(math.prod(x.shape[1:]) * x.dtype.itemsize for x in local)
  piece = max(1, min(most, max_bytes // max(count * row_bytes, 1)))
  pieces = math.ceil(most / piece)
  # One shape for every call (the last piece padded too): the gather compiles once.
  padded = tuple(np.concatenate([x, np.zeros((pieces * piece - len(x),) + x.shape[1:], x.dtype)])
                 for x in local)
  gathered = [multihost_utils.process_allgather(tuple(x[i * piece:(i + 1) * piece]
                                                      for x in padded))
              for i in range(pieces)]  # Each: a tuple of [processes, piece, ...] arrays.
  return tuple(
      np.concatenate([np.concatenate([np.asarray(g[j][p]) for g in gathered])[:counts[p]]
                      for p in range(count)])
      for j in range(len(local)))
