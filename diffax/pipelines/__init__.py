"""diffusers-style pipelines: `load` a pipeline folder, hub id or single-file checkpoint, then call it.

    import diffax.pipelines
    pipe = diffax.pipelines.load("path/to/stable-diffusion")
    images = pipe("a photo of a cat", seed=0).images          # float32 [1, H, W, 3] in [0, 1]

The pipeline modules (Stable Diffusion, SDXL, ControlNet, DiT / DDPM) are imported when first needed, so
importing this package stays light. See docs/pipelines.md.
"""
from __future__ import annotations

from typing import Any


def load(path: Any, *, controlnet: Any = None, quantize: str | None = None, **kwargs: Any) -> Any:
    """`diffax.pipelines.loading.load`: the pipeline at `path` (see there for the other arguments).

    controlnet: a ControlNet folder (or a list of them) to attach; the result is then the matching ControlNet
    pipeline (`diffax.pipelines.controlnet.with_controlnet`).
    quantize: 'int8' or 'int4' quantizes the denoiser, ControlNets and text encoders once loaded
    (`Pipeline.quantize`, which takes other components and a group size).
    """
    from diffax.pipelines.loading import load as _load
    if quantize is not None:
        from diffax.quant import mode_bits
        mode_bits(quantize, "load(quantize=...)")  # a bad name fails before minutes of loading
    pipe = _load(path, **kwargs)
    if controlnet is not None:
        from diffax.pipelines.controlnet import with_controlnet
        pipe = with_controlnet(pipe, controlnet, dtype=kwargs.get("dtype"), cache_dir=kwargs.get("cache_dir"))
    if quantize is not None:
        pipe.quantize(quantize)
    return pipe


def __getattr__(name: str) -> Any:
    """Lazy access to the pipeline classes and helpers (e.g. `diffax.pipelines.StableDiffusionPipeline`)."""
    import importlib
    if name.startswith("_") or name in _SUBMODULES:
        raise AttributeError(f"module 'diffax.pipelines' has no attribute {name!r}")
    base = importlib.import_module("diffax.pipelines.base")
    loading = importlib.import_module("diffax.pipelines.loading")
    if hasattr(base, name):
        return getattr(base, name)
    classes = loading.pipeline_classes()
    if name in classes:
        return classes[name]
    raise AttributeError(f"module 'diffax.pipelines' has no attribute {name!r}")


# Submodule names: importing them must not go through __getattr__.
_SUBMODULES = frozenset({"base", "cache", "class_conditional", "controlnet", "generation", "images", "loading",
                         "lora", "stable_diffusion", "stable_diffusion_xl", "text_encoding", "canny",
                         "command", "safety"})

__all__ = ["load"]
