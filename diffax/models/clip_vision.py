"""CLIP's image encoder: transformers' `CLIPVisionModel` and `CLIPVisionModelWithProjection` in Flax, with
their parameter names. Stable Diffusion's safety checker (diffax.models.safety_checker) is built on it.

    module, params = diffax.convert.load("clip-vision-folder")          # a transformers folder
    out = module.apply({"params": params}, pixel_values)                 # [B, S, S, 3] NHWC, S = image_size
    out.last_hidden_state   # [B, 1 + (S/P)^2, D] the class token and one token per P x P patch
    out.pooler_output       # [B, D] the class token after post_layernorm
    out.image_embeds        # [B, projection_dim] (CLIPVisionModelWithProjection), else None

The architecture (Radford et al. 2021, a ViT): a P x P patch-embedding convolution (no bias), a learned class
token in front, learned position embeddings, `pre_layrnorm` (transformers' spelling), the pre-LayerNorm
transformer layers of CLIP's text encoder (diffax.models.clip: the same attention and MLP, with no mask),
and `post_layernorm` applied to the class token only; `last_hidden_state` is the encoder's output without it.
`pixel_values` are NHWC (transformers takes NCHW), normalised as CLIPImageProcessor does
(diffax.pipelines.safety.preprocess_for_safety_checker); their size must be the config's `image_size`
(transformers' `interpolate_pos_encoding` is not supported).

The config is transformers' `config.json` (`architectures[0]` names the family). Parameter names are
transformers 4's state-dict names, which every published checkpoint uses
(`vision_model/encoder/layers_3/self_attn/q_proj/kernel` for
`vision_model.encoder.layers.3.self_attn.q_proj.weight`); diffax.convert.clip_vision also reads the
unprefixed names transformers 5 writes for a bare `CLIPVisionModel`. The encoder runs deterministically:
`attention_dropout` and `dropout` are read and written back but never applied.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from diffax.models.clip import CLIPEncoder, CLIPTowerConfig
from diffax.models.layers import LayerNorm, conv, dense
from diffax.models.registry import ModelFamily, register
from diffax.models.transformer import TOKEN_AXES

Dtype = Any

MODEL_TYPE = "clip_vision_model"


@dataclasses.dataclass(frozen=True)
class _CLIPVisionFields(CLIPTowerConfig):
    """The keys of transformers' `CLIPVisionConfig` (same defaults: OpenAI CLIP ViT-B/32's image tower)."""
    model_type: ClassVar[str] = MODEL_TYPE
    description: ClassVar[str] = "a CLIP image encoder"
    # Token ids transformers 4 wrote (as null) into every sub-config, vision ones included: read and ignored.
    ignored_keys: ClassVar[frozenset[str]] = frozenset({"bos_token_id", "eos_token_id", "pad_token_id"})
    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512           # width of `visual_projection` (used by the WithProjection family)
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0      # kept for round trips; never applied (module docstring)
    dropout: float = 0.0                # written by transformers 4; kept for round trips
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    # runtime
    dtype: Dtype = jnp.float32          # compute dtype; LayerNorms and softmax run in fp32 regardless
    param_dtype: Dtype = jnp.float32
    attention_backend: str = "auto"

    with_projection: ClassVar[bool] = False

    def __post_init__(self):
        def bad(key: str, expected: str) -> ValueError:
            return ValueError(f"{key}={getattr(self, key)!r} is not supported (expected {expected})")

        for key in ("hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
                    "num_attention_heads", "num_channels", "image_size", "patch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(key, "a positive int")
        self.check_transformer(bad)
        if self.image_size % self.patch_size:
            raise bad("image_size", f"a multiple of patch_size={self.patch_size}")

    def init_inputs(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """((pixel_values [1, image_size, image_size, num_channels],), {})."""
        return (jnp.zeros((1, self.image_size, self.image_size, self.num_channels), jnp.float32),), {}

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(_CLIPVisionFields):
    """transformers' `CLIPVisionModel` config: last_hidden_state and pooler_output."""
    class_name: ClassVar[str] = "CLIPVisionModel"


@dataclasses.dataclass(frozen=True)
class CLIPVisionWithProjectionConfig(_CLIPVisionFields):
    """transformers' `CLIPVisionModelWithProjection` config (IP-Adapter's image encoder): adds `image_embeds`,
    the pooled state through `visual_projection` (no bias)."""
    class_name: ClassVar[str] = "CLIPVisionModelWithProjection"
    with_projection: ClassVar[bool] = True


