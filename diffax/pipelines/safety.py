"""The safety checker on the pipeline side: CLIPImageProcessor's preprocessing in JAX, and running diffusers'
`StableDiffusionSafetyChecker` (diffax.models.safety_checker) on generated images.

    module, params = diffax.convert.load("sd-folder", subfolder="safety_checker")
    images, flags = run_safety_checker(module, params, images)   # images [N, H, W, 3] float in [0, 1]
    checker = SafetyChecker(module, params, read_processor_config("sd-folder/feature_extractor"))
    images, flags = checker(images)                              # numpy in, numpy and list[bool] out
    checker = load_safety_checker("sd-folder")                   # the same from a pipeline folder

Importing this module registers `load_component` as the loader of pipeline folders' `safety_checker`
component (`diffax.pipelines.loading.register_component_loader`); `attach(pipe, component)` makes it the
pipeline's `safety_checker`, the hook `Pipeline.run_safety_checker` calls on the decoded images.

diffusers' pipelines hand the checker their decoded images as 8-bit PIL images (`numpy_to_pil`:
round(x * 255)) passed through the folder's `CLIPImageProcessor`: resize the shortest edge to 224 with
Pillow's bicubic filter, center-crop 224 x 224, rescale by 1/255, normalise with OpenAI CLIP's mean and std.
`preprocess_for_safety_checker` does the same in one jittable function and gives the same pixel values as
transformers' PIL-backed `CLIPImageProcessor` (`CLIPImageProcessorPil`, which transformers uses when
torchvision is not installed, and the only processor of transformers 4), bit for bit: the resize is
Pillow's own algorithm (libImaging/Resample.c) in integer arithmetic, with its 22-bit fixed-point
coefficients, a horizontal pass then a vertical pass, and rounding to 8 bits after each pass; rescaling
and normalising read one table of 256 values per channel computed as transformers computes them. (With
torchvision installed, transformers 5's default `CLIPImageProcessor` resizes with torchvision's bicubic
instead: floating point, without Pillow's 8-bit rounding between the passes, so its pixel values differ
slightly from Pillow's and from these.)

The resize is two int32 matrix products per image with Pillow's weights as dense [out, in] matrices
(zero outside each pixel's window), built on the host once per image size.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffax.models.config_base import read_config_json
from diffax.pipelines.loading import register_component_loader

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROCESSOR_CONFIG = "preprocessor_config.json"
PIL_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, CLIPImageProcessor's `resample`
PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point coefficients for 8-bit images
NSFW_WARNING = ("Potential NSFW content was detected in one or more images. A black image will be returned "
                "instead. Try again with a different prompt and/or seed.")

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ProcessorConfig:
    """The settings of a CLIPImageProcessor that the safety checker's input depends on (its defaults are
    every Stable Diffusion folder's `feature_extractor`)."""
    shortest_edge: int = 224
    crop_size: tuple[int, int] = (224, 224)  # (height, width)
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD


def read_processor_config(folder: str | os.PathLike) -> ProcessorConfig:
    """The ProcessorConfig of a `feature_extractor` folder (its preprocessor_config.json); the defaults when
    the folder has none. Settings the preprocessing does not implement are a ValueError naming the key."""
    path = Path(folder)
    path = path / PROCESSOR_CONFIG if path.is_dir() or not path.suffix else path
    if not path.is_file():
        return ProcessorConfig()
    cfg, where = read_config_json(path)
    for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
        if cfg.get(key, True) is not True:
            raise ValueError(f"{where}: {key}={cfg[key]!r} is not supported (diffax's safety-checker input "
                             f"always resizes, crops, rescales and normalises)")
    if cfg.get("resample", PIL_BICUBIC) != PIL_BICUBIC:
        raise ValueError(f"{where}: resample={cfg['resample']!r} is not supported (only {PIL_BICUBIC}, bicubic)")
    size = cfg.get("size", {"shortest_edge": 224})
    size = size.get("shortest_edge") if isinstance(size, dict) else size  # older files: a bare int
    crop = cfg.get("crop_size", 224)
    crop = (crop.get("height"), crop.get("width")) if isinstance(crop, dict) else (crop, crop)
    for key, value in (("size.shortest_edge", size), ("crop_size", crop[0]), ("crop_size", crop[1])):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{where}: {key}={value!r} is not supported (expected a positive int)")
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)

    factor = cfg.get("rescale_factor", 1 / 255)
    if not (number(factor) and factor > 0):
        raise ValueError(f"{where}: rescale_factor={factor!r} is not supported (expected a positive number)")
    stats = {key: cfg.get(key, default) for key, default in (("image_mean", OPENAI_CLIP_MEAN),
                                                              ("image_std", OPENAI_CLIP_STD))}
    for key, value in stats.items():
        if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(map(number, value))
                and (key == "image_mean" or min(value) > 0)):
            raise ValueError(f"{where}: {key}={value!r} is not supported (expected 3 numbers, RGB"
                             f"{', positive' if key == 'image_std' else ''})")
    return ProcessorConfig(size, crop, float(factor), tuple(stats["image_mean"]), tuple(stats["image_std"]))


