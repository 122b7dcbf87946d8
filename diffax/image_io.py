"""Writing generated images: PNG grids for people, .npz arrays for programs."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image


def make_grid(images: np.ndarray, ncols: int, pad: int = 1) -> np.ndarray:
    """Tile uint8 images [N, H, W, C] row-major into one [rows*(H+pad)+pad, ncols*(W+pad)+pad, C] image."""
    n, h, w, c = images.shape
    rows = -(-n // ncols)
    grid = np.zeros((rows * (h + pad) + pad, ncols * (w + pad) + pad, c), np.uint8)
    for k, img in enumerate(images):
        r, col = divmod(k, ncols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = img
    return grid


def save_grid(path: str | os.PathLike, images: np.ndarray, ncols: int, upscale: int = 1) -> None:
    """Save uint8 images [N, H, W, C] as a PNG grid, each pixel repeated `upscale` times for small images."""
    grid = make_grid(images, ncols)
    if upscale > 1:
        grid = grid.repeat(upscale, axis=0).repeat(upscale, axis=1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)


def save_npz(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray) -> None:
    """Save `images` uint8 [N, H, W, C] and `labels` int64 [N] as a .npz file."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=np.asarray(images, np.uint8), labels=np.asarray(labels, np.int64))
