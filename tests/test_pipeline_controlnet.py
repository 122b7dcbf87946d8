"""The ControlNet pipelines against diffusers' on tiny random pipelines: one ControlNet, two with their own
scales and guidance windows, img2img in guess mode with a window, inpainting with latent blending, SDXL in
guess mode and SDXL img2img; 8 devices equal one; no retrace on new prompts, seeds, scales or windows;
ControlNets attached to a plain SD folder equal the saved ControlNet pipeline.

The ControlNets are diffusers' `ControlNetModel.from_unet` of the tiny U-Nets, then every tensor randomised
(the zero convolutions too, so the residuals carry signal). Same scheduler config, prompts, control images
and starting noise (diffax draws it from the seeds; diffusers gets it as NCHW `latents`, or as its img2img
noise); fp32. Tolerance: max |diffax - diffusers| <= 1e-3 on [0, 1] images (measured: 3e-6 to 7e-6).
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import diffax.pipelines  # noqa: E402
from diffax import parallel  # noqa: E402
from diffax.pipelines.base import PipelineInputError, noise_from_seeds  # noqa: E402
from diffax.pipelines.controlnet import (MultiControlNet, StableDiffusionControlNetImg2ImgPipeline,  # noqa: E402
                                         StableDiffusionControlNetInpaintPipeline, StableDiffusionControlNetPipeline,
                                         StableDiffusionXLControlNetImg2ImgPipeline,
                                         StableDiffusionXLControlNetPipeline, controlnet_keep, with_controlnet)
from tests.pipeline_fixtures import (build_sd_pipeline, diffusers_images, randomise, tiny_clip,  # noqa: E402
                                     tiny_vae, write_tokenizer)

TOL = 1e-3
STEPS = 3
PROMPTS = ["a cat", "a dog"]


def build_controlnet_pipelines(root: Path) -> dict[str, Path]:
    """A tiny SD folder, and StableDiffusionControlNetPipeline folders over it with one net and with two."""
    sd = build_sd_pipeline(root / "sd")
    base = diffusers.StableDiffusionPipeline.from_pretrained(sd)
    nets = [randomise(diffusers.ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(8, 16)),
                      seed=30 + k) for k in range(2)]
    parts = {k: v for k, v in base.components.items() if k != "image_encoder"}
    out = {"sd": sd}
    for name, controlnet in (("cn1", nets[0]), ("cn2", nets)):
        pipe = diffusers.StableDiffusionControlNetPipeline(**parts, controlnet=controlnet, image_encoder=None,
                                                           requires_safety_checker=False)
        pipe.save_pretrained(root / name)
        out[name] = root / name
    return out


def build_sdxl_controlnet_pipeline(folder: Path) -> Path:
    """A tiny StableDiffusionXLControlNetPipeline folder: two CLIPs (16 wide; the second with a projection),
    a two-level 'text_time' U-Net on 8x8 latents and its ControlNet, an Euler scheduler."""
    tok = write_tokenizer(folder.parent / f"{folder.name}_tokenizer")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tok)
    te1 = tiny_clip(tok, seed=40, hidden_size=16)
    te2 = tiny_clip(tok, seed=41, hidden_size=16, with_projection=True, hidden_act="gelu")
    unet = randomise(diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=8, cross_attention_dim=32,
        projection_class_embeddings_input_dim=6 * 8 + te2.config.projection_dim), seed=42, scale=0.2)
    net = randomise(diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)),
                    seed=43, scale=0.2)
    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 timestep_spacing="leading", steps_offset=1)
    pipe = diffusers.StableDiffusionXLControlNetPipeline(
        vae=tiny_vae(44), text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer, tokenizer_2=tokenizer,
        unet=unet, controlnet=net, scheduler=scheduler, add_watermarker=False)
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    return build_controlnet_pipelines(tmp_path_factory.mktemp("controlnet"))


@pytest.fixture(scope="module")
def pipes(folders) -> dict[str, StableDiffusionControlNetPipeline]:
    return {name: diffax.pipelines.load(folders[name], cache_dir=False) for name in ("cn1", "cn2")}


def control_images(n: int = 2, seed: int = 0) -> list[np.ndarray]:
    """Two control-image batches [n, 16, 16, 3] in [0, 1]."""
    rng = np.random.default_rng(seed)
    return [rng.random((n, 16, 16, 3)).astype(np.float32) for _ in range(2)]


def latents_of(seeds: list[int]) -> np.ndarray:
    """The NHWC starting noise diffax draws from `seeds` (diffusers gets it as `latents`); the diffax calls
    take seeds, so every call of a pipeline shares one program."""
    return np.asarray(noise_from_seeds(jnp.asarray(seeds, jnp.uint32), (8, 8, 4)))


def check(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape
    err = float(np.abs(ours - ref).max())
    assert err <= TOL, f"max |diffax - diffusers| = {err:.2e}"


def test_one_controlnet_matches_diffusers(folders, pipes):
    image, _ = control_images()
    call = dict(prompt=PROMPTS, image=image, num_inference_steps=STEPS, guidance_scale=7.5,
                controlnet_conditioning_scale=0.7)
    ours = pipes["cn1"](**call, seed=[3, 4]).images
    check(ours, diffusers_images(folders["cn1"], **call, latents=latents_of([3, 4])))
    # The ControlNet matters: without it (scale 0) the images differ.
    assert np.abs(ours - pipes["cn1"](**{**call, "controlnet_conditioning_scale": 0.0}, seed=[3, 4]).images
                  ).max() > 1e-2


def test_two_controlnets_with_scales_and_windows_match_diffusers(folders, pipes):
    images = control_images()
    call = dict(prompt=PROMPTS, image=images, num_inference_steps=STEPS, guidance_scale=5.0,
                controlnet_conditioning_scale=[1.0, 0.5], control_guidance_start=[0.0, 0.3],
                control_guidance_end=[0.7, 1.0])
    assert isinstance(pipes["cn2"].module("controlnet"), MultiControlNet)
    check(pipes["cn2"](**call, seed=0).images, diffusers_images(folders["cn2"], **call, latents=latents_of([0, 1])))


def test_img2img_guess_mode_with_a_window_over_the_kept_steps_matches_diffusers(folders, pipes):
    # strength 0.75 of 4 steps runs 3; the window [0.34, 1] then drops the first two of them. Guess mode: the
    # net sees the conditional half only.
    cn = pipes["cn1"]
    pipe = StableDiffusionControlNetImg2ImgPipeline(cn.components, cn.scheduler, tokenizers=cn.tokenizers)
    image, control = control_images(1, seed=3)
    call = dict(prompt=PROMPTS, image=image, control_image=control, strength=0.75, num_inference_steps=4,
                guidance_scale=6.0, control_guidance_start=0.34, guess_mode=True)
    check(pipe(**call, seed=[1, 2]).images,
          diffusers_images(folders["cn1"], pipeline_class="StableDiffusionControlNetImg2ImgPipeline",
                           noise=latents_of([1, 2]), **call))


def test_inpaint_blending_matches_diffusers(folders, pipes):
    cn = pipes["cn1"]
    pipe = StableDiffusionControlNetInpaintPipeline(cn.components, cn.scheduler, tokenizers=cn.tokenizers)
    image, control = control_images(1, seed=4)
    mask = np.zeros((1, 16, 16, 1), np.float32)
    mask[:, :, 8:] = 1.0  # repaint the right half
    call = dict(prompt=PROMPTS, image=image, mask_image=mask, control_image=control, strength=0.75,
                num_inference_steps=4, guidance_scale=6.0, controlnet_conditioning_scale=0.9)
    check(pipe(**call, seed=[1, 2]).images,
          diffusers_images(folders["cn1"], pipeline_class="StableDiffusionControlNetInpaintPipeline",
                           noise=latents_of([1, 2]), **call))


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory) -> Path:
    return build_sdxl_controlnet_pipeline(tmp_path_factory.mktemp("sdxl_controlnet") / "sdxl_cn")


@pytest.fixture(scope="module")
def sdxl_pipe(sdxl_folder) -> StableDiffusionXLControlNetPipeline:
    return diffax.pipelines.load(sdxl_folder, cache_dir=False)


def test_sdxl_guess_mode_with_scale_and_window_matches_diffusers(sdxl_folder, sdxl_pipe):
    # Guess mode halves the pooled text embeddings and time ids the SDXL ControlNet reads, too.
    assert isinstance(sdxl_pipe, StableDiffusionXLControlNetPipeline)
    image, _ = control_images(1, seed=5)
    call = dict(prompt=PROMPTS, image=image, num_inference_steps=STEPS, guidance_scale=5.0, guess_mode=True,
                controlnet_conditioning_scale=0.8, control_guidance_end=0.7)
    ours = sdxl_pipe(**call, seed=[7, 8]).images
    check(ours, diffusers_images(sdxl_folder, **call, latents=latents_of([7, 8])))
    assert np.abs(ours - sdxl_pipe(**{**call, "controlnet_conditioning_scale": 0.0}, seed=[7, 8]).images
                  ).max() > 1e-2


def test_sdxl_img2img_with_a_window_matches_diffusers(sdxl_folder, sdxl_pipe):
    pipe = StableDiffusionXLControlNetImg2ImgPipeline.from_pipe(sdxl_pipe)
    image, control = control_images(1, seed=6)
    call = dict(prompt=PROMPTS, image=image, control_image=control, strength=0.75, num_inference_steps=4,
                guidance_scale=5.0, control_guidance_start=0.34)
    check(pipe(**call, seed=[1, 2]).images,
          diffusers_images(sdxl_folder, pipeline_class="StableDiffusionXLControlNetImg2ImgPipeline",
                           noise=latents_of([1, 2]), **call))


def test_keep_table_follows_diffusers_fractions():
    keep = controlnet_keep(5, 1, [0.0, 0.5], [0.5, 1.0])  # 4 steps run, from loop index 1
    np.testing.assert_array_equal(keep[:, 0], [0, 1, 1, 0, 0])
    np.testing.assert_array_equal(keep[:, 1], [0, 0, 0, 1, 1])


def test_eight_devices_equal_one_and_no_retrace(folders, pipes):
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices")
    one = diffax.pipelines.load(folders["cn1"], cache_dir=False, mesh=parallel.make_mesh({"data": 1},
                                                                                          devices=jax.devices()[:1]))
    eight = pipes["cn1"]
    image, _ = control_images(3, seed=2)
    call = dict(prompt=["a cat", "a dog", "cat"], image=image, num_inference_steps=STEPS, seed=[5, 6, 7],
                controlnet_conditioning_scale=0.8)
    np.testing.assert_allclose(eight(**call).images, one(**call).images, atol=1e-5)
    traces = eight.trace_count
    eight(**{**call, "prompt": ["a dog", "a", "b"], "seed": 11, "controlnet_conditioning_scale": 1.3,
             "guidance_scale": 3.0, "control_guidance_start": 0.2, "control_guidance_end": 0.6})
    assert eight.trace_count == traces


def test_attached_to_plain_sd_equals_saved_pipeline(folders, pipes):
    plain = diffax.pipelines.load(folders["sd"], cache_dir=False)
    attached = with_controlnet(plain, [folders["cn2"] / "controlnet", folders["cn2"] / "controlnet_1"])
    call = dict(prompt=PROMPTS, image=control_images(), num_inference_steps=STEPS)
    want = pipes["cn2"](**call).images
    np.testing.assert_array_equal(attached(**call).images, want)
    loaded = diffax.pipelines.load(folders["sd"], cache_dir=False,
                                   controlnet=[folders["cn2"] / "controlnet", folders["cn2"] / "controlnet_1"])
    assert type(loaded).__name__ == "StableDiffusionControlNetPipeline"
    np.testing.assert_array_equal(loaded(**call).images, want)


def test_uint8_edge_maps_and_input_errors(pipes):
    image, _ = control_images(1)
    edges = (image[0] > 0.5).astype(np.uint8) * 255
    pipe = pipes["cn1"]
    kw = dict(num_inference_steps=STEPS, guidance_scale=7.5)
    np.testing.assert_array_equal(pipe("a cat", image=edges, **kw).images,
                                  pipe("a cat", image=edges.astype(np.float32) / 255, **kw).images)
    with pytest.raises(PipelineInputError, match="control_guidance_start"):
        pipe("a cat", image=edges, control_guidance_start=0.8, control_guidance_end=0.2, **kw)
    with pytest.raises(PipelineInputError, match="2 ControlNets"):
        pipes["cn2"]("a cat", image=[edges], **kw)
    with pytest.raises(PipelineInputError, match="controlnet_conditioning_scale"):
        pipes["cn2"]("a cat", image=[edges, edges], controlnet_conditioning_scale=[1.0, 1.0, 1.0], **kw)
    with pytest.raises(PipelineInputError, match="image: the ControlNet needs"):
        pipe("a cat", **kw)
