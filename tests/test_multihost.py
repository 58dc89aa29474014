"""Multi-process training on one machine: two JAX processes on localhost (CPU devices, gloo
collectives) reach the same losses and parameters as one process with as many devices.

The file is also the worker: `python tests/test_multihost.py --out=... [--coordinator ...]`
runs a few BYOL steps of the tiny encoder on deterministic numpy batches (no TensorFlow, no
input pipeline) and saves per-step losses and the final parameters. Each worker feeds only its
own rows of the global batch, as a real host does with its data shard.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
GLOBAL_BATCH = 8
IMAGE_SIZE = 8
# Generous: two shared CPU cores, and each worker imports JAX and compiles the step.
RUN_TIMEOUT_S = 300


# ----------------------------------------------------------------------------- worker side.

def tiny_config():
  sys.path.insert(0, os.path.join(REPO, 'configs'))
  import byol  # pylint: disable=g-import-not-at-top
  config = byol.get_config('demo')
  config.dataset = 'synthetic'
  config.image_size = IMAGE_SIZE
  config.batch_size = GLOBAL_BATCH
  config.max_steps = STEPS
  config.model.encoder = 'tiny'
  config.model.width = 1.0
  config.model.projector_hidden_size = 32
  config.model.predictor_hidden_size = 32
  config.model.projection_size = 16
  # LARS, the reference optimizer, with a step large enough that parameters move well above
  # float noise, so "same params" is a real check rather than "both barely moved". (AdamW
  # would turn the ~1e-9 noise in the gradients of biases that feed a BatchNorm, zero in exact
  # arithmetic, into +-lr steps whose sign depends on the reduction order.)
  config.optimizer.name = 'lars'
  config.optimizer.base_lr = 10.0  # x batch/256 -> 0.31.
  config.optimizer.trust_coefficient = 0.02
  config.optimizer.warmup_steps = 0
  return config


def global_batch_numpy(step: int) -> dict:
  """The whole global batch of `step`, identical in every process (a function of step only)."""
  rng = np.random.default_rng(1000 + step)
  shape = (GLOBAL_BATCH, IMAGE_SIZE, IMAGE_SIZE, 3)
  return dict(view1=rng.normal(size=shape).astype(np.float32),
              view2=rng.normal(size=shape).astype(np.float32),
              labels=rng.integers(0, 10, size=(GLOBAL_BATCH,)).astype(np.int32))


def flat_params(tree) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def worker(args):
  start = time.time()
  from byol_jax.runtime import distributed  # pylint: disable=g-import-not-at-top
  mode = 'auto' if args.auto else 'on' if args.coordinator else 'off'
  multi = distributed.initialize(distributed.Settings(
      mode=mode, coordinator_address=args.coordinator, num_processes=args.num_processes,
      process_id=args.process_id, timeout_s=args.timeout), log=False)
  import jax  # pylint: disable=g-import-not-at-top
  if args.connect_only:
    print(f'connected: process {jax.process_index()} of {jax.process_count()}, '
          f'{jax.device_count()} devices, multi={multi}', flush=True)
    from byol_jax.runtime import parallel  # pylint: disable=g-import-not-at-top
    mesh = parallel.make_mesh()
    parallel.replicate({'w': np.arange(3.0)}, mesh)  # Same everywhere: accepted.
    try:
      parallel.replicate({'w': np.full(3, float(jax.process_index()))}, mesh)
    except ValueError as e:
      print(f'replicate refused: {e}', flush=True)
    return
  from byol_jax.core import byol_experiment  # pylint: disable=g-import-not-at-top
  from byol_jax.runtime import parallel  # pylint: disable=g-import-not-at-top

  config = tiny_config()
  experiment = byol_experiment.ByolExperiment(config, train_examples=GLOBAL_BATCH * STEPS)
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  index, count = jax.process_index(), jax.process_count()
  print(f'process {index}/{count} (multi={multi}): {jax.local_device_count()} local of '
        f'{jax.device_count()} devices', flush=True)
  print(f'process {index}: connected and built at {time.time() - start:.1f}s', flush=True)
  # Jitted: eager Haiku init compiles every primitive on its own (~10x slower on CPU).
  initial = jax.jit(experiment.init, static_argnums=1)(jax.random.PRNGKey(config.seed),
                                                       config.image_size)
  t0 = time.time()
  state = parallel.replicate(initial, mesh)
  replicate_s = time.time() - t0
  step_fn = parallel.map_step(experiment.train_step, mesh)
  per_process = GLOBAL_BATCH // count
  losses, step_times = [], []
  for step in range(STEPS):
    # This process's shard: rows [index * per_process, (index + 1) * per_process).
    local = {k: v[index * per_process:(index + 1) * per_process]
             for k, v in global_batch_numpy(step).items()}
    state, metrics = step_fn(state, parallel.global_batch(local, mesh))
    losses.append(float(np.asarray(metrics['loss'])))
    step_times.append(time.time() - start)
  params = {'online' + k: v for k, v in flat_params(state.online_params).items()}
  params.update({'target' + k: v for k, v in flat_params(state.target.params).items()})
  params.update({'init' + k: v for k, v in flat_params(initial.online_params).items()})
  np.savez(args.out, losses=np.asarray(losses), step=np.asarray(state.step),
           replicate_s=replicate_s, **params)
  print(f'process {index}: losses {losses}; replicate {replicate_s:.2f}s; steps done at '
        f'{", ".join(f"{t:.1f}" for t in step_times)}s after start', flush=True)


# ----------------------------------------------------------------------------- test side.

def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def subprocess_env(devices: int) -> dict:
  """A clean CPU environment with `devices` simulated devices; no cluster variables leak in."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('SLURM_', 'OMPI_', 'PMI_', 'JAX_COORDINATOR', 'JAX_NUM_PROCESSES',
                              'JAX_PROCESS_ID', 'JAX_LOCAL_DEVICE_IDS', 'TPU_'))}
  flags = [f for f in env.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  # Unoptimised XLA:CPU code: compiling the tiny init and step drops from ~50 s to ~6 s of
  # wall time on a loaded 2-core machine. Every process of a comparison gets the same flags.
  flags += ['--xla_backend_optimization_level=0', '--xla_llvm_disable_expensive_passes=true']
  env['XLA_FLAGS'] = ' '.join(flags + [f'--xla_force_host_platform_device_count={devices}'])
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONUNBUFFERED'] = '1'
  env['TF_CPP_MIN_LOG_LEVEL'] = '2'
  env['PYTHONPATH'] = os.pathsep.join(p for p in (REPO, env.get('PYTHONPATH')) if p)
  return env


def run_all(commands, tmp_path, timeout_s=RUN_TIMEOUT_S):
  """Starts every (argv, env) at once, waits for all within one deadline, kills leftovers.

  Output goes to files, not pipes, so a chatty process can never block on a full pipe while
  we wait on another. Returns [(returncode, output)] in order.
  """
  procs, logs = [], []
  try:
    for i, (argv, env) in enumerate(commands):
      log = open(tmp_path / f'proc{i}.log', 'w+')
      logs.append(log)
      procs.append(subprocess.Popen(argv, env=env, cwd=REPO, stdout=log,
                                    stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout_s
    for p in procs:
      try:
        p.wait(timeout=max(deadline - time.monotonic(), 0.1))
      except subprocess.TimeoutExpired:
        pass
  finally:
    timed_out = False
    for p in procs:
      if p.poll() is None:
        timed_out = True
        p.kill()
        p.wait()
  outputs = []
  for p, log in zip(procs, logs):
    log.seek(0)
    outputs.append((p.returncode, log.read()))
    log.close()
  if timed_out:
    pytest.fail(f'Processes did not finish within {timeout_s}s:\n' +
                '\n----\n'.join(out[-3000:] for _, out in outputs))
  return outputs


def worker_argv(out, coordinator=None, num_processes=None, process_id=None, timeout=60):
  argv = [sys.executable, os.path.abspath(__file__), f'--out={out}', f'--timeout={timeout}']
  if coordinator:
    argv += [f'--coordinator={coordinator}', f'--num_processes={num_processes}',
             f'--process_id={process_id}']
  return argv


# The long variants run with BYOL_MULTIHOST_FULL=1 (each takes 1-3 minutes on 2 busy cores).
FULL = os.environ.get('BYOL_MULTIHOST_FULL') == '1'
full_only = pytest.mark.skipif(not FULL, reason='set BYOL_MULTIHOST_FULL=1 to run')


# 2 devices per process: reductions both within and across processes. 1 per process (the
# usual one-process-per-GPU layout) is the same code path.
@pytest.mark.slow
@pytest.mark.parametrize('devices_per_process', [2, pytest.param(1, marks=full_only)])
def test_two_processes_match_one_process(tmp_path, devices_per_process):
  address = f'127.0.0.1:{free_port()}'
  outs = [tmp_path / f'{name}.npz' for name in ('single', 'proc0', 'proc1')]
  commands = [(worker_argv(outs[0]), subprocess_env(2 * devices_per_process))]
  commands += [(worker_argv(outs[1 + i], address, 2, i), subprocess_env(devices_per_process))
               for i in range(2)]
  t0 = time.time()
  results = run_all(commands, tmp_path)
  elapsed = time.time() - t0
  for (rc, output), name in zip(results, ('single', 'proc0', 'proc1')):
    assert rc == 0, f'{name} failed (rc={rc}):\n{output[-4000:]}'
  single, p0, p1 = (dict(np.load(o)) for o in outs)
  assert int(single['step']) == int(p0['step']) == int(p1['step']) == STEPS

  # Both processes hold the same replicated result...
  for key in p0:
    if key == 'replicate_s':
      continue
    np.testing.assert_array_equal(p0[key], p1[key], err_msg=key)
  # ...equal to one process with the same total device count, up to reduction order.
  np.testing.assert_allclose(p0['losses'], single['losses'], rtol=1e-5, atol=1e-6)
  max_diff, max_moved = 0.0, 0.0
  for key in single:
    if key.startswith(('online', 'target')):
      np.testing.assert_allclose(p0[key], single[key], rtol=1e-4, atol=1e-5, err_msg=key)
      max_diff = max(max_diff, float(np.max(np.abs(p0[key] - single[key]))))
    if key.startswith('online'):
      moved = np.abs(single[key] - single['init' + key[len('online'):]])
      max_moved = max(max_moved, float(np.max(moved)))
  assert max_moved > 1e-3, 'parameters barely moved: the comparison would be vacuous'
  print(f'{devices_per_process} device(s)/process: {elapsed:.1f}s; losses {p0["losses"]} vs '
        f'{single["losses"]}; max |param diff| {max_diff:.2e}; max param move {max_moved:.2e}; '
        f'replicate {float(p0["replicate_s"]):.2f}s')


@full_only
def test_main_loop_two_processes(tmp_path):
  """`python -m byol_jax.main_loop` twice with the multi-host flags, on real data (digits).

  Process 0 alone writes metrics; both write the Orbax checkpoint together. Losses are not
  compared with one process: each process reads its own data shard, so the global batch
  differs from a single process's.
  """
  pytest.importorskip('tensorflow')
  workdir = tmp_path / 'work'
  address = f'127.0.0.1:{free_port()}'
  steps = 2
  argv = [sys.executable, '-m', 'byol_jax.main_loop', '--config=configs/byol.py:demo',
          f'--workdir={workdir}', '--config.model.encoder=tiny', '--config.image_size=8',
          '--config.batch_size=8', f'--config.max_steps={steps}', '--config.log_every_steps=1',
          '--config.final_knn.enabled=False', '--config.final_eval=False',
          '--config.model.projector_hidden_size=32',
          '--config.model.predictor_hidden_size=32', '--config.model.projection_size=16',
          f'--coordinator_address={address}', '--num_processes=2', '--distributed_timeout=120']
  results = run_all([(argv + [f'--process_id={i}'], subprocess_env(1)) for i in range(2)],
                    tmp_path)
  for i, (rc, output) in enumerate(results):
    assert rc == 0, f'process {i} failed (rc={rc}):\n{output[-4000:]}'
  assert 'distributed: 2 processes x 1 cpu devices = 2 devices.' in results[0][1]
  lines = (workdir / 'metrics.jsonl').read_text().splitlines()
  assert [json.loads(line)['step'] for line in lines] == list(range(1, steps + 1))
  assert (workdir / 'checkpoints' / str(steps) / 'commit_success.txt').exists()


# --------------------------------------------------------------- bad input (no processes).

@pytest.mark.slow
def test_unreachable_coordinator_fails_fast(tmp_path):
  """Process 1 with no process 0 anywhere: a one-line error in seconds, not a hang/abort."""
  address = f'127.0.0.1:{free_port()}'  # Nothing listens there.
  argv = [sys.executable, '-m', 'byol_jax.main_loop', '--config=configs/byol.py:demo',
          f'--workdir={tmp_path / "work"}', f'--coordinator_address={address}',
          '--num_processes=2', '--process_id=1', '--distributed_timeout=2']
  t0 = time.time()
  [(rc, output)] = run_all([(argv, subprocess_env(1))], tmp_path, timeout_s=60)
  elapsed = time.time() - t0
  assert rc == 1, output[-3000:]  # sys.exit('error: ...'), not a SIGABRT (-6).
  assert f'error: Could not reach the coordinator at {address} within 2s' in output, output
  assert elapsed < 30, elapsed


def test_wait_for_coordinator_in_process():
  from byol_jax.runtime import distributed
  address = f'127.0.0.1:{free_port()}'
  t0 = time.monotonic()
  with pytest.raises(distributed.DistributedError, match=r'process 1 of 2'):
    distributed.wait_for_coordinator(address, 1.0, process_id=1, num_processes=2)
  assert time.monotonic() - t0 < 5
  # A listening coordinator is found at once.
  with socket.socket() as server:
    server.bind(('127.0.0.1', 0))
    server.listen(1)
    distributed.wait_for_coordinator(f'127.0.0.1:{server.getsockname()[1]}', 5.0)


@pytest.mark.parametrize('kwargs, message', [
    (dict(num_processes=2, process_id=2), r'process_id=2 is out of range for num_processes=2'),
    (dict(num_processes=0), r'num_processes must be >= 1, got 0'),
    (dict(process_id=-1), r'process_id must be >= 0, got -1'),
    (dict(coordinator_address='10.0.0.1'), r"coordinator_address='10.0.0.1' must be host:port"),
])
def test_inconsistent_settings_name_the_values(kwargs, message):
  from byol_jax.runtime import distributed
  with pytest.raises(ValueError, match=message):
    distributed.validate(distributed.Settings(**kwargs))


def test_when_to_initialize():
  from byol_jax.runtime import distributed
  S, should = distributed.Settings, distributed.should_initialize
  assert should(S(), environ={}) is None
  assert should(S(coordinator_address='h:1', num_processes=2, process_id=0), environ={})
  assert should(S(num_processes=1), environ={}) is None  # Explicitly single-process.
  slurm = dict(SLURM_STEP_NODELIST='node[01-02]', SLURM_NTASKS='16', SLURM_JOB_ID='7')
  assert should(S(), environ=slurm) == 'slurm cluster'
  assert should(S(), environ=dict(slurm, SLURM_NTASKS='1')) is None
  assert should(S(), environ=dict(SLURM_NTASKS='4')) is None  # Allocation, not an srun step.
  assert should(S(), environ=dict(OMPI_COMM_WORLD_SIZE='2')) == 'ompi cluster'
  assert should(S(mode='off'), environ=slurm) is None
  assert should(S(mode='on'), environ={}) == '--distributed=on'
  env = dict(JAX_COORDINATOR_ADDRESS='h:1', JAX_NUM_PROCESSES='2', JAX_PROCESS_ID='1')
  settings = distributed.settings_from_flags(environ=env)
  assert (settings.coordinator_address, settings.num_processes, settings.process_id) == (
      'h:1', 2, 1)


@pytest.mark.slow
def test_slurm_environment_is_detected(tmp_path):
  """Two `srun` tasks, simulated: no flags at all, JAX reads the SLURM variables."""
  port = free_port()
  commands = []
  for i in range(2):
    env = subprocess_env(1)
    env.update(SLURM_JOB_ID='4242', SLURM_STEP_NODELIST='localhost', SLURM_NTASKS='2',
               SLURM_PROCID=str(i), SLURM_LOCALID=str(i), JAX_COORDINATOR_PORT=str(port))
    commands.append(([sys.executable, os.path.abspath(__file__), '--out=unused', '--auto',
                      '--connect_only'], env))
  results = run_all(commands, tmp_path, timeout_s=120)
  for i, (rc, output) in enumerate(results):
    assert rc == 0, output[-3000:]
    assert f'connected: process {i} of 2, 2 devices, multi=True' in output, output[-3000:]
    # A tree that differs between processes is refused by replicate, on every process.
    assert 'replicate refused: Processes [1] start from a different state' in output, output


def test_replicate_leaves_the_callers_tree_intact():
  """The step donates the replicated state; the tree it was made from must survive (main_loop
  reuses the initial state for its random-init kNN baseline). Plain device_put aliases it."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P
  from byol_jax.runtime import parallel
  mesh = parallel.make_mesh()
  tree = {'a': jnp.arange(16.0), 'b': jnp.ones((4, 4), jnp.int32)}
  expected = jax.tree_util.tree_map(np.array, tree)
  step = jax.jit(jax.shard_map(lambda t: jax.tree_util.tree_map(lambda x: x * 2 + 1, t),
                               mesh=mesh, in_specs=P(), out_specs=P()), donate_argnums=0)
  state = step(parallel.replicate(tree, mesh))
  for key in expected:
    np.testing.assert_array_equal(np.asarray(tree[key]), expected[key])
    np.testing.assert_array_equal(np.asarray(state[key]), expected[key] * 2 + 1)


@pytest.mark.slow
def test_uneven_devices_are_an_error_naming_the_values(tmp_path):
  """One process with 1 device, the other with 2: both stop with the counts in the message."""
  address = f'127.0.0.1:{free_port()}'
  commands = [(worker_argv(tmp_path / f'p{i}.npz', address, 2, i), subprocess_env(1 + i))
              for i in range(2)]
  results = run_all(commands, tmp_path, timeout_s=120)
  for rc, output in results:
    assert rc != 0, output[-3000:]
    assert 'Uneven devices' in output and '3 devices over 2 processes' in output, output[-3000:]


if __name__ == '__main__':
  parser = argparse.ArgumentParser()
  parser.add_argument('--out', required=True)
  parser.add_argument('--coordinator')
  parser.add_argument('--num_processes', type=int)
  parser.add_argument('--process_id', type=int)
  parser.add_argument('--timeout', type=int, default=60)
  parser.add_argument('--auto', action='store_true', help="--distributed=auto's detection")
  parser.add_argument('--connect_only', action='store_true')
  worker(parser.parse_args())
