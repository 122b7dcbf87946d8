"""The text-conditioned latent U-Net of Stable Diffusion 1.x / 2.x, SDXL (base and refiner) and their
inpainting variants (NHWC): diffusers' UNet2DConditionModel, with its config.json keys and parameter names.

    module, params = diffax.convert.load("stable-diffusion-v1-5", subfolder="unet")
    eps = module.apply({"params": params}, latents, t, encoder_hidden_states=text)  # latents [B, H, W, 4]
    # SDXL: added_cond_kwargs={"text_embeds": pooled [B, 1280], "time_ids": [B, 6]}
    # ControlNet: down_block_additional_residuals=(...), mid_block_additional_residual=...

diffusers' naming quirk is kept: unless `num_attention_heads` is set, `attention_head_dim` is the NUMBER of
heads of each block's transformers (SD 1.x: 8 heads; SD 2.x: (5, 10, 20, 20) heads of width 64), and the
head width is the block width divided by it.

Guidance: a text model's 'no conditioning' input is the empty prompt's text-encoder output, which the U-Net
config cannot produce, so `has_null_cond` is False and pipelines pass their own unconditional embedding.

Registered as 'UNet2DConditionModel' (alias 'unet2d_condition'); `diffax.convert.load` / `save` read and
write diffusers folders.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffax.models.attention import BACKENDS
from diffax.models.config_base import DenoiserConfigBase
from diffax.models.layers import IMAGE_AXES, GroupNorm, TimestepEmbedding, conv, timestep_embedding
from diffax.models.registry import ModelFamily, register
from diffax.models.remat import check_policy, remat_call
from diffax.models.unet_blocks import DownBlock2D, UNetMidBlock2D, UpBlock2D
from diffax.models.unet_cond_blocks import CrossAttnDownBlock2D, CrossAttnUpBlock2D, UNetMidBlock2DCrossAttn

Dtype = Any
IntOrTuple = int | tuple[int, ...]

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)
CLASS_EMBED_TYPES = (None, "timestep", "projection")

# Keys diffusers writes whose only supported value is their default: (key, allowed values).
_FIXED = (
    ("time_embedding_type", ("positional",)), ("act_fn", ("silu", "swish")),
    ("resnet_time_scale_shift", ("default",)), ("resnet_skip_time_act", (False,)),
    ("resnet_out_scale_factor", (1, 1.0)), ("dual_cross_attention", (False,)), ("encoder_hid_dim", (None,)),
    ("encoder_hid_dim_type", (None,)), ("time_embedding_act_fn", (None,)), ("timestep_post_act", (None,)),
    ("time_cond_proj_dim", (None,)), ("attention_type", ("default",)), ("class_embeddings_concat", (False,)),
    ("mid_block_only_cross_attention", (None, False)), ("cross_attention_norm", (None,)),
    ("reverse_transformer_layers_per_block", (None,)), ("addition_embed_type", (None, "text_time")),
    ("class_embed_type", CLASS_EMBED_TYPES), ("mid_block_type", MID_BLOCKS),
)


@dataclasses.dataclass(frozen=True)
class UNet2DConditionConfig(DenoiserConfigBase):
    """diffusers' UNet2DConditionModel config (same keys, same defaults: SD 1.x's) plus diffax's runtime
    fields. Every key diffusers writes is accepted; a value diffax does not implement raises ValueError
    naming the key. `upcast_attention` is accepted and has no effect: diffax's softmax is always fp32."""
    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                         "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: IntOrTuple = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: int | None = 32
    norm_eps: float = 1e-5
    cross_attention_dim: IntOrTuple = 1280
    transformer_layers_per_block: IntOrTuple = 1
    reverse_transformer_layers_per_block: Any = None
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    attention_head_dim: IntOrTuple = 8
    num_attention_heads: IntOrTuple | None = None
    dual_cross_attention: bool = False
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    time_cond_proj_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    projection_class_embeddings_input_dim: int | None = None
    attention_type: str = "default"
    class_embeddings_concat: bool = False
    mid_block_only_cross_attention: bool | None = None
    cross_attention_norm: str | None = None
    addition_embed_type_num_heads: int = 64
    # diffax-only
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_backend: str = "auto"
    remat: str | bool = "none"  # rematerialisation policy of the down / mid / up blocks (diffax/models/remat.py)

    class_name: ClassVar[str] = "UNet2DConditionModel"
    runtime_fields: ClassVar[tuple[str, ...]] = ("dtype", "param_dtype", "attention_backend", "remat")

    def __post_init__(self):
        object.__setattr__(self, "remat", check_policy(self.remat))
        self._validate()

    def _validate(self) -> None:
        def bad(key: str, expected: str) -> ValueError:
            return ValueError(f"{key}={getattr(self, key)!r} is not supported (expected {expected})")

        for key, allowed in (*_FIXED, ("attention_backend", BACKENDS)):
            if getattr(self, key) not in allowed:
                raise bad(key, " or ".join(repr(a) for a in allowed))
        n = len(self.block_out_channels)
        for key, names in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
            if any(t not in names for t in getattr(self, key)):
                raise bad(key, f"names from {names}")
            if len(getattr(self, key)) != n:
                raise bad(key, f"one entry per block_out_channels ({n})")
        if n == 0:
            raise bad("block_out_channels", "at least one block")
        only = self.only_cross_attention
        if any(only) if isinstance(only, tuple) else only:
            raise bad("only_cross_attention", "False")
        for key in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim",
                    "num_attention_heads"):
            value = getattr(self, key)
            if isinstance(value, tuple) and len(value) != n:
                raise bad(key, f"an int or one value per block ({n})")
        groups = self.norm_num_groups
        if groups is None or groups < 1 or any(c % groups for c in self.block_out_channels):
            raise bad("norm_num_groups", f"a positive int dividing every block_out_channels {self.block_out_channels}")
        for key in ("conv_in_kernel", "conv_out_kernel"):
            if getattr(self, key) % 2 != 1:
                raise bad(key, "an odd kernel size")
        if self.class_embed_type == "projection" and self.projection_class_embeddings_input_dim is None:
            raise bad("projection_class_embeddings_input_dim", "an int with class_embed_type='projection'")
        if self.addition_embed_type == "text_time" and (self.addition_time_embed_dim is None or
                                                        self.projection_class_embeddings_input_dim is None):
            raise bad("addition_time_embed_dim", "ints addition_time_embed_dim and "
                      "projection_class_embeddings_input_dim with addition_embed_type='text_time'")
        for i, (c, heads) in enumerate(zip(self.block_out_channels, self.heads)):
            if heads < 1 or c % heads:
                raise bad("attention_head_dim", f"head counts dividing the block widths (block {i}: {c} "
                          f"channels, {heads} heads; diffusers reads attention_head_dim as the number of heads)")

    def per_block(self, key: str) -> tuple[Any, ...]:
        """An int-or-per-block config value as one value per down block."""
        value = getattr(self, key)
        return value if isinstance(value, tuple) else (value,) * len(self.block_out_channels)

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads per down block: diffusers' `num_attention_heads or attention_head_dim`."""
        return self.per_block("num_attention_heads" if self.num_attention_heads is not None else "attention_head_dim")

    @property
    def time_embed_dim(self) -> int:
        """Width of the time embedding: `time_embedding_dim` or 4 x the first block width."""
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """[H, W, C] of the latents the model is configured for (`sample_size`, `in_channels`)."""
        if self.sample_size is None:
            raise ValueError("UNet2DConditionModel: sample_size is null; set it to train or sample (the latent side)")
        h, w = (self.sample_size, self.sample_size) if isinstance(self.sample_size, int) else self.sample_size
        return h, w, self.in_channels

    @property
    def learn_sigma(self) -> bool:
        return False

    @property
    def num_classes(self) -> int:
        return 0

    @property
    def has_null_cond(self) -> bool:
        """False: the null conditioning is the empty prompt's embedding, which pipelines supply."""
        return False

    def null_cond(self, cond: dict[str, Any]) -> dict[str, Any]:
        raise ValueError("UNet2DConditionModel: the unconditional input is the empty prompt's text embedding; "
                         "the pipeline that encodes prompts supplies it")

    def example_inputs(self, batch: int = 1) -> tuple[jax.Array, jax.Array, dict[str, Any]]:
        """The smallest valid inputs: one text token; parameter shapes do not depend on the sizes."""
        side = 2 ** (len(self.block_out_channels) - 1)
        cond: dict[str, Any] = {"encoder_hidden_states": jnp.zeros((batch, 1, self.per_block("cross_attention_dim")[0]),
                                                                   self.dtype)}
        if self.addition_embed_type == "text_time":
            # text_embeds and the time ids' sinusoids fill projection_class_embeddings_input_dim together; only
            # that total shapes the parameters. 6 ids as SDXL base (the refiner passes 5, with wider text_embeds).
            n_ids = 6
            text = self.projection_class_embeddings_input_dim - n_ids * self.addition_time_embed_dim
            cond["added_cond_kwargs"] = {"text_embeds": jnp.zeros((batch, text), self.dtype),
                                         "time_ids": jnp.zeros((batch, n_ids), jnp.float32)}
        if self.class_embed_type == "projection":
            cond["class_labels"] = jnp.zeros((batch, self.projection_class_embeddings_input_dim), self.dtype)
        elif self.class_embed_type == "timestep" or self.num_class_embeds is not None:
            cond["class_labels"] = jnp.zeros((batch,), jnp.int32)
        return jnp.zeros((batch, side, side, self.in_channels), self.dtype), jnp.zeros((batch,)), cond


