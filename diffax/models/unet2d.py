"""A class-conditional image U-Net (NHWC): diffusers' UNet2DModel, with its config.json keys and
parameter names.

    config = UNet2DConfig(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64),
                          down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                          up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                          num_class_embeds=11)
    params = init_params(config, jax.random.key(0))                      # diffax.models.registry
    eps = UNet2DModel(config).apply({"params": params}, x, t, class_labels=labels)   # x [B, H, W, C]

Class conditioning: with `num_class_embeds=N` the model holds an [N, time_embed_dim] table whose row
is added to the time embedding. diffax reserves the last row, `N - 1`, for the null class of
classifier-free guidance (see `null_class`); the model itself only looks rows up.

Registered as 'UNet2DModel' (alias 'unet2d'); `diffax.convert.load` reads a diffusers UNet2DModel folder
into this module and `diffax.convert.save` writes one back.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffax.models.attention import BACKENDS
from diffax.models.config_base import DenoiserConfigBase
from diffax.models.layers import IMAGE_AXES, GroupNorm, TimestepEmbedding, conv, timestep_embedding
from diffax.models.registry import ModelFamily, register
from diffax.models.remat import check_policy, remat_call
from diffax.models.unet_blocks import (AttnDownBlock2D, AttnUpBlock2D, DownBlock2D, UNetMidBlock2D,
                                       UpBlock2D)

Dtype = Any

DOWN_BLOCKS = {"DownBlock2D": DownBlock2D, "AttnDownBlock2D": AttnDownBlock2D}
UP_BLOCKS = {"UpBlock2D": UpBlock2D, "AttnUpBlock2D": AttnUpBlock2D}

# Keys whose value diffusers stores as a JSON list and we hold as a (hashable) tuple.
_TUPLE_FIELDS = ("down_block_types", "up_block_types", "block_out_channels", "sample_size")


@dataclasses.dataclass(frozen=True)
class UNet2DConfig(DenoiserConfigBase):
    """diffusers' UNet2DModel config (same keys, same defaults) plus diffax's runtime fields.

    Only the values this module implements are accepted; anything else raises ValueError naming the key.
    `num_train_timesteps` is kept only so that a config.json round-trips (it matters for diffusers'
    'learned' time embedding, which diffax does not implement).
    """
    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 3
    out_channels: int = 3
    center_input_sample: bool = False
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    freq_shift: int = 0
    flip_sin_to_cos: bool = True
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2D"
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    block_out_channels: tuple[int, ...] = (224, 448, 672, 896)
    layers_per_block: int = 2
    mid_block_scale_factor: float = 1.0
    downsample_padding: int = 1
    downsample_type: str = "conv"
    upsample_type: str = "conv"
    dropout: float = 0.0
    act_fn: str = "silu"
    attention_head_dim: int | None = 8
    norm_num_groups: int = 32
    attn_norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    resnet_time_scale_shift: str = "default"
    add_attention: bool = True
    class_embed_type: str | None = None
    num_class_embeds: int | None = None
    num_train_timesteps: int | None = None
    # diffax-only
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_backend: str = "auto"
    remat: str | bool = "none"  # rematerialisation policy of the down / mid / up blocks (diffax/models/remat.py)

    class_name: ClassVar[str] = "UNet2DModel"
    runtime_fields: ClassVar[tuple[str, ...]] = ("dtype", "param_dtype", "attention_backend", "remat")

    def __post_init__(self):
        object.__setattr__(self, "remat", check_policy(self.remat))
        for name in _TUPLE_FIELDS:  # JSON gives lists; a flax module attribute must be hashable.
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        self._validate()

    def _validate(self) -> None:
        def bad(key: str, expected: str) -> ValueError:
            return ValueError(f"{key}={getattr(self, key)!r} is not supported (expected {expected})")

        choices = {
            "time_embedding_type": ("positional",), "mid_block_type": ("UNetMidBlock2D", None),
            "downsample_type": ("conv",), "upsample_type": ("conv",), "act_fn": ("silu", "swish"),
            "resnet_time_scale_shift": ("default",), "class_embed_type": (None,), "attention_backend": BACKENDS,
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise bad(key, " or ".join(repr(a) for a in allowed))
        for key, table in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
            unknown = [t for t in getattr(self, key) if t not in table]
            if unknown:
                raise bad(key, f"names from {sorted(table)}")
        n = len(self.block_out_channels)
        if n == 0 or len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise bad("block_out_channels", f"one entry per down and up block type, "
                      f"{len(self.down_block_types)} down and {len(self.up_block_types)} up given")
        groups = self.norm_num_groups
        if not isinstance(groups, int) or groups < 1 or any(c % groups for c in self.block_out_channels):
            raise bad("norm_num_groups", f"a positive int dividing every block_out_channels "
                      f"{self.block_out_channels}")
        for key in ("layers_per_block", "in_channels", "out_channels"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise bad(key, "a positive int")
        if not isinstance(self.norm_eps, (int, float)) or not 0 < self.norm_eps < float("inf"):
            raise bad("norm_eps", "a positive finite number")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise bad("dropout", "a number in [0, 1)")
        for key in ("attention_head_dim", "num_class_embeds", "time_embedding_dim", "attn_norm_num_groups"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise bad(key, "a positive int or null")

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """[H, W, C] of the images the model is configured for (`sample_size`, `in_channels`)."""
        if self.sample_size is None:
            raise ValueError("UNet2DModel: sample_size is null; set it to train or sample (the image side)")
        h, w = (self.sample_size, self.sample_size) if isinstance(self.sample_size, int) else self.sample_size
        return h, w, self.in_channels

    @property
    def learn_sigma(self) -> bool:
        """diffusers' learned-variance U-Nets output twice the input channels."""
        return self.out_channels == 2 * self.in_channels

    @property
    def num_classes(self) -> int:
        """Real classes: the class table minus diffax's null row; 0 without a class embedding."""
        return 0 if self.num_class_embeds is None else self.num_class_embeds - 1

    @property
    def has_null_cond(self) -> bool:
        return self.num_class_embeds is not None

    def example_inputs(self, batch: int = 1) -> tuple[jax.Array, jax.Array, dict[str, Any]]:
        """The smallest valid inputs: parameter shapes do not depend on the spatial size."""
        side = 2 ** (len(self.block_out_channels) - 1)
        cond = {} if self.num_class_embeds is None else {"class_labels": jnp.zeros((batch,), jnp.int32)}
        return jnp.zeros((batch, side, side, self.in_channels), self.dtype), jnp.zeros((batch,)), cond

    @property
    def time_embed_dim(self) -> int:
        """Width of the time (and class) embedding: `time_embedding_dim` or 4 x the first block width."""
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def null_class(self) -> int:
        """The class label diffax uses for 'no class' in classifier-free guidance: the last table row."""
        if self.num_class_embeds is None:
            raise ValueError("null_class: this U-Net has no class embedding (num_class_embeds is null)")
        return self.num_class_embeds - 1


