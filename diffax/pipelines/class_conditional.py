"""diffusers' DiTPipeline, DDPMPipeline and DDIMPipeline: class-conditional and unconditional generation.

    pipe = diffax.pipelines.load("DiT-XL-2-256")                # transformer + vae + scheduler
    images = pipe(class_labels=[207, 360], num_inference_steps=25, guidance_scale=4.0).images
    pipe = diffax.pipelines.load("ddpm-cifar10-32")             # an unconditional UNet2DModel
    images = pipe(batch_size=4, num_inference_steps=1000).images

The same one-program design as the Stable Diffusion pipelines (`diffax.pipelines.base`): noise from per-image
seeds, the whole loop and (DiT) the VAE decode in one jitted function, batch rows over the mesh. DiT follows
diffusers: classifier-free guidance above guidance_scale 1 against the null class, guiding every latent channel
and dropping the learned variance; images are the VAE decode of latents / scaling_factor. The unconditional
pipelines return the model's sample mapped from [-1, 1] to [0, 1]; DDPM keeps a learned variance for the
sampler when its scheduler uses one. DDIMPipeline runs its scheduler config as DDIM (diffusers converts it
on construction) with `eta` per call.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffax.pipelines.base import (Pipeline, PipelineInputError, PipelineOutput, check_output_type,
                                   noise_from_seeds, num_loop_steps, register_pipeline, row_keys, seeds_for,
                                   to_unit_range)
from diffax.sampling import sample
from diffax.schedulers import DDIMScheduler, from_diffusers_config, to_diffusers_config
from diffax.schedulers.base import Scheduler


def _wants_variance(scheduler: Scheduler) -> bool:
    return str(getattr(scheduler, "variance_type", "")).startswith("learned")


class _NoiseToImage(Pipeline):
    """Shared by the three: a denoiser `model_name`, noise of its sample shape, optional VAE decode."""

    model_name = "unet"
    keeps_variance = True  # a learned variance reaches a scheduler that uses one (DiT drops it, as diffusers)

    def _check(self, num_inference_steps: int, output_type: str) -> None:
        check_output_type(output_type)
        if num_inference_steps < 1:
            raise PipelineInputError(f"num_inference_steps must be >= 1, got {num_inference_steps}")

    def _noise_rows(self, count: int, seed: Any, latents: Any) -> dict[str, np.ndarray]:
        rows = {"seeds": seeds_for(seed, count)}
        if latents is not None:
            latents = np.asarray(latents, np.float32)
            want = (count, *self.module(self.model_name).config.sample_shape)
            if latents.shape != want:
                raise PipelineInputError(f"latents must be NHWC {list(want)}, got {list(latents.shape)}")
            rows["latents"] = latents
        return rows

    def _build(self, scheduler: Scheduler, steps: int, guided: bool, decode: bool, progress: bool):
        model = self.module(self.model_name)
        cfg = model.config
        shape = cfg.sample_shape
        channels = shape[-1]
        learned = self.keeps_variance and cfg.learn_sigma and _wants_variance(scheduler) and not guided
        keep = 2 * channels if learned else channels
        hook = self.progress_hook(num_loop_steps(scheduler, steps)) if progress else None
        vae = self.module("vae") if self.has("vae") else None

        def program(params: dict, rows: dict, scalars: dict) -> jax.Array:
            noise = rows["latents"] if "latents" in rows else noise_from_seeds(rows["seeds"], shape)
            cond = {"class_labels": rows["class_labels"]} if "class_labels" in rows else {}
            uncond = cfg.null_cond(cond) if guided else None

            def denoise(x: jax.Array, t: jax.Array, **model_cond: Any) -> jax.Array:
                out = model.apply({"params": params[self.model_name]}, x, jnp.broadcast_to(t, (x.shape[0],)),
                                  **model_cond)
                return out[..., :keep].astype(jnp.float32)

            x = sample(scheduler, denoise, noise, num_inference_steps=steps,
                       key=row_keys(rows["seeds"], 2), cond=cond, uncond=uncond,
                       guidance_scale=scalars["guidance_scale"] if guided else None,
                       guided_channels=channels, after_step=hook)[..., :channels]
            if not decode:
                return x
            if vae is not None:
                x = vae.apply({"params": params["vae"]}, vae.config.unscale_latents(x), method="decode")
            return to_unit_range(x)

        return program

    def _run(self, rows: dict, steps: int, guided: bool, guidance_scale: float, output_type: str,
             scheduler: Scheduler | None = None) -> PipelineOutput:
        scheduler = scheduler or self.scheduler
        decode = output_type != "latent"
        key = (scheduler, steps, guided, decode, self.progress is not None)
        out = self.run_program(key, lambda: self._build(*key), rows,
                               {"guidance_scale": np.float32(guidance_scale)})
        return self.finish(out, output_type)


class DiTPipeline(_NoiseToImage):
    """diffusers' DiTPipeline: a class-conditional DiT transformer in latent space, then the VAE."""

    required_components = ("transformer", "vae")
    model_name = "transformer"
    keeps_variance = False

    def get_label_ids(self, label: str | Sequence[str]) -> list[int]:
        """Class ids of ImageNet label words, from the folder's id2label (as diffusers' method)."""
        id2label: Mapping[str, str] = self.config.get("id2label") or {}
        lookup = {name.strip(): int(i) for i, names in id2label.items() for name in str(names).split(",")}
        words = [label] if isinstance(label, str) else list(label)
        missing = [w for w in words if w not in lookup]
        if missing:
            where = "" if lookup else ": this folder has no id2label"
            raise PipelineInputError(f"unknown label(s) {missing}{where}")
        return [lookup[w] for w in words]

    def __call__(self, class_labels: Sequence[int], guidance_scale: float = 4.0, num_inference_steps: int = 50,
                 seed: int | Sequence[int] = 0, latents: Any = None, output_type: str = "np") -> PipelineOutput:
        """One image per class label; classifier-free guidance above guidance_scale 1. seed and latents
        (NHWC [N, h, w, C]) as in the Stable Diffusion pipelines."""
        self._check(num_inference_steps, output_type)
        cfg = self.module("transformer").config
        labels = np.asarray(class_labels, np.int64).reshape(-1)
        if labels.size == 0 or (labels < 0).any() or (labels >= cfg.num_classes).any():
            raise PipelineInputError(f"class_labels must be ids in 0..{cfg.num_classes - 1}, got {labels.tolist()}")
        guided = guidance_scale > 1
        if guided and not cfg.has_null_cond:
            raise PipelineInputError("guidance_scale > 1 needs a model with a null class (class_dropout_prob > 0)")
        rows = {"class_labels": labels.astype(np.int32), **self._noise_rows(len(labels), seed, latents)}
        return self._run(rows, num_inference_steps, guided, guidance_scale, output_type)


