"""Checkpoints: Orbax save and exact resume, preemption signals, corrupt-checkpoint fallback.

Layout: `workdir/checkpoints/<step>/` holds two Orbax items,
  * `state`: the whole `TrainState` (online and target params, both BatchNorm states, the
    optimizer state and the step). Nothing else is needed to continue the run exactly: every
    batch (its order and its augmentation draws) is a pure function of (config.seed, step)
    (datasets.py), and the LR and tau schedules are functions of the step;
  * `config`: the config as JSON, checked against the current one on resume.

Atomicity comes from Orbax: a checkpoint is written into `<step>.orbax-checkpoint-tmp` and
renamed to `<step>` only once complete, so a save cut short (SIGKILL, full disk) leaves a
temporary directory that is never taken for a checkpoint (and is removed at the next start).
Saves are asynchronous: the arrays are copied to host memory before `save` returns (so the
next, buffer-donating step cannot change them) and written by a background thread while
training continues. Every process calls `save`; Orbax writes replicated arrays once and
synchronises the processes.

Longer than ~400 lines because the Checkpointer's save, restore and corrupt-checkpoint fallback
share its state and its multi-process agreement helpers; the config comparison and the
StopSignals / SaveSchedule classes at the end could move to a module of their own.
"""

import datetime
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from byol_jax.runtime import disk, integrity, object_lock, parallel, storage, workdir_lock

CHECKPOINT_DIR = 'checkpoints'
# On object storage Orbax writes `<step>/` in place and marks it complete with this file.
COMMIT_FILE = 'commit_success.txt'

# Config keys that may change between a run and its resumption without changing the run itself:
# how often to log and save, how many checkpoints to keep, where the data lives, the kNN
# reports (they read the state, never change it). A key listed here covers every key below it.
RESUME_MAY_DIFFER = (
    'log_every_steps',
    'knn_every_steps',
    'checkpoint_every_steps',
    'checkpoint_every_secs',
    'keep_checkpoints',
    'restart_from_scratch',
    'lock_stale_after_secs',
    'final_knn',
    'eval_every_steps',
    'final_eval',
    'eval_batch_size',
    'data.data_dir',
    'data.eval_crop_fraction',  # How evaluation crops; training never reads it.
    # Evaluation (configs/eval.py): the pretrained encoder's path; the encoder itself is
    # identified by its digest (evaluation/classifier_checkpoints.py), which may not differ.
    'checkpoint',
)


# Training keys added after runs were saved without them: the value that reproduces how such a
# run trained, so that it resumes (and a different value is still a difference).
BEHAVED_AS_WHEN_ABSENT = {
    'augment.view_size': 0,  # Views were image_size.
}


class CheckpointError(ValueError):
  """A checkpoint could not be written or resumed.

  A ValueError so that `main_loop.main` reports it as a one-line `error: ...`.
  """


def _is_primary() -> bool:
  return jax.process_index() == 0


def _say(message: str):
  if _is_primary():
    print(message, flush=True)


def _warn(message: str):
  if _is_primary():
    print(f'warning: {message}', file=sys.stderr, flush=True)


def _sync(name: str):
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'byol_checkpointing_{name}')


class _OrbaxInfoFilter(logging.Filter):
  """Drops Orbax's INFO lines (dozens per save) and its warnings about read-only managers,
  which are how export and evaluation read checkpoints on purpose; keeps real warnings."""

  BENIGN = ('CheckpointManagerOptions.read_only=True', 'Given directory is read only')

  def filter(self, record):
    if f'{os.sep}orbax{os.sep}' not in record.pathname:
      return True
    return record.levelno >= logging.WARNING and not str(record.msg).startswith(self.BENIGN)


def _quiet_orbax():
  logger = logging.getLogger('absl')  # Orbax logs through absl's Python logger.
  if not any(isinstance(f, _OrbaxInfoFilter) for f in logger.filters):
    logger.addFilter(_OrbaxInfoFilter())


