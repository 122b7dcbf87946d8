"""Quantized embedding tables (CLIP text encoders' token and position tables): the per-row / per-group
error bound, lookups that never dequantise the whole table, the text encoders' outputs against fp32,
storage round trips, shapes from abstract trees, sharding specs, TuneQDM leaving the tables' scales alone,
and the full-size CLIP-L weight-memory goals."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax.models import (CLIPTextConfig, CLIPTextWithProjectionConfig, DiTConfig, abstract_params, init_params,
                           logical_specs, make_module)
from diffax.models.qtensor import dequantize_table, lookup_rows, unpack_int4
from diffax.quant import (QuantizationError, abstract_quantized, dequantize, device_bytes, load_orbax,
                          load_safetensors, quantize_params, quantized_specs, save_orbax, save_safetensors)
from diffax.quant.quantize import quantize_table, stored_rows
from diffax.quant.tuneqdm import apply_scales, init_scales
from tests.jaxprs import equations

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, projection_dim=24, num_hidden_layers=1,
            num_attention_heads=4, max_position_embeddings=16, hidden_act="gelu")
TOKEN = "text_model/embeddings/token_embedding/embedding"
POSITION = "text_model/embeddings/position_embedding/embedding"
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")


@functools.lru_cache
def _clip():
    """The tiny CLIPTextModelWithProjection (SDXL's second encoder's class), its weights, and a jitted forward
    pass on fixed token ids [2, 16] returning (last_hidden_state, pooler_output, text_embeds)."""
    config = CLIPTextWithProjectionConfig.from_diffusers(TINY)
    module, params = make_module(config), init_params(config, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (2, TINY["max_position_embeddings"]), 0, TINY["vocab_size"])

    @jax.jit
    def forward(p):
        out = module.apply({"params": p}, ids)
        return out.last_hidden_state, out.pooler_output, out.text_embeds

    return config, module, params, ids, forward


def _rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 12)])
def test_table_error_is_at_most_half_a_step_per_row(bits, group_size):
    n, d = 50, 40
    # Rows of very different sizes: one shared scale would round the small rows to 0.
    w = np.asarray(jax.random.normal(jax.random.key(0), (n, d))) * np.geomspace(1e-3, 3.0, n)[:, None]
    stored, scale = quantize_table(w, bits, group_size)
    dp, groups = stored_rows(d, bits, group_size)  # (40, 1) and (42, 4): 4 groups of 10 columns + 2 padding
    assert stored.dtype == (jnp.int8 if bits == 8 else jnp.uint8)
    assert stored.shape == (n, dp if bits == 8 else dp // 2) and scale.shape == (n, groups)
    dq = np.asarray(dequantize_table(stored, scale, (n, d)))
    step = np.repeat(np.asarray(scale), dp // groups, axis=1)[:, :d]  # each weight's own scale
    # Up to fp32 rounding of w / scale near the clip edge (|w / scale| ~ 128: ~1e-5 of a step).
    assert np.all(np.abs(w - dq) <= step * (0.5 + 1e-4))
    # Every row uses the whole integer range: its largest weight maps to the edge.
    q = np.asarray(unpack_int4(stored, axis=-1) if bits == 4 else stored).astype(np.int32)
    assert set(np.abs(q).max(axis=1).tolist()) <= {2 ** (bits - 1) - 1, 2 ** (bits - 1)}
    # A lookup of ids of any shape gives exactly those rows.
    ids = np.array([[3, 0, 49], [7, 7, 20]])
    np.testing.assert_array_equal(np.asarray(lookup_rows(stored, scale, jnp.asarray(ids), d)), dq[ids])
    with pytest.raises(ValueError, match=r"does not hold a float table of shape \(50, 48\)"):
        dequantize_table(stored, scale, (n, 48))


def test_lookup_gathers_rows_and_never_dequantises_the_table():
    """The jaxpr of the int8 text encoder gathers integer rows: no float array with a row per token of the
    vocabulary is made."""
    config, module, params, ids, _ = _clip()
    qp = quantize_params(params, 8)
    eqns = list(equations(jax.make_jaxpr(lambda p: module.apply({"params": p}, ids))(qp.params).jaxpr))
    v = TINY["vocab_size"]
    float_shapes = {tuple(var.aval.shape) for eqn in eqns for var in eqn.outvars
                    if jnp.issubdtype(var.aval.dtype, jnp.floating)}
    assert not any(len(s) == 2 and s[0] == v for s in float_shapes), sorted(float_shapes)
    gathered = {e.invars[0].aval.dtype for e in eqns if e.primitive.name == "gather"}
    assert jnp.dtype(jnp.int8) in gathered, gathered
    # The float model does make the float table (so the check above can fail).
    eqns = list(equations(jax.make_jaxpr(lambda p: module.apply({"params": p}, ids))(params).jaxpr))
    assert any(e.primitive.name == "gather" and tuple(e.invars[0].aval.shape) == (v, TINY["hidden_size"])
               for e in eqns)


def test_text_encoder_outputs_near_fp32():
    """The tiny CLIPTextModelWithProjection, random init weights, 16 random tokens, int8: relative L2 error of
    each output (last_hidden_state, pooler_output, text_embeds) against fp32 below 0.03 (measured
    0.005-0.007; int4 is tested on CLIPTextModel in test_quant.py); a wrong scale or row gives errors near 1."""
    config, module, params, ids, forward = _clip()
    qp = quantize_params(params, 8)
    assert {TOKEN, POSITION} <= set(qp.quantized)
    outputs = forward(qp.params)
    errors = [_rel_l2(o, r) for o, r in zip(outputs, forward(params))]
    assert all(0 < e < 0.03 for e in errors), errors
    # The layers compute exactly the model of the dequantised weights.
    for o, r in zip(outputs, forward(dequantize(qp))):
        np.testing.assert_allclose(np.asarray(o), np.asarray(r), rtol=1e-5, atol=1e-6)
    assert TOKEN not in quantize_params(params, 8, embeddings=False).quantized


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 16)])
def test_storage_round_trip_with_tables(tmp_path, bits, group_size):
    config, module, params, ids, forward = _clip()
    qp = quantize_params(params, bits, group_size)
    for back, back_config in (load_safetensors(save_safetensors(tmp_path / "te.safetensors", qp, config=config)),
                              load_orbax(save_orbax(tmp_path / "orbax", qp))):
        assert back.shapes == qp.shapes and back.bits == bits and back.group_size == group_size
        a, b = jax.tree_util.tree_leaves_with_path(qp.params), jax.tree_util.tree_leaves_with_path(back.params)
        assert [p for p, _ in a] == [p for p, _ in b]
        for (path, x), (_, y) in zip(a, b):
            assert np.asarray(y).dtype == np.asarray(x).dtype, path
            np.testing.assert_array_equal(np.asarray(y), np.asarray(x), err_msg=str(path))
        assert back_config in (config, None)
    # A table whose scale does not fit its recorded shape is named.
    bad = dict(qp.params["text_model"]["embeddings"]["token_embedding"])
    bad["embedding_scale"] = bad["embedding_scale"][:-1]
    tree = jax.tree.map(lambda x: x, qp.params)
    tree["text_model"]["embeddings"]["token_embedding"] = bad
    path = save_safetensors(tmp_path / "bad.safetensors", qp.replace(params=tree))
    with pytest.raises(QuantizationError, match=f"bad.safetensors: '{TOKEN}': quantized table"):
        load_safetensors(path)


def test_abstract_shapes_and_specs_of_tables():
    config, module, params, ids, forward = _clip()
    for bits, group_size in [(8, None), (4, 16)]:
        qp = quantize_params(params, bits, group_size)
        want = abstract_quantized(abstract_params(config), bits, group_size)
        assert jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype)), want) == \
            jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype)), qp.params)
    specs = quantized_specs(logical_specs(config), qp)["text_model"]["embeddings"]["token_embedding"]
    # The row axis of the float table ('vocab') is kept; the packed columns are replicated.
    assert tuple(specs["embedding"]) == tuple(specs["embedding_scale"]) == ("vocab", None)


def test_tuneqdm_leaves_table_scales_frozen():
    config, module, params, ids, forward = _clip()
    qp = quantize_params(params, 8)
    scales = init_scales(qp, groups=2)
    assert scales and not any(name.endswith("/embedding") for name in scales)
    tuned = apply_scales(qp, jax.tree.map(lambda f: 1.5 * f, scales), 1)
    table = qp.params["text_model"]["embeddings"]["token_embedding"]
    assert tuned["text_model"]["embeddings"]["token_embedding"]["embedding_scale"] is table["embedding_scale"]
    with pytest.raises(QuantizationError, match=f"{TOKEN}' is not a quantized layer"):
        apply_scales(qp, {TOKEN: jnp.ones((2, 1, 1))}, 0)


def test_class_tables_of_dit_stay_float():
    """DiT's class table is a flax nn.Embed: never quantized, so a quantized DiT still runs."""
    config = DiTConfig.from_reference(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=1,
                                      num_heads=4, num_classes=10)
    abstract = abstract_quantized(abstract_params(config), 8)
    tables = {"/".join(k.key for k in p): a for p, a in jax.tree_util.tree_leaves_with_path(abstract)
              if p[-1].key == "embedding"}
    assert tables and all(a.dtype == jnp.float32 for a in tables.values())