@flax.struct.dataclass
class CLIPVisionOutput:
    """transformers' output names. hidden_states: None, or (encoder input after pre_layrnorm, layer 1, ...,
    layer N) each [B, T, D]; image_embeds: None without a projection."""
    last_hidden_state: jax.Array          # [B, T, D], T = 1 + num_patches
    pooler_output: jax.Array              # [B, D]
    image_embeds: jax.Array | None = None  # [B, projection_dim]
    hidden_states: tuple[jax.Array, ...] | None = None


def _normal(std: float) -> nn.initializers.Initializer:
    return nn.initializers.normal(stddev=std)


class CLIPVisionEmbeddings(nn.Module):
    """[class_embedding, patch_embedding(patches)] + position_embedding(0..T-1)."""
    config: _CLIPVisionFields

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:  # [B, S, S, C] -> [B, T, D]
        cfg = self.config
        d, factor = cfg.hidden_size, cfg.initializer_factor
        patches = conv(d, cfg.patch_size, strides=cfg.patch_size, padding="VALID", use_bias=False,
                       dtype=cfg.dtype, param_dtype=cfg.param_dtype, kernel_init=_normal(cfg.initializer_range * factor),
                       name="patch_embedding")(pixel_values.astype(cfg.dtype))  # [B, S/P, S/P, D]
        b = patches.shape[0]
        patches = patches.reshape(b, -1, d)  # row-major over the grid, as torch's flatten(2)
        cls = self.param("class_embedding", nn.with_logical_partitioning(_normal(d ** -0.5 * factor), ("embed",)),
                         (d,), cfg.param_dtype)
        tokens = jnp.concatenate([jnp.broadcast_to(cls.astype(cfg.dtype), (b, 1, d)), patches], axis=1)
        positions = nn.Embed(cfg.num_patches + 1, d, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                             embedding_init=nn.with_logical_partitioning(_normal(cfg.initializer_range * factor),
                                                                         (None, "embed")),
                             name="position_embedding")(jnp.arange(cfg.num_patches + 1))
        return tokens + positions[None]


class CLIPVisionTransformer(nn.Module):
    """embeddings -> pre_layrnorm -> encoder; the pooled output is the class token after post_layernorm."""
    config: _CLIPVisionFields

    @nn.compact
    def __call__(self, pixel_values: jax.Array, output_hidden_states: bool) -> CLIPVisionOutput:
        cfg = self.config
        ln = dict(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        x = CLIPVisionEmbeddings(cfg, name="embeddings")(pixel_values)
        x = nn.with_logical_constraint(LayerNorm(name="pre_layrnorm", **ln)(x), TOKEN_AXES)
        x, states = CLIPEncoder(cfg, name="encoder")(x, None)  # [B, T, D]
        pooled = LayerNorm(name="post_layernorm", **ln)(x[:, 0])  # [B, D]
        return CLIPVisionOutput(x, pooled, None, tuple(states) if output_hidden_states else None)


class CLIPVisionModel(nn.Module):
    """transformers' `CLIPVisionModel` / `CLIPVisionModelWithProjection` (by the config's class); see the
    module docstring."""
    config: _CLIPVisionFields

    @nn.compact
    def __call__(self, pixel_values: jax.Array, output_hidden_states: bool = False) -> CLIPVisionOutput:
        """pixel_values [B, image_size, image_size, num_channels] float, NHWC -> CLIPVisionOutput."""
        cfg = self.config
        want = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(f"{cfg.class_name}: pixel_values must be [B, {', '.join(map(str, want))}] (NHWC), got "
                             f"{list(pixel_values.shape)}")
        out = CLIPVisionTransformer(cfg, name="vision_model")(pixel_values, output_hidden_states)
        if not cfg.with_projection:
            return out
        std = cfg.hidden_size ** -0.5 * cfg.initializer_factor
        embeds = dense(cfg.projection_dim, axes=("embed", "mlp"), use_bias=False, dtype=cfg.dtype,
                       param_dtype=cfg.param_dtype, kernel_init=_normal(std),
                       name="visual_projection")(out.pooler_output)
        return out.replace(image_embeds=embeds)


register(ModelFamily("CLIPVisionModel", CLIPVisionConfig, CLIPVisionModel, aliases=("clip_vision",)))
register(ModelFamily("CLIPVisionModelWithProjection", CLIPVisionWithProjectionConfig, CLIPVisionModel,
                     aliases=("clip_vision_projection",)))
