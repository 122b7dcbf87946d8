"""Sharding is configuration and in force: the parameter layouts the default rules give DiT-S/2, the
digits U-Net and SD 1.5's UNet (golden tables), the activation constraints present in the programs the train loop and the
pipeline compile, rule tables in configs (validation, the JSON round trip), and a step on an
(fsdp 4, tensor 2) mesh equal to the single-device step.

Parameter tables use shapes only (`abstract_params` / `logical_specs`): nothing is allocated.
"""
from __future__ import annotations

import functools
import json
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import flax.linen as nn
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from diffax import parallel
from diffax.models import abstract_params, boxed_init, build_model, logical_specs
from diffax.models.dit import DiTConfig
from diffax.models.registry import config_from_block
from diffax.pipelines.generation import GenerationPipeline
from diffax.schedulers import DDIMScheduler
from diffax.train.config import base_config, validate_config
from diffax.train.loop import create_train_state, jit_train_step, make_objective, model_batch
from diffax.train.state import make_optimizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs.digits import get_config as digits_config  # noqa: E402

FSDP, TP, BATCH = "fsdp", "tensor", ("data", "fsdp")

# (path pattern, PartitionSpec, how many parameters match) on a (data 2, fsdp 2, tensor 2) mesh. The first
# matching pattern wins; every parameter must match one and every pattern must match its count.
DIT_S2_TABLE = [
    # embedders: the class table's width over fsdp; the timestep MLP [embed -> mlp -> embed]
    (r"emb/class_embedder/embedding_table/embedding", P(None, FSDP), 1),
    (r"emb/timestep_embedder/linear_1/kernel", P(FSDP, TP), 1),
    (r"emb/timestep_embedder/linear_1/bias", P(TP), 1),
    (r"emb/timestep_embedder/linear_2/kernel", P(TP, FSDP), 1),
    (r"emb/timestep_embedder/linear_2/bias", P(FSDP), 1),
    (r"pos_embed/proj/kernel", P(None, None, None, FSDP), 1),  # [p, p, C, D]: 4 input channels stay whole
    (r"pos_embed/proj/bias", P(FSDP), 1),
    # 12 blocks alike: q/k/v split by heads (tensor), the output projection row-split back to embed
    (r"transformer_blocks_\d+/attn1/to_[qkv]/kernel", P(FSDP, TP), 36),
    (r"transformer_blocks_\d+/attn1/to_[qkv]/bias", P(TP), 36),
    (r"transformer_blocks_\d+/attn1/to_out_0/kernel", P(TP, FSDP), 12),
    (r"transformer_blocks_\d+/attn1/to_out_0/bias", P(FSDP), 12),
    (r"transformer_blocks_\d+/ff/net_0/proj/kernel", P(FSDP, TP), 12),
    (r"transformer_blocks_\d+/ff/net_0/proj/bias", P(TP), 12),
    (r"transformer_blocks_\d+/ff/net_2/kernel", P(TP, FSDP), 12),
    (r"transformer_blocks_\d+/ff/net_2/bias", P(FSDP), 12),
    (r"transformer_blocks_\d+/norm1/linear/kernel", P(FSDP, TP), 12),  # adaLN: [D, 6D]
    (r"transformer_blocks_\d+/norm1/linear/bias", P(TP), 12),
    (r"proj_out_1/kernel", P(FSDP, TP), 1),
    (r"proj_out_1/bias", P(TP), 1),
    (r"proj_out_2/kernel", P(FSDP, None), 1),  # to p*p*2C pixels: not split
    (r"proj_out_2/bias", P(None), 1),
]

