"""The architecture of each Stable Diffusion model type, as diffusers config.json values per component.

A single-file checkpoint (the CompVis / Stability layout) holds weights only; these are the published
hyper-parameters of the released models (SD 1.5, SD 2.1, SDXL base / refiner and their inpainting
variants), which `diffax.convert.load_single_file` builds each component's config from.

    MODEL_TYPES["sdxl"]["unet"]  ->  ("UNet2DConditionModel", {"block_out_channels": [320, 640, 1280], ...})

Keys not given take the diffax config's defaults, which are diffusers' defaults.
"""
from __future__ import annotations

from typing import Any

Component = tuple[str, dict[str, Any]]  # (diffusers / transformers class name, config.json values)

_UNET_SD1 = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
_UNET_SD2 = dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                 use_linear_projection=True)
_UNET_SDXL = dict(
    sample_size=128, block_out_channels=[320, 640, 1280],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816)
_UNET_SDXL_REFINER = dict(
    sample_size=128, block_out_channels=[384, 768, 1536, 1536],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    attention_head_dim=[6, 12, 24, 24], transformer_layers_per_block=4, cross_attention_dim=1280,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2560)

_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)

# OpenAI CLIP ViT-L/14's text tower (SD 1.x, SDXL's first encoder); token ids of the SD uploads.
_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               projection_dim=768, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)
# OpenCLIP ViT-H/14 (SD 2.x): 24 layers trained, the last one unused (SD 2 conditions on the penultimate
# layer's output), so the diffusers text encoder has 23.
_OPENCLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                   projection_dim=512, hidden_act="gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)
# OpenCLIP ViT-bigG/14 (SDXL's second encoder, the refiner's only one), with its text projection.
_OPENCLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                      projection_dim=1280, hidden_act="gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)


def _sd(unet: dict[str, Any], vae: dict[str, Any], **encoders: Component) -> dict[str, Component]:
    return {"unet": ("UNet2DConditionModel", unet), "vae": ("AutoencoderKL", vae), **encoders}


# model type -> component -> (class name, config values)
MODEL_TYPES: dict[str, dict[str, Component]] = {
    "sd1": _sd(_UNET_SD1, dict(_VAE, sample_size=512), text_encoder=("CLIPTextModel", _CLIP_L)),
    "sd1_inpaint": _sd(dict(_UNET_SD1, in_channels=9), dict(_VAE, sample_size=512),
                       text_encoder=("CLIPTextModel", _CLIP_L)),
    # SD 2.x 768 (v-prediction) and 512 base (epsilon) share every weight shape; only the image size differs.
    "sd2": _sd(_UNET_SD2, dict(_VAE, sample_size=768), text_encoder=("CLIPTextModel", _OPENCLIP_H)),
    "sd2_base": _sd(dict(_UNET_SD2, sample_size=64), dict(_VAE, sample_size=512),
                    text_encoder=("CLIPTextModel", _OPENCLIP_H)),
    "sd2_inpaint": _sd(dict(_UNET_SD2, sample_size=64, in_channels=9), dict(_VAE, sample_size=512),
                       text_encoder=("CLIPTextModel", _OPENCLIP_H)),
    "sdxl": _sd(_UNET_SDXL, dict(_VAE, sample_size=1024, scaling_factor=0.13025),
                text_encoder=("CLIPTextModel", _CLIP_L),
                text_encoder_2=("CLIPTextModelWithProjection", _OPENCLIP_BIGG)),
    "sdxl_inpaint": _sd(dict(_UNET_SDXL, in_channels=9), dict(_VAE, sample_size=1024, scaling_factor=0.13025),
                        text_encoder=("CLIPTextModel", _CLIP_L),
                        text_encoder_2=("CLIPTextModelWithProjection", _OPENCLIP_BIGG)),
    "sdxl_refiner": _sd(_UNET_SDXL_REFINER, dict(_VAE, sample_size=1024, scaling_factor=0.13025),
                        text_encoder_2=("CLIPTextModelWithProjection", _OPENCLIP_BIGG)),
}
