"""ControlNet (NHWC): diffusers' ControlNetModel, with its config.json keys and parameter names.

A ControlNet is a copy of a UNet2DConditionModel's encoder half (conv_in, time and added embeddings, down
blocks, mid block; built by the U-Net's own helpers in unet2d_condition.py, so the parameter names are
the same) that also sees a conditioning image, and returns residuals for the U-Net's skips:

    cn, cn_params = diffax.convert.load("sd-controlnet-canny")
    down, mid = cn.apply({"params": cn_params}, latents, t, encoder_hidden_states=text,
                         controlnet_cond=image, conditioning_scale=1.0)   # image [B, 8H, 8W, 3] in [0, 1]
    eps = unet.apply({"params": unet_params}, latents, t, encoder_hidden_states=text,
                     down_block_additional_residuals=down, mid_block_additional_residual=mid)

The image goes through `controlnet_cond_embedding` (3x3 convs with SiLU between, stride 2 between widths,
a zero-initialised conv_out) and is added to conv_in's output. Each skip activation then goes through a
zero-initialised 1x1 conv `controlnet_down_blocks_{i}`, the mid block's output through
`controlnet_mid_block`, so a fresh ControlNet (`ControlNetConfig.from_unet` + `params_from_unet`) leaves
the U-Net's output unchanged at the start of training.

Registered as 'ControlNetModel' (alias 'controlnet'); `diffax.convert.load` / `save` read and write
diffusers folders. `apply_multi_controlnet` sums several ControlNets' residuals (diffusers'
MultiControlNetModel).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffax.models.config_base import DiffusersConfig
from diffax.models.layers import IMAGE_AXES, conv
from diffax.models.remat import check_policy
from diffax.models.registry import ModelFamily, init_params, register
from diffax.models.unet2d_condition import UNet2DConditionConfig, down_blocks, embed_time, mid_block

Dtype = Any
Params = Any
IntOrTuple = int | tuple[int, ...]

CHANNEL_ORDERS = ("rgb", "bgr")
_UP_OF_DOWN = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
# The top-level parameters a ControlNet shares with its U-Net (diffusers' `from_unet` copies these).
UNET_PARAMS = ("conv_in", "time_embedding", "class_embedding", "add_embedding", "mid_block")


@dataclasses.dataclass(frozen=True)
class ControlNetConfig(DiffusersConfig):
    """diffusers' ControlNetModel config (same keys, same defaults: SD 1.x's) plus diffax's runtime fields.

    The U-Net keys are checked as UNet2DConditionConfig checks them (`unet_config` is that config); a value
    diffax does not implement raises ValueError naming the key. `global_pool_conditions` (shuffle
    ControlNets) averages every residual over H and W.
    """
    in_channels: int = 4
    conditioning_channels: int = 3
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                         "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int | None = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: IntOrTuple = 1
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    attention_head_dim: IntOrTuple = 8
    num_attention_heads: IntOrTuple | None = None
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    projection_class_embeddings_input_dim: int | None = None
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_pool_conditions: bool = False
    addition_embed_type_num_heads: int = 64
    # diffax-only
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_backend: str = "auto"
    remat: str | bool = "none"  # rematerialisation policy of the down and mid blocks (diffax/models/remat.py)

    class_name: ClassVar[str] = "ControlNetModel"
    runtime_fields: ClassVar[tuple[str, ...]] = ("dtype", "param_dtype", "attention_backend", "remat")

    def __post_init__(self):
        object.__setattr__(self, "remat", check_policy(self.remat))
        self.unet_config  # noqa: B018  (validates the U-Net keys, naming the bad one)
        if self.controlnet_conditioning_channel_order not in CHANNEL_ORDERS:
            raise ValueError(f"controlnet_conditioning_channel_order="
                             f"{self.controlnet_conditioning_channel_order!r} is not supported (expected 'rgb' or "
                             f"'bgr')")
        if not self.conditioning_embedding_out_channels or min(self.conditioning_embedding_out_channels) < 1:
            raise ValueError(f"conditioning_embedding_out_channels={self.conditioning_embedding_out_channels!r} is "
                             f"not supported (expected a non-empty tuple of positive widths)")
        if self.conditioning_channels < 1:
            raise ValueError(f"conditioning_channels={self.conditioning_channels!r} is not supported (expected a "
                             f"positive int)")

    @functools.cached_property
    def unet_config(self) -> UNet2DConditionConfig:
        """The UNet2DConditionConfig whose encoder half this ControlNet copies (up blocks mirrored)."""
        unet_keys = {f.name for f in dataclasses.fields(UNet2DConditionConfig)}
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in unet_keys}
        up = tuple(_UP_OF_DOWN.get(t, t) for t in reversed(self.down_block_types))
        return UNet2DConditionConfig(**shared, up_block_types=up)

    @classmethod
    def from_unet(cls, unet: UNet2DConditionConfig, controlnet_conditioning_channel_order: str = "rgb",
                  conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
                  conditioning_channels: int = 3) -> "ControlNetConfig":
        """The ControlNet of a U-Net: its encoder keys copied, as diffusers' `ControlNetModel.from_unet`
        does (global_pool_conditions and addition_embed_type_num_heads keep their defaults), and its runtime
        fields (dtypes, attention backend, remat), so the pair runs alike."""
        for key, ok in (("conv_in_kernel", unet.conv_in_kernel == 3),
                        ("time_embedding_dim", unet.time_embedding_dim in (None, 4 * unet.block_out_channels[0])),
                        ("layers_per_block", isinstance(unet.layers_per_block, int)),
                        ("cross_attention_dim", isinstance(unet.cross_attention_dim, int))):
            if not ok:
                raise ValueError(f"ControlNetConfig.from_unet: the U-Net's {key}={getattr(unet, key)!r} has no "
                                 f"ControlNet counterpart (diffusers' ControlNetModel fixes it)")
        shared = {f.name: getattr(unet, f.name) for f in dataclasses.fields(cls)
                  if f.name in {u.name for u in dataclasses.fields(unet)}
                  and f.name != "addition_embed_type_num_heads"}
        return cls(**shared, controlnet_conditioning_channel_order=controlnet_conditioning_channel_order,
                   conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
                   conditioning_channels=conditioning_channels)

    @property
    def conditioning_factor(self) -> int:
        """How much larger the conditioning image is than the latents (8 for the default embedding)."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    def init_inputs(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        sample, timesteps, cond = self.unet_config.example_inputs()
        _, h, w, _ = sample.shape
        f = self.conditioning_factor
        cond["controlnet_cond"] = jnp.zeros((1, h * f, w * f, self.conditioning_channels), self.dtype)
        return (sample, timesteps), cond


