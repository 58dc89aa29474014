"""experiments/torch_byol_step_r50.py is the shared PyTorch yardstick plus marked lines only.

Its docstring promises that, apart from its own docstring, only lines marked `# r50` (the
ResNet-50) and `# gpu` (--device, --bf16) differ from ../shared/bench/torch_byol_step.py, so that
every benchmark row measures PyTorch with the yardstick's own step. This checks the promise.
"""

import difflib
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPY = os.path.join(REPO, 'experiments', 'torch_byol_step_r50.py')
SHARED = os.path.join(REPO, '..', 'shared', 'bench', 'torch_byol_step.py')
MARKS = ('# r50', '# gpu')


def _code(path):
  """The file's lines from its first import on (the copy has an extra docstring first)."""
  with open(path) as f:
    lines = f.read().splitlines()
  return lines[next(i for i, line in enumerate(lines) if line.startswith('import ')):]


def unmarked_differences(copy_lines, shared_lines):
  """Lines of the copy that differ from the shared file without a mark (blank lines aside),
  and lines of the shared file that the copy drops without putting marked lines in their
  place."""
  problems = []
  matcher = difflib.SequenceMatcher(a=shared_lines, b=copy_lines, autojunk=False)
  for tag, a0, a1, b0, b1 in matcher.get_opcodes():
    if tag == 'equal':
      continue
    added = [line for line in copy_lines[b0:b1] if line.strip()]
    problems += [f'copy: {line}' for line in added if not line.rstrip().endswith(MARKS)]
    if a1 > a0 and not added:
      problems += [f'dropped: {line}' for line in shared_lines[a0:a1] if line.strip()]
  return problems


def test_the_check_catches_an_unmarked_change():
  shared = ['import torch', 'x = 1', 'y = 2']
  assert not unmarked_differences(['import torch', 'x = 1  # r50', 'y = 2'], shared)
  assert unmarked_differences(['import torch', 'x = 3', 'y = 2'], shared) == ['copy: x = 3']
  assert unmarked_differences(['import torch', 'y = 2'], shared) == ['dropped: x = 1']


def test_the_copy_differs_from_the_shared_yardstick_only_in_marked_lines():
  if not os.path.exists(SHARED):
    pytest.skip(f'the shared yardstick is not beside this clone ({SHARED})')
  assert unmarked_differences(_code(COPY), _code(SHARED)) == []
