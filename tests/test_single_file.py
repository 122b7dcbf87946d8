"""Tests for single-file Stable Diffusion checkpoints (diffax.convert.single_file).

Tiny diffusers / transformers models with every tensor randomised (norms included, so swapped names
cannot pass) are saved in their own formats and read through `diffax.convert.load`; `save_single_file`
writes them in the original layout, and
  - `load_single_file` reads that file back to exactly the same parameters, inferring the model type;
  - diffusers' own single-file converters (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
    `convert_open_clip_checkpoint`) read the same file back to the torch models' state dicts, which checks
    the written layout against an independent implementation of it.
"""
import math
import subprocess
import sys
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
import transformers
from diffusers.loaders import single_file_utils as sfu

from diffax import convert
from diffax.convert.__main__ import main as convert_main
from diffax.convert.io import CheckpointError, read_state_dict, write_safetensors
from diffax.convert.rules import flatten
from diffax.convert.single_file import infer_model_type, load_single_file, save_single_file
from diffax.convert.single_file_configs import MODEL_TYPES
from diffax.models import abstract_params, get_family

CROSS = 32
UNETS = {
    # SD 1.x's block pattern (attention down blocks then a plain one, mirrored up), 2 layers per block.
    "sd1": dict(sample_size=8, block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=CROSS, attention_head_dim=4),
    # SDXL's: a plain first block, linear projections, 2 transformer layers, the text_time embedding.
    "sdxl": dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=2, norm_num_groups=8,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                 cross_attention_dim=2 * CROSS, attention_head_dim=4, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=6 * 8 + 24),
}
UNETS["sd1_inpaint"] = dict(UNETS["sd1"], in_channels=9)
UNETS["sd2"] = dict(UNETS["sd1"], use_linear_projection=True)
VAE = dict(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
           block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=4, latent_channels=4, sample_size=16)
CLIP = dict(vocab_size=64, hidden_size=CROSS, intermediate_size=48, projection_dim=24, num_hidden_layers=3,
            num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1)
CLIP_L = ("CLIPTextModel", dict(CLIP, hidden_act="quick_gelu"))
OPENCLIP = ("CLIPTextModel", dict(CLIP, hidden_act="gelu"))
OPENCLIP_PROJ = ("CLIPTextModelWithProjection", dict(CLIP, hidden_act="gelu"))
# model type -> component -> (builder, kwargs)
PIPELINES = {
    "sd1": {"unet": ("unet", UNETS["sd1"]), "vae": ("vae", VAE), "text_encoder": CLIP_L},
    "sd1_inpaint": {"unet": ("unet", UNETS["sd1_inpaint"]), "text_encoder": CLIP_L},
    "sd2": {"unet": ("unet", UNETS["sd2"]), "vae": ("vae", VAE), "text_encoder": OPENCLIP},
    "sdxl": {"unet": ("unet", UNETS["sdxl"]), "vae": ("vae", VAE), "text_encoder": CLIP_L,
             "text_encoder_2": OPENCLIP_PROJ},
    "sdxl_refiner": {"unet": ("unet", UNETS["sdxl"]), "text_encoder_2": OPENCLIP_PROJ},
}


