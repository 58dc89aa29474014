"""`python -m byol_jax.preview`: the grid holds the source image and both views of each image."""

import byol  # configs/byol.py (tests/conftest.py puts configs/ on the path).
import numpy as np
from PIL import Image
import pytest

from byol_jax import preview


@pytest.mark.slow
def test_preview_writes_original_and_two_views_per_image(tmp_path):
  rng = np.random.default_rng(0)
  for name in ('a', 'b'):
    (tmp_path / 'data' / 'train' / name).mkdir(parents=True)
    for i in range(4):
      Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(
          tmp_path / 'data' / 'train' / name / f'{i}.png')
  config = byol.get_config('cifar10')
  config.dataset = f'folder:{tmp_path / "data"}'
  config.image_size = 16
  config.data.validation_examples = 2

  originals, view1, view2 = preview.preview_rows(config, num_images=3)
  for images in (originals, view1, view2):
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8
  assert not np.array_equal(view1, view2)

  out = tmp_path / 'grid.png'
  preview.write_preview(config, out, num_images=3)
  grid = Image.open(out)
  cell = 16 * 6  # 16 px enlarged to at least 96 px.
  assert grid.size[0] >= 3 * cell and grid.size[1] >= 3 * cell
