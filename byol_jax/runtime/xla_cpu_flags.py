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

Transparent huge pages for malloc, `restart_with_huge_pages()`: XLA:CPU allocates a step's
temporary buffer (262 MB for the cifar10_cpu step, about 4 GB for ResNet-18 at batch 256) and
Eigen's convolution packing buffers afresh at every execution. glibc maps blocks that large with
mmap and unmaps them when freed, so every step wrote into fresh zero-filled 4 KiB pages: 67,000
page faults per cifar10_cpu step, 1.07 million at batch 256, 15-17% of the step's CPU time in
the kernel (perf; experiments/RESULTS.md). With glibc's tunable `glibc.malloc.hugetlb=1` those
mappings are advised as transparent huge pages (2 MiB): ~400 faults per step, fewer TLB misses,
the same peak memory. Keeping freed blocks in the heap instead (mallopt: one arena, no mmap, no
trim) was measured too and rejected: consecutive steps' buffers overlap in time, so the heap
grows by one step's temporary buffer (peak 9.9 GB instead of 5.5 GB at batch 256). glibc reads
tunables only when a process starts, hence the restart: the entry point re-executes itself,
once, with GLIBC_TUNABLES extended, before importing JAX. Not done when: opted out (below), the
environment already names the tunable (the user wins) or preloads another allocator, an
accelerator is expected, the kernel's THP mode is `never`, the C library is not glibc >= 2.35,
or the interpreter's original command line is unknown.
"""

import ctypes
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

HUGE_PAGES_TUNABLE = 'glibc.malloc.hugetlb=1'
THP_MODE_FILE = '/sys/kernel/mm/transparent_hugepage/enabled'
# Set in the restarted process, so that it never restarts again and can say what happened.
RESTARTED_ENV = 'BYOL_JAX_RESTARTED_WITH_HUGE_PAGES'


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


def _opted_out(environ) -> bool:
  return environ.get(OPT_OUT_ENV, '').strip().lower() in ('0', 'false', 'no', 'off')


def _glibc_version() -> Optional[tuple]:
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    return tuple(int(p) for p in libc.gnu_get_libc_version().decode().split('.')[:2])
  except (OSError, AttributeError, ValueError):
    return None


def _thp_mode(path: str = THP_MODE_FILE) -> Optional[str]:
  """The kernel's transparent-huge-page mode ('always', 'madvise' or 'never'), None if unknown."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  return text[text.index('[') + 1:text.index(']')] if '[' in text else None


def huge_pages_decision(environ, glibc=None, thp_mode=None, argv=None) -> str:
  """Whether to restart with HUGE_PAGES_TUNABLE: a string starting with 'restart' if so, else
  why not. The arguments default to this process's facts (tests pass their own)."""
  if environ.get(RESTARTED_ENV):
    return 'set (restarted with ' + HUGE_PAGES_TUNABLE + ')'
  if _opted_out(environ):
    return f'not set: {OPT_OUT_ENV} turns it off'
  if 'glibc.malloc.hugetlb' in environ.get('GLIBC_TUNABLES', ''):
    return 'not set: GLIBC_TUNABLES already names glibc.malloc.hugetlb'
  if environ.get('LD_PRELOAD', '').strip():
    return 'not set: LD_PRELOAD may replace malloc'
  if _accelerator_expected(environ):
    return 'not set: an accelerator backend is expected'
  glibc = _glibc_version() if glibc is None else glibc
  if not glibc or glibc < (2, 35):
    return f'not set: needs glibc >= 2.35 (found {glibc})'
  thp_mode = _thp_mode() if thp_mode is None else thp_mode
  if thp_mode not in ('madvise', 'always'):
    return f'not set: transparent huge pages are {thp_mode}'
  argv = getattr(sys, 'orig_argv', None) if argv is None else argv
  if not argv:
    return 'not set: the original command line is unknown'
  return 'restart'


def restart_with_huge_pages() -> str:
  """Re-executes this program with HUGE_PAGES_TUNABLE added to GLIBC_TUNABLES when
  `huge_pages_decision` says so (it does not return then); otherwise returns why not.

  Call it first thing in an entry point's `__main__` block, before JAX is imported (nothing of
  this process survives the restart but its pid, open files and environment).
  """
  decision = huge_pages_decision(os.environ)
  if decision != 'restart':
    return decision
  tunables = os.environ.get('GLIBC_TUNABLES', '')
  os.environ['GLIBC_TUNABLES'] = f'{tunables}:{HUGE_PAGES_TUNABLE}' if tunables else (
      HUGE_PAGES_TUNABLE)
  os.environ[RESTARTED_ENV] = '1'
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, list(sys.orig_argv))
  return decision  # Not reached.


def configure(environ: Optional[MutableMapping[str, str]] = None, probe: bool = True) -> str:
  """Adds EIGEN_CONVOLUTIONS to environ['XLA_FLAGS'] when safe; returns what it decided.

  `environ` defaults to `os.environ`. `probe=False` never starts a child process (unverified
  jaxlib versions are then left alone).
  """
  global _decision
  environ = os.environ if environ is None else environ
  current = environ.get('XLA_FLAGS', '')
  if _opted_out(environ):
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
