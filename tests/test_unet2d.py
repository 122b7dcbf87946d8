"""UNet2DModel: shapes, config handling, and parity with diffusers' UNet2DModel through the converter.

The torch reference is built with random weights (no downloads), saved in diffusers' real on-disk
formats, loaded with `diffax.convert.load`, and compared on random inputs.

Parity tolerance: max|diffax - torch| / max|torch| < 1e-4 in fp32 (DESIGN principle 4). Both sides
compute in fp32 with different summation orders (XLA vs oneDNN convs, fused vs torch SDPA attention);
measured error is ~1e-6, so 1e-4 leaves margin for other CPUs yet catches any real mismatch (a wrong
transpose, eps or head split moves the output by O(1)).
"""
from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffax.convert import rules  # noqa: E402
from diffax.convert.io import CheckpointError, read_state_dict, write_safetensors  # noqa: E402
from diffax import convert  # noqa: E402
from diffax.models import abstract_params, init_params, logical_specs  # noqa: E402
from diffax.models.unet2d import UNet2DConfig, UNet2DModel  # noqa: E402

RTOL = 1e-4

TORCH_KWARGS = dict(
    sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8, num_class_embeds=11, attention_head_dim=8)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max-abs error relative to the reference's max-abs value."""
    return float(np.abs(np.asarray(a, np.float32) - b).max() / np.abs(b).max())


def torch_forward(model, x: np.ndarray, t: np.ndarray, y: np.ndarray | None) -> np.ndarray:
    """diffusers forward on NHWC numpy inputs, NHWC numpy output."""
    with torch.no_grad():
        out = model(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                    None if y is None else torch.from_numpy(y)).sample
    return out.permute(0, 2, 3, 1).numpy()


def load_unet2d(path, config=None, **runtime):
    """(config, params) through `diffax.convert.load`."""
    module, params = convert.load(path, config=config, **runtime)
    return module.config, params


@functools.lru_cache
def _jitted_forward(config: UNet2DConfig):
    return jax.jit(lambda p, x, t, y: UNet2DModel(config).apply({"params": p}, x, t, class_labels=y))


def apply(config: UNet2DConfig, params, x, t, y=None) -> np.ndarray:
    """The diffax forward on numpy inputs, compiled once per config (configs are hashable)."""
    return np.asarray(_jitted_forward(config)(params, x, t, y))


@pytest.fixture(scope="module")
def torch_model():
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(**TORCH_KWARGS).eval()
    # Default inits leave some tensors trivial (norm scales 1, biases 0): perturb every parameter so
    # that a transpose or a swapped scale/bias cannot hide.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def folders(torch_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("unet2d")
    torch_model.save_pretrained(root / "st", safe_serialization=True)
    torch_model.save_pretrained(root / "bin", safe_serialization=False)
    torch_model.save_pretrained(root / "sharded", safe_serialization=True, max_shard_size="100KB")
    return root


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 16, 16, 3)).astype(np.float32)
    t = np.array([0.5, 17.25, 999.0], np.float32)  # fractional timesteps, as continuous samplers use
    y = np.array([3, 0, 10], np.int64)  # 10 = num_class_embeds - 1, diffax's null class
    return x, t, y


@pytest.fixture(scope="module")
def loaded(folders):
    return load_unet2d(folders / "st")


@pytest.fixture(scope="module")
def reference(torch_model, inputs):
    return torch_forward(torch_model, *inputs)


def test_config_from_diffusers_folder(folders, torch_model):
    config = UNet2DConfig.from_diffusers(folders / "st")
    assert config == UNet2DConfig(**TORCH_KWARGS)
    assert config == UNet2DConfig.from_diffusers(torch_model.config)  # diffusers' FrozenDict works too
    assert config.null_class == 10 and config.time_embed_dim == 128
    written = config.to_diffusers()
    assert written["_class_name"] == "UNet2DModel" and "dtype" not in written
    stored = json.loads((folders / "st" / "config.json").read_text())
    assert {k: v for k, v in stored.items() if not k.startswith("_")} == {
        k: v for k, v in written.items() if not k.startswith("_")}


@pytest.mark.parametrize("change, key", [({"foo_bar": 1}, "foo_bar"),
                                         ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
                                         ({"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"]},
                                          "down_block_types"),
                                         ({"norm_num_groups": 6}, "norm_num_groups"),
                                         ({"_class_name": "UNet2DConditionModel"}, "_class_name")])
