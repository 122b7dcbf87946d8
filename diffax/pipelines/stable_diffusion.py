"""Stable Diffusion 1.x / 2.x: text-to-image, image-to-image and inpainting, each call one XLA program.

    pipe = diffax.pipelines.load("stable-diffusion-v1-5")
    out = pipe("a photo of an astronaut", seed=0, num_inference_steps=30, guidance_scale=7.5)
    img = diffax.pipelines.load("sd-folder-img2img")("a castle", image=photo, strength=0.6)
    inp = diffax.pipelines.load("sd-inpainting")("a cat on a bench", image=photo, mask_image=mask)

The arguments and their defaults are diffusers' (StableDiffusionPipeline, StableDiffusionImg2ImgPipeline,
StableDiffusionInpaintPipeline), with `seed` (an int, or one per image) instead of torch generators and NHWC
`latents`. Inside the program, as diffusers computes it: the CLIP text encoder (and the empty or negative
prompt for classifier-free guidance when guidance_scale > 1), the sampler's whole loop around the U-Net, the
VAE decode and the [-1, 1] -> [0, 1] postprocess.

img2img: the image is VAE-encoded (a posterior sample), scaled, and noised to the first step kept by
`strength`; the loop start is a traced input, so a new strength reuses the program. Inpainting: a 9-channel
U-Net (an inpainting checkpoint) gets the mask and the masked image's latents concatenated to its input; an
ordinary 4-channel U-Net gets latent blending after every step (the known region re-noised to the next
step's level), as diffusers does both.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffax.pipelines.base import (Pipeline, PipelineInputError, PipelineOutput, chain_hooks, check_output_type,
                                   noise_from_seeds, num_loop_steps, prompt_list, register_pipeline, row_keys,
                                   seeds_for, to_unit_range)
from diffax.pipelines.images import load_images, load_masks
from diffax.pipelines.text_encoding import encode_prompt, repeat_rows, tokenize_prompts
from diffax.sampling import loop_range, sample
from diffax.schedulers import DDIMScheduler


@dataclasses.dataclass(frozen=True)
class Static:
    """The choices a program is compiled for; everything else (prompts, seeds, scales, strength) is an input."""
    mode: str                 # 'txt2img', 'img2img' or 'inpaint'
    latent_size: tuple[int, int]
    steps: int
    guided: bool              # classifier-free guidance (guidance_scale > 1)
    rescaled: bool            # guidance_rescale > 0
    decode: bool              # False for output_type='latent'
    clip_skip: int | None
    vae_tiling: bool
    full_strength: bool       # inpainting with strength 1: start from pure noise
    progress: bool
    eta: float | None = None  # DDIM's eta for this call (None: the scheduler's own)


class StableDiffusionPipeline(Pipeline):
    """diffusers' StableDiffusionPipeline: text-to-image with a UNet2DConditionModel, AutoencoderKL and CLIP."""

    required_components = ("unet", "vae", "text_encoder")
    required_tokenizers = ("tokenizer",)
    mode = "txt2img"

    # -- sizes

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.module("vae").config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.module("vae").config.latent_channels

    def default_size(self) -> tuple[int, int]:
        """diffusers' default (height, width): the U-Net's sample_size times the VAE's scale factor."""
        size = self.module("unet").config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    def check_size(self, height: int, width: int) -> tuple[int, int]:
        """The latent (h, w) of an image size; PipelineInputError if the U-Net cannot take it."""
        unet_factor = 2 ** (len(self.module("unet").config.block_out_channels) - 1)
        factor = self.vae_scale_factor * unet_factor
        if height < factor or width < factor or height % factor or width % factor:
            raise PipelineInputError(f"height and width must be positive multiples of {factor} for this model "
                                     f"(VAE x{self.vae_scale_factor}, U-Net x{unet_factor}), got {height}x{width}")
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    # -- host inputs

    def text_rows(self, prompt: Any, negative_prompt: Any, prompt_embeds: Any, negative_prompt_embeds: Any,
                  num_images_per_prompt: int, guided: bool) -> tuple[dict[str, np.ndarray], int]:
        """({ids | prompt_embeds, negative_ids | negative_prompt_embeds}, number of prompts), one row per image."""
        if num_images_per_prompt < 1:
            raise PipelineInputError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        n = num_images_per_prompt
        tokenizer = self.tokenizers["tokenizer"]
        rows: dict[str, np.ndarray] = {}
        if prompt_embeds is not None:
            if prompt is not None:
                raise PipelineInputError("give prompt or prompt_embeds, not both")
            embeds = np.asarray(prompt_embeds, np.float32)
            if embeds.ndim != 3:
                raise PipelineInputError(f"prompt_embeds must be [B, L, D], got shape {embeds.shape}")
            num_prompts = embeds.shape[0]
            rows["prompt_embeds"] = repeat_rows(embeds, n)
        else:
            prompts = prompt_list(prompt)
            if prompts is None:
                raise PipelineInputError("give a prompt (or prompt_embeds)")
            num_prompts = len(prompts)
            rows["ids"] = tokenize_prompts(tokenizer, prompts, n)
        if guided:
            if negative_prompt_embeds is not None:
                if negative_prompt is not None:
                    raise PipelineInputError("give negative_prompt or negative_prompt_embeds, not both")
                neg = np.asarray(negative_prompt_embeds, np.float32)
                if neg.shape[0] != num_prompts or neg.ndim != 3:
                    raise PipelineInputError(f"negative_prompt_embeds must be [{num_prompts}, L, D], got {neg.shape}")
                rows["negative_prompt_embeds"] = repeat_rows(neg, n)
            else:
                negatives = [""] * num_prompts if negative_prompt is None else prompt_list(
                    negative_prompt, "negative_prompt")
                if len(negatives) == 1 and num_prompts > 1:
                    negatives = negatives * num_prompts
                if len(negatives) != num_prompts:
                    raise PipelineInputError(f"negative_prompt has {len(negatives)} entries for {num_prompts} "
                                             f"prompts")
                rows["negative_ids"] = tokenize_prompts(tokenizer, negatives, n)
        return rows, num_prompts

    def noise_rows(self, seed: Any, latents: Any, count: int, latent_size: tuple[int, int],
                   channels: int) -> dict[str, np.ndarray]:
        """{seeds [N] uint32, latents [N, h, w, C] when given}: each image's seed, or its given noise."""
        rows = {"seeds": seeds_for(seed, count)}
        if latents is not None:
            latents = np.asarray(latents, np.float32)
            want = (count, *latent_size, channels)
            if latents.shape != want:
                raise PipelineInputError(f"latents must be NHWC {list(want)}, got {list(latents.shape)}")
            rows["latents"] = latents
        return rows

    # -- traced pieces

    def encode_text(self, params: dict, rows: dict, static: Static) -> tuple[dict, dict | None]:
        """({'encoder_hidden_states': [N, L, D]}, the unconditional one or None) inside the program."""
        te = self.module("text_encoder")
        if "prompt_embeds" in rows:
            cond = rows["prompt_embeds"]
        else:
            cond = encode_prompt(te, params["text_encoder"], rows["ids"], clip_skip=static.clip_skip)
        if not static.guided:
            return {"encoder_hidden_states": cond}, None
        if "negative_prompt_embeds" in rows:
            uncond = rows["negative_prompt_embeds"]
        else:  # diffusers encodes the negative prompt without clip_skip
            uncond = encode_prompt(te, params["text_encoder"], rows["negative_ids"])
        return {"encoder_hidden_states": cond}, {"encoder_hidden_states": uncond.astype(cond.dtype)}

    def unet_fn(self, params: dict, extra: jax.Array | None = None):
        """denoise(x, t, **cond) over the U-Net; `extra` [N, h, w, c] (the inpainting mask and masked-image
        latents) is concatenated to the input channels, doubled under guidance."""
        unet = self.module("unet")

        def denoise(x: jax.Array, t: jax.Array, **cond: Any) -> jax.Array:
            if extra is not None:
                e = extra if extra.shape[0] == x.shape[0] else jnp.concatenate([extra, extra])
                x = jnp.concatenate([x, e.astype(x.dtype)], axis=-1)
            t = jnp.broadcast_to(t, (x.shape[0],))
            return unet.apply({"params": params["unet"]}, x, t, **cond).astype(jnp.float32)

        return denoise

    def encode_images(self, params: dict, images: jax.Array, keys: jax.Array) -> jax.Array:
        """Images [N, H, W, 3] in [0, 1] -> diffusion-space latents: a VAE posterior sample per row (its own
        key), scaled by the VAE config."""
        vae = self.module("vae")
        post = vae.apply({"params": params["vae"]}, images * 2.0 - 1.0, method="encode")
        eps = jax.vmap(lambda k, m: jax.random.normal(k, m.shape, m.dtype))(keys, post.mean)
        return vae.config.scale_latents(post.mean + post.std * eps).astype(jnp.float32)

    def decode_latents(self, params: dict, latents: jax.Array, tiled: bool) -> jax.Array:
        """Diffusion-space latents [N, h, w, C] -> images [N, H, W, 3] in [0, 1]."""
        vae = self.module("vae")
        z = vae.config.unscale_latents(latents)
        return to_unit_range(vae.apply({"params": params["vae"]}, z, tiled=tiled, method="decode"))

    def latent_setup(self, params: dict, rows: dict, static: Static, noise: jax.Array) -> dict[str, Any]:
        """Mode-specific inputs of `sample` (init_sample, after_step) and the U-Net's extra channels."""
        return {}

    def call_scheduler(self, eta: float | None) -> Any:
        """The scheduler of a call: with `eta` given, a DDIM scheduler with that eta (diffusers passes eta to
        schedulers whose step takes it, i.e. DDIM, and ignores it for the others)."""
        if eta is None or not isinstance(self.scheduler, DDIMScheduler):
            return self.scheduler
        if not 0.0 <= eta <= 1.0:
            raise PipelineInputError(f"eta must be in [0, 1], got {eta}")
        return dataclasses.replace(self.scheduler, eta=float(eta))

    def build(self, static: Static):
        """The program for `static`: (params, rows, scalars) -> images [N, H, W, 3] or latents [N, h, w, C]."""
        scheduler = self.call_scheduler(static.eta)
        progress = self.progress_hook(num_loop_steps(scheduler, static.steps)) if static.progress else None

        def program(params: dict, rows: dict, scalars: dict) -> jax.Array:
            cond, uncond = self.extra_conditioning(rows, static, *self.encode_text(params, rows, static))
            shape = (*static.latent_size, self.latent_channels)
            noise = rows["latents"] if "latents" in rows else noise_from_seeds(rows["seeds"], shape)
            setup = self.latent_setup(params, rows, static, noise)
            denoise = self.wrap_denoiser(self.unet_fn(params, setup.get("extra")), params, scalars, static)
            x = sample(scheduler, denoise, noise,
                       num_inference_steps=static.steps, key=row_keys(rows["seeds"], 2),
                       cond=cond, uncond=uncond,
                       guidance_scale=scalars["guidance_scale"] if static.guided else None,
                       guidance_rescale=scalars["guidance_rescale"] if static.rescaled else 0.0,
                       init_sample=setup.get("init_sample"), start_index=scalars.get("start"),
                       pass_step_index=self.pass_step_index,
                       after_step=chain_hooks(setup.get("after_step"), progress))
            return self.decode_latents(params, x, static.vae_tiling) if static.decode else x

        return program

    def generate(self, static: Static, rows: dict[str, np.ndarray], scalars: dict[str, Any],
                 output_type: str) -> PipelineOutput:
        """Runs the program for `static` and finishes the output (safety checker, PIL)."""
        out = self.run_program(static, lambda: self.build(static), rows, scalars)
        return self.finish(out, output_type)

    def static_choices(self, *, height: int | None, width: int | None, num_inference_steps: int,
                       guidance_scale: float, guidance_rescale: float, output_type: str, clip_skip: int | None,
                       vae_tiling: bool, full_strength: bool = True, eta: float | None = None) -> Static:
        check_output_type(output_type)
        if num_inference_steps < 1:
            raise PipelineInputError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if clip_skip is not None and not 0 <= clip_skip < self.module("text_encoder").config.num_hidden_layers:
            raise PipelineInputError(f"clip_skip must be in [0, num_hidden_layers), got {clip_skip}")
        if guidance_rescale < 0:
            raise PipelineInputError(f"guidance_rescale must be >= 0, got {guidance_rescale}")
        default_h, default_w = self.default_size()
        latent_size = self.check_size(height or default_h, width or default_w)
        # diffusers: guidance only above 1 (and never for a U-Net with a guidance embedding, which SD lacks).
        guided = guidance_scale > 1.0
        self.call_scheduler(eta)  # checks eta
        eta = None if eta is None or not isinstance(self.scheduler, DDIMScheduler) else float(eta)
        return Static(self.mode, latent_size, int(num_inference_steps), guided, guided and guidance_rescale > 0,
                      output_type != "latent", clip_skip, bool(vae_tiling), full_strength, self.progress is not None,
                      eta)

    def __call__(self, prompt: str | Sequence[str] | None = None, negative_prompt: str | Sequence[str] | None = None,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, guidance_rescale: float = 0.0, num_images_per_prompt: int = 1,
                 seed: int | Sequence[int] = 0, latents: Any = None, output_type: str = "np",
                 clip_skip: int | None = None, prompt_embeds: Any = None, negative_prompt_embeds: Any = None,
                 vae_tiling: bool = False, eta: float | None = None) -> PipelineOutput:
        """Text to image. Returns `PipelineOutput(images, nsfw_content_detected)`.

        prompt / negative_prompt: a string or one per prompt; num_images_per_prompt images each (rows in
            prompt order). prompt_embeds / negative_prompt_embeds [P, L, D] replace them.
        height, width: default the U-Net's sample_size times the VAE's scale factor.
        guidance_scale: classifier-free guidance above 1 (two U-Net rows per image), none at or below.
        guidance_rescale: Lin et al.'s rescale (0 off). clip_skip: condition on an earlier CLIP layer.
        seed: image k uses seed + k (an int) or seed[k]; latents: NHWC [N, h, w, C] standard-normal
            starting noise instead (N = prompts x num_images_per_prompt).
        output_type: 'np' (float32 [N, H, W, 3] in [0, 1]), 'pil' or 'latent' (NHWC, no VAE decode).
        vae_tiling: decode in overlapping tiles (large images with bounded memory).
        eta: DDIM's eta for this call (0 deterministic, 1 DDPM-like noise); None keeps the scheduler's own;
            ignored by other samplers, as in diffusers.
        """
        static = self.static_choices(height=height, width=width, num_inference_steps=num_inference_steps,
                                     guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                                     output_type=output_type, clip_skip=clip_skip, vae_tiling=vae_tiling,
                                     eta=eta)
        rows, num_prompts = self.text_rows(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                           num_images_per_prompt, static.guided)
        count = num_prompts * num_images_per_prompt
        rows.update(self.noise_rows(seed, latents, count, static.latent_size, self.latent_channels))
        scalars = {"guidance_scale": np.float32(guidance_scale), "guidance_rescale": np.float32(guidance_rescale)}
        return self.generate(static, rows, scalars, output_type)


