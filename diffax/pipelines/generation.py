"""Unconditional and class-conditional generation (the digits U-Nets, DiT): noise (and labels) in, uint8
images out, one XLA program.

    pipe = GenerationPipeline(model, scheduler, mesh)           # model: a diffax Flax module
    images = pipe(params, jax.random.key(0), labels=[0, 1, 2], num_inference_steps=50, guidance_scale=4.0)
    images = pipe(params, jax.random.key(0), num_samples=16)    # an unconditional model

The program builds the model's `cond` pytree ({"class_labels": labels}, or {} for an unconditional model)
and, for classifier-free guidance, `uncond = model.config.null_cond(cond)`, and hands both to
`diffax.sampling.sample`. It is traced under the mesh and its logical-axis rules, so the models' activation
constraints apply. The batch is split over the mesh's data axes; a number of samples that does not divide by
the device count is padded and the padding dropped. Each sample's starting noise comes from
`fold_in(split(key)[0], index)`, so sample k is the same image whatever the batch size or device count (for
deterministic samplers).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from diffax import parallel
from diffax.convert.lora import read_lora
from diffax.pipelines.lora import apply as apply_lora
from diffax.sampling import sample
from diffax.schedulers.base import Scheduler


def to_uint8(x: jax.Array) -> jax.Array:
    """[-1, 1] floats -> [0, 255] uint8, rounding to nearest."""
    return jnp.clip(jnp.round((x.astype(jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def _wants_variance(scheduler: Scheduler) -> bool:
    """Whether the sampler consumes a learned variance (DDPM with variance_type 'learned*')."""
    return str(getattr(scheduler, "variance_type", "")).startswith("learned")


@dataclasses.dataclass(frozen=True)
class GenerationPipeline:
    """Samples a model that takes class labels (`config.num_classes` > 0) or nothing but noise."""
    model: nn.Module
    scheduler: Scheduler
    mesh: Mesh
    rules: parallel.Rules = parallel.DEFAULT_RULES  # logical-axis rules for the models' activation constraints
    guide_first_channels: int | None = None  # the DiT reference guides 3 of 4 latent channels; None: all
    output_uint8: bool = True                # False: return the model-space arrays (latents) as float32
    # (params, t [N]) -> the weights of the model call at timestep t: a fine-tuned run's LoRA merge or the
    # TuneQDM scale set of t's group (diffax.train.finetune); None: the params themselves.
    param_view: Callable[[Any, jax.Array], Any] | None = None

    def with_lora(self, params: Any, path: str | os.PathLike, scale: float = 1.0) -> Any:
        """`params` with the LoRA file at `path` (diffusers / peft or kohya, keys for the `unet`, as
        `load_lora_weights` reads them) added at weight `scale`: the pipeline takes params per call, so the
        adapted weights are returned rather than kept. ValueError naming the file and key for an entry that
        fits no layer of this model."""
        layers = read_lora(path, {"unet": (self.model, params)})
        return apply_lora(params, [layers.get("unet", {})], [scale])

    def check_labels(self, labels: Sequence[int] | None, num_samples: int | None) -> np.ndarray | None:
        """Labels as int32 [N] for a class-conditional model, None for an unconditional one; a clear error
        for labels the model cannot take or a missing count."""
        n = self.model.config.num_classes
        if n == 0:
            if labels is not None:
                raise ValueError("this model is unconditional: it takes no labels")
            if num_samples is None or num_samples < 1:
                raise ValueError(f"an unconditional model needs num_samples >= 1, got {num_samples}")
            return None
        if labels is None:
            raise ValueError(f"this model is class-conditional: give labels (classes 0..{n - 1})")
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if num_samples is not None and num_samples != len(labels):
            raise ValueError(f"num_samples={num_samples} but {len(labels)} labels were given")
        bad = labels[(labels < 0) | (labels >= n)]
        if bad.size:
            raise ValueError(f"label {int(bad[0])} is outside the model's classes 0..{n - 1}")
        return labels.astype(np.int32)

    @functools.lru_cache(maxsize=8)
    def _generate(self, num_inference_steps: int, guided: bool):
        """The jitted program for one (steps, guided) choice; guidance scale, labels and count stay traced."""
        model, cfg = self.model, self.model.config
        shape = cfg.sample_shape
        channels = shape[-1]
        keep = 2 * channels if (cfg.learn_sigma and _wants_variance(self.scheduler)) else channels
        batch = parallel.batch_sharding(self.mesh)
        rep = parallel.replicated(self.mesh)

        def generate(params, index, cond, key_data, guidance_scale):
            # index: [N] int32 sample numbers (padded to the device count); cond: the model's keyword inputs
            # with N rows ({} for an unconditional model); key_data: the base PRNG key's data -> [N, H, W, C]
            noise_key, sampler_key = jax.random.split(jax.random.wrap_key_data(key_data))
            keys = jax.vmap(lambda i: jax.random.fold_in(noise_key, i))(index)
            noise = jax.vmap(lambda k: jax.random.normal(k, shape))(keys)  # [N, H, W, C]

            def denoise(x, t, **model_cond):
                t = jnp.full((x.shape[0],), t)
                weights = params if self.param_view is None else self.param_view(params, t)
                out = model.apply({"params": weights}, x, t, **model_cond)
                return out[..., :keep]

            guided_channels = self.guide_first_channels if self.guide_first_channels is not None else channels
            uncond = cfg.null_cond(cond) if guided and cond else None
            x = sample(self.scheduler, denoise, noise, num_inference_steps=num_inference_steps, key=sampler_key,
                       cond=cond, uncond=uncond, guidance_scale=guidance_scale if guided else None,
                       guided_channels=guided_channels)
            x = x[..., :channels]
            return to_uint8(x) if self.output_uint8 else x.astype(jnp.float32)

        # params: unspecified, so they stay as given (replicated host arrays, or FSDP-sharded training state).
        return parallel.jit_with_rules(generate, self.mesh, self.rules,
                                       in_shardings=(None, batch, batch, rep, rep), out_shardings=batch)

    def __call__(self, params: Any, key: jax.Array, *, labels: Sequence[int] | None = None,
                 num_samples: int | None = None, num_inference_steps: int = 50,
                 guidance_scale: float | None = None, first_index: int = 0) -> np.ndarray:
        """uint8 images [N, H, W, C] (or float32 model-space arrays): one per label for a class-conditional
        model, `num_samples` for an unconditional one. guidance_scale None or 1: no guidance (one model call
        per step); otherwise classifier-free guidance against the model's null conditioning. The images are
        samples number first_index .. first_index + N - 1 of `key`, so a run split into batches draws the
        same images as one call."""
        labels = self.check_labels(labels, num_samples)
        guided = guidance_scale is not None and guidance_scale != 1.0
        if guided and not self.model.config.has_null_cond:
            raise ValueError("guidance_scale needs a model trained with null conditioning (a null class and "
                             "label dropout); leave it unset or 1 for this model")
        n = len(labels) if labels is not None else num_samples
        pad = -n % parallel.batch_divisor(self.mesh)
        index = np.arange(first_index, first_index + n + pad, dtype=np.int32)
        cond = {} if labels is None else {"class_labels": np.concatenate([labels, np.zeros(pad, np.int32)])}
        # Global arrays, so the same call works when several processes share the mesh.
        rows, rep = parallel.batch_sharding(self.mesh), parallel.replicated(self.mesh)
        images = self._generate(num_inference_steps, guided)(
            params, *parallel.global_array((index, cond), rows),
            *parallel.global_array((jax.random.key_data(key), np.float32(guidance_scale or 1.0)), rep))
        if jax.process_count() > 1:  # rows live on several hosts: gather them everywhere
            images = multihost_utils.process_allgather(images, tiled=True)
        return np.asarray(jax.device_get(images))[:n]
