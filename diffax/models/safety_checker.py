"""Stable Diffusion's safety checker: diffusers' `StableDiffusionSafetyChecker` in Flax, with its parameter
names.

    module, params = diffax.convert.load("sd-folder/safety_checker")     # config.json + model.safetensors
    pixel_values = preprocess_for_safety_checker(images)                  # diffax.pipelines.safety
    images, has_nsfw_concept = module.apply({"params": params}, pixel_values, images)

The checker embeds an image with a CLIP image tower (diffax.models.clip_vision: `vision_model`, then
`visual_projection`, no bias) and compares the embedding with 17 concept embeddings and 3 "special care"
embeddings by cosine similarity. Each concept has a threshold (`concept_embeds_weights`,
`special_care_embeds_weights`). As diffusers' `forward` computes it, per image:
  special score s_j = cos(image, special_j) - special_threshold_j;
  adjustment        = 0.01 if any round(s_j, 3) > 0 else 0   (a special-care concept lowers the bar);
  concept score c_k = cos(image, concept_k) - threshold_k + adjustment;
  flagged           = any round(c_k, 3) > 0,
with the scores in fp32 and rounded to 3 decimals (half to even) as diffusers' numpy code rounds them.
Flagged images are replaced by zeros (black): diffusers returns the same (its `forward`, and its pipelines
skip the [-1, 1] -> [0, 1] step for flagged images). diffusers also logs a warning;
`diffax.pipelines.safety.SafetyChecker` does so too.

The config is the `CLIPConfig` json diffusers saves (`architectures: ["StableDiffusionSafetyChecker"]`,
`model_type: "clip"`): the top-level `projection_dim` and the image tower's `vision_config` (in older files
`vision_config_dict` overrides it, as transformers reads them). The text tower's `text_config` is not used
by the checker, and is not kept: `to_diffusers` writes transformers' default for it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffax.models.attention import BACKENDS
from diffax.models.clip_vision import CLIPVisionConfig, CLIPVisionModel
from diffax.models.config_base import DiffusersConfig
from diffax.models.layers import dense
from diffax.models.registry import ModelFamily, register

Dtype = Any

MODEL_TYPE = "clip"
NUM_CONCEPTS = 17       # diffusers hard-codes both counts
NUM_SPECIAL_CARE = 3
SPECIAL_CARE_ADJUSTMENT = 0.01
# CLIPConfig's keys the checker does not use (the text tower; transformers' bookkeeping): read and ignored.
IGNORED_KEYS = frozenset({"architectures", "model_type", "transformers_version", "dtype", "torch_dtype",
                          "text_config", "text_config_dict"})


@dataclasses.dataclass(frozen=True)
class StableDiffusionSafetyCheckerConfig(DiffusersConfig):
    """The keys of transformers' `CLIPConfig` the checker uses; `vision_config` is the image tower's config
    (its runtime fields are this config's)."""
    class_name: ClassVar[str] = "StableDiffusionSafetyChecker"

    # transformers' CLIPConfig defaults (ViT-B/32), which a config.json without the key gets there too; the
    # released checker is CLIP ViT-L/14: projection_dim 768, hidden_size 1024 x 24 layers, patch_size 14.
    projection_dim: int = 512
    vision_config: CLIPVisionConfig = CLIPVisionConfig()
    logit_scale_init_value: float = 2.6592   # CLIP's, unused by the checker; kept for round trips
    initializer_factor: float = 1.0
    # runtime
    dtype: Dtype = jnp.float32          # compute dtype of the image tower; the scores are always fp32
    param_dtype: Dtype = jnp.float32
    attention_backend: str = "auto"

    def __post_init__(self):
        p = self.projection_dim
        if not isinstance(p, int) or isinstance(p, bool) or p < 1:
            raise ValueError(f"projection_dim={p!r} is not supported (expected a positive int)")
        if not isinstance(self.vision_config, CLIPVisionConfig):
            raise ValueError(f"vision_config={self.vision_config!r} is not supported (expected a CLIPVisionConfig)")
        for key in ("logit_scale_init_value", "initializer_factor"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"{key}={value!r} is not supported (expected a finite float)")
        if self.attention_backend not in BACKENDS:
            raise ValueError(f"attention_backend={self.attention_backend!r} is not supported (expected one of "
                             f"{BACKENDS})")

    @classmethod
    def _translate(cls, cfg: dict[str, Any], source: str) -> dict[str, Any]:
        """CLIPConfig json -> this config's keys: `vision_config` (+ `vision_config_dict`) as a
        CLIPVisionConfig; the text tower and transformers' bookkeeping dropped."""
        model_type = cfg.get("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ValueError(f"{source}: model_type is {model_type!r}, not {MODEL_TYPE!r} (a CLIPConfig)")
        vision = {}
        for key in ("vision_config", "vision_config_dict"):
            value = cfg.get(key) or {}
            if not isinstance(value, dict):
                raise ValueError(f"{source}: {key} must be a JSON object, got {type(value).__name__}")
            vision.update(value)
        try:
            vision_config = CLIPVisionConfig.from_diffusers(vision)
        except ValueError as e:
            raise ValueError(f"{source}: vision_config: {str(e).removeprefix('config: ')}") from None
        out = {k: v for k, v in cfg.items() if k not in IGNORED_KEYS and k != "vision_config_dict"}
        return {**out, "vision_config": vision_config}

    def to_diffusers(self) -> dict[str, Any]:
        """The CLIPConfig json diffusers' `StableDiffusionSafetyChecker.from_pretrained` reads (and
        `from_diffusers` reads back to an equal config)."""
        vision = {k: v for k, v in self.vision_config.to_diffusers().items() if k != "architectures"}
        out = {k: v for k, v in super().to_diffusers().items() if k not in ("_class_name", "vision_config")}
        return {"architectures": [self.class_name], "model_type": MODEL_TYPE, **out, "vision_config": vision}

    def init_inputs(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """((clip_input [1, image_size, image_size, num_channels], images [1, 8, 8, 3]), {})."""
        v = self.vision_config
        return (jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.float32),
                jnp.zeros((1, 8, 8, 3), jnp.float32)), {}

    @property
    def tower_config(self) -> CLIPVisionConfig:
        """`vision_config` with this config's runtime fields."""
        return dataclasses.replace(self.vision_config, dtype=self.dtype, param_dtype=self.param_dtype,
                                   attention_backend=self.attention_backend)


def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    """[N, P], [K, P] -> [N, K] cosine similarities, normalising as torch's F.normalize (eps 1e-12)."""
    def unit(x):
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return unit(a) @ unit(b).T


class StableDiffusionSafetyChecker(nn.Module):
    """diffusers' `StableDiffusionSafetyChecker`; see the module docstring."""
    config: StableDiffusionSafetyCheckerConfig

    def setup(self):
        cfg = self.config
        p, d = cfg.projection_dim, cfg.vision_config.hidden_size
        self.vision_model = CLIPVisionModel(cfg.tower_config)
        self.visual_projection = dense(p, axes=("embed", "mlp"), use_bias=False, dtype=cfg.dtype,
                                       param_dtype=cfg.param_dtype,
                                       kernel_init=nn.initializers.normal(d ** -0.5 * cfg.initializer_factor))
        # diffusers initialises all four with ones; released checkpoints hold the real values.
        ones = nn.initializers.ones_init()
        self.concept_embeds = self.param("concept_embeds", nn.with_logical_partitioning(ones, (None, "mlp")),
                                         (NUM_CONCEPTS, p), cfg.param_dtype)
        self.special_care_embeds = self.param("special_care_embeds",
                                              nn.with_logical_partitioning(ones, (None, "mlp")),
                                              (NUM_SPECIAL_CARE, p), cfg.param_dtype)
        self.concept_embeds_weights = self.param("concept_embeds_weights",
                                                 nn.with_logical_partitioning(ones, (None,)), (NUM_CONCEPTS,),
                                                 cfg.param_dtype)
        self.special_care_embeds_weights = self.param("special_care_embeds_weights",
                                                      nn.with_logical_partitioning(ones, (None,)),
                                                      (NUM_SPECIAL_CARE,), cfg.param_dtype)

    def image_embeds(self, clip_input: jax.Array) -> jax.Array:
        """clip_input [N, S, S, C] (CLIPImageProcessor's pixel values, NHWC) -> [N, projection_dim]."""
        return self.visual_projection(self.vision_model(clip_input).pooler_output)

    def scores(self, clip_input: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(special scores [N, 3], concept scores [N, 17]) in fp32, unrounded: cosine similarity minus the
        threshold, the concept scores with the special-care adjustment added."""
        embeds = self.image_embeds(clip_input).astype(jnp.float32)
        f32 = jnp.float32
        special = _cosine(embeds, self.special_care_embeds.astype(f32)) - self.special_care_embeds_weights.astype(f32)
        special_care = jnp.any(jnp.round(special, 3) > 0, axis=1, keepdims=True)  # [N, 1]
        adjustment = jnp.where(special_care, f32(SPECIAL_CARE_ADJUSTMENT), f32(0))
        concept = _cosine(embeds, self.concept_embeds.astype(f32)) - self.concept_embeds_weights.astype(f32)
        return special, concept + adjustment

    def __call__(self, clip_input: jax.Array, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """clip_input [N, S, S, C] pixel values; images [N, ...] (any layout) -> (images with the flagged
        ones zeroed (black), has_nsfw_concept [N] bool)."""
        if clip_input.shape[0] != images.shape[0]:
            raise ValueError(f"{self.config.class_name}: clip_input has {clip_input.shape[0]} images, images "
                             f"{images.shape[0]}")
        _, concept = self.scores(clip_input)
        flagged = jnp.any(jnp.round(concept, 3) > 0, axis=1)  # [N]
        keep = jnp.logical_not(flagged).reshape((-1,) + (1,) * (images.ndim - 1))
        return jnp.where(keep, images, jnp.zeros_like(images)), flagged


register(ModelFamily("StableDiffusionSafetyChecker", StableDiffusionSafetyCheckerConfig,
                     StableDiffusionSafetyChecker, aliases=("safety_checker",)))
