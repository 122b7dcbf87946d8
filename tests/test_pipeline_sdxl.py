"""Tests for the SDXL pipelines (diffax.pipelines.stable_diffusion_xl) against diffusers'
StableDiffusionXLPipeline and StableDiffusionXLImg2ImgPipeline.

The references are tiny random-weight diffusers pipelines saved with `save_pretrained`: a base model with
two CLIP text encoders (a CLIPTextModel and a CLIPTextModelWithProjection, 16 wide) and a refiner with the
second encoder alone, 5 time ids and `requires_aesthetics_score`. The tokenizer folders hold vocab.json and
merges.txt as the released SDXL folders do. Every tensor is random (norms and zero-initialised output
convolutions included), so a mis-wired input changes the numbers.
"""
import json
import math
import shutil

import diffusers
import jax
import numpy as np
import pytest
import torch
import transformers

from diffax import convert
from diffax.models.clip import load_tokenizer
from diffax.pipelines import stable_diffusion_xl as sdxl

VOCAB_TOKENS = ["!", *"abcdefghijklmnopqrstuvwxyz", *(c + "</w>" for c in "abcdefghijklmnopqrstuvwxyz"), "ca",
                "cat</w>", "ab</w>", "<|startoftext|>", "<|endoftext|>"]
V = len(VOCAB_TOKENS)
WIDTH, PROJECTION, TIME_DIM = 16, 16, 8
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading",
                 steps_offset=1)


def write_vocab(folder):
    """A tiny CLIP BPE vocabulary ('!' first, as OpenCLIP's padding token; 'cat</w>' and 'ab</w>' by merges)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(VOCAB_TOKENS)}))
    (folder / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\na b</w>\n")


def tokenizer(tmp, pad_token):
    """transformers' CLIPTokenizer of the tiny vocabulary: SD's first encoder pads with the end-of-text token,
    OpenCLIP's second with '!'."""
    write_vocab(tmp)
    return transformers.CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), model_max_length=77,
                                      pad_token=pad_token)


def randomize(model, seed):
    """Every tensor random: weights ~ N(0, 1/fan_in), norm scales 1 + N(0, 0.2^2), biases N(0, 0.2^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1:
                p.copy_(0.2 * noise + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
            else:
                p.copy_(noise / math.sqrt(p[0].numel()))
    return model.eval()


def text_encoders():
    """SDXL's pair at 16 wide: CLIPTextModel (quick_gelu, end-of-text padding) and CLIPTextModelWithProjection
    (gelu, '!' padding)."""
    common = dict(vocab_size=V, hidden_size=WIDTH, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
                  max_position_embeddings=77, bos_token_id=V - 2, eos_token_id=V - 1, projection_dim=PROJECTION)
    one = transformers.CLIPTextModel(transformers.CLIPTextConfig(hidden_act="quick_gelu", pad_token_id=V - 1,
                                                                 **common))
    two = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(hidden_act="gelu", pad_token_id=0,
                                                                               **common))
    return randomize(one, 1), randomize(two, 2)


def unet(num_ids, context_dim, seed):
    """A two-level SDXL-style U-Net ('text_time' additions) on 8x8 latents."""
    model = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM, cross_attention_dim=context_dim,
        projection_class_embeddings_input_dim=num_ids * TIME_DIM + PROJECTION, norm_num_groups=8)
    return randomize(model, seed)


def vae():
    """A two-level KL autoencoder (16x16 images <-> 8x8 latents) with SDXL's scaling factor. Its posterior is
    made (nearly) deterministic, log-variance -30, so that diffusers' encode, which samples with the torch
    generator, is comparable with diffax's."""
    model = randomize(diffusers.AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=16,
        scaling_factor=0.13025, force_upcast=True), 3)
    with torch.no_grad():
        model.quant_conv.weight[4:] = 0.0
        model.quant_conv.bias[4:] = -30.0
    return model


