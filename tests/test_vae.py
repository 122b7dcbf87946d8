"""AutoencoderKL: config handling, and parity with diffusers' AutoencoderKL through the converter.

The torch reference is a tiny AutoencoderKL with random weights (every tensor perturbed, so a transpose,
a swapped scale / bias or a missing quant conv cannot hide), saved with `save_pretrained` and loaded with
`diffax.convert.load`.

Tolerances: fp32 parity is max|diffax - torch| / max|torch| < 1e-4 (both sides fp32 with different
summation orders; measured ~1e-6). bf16 compute is checked at 5e-2 relative (bf16 keeps 8 mantissa bits,
~4e-3 per rounding, compounded over ~20 layers; measured 1.4e-2 for the posterior mean, 2.2e-2 for decode).
"""
from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffax import convert  # noqa: E402
from diffax.convert import rules  # noqa: E402
from diffax.convert.io import read_state_dict, write_safetensors  # noqa: E402
from diffax.models import abstract_params, get_family  # noqa: E402
from diffax.models.vae import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian  # noqa: E402

RTOL = 1e-4
BF16_RTOL = 5e-2

TORCH_KWARGS = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
    norm_num_groups=4, latent_channels=4, sample_size=16)


def rel_err(a, b) -> float:
    """max-abs error relative to the reference's max-abs value."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / np.abs(b).max())


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(0, 2, 3, 1).numpy()


@functools.lru_cache
def _jitted(config: AutoencoderKLConfig, method: str, **kwargs):
    module = AutoencoderKL(config)
    return jax.jit(lambda p, x: module.apply({"params": p}, x, method=getattr(module, method), **kwargs))


def run(config: AutoencoderKLConfig, params, x, method: str = "__call__", **kwargs):
    """A module method on numpy inputs, compiled once per (config, method, options)."""
    return _jitted(config, method, **kwargs)(params, x)


def images(shape, seed=0) -> np.ndarray:
    return np.random.RandomState(seed).uniform(-1, 1, shape).astype(np.float32)


def latents(shape, seed=1) -> np.ndarray:
    return np.random.RandomState(seed).randn(*shape).astype(np.float32)


@pytest.fixture(scope="module")
def torch_vae():
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(**TORCH_KWARGS).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def folder(torch_vae, tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "vae"
    torch_vae.save_pretrained(path)  # safetensors, diffusers' real on-disk format
    return path


@pytest.fixture(scope="module")
def loaded(folder):
    module, params = convert.load(folder)
    return module.config, params


# ----------------------------------------------------------------------------- config


def test_config_reads_diffusers_keys_and_registers(torch_vae, loaded):
    config, _ = loaded
    assert isinstance(config, AutoencoderKLConfig)
    assert get_family("vae").config_cls is AutoencoderKLConfig
    assert get_family("AutoencoderKL").module_cls is AutoencoderKL
    out = config.to_diffusers()
    want = {k: (list(v) if isinstance(v, tuple) else v) for k, v in torch_vae.config.items() if not k.startswith("_")}
    assert {k: out[k] for k in want} == want
    assert AutoencoderKLConfig.from_diffusers(out) == config
    assert (config.tile_sample_min_size, config.tile_latent_min_size) == (16, 8)
    # diffusers' defaults are ours, key for key
    defaults = json.loads(json.dumps(dict(diffusers.AutoencoderKL().config)))
    assert AutoencoderKLConfig().to_diffusers() == {k: v for k, v in defaults.items() if not k.startswith("_")} \
        | {"_class_name": "AutoencoderKL"}


@pytest.mark.parametrize("key, value", [
    ("down_block_types", ["AttnDownEncoderBlock2D", "DownEncoderBlock2D"]),
    ("up_block_types", ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]),
    ("act_fn", "gelu"),
    ("norm_num_groups", 3),
    ("latents_mean", [0.0, 0.0]),
    ("block_out_channels", [8, 16, 32]),
    ("scaling_factor", float("nan")),
    ("use_quant_convs", False),  # not a key diffusers has
])
def test_unsupported_config_is_an_error_naming_the_key(key, value):
    cfg = {"_class_name": "AutoencoderKL", **{k: list(v) if isinstance(v, tuple) else v
                                               for k, v in TORCH_KWARGS.items()}, key: value}
    with pytest.raises(ValueError, match=key):
        AutoencoderKLConfig.from_diffusers(cfg)


def test_latent_scaling_matches_diffusers_pipelines():
    z = latents((2, 4, 4, 4))
    sd = AutoencoderKLConfig(scaling_factor=0.18215)
    np.testing.assert_allclose(sd.scale_latents(z), z * 0.18215, rtol=1e-6)
    np.testing.assert_allclose(sd.unscale_latents(sd.scale_latents(z)), z, rtol=1e-5, atol=1e-6)
    # SD3 / Flux: (z - shift_factor) * scaling_factor
    sd3 = AutoencoderKLConfig(scaling_factor=1.5305, shift_factor=0.0609)
    np.testing.assert_allclose(sd3.scale_latents(z), (z - 0.0609) * 1.5305, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sd3.unscale_latents(sd3.scale_latents(z)), z, rtol=1e-5, atol=1e-5)
    # SDXL-style per-channel statistics: (z - mean) * scaling_factor / std, channels last
    mean, std = (0.1, -0.2, 0.3, 0.0), (1.0, 2.0, 0.5, 4.0)
    xl = AutoencoderKLConfig(scaling_factor=0.13025, latents_mean=mean, latents_std=std)
    want = (z - np.array(mean, np.float32)) * 0.13025 / np.array(std, np.float32)
    np.testing.assert_allclose(xl.scale_latents(z), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(xl.unscale_latents(xl.scale_latents(z)), z, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- parity with diffusers


def test_encode_decode_forward_match_diffusers(torch_vae, loaded):
    config, params = loaded
    x, z = images((2, 16, 16, 3)), latents((2, 8, 8, 4))
    with torch.no_grad():
        posterior = torch_vae.encode(nchw(x)).latent_dist
        decoded = nhwc(torch_vae.decode(nchw(z)).sample)
        forward = nhwc(torch_vae(nchw(x)).sample)
    ours = run(config, params, x, "encode")
    assert rel_err(ours.mean, nhwc(posterior.mean)) < RTOL
    assert rel_err(ours.logvar, nhwc(posterior.logvar)) < RTOL
    assert rel_err(ours.std, nhwc(posterior.std)) < RTOL
    np.testing.assert_allclose(ours.kl(), posterior.kl().numpy(), rtol=RTOL)
    assert rel_err(run(config, params, z, "decode"), decoded) < RTOL
    assert rel_err(run(config, params, x), forward) < RTOL


def test_posterior_sample_and_kl():
    mean, logvar = latents((2, 3, 3, 2), 5), 50 * latents((2, 3, 3, 2), 6)
    posterior = DiagonalGaussian.from_moments(jnp.concatenate([mean, logvar], -1))
    assert float(posterior.logvar.min()) == -30.0 and float(posterior.logvar.max()) == 20.0  # clipped
    key = jax.random.key(3)
    eps = jax.random.normal(key, mean.shape)
    np.testing.assert_allclose(posterior.sample(key), mean + np.exp(0.5 * np.clip(logvar, -30, 20)) * eps,
                               rtol=1e-6)
    np.testing.assert_array_equal(posterior.mode(), mean)
    torch_posterior = diffusers.models.autoencoders.vae.DiagonalGaussianDistribution(
        nchw(np.concatenate([mean, logvar], -1)))
    other = DiagonalGaussian.from_moments(jnp.concatenate([logvar / 50, mean], -1))
    torch_other = diffusers.models.autoencoders.vae.DiagonalGaussianDistribution(
        nchw(np.concatenate([logvar / 50, mean], -1)))
    np.testing.assert_allclose(posterior.kl(other), torch_posterior.kl(torch_other).numpy(), rtol=1e-5)
    sample = latents((2, 3, 3, 2), 7)
    np.testing.assert_allclose(posterior.nll(sample), torch_posterior.nll(nchw(sample)).numpy(), rtol=1e-5)


def test_forward_sample_posterior_decodes_a_sample(loaded):
    config, params = loaded
    module = AutoencoderKL(config)

    @jax.jit
    def both(p, x, key):
        z = module.apply({"params": p}, x, method=module.encode).sample(key)
        return (module.apply({"params": p}, x, sample_posterior=True, key=key),
                module.apply({"params": p}, z, method=module.decode))

    got, want = both(params, images((2, 16, 16, 3)), jax.random.key(7))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="key"):
        jax.eval_shape(lambda p, x: module.apply({"params": p}, x, sample_posterior=True), params,
                       jnp.zeros((1, 16, 16, 3)))


def test_bf16_compute_close_to_torch(torch_vae, folder):
    module, params = convert.load(folder, dtype="bfloat16")
    x, z = images((2, 16, 16, 3)), latents((2, 8, 8, 4))
    with torch.no_grad():
        mean = nhwc(torch_vae.encode(nchw(x)).latent_dist.mean)
        decoded = nhwc(torch_vae.decode(nchw(z)).sample)
    ours = run(module.config, params, x, "encode")
    assert ours.mean.dtype == jnp.bfloat16
    assert rel_err(ours.mean, mean) < BF16_RTOL
    assert rel_err(run(module.config, params, z, "decode"), decoded) < BF16_RTOL


def test_fp16_force_upcast_decodes_in_fp32(loaded):
    """The SDXL VAE's failure: activations beyond fp16's 65504 inside the decoder. A mid-block resnet
    scaled up reproduces it: fp16 gives inf / NaN, force_upcast gives the fp32 result."""
    config, params = loaded
    params = jax.tree.map(np.asarray, params)
    conv2 = params["decoder"]["mid_block"]["resnets_0"]["conv2"]
    conv2["kernel"] = conv2["kernel"] * 1e5  # the residual sum now reaches ~1e5; the next GroupNorm rescales it
    z = latents((2, 8, 8, 4))
    fp32 = run(config, params, z, "decode")
    assert np.isfinite(fp32).all()
    half = dataclasses.replace(config, dtype=jnp.float16, force_upcast=False)
    assert not np.isfinite(np.asarray(run(half, params, z, "decode"), np.float32)).all()
    upcast = dataclasses.replace(half, force_upcast=True)
    out = run(upcast, params, z, "decode")
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, fp32, rtol=1e-6, atol=1e-6)
    # fp16 weights as well (a `variant="fp16"` checkpoint): finite, and off only by the weights' rounding
    half_params = jax.tree.map(lambda a: a.astype(np.float16), params)
    out = run(dataclasses.replace(upcast, param_dtype=jnp.float16), half_params, z, "decode")
    assert np.isfinite(out).all() and rel_err(out, fp32) < 1e-2


def test_export_round_trips_and_diffusers_loads_it(torch_vae, folder, loaded, tmp_path):
    config, params = loaded
    path = convert.save(tmp_path / "vae", AutoencoderKL(config), params)
    original, exported = read_state_dict(folder / path.name), read_state_dict(path)
    assert exported.keys() == original.keys()
    for key in original:
        np.testing.assert_array_equal(exported[key], original[key], err_msg=key)
    reloaded = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    x = nchw(images((1, 16, 16, 3)))
    with torch.no_grad():
        assert torch.equal(reloaded(x).sample, torch_vae(x).sample)


def test_old_attention_names_load(folder, loaded, tmp_path):
    """Folders saved before diffusers renamed its attention layers say query / key / value / proj_attn."""
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {}
    for key, value in read_state_dict(folder / "diffusion_pytorch_model.safetensors").items():
        for new, name in old.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{name}.")
        sd[key] = value
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in sd
    (tmp_path / "old").mkdir()
    write_safetensors(tmp_path / "old" / "diffusion_pytorch_model.safetensors", sd)
    (tmp_path / "old" / "config.json").write_text((folder / "config.json").read_text())
    _, params = convert.load(tmp_path / "old")
    for path, value in rules.flatten(loaded[1]).items():
        np.testing.assert_array_equal(rules.flatten(params)[path], value)


# ----------------------------------------------------------------------------- tiling and slicing


def test_tiled_encode_and_decode_match_diffusers_tiling(torch_vae, loaded):
    """48x40 images with 16-pixel tiles: 4 x 4 tiles in 4 shapes (full tiles and border tiles of 12 and 4
    pixels), against diffusers with `enable_tiling()`. Decoding also slices the batch, as diffusers does
    with `enable_slicing()` too."""
    config, params = loaded
    x, z = images((2, 48, 40, 3), 2), latents((2, 24, 20, 4), 3)
    torch_vae.enable_tiling()
    try:
        with torch.no_grad():
            posterior = torch_vae.encode(nchw(x)).latent_dist
            torch_vae.enable_slicing()
            decoded = nhwc(torch_vae.decode(nchw(z)).sample)
    finally:
        torch_vae.disable_tiling()
        torch_vae.disable_slicing()
    ours = run(config, params, x, "tiled_encode")
    assert ours.mean.shape == (2, 24, 20, 4)
    assert rel_err(ours.mean, nhwc(posterior.mean)) < RTOL
    assert rel_err(ours.logvar, nhwc(posterior.logvar)) < RTOL
    tiled = run(config, params, z, "decode", tiled=True, sliced=True)
    assert tiled.shape == (2, 48, 40, 3)
    assert rel_err(tiled, decoded) < RTOL
    # tiled=True leaves latents of one tile or less untiled, as diffusers does
    small = z[:, :8, :8]
    np.testing.assert_array_equal(run(config, params, small, "decode", tiled=True),
                                  run(config, params, small, "decode"))


def test_tiled_decode_approaches_untiled_as_tiles_grow(loaded):
    """Tiling changes the result by design: every tile normalises and attends over itself alone. With
    these random weights the mean relative difference from the untiled decode is 0.61 with 8-pixel latent
    tiles and 0.27 with 16-pixel ones (a trained VAE on natural images, with SD's 64-pixel latent tiles,
    is far closer); it must shrink as the tiles grow."""
    config, params = loaded
    z = latents((2, 24, 20, 4), 3)
    untiled = np.asarray(run(config, params, z, "decode"))
    diffs = []
    for sample_size, method, kwargs in ((16, "decode", dict(tiled=True, sliced=True)),  # the tiling test's
                                        (32, "tiled_decode", {})):
        tiled = run(dataclasses.replace(config, sample_size=sample_size), params, z, method, **kwargs)
        diffs.append(float(np.abs(np.asarray(tiled) - untiled).mean() / np.abs(untiled).mean()))
    assert diffs[1] < 0.7 * diffs[0] and diffs[1] < 0.4, diffs


def test_slicing_equals_unsliced(loaded):
    config, params = loaded
    x, z = images((2, 16, 16, 3)), latents((2, 8, 8, 4))  # the parity test's shapes: compiled once
    whole, sliced = run(config, params, x, "encode"), run(config, params, x, "encode", sliced=True)
    assert rel_err(sliced.mean, whole.mean) < 1e-5 and rel_err(sliced.logvar, whole.logvar) < 1e-5
    assert rel_err(run(config, params, z, "decode", sliced=True), run(config, params, z, "decode")) < 1e-5


def test_standard_sd_vae_shapes():
    """SD's VAE, shapes only: diffusers' parameter count (83,653,863, as `diffusers.AutoencoderKL` of this
    config counts), 8x latents, and a tiled decode of 768x768 images with SD's 512-pixel tiles."""
    config = AutoencoderKLConfig(down_block_types=("DownEncoderBlock2D",) * 4,
                                 up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                                 layers_per_block=2, sample_size=512)
    params = abstract_params(config)
    assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params)) == 83_653_863
    module = AutoencoderKL(config)
    posterior = jax.eval_shape(lambda p, x: module.apply({"params": p}, x, method=module.encode), params,
                               jax.ShapeDtypeStruct((1, 64, 48, 3), jnp.float32))
    assert posterior.mean.shape == (1, 8, 6, 4)
    out = jax.eval_shape(lambda p, z: module.apply({"params": p}, z, method=module.decode, tiled=True), params,
                         jax.ShapeDtypeStruct((1, 96, 96, 4), jnp.float32))
    assert out.shape == (1, 768, 768, 3)