def _bicubic(x: float) -> float:
    """Pillow's bicubic filter (a = -0.5)."""
    a, x = -0.5, abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


@functools.lru_cache(maxsize=None)
def _pil_coefficients(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] int32: Pillow's bicubic resampling weights for one axis in 22-bit fixed point
    (`precompute_coeffs` and `normalize_coeffs_8bpc` of libImaging/Resample.c), zero outside each window."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    out = np.zeros((out_size, in_size), np.int64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)  # int() truncates toward zero, as C's (int)
        xmax = min(int(center + support + 0.5), in_size)
        k = np.array([_bicubic((x - center + 0.5) / filterscale) for x in range(xmin, xmax)])
        total = k.sum()
        if total != 0.0:
            k = k / total
        # round half away from zero, as Pillow's (int)(k * 2^22 +- 0.5)
        out[xx, xmin:xmax] = np.trunc(k * (1 << PRECISION_BITS) + np.where(k < 0, -0.5, 0.5))
    return out.astype(np.int32)


def _resample_axis(image: jax.Array, axis: int, out_size: int) -> jax.Array:
    """One 8-bit pass of Pillow's resize along `axis` of int32 [N, H, W, 3] values in [0, 255]: a sum in
    int32 (exact; at most 255 * ~1.3 * 2^22 < 2^31), rounded (the 2^21 offset) and clipped to 8 bits."""
    if image.shape[axis] == out_size:  # Pillow skips a pass that keeps the size
        return image
    weights = jnp.asarray(_pil_coefficients(image.shape[axis], out_size))  # [out, in]
    moved = jnp.moveaxis(image, axis, -1)  # [..., in]
    acc = jnp.einsum("...i,oi->...o", moved, weights, preferred_element_type=jnp.int32)
    out = jnp.clip((acc + (1 << (PRECISION_BITS - 1))) >> PRECISION_BITS, 0, 255)
    return jnp.moveaxis(out, -1, axis)


