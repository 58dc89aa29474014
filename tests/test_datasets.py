"""Input pipelines: sources, splits, shards, determinism, bad input.

Image folders are generated per test session (tiny JPEG/PNG files); TFDS datasets come from
`tfds.testing.mock_data`. The shared CIFAR-10 folder is only listed (decoding 50,000 files
would take most of the test budget), and that test skips when the folder is absent.
"""

import pathlib
import re

import byol  # configs/byol.py (tests/conftest.py puts configs/ on the path).
import numpy as np
from PIL import Image
import pytest

from byol_jax.data import datasets, sources

SHARED_CIFAR10 = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'cifar10'
CLASSES = ('ant', 'bee', 'cat')
PER_CLASS = 8
SIZE = 16


def write_image(path, pixels):
  Image.fromarray(pixels).save(path)


@pytest.fixture(scope='module')
def uniform_folder(tmp_path_factory):
  """root/{train,test}/<class>/<i>.png, all 20x24 RGB: decoded once into memory."""
  root = tmp_path_factory.mktemp('uniform')
  rng = np.random.default_rng(0)
  for name in CLASSES:
    (root / 'train' / name).mkdir(parents=True)
    (root / 'test' / name).mkdir(parents=True)
    for i in range(PER_CLASS):
      write_image(root / 'train' / name / f'{i:02d}.png',
                  rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    write_image(root / 'test' / name / '0.png', rng.integers(0, 256, (20, 24, 3), np.uint8))
  (root / 'train' / 'ant' / 'notes.txt').write_text('not an image: ignored')
  return root


@pytest.fixture(scope='module')
def mixed_folder(tmp_path_factory):
  """Sizes differ (read from files on demand): grayscale, RGBA, and images smaller than the
  crop."""
  root = tmp_path_factory.mktemp('mixed')
  rng = np.random.default_rng(1)
  for name in CLASSES:
    (root / 'train' / name).mkdir(parents=True)
    for i in range(PER_CLASS):
      kind = i % 4
      shape = [(30, 22, 3), (9, 13), (12, 12, 4), (3, 5, 3)][kind]  # RGB, gray, RGBA, tiny.
      suffix = '.jpg' if kind == 0 else '.png'
      write_image(root / 'train' / name / f'{i}{suffix}',
                  rng.integers(0, 256, shape, dtype=np.uint8))
  return root


def make_config(dataset, *, batch_size=6, validation_examples=6, seed=0, plain=False,
                train_on_validation=False):
  config = byol.get_config('cifar10')
  config.dataset = dataset
  config.image_size = SIZE
  config.batch_size = batch_size
  config.seed = seed
  config.data.validation_examples = validation_examples
  config.data.train_on_validation = train_on_validation
  if plain:  # Crops only: a small graph, for tests about data rather than augmentations.
    config.augment.color_jitter_prob = 0.0
    config.augment.grayscale_prob = 0.0
    for view in (config.augment.view1, config.augment.view2):
      view.blur_prob = view.solarize_prob = 0.0
  return config


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_views(batch, batch_size, size=SIZE):
  assert set(batch) == {'view1', 'view2', 'labels'}
  for key in ('view1', 'view2'):
    assert batch[key].shape == (batch_size, size, size, 3) and batch[key].dtype == np.float32
    assert batch[key].min() >= 0.0 and batch[key].max() <= 1.0
  assert batch['labels'].shape == (batch_size,) and batch['labels'].dtype == np.int32


# ------------------------------------------------------------------------------------------
# Folders.


def split_images(config, split):
  batches = datasets.eval_batches(config, split, 4, process_index=0, process_count=1)
  return np.concatenate([b['images'][b['mask']] for b in batches])


def test_folder_splits_hold_out_a_class_balanced_head(uniform_folder):
  config = make_config(f'folder:{uniform_folder}')
  assert datasets.num_examples(config, 'train') == 3 * PER_CLASS - 6
  assert datasets.num_examples(config, 'validation') == 6
  assert datasets.num_examples(config, 'test') == 3
  validation = list(datasets.eval_batches(config, 'validation', 4, process_index=0,
                                          process_count=1))
  labels = np.concatenate([b['labels'][b['mask']] for b in validation])
  np.testing.assert_array_equal(labels, [0, 1, 2, 0, 1, 2])  # First 2 of each, round-robin.
  # The hold-out is the head of the labelled examples (reference: VALID = train[:10000]) and
  # 'train' the rest (TRAIN = train[10000:]).
  everything = make_config(f'folder:{uniform_folder}', validation_examples=0)
  np.testing.assert_array_equal(split_images(config, 'validation'),
                                split_images(everything, 'train')[:6])
  np.testing.assert_array_equal(split_images(config, 'train'),
                                split_images(everything, 'train')[6:])


def test_train_on_validation_trains_on_every_labelled_example(uniform_folder):
  """The reference's TRAIN_AND_VALID: the hold-out is still 'validation', and is trained on."""
  config = make_config(f'folder:{uniform_folder}', train_on_validation=True)
  assert datasets.num_examples(config, 'validation') == 6
  assert datasets.num_examples(config, 'train') == 3 * PER_CLASS
  assert datasets.num_examples(config, 'labelled_train') == 3 * PER_CLASS
  np.testing.assert_array_equal(split_images(config, 'train')[:6],
                                split_images(config, 'validation'))
  # An epoch of pretraining visits all 24 images, hold-out included: 4 steps of 6.
  batches = take(datasets.pretrain_batches(make_config(
      f'folder:{uniform_folder}', train_on_validation=True, plain=True),
      process_index=0, process_count=1), 4)
  np.testing.assert_array_equal(
      np.bincount(np.concatenate([b['labels'] for b in batches])), [8, 8, 8])


@pytest.mark.slow
def test_folder_pretraining_batches_are_a_pure_function_of_seed_and_step(uniform_folder):
  config = make_config(f'folder:{uniform_folder}')
  first = take(datasets.pretrain_batches(config, process_index=0, process_count=1), 4)
  for batch in first:
    assert_views(batch, 6)
    assert set(batch['labels']) <= {0, 1, 2}
  resumed = take(datasets.pretrain_batches(config, start_step=2, process_index=0,
                                           process_count=1), 2)
  for expected, got in zip(first[2:], resumed):
    for key in expected:
      np.testing.assert_array_equal(expected[key], got[key])
  assert not np.allclose(first[0]['view1'], first[1]['view1'])  # Steps differ.
  assert not np.allclose(first[0]['view1'], first[0]['view2'])  # Views differ.
  # Steps 0-2 are epoch 0 (18 examples / 6): every training example exactly once.
  labels = np.concatenate([b['labels'] for b in first[:3]])
  np.testing.assert_array_equal(np.bincount(labels), [6, 6, 6])
  other_seed = next(datasets.pretrain_batches(make_config(f'folder:{uniform_folder}', seed=1),
                                              process_index=0, process_count=1))
  assert not np.allclose(first[0]['view1'], other_seed['view1'])


def test_view_size_shrinks_the_pretraining_views_but_not_evaluation(uniform_folder):
  # augment.view_size (0: image_size, the reference) sets the side of the pretraining views
  # only; evaluation batches stay at image_size.
  config = make_config(f'folder:{uniform_folder}', plain=True)
  config.augment.view_size = SIZE // 2
  batch = next(datasets.pretrain_batches(config, process_index=0, process_count=1,
                                         include_originals=True))
  originals = batch.pop('originals')
  assert_views(batch, 6, size=SIZE // 2)
  assert originals.shape == (6, SIZE // 2, SIZE // 2, 3)  # The preview grid's cells match.
  evaluation = next(datasets.eval_batches(config, 'validation', 2, process_index=0,
                                          process_count=1))
  assert evaluation['images'].shape == (2, SIZE, SIZE, 3)


@pytest.mark.parametrize('size', [-1, 2.5, True])
def test_bad_view_size_is_one_clear_line(uniform_folder, size):
  config = make_config(f'folder:{uniform_folder}')
  with config.ignore_type():  # A config file may hold any type; the flag parser checks its own.
    config.augment.view_size = size
  with pytest.raises(ValueError, match='augment.view_size') as error:
    next(datasets.pretrain_batches(config, process_index=0, process_count=1))
  assert '\n' not in str(error.value)


def test_two_images_of_one_batch_get_different_views(uniform_folder):
  config = make_config(f'folder:{uniform_folder}', plain=True)
  batch = next(datasets.pretrain_batches(config, process_index=0, process_count=1))
  views = batch['view1'].reshape(6, -1)
  assert len({row.tobytes() for row in views}) == 6


def test_mixed_folder_converts_gray_and_rgba_and_upsamples_small_images(mixed_folder):
  config = make_config(f'folder:{mixed_folder}', plain=True)
  assert datasets.num_examples(config, 'train') == 3 * PER_CLASS - 6
  iterator = datasets.pretrain_batches(config, process_index=0, process_count=1)
  first = take(iterator, 3)
  for batch in first:
    assert_views(batch, 6)
  resumed = next(datasets.pretrain_batches(config, start_step=2, process_index=0,
                                           process_count=1))
  np.testing.assert_array_equal(first[2]['view2'], resumed['view2'])
  batches = list(datasets.eval_batches(config, 'train', 8, process_index=0, process_count=1))
  assert [b['images'].shape for b in batches] == [(8, SIZE, SIZE, 3)] * 3
  assert sum(b['mask'].sum() for b in batches) == 18


def test_processes_read_disjoint_shards_with_equal_batch_counts(uniform_folder):
  config = make_config(f'folder:{uniform_folder}', plain=True)
  shards = [list(datasets.eval_batches(config, 'train', 4, process_index=p, process_count=2))
            for p in range(2)]
  assert len(shards[0]) == len(shards[1]) == 3  # 9 examples each: 3 batches, 3 padding.
  images = [np.concatenate([b['images'][b['mask']] for b in shard]) for shard in shards]
  assert len(images[0]) == len(images[1]) == 9
  assert not any(np.allclose(a, b) for a in images[0] for b in images[1])
  padding = shards[0][-1]
  assert not padding['mask'][1:].any() and np.all(padding['images'][~padding['mask']] == 0)
  local = next(datasets.pretrain_batches(config, process_index=1, process_count=2))
  assert_views(local, 3)  # Local batch = global 6 // 2 processes.
  with pytest.raises(ValueError, match='not divisible'):
    next(datasets.pretrain_batches(make_config(f'folder:{uniform_folder}', batch_size=5),
                                   process_index=0, process_count=2))


def test_eval_batches_are_centre_crops_in_split_order(uniform_folder):
  config = make_config(f'folder:{uniform_folder}')
  batches = list(datasets.eval_batches(config, 'test', 2, process_index=0, process_count=1))
  assert [b['mask'].tolist() for b in batches] == [[True, True], [True, False]]
  assert [b['labels'][b['mask']].tolist() for b in batches] == [[0, 1], [2]]
  again = list(datasets.eval_batches(config, 'test', 2, process_index=0, process_count=1))
  np.testing.assert_array_equal(batches[0]['images'], again[0]['images'])


@pytest.mark.parametrize('in_memory', [True, False])
def test_eval_batches_score_whole_images_or_the_reference_crop(tmp_path, monkeypatch, in_memory):
  # data.eval_crop_fraction: 1.0 (cifar10 presets) gives each image as it is; 0.875 (imagenet,
  # the reference) its upsampled centre. Both the in-memory and the file-by-file path.
  if not in_memory:
    monkeypatch.setattr(sources, '_IN_MEMORY_BYTES', 0)
  rng = np.random.default_rng(4)
  pixels = rng.integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
  for i, name in enumerate(('ant', 'bee')):
    (tmp_path / 'train' / name).mkdir(parents=True)
    write_image(tmp_path / 'train' / name / '0.png', pixels[i])  # Lossless.
  config = make_config(f'folder:{tmp_path}', validation_examples=0)
  assert config.data.eval_crop_fraction == 1.0
  np.testing.assert_allclose(split_images(config, 'train'), pixels / 255.0, atol=1e-6)
  config.data.eval_crop_fraction = byol.get_config('imagenet').data.eval_crop_fraction
  cropped = split_images(config, 'train')
  assert cropped.shape == pixels.shape and np.abs(cropped - pixels / 255.0).max() > 0.1


def test_linear_eval_batches_crop_and_flip_deterministically(uniform_folder):
  config = make_config(f'folder:{uniform_folder}')
  batches = take(datasets.linear_eval_batches(config, 'train', 6, process_index=0,
                                              process_count=1), 3)
  for batch in batches:
    assert set(batch) == {'images', 'labels'}
    assert batch['images'].shape == (6, SIZE, SIZE, 3) and batch['labels'].dtype == np.int32
  resumed = next(datasets.linear_eval_batches(config, 'train', 6, start_step=1,
                                              process_index=0, process_count=1))
  np.testing.assert_array_equal(batches[1]['images'], resumed['images'])
  # A subset (semi-supervised): only those examples' labels appear.
  subset = next(datasets.linear_eval_batches(config, 'train', 3, indices=[0, 3, 6],
                                             process_index=0, process_count=1))
  assert sorted(subset['labels'].tolist()) == [0, 0, 0]  # Round-robin: 0, 3, 6 are class 0.


# ------------------------------------------------------------------------------------------
# Bad input: one clear error each.


def test_missing_folder_and_missing_split(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    datasets.num_examples(make_config(f'folder:{tmp_path}/nowhere'), 'train')
  (tmp_path / 'only_test' / 'test' / 'a').mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match='no train split'):
    datasets.num_examples(make_config(f'folder:{tmp_path}/only_test'), 'train')


def test_empty_split(tmp_path):
  (tmp_path / 'train' / 'a').mkdir(parents=True)
  (tmp_path / 'train' / 'a' / 'readme.txt').write_text('no images here')
  with pytest.raises(ValueError, match='is empty'):
    datasets.num_examples(make_config(f'folder:{tmp_path}'), 'train')


def test_no_test_split_and_unknown_names(uniform_folder, mixed_folder):
  with pytest.raises(ValueError, match='has no test split'):
    datasets.num_examples(make_config(f'folder:{mixed_folder}'), 'test')
  with pytest.raises(ValueError, match='Unknown dataset'):
    datasets.num_examples(make_config('mnist_typo'), 'train')
  with pytest.raises(ValueError, match='Unknown split'):
    datasets.num_examples(make_config(f'folder:{uniform_folder}'), 'valid')
  with pytest.raises(ValueError, match='validation_examples'):
    datasets.num_examples(make_config(f'folder:{uniform_folder}', validation_examples=24),
                          'train')


def corrupt_folder(root):
  for name in CLASSES[:2]:
    (root / 'train' / name).mkdir(parents=True)
    for i in range(5):
      write_image(root / 'train' / name / f'{i}.png', np.full((10, 10, 3), 9 * i, np.uint8))
  broken = root / 'train' / 'bee' / 'broken.jpg'
  broken.write_bytes(b'\xff\xd8\xff\xe0 this is not really a JPEG')
  return broken


def test_corrupt_image_is_named_or_skipped_and_counted(tmp_path):
  broken = corrupt_folder(tmp_path)
  config = make_config(f'folder:{tmp_path}', validation_examples=2)
  with pytest.raises(ValueError, match=re.escape(f'Corrupt image file {broken}')):
    datasets.num_examples(config, 'train')
  config.data.skip_corrupt_images = True
  assert datasets.num_examples(config, 'train') == 8
  assert datasets.skipped_corrupt_images(config) == [str(broken)]


def test_corrupt_image_found_while_reading_a_large_folder(tmp_path, monkeypatch):
  # Folders too big for memory are read lazily; a bad file then surfaces mid-run, by name.
  monkeypatch.setattr(sources, '_IN_MEMORY_BYTES', 0)
  broken = corrupt_folder(tmp_path)
  config = make_config(f'folder:{tmp_path}', batch_size=11, validation_examples=0, plain=True)
  with pytest.raises(ValueError, match=re.escape(f'Corrupt image file {broken}')):
    next(datasets.pretrain_batches(config, process_index=0, process_count=1))


# ------------------------------------------------------------------------------------------
# Digits and TFDS.


@pytest.fixture
def forget_mock_data():
  """Loaded splits are cached per process; mock TFDS data must not outlive its test."""
  yield
  sources._load_splits.cache_clear()  # pylint: disable=protected-access


def test_digits_are_gray_rgb_upsampled_to_the_image_size():
  config = byol.get_config('demo')
  assert datasets.num_examples(config, 'train') == 1797 - 297
  assert datasets.num_examples(config, 'validation') == 297
  with pytest.raises(ValueError, match="'digits' has no test split"):
    datasets.num_examples(config, 'test')
  batch = next(datasets.pretrain_batches(config, process_index=0, process_count=1))
  assert_views(batch, config.batch_size, config.image_size)
  # Gray stays gray through jitter (hue and saturation do nothing, contrast is per channel).
  assert np.ptp(batch['view1'], axis=-1).max() < 1e-5
  assert set(batch['labels']) <= set(range(10))


def test_tfds_cifar10_in_memory_with_mock_data(forget_mock_data):
  tfds = pytest.importorskip('tensorflow_datasets')
  config = make_config('cifar10', batch_size=4, validation_examples=4, plain=True)
  with tfds.testing.mock_data(num_examples=12):
    assert datasets.num_examples(config, 'train') == 8
    assert datasets.num_examples(config, 'test') == 12
    batch = next(datasets.pretrain_batches(config, process_index=0, process_count=1))
    evaluated = list(datasets.eval_batches(config, 'validation', 3, process_index=0,
                                           process_count=1))
  assert_views(batch, 4)
  assert [b['mask'].sum() for b in evaluated] == [3, 1]


@pytest.mark.slow
def test_tfds_streamed_dataset_with_mock_data(forget_mock_data):
  # imagenet2012 is read from TFDS files, never held in memory; mock images vary in size.
  tfds = pytest.importorskip('tensorflow_datasets')
  config = make_config('imagenet2012', batch_size=4, validation_examples=2, plain=True)
  with tfds.testing.mock_data(num_examples=10):
    assert datasets.num_examples(config, 'train') == 8
    batches = take(datasets.pretrain_batches(config, process_index=0, process_count=1), 3)
    resumed = take(datasets.pretrain_batches(config, start_step=1, process_index=0,
                                             process_count=1), 2)
    evaluated = list(datasets.eval_batches(config, 'test', 4, process_index=0,
                                           process_count=1))
  for batch in batches:
    assert_views(batch, 4)
  for expected, got in zip(batches[1:], resumed):  # Step 2 starts a new epoch.
    np.testing.assert_array_equal(expected['view2'], got['view2'])
  assert sum(b['mask'].sum() for b in evaluated) == 10


class _FakeSplit:
  def __init__(self, num_examples):
    self.num_examples = num_examples


class _FakeImagenetBuilder:
  """A TFDS builder that has only the split metadata of imagenet2012 (no files): counting
  never reads data, so the split arithmetic is checked at ImageNet's size."""
  info = type('Info', (), {'splits': {'train': _FakeSplit(1_281_167),
                                      'validation': _FakeSplit(50_000)}})()


@pytest.fixture
def imagenet_metadata(monkeypatch, forget_mock_data):
  monkeypatch.setattr(sources, '_tfds_builder', lambda name, data_dir: _FakeImagenetBuilder())


def test_imagenet_preset_pretrains_on_every_training_image(imagenet_metadata):
  """Reference: pretraining on TRAIN_AND_VALID (1,281,167 images), VALID = TFDS train[:10000],
  TRAIN = train[10000:], TEST = TFDS validation. 1000 epochs at batch 4096: 312,784 steps."""
  import eval as eval_configs  # pylint: disable=g-import-not-at-top
  from byol_jax.core import byol_experiment  # pylint: disable=g-import-not-at-top
  from byol_jax.evaluation import drivers, pretrained, steps  # pylint: disable=g-import-not-at-top
  config = byol.get_config('imagenet')
  assert config.data.train_on_validation
  sizes = {split: datasets.num_examples(config, split)
           for split in ('train', 'labelled_train', 'validation', 'test')}
  assert sizes == dict(train=1_281_167, labelled_train=1_281_167, validation=10_000,
                       test=50_000)
  # pylint: disable=protected-access
  assert sources._split(config, 'validation').split_string() == 'train[0:10000]'
  assert sources._split(config, 'train').split_string() == 'train[0:1281167]'
  assert sources._split(config, 'test').split_string() == 'validation[0:50000]'
  assert byol_experiment.total_steps(config, sizes['train']) == 312_784
  assert byol_experiment.warmup_steps(config, sizes['train']) == 3_127  # 10 epochs.
  # Linear evaluation trains on the same images: 80 epochs at batch 4096.
  eval_config = pretrained.resolve(eval_configs.get_config(), config.to_dict())
  assert (eval_config.batch_size, eval_config.eval_split) == (4096, 'test')
  eval_train = datasets.num_examples(eval_config, 'labelled_train')
  assert eval_train == 1_281_167
  assert steps.total_steps(eval_config, eval_train) == 25_022

  # The hold-out left out (the reference's TRAIN): 310,343 steps.
  config.data.train_on_validation = False
  assert sources._split(config, 'train').split_string() == 'train[10000:1281167]'
  assert datasets.num_examples(config, 'train') == 1_271_167
  assert byol_experiment.total_steps(config, 1_271_167) == 310_343


# ------------------------------------------------------------------------------------------
# The shared CIFAR-10 folder (listing only).


@pytest.mark.skipif(not SHARED_CIFAR10.is_dir(),
                    reason=f'shared CIFAR-10 folder not found at {SHARED_CIFAR10}')
def test_shared_cifar10_validation_is_the_first_500_of_each_class():
  # pylint: disable-next=protected-access
  paths, labels, classes = sources._list_folder_split(SHARED_CIFAR10 / 'train')
  assert len(paths) == 50_000 and len(classes) == 10
  validation = paths[:5000]  # config.data.validation_examples = 5000 in the cifar10 presets.
  assert np.bincount(labels[:5000]).tolist() == [500] * 10
  ranks = sorted({int(pathlib.Path(p).stem) for p in validation})
  assert ranks == list(range(0, 500))


def _views_by_image(batches):
  """{original image bytes: (view1, view2)} over the images seen in `batches`."""
  seen = {}
  for batch in batches:
    for original, view1, view2 in zip(batch['originals'], batch['view1'], batch['view2']):
      seen[original.tobytes()] = (view1, view2)
  return seen


def _assert_same_views(a, b):
  common = set(a) & set(b)
  assert len(common) >= 32
  for key in common:
    np.testing.assert_array_equal(a[key][0], b[key][0])
    np.testing.assert_array_equal(a[key][1], b[key][1])


def test_views_do_not_depend_on_the_batch_size():
  """Every draw for an image is a function of (seed, epoch, its global index, view): the same
  image gets the same two views in batches of 64 and of 128 (full augmentation, digits)."""
  def views(batch_size, steps):
    config = make_config('digits', batch_size=batch_size, validation_examples=100)
    config.image_size = 32
    return _views_by_image(take(datasets.pretrain_batches(
        config, process_index=0, process_count=1, include_originals=True), steps))
  _assert_same_views(views(64, 2), views(128, 1))


def test_views_do_not_depend_on_the_process_count(uniform_folder):
  """Folder data: each image's views are the same whether one process
  reads the whole split or two processes read half each."""
  def views(batch_size, process_index, process_count):
    config = make_config(f'folder:{uniform_folder}', batch_size=batch_size, plain=True)
    return _views_by_image(take(datasets.pretrain_batches(
        config, process_index=process_index, process_count=process_count,
        include_originals=True), 2))
  one = views(6, 0, 1)
  two = {**views(6, 0, 2), **views(6, 1, 2)}
  common = set(one) & set(two)
  assert common
  for key in common:
    np.testing.assert_array_equal(one[key][0], two[key][0])
