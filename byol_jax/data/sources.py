"""Data sources and splits: what examples a dataset has, read by index or streamed.

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

Each process later reads its own contiguous shard of a split (`contiguous_shard`); batching
and augmentation are datasets.py.
"""

import dataclasses
import functools
import os
import pathlib
from typing import Optional

from absl import logging
import numpy as np

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # Keep TF's C++ INFO/WARNING lines quiet.

import tensorflow as tf  # pylint: disable=g-import-not-at-top


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