def _all_processes(flag: bool) -> bool:
  """`flag` and-ed over processes (a collective: every process must call it)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.all(multihost_utils.process_allgather(np.int32(flag))))


def one_line(error, limit: int = 300) -> str:
  """An error (or any text) on one line of at most ~`limit` characters, for messages."""
  text = ' '.join(str(error).split()) or type(error).__name__
  return text if len(text) <= limit else text[:limit] + '...'


# ---------------------------------------------------------------------------------------------
# Config comparison.


def config_to_dict(config) -> dict:
  """A JSON round trip of a ConfigDict (tuples become lists), as stored in a checkpoint."""
  return json.loads(config.to_json())


def _flatten(tree, prefix=''):
  flat = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, dict):
      flat.update(_flatten(value, name + '.'))
    else:
      flat[name] = value
  return flat


def _may_differ(key: str) -> bool:
  return any(key == allowed or key.startswith(allowed + '.') for allowed in RESUME_MAY_DIFFER)


def config_differences(saved: dict, current: dict) -> list:
  """`key (saved -> current)` for every key that differs and may not differ on resume."""
  saved_flat, current_flat = _flatten(saved), _flatten(current)
  missing = '<absent>'
  differences = []
  for key in sorted(set(saved_flat) | set(current_flat)):
    old = saved_flat.get(key, BEHAVED_AS_WHEN_ABSENT.get(key, missing))
    new = current_flat.get(key, missing)
    if old != new and not _may_differ(key):
      differences.append(f'{key} ({_short(old)} -> {_short(new)})')
  return differences


def _short(value, limit=40) -> str:
  text = repr(value) if value != '<absent>' else value
  return text if len(text) <= limit else text[:limit - 3] + '...'


# ---------------------------------------------------------------------------------------------
# Saving and restoring.


def abstract_state(state, sharding):
  """ShapeDtypeStructs of `state` placed with `sharding`: the restore target."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), state)


def train_state_target(shapes, sharding=None):
  """Restore target from a state's shapes and dtypes (`byol_experiment.state_shapes(config)`),
  placed with `sharding` (default: this process's first device)."""
  return abstract_state(shapes, sharding)


@jax.jit
def _all_finite(tree):
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _move_aside(path: str, destination: str):
  """Renames `path` to `destination` on process 0 (never deletes: the user decides)."""
  if _is_primary():
    storage.rename(path, destination)
  _sync('move_aside')


def _timestamp() -> str:
  return datetime.datetime.now().strftime('%Y%m%d-%H%M%S')


