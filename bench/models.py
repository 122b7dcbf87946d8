"""The torch reference models the benchmarks compare against, with random weights, and their diffax twins.

    unet = torch_unet(SD15_UNET)                 # diffusers' UNet2DConditionModel, SD 1.5 sizes
    module, params = to_diffax(unet)              # save_pretrained -> diffax.convert.load
    params = to_device(params)                    # host numpy -> jax arrays, one leaf at a time

Configs are data: the `config.json` keys of the released checkpoints (diffusers' for the U-Nets, the VAE
and the ControlNet; transformers' for the CLIP text encoder), and SMALL_* variants with the same layout at
small widths for `--quick` runs. No weights are downloaded: every model is built from its config with
random weights.

Random weights: diffusers and transformers initialise some tensors to zero or to constants (biases, norm
scales, ControlNet's zero convolutions, adaLN-Zero), which would hide a swapped or dropped tensor from the
agreement check. `perturb` redraws every all-zero tensor and shifts every vector, and leaves the other
weight matrices at the library's initialisation, which keeps activations at sane scales at full depth.
"""
from __future__ import annotations

import contextlib
import gc
import math
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import jax
import numpy as np

from diffax import convert, host_memory
from diffax.data import tokenizer
from diffax.models.dit import DiTConfig

# Shards of at most this size: safetensors serialises one shard in memory before writing it, so the
# SDXL U-Net (10.3 GB in fp32) is saved holding one weight copy plus 2 GB, not two copies.
MAX_SHARD_SIZE = "2GB"

_SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")

# runwayml/stable-diffusion-v1-5 unet/config.json (859.5 M parameters); attention_head_dim is the number of
# heads (8 heads of 40/80/160 channels), as in the released file.
SD15_UNET: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=_SD_DOWN, up_block_types=_SD_UP, block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32,
    norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8)

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (2.57 B parameters).
SDXL_UNET: dict[str, Any] = dict(
    sample_size=128, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(320, 640, 1280),
    layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32,
    norm_eps=1e-5, cross_attention_dim=2048, attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True, addition_embed_type="text_time", addition_embed_type_num_heads=64,
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)

# lllyasviel/sd-controlnet-canny config.json (361 M parameters): SD 1.5's encoder half, a 512x512 RGB
# conditioning image embedded down to the 64x64 latents.
SD15_CONTROLNET: dict[str, Any] = dict(
    in_channels=4, conditioning_channels=3, flip_sin_to_cos=True, freq_shift=0, down_block_types=_SD_DOWN,
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
    use_linear_projection=False, upcast_attention=False, controlnet_conditioning_channel_order="rgb",
    conditioning_embedding_out_channels=(16, 32, 96, 256))

# runwayml/stable-diffusion-v1-5 vae/config.json (83.7 M parameters; latents x8 -> 512x512 images).
SD_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)

# openai/clip-vit-large-patch14's text_config (123 M parameters), SD 1.x's text encoder. Token ids as in the
# released file (bos 0, eos 2, pad 1: transformers then pools at the highest token id, the end-of-text token).
CLIP_L_TEXT: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    bos_token_id=0, eos_token_id=2, pad_token_id=1)

# The same layouts at small widths (and the U-Nets at 32x32 latents) for `--quick`: seconds per call on a CPU.
SMALL_SD15_UNET: dict[str, Any] = dict(SD15_UNET, sample_size=32, block_out_channels=(32, 64, 128, 128),
                                       cross_attention_dim=64, attention_head_dim=2)
SMALL_SDXL_UNET: dict[str, Any] = dict(SDXL_UNET, sample_size=32, block_out_channels=(32, 64, 128),
                                       cross_attention_dim=64, attention_head_dim=(1, 2, 4),
                                       transformer_layers_per_block=(1, 2, 2), addition_time_embed_dim=16,
                                       projection_class_embeddings_input_dim=64 + 6 * 16)
SMALL_SD15_CONTROLNET: dict[str, Any] = dict(SD15_CONTROLNET, block_out_channels=(32, 64, 128, 128),
                                             cross_attention_dim=64, attention_head_dim=2)
SMALL_SD_VAE: dict[str, Any] = dict(SD_VAE, block_out_channels=(32, 32, 64, 64), sample_size=256)
SMALL_CLIP_TEXT: dict[str, Any] = dict(CLIP_L_TEXT, hidden_size=64, intermediate_size=256, projection_dim=64,
                                       num_hidden_layers=4, num_attention_heads=4)


def sdxl_text_embeds_dim(config: Mapping[str, Any]) -> int:
    """Width of SDXL's pooled text embedding (`added_cond_kwargs['text_embeds']`) for a 'text_time' U-Net
    config: the projection input minus the six embedded size/crop ids."""
    return config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]


# ----------------------------------------------------------------------------- random weights