def test_bad_config_names_key_and_file(folders, tmp_path, change, key):
    config = json.loads((folders / "st" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=key) as err:
        UNet2DConfig.from_diffusers(tmp_path)
    assert str(tmp_path / "config.json") in str(err.value)


@pytest.mark.parametrize("name", ["st", "bin", "sharded"])
def test_parity_with_diffusers(folders, loaded, inputs, reference, name):
    config, params = load_unet2d(folders / name) if name != "st" else loaded
    if name == "sharded":
        assert len(list((folders / name).glob("*.safetensors"))) > 1  # really several shards
    out = apply(config, params, *inputs)
    assert out.shape == reference.shape == (3, 16, 16, 3)
    err = rel_err(out, reference)
    print(f"UNet2DModel fp32 parity ({name}): max|diff|/max|ref| = {err:.2e}")
    assert err < RTOL


def test_parity_other_options(tmp_path):
    # The options TORCH_KWARGS leaves at their defaults, as DDPM-style configs set them: right/bottom-only
    # downsample padding, single-head attention, cos-first sinusoid with shift 1, no class embedding, plus
    # a scaled mid block, its own attention group count, centred input and a non-square image.
    kwargs = dict(sample_size=(8, 16), in_channels=2, out_channels=4, block_out_channels=(16, 32, 32),
                  layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), downsample_padding=0,
                  attention_head_dim=None, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
                  norm_num_groups=4, attn_norm_num_groups=2, mid_block_scale_factor=1.5,
                  center_input_sample=True, time_embedding_dim=48)
    torch.manual_seed(1)
    model = diffusers.UNet2DModel(**kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    config, params = load_unet2d(tmp_path)
    rng = np.random.default_rng(1)
    x = rng.random((2, 8, 16, 2), np.float32)
    t = np.array([1.0, 250.5], np.float32)
    err = rel_err(apply(config, params, x, t), torch_forward(model, x, t, None))
    print(f"UNet2DModel fp32 parity (other options): max|diff|/max|ref| = {err:.2e}")
    assert err < RTOL


def test_timestep_forms_agree(loaded, torch_model, inputs):
    config, params = loaded
    x, _, y = inputs
    model = UNet2DModel(config)
    fn = jax.jit(lambda p, t: model.apply({"params": p}, x, t, class_labels=y))
    ints = np.asarray(fn(params, jnp.array([7, 7, 7], jnp.int32)))
    # Integer, float and scalar timesteps are the same embedding input: identical outputs.
    np.testing.assert_array_equal(ints, np.asarray(fn(params, jnp.array([7.0, 7.0, 7.0], jnp.float32))))
    np.testing.assert_array_equal(ints, np.asarray(fn(params, jnp.asarray(7))))
    # diffusers' int64 path gives the same numbers.
    assert rel_err(ints, torch_forward(torch_model, x, np.array([7, 7, 7], np.int64), y)) < RTOL
    with pytest.raises(ValueError, match="timesteps"):
        fn(params, jnp.zeros((2,)))


def test_export_round_trip(loaded, inputs, reference, tmp_path):
    config, params = loaded
    convert.save(tmp_path, UNet2DModel(config), params)
    back = diffusers.UNet2DModel.from_pretrained(tmp_path).eval()
    assert back.config.num_class_embeds == 11 and tuple(back.config.block_out_channels) == (32, 64)
    # Same fp32 weights in, bit-identical torch outputs out.
    np.testing.assert_array_equal(torch_forward(back, *inputs), reference)
    _, params2 = load_unet2d(tmp_path)  # and diffax reads its own export back unchanged
    assert jax.tree.all(jax.tree.map(np.array_equal, params, params2))
    # Exported tensors keep the params' dtype: bf16 params give a bf16 file diffusers loads as bf16.
    convert.save(tmp_path / "bf16", UNet2DModel(config), jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), params))
    assert {v.dtype for v in read_state_dict(tmp_path / "bf16").values()} == {np.dtype(jnp.bfloat16)}
    half = diffusers.UNet2DModel.from_pretrained(tmp_path / "bf16", torch_dtype=torch.bfloat16)
    assert half.conv_in.weight.dtype == torch.bfloat16


def test_deprecated_attention_names(folders, loaded, tmp_path):
    # Old diffusers checkpoints (e.g. the original google/ddpm uploads) say query/key/value/proj_attn.
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    old = {}
    for key, value in read_state_dict(folders / "st").items():
        for new_name, old_name in renames.items():
            key = key.replace(new_name, old_name)
        old[key] = value
    assert any(".proj_attn." in k for k in old)
    write_safetensors(tmp_path / "old.safetensors", old)
    config, params = load_unet2d(tmp_path / "old.safetensors", loaded[0])
    assert jax.tree.all(jax.tree.map(np.array_equal, params, loaded[1]))


