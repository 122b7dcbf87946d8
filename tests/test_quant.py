"""diffax.quant: quantize-dequantize bounds, int4 packing, the quantized layers in every family, storage."""
from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from safetensors.numpy import save_file

from diffax.models import (AutoencoderKLConfig, CLIPTextConfig, DiTConfig, UNet2DConditionConfig, UNet2DConfig,
                           abstract_params, init_params, make_module)
from diffax.quant import (QuantizationError, abstract_quantized, dequantize, dequantize_kernel, device_bytes,
                          load_orbax, load_safetensors, pack_int4, quantize_kernel, quantize_params, save_orbax,
                          save_safetensors, unpack_int4)
from diffax.quant.quantize import stored_rows

# Tiny members of each family (the shapes of tests/test_<family>.py), random weights as bench/quant.py makes them.
FAMILIES = {
    "unet2d": UNet2DConfig(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                           layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, num_class_embeds=11,
                           attention_head_dim=8),
    "dit": DiTConfig.from_reference(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                                    num_classes=10),
    "unet2d_condition": UNet2DConditionConfig.from_diffusers(dict(
        sample_size=16, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4)),
    "vae": AutoencoderKLConfig.from_diffusers(dict(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4, sample_size=16)),
    "clip": CLIPTextConfig.from_diffusers(dict(vocab_size=64, hidden_size=32, intermediate_size=48, projection_dim=24,
                                               num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=16,
                                               hidden_act="quick_gelu")),
}
# Relative L2 error of the quantized model's output against fp32 on random weights and inputs, with the
# largest value measured on these models in brackets: int8 per channel 0.05 (0.015); int4 with groups of
# 32 rows, run on the two families where int4 is usable at these widths, 0.5 (DiT 0.12, CLIP 0.2). A wrong
# scale, packing order or transposed kernel gives errors near 1. (Round-to-nearest int4 without calibration
# data loses much more on the narrow convolutions of the tiny U-Nets and VAE: docs/efficiency.md.)
TOLERANCE = {8: 0.05, 4: 0.5}
INT4_FAMILIES = ("dit", "clip")


@functools.lru_cache
def random_weights(config):
    """The init parameters with constant leaves (DiT's zero-initialised adaLN and output layers, norm scales)
    given N(0, 0.02) noise, so that no output is trivially 0 (as bench/quant.py does)."""
    leaves, tree = jax.tree.flatten(init_params(config, jax.random.key(0)))
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(tree, [p + 0.02 * jax.random.normal(k, p.shape) if float(jnp.std(p)) == 0 else p
                                     for k, p in zip(keys, leaves)])


def _inputs(config, key):
    """The family's init inputs at batch 2 with random values (timesteps < 1000, ids and labels < 10)."""
    args, kwargs = config.init_inputs()
    leaves, tree = jax.tree.flatten((args, kwargs))
    out = []
    for k, leaf in zip(jax.random.split(key, len(leaves)), leaves):
        leaf = jnp.asarray(leaf)
        shape = (2,) + leaf.shape[1:] if leaf.ndim else ()
        if leaf.ndim == 4:
            shape = (2, 16, 16, leaf.shape[-1]) if isinstance(config, AutoencoderKLConfig) else shape
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            out.append(jax.random.uniform(k, shape, leaf.dtype, 0, 999) if leaf.ndim == 1
                       else jax.random.normal(k, shape, leaf.dtype))
        else:
            out.append(jax.random.randint(k, shape, 0, 10).astype(leaf.dtype))
    return jax.tree.unflatten(tree, out)