DIGITS_UNET_TABLE = [
    # 1-channel image in and out: the channel dimension of size 1 stays whole
    (r"conv_in/kernel", P(None, None, None, TP), 1),
    (r"conv_in/bias", P(TP), 1),
    (r"conv_out/kernel", P(None, None, FSDP, None), 1),
    (r"conv_out/bias", P(None), 1),
    (r"conv_norm_out/(scale|bias)", P(None), 2),
    (r"class_embedding/embedding", P(None, FSDP), 1),
    (r"time_embedding/linear_1/kernel", P(FSDP, TP), 1),
    (r"time_embedding/linear_1/bias", P(TP), 1),
    (r"time_embedding/linear_2/kernel", P(TP, FSDP), 1),
    (r"time_embedding/linear_2/bias", P(FSDP), 1),
    # every convolution inside the blocks: HWIO with input channels over fsdp, output channels over tensor
    (r"(down|up)_blocks_\d+/(down|up)samplers_0/conv/kernel", P(None, None, FSDP, TP), 4),
    (r"(down|up)_blocks_\d+/(down|up)samplers_0/conv/bias", P(TP), 4),
    (r"(down_blocks_\d+|up_blocks_\d+|mid_block)/resnets_\d+/(conv1|conv2|conv_shortcut)/kernel",
     P(None, None, FSDP, TP), 29),  # 11 resnets x 2 + 7 shortcuts (channel count changes)
    (r"(down_blocks_\d+|up_blocks_\d+|mid_block)/resnets_\d+/(conv1|conv2|conv_shortcut)/bias", P(TP), 29),
    (r"(down_blocks_\d+|up_blocks_\d+|mid_block)/resnets_\d+/time_emb_proj/kernel", P(FSDP, TP), 11),
    (r"(down_blocks_\d+|up_blocks_\d+|mid_block)/resnets_\d+/time_emb_proj/bias", P(TP), 11),
    (r"(down_blocks_\d+|up_blocks_\d+|mid_block)/resnets_\d+/norm[12]/(scale|bias)", P(None), 44),
    # 7 attention blocks (2 down, 1 mid, 2 x 2 up), laid out as in DiT
    (r"(down_blocks_\d+|up_blocks_\d+|mid_block)/attentions_\d+/to_[qkv]/kernel", P(FSDP, TP), 21),
    (r"(down_blocks_\d+|up_blocks_\d+|mid_block)/attentions_\d+/to_[qkv]/bias", P(TP), 21),
    (r"(down_blocks_\d+|up_blocks_\d+|mid_block)/attentions_\d+/to_out_0/kernel", P(TP, FSDP), 7),
    (r"(down_blocks_\d+|up_blocks_\d+|mid_block)/attentions_\d+/to_out_0/bias", P(FSDP), 7),
    (r"(down_blocks_\d+|up_blocks_\d+|mid_block)/attentions_\d+/group_norm/(scale|bias)", P(None), 14),
]


def param_specs(config) -> dict[str, P]:
    """'a/b/kernel' -> the PartitionSpec the train loop lays that parameter out with (shapes only)."""
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = parallel.logical_shardings(logical_specs(config), mesh, shapes=abstract_params(config))
    return {"/".join(k.key for k in path): s.spec for path, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}


@pytest.mark.parametrize("name, config, table", [
    ("DiT-S/2", DiTConfig.preset("DiT-S/2"), DIT_S2_TABLE),
    ("digits U-Net", config_from_block(digits_config().model), DIGITS_UNET_TABLE),
])
def test_default_rules_lay_out_every_parameter(name, config, table):
    specs = param_specs(config)
    counts = [0] * len(table)
    for path, spec in specs.items():
        hits = [i for i, (pattern, _, _) in enumerate(table) if re.fullmatch(pattern, path)]
        assert hits, f"{name}: no table row for {path}"
        i = hits[0]
        counts[i] += 1
        assert spec == table[i][1], f"{name}: {path} is {spec}, expected {table[i][1]}"
    assert counts == [n for _, _, n in table], f"{name}: rows matched {counts} parameters"


def _constraints(lowered_text: str) -> list[tuple[str, str]]:
    """(mesh layout, tensor type) of every sharding constraint in a lowered (Shardy) module."""
    return re.findall(r"sdy\.sharding_constraint %\S+ <@mesh, (\[.*?\])> : (tensor<[^>]*>)", lowered_text)


