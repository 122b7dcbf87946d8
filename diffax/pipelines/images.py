"""Pipeline image inputs on the host, prepared as diffusers' `VaeImageProcessor` prepares them.

    images = load_images(pil_or_array, height=512, width=512)   # float32 [N, 512, 512, 3] in [0, 1]
    masks = load_masks(mask, 512, 512)                          # float32 [N, 512, 512, 1] in {0, 1}

PIL images are resized with Lanczos (diffusers' default `resample`); arrays with nearest-neighbour
interpolation (diffusers resizes arrays through `torch.nn.functional.interpolate`, whose default mode is
'nearest'). Without a size the image's own is used, rounded down to `multiple` (the VAE's scale factor).
Masks are converted to grayscale and binarized at 0.5, as diffusers' mask processor does.
"""
from __future__ import annotations

from typing import Any

import numpy as np


class ImageInputError(ValueError):
    """An image argument the pipeline cannot read; the message names it."""


def _is_pil(x: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:
        return False
    return isinstance(x, Image.Image)


def _nearest(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """[N, H, W, C] -> [N, height, width, C]: torch's 'nearest' (source index floor(dst * (in / out)), with
    torch's float32 scale: in float64 the index differs for many size pairs, e.g. 2 -> 82)."""
    n, h, w, c = x.shape
    if (h, w) == (height, width):
        return x

    def index(size_in: int, size_out: int) -> np.ndarray:
        scale = np.float32(np.float32(size_in) / np.float32(size_out))
        return np.minimum(np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64), size_in - 1)

    return x[:, index(h, height)][:, :, index(w, width)]


def _size(h: int, w: int, height: int | None, width: int | None, multiple: int) -> tuple[int, int]:
    height = height if height is not None else h - h % multiple
    width = width if width is not None else w - w % multiple
    if height < 1 or width < 1:
        raise ImageInputError(f"image of {h}x{w} is smaller than one {multiple}x{multiple} cell")
    return height, width


def _as_list(image: Any) -> list[Any]:
    return list(image) if isinstance(image, (list, tuple)) else [image]


def load_images(image: Any, height: int | None = None, width: int | None = None, *, multiple: int = 8,
                what: str = "image") -> np.ndarray:
    """float32 [N, height, width, 3] in [0, 1] from a PIL image, a list of them, or a float array
    [H, W, 3] / [N, H, W, 3] in [0, 1] (or a list of arrays)."""
    items = _as_list(image)
    if not items:
        raise ImageInputError(f"{what}: no images given")
    if all(_is_pil(i) for i in items):
        w0, h0 = items[0].size
        height, width = _size(h0, w0, height, width, multiple)
        from PIL import Image
        arrays = [np.asarray(i.convert("RGB").resize((width, height), Image.LANCZOS), np.float32) / 255.0
                  for i in items]
        return np.stack(arrays)
    try:
        arrays = [np.asarray(i, np.float32) for i in items]
    except (TypeError, ValueError):
        raise ImageInputError(f"{what}: expected PIL images or float arrays [N, H, W, 3] in [0, 1]") from None
    x = np.concatenate([a if a.ndim == 4 else a[None] for a in arrays])
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ImageInputError(f"{what}: expected float arrays [N, H, W, 3] (NHWC, RGB) in [0, 1], got shape "
                              f"{list(x.shape)}")
    if x.min() < 0 or x.max() > 1:
        raise ImageInputError(f"{what}: values must be in [0, 1], got [{x.min():.3g}, {x.max():.3g}]")
    height, width = _size(x.shape[1], x.shape[2], height, width, multiple)
    return _nearest(x, height, width)


def load_masks(mask: Any, height: int, width: int, what: str = "mask_image") -> np.ndarray:
    """float32 [N, height, width, 1] in {0, 1} (1 = repaint) from PIL images (any mode, as grayscale) or
    float arrays [H, W], [H, W, 1], [N, H, W] or [N, H, W, 1] in [0, 1]; binarized at 0.5."""
    items = _as_list(mask)
    if not items:
        raise ImageInputError(f"{what}: no masks given")
    if all(_is_pil(i) for i in items):
        from PIL import Image
        x = np.stack([np.asarray(i.convert("L").resize((width, height), Image.LANCZOS), np.float32) / 255.0
                      for i in items])[..., None]
    else:
        try:
            x = np.asarray(items[0] if len(items) == 1 else np.stack(items), np.float32)
        except (TypeError, ValueError):
            raise ImageInputError(f"{what}: expected PIL images or float arrays in [0, 1]") from None
        if x.ndim == 2:
            x = x[None, ..., None]
        elif x.ndim == 3:
            x = x[..., None] if x.shape[-1] != 1 else x[None]
        if x.ndim != 4 or x.shape[-1] != 1:
            raise ImageInputError(f"{what}: expected [H, W], [N, H, W] or [N, H, W, 1], got shape {list(x.shape)}")
        x = _nearest(x, height, width)
    return (x >= 0.5).astype(np.float32)
