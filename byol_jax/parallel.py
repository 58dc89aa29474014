"""The device mesh, the mapped training step and global batch assembly.

The per-device step (named axis `byol_experiment.AXIS`) is mapped over a 1-D mesh of every
device of every process with `jax.shard_map`: what `jax.pmap` itself is built on in current JAX.
State is replicated; the batch is split along its leading axis.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from byol_jax.byol_experiment import AXIS


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
  """Places a host tree (identical on every process) replicated over the mesh."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def global_batch(host_batch, mesh: Mesh):
  """This process's share of the batch -> global arrays split over the mesh's devices."""
  sharding = NamedSharding(mesh, P(AXIS))
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), host_batch)