def test_jit_with_rules_makes_logical_constraints_take_effect():
    """A probe returns a constrained intermediate with out_shardings unspecified: under the rules it has the
    constrained layout; jitted plainly, the constraint is a no-op."""
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})

    def probe(x):  # [B, L, H, D]
        return nn.with_logical_constraint(2 * x, ("batch", "length", "heads", None))

    x = jnp.ones((8, 4, 2, 3))
    out = parallel.jit_with_rules(probe, mesh, parallel.DEFAULT_RULES)(x)
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, P(BATCH, None, TP, None)), x.ndim), out.sharding
    assert len(jax.jit(probe)(x).sharding.device_set) == 1


def tiny_dit_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.model = ml_collections.ConfigDict(dict(
        name="DiTTransformer2DModel", sample_size=8, patch_size=2, in_channels=1, out_channels=2,
        num_attention_heads=2, attention_head_dim=8, num_layers=1, num_embeds_ada_norm=4))
    c.train.batch_size = 8
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 4, 2
    return c


def test_train_step_and_pipeline_programs_carry_the_activation_constraints():
    """The train loop's step and the pipeline's program, lowered on an (fsdp 4, tensor 2) mesh, constrain
    DiT's q/k/v to [batch over data x fsdp, heads over tensor] and its token stream to batch rows, and they
    compile; the same step jitted without the rules has no constraint at all."""
    c = tiny_dit_config()
    mesh, rules = parallel.mesh_from_config(c.mesh)
    model = build_model(c.model)
    tx = make_optimizer(c.train)
    state, shardings = create_train_state(model, tx, mesh, jax.random.key(0), rules)
    batch = {"image": jax.ShapeDtypeStruct((8, 8, 8, 1), jnp.float32),
             "cond": {"class_labels": jax.ShapeDtypeStruct((8,), jnp.int32)}}
    step = jit_train_step(model, tx, make_objective(c, model), mesh, rules, shardings, c.train)
    lowered = step.lower(state, batch, jax.random.key(1))
    found = set(_constraints(lowered.as_text()))
    qkv = ('[{"data", "fsdp"}, {}, {"tensor"}, {}]', "tensor<8x16x2x8xf32>")  # [B, L, heads, head_dim]
    tokens = ('[{"data", "fsdp"}, {}, {}]', "tensor<8x16x16xf32>")           # [B, L, D]
    assert {qkv, tokens} <= found, found
    assert lowered.compile().as_text()

    plain = jax.jit(step.__wrapped__, in_shardings=(shardings, parallel.batch_sharding(mesh),
                                                    parallel.replicated(mesh)))
    assert _constraints(plain.lower(state, batch, jax.random.key(1)).as_text()) == []

    pipe = GenerationPipeline(model, DDIMScheduler(), mesh, rules)
    program = pipe._generate(2, True).lower(state.ema_params, np.arange(8, dtype=np.int32),
                                              {"class_labels": np.zeros(8, np.int32)},
                                              jax.random.key_data(jax.random.key(0)),
                                              jnp.float32(2.0))
    found = set(_constraints(program.as_text()))
    # Under guidance the model sees 2 x 8 rows: [uncond; cond].
    assert ('[{"data", "fsdp"}, {}, {"tensor"}, {}]', "tensor<16x16x2x8xf32>") in found, found


