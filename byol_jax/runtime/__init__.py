"""Runtime layer: devices and processes, checkpoints, metrics, export and interop.

Imports core/ (never data/, evaluation/ or the entry points); no TensorFlow.
"""