def test_full_size_clip_memory_goals():
    """CLIP ViT-L/14 (SD 1.x's text encoder), bytes from shapes: int8 <= 0.27 of fp32, int4 <= 0.15 (per
    channel and with groups of 128), now that the token table (31 % of the weights) is quantized too."""
    abstract = abstract_params(CLIPTextConfig.from_diffusers(CLIP_L))
    fp32 = device_bytes(abstract)
    assert device_bytes(abstract_quantized(abstract, 8)) <= 0.27 * fp32
    assert device_bytes(abstract_quantized(abstract, 4)) <= 0.15 * fp32
    assert device_bytes(abstract_quantized(abstract, 4, 128)) <= 0.15 * fp32
    assert device_bytes(abstract_quantized(abstract, 8, embeddings=False)) > 0.4 * fp32  # what the tables cost


def test_diffusers_export_refuses_params_with_only_tables_quantized(tmp_path):
    """A tree whose only integers are embedding tables is refused like one with integer kernels: writing it
    as PyTorch floats would silently lose the tables' rounding."""
    from diffax import convert
    from diffax.convert.io import CheckpointError
    _, module, params, _, _ = _clip()
    qp = quantize_params(params, bits=8, include=[TOKEN])
    assert [k for k in jax.tree.leaves(jax.tree.map(lambda x: x.dtype == jnp.int8, qp.params)) if k] == [True]
    with pytest.raises(CheckpointError, match=f"the params are quantized \\('{TOKEN}' and 0 more"):
        convert.save(tmp_path / "te", module, qp.params)
    assert not (tmp_path / "te").exists()