def test_unet_train_step_constrains_its_feature_maps():
    """The digits U-Net's step, lowered by the loop on (data 2, fsdp 2, tensor 2): its NHWC feature maps are
    pinned to batch rows with whole channels."""
    c = digits_config()
    c.model.block_out_channels = (8, 16)
    c.model.down_block_types = ("DownBlock2D", "AttnDownBlock2D")
    c.model.up_block_types = ("AttnUpBlock2D", "UpBlock2D")
    c.model.attention_head_dim, c.model.norm_num_groups = 8, 4
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    mesh, rules = parallel.mesh_from_config(c.mesh)
    model = build_model(c.model)
    tx = make_optimizer(c.train)
    state, shardings = create_train_state(model, tx, mesh, jax.random.key(0), rules)
    batch = {"image": jax.ShapeDtypeStruct((8, 16, 16, 1), jnp.float32),
             "cond": {"class_labels": jax.ShapeDtypeStruct((8,), jnp.int32)}}
    step = jit_train_step(model, tx, make_objective(c, model), mesh, rules, shardings, c.train)
    found = set(_constraints(step.lower(state, batch, jax.random.key(1)).as_text()))
    assert ('[{"data", "fsdp"}, {}, {}, {}]', "tensor<8x16x16x8xf32>") in found, found  # after conv_in


def test_fsdp_and_tensor_parallel_step_equals_single_device_step():
    """One DiT train step on (fsdp 4, tensor 2), with the constraints in force, gives the single-device
    loss and parameters. Only reduction order differs: fp32 rounding, well inside 1e-5 relative / 1e-6."""
    c = tiny_dit_config()
    model = build_model(c.model)
    tx = make_optimizer(c.train)
    objective = make_objective(c, model)
    rng = np.random.default_rng(0)
    batch = model_batch({"image": rng.uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32),
                         "label": rng.integers(0, 4, (8,)).astype(np.int32)}, model)
    results = []
    for shape, devices in (({"data": 1}, jax.devices()[:1]), ({"fsdp": 4, "tensor": 2}, jax.devices()[:8])):
        mesh = parallel.make_mesh(shape, devices)
        state, shardings = create_train_state(model, tx, mesh, jax.random.key(0))
        step = jit_train_step(model, tx, objective, mesh, parallel.DEFAULT_RULES, shardings, c.train)
        state, metrics = step(state, parallel.shard_batch(batch, mesh), jax.random.key(1))
        results.append((jax.device_get(state.params), float(metrics["loss"])))
    (p1, l1), (p8, l8) = results
    assert abs(l1 - l8) <= 1e-5 * abs(l1)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_rules_are_config_and_survive_the_checkpoint_json():
    c = digits_config()
    assert parallel.parse_rules(c.mesh.rules) == parallel.DEFAULT_RULES
    saved = ml_collections.ConfigDict(json.loads(c.to_json_best_effort()))  # as a checkpoint stores it
    validate_config(saved)
    assert parallel.mesh_from_config(saved.mesh)[1] == parallel.DEFAULT_RULES
    c.mesh.rules = (("batch", ("data", "fsdp")), ("embed", None), ("heads", "tensor"))
    validate_config(c)
    assert dict(parallel.mesh_from_config(c.mesh)[1])["embed"] is None


@pytest.mark.parametrize("rules, message", [
    ((("embed", "fsdpp"),), r"config key 'mesh.rules': rule 'embed' names unknown mesh axis 'fsdpp'"),
    ((("batch", ("data", "model")),), r"'mesh.rules': rule 'batch' names unknown mesh axis 'model'"),
    ((("embed",),), r"'mesh.rules': entry 0 is \('embed',\), not a \(logical name, mesh axes\) pair"),
    ("fsdp", r"'mesh.rules': expected a list of \(logical name, mesh axes\) pairs"),
])
def test_bad_rules_are_named(rules, message):
    c = digits_config()
    with c.mesh.ignore_type():
        c.mesh.rules = rules
    with pytest.raises(ValueError, match=message):
        validate_config(c)


@pytest.mark.parametrize("shape, message", [
    ({"data": 3}, r"mesh \{'data': 3, 'fsdp': 1, 'tensor': 1\} needs 3 devices, have 8"),
    ({"data": -1, "fsdp": -1}, "at most one mesh axis may be -1"),
    ({"data": -1, "fsdp": 3}, "8 devices do not divide"),
    ({"data": 0}, "mesh.data must be a positive int or -1"),
    ({"pipeline": 2}, "unknown"),
])
def test_bad_mesh_shapes_are_named(shape, message, num_devices):
    assert num_devices == 8
    with pytest.raises(ValueError, match=message):
        parallel.make_mesh(shape)


