"""Input pipelines: per-process shards and batches of augmented views of a split (sources.py
says where the examples come from and how splits are cut).

Determinism: batch k of every training stream is a pure function of (config.seed, k, process
index). Each epoch visits the process's shard in an order drawn from (seed, epoch, process)
(a stateless permutation for in-memory and file data; seeded file order and shuffle buffer for
TFDS streams). Every crop and photometric draw for an image is a stateless draw from that
image's own seed, a function of (seed, stream, epoch, the image's global index in the split;
for TFDS streams its place in the process's epoch read order) and of the view only: not of the
batch size, the image's slot in its batch, or (for in-memory and folder data) the process
count. So the same image gets the same views at batch 64 and 128, and resuming at step k yields exactly the batches
an uninterrupted run would have seen. An epoch is `len(shard) // local batch` steps; examples
past the last full batch of an epoch's order are skipped for that epoch only.

Each process reads its own contiguous shard of a split (index / count), and yields host-local
numpy batches with leading axis config.batch_size // process_count. Images are float32 NHWC
in [0, 1]; the network normalises them.
"""

import itertools
import math
from typing import Iterator

import numpy as np
import tensorflow as tf

from byol_jax.data import augmentations, seeds
from byol_jax.data.sources import (  # pylint: disable=unused-import  (the data layer's API)
    _decode, _Examples, _map, _split, _TfdsStream, has_split, num_examples,
    skipped_corrupt_images)

# Independent random streams, so pretraining and linear evaluation never share draws.
_PRETRAIN_STREAM, _LINEAR_EVAL_STREAM = 1, 2
# Purposes inside a stream: example order per epoch, augmentation per step.
_ORDER, _AUGMENT = 0, 1


# ---------------------------------------------------------------------------------------------
# Building batches.


def _process(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, {process_count}).')
  return process_index, process_count


def _in_memory_images(examples):
  # A variable, not a constant: a constant would copy the whole array into the dataset graph.
  return tf.Variable(examples.images, trainable=False)


def _read_file(paths, index):
  return _decode(tf.io.read_file(tf.gather(paths, index)))


def _image_seeds(seed, stream, epoch, keys):
  """Per-image seeds [B, 2] of every augmentation draw of the images with global `keys` [B] in
  `epoch`: a function of (seed, stream, epoch, key) only, so not of the batch size, the image's
  place in its batch or the process count."""
  epoch_seed = augmentations.derive_seed([seed, stream], _AUGMENT, epoch)
  return seeds.image_seeds(epoch_seed, keys)


def _epoch_order(positions, *, seed, stream, epoch, process_index, shard_size):
  """Example indices at `positions` of the epoch's permutation of the shard (stateless)."""
  order_seed = augmentations.derive_seed([seed, stream], _ORDER, epoch, process_index)
  return tf.random.experimental.index_shuffle(positions, order_seed, shard_size - 1)


