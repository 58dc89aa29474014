"""Weighted kNN: exact cases that can be checked by hand."""

import numpy as np
import pytest

from byol_jax.evaluation import knn


def test_one_hot_features_classify_perfectly():
  labels = np.arange(60) % 6
  features = np.eye(6)[labels] * 3.0  # Scale must not matter: features are L2-normalised.
  result = knn.knn_accuracy(features, labels, features[:12], labels[:12], k=5,
                            temperature=0.1, num_classes=6)
  assert result['top1'] == 1.0 and result['top5'] == 1.0


# Bank: one class-0 point on the query, two class-1 points at cosine 0.8 and 0.
BANK = np.array([[1., 0.], [0.8, 0.6], [0., 1.]])
BANK_LABELS = np.array([0, 1, 1])
QUERY, QUERY_LABEL = np.array([[1., 0.]]), np.array([0])


@pytest.mark.parametrize('k, temperature, expected_top1', [
    (1, 1.0, 1.0),  # Nearest neighbour only: class 0.
    # Votes exp(s / T): class 0 e^1 = 2.72 < class 1 e^0.8 + e^0 = 3.23.
    (3, 1.0, 0.0),
    # Class 0 e^10 = 22026 > class 1 e^8 + e^0 = 2982: a low temperature favours the closest.
    (3, 0.1, 1.0),
    (200, 0.1, 1.0),  # k larger than the bank is clipped to the bank.
])
def test_weighted_vote_by_hand(k, temperature, expected_top1):
  result = knn.knn_accuracy(BANK, BANK_LABELS, QUERY, QUERY_LABEL, k=k,
                            temperature=temperature, num_classes=2)
  assert result['top1'] == expected_top1
  assert result['top5'] == 1.0  # Two classes: the label is always in the top 5.
  assert result['k'] == min(k, len(BANK))
