"""diffax: diffusion models in JAX/Flax.

Train image diffusion models on TPU pods and GPU clusters, sample from them with one XLA-compiled
program, and bring PyTorch weights across and back. The public entry points:

    diffax.load(path) -> (module, params)       a diffusers folder / file / hub id, any registered family
    diffax.save(folder, module, params)         a folder diffusers' from_pretrained loads
    diffax.sample(scheduler, denoise_fn, noise, cond=..., uncond=..., guidance_scale=...)
    diffax.from_diffusers_config(path_or_dict)  a scheduler; diffax.to_diffusers_config(scheduler)
    diffax.scheduler_classes()                  the sampler registry (diffusers class name -> class)
    diffax.build_model(model_block), diffax.get_family(name)   the model registry

and the packages behind them: diffax.models, diffax.schedulers, diffax.sampling, diffax.convert,
diffax.pipelines, diffax.train, diffax.data, diffax.parallel. Names are imported on first use, so
`import diffax.models` does not pull in the converters or the train loop.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load": "diffax.convert", "save": "diffax.convert", "sample": "diffax.sampling",
    "from_diffusers_config": "diffax.schedulers", "to_diffusers_config": "diffax.schedulers",
    "scheduler_classes": "diffax.schedulers", "build_model": "diffax.models", "get_family": "diffax.models",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'diffax' has no attribute {name!r}")