def _random_access_batches(shard, *, seed, stream, start_step, steps_per_epoch, local_batch,
                           process_index, key_offset, crop_batch, crop_image):
  """Endless dataset of cropped batches {'step', 'labels', **crops} of a random-access shard.

  Slot i of step k holds position (k mod steps_per_epoch) * b + i of the epoch's permutation,
  so no step depends on what was read before it and any step can come first. Every image has
  per-image seeds from its global index (`key_offset` + index in the shard; `_image_seeds`).
  In-memory images of one size are gathered and cropped a batch at a time (`crop_batch(images,
  seeds [B, 2])`); files are read and cropped one by one (`crop_image(image, seeds [1, 2])`).
  """
  labels = tf.constant(shard.labels)

  def step_indices(step):
    positions = (step % steps_per_epoch) * local_batch + tf.range(local_batch, dtype=tf.int64)
    return _epoch_order(positions, seed=seed, stream=stream, epoch=step // steps_per_epoch,
                        process_index=process_index, shard_size=len(shard))

  def step_seeds(step, indices):
    return _image_seeds(seed, stream, step // steps_per_epoch, key_offset + indices)

  steps = tf.data.Dataset.counter(start_step)
  if shard.images is not None:
    images = _in_memory_images(shard)

    def read_and_crop(step):
      indices = step_indices(step)
      image_seeds = step_seeds(step, indices)
      crops = crop_batch(tf.gather(images, indices), image_seeds)
      return dict(crops, step=step, seeds=image_seeds, labels=tf.gather(labels, indices))

    return _map(steps, read_and_crop)

  paths = tf.constant(shard.paths)

  def slots(step):
    indices = step_indices(step)
    return {'step': tf.fill([local_batch], step), 'index': indices,
            'seeds': step_seeds(step, indices)}

  def read_and_crop_one(element):
    crops = crop_image(_read_file(paths, element['index']), element['seeds'][None])
    return dict(crops, step=element['step'], seeds=element['seeds'],
                labels=tf.gather(labels, element['index']))

  return _batch_cropped_images(
      _map(_map(steps, slots, parallel=False).unbatch(), read_and_crop_one),
      local_batch)


def _batch_cropped_images(elements, local_batch):
  def one_step(batch):
    return dict(batch, step=batch['step'][0])
  return _map(elements.batch(local_batch, drop_remainder=True), one_step, parallel=False)


def _epoch_seed(seed, stream, epoch, process_index):
  """A Python int seed for TFDS file order and the shuffle buffer (they take no tensors)."""
  return int(np.random.SeedSequence([seed, stream, epoch, process_index]).generate_state(1)[0])


def _streamed_epoch_batches(shard, *, seed, stream, epoch, first_step, steps_per_epoch,
                            local_batch, process_index, key_offset, shuffle_buffer, crop_image):
  """Cropped batches of one epoch of a TFDS stream, from `first_step` to the epoch's end.

  File order and shuffle buffer are seeded from (seed, epoch, process); a resumed epoch skips
  the records of the steps before `first_step` without decoding them. An image's per-image
  seeds come from its place in the epoch's read order (offset by `key_offset`).
  """
  epoch_seed = _epoch_seed(seed, stream, epoch, process_index)
  skipped = (first_step - epoch * steps_per_epoch) * local_batch
  records = shard.read(shuffle_seed=epoch_seed).shuffle(shuffle_buffer, seed=epoch_seed)
  records = records.skip(skipped).take(steps_per_epoch * local_batch - skipped)

  def decode_and_crop(position, record):
    step = first_step + position // local_batch
    image_seeds = _image_seeds(seed, stream, epoch, key_offset + skipped + position[None])
    crops = crop_image(_decode(record['image']), image_seeds)
    return dict(crops, step=step, seeds=image_seeds[0], labels=tf.cast(record['label'], tf.int32))

  return _batch_cropped_images(
      _map(records.enumerate(), decode_and_crop),
      local_batch)


def _finish(dataset):
  options = tf.data.Options()
  options.deterministic = True
  return dataset.prefetch(tf.data.AUTOTUNE).with_options(options)


def _training_batches(config, split, *, stream, local_batch, start_step, process_index,
                      process_count, crop_batch, crop_image, augment_batch, indices=None):
  """Endless numpy training batches of `split` (or of its examples at `indices`), from
  `start_step` on.

  Images are cropped by `crop_batch` / `crop_image` (see `_random_access_batches`), then each
  batch {'step', 'labels', **crops} goes through `augment_batch`. Streams are read one epoch at
  a time (an epoch is a whole number of batches, so no batch straddles two reads).
  """
  examples = _split(config, split)
  if indices is not None:
    if not isinstance(examples, _Examples):
      raise ValueError(f'Training on a subset (indices=...) needs an in-memory or folder '
                       f'dataset; {config.dataset!r} is streamed from TFDS files.')
    examples = examples.take(np.asarray(indices, np.int64))
  steps_per_epoch = len(examples) // process_count // local_batch
  if steps_per_epoch == 0:
    raise ValueError(
        f'Split {split!r} of dataset {config.dataset!r} has {len(examples)} examples: too few '
        f'for batches of {local_batch} per process on {process_count} process(es).')
  shard = examples.contiguous_shard(process_index, process_count)
  common = dict(seed=config.seed, stream=stream, steps_per_epoch=steps_per_epoch,
                local_batch=local_batch, process_index=process_index, crop_image=crop_image,
                key_offset=process_index * len(examples) // process_count)  # The shard's start.

  def finish(batches):
    return _finish(_map(batches, augment_batch))

  if isinstance(shard, _Examples):
    batches = _random_access_batches(
        shard, start_step=start_step, crop_batch=crop_batch, **common)
    yield from _iterate(finish(batches), shard, start_step)
    return
  for epoch in itertools.count(start_step // steps_per_epoch):
    first_step = max(start_step, epoch * steps_per_epoch)
    batches = _streamed_epoch_batches(
        shard, epoch=epoch, first_step=first_step, shuffle_buffer=config.data.shuffle_buffer,
        **common)
    yield from _iterate(finish(batches), shard, first_step)


def _iterate(dataset, shard, first_step):
  """The dataset's numpy batches; a file that fails to decode mid-run is named in the error."""
  iterator = dataset.as_numpy_iterator()
  step = first_step
  while True:
    try:
      batch = next(iterator)
    except StopIteration:
      return
    except tf.errors.InvalidArgumentError as error:
      raise ValueError(_describe_decode_failure(shard, step, error)) from None
    yield batch
    step += 1


def _describe_decode_failure(shard, step, error):
  paths = getattr(shard, 'paths', None)
  for path in paths if paths is not None else ():  # Slow, but only on the way to an error.
    try:
      _decode(tf.io.read_file(path))
    except tf.errors.InvalidArgumentError:
      return (f'Corrupt image file {path} (cannot be decoded). Remove it, or set '
              'config.data.skip_corrupt_images=True to find and skip such files up front.')
  return f'Could not decode an image of batch {step}: {error.message.splitlines()[0]}'


def _local_batch(config, process_count):
  if config.batch_size % process_count:
    raise ValueError(f'config.batch_size={config.batch_size} is not divisible by the '
                     f'{process_count} processes.')
  return config.batch_size // process_count


# Seed data that tells apart the random draws made from one image's seeds.
_VIEW_CROP = {1: -1, 2: -2}
_VIEW_PHOTOMETRIC = {1: -11, 2: -12}
_LINEAR_EVAL_CROP, _LINEAR_EVAL_FLIP = -21, -22


def pretrain_batches(config, *, start_step=0, process_index=None, process_count=None,
                     include_originals=False) -> Iterator[dict]:
  """Endless host-local batches of two BYOL views of the 'train' split.

  Yields {'view1', 'view2': float32 [b, S, S, 3] in [0, 1], 'labels': int32 [b] (-1 when
  unlabelled)} with b = config.batch_size // process_count and S = config.augment.view_size
  (0: config.image_size); with `include_originals` also 'originals' (the centre square of each
  source image at the same side, for previews).
  The k-th batch yielded is training step start_step + k and depends only on (config.seed,
  step, process_index).
  """
  process_index, process_count = _process(process_index, process_count)
  augment = config.augment
  size = augmentations.view_size(augment, config.image_size)

  def crops(crop, center_crop):
    def crop_views(images, image_seeds):
      views = {f'view{view}': crop(
          images, augmentations.derive_seed(image_seeds, _VIEW_CROP[view]), augment, size)
               for view in (1, 2)}
      if include_originals:
        views['originals'] = center_crop(images, size, fraction=1.0)
      return views
    return crop_views

  def augment_batch(batch):
    """Flip, colour, blur, solarize: per batch, but every image draws its own parameters."""
    image_seeds = batch.pop('seeds')
    del batch['step']
    for view, view_config in ((1, augment.view1), (2, augment.view2)):
      batch[f'view{view}'] = augmentations.view(
          batch[f'view{view}'], augmentations.derive_seed(image_seeds, _VIEW_PHOTOMETRIC[view]),
          augment, view_config)
    return batch

  return _training_batches(
      config, 'train', stream=_PRETRAIN_STREAM,
      local_batch=_local_batch(config, process_count), start_step=start_step,
      process_index=process_index, process_count=process_count,
      crop_batch=crops(augmentations.pretraining_crop_batch, augmentations.center_crop_batch),
      crop_image=crops(augmentations.pretraining_crop, augmentations.center_crop),
      augment_batch=augment_batch)


def linear_eval_batches(config, split, batch_size, *, start_step=0, process_index=None,
                        process_count=None, indices=None) -> Iterator[dict]:
  """Endless host-local batches for linear-evaluation training: random resized crop + flip.

  Yields {'images': float32 [batch_size, S, S, 3] in [0, 1], 'labels': int32 [batch_size]};
  `batch_size` is per process. Batch k is step start_step + k, a pure function of
  (config.seed, step, process_index). Split 'train' means the labelled training examples.
  `indices` (optional) restricts training to those positions of the split, in the order
  `eval_batches` reads it (semi-supervised subsets); not for TFDS-streamed datasets.
  """
  process_index, process_count = _process(process_index, process_count)
  augment, size = config.augment, config.image_size

  def crops(crop):
    return lambda images, image_seeds: {'images': crop(
        images, augmentations.derive_seed(image_seeds, _LINEAR_EVAL_CROP), augment, size)}

  def augment_batch(batch):
    image_seeds = batch.pop('seeds')
    del batch['step']
    batch['images'] = augmentations.linear_eval_view(
        batch['images'], augmentations.derive_seed(image_seeds, _LINEAR_EVAL_FLIP), augment)
    return batch

  return _training_batches(
      config, 'labelled_train' if split == 'train' else split, stream=_LINEAR_EVAL_STREAM,
      local_batch=batch_size, start_step=start_step, process_index=process_index,
      process_count=process_count, crop_batch=crops(augmentations.pretraining_crop_batch),
      crop_image=crops(augmentations.pretraining_crop), augment_batch=augment_batch,
      indices=indices)


def eval_batches(config, split, batch_size, *, process_index=None,
                 process_count=None) -> Iterator[dict]:
  """One deterministic pass over `split` with evaluation preprocessing: the centred square of
  `config.data.eval_crop_fraction` of the short side (the reference's 0.875; 1.0: the whole
  image), resized to config.image_size.

  Yields {'images': float32 [batch_size, S, S, 3] in [0, 1], 'labels': int32, 'mask': bool}
  per process (`batch_size` is per process), in the split's own order. Every process yields
  the same number of batches; padding examples are zero images with label 0 and mask False.
  """
  process_index, process_count = _process(process_index, process_count)
  examples = _split(config, split)
  shard = examples.contiguous_shard(process_index, process_count)
  size, fraction = config.image_size, augmentations.eval_crop_fraction(config.data)
  num_batches = math.ceil(math.ceil(len(examples) / process_count) / batch_size)
  real = len(shard)

  def pad(batch, positions):
    """Zero images, label 0 and mask False past the end of the shard."""
    mask = positions < real
    return {'images': tf.where(mask[:, None, None, None], batch['images'], 0.0),
            'labels': tf.where(mask, batch['labels'], 0), 'mask': mask}

  def positions_of(batch_index):
    return batch_index * batch_size + tf.range(batch_size, dtype=tf.int64)

  if real and isinstance(shard, _Examples) and shard.images is not None:
    images, labels = _in_memory_images(shard), tf.constant(shard.labels)

    def read_batch(batch_index):
      positions = positions_of(batch_index)
      indices = tf.minimum(positions, real - 1)
      batch = {'images': augmentations.center_crop_batch(tf.gather(images, indices), size,
                                                           fraction),
               'labels': tf.gather(labels, indices)}
      return pad(batch, positions)

    batches = _map(tf.data.Dataset.range(num_batches), read_batch)
    return _iterate(_finish(batches), shard, 0)

  def preprocess(image, label):
    return {'images': augmentations.center_crop(image, size, fraction),
            'labels': tf.cast(label, tf.int32)}

  if not real:
    images = tf.data.Dataset.from_tensors(preprocess(tf.zeros([1, 1, 3], tf.uint8), 0)).take(0)
  elif isinstance(shard, _TfdsStream):
    images = _map(shard.read(),
                  lambda record: preprocess(_decode(record['image']), record['label']))
  else:
    paths, labels = tf.constant(shard.paths), tf.constant(shard.labels)
    images = _map(tf.data.Dataset.range(real),
                  lambda index: preprocess(_read_file(paths, index), tf.gather(labels, index)))
  filler = tf.data.Dataset.from_tensors(
      preprocess(tf.zeros([1, 1, 3], tf.uint8), 0)).repeat(num_batches * batch_size - real)
  batches = tf.data.Dataset.zip(
      images.take(real).concatenate(filler).batch(batch_size),
      _map(tf.data.Dataset.range(num_batches), positions_of, parallel=False))
  return _iterate(_finish(_map(batches, pad)), shard, 0)
