"""The KL autoencoder of latent diffusion (NHWC): diffusers' AutoencoderKL, as Stable Diffusion 1.x / 2.x
and SDXL use it, with its config.json keys and parameter names.

    config = AutoencoderKLConfig.from_diffusers("sd-vae/config.json")      # or diffax.convert.load(folder)
    vae = AutoencoderKL(config)
    posterior = vae.apply({"params": p}, images, method=vae.encode)        # images [B, H, W, 3] in [-1, 1]
    latents = config.scale_latents(posterior.sample(key))                  # [B, H/8, W/8, 4], diffusion scale
    images = vae.apply({"params": p}, config.unscale_latents(latents), method=vae.decode)

`encode` and `decode` are raw like diffusers' (no scaling): diffusers' pipelines multiply by
`scaling_factor` (and subtract `shift_factor` / `latents_mean`) outside the VAE, and so do
`scale_latents` / `unscale_latents` here.

Large images: `encode(x, tiled=True)` / `decode(z, tiled=True)` are diffusers' `enable_tiling()` (tiles of
`sample_size` pixels overlapping by a quarter, blended linearly, in diffusers' order, so the numbers match
its tiled path); `tiled_encode` / `tiled_decode` always tile, as diffusers' methods of those names do.
`sliced=True` is diffusers' `enable_slicing()`: one image of the batch at a time. Tiles and slices run
through `nn.scan`, one at a time inside the one compiled program, so peak memory is one tile's.

fp16: with `force_upcast` (the SDXL VAE's config sets it, since its activations overflow fp16's 65504) and
`dtype=float16`, the whole model computes in float32 and returns float32, as diffusers' pipelines upcast
such a VAE before encoding or decoding. bfloat16 has float32's range and runs as configured.

Registered as 'AutoencoderKL' (alias 'vae'); `diffax.convert.load` reads a diffusers AutoencoderKL folder
(a pipeline's `vae/`) into this module and `diffax.convert.save` writes one back.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffax.models.attention import BACKENDS
from diffax.models.config_base import DiffusersConfig
from diffax.models.layers import IMAGE_AXES, GroupNorm, conv
from diffax.models.registry import ModelFamily, register
from diffax.models.unet_blocks import Downsample2D, ResnetBlock2D, UNetMidBlock2D, Upsample2D

Dtype = Any

DOWN_BLOCKS = ("DownEncoderBlock2D",)
UP_BLOCKS = ("UpDecoderBlock2D",)
EPS = 1e-6  # every norm of diffusers' Encoder / Decoder
TILE_OVERLAP = 0.25  # diffusers' tile_overlap_factor


@flax.struct.dataclass
class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)) per latent element: diffusers'
    `DiagonalGaussianDistribution`, NHWC. `logvar` is clipped to [-30, 20] as there."""
    mean: jax.Array    # [B, h, w, C]
    logvar: jax.Array  # [B, h, w, C]

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        """Splits the encoder's [B, h, w, 2C] output into mean and log-variance (first and second half)."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        """mean + std * eps with eps ~ N(0, 1) drawn from `key`; [B, h, w, C]."""
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self, other: "DiagonalGaussian | None" = None) -> jax.Array:
        """KL(self || other) summed over each latent, [B]; `other=None` is the standard normal."""
        if other is None:
            terms = jnp.square(self.mean) + self.var - 1.0 - self.logvar
        else:
            terms = (jnp.square(self.mean - other.mean) / other.var + self.var / other.var - 1.0
                     - self.logvar + other.logvar)
        return 0.5 * terms.sum(axis=(1, 2, 3))

    def nll(self, sample: jax.Array) -> jax.Array:
        """Negative log-likelihood of `sample` [B, h, w, C] summed over each latent, [B]."""
        terms = np.log(2.0 * np.pi) + self.logvar + jnp.square(sample - self.mean) / self.var
        return 0.5 * terms.sum(axis=(1, 2, 3))


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig(DiffusersConfig):
    """diffusers' AutoencoderKL config (same keys, same defaults) plus diffax's runtime fields.

    Only the values this module implements are accepted; anything else raises ValueError naming the key.
    `scaling_factor`, `shift_factor`, `latents_mean` and `latents_std` do not change the module: they are
    the latent normalisation `scale_latents` / `unscale_latents` apply.
    """
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    # diffax-only
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_backend: str = "auto"

    class_name: ClassVar[str] = "AutoencoderKL"

    def __post_init__(self):
        for name in ("down_block_types", "up_block_types", "block_out_channels", "latents_mean", "latents_std"):
            value = getattr(self, name)  # JSON gives lists; a flax module attribute must be hashable.
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        self._validate()

    def _validate(self) -> None:
        def bad(key: str, expected: str) -> ValueError:
            return ValueError(f"{key}={getattr(self, key)!r} is not supported (expected {expected})")

        if self.act_fn not in ("silu", "swish"):
            raise bad("act_fn", "'silu' or 'swish'")
        if self.attention_backend not in BACKENDS:
            raise bad("attention_backend", " or ".join(repr(b) for b in BACKENDS))
        for key, allowed in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
            if any(t not in allowed for t in getattr(self, key)):
                raise bad(key, f"names from {list(allowed)}")
        n = len(self.block_out_channels)
        if n == 0 or len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise bad("block_out_channels", f"one entry per down and up block type, "
                      f"{len(self.down_block_types)} down and {len(self.up_block_types)} up given")
        for key in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "sample_size"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise bad(key, "a positive int")
        groups = self.norm_num_groups
        if not isinstance(groups, int) or groups < 1 or any(c % groups for c in self.block_out_channels):
            raise bad("norm_num_groups", f"a positive int dividing every block_out_channels "
                      f"{self.block_out_channels}")
        for key in ("latents_mean", "latents_std"):
            value = getattr(self, key)
            if value is not None and (len(value) != self.latent_channels or not np.isfinite(value).all()):
                raise bad(key, f"null or {self.latent_channels} finite values, one per latent channel")
        if self.latents_std is not None and 0 in self.latents_std:
            raise bad("latents_std", "non-zero values")
        if not np.isfinite(self.scaling_factor) or self.scaling_factor == 0:
            raise bad("scaling_factor", "a finite non-zero float")
        if self.shift_factor is not None and not np.isfinite(self.shift_factor):
            raise bad("shift_factor", "a finite float or null")

    @property
    def compute_dtype(self) -> Any:
        """The dtype the model computes in: float32 when `force_upcast` meets `dtype=float16`, else `dtype`."""
        return jnp.float32 if self.force_upcast and jnp.dtype(self.dtype) == jnp.float16 else self.dtype

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each side: 2 ** (number of blocks - 1)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def tile_sample_min_size(self) -> int:
        """Side of an image tile in tiled encode / decode (diffusers: `sample_size`)."""
        return self.sample_size

    @property
    def tile_latent_min_size(self) -> int:
        """Side of a latent tile (diffusers: int(sample_size / downsample_factor))."""
        return int(self.sample_size / self.downsample_factor)

    def init_inputs(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """One image of one latent pixel's size: parameter shapes do not depend on the spatial size."""
        side = self.downsample_factor
        return (jnp.zeros((1, side, side, self.in_channels), self.dtype),), {}

    def _latent_stats(self) -> tuple[Any, Any]:
        """(shift, scale) with latents_for_diffusion = (z - shift) * scale, per channel or scalar."""
        if self.latents_mean is not None and self.latents_std is not None:
            # diffusers' SDXL-style pipelines use the pair only when both are set, and then no shift_factor.
            mean = jnp.asarray(self.latents_mean, jnp.float32)
            return mean, self.scaling_factor / jnp.asarray(self.latents_std, jnp.float32)
        return (self.shift_factor or 0.0), self.scaling_factor

    def scale_latents(self, z: jax.Array) -> jax.Array:
        """VAE latents [..., C] -> the diffusion model's latents: (z - shift) * scaling_factor, where shift is
        `shift_factor` (SD3 / Flux) or 0 (SD 1.x / 2.x / SDXL); with `latents_mean` and `latents_std` both set,
        (z - latents_mean) * scaling_factor / latents_std per channel."""
        shift, scale = self._latent_stats()
        return ((z - shift) * scale).astype(z.dtype)

    def unscale_latents(self, latents: jax.Array) -> jax.Array:
        """The inverse of `scale_latents`: the diffusion model's latents -> what `decode` takes."""
        shift, scale = self._latent_stats()
        return (latents / scale + shift).astype(latents.dtype)


