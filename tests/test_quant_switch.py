"""The --quantize switch wherever a model runs: Pipeline.quantize / load(quantize=), sample.py --model, and
what refuses quantized weights (LoRA merging, diffusers export; train.py --quantize without a model to tune). sample.py --workdir --quantize is
tested in test_sample_cli.py, on its trained workdir."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import diffax.pipelines
from diffax import convert
from diffax.convert.io import CheckpointError
from diffax.image_io import read_parameters
from diffax.pipelines import command
from diffax.pipelines.lora import apply
from diffax.quant import QuantizationError, device_bytes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
import pipeline_fixtures as fixtures  # noqa: E402

STEPS = 3
CALL = dict(seed=0, num_images_per_prompt=2, num_inference_steps=STEPS, guidance_scale=4.0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return fixtures.build_sd_pipeline(tmp_path_factory.mktemp("quant") / "sd")


@pytest.fixture(scope="module")
def fp32(folder):
    pipe = diffax.pipelines.load(str(folder))
    return pipe, pipe("a cat", **CALL).images


@pytest.fixture(scope="module")
def int8(folder):
    return diffax.pipelines.load(str(folder), quantize="int8")


def test_int8_pipeline_is_close_to_fp32_and_smaller(fp32, int8):
    """Images of the tiny SD pipeline (random weights, 3 DDIM steps, guidance 4) with the U-Net and text
    encoder in int8: within 0.05 (max) / 0.01 (mean) of the fp32 images in [0, 1] (measured 0.020 / 0.003)."""
    pipe, reference = fp32
    assert int8.quantized_components() == ["text_encoder", "unet"]
    images = int8("a cat", **CALL).images
    diff = np.abs(images - reference)
    assert diff.max() < 0.05 and diff.mean() < 0.01, (diff.max(), diff.mean())
    assert diff.max() > 0  # the integer weights did run
    # U-Net 0.28 of its fp32 bytes; the text encoder 0.31 with its embedding tables quantized (0.48 without:
    # at width 32 its biases and norms weigh more than at full size, where it is 0.25); VAE as is.
    ratio = {n: device_bytes(int8.params(n)) / device_bytes(pipe.params(n)) for n in ("unet", "text_encoder", "vae")}
    assert ratio["unet"] < 0.3 and ratio["text_encoder"] < 0.33 and ratio["vae"] == 1.0, ratio


@pytest.mark.slow  # a whole sample.py pipeline run: `make test-slow`
def test_sample_py_model_quantize(folder, int8, tmp_path):
    """sample.py --model --quantize=int8 writes the images of the Python API's int8 pipeline, and says so."""
    result = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--model={folder}", "--prompt=a cat",
                             "--num_images=2", "--batch_size=2", "--seed=0", f"--steps={STEPS}", "--guidance_scale=4",
                             "--quantize=int8", f"--out={tmp_path}"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert read_parameters(tmp_path / "1.png")["quantize"] == "int8"
    image = np.asarray(Image.open(tmp_path / "1.png").convert("RGB")).astype(np.int16)
    assert np.abs(image - np.round(int8("a cat", **CALL).images[1] * 255)).max() <= 1


def test_quantized_params_follow_the_sharding_rules(fp32, int8):
    """On a data x fsdp mesh an integer kernel and its scale are split like the float kernel's output axis,
    and their rows (padded, packed) are replicated."""
    from diffax import parallel
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})

    def specs(pipe):
        on_mesh = type(pipe)(pipe.components, pipe.scheduler, tokenizers=pipe.tokenizers, mesh=mesh)
        tree = on_mesh.param_shardings(pipe.module("unet"), pipe.params("unet"))
        leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "spec"))[0]
        return {"/".join(k.key for k in path): tuple(s.spec) for path, s in leaves}, tree

    float_specs, _ = specs(fp32[0])
    int8_specs, shardings = specs(int8)
    kernels = [k for k in float_specs if k.endswith("/kernel")]
    assert any(float_specs[k][-1] for k in kernels)  # some output axes are split on this mesh
    for k in kernels:
        out_axis = float_specs[k][-1] if float_specs[k] else None
        assert int8_specs[k] == int8_specs[k + "_scale"] == (None, out_axis), k
    params = jax.device_put(int8.params("unet"), shardings)  # the quantized shapes fit their shardings
    assert params["conv_in"]["kernel"].dtype == np.int8


