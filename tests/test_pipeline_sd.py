"""Stable Diffusion pipelines (diffax.pipelines.stable_diffusion) against diffusers 0.42 on tiny random pipelines.

Each diffax image is compared with diffusers' from the same saved folder, the same scheduler config, the same
prompts and the same initial noise (diffax takes it NHWC, diffusers NCHW), both fp32 on CPU, output_type='np'.
Tolerance: max abs difference 1e-3 on [0, 1] images (measured: about 1e-5; the models agree to ~1e-6 relative
and a few sampler steps amplify that little). Images are checked to be far from saturated, so the comparison
has something to compare.
"""
from __future__ import annotations

import diffusers
import jax
import numpy as np
import pytest

import diffax.pipelines
from diffax import parallel
from diffax.pipelines.base import PipelineInputError
from diffax.pipelines.stable_diffusion import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
from tests.pipeline_fixtures import build_sd_pipeline, diffusers_images

ATOL = 1e-3
PROMPTS = ["a cat", "a dog"]
STEPS = 3


def noise(seed: int, n: int = 2, channels: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 8, 8, channels)).astype(np.float32)


def image(seed: int, n: int = 1) -> np.ndarray:
    """Smooth random images [n, 16, 16, 3] in [0, 1]."""
    x = np.random.default_rng(seed).uniform(0, 1, (n, 4, 4, 3)).astype(np.float32)
    return np.repeat(np.repeat(x, 4, axis=1), 4, axis=2)


def mask() -> np.ndarray:
    """Repaint the right half: [1, 16, 16, 1] in {0, 1}."""
    m = np.zeros((1, 16, 16, 1), np.float32)
    m[:, :, 8:] = 1.0
    return m


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape and got.dtype == np.float32
    assert want.std() > 0.05 and ((want > 0.01) & (want < 0.99)).mean() > 0.5, "saturated reference images"
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    return {"sd": build_sd_pipeline(root / "sd"), "inpaint": build_sd_pipeline(root / "inpaint", kind="inpaint")}


@pytest.fixture(scope="module")
def pipe(folders, tmp_path_factory):
    return diffax.pipelines.load(folders["sd"], cache_dir=tmp_path_factory.mktemp("cache"))


def test_txt2img_matches_diffusers_with_guidance_and_negative_prompt(pipe, folders):
    x = noise(0)
    got = pipe(PROMPTS, negative_prompt=["blurry", "dark"], num_inference_steps=STEPS, guidance_scale=6.0,
               latents=x).images
    want = diffusers_images(folders["sd"], prompt=PROMPTS, negative_prompt=["blurry", "dark"],
                            num_inference_steps=STEPS, guidance_scale=6.0, latents=x)
    assert_close(got, want)


def test_multistep_sampler_clip_skip_and_rescale_match_diffusers(pipe, folders):
    pipe.set_scheduler("DPMSolverMultistepScheduler")
    try:
        x = noise(1)
        kw = dict(num_inference_steps=STEPS, guidance_scale=5.0, guidance_rescale=0.7, clip_skip=1, latents=x)
        got = pipe(PROMPTS, **kw).images
        want = diffusers_images(folders["sd"], scheduler=diffusers.DPMSolverMultistepScheduler, prompt=PROMPTS, **kw)
        assert_close(got, want)
    finally:
        pipe.set_scheduler("DDIMScheduler")


def test_no_guidance_prompt_embeds_and_output_types(pipe, folders):
    # guidance_scale 1: one U-Net call per step; the prompt given as the text encoder's output.
    te, te_params = pipe.components["text_encoder"]
    ids = pipe.tokenizers["tokenizer"](["a cat"], padding="max_length", max_length=77, return_tensors="np")
    embeds = np.asarray(te.apply({"params": te_params}, ids["input_ids"]).last_hidden_state)
    x = noise(2, n=1)
    got = pipe(prompt_embeds=embeds, num_inference_steps=2, guidance_scale=1.0, latents=x).images
    want = diffusers_images(folders["sd"], prompt="a cat", num_inference_steps=2, guidance_scale=1.0, latents=x)
    assert_close(got, want)
    pil = pipe(prompt_embeds=embeds, num_inference_steps=2, guidance_scale=1.0, latents=x, output_type="pil").images
    assert len(pil) == 1 and pil[0].size == (16, 16)
    np.testing.assert_array_equal(np.asarray(pil[0]), (got[0] * 255).round().astype(np.uint8))


