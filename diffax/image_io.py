"""Writing generated images: PNG grids for people, .npz arrays for programs.

A PNG can carry how it was made (model, sampler, steps, guidance, seed, labels) as JSON in a `parameters`
text chunk, the chunk name image tools already show; `read_parameters` reads it back.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

PARAMETERS_KEY = "parameters"


def make_grid(images: np.ndarray, ncols: int, pad: int = 1) -> np.ndarray:
    """Tile uint8 images [N, H, W, C] row-major into one [rows*(H+pad)+pad, ncols*(W+pad)+pad, C] image."""
    n, h, w, c = images.shape
    rows = -(-n // ncols)
    grid = np.zeros((rows * (h + pad) + pad, ncols * (w + pad) + pad, c), np.uint8)
    for k, img in enumerate(images):
        r, col = divmod(k, ncols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = img
    return grid


def save_grid(path: str | os.PathLike, images: np.ndarray, ncols: int, upscale: int = 1,
              parameters: Mapping[str, Any] | None = None) -> None:
    """Save uint8 images [N, H, W, C] as a PNG grid, each pixel repeated `upscale` times for small images;
    `parameters` (JSON-able) go into the file's `parameters` text chunk."""
    grid = make_grid(images, ncols)
    if upscale > 1:
        grid = grid.repeat(upscale, axis=0).repeat(upscale, axis=1)
    save_png(path, grid, parameters)


def save_png(path: str | os.PathLike, image: np.ndarray, parameters: Mapping[str, Any] | None = None) -> None:
    """Save one uint8 image [H, W, C] (C = 1 or 3) as a PNG; `parameters` (JSON-able) go into its
    `parameters` text chunk. Creates the parent folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    info = None
    if parameters is not None:
        info = PngInfo()
        info.add_text(PARAMETERS_KEY, json.dumps(dict(parameters)))
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path, pnginfo=info)


def read_parameters(path: str | os.PathLike) -> dict[str, Any]:
    """The `parameters` a PNG was saved with ({} when it has none)."""
    with Image.open(path) as image:
        text = image.text.get(PARAMETERS_KEY)  # type: ignore[attr-defined]
    if text is None:
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the PNG's {PARAMETERS_KEY!r} text chunk is not JSON ({e})") from None


def save_npz(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray) -> None:
    """Save `images` uint8 [N, H, W, C] and `labels` int64 [N] as a .npz file."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=np.asarray(images, np.uint8), labels=np.asarray(labels, np.int64))
