"""Canny edge maps, the conditioning images of Canny ControlNets.

    edges = canny(photo, low_threshold=100, high_threshold=200)   # [H, W, 3] uint8 -> [H, W, 3] uint8 in {0, 255}
    images = pipe("a bird", image=edges)

This follows OpenCV's `cv2.Canny(image, low, high)` (aperture 3, L1 gradient), the detector diffusers' ControlNet
docs run before stacking the edge map to three channels: 3x3 Sobel gradients with replicated borders; on a
colour image, per pixel the channel with the largest |dx| + |dy|; non-maximum suppression along the gradient
direction quantised to 0, 45, 90 or 135 degrees with OpenCV's fixed-point tan(22.5) test and its tie rules;
a double threshold (candidates > low, seeds > high); hysteresis keeping the candidates 8-connected to a seed.
Everything after the optional blur is integer arithmetic, so the edges equal OpenCV's pixel for pixel.

cv2.Canny smooths nothing; `sigma` > 0 applies a Gaussian blur first (as one would with cv2.GaussianBlur)
for noisy photographs. The work runs as one jitted program over the whole batch.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

_SHIFT = 15
_TG22 = int(0.4142135623730950488016887242097 * (1 << _SHIFT) + 0.5)  # tan(22.5 deg) in Q15, as OpenCV


def _gaussian_kernel(sigma: float) -> np.ndarray:
    """A normalised 1-D Gaussian of radius ceil(3 sigma)."""
    radius = max(1, math.ceil(3 * sigma))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def _blur(x: jax.Array, kernel: np.ndarray) -> jax.Array:
    """Separable Gaussian blur of int32 [N, H, W, C] with replicated borders, rounded back to 8-bit levels."""
    r = len(kernel) // 2
    y = jnp.pad(x.astype(jnp.float32), ((0, 0), (r, r), (r, r), (0, 0)), mode="edge")
    h, w = x.shape[1:3]
    y = sum(float(k) * y[:, i:i + h] for i, k in enumerate(kernel))
    y = sum(float(k) * y[:, :, i:i + w] for i, k in enumerate(kernel))
    return jnp.clip(jnp.round(y), 0, 255).astype(jnp.int32)


def _shift(x: jax.Array, dy: int, dx: int) -> jax.Array:
    """x[n, i + dy, j + dx] with zeros outside [N, H, W] (OpenCV's zero border around the magnitudes)."""
    h, w = x.shape[1:3]
    p = jnp.pad(x, ((0, 0), (1, 1), (1, 1)))
    return p[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]


def _dilate(x: jax.Array) -> jax.Array:
    """3x3 (8-neighbour) dilation of a bool [N, H, W] map."""
    out = x
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                out = out | _shift(x, dy, dx)
    return out


@functools.partial(jax.jit, static_argnames=("sigma",))
def _edges(image: jax.Array, low: jax.Array, high: jax.Array, sigma: float) -> jax.Array:
    """int32 [N, H, W, C] 8-bit levels -> bool [N, H, W] edges."""
    x = _blur(image, _gaussian_kernel(sigma)) if sigma > 0 else image
    h, w = x.shape[1:3]
    p = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")  # Sobel reads replicated borders

    def at(dy: int, dx: int) -> jax.Array:
        return p[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    gx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2 * at(0, -1) + at(1, -1))  # [N, H, W, C]
    gy = (at(1, -1) + 2 * at(1, 0) + at(1, 1)) - (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1))
    mags = jnp.abs(gx) + jnp.abs(gy)
    # The strongest channel per pixel; argmax takes the first on ties, as OpenCV's strict '>' scan does.
    best = jnp.argmax(mags, axis=-1)[..., None]
    mag = jnp.take_along_axis(mags, best, -1)[..., 0]  # [N, H, W]
    gx = jnp.take_along_axis(gx, best, -1)[..., 0]
    gy = jnp.take_along_axis(gy, best, -1)[..., 0]

    # Direction classes by OpenCV's fixed-point test: |dy| < tan(22.5)|dx| is a horizontal gradient,
    # |dy| > tan(67.5)|dx| a vertical one, anything else diagonal (sign of dx*dy picks the diagonal).
    ax = jnp.abs(gx)
    ay = jnp.abs(gy) << _SHIFT
    tg22x = ax * _TG22
    horizontal = ay < tg22x
    vertical = ~horizontal & (ay > tg22x + (ax << (_SHIFT + 1)))
    s = jnp.where((gx ^ gy) < 0, -1, 1)
    # Ties: the earlier neighbour (left / above) must be strictly smaller, the later one may be equal;
    # diagonals need both strictly smaller.
    keep_h = (mag > _shift(mag, 0, -1)) & (mag >= _shift(mag, 0, 1))
    keep_v = (mag > _shift(mag, -1, 0)) & (mag >= _shift(mag, 1, 0))
    # dx, dy of one sign (s = +1): the gradient runs along the main diagonal (above-left to below-right).
    keep_d = jnp.where(s > 0,
                       (mag > _shift(mag, -1, -1)) & (mag > _shift(mag, 1, 1)),
                       (mag > _shift(mag, -1, 1)) & (mag > _shift(mag, 1, -1)))
    maximum = jnp.where(horizontal, keep_h, jnp.where(vertical, keep_v, keep_d))
    candidate = maximum & (mag > low)
    edge = candidate & (mag > high)

    def grow(state):
        edge, _ = state
        new = _dilate(edge) & candidate
        return new, jnp.any(new != edge)

    edge, _ = jax.lax.while_loop(lambda s: s[1], grow, (edge, jnp.array(True)))
    return edge


