"""Cross-attention U-Net blocks (NHWC) of Stable Diffusion, with diffusers' `unet_2d_blocks` parameter names.

  module                    mirrors (diffusers)                           parameters
  Transformer2DModel        models.transformers.Transformer2DModel        norm, proj_in, transformer_blocks_j,
                            (continuous input)                            proj_out
  CrossAttnDownBlock2D      unet_2d_blocks.CrossAttnDownBlock2D           resnets_i, attentions_i, [downsamplers_0]
  CrossAttnUpBlock2D        unet_2d_blocks.CrossAttnUpBlock2D             resnets_i, attentions_i, [upsamplers_0]
  UNetMidBlock2DCrossAttn   unet_2d_blocks.UNetMidBlock2DCrossAttn        resnets_0, (attentions_i, resnets_{i+1})

Each `attentions_i` attends from the feature map to `encoder_hidden_states` [B, Lk, cross_attention_dim]
(the text encoder's hidden states) through `BasicTransformerBlock(activation_fn='geglu')` of
transformer.py; the resnets and resamplers are unet_blocks.py's.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffax.models.layers import IMAGE_AXES, GroupNorm, conv, dense, materialize
from diffax.models.transformer import BasicTransformerBlock
from diffax.models.unet_blocks import Downsample2D, ResnetBlock2D, Upsample2D

Dtype = Any


class Transformer2DModel(nn.Module):
    """GroupNorm (eps 1e-6) -> proj_in -> `num_layers` BasicTransformerBlocks over the H*W tokens ->
    proj_out, plus the input: diffusers' `Transformer2DModel` on a continuous [B, H, W, C] input.

    `use_linear_projection` makes proj_in / proj_out Linear layers (SD 2.x, SDXL) instead of 1x1 convs
    (SD 1.x); the two compute the same map but store [C_in, C_out] vs [1, 1, C_in, C_out] kernels.
    """
    heads: int
    head_dim: int
    num_layers: int = 1
    cross_attention_dim: int | None = None
    groups: int = 32
    use_linear_projection: bool = False
    dropout: float = 0.0
    attention_backend: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, encoder_hidden_states: jax.Array | None, *, train: bool = False) -> jax.Array:
        # x: [B, H, W, C], encoder_hidden_states: [B, Lk, cross_attention_dim] -> [B, H, W, C]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        inner = self.heads * self.head_dim

        def project(name: str, y: jax.Array, features: int) -> jax.Array:
            if self.use_linear_projection:
                return dense(features, axes=("embed", "mlp"), name=name, **kw)(y)
            return conv(features, 1, padding=0, name=name, **kw)(y)

        y = GroupNorm(self.groups, 1e-6, name="norm", **kw)(x)
        y = project("proj_in", y, inner).reshape(b, h * w, inner)  # [B, HW, inner]
        for j in range(self.num_layers):
            y = materialize(BasicTransformerBlock(
                self.heads, self.head_dim, cross_attention_dim=self.cross_attention_dim, dropout=self.dropout,
                activation_fn="geglu", attention_backend=self.attention_backend, name=f"transformer_blocks_{j}",
                **kw)(y, encoder_hidden_states, train=train))
        y = project("proj_out", y.reshape(b, h, w, inner), c)
        return nn.with_logical_constraint(y + x, IMAGE_AXES)


class _CrossAttnStack(nn.Module):
    """What the cross-attention down and up blocks share: `num_layers` x (resnet `resnets_i`, then
    Transformer2DModel `attentions_i`) at `out_channels`, with `out_channels // heads` wide heads
    (diffusers' `num_attention_heads`)."""
    out_channels: int
    num_layers: int = 1
    heads: int = 8
    transformer_layers: int = 1
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    groups: int = 32
    eps: float = 1e-5
    dropout: float = 0.0
    attention_backend: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def layer(self, i: int, x: jax.Array, temb: jax.Array, context: jax.Array, train: bool) -> jax.Array:
        """Resnet i, then transformer i. Called from the subclasses' compact __call__."""
        # x: [B, H, W, C_in] -> [B, H, W, out_channels]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = ResnetBlock2D(self.out_channels, self.groups, self.eps, self.dropout, name=f"resnets_{i}", **kw)(
            x, temb, train=train)
        return Transformer2DModel(self.heads, self.out_channels // self.heads, self.transformer_layers,
                                  self.cross_attention_dim, self.groups, self.use_linear_projection,
                                  attention_backend=self.attention_backend, name=f"attentions_{i}", **kw)(
            x, context, train=train)


class CrossAttnDownBlock2D(_CrossAttnStack):
    """diffusers' CrossAttnDownBlock2D: resnet + transformer pairs, then an optional `downsamplers_0`.
    Returns the output and the skip activations (one per pair, plus the downsampled map)."""
    add_downsample: bool = True
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, encoder_hidden_states: jax.Array, *,
                 train: bool = False) -> tuple[jax.Array, list[jax.Array]]:
        # x: [B, H, W, C_in] -> ([B, H/2, W/2, out_channels], skips)
        skips = []
        for i in range(self.num_layers):
            x = self.layer(i, x, temb, encoder_hidden_states, train)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, self.downsample_padding, name="downsamplers_0",
                             dtype=self.dtype, param_dtype=self.param_dtype)(x)
            skips.append(x)
        return x, skips


class CrossAttnUpBlock2D(_CrossAttnStack):
    """diffusers' CrossAttnUpBlock2D: each resnet takes the running map concatenated (channels last) with
    one skip popped from the end of `skips`, then its transformer; then an optional `upsamplers_0`."""
    add_upsample: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, skips: Sequence[jax.Array], temb: jax.Array, encoder_hidden_states: jax.Array,
                 *, train: bool = False) -> jax.Array:
        # x: [B, H, W, C], skips: num_layers maps [B, H, W, C_i] -> [B, 2H, 2W, out_channels]
        if len(skips) != self.num_layers:
            raise ValueError(f"{self.name}: expected {self.num_layers} skip activations, got {len(skips)}")
        for i in range(self.num_layers):
            x = self.layer(i, jnp.concatenate([x, skips[-1 - i]], axis=-1), temb, encoder_hidden_states, train)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, name="upsamplers_0", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        return x


class UNetMidBlock2DCrossAttn(nn.Module):
    """resnets_0, then `num_layers` x (attentions_i, resnets_{i+1}) at constant width: diffusers'
    UNetMidBlock2DCrossAttn. `output_scale_factor` divides each resnet's output (`mid_block_scale_factor`)."""
    heads: int = 8
    num_layers: int = 1
    transformer_layers: int = 1
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    groups: int = 32
    eps: float = 1e-5
    dropout: float = 0.0
    output_scale_factor: float = 1.0
    attention_backend: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, encoder_hidden_states: jax.Array, *,
                 train: bool = False) -> jax.Array:
        # [B, H, W, C] -> [B, H, W, C]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]

        def resnet(i: int, h: jax.Array) -> jax.Array:
            return ResnetBlock2D(c, self.groups, self.eps, self.dropout, self.output_scale_factor,
                                 name=f"resnets_{i}", **kw)(h, temb, train=train)

        x = resnet(0, x)
        for i in range(self.num_layers):
            x = Transformer2DModel(self.heads, c // self.heads, self.transformer_layers, self.cross_attention_dim,
                                   self.groups, self.use_linear_projection, attention_backend=self.attention_backend,
                                   name=f"attentions_{i}", **kw)(x, encoder_hidden_states, train=train)
            x = resnet(i + 1, x)
        return x
