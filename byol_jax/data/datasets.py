"""Input pipelines: datasets, splits, per-process shards, batches of augmented views.

Datasets (`config.dataset`):
  * TFDS: `cifar10`, `cifar100` (held in memory), `imagenet2012`, `stl10` (streamed from TFDS
    files; stl10 pretrains on its labelled `train` plus `unlabelled` split, label -1);
  * `folder:/root`: images in root/<split>/<class>/<file> (jpg, png, bmp, gif, webp);
    the test split is root/test (or root/val, root/validation) when present;
  * `digits`: scikit-learn's 1,797 8x8 digits, upsampled to `config.image_size`, as RGB.

Splits (`num_examples`, `eval_batches`, `linear_eval_batches`), as the reference defines them
for ImageNet (its VALID is TFDS train[:10000], TRAIN is train[10000:], TRAIN_AND_VALID all of it,
TEST the TFDS validation split):
  * 'validation': the FIRST `config.data.validation_examples` labelled training examples.
    Folder examples are ordered round-robin over classes, so this head is class-balanced (the
    first files of every class);
  * 'train': the pretraining examples (plus unlabelled data for stl10). With
    `config.data.train_on_validation=True` (the reference: it pretrains and linear-evaluates on
    TRAIN_AND_VALID) that is every labelled training example, the validation ones included;
    with False (TRAIN) the validation examples are left out, so that 'validation' is unseen
    data (kNN monitors; datasets without a test split);
  * 'labelled_train': the labelled part of 'train' (differs from 'train' only for stl10);
  * 'test': the dataset's own test split.

Determinism: batch k of every training stream is a pure function of (config.seed, k, process
index). Each epoch visits the process's shard in an order drawn from (seed, epoch, process)
(a stateless permutation for in-memory and file data; seeded file order and shuffle buffer for
TFDS streams); every crop and photometric draw is a stateless op seeded from (seed, step,
process) and the image's place in the batch. So resuming at step k yields exactly the batches
an uninterrupted run would have seen. An epoch is `len(shard) // local batch` steps; examples
past the last full batch of an epoch's order are skipped for that epoch only.

Each process reads its own contiguous shard of a split (index / count), and yields host-local
numpy batches with leading axis config.batch_size // process_count. Images are float32 NHWC
in [0, 1]; the network normalises them.
"""

import dataclasses
import functools
import itertools
import math
import os
import pathlib
from typing import Iterator, Optional

from absl import logging
import numpy as np

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # Keep TF's C++ INFO/WARNING lines quiet.

import tensorflow as tf  # pylint: disable=g-import-not-at-top

from byol_jax.data import augmentations  # pylint: disable=g-import-not-at-top


def _hide_accelerators_from_tf():
  """TF only feeds the host; left alone it would claim all GPU memory that JAX needs."""
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TF already initialised its devices; nothing to do then.
    pass


_hide_accelerators_from_tf()

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')
# Folders whose decoded images fit in this many bytes are decoded once and kept in memory.
_IN_MEMORY_BYTES = 1 << 30
# Independent random streams, so pretraining and linear evaluation never share draws.
_PRETRAIN_STREAM, _LINEAR_EVAL_STREAM = 1, 2
# Purposes inside a stream: example order per epoch, augmentation per step.
_ORDER, _AUGMENT = 0, 1


@dataclasses.dataclass(frozen=True)
class _TfdsSpec:
  labelled_train: str
  unlabelled: tuple = ()  # Extra pretraining splits without labels.
  test: Optional[str] = None
  in_memory: bool = False  # Small enough to decode once into a numpy array.


_TFDS_DATASETS = {
    'imagenet2012': _TfdsSpec('train', test='validation'),
    'cifar10': _TfdsSpec('train', test='test', in_memory=True),
    'cifar100': _TfdsSpec('train', test='test', in_memory=True),
    'stl10': _TfdsSpec('train', unlabelled=('unlabelled',), test='test'),
}
_TEST_FOLDER_NAMES = ('test', 'val', 'validation')


# ---------------------------------------------------------------------------------------------
# Where examples come from.