def canny(image: np.ndarray | jax.Array, low_threshold: float = 100, high_threshold: float = 200, *,
          sigma: float = 0.0) -> np.ndarray:
    """Canny edges of `image` as a 3-channel uint8 map (0 or 255), like `cv2.Canny` stacked to RGB.

    Args:
        image: [H, W, C] or [N, H, W, C] with C = 1 or 3 (RGB); uint8, or floats in [0, 1] (scaled by 255
            and rounded to 8-bit levels first).
        low_threshold, high_threshold: on the L1 gradient magnitude |dx| + |dy| of 3x3 Sobel filters
            (OpenCV's scale: up to 1020 per channel); swapped if given the wrong way round, as OpenCV does.
        sigma: standard deviation of a Gaussian blur applied first (0: none, as cv2.Canny).
    Returns:
        uint8 [..., H, W, 3]: 255 on edges, 0 elsewhere, every channel equal.
    """
    x = np.asarray(image)
    if x.ndim not in (3, 4) or x.shape[-1] not in (1, 3):
        raise ValueError(f"canny: image must be [H, W, C] or [N, H, W, C] with C = 1 or 3, got shape {x.shape}")
    if x.dtype == np.uint8:
        levels = x.astype(np.int32)
    elif np.issubdtype(x.dtype, np.floating):
        if x.size and (x.min() < 0 or x.max() > 1):
            raise ValueError(f"canny: float images must be in [0, 1], got [{x.min()}, {x.max()}]")
        levels = np.round(x.astype(np.float64) * 255).astype(np.int32)
    else:
        raise ValueError(f"canny: image must be uint8 or float in [0, 1], got dtype {x.dtype}")
    if sigma < 0:
        raise ValueError(f"canny: sigma must be >= 0, got {sigma}")
    low, high = sorted((low_threshold, high_threshold))
    # OpenCV compares integer magnitudes with floor(threshold).
    low, high = np.int32(math.floor(low)), np.int32(math.floor(high))
    batch = levels if x.ndim == 4 else levels[None]
    edges = np.asarray(_edges(jnp.asarray(batch), low, high, float(sigma)))
    out = np.repeat((edges.astype(np.uint8) * 255)[..., None], 3, axis=-1)
    return out if x.ndim == 4 else out[0]
