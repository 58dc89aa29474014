"""Multi-process start-up: `jax.distributed.initialize` for TPU pods, GPU clusters and SLURM.

JAX is multi-controller: the same program runs once per host (or per GPU), every process
drives only its local devices, and collectives inside the jitted step span all of them. This
module connects the processes before anything touches a device. See docs/multihost.md.

When it initialises (`--distributed`, default `auto`):

* explicit settings, from flags or the environment, win:
  `--coordinator_address` (or `JAX_COORDINATOR_ADDRESS`, which JAX itself also reads),
  `--num_processes` (`JAX_NUM_PROCESSES`), `--process_id` (`JAX_PROCESS_ID`);
* otherwise, in `auto`, a cluster JAX can describe by itself: a Cloud TPU VM (single host or
  pod), a SLURM step with more than one task, an Open MPI job with more than one rank. JAX then
  fills in whatever was not given;
* `--distributed=on` always initialises (and fails if nothing describes the cluster);
  `--distributed=off` never does (one process, whatever the environment says).

Bad input fails with one line instead of a hang or a C++ abort: an unreachable coordinator
(`RuntimeError` after `--distributed_timeout` seconds), a process id outside the process count,
or a process count / device count that disagree with what JAX found (`ValueError`).
"""

import dataclasses
import os
import socket
import sys
import time
from typing import Optional

from absl import flags
import jax

_MODE = flags.DEFINE_enum(
    'distributed', 'auto', ['auto', 'on', 'off'],
    'Multi-process start-up: auto (when flags, environment or a TPU/SLURM/MPI cluster ask for '
    'it), on (always call jax.distributed.initialize), off (single process).')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None,
    'host:port of process 0, identical on every process (env JAX_COORDINATOR_ADDRESS). '
    'Auto-detected on TPU pods and SLURM.')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Total number of processes (env JAX_NUM_PROCESSES).')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'This process, 0..num_processes-1 (env JAX_PROCESS_ID).')
_TIMEOUT = flags.DEFINE_integer(
    'distributed_timeout', 300,
    'Seconds to wait for the coordinator and for every process to join before failing.')

# Environment fallbacks. JAX reads only the first itself; the other two are this project's, so
# that launchers without flags (containers, k8s manifests) can set everything the same way.
ENV_COORDINATOR = 'JAX_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'JAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'JAX_PROCESS_ID'


class DistributedError(RuntimeError):
  """The processes could not be connected (unreachable coordinator, missing settings)."""


@dataclasses.dataclass(frozen=True)
class Settings:
  mode: str = 'auto'  # auto | on | off
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None
  timeout_s: int = 300

  @property
  def explicit(self) -> bool:
    return any(v is not None for v in (self.coordinator_address, self.num_processes,
                                       self.process_id))


def _env_int(name: str, environ) -> Optional[int]:
  value = environ.get(name)
  if value in (None, ''):
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f'{name}={value!r} must be an integer.') from None


def settings_from_flags(environ=None) -> Settings:
  """Flags first, then the environment (flags must already be parsed, as under app.run)."""
  environ = os.environ if environ is None else environ
  # Unparsed flags (a library caller, tests) read as their defaults instead of raising.
  value = lambda flag: flag.value if flags.FLAGS.is_parsed() else flag.default
  pick = lambda flag_value, env_value: flag_value if flag_value is not None else env_value
  return Settings(
      mode=value(_MODE),
      coordinator_address=pick(value(_COORDINATOR), environ.get(ENV_COORDINATOR) or None),
      num_processes=pick(value(_NUM_PROCESSES), _env_int(ENV_NUM_PROCESSES, environ)),
      process_id=pick(value(_PROCESS_ID), _env_int(ENV_PROCESS_ID, environ)),
      timeout_s=value(_TIMEOUT))


def detect_cluster(environ=None) -> Optional[str]:
  """Names a cluster JAX can auto-configure, or None. Reads only the environment.

  Mirrors the checks of JAX's own cluster detection, restricted to jobs that really have
  more than one process (a one-task SLURM allocation stays single-process).
  """
  environ = os.environ if environ is None else environ
  # Set at `import jax` by JAX's own TPU start-up when this host has TPU chips and libtpu; JAX
  # then finds the pod's workers and this worker's id from the TPU metadata.
  from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
  if getattr(cloud_tpu_init, 'running_in_cloud_tpu_vm', False):
    return 'tpu'
  # Inside `srun` (a job step), not merely inside an allocation: only then do all tasks run
  # this program, and SLURM_STEP_NODELIST names the coordinator's host.
  if 'SLURM_STEP_NODELIST' in environ and (_env_int('SLURM_NTASKS', environ) or 1) > 1:
    return 'slurm'
  if (_env_int('OMPI_COMM_WORLD_SIZE', environ) or 1) > 1:
    return 'ompi'
  return None


def should_initialize(settings: Settings, environ=None) -> Optional[str]:
  """Why this run is multi-process (a short reason), or None for a single process."""
  if settings.mode == 'off':
    return None
  if settings.num_processes == 1 and settings.coordinator_address is None:
    return None  # Explicitly one process: nothing to connect.
  if settings.explicit:
    return 'flags/environment'
  cluster = detect_cluster(environ)
  if cluster:
    return f'{cluster} cluster'
  if settings.mode == 'on':
    return '--distributed=on'
  return None


