"""ControlNetModel: parity with diffusers' ControlNetModel through the converter (every residual), the
residuals driving the U-Net end to end, MultiControlNetModel's sum, `from_unet`, and the export.

The torch references are tiny, with random weights: every tensor is perturbed, so the zero-initialised
ones (the zero convolutions, the conditioning embedding's conv_out) carry signal and a wrong transpose or
name shows. fp32 tolerance: max|diffax - torch| / max|torch| < 1e-4 per residual.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffax import convert  # noqa: E402
from diffax.convert.io import read_state_dict  # noqa: E402
from diffax.models import abstract_params  # noqa: E402
from diffax.models.controlnet import (ControlNetConfig, ControlNetModel, apply_multi_controlnet,  # noqa: E402
                                      params_from_unet)
from diffax.models.unet2d_condition import UNet2DConditionConfig  # noqa: E402

RTOL = 1e-4
SIDE, TOKENS, BATCH = 8, 5, 2
COND = (4, 8)  # conditioning_embedding_out_channels: the image is 2x the latents

_BASE = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
             conditioning_embedding_out_channels=COND)
VARIANTS = {
    "sd1": dict(_BASE, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=32,
                attention_head_dim=4),
    "sd1_bgr": dict(_BASE, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=32,
                    attention_head_dim=4, controlnet_conditioning_channel_order="bgr"),
    "pool": dict(_BASE, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=32,
                 attention_head_dim=4, global_pool_conditions=True),
    "sdxl": dict(_BASE, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), cross_attention_dim=40,
                 attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=16 + 6 * 8),
}
# U-Nets the ControlNets drive (the same encoder keys, with up blocks).
UNETS = {
    "sd1": dict(sample_size=SIDE, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4),
    "sdxl": dict(sample_size=SIDE, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=40,
                 attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=16 + 6 * 8),
}


def rel_err(a, b) -> float:
    """max-abs error relative to the reference's max-abs value."""
    b = np.asarray(b, np.float32)
    return float(np.abs(np.asarray(a, np.float32) - b).max() / np.abs(b).max())