@dataclasses.dataclass(frozen=True)
class _Examples:
  """Examples readable by index: decoded images in memory, or image files decoded on read."""
  labels: np.ndarray  # int32 [N]
  images: Optional[np.ndarray] = None  # uint8 [N, H, W, 3], all one size.
  paths: Optional[np.ndarray] = None  # str [N]

  def __len__(self):
    return len(self.labels)

  def take(self, indices):
    pick = lambda array: None if array is None else array[indices]
    return _Examples(self.labels[indices], pick(self.images), pick(self.paths))

  def contiguous_shard(self, process_index, process_count):
    n = len(self)
    return self.take(slice(process_index * n // process_count,
                           (process_index + 1) * n // process_count))


@dataclasses.dataclass(frozen=True)
class _TfdsStream:
  """Examples read in file order from a prepared TFDS dataset (too big to hold in memory).

  `parts` are (split name, start, stop) ranges, concatenated.
  """
  builder: object
  parts: tuple

  def __len__(self):
    return sum(stop - start for _, start, stop in self.parts)

  def contiguous_shard(self, process_index, process_count):
    n = len(self)
    begin, end = process_index * n // process_count, (process_index + 1) * n // process_count
    parts, offset = [], 0
    for name, start, stop in self.parts:
      lo, hi = max(begin - offset, 0), min(end - offset, stop - start)
      if lo < hi:
        parts.append((name, start + lo, start + hi))
      offset += stop - start
    return _TfdsStream(self.builder, tuple(parts))

  def split_string(self):
    return '+'.join(f'{name}[{start}:{stop}]' for name, start, stop in self.parts)

  def read(self, *, shuffle_seed=None):
    """Records with the image still encoded: decoding happens in the parallel map."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed)
    return self.builder.as_dataset(
        split=self.split_string(), shuffle_files=shuffle_seed is not None,
        read_config=read_config, decoders={'image': tfds.decode.SkipDecoding()})


def _map(dataset, fn, parallel=True):
  """dataset.map without AutoGraph. These functions have no tensor-dependent Python control
  flow, and converting them took most of a pipeline's start-up time (tens of seconds)."""
  fn = tf.autograph.experimental.do_not_convert(fn)
  if not parallel:
    return dataset.map(fn)
  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _decode(encoded):
  """Any supported file format to uint8 [H, W, 3]: gray is replicated, alpha is dropped."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


# ---------------------------------------------------------------------------------------------
# Loading each kind of dataset, once per process.


def _check_holdout(n, validation_examples, dataset):
  if validation_examples < 0 or validation_examples >= n:
    raise ValueError(
        f'config.data.validation_examples={validation_examples} must be in [0, {n}) for '
        f'dataset {dataset!r}, which has {n} labelled training examples.')


def _holdout_ranges(n, validation_examples, train_on_validation, dataset):
  """(train, validation) index ranges [start, stop) of n labelled training examples: the
  validation split is the first N; training covers all n, or the rest after the first N."""
  _check_holdout(n, validation_examples, dataset)
  train_start = 0 if train_on_validation else validation_examples
  return (train_start, n), (0, validation_examples)


def _holdout(examples, validation_examples, train_on_validation, dataset):
  """Splits labelled training examples into (train, validation = the first N)."""
  train, validation = _holdout_ranges(len(examples), validation_examples, train_on_validation,
                                      dataset)
  return examples.take(slice(*train)), examples.take(slice(*validation))


def _load_digits(image_size, validation_examples, train_on_validation):
  from sklearn import datasets as sklearn_datasets  # pylint: disable=g-import-not-at-top
  digits = sklearn_datasets.load_digits()
  gray = tf.constant(digits.images[..., None] / 16.0, tf.float32)  # 8x8, values 0..16.
  gray = tf.clip_by_value(tf.image.resize(gray, [image_size, image_size], 'bicubic'), 0., 1.)
  rgb = tf.image.convert_image_dtype(tf.tile(gray, [1, 1, 1, 3]), tf.uint8, saturate=True)
  examples = _Examples(digits.target.astype(np.int32), images=rgb.numpy())
  train, validation = _holdout(examples, validation_examples, train_on_validation, 'digits')
  return {'train': train, 'labelled_train': train, 'validation': validation}


def _tfds_builder(name, data_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.builder(name, data_dir=data_dir or None)


def _tfds_split_size(builder, split):
  if builder.info.splits:
    return builder.info.splits[split].num_examples
  # No split metadata (tfds.testing.mock_data): count what the dataset yields.
  return int(builder.as_dataset(split=split).cardinality().numpy())


def _tfds_in_memory(builder, split):
  images, labels = [], []
  for batch in builder.as_dataset(split=split).batch(4096).as_numpy_iterator():
    images.append(batch['image'])
    labels.append(batch['label'])
  return _Examples(np.concatenate(labels).astype(np.int32), images=np.concatenate(images))


def _load_tfds(name, data_dir, validation_examples, train_on_validation):
  spec = _TFDS_DATASETS[name]
  builder = _tfds_builder(name, data_dir)
  try:
    sizes = {split: _tfds_split_size(builder, split)
             for split in (spec.labelled_train, *spec.unlabelled, spec.test) if split}
  except AssertionError as error:  # TFDS signals "not prepared" with an assertion.
    raise FileNotFoundError(
        f'TFDS dataset {name!r} is not prepared in data_dir={data_dir or "(TFDS default)"}: '
        f'run tfds.builder({name!r}).download_and_prepare() first ({error}).') from None
  if spec.in_memory:
    train, validation = _holdout(_tfds_in_memory(builder, spec.labelled_train),
                                 validation_examples, train_on_validation, name)
    splits = {'train': train, 'labelled_train': train, 'validation': validation}
    if spec.test:
      splits['test'] = _tfds_in_memory(builder, spec.test)
    return splits
  train, validation = _holdout_ranges(sizes[spec.labelled_train], validation_examples,
                                      train_on_validation, name)
  train_part = (spec.labelled_train, *train)
  splits = {
      'train': _TfdsStream(
          builder, (train_part, *((s, 0, sizes[s]) for s in spec.unlabelled))),
      'labelled_train': _TfdsStream(builder, (train_part,)),
      'validation': _TfdsStream(builder, ((spec.labelled_train, *validation),)),
  }
  if spec.test:
    splits['test'] = _TfdsStream(builder, ((spec.test, 0, sizes[spec.test]),))
  return splits


def _list_folder_split(split_dir, class_names=None):
  """Image files of root/split/<class>/, ordered round-robin over classes.

  Returns (paths, labels, class_names). Round-robin order (every class's first file, then every
  class's second file, ...) keeps any contiguous slice, such as the validation tail or a
  process shard, balanced over classes.
  """
  found = sorted(entry.name for entry in os.scandir(split_dir)
                 if entry.is_dir() and not entry.name.startswith('.'))
  if class_names is None:
    class_names = found
  unknown = sorted(set(found) - set(class_names))
  if unknown:
    raise ValueError(f'{split_dir} has classes not in the training split: {unknown[:5]}.')
  per_class = []
  for label, name in enumerate(class_names):
    class_dir = split_dir / name
    files = sorted(
        entry.name for entry in os.scandir(class_dir) if entry.is_file()
        and not entry.name.startswith('.')
        and entry.name.lower().endswith(IMAGE_EXTENSIONS)) if class_dir.is_dir() else []
    per_class.append([(str(class_dir / file), label) for file in files])
  ordered = [item for rank in range(max(map(len, per_class), default=0))
             for files in per_class if rank < len(files) for item in [files[rank]]]
  if not ordered:
    raise ValueError(
        f'Split folder {split_dir} is empty: expected images ({", ".join(IMAGE_EXTENSIONS)}) '
        f'in {split_dir}/<class>/.')
  paths, labels = zip(*ordered)
  return np.array(paths), np.array(labels, np.int32), class_names


def _decode_files(paths, keep_images):
  """Decodes every file once (in parallel); returns (images or None, indices of corrupt files).

  `images` is a uint8 [N, H, W, 3] array when `keep_images` and every file decoded to the
  same size; otherwise None.
  """
  def decode(index, path):
    image = _decode(tf.io.read_file(path))
    pixels = tf.reshape(image, [-1]) if keep_images else tf.zeros([0], tf.uint8)
    return index, tf.shape(image), pixels

  # Failing files drop out (ignore_errors); their indices are the ones never seen. Batching
  # keeps Python's per-file work small; ragged, because sizes may differ.
  decoded = _map(tf.data.Dataset.from_tensor_slices((np.arange(len(paths)), paths)), decode)
  decoded = decoded.ignore_errors().ragged_batch(1024)
  images, ok = None, np.zeros(len(paths), bool)
  for indices, shapes, pixels in decoded.as_numpy_iterator():
    ok[indices] = True
    if not keep_images:
      continue
    if images is None:
      images = np.zeros((len(paths), *shapes[0]), np.uint8)
    if np.any(shapes != images.shape[1:]):
      keep_images, images = False, None  # Mixed sizes: read the files on demand instead.
      continue
    for index, row in zip(indices, pixels):  # Rows: numpy arrays, or one 2-D array.
      images[index] = np.reshape(row, images.shape[1:])
  return images, np.flatnonzero(~ok)


def _read_folder_split(split_dir, class_names, skip_corrupt_images):
  """Lists a folder split and decides whether to hold it decoded in memory."""
  paths, labels, class_names = _list_folder_split(split_dir, class_names)
  try:
    first = _decode(tf.io.read_file(paths[0])).shape
    in_memory = len(paths) * first.num_elements() <= _IN_MEMORY_BYTES
  except tf.errors.InvalidArgumentError:
    in_memory = True  # Small or not, the full scan below names the corrupt file(s).
  images, corrupt = None, np.zeros(0, int)
  if in_memory or skip_corrupt_images:
    if not in_memory:
      logging.info('Scanning %d files of %s for corrupt images.', len(paths), split_dir)
    images, corrupt = _decode_files(paths, keep_images=in_memory)
  if len(corrupt) and not skip_corrupt_images:
    raise ValueError(
        f'Corrupt image file {paths[corrupt[0]]} (cannot be decoded; {len(corrupt)} such '
        f'file(s) in {split_dir}). Remove it or set config.data.skip_corrupt_images=True.')
  if len(corrupt):
    logging.warning('Skipped %d corrupt image file(s) in %s, first: %s', len(corrupt),
                    split_dir, paths[corrupt[0]])
  if len(corrupt) == len(paths):
    raise ValueError(f'Split folder {split_dir} has no decodable images ({len(paths)} corrupt).')
  good = np.setdiff1d(np.arange(len(paths)), corrupt)
  examples = _Examples(labels, images=images, paths=None if images is not None else paths)
  return examples.take(good), class_names, [str(paths[i]) for i in corrupt]


def _load_folder(root, validation_examples, train_on_validation, skip_corrupt_images):
  root = pathlib.Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f'Image folder {root} does not exist (dataset folder:{root}).')
  train_dir = root / 'train'
  if not train_dir.is_dir():
    raise FileNotFoundError(
        f'Image folder {root} has no train split: expected {train_dir}/<class>/<image>.')
  labelled, class_names, skipped = _read_folder_split(train_dir, None, skip_corrupt_images)
  train, validation = _holdout(labelled, validation_examples, train_on_validation,
                               f'folder:{root}')
  splits = {'train': train, 'labelled_train': train, 'validation': validation,
            'skipped_corrupt': skipped}
  for name in _TEST_FOLDER_NAMES:
    if (root / name).is_dir():
      splits['test'], _, test_skipped = _read_folder_split(
          root / name, class_names, skip_corrupt_images)
      splits['skipped_corrupt'] = skipped + test_skipped
      break
  return splits


@functools.lru_cache(maxsize=8)
def _load_splits(dataset, data_dir, image_size, validation_examples, train_on_validation,
                 skip_corrupt_images):
  """All splits of a dataset; cached so that counting and iterating read the data once."""
  if dataset == 'digits':
    return _load_digits(image_size, validation_examples, train_on_validation)
  if dataset.startswith('folder:'):
    return _load_folder(dataset[len('folder:'):], validation_examples, train_on_validation,
                        skip_corrupt_images)
  if dataset in _TFDS_DATASETS:
    return _load_tfds(dataset, data_dir, validation_examples, train_on_validation)
  raise ValueError(
      f'Unknown dataset {dataset!r}: use one of {sorted(_TFDS_DATASETS)}, digits, or '
      'folder:/path/to/root (root/<split>/<class>/<image>).')


_SPLITS = ('train', 'labelled_train', 'validation', 'test')


def _all_splits(config):
  image_size = config.image_size if config.dataset == 'digits' else None  # Only digits uses it.
  return _load_splits(config.dataset, config.data.data_dir, image_size,
                      config.data.validation_examples, bool(config.data.train_on_validation),
                      config.data.skip_corrupt_images)


def _split(config, split):
  if split not in _SPLITS:
    raise ValueError(f'Unknown split {split!r}: use one of {_SPLITS}.')
  splits = _all_splits(config)
  if split not in splits:
    raise ValueError(f'Dataset {config.dataset!r} has no test split.')
  return splits[split]


def has_split(config, split) -> bool:
  """Whether the dataset has `split` ('test' is the one that may be missing)."""
  return split in _all_splits(config)


def num_examples(config, split):
  """Examples in `split` over all processes ('train', 'labelled_train', 'validation', 'test')."""
  return len(_split(config, split))


def skipped_corrupt_images(config):
  """Files skipped as undecodable (config.data.skip_corrupt_images=True; folders only)."""
  return list(_all_splits(config).get('skipped_corrupt', []))


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


def _step_seed(seed, stream, step, process_index):
  """The seed of every augmentation draw of one training step on one process."""
  return augmentations.derive_seed([seed, stream], _AUGMENT, step, process_index)


def _epoch_order(positions, *, seed, stream, epoch, process_index, shard_size):
  """Example indices at `positions` of the epoch's permutation of the shard (stateless)."""
  order_seed = augmentations.derive_seed([seed, stream], _ORDER, epoch, process_index)
  return tf.random.experimental.index_shuffle(positions, order_seed, shard_size - 1)


def _random_access_batches(shard, *, seed, stream, start_step, steps_per_epoch, local_batch,
                           process_index, crop_batch, crop_image):
  """Endless dataset of cropped batches {'step', 'labels', **crops} of a random-access shard.

  Slot i of step k holds position (k mod steps_per_epoch) * b + i of the epoch's permutation,
  so no step depends on what was read before it and any step can come first. In-memory images
  of one size are gathered and cropped a batch at a time (`crop_batch(images, step_seed)`);
  files are read and cropped one by one (`crop_image(image, step_seed, slot)`).
  """
  labels = tf.constant(shard.labels)

  def step_indices(step):
    positions = (step % steps_per_epoch) * local_batch + tf.range(local_batch, dtype=tf.int64)
    return _epoch_order(positions, seed=seed, stream=stream, epoch=step // steps_per_epoch,
                        process_index=process_index, shard_size=len(shard))

  steps = tf.data.Dataset.counter(start_step)
  if shard.images is not None:
    images = _in_memory_images(shard)

    def read_and_crop(step):
      indices = step_indices(step)
      crops = crop_batch(tf.gather(images, indices),
                         _step_seed(seed, stream, step, process_index))
      return dict(crops, step=step, labels=tf.gather(labels, indices))

    return _map(steps, read_and_crop)

  paths = tf.constant(shard.paths)

  def slots(step):
    return {'step': tf.fill([local_batch], step), 'slot': tf.range(local_batch),
            'index': step_indices(step)}

  def read_and_crop_one(element):
    crops = crop_image(_read_file(paths, element['index']),
                       _step_seed(seed, stream, element['step'], process_index),
                       element['slot'])
    return dict(crops, step=element['step'], labels=tf.gather(labels, element['index']))

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
                            local_batch, process_index, shuffle_buffer, crop_image):
  """Cropped batches of one epoch of a TFDS stream, from `first_step` to the epoch's end.

  File order and shuffle buffer are seeded from (seed, epoch, process); a resumed epoch skips
  the records of the steps before `first_step` without decoding them.
  """
  epoch_seed = _epoch_seed(seed, stream, epoch, process_index)
  skipped = (first_step - epoch * steps_per_epoch) * local_batch
  records = shard.read(shuffle_seed=epoch_seed).shuffle(shuffle_buffer, seed=epoch_seed)
  records = records.skip(skipped).take(steps_per_epoch * local_batch - skipped)

  def decode_and_crop(position, record):
    step = first_step + position // local_batch
    crops = crop_image(_decode(record['image']), _step_seed(seed, stream, step, process_index),
                       position % local_batch)
    return dict(crops, step=step, labels=tf.cast(record['label'], tf.int32))

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
                local_batch=local_batch, process_index=process_index, crop_image=crop_image)

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


# Seed data that tells apart the random draws within one training step. Slots (>= 0) seed the
# per-image crops of file-backed data; these negative values seed everything else.
_VIEW_CROP = {1: -1, 2: -2}
_VIEW_PHOTOMETRIC = {1: -11, 2: -12}
_LINEAR_EVAL_CROP, _LINEAR_EVAL_FLIP = -21, -22


def pretrain_batches(config, *, start_step=0, process_index=None, process_count=None,
                     include_originals=False) -> Iterator[dict]:
  """Endless host-local batches of two BYOL views of the 'train' split.

  Yields {'view1', 'view2': float32 [b, S, S, 3] in [0, 1], 'labels': int32 [b] (-1 when
  unlabelled)} with b = config.batch_size // process_count and S = config.image_size; with
  `include_originals` also 'originals' (the centre square of each source image, for previews).
  The k-th batch yielded is training step start_step + k and depends only on (config.seed,
  step, process_index).
  """
  process_index, process_count = _process(process_index, process_count)
  augment, size = config.augment, config.image_size

  def crop_batch(images, step_seed):
    crops = {f'view{view}': augmentations.pretraining_crop_batch(
        images, augmentations.derive_seed(step_seed, _VIEW_CROP[view]), augment, size)
             for view in (1, 2)}
    if include_originals:
      crops['originals'] = augmentations.center_crop_batch(images, size, fraction=1.0)
    return crops

  def crop_image(image, step_seed, slot):
    image_seed = augmentations.derive_seed(step_seed, slot)
    crops = {f'view{view}': augmentations.pretraining_crop(
        image, augmentations.derive_seed(image_seed, view), augment, size) for view in (1, 2)}
    if include_originals:
      crops['originals'] = augmentations.center_crop(image, size, fraction=1.0)
    return crops

  def augment_batch(batch):
    """Flip, colour, blur, solarize: per batch, but every image draws its own parameters."""
    step_seed = _step_seed(config.seed, _PRETRAIN_STREAM, batch.pop('step'), process_index)
    for view, view_config in ((1, augment.view1), (2, augment.view2)):
      batch[f'view{view}'] = augmentations.view(
          batch[f'view{view}'], augmentations.derive_seed(step_seed, _VIEW_PHOTOMETRIC[view]),
          augment, view_config)
    return batch

  return _training_batches(
      config, 'train', stream=_PRETRAIN_STREAM,
      local_batch=_local_batch(config, process_count), start_step=start_step,
      process_index=process_index, process_count=process_count, crop_batch=crop_batch,
      crop_image=crop_image, augment_batch=augment_batch)


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

  def crop_batch(images, step_seed):
    return {'images': augmentations.pretraining_crop_batch(
        images, augmentations.derive_seed(step_seed, _LINEAR_EVAL_CROP), augment, size)}

  def crop_image(image, step_seed, slot):
    return {'images': augmentations.pretraining_crop(
        image, augmentations.derive_seed(step_seed, slot), augment, size)}

  def augment_batch(batch):
    step_seed = _step_seed(config.seed, _LINEAR_EVAL_STREAM, batch.pop('step'), process_index)
    batch['images'] = augmentations.linear_eval_view(
        batch['images'], augmentations.derive_seed(step_seed, _LINEAR_EVAL_FLIP), augment)
    return batch

  return _training_batches(
      config, 'labelled_train' if split == 'train' else split, stream=_LINEAR_EVAL_STREAM,
      local_batch=batch_size, start_step=start_step, process_index=process_index,
      process_count=process_count, crop_batch=crop_batch, crop_image=crop_image,
      augment_batch=augment_batch, indices=indices)


def eval_batches(config, split, batch_size, *, process_index=None,
                 process_count=None) -> Iterator[dict]:
  """One deterministic pass over `split` with evaluation preprocessing (centre crop 0.875).

  Yields {'images': float32 [batch_size, S, S, 3] in [0, 1], 'labels': int32, 'mask': bool}
  per process (`batch_size` is per process), in the split's own order. Every process yields
  the same number of batches; padding examples are zero images with label 0 and mask False.
  """
  process_index, process_count = _process(process_index, process_count)
  examples = _split(config, split)
  shard = examples.contiguous_shard(process_index, process_count)
  size = config.image_size
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
      batch = {'images': augmentations.center_crop_batch(tf.gather(images, indices), size),
               'labels': tf.gather(labels, indices)}
      return pad(batch, positions)

    batches = _map(tf.data.Dataset.range(num_batches), read_batch)
    return _iterate(_finish(batches), shard, 0)

  def preprocess(image, label):
    return {'images': augmentations.center_crop(image, size), 'labels': tf.cast(label, tf.int32)}

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
