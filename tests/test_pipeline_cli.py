"""sample.py --model: one PNG per image named by its seed, with its parameters; the task follows the inputs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffax.image_io import read_parameters
from diffax.pipelines import command
from diffax.pipelines.base import PipelineInputError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
import pipeline_fixtures as fixtures  # noqa: E402

STEPS = 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return fixtures.build_sd_pipeline(tmp_path_factory.mktemp("cli") / "sd")


@pytest.fixture(scope="module")
def pipe(folder):
    return command.build_pipeline(str(folder), command.Request(prompt="a cat"))[0]


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def test_sample_py_writes_one_png_per_seed(folder, pipe, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--model={folder}", "--prompt=a cat",
                             "--num_images=3", "--batch_size=2", "--seed=5", f"--steps={STEPS}",
                             "--guidance_scale=4", f"--out={out}"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["5.png", "6.png", "7.png"]
    assert "images/s" in result.stdout and "compile" in result.stdout
    made_with = read_parameters(out / "6.png")
    assert made_with["seed"] == 6 and made_with["prompt"] == "a cat" and made_with["num_inference_steps"] == STEPS
    assert made_with["pipeline"] == "StableDiffusionPipeline"
    # Image 6 was the second of a batch of two; alone, from the Python API, it is the same picture.
    alone = pipe("a cat", seed=6, num_inference_steps=STEPS, guidance_scale=4.0).images[0]
    assert np.abs(_png(out / "6.png") - np.round(alone * 255)).max() <= 1
    assert np.abs(_png(out / "5.png") - _png(out / "6.png")).max() > 10  # other seed, other picture


def test_image_and_mask_pick_the_task(folder, tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    img2img = command.Request(prompt="a cat", image=str(tmp_path / "in.png"), strength=0.5,
                              num_inference_steps=4)
    pipe, _ = command.build_pipeline(str(folder), img2img)
    assert type(pipe).__name__ == "StableDiffusionImg2ImgPipeline"
    result = command.generate(pipe, img2img, tmp_path / "i2i")
    assert [p.name for p in result["paths"]] == ["0.png"]
    inpaint = command.Request(prompt="a cat", image=str(tmp_path / "in.png"), mask=str(tmp_path / "mask.png"),
                              num_inference_steps=STEPS)
    pipe, _ = command.build_pipeline(str(folder), inpaint)
    assert type(pipe).__name__ == "StableDiffusionInpaintPipeline"
    command.generate(pipe, inpaint, tmp_path / "inpaint")
    repainted = _png(tmp_path / "inpaint" / "0.png")
    assert repainted.shape == (64, 64, 3)


def test_lora_flag_equals_the_python_call(folder, pipe, tmp_path):
    import diffusers
    from test_lora import write_kohya

    saved = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    write_kohya(tmp_path / "style.safetensors", saved.unet, saved.text_encoder)
    request = command.Request(prompt="a cat", num_inference_steps=STEPS)
    with_flag, _ = command.build_pipeline(str(folder), request, loras=[f"{tmp_path / 'style.safetensors'}:0.5"])
    by_hand, _ = command.build_pipeline(str(folder), request)
    by_hand.load_lora_weights(tmp_path / "style.safetensors", scale=0.5)
    a = with_flag("a cat", num_inference_steps=STEPS).images
    b = by_hand("a cat", num_inference_steps=STEPS).images
    base = pipe("a cat", num_inference_steps=STEPS).images
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - base).max() > 1e-3  # the LoRA changed the picture


@pytest.mark.parametrize("args, message", [
    (dict(mask="m.png"), "--mask needs --image"),
    (dict(control_image="c.png"), "--control_image needs --controlnet"),
])
def test_bad_requests_are_named(folder, args, message):
    with pytest.raises(PipelineInputError, match=message):
        command.build_pipeline(str(folder), command.Request(prompt="a cat", **args))


def test_out_must_be_a_directory_and_prompt_is_required(folder, pipe, tmp_path):
    with pytest.raises(PipelineInputError, match="--out: with --model it is a directory"):
        command.generate(pipe, command.Request(prompt="a cat"), tmp_path / "x.png")
    result = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--model={folder}", f"--out={tmp_path}"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.strip() == "error: --model needs --prompt"


def test_parse_lora():
    assert command.parse_lora("a/b.safetensors") == ("a/b.safetensors", 1.0)
    assert command.parse_lora("a/b.safetensors:0.7") == ("a/b.safetensors", 0.7)
    assert command.parse_lora("C:/x.safetensors") == ("C:/x.safetensors", 1.0)


def test_controlnet_with_canny_equals_the_python_call(tmp_path):
    from test_pipeline_controlnet import build_controlnet_pipelines

    from diffax.pipelines.canny import canny
    from diffax.pipelines.controlnet import with_controlnet

    folders = build_controlnet_pipelines(tmp_path)
    rng = np.random.default_rng(1)
    photo = np.repeat(np.repeat(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), 2, 0), 2, 1)  # [16, 16, 3]
    Image.fromarray(photo).save(tmp_path / "photo.png")
    request = command.Request(prompt="a cat", control_image=str(tmp_path / "photo.png"), canny=True,
                              controlnet_scale=0.7, num_inference_steps=STEPS, seed=3)
    pipe, _ = command.build_pipeline(str(folders["sd"]), request, controlnets=[str(folders["cn1"] / "controlnet")])
    assert type(pipe).__name__ == "StableDiffusionControlNetPipeline"
    command.generate(pipe, request, tmp_path / "out")
    by_hand = with_controlnet(command.build_pipeline(str(folders["sd"]), command.Request(prompt="a cat"))[0],
                              str(folders["cn1"] / "controlnet"))
    want = by_hand("a cat", image=canny(photo), controlnet_conditioning_scale=0.7, num_inference_steps=STEPS,
                   seed=3).images[0]
    assert np.abs(_png(tmp_path / "out" / "3.png") - np.round(want * 255)).max() <= 1
    plain = by_hand("a cat", image=photo, controlnet_conditioning_scale=0.7, num_inference_steps=STEPS,
                    seed=3).images[0]
    assert np.abs(want - plain).max() > 1e-3  # the edge map, not the photo, conditioned the CLI's image