def validate(settings: Settings):
  """One-line errors for settings that cannot describe a job, before any connection."""
  n, pid = settings.num_processes, settings.process_id
  if n is not None and n < 1:
    raise ValueError(f'num_processes must be >= 1, got {n}.')
  if pid is not None and pid < 0:
    raise ValueError(f'process_id must be >= 0, got {pid}.')
  if n is not None and pid is not None and pid >= n:
    raise ValueError(f'process_id={pid} is out of range for num_processes={n} '
                     f'(ids are 0..{n - 1}).')
  if settings.timeout_s <= 0:
    raise ValueError(f'distributed_timeout must be positive, got {settings.timeout_s}.')
  if settings.coordinator_address is not None:
    _split_address(settings.coordinator_address)


def _split_address(address: str):
  host, sep, port = address.rpartition(':')
  if not sep or not host or not port.isdigit():
    raise ValueError(f'coordinator_address={address!r} must be host:port, e.g. 10.0.0.1:1234.')
  return host.strip('[]'), int(port)  # [::1]:1234 -> ::1


def wait_for_coordinator(address: str, timeout_s: float, process_id=None, num_processes=None):
  """Returns once a TCP connection to `address` succeeds; DistributedError after `timeout_s`.

  JAX's own client aborts the whole process (a C++ CHECK, no Python exception) when it cannot
  register with the coordinator, with a message blaming "another task". Probing first turns
  the commonest launch mistake — process 0 not started, wrong host or port, a firewall — into
  an error that names the address.
  """
  host, port = _split_address(address)
  deadline = time.monotonic() + timeout_s
  last_error = None
  while True:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
      break
    try:
      with socket.create_connection((host, port), timeout=min(remaining, 5.0)):
        return
    except OSError as e:  # Refused (not up yet), unresolvable, unreachable: retry until due.
      last_error = e
    time.sleep(min(0.5, max(deadline - time.monotonic(), 0)))
  who = '' if process_id is None else f' (process {process_id} of {num_processes})'
  raise DistributedError(
      f'Could not reach the coordinator at {address} within {timeout_s:g}s{who}: {last_error}. '
      f'Check that process 0 is running with the same --coordinator_address and that the port '
      f'is open from this host.')


def check_topology(num_processes=None, process_id=None):
  """Errors naming the values when JAX's view disagrees with the launch, or devices are uneven.

  Each process feeds batch_size // process_count examples split over its local devices, so
  every process must see the same number of devices.
  """
  count, index = jax.process_count(), jax.process_index()
  if num_processes is not None and count != num_processes:
    raise ValueError(f'num_processes={num_processes} but JAX connected {count} processes.')
  if process_id is not None and index != process_id:
    raise ValueError(f'process_id={process_id} but JAX reports process_index={index}.')
  local, total = jax.local_device_count(), jax.device_count()
  if total != local * count:
    raise ValueError(
        f'Uneven devices: process {index} has {local} local devices but {total} devices over '
        f'{count} processes is not {count} x {local}; every process must see the same number '
        f'of devices (check JAX_LOCAL_DEVICE_IDS / CUDA_VISIBLE_DEVICES / '
        f'--xla_force_host_platform_device_count).')


def initialize(settings: Settings, environ=None, log=True) -> bool:
  """Connects the processes if `settings`/the environment ask for it; True if multi-process.

  Must run before any JAX call that initialises a backend (jax.devices, device_put, jit).
  """
  validate(settings)
  reason = should_initialize(settings, environ)
  if reason is None:
    return False
  if jax.distributed.is_initialized():  # Already connected by the caller (e.g. a notebook).
    check_topology(settings.num_processes, settings.process_id)
    return True
  if settings.process_id not in (None, 0) and settings.coordinator_address:
    wait_for_coordinator(settings.coordinator_address, settings.timeout_s,
                         settings.process_id, settings.num_processes)
  # CPU processes (tests, CPU clusters) need a cross-process collectives backend; gloo ships
  # with jaxlib. Only filled in when unset, so JAX_CPU_COLLECTIVES_IMPLEMENTATION=mpi wins.
  if jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if log:
    print(f'distributed ({reason}): process {_or_auto(settings.process_id)} of '
          f'{_or_auto(settings.num_processes)}, coordinator '
          f'{_or_auto(settings.coordinator_address)}; waiting up to {settings.timeout_s}s for '
          f'all processes to join (JAX aborts with DEADLINE_EXCEEDED if one never does).',
          file=sys.stderr, flush=True)
  try:
    jax.distributed.initialize(
        coordinator_address=settings.coordinator_address,
        num_processes=settings.num_processes, process_id=settings.process_id,
        initialization_timeout=settings.timeout_s)
  except ValueError as e:  # JAX's "should be defined": nothing described the cluster.
    raise DistributedError(
        f'jax.distributed.initialize failed ({e}) with coordinator_address='
        f'{settings.coordinator_address}, num_processes={settings.num_processes}, '
        f'process_id={settings.process_id} and no TPU/SLURM/MPI cluster detected: pass all '
        f'three flags (or --distributed=off).') from None
  check_topology(settings.num_processes, settings.process_id)
  if log and jax.process_index() == 0:
    print(f'distributed: {jax.process_count()} processes x {jax.local_device_count()} '
          f'{jax.devices()[0].platform} devices = {jax.device_count()} devices.',
          file=sys.stderr, flush=True)
  return True


def initialize_from_flags() -> bool:
  return initialize(settings_from_flags())


def _or_auto(value):
  return 'auto' if value is None else value
