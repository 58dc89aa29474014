"""The package's layers: data -> core -> runtime -> evaluation -> entry points.

Every module of byol_jax is parsed (not imported) and each of its byol_jax imports, at any depth
(function-level imports included), must point to its own layer or one below. Core, runtime and
the evaluation steps must not import TensorFlow; only data/ (and entry points that read data)
may. No module is longer than ~400 lines unless its opening comment says why.
"""

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'byol_jax'
# Lower numbers are lower layers; a module may import its own layer and the ones below.
LAYERS = {'data': 0, 'core': 1, 'runtime': 2, 'evaluation': 3}
TOP = 4  # byol_jax/*.py: entry points (main_loop, export, preview, reference_checkpoint).
NO_TENSORFLOW = ('byol_jax.core', 'byol_jax.runtime', 'byol_jax.evaluation.steps',
                 'byol_jax.evaluation.knn')
MAX_LINES = 400


def _modules():
  for path in sorted(PACKAGE.rglob('*.py')):
    parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
    if parts[-1] == '__init__':
      parts = parts[:-1]
    yield '.'.join(parts), path


def _layer(module: str) -> int:
  parts = module.split('.')
  return LAYERS.get(parts[1], TOP) if len(parts) > 1 else TOP


def _imports(path, package):
  """Absolute names of everything `path` imports (at any depth in the file)."""
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        base = '.'.join(package.split('.')[:len(package.split('.')) - node.level + 1] +
                        ([base] if base else []))
      yield base
      yield from (f'{base}.{alias.name}' for alias in node.names)


MODULES = list(_modules())


def test_the_layers_are_the_folders():
  assert {name.split('.')[1] for name, _ in MODULES if name.count('.') >= 2} == set(LAYERS)


@pytest.mark.parametrize('module,path', MODULES, ids=[name for name, _ in MODULES])
def test_no_module_imports_from_a_layer_above_it(module, path):
  package = module if path.name == '__init__.py' else module.rsplit('.', 1)[0]
  upward = sorted({name for name in _imports(path, package)
                   if name.startswith('byol_jax.') and _layer(name) > _layer(module)})
  assert not upward, f'{module} (layer {_layer(module)}) imports from above: {upward}'


@pytest.mark.parametrize('module,path', MODULES, ids=[name for name, _ in MODULES])
def test_core_runtime_and_evaluation_steps_import_no_tensorflow(module, path):
  if not module.startswith(NO_TENSORFLOW):
    return
  package = module if path.name == '__init__.py' else module.rsplit('.', 1)[0]
  bad = sorted({name for name in _imports(path, package)
                if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets')
                or name.startswith(('byol_jax.data', 'byol_jax.evaluation.drivers',
                                    'byol_jax.evaluation.monitor'))})
  assert not bad, f'{module} must not import TensorFlow or the data pipeline: {bad}'


@pytest.mark.parametrize('module,path', MODULES, ids=[name for name, _ in MODULES])
def test_no_long_module_without_a_reason(module, path):
  text = path.read_text()
  lines = text.count('\n')
  doc = ast.get_docstring(ast.parse(text)) or ''
  assert lines <= MAX_LINES or 'Longer than' in doc, (
      f'{module} has {lines} lines: split it, or say in its opening comment why not '
      f'("Longer than ~{MAX_LINES} lines because ...").')


@pytest.mark.slow
def test_importing_every_non_data_module_leaves_tensorflow_out():
  """The static check above, confirmed by importing (in a fresh interpreter)."""
  names = [name for name, _ in MODULES if name.startswith(NO_TENSORFLOW)]
  code = (f'import importlib, sys\nfor name in {names!r}: importlib.import_module(name)\n'
          'loaded = [m for m in sys.modules if m.split(".")[0] == "tensorflow"]\n'
          'assert not loaded, loaded[:5]')
  subprocess.run([sys.executable, '-c', code], check=True, timeout=300)
