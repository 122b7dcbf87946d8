"""Stable Diffusion and SDXL with ControlNets: one or several conditioning images steer the U-Net, one XLA
program per call.

    pipe = diffax.pipelines.load("sd-controlnet-folder")               # a StableDiffusionControlNetPipeline folder
    pipe = with_controlnet(diffax.pipelines.load("sd-folder"), "sd-controlnet-canny")   # attach to plain SD
    edges = canny(photo)                                               # diffax.pipelines.canny
    out = pipe("a bird", image=edges, controlnet_conditioning_scale=0.8, seed=0)

The arguments and their defaults are diffusers' (StableDiffusionControlNetPipeline, its img2img and
inpainting variants, StableDiffusionXLControlNetPipeline). As diffusers computes it, inside the sampler's loop
at every step:

- each ControlNet sees the scheduler-scaled latents, the text embeddings and its conditioning image ([0, 1],
  resized to the output size, repeated per image and, under classifier-free guidance, for both halves), and
  returns residuals scaled by `controlnet_conditioning_scale` times `controlnet_keep[i]`: 1 while the step's
  fraction [i / n, (i + 1) / n] lies within [control_guidance_start, control_guidance_end], else 0 (n: the
  steps the loop runs after img2img's `strength`; SDXL's `denoising_end` does not shorten it, as in
  diffusers);
- several nets (diffusers' MultiControlNetModel) sum their residuals;
- `guess_mode` (or a net with `global_pool_conditions`) runs the nets on the conditional half only, with the
  residuals scaled 0.1 ... 1 from the first skip to the mid block, and zeros for the unconditional half;
- the U-Net adds the residuals to its skips and mid block.

The scales and the per-step keep table are program inputs (the table is computed on the host, in float64
like diffusers'), so a new scale, start or end does not retrace; the loop passes its step index to the
denoiser to read the table.

A folder saved by diffusers with several ControlNets names the `controlnet` component MultiControlNetModel
and stores the nets in controlnet/, controlnet_1/, ...; it loads as a `MultiControlNet` component.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffax.models.controlnet import ControlNetModel, apply_multi_controlnet
from diffax.pipelines import cache
from diffax.pipelines import stable_diffusion_xl as sdxl
from diffax.pipelines.base import Component, Pipeline, PipelineInputError, PipelineOutput, register_pipeline
from diffax.pipelines.images import load_images, load_masks
from diffax.pipelines.loading import register_component_loader
from diffax.pipelines.stable_diffusion import (Static, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline,
                                               StableDiffusionPipeline)
from diffax.pipelines.text_encoding import repeat_rows


@dataclasses.dataclass(frozen=True)
class MultiControlNet:
    """Several ControlNets as one pipeline component (diffusers' MultiControlNetModel): the component's params
    are a tuple, one entry per net, in the same order."""
    nets: tuple[ControlNetModel, ...]


def load_multi_controlnet(folder: str | Path, *, dtype: Any = None, cache_dir: Any = None,
                          attention_backend: str | None = None) -> Component:
    """The nets diffusers' MultiControlNetModel.save_pretrained wrote at `folder`, `folder`_1, `folder`_2, ...
    as a (MultiControlNet, params tuple) component, each net converted through the conversion cache."""
    folder = Path(folder)
    paths = [folder]
    while Path(f"{folder}_{len(paths)}").is_dir():
        paths.append(Path(f"{folder}_{len(paths)}"))
    loaded = [load_controlnet(p, dtype=dtype, cache_dir=cache_dir, attention_backend=attention_backend)
              for p in paths]
    return MultiControlNet(tuple(m for m, _ in loaded)), tuple(p for _, p in loaded)


def load_controlnet(path: str | Path, *, dtype: Any = None, cache_dir: Any = None,
                    attention_backend: str | None = None) -> Component:
    """One ControlNetModel folder (diffusers layout) -> (ControlNetModel, params), through the conversion cache."""
    module, params = cache.load_component(path, dtype=dtype, param_dtype=dtype, attention_backend=attention_backend,
                                          cache_dir=cache_dir)
    if not isinstance(module, ControlNetModel):
        raise ValueError(f"{path}: holds a {type(module).__name__}, not a ControlNetModel")
    return module, params


def controlnet_component(controlnet: Any, *, dtype: Any = None, cache_dir: Any = None) -> Component:
    """A `controlnet` component from a ControlNet folder, a (ControlNetModel, params) pair, or a list of
    either (several nets: a MultiControlNet component)."""
    def one(c: Any) -> Component:
        if isinstance(c, (str, Path)):
            return load_controlnet(c, dtype=dtype, cache_dir=cache_dir)
        if isinstance(c, tuple) and len(c) == 2 and isinstance(c[0], ControlNetModel):
            return c
        raise PipelineInputError(f"controlnet: expected a ControlNet folder or a (ControlNetModel, params) pair, "
                                 f"got {type(c).__name__}")

    if isinstance(controlnet, list):
        if not controlnet:
            raise PipelineInputError("controlnet: an empty list")
        if len(controlnet) == 1:
            return one(controlnet[0])
        nets = [one(c) for c in controlnet]
        return MultiControlNet(tuple(m for m, _ in nets)), tuple(p for _, p in nets)
    return one(controlnet)


def controlnet_keep(num_timesteps: int, start: int, control_guidance_start: Sequence[float],
                    control_guidance_end: Sequence[float]) -> np.ndarray:
    """float32 [num_timesteps, nets]: row i is 1 for a net that acts at loop index i, else 0.

    The loop runs indices start .. num_timesteps - 1 (n of them); step r = i - start acts for a net when
    r / n >= its start and (r + 1) / n <= its end, compared in float64 as diffusers does. Rows before
    `start` are never read and stay 0."""
    n = num_timesteps - start
    keep = np.zeros((num_timesteps, len(control_guidance_start)), np.float32)
    for r in range(n):
        keep[start + r] = [0.0 if (r / n < s or (r + 1) / n > e) else 1.0
                           for s, e in zip(control_guidance_start, control_guidance_end)]
    return keep


def load_control_images(image: Any, height: int | None, width: int | None, multiple: int,
                        what: str = "image") -> np.ndarray:
    """float32 [N, H, W, 3] in [0, 1] from a PIL image, a list of them, or arrays [H, W, 3] / [N, H, W, 3]:
    uint8 (e.g. `canny`'s edge maps) or floats in [0, 1]; resized as diffusers' control-image processor does
    (see `diffax.pipelines.images.load_images`)."""
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    items = [np.asarray(i, np.float32) / 255.0 if isinstance(i, (np.ndarray, jax.Array)) and i.dtype == np.uint8
             else i for i in items]
    try:
        return load_images(items, height, width, multiple=multiple, what=what)
    except ValueError as e:
        raise PipelineInputError(str(e)) from None


def _as_list(x: Any, n: int, what: str) -> list[float]:
    """A float or list of floats as n floats (a single value repeated)."""
    values = [float(v) for v in x] if isinstance(x, (list, tuple, np.ndarray)) else [float(x)]
    if len(values) == 1:
        values = values * n
    if len(values) != n:
        raise PipelineInputError(f"{what}: {len(values)} values for {n} ControlNets (give one, or one per net)")
    return values


@dataclasses.dataclass(frozen=True)
class ControlStatic(Static):
    """Static choices of a ControlNet program: the Stable Diffusion ones and guess mode."""
    guess_mode: bool = False


class _ControlNetMixin:
    """The ControlNet parts every ControlNet pipeline shares, mixed in before a StableDiffusion*Pipeline or the
    SDXL pipeline: the nets, their host inputs, the denoiser around the U-Net, and Stable Diffusion's program
    (the SDXL class builds its own)."""

    def __init__(self, components: Any, scheduler: Any, **kwargs: Any):
        super().__init__(components, scheduler, **kwargs)
        nets = self.controlnets()
        factor = self.vae_scale_factor
        for k, net in enumerate(nets):
            cfg = net.config
            if cfg.conditioning_factor != factor:
                raise ValueError(f"{self.source or type(self).__name__}: ControlNet {k} takes images "
                                 f"{cfg.conditioning_factor}x its latents (conditioning_embedding_out_channels="
                                 f"{cfg.conditioning_embedding_out_channels}), the VAE {factor}x")
            if cfg.conditioning_channels != 3:
                raise ValueError(f"{self.source or type(self).__name__}: ControlNet {k} has conditioning_channels="
                                 f"{cfg.conditioning_channels}; the pipeline feeds RGB images (3)")

    def controlnets(self) -> list[ControlNetModel]:
        """The ControlNet modules, one per net, in order."""
        module = self.module("controlnet")
        return list(module.nets) if isinstance(module, MultiControlNet) else [module]

    def controlnet_params(self, params: dict) -> list[Any]:
        """Each net's params, in order, from the program's {component: params}."""
        return list(params["controlnet"]) if isinstance(self.module("controlnet"), MultiControlNet) else [
            params["controlnet"]]

    # -- host inputs

    def control_rows(self, image: Any, num_prompts: int, num_images_per_prompt: int, height: int | None,
                     width: int | None, what: str = "image") -> tuple[dict[str, np.ndarray], int, int]:
        """({control_image_k: [N, H, W, 3]}, H, W): each net's images, one per output row (a single image
        repeated for every row, or one per prompt repeated per image), resized to height x width (default the
        first net's first image's size, rounded down to the VAE's factor)."""
        n_nets = len(self.controlnets())
        if image is None:
            raise PipelineInputError(f"{what}: the ControlNet needs a conditioning image")
        if n_nets == 1:
            per_net = [image]
        else:
            if not isinstance(image, (list, tuple)):
                raise PipelineInputError(f"{what}: {n_nets} ControlNets need a list of {n_nets} images")
            if any(isinstance(i, (list, tuple)) for i in image):
                # diffusers' nested form: one list of per-net images per prompt
                if any(len(i) != n_nets for i in image):
                    raise PipelineInputError(f"{what}: each inner list must hold one image per ControlNet "
                                             f"({n_nets})")
                per_net = [list(t) for t in zip(*image)]
            else:
                per_net = list(image)
            if len(per_net) != n_nets:
                raise PipelineInputError(f"{what}: {len(per_net)} images for {n_nets} ControlNets")
        rows, count = {}, num_prompts * num_images_per_prompt
        for k, img in enumerate(per_net):
            images = load_control_images(img, height, width, self.vae_scale_factor, what)
            height, width = images.shape[1:3]
            if images.shape[0] == 1:
                images = np.repeat(images, count, axis=0)
            elif images.shape[0] == num_prompts:
                images = repeat_rows(images, num_images_per_prompt)
            else:
                raise PipelineInputError(f"{what}: {images.shape[0]} images for {num_prompts} prompts (give one, or "
                                         f"one per prompt)")
            rows[f"control_image_{k}"] = images
        return rows, height, width

    def control_scalars(self, *, num_inference_steps: int, latent_shape: tuple[int, int, int], start: int,
                        controlnet_conditioning_scale: Any, control_guidance_start: Any,
                        control_guidance_end: Any) -> dict[str, np.ndarray]:
        """{controlnet_scale [nets], controlnet_keep [T, nets]} checked as diffusers checks them."""
        n = len(self.controlnets())
        scale = controlnet_conditioning_scale
        if n == 1 and isinstance(scale, (list, tuple)):
            scale = scale[0]  # diffusers reads the first entry for a single net
        scales = _as_list(scale, n, "controlnet_conditioning_scale")
        starts = _as_list(control_guidance_start, n, "control_guidance_start")
        ends = _as_list(control_guidance_end, n, "control_guidance_end")
        for s, e in zip(starts, ends):
            if not 0.0 <= s < e <= 1.0:
                raise PipelineInputError(f"control_guidance_start {s} and control_guidance_end {e} must satisfy "
                                         f"0 <= start < end <= 1")
        state = self.scheduler.init(num_inference_steps, jax.ShapeDtypeStruct((1, *latent_shape), jnp.float32))
        total = len(np.asarray(state.timesteps))
        return {"controlnet_scale": np.asarray(scales, np.float32),
                "controlnet_keep": controlnet_keep(total, int(start), starts, ends)}

    def sd_scalars(self, guidance_scale: float, guidance_rescale: float, start: np.int32 | None,
                   num_inference_steps: int, latent_size: tuple[int, int], **control: Any) -> dict[str, Any]:
        """A Stable Diffusion ControlNet program's scalar inputs: the guidance scales, the loop start (None:
        the first step) and `control_scalars` of the `control` arguments."""
        scalars = {"guidance_scale": np.float32(guidance_scale), "guidance_rescale": np.float32(guidance_rescale)}
        if start is not None:
            scalars["start"] = start
        scalars.update(self.control_scalars(num_inference_steps=num_inference_steps,
                                            latent_shape=(*latent_size, self.latent_channels),
                                            start=0 if start is None else int(start), **control))
        return scalars

    def control_static(self, static: Any, guess_mode: bool, cls: type = ControlStatic) -> Any:
        """`static` as a `cls` (its subclass with a guess_mode field) with guess mode, which a first net with
        global_pool_conditions turns on, as diffusers."""
        guess = bool(guess_mode) or self.controlnets()[0].config.global_pool_conditions
        fields = {f.name: getattr(static, f.name) for f in dataclasses.fields(static)}
        return cls(**fields, guess_mode=guess)

    # -- traced pieces

    pass_step_index = True  # the keep table is indexed by the loop step

    def extra_conditioning(self, rows: dict, static: Any, cond: dict, uncond: dict | None) -> tuple[dict, dict | None]:
        """The control images as a conditioning input: under guidance they are doubled with [uncond; cond],
        as diffusers doubles them (guess mode takes the conditional half back)."""
        images = tuple(rows[f"control_image_{k}"] for k in range(len(self.controlnets())))  # [N, H, W, 3] each
        cond = {**cond, "controlnet_cond": images}
        if uncond is not None:
            uncond = {**uncond, "controlnet_cond": images}
        return cond, uncond

    def wrap_denoiser(self, denoise: Any, params: dict, scalars: dict, static: Any) -> Any:
        """The U-Net's denoiser with the ControlNets' residuals added."""
        return self.control_denoiser(denoise, params, scalars, guess_mode=static.guess_mode, guided=static.guided)

    def control_denoiser(self, unet_denoise: Any, params: dict, scalars: dict, *, guess_mode: bool, guided: bool):
        """denoise(x, t, step_index, controlnet_cond, **cond): the nets' residuals, then
        `unet_denoise(x, t, **cond)` with them (down_block_additional_residuals, mid_block_additional_residual)."""
        nets = list(zip(self.controlnets(), self.controlnet_params(params)))
        conditional_only = guess_mode and guided
        # The float32 scales would promote bf16 residuals, and with them the U-Net's skips, to float32.
        unet_dtype = self.module("unet").config.dtype

        def denoise(x: jax.Array, t: jax.Array, *, step_index: jax.Array, controlnet_cond: tuple[jax.Array, ...],
                    **cond: Any) -> jax.Array:
            scale = scalars["controlnet_scale"] * scalars["controlnet_keep"][step_index]  # [nets]
            net_x, net_cond, images = x, cond, controlnet_cond
            if conditional_only:  # rows are [uncond; cond]: the nets see the conditional half only
                half = x.shape[0] // 2
                net_x, images = x[half:], tuple(im[half:] for im in images)
                net_cond = jax.tree.map(lambda a: a[half:], cond)
            t_rows = jnp.broadcast_to(t, (net_x.shape[0],))
            down, mid = apply_multi_controlnet(nets, net_x, t_rows, controlnet_cond=images,
                                               conditioning_scale=[scale[k] for k in range(len(nets))],
                                               guess_mode=guess_mode, **net_cond)
            down, mid = tuple(d.astype(unet_dtype) for d in down), mid.astype(unet_dtype)
            if conditional_only:
                down = tuple(jnp.concatenate([jnp.zeros_like(d), d]) for d in down)
                mid = jnp.concatenate([jnp.zeros_like(mid), mid])
            return unet_denoise(x, t, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                                **cond)

        return denoise


class StableDiffusionControlNetPipeline(_ControlNetMixin, StableDiffusionPipeline):
    """diffusers' StableDiffusionControlNetPipeline: text to image steered by one or several ControlNets."""

    required_components = ("unet", "vae", "text_encoder", "controlnet")

    def __call__(self, prompt: str | Sequence[str] | None = None, image: Any = None, height: int | None = None,
                 width: int | None = None, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 negative_prompt: str | Sequence[str] | None = None, num_images_per_prompt: int = 1,
                 seed: int | Sequence[int] = 0, latents: Any = None, output_type: str = "np",
                 prompt_embeds: Any = None, negative_prompt_embeds: Any = None,
                 controlnet_conditioning_scale: float | Sequence[float] = 1.0, guess_mode: bool = False,
                 control_guidance_start: float | Sequence[float] = 0.0,
                 control_guidance_end: float | Sequence[float] = 1.0, clip_skip: int | None = None,
                 guidance_rescale: float = 0.0, vae_tiling: bool = False) -> PipelineOutput:
        """Text to image under ControlNet conditioning. Returns `PipelineOutput(images, nsfw_content_detected)`.

        image: the conditioning image(s): for one net a PIL image, a list of them, or an array [H, W, 3] /
            [N, H, W, 3] (uint8, or float in [0, 1]); one image for all outputs or one per prompt. For
            several nets a list with one such entry per net (or diffusers' nested list: per prompt, one
            image per net).
        height, width: default the (first) conditioning image's size rounded down to the VAE's factor; the
            images are resized to them (Lanczos for PIL, nearest for arrays, as diffusers).
        controlnet_conditioning_scale: multiplies each net's residuals (a float, or one per net).
        guess_mode: the nets see only the conditional half of classifier-free guidance, residuals scaled
            0.1 ... 1 from the first skip to the mid block.
        control_guidance_start, control_guidance_end: the fraction of the steps over which each net acts
            (a float, or one per net).
        Other arguments as `StableDiffusionPipeline.__call__`.
        """
        rows, num_prompts = self.text_rows(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                           num_images_per_prompt, guidance_scale > 1.0)
        control, height, width = self.control_rows(image, num_prompts, num_images_per_prompt, height, width)
        static = self.static_choices(height=height, width=width, num_inference_steps=num_inference_steps,
                                     guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                                     output_type=output_type, clip_skip=clip_skip, vae_tiling=vae_tiling)
        static = self.control_static(static, guess_mode)
        count = num_prompts * num_images_per_prompt
        rows.update(control)
        rows.update(self.noise_rows(seed, latents, count, static.latent_size, self.latent_channels))
        scalars = self.sd_scalars(guidance_scale, guidance_rescale, None, num_inference_steps, static.latent_size,
                                  controlnet_conditioning_scale=controlnet_conditioning_scale,
                                  control_guidance_start=control_guidance_start,
                                  control_guidance_end=control_guidance_end)
        return self.generate(static, rows, scalars, output_type)


class StableDiffusionControlNetImg2ImgPipeline(_ControlNetMixin, StableDiffusionImg2ImgPipeline):
    """diffusers' StableDiffusionControlNetImg2ImgPipeline: img2img from `image`, steered by `control_image`."""

    required_components = ("unet", "vae", "text_encoder", "controlnet")

    def __call__(self, prompt: str | Sequence[str] | None = None, image: Any = None, control_image: Any = None,
                 height: int | None = None, width: int | None = None, strength: float = 0.8,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 negative_prompt: str | Sequence[str] | None = None, num_images_per_prompt: int = 1,
                 seed: int | Sequence[int] = 0, latents: Any = None, output_type: str = "np",
                 prompt_embeds: Any = None, negative_prompt_embeds: Any = None,
                 controlnet_conditioning_scale: float | Sequence[float] = 0.8, guess_mode: bool = False,
                 control_guidance_start: float | Sequence[float] = 0.0,
                 control_guidance_end: float | Sequence[float] = 1.0, clip_skip: int | None = None,
                 guidance_rescale: float = 0.0, vae_tiling: bool = False) -> PipelineOutput:
        """Image to image under ControlNet conditioning: `image` and `strength` as
        `StableDiffusionImg2ImgPipeline.__call__` (the output takes its size, or height x width), the
        `control_image`(s) resized to it, the ControlNet arguments as `StableDiffusionControlNetPipeline.__call__`.
        The guidance window counts the steps that `strength` keeps."""
        if image is None:
            raise PipelineInputError("image: img2img needs an init image")
        first = load_control_images(image, height, width, self.vae_scale_factor)
        height, width = first.shape[1:3]
        static = self.static_choices(height=height, width=width, num_inference_steps=num_inference_steps,
                                     guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                                     output_type=output_type, clip_skip=clip_skip, vae_tiling=vae_tiling)
        static = self.control_static(static, guess_mode)
        rows, num_prompts = self.text_rows(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                           num_images_per_prompt, static.guided)
        count = num_prompts * num_images_per_prompt
        rows.update(self.control_rows(control_image, num_prompts, num_images_per_prompt, height, width,
                                      "control_image")[0])
        rows.update(self.noise_rows(seed, latents, count, static.latent_size, self.latent_channels))
        rows["image"] = self.image_rows(first, count, None, None)
        start = self.start_index(num_inference_steps, strength, static.latent_size)
        scalars = self.sd_scalars(guidance_scale, guidance_rescale, start, num_inference_steps, static.latent_size,
                                  controlnet_conditioning_scale=controlnet_conditioning_scale,
                                  control_guidance_start=control_guidance_start,
                                  control_guidance_end=control_guidance_end)
        return self.generate(static, rows, scalars, output_type)


class StableDiffusionControlNetInpaintPipeline(_ControlNetMixin, StableDiffusionInpaintPipeline):
    """diffusers' StableDiffusionControlNetInpaintPipeline: inpainting (a 9-channel inpainting U-Net, or latent
    blending for an ordinary one) steered by `control_image`; the nets see the 4-channel latents."""

    required_components = ("unet", "vae", "text_encoder", "controlnet")

    def __call__(self, prompt: str | Sequence[str] | None = None, image: Any = None, mask_image: Any = None,
                 control_image: Any = None, height: int | None = None, width: int | None = None,
                 strength: float = 1.0, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 negative_prompt: str | Sequence[str] | None = None, num_images_per_prompt: int = 1,
                 seed: int | Sequence[int] = 0, latents: Any = None, output_type: str = "np",
                 prompt_embeds: Any = None, negative_prompt_embeds: Any = None,
                 controlnet_conditioning_scale: float | Sequence[float] = 0.5, guess_mode: bool = False,
                 control_guidance_start: float | Sequence[float] = 0.0,
                 control_guidance_end: float | Sequence[float] = 1.0, clip_skip: int | None = None,
                 guidance_rescale: float = 0.0, vae_tiling: bool = False) -> PipelineOutput:
        """Inpainting under ControlNet conditioning: `image`, `mask_image` and `strength` as
        `StableDiffusionInpaintPipeline.__call__`, except that the output defaults to the image's own size as
        diffusers' ControlNet inpainting does; the `control_image`(s) are resized to it; the ControlNet
        arguments as `StableDiffusionControlNetPipeline.__call__`."""
        if image is None or mask_image is None:
            raise PipelineInputError("inpainting needs image and mask_image")
        first = load_control_images(image, height, width, self.vae_scale_factor)
        height, width = first.shape[1:3]
        unet_channels = self.module("unet").config.in_channels
        if unet_channels not in (self.latent_channels, 2 * self.latent_channels + 1):
            raise PipelineInputError(f"the U-Net takes {unet_channels} channels: an inpainting U-Net takes "
                                     f"{2 * self.latent_channels + 1}, an ordinary one {self.latent_channels}")
        static = self.static_choices(height=height, width=width, num_inference_steps=num_inference_steps,
                                     guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                                     output_type=output_type, clip_skip=clip_skip, vae_tiling=vae_tiling,
                                     full_strength=strength == 1.0)
        static = self.control_static(static, guess_mode)
        rows, num_prompts = self.text_rows(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                           num_images_per_prompt, static.guided)
        count = num_prompts * num_images_per_prompt
        rows.update(self.control_rows(control_image, num_prompts, num_images_per_prompt, height, width,
                                      "control_image")[0])
        rows.update(self.noise_rows(seed, latents, count, static.latent_size, self.latent_channels))
        rows["image"] = self.image_rows(first, count, None, None)
        try:
            masks = load_masks(mask_image, height, width)
        except ValueError as e:
            raise PipelineInputError(str(e)) from None
        if count % masks.shape[0]:
            raise PipelineInputError(f"mask_image: {masks.shape[0]} masks do not divide into {count} outputs")
        rows["mask"] = np.concatenate([masks] * (count // masks.shape[0]))
        start = self.start_index(num_inference_steps, strength, static.latent_size)
        scalars = self.sd_scalars(guidance_scale, guidance_rescale, start, num_inference_steps, static.latent_size,
                                  controlnet_conditioning_scale=controlnet_conditioning_scale,
                                  control_guidance_start=control_guidance_start,
                                  control_guidance_end=control_guidance_end)
        return self.generate(static, rows, scalars, output_type)


@dataclasses.dataclass(frozen=True)
class XLControlStatic(sdxl.Static):
    """Static choices of an SDXL ControlNet program: the SDXL ones and guess mode."""
    guess_mode: bool = False


class _XLControlNetMixin(_ControlNetMixin):
    """The SDXL ControlNet pipelines: the SDXL call prepares prompts, noise, init images and time ids as
    usual and hands them to `generate`, which adds this call's conditioning images, scales and keep table;
    the program is SDXL's with the nets inside the denoiser."""

    def __init__(self, components: Any, scheduler: Any, **kwargs: Any):
        super().__init__(components, scheduler, **kwargs)
        self._control_inputs: tuple[dict[str, np.ndarray], dict[str, Any]] | None = None

    def control_call(self, run: Any, image: Any, *, prompt: Any, prompt_embeds: Any, num_images_per_prompt: int,
                     height: int | None, width: int | None, what: str, **control: Any) -> PipelineOutput:
        """Reads the conditioning images (their size is the output's unless height / width are given), then
        returns `run(height, width)`, the SDXL call. `control`: controlnet_conditioning_scale,
        control_guidance_start, control_guidance_end, guess_mode."""
        if prompt_embeds is not None:
            num_prompts = len(prompt_embeds)
        else:
            num_prompts = len(sdxl.as_prompt_list(prompt)) if prompt is not None else 1
        rows, height, width = self.control_rows(image, num_prompts, num_images_per_prompt, height, width, what)
        self._control_inputs = (rows, control)
        try:
            return run(height, width)
        finally:
            self._control_inputs = None

    def generate(self, static: Any, rows: dict[str, np.ndarray], scalars: dict[str, Any],
                 output_type: str) -> PipelineOutput:
        if self._control_inputs is None:
            raise PipelineInputError("image: the ControlNet needs a conditioning image")
        control_rows, control = self._control_inputs
        if static.denoising_start is None:
            start = int(scalars.get("start", 0))
        else:
            start, _ = self.loop_bounds(static.steps, static.latent_shape, denoising_start=static.denoising_start)
        keep = self.control_scalars(num_inference_steps=static.steps, latent_shape=static.latent_shape, start=start,
                                    controlnet_conditioning_scale=control["controlnet_conditioning_scale"],
                                    control_guidance_start=control["control_guidance_start"],
                                    control_guidance_end=control["control_guidance_end"])
        static = self.control_static(static, control["guess_mode"], XLControlStatic)
        return super().generate(static, {**rows, **control_rows}, {**scalars, **keep}, output_type)


class StableDiffusionXLControlNetPipeline(_XLControlNetMixin, sdxl.StableDiffusionXLPipeline):
    """diffusers' StableDiffusionXLControlNetPipeline: SDXL text to image steered by one or several ControlNets,
    which also read the pooled text embeddings and time ids (`added_cond_kwargs`)."""

    required_components = ("unet", "vae", "text_encoder_2", "controlnet")

    def __call__(self, prompt: str | Sequence[str] | None = None, prompt_2: str | Sequence[str] | None = None, *,
                 image: Any = None, height: int | None = None, width: int | None = None,
                 num_images_per_prompt: int = 1, prompt_embeds: Any = None,
                 controlnet_conditioning_scale: float | Sequence[float] = 1.0, guess_mode: bool = False,
                 control_guidance_start: float | Sequence[float] = 0.0,
                 control_guidance_end: float | Sequence[float] = 1.0, **kwargs: Any) -> PipelineOutput:
        """SDXL text to image under ControlNet conditioning: `image` and the ControlNet arguments as
        `StableDiffusionControlNetPipeline.__call__` (height / width default to the conditioning image's size,
        and with them original_size and target_size), every other argument as
        `StableDiffusionXLPipeline.__call__`. The guidance window counts every step, `denoising_end` included,
        as diffusers."""
        def run(h: int, w: int) -> PipelineOutput:
            return sdxl.StableDiffusionXLPipeline.__call__(self, prompt, prompt_2, height=h, width=w,
                                                           num_images_per_prompt=num_images_per_prompt,
                                                           prompt_embeds=prompt_embeds, **kwargs)

        return self.control_call(run, image, prompt=prompt, prompt_embeds=prompt_embeds,
                                 num_images_per_prompt=num_images_per_prompt, height=height, width=width,
                                 what="image", controlnet_conditioning_scale=controlnet_conditioning_scale,
                                 control_guidance_start=control_guidance_start,
                                 control_guidance_end=control_guidance_end, guess_mode=guess_mode)


class StableDiffusionXLControlNetImg2ImgPipeline(_XLControlNetMixin, sdxl.StableDiffusionXLImg2ImgPipeline):
    """diffusers' StableDiffusionXLControlNetImg2ImgPipeline: SDXL img2img from `image`, steered by
    `control_image`."""

    required_components = ("unet", "vae", "text_encoder_2", "controlnet")

    def __call__(self, prompt: str | Sequence[str] | None = None, prompt_2: str | Sequence[str] | None = None,
                 image: Any = None, control_image: Any = None, strength: float = 0.8, *, height: int | None = None,
                 width: int | None = None, num_images_per_prompt: int = 1, prompt_embeds: Any = None,
                 controlnet_conditioning_scale: float | Sequence[float] = 0.8, guess_mode: bool = False,
                 control_guidance_start: float | Sequence[float] = 0.0,
                 control_guidance_end: float | Sequence[float] = 1.0, **kwargs: Any) -> PipelineOutput:
        """SDXL image to image under ControlNet conditioning: `image`, `strength` and every other SDXL argument
        as `StableDiffusionXLImg2ImgPipeline.__call__`, the output (and the init image) at the control image's
        size unless height / width are given, the ControlNet arguments as
        `StableDiffusionControlNetPipeline.__call__`. The guidance window counts the steps `strength` keeps."""
        def run(h: int, w: int) -> PipelineOutput:
            return sdxl.StableDiffusionXLImg2ImgPipeline.__call__(
                self, prompt, prompt_2, image, strength, height=h, width=w,
                num_images_per_prompt=num_images_per_prompt, prompt_embeds=prompt_embeds, **kwargs)

        return self.control_call(run, control_image, prompt=prompt, prompt_embeds=prompt_embeds,
                                 num_images_per_prompt=num_images_per_prompt, height=height, width=width,
                                 what="control_image", controlnet_conditioning_scale=controlnet_conditioning_scale,
                                 control_guidance_start=control_guidance_start,
                                 control_guidance_end=control_guidance_end, guess_mode=guess_mode)


def with_controlnet(pipe: Pipeline, controlnet: Any, *, dtype: Any = None, cache_dir: Any = None) -> Pipeline:
    """`pipe`'s components, tokenizers, scheduler and mesh with `controlnet` attached, as the matching
    ControlNet pipeline (text-to-image, img2img or inpainting).

    controlnet: a ControlNet folder, a (ControlNetModel, params) pair, or a list of either (several nets)."""
    classes = {StableDiffusionPipeline: StableDiffusionControlNetPipeline,
               StableDiffusionImg2ImgPipeline: StableDiffusionControlNetImg2ImgPipeline,
               StableDiffusionInpaintPipeline: StableDiffusionControlNetInpaintPipeline,
               sdxl.StableDiffusionXLPipeline: StableDiffusionXLControlNetPipeline,
               sdxl.StableDiffusionXLImg2ImgPipeline: StableDiffusionXLControlNetImg2ImgPipeline}
    classes.update({c: c for c in list(classes.values())})  # a ControlNet pipeline gets its nets replaced
    cls = classes.get(type(pipe))
    if cls is None:
        raise PipelineInputError(f"with_controlnet: no ControlNet pipeline for {type(pipe).__name__} (have: "
                                 f"{', '.join(c.__name__ for c in classes)})")
    components = {**pipe.components, "controlnet": controlnet_component(controlnet, dtype=dtype or pipe.dtype,
                                                                        cache_dir=cache_dir)}
    out = cls(components, pipe.scheduler, tokenizers=pipe.tokenizers, mesh=pipe.mesh, rules=pipe.rules,
              dtype=pipe.dtype, config=pipe.config, source=pipe.source)
    out.scheduler_config = dict(pipe.scheduler_config)
    out.safety_checker = pipe.safety_checker
    out.progress = pipe.progress
    return out


register_component_loader("MultiControlNetModel", load_multi_controlnet)
register_pipeline("StableDiffusionControlNetPipeline", StableDiffusionControlNetPipeline)
register_pipeline("StableDiffusionControlNetImg2ImgPipeline", StableDiffusionControlNetImg2ImgPipeline)
register_pipeline("StableDiffusionControlNetInpaintPipeline", StableDiffusionControlNetInpaintPipeline)
register_pipeline("StableDiffusionXLControlNetPipeline", StableDiffusionXLControlNetPipeline)
register_pipeline("StableDiffusionXLControlNetImg2ImgPipeline", StableDiffusionXLControlNetImg2ImgPipeline)