class Checkpointer:
  """The run's checkpoints in `workdir/checkpoints`: save, keep the last K, resume.

  Usage (every process):
    checkpoints = Checkpointer(workdir, config)
    start_step, state = checkpoints.restore_or_init(initial_state, mesh)
    ... checkpoints.save(step, state) ...
    checkpoints.close()
  """

  def __init__(self, workdir: str, config, async_save: bool = True):
    self.workdir = workdir
    self.directory = storage.resolve(storage.join(workdir, CHECKPOINT_DIR))
    self.config = config
    self._config_dict = config_to_dict(config)
    for key in ('checkpoint_every_steps', 'checkpoint_every_secs', 'keep_checkpoints'):
      if config[key] < 0:
        raise CheckpointError(f'{key} must be >= 0 (0: off, or keep all), got {config[key]}.')
    _quiet_orbax()
    self._check_writable()
    self._lock = self._take_lock()
    self._async = async_save
    self._manager = self._make_manager()
    self._pending_step = None  # Last step handed to an asynchronous save not yet awaited.

  def _check_writable(self):
    """Fails at start-up, not after hours of training, when checkpoints cannot be written."""
    reason = None
    if _is_primary():  # Shared file system: one probe; the others learn the outcome below.
      probe = storage.join(self.directory, f'.write_test.{os.getpid()}')
      try:
        storage.write_text(probe, 'ok')
        storage.remove(probe)
      except Exception as e:  # pylint: disable=broad-except
        # OSError on a disk; object-storage clients raise their own errors (permissions,
        # a missing bucket).
        reason = (e.strerror if isinstance(e, OSError) else None) or one_line(e, 200)
    if not _all_processes(reason is None):  # Every process raises, none waits for the rest.
      raise CheckpointError(f'Cannot write checkpoints to {self.directory}: '
                            f'{reason or "failed on process 0"}. Choose a writable --workdir.')

  def _take_lock(self):
    """One writer per workdir: process 0 holds `workdir/.lock` while the run lives. A lock left
    by a dead process on this host is taken over; one from another host counts as abandoned
    once it has not been refreshed (at every save) for `lock_stale_after_secs`. On object
    storage the lock is an object created by a conditional write (object_lock.py)."""
    lock, reason = None, None
    if _is_primary():
      kind = (object_lock.ObjectLock if storage.is_remote(self.workdir)
              else workdir_lock.WorkdirLock)
      lock = kind(
          self.workdir, stale_after_secs=self.config.get('lock_stale_after_secs', 3600),
          warn=_warn, override_hint='or pass --config.lock_stale_after_secs=0 if it is dead')
      try:
        lock.acquire()
      except (workdir_lock.WorkdirInUse, OSError) as e:  # OSError: the lock cannot be written.
        reason = str(e)
    if not _all_processes(reason is None):
      raise CheckpointError(reason or 'the workdir is in use by another run (see process 0).')
    return lock

  def _make_manager(self):
    keep = self.config.keep_checkpoints
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(keep or None),
        enable_async_checkpointing=self._async,
        # Half-written `<step>.orbax-checkpoint-tmp` directories of a killed run are dead weight.
        cleanup_tmp_directories=True,
        create=True)
    return ocp.CheckpointManager(self.directory, options=options,
                                 item_names=('state', 'config'))

  def steps(self) -> list:
    return list(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def step_path(self, step: int) -> str:
    return storage.join(self.directory, str(step))

  # -- saving -----------------------------------------------------------------------------------

  def save(self, step: int, state):
    """Saves `state` (after `step` updates) asynchronously; raises CheckpointError on failure.

    Call only once the loss of the step that produced `state` was checked finite; the
    parameters themselves are checked here too, so a NaN state is never written.
    """
    if not bool(_all_finite(state)):
      raise FloatingPointError(f'The training state at step {step} holds NaN or Inf values: '
                               f'not saving it; the latest checkpoint '
                               f'(step {self.latest_step()}) is intact.')
    self._raise_if_failed()  # Reports an earlier asynchronous failure under its own step.
    self._check_free_space(step)
    # A digest of the arrays, stored in the step's metadata (written inside the temporary
    # directory, so it is part of the atomic checkpoint) and verified on restore: Orbax itself
    # restores a flipped byte silently.
    digest = integrity.tree_digest(state)
    try:
      self._manager.save(step, force=True, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(self._config_dict)),
                         custom_metadata={'sha256': digest})
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(step, e) from e
    self._pending_step = step
    if self._lock is not None:
      self._lock.refresh()

  def _check_free_space(self, step):
    """Refuses a save, before anything is written, when the disk cannot hold another checkpoint
    as large as the last one: old checkpoints are deleted only after a new one is complete.
    Object storage has no free space to ask for: no check there."""
    if storage.is_remote(self.directory):
      return
    reason = None
    previous = self._list_complete_steps()
    if _is_primary() and previous:
      try:
        disk.check_free_space(self.directory, disk.directory_size(self.step_path(previous[-1])),
                              f'the checkpoint of step {step}')
      except disk.DiskFullError as e:
        reason = str(e)
    if not _all_processes(reason is None):
      raise CheckpointError(f'{reason or "disk full on process 0"}; the previous checkpoint '
                            f'(step {previous[-1]}) is intact. Free disk space and rerun the '
                            f'same command to resume.')

  def wait(self):
    """Blocks until the last save is on disk; raises CheckpointError if it failed."""
    self._raise_if_failed()

  def _raise_if_failed(self):
    if self._pending_step is None:
      return
    step, self._pending_step = self._pending_step, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(step, e) from e

  def _save_error(self, step, error):
    self._manager.reload()  # After a failed save Orbax's own step list is stale.
    if disk.is_disk_full(error):
      error = disk.as_disk_full(error, self.directory)
    previous = [s for s in self._list_complete_steps() if s != step]
    kept = (f'the previous checkpoint (step {max(previous)}) is intact'
            if previous else 'no earlier checkpoint exists')
    return CheckpointError(
        f'Saving the checkpoint of step {step} to {self.directory} failed '
        f'({one_line(error, 200)}); {kept}. Fix the cause (e.g. free disk space) and rerun the '
        f'same command to resume.')

  def _list_complete_steps(self) -> list:
    """Steps whose directories are complete on disk: renamed from their temporary name, or on
    object storage (where Orbax writes `<step>/` in place) holding Orbax's commit file."""
    try:
      names = storage.listdir(self.directory)
    except OSError:
      return []
    steps = sorted(int(n) for n in names if n.isdigit())
    if storage.is_remote(self.directory):
      steps = [s for s in steps if storage.exists(storage.join(self.step_path(s), COMMIT_FILE))]
    return steps

  def close(self):
    """Waits for the last save, then releases Orbax's threads and the workdir lock."""
    try:
      self._raise_if_failed()
    finally:
      self._manager.close()
      if self._lock is not None:
        self._lock.release()
        self._lock = None

  # -- restoring --------------------------------------------------------------------------------

  def restore_or_init(self, initial_state, mesh):
    """(start_step, state replicated over `mesh`): the latest readable checkpoint, else step 0.

    A checkpoint that cannot be read is reported and moved to `checkpoints.unreadable/`, and
    the previous one is tried. If checkpoints exist but none can be resumed (unreadable, or
    written with an incompatible config) this raises, unless `config.restart_from_scratch`,
    which moves them aside to `checkpoints.old-<time>/` and starts at step 0.
    """
    restored = self._restore_latest(abstract_state(initial_state, NamedSharding(mesh, P())))
    if restored is None:
      return 0, parallel.replicate(initial_state, mesh)
    return restored

  def _try_restore(self, step, **items):
    """The restored Composite, or None (with a warning) if any process could not read it.

    Every process must take the same branch, so the outcome is agreed over processes.
    """
    try:
      restored, error = self._manager.restore(step, args=ocp.args.Composite(**items)), None
    except Exception as e:  # pylint: disable=broad-except
      restored, error = None, e
    if _all_processes(error is None):
      return restored
    reason = one_line(error) if error is not None else 'unreadable on another process'
    _warn(f'checkpoint {self.step_path(step)} cannot be read ({reason}); falling back to the '
          f'previous one.')
    return None

  def _restore_latest(self, target):
    steps = sorted(self.steps(), reverse=True)
    if not steps:
      return None
    unreadable = []
    for step in steps:
      restored = self._try_restore(step, config=ocp.args.JsonRestore())
      if restored is None:
        unreadable.append(step)
        continue
      saved_config = restored.config
      differences = config_differences(saved_config, self._config_dict)
      if differences:
        return self._restart_or_fail(
            f'its config differs ({", ".join(differences)})',
            f'The checkpoint {self.step_path(step)} was written with a different config: '
            f'{"; ".join(differences)}. Rerun with the original values, use a new --workdir, '
            f'or pass --config.restart_from_scratch=True to move the old checkpoints aside.')
      restored = self._try_restore(step, state=ocp.args.StandardRestore(target))
      if restored is None:
        unreadable.append(step)
        continue
      state = restored.state
      verdict = integrity.check_against(state, self._stored_digest(step),
                                        f'{self.step_path(step)} metadata')
      if not _all_processes(verdict.ok):
        _warn(f'checkpoint {self.step_path(step)} is corrupt '
              f'({verdict.reason or "digest mismatch on another process"}); falling back to '
              f'the previous one.')
        unreadable.append(step)
        continue
      if not verdict.verified:
        _warn(f'checkpoint {self.step_path(step)} has no digest (written by an older version): '
              f'its arrays are not verified.')
      saved_step = int(jax.device_get(state.step))
      if saved_step != step:
        raise CheckpointError(f'The checkpoint {self.step_path(step)} holds a state of step '
                              f'{saved_step}: it was not written by this program.')
      self._set_aside_unreadable(unreadable)
      _say(f'Resuming from checkpoint {self.step_path(step)} (step {step}).')
      return step, state

    return self._restart_or_fail(
        f'none of its {len(steps)} checkpoints can be read',
        f'None of the {len(steps)} checkpoints in {self.directory} (steps '
        f'{", ".join(map(str, sorted(steps)))}) can be read; not starting from scratch over an '
        f'existing run. Pass --config.restart_from_scratch=True to move them aside and start '
        f'at step 0.')

  def _stored_digest(self, step) -> Optional[str]:
    try:
      metadata = self._manager.metadata(step)
    except Exception:  # pylint: disable=broad-except
      return None
    return (getattr(metadata, 'custom_metadata', None) or {}).get('sha256')

  def _set_aside_unreadable(self, steps):
    """Frees the step numbers of unreadable checkpoints (the resumed run will save them again)
    while keeping their files for inspection."""
    for step in steps:
      destination = storage.join(self.workdir, CHECKPOINT_DIR + '.unreadable',
                                 f'{step}-{_timestamp()}')
      _move_aside(self.step_path(step), destination)
      _warn(f'moved the unreadable checkpoint of step {step} to {destination}.')
    if steps:
      self._manager.reload()

  def _restart_or_fail(self, why: str, error: str):
    """None after moving the checkpoints aside when restart_from_scratch is set; else raises."""
    if self.config.get('restart_from_scratch', False):
      self._restart_from_scratch(why)
      return None
    raise CheckpointError(error)

  def _restart_from_scratch(self, why: str):
    self._manager.close()
    destination = f'{self.directory}.old-{_timestamp()}'
    _move_aside(self.directory, destination)
    _warn(f'restart_from_scratch: the checkpoints in {self.directory} cannot be resumed '
          f'({why}); moved them to {destination} and starting at step 0.')
    self._check_writable()
    self._manager = self._make_manager()