def test_quantize_arguments_are_checked(fp32, int8):
    pipe, _ = fp32
    with pytest.raises(QuantizationError, match="quantization must be one of int8, int4, got 'int3'"):
        pipe.quantize("int3")
    with pytest.raises(ValueError, match="quantize: no component 'transformer'"):
        pipe.quantize("int8", ["transformer"])
    with pytest.raises(ValueError, match="quantize: unet is quantized already"):
        int8.quantize("int8", ["unet"])
    with pytest.raises(QuantizationError, match=r"load\(quantize=...\): quantization must be one of"):
        diffax.pipelines.load("no-such-folder", quantize="fp8")


def test_lora_on_quantized_weights_is_refused_and_the_cli_fuses_first(folder, fp32, int8, tmp_path):
    """LoRA merges into float weights: loading it into a quantized U-Net, or applying it to quantized params,
    is an error naming the order that works; --lora with --quantize fuses the LoRA, then quantizes, and gives
    the fp32 LoRA images within the int8 tolerance."""
    import diffusers
    from test_lora import write_kohya

    saved = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    lora = tmp_path / "style.safetensors"
    write_kohya(lora, saved.unet, saved.text_encoder)
    with pytest.raises(ValueError, match="LoRA for the quantized text_encoder and unet; load it into the float "
                                         "pipeline, fuse_lora"):
        int8.load_lora_weights(lora)
    assert int8.get_list_adapters() == {}
    from diffax.convert.lora import read_lora
    layers = read_lora(lora, fp32[0].components)["unet"]
    with pytest.raises(ValueError, match="is quantized; apply LoRA to the float params, then quantize"):
        apply(int8.params("unet"), [layers], [1.0])

    request = command.Request(prompt="a cat", num_inference_steps=STEPS)
    quantized, _ = command.build_pipeline(str(folder), request, loras=[f"{lora}:0.5"], quantize="int8")
    assert quantized.quantized_components() == ["text_encoder", "unet"] and quantized.get_list_adapters() == {}
    float_lora, _ = command.build_pipeline(str(folder), request, loras=[f"{lora}:0.5"])
    with pytest.raises(ValueError, match="LoRA adapters lora_0 are loaded; fold them into the weights first"):
        float_lora.quantize("int8")
    a, b = quantized("a cat", **CALL).images, float_lora("a cat", **CALL).images
    assert np.abs(a - b).max() < 0.05 and np.abs(a - fp32[1]).max() > 1e-3  # the LoRA is in


def test_diffusers_export_of_quantized_params_is_refused(int8, tmp_path):
    """convert.save writes float PyTorch weights; quantized params are refused before anything is written,
    and the dequantised tree (the explicit choice) saves."""
    module, params = int8.components["text_encoder"]
    with pytest.raises(CheckpointError, match="the params are quantized .* diffax.quant.save_safetensors, or export "
                                              "floats with diffax.quant.dequantize"):
        convert.save(tmp_path / "te", module, params)
    assert not (tmp_path / "te").exists()


def test_train_py_quantize_needs_a_pretrained_model(tmp_path):
    """train.py --quantize is TuneQDM (tests/test_finetune.py); with nothing to start from it says so."""
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs/digits.py'}",
                             f"--workdir={tmp_path}", "--quantize=int8"], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: --quantize=int8 fine-tunes a pretrained model: set "
                                            "--config.train.init_from")
