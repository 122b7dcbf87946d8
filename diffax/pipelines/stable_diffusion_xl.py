"""Stable Diffusion XL: the text-to-image pipeline, the refiner / image-to-image pipeline, and SDXL's two
conditioning inputs beside the text: the prompt pair of two CLIP encoders and the micro-conditioning ids.

Prompts (Podell et al. 2023, section 2.1). The base model reads two text encoders: CLIP ViT-L
(`text_encoder`, a CLIPTextModel) and OpenCLIP ViT-bigG (`text_encoder_2`, a CLIPTextModelWithProjection).
Each encoder's penultimate hidden states (or, with `clip_skip=k`, the states k layers before that) are
concatenated along the feature axis into the cross-attention context [B, 77, 768 + 1280], and the second
encoder's projected end-of-text state is the pooled `text_embeds` [B, 1280]. The refiner has
`text_encoder_2` alone. An absent negative prompt is a zero context and zero pooled vector when the
pipeline's `force_zeros_for_empty_prompt` is set (the base model's config), else the encoded empty prompt.

Micro-conditioning (section 2.2). The U-Net also reads `time_ids`, six numbers for the base model,
(original_size, crops_coords_top_left, target_size), and five for the refiner, which replaces the target size
with an aesthetic score (`requires_aesthetics_score` in model_index.json). Each id becomes an
`addition_time_embed_dim` sinusoid inside the U-Net. The ids are host arrays handed to the one compiled
program, so new sizes or scores run the same program.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffax.models.clip import tokenize

Params = Any
Encoder = tuple[Any, Params]  # (CLIPTextModel module, its params)


# ----------------------------------------------------------------------------- micro-conditioning


def _pair(value: Sequence[int | float], name: str) -> tuple[float, float]:
    values = tuple(value)
    if len(values) != 2:
        raise ValueError(f"{name} must be a pair (height, width) or (top, left), got {value!r}")
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
        raise ValueError("time_ids needs target_size (or aesthetic_score for a refiner)")
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
    if expected - passed == width and not requires_aesthetics_score:
        hint = f"; the U-Net wants one more id: set {flag}=true in model_index.json (a refiner)"
    elif passed - expected == width and requires_aesthetics_score:
        hint = f"; the U-Net wants one id less: set {flag}=false in model_index.json (not a refiner)"
    else:
        hint = "; check unet/config.json addition_time_embed_dim and text_encoder_2's projection_dim"
    raise ValueError(f"unet/config.json: projection_class_embeddings_input_dim={expected}, but {num_ids} time ids "
                     f"x addition_time_embed_dim={width} + text_embeds {text_embeds_dim} = {passed}{hint}")


# ----------------------------------------------------------------------------- prompts


def as_prompt_list(prompt: str | Sequence[str], name: str = "prompt") -> list[str]:
    """`prompt` as a non-empty list of strings; ValueError naming the argument otherwise."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{name} must be a string or a non-empty list of strings, got {prompt!r}")
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
        raise ValueError(f"{name} has {len(out)} prompts, but prompt has {len(fallback)}")
    return out


def tokenize_pair(tokenizers: Sequence[Any], prompts: list[str], prompts_2: list[str]) -> list[np.ndarray]:
    """[B, 77] int32 token ids for each text encoder: `prompts` for the first of two encoders and
    `prompts_2` for the second; a single encoder (the refiner's text_encoder_2) reads `prompts_2`."""
    if len(tokenizers) == 1:
        return [tokenize(tokenizers[0], prompts_2)]
    return [tokenize(tokenizers[0], prompts), tokenize(tokenizers[1], prompts_2)]


def encode_prompt(text_encoders: Sequence[Encoder], token_ids: Sequence[jax.Array],
                  clip_skip: int | None = None) -> tuple[jax.Array, jax.Array]:
    """SDXL's prompt encoding (diffusers' `StableDiffusionXLPipeline.encode_prompt` for one side of the
    guidance), traceable inside a jitted program.

    text_encoders: [(module, params)] of CLIPTextModel / CLIPTextModelWithProjection, one or two.
    token_ids: one [B, 77] int array per encoder.
    clip_skip: None takes each encoder's penultimate hidden states; k takes those k layers before it.
    Returns (context [B, 77, sum of hidden sizes], pooled [B, projection_dim]): the pooled output is the
    `text_embeds` of the last encoder with a projection.
    """
    if len(text_encoders) != len(token_ids):
        raise ValueError(f"{len(text_encoders)} text encoders but {len(token_ids)} token arrays")
    index = -2 if clip_skip is None else -(clip_skip + 2)
    states, pooled = [], None
    for (module, params), ids in zip(text_encoders, token_ids):
        out = module.apply({"params": params}, ids, output_hidden_states=True)
        if -index > len(out.hidden_states):
            raise ValueError(f"clip_skip={clip_skip} skips more layers than the text encoder's "
                             f"{len(out.hidden_states) - 1}")
        states.append(out.hidden_states[index])
        if out.text_embeds is not None:
            pooled = out.text_embeds
    if pooled is None:
        raise ValueError("SDXL needs a text encoder with a projection (CLIPTextModelWithProjection as "
                         "text_encoder_2) for the pooled text_embeds")
    context = jnp.concatenate([s.astype(states[-1].dtype) for s in states], axis=-1)
    return context, pooled