class UNet2DConditionModel(nn.Module):
    """diffusers' UNet2DConditionModel in NHWC; see the module docstring. Parameter names follow its state dict."""
    config: UNet2DConditionConfig

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array | float, *, encoder_hidden_states: jax.Array,
                 added_cond_kwargs: dict[str, jax.Array] | None = None,
                 down_block_additional_residuals: Sequence[jax.Array] | None = None,
                 mid_block_additional_residual: jax.Array | None = None,
                 class_labels: jax.Array | None = None, train: bool = False) -> jax.Array:
        """Predicts from noisy latents.

        Args:
            sample: [B, H, W, in_channels]; H and W divisible by 2 ** (len(block_out_channels) - 1).
            timesteps: [B] or a scalar (broadcast), int or float.
            encoder_hidden_states: [B, Lk, cross_attention_dim] (the text encoder's last hidden states).
            added_cond_kwargs: SDXL ('text_time'): {'text_embeds': [B, D_text], 'time_ids': [B, N]} with
                D_text + N * addition_time_embed_dim = projection_class_embeddings_input_dim.
            down_block_additional_residuals: ControlNet: one [B, h, w, c] map per skip activation (conv_in's
                output, then each down block's), added to the skips.
            mid_block_additional_residual: ControlNet: added to the mid block's output.
            class_labels: [B] ints (num_class_embeds, class_embed_type 'timestep') or [B, D] floats
                ('projection').
            train: enables dropout (needs the 'dropout' rng).
        Returns:
            [B, H, W, out_channels] in `config.dtype`.
        """
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        n_blocks = len(cfg.block_out_channels)
        factor = 2 ** (n_blocks - 1)
        shape = sample.shape
        if len(shape) != 4 or shape[3] != cfg.in_channels or shape[1] % factor or shape[2] % factor:
            raise ValueError(f"UNet2DConditionModel: sample must be [B, H, W, {cfg.in_channels}] with H, W divisible "
                             f"by {factor}; got {sample.shape}")
        b = shape[0]
        timesteps = jnp.asarray(timesteps)
        if timesteps.ndim > 1 or timesteps.size not in (1, b):
            raise ValueError(f"UNet2DConditionModel: timesteps must be a scalar or [{b}], got shape {timesteps.shape}")
        timesteps = jnp.broadcast_to(timesteps.reshape(-1), (b,))
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0

        emb = embed_time(cfg, timesteps, class_labels, added_cond_kwargs)  # [B, time_embed_dim]

        context = encoder_hidden_states
        residuals = None if down_block_additional_residuals is None else list(down_block_additional_residuals)
        layers = cfg.per_block("layers_per_block")
        pad_in = (cfg.conv_in_kernel - 1) // 2
        x = nn.with_logical_constraint(conv(cfg.block_out_channels[0], cfg.conv_in_kernel, padding=pad_in,
                                            name="conv_in", **kw)(sample), IMAGE_AXES)
        x, skips = down_blocks(cfg, x, emb, context, train=train)

        if residuals is not None:
            if len(residuals) != len(skips) or any(r.shape != s.shape for r, s in zip(residuals, skips)):
                raise ValueError(f"UNet2DConditionModel: down_block_additional_residuals must be {len(skips)} maps "
                                 f"of shapes {[s.shape for s in skips]}, got {[r.shape for r in residuals]}")
            skips = [s + r for s, r in zip(skips, residuals)]

        x = mid_block(cfg, x, emb, context, train=train)
        if mid_block_additional_residual is not None:
            x = x + mid_block_additional_residual

        block_kw = block_kwargs(cfg)
        for i, (kind, channels) in enumerate(zip(cfg.up_block_types, reversed(cfg.block_out_channels))):
            j = n_blocks - 1 - i  # the matching down block, whose per-block values the up block takes
            n = layers[j] + 1  # each up block consumes one skip per resnet
            common = dict(num_layers=n, add_upsample=i < n_blocks - 1, name=f"up_blocks_{i}", **block_kw)
            if kind == "CrossAttnUpBlock2D":
                block = CrossAttnUpBlock2D(channels, **attention_kwargs(cfg, j), **common)
                x = remat_call(block, cfg.remat, x, skips[-n:], emb, context, train=train)
            else:
                x = remat_call(UpBlock2D(channels, **common), cfg.remat, x, skips[-n:], emb, train=train)
            skips = skips[:-n]

        x = nn.silu(GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)(x))
        pad_out = (cfg.conv_out_kernel - 1) // 2
        return conv(cfg.out_channels, cfg.conv_out_kernel, padding=pad_out, name="conv_out", **kw)(x)


