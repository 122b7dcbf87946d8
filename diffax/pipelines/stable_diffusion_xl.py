"""Stable Diffusion XL: the text-to-image pipeline, the refiner / image-to-image pipeline, and SDXL's
conditioning: the prompt pair of two CLIP encoders and the micro-conditioning ids.

    base = diffax.pipelines.load("stable-diffusion-xl-base-1.0")         # StableDiffusionXLPipeline
    refiner = diffax.pipelines.load("stable-diffusion-xl-refiner-1.0")   # StableDiffusionXLImg2ImgPipeline
    latents = base("a lion", num_inference_steps=40, denoising_end=0.8, output_type="latent").images
    images = refiner("a lion", image=latents, num_inference_steps=40, denoising_start=0.8).images

Each call is one jitted program (text encoding, every denoising step under guidance, the VAE decode) with
the batch split over the devices; prompts, seeds, guidance scale, time ids and img2img strength are its
inputs, so changing them reuses the compiled program.

Prompts (Podell et al. 2023, section 2.1). The base model reads two text encoders: CLIP ViT-L
(`text_encoder`, a CLIPTextModel) and OpenCLIP ViT-bigG (`text_encoder_2`, a CLIPTextModelWithProjection).
Each encoder's penultimate hidden states (or, with `clip_skip=k`, the states k layers before that) are
concatenated along the feature axis into the cross-attention context [B, 77, 768 + 1280], and the second
encoder's projected end-of-text state is the pooled `text_embeds` [B, 1280]. The refiner has
`text_encoder_2` alone, which reads `prompt` (as in diffusers, `prompt_2` goes unused there). An absent
negative prompt is a zero context and zero pooled vector when the pipeline's `force_zeros_for_empty_prompt`
is set (the base model's config), else the encoded empty prompt.

Micro-conditioning (section 2.2). The U-Net also reads `time_ids`, six numbers for the base model,
(original_size, crops_coords_top_left, target_size), and five for the refiner, which replaces the target size
with an aesthetic score (`requires_aesthetics_score` in model_index.json). Each id becomes an
`addition_time_embed_dim` sinusoid inside the U-Net. The ids are host arrays handed to the one compiled
program, so new sizes or scores run the same program.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffax.pipelines.base import (Pipeline, PipelineInputError, PipelineOutput, chain_hooks, check_output_type,
                                   noise_from_seeds, num_loop_steps, register_pipeline, row_keys, seeds_for,
                                   to_unit_range)
from diffax.pipelines.images import load_images, load_masks
from diffax.pipelines.text_encoding import encode_prompt_sdxl, tokenize_prompts
from diffax.sampling import loop_range, sample

Params = Any


# ----------------------------------------------------------------------------- micro-conditioning


def _pair(value: Sequence[int | float], name: str) -> tuple[float, float]:
    values = tuple(value)
    if len(values) != 2:
        raise PipelineInputError(f"{name} must be a pair (height, width) or (top, left), got {value!r}")
    return float(values[0]), float(values[1])


def time_ids(*, original_size: Sequence[int], crops_coords_top_left: Sequence[int] = (0, 0),
             target_size: Sequence[int] | None = None, aesthetic_score: float | None = None) -> np.ndarray:
    """One image's micro-conditioning ids, float32: [6] = original_size + crops_coords_top_left + target_size
    (the base model), or with `aesthetic_score` (a refiner) [5] = original_size + crops_coords_top_left +
    (aesthetic_score,)."""
    ids = _pair(original_size, "original_size") + _pair(crops_coords_top_left, "crops_coords_top_left")
    if aesthetic_score is not None:
        return np.asarray(ids + (float(aesthetic_score),), np.float32)
    if target_size is None:
        raise PipelineInputError("time_ids needs target_size (or aesthetic_score for a refiner)")
    return np.asarray(ids + _pair(target_size, "target_size"), np.float32)


def check_time_ids_width(unet_config: Any, num_ids: int, text_embeds_dim: int,
                         requires_aesthetics_score: bool) -> None:
    """ValueError unless `num_ids` sinusoids of `addition_time_embed_dim` and the pooled text embedding fill
    the U-Net's `projection_class_embeddings_input_dim`; names the model_index.json switch when the ids are
    one short or one too many (a refiner loaded as a base model, or the reverse)."""
    width = unet_config.addition_time_embed_dim
    expected = unet_config.projection_class_embeddings_input_dim
    passed = num_ids * width + text_embeds_dim
    if passed == expected:
        return
    flag = "requires_aesthetics_score"
    if passed - expected == width and not requires_aesthetics_score:
        hint = f"; the U-Net takes 5 ids (a refiner's): set {flag}=true in model_index.json"
    elif expected - passed == width and requires_aesthetics_score:
        hint = f"; the U-Net takes 6 ids (a base model's): set {flag}=false in model_index.json"
    else:
        hint = "; check unet/config.json addition_time_embed_dim and text_encoder_2's projection_dim"
    raise ValueError(f"unet/config.json: projection_class_embeddings_input_dim={expected}, but {num_ids} time ids "
                     f"x addition_time_embed_dim={width} + text_embeds {text_embeds_dim} = {passed}{hint}")


# ----------------------------------------------------------------------------- prompts


def as_prompt_list(prompt: str | Sequence[str], name: str = "prompt") -> list[str]:
    """`prompt` as a non-empty list of strings; PipelineInputError naming the argument otherwise."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else []
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise PipelineInputError(f"{name} must be a string or a non-empty list of strings, got {prompt!r}")
    return prompts