class DownEncoderBlock2D(nn.Module):
    """`num_layers` resnets (`resnets_i`, no time embedding), then an optional `downsamplers_0` padded like
    torch's (0, 1, 0, 1) when `downsample_padding=0`: diffusers' DownEncoderBlock2D."""
    out_channels: int
    num_layers: int = 1
    groups: int = 32
    add_downsample: bool = True
    downsample_padding: int = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), out_channels]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, EPS, name=f"resnets_{i}", **kw)(x, None)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, self.downsample_padding, name="downsamplers_0", **kw)(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """`num_layers` resnets (`resnets_i`, no time embedding, no skips), then an optional `upsamplers_0`:
    diffusers' UpDecoderBlock2D."""
    out_channels: int
    num_layers: int = 1
    groups: int = 32
    add_upsample: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, 2H, 2W, out_channels]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, EPS, name=f"resnets_{i}", **kw)(x, None)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, name="upsamplers_0", **kw)(x)
        return x


def _mid_block(channels: int, groups: int, add_attention: bool, attention_backend: str, **kw: Any) -> UNetMidBlock2D:
    """resnet, one-head self-attention over H*W (diffusers' attention_head_dim = channels), resnet."""
    return UNetMidBlock2D(attention_head_dim=channels if add_attention else None, groups=groups, eps=EPS,
                          attention_backend=attention_backend, name="mid_block",
                          **kw)