class ControlNetConditioningEmbedding(nn.Module):
    """conv_in -> SiLU -> (blocks_{2i}: 3x3 conv, SiLU, blocks_{2i+1}: stride-2 3x3 conv to the next width,
    SiLU)... -> conv_out (zero-initialised): diffusers' ControlNetConditioningEmbedding."""
    out_channels: int
    block_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # x: [B, H, W, conditioning_channels] -> [B, H / 2^(n-1), W / 2^(n-1), out_channels]
        kw = dict(padding=1, dtype=self.dtype, param_dtype=self.param_dtype)
        widths = self.block_out_channels
        x = nn.silu(conv(widths[0], 3, name="conv_in", **kw)(x))
        for i in range(len(widths) - 1):
            x = nn.silu(conv(widths[i], 3, name=f"blocks_{2 * i}", **kw)(x))
            x = nn.silu(conv(widths[i + 1], 3, strides=2, name=f"blocks_{2 * i + 1}", **kw)(x))
        return conv(self.out_channels, 3, kernel_init=nn.initializers.zeros, name="conv_out", **kw)(x)


class ControlNetModel(nn.Module):
    """diffusers' ControlNetModel in NHWC; see the module docstring. Parameter names follow its state dict."""
    config: ControlNetConfig

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array | float, *, encoder_hidden_states: jax.Array,
                 controlnet_cond: jax.Array, conditioning_scale: float | jax.Array = 1.0,
                 added_cond_kwargs: dict[str, jax.Array] | None = None, class_labels: jax.Array | None = None,
                 guess_mode: bool = False, train: bool = False) -> tuple[tuple[jax.Array, ...], jax.Array]:
        """The U-Net residuals for one conditioning image.

        Args:
            sample: [B, H, W, in_channels] noisy latents (as the U-Net gets them).
            timesteps: [B] or a scalar.
            encoder_hidden_states: [B, Lk, cross_attention_dim].
            controlnet_cond: [B, f*H, f*W, conditioning_channels] (f = `config.conditioning_factor`, 8 by
                default), in the channel order the config names (a 'bgr' model flips it).
            conditioning_scale: multiplies every residual.
            added_cond_kwargs, class_labels: as UNet2DConditionModel takes them.
            guess_mode: scales the residuals by 10^-1 ... 10^0 from the first skip to the mid block (times
                conditioning_scale), as diffusers does for prompt-free control; ignored with
                global_pool_conditions.
            train: enables dropout (needs the 'dropout' rng).
        Returns:
            (down_block_res_samples, mid_block_res_sample): one [B, h, w, c] map per U-Net skip activation,
            and [B, H / 2^(n-1), W / 2^(n-1), block_out_channels[-1]]; [B, 1, 1, c] each with
            global_pool_conditions.
        """
        cfg = self.config
        ucfg = cfg.unet_config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        n_blocks = len(cfg.block_out_channels)
        factor = 2 ** (n_blocks - 1)
        shape = sample.shape
        if len(shape) != 4 or shape[3] != cfg.in_channels or shape[1] % factor or shape[2] % factor:
            raise ValueError(f"ControlNetModel: sample must be [B, H, W, {cfg.in_channels}] with H, W divisible "
                             f"by {factor}; got {sample.shape}")
        b, h, w, _ = shape
        f = cfg.conditioning_factor
        want = (b, h * f, w * f, cfg.conditioning_channels)
        if tuple(controlnet_cond.shape) != want:
            raise ValueError(f"ControlNetModel: controlnet_cond must be {list(want)} (the sample's size times {f}, "
                             f"conditioning_channels={cfg.conditioning_channels}); got {controlnet_cond.shape}")
        timesteps = jnp.asarray(timesteps)
        if timesteps.ndim > 1 or timesteps.size not in (1, b):
            raise ValueError(f"ControlNetModel: timesteps must be a scalar or [{b}], got shape {timesteps.shape}")
        timesteps = jnp.broadcast_to(timesteps.reshape(-1), (b,))
        if cfg.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = controlnet_cond[..., ::-1]

        emb = embed_time(ucfg, timesteps, class_labels, added_cond_kwargs, owner="ControlNetModel")
        x = conv(cfg.block_out_channels[0], 3, padding=1, name="conv_in", **kw)(sample)
        x = x + ControlNetConditioningEmbedding(cfg.block_out_channels[0], cfg.conditioning_embedding_out_channels,
                                                name="controlnet_cond_embedding", **kw)(
            controlnet_cond.astype(cfg.dtype))
        x = nn.with_logical_constraint(x, IMAGE_AXES)
        x, skips = down_blocks(ucfg, x, emb, encoder_hidden_states, train=train)
        x = mid_block(ucfg, x, emb, encoder_hidden_states, train=train)

        def zero_conv(name: str, y: jax.Array) -> jax.Array:
            return conv(y.shape[-1], 1, padding=0, kernel_init=nn.initializers.zeros, name=name, **kw)(y)

        down = [zero_conv(f"controlnet_down_blocks_{i}", s) for i, s in enumerate(skips)]
        mid = zero_conv("controlnet_mid_block", x)
        if guess_mode and not cfg.global_pool_conditions:
            # diffusers: torch.logspace(-1, 0, len(down) + 1); the mid residual takes the last (1.0).
            scales = jnp.logspace(-1.0, 0.0, len(down) + 1, dtype=jnp.float32) * conditioning_scale
            down = [(r * s).astype(r.dtype) for r, s in zip(down, scales)]
            mid = (mid * scales[-1]).astype(mid.dtype)
        else:
            down = [r * conditioning_scale for r in down]
            mid = mid * conditioning_scale
        if cfg.global_pool_conditions:
            down = [r.mean(axis=(1, 2), keepdims=True) for r in down]
            mid = mid.mean(axis=(1, 2), keepdims=True)
        return tuple(down), mid