def match_prompts(prompts: str | Sequence[str] | None, fallback: list[str], name: str) -> list[str]:
    """`prompts` (a string for every row, or one string per row) as a list of fallback's length; falsy
    `prompts` take `fallback`, as diffusers' `prompt_2 = prompt_2 or prompt`."""
    if not prompts:
        return list(fallback)
    if isinstance(prompts, str):
        return [prompts] * len(fallback)
    out = as_prompt_list(prompts, name)
    if len(out) != len(fallback):
        raise PipelineInputError(f"{name} has {len(out)} prompts, but prompt has {len(fallback)}")
    return out


def tokenize_pair(tokenizers: Sequence[Any], prompts: list[str], prompts_2: list[str],
                  num_images_per_prompt: int = 1) -> list[np.ndarray]:
    """[B * num_images_per_prompt, 77] int32 token ids for each text encoder, each prompt's row repeated per
    image: `prompts` for the first encoder and `prompts_2` for the second. A single encoder (the refiner's
    text_encoder_2) reads `prompts`: diffusers pairs the prompts with the encoders present in order, so a
    refiner never reads prompt_2."""
    pairs = zip(tokenizers, [prompts, prompts_2])
    return [tokenize_prompts(tokenizer, texts, num_images_per_prompt) for tokenizer, texts in pairs]


# ----------------------------------------------------------------------------- pipelines

# Random streams of an image's seed besides its starting noise (stream 0), as the Stable Diffusion pipelines.
_POSTERIOR_STREAM, _SAMPLER_STREAM, _MASKED_POSTERIOR_STREAM = 1, 2, 3


@dataclasses.dataclass(frozen=True)
class Static:
    """The choices a program is compiled for; prompts, seeds, time ids, scales and strength are inputs."""
    mode: str                            # 'txt2img', 'img2img' or 'inpaint'
    latent_shape: tuple[int, int, int]   # (h, w, C)
    steps: int
    sources: tuple[str, str | None]      # prompt / negative prompt: 'text', 'embeds', 'zeros' or None
    clip_skip: int | None
    guided: bool                         # classifier-free guidance (guidance_scale > 1)
    rescaled: bool                       # guidance_rescale > 0
    image_is_latents: bool               # img2img: `image` is latents (a base model's output_type='latent')
    denoising_start: float | None
    denoising_end: float | None
    decode: bool                         # False for output_type='latent'
    vae_tiling: bool
    progress: bool
    full_strength: bool = False          # inpainting with strength 1: start from pure noise


def _repeat(x: Any, n: int, name: str, ndim: int) -> np.ndarray:
    """Host array x [B, ...] (of `ndim` dims) with each row repeated n times in place."""
    x = np.asarray(x, np.float32)
    if x.ndim != ndim:
        raise PipelineInputError(f"{name} must have {ndim} dims, got shape {list(x.shape)}")
    return np.repeat(x, n, axis=0)


