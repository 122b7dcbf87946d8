"""Class-conditional generation (the digits U-Net, DiT): labels in, uint8 images out, one XLA program.

    pipe = ClassConditionalPipeline(model, scheduler, mesh)    # model: a diffax Flax module
    images = pipe(params, labels=[0, 1, 2], key=jax.random.key(0), num_inference_steps=50, guidance_scale=4.0)

The batch is split over the mesh's data axes; a number of samples that does not divide by the device
count is padded and the padding dropped. Each sample's starting noise comes from `fold_in(split(key)[0], index)`,
so sample k is the same image whatever the batch size or device count (for deterministic samplers).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from diffax import parallel
import flax.linen as nn
from diffax.sampling import sample
from diffax.schedulers.base import Scheduler


def to_uint8(x: jax.Array) -> jax.Array:
    """[-1, 1] floats -> [0, 255] uint8, rounding to nearest."""
    return jnp.clip(jnp.round((x.astype(jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def _wants_variance(scheduler: Scheduler) -> bool:
    """Whether the sampler consumes a learned variance (DDPM with variance_type 'learned*')."""
    return str(getattr(scheduler, "variance_type", "")).startswith("learned")


@dataclasses.dataclass(frozen=True)
class ClassConditionalPipeline:
    model: nn.Module
    scheduler: Scheduler
    mesh: Mesh
    guide_first_channels: int | None = None  # the DiT reference guides 3 of 4 latent channels; None: all
    output_uint8: bool = True                # False: return the model-space arrays (latents) as float32

    def check_labels(self, labels: Sequence[int]) -> np.ndarray:
        """Labels as int32 [N], with a clear error for one outside the model's classes."""
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        n = self.model.config.num_classes
        if n == 0:
            raise ValueError("this model is unconditional: it takes no labels")
        bad = labels[(labels < 0) | (labels >= n)]
        if bad.size:
            raise ValueError(f"label {int(bad[0])} is outside the model's classes 0..{n - 1}")
        return labels.astype(np.int32)

    @functools.lru_cache(maxsize=8)
    def _generate(self, num_inference_steps: int, guided: bool):
        """The jitted program for one (steps, guided) choice; guidance scale and labels stay traced."""
        model, cfg = self.model, self.model.config
        shape = cfg.sample_shape
        channels = shape[-1]
        keep = 2 * channels if (cfg.learn_sigma and _wants_variance(self.scheduler)) else channels
        batch = parallel.batch_sharding(self.mesh)
        rep = parallel.replicated(self.mesh)

        def generate(params, labels, key, guidance_scale):
            # labels: [N] int32 (padded to the device count), key: base PRNG key -> [N, H, W, C] uint8
            noise_key, sampler_key = jax.random.split(key)
            keys = jax.vmap(lambda i: jax.random.fold_in(noise_key, i))(jnp.arange(labels.shape[0]))
            noise = jax.vmap(lambda k: jax.random.normal(k, shape))(keys)  # [N, H, W, C]
            null = jnp.full_like(labels, cfg.null_class if cfg.has_null_cond else 0)

            def denoise(x, t):
                y = jnp.concatenate([null, labels]) if guided else labels
                out = model.apply({"params": params}, x, jnp.full((x.shape[0],), t), class_labels=y)
                return out[..., :keep]

            guided_channels = self.guide_first_channels if self.guide_first_channels is not None else channels
            x = sample(self.scheduler, denoise, noise, num_inference_steps=num_inference_steps,
                       key=sampler_key,
                       guidance_scale=guidance_scale if guided else None, guided_channels=guided_channels)
            x = x[..., :channels]
            return to_uint8(x) if self.output_uint8 else x.astype(jnp.float32)

        return jax.jit(generate, in_shardings=(rep, batch, rep, rep), out_shardings=batch)

    def __call__(self, params: Any, labels: Sequence[int], key: jax.Array, *, num_inference_steps: int = 50,
                 guidance_scale: float | None = None) -> np.ndarray:
        """uint8 images [N, H, W, C] (or float32 model-space arrays) for `labels` [N]. guidance_scale None or 1: no guidance (one model
        call per step); otherwise classifier-free guidance against the null class."""
        labels = self.check_labels(labels)
        guided = guidance_scale is not None and guidance_scale != 1.0
        if guided and not self.model.config.has_null_cond:
            raise ValueError("guidance_scale needs a model trained with a null class (label dropout)")
        n, d = len(labels), parallel.batch_divisor(self.mesh)
        padded = np.concatenate([labels, np.zeros(-n % d, np.int32)])
        images = self._generate(num_inference_steps, guided)(params, padded, key,
                                                             jnp.float32(guidance_scale or 1.0))
        if jax.process_count() > 1:  # rows live on several hosts: gather them everywhere
            images = multihost_utils.process_allgather(images, tiled=True)
        return np.asarray(jax.device_get(images))[:n]
