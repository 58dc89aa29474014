"""Stateless random draws for augmentations: one seed for a whole batch, or one seed per image.

A seed is either a shape-[2] integer tensor (TensorFlow's stateless seeds: `tf.random.
stateless_*` draws a tensor for the whole batch at once, so image i's draws depend on the batch
size), or an int64 [B, 2] tensor of per-image seeds (`image_seeds`), from which every image draws
its own numbers with a vectorised counter-based hash: image i's draws then depend on its own
seed only, never on the batch size or on the other images. The training pipelines use per-image
seeds derived from (seed, stream, epoch, the image's global index), so a view is the same at
any batch size; the ops accept either kind, and a shape-[2] seed draws exactly what it always
drew (the golden tests pin those draws).
"""

import tensorflow as tf

_MASK32 = 0xFFFFFFFF
# Odd constants for the hash (the golden ratio, and lowbias32's multipliers, Wellons 2018).
_GOLDEN, _MUL1, _MUL2 = 0x9E3779B9, 0x7FEB352D, 0x846CA68B


def is_per_image(seed) -> bool:
  """Whether `seed` holds one seed per image ([B, 2]) rather than one for the batch ([2])."""
  return seed.shape.rank == 2


def _mul32(x, constant):
  """(x * constant) mod 2^32 for int64 x in [0, 2^32), without int64 overflow."""
  low, high = constant & 0xFFFF, constant >> 16
  return (x * low + ((x * high) & 0xFFFF) * 65536) & _MASK32


def _mix(x):
  """lowbias32: a bijective 32-bit integer hash with good avalanche, on int64 [0, 2^32)."""
  x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))
  x = _mul32(x, _MUL1)
  x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 15))
  x = _mul32(x, _MUL2)
  return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))


def _mix_int(x: int) -> int:
  """`_mix` in Python, for constants (folded into the graph instead of computed per batch)."""
  x ^= x >> 16
  x = (x * _MUL1) & _MASK32
  x ^= x >> 15
  x = (x * _MUL2) & _MASK32
  return x ^ (x >> 16)


def _lanes(value):
  """A value (int, or int64 tensor [...]) as two hashed 32-bit lanes [..., 2]."""
  if isinstance(value, int):
    return tf.constant([_mix_int((value & _MASK32) ^ _GOLDEN),
                        _mix_int(((value >> 32) & _MASK32) ^ _MUL1)], tf.int64)
  value = tf.cast(value, tf.int64)
  low, high = value & _MASK32, tf.bitwise.right_shift(value, 32) & _MASK32
  return tf.stack([_mix(low ^ _GOLDEN), _mix(high ^ _MUL1)], axis=-1)


def _fold(seeds, value):
  """Seeds [..., 2] with `value` (int, or int64 broadcastable to seeds[..., 0]) folded in."""
  mixed = _mix(tf.bitwise.bitwise_xor(seeds, _lanes(value)))
  crossed = _mul32(tf.reverse(mixed, axis=[-1]), _MUL1)  # Each lane takes in the other.
  return _mix(tf.bitwise.bitwise_xor(mixed, crossed))


def image_seeds(seed, keys):
  """int64 [B, 2] per-image seeds: image i's is a function of (`seed`, keys[i]) only.

  `seed`: a shape-[2] stateless seed; `keys`: int64 [B], e.g. each image's global index.
  """
  seed = tf.cast(seed, tf.int64) & _MASK32
  keys = tf.cast(keys, tf.int64)
  return _fold(seed[None, :], keys)


def derive_seed(seed, *data):
  """Folds integers into a seed: an independent seed per (seed, data), of the same kind."""
  seed = tf.cast(seed, tf.int64)
  for value in data:
    if is_per_image(seed):
      seed = _fold(seed, value)
    else:
      seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(value, tf.int64))
  return seed


def split_seed(seed, num):
  """`num` independent seeds of the same kind."""
  seed = tf.cast(seed, tf.int64)
  if is_per_image(seed):  # All `num` folds at once: [B, num, 2].
    values = tf.stack([_lanes(-1 - i) for i in range(num)])
    mixed = _mix(tf.bitwise.bitwise_xor(seed[:, None, :], values[None]))
    crossed = _mul32(tf.reverse(mixed, axis=[-1]), _MUL1)
    return tf.unstack(_mix(tf.bitwise.bitwise_xor(mixed, crossed)), num, axis=1)
  return tf.unstack(tf.random.experimental.stateless_split(seed, num))


def uniform(seed, batch_size, shape=(), minval=0.0, maxval=1.0):
  """float32 [batch_size, *shape] uniform in [minval, maxval): row i is image i's draw.

  A batch seed draws `tf.random.stateless_uniform([batch_size, *shape], seed)`; per-image seeds
  draw prod(shape) numbers from each image's own seed.
  """
  if not is_per_image(seed):
    return tf.random.stateless_uniform([batch_size, *shape], seed, minval, maxval)
  count = 1
  for size in shape:
    count *= size
  counters = tf.constant([[_mix_int(i ^ _GOLDEN) for i in range(count)]], tf.int64)
  bits = _mix(tf.bitwise.bitwise_xor(
      _mix(tf.bitwise.bitwise_xor(seed[:, :1], counters)), seed[:, 1:]))
  unit = tf.cast(tf.bitwise.right_shift(bits, 8), tf.float32) * (1.0 / (1 << 24))
  values = minval + (maxval - minval) * unit
  return tf.reshape(values, tf.concat([[tf.shape(seed)[0]], tf.constant(shape, tf.int32)], 0))


def coin(seed, batch_size, prob):
  """Per-image Bernoulli(prob) draws, shape [batch_size] bool."""
  return uniform(seed, batch_size) < prob