class _StableDiffusionXLCommon(Pipeline):
    """What the SDXL base and refiner share: prompts through one or two CLIP encoders, time ids, the U-Net
    under guidance, the VAE, and the one program."""

    required_components = ("unet", "vae", "text_encoder_2")
    required_tokenizers = ("tokenizer_2",)

    def __init__(self, components: Any, scheduler: Any, **kwargs: Any):
        super().__init__(components, scheduler, **kwargs)
        where = self.source or type(self).__name__
        if self.has("text_encoder") and "tokenizer" not in self.tokenizers:
            raise ValueError(f"{where}: text_encoder has no tokenizer")
        unet = self.module("unet").config
        if unet.addition_embed_type != "text_time":
            raise ValueError(f"{where}: unet/config.json addition_embed_type is {unet.addition_embed_type!r}, "
                             f"not 'text_time' (an SDXL U-Net)")

    # -- configuration

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.module("vae").config.block_out_channels) - 1)

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        """model_index.json's switch: no negative prompt is a zero conditioning. Without the key (a
        single-file checkpoint) as the released configs: on for a base model, off for a refiner."""
        if "force_zeros_for_empty_prompt" in self.config:
            return bool(self.config["force_zeros_for_empty_prompt"])
        return not self.requires_aesthetics_score

    @property
    def requires_aesthetics_score(self) -> bool:
        """model_index.json's switch (a refiner): time ids carry an aesthetic score instead of target_size.
        Without the key (a single-file checkpoint): whether the U-Net's added embedding fits 5 ids."""
        if "requires_aesthetics_score" in self.config:
            return bool(self.config["requires_aesthetics_score"])
        unet = self.module("unet").config
        text = self.module("text_encoder_2").config.projection_dim
        return unet.projection_class_embeddings_input_dim == 5 * unet.addition_time_embed_dim + text

    def default_size(self) -> tuple[int, int]:
        """(height, width) in pixels: the U-Net's sample_size (diffusers' 128 when null) times the VAE's factor."""
        size = self.module("unet").config.sample_size or 128
        h, w = (size, size) if isinstance(size, int) else size
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    def encoder_names(self) -> list[str]:
        """The text encoders present: ['text_encoder', 'text_encoder_2'] (base) or ['text_encoder_2']."""
        return [name for name in ("text_encoder", "text_encoder_2") if self.has(name)]

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(h, w, C) of an image size; PipelineInputError unless the VAE and the U-Net divide it evenly."""
        s = self.vae_scale_factor
        f = s * 2 ** (len(self.module("unet").config.block_out_channels) - 1)
        if height < 1 or width < 1 or height % f or width % f:
            raise PipelineInputError(f"height and width must be positive multiples of {f} for this model "
                                     f"(the VAE's factor {s} times the U-Net's), got {height}x{width}")
        return height // s, width // s, self.module("vae").config.latent_channels

    # -- host inputs

    def prompt_rows(self, prompt: Any, prompt_2: Any, negative_prompt: Any, negative_prompt_2: Any,
                    prompt_embeds: Any, negative_prompt_embeds: Any, pooled_prompt_embeds: Any,
                    negative_pooled_prompt_embeds: Any, num_images_per_prompt: int,
                    guided: bool) -> tuple[dict[str, np.ndarray], tuple[str, str | None], int]:
        """(rows, (positive source, negative source), number of prompts). Sources: 'text' (token ids per
        encoder in `ids_i` / `negative_ids_i`), 'embeds' (given arrays), 'zeros' (no negative prompt under
        `force_zeros_for_empty_prompt`), None (no guidance). Rows are repeated per image."""
        n = num_images_per_prompt
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise PipelineInputError(f"num_images_per_prompt must be a positive int, got {n!r}")
        tokenizers = [self.tokenizers["tokenizer" if name == "text_encoder" else "tokenizer_2"]
                      for name in self.encoder_names()]
        rows: dict[str, np.ndarray] = {}
        if prompt_embeds is not None:
            if prompt is not None or prompt_2 is not None:
                raise PipelineInputError("give prompt (and prompt_2) or prompt_embeds, not both")
            if pooled_prompt_embeds is None:
                raise PipelineInputError("prompt_embeds needs pooled_prompt_embeds (text_encoder_2's text_embeds)")
            rows["prompt_embeds"] = _repeat(prompt_embeds, n, "prompt_embeds", 3)
            rows["pooled_prompt_embeds"] = _repeat(pooled_prompt_embeds, n, "pooled_prompt_embeds", 2)
            batch, positive = len(prompt_embeds), "embeds"
        else:
            if prompt is None:
                raise PipelineInputError("give a prompt (or prompt_embeds)")
            prompts = as_prompt_list(prompt)
            ids = tokenize_pair(tokenizers, prompts, match_prompts(prompt_2, prompts, "prompt_2"), n)
            rows.update({f"ids_{i}": x for i, x in enumerate(ids)})
            batch, positive = len(prompts), "text"
        if not guided:
            return rows, (positive, None), batch
        if negative_prompt_embeds is not None:
            if negative_pooled_prompt_embeds is None:
                raise PipelineInputError("negative_prompt_embeds needs negative_pooled_prompt_embeds")
            rows["negative_prompt_embeds"] = _repeat(negative_prompt_embeds, n, "negative_prompt_embeds", 3)
            rows["negative_pooled_prompt_embeds"] = _repeat(negative_pooled_prompt_embeds, n,
                                                            "negative_pooled_prompt_embeds", 2)
            negative = "embeds"
        elif negative_prompt is None and self.force_zeros_for_empty_prompt:
            negative = "zeros"
        else:
            negatives = match_prompts(negative_prompt, [""] * batch, "negative_prompt")
            negatives_2 = match_prompts(negative_prompt_2, negatives, "negative_prompt_2")
            ids = tokenize_pair(tokenizers, negatives, negatives_2, n)
            rows.update({f"negative_ids_{i}": x for i, x in enumerate(ids)})
            negative = "text"
        return rows, (positive, negative), batch

    def noise_rows(self, seed: Any, latents: Any, count: int, shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
        """{seeds [N] uint32, latents [N, h, w, C] when given}: each image's seed, or its given noise."""
        rows = {"seeds": seeds_for(seed, count)}
        if latents is not None:
            latents = np.asarray(latents, np.float32)
            if latents.shape != (count, *shape):
                raise PipelineInputError(f"latents must be NHWC {[count, *shape]} for {count} images, got "
                                         f"{list(latents.shape)}")
            rows["latents"] = latents
        return rows

    def time_id_rows(self, count: int, **ids: Any) -> np.ndarray:
        """[count, k] float32 rows of one image's time ids, their number checked against the U-Net."""
        row = time_ids(**ids)
        check_time_ids_width(self.module("unet").config, len(row), self.module("text_encoder_2").config.projection_dim,
                             self.requires_aesthetics_score)
        return np.tile(row, (count, 1))

    def guidance(self, guidance_scale: float, guidance_rescale: float) -> tuple[bool, bool]:
        """(guided, rescaled): classifier-free guidance when guidance_scale > 1, as diffusers."""
        for name, value in (("guidance_scale", guidance_scale), ("guidance_rescale", guidance_rescale)):
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not np.isfinite(value):
                raise PipelineInputError(f"{name} must be a finite number, got {value!r}")
        guided = guidance_scale > 1.0
        return guided, guided and guidance_rescale > 0.0

    def check_clip_skip(self, clip_skip: Any) -> None:
        """clip_skip k reads hidden state -(k + 2): every text encoder needs k + 1 layers."""
        if clip_skip is None:
            return
        layers = min(self.module(name).config.num_hidden_layers for name in self.encoder_names())
        if not isinstance(clip_skip, int) or isinstance(clip_skip, bool) or not 0 <= clip_skip < layers:
            raise PipelineInputError(f"clip_skip must be None or an int in [0, {layers - 1}] (the text encoders "
                                     f"have {layers} layers), got {clip_skip!r}")

    def loop_bounds(self, num_inference_steps: int, shape: tuple[int, int, int], **fractions: Any) -> tuple[int, int]:
        """[start, stop) loop indices (`loop_range`) on the host, where strength / denoising_start /
        denoising_end and the step count are checked readably."""
        steps = num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise PipelineInputError(f"num_inference_steps must be a positive int, got {steps!r}")
        state = self.scheduler.init(int(steps), jax.ShapeDtypeStruct((1, *shape), jnp.float32))
        try:
            return loop_range(self.scheduler, state, int(steps), **fractions)
        except ValueError as e:
            raise PipelineInputError(str(e)) from None

    # -- inside the program

    def conditioning(self, params: dict[str, Params], rows: dict[str, jax.Array],
                     static: Static) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(cond, uncond) keyword inputs of the U-Net: encoder_hidden_states and added_cond_kwargs
        {text_embeds, time_ids}; uncond None without guidance."""
        encoders = [(self.module(name), params[name]) for name in self.encoder_names()]

        def side(prefix: str, source: str, clip_skip: int | None) -> tuple[jax.Array, jax.Array]:
            if source == "text":
                ids = [rows[f"{prefix}ids_{i}"] for i in range(len(encoders))]
                return encode_prompt_sdxl(encoders, ids, clip_skip=clip_skip)
            return rows[f"{prefix}prompt_embeds"], rows[f"{prefix}pooled_prompt_embeds"]

        positive, negative = static.sources
        context, pooled = side("", positive, static.clip_skip)
        cond = {"encoder_hidden_states": context,
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": rows["time_ids"]}}
        if negative is None:
            return cond, None
        if negative == "zeros":
            negative_context, negative_pooled = jnp.zeros_like(context), jnp.zeros_like(pooled)
        else:  # diffusers encodes negative prompts without clip_skip
            negative_context, negative_pooled = side("negative_", negative, None)
        uncond = {"encoder_hidden_states": negative_context.astype(context.dtype),
                  "added_cond_kwargs": {"text_embeds": negative_pooled.astype(pooled.dtype),
                                        "time_ids": rows["negative_time_ids"]}}
        return cond, uncond

    def denoiser(self, params: Params, extra: jax.Array | None = None) -> Any:
        """denoise(x, t, **cond) over the U-Net, for `sampling.sample`; `extra` [N, h, w, c] (an inpainting
        U-Net's mask and masked-image latents) is concatenated to its input channels, doubled under guidance."""
        unet = self.module("unet")

        def denoise(x: jax.Array, t: jax.Array, **cond: Any) -> jax.Array:
            if extra is not None:
                e = extra if extra.shape[0] == x.shape[0] else jnp.concatenate([extra, extra])
                x = jnp.concatenate([x, e.astype(x.dtype)], axis=-1)
            t = jnp.broadcast_to(t, (x.shape[0],))
            return unet.apply({"params": params}, x, t, **cond).astype(jnp.float32)

        return denoise

    def encode_images(self, params: Params, images: jax.Array, keys: jax.Array) -> jax.Array:
        """Images [N, H, W, 3] in [0, 1] -> diffusion-space latents: a VAE posterior sample per row (its own
        key), scaled by the VAE config (latents_mean / latents_std when both are set, as diffusers' SDXL)."""
        vae = self.module("vae")
        posterior = vae.apply({"params": params}, images * 2.0 - 1.0, method="encode")
        eps = jax.vmap(lambda k, m: jax.random.normal(k, m.shape, m.dtype))(keys, posterior.mean)
        return vae.config.scale_latents(posterior.mean + posterior.std * eps).astype(jnp.float32)

    def decode(self, params: Params, latents: jax.Array, tiled: bool) -> jax.Array:
        """Diffusion-space latents [N, h, w, C] -> float32 images [N, H, W, 3] in [0, 1]. The VAE computes
        in float32 when its config sets `force_upcast` and the pipeline runs in float16, as diffusers upcasts."""
        vae = self.module("vae")
        images = vae.apply({"params": params}, vae.config.unscale_latents(latents), tiled=tiled, method="decode")
        return to_unit_range(images)

    def build(self, static: Static):
        """The program for `static`: (params, rows, scalars) -> images [N, H, W, 3] or latents [N, h, w, C]."""
        scheduler = self.scheduler
        progress = self.progress_hook(num_loop_steps(scheduler, static.steps)) if static.progress else None

        def program(params: dict, rows: dict, scalars: dict) -> jax.Array:
            cond, uncond = self.extra_conditioning(rows, static, *self.conditioning(params, rows, static))
            noise = rows["latents"] if "latents" in rows else noise_from_seeds(rows["seeds"], static.latent_shape)
            setup = self.latent_setup(params, rows, static, noise)
            # denoising_start (a static choice) fixes the start itself; strength is a traced input.
            start = scalars.get("start") if static.denoising_start is None else None
            denoise = self.wrap_denoiser(self.denoiser(params["unet"], setup.get("extra")), params, scalars, static)
            x = sample(scheduler, denoise, noise,
                       num_inference_steps=static.steps, key=row_keys(rows["seeds"], _SAMPLER_STREAM),
                       cond=cond, uncond=uncond, guidance_scale=scalars["guidance_scale"] if static.guided else None,
                       guidance_rescale=scalars["guidance_rescale"] if static.rescaled else 0.0,
                       init_sample=setup.get("init_sample"), start_index=start,
                       denoising_start=static.denoising_start, denoising_end=static.denoising_end,
                       pass_step_index=self.pass_step_index,
                       after_step=chain_hooks(setup.get("after_step"), progress))
            return self.decode(params["vae"], x, static.vae_tiling) if static.decode else x.astype(jnp.float32)

        return program

    def latent_setup(self, params: dict, rows: dict, static: Static, noise: jax.Array) -> dict[str, Any]:
        """The mode's inputs of `sample` (init_sample, after_step) and the U-Net's extra channels."""
        return {}

    def generate(self, static: Static, rows: dict[str, np.ndarray], scalars: dict[str, Any],
                 output_type: str) -> PipelineOutput:
        """Runs the program for `static` (compiled once per static choice) and finishes the output."""
        return self.finish(self.run_program(static, lambda: self.build(static), rows, scalars), output_type)


class StableDiffusionXLPipeline(_StableDiffusionXLCommon):
    """SDXL text-to-image (diffusers' `StableDiffusionXLPipeline`): two text encoders, micro-conditioning,
    and `denoising_end` to hand noisy latents to a refiner (`output_type="latent"`)."""

    def __call__(self, prompt: str | Sequence[str] | None = None, prompt_2: str | Sequence[str] | None = None, *,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = 50,
                 denoising_end: float | None = None, guidance_scale: float = 5.0,
                 negative_prompt: str | Sequence[str] | None = None,
                 negative_prompt_2: str | Sequence[str] | None = None, num_images_per_prompt: int = 1,
                 seed: int | Sequence[int] = 0, latents: Any = None, prompt_embeds: Any = None,
                 negative_prompt_embeds: Any = None, pooled_prompt_embeds: Any = None,
                 negative_pooled_prompt_embeds: Any = None, output_type: str = "np",
                 guidance_rescale: float = 0.0, original_size: Sequence[int] | None = None,
                 crops_coords_top_left: Sequence[int] = (0, 0), target_size: Sequence[int] | None = None,
                 negative_original_size: Sequence[int] | None = None,
                 negative_crops_coords_top_left: Sequence[int] = (0, 0),
                 negative_target_size: Sequence[int] | None = None, clip_skip: int | None = None,
                 vae_tiling: bool = False) -> PipelineOutput:
        """Images for `prompt`, with diffusers' argument names.

        prompt / prompt_2: for text_encoder / text_encoder_2 (prompt_2 defaults to prompt); negative_prompt /
          negative_prompt_2 likewise. Without a negative prompt, `force_zeros_for_empty_prompt`
          (model_index.json) makes the unconditional side zeros, as diffusers.
        height, width: pixels (default the U-Net's sample_size times the VAE's factor).
        seed: image k uses `seed + k` (an int) or `seed[k]` (a list); `latents`, NHWC [N, h, w, 4] standard
          normal noise (diffusers' `latents` transposed), overrides it.
        denoising_end: stop after this fraction of the schedule (the base of the base + refiner ensemble;
          with output_type='latent' the result is the refiner's `image`).
        original_size, crops_coords_top_left, target_size: the micro-conditioning, default (height, width),
          (0, 0), (height, width); the negative_ variants apply only when both negative sizes are given
          (otherwise the unconditional side uses the same ids), as diffusers.
        output_type: 'np' float32 [N, H, W, 3] in [0, 1], 'pil', or 'latent' (diffusion-space NHWC).
        vae_tiling: decode in overlapping tiles (diffusers' `enable_tiling()`), for large images.
        """
        check_output_type(output_type)
        guided, rescaled = self.guidance(guidance_scale, guidance_rescale)
        self.check_clip_skip(clip_skip)
        default_h, default_w = self.default_size()
        height, width = int(height or default_h), int(width or default_w)
        shape = self.latent_shape(height, width)
        self.loop_bounds(num_inference_steps, shape, denoising_end=denoising_end)
        rows, sources, batch = self.prompt_rows(prompt, prompt_2, negative_prompt, negative_prompt_2, prompt_embeds,
                                                negative_prompt_embeds, pooled_prompt_embeds,
                                                negative_pooled_prompt_embeds, num_images_per_prompt, guided)
        count = batch * num_images_per_prompt
        rows.update(self.noise_rows(seed, latents, count, shape))
        rows["time_ids"] = self.time_id_rows(count, original_size=original_size or (height, width),
                                             crops_coords_top_left=crops_coords_top_left,
                                             target_size=target_size or (height, width))
        if guided:
            if negative_original_size is not None and negative_target_size is not None:
                rows["negative_time_ids"] = self.time_id_rows(
                    count, original_size=negative_original_size,
                    crops_coords_top_left=negative_crops_coords_top_left, target_size=negative_target_size)
            else:
                rows["negative_time_ids"] = rows["time_ids"]
        static = Static("txt2img", shape, num_inference_steps, sources, clip_skip, guided, rescaled, False, None,
                        denoising_end, output_type != "latent", vae_tiling, self.progress is not None)
        scalars = {"guidance_scale": np.float32(guidance_scale), "guidance_rescale": np.float32(guidance_rescale)}
        return self.generate(static, rows, scalars, output_type)


class StableDiffusionXLImg2ImgPipeline(_StableDiffusionXLCommon):
    """SDXL image-to-image and the SDXL refiner (diffusers' `StableDiffusionXLImg2ImgPipeline`): the image
    (or a base model's latents) noised to `strength`, or taken as it is from `denoising_start` on. A refiner
    folder has text_encoder_2 alone and `requires_aesthetics_score`, so its time ids end with an aesthetic
    score instead of the target size."""

    mode = "img2img"

    def image_rows(self, image: Any, count: int, height: int | None = None,
                   width: int | None = None) -> tuple[np.ndarray, bool]:
        """(init rows [count, ...], whether they are latents). NHWC arrays with the VAE's latent channel count
        (a base model's output_type='latent') are latents; PIL images or float [N, H, W, 3] in [0, 1] are
        images, resized to height x width when given. Rows are tiled to one per output, as diffusers repeats
        its init latents."""
        channels = self.module("vae").config.latent_channels
        array = None if isinstance(image, (list, tuple)) or hasattr(image, "convert") else np.asarray(image)
        if array is not None and array.ndim in (3, 4) and array.shape[-1] == channels and channels != 3:
            x, is_latents = np.asarray(array if array.ndim == 4 else array[None], np.float32), True
        else:
            x, is_latents = load_images(image, height, width, multiple=self.vae_scale_factor), False
        if count % x.shape[0]:
            raise PipelineInputError(f"image: {x.shape[0]} images do not divide into {count} outputs")
        return np.concatenate([x] * (count // x.shape[0])), is_latents

    def latent_setup(self, params: dict, rows: dict, static: Static, noise: jax.Array) -> dict[str, Any]:
        return {"init_sample": self.image_latents(params, rows, static)}

    def image_latents(self, params: dict, rows: dict, static: Static) -> jax.Array:
        """The init image's diffusion-space latents [N, h, w, C] (given, or a VAE posterior sample)."""
        if static.image_is_latents:
            return rows["image"]
        return self.encode_images(params["vae"], rows["image"], row_keys(rows["seeds"], _POSTERIOR_STREAM))

    def __call__(self, prompt: str | Sequence[str] | None = None, prompt_2: str | Sequence[str] | None = None,
                 image: Any = None, strength: float = 0.3, *, height: int | None = None,
                 width: int | None = None, num_inference_steps: int = 50, denoising_start: float | None = None,
                 denoising_end: float | None = None, guidance_scale: float = 5.0,
                 negative_prompt: str | Sequence[str] | None = None,
                 negative_prompt_2: str | Sequence[str] | None = None, num_images_per_prompt: int = 1,
                 seed: int | Sequence[int] = 0, latents: Any = None, prompt_embeds: Any = None,
                 negative_prompt_embeds: Any = None, pooled_prompt_embeds: Any = None,
                 negative_pooled_prompt_embeds: Any = None, output_type: str = "np",
                 guidance_rescale: float = 0.0, original_size: Sequence[int] | None = None,
                 crops_coords_top_left: Sequence[int] = (0, 0), target_size: Sequence[int] | None = None,
                 negative_original_size: Sequence[int] | None = None,
                 negative_crops_coords_top_left: Sequence[int] = (0, 0),
                 negative_target_size: Sequence[int] | None = None, aesthetic_score: float = 6.0,
                 negative_aesthetic_score: float = 2.5, clip_skip: int | None = None,
                 vae_tiling: bool = False) -> PipelineOutput:
        """Refines or transforms `image`, with diffusers' argument names.

        image: PIL image(s) or float [N, H, W, 3] / [H, W, 3] in [0, 1] (VAE-encoded here, a posterior
          sample from each image's seed), or NHWC latents [N, h, w, 4] such as a base pipeline's
          output_type='latent' result. Fewer images than outputs are tiled, as diffusers.
        strength: the fraction of the schedule to run (noise added to match); a new strength reuses the
          compiled program. Ignored with `denoising_start`.
        denoising_start: start at this fraction of the schedule with `image` as it is (already noisy: the
          refiner half of the base + refiner ensemble); denoising_end as in the base pipeline.
        latents: NHWC standard normal noise [N, h, w, 4] added to the image (instead of the seeds' noise).
        aesthetic_score / negative_aesthetic_score: a refiner's time ids (requires_aesthetics_score);
          otherwise the ids are (original_size, crops_coords_top_left, target_size) as in the base.
        height, width: resize the image to this size (default its own, rounded down to the VAE's factor; not
          for latents). Micro-conditioning sizes default to the image's; negative sizes to the positive ones.
        Other arguments as the base pipeline.
        """
        return self._run(locals())

    def _run(self, call: dict[str, Any], mask_image: Any = None) -> PipelineOutput:
        """The img2img / inpainting call: `call` holds the __call__ arguments by name."""
        c = call
        check_output_type(c["output_type"])
        guided, rescaled = self.guidance(c["guidance_scale"], c["guidance_rescale"])
        self.check_clip_skip(c["clip_skip"])
        strength = c["strength"]
        if c["image"] is None:
            raise PipelineInputError(f"image: {self.mode} needs an image (or a base model's latents)")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
            raise PipelineInputError(f"strength must be in [0, 1], got {strength!r}")
        start_fraction, end_fraction = c["denoising_start"], c["denoising_end"]
        if start_fraction is not None and end_fraction is not None and start_fraction >= end_fraction:
            raise PipelineInputError(f"denoising_start={start_fraction} must be below denoising_end={end_fraction}")
        rows, sources, batch = self.prompt_rows(
            c["prompt"], c["prompt_2"], c["negative_prompt"], c["negative_prompt_2"], c["prompt_embeds"],
            c["negative_prompt_embeds"], c["pooled_prompt_embeds"], c["negative_pooled_prompt_embeds"],
            c["num_images_per_prompt"], guided)
        count = batch * c["num_images_per_prompt"]
        rows["image"], is_latents = self.image_rows(c["image"], count, c["height"], c["width"])
        s = self.vae_scale_factor
        height, width = ((rows["image"].shape[1] * s, rows["image"].shape[2] * s) if is_latents
                         else rows["image"].shape[1:3])
        shape = self.latent_shape(height, width)
        if is_latents and (rows["image"].shape[1:] != shape or (c["height"] or height) != height
                           or (c["width"] or width) != width):
            raise PipelineInputError(f"image: latents [N, h, w, {shape[-1]}] of the requested size, got "
                                     f"{list(rows['image'].shape)}")
        if is_latents and mask_image is not None and self.nine_channel():
            raise PipelineInputError("image: an inpainting U-Net masks the image itself; give the image, not latents")
        start, _ = self.loop_bounds(c["num_inference_steps"], shape, strength=max(float(strength), 1e-9),
                                    denoising_start=start_fraction, denoising_end=end_fraction)
        rows.update(self.noise_rows(c["seed"], c["latents"], count, shape))
        if mask_image is not None:
            masks = load_masks(mask_image, height, width)
            if count % masks.shape[0]:
                raise PipelineInputError(f"mask_image: {masks.shape[0]} masks do not divide into {count} outputs")
            rows["mask"] = np.concatenate([masks] * (count // masks.shape[0]))
        original_size = tuple(c["original_size"] or (height, width))
        target_size = tuple(c["target_size"] or (height, width))
        negative_original_size = tuple(c["negative_original_size"] or original_size)
        negative_target_size = tuple(c["negative_target_size"] or target_size)
        crops = c["crops_coords_top_left"]
        if self.requires_aesthetics_score:
            positive = dict(original_size=original_size, crops_coords_top_left=crops,
                            aesthetic_score=c["aesthetic_score"])
            negative = dict(original_size=negative_original_size,
                            crops_coords_top_left=c["negative_crops_coords_top_left"],
                            aesthetic_score=c["negative_aesthetic_score"])
        else:
            positive = dict(original_size=original_size, crops_coords_top_left=crops, target_size=target_size)
            # diffusers pairs the negative sizes with the positive crop here (not the negative one).
            negative = dict(original_size=negative_original_size, crops_coords_top_left=crops,
                            target_size=negative_target_size)
        rows["time_ids"] = self.time_id_rows(count, **positive)
        if guided:
            rows["negative_time_ids"] = self.time_id_rows(count, **negative)
        static = Static(self.mode, shape, c["num_inference_steps"], sources, c["clip_skip"], guided, rescaled,
                        is_latents, start_fraction, end_fraction, c["output_type"] != "latent", c["vae_tiling"],
                        self.progress is not None, full_strength=mask_image is not None and strength == 1.0)
        scalars = {"guidance_scale": np.float32(c["guidance_scale"]),
                   "guidance_rescale": np.float32(c["guidance_rescale"]), "start": np.int32(start)}
        return self.generate(static, rows, scalars, c["output_type"])


class StableDiffusionXLInpaintPipeline(StableDiffusionXLImg2ImgPipeline):
    """SDXL inpainting (diffusers' `StableDiffusionXLInpaintPipeline`): repaint where `mask_image` is white
    (>= 0.5), keep the rest. A 9-channel inpainting U-Net reads the mask and the masked image's latents
    beside its input; an ordinary 4-channel one gets the known region blended back after every step."""

    mode = "inpaint"

    def nine_channel(self) -> bool:
        """Whether the U-Net is an inpainting one: latents, a mask channel and masked-image latents."""
        latent = self.module("vae").config.latent_channels
        channels = self.module("unet").config.in_channels
        if channels not in (latent, 2 * latent + 1):
            raise PipelineInputError(f"the U-Net takes {channels} input channels: an inpainting U-Net takes "
                                     f"{2 * latent + 1}, an ordinary one {latent}")
        return channels != latent

    def latent_setup(self, params: dict, rows: dict, static: Static, noise: jax.Array) -> dict[str, Any]:
        nine = self.nine_channel()
        f = self.vae_scale_factor
        # diffusers resizes the mask with nearest interpolation: pixel (f*i, f*j) of each latent cell.
        mask_latent = rows["mask"][:, ::f, ::f, :].astype(jnp.float32)  # [N, h, w, 1]
        from_image = static.denoising_start is not None or not static.full_strength
        image_latents = self.image_latents(params, rows, static) if (from_image or not nine) else None
        setup: dict[str, Any] = {"init_sample": image_latents if from_image else None}
        if nine:
            # The masked image is normalized before masking: masked pixels are 0 in [-1, 1], i.e. mid-grey.
            masked = jnp.where(rows["mask"] < 0.5, rows["image"], 0.5)
            keys = row_keys(rows["seeds"], _MASKED_POSTERIOR_STREAM)
            setup["extra"] = jnp.concatenate([mask_latent, self.encode_images(params["vae"], masked, keys)], axis=-1)
            return setup
        scheduler = self.scheduler
        # The last loop index + 1, where the known region goes in clean (denoising_end may cut the loop).
        _, stop = self.loop_bounds(static.steps, static.latent_shape, denoising_end=static.denoising_end)

        def blend(x: jax.Array, i: jax.Array, state: Any) -> jax.Array:
            # The known region at the next step's noise level (clean after the last step).
            renoised = scheduler.add_noise(state, image_latents, noise, jnp.minimum(i + 1, stop - 1))
            proper = jnp.where(i < stop - 1, renoised, image_latents)
            return (1 - mask_latent) * proper + mask_latent * x

        setup["after_step"] = blend
        return setup

    def __call__(self, prompt: str | Sequence[str] | None = None, prompt_2: str | Sequence[str] | None = None,
                 image: Any = None, mask_image: Any = None, *, height: int | None = None, width: int | None = None,
                 strength: float = 0.9999, num_inference_steps: int = 50, denoising_start: float | None = None,
                 denoising_end: float | None = None, guidance_scale: float = 7.5,
                 negative_prompt: str | Sequence[str] | None = None,
                 negative_prompt_2: str | Sequence[str] | None = None, num_images_per_prompt: int = 1,
                 seed: int | Sequence[int] = 0, latents: Any = None, prompt_embeds: Any = None,
                 negative_prompt_embeds: Any = None, pooled_prompt_embeds: Any = None,
                 negative_pooled_prompt_embeds: Any = None, output_type: str = "np",
                 guidance_rescale: float = 0.0, original_size: Sequence[int] | None = None,
                 crops_coords_top_left: Sequence[int] = (0, 0), target_size: Sequence[int] | None = None,
                 negative_original_size: Sequence[int] | None = None,
                 negative_crops_coords_top_left: Sequence[int] = (0, 0),
                 negative_target_size: Sequence[int] | None = None, aesthetic_score: float = 6.0,
                 negative_aesthetic_score: float = 2.5, clip_skip: int | None = None,
                 vae_tiling: bool = False) -> PipelineOutput:
        """Inpainting: `image` as in img2img (resized to height x width, default the U-Net's sample_size times
        the VAE's factor, as diffusers), `mask_image` (PIL, float [N, H, W(, 1)] or [H, W]; >= 0.5 repaints)
        resized alike. strength 1 starts from pure noise (`latents` is that noise), below 1 from the noised
        image (diffusers' default 0.9999). Other arguments as the img2img pipeline."""
        if mask_image is None:
            raise PipelineInputError("mask_image: inpainting needs a mask (white repaints)")
        self.nine_channel()
        default_h, default_w = self.default_size()
        call = dict(locals())
        call["height"], call["width"] = height or default_h, width or default_w
        return self._run(call, mask_image=mask_image)


register_pipeline("StableDiffusionXLPipeline", StableDiffusionXLPipeline)
register_pipeline("StableDiffusionXLImg2ImgPipeline", StableDiffusionXLImg2ImgPipeline)
register_pipeline("StableDiffusionXLInpaintPipeline", StableDiffusionXLInpaintPipeline)