def _rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("shape", [(33, 20), (3, 3, 5, 7), (1, 1, 4, 6)])
@pytest.mark.parametrize("bits,group_size", [(8, None), (4, None), (4, 16), (8, 10)])
def test_dequantize_error_is_at_most_half_a_step(shape, bits, group_size):
    w = jax.random.normal(jax.random.key(0), shape) * jnp.linspace(0.1, 3.0, shape[-1])  # channels of many scales
    stored, scale = quantize_kernel(w, bits, group_size)
    kp, groups = stored_rows(int(np.prod(shape[:-1])), bits, group_size)
    assert stored.dtype == (jnp.int8 if bits == 8 else jnp.uint8)
    assert stored.shape == ((kp if bits == 8 else kp // 2), shape[-1]) and scale.shape == (groups, shape[-1])
    dq = dequantize_kernel(stored, scale, shape)
    assert dq.shape == w.shape and dq.dtype == jnp.float32
    k = int(np.prod(shape[:-1]))
    step = jnp.repeat(scale, kp // groups, axis=0)[:k].reshape(shape)  # each weight's own scale
    # Up to fp32 rounding of w / scale near the clip edge (|w / scale| ~ 128: ~1e-5 of a step).
    assert bool(jnp.all(jnp.abs(w - dq) <= step * (0.5 + 1e-5)))
    # The whole integer range is used: each channel's largest weight maps to the edge of it.
    q = (unpack_int4(stored) if bits == 4 else stored).astype(jnp.int32)
    assert set(np.asarray(jnp.abs(q).max(axis=0)).tolist()) <= {2 ** (bits - 1) - 1, 2 ** (bits - 1)}


def test_dequantize_matches_qwix():
    w = jax.random.normal(jax.random.key(1), (64, 8))
    for bits, qtype, tiles in [(8, jnp.int8, {}), (4, jnp.int4, {0: 16})]:
        stored, scale = quantize_kernel(w, bits, 16 if tiles else None)
        qa = qwix.quantize(w, qtype, channelwise_axes=(1,), tiled_axes=tiles)
        np.testing.assert_array_equal(np.asarray(dequantize_kernel(stored, scale, w.shape)),
                                      np.asarray(qwix.dequantize(qa)))


def test_int4_packing_round_trip():
    q = jax.random.randint(jax.random.key(2), (10, 6), -8, 8).astype(jnp.int8)
    packed = pack_int4(q)
    assert packed.dtype == jnp.uint8 and packed.shape == (5, 6)
    np.testing.assert_array_equal(np.asarray(unpack_int4(packed)), np.asarray(q))
    # Row 2i in the low nibble, row 2i+1 in the high one (the documented storage layout).
    assert int(packed[0, 0]) == (int(q[0, 0]) & 0xF) | ((int(q[1, 0]) & 0xF) << 4)
    with pytest.raises(ValueError, match="even number of rows"):
        pack_int4(q[:3])


def test_group_layout():
    assert stored_rows(288, 4, 128) == (288, 3)   # 3 groups of 96, no padding
    assert stored_rows(27, 4, None) == (28, 1)    # int4 pads one row to pack pairs
    assert stored_rows(27, 8, None) == (27, 1)
    assert stored_rows(320, 4, 128) == (324, 3)   # 3 groups of 108


# The plain U-Net's layers (convolutions, attention, the float class table) are the conditional U-Net's and
# DiT's: it runs with `-m slow` (about 25 s of compiles on 2 cores).
@pytest.mark.parametrize("family", [pytest.param(f, marks=[pytest.mark.slow] if f == "unet2d" else [])
                                    for f in FAMILIES])
def test_quantized_family_output(family):
    config = FAMILIES[family]
    module, params = make_module(config), random_weights(config)
    args, kwargs = _inputs(config, jax.random.key(3))
    apply = jax.jit(lambda p: jax.tree.leaves(module.apply({"params": p}, *args, **kwargs))[0])
    ref = apply(params)
    for bits, group_size in [(8, None)] + ([(4, 32)] if family in INT4_FAMILIES else []):
        qp = quantize_params(params, bits, group_size)
        kernels = [p for p in jax.tree_util.tree_leaves_with_path(params) if p[0][-1].key == "kernel"]
        # CLIP's token and position tables are quantized too; the class tables of the U-Net and DiT stay
        # float (flax nn.Embed, which cannot run an integer table).
        tables = {n for n in qp.quantized if n.endswith("/embedding")}
        assert len(qp.shapes) == len(kernels) + len(tables) > 0
        assert len(tables) == (2 if family == "clip" else 0), tables
        out = apply(qp.params)
        assert _rel_l2(out, ref) < TOLERANCE[bits], (family, bits, _rel_l2(out, ref))
        # The layers compute exactly the model of the dequantised weights.
        np.testing.assert_allclose(np.asarray(out), np.asarray(apply(dequantize(qp))), rtol=1e-5, atol=1e-5)
        assert device_bytes(qp.params) < device_bytes(params) * (0.5 if bits == 8 else 0.35)


def test_int8_weights_with_bf16_compute():
    """A bf16-compute model dequantises into bf16: its output is as close to fp32 as float bf16 weights give
    (int8 per channel adds ~1 %, bf16 compute ~1 %: bound 0.05 as for int8 in fp32)."""
    import dataclasses
    config = FAMILIES["clip"]
    params = random_weights(config)
    args, kwargs = _inputs(config, jax.random.key(5))
    ref = jax.tree.leaves(make_module(config).apply({"params": params}, *args, **kwargs))[0]
    bf16 = make_module(dataclasses.replace(config, dtype=jnp.bfloat16))
    out = jax.tree.leaves(bf16.apply({"params": quantize_params(params, 8).params}, *args, **kwargs))[0]
    assert out.dtype == jnp.bfloat16 and _rel_l2(out, ref) < TOLERANCE[8]


def test_quantized_params_stay_integers_under_jit():
    config = FAMILIES["unet2d_condition"]  # the default family run's weights (the plain U-Net's run is slow)
    module, params = make_module(config), random_weights(config)
    qp = quantize_params(params, 8)
    args, kwargs = _inputs(config, jax.random.key(4))
    lowered = jax.jit(lambda p: module.apply({"params": p}, *args, **kwargs)).lower(qp.params)
    kinds = {str(a.dtype) for a in jax.tree.leaves(lowered.args_info)}
    assert kinds == {"int8", "float32"}  # the program takes the int8 kernels, not a float copy
    assert qp.params["conv_in"]["kernel"].dtype == jnp.int8


def test_quantized_program_peak_memory_is_smaller():
    """XLA's buffer assignment: weights + temporaries of the int8 program stay well under fp32's (measured
    0.54x on this DiT). Were every float weight converted up front, the temporaries alone would hold a
    full fp32 copy and the int8 program would need more than the fp32 one (1.15x)."""
    config = FAMILIES["dit"]
    module, params = make_module(config), random_weights(config)
    args, kwargs = _inputs(config, jax.random.key(3))
    forward = jax.jit(lambda p: module.apply({"params": p}, *args, **kwargs))

    def peak(p):
        m = forward.lower(p).compile().memory_analysis()
        return m.argument_size_in_bytes + m.temp_size_in_bytes

    assert peak(quantize_params(params, 8).params) < 0.75 * peak(params)


def test_include_exclude_and_abstract_sizes():
    config = FAMILIES["dit"]
    params = random_weights(config)
    qp = quantize_params(params, 4, 32, exclude=[r"^proj_out_2/"], include=[r"transformer_blocks_|proj_out"])
    names = qp.quantized
    assert names and all(("transformer_blocks_" in n or "proj_out" in n) and not n.startswith("proj_out_2/")
                         for n in names)
    assert params["proj_out_2"]["kernel"].dtype == jnp.float32
    # abstract_quantized predicts every shape and dtype of the real thing.
    want = abstract_quantized(abstract_params(config), 4, 32, exclude=[r"^proj_out_2/"],
                              include=[r"transformer_blocks_|proj_out"])
    assert jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype)), want) == \
        jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype)), qp.params)