def randomise(model):
    """Every tensor random (norm scales around 1), so a name mix-up changes some value."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            offset = 1.0 if "norm" in name and name.endswith("weight") and p.ndim == 1 else 0.0
            p.copy_(torch.randn_like(p) * 0.1 + offset)
    return model.eval()


def torch_model(kind, kwargs):
    if kind == "unet":
        return randomise(diffusers.UNet2DConditionModel(**kwargs))
    if kind == "vae":
        return randomise(diffusers.AutoencoderKL(**kwargs))
    return randomise(getattr(transformers, kind)(transformers.CLIPTextConfig(**kwargs)))


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """model type -> component -> (torch model, diffax module, diffax params), read from saved folders."""
    out = {}
    for model_type, parts in PIPELINES.items():
        out[model_type] = {}
        for component, (kind, kwargs) in parts.items():
            model = torch_model(kind, kwargs)
            folder = tmp_path_factory.mktemp(f"{model_type}_{component}")
            model.save_pretrained(folder)
            module, params = convert.load(folder)
            out[model_type][component] = (model, module, params)
    return out


def assert_same(a, b):
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for path in fa:
        assert fa[path].dtype == fb[path].dtype, path
        np.testing.assert_array_equal(fa[path], fb[path], err_msg="/".join(path))


def write(tmp_path, model_type, parts):
    return save_single_file(tmp_path / f"{model_type}.safetensors",
                            {c: (m, p) for c, (_, m, p) in parts.items()}, model_type=model_type)


@pytest.mark.parametrize("model_type", sorted(PIPELINES))
def test_round_trip_and_inferred_type(model_type, pipelines, tmp_path):
    parts = pipelines[model_type]
    path = write(tmp_path, model_type, parts)
    assert infer_model_type(path) == model_type
    loaded = load_single_file(path, configs={c: m.config for c, (_, m, _) in parts.items()})
    assert loaded.keys() == parts.keys()
    for component, (_, module, params) in parts.items():
        assert loaded[component][0].config == module.config
        assert_same(loaded[component][1], params)


def torch_file(path):
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in read_state_dict(path).items()}


def assert_state_dict(got, model):
    """`got` holds `model`'s state dict (transformers 5 names CLIP tensors without `text_model.`)."""
    want = {k.removeprefix("text_model."): v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    got = {k.removeprefix("text_model."): v for k, v in got.items()}
    assert want.keys() <= got.keys(), sorted(want.keys() - got.keys())[:5]
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("model_type", ["sd1", "sd2", "sdxl", "sdxl_refiner"])
def test_written_layout_matches_diffusers_single_file_readers(model_type, pipelines, tmp_path):
    parts = pipelines[model_type]
    ckpt = torch_file(write(tmp_path, model_type, parts))
    unet = parts["unet"][0]
    assert_state_dict(sfu.convert_ldm_unet_checkpoint(ckpt, dict(unet.config)), unet)
    if "vae" in parts:
        vae = parts["vae"][0]
        assert_state_dict(sfu.convert_ldm_vae_checkpoint(ckpt, dict(vae.config)), vae)
    openclip = {"sd2": ("text_encoder", "cond_stage_model.model."),
                "sdxl": ("text_encoder_2", "conditioner.embedders.1.model."),
                "sdxl_refiner": ("text_encoder_2", "conditioner.embedders.0.model.")}
    if model_type in openclip:
        component, prefix = openclip[model_type]
        model = parts[component][0]
        assert_state_dict(sfu.convert_open_clip_checkpoint(model, ckpt, prefix=prefix), model)
    clip = {"sd1": "cond_stage_model.transformer.", "sdxl": "conditioner.embedders.0.transformer."}
    if model_type in clip:
        model = parts["text_encoder"][0]
        assert_state_dict(sfu.convert_ldm_clip_checkpoint(ckpt, remove_prefix=clip[model_type]), model)


def test_ckpt_with_state_dict_wrapper_and_original_extras(pipelines, tmp_path):
    """A .ckpt as the original training code saved it: a {'state_dict': ...} wrapper; SD 2's unused last
    OpenCLIP layer, its attention-mask buffer and text projection; the noise schedule: all skipped."""
    parts = pipelines["sd2"]
    sd = torch_file(write(tmp_path, "sd2", parts))
    n, d = CLIP["num_hidden_layers"], CLIP["hidden_size"]
    extra = {"cond_stage_model.model.transformer.resblocks.3.ln_1.weight": torch.ones(d),
             "cond_stage_model.model.transformer.resblocks.3.attn.in_proj_weight": torch.ones(3 * d, d),
             "cond_stage_model.model.attn_mask": torch.zeros(16, 16),
             "cond_stage_model.model.text_projection": torch.ones(d, 24),
             "cond_stage_model.model.logit_scale": torch.ones(()),
             "alphas_cumprod": torch.linspace(1, 0, 10)}
    assert n == 3
    path = tmp_path / "sd2.ckpt"
    torch.save({"state_dict": {**sd, **extra}, "global_step": 1}, path)
    assert infer_model_type(path) == "sd2"
    loaded = load_single_file(path, configs={c: m.config for c, (_, m, _) in parts.items()})
    for component, (_, _, params) in parts.items():
        assert_same(loaded[component][1], params)


def test_standard_configs_and_overrides(pipelines, tmp_path):
    """Without configs= each component gets its model type's standard architecture (the tiny file then
    does not fit it: the error names the file); model_type= overrides the inferred one."""
    parts = pipelines["sd1"]
    path = write(tmp_path, "sd1", parts)
    with pytest.raises(CheckpointError, match=f"{path}.*shape mismatch"):
        load_single_file(path, configs={"vae": parts["vae"][1].config, "text_encoder": parts["text_encoder"][1].config})
    configs = {c: m.config for c, (_, m, _) in parts.items()}
    loaded = load_single_file(path, model_type="sd1", configs=configs, param_dtype="bfloat16")
    assert all(str(leaf.dtype) == "bfloat16" for leaf in flatten(loaded["unet"][1]).values())
    with pytest.raises(ValueError, match="model_type must be one of"):
        load_single_file(path, model_type="sd3")
    with pytest.raises(ValueError, match="text_encoder_2"):
        load_single_file(path, configs={"text_encoder_2": configs["text_encoder"]})


# The released models' parameter counts (diffusers' / transformers' models of each upload).
PARAMETER_COUNTS = {
    ("sd1", "unet"): 859_520_964, ("sd2", "unet"): 865_910_724, ("sdxl", "unet"): 2_567_463_684,
    ("sdxl_refiner", "unet"): 2_259_526_660, ("sd1", "vae"): 83_653_863, ("sd1", "text_encoder"): 123_060_480,
    ("sd2", "text_encoder"): 340_387_840, ("sdxl", "text_encoder_2"): 694_659_840,
}


def test_standard_configs_have_the_released_sizes():
    """Shapes only (abstract_params): the standard configs build the released architectures."""
    for model_type, parts in MODEL_TYPES.items():
        for component, (class_name, values) in parts.items():
            config = get_family(class_name).config_cls.from_diffusers(values)
            if component == "unet":
                assert config.in_channels == (9 if model_type.endswith("inpaint") else 4)
            if (model_type, component) in PARAMETER_COUNTS:
                count = sum(math.prod(leaf.shape) for leaf in flatten(abstract_params(config)).values())
                assert count == PARAMETER_COUNTS[model_type, component], (model_type, component)


def test_bad_files_are_named(pipelines, tmp_path):
    path = tmp_path / "other.safetensors"
    write_safetensors(path, {"encoder.weight": np.ones((2, 2), np.float32)})
    with pytest.raises(CheckpointError, match=f"{path}: not a Stable Diffusion"):
        infer_model_type(path)
    parts = pipelines["sd1"]
    sd = read_state_dict(write(tmp_path, "sd1", parts))
    sd["model.diffusion_model.input_blocks.99.0.in_layers.0.weight"] = np.ones(4, np.float32)
    bad = tmp_path / "bad.safetensors"
    write_safetensors(bad, sd)
    with pytest.raises(CheckpointError, match=r"bad.safetensors: tensor 'model.diffusion_model.input_blocks.99"):
        load_single_file(bad, configs={c: m.config for c, (_, m, _) in parts.items()})
    with pytest.raises(ValueError, match="no component"):
        save_single_file(tmp_path / "x.safetensors", {"text_encoder_2": parts["text_encoder"][1:]}, model_type="sd1")


# ----------------------------------------------------------------------------- python -m diffax.convert

TINY_SD1 = {"unet": ("UNet2DConditionModel", UNETS["sd1"]), "vae": ("AutoencoderKL", VAE), "text_encoder": CLIP_L}


def test_cli_single_file_to_pipeline_and_back(pipelines, tmp_path, monkeypatch, capsys):
    """The CLI builds each component with its model type's standard config; the tiny models stand in for
    SD 1.5's by replacing that table entry."""
    monkeypatch.setitem(MODEL_TYPES, "sd1", TINY_SD1)
    parts = pipelines["sd1"]
    src = write(tmp_path, "sd1", parts)
    assert convert_main([str(src), str(tmp_path / "pipe")]) == 0
    assert "(single file, sd1) -> " in capsys.readouterr().out
    for component, (_, module, params) in parts.items():
        loaded_module, loaded = convert.load(tmp_path / "pipe", subfolder=component)
        assert loaded_module.config == module.config
        assert_same(loaded, params)
    assert diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "pipe" / "unet") is not None

    # Back to one file (the type inferred from the components): the same tensors as the original file.
    assert convert_main([str(tmp_path / "pipe"), str(tmp_path / "back.safetensors"), "--to", "single_file"]) == 0
    original, back = read_state_dict(src), read_state_dict(tmp_path / "back.safetensors")
    assert original.keys() == back.keys()
    for key in original:
        np.testing.assert_array_equal(back[key], original[key], err_msg=key)

    # One component's folder, and --model_type overriding the inferred type (SD 2's text-encoder layout).
    assert convert_main([str(tmp_path / "pipe" / "vae"), str(tmp_path / "vae.safetensors"), "--to", "single_file"]) == 0
    assert all(k.startswith("first_stage_model.") for k in read_state_dict(tmp_path / "vae.safetensors"))
    assert convert_main([str(tmp_path / "pipe" / "text_encoder"), str(tmp_path / "te.safetensors"),
                         "--to", "single_file", "--model_type", "sd2"]) == 0
    assert all(k.startswith("cond_stage_model.model.") for k in read_state_dict(tmp_path / "te.safetensors"))
    assert "(single file, sd2)" in capsys.readouterr().out


def test_cli_single_file_errors(pipelines, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(MODEL_TYPES, "sd1", TINY_SD1)
    src = write(tmp_path, "sd1", pipelines["sd1"])
    cases = [
        ([str(src), str(tmp_path / "x.pt"), "--to", "reference"], "converts to a pipeline folder"),
        ([str(src), str(tmp_path / "x"), "--subfolder", "unet"], "--subfolder does not apply"),
        # --model_type sdxl: the standard SDXL U-Net does not fit the file's tensors
        ([str(src), str(tmp_path / "x"), "--model_type", "sdxl"], "src.safetensors|sd1.safetensors"),
        ([str(tmp_path), str(tmp_path / "x.safetensors"), "--to", "single_file"], "no pipeline folder"),
    ]
    for argv, message in cases:
        assert convert_main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err, err
        assert any(m in err for m in message.split("|")), err


def test_cli_refusals_in_a_subprocess(tmp_path):
    """The module entry point: a bad --to single_file destination is one error line and status 1."""
    result = subprocess.run([sys.executable, "-m", "diffax.convert", str(tmp_path), str(tmp_path / "out.pt"),
                             "--to", "single_file"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'out.pt'}: --to single_file writes one file, ending in .safetensors"]
