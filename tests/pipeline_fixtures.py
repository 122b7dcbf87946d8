"""Tiny random-weight diffusers pipelines saved with `save_pretrained`, and diffusers' images from them.

    folder = build_sd_pipeline(tmp_path / "sd")                       # StableDiffusionPipeline folder
    folder = build_sd_pipeline(tmp_path / "inp", kind="inpaint")      # a 9-channel inpainting U-Net
    ref = diffusers_images(folder, prompt=["a cat"], latents=noise_nhwc, num_inference_steps=2)

Every tensor is random (norm scales around 1, so a swapped name changes the output), at sizes that compile
in seconds on a CPU: 8x8 latents, 16x16 images (VAE factor 2), a 2-layer CLIP of width 32 with a letters-only
BPE vocabulary written by `write_tokenizer`. The VAE's posterior log-variance is pinned to -30 (std 3e-7),
so its posterior sample equals its mean to float32 precision and img2img / inpainting compare with
diffusers without sharing its random draws.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np

CROSS = 32
LETTERS = "abcdefghijklmnopqrstuvwxyz"
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)
UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=CROSS, attention_head_dim=4, norm_num_groups=8)
VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
           norm_num_groups=4, latent_channels=4, sample_size=16)


def write_tokenizer(folder: Path) -> Path:
    """A tiny CLIP BPE tokenizer folder: the letters (also word-final), a few merged words, the specials."""
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokens = [*LETTERS, *(c + "</w>" for c in LETTERS), "ca", "cat</w>", "do", "dog</w>", "<|startoftext|>",
              "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\nd o\ndo g</w>\n")
    tok = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tok.save_pretrained(folder)
    return folder


def randomise(model: Any, seed: int = 0, scale: float = 0.1) -> Any:
    """Every tensor random (norm weights around 1), in place; returns the model in eval mode."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            offset = 1.0 if "norm" in name and name.endswith("weight") and p.ndim == 1 else 0.0
            p.copy_(torch.randn(p.shape, generator=gen) * scale + offset)
    return model.eval()


def tiny_vae(seed: int = 1, **overrides: Any) -> Any:
    """A random AutoencoderKL whose posterior std is 3e-7 (logvar pinned to -30 through quant_conv)."""
    import diffusers
    import torch

    vae = randomise(diffusers.AutoencoderKL(**{**VAE, **overrides}), seed)
    c = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[c:] = 0.0
        vae.quant_conv.bias[c:] = -30.0
    return vae


def tiny_clip(tokenizer_folder: Path, seed: int = 2, with_projection: bool = False, hidden_act: str = "quick_gelu",
              hidden_size: int = CROSS) -> Any:
    import transformers

    vocab = json.loads((Path(tokenizer_folder) / "vocab.json").read_text())
    config = transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=37, projection_dim=24,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77, hidden_act=hidden_act,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"])
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    return randomise(cls(config), seed)


def build_sd_pipeline(folder: Path, kind: str = "txt2img", scheduler: str = "DDIMScheduler", seed: int = 0,
                      **unet_overrides: Any) -> Path:
    """Saves a tiny StableDiffusion{,Img2Img,Inpaint}Pipeline (kind 'txt2img', 'img2img', 'inpaint' with a
    9-channel U-Net, 'inpaint4' with a 4-channel one) to `folder`; returns it."""
    import diffusers
    import transformers

    folder = Path(folder)
    tok_folder = write_tokenizer(folder.parent / f"{folder.name}_tokenizer")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tok_folder)
    unet_cfg = {**UNET, **unet_overrides}
    if kind == "inpaint":
        unet_cfg["in_channels"] = 9
    unet = randomise(diffusers.UNet2DConditionModel(**unet_cfg), seed + 10)
    classes = {"txt2img": diffusers.StableDiffusionPipeline, "img2img": diffusers.StableDiffusionImg2ImgPipeline,
               "inpaint": diffusers.StableDiffusionInpaintPipeline,
               "inpaint4": diffusers.StableDiffusionInpaintPipeline}
    sched = getattr(diffusers, scheduler)(**SD_SCHEDULER) if scheduler == "DDIMScheduler" else \
        getattr(diffusers, scheduler).from_config(diffusers.DDIMScheduler(**SD_SCHEDULER).config)
    pipe = classes[kind](vae=tiny_vae(seed + 11), text_encoder=tiny_clip(tok_folder, seed + 12), tokenizer=tokenizer,
                         unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                         requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def build_unconditional_pipeline(folder: Path, kind: str = "DDPMPipeline", seed: int = 0) -> Path:
    """Saves a tiny DDPMPipeline / DDIMPipeline (a random 8x8 RGB UNet2DModel) to `folder`; returns it."""
    import diffusers

    unet = randomise(diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4), seed + 20)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000) if kind == "DDPMPipeline" else \
        diffusers.DDIMScheduler(num_train_timesteps=1000)
    getattr(diffusers, kind)(unet=unet, scheduler=scheduler).save_pretrained(folder)
    return Path(folder)


