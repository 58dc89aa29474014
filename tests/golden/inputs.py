"""Inputs of the golden files that are a pure function of a seed: not stored, rebuilt here.

Imported by generate.py (which writes the reference's outputs for them) and by the tests (which
feed the same inputs to this project), so the two cannot drift apart. numpy's RandomState
streams are fixed across platforms and versions.
"""

import numpy as np

UPDATE_STEPS = 6


def update_batch(k):
  """The batch of step k of update.npz: two [8, 32, 32, 3] U[0, 1) views, labels in [0, 10)."""
  rs = np.random.RandomState(100 + k)
  view1 = rs.uniform(0., 1., size=(8, 32, 32, 3)).astype(np.float32)
  view2 = rs.uniform(0., 1., size=(8, 32, 32, 3)).astype(np.float32)
  labels = rs.randint(0, 10, size=(8,)).astype(np.int32)
  return dict(view1=view1, view2=view2, labels=labels)
