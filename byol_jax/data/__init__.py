"""Data layer: sources (TFDS, image folders, digits), splits, augmentations, batches.

The only layer that imports TensorFlow. It imports nothing else from byol_jax.
"""
