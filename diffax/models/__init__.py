"""Flax models and the registry that builds them by diffusers class name.

    from diffax.models import build_model, get_family, abstract_params
    module = build_model({"name": "UNet2DModel", "sample_size": 16, "in_channels": 1, ...})
    out = module.apply({"params": params}, sample, timesteps, class_labels=labels)   # sample [B, H, W, C]

Families: UNet2DModel ('unet2d'), DiTTransformer2DModel ('dit'). Each exports its config dataclass
(`from_diffusers`, `to_diffusers`), its module, and shares `abstract_params(config)`; see
diffax/models/registry.py for the contract and docs/architecture.md for adding a family. The shared
blocks (`Attention`, `BasicTransformerBlock`, `FeedForward`, diffusers' names) are in transformer.py.
"""
from diffax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextWithProjectionConfig
from diffax.models import clip_vision, safety_checker  # noqa: F401  (registers the CLIP image towers, the SD safety checker)
from diffax.models.controlnet import ControlNetConfig, ControlNetModel, apply_multi_controlnet, params_from_unet
from diffax.models.dit import DiT, DiTConfig
from diffax.models.registry import (ModelFamily, abstract_params, boxed_init, build_model, config_from_block,
                                    families, family_of, get_family, init_params, logical_specs, make_module,
                                    register)
from diffax.models.transformer import Attention, BasicTransformerBlock, FeedForward
from diffax.models.unet2d import UNet2DConfig, UNet2DModel
from diffax.models.unet2d_condition import UNet2DConditionConfig, UNet2DConditionModel
from diffax.models.vae import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian

__all__ = [
    "AutoencoderKL", "AutoencoderKLConfig", "DiagonalGaussian",
    "Attention", "BasicTransformerBlock", "CLIPTextConfig", "CLIPTextModel", "CLIPTextWithProjectionConfig", "ControlNetConfig", "ControlNetModel", "DiT", "DiTConfig", "FeedForward", "ModelFamily", "UNet2DConditionConfig", "UNet2DConditionModel", "UNet2DConfig", "UNet2DModel", "abstract_params", "apply_multi_controlnet", "boxed_init",
    "build_model", "config_from_block", "families", "family_of", "get_family", "init_params", "logical_specs",
    "make_module", "params_from_unet", "register",
]
