"""Writes a PNG grid of pretraining views, to check the augmentations by eye.

  python -m byol_jax.preview --config=configs/byol.py:cifar10 \
      --config.dataset=folder:/path/to/root --out=preview.png [--num_images=8] [--step=0]

One row per image: the source image (its centre square), view 1, view 2, exactly as
`datasets.pretrain_batches` makes them for training step `--step` on process 0.
"""

import io
import os

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np
from PIL import Image
from PIL import ImageDraw

from byol_jax.data import datasets
from byol_jax.runtime import storage

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Pretraining config file[:preset].')
_OUT = flags.DEFINE_string('out', 'preview.png', 'Where to write the PNG grid.')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 8, 'Images (rows) in the grid.')
_STEP = flags.DEFINE_integer('step', 0, 'Training step whose views are shown.')

COLUMNS = ('original', 'view 1', 'view 2')
_CELL = 96  # Minimum cell side in pixels: 32 px views are enlarged to be visible.
_GAP = 4
_HEADER = 16


def preview_rows(config, num_images, step=0):
  """uint8 arrays [num_images, S, S, 3] for each of COLUMNS, for training step `step`."""
  config = config.copy_and_resolve_references()
  config.batch_size = num_images  # The views of an image do not depend on the batch size.
  batch = next(datasets.pretrain_batches(config, start_step=step, process_index=0,
                                         process_count=1, include_originals=True))
  to_uint8 = lambda images: np.round(np.clip(images, 0, 1) * 255).astype(np.uint8)
  return [to_uint8(batch[key]) for key in ('originals', 'view1', 'view2')]


def grid_image(columns, titles=COLUMNS):
  """One PIL image: a titled column per array of images, nearest-neighbour enlarged."""
  num_images, size = columns[0].shape[:2]
  scale = max(1, -(-_CELL // size))  # Ceiling division: whole-pixel enlargement.
  cell = size * scale
  width = len(columns) * (cell + _GAP) + _GAP
  height = _HEADER + num_images * (cell + _GAP) + _GAP
  grid = Image.new('RGB', (width, height), 'white')
  draw = ImageDraw.Draw(grid)
  for column, (images, title) in enumerate(zip(columns, titles)):
    left = _GAP + column * (cell + _GAP)
    draw.text((left, 2), title, fill='black')
    for row, image in enumerate(images):
      enlarged = Image.fromarray(image).resize((cell, cell), Image.NEAREST)
      grid.paste(enlarged, (left, _HEADER + _GAP + row * (cell + _GAP)))
  return grid


def write_preview(config, path, num_images=8, step=0):
  """Writes the grid to `path` (a local path or gs://), in the format its extension names."""
  extension = os.path.splitext(path)[1].lower()
  if extension not in Image.registered_extensions():
    raise ValueError(f'{path}: unknown image file extension {extension!r} (use .png).')
  image = io.BytesIO()
  grid_image(preview_rows(config, num_images, step)).save(
      image, format=Image.registered_extensions()[extension])
  storage.write_bytes(path, image.getvalue())


def main(argv):
  del argv
  if _CONFIG.value is None:
    raise app.UsageError('--config is required, e.g. --config=configs/byol.py:cifar10.')
  write_preview(_CONFIG.value, _OUT.value, _NUM_IMAGES.value, _STEP.value)
  print(f'Wrote {_OUT.value}: {", ".join(COLUMNS)} for {_NUM_IMAGES.value} images of '
        f'{_CONFIG.value.dataset} (step {_STEP.value}).')


if __name__ == '__main__':
  from byol_jax.runtime import config_errors  # One line for a bad --config. key.
  config_errors.run(main)
