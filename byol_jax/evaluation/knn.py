"""Weighted kNN classification on features, as the self-supervised literature reports it.

Cosine similarity between L2-normalised features; each of the k nearest training examples votes
for its class with weight exp(similarity / temperature) (Wu et al., 2018; k=200, T=0.1).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=('k', 'num_classes'))
def _votes(test, bank, bank_labels, *, k, temperature, num_classes):
  similarity = test @ bank.T  # [t, n]
  top_sim, top_idx = jax.lax.top_k(similarity, k)
  weights = jnp.exp(top_sim / temperature)
  one_hot = jax.nn.one_hot(bank_labels[top_idx], num_classes)  # [t, k, c]
  return jnp.einsum('tk,tkc->tc', weights, one_hot)


def _normalize(x):
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def knn_accuracy(bank_features, bank_labels, test_features, test_labels, *, k=200,
                 temperature=0.1, num_classes=None, chunk=1024) -> dict:
  """Top-1 / top-5 accuracy (fractions) of weighted kNN of test against the bank."""
  bank, test = _normalize(bank_features), _normalize(test_features)
  bank_labels, test_labels = np.asarray(bank_labels), np.asarray(test_labels)
  if num_classes is None:
    num_classes = int(max(bank_labels.max(), test_labels.max())) + 1
  k = min(k, len(bank))
  top1 = top5 = 0
  for start in range(0, len(test), chunk):
    votes = np.asarray(_votes(test[start:start + chunk], bank, bank_labels, k=k,
                              temperature=temperature, num_classes=num_classes))
    labels = test_labels[start:start + chunk]
    ranked = np.argsort(-votes, axis=-1)
    top1 += int(np.sum(ranked[:, 0] == labels))
    top5 += int(np.sum(np.any(ranked[:, :5] == labels[:, None], axis=-1)))
  return dict(top1=top1 / len(test), top5=top5 / len(test), k=k, temperature=temperature)