class Encoder(nn.Module):
    """conv_in -> down blocks -> mid block -> conv_norm_out -> SiLU -> conv_out: diffusers' `Encoder`.
    With `double_z`, conv_out gives 2 x `out_channels` (the posterior's mean and log-variance)."""
    out_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int = 2
    groups: int = 32
    double_z: bool = True
    mid_block_add_attention: bool = True
    attention_backend: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C_in] -> [B, H/f, W/f, (2 x) out_channels]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.with_logical_constraint(conv(self.block_out_channels[0], 3, padding=1, name="conv_in", **kw)(x),
                                       IMAGE_AXES)
        last = len(self.block_out_channels) - 1
        for i, channels in enumerate(self.block_out_channels):
            x = DownEncoderBlock2D(channels, self.layers_per_block, self.groups, add_downsample=i < last,
                                   downsample_padding=0, name=f"down_blocks_{i}", **kw)(x)
        x = _mid_block(self.block_out_channels[-1], self.groups, self.mid_block_add_attention,
                       self.attention_backend, **kw)(x, None)
        x = nn.silu(GroupNorm(self.groups, EPS, name="conv_norm_out", **kw)(x))
        channels = 2 * self.out_channels if self.double_z else self.out_channels
        return conv(channels, 3, padding=1, name="conv_out", **kw)(x)