def test_img2img_matches_diffusers(pipe, folders):
    img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    assert img.params("unet") is pipe.params("unet") and img.device_params() is pipe.device_params()
    x, init = noise(3), image(0)
    got = img(PROMPTS, image=init, strength=0.7, num_inference_steps=4, guidance_scale=6.0, latents=x).images
    want = diffusers_images(folders["sd"], pipeline_class="StableDiffusionImg2ImgPipeline", noise=x,
                            prompt=PROMPTS, image=init, strength=0.7, num_inference_steps=4, guidance_scale=6.0)
    assert_close(got, want)


def test_inpaint_9_channel_unet_matches_diffusers(folders, tmp_path):
    inp = diffax.pipelines.load(folders["inpaint"], cache_dir=tmp_path)
    assert isinstance(inp, StableDiffusionInpaintPipeline) and inp.nine_channel
    x, init = noise(4), image(1)
    kw = dict(prompt=PROMPTS, image=init, mask_image=mask(), num_inference_steps=STEPS, guidance_scale=6.0,
              latents=x)
    assert_close(inp(**kw).images, diffusers_images(folders["inpaint"], **kw))


def test_inpaint_4_channel_unet_blends_latents_like_diffusers(pipe, folders):
    inp = StableDiffusionInpaintPipeline(pipe.components, pipe.scheduler, tokenizers=pipe.tokenizers)
    assert not inp.nine_channel
    x, init = noise(5), image(2)
    kw = dict(prompt=PROMPTS, image=init, mask_image=mask(), strength=0.75, num_inference_steps=4, guidance_scale=6.0)
    got = inp(latents=x, **kw).images
    want = diffusers_images(folders["sd"], pipeline_class="StableDiffusionInpaintPipeline", noise=x, **kw)
    assert_close(got, want)
    # The kept (unmasked) half stays close to the input image, the repainted half does not.
    assert np.abs(got[:, :, :6] - init[:, :, :6]).mean() < np.abs(got[:, :, 10:] - init[:, :, 10:]).mean()


def test_ddim_eta_matches_diffusers_given_the_same_step_noise(pipe, folders, monkeypatch):
    import torch
    from diffusers.schedulers import scheduling_ddim

    seeds, x = [21, 22], noise(8)
    kw = dict(num_inference_steps=STEPS, guidance_scale=6.0, latents=x)
    got = pipe(PROMPTS, seed=seeds, eta=1.0, **kw).images
    # diffax's step noise: image b at loop index i from fold_in(fold_in(key(seed_b), 2), i).
    streams = [jax.random.fold_in(jax.random.key(s), 2) for s in seeds]
    draws = iter([np.stack([np.asarray(jax.random.normal(jax.random.fold_in(k, i), (8, 8, 4))) for k in streams])
                  for i in range(STEPS)])
    monkeypatch.setattr(scheduling_ddim, "randn_tensor",
                        lambda shape, **_: torch.from_numpy(next(draws).transpose(0, 3, 1, 2)).reshape(shape))
    assert_close(got, diffusers_images(folders["sd"], prompt=PROMPTS, eta=1.0, **kw))
    assert np.abs(got - pipe(PROMPTS, seed=seeds, **kw).images).max() > 1e-2  # eta reached the sampler


def test_new_prompt_seed_guidance_and_strength_do_not_retrace(pipe):
    # The programs of the parity tests above (same sizes, steps and kinds of inputs) serve new values.
    pipe(PROMPTS, negative_prompt=["x", "y"], num_inference_steps=STEPS, guidance_scale=6.0, latents=noise(0))
    traces = pipe.trace_count
    pipe(["a dog", "a bird"], negative_prompt="cat", num_inference_steps=STEPS, guidance_scale=9.0, latents=noise(7),
         seed=5)
    assert pipe.trace_count == traces
    img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    img(PROMPTS, image=image(3), strength=0.5, num_inference_steps=4, guidance_scale=6.0, latents=noise(3))
    traces = img.trace_count
    kw = dict(image=image(4), num_inference_steps=4, latents=noise(3))
    a = img(PROMPTS, strength=1.0, guidance_scale=6.0, **kw).images
    b = img(["a bird", "a cat"], strength=0.25, guidance_scale=2.0, **kw).images
    assert img.trace_count == traces
    assert np.abs(a - b).max() > 1e-2  # the strength reached the program


