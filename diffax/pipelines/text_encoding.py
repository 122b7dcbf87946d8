"""Prompt encoding as diffusers' Stable Diffusion pipelines do it: tokens on the host, CLIP inside the program.

    ids = tokenize_prompts(tokenizer, ["a cat", "a dog"], num_images_per_prompt=2)   # [4, 77] int32 (host)
    # inside the jitted program:
    embeds = encode_prompt(text_encoder, params, ids, clip_skip=None)               # [4, 77, D]
    embeds, pooled = encode_prompt_sdxl([(te1, p1), (te2, p2)], [ids1, ids2])       # SDXL: [4, 77, D1+D2], [4, P]

Tokenization pads every prompt to the tokenizer's fixed length (77), so a new prompt is a new array of the
same shape and never a new program. Rows are repeated per image on the host (`np.repeat`: prompt 0's images
first), as diffusers' `repeat(1, n, 1).view(...)` orders them.

diffusers' quirks kept: the negative prompt is encoded without `clip_skip` (SD and SDXL alike); SDXL's
pooled embedding comes from the last encoder that has a projection (`text_embeds`).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffax.models.clip import tokenize
from diffax.models.layers import LayerNorm

Params = Any


def tokenize_prompts(tokenizer: Any, prompts: Sequence[str], num_images_per_prompt: int = 1,
                     max_length: int | None = None) -> np.ndarray:
    """[len(prompts) * num_images_per_prompt, L] int32 token ids, each prompt's row repeated per image.
    L is the tokenizer's `model_max_length` (77 for every Stable Diffusion tokenizer) unless given."""
    if max_length is None:
        max_length = int(getattr(tokenizer, "model_max_length", 77))
        if max_length > 4096:  # transformers' "no limit" sentinel for a tokenizer saved without one
            max_length = 77
    ids = tokenize(tokenizer, list(prompts), max_length=max_length)
    return np.repeat(ids, num_images_per_prompt, axis=0)


def repeat_rows(x: np.ndarray, n: int) -> np.ndarray:
    """Each row of x repeated n times in place (row 0's copies first), as diffusers repeats per image."""
    return np.repeat(np.asarray(x), n, axis=0)


def final_layer_norm(module: nn.Module, params: Params, hidden: jax.Array) -> jax.Array:
    """The text encoder's final LayerNorm applied to a hidden state (diffusers applies it after clip_skip)."""
    cfg = module.config
    norm = LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    return norm.apply({"params": params["text_model"]["final_layer_norm"]}, hidden)


def encode_prompt(module: nn.Module, params: Params, ids: jax.Array, *, clip_skip: int | None = None) -> jax.Array:
    """SD 1.x / 2.x text conditioning [B, L, D]: the last hidden state after the final LayerNorm, or with
    `clip_skip` = k the hidden state k layers before the last, through the final LayerNorm."""
    if clip_skip is None:
        return module.apply({"params": params}, ids).last_hidden_state
    out = module.apply({"params": params}, ids, output_hidden_states=True)
    return final_layer_norm(module, params, out.hidden_states[-(clip_skip + 1)])


def encode_prompt_sdxl(encoders: Sequence[tuple[nn.Module, Params]], ids: Sequence[jax.Array], *,
                       clip_skip: int | None = None) -> tuple[jax.Array, jax.Array]:
    """SDXL text conditioning: (penultimate hidden states of every encoder concatenated [B, L, sum D],
    pooled [B, P]). With `clip_skip` = k the hidden state k + 2 from the end (no final LayerNorm). The
    pooled embedding is the `text_embeds` of the last encoder with a projection (SDXL: text_encoder_2)."""
    if len(encoders) != len(ids):
        raise ValueError(f"encode_prompt_sdxl: {len(encoders)} encoders but {len(ids)} token arrays")
    states, pooled = [], None
    for (module, params), tokens in zip(encoders, ids):
        out = module.apply({"params": params}, tokens, output_hidden_states=True)
        if out.text_embeds is not None:
            pooled = out.text_embeds
        states.append(out.hidden_states[-2 if clip_skip is None else -(clip_skip + 2)])
    if pooled is None:
        raise ValueError("encode_prompt_sdxl: no encoder has a projection (CLIPTextModelWithProjection) for the "
                         "pooled embedding")
    return jnp.concatenate(states, axis=-1), pooled
