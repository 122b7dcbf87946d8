"""U-Net building blocks (NHWC) whose parameter trees mirror diffusers' `unet_2d_blocks` state dicts.

Each block names its submodules like the torch attribute path (`resnets_0`, `attentions_1`,
`downsamplers_0/conv`, `upsamplers_0/conv`, `to_out_0`), so `diffax.convert.rules` maps a diffusers
checkpoint onto them with no per-block code. Input channel counts are never declared: flax infers them
from the arrays, which removes the `in_channels` / `prev_output_channel` bookkeeping torch needs.

The blocks take the time embedding `temb` as an argument and never own the time MLP, so the same blocks
serve UNet2DModel, a text-conditioned U-Net (cross-attention blocks are added beside these) and, with
`temb=None`, the VAE encoder / decoder.

Every resnet, attention and resampler output is constrained to `layers.IMAGE_AXES` (batch over the data
axes, channels by 'activation_channels'), a no-op outside `nn.logical_axis_rules`.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffax.models.layers import IMAGE_AXES, GroupNorm, conv, dense
from diffax.models.transformer import Attention

Dtype = Any


class ResnetBlock2D(nn.Module):
    """norm1 -> SiLU -> conv1 (+ time projection) -> norm2 -> SiLU -> dropout -> conv2, plus a skip.

    diffusers' `ResnetBlock2D` with `time_embedding_norm='default'`: the projected time embedding is added
    to the feature map before norm2. A 1x1 `conv_shortcut` appears only when the channel count changes.
    `temb=None` builds no `time_emb_proj` (the VAE's resnets).
    """
    out_channels: int
    groups: int = 32
    eps: float = 1e-6
    dropout: float = 0.0
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None, *, train: bool = False) -> jax.Array:
        # x: [B, H, W, C_in], temb: [B, T] -> [B, H, W, out_channels]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(GroupNorm(self.groups, self.eps, name="norm1", **kw)(x))
        h = conv(self.out_channels, 3, padding=1, name="conv1", **kw)(h)
        if temb is not None:
            t = dense(self.out_channels, axes=("embed", "conv_out"), name="time_emb_proj", **kw)(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(GroupNorm(self.groups, self.eps, name="norm2", **kw)(h))
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        h = conv(self.out_channels, 3, padding=1, name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, padding=0, name="conv_shortcut", **kw)(x)
        return nn.with_logical_constraint((x + h) / self.output_scale_factor, IMAGE_AXES)


def spatial_attention(channels: int, head_dim: int, groups: int, eps: float, rescale_output_factor: float,
                      attention_backend: str, *, name: str, dtype: Dtype = jnp.float32,
                      param_dtype: Dtype = jnp.float32) -> Attention:
    """Self-attention over all H*W positions of a [B, H, W, channels] map: group_norm -> to_q/k/v ->
    attention -> to_out_0, plus the residual, divided by `rescale_output_factor`.

    diffusers' `Attention(channels, heads=channels // head_dim, dim_head=head_dim, norm_num_groups=groups,
    eps=eps, bias=True, residual_connection=True, _from_deprecated_attn_block=True)`, the attention of its
    Attn*Block2D and mid blocks (parameters `group_norm`, `to_q`, `to_k`, `to_v`, `to_out_0`).
    """
    heads = channels // head_dim
    if heads < 1:
        raise ValueError(f"{name}: attention_head_dim={head_dim} exceeds the {channels} channels")
    return Attention(heads, head_dim, bias=True, norm_num_groups=groups, eps=eps, residual_connection=True,
                     rescale_output_factor=rescale_output_factor, attention_backend=attention_backend,
                     dtype=dtype, param_dtype=param_dtype, name=name)


class Downsample2D(nn.Module):
    """A stride-2 3x3 conv named `conv`. torch pads `padding` on every side; `padding=0` means torch's
    (0, 1, 0, 1) pad (right and bottom only) before an unpadded conv, as the SD VAE encoder uses."""
    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, H/2, W/2, out_channels]
        pad = ((0, 1), (0, 1)) if self.padding == 0 else self.padding
        x = conv(self.out_channels, 3, strides=2, padding=pad, name="conv", dtype=self.dtype,
                 param_dtype=self.param_dtype)(x)
        return nn.with_logical_constraint(x, IMAGE_AXES)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv named `conv`."""
    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, 2H, 2W, out_channels]
        b, h, w, c = x.shape
        # Exactly torch's F.interpolate(scale_factor=2, mode='nearest'): every pixel becomes a 2x2 tile.
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        x = conv(self.out_channels, 3, padding=1, name="conv", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        return nn.with_logical_constraint(x, IMAGE_AXES)


class _ResnetStack(nn.Module):
    """What diffusers' down and up blocks share: `num_layers` resnets (`resnets_i`) at `out_channels`, each
    followed by a `spatial_attention` (`attentions_i`) when `attention_head_dim` is set."""
    out_channels: int
    num_layers: int = 1
    attention_head_dim: int | None = None
    groups: int = 32
    eps: float = 1e-6
    dropout: float = 0.0
    output_scale_factor: float = 1.0
    attention_backend: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def layer(self, i: int, x: jax.Array, temb: jax.Array | None, train: bool) -> jax.Array:
        """Resnet i, then attention i if the block has attention. Called from the subclasses' compact
        __call__, so the submodules are named inside the block."""
        # x: [B, H, W, C_in] -> [B, H, W, out_channels]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = ResnetBlock2D(self.out_channels, self.groups, self.eps, self.dropout, self.output_scale_factor,
                          name=f"resnets_{i}", **kw)(x, temb, train=train)
        if self.attention_head_dim is not None:
            x = spatial_attention(self.out_channels, self.attention_head_dim, self.groups, self.eps,
                                  self.output_scale_factor, self.attention_backend, name=f"attentions_{i}",
                                  **kw)(x)
            x = nn.with_logical_constraint(x, IMAGE_AXES)
        return x


class DownBlock2D(_ResnetStack):
    """`num_layers` resnets (`resnets_i`), then an optional `downsamplers_0`; with `attention_head_dim`
    set, each resnet is followed by a `spatial_attention` (`attentions_i`): diffusers' AttnDownBlock2D.

    Returns the output and the skip activations the up path consumes: one per resnet, plus the
    downsampled map.
    """
    add_downsample: bool = True
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None, *,
                 train: bool = False) -> tuple[jax.Array, list[jax.Array]]:
        # x: [B, H, W, C_in] -> ([B, H/2, W/2, out_channels], skips)
        skips = []
        for i in range(self.num_layers):
            x = self.layer(i, x, temb, train)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, self.downsample_padding, name="downsamplers_0",
                             dtype=self.dtype, param_dtype=self.param_dtype)(x)
            skips.append(x)
        return x, skips


class AttnDownBlock2D(DownBlock2D):
    """diffusers' AttnDownBlock2D: a `DownBlock2D` whose resnets are each followed by self-attention."""
    attention_head_dim: int = 8


class UpBlock2D(_ResnetStack):
    """`num_layers` resnets, each fed the running map concatenated (channels last) with one skip
    activation popped from the end of `skips`, then an optional `upsamplers_0`. With
    `attention_head_dim` set, each resnet is followed by a `spatial_attention`: diffusers' AttnUpBlock2D."""
    add_upsample: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, skips: Sequence[jax.Array], temb: jax.Array | None, *,
                 train: bool = False) -> jax.Array:
        # x: [B, H, W, C], skips: num_layers maps [B, H, W, C_i] -> [B, 2H, 2W, out_channels]
        if len(skips) != self.num_layers:
            raise ValueError(f"{self.name}: expected {self.num_layers} skip activations, got {len(skips)}")
        for i in range(self.num_layers):
            x = self.layer(i, jnp.concatenate([x, skips[-1 - i]], axis=-1), temb, train)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, name="upsamplers_0", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        return x


class AttnUpBlock2D(UpBlock2D):
    """diffusers' AttnUpBlock2D: an `UpBlock2D` whose resnets are each followed by self-attention."""
    attention_head_dim: int = 8


class UNetMidBlock2D(nn.Module):
    """resnets_0, then `num_layers` x (attentions_i, resnets_{i+1}) at constant width.

    `attention_head_dim=None` (diffusers' `add_attention=False`) keeps only the resnets. `attn_groups` is
    the attention's GroupNorm group count (diffusers' `attn_norm_num_groups`, default `groups`).
    """
    num_layers: int = 1
    attention_head_dim: int | None = 1
    groups: int = 32
    attn_groups: int | None = None
    eps: float = 1e-6
    dropout: float = 0.0
    output_scale_factor: float = 1.0
    attention_backend: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None, *, train: bool = False) -> jax.Array:
        # [B, H, W, C] -> [B, H, W, C]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]

        def resnet(i: int, h: jax.Array) -> jax.Array:
            return ResnetBlock2D(c, self.groups, self.eps, self.dropout, self.output_scale_factor,
                                 name=f"resnets_{i}", **kw)(h, temb, train=train)

        x = resnet(0, x)
        for i in range(self.num_layers):
            if self.attention_head_dim is not None:
                x = spatial_attention(c, self.attention_head_dim, self.attn_groups or self.groups, self.eps,
                                      self.output_scale_factor, self.attention_backend, name=f"attentions_{i}",
                                      **kw)(x)
                x = nn.with_logical_constraint(x, IMAGE_AXES)
            x = resnet(i + 1, x)
        return x