# SD 1.5's UNet2DConditionModel (859,520,964 parameters in 686 arrays) under the default rules on a
# (data 2, fsdp 2, tensor 2) mesh: how many arrays get each PartitionSpec, and a representative of each kind.
SD15_SPEC_COUNTS = {
    P(FSDP, TP): 135,              # q/k/v, ff in, time embedding in, resnet time projections
    P(TP, FSDP): 49,               # attention and ff outputs, time embedding out
    P(None, None, FSDP, TP): 98,   # every convolution (HWIO), 1x1 proj_in / proj_out included
    P(TP): 137,                    # biases of column-split layers
    P(FSDP): 49,                   # biases of row-split layers
    P(None): 218,                  # group / layer norms
}
SD15_SAMPLES = {
    "conv_in/kernel": P(None, None, FSDP, TP),  # [3, 3, 4, 320]: 4 latent channels split over fsdp 2
    "conv_out/kernel": P(None, None, FSDP, TP),  # [3, 3, 320, 4]
    "time_embedding/linear_1/kernel": P(FSDP, TP),
    "time_embedding/linear_2/kernel": P(TP, FSDP),
    "down_blocks_0/resnets_0/conv1/kernel": P(None, None, FSDP, TP),
    "down_blocks_0/resnets_0/norm1/scale": P(None),
    "down_blocks_1/attentions_0/proj_in/kernel": P(None, None, FSDP, TP),
    "down_blocks_1/attentions_0/transformer_blocks_0/attn1/to_q/kernel": P(FSDP, TP),
    "down_blocks_1/attentions_0/transformer_blocks_0/attn2/to_k/kernel": P(FSDP, TP),  # [768 text, 640]
    "down_blocks_1/attentions_0/transformer_blocks_0/attn2/to_out_0/kernel": P(TP, FSDP),
    "down_blocks_1/attentions_0/transformer_blocks_0/attn2/to_out_0/bias": P(FSDP),
    "down_blocks_1/attentions_0/transformer_blocks_0/ff/net_0/proj/kernel": P(FSDP, TP),  # GEGLU [640, 5120]
    "down_blocks_1/attentions_0/transformer_blocks_0/ff/net_2/kernel": P(TP, FSDP),
    "down_blocks_1/attentions_0/transformer_blocks_0/norm2/scale": P(None),
    "mid_block/attentions_0/transformer_blocks_0/attn1/to_v/kernel": P(FSDP, TP),
    "up_blocks_1/resnets_2/conv_shortcut/kernel": P(None, None, FSDP, TP),
    "up_blocks_2/upsamplers_0/conv/bias": P(TP),
    "up_blocks_3/attentions_2/proj_out/kernel": P(None, None, FSDP, TP),
}


def test_sd15_unet_layout_under_the_default_rules():
    """The golden layout of the SD 1.5 UNet's parameters (shapes only, from the single-file 'sd1' config)."""
    from diffax.convert.single_file_configs import MODEL_TYPES
    name, values = MODEL_TYPES["sd1"]["unet"]
    config = config_from_block({"name": name, **values})
    boxed = jax.eval_shape(functools.partial(boxed_init, config), jax.random.key(0))  # traced once: ~10 s
    shapes = nn.meta.unbox(boxed)
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = parallel.logical_shardings(nn.get_partition_spec(boxed), mesh, shapes=shapes)
    specs = {"/".join(k.key for k in path): s.spec
             for path, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == 859_520_964
    counts = {}
    for spec in specs.values():
        counts[spec] = counts.get(spec, 0) + 1
    assert counts == SD15_SPEC_COUNTS
    assert {path: specs[path] for path in SD15_SAMPLES} == SD15_SAMPLES