def save(pipe, folder):
    """save_pretrained, plus the vocab.json / merges.txt the released folders carry beside tokenizer.json."""
    pipe.save_pretrained(folder)
    for name in ("tokenizer", "tokenizer_2"):
        if (folder / name).is_dir():
            write_vocab(folder / name)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{'base': folder, 'refiner': folder} of tiny random SDXL pipelines; the refiner shares the base's
    text_encoder_2, as the released pair does."""
    tmp = tmp_path_factory.mktemp("sdxl")
    te1, te2 = text_encoders()
    tok1, tok2 = tokenizer(tmp / "vocab1", "<|endoftext|>"), tokenizer(tmp / "vocab2", "!")
    scheduler = diffusers.EulerDiscreteScheduler(**SCHEDULER)
    autoencoder = vae()
    base = diffusers.StableDiffusionXLPipeline(vae=autoencoder, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1,
                                               tokenizer_2=tok2, unet=unet(6, 2 * WIDTH, 4), scheduler=scheduler,
                                               add_watermarker=False)
    refiner = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=autoencoder, text_encoder=None, text_encoder_2=te2, tokenizer=None, tokenizer_2=tok2,
        unet=unet(5, WIDTH, 5), scheduler=scheduler, requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False, add_watermarker=False)
    return {"base": save(base, tmp / "base"), "refiner": save(refiner, tmp / "refiner")}


@pytest.fixture(scope="module")
def torch_pipes(folders):
    """The diffusers pipelines read back from the saved folders, in float32 on the CPU."""
    base = diffusers.StableDiffusionXLPipeline.from_pretrained(folders["base"])
    refiner = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(folders["refiner"])
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
    return {"base": base, "refiner": refiner}


def test_time_ids_match_diffusers(torch_pipes):
    base, refiner = torch_pipes["base"], torch_pipes["refiner"]
    got = sdxl.time_ids(original_size=(64, 48), crops_coords_top_left=(3, 5), target_size=(32, 24))
    want = base._get_add_time_ids((64, 48), (3, 5), (32, 24), dtype=torch.float32, text_encoder_projection_dim=16)
    np.testing.assert_array_equal(got[None], want.numpy())
    sdxl.check_time_ids_width(base.unet.config, 6, PROJECTION, requires_aesthetics_score=False)
    got = sdxl.time_ids(original_size=(64, 48), crops_coords_top_left=(3, 5), aesthetic_score=7.5)
    want, want_negative = refiner._get_add_time_ids((64, 48), (3, 5), (32, 24), 7.5, 2.0, (16, 16), (1, 1), (8, 8),
                                                    dtype=torch.float32, text_encoder_projection_dim=16)
    np.testing.assert_array_equal(got[None], want.numpy())
    negative = sdxl.time_ids(original_size=(16, 16), crops_coords_top_left=(1, 1), aesthetic_score=2.0)
    np.testing.assert_array_equal(negative[None], want_negative.numpy())
    sdxl.check_time_ids_width(refiner.unet.config, 5, PROJECTION, requires_aesthetics_score=True)
    # A refiner read as a base model (6 ids) and the reverse: diffusers refuses both, and so does diffax.
    with pytest.raises(ValueError, match="requires_aesthetics_score=true"):
        sdxl.check_time_ids_width(base.unet.config, 5, PROJECTION, requires_aesthetics_score=False)
    with pytest.raises(ValueError, match="requires_aesthetics_score=false"):
        sdxl.check_time_ids_width(refiner.unet.config, 6, PROJECTION, requires_aesthetics_score=True)
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim=64"):
        sdxl.check_time_ids_width(base.unet.config, 6, 32, requires_aesthetics_score=False)
    with pytest.raises(ValueError, match="crops_coords_top_left must be a pair"):
        sdxl.time_ids(original_size=(64, 48), crops_coords_top_left=(3,), target_size=(32, 24))


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_encode_prompt_matches_diffusers(folders, torch_pipes, clip_skip):
    folder, pipe = folders["base"], torch_pipes["base"]
    encoders = [convert.load(folder, subfolder=name) for name in ("text_encoder", "text_encoder_2")]
    tokenizers = [load_tokenizer(folder / name) for name in ("tokenizer", "tokenizer_2")]
    prompts, prompts_2, negative = ["a cat", "ab ab c"], ["cab", "z"], ["zz", ""]
    with torch.no_grad():
        want = pipe.encode_prompt(prompts, prompt_2=prompts_2, device="cpu", num_images_per_prompt=1,
                                  do_classifier_free_guidance=True, negative_prompt=negative, clip_skip=clip_skip)
    modules = [module for module, _ in encoders]

    @jax.jit
    def encode(params, ids, negative_ids):
        return (sdxl.encode_prompt(list(zip(modules, params)), ids, clip_skip),
                # diffusers encodes the negative prompts at the penultimate layer whatever clip_skip says.
                sdxl.encode_prompt(list(zip(modules, params)), negative_ids, None))

    params = [p for _, p in encoders]
    (context, pooled), (negative_context, negative_pooled) = encode(
        params, sdxl.tokenize_pair(tokenizers, prompts, prompts_2), sdxl.tokenize_pair(tokenizers, negative, negative))
    for got, ref in zip((context, negative_context, pooled, negative_pooled), want):
        assert got.shape == tuple(ref.shape)
        np.testing.assert_allclose(np.asarray(got), ref.numpy(), atol=2e-5)
    assert context.shape == (2, 77, 2 * WIDTH) and pooled.shape == (2, PROJECTION)
    # The refiner's single encoder reads prompt_2.
    only, only_pooled = jax.jit(lambda p, ids: sdxl.encode_prompt([(modules[1], p)], ids))(
        params[1], sdxl.tokenize_pair(tokenizers[1:], prompts, prompts_2))
    np.testing.assert_allclose(np.asarray(only_pooled), np.asarray(pooled), atol=1e-6)
    assert only.shape == (2, 77, WIDTH)