def _resized_shape(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """transformers' `get_resize_output_image_size(default_to_square=False)`: the short side to
    `shortest_edge`, the long side int(shortest_edge * long / short)."""
    if width <= height:
        return int(shortest_edge * height / width), shortest_edge
    return shortest_edge, int(shortest_edge * width / height)


def _normalize_table(processor: ProcessorConfig) -> np.ndarray:
    """[256, 3] float32: the normalised value of each 8-bit level per channel, computed as transformers'
    `rescale` (float64 product, cast to float32) and `normalize` (float32) compute it."""
    levels = (np.arange(256, dtype=np.float64)[:, None] * processor.rescale_factor).astype(np.float32)
    mean = np.asarray(processor.image_mean, np.float32)
    std = np.asarray(processor.image_std, np.float32)
    return (levels - mean) / std


def preprocess_for_safety_checker(images: jax.Array, processor: ProcessorConfig = ProcessorConfig()) -> jax.Array:
    """images [N, H, W, 3] float in [0, 1] (a pipeline's 'np' output) -> pixel_values [N, crop_h, crop_w, 3]
    float32, NHWC: what diffusers' `numpy_to_pil` then CLIPImageProcessor give, bit for bit (module
    docstring). Jittable; the resize weights depend on the static image size only."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"safety checker: images must be [N, H, W, 3] RGB, got {list(images.shape)}")
    n, height, width, _ = images.shape
    new_h, new_w = _resized_shape(height, width, processor.shortest_edge)
    crop_h, crop_w = processor.crop_size
    if crop_h > new_h or crop_w > new_w:
        raise ValueError(f"safety checker: crop_size {processor.crop_size} is larger than the resized image "
                         f"({new_h}, {new_w})")
    # numpy_to_pil: (x * 255).round() in the images' float32, half to even as numpy rounds.
    levels = jnp.round(jnp.clip(images.astype(jnp.float32), 0.0, 1.0) * 255.0).astype(jnp.int32)
    levels = _resample_axis(levels, 2, new_w)  # Pillow: horizontal pass first
    levels = _resample_axis(levels, 1, new_h)
    top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
    levels = levels[:, top:top + crop_h, left:left + crop_w]  # [N, crop_h, crop_w, 3]
    table = jnp.asarray(_normalize_table(processor))  # [256, 3]
    return table[levels, jnp.arange(3)]


def run_safety_checker(module: nn.Module, params: Any, images: jax.Array,
                       processor: ProcessorConfig = ProcessorConfig()) -> tuple[jax.Array, jax.Array]:
    """(images with flagged ones black, has_nsfw_concept [N] bool) for images [N, H, W, 3] float in [0, 1];
    `module` is a StableDiffusionSafetyChecker. Pure and jittable (close over `module` and `processor`)."""
    pixel_values = preprocess_for_safety_checker(images, processor).astype(module.config.dtype)
    return module.apply({"params": params}, pixel_values, images)


class SafetyChecker:
    """A pipeline's safety checker: `checker(images) -> (images, flags)` on host arrays, one compiled
    program per image shape. Logs diffusers' warning when an image is flagged."""

    def __init__(self, module: nn.Module, params: Any, processor: ProcessorConfig = ProcessorConfig()):
        self.module, self.processor = module, processor
        self.params = jax.device_put(params)
        self._run: Callable[..., tuple[jax.Array, jax.Array]] = jax.jit(
            functools.partial(run_safety_checker, module, processor=processor))

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, list[bool]]:
        """images [N, H, W, 3] float in [0, 1] -> (the images, flagged ones zeros; a flag per image)."""
        images = np.asarray(images)
        checked, flags = self._run(self.params, jnp.asarray(images))
        flags = [bool(f) for f in np.asarray(flags)]
        if any(flags):
            log.warning(NSFW_WARNING)
        return np.asarray(checked).astype(images.dtype, copy=False), flags


def load_component(folder: str | os.PathLike, *, dtype: Any = None, cache_dir: Any = None) -> tuple[nn.Module, Any]:
    """A pipeline's `safety_checker` folder -> (StableDiffusionSafetyChecker, params) through the conversion
    cache: the component loader `diffax.pipelines.load` uses for this class."""
    from diffax.pipelines import cache

    return cache.load_component(folder, dtype=dtype, param_dtype=dtype, cache_dir=cache_dir)


def attach(pipe: Any, component: tuple[nn.Module, Any]) -> SafetyChecker:
    """Sets `pipe.safety_checker` to a SafetyChecker of `component` (module, params) that reads the
    preprocessing settings from the `feature_extractor` folder beside it in `pipe.source` (the defaults when
    there is none, e.g. for a single-file checkpoint); returns it."""
    source = Path(pipe.source) if getattr(pipe, "source", None) else None
    folder = source / "feature_extractor" if source is not None and source.is_dir() else None
    checker = SafetyChecker(*component, read_processor_config(folder) if folder is not None else ProcessorConfig())
    pipe.safety_checker = checker
    return checker


def load_safety_checker(folder: str | os.PathLike, *, dtype: Any = None) -> SafetyChecker | None:
    """The SafetyChecker of a diffusers pipeline folder (`safety_checker/` and `feature_extractor/`), or
    None when its model_index.json lists none (saved with `safety_checker=None`)."""
    from diffax import convert

    folder = Path(folder)
    index, _ = read_config_json(folder / "model_index.json")
    spec = index.get("safety_checker")
    if not (isinstance(spec, list) and len(spec) == 2 and spec[1] is not None):
        return None
    module, params = convert.load(folder, subfolder="safety_checker", dtype=dtype, param_dtype=dtype)
    return SafetyChecker(module, params, read_processor_config(folder / "feature_extractor"))



register_component_loader("StableDiffusionSafetyChecker", load_component)