def test_eight_devices_equal_one_and_images_depend_on_their_seed_only_even_with_step_noise(pipe, num_devices):
    assert num_devices == 8
    one = diffax.pipelines.stable_diffusion.StableDiffusionPipeline(
        pipe.components, pipe.scheduler, tokenizers=pipe.tokenizers,
        mesh=parallel.make_mesh({"data": 1}, devices=jax.devices()[:1]))
    # eta=1: DDIM draws noise every step, from each image's own seed as its starting noise.
    kw = dict(num_inference_steps=STEPS, guidance_scale=4.0, eta=1.0)
    batch = pipe(["a cat", "a cat"], seed=[11, 12], **kw).images  # 2 rows padded to 8 devices
    steps = []
    one.progress = lambda step, total: steps.append((step, total))  # the host callback of each step
    single = one(["a cat", "a cat"], seed=[11, 12], **kw).images
    assert steps == [(i, STEPS) for i in range(1, STEPS + 1)]
    np.testing.assert_allclose(batch, single, atol=1e-5)
    # FSDP: the same images with the weights split over 4 devices by the models' logical axes.
    fsdp = diffax.pipelines.stable_diffusion.StableDiffusionPipeline(
        pipe.components, pipe.scheduler, tokenizers=pipe.tokenizers, mesh=parallel.make_mesh({"data": 2, "fsdp": 4}))
    assert not all(x.sharding.is_fully_replicated for x in jax.tree.leaves(fsdp.device_params()["unet"]))
    np.testing.assert_allclose(fsdp(["a cat", "a cat"], seed=[11, 12], **kw).images, single, atol=1e-4)
    alone = pipe("a cat", seed=12, **kw).images
    np.testing.assert_allclose(alone[0], batch[1], atol=1e-5)
    assert np.abs(batch[0] - batch[1]).max() > 1e-2  # same prompt, other seed: another image


def test_vae_tiling_matches_diffusers_tiled_decode(pipe, folders):
    x = np.random.default_rng(6).standard_normal((1, 16, 16, 4)).astype(np.float32)  # 32x32 images: 2x2 tiles
    kw = dict(prompt="a cat", height=32, width=32, num_inference_steps=2, guidance_scale=1.0, latents=x)
    got = pipe(vae_tiling=True, **kw).images
    want = diffusers_images(folders["sd"], vae_tiling=True, **kw)
    assert_close(got, want)
    assert np.abs(diffusers_images(folders["sd"], **kw) - want).max() > 10 * ATOL  # tiling changes the image


def test_bf16_and_attention_backend_switches(folders, tmp_path):
    import jax.numpy as jnp

    bf16 = diffax.pipelines.load(folders["sd"], cache_dir=tmp_path, dtype=jnp.bfloat16, attention_backend="chunked")
    for name in ("unet", "vae", "text_encoder"):
        cfg = bf16.module(name).config
        assert cfg.dtype == jnp.bfloat16 and cfg.attention_backend == "chunked"
    x = noise(0)
    got = bf16(PROMPTS, negative_prompt=["blurry", "dark"], num_inference_steps=STEPS, guidance_scale=6.0,
               latents=x).images
    want = diffusers_images(folders["sd"], prompt=PROMPTS, negative_prompt=["blurry", "dark"],
                            num_inference_steps=STEPS, guidance_scale=6.0, latents=x)
    err = np.abs(got - want)
    print(f"bf16 vs diffusers fp32: max {err.max():.3g}, mean {err.mean():.3g}")
    assert got.dtype == np.float32 and err.mean() < 0.02 and err.max() < 0.15


def test_bad_inputs_are_named(pipe):
    with pytest.raises(PipelineInputError, match="output_type"):
        pipe("a cat", output_type="tensor")
    with pytest.raises(PipelineInputError, match="multiples of 4"):
        pipe("a cat", height=18)
    with pytest.raises(PipelineInputError, match="latents must be NHWC"):
        pipe("a cat", latents=np.zeros((1, 4, 8, 8), np.float32))
    with pytest.raises(PipelineInputError, match="seed"):
        pipe(["a cat", "a dog"], seed=[1])
    with pytest.raises(PipelineInputError, match="seed must be an int"):
        pipe("a cat", seed=None)
    with pytest.raises(PipelineInputError, match="negative_prompt"):
        pipe(["a cat", "a dog"], negative_prompt=["x", "y", "z"])
    img = StableDiffusionImg2ImgPipeline(pipe.components, pipe.scheduler, tokenizers=pipe.tokenizers)
    with pytest.raises(PipelineInputError, match="strength"):
        img("a cat", image=image(0), strength=0.1, num_inference_steps=4)
    with pytest.raises(ValueError, match=r"image: expected .*\[0, 1\]|values must be in \[0, 1\]"):
        img("a cat", image=image(0) * 255)
