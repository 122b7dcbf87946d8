"""diffax.image_io: grids tile row-major; a PNG's `parameters` chunk round-trips as JSON."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffax.image_io import make_grid, read_parameters, save_grid


def test_grid_tiles_row_major_with_padding():
    images = np.arange(3 * 2 * 2, dtype=np.uint8).reshape(3, 2, 2, 1) + 1
    grid = make_grid(images, ncols=2)
    assert grid.shape == (2 * 3 + 1, 2 * 3 + 1, 1)
    np.testing.assert_array_equal(grid[1:3, 4:6, 0], images[1, ..., 0])
    np.testing.assert_array_equal(grid[4:6, 1:3, 0], images[2, ..., 0])
    assert not grid[4:6, 4:6].any()  # the missing fourth tile stays black


def test_parameters_round_trip(tmp_path):
    params = {"model": "UNet2DModel", "sampler": "ddim", "steps": 25, "guidance_scale": 3.0, "seed": 7,
              "labels": [3, 7]}
    save_grid(tmp_path / "g.png", np.zeros((2, 4, 4, 1), np.uint8), ncols=2, upscale=2, parameters=params)
    assert read_parameters(tmp_path / "g.png") == params
    assert Image.open(tmp_path / "g.png").text["parameters"].startswith("{")  # what other tools show


def test_without_parameters_and_with_foreign_text(tmp_path):
    save_grid(tmp_path / "plain.png", np.zeros((1, 4, 4, 3), np.uint8), ncols=1)
    assert read_parameters(tmp_path / "plain.png") == {}
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text("parameters", "a photo of a cat, Steps: 20")  # another tool's free text
    Image.new("L", (4, 4)).save(tmp_path / "other.png", pnginfo=info)
    with pytest.raises(ValueError, match="other.png.*not JSON"):
        read_parameters(tmp_path / "other.png")