class StableDiffusionImg2ImgPipeline(StableDiffusionPipeline):
    """diffusers' StableDiffusionImg2ImgPipeline: the image, VAE-encoded and noised to `strength`, is the start."""

    mode = "img2img"

    def start_index(self, num_inference_steps: int, strength: float, latent_size: tuple[int, int]) -> np.int32:
        """The first loop index `strength` keeps (diffusers' get_timesteps), computed on the host."""
        if not 0.0 <= strength <= 1.0:
            raise PipelineInputError(f"strength must be in [0, 1], got {strength}")
        state = self.scheduler.init(num_inference_steps,
                                    jax.ShapeDtypeStruct((1, *latent_size, self.latent_channels), jnp.float32))
        try:
            start, _ = loop_range(self.scheduler, state, num_inference_steps, strength=max(strength, 1e-9))
        except ValueError:
            raise PipelineInputError(f"strength={strength} with num_inference_steps={num_inference_steps} "
                                     f"leaves no denoising step; raise either") from None
        return np.int32(start)

    def latent_setup(self, params: dict, rows: dict, static: Static, noise: jax.Array) -> dict[str, Any]:
        return {"init_sample": self.encode_images(params, rows["image"], row_keys(rows["seeds"], 1))}

    def image_rows(self, image: Any, count: int, height: int | None, width: int | None) -> np.ndarray:
        """The init images [count, H, W, 3] in [0, 1], repeated (tiled) to one per output row like diffusers."""
        images = load_images(image, height, width, multiple=self.vae_scale_factor)
        if count % images.shape[0]:
            raise PipelineInputError(f"image: {images.shape[0]} images do not divide into {count} outputs")
        return np.concatenate([images] * (count // images.shape[0]))

    def __call__(self, prompt: str | Sequence[str] | None = None, image: Any = None, strength: float = 0.8,
                 negative_prompt: str | Sequence[str] | None = None, height: int | None = None,
                 width: int | None = None, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 guidance_rescale: float = 0.0, num_images_per_prompt: int = 1, seed: int | Sequence[int] = 0,
                 latents: Any = None, output_type: str = "np", clip_skip: int | None = None,
                 prompt_embeds: Any = None, negative_prompt_embeds: Any = None,
                 vae_tiling: bool = False, eta: float | None = None) -> PipelineOutput:
        """Image to image: `image` (PIL, a list of them, or float [N, H, W, 3] / [H, W, 3] in [0, 1]) is
        encoded and noised to the level `strength` selects (1: all steps, pure noise at the end of the
        schedule; 0.5: the second half). height / width resize it (default: its own size, rounded down to
        the VAE's factor). latents: the NHWC noise added to it. Other arguments as the text-to-image call."""
        if image is None:
            raise PipelineInputError("image: img2img needs an init image")
        first = load_images(image, height, width, multiple=self.vae_scale_factor)
        height, width = first.shape[1:3]
        static = self.static_choices(height=height, width=width, num_inference_steps=num_inference_steps,
                                     guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                                     output_type=output_type, clip_skip=clip_skip, vae_tiling=vae_tiling,
                                     eta=eta)
        rows, num_prompts = self.text_rows(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                           num_images_per_prompt, static.guided)
        count = num_prompts * num_images_per_prompt
        rows.update(self.noise_rows(seed, latents, count, static.latent_size, self.latent_channels))
        rows["image"] = self.image_rows(first, count, None, None)
        scalars = {"guidance_scale": np.float32(guidance_scale), "guidance_rescale": np.float32(guidance_rescale),
                   "start": self.start_index(num_inference_steps, strength, static.latent_size)}
        return self.generate(static, rows, scalars, output_type)


class StableDiffusionInpaintPipeline(StableDiffusionImg2ImgPipeline):
    """diffusers' StableDiffusionInpaintPipeline: repaint where `mask_image` is white (>= 0.5), keep the rest."""

    mode = "inpaint"

    @property
    def nine_channel(self) -> bool:
        return self.module("unet").config.in_channels != self.latent_channels

    def latent_setup(self, params: dict, rows: dict, static: Static, noise: jax.Array) -> dict[str, Any]:
        image, mask = rows["image"], rows["mask"]  # [N, H, W, 3] in [0, 1], [N, H, W, 1] in {0, 1}
        f = self.vae_scale_factor
        # diffusers resizes the mask with nearest interpolation: pixel (f*i, f*j) of each latent cell.
        mask_latent = mask[:, ::f, ::f, :].astype(jnp.float32)  # [N, h, w, 1]
        setup: dict[str, Any] = {}
        image_latents = None
        if not self.nine_channel or not static.full_strength:
            image_latents = self.encode_images(params, image, row_keys(rows["seeds"], 1))
        if not static.full_strength:
            setup["init_sample"] = image_latents
        if self.nine_channel:
            # The masked image is normalized before masking: masked pixels are 0 in [-1, 1], i.e. mid-grey.
            masked = jnp.where(mask < 0.5, image, 0.5)
            setup["extra"] = jnp.concatenate(
                [mask_latent, self.encode_images(params, masked, row_keys(rows["seeds"], 3))], axis=-1)
        else:
            scheduler = self.scheduler
            stop = num_loop_steps(scheduler, static.steps)  # the last loop index + 1 (no denoising_end here)

            def blend(x: jax.Array, i: jax.Array, state: Any) -> jax.Array:
                # The known region at the next step's noise level (clean after the last step).
                nxt = jnp.minimum(i + 1, stop - 1)
                renoised = scheduler.add_noise(state, image_latents, noise, nxt)
                proper = jnp.where(i < stop - 1, renoised, image_latents)
                return (1 - mask_latent) * proper + mask_latent * x

            setup["after_step"] = blend
        return setup

    def __call__(self, prompt: str | Sequence[str] | None = None, image: Any = None, mask_image: Any = None,
                 strength: float = 1.0, negative_prompt: str | Sequence[str] | None = None,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, guidance_rescale: float = 0.0, num_images_per_prompt: int = 1,
                 seed: int | Sequence[int] = 0, latents: Any = None, output_type: str = "np",
                 clip_skip: int | None = None, prompt_embeds: Any = None, negative_prompt_embeds: Any = None,
                 vae_tiling: bool = False, eta: float | None = None) -> PipelineOutput:
        """Inpainting: `image` as in img2img, `mask_image` (PIL, float [N, H, W(, 1)] or [H, W]; >= 0.5
        repaints) resized alike. height / width default to the U-Net's size, as diffusers'. strength 1 starts
        from pure noise (`latents` is that noise); below 1 from the noised image."""
        if image is None or mask_image is None:
            raise PipelineInputError("inpainting needs image and mask_image")
        default_h, default_w = self.default_size()
        height, width = height or default_h, width or default_w
        static = self.static_choices(height=height, width=width, num_inference_steps=num_inference_steps,
                                     guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                                     output_type=output_type, clip_skip=clip_skip, vae_tiling=vae_tiling,
                                     full_strength=strength == 1.0, eta=eta)
        unet_channels = self.module("unet").config.in_channels
        if unet_channels not in (self.latent_channels, 2 * self.latent_channels + 1):
            raise PipelineInputError(f"the U-Net takes {unet_channels} channels: an inpainting U-Net takes "
                                     f"{2 * self.latent_channels + 1}, an ordinary one {self.latent_channels}")
        rows, num_prompts = self.text_rows(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                           num_images_per_prompt, static.guided)
        count = num_prompts * num_images_per_prompt
        rows.update(self.noise_rows(seed, latents, count, static.latent_size, self.latent_channels))
        rows["image"] = self.image_rows(image, count, height, width)
        masks = load_masks(mask_image, height, width)
        if count % masks.shape[0]:
            raise PipelineInputError(f"mask_image: {masks.shape[0]} masks do not divide into {count} outputs")
        rows["mask"] = np.concatenate([masks] * (count // masks.shape[0]))
        scalars = {"guidance_scale": np.float32(guidance_scale), "guidance_rescale": np.float32(guidance_rescale),
                   "start": self.start_index(num_inference_steps, strength, static.latent_size)}
        return self.generate(static, rows, scalars, output_type)


register_pipeline("StableDiffusionPipeline", StableDiffusionPipeline)
register_pipeline("StableDiffusionImg2ImgPipeline", StableDiffusionImg2ImgPipeline)
register_pipeline("StableDiffusionInpaintPipeline", StableDiffusionInpaintPipeline)