def perturb(model, seed: int):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@functools.lru_cache
def torch_controlnet(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return perturb(diffusers.ControlNetModel(**VARIANTS[name]), seed + 100)


@functools.lru_cache
def torch_unet(name: str):
    torch.manual_seed(7)
    return perturb(diffusers.UNet2DConditionModel(**UNETS[name]), 8)


@functools.lru_cache
def inputs(name: str, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    kw = VARIANTS[name]
    f = 2 ** (len(COND) - 1)
    out = dict(x=rng.standard_normal((BATCH, SIDE, SIDE, 4)).astype(np.float32),
               t=np.array([3.5, 901.0], np.float32),
               ctx=rng.standard_normal((BATCH, TOKENS, kw["cross_attention_dim"])).astype(np.float32),
               image=rng.uniform(0, 1, (BATCH, SIDE * f, SIDE * f, 3)).astype(np.float32))
    if kw.get("addition_embed_type") == "text_time":
        out["text_embeds"] = rng.standard_normal((BATCH, 16)).astype(np.float32)
        out["time_ids"] = rng.uniform(0, 1024, (BATCH, 6)).round().astype(np.float32)
    return out


def nchw(a):
    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)


def nhwc(t):
    return t.permute(0, 2, 3, 1).numpy()


def added_torch(inp):
    if "text_embeds" not in inp:
        return None
    return {"text_embeds": torch.from_numpy(inp["text_embeds"]), "time_ids": torch.from_numpy(inp["time_ids"])}


def added_flax(inp):
    if "text_embeds" not in inp:
        return None
    return {"text_embeds": inp["text_embeds"], "time_ids": inp["time_ids"]}


def torch_residuals(model, inp, scale=1.0, guess_mode=False):
    with torch.no_grad():
        down, mid = model(nchw(inp["x"]), torch.from_numpy(inp["t"]), torch.from_numpy(inp["ctx"]),
                          controlnet_cond=nchw(inp["image"]), conditioning_scale=scale,
                          added_cond_kwargs=added_torch(inp), guess_mode=guess_mode, return_dict=False)
    return [nhwc(r) for r in down], nhwc(mid)


def flax_residuals(module, params, inp, scale=1.0, guess_mode=False):
    fn = jax.jit(lambda p, x, t, c, img, a, s: module.apply(
        {"params": p}, x, t, encoder_hidden_states=c, controlnet_cond=img, conditioning_scale=s,
        added_cond_kwargs=a, guess_mode=guess_mode))
    down, mid = fn(params, inp["x"], inp["t"], inp["ctx"], inp["image"], added_flax(inp), scale)
    return [np.asarray(r) for r in down], np.asarray(mid)


def assert_residuals_close(flax_out, torch_out, what: str):
    (fd, fm), (td, tm) = flax_out, torch_out
    assert len(fd) == len(td), what
    for i, (a, b) in enumerate(zip(fd, td)):
        assert a.shape == b.shape, f"{what}: down {i} shape {a.shape} vs {b.shape}"
        assert np.abs(b).max() > 1e-3, f"{what}: down {i} is ~0 in torch (weights not randomised)"
        err = rel_err(a, b)
        assert err < RTOL, f"{what}: down residual {i} relative error {err:.2e}"
    assert fm.shape == tm.shape
    err = rel_err(fm, tm)
    assert err < RTOL, f"{what}: mid residual relative error {err:.2e}"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnet")

    @functools.lru_cache
    def folder(name: str, seed: int = 0):
        path = root / f"{name}_{seed}"
        torch_controlnet(name, seed).save_pretrained(path)
        return path
    return folder


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parity_fp32(name, saved):
    module, params = convert.load(saved(name))
    assert isinstance(module, ControlNetModel)
    assert module.config == ControlNetConfig.from_diffusers(torch_controlnet(name).config)
    shapes = jax.tree.map(lambda a: a.shape, abstract_params(module.config))
    assert jax.tree.map(lambda a: a.shape, params) == shapes
    inp = inputs(name)
    assert_residuals_close(flax_residuals(module, params, inp, scale=0.7),
                           torch_residuals(torch_controlnet(name), inp, scale=0.7), name)


@pytest.mark.parametrize("name", ["sd1", "pool"])
def test_guess_mode(name, saved):
    module, params = convert.load(saved(name))
    inp = inputs(name)
    ref = torch_residuals(torch_controlnet(name), inp, scale=0.6, guess_mode=True)
    assert_residuals_close(flax_residuals(module, params, inp, scale=0.6, guess_mode=True), ref, name)
    if name == "sd1":  # the logspace scales differ from the plain scale on every residual but the mid one
        plain = torch_residuals(torch_controlnet(name), inp, scale=0.6)
        assert rel_err(ref[0][0], plain[0][0]) > 0.5


def test_bf16(saved):
    """bf16 compute and weights stay within 5e-2 relative of torch fp32 (bf16's 8-bit mantissa, ~15 layers)."""
    module, params = convert.load(saved("sd1"), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    inp = inputs("sd1")
    down, mid = flax_residuals(module, params, inp, scale=0.7, guess_mode=True)
    tdown, tmid = torch_residuals(torch_controlnet("sd1"), inp, scale=0.7, guess_mode=True)
    assert all(r.dtype == jnp.bfloat16 for r in down) and mid.dtype == jnp.bfloat16
    for a, b in zip(down + [mid], tdown + [tmid]):
        assert rel_err(a, b) < 5e-2


def test_bgr_flips_the_image(saved):
    """A 'bgr' model on an image equals the same weights as 'rgb' on the channel-flipped image."""
    module, params = convert.load(saved("sd1_bgr"))
    rgb = ControlNetModel(dataclasses.replace(module.config, controlnet_conditioning_channel_order="rgb"))
    inp = inputs("sd1_bgr")
    flipped = dict(inp, image=inp["image"][..., ::-1])
    a, b = flax_residuals(module, params, inp), flax_residuals(rgb, params, flipped)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-5, atol=1e-6)
    assert rel_err(flax_residuals(rgb, params, inp)[1], a[1]) > 1e-3  # the order matters


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_end_to_end_with_unet(name, saved, tmp_path):
    """diffax ControlNet residuals into the diffax U-Net == diffusers' residuals into diffusers' U-Net."""
    cn, cn_params = convert.load(saved(name))
    torch_unet(name).save_pretrained(tmp_path / "unet")
    unet, unet_params = convert.load(tmp_path / "unet")
    inp = inputs(name)
    down, mid = flax_residuals(cn, cn_params, inp, scale=0.8)
    out = np.asarray(jax.jit(lambda p, d, m: unet.apply(
        {"params": p}, inp["x"], inp["t"], encoder_hidden_states=inp["ctx"], added_cond_kwargs=added_flax(inp),
        down_block_additional_residuals=d, mid_block_additional_residual=m))(unet_params, down, mid))
    tdown, tmid = torch_residuals(torch_controlnet(name), inp, scale=0.8)
    with torch.no_grad():
        args = (nchw(inp["x"]), torch.from_numpy(inp["t"]), torch.from_numpy(inp["ctx"]))
        ref = nhwc(torch_unet(name)(*args, added_cond_kwargs=added_torch(inp),
                                    down_block_additional_residuals=tuple(nchw(r) for r in tdown),
                                    mid_block_additional_residual=nchw(tmid)).sample)
        plain = nhwc(torch_unet(name)(*args, added_cond_kwargs=added_torch(inp)).sample)
    assert rel_err(ref, plain) > 1e-2  # the control changes the prediction
    err = rel_err(out, ref)
    assert err < RTOL, f"{name}: relative error {err:.2e}"


def test_multi_controlnet(saved):
    """Two ControlNets with their own images and scales sum as diffusers' MultiControlNetModel."""
    nets = [convert.load(saved("sd1", 0)), convert.load(saved("sd1", 1))]
    a, b = inputs("sd1", 1), inputs("sd1", 2)
    scales = (0.5, 1.3)
    multi = diffusers.models.controlnets.MultiControlNetModel([torch_controlnet("sd1", 0),
                                                               torch_controlnet("sd1", 1)])
    with torch.no_grad():
        tdown, tmid = multi(nchw(a["x"]), torch.from_numpy(a["t"]), torch.from_numpy(a["ctx"]),
                            controlnet_cond=[nchw(a["image"]), nchw(b["image"])], conditioning_scale=list(scales),
                            return_dict=False)
    modules = [m for m, _ in nets]
    fn = jax.jit(lambda ps, x, t, c, images: apply_multi_controlnet(
        list(zip(modules, ps)), x, t, encoder_hidden_states=c, controlnet_cond=images, conditioning_scale=scales))
    down, mid = fn([p for _, p in nets], a["x"], a["t"], a["ctx"], [a["image"], b["image"]])
    assert_residuals_close(([np.asarray(r) for r in down], np.asarray(mid)),
                           ([nhwc(r) for r in tdown], nhwc(tmid)), "multi")
    with pytest.raises(ValueError, match="one controlnet_cond"):
        apply_multi_controlnet(nets, a["x"], a["t"], encoder_hidden_states=a["ctx"], controlnet_cond=[a["image"]],
                               conditioning_scale=scales)


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_from_unet(name, tmp_path):
    """ControlNetConfig.from_unet + params_from_unet == diffusers' ControlNetModel.from_unet: the same config,
    the U-Net's encoder weights, zero convolutions zero; the residuals leave a U-Net's output unchanged."""
    reference = diffusers.ControlNetModel.from_unet(torch_unet(name), conditioning_embedding_out_channels=COND)
    torch_unet(name).save_pretrained(tmp_path / "unet")
    unet, unet_params = convert.load(tmp_path / "unet")
    config = ControlNetConfig.from_unet(unet.config, conditioning_embedding_out_channels=COND)
    assert config == ControlNetConfig.from_diffusers(dict(reference.config))
    params = params_from_unet(config, unet_params, jax.random.key(0))
    reference.save_pretrained(tmp_path / "reference")
    _, ref_params = convert.load(tmp_path / "reference")
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, ref_params)
    flat = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    ref_flat = dict(jax.tree_util.tree_flatten_with_path(ref_params)[0])
    compared = 0
    for path, ref in ref_flat.items():
        top = path[0].key
        if top == "controlnet_cond_embedding" and path[1].key != "conv_out":
            continue  # randomly initialised on both sides
        np.testing.assert_array_equal(np.asarray(flat[path]), np.asarray(ref), err_msg=str(path))
        compared += 1
    assert compared > len(ref_flat) // 2
    # A fresh ControlNet's residuals are all zero.
    inp = inputs(name)
    down, mid = flax_residuals(ControlNetModel(config), params, inp)
    assert all(np.all(r == 0) for r in down) and np.all(mid == 0)
    with pytest.raises(ValueError, match="conv_in_kernel"):
        ControlNetConfig.from_unet(UNet2DConditionConfig.from_diffusers(dict(UNETS["sd1"], conv_in_kernel=5)))


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_export_round_trip(name, saved, tmp_path):
    module, params = convert.load(saved(name))
    convert.save(tmp_path, module, params)
    original = read_state_dict(saved(name))
    exported = read_state_dict(tmp_path)
    assert sorted(original) == sorted(exported)
    for key in original:
        np.testing.assert_array_equal(np.asarray(exported[key]), np.asarray(original[key]), err_msg=key)
    reloaded = diffusers.ControlNetModel.from_pretrained(tmp_path).eval()
    inp = inputs(name)
    (rd, rm), (td, tm) = torch_residuals(reloaded, inp), torch_residuals(torch_controlnet(name), inp)
    for a, b in zip(rd, td):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(rm, tm)


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="controlnet_conditioning_channel_order"):
        ControlNetConfig.from_diffusers(dict(VARIANTS["sd1"], controlnet_conditioning_channel_order="rbg"))
    with pytest.raises(ValueError, match="attention_head_dim"):
        ControlNetConfig.from_diffusers(dict(VARIANTS["sd1"], attention_head_dim=3))
    with pytest.raises(ValueError, match="up_block_types"):  # a U-Net key is not a ControlNet key
        ControlNetConfig.from_diffusers(dict(VARIANTS["sd1"], up_block_types=["UpBlock2D", "UpBlock2D"]))
    path = tmp_path / "config.json"
    path.write_text('{"_class_name": "ControlNetModel", "encoder_hid_dim": 32}')
    with pytest.raises(ValueError, match=f"{path}.*encoder_hid_dim"):
        ControlNetConfig.from_diffusers(path)
    config = ControlNetConfig.from_diffusers(VARIANTS["sd1"])
    module = ControlNetModel(config)
    params = jax.tree.map(jnp.zeros_like, abstract_params(config))
    inp = inputs("sd1")
    with pytest.raises(ValueError, match="controlnet_cond must be"):
        module.apply({"params": params}, inp["x"], inp["t"], encoder_hidden_states=inp["ctx"],
                     controlnet_cond=inp["x"])
    assert ControlNetConfig.from_diffusers(config.to_diffusers()) == config