# The encoder half (time embeddings, conv_in's successors: down blocks, mid block) is shared with the
# ControlNet, whose parameters have the same names. Each helper is called inside a module's compact
# __call__ and creates its submodules there, under diffusers' names.

def block_kwargs(cfg: UNet2DConditionConfig) -> dict[str, Any]:
    """The fields every down, mid and up block takes from the config."""
    return dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, dropout=cfg.dropout,
                attention_backend=cfg.attention_backend, dtype=cfg.dtype, param_dtype=cfg.param_dtype)


def attention_kwargs(cfg: UNet2DConditionConfig, i: int) -> dict[str, Any]:
    """The cross-attention fields of down block i (up blocks take their matching down block's)."""
    return dict(heads=cfg.heads[i], transformer_layers=cfg.per_block("transformer_layers_per_block")[i],
                cross_attention_dim=cfg.per_block("cross_attention_dim")[i],
                use_linear_projection=cfg.use_linear_projection)


def embed_time(cfg: UNet2DConditionConfig, timesteps: jax.Array, class_labels: jax.Array | None,
               added_cond_kwargs: dict[str, jax.Array] | None, owner: str = "UNet2DConditionModel") -> jax.Array:
    """The time embedding [B, time_embed_dim] plus the class and SDXL ('text_time') embeddings, as
    `time_embedding`, `class_embedding` and `add_embedding`. timesteps: [B]. Sinusoids are fp32."""
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    b = timesteps.shape[0]

    def sinusoid(t: jax.Array, dim: int) -> jax.Array:
        return timestep_embedding(t, dim, flip_sin_to_cos=cfg.flip_sin_to_cos, downscale_freq_shift=cfg.freq_shift)

    emb = TimestepEmbedding(cfg.time_embed_dim, name="time_embedding", **kw)(sinusoid(timesteps,
                                                                                        cfg.block_out_channels[0]))
    emb = emb + _class_embedding(cfg, class_labels, sinusoid, owner)
    if cfg.addition_embed_type == "text_time":
        if not added_cond_kwargs or "text_embeds" not in added_cond_kwargs or "time_ids" not in added_cond_kwargs:
            raise ValueError(f"{owner}: addition_embed_type='text_time' needs added_cond_kwargs "
                             "{'text_embeds': [B, D], 'time_ids': [B, N]}")
        text_embeds, time_ids = added_cond_kwargs["text_embeds"], jnp.asarray(added_cond_kwargs["time_ids"])
        time_embeds = sinusoid(time_ids.reshape(-1), cfg.addition_time_embed_dim).reshape(b, -1)
        add = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], axis=-1)
        if add.shape[-1] != cfg.projection_class_embeddings_input_dim:
            raise ValueError(f"{owner}: text_embeds [B, {text_embeds.shape[-1]}] and time_ids "
                             f"[B, {time_ids.shape[-1]}] x {cfg.addition_time_embed_dim} give {add.shape[-1]} "
                             f"features, not projection_class_embeddings_input_dim="
                             f"{cfg.projection_class_embeddings_input_dim}")
        emb = emb + TimestepEmbedding(cfg.time_embed_dim, name="add_embedding", **kw)(add)
    return emb


