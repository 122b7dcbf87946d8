"""SDXL pipelines (diffax.pipelines.stable_diffusion_xl) against diffusers 0.42's StableDiffusionXLPipeline,
StableDiffusionXLImg2ImgPipeline and StableDiffusionXLInpaintPipeline on tiny random pipelines.

The references are saved with `save_pretrained`: a base model with two CLIP text encoders (a CLIPTextModel
padding with the end-of-text token and a CLIPTextModelWithProjection padding with '!', 16 wide), 6 time ids;
a refiner with the second encoder alone, 5 time ids, `requires_aesthetics_score` and
`force_zeros_for_empty_prompt=False`, as the released pair; an inpainting model with a 9-channel U-Net. Every
tensor is random (norm scales around 1) and the VAE's posterior is pinned (tests/pipeline_fixtures.py), so
img2img compares without sharing torch's random draws. Both sides run fp32 on the CPU from the same initial
noise (diffax draws it from the seeds; diffusers gets it as NCHW `latents`, or as its img2img noise).
Tolerance: max abs difference 1e-3 on [0, 1] images (measured 2e-6 to 7e-6); reference images are checked
to be far from saturated, and the micro-conditioning ids and the LoRA to move the images by far more.
"""
from __future__ import annotations

import functools
import json

import diffusers
import jax
import numpy as np
import pytest
import torch
import transformers

import diffax.pipelines
import diffax.pipelines.stable_diffusion_xl as sdxl
from diffax import convert, parallel
from diffax.models.clip import load_tokenizer
from diffax.pipelines.base import PipelineInputError, noise_from_seeds
from diffax.pipelines.text_encoding import encode_prompt_sdxl
from tests.pipeline_fixtures import randomise, tiny_vae

ATOL = 1e-3
STEPS = 3
VOCAB_TOKENS = ["!", *"abcdefghijklmnopqrstuvwxyz", *(c + "</w>" for c in "abcdefghijklmnopqrstuvwxyz"), "ca",
                "cat</w>", "ab</w>", "<|startoftext|>", "<|endoftext|>"]
V = len(VOCAB_TOKENS)
WIDTH, PROJECTION, TIME_DIM = 16, 16, 8
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading",
                 steps_offset=1)
PROMPTS, PROMPTS_2 = ["a cat", "ab"], ["cab", "z z"]


def tokenizer(folder, pad_token):
    """transformers' CLIPTokenizer of a tiny vocabulary ('!' first, as OpenCLIP's padding token), saved with
    vocab.json and merges.txt as the released SDXL folders have them."""
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(VOCAB_TOKENS)}))
    (folder / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\na b</w>\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77,
                                      pad_token=pad_token)


def text_encoders():
    """SDXL's pair at 16 wide: CLIPTextModel (quick_gelu) and CLIPTextModelWithProjection (gelu)."""
    common = dict(vocab_size=V, hidden_size=WIDTH, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
                  max_position_embeddings=77, bos_token_id=V - 2, eos_token_id=V - 1, projection_dim=PROJECTION)
    one = transformers.CLIPTextModel(transformers.CLIPTextConfig(hidden_act="quick_gelu", pad_token_id=V - 1,
                                                                 **common))
    two = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(hidden_act="gelu", pad_token_id=0,
                                                                               **common))
    return randomise(one, 1, scale=0.2), randomise(two, 2, scale=0.2)