def test_mismatched_checkpoint_names_file_and_keys(folders):
    deeper = UNet2DConfig(**{**TORCH_KWARGS, "layers_per_block": 2})
    with pytest.raises(CheckpointError) as err:
        load_unet2d(folders / "st", deeper)
    msg = str(err.value)
    assert str(folders / "st" / "diffusion_pytorch_model.safetensors") in msg
    assert "missing" in msg and "down_blocks_0/resnets_1/conv1/kernel" in msg

    wider = UNet2DConfig(**{**TORCH_KWARGS, "num_class_embeds": 12})
    with pytest.raises(CheckpointError, match=r"class_embedding/embedding: file \(11, 128\) vs model \(12, 128\)"):
        load_unet2d(folders / "bin", wider)

    no_class = UNet2DConfig(**{**TORCH_KWARGS, "num_class_embeds": None})
    with pytest.raises(CheckpointError, match="unexpected: class_embedding/embedding"):
        load_unet2d(folders / "st", no_class)


def test_bare_weight_file_needs_config(folders, tmp_path):
    lone = tmp_path / "weights.safetensors"
    lone.write_bytes((folders / "st" / "diffusion_pytorch_model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="pass config="):
        load_unet2d(lone)
    with pytest.raises(CheckpointError, match="no such file"):
        load_unet2d(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no weight file"):
        load_unet2d(tmp_path / "empty")


def test_shapes_specs_and_conditioning():
    # Non-square input, in != out channels, no attention in the mid block, a single head (null head dim).
    config = UNet2DConfig(in_channels=2, out_channels=5, block_out_channels=(8, 16), layers_per_block=1,
                          down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                          up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                          attention_head_dim=None, add_attention=False, num_class_embeds=4)
    # XLA:CPU takes ~0.5 s to compile each partitionable threefry draw (one per kernel, ~50 here); the
    # non-partitionable lowering compiles ~4x faster and changes only which random numbers come out.
    with jax.threefry_partitionable(False):
        params = init_params(config, jax.random.key(0))
    shapes, specs = abstract_params(config), logical_specs(config)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == jax.tree.map(lambda a: (a.shape, a.dtype), shapes)
    # Every parameter has a logical spec of its own rank.
    flat_specs = rules.flatten(specs)
    for path, value in rules.flatten(params).items():
        assert len(flat_specs[path]) == value.ndim, path
    assert flat_specs[("down_blocks_1", "attentions_0", "to_q", "kernel")] == PartitionSpec("embed", "heads")
    assert flat_specs[("down_blocks_0", "resnets_0", "conv1", "kernel")] == PartitionSpec(
        None, None, "conv_in", "conv_out")
    assert "attentions_0" not in params["mid_block"]
    assert params["up_blocks_0"]["attentions_1"]["to_q"]["kernel"].shape == (16, 16)  # one 16-wide head
    assert params["up_blocks_0"]["resnets_0"]["conv1"]["kernel"].shape == (3, 3, 32, 16)  # 16 + 16-ch skip

    fn = jax.jit(lambda x, y: UNet2DModel(config).apply({"params": params}, x, 3, class_labels=y))
    x = jnp.ones((2, 8, 12, 2))
    out = fn(x, jnp.array([0, 3]))
    assert out.shape == (2, 8, 12, 5) and out.dtype == jnp.float32
    with pytest.raises(ValueError, match="class_labels"):
        fn(x, None)
    with pytest.raises(ValueError, match="divisible by 2"):
        fn(jnp.ones((2, 7, 12, 2)), jnp.array([0, 3]))
    no_class = UNet2DModel(dataclasses.replace(config, num_class_embeds=None))
    with pytest.raises(ValueError, match="no class embedding"):
        jax.eval_shape(functools.partial(no_class.init, class_labels=jnp.array([0, 3])), jax.random.key(0), x, 3)


def test_dropout(loaded, inputs):
    config, params = loaded
    model = UNet2DModel(dataclasses.replace(config, dropout=0.5))  # dropout adds no parameters
    x, t, y = inputs
    train = jax.jit(lambda p, key: model.apply({"params": p}, x, t, class_labels=y, train=True, rngs={"dropout": key}))
    a, b = np.asarray(train(params, jax.random.key(3))), np.asarray(train(params, jax.random.key(4)))
    assert not np.allclose(a, b)
    # train=False ignores the rate: identical to the dropout-free model.
    np.testing.assert_array_equal(apply(model.config, params, x, t, y), apply(config, params, x, t, y))


def test_bf16(folders, inputs, reference):
    # bf16 keeps 8 mantissa bits (~4e-3 per rounding) and rounding errors add up over ~20 layers, so we
    # allow 5e-2 of the output scale; a dtype bug (a norm or softmax run in bf16 input scale) exceeds it.
    config, params = load_unet2d(folders / "st", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert params["conv_in"]["kernel"].dtype == jnp.bfloat16
    x, t, y = inputs
    out = jax.jit(UNet2DModel(config).apply)({"params": params}, x, t, class_labels=y)
    assert out.dtype == jnp.bfloat16
    err = rel_err(np.asarray(out.astype(jnp.float32)), reference)
    print(f"UNet2DModel bf16 vs torch fp32: {err:.2e}")
    assert err < 5e-2