class Decoder(nn.Module):
    """conv_in -> mid block -> up blocks (`layers_per_block + 1` resnets each) -> conv_norm_out -> SiLU ->
    conv_out: diffusers' `Decoder` with norm_type='group'."""
    out_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int = 2
    groups: int = 32
    mid_block_add_attention: bool = True
    attention_backend: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:  # [B, h, w, C_latent] -> [B, h*f, w*f, out_channels]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.with_logical_constraint(conv(self.block_out_channels[-1], 3, padding=1, name="conv_in", **kw)(z),
                                       IMAGE_AXES)
        x = _mid_block(self.block_out_channels[-1], self.groups, self.mid_block_add_attention,
                       self.attention_backend, **kw)(x, None)
        last = len(self.block_out_channels) - 1
        for i, channels in enumerate(reversed(self.block_out_channels)):
            x = UpDecoderBlock2D(channels, self.layers_per_block + 1, self.groups, add_upsample=i < last,
                                 name=f"up_blocks_{i}", **kw)(x)
        x = nn.silu(GroupNorm(self.groups, EPS, name="conv_norm_out", **kw)(x))
        return conv(self.out_channels, 3, padding=1, name="conv_out", **kw)(x)


def _blend_weights(n: int, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """(weight of the earlier tile, weight of the later tile) for the n blended lines: 1 - y/n and y/n,
    rounded to float32 from float64 as torch rounds its Python-float factors."""
    y = np.arange(n) / n
    return jnp.asarray((1 - y).astype(np.float32), dtype), jnp.asarray(y.astype(np.float32), dtype)


def _blend(a: jax.Array, b: jax.Array, extent: int, axis: int) -> jax.Array:
    """diffusers' blend_v (axis 1) / blend_h (axis 2) in NHWC: the first `extent` lines of tile `b` fade in
    from the last `extent` lines of tile `a`."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent == 0:
        return b
    wa, wb = _blend_weights(extent, b.dtype)
    shape = [1, 1, 1, 1]
    shape[axis] = extent
    wa, wb = wa.reshape(shape), wb.reshape(shape)
    tail = jax.lax.slice_in_dim(a, a.shape[axis] - extent, a.shape[axis], axis=axis)
    head = jax.lax.slice_in_dim(b, 0, extent, axis=axis)
    rest = jax.lax.slice_in_dim(b, extent, b.shape[axis], axis=axis)
    return jnp.concatenate([tail * wa + head * wb, rest], axis=axis)


def tiled_apply(map_tiles: Callable[[jax.Array], jax.Array], x: jax.Array, tile_in: int, tile_out: int) -> jax.Array:
    """A function over overlapping tiles of `x`, blended like diffusers' AutoencoderKL tiled encode / decode.

    Tiles of side `tile_in` start every int(tile_in * 0.75) rows and columns (the last ones cut at the
    border). `map_tiles` maps a stack of same-shape tiles [N, B, h, w, C] to their outputs [N, B, h', w', C']
    of side up to `tile_out` (e.g. `lambda xs: jax.lax.map(fn, xs)`). Each output's first quarter
    (int(tile_out * 0.25) lines) is blended linearly with the tile above, then with the tile to the left
    (already blended, as diffusers' in-place loop does), and its first `tile_out - blend` lines are kept.

    x: [B, H, W, C] -> [B, H', W', C'] (H' = H * tile_out / tile_in when the tiles divide evenly).
    """
    stride = int(tile_in * (1 - TILE_OVERLAP))
    extent = int(tile_out * TILE_OVERLAP)
    limit = tile_out - extent
    if stride < 1 or limit < 1:
        raise ValueError(f"tiling needs tiles of at least 2 pixels, got {tile_in} -> {tile_out} (an AutoencoderKL's "
                         f"config sets them: sample_size and sample_size / 2**(len(block_out_channels) - 1))")
    rows, cols = range(0, x.shape[1], stride), range(0, x.shape[2], stride)
    tiles = {(i, j): x[:, r:r + tile_in, c:c + tile_in] for i, r in enumerate(rows) for j, c in enumerate(cols)}
    # Tiles cut at the border have other shapes; each shape is mapped as one stack, one tile at a time.
    by_shape: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    for ij, tile in tiles.items():
        by_shape.setdefault(tile.shape, []).append(ij)
    raw = {}
    for ijs in by_shape.values():
        out = map_tiles(jnp.stack([tiles[ij] for ij in ijs]))  # [N, B, h, w, C']
        raw.update({ij: out[k] for k, ij in enumerate(ijs)})
    blended: dict[tuple[int, int], jax.Array] = {}
    result_rows = []
    for i in range(len(rows)):
        row = []
        for j in range(len(cols)):
            tile = raw[i, j]
            if i > 0:
                tile = _blend(blended[i - 1, j], tile, extent, axis=1)
            if j > 0:
                tile = _blend(blended[i, j - 1], tile, extent, axis=2)
            blended[i, j] = tile
            row.append(tile[:, :limit, :limit])
        result_rows.append(jnp.concatenate(row, axis=2))
    return jnp.concatenate(result_rows, axis=1)


class AutoencoderKL(nn.Module):
    """diffusers' AutoencoderKL in NHWC; see the module docstring. Parameter names follow its state dict
    (`encoder`, `quant_conv`, `post_quant_conv`, `decoder`)."""
    config: AutoencoderKLConfig

    def setup(self):
        cfg = self.config
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.param_dtype)
        common = dict(block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
                      groups=cfg.norm_num_groups, mid_block_add_attention=cfg.mid_block_add_attention,
                      attention_backend=cfg.attention_backend, **kw)
        self.encoder = Encoder(cfg.latent_channels, double_z=True, **common)
        self.decoder = Decoder(cfg.out_channels, **common)
        lat = cfg.latent_channels
        self.quant_conv = conv(2 * lat, 1, padding=0, **kw) if cfg.use_quant_conv else None
        self.post_quant_conv = conv(lat, 1, padding=0, **kw) if cfg.use_post_quant_conv else None

    def _check(self, x: jax.Array, channels: int, what: str) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ValueError(f"AutoencoderKL: {what} must be [B, H, W, {channels}] (NHWC), got {x.shape}")
        return x.astype(self.config.compute_dtype)

    def moments(self, x: jax.Array) -> jax.Array:
        """Encoder and quant_conv on images [B, H, W, in_channels] -> [B, h, w, 2 x latent_channels] (mean,
        then log-variance before clipping); diffusers' `_encode` without tiling or slicing."""
        h = self.encoder(x)
        return h if self.quant_conv is None else self.quant_conv(h)

    def decode_raw(self, z: jax.Array) -> jax.Array:
        """post_quant_conv and decoder on latents [B, h, w, latent_channels] -> [B, H, W, out_channels];
        diffusers' `_decode` without tiling or slicing."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def _one_at_a_time(self, method: str, xs: jax.Array) -> jax.Array:
        """`method` over the leading axis of `xs`, sequentially with shared params (a `lax.map` that flax
        can lift): peak memory is one element's."""
        def body(module: "AutoencoderKL", carry: None, x: jax.Array) -> tuple[None, jax.Array]:
            return carry, getattr(module, method)(x)

        scan = nn.scan(body, variable_broadcast="params", split_rngs={"params": False}, in_axes=0, out_axes=0)
        return scan(self, None, xs)[1]

    def _per_image(self, method: str, x: jax.Array) -> jax.Array:
        """`method` on one image of the batch at a time (diffusers' slicing); [B, ...] -> [B, ...]."""
        out = self._one_at_a_time(method, x[:, None])  # [B, 1, ...]
        return out.reshape(out.shape[0], *out.shape[2:])

    def _tiled_moments(self, x: jax.Array) -> jax.Array:
        """`moments` through overlapping tiles (diffusers' `_tiled_encode`)."""
        cfg = self.config
        return tiled_apply(lambda xs: self._one_at_a_time("moments", xs), x, cfg.tile_sample_min_size,
                           cfg.tile_latent_min_size)

    def _tiled_decode_raw(self, z: jax.Array) -> jax.Array:
        """`decode_raw` through overlapping tiles (diffusers' `tiled_decode`)."""
        cfg = self.config
        return tiled_apply(lambda zs: self._one_at_a_time("decode_raw", zs), z, cfg.tile_latent_min_size,
                           cfg.tile_sample_min_size)

    def _moments_tiling(self, x: jax.Array) -> jax.Array:
        """diffusers' `_encode` after `enable_tiling()`: tiles only an image larger than one tile."""
        large = max(x.shape[1:3]) > self.config.tile_sample_min_size
        return self._tiled_moments(x) if large else self.moments(x)

    def _decode_raw_tiling(self, z: jax.Array) -> jax.Array:
        """diffusers' `_decode` after `enable_tiling()`: tiles only latents larger than one tile."""
        large = max(z.shape[1:3]) > self.config.tile_latent_min_size
        return self._tiled_decode_raw(z) if large else self.decode_raw(z)

    def _batch(self, method: str, x: jax.Array, sliced: bool) -> jax.Array:
        """`method` on the whole batch, or with `sliced` on one image at a time."""
        return self._per_image(method, x) if sliced and x.shape[0] > 1 else getattr(self, method)(x)

    def encode(self, x: jax.Array, *, tiled: bool = False, sliced: bool = False) -> DiagonalGaussian:
        """The posterior over latents of images x [B, H, W, in_channels] (diffusers' `encode`).

        tiled: encode overlapping `sample_size` tiles when the image is larger than one (diffusers'
            `enable_tiling()`); sliced: one image at a time (`enable_slicing()`).
        Returns a `DiagonalGaussian` with mean / logvar [B, H/f, W/f, latent_channels], f the downsample factor.
        """
        x = self._check(x, self.config.in_channels, "images")
        return DiagonalGaussian.from_moments(self._batch("_moments_tiling" if tiled else "moments", x, sliced))

    def decode(self, z: jax.Array, *, tiled: bool = False, sliced: bool = False) -> jax.Array:
        """Images [B, h*f, w*f, out_channels] of raw (unscaled) latents z [B, h, w, latent_channels]
        (diffusers' `decode`); `tiled` and `sliced` as in `encode`."""
        z = self._check(z, self.config.latent_channels, "latents")
        return self._batch("_decode_raw_tiling" if tiled else "decode_raw", z, sliced)

    def tiled_encode(self, x: jax.Array) -> DiagonalGaussian:
        """`encode` through overlapping tiles whatever the image size (diffusers' `tiled_encode`)."""
        return DiagonalGaussian.from_moments(self._tiled_moments(self._check(x, self.config.in_channels, "images")))

    def tiled_decode(self, z: jax.Array) -> jax.Array:
        """`decode` through overlapping tiles whatever the latent size (diffusers' `tiled_decode`)."""
        return self._tiled_decode_raw(self._check(z, self.config.latent_channels, "latents"))

    def __call__(self, sample: jax.Array, *, sample_posterior: bool = False, key: jax.Array | None = None,
                 tiled: bool = False, sliced: bool = False) -> jax.Array:
        """Encode, take the posterior's mode (or a sample drawn with `key`), decode: diffusers' forward.

        sample: [B, H, W, in_channels] -> [B, H, W, out_channels] (H, W divisible by the downsample factor
        for the output to keep their size).
        """
        posterior = self.encode(sample, tiled=tiled, sliced=sliced)
        if sample_posterior:
            if key is None:
                raise ValueError("AutoencoderKL: sample_posterior=True needs a key")
            z = posterior.sample(key)
        else:
            z = posterior.mode()
        return self.decode(z, tiled=tiled, sliced=sliced)


register(ModelFamily("AutoencoderKL", AutoencoderKLConfig, AutoencoderKL, aliases=("vae",)))