class UNet2DModel(nn.Module):
    """diffusers' UNet2DModel in NHWC; see the module docstring. Parameter names follow its state dict."""
    config: UNet2DConfig

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array | float, *,
                 class_labels: jax.Array | None = None, train: bool = False) -> jax.Array:
        """Predicts from a noisy `sample`.

        Args:
            sample: [B, H, W, in_channels]; H and W divisible by 2 ** (len(block_out_channels) - 1).
            timesteps: [B] or a scalar (broadcast), int or float (fractional timesteps are fine).
            class_labels: [B] int, required iff `config.num_class_embeds` is set.
            train: enables dropout (needs the 'dropout' rng).
        Returns:
            [B, H, W, out_channels] in `config.dtype`.
        """
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        shape = sample.shape
        if len(shape) != 4 or shape[3] != cfg.in_channels or shape[1] % factor or shape[2] % factor:
            raise ValueError(f"UNet2DModel: sample must be [B, H, W, {cfg.in_channels}] with H, W divisible by "
                             f"{factor}; got {sample.shape}")
        b = sample.shape[0]
        timesteps = jnp.asarray(timesteps)
        if timesteps.ndim > 1 or timesteps.size not in (1, b):
            raise ValueError(f"UNet2DModel: timesteps must be a scalar or [{b}], got shape {timesteps.shape}")
        timesteps = jnp.broadcast_to(timesteps.reshape(-1), (b,))

        if cfg.center_input_sample:
            sample = 2 * sample - 1.0

        # Time (and class) embedding: [B, time_embed_dim]. The sinusoid is fp32 whatever cfg.dtype is.
        t_emb = timestep_embedding(timesteps, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                   downscale_freq_shift=cfg.freq_shift)
        emb = TimestepEmbedding(cfg.time_embed_dim, name="time_embedding", **kw)(t_emb)
        if cfg.num_class_embeds is not None:
            if class_labels is None:
                raise ValueError("UNet2DModel: class_labels [B] are required (config.num_class_embeds is set); "
                                 f"pass {cfg.null_class} for the unconditional (null) class")
            table = nn.Embed(cfg.num_class_embeds, cfg.time_embed_dim, name="class_embedding",
                             embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                                         (None, "embed")), **kw)
            emb = emb + table(jnp.asarray(class_labels, jnp.int32))
        elif class_labels is not None:
            raise ValueError("UNet2DModel: class_labels given but the config has no class embedding "
                             "(num_class_embeds is null)")

        block_kw = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, dropout=cfg.dropout,
                        attention_backend=cfg.attention_backend, **kw)

        def head_dim(channels: int) -> int:  # diffusers: a null attention_head_dim means a single head
            return cfg.attention_head_dim or channels

        # Feature maps are constrained to IMAGE_AXES at every block boundary (here and inside the blocks).
        x = nn.with_logical_constraint(conv(cfg.block_out_channels[0], 3, padding=1, name="conv_in", **kw)(sample),
                                       IMAGE_AXES)
        skips = [x]
        last = len(cfg.block_out_channels) - 1
        for i, (kind, channels) in enumerate(zip(cfg.down_block_types, cfg.block_out_channels)):
            attn = {"attention_head_dim": head_dim(channels)} if kind.startswith("Attn") else {}
            block = DOWN_BLOCKS[kind](channels, cfg.layers_per_block, add_downsample=i < last,
                                      downsample_padding=cfg.downsample_padding, name=f"down_blocks_{i}",
                                      **attn, **block_kw)
            x, res = remat_call(block, cfg.remat, x, emb, train=train)
            skips.extend(res)

        if cfg.mid_block_type is not None:
            channels = cfg.block_out_channels[-1]
            block = UNetMidBlock2D(attention_head_dim=head_dim(channels) if cfg.add_attention else None,
                                   attn_groups=cfg.attn_norm_num_groups,
                                   output_scale_factor=cfg.mid_block_scale_factor, name="mid_block", **block_kw)
            x = remat_call(block, cfg.remat, x, emb, train=train)

        n = cfg.layers_per_block + 1  # each up block consumes one skip per resnet
        for i, (kind, channels) in enumerate(zip(cfg.up_block_types, reversed(cfg.block_out_channels))):
            attn = {"attention_head_dim": head_dim(channels)} if kind.startswith("Attn") else {}
            block = UP_BLOCKS[kind](channels, n, add_upsample=i < last, name=f"up_blocks_{i}", **attn, **block_kw)
            x = remat_call(block, cfg.remat, x, skips[-n:], emb, train=train)
            skips = skips[:-n]

        x = nn.silu(GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)(x))
        return conv(cfg.out_channels, 3, padding=1, name="conv_out", **kw)(x)


register(ModelFamily("UNet2DModel", UNet2DConfig, UNet2DModel, aliases=("unet2d",)))