def apply_multi_controlnet(nets: Sequence[tuple[ControlNetModel, Params]], sample: jax.Array,
                           timesteps: jax.Array | float, *, controlnet_cond: Sequence[jax.Array],
                           conditioning_scale: Sequence[float | jax.Array], **kwargs: Any,
                           ) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """Several ControlNets, each with its own image and scale, their residuals summed: diffusers'
    MultiControlNetModel. `nets` holds (module, params) pairs; `kwargs` (encoder_hidden_states,
    added_cond_kwargs, guess_mode, ...) go to every net."""
    if not nets or len(controlnet_cond) != len(nets) or len(conditioning_scale) != len(nets):
        raise ValueError(f"apply_multi_controlnet: one controlnet_cond and one conditioning_scale per net; got "
                         f"{len(nets)} nets, {len(controlnet_cond)} images, {len(conditioning_scale)} scales")
    total_down, total_mid = None, None
    for (module, params), image, scale in zip(nets, controlnet_cond, conditioning_scale):
        down, mid = module.apply({"params": params}, sample, timesteps, controlnet_cond=image,
                                 conditioning_scale=scale, **kwargs)
        if total_down is None:
            total_down, total_mid = down, mid
        else:
            total_down = tuple(a + d for a, d in zip(total_down, down))
            total_mid = total_mid + mid
    return total_down, total_mid


def params_from_unet(config: ControlNetConfig, unet_params: Params, key: jax.Array) -> Params:
    """Fresh ControlNet parameters whose encoder half is a copy of the U-Net's (conv_in, the time, class and
    added embeddings, down and mid blocks), as diffusers' `ControlNetModel.from_unet` loads them: the
    conditioning embedding is random (its conv_out zero), the zero convolutions zero. `config` is usually
    `ControlNetConfig.from_unet(unet_config)`."""
    params = dict(init_params(config, key))
    shared = [k for k in params if k in UNET_PARAMS or k.startswith("down_blocks_")]
    missing = [k for k in shared if k not in unet_params]
    if missing:
        raise ValueError(f"params_from_unet: the U-Net params lack {missing}; was the ControlNet config made by "
                         f"ControlNetConfig.from_unet of this U-Net's config?")
    for k in shared:
        want = jax.tree.map(jnp.shape, params[k])
        got = jax.tree.map(jnp.shape, unet_params[k])
        if want != got:
            raise ValueError(f"params_from_unet: U-Net params {k!r} do not have the ControlNet's shapes")
        params[k] = jax.tree.map(lambda a, p: jnp.asarray(a, p.dtype), unet_params[k], params[k])
    return params


register(ModelFamily("ControlNetModel", ControlNetConfig, ControlNetModel, aliases=("controlnet",)))
