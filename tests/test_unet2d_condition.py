"""UNet2DConditionModel: parity with diffusers' UNet2DConditionModel through the converter, for tiny
configs in the shape of each Stable Diffusion variant (SD 1.x, SD 2.x, SDXL base and refiner, inpainting).

The torch reference is built with random weights (every tensor perturbed, so zero-initialised ones such as
conv_out and proj_out count), saved with `save_pretrained`, loaded with `diffax.convert.load`, and compared
on random inputs. fp32 tolerance: max|diffax - torch| / max|torch| < 1e-4 (measured ~1e-6; a wrong head
split, transpose or eps moves the output by O(1)).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffax import convert  # noqa: E402
from diffax.convert.io import read_state_dict  # noqa: E402
from diffax.models import abstract_params, config_from_block  # noqa: E402
from diffax.models.unet2d_condition import UNet2DConditionConfig  # noqa: E402

RTOL = 1e-4
SIDE, TOKENS, BATCH = 16, 5, 2

_BASE = dict(sample_size=SIDE, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)
VARIANTS = {
    # SD 1.x: conv proj_in/proj_out, attention_head_dim = number of heads.
    "sd1": dict(_BASE, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4),
    # SD 2.x: linear projections, per-block head counts, upcast_attention.
    "sd2": dict(_BASE, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
                attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True),
    # SDXL base: no attention in the first block, deeper transformers, text_time added embedding.
    "sdxl": dict(_BASE, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=40,
                 attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=16 + 6 * 8, layers_per_block=2),
    # SDXL refiner: plain first and last blocks around cross-attention ones, one transformer depth for all.
    "refiner": dict(_BASE, block_out_channels=(16, 32, 32), down_block_types=(
        "DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=(
        "UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=24, attention_head_dim=(2, 4, 4),
        transformer_layers_per_block=2, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=12 + 5 * 8),
    # Inpainting: SD 1.x with latents + mask + masked-image latents in.
    "inpaint": dict(_BASE, in_channels=9, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                    attention_head_dim=4),
}
# Class-embedding variants, one block each (the embedding is all they test): SD 2.x unCLIP's 'projection'
# of an image embedding, the x4 upscaler's noise-level table (num_class_embeds), and 'timestep'; and the
# resnet-only and the absent mid block.
_ONE_BLOCK = dict(sample_size=SIDE, block_out_channels=(16,), layers_per_block=1, norm_num_groups=8,
                  down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                  cross_attention_dim=24, attention_head_dim=2, use_linear_projection=True)
CLASS_VARIANTS = {
    "unclip": dict(_ONE_BLOCK, class_embed_type="projection", projection_class_embeddings_input_dim=12),
    "upscaler": dict(_ONE_BLOCK, in_channels=7, num_class_embeds=50),
    "class_timestep": dict(_ONE_BLOCK, class_embed_type="timestep"),
    "resnet_mid": dict(_ONE_BLOCK, mid_block_type="UNetMidBlock2D"),  # also a mid block type diffusers builds
    "no_mid": dict(_ONE_BLOCK, mid_block_type=None),
}
VARIANTS.update(CLASS_VARIANTS)


def rel_err(a, b) -> float:
    """max-abs error relative to the reference's max-abs value."""
    return float(np.abs(np.asarray(a, np.float32) - b).max() / np.abs(b).max())


