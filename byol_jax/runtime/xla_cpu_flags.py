"""XLA:CPU flags set where the project's programs start, before JAX creates its backends.

One flag today: `--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`. jax 0.10.2's
CPU backend sends every convolution to YNNPACK, which on the measured 2-core x86 machine is 2-4x
slower than XLA's Eigen convolutions, worst for weight gradients; the flag sends convolutions
back to Eigen (shared/docs/CPU_PERFORMANCE.md, experiments/RESULTS.md). It changes which library
computes a convolution, not what is computed.

Rules, so that it can never crash a program:
* the user's XLA_FLAGS win: nothing is added when they already name the flag;
* `BYOL_JAX_XLA_CPU_FLAGS=0` in the environment turns this module off;
* nothing is added when JAX's backends already exist (too late to take effect);
* nothing is added when the program will run on an accelerator (JAX_PLATFORMS without `cpu`,
  or an accelerator PJRT plugin installed and JAX_PLATFORMS unset): the flag concerns only CPU
  convolutions, and the accelerator plugin parses XLA_FLAGS too;
* XLA aborts the process on an unknown flag or an unparsable value, and the flag is
  experimental. It is added directly only for jaxlib versions where it was checked
  (`VERIFIED_JAXLIB`); for any other version a child process first starts JAX's CPU backend with
  the flag, and the flag is added only if that child exits cleanly.

Call `configure()` at the very top of an entry point (before any JAX computation). Importing
this module does nothing by itself; it imports no JAX.
"""

import importlib.util
import os
import subprocess
import sys
from typing import MutableMapping, Optional

FLAG_NAME = '--xla_cpu_experimental_ynn_fusion_type'
EIGEN_CONVOLUTIONS = FLAG_NAME + '=-individual_convolution'
# jaxlib versions on which EIGEN_CONVOLUTIONS was seen to parse and to remove `__ynn_fusion`
# convolutions from the optimized HLO.
VERIFIED_JAXLIB = ('0.10.2',)
OPT_OUT_ENV = 'BYOL_JAX_XLA_CPU_FLAGS'
# Installed packages that mean "this program will run on an accelerator".
_ACCELERATOR_MODULES = ('jax_plugins', 'jax_cuda12_plugin', 'jax_cuda13_plugin',
                        'jax_rocm60_plugin', 'jax_rocm7_plugin', 'libtpu')
_PROBE = "import jax; jax.devices('cpu')"

_decision: Optional[str] = None  # What the last configure() did, for benchmark records.


def _names_flag(xla_flags: str) -> bool:
  return any(f.split('=', 1)[0] == FLAG_NAME for f in xla_flags.split())


def _backends_started() -> bool:
  if 'jax' not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return bool(xla_bridge.backends_are_initialized())
  except Exception:  # pylint: disable=broad-except
    return True  # Cannot tell: assume the worst and leave XLA_FLAGS alone.


def _accelerator_expected(environ) -> bool:
  platforms = environ.get('JAX_PLATFORMS', environ.get('JAX_PLATFORM_NAME', '')).strip()
  if platforms:
    return 'cpu' not in [p.strip().lower() for p in platforms.split(',')]
  for name in _ACCELERATOR_MODULES:
    try:
      if importlib.util.find_spec(name) is not None:
        return True
    except (ImportError, ValueError):
      continue
  return False


def _jaxlib_version() -> Optional[str]:
  try:
    from jaxlib import version  # pylint: disable=g-import-not-at-top
    return version.__version__
  except Exception:  # pylint: disable=broad-except
    return None


def _flag_parses(xla_flags: str, environ, timeout_s: float = 120.) -> bool:
  """Starts JAX's CPU backend in a child process with `xla_flags`; True if it exits cleanly."""
  env = dict(environ)
  env.update(XLA_FLAGS=xla_flags, JAX_PLATFORMS='cpu')
  try:
    result = subprocess.run([sys.executable, '-c', _PROBE], env=env, timeout=timeout_s,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
  except (OSError, subprocess.SubprocessError):
    return False
  return result.returncode == 0


def configure(environ: Optional[MutableMapping[str, str]] = None, probe: bool = True) -> str:
  """Adds EIGEN_CONVOLUTIONS to environ['XLA_FLAGS'] when safe; returns what it decided.

  `environ` defaults to `os.environ`. `probe=False` never starts a child process (unverified
  jaxlib versions are then left alone).
  """
  global _decision
  environ = os.environ if environ is None else environ
  current = environ.get('XLA_FLAGS', '')
  if environ.get(OPT_OUT_ENV, '').strip().lower() in ('0', 'false', 'no', 'off'):
    decision = f'not set: {OPT_OUT_ENV} turns it off'
  elif _names_flag(current):
    decision = 'not set: XLA_FLAGS already names it'
  elif _backends_started():
    decision = 'not set: JAX backends already initialised'
  elif _accelerator_expected(environ):
    decision = 'not set: an accelerator backend is expected'
  else:
    version = _jaxlib_version()
    candidate = f'{current} {EIGEN_CONVOLUTIONS}'.strip()
    if version in VERIFIED_JAXLIB:
      environ['XLA_FLAGS'] = candidate
      decision = f'set (jaxlib {version} verified)'
    elif probe and version is not None and _flag_parses(candidate, environ):
      environ['XLA_FLAGS'] = candidate
      decision = f'set (jaxlib {version}: a child process accepted it)'
    else:
      decision = f'not set: jaxlib {version} not verified and the probe did not accept it'
  _decision = decision
  return decision


def last_decision() -> Optional[str]:
  """What the last `configure()` call in this process decided (None if never called)."""
  return _decision