def _checkpoints_dir(path: str) -> str:
  """`path` itself, or `path/checkpoints` when `path` is a run's workdir."""
  if storage.isdir(storage.join(path, CHECKPOINT_DIR)):
    path = storage.join(path, CHECKPOINT_DIR)
  path = storage.resolve(path)
  if not storage.isdir(path):
    raise FileNotFoundError(f'No checkpoint directory at {path}.')
  return path


def _read_first_readable(path: str, step: Optional[int], args: dict):
  """(step, restored Composite) of the latest (or given) checkpoint that restores `args`.

  Read-only: never moves or deletes anything (export and evaluation may run while the
  training run is still writing).
  """
  directory = _checkpoints_dir(path)
  _quiet_orbax()
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
      item_names=('state', 'config'))
  try:
    steps = sorted(manager.all_steps(), reverse=True)
    if step is not None:
      if step not in steps:
        raise FileNotFoundError(f'No checkpoint of step {step} in {directory} (steps: '
                                f'{", ".join(map(str, sorted(steps))) or "none"}).')
      steps = [step]
    if not steps:
      raise FileNotFoundError(f'No checkpoint in {directory}.')
    for candidate in steps:
      where = storage.join(directory, str(candidate))
      try:
        return candidate, manager.restore(candidate, args=ocp.args.Composite(**args))
      except Exception as e:  # pylint: disable=broad-except
        if step is not None:
          raise CheckpointError(f'Checkpoint {where} cannot be read: {one_line(e)}') from e
        _warn(f'checkpoint {where} cannot be read ({one_line(e)}); falling back to the '
              f'previous one.')
    raise CheckpointError(f'None of the checkpoints in {directory} can be read.')
  finally:
    manager.close()


