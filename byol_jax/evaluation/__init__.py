"""Evaluation layer: pure linear/fine-tune steps and kNN (core only, no TensorFlow), and the
drivers that feed them data (data/, runtime/).
"""