def perturb(model: Any, seed: int = 0) -> Any:
    """Makes every tensor of a torch model carry signal, in place; returns the model in eval mode.

    An all-zero tensor is redrawn (matrices and kernels std 1/sqrt(fan_in), vectors std 0.1); every other
    vector (norm scales, biases) is shifted by N(0, 0.1^2). Other matrices keep their initialisation.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if not p.any():
                fan_in = math.prod(p.shape[1:]) if p.ndim > 1 else 0
                p.copy_(noise * (fan_in ** -0.5 if fan_in else 0.1))
            elif p.ndim == 1:
                p.add_(0.1 * noise)
    return model.eval()


def _build(cls: Any, config: Mapping[str, Any], seed: int) -> Any:
    import torch

    torch.manual_seed(seed)
    return perturb(cls(**config), seed + 1)


def torch_unet(config: Mapping[str, Any] = SD15_UNET, seed: int = 0) -> Any:
    """diffusers' UNet2DConditionModel for `config` (config.json keys) with random weights (`perturb`)."""
    import diffusers

    return _build(diffusers.UNet2DConditionModel, config, seed)


def torch_controlnet(config: Mapping[str, Any] = SD15_CONTROLNET, seed: int = 0) -> Any:
    """diffusers' ControlNetModel for `config` with random weights, its zero convolutions redrawn."""
    import diffusers

    return _build(diffusers.ControlNetModel, config, seed)


def torch_vae(config: Mapping[str, Any] = SD_VAE, seed: int = 0) -> Any:
    """diffusers' AutoencoderKL for `config` with random weights (`perturb`)."""
    import diffusers

    return _build(diffusers.AutoencoderKL, config, seed)


def torch_clip_text(config: Mapping[str, Any] = CLIP_L_TEXT, seed: int = 0) -> Any:
    """transformers' CLIPTextModel for `config` (CLIPTextConfig keys) with random weights (`perturb`)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    return perturb(transformers.CLIPTextModel(transformers.CLIPTextConfig(**config)), seed + 1)


def torch_dit(config: DiTConfig, seed: int = 0) -> Any:
    """diffusers' DiTTransformer2DModel for `config` with random weights.

    Every tensor is redrawn, the zero-initialised adaLN and output layers included (else adaLN-Zero makes
    every block the identity and the output zero, and the check would prove nothing): weight matrices
    std 1/sqrt(fan_in), vectors std 0.1, the label table std 1. diffusers keeps a copy of the timestep and
    label embedders in every block and uses block 0's; the copies are tied, as in a converted checkpoint.
    """
    import torch
    from diffusers import DiTTransformer2DModel

    kwargs = {k: v for k, v in config.to_diffusers().items() if not k.startswith("_")}
    model = DiTTransformer2DModel(**kwargs).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = math.prod(p.shape[1:]) if p.ndim > 1 else 0
            std = 1.0 if "embedding_table" in name else (fan_in ** -0.5 if fan_in else 0.1)
            p.copy_(torch.randn(p.shape, generator=g) * std)
        first = model.transformer_blocks[0].norm1.emb.state_dict()
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first)
    return model


# ----------------------------------------------------------------------------- diffax twins


@contextlib.contextmanager
def saved(model: Any) -> Iterator[Path]:
    """A temporary folder holding `model.save_pretrained(...)` (safetensors, sharded at MAX_SHARD_SIZE),
    removed on exit. Lets a caller free the torch model before loading the folder."""
    with tempfile.TemporaryDirectory(prefix="diffax-bench-") as folder:
        model.save_pretrained(folder, max_shard_size=MAX_SHARD_SIZE)
        yield Path(folder)


def to_diffax(model: Any, **load_kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """diffax's (module, params) of a diffusers / transformers torch model: saved with `save_pretrained` in a
    temporary folder and read back with `diffax.convert.load(folder, **load_kwargs)` (params on the host)."""
    with saved(model) as folder:
        return convert.load(folder, **load_kwargs)


def to_device(params: dict[str, Any], copy: bool = False) -> dict[str, Any]:
    """The params as jax arrays on the default device. The nested dict is updated in place, one leaf at a
    time, so each host copy is dropped as soon as its device copy exists: converting a multi-GB model never
    holds two copies. Returns the same dict. On a CPU the device may take a host array over without a
    copy; `copy=True` makes every leaf a buffer of XLA's own, which a donating program can update in place."""
    for key, value in params.items():
        if isinstance(value, dict):
            params[key] = to_device(value, copy)
        else:
            params[key] = jax.device_put(np.asarray(value)) if not copy else jax.block_until_ready(jax.numpy.copy(value))
    return params


def free() -> None:
    """Returns the memory of dropped models (and the compiler's freed working memory, which glibc keeps
    until trimmed) to the system before the next big one is built."""
    gc.collect()
    jax.clear_caches()
    host_memory.release_freed()


# ----------------------------------------------------------------------------- tokenizer


# The words of the benchmarks' prompts: each is one token of `word_tokenizer`.
PROMPT_WORDS = ("a", "an", "the", "of", "on", "in", "photo", "astronaut", "riding", "horse", "moon", "cat", "dog",
                "painting", "city", "night", "mountain", "lake", "sunset", "portrait", "detailed", "high",
                "quality")


def word_tokenizer(folder: str | Path, words: tuple[str, ...] = PROMPT_WORDS) -> Any:
    """`diffax.data.tokenizer.word_tokenizer` over the benchmarks' prompt words."""
    return tokenizer.word_tokenizer(folder, words)