def restore_state(path: str, target, step: Optional[int] = None):
  """(step, state, saved config dict) of a run's checkpoint (for export and evaluation).

  `path` is a workdir or its `checkpoints` directory; `target` is the restore target, a tree
  of ShapeDtypeStructs with shardings (see `abstract_state`). Without `step`, the latest
  readable checkpoint, falling back past unreadable ones with a warning. FileNotFoundError
  when there is no checkpoint.
  """
  step, restored = _read_first_readable(path, step, dict(
      state=ocp.args.StandardRestore(target), config=ocp.args.JsonRestore()))
  return step, restored.state, restored.config


def read_saved_config(path: str, step: Optional[int] = None):
  """(step, config dict) of the latest (or given) checkpoint whose config can be read."""
  step, restored = _read_first_readable(path, step, dict(config=ocp.args.JsonRestore()))
  return step, restored.config


# ---------------------------------------------------------------------------------------------
# When to save: step and time intervals, preemption.


class StopSignals:
  """SIGTERM / SIGINT ask the loop to save at the next step boundary and exit cleanly.

  `install()` replaces the handlers, `uninstall()` puts the previous ones back (also a context
  manager). After the first signal the default handlers are reinstated, so a second one stops
  the process at once (the latest complete checkpoint stays intact). Only installs in the main
  thread of a single-process run: in multi-process runs JAX's preemption service (when
  enabled) catches SIGTERM on every host and picks a step at which all of them save
  (`reached_preemption_sync_point`).
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received = None  # Name of the first signal received.
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.received is None:
      self.received = signal.Signals(signum).name
      for sig in self.SIGNALS:
        signal.signal(sig, signal.SIG_DFL if sig == signal.SIGTERM else signal.default_int_handler)
      # No printing here: a handler that writes to stdout while the interrupted main thread
      # is writing there raises "reentrant call". The loop reports the stop after its save.

  def install(self):
    if (not self._previous and jax.process_count() == 1
        and threading.current_thread() is threading.main_thread()):
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def uninstall(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def __enter__(self):
    return self.install()

  def __exit__(self, *exc):
    self.uninstall()
    return False


def _preemption_service_enabled() -> bool:
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    return distributed.global_state.preemption_sync_manager is not None
  except (ImportError, AttributeError):
    return False


class SaveSchedule:
  """Decides, identically on every process, whether to save after a step.

  Saves when the step is a multiple of `config.checkpoint_every_steps` (0: never by steps),
  when `config.checkpoint_every_secs` have passed since the last save (0: never by time), and
  when a stop was requested (SIGTERM/SIGINT, or a preemption notice in multi-process runs).
  Processes could disagree about time, so in multi-process runs the time condition is combined
  over processes (any) every `sync_every` steps only: the loop synchronises at its log steps
  anyway. Installs the stop-signal handlers; `close()` restores the previous ones.
  """

  def __init__(self, config, sync_every: int):
    self.every_steps = config.checkpoint_every_steps
    self.every_secs = config.checkpoint_every_secs
    if self.every_steps < 0 or self.every_secs < 0:
      raise ValueError(f'checkpoint_every_steps ({self.every_steps}) and '
                       f'checkpoint_every_secs ({self.every_secs}) must be >= 0 (0: off).')
    self.sync_every = max(1, sync_every)
    self.multi_process = jax.process_count() > 1
    self.preemption_service = self.multi_process and _preemption_service_enabled()
    self.signals = StopSignals().install()
    self.stop_reason = None  # Set when a stop was requested: the loop exits after its save.
    self._last_save = time.monotonic()

  @property
  def stop_requested(self) -> bool:
    return self.stop_reason is not None

  def should_save(self, step: int) -> bool:
    """True when the state after `step` updates is to be saved (the caller then saves it)."""
    decision = self._decide(step)
    if decision:
      self._last_save = time.monotonic()
    return decision

  def _decide(self, step: int) -> bool:
    if self.signals.received is not None:
      self.stop_reason = self.signals.received
      return True
    if self.preemption_service and multihost_utils.reached_preemption_sync_point(step):
      self.stop_reason = 'preemption notice'
      return True
    if self.every_steps and step % self.every_steps == 0:
      return True
    if not self.every_secs:
      return False
    due = time.monotonic() - self._last_save >= self.every_secs
    if self.multi_process:
      if step % self.sync_every:
        return False
      return bool(np.any(multihost_utils.process_allgather(np.int32(due))))
    return due

  def close(self):
    self.signals.uninstall()