def _class_embedding(cfg: UNet2DConditionConfig, class_labels: jax.Array | None,
                     sinusoid: Callable[[jax.Array, int], jax.Array], owner: str) -> jax.Array | float:
    """The class embedding [B, time_embed_dim] added to the time embedding (0.0 without one)."""
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    has_table = cfg.class_embed_type is None and cfg.num_class_embeds is not None
    if cfg.class_embed_type is None and not has_table:
        if class_labels is not None:
            raise ValueError(f"{owner}: class_labels given but the config has no class embedding")
        return 0.0
    if class_labels is None:
        raise ValueError(f"{owner}: class_labels are required (class_embed_type="
                         f"{cfg.class_embed_type!r}, num_class_embeds={cfg.num_class_embeds})")
    if has_table:
        table = nn.Embed(cfg.num_class_embeds, cfg.time_embed_dim, name="class_embedding",
                         embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                                     (None, "embed")), **kw)
        return table(jnp.asarray(class_labels, jnp.int32))
    if cfg.class_embed_type == "timestep":
        class_labels = sinusoid(jnp.asarray(class_labels).reshape(-1), cfg.block_out_channels[0])
    return TimestepEmbedding(cfg.time_embed_dim, name="class_embedding", **kw)(class_labels)


def down_blocks(cfg: UNet2DConditionConfig, x: jax.Array, emb: jax.Array, context: jax.Array, *,
                train: bool) -> tuple[jax.Array, list[jax.Array]]:
    """`down_blocks_{i}` on conv_in's output x [B, H, W, C0]: (the last block's output, the skip
    activations: x itself, then each block's)."""
    n_blocks = len(cfg.block_out_channels)
    layers = cfg.per_block("layers_per_block")
    skips = [x]
    for i, (kind, channels) in enumerate(zip(cfg.down_block_types, cfg.block_out_channels)):
        common = dict(num_layers=layers[i], add_downsample=i < n_blocks - 1,
                      downsample_padding=cfg.downsample_padding, name=f"down_blocks_{i}", **block_kwargs(cfg))
        if kind == "CrossAttnDownBlock2D":
            block = CrossAttnDownBlock2D(channels, **attention_kwargs(cfg, i), **common)
            x, res = remat_call(block, cfg.remat, x, emb, context, train=train)
        else:
            x, res = remat_call(DownBlock2D(channels, **common), cfg.remat, x, emb, train=train)
        skips.extend(res)
    return x, skips


def mid_block(cfg: UNet2DConditionConfig, x: jax.Array, emb: jax.Array, context: jax.Array, *,
              train: bool) -> jax.Array:
    """`mid_block` ([B, h, w, C] -> same), or x unchanged when mid_block_type is None."""
    common = dict(output_scale_factor=cfg.mid_block_scale_factor, name="mid_block", **block_kwargs(cfg))
    if cfg.mid_block_type == "UNetMidBlock2DCrossAttn":
        block = UNetMidBlock2DCrossAttn(**attention_kwargs(cfg, len(cfg.block_out_channels) - 1), **common)
        return remat_call(block, cfg.remat, x, emb, context, train=train)
    if cfg.mid_block_type == "UNetMidBlock2D":
        block = UNetMidBlock2D(num_layers=0, attention_head_dim=None, **common)
        return remat_call(block, cfg.remat, x, emb, train=train)
    return x


register(ModelFamily("UNet2DConditionModel", UNet2DConditionConfig, UNet2DConditionModel,
                     aliases=("unet2d_condition",)))