def build_dit_pipeline(folder: Path, seed: int = 0) -> Path:
    """Saves a tiny DiTPipeline (a random DiT on 4x4x4 latents with diffusers' 1000 classes, learned sigma,
    and the tiny VAE) to `folder`; returns it."""
    import diffusers

    dit = randomise(diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        sample_size=4, patch_size=2, num_embeds_ada_norm=1000), seed + 30, scale=0.2)
    block0 = dit.transformer_blocks[0].norm1.emb.state_dict()
    for block in dit.transformer_blocks[1:]:  # released DiTs share block 0's embedders (diffax stores them once)
        block.norm1.emb.load_state_dict(block0)
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000)
    diffusers.DiTPipeline(transformer=dit, vae=tiny_vae(seed + 31), scheduler=scheduler).save_pretrained(folder)
    return Path(folder)


@functools.lru_cache(maxsize=8)
def diffusers_pipeline(folder: str) -> Any:
    """The diffusers pipeline saved in `folder`, fp32 on CPU (cached per folder)."""
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_images(folder: Path, *, scheduler: Any = None, noise: np.ndarray | None = None,
                     pipeline_class: str | None = None, **call: Any) -> np.ndarray:
    """diffusers' output_type='np' images [N, H, W, 3] of the pipeline in `folder`.

    scheduler: a diffusers scheduler class (built `from_config` of the saved one) or None.
    latents: NHWC numpy noise, passed to diffusers as NCHW `latents`.
    noise: NHWC numpy noise that diffusers' pipeline module draws instead of `randn_tensor` (img2img, whose
      call takes no latents).
    vae_tiling: decode with `pipe.vae.enable_tiling()`.
    pipeline_class: a diffusers pipeline class name to run the saved components with (e.g. the
      img2img pipeline on a text-to-image folder).
    Other keywords go to the call as they are (prompt, num_inference_steps, guidance_scale; `image` and
    `mask_image` as NHWC numpy arrays in [0, 1], which diffusers reads as such).
    """
    import diffusers
    import torch

    saved = diffusers_pipeline(str(folder))
    # A fresh scheduler every call (never the saved pipeline's, which a call's steps mutate); from_pipe keeps
    # the folder's model_index.json switches (force_zeros_for_empty_prompt, requires_aesthetics_score).
    fresh = (scheduler or type(saved.scheduler)).from_config(saved.scheduler.config)
    pipe = getattr(diffusers, pipeline_class or type(saved).__name__).from_pipe(saved, scheduler=fresh)
    pipe.set_progress_bar_config(disable=True)
    if "latents" in call and call["latents"] is not None:
        call["latents"] = torch.from_numpy(np.ascontiguousarray(np.asarray(call["latents"]).transpose(0, 3, 1, 2)))
    for name in ("text_encoder", "text_encoder_2"):
        te = getattr(pipe, name, None)
        if te is not None and "text_model" not in te._modules and hasattr(te, "final_layer_norm"):
            # transformers 5's CLIPTextModel has no `text_model`, which diffusers 0.42 reads for clip_skip's
            # final LayerNorm: the same layer under the old path (a plain attribute, not a submodule).
            import types
            object.__setattr__(te, "text_model", types.SimpleNamespace(final_layer_norm=te.final_layer_norm))
    tiled = call.pop("vae_tiling", False)
    if tiled:
        pipe.vae.enable_tiling()
    module = __import__(type(pipe).__module__, fromlist=["randn_tensor"])
    original = module.randn_tensor
    if noise is not None:
        given = torch.from_numpy(np.ascontiguousarray(noise.transpose(0, 3, 1, 2)))
        module.randn_tensor = lambda shape, **kw: given.clone().reshape(shape)
    try:
        with torch.no_grad():
            return pipe(output_type="np", **call).images
    finally:
        module.randn_tensor = original
        if tiled:
            pipe.vae.disable_tiling()