def test_quantized_specs_fit_the_tree():
    from diffax.models import logical_specs
    from diffax.quant import quantized_specs
    config = FAMILIES["dit"]
    qp = quantize_params(random_weights(config), 4, 32)
    specs = quantized_specs(logical_specs(config), qp)
    leaves = jax.tree_util.tree_leaves_with_path(qp.params)
    spec_leaves = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert [p for p, _ in leaves] == [p for p, _ in spec_leaves]
    for (path, leaf), (_, spec) in zip(leaves, spec_leaves):
        assert len(spec) <= leaf.ndim, path
    block = specs["transformer_blocks_0"]["attn1"]["to_q"]
    assert tuple(block["kernel"]) == (None, "heads") and tuple(block["kernel_scale"]) == (None, "heads")


def test_full_size_memory_goals():
    """Weight memory of full-size SD 1.5 U-Net and DiT-XL/2, from shapes: int8 <= 0.27, int4 <= 0.15 of fp32."""
    sd15 = UNet2DConditionConfig.from_diffusers(dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8))
    for config in (sd15, DiTConfig.preset("DiT-XL/2")):
        abstract = abstract_params(config)
        fp32 = device_bytes(abstract)
        assert device_bytes(abstract_quantized(abstract, 8)) <= 0.27 * fp32
        assert device_bytes(abstract_quantized(abstract, 4, 128)) <= 0.15 * fp32


