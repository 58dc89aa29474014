"""Features of whole splits, embedded once over all processes.

Each process embeds only its own contiguous shard of a split (`datasets.eval_batches` with this
process's index: rows [i * n // P, (i + 1) * n // P)), and `parallel.gather_rows` hands every
process all the rows in process order, which is the split's order. So a P-host job embeds each
image once, not P times, and every host ends with the same arrays a single process computes
(the kNN bank, the kNN test set, the labels of a semi-supervised subset). Padding examples of a
shard's last batch are masked out before the gather; shards of unequal length are padded for
the gather and cut back after it, so no example is dropped or repeated.
"""

import numpy as np

from byol_jax.runtime import parallel

EVAL_BATCH = 256  # Per process: feature extraction for kNN.


def extract_features(embed, params, bn_state, batches):
  """(features, labels) of the real (unmasked) examples of host batches, in inference mode."""
  feats, labels = [], []
  for batch in batches:
    out = np.asarray(embed(params, bn_state, batch['images']))
    feats.append(out[batch['mask']])
    labels.append(np.asarray(batch['labels'])[batch['mask']])
  return np.concatenate(feats), np.concatenate(labels)


def _shard_batches(config, split, batch_size):
  from byol_jax.data import datasets  # TensorFlow enters here, with the data.
  return datasets.eval_batches(config, split, batch_size)  # This process's shard.


def shard_features(config, embed, params, bn_state, split, batch_size=EVAL_BATCH):
  """(features, labels) of this process's shard of `split`, in the split's order."""
  return extract_features(embed, params, bn_state, _shard_batches(config, split, batch_size))


def split_features(config, embed, params, bn_state, split, batch_size=EVAL_BATCH):
  """(features, labels) of every example of `split`, in the split's order, on every process;
  each process embeds only its shard."""
  return parallel.gather_rows(shard_features(config, embed, params, bn_state, split,
                                             batch_size))


def split_labels(config, split, batch_size=EVAL_BATCH) -> np.ndarray:
  """Labels of every example of `split`, in the split's order, on every process (each process
  reads its shard; the images are not kept)."""
  local = [b['labels'][b['mask']] for b in _shard_batches(config, split, batch_size)]
  return parallel.gather_rows((np.concatenate(local),))[0]