class DDPMPipeline(_NoiseToImage):
    """diffusers' DDPMPipeline: an unconditional UNet2DModel sampled by the folder's scheduler."""

    required_components = ("unet",)

    def __call__(self, batch_size: int = 1, num_inference_steps: int = 1000, seed: int | Sequence[int] = 0,
                 latents: Any = None, output_type: str = "np") -> PipelineOutput:
        """`batch_size` images in [0, 1] ([N, H, W, C]); seed and latents as in the Stable Diffusion pipelines."""
        self._check(num_inference_steps, output_type)
        if batch_size < 1:
            raise PipelineInputError(f"batch_size must be >= 1, got {batch_size}")
        if self.module("unet").config.num_classes:
            raise PipelineInputError("this U-Net is class-conditional; DDPMPipeline samples unconditional ones")
        return self._run(self._noise_rows(batch_size, seed, latents), num_inference_steps, False, 1.0, output_type)


class DDIMPipeline(DDPMPipeline):
    """diffusers' DDIMPipeline: the folder's scheduler config run as DDIM, `eta` per call."""

    def __init__(self, components: Mapping[str, Any], scheduler: Any, **kwargs: Any):
        super().__init__(components, scheduler, **kwargs)
        if not isinstance(self.scheduler, DDIMScheduler):  # diffusers: DDIMScheduler.from_config(scheduler.config)
            config = {k: v for k, v in to_diffusers_config(self.scheduler).items() if k != "_diffax"}
            self._scheduler = from_diffusers_config(config, scheduler_class=DDIMScheduler)

    def __call__(self, batch_size: int = 1, num_inference_steps: int = 50, eta: float = 0.0,
                 use_clipped_model_output: bool | None = None, seed: int | Sequence[int] = 0, latents: Any = None,
                 output_type: str = "np") -> PipelineOutput:
        """As DDPMPipeline's call, with DDIM's `eta` (0: deterministic) and `use_clipped_model_output`."""
        self._check(num_inference_steps, output_type)
        if batch_size < 1:
            raise PipelineInputError(f"batch_size must be >= 1, got {batch_size}")
        scheduler = dataclasses.replace(self.scheduler, eta=float(eta),
                                        use_clipped_model_output=bool(use_clipped_model_output))
        return self._run(self._noise_rows(batch_size, seed, latents), num_inference_steps, False, 1.0, output_type,
                         scheduler)


register_pipeline("DiTPipeline", DiTPipeline)
register_pipeline("DDPMPipeline", DDPMPipeline)
register_pipeline("DDIMPipeline", DDIMPipeline)