def _assert_same(a, b):
    assert a.bits == b.bits and a.group_size == b.group_size and a.shapes == b.shapes
    fa, fb = jax.tree_util.tree_leaves_with_path(a.params), jax.tree_util.tree_leaves_with_path(b.params)
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (path, x), (_, y) in zip(fa, fb):
        assert np.asarray(x).dtype == np.asarray(y).dtype, path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32)])
def test_storage_round_trip_is_bit_exact(tmp_path, bits, group_size):
    config = FAMILIES["dit"]
    qp = quantize_params(random_weights(config), bits, group_size)
    path = save_safetensors(tmp_path / "unet.safetensors", qp, config=config)
    back, back_config = load_safetensors(path)
    _assert_same(qp, back)
    assert back_config == config
    folder = save_orbax(tmp_path / "orbax", qp)
    back, back_config = load_orbax(folder)
    _assert_same(qp, back)
    assert back_config is None


def test_storage_errors_name_the_file_and_key(tmp_path):
    config = FAMILIES["dit"]
    qp = quantize_params(random_weights(config), 8)
    float_file = tmp_path / "float.safetensors"
    save_file({"a": np.zeros(3, np.float32)}, str(float_file))
    with pytest.raises(QuantizationError, match="float.safetensors: not a diffax quantized file"):
        load_safetensors(float_file)
    # A file whose record says int4 but holds int8 kernels.
    path = save_safetensors(tmp_path / "q.safetensors", qp)
    from safetensors import safe_open
    with safe_open(str(path), framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["diffax_quant"])
    save_file(tensors, str(tmp_path / "bad.safetensors"),
              metadata={"format": "diffax-quant", "diffax_quant": json.dumps({**meta, "bits": 4})})
    first = next(iter(meta["shapes"]))  # the first kernel the loader checks
    with pytest.raises(QuantizationError, match=rf"bad.safetensors: '{first}' is int8"):
        load_safetensors(tmp_path / "bad.safetensors")
    del tensors[first + "_scale"]
    save_file(tensors, str(tmp_path / "lacking.safetensors"),
              metadata={"format": "diffax-quant", "diffax_quant": json.dumps(meta)})
    with pytest.raises(QuantizationError, match=rf"lacking.safetensors: '{first}' .* lacks"):
        load_safetensors(tmp_path / "lacking.safetensors")


def test_bad_input_errors_name_the_key():
    params = {"a": {"kernel": jnp.ones((4, 3))}, "b": {"kernel": jnp.ones((4, 3)).at[1, 1].set(jnp.nan)}}
    with pytest.raises(QuantizationError, match="^b/kernel: holds NaN"):
        quantize_params(params)
    with pytest.raises(QuantizationError, match="bits must be 8 or 4"):
        quantize_params(params, bits=3)
    with pytest.raises(QuantizationError, match="group_size"):
        quantize_params(params, bits=4, group_size=0)
    with pytest.raises(QuantizationError, match="pattern 'down_blokcs' matches no kernel"):
        quantize_params(params, include=["down_blokcs"])
    with pytest.raises(QuantizationError, match="^a/kernel: a int8 kernel is not a float weight"):
        quantize_params({"a": {"kernel": jnp.ones((4, 3), jnp.int8)}})
    qp = quantize_params({"a": params["a"]})
    with pytest.raises(ValueError, match=r"does not hold a float kernel of shape \(5, 3\)"):
        dequantize_kernel(qp.params["a"]["kernel"], qp.params["a"]["kernel_scale"], (5, 3))