@functools.lru_cache
def torch_model(name: str):
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(**VARIANTS[name]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@functools.lru_cache
def inputs(name: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    kw = VARIANTS[name]
    out = dict(x=rng.standard_normal((BATCH, SIDE, SIDE, kw.get("in_channels", 4))).astype(np.float32),
               t=np.array([3.5, 901.0], np.float32),
               ctx=rng.standard_normal((BATCH, TOKENS, kw["cross_attention_dim"])).astype(np.float32))
    if kw.get("addition_embed_type") == "text_time":
        n_ids = 6 if name == "sdxl" else 5
        text = kw["projection_class_embeddings_input_dim"] - n_ids * kw["addition_time_embed_dim"]
        out["text_embeds"] = rng.standard_normal((BATCH, text)).astype(np.float32)
        out["time_ids"] = rng.uniform(0, 1024, (BATCH, n_ids)).round().astype(np.float32)
    if kw.get("class_embed_type") == "projection":
        out["class_labels"] = rng.standard_normal((BATCH, kw["projection_class_embeddings_input_dim"]))
        out["class_labels"] = out["class_labels"].astype(np.float32)
    elif "num_class_embeds" in kw or kw.get("class_embed_type") == "timestep":
        out["class_labels"] = np.array([7, 49], np.int64)
    return out


def torch_forward(model, inp: dict, down=None, mid=None) -> np.ndarray:
    def nchw(a):
        return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)
    added = None
    if "text_embeds" in inp:
        added = {"text_embeds": torch.from_numpy(inp["text_embeds"]), "time_ids": torch.from_numpy(inp["time_ids"])}
    with torch.no_grad():
        labels = torch.from_numpy(inp["class_labels"]) if "class_labels" in inp else None
        out = model(nchw(inp["x"]), torch.from_numpy(inp["t"]), torch.from_numpy(inp["ctx"]), added_cond_kwargs=added,
                    class_labels=labels,
                    down_block_additional_residuals=None if down is None else tuple(nchw(r) for r in down),
                    mid_block_additional_residual=None if mid is None else nchw(mid)).sample
    return out.permute(0, 2, 3, 1).numpy()


def flax_forward(module, params, inp: dict, down=None, mid=None) -> np.ndarray:
    added = None
    if "text_embeds" in inp:
        added = {"text_embeds": inp["text_embeds"], "time_ids": inp["time_ids"]}
    fn = jax.jit(lambda p, x, t, c, a, d, m, y: module.apply(
        {"params": p}, x, t, encoder_hidden_states=c, added_cond_kwargs=a, down_block_additional_residuals=d,
        mid_block_additional_residual=m, class_labels=y))
    return np.asarray(fn(params, inp["x"], inp["t"], inp["ctx"], added, down, mid, inp.get("class_labels")))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("unet2d_condition")

    @functools.lru_cache
    def folder(name: str):
        path = root / name
        torch_model(name).save_pretrained(path)
        return path
    return folder


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parity_fp32(name, saved):
    module, params = convert.load(saved(name))
    assert module.config == UNet2DConditionConfig.from_diffusers(torch_model(name).config)
    # The loaded tree has exactly the shapes the config builds.
    shapes = jax.tree.map(lambda a: a.shape, abstract_params(module.config))
    assert jax.tree.map(lambda a: a.shape, params) == shapes
    err = rel_err(flax_forward(module, params, inputs(name)), torch_forward(torch_model(name), inputs(name)))
    assert err < RTOL, f"{name}: relative error {err:.2e}"


def test_proj_in_layout(saved):
    """SD 1.x keeps 1x1 conv projections, SD 2.x linear ones, in both the file and the tree."""
    _, sd1 = convert.load(saved("sd1"))
    _, sd2 = convert.load(saved("sd2"))
    assert sd1["down_blocks_0"]["attentions_0"]["proj_in"]["kernel"].shape == (1, 1, 16, 16)
    assert sd2["down_blocks_0"]["attentions_0"]["proj_in"]["kernel"].shape == (16, 16)
    block = sd2["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]
    assert block["attn2"]["to_k"]["kernel"].shape == (24, 16)  # cross_attention_dim -> width
    assert block["ff"]["net_0"]["proj"]["kernel"].shape == (16, 2 * 4 * 16)  # GEGLU: value and gate


@pytest.mark.parametrize("name", ["sd1"])
def test_controlnet_residuals(name, saved):
    """ControlNet's residuals go onto the skips (conv_in's output, then each down block's) and the mid output."""
    module, params = convert.load(saved(name))
    model, inp = torch_model(name), inputs(name)
    rng = np.random.default_rng(2)
    kw = VARIANTS[name]
    channels, side, shapes = kw["block_out_channels"], SIDE, []
    shapes.append((BATCH, side, side, channels[0]))
    for i, c in enumerate(channels):
        shapes += [(BATCH, side, side, c)] * kw["layers_per_block"]
        if i < len(channels) - 1:
            side //= 2
            shapes.append((BATCH, side, side, c))
    down = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    mid = rng.standard_normal((BATCH, side, side, channels[-1])).astype(np.float32)
    ref = torch_forward(model, inp, down, mid)
    assert rel_err(ref, torch_forward(model, inp)) > 1e-2  # the residuals change the output
    err = rel_err(flax_forward(module, params, inp, down, mid), ref)
    assert err < RTOL, f"{name}: relative error {err:.2e}"


def test_bf16(saved):
    """bf16 compute and weights stay within 5e-2 relative of torch fp32 (bf16 has an 8-bit mantissa: ~4e-3
    per op, accumulated over ~20 layers)."""
    module, params = convert.load(saved("sd1"), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params))
    out = flax_forward(module, params, inputs("sd1"))
    assert out.dtype == jnp.bfloat16
    err = rel_err(out, torch_forward(torch_model("sd1"), inputs("sd1")))
    assert err < 5e-2, f"bf16 relative error {err:.2e}"


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_export_round_trip(name, saved, tmp_path):
    module, params = convert.load(saved(name))
    convert.save(tmp_path, module, params)
    original = read_state_dict(saved(name))
    exported = read_state_dict(tmp_path)
    assert sorted(original) == sorted(exported)
    for key in original:
        np.testing.assert_array_equal(np.asarray(exported[key]), np.asarray(original[key]), err_msg=key)
    reloaded = diffusers.UNet2DConditionModel.from_pretrained(tmp_path).eval()
    err = rel_err(torch_forward(reloaded, inputs(name)), torch_forward(torch_model(name), inputs(name)))
    assert err == 0.0


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="dual_cross_attention"):
        UNet2DConditionConfig.from_diffusers(dict(VARIANTS["sd1"], dual_cross_attention=True))
    with pytest.raises(ValueError, match="class_embed_type"):
        UNet2DConditionConfig.from_diffusers(dict(VARIANTS["sd1"], class_embed_type="simple_projection"))
    with pytest.raises(ValueError, match="attention_head_dim"):
        UNet2DConditionConfig.from_diffusers(dict(VARIANTS["sd1"], attention_head_dim=3))
    path = tmp_path / "config.json"
    path.write_text('{"_class_name": "UNet2DConditionModel", "time_cond_proj_dim": 256}')
    with pytest.raises(ValueError, match=f"{path}.*time_cond_proj_dim"):
        UNet2DConditionConfig.from_diffusers(path)


def test_registry_protocol():
    config = UNet2DConditionConfig.from_diffusers(VARIANTS["sdxl"])
    assert config.sample_shape == (SIDE, SIDE, 4) and not config.learn_sigma and config.num_classes == 0
    assert not config.has_null_cond
    _, _, cond = config.example_inputs(batch=3)
    assert cond["encoder_hidden_states"].shape == (3, 1, 40)
    assert cond["added_cond_kwargs"]["text_embeds"].shape == (3, 16)
    assert config.to_diffusers()["attention_head_dim"] == [2, 4]
    assert UNet2DConditionConfig.from_diffusers(config.to_diffusers()) == config
    # A run config's model block (JSON lists, the alias) builds the same model.
    block = {"name": "unet2d_condition", **{k: list(v) if isinstance(v, tuple) else v
                                            for k, v in VARIANTS["sdxl"].items()}}
    assert config_from_block(block) == config
