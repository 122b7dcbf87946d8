"""Flax models, and `build_model`, which turns a run config's `model` block into one.

The `model` block names the family and carries that family's keys:
  name='unet2d': diffusers' UNet2DModel config.json keys (see diffax.models.unet2d.UNet2DConfig)
  name='dit':    an optional `preset` ('DiT-S/2' ... 'DiT-XL/8') and DiTConfig fields
plus `dtype` / `param_dtype` as strings ('float32', 'bfloat16'). Every family's module has the call
signature `(sample [B, H, W, C], timesteps [B], class_labels [B] | None, *, train) -> [B, H, W, C_out]`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from diffax.models.dit import DiT, DiTConfig
from diffax.models.unet2d import UNet2DConfig, UNet2DModel

FAMILIES = ("unet2d", "dit")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A built model and the facts about it that training and sampling need."""
    module: nn.Module
    config: Any                  # UNet2DConfig | DiTConfig
    image_shape: tuple[int, int, int]   # [H, W, C] of the model's input
    num_classes: int             # real classes (0: unconditional)
    null_class: int | None       # label id for "no class" (classifier-free guidance), None if unconditional
    learn_sigma: bool            # output holds [prediction, variance interpolation] (2C channels)

    def init_boxed(self, key: jax.Array) -> Any:
        """Parameters with their logical-partitioning boxes (use under jax.eval_shape for shapes only)."""
        h, w, c = self.image_shape
        labels = None if self.num_classes == 0 else jnp.zeros((1,), jnp.int32)
        return self.module.init(key, jnp.zeros((1, h, w, c)), jnp.zeros((1,)), labels)["params"]

    def apply(self, params: Any, x: jax.Array, t: jax.Array, labels: jax.Array | None, *, train: bool = False,
              rngs: dict[str, jax.Array] | None = None) -> jax.Array:
        """The model's output for noisy `x` [B, H, W, C] at timesteps `t` [B]."""
        return self.module.apply({"params": params}, x, t, labels, train=train, rngs=rngs)


def _dtype(name: str) -> jnp.dtype:
    try:
        return jnp.dtype(name)
    except TypeError:
        raise ValueError(f"model.dtype / model.param_dtype: unknown dtype {name!r} "
                         f"(use 'float32', 'bfloat16' or 'float16')") from None


def model_spec(cfg: UNet2DConfig | DiTConfig) -> ModelSpec:
    """The ModelSpec of a model config (e.g. one read from a converted checkpoint)."""
    if isinstance(cfg, UNet2DConfig):
        if cfg.sample_size is None:
            raise ValueError("model.sample_size: required to sample or train a unet2d (the image side)")
        side = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        n = cfg.num_class_embeds
        return ModelSpec(UNet2DModel(cfg), cfg, (side, side, cfg.in_channels),
                         num_classes=0 if n is None else n - 1, null_class=None if n is None else n - 1,
                         learn_sigma=cfg.out_channels == 2 * cfg.in_channels)
    if isinstance(cfg, DiTConfig):
        return ModelSpec(DiT(cfg), cfg, (cfg.input_size, cfg.input_size, cfg.in_channels),
                         num_classes=cfg.num_classes,
                         null_class=cfg.num_classes if cfg.class_dropout_prob > 0 else None,
                         learn_sigma=cfg.learn_sigma)
    raise TypeError(f"no ModelSpec for {type(cfg).__name__}")


def build_model(config: ml_collections.ConfigDict | dict) -> ModelSpec:
    """A ModelSpec from the `model` block of a run config (also the JSON saved in a checkpoint)."""
    fields = dict(config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config)
    name = fields.pop("name", None)
    dtypes = {k: _dtype(fields.pop(k)) for k in ("dtype", "param_dtype") if k in fields}
    if name == "unet2d":
        return model_spec(UNet2DConfig.from_diffusers(fields, **dtypes))
    if name == "dit":
        preset = fields.pop("preset", None)
        for key in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads",
                    "num_classes"):
            if key in fields and not isinstance(fields[key], int):
                raise ValueError(f"model.{key} must be an int, got {fields[key]!r}")
        try:
            cfg = DiTConfig.preset(preset, **fields, **dtypes) if preset else DiTConfig(**fields, **dtypes)
        except TypeError as e:  # an unknown field
            raise ValueError(f"model: {e}") from None
        return model_spec(cfg)
    raise ValueError(f"model.name must be one of {FAMILIES}, got {name!r}")