def unet(num_ids, context_dim, seed, in_channels=4):
    """A two-level SDXL-style U-Net ('text_time' additions, linear projections, 2 transformer layers in the
    second block) on 8x8 latents; 9 input channels for inpainting."""
    model = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM, cross_attention_dim=context_dim,
        projection_class_embeddings_input_dim=num_ids * TIME_DIM + PROJECTION, norm_num_groups=8)
    return randomise(model, seed, scale=0.2)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{'base', 'refiner', 'inpaint': folder} of tiny random SDXL pipelines; the refiner shares the base's
    text_encoder_2 and VAE, as the released pair does; 'inpaint' has a 9-channel U-Net."""
    tmp = tmp_path_factory.mktemp("sdxl")
    te1, te2 = text_encoders()
    tok1, tok2 = tokenizer(tmp / "vocab1", "<|endoftext|>"), tokenizer(tmp / "vocab2", "!")
    scheduler = diffusers.EulerDiscreteScheduler(**SCHEDULER)
    vae = tiny_vae(3, scaling_factor=0.13025, force_upcast=True)
    base = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1,
                                               tokenizer_2=tok2, unet=unet(6, 2 * WIDTH, 4), scheduler=scheduler,
                                               add_watermarker=False)
    refiner = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=None, text_encoder_2=te2, tokenizer=None, tokenizer_2=tok2,
        unet=unet(5, WIDTH, 5), scheduler=scheduler, requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False, add_watermarker=False)
    inpaint = diffusers.StableDiffusionXLInpaintPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2,
        unet=unet(6, 2 * WIDTH, 6, in_channels=9), scheduler=scheduler, add_watermarker=False)
    out = {"base": tmp / "base", "refiner": tmp / "refiner", "inpaint": tmp / "inpaint"}
    for name, pipe in (("base", base), ("refiner", refiner), ("inpaint", inpaint)):
        pipe.save_pretrained(out[name])
        for sub in ("tokenizer", "tokenizer_2"):
            if (out[name] / sub).is_dir():
                for f in ("vocab.json", "merges.txt"):
                    (out[name] / sub / f).write_bytes((tmp / "vocab1" / f).read_bytes())
    return out


@pytest.fixture(scope="module")
def pipes(folders):
    """The diffax pipelines loaded from the folders (conversion not cached)."""
    return {name: diffax.pipelines.load(folder, cache_dir=False) for name, folder in folders.items()}


@functools.lru_cache(maxsize=4)
def diffusers_pipeline(folder):
    """The diffusers pipeline saved in `folder` (its model_index.json switches included), fp32 on the CPU."""
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_images(folder, *, latents=None, output_type="np", **call):
    """diffusers' images (or latents) of the pipeline in `folder`; `latents` NHWC numpy, passed NCHW."""
    if latents is not None:
        call["latents"] = torch.from_numpy(np.ascontiguousarray(latents.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        return diffusers_pipeline(str(folder))(output_type=output_type, **call).images


def img2img_noise(seed, shape=(2, 4, 8, 8)):
    """The NHWC noise diffusers' SDXL img2img adds to the image with `generator=Generator().manual_seed(seed)`:
    its second draw, after the VAE posterior's (which the pinned log-variance makes irrelevant)."""
    generator = torch.Generator().manual_seed(seed)
    torch.randn(shape, generator=generator)
    return torch.randn(shape, generator=generator).numpy().transpose(0, 2, 3, 1)


def seed_noise(seeds, shape=(8, 8, 4)):
    """The NHWC noise diffax draws for `seeds`, as numpy (diffusers' `latents`)."""
    return np.asarray(noise_from_seeds(np.asarray(seeds, np.uint32), shape))


def assert_close(got, want):
    assert got.shape == want.shape and got.dtype == np.float32
    assert want.std() > 0.05 and ((want > 0.01) & (want < 0.99)).mean() > 0.5, "saturated reference images"
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


def smooth_images(seed, n):
    """Smooth random RGB images [n, 16, 16, 3] in [0, 1]."""
    x = np.random.default_rng(seed).uniform(0, 1, (n, 4, 4, 3)).astype(np.float32)
    return np.repeat(np.repeat(x, 4, axis=1), 4, axis=2)


def test_time_ids_match_diffusers(folders):
    base, refiner = (diffusers_pipeline(str(folders[name])) for name in ("base", "refiner"))
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
        sdxl.check_time_ids_width(refiner.unet.config, 6, PROJECTION, requires_aesthetics_score=False)
    with pytest.raises(ValueError, match="requires_aesthetics_score=false"):
        sdxl.check_time_ids_width(base.unet.config, 5, PROJECTION, requires_aesthetics_score=True)
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim=64"):
        sdxl.check_time_ids_width(base.unet.config, 6, 32, requires_aesthetics_score=False)
    with pytest.raises(ValueError, match="crops_coords_top_left must be a pair"):
        sdxl.time_ids(original_size=(64, 48), crops_coords_top_left=(3,), target_size=(32, 24))


def test_encode_prompt_matches_diffusers(folders):
    """Both encoders, prompt_2, clip_skip on the prompt and not on the negative prompt (diffusers' quirk)."""
    folder, pipe = folders["base"], diffusers_pipeline(str(folders["base"]))
    encoders = [convert.load(folder, subfolder=name) for name in ("text_encoder", "text_encoder_2")]
    tokenizers = [load_tokenizer(folder / name) for name in ("tokenizer", "tokenizer_2")]
    prompts, prompts_2, negative = ["a cat", "ab ab c"], ["cab", "z"], ["zz", ""]
    with torch.no_grad():
        want = pipe.encode_prompt(prompts, prompt_2=prompts_2, device="cpu", num_images_per_prompt=2,
                                  do_classifier_free_guidance=True, negative_prompt=negative, clip_skip=1)
    modules = [module for module, _ in encoders]

    @jax.jit
    def encode(params, ids, negative_ids):
        pairs = list(zip(modules, params))
        return (*encode_prompt_sdxl(pairs, ids, clip_skip=1), *encode_prompt_sdxl(pairs, negative_ids))

    got = encode([p for _, p in encoders], sdxl.tokenize_pair(tokenizers, prompts, prompts_2, 2),
                 sdxl.tokenize_pair(tokenizers, negative, negative, 2))
    # diffusers returns (context, negative context, pooled, negative pooled).
    for g, w in zip((got[0], got[2], got[1], got[3]), want):
        assert g.shape == tuple(w.shape)
        np.testing.assert_allclose(np.asarray(g), w.numpy(), atol=2e-5)
    assert got[0].shape == (4, 77, 2 * WIDTH) and got[1].shape == (4, PROJECTION)
    # The refiner's single encoder reads prompt (diffusers pairs prompts with the encoders present, in order).
    single = sdxl.tokenize_pair(tokenizers[1:], prompts, prompts_2)
    second_on_prompts = sdxl.tokenize_pair(tokenizers[::-1], prompts, prompts_2)[0]
    assert len(single) == 1 and single[0].tolist() == second_on_prompts.tolist()


def test_base_matches_diffusers_and_new_inputs_reuse_the_program(pipes, folders):
    base = pipes["base"]
    kw = dict(prompt_2=PROMPTS_2, num_inference_steps=STEPS, guidance_scale=5.0)
    got = base(PROMPTS, seed=[11, 12], **kw).images
    assert_close(got, diffusers_images(folders["base"], prompt=PROMPTS, latents=seed_noise([11, 12]), **kw))
    traces = base.trace_count
    # Micro-conditioning, new prompts, seeds and guidance scale: the same program, diffusers' numbers.
    plain = dict(num_inference_steps=STEPS, guidance_scale=7.0)
    micro = dict(original_size=(64, 32), crops_coords_top_left=(4, 2), target_size=(24, 16))
    negative_micro = dict(negative_original_size=(16, 16), negative_crops_coords_top_left=(1, 1),
                          negative_target_size=(32, 48))
    prompts = ["ab cat", "z"]
    got_plain = base(prompts, seed=[3, 4], **plain).images
    got_micro = base(prompts, seed=[3, 4], **plain, **micro).images
    # One prompt for the negative sizes: diffusers pairs its unconditional and conditional ids wrongly for
    # more (it tiles [negative, positive] over the batch instead of stacking the halves); diffax stacks them.
    got_negative = base(prompts, seed=[3, 4], **plain, **micro, **negative_micro).images
    assert base.trace_count == traces
    want_plain = diffusers_images(folders["base"], prompt=prompts, latents=seed_noise([3, 4]), **plain)
    want_micro = diffusers_images(folders["base"], prompt=prompts, latents=seed_noise([3, 4]), **plain, **micro)
    want_negative = diffusers_images(folders["base"], prompt=prompts[:1], latents=seed_noise([3]), **plain, **micro,
                                     **negative_micro)
    assert_close(got_plain, want_plain)
    assert_close(got_micro, want_micro)
    assert_close(got_negative[:1], want_negative)
    # The ids matter, so the parity above means something.
    assert np.abs(want_micro - want_plain).max() > 20 * ATOL
    assert np.abs(got_negative - got_micro).max() > 20 * ATOL
    # Only the negative ids given without both negative sizes: diffusers (and diffax) use the positive ids.
    crops_only = base(prompts, seed=[3, 4], negative_crops_coords_top_left=(9, 9), **plain).images
    np.testing.assert_array_equal(crops_only, got_plain)


def test_base_negative_prompts_clip_skip_rescale_and_images_per_prompt_match_diffusers(pipes, folders):
    kw = dict(prompt_2=PROMPTS_2, negative_prompt="zz", negative_prompt_2=["q", "r"], clip_skip=1,
              guidance_rescale=0.5, num_inference_steps=STEPS, guidance_scale=6.0, num_images_per_prompt=2)
    got = pipes["base"](PROMPTS, seed=20, **kw).images
    assert got.shape == (4, 16, 16, 3)
    assert_close(got, diffusers_images(folders["base"], prompt=PROMPTS, latents=seed_noise([20, 21, 22, 23]), **kw))


def test_one_device_with_given_embeddings_equals_eight_devices_with_prompts(pipes, folders):
    """Batch sharding (3 rows padded to 8 devices) and prompt_embeds / pooled ones passed in directly."""
    assert jax.device_count() == 8
    one = diffax.pipelines.load(folders["base"], cache_dir=False,
                                mesh=parallel.make_mesh({"data": 1}, devices=jax.devices()[:1]))
    prompts = ["a cat", "ab", "z"]
    kw = dict(num_inference_steps=STEPS, guidance_scale=5.0, guidance_rescale=0.5, seed=[5, 6, 7])
    # The static choices of the test above (negative text, clip_skip, rescale): its program, run again.
    eight = pipes["base"](prompts, negative_prompt="zz", clip_skip=1, **kw).images
    with torch.no_grad():
        embeds = diffusers_pipeline(str(folders["base"])).encode_prompt(
            prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=["zz"] * 3, clip_skip=1)
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    got = one(**{name: e.numpy() for name, e in zip(names, embeds)}, **kw).images
    # torch's embeddings differ from diffax's by ~1e-7; the images by ~2e-6 (measured).
    np.testing.assert_allclose(got, eight, rtol=0, atol=1e-5)


def test_refiner_img2img_with_aesthetic_scores_matches_diffusers(pipes, folders):
    refiner = pipes["refiner"]
    images, noise = smooth_images(0, 2), img2img_noise(1)
    # prompt_2 changes nothing here: diffusers' refiner encodes prompt with its one encoder.
    kw = dict(prompt_2=PROMPTS_2, num_inference_steps=4, guidance_scale=5.0, aesthetic_score=7.0,
              negative_aesthetic_score=2.0, original_size=(32, 32))
    for strength in (0.6, 0.9):  # a new strength reuses the program
        got = refiner(PROMPTS, image=images, strength=strength, latents=noise, **kw).images
        want = diffusers_images(folders["refiner"], prompt=PROMPTS, image=images, strength=strength,
                                generator=torch.Generator().manual_seed(1), **kw)
        assert_close(got, want)
        if strength == 0.6:
            traces = refiner.trace_count
    assert refiner.trace_count == traces


def test_base_to_refiner_hand_off_matches_diffusers(pipes, folders):
    steps, noise = 5, seed_noise([9])
    latents = pipes["base"]("a cat", num_inference_steps=steps, denoising_end=0.8, seed=9,
                            output_type="latent").images
    want_latents = diffusers_images(folders["base"], prompt="a cat", num_inference_steps=steps, denoising_end=0.8,
                                    output_type="latent", latents=noise)
    assert latents.shape == (1, 8, 8, 4)
    want_latents = want_latents.numpy().transpose(0, 2, 3, 1)
    # Unsettled latents of a random U-Net reach ~30: DESIGN's relative bar, 1e-4 of the largest value.
    assert np.abs(latents - want_latents).max() <= 1e-4 * np.abs(want_latents).max()
    # The refiner without guidance (guidance_scale 1: one U-Net call per step), the path no other test takes.
    got = pipes["refiner"]("a cat", image=latents, num_inference_steps=steps, denoising_start=0.8,
                           guidance_scale=1.0).images
    want = diffusers_images(folders["refiner"], prompt="a cat", num_inference_steps=steps, denoising_start=0.8,
                            guidance_scale=1.0, image=torch.from_numpy(want_latents.transpose(0, 3, 1, 2)))
    assert_close(got, want)


def test_command_line_refiner_runs_the_hand_off(pipes, tmp_path):
    """sample.py --refiner: the base's latents at high_noise_frac go to the refiner, image k from seed k."""
    from PIL import Image

    from diffax.pipelines import command

    request = command.Request(prompt="a cat", num_inference_steps=5, seed=9, num_images=2, batch_size=2,
                              high_noise_frac=0.8)
    result = command.generate(pipes["base"], request, tmp_path, refiner=pipes["refiner"])
    assert [p.name for p in result["paths"]] == ["9.png", "10.png"]
    latents = pipes["base"]("a cat", num_inference_steps=5, denoising_end=0.8, seed=[9, 10],
                            num_images_per_prompt=2, output_type="latent").images
    want = pipes["refiner"]("a cat", image=latents, num_inference_steps=5, denoising_start=0.8, seed=[9, 10],
                            num_images_per_prompt=2).images
    for path, image in zip(result["paths"], want):
        got = np.asarray(Image.open(path).convert("RGB")).astype(np.int16)
        assert np.abs(got - np.round(image * 255)).max() <= 1


def right_half_mask():
    """Repaint the right half: [1, 16, 16, 1] in {0, 1}."""
    mask = np.zeros((1, 16, 16, 1), np.float32)
    mask[:, :, 8:] = 1.0
    return mask


def test_inpainting_unet_matches_diffusers(pipes, folders):
    """A 9-channel U-Net from pure noise (strength 1) reads the mask and the masked image's latents."""
    images, mask, noise = smooth_images(2, 1), right_half_mask(), seed_noise([7, 8])
    kw = dict(num_inference_steps=STEPS, guidance_scale=6.0, strength=1.0, negative_prompt="zz")
    got = pipes["inpaint"](PROMPTS, image=images, mask_image=mask, seed=[7, 8], **kw).images
    assert_close(got, diffusers_images(folders["inpaint"], prompt=PROMPTS, image=images, mask_image=mask,
                                       latents=noise, **kw))


def test_inpainting_with_the_base_unet_blends_like_diffusers(pipes, folders):
    """A 4-channel U-Net (the base model's) from the noised image, the known region blended in every step."""
    base = pipes["base"]
    pipe = sdxl.StableDiffusionXLInpaintPipeline.from_pipe(base)
    steps = []
    pipe.progress = lambda step, total: steps.append((step, total))  # chained after the blending, as sample.py
    images, mask = smooth_images(3, 2), right_half_mask()
    kw = dict(num_inference_steps=4, guidance_scale=5.0, strength=0.7)
    got = pipe(PROMPTS, image=images, mask_image=mask, latents=img2img_noise(4), **kw).images
    assert sorted(set(steps)) == [(3, 4), (4, 4)]  # strength 0.7 of 4 steps runs the last 2
    reference = diffusers.StableDiffusionXLInpaintPipeline(**diffusers_pipeline(str(folders["base"])).components)
    reference.set_progress_bar_config(disable=True)
    with torch.no_grad():
        want = reference(PROMPTS, image=images, mask_image=mask, generator=torch.Generator().manual_seed(4),
                         output_type="np", **kw).images
    assert_close(got, want)
    # The kept (left) half stays close to the image, the repainted half does not.
    assert np.abs(got[:, :, :6] - images[:, :, :6]).mean() < np.abs(got[:, :, 10:] - images[:, :, 10:]).mean()


def test_switches_without_model_index_follow_the_released_configs(pipes):
    """A single-file checkpoint has no model_index.json: the U-Net's widths tell a refiner (5 time ids), and
    force_zeros_for_empty_prompt follows the released base (on) and refiner (off) configs."""
    for name, refiner in (("base", False), ("refiner", True)):
        pipe = pipes[name]
        assert pipe.requires_aesthetics_score is refiner and pipe.force_zeros_for_empty_prompt is not refiner
        bare = type(pipe)(pipe.components, pipe.scheduler, tokenizers=pipe.tokenizers, mesh=pipe.mesh)
        assert bare.requires_aesthetics_score is refiner and bare.force_zeros_for_empty_prompt is not refiner
    flipped = type(pipes["refiner"])(pipes["refiner"].components, pipes["refiner"].scheduler,
                                     tokenizers=pipes["refiner"].tokenizers, config={"requires_aesthetics_score": False})
    with pytest.raises(ValueError, match="requires_aesthetics_score=true"):
        flipped("a cat", image=smooth_images(0, 1))


def test_bad_inputs_are_one_line_errors(pipes):
    base, refiner = pipes["base"], pipes["refiner"]
    with pytest.raises(PipelineInputError, match="multiples of 4"):
        base("a cat", height=18, width=16)
    with pytest.raises(PipelineInputError, match="pooled_prompt_embeds"):
        base(prompt_embeds=np.zeros((1, 77, 32), np.float32))
    with pytest.raises(PipelineInputError, match="strength must be in"):
        refiner("a cat", image=smooth_images(0, 1), strength=1.5)
    with pytest.raises(PipelineInputError, match="no sampling steps left"):
        refiner("a cat", image=smooth_images(0, 1), strength=0.1, num_inference_steps=3)
    with pytest.raises(PipelineInputError, match="clip_skip"):
        base("a cat", clip_skip=3)
    with pytest.raises(ValueError, match="prompt_2 has 1 prompts"):
        base(PROMPTS, prompt_2=["a"])


def test_lora_on_both_text_encoders_and_the_unet_matches_diffusers(pipes, folders, tmp_path):
    """A diffusers-format SDXL LoRA (every linear layer of the U-Net and of both text encoders but the
    projection) at weight 0.7: diffusers' images, the same compiled program, and the plain images back after
    unloading."""
    reference = diffusers.StableDiffusionXLPipeline.from_pretrained(folders["base"])
    reference.set_progress_bar_config(disable=True)
    gen, layers = torch.Generator().manual_seed(3), {}
    for name in ("unet", "text_encoder", "text_encoder_2"):
        layers[name] = {}
        for module_name, module in getattr(reference, name).named_modules():
            if isinstance(module, torch.nn.Linear) and not module_name.endswith("text_projection"):
                down = torch.randn(4, module.in_features, generator=gen) * module.in_features ** -0.5 * 0.3
                up = torch.randn(module.out_features, 4, generator=gen) * 0.15
                layers[name][f"{module_name}.lora_A.weight"] = down
                layers[name][f"{module_name}.lora_B.weight"] = up
    diffusers.StableDiffusionXLPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        text_encoder_2_lora_layers=layers["text_encoder_2"], weight_name="sdxl_lora.safetensors")
    base, kw = pipes["base"], dict(prompt=PROMPTS, num_inference_steps=STEPS, guidance_scale=5.0, seed=[11, 12])
    plain = base(**kw).images
    base.load_lora_weights(tmp_path / "sdxl_lora.safetensors", scale=0.7)
    try:
        traces = base.trace_count
        got = base(**kw).images
        assert base.trace_count == traces  # new parameters, the same program
    finally:
        base.unload_lora_weights()
    reference.load_lora_weights(str(tmp_path), weight_name="sdxl_lora.safetensors")
    reference.set_adapters(["default_0"], [0.7])
    with torch.no_grad():
        want = reference(latents=torch.from_numpy(seed_noise([11, 12]).transpose(0, 3, 1, 2).copy()),
                         output_type="np", **{k: v for k, v in kw.items() if k != "seed"}).images
    assert_close(got, want)
    assert np.abs(got - plain).max() > 20 * ATOL
    np.testing.assert_array_equal(base(**kw).images, plain)
