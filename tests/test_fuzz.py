"""Property tests (hypothesis) over every parser of user input: safetensors headers, each model family's
config.json, run configs with their `model` block, and the converters' key rules.

The property throughout: an input gives a result, or ONE error of an expected type (a ValueError subclass
such as CheckpointError or ConfigFileError) whose message names the file or the key. KeyError, TypeError,
AttributeError, IndexError, struct.error, OverflowError, UnicodeDecodeError and numpy errors must never
escape. Examples are few and cheap (nothing is compiled), so the file runs in seconds.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import tempfile
import warnings
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from diffax.convert import rules
from diffax.convert.io import _ST_DTYPES, CheckpointError, read_state_dict
from diffax.models import config_from_block
from diffax.models.registry import families, get_family
from diffax.train.config import base_config, validate_config

# DIFFAX_FUZZ_EXAMPLES=5000 for a longer, random hunt. The default run is derandomized so that the
# suite gives the same verdict on every run; the random hunts are where new cases come from.
_HUNT = os.environ.get("DIFFAX_FUZZ_EXAMPLES")
FUZZ = settings(max_examples=int(_HUNT or 150), derandomize=_HUNT is None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
LOADS = settings(FUZZ, max_examples=max(1, FUZZ.max_examples // 3))  # whole loads: ~0.1 s an example

# JSON values of every type, the odd ones (NaN, huge integers, unicode) included.
SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.integers(-3, 40)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=6))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)


def message_names(error: Exception, *names: str) -> bool:
    """Whether the message holds one of `names`, as is or as its repr shows it."""
    return any(name in str(error) or repr(name)[1:-1] in str(error) for name in names)


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as folder:
        yield Path(folder)


# --- (a) safetensors headers ------------------------------------------------------------------------------

DTYPE_NAMES = st.sampled_from([*_ST_DTYPES, "F8_E4M3", "U64", "f32", ""])


@st.composite
def safetensors_bytes(draw) -> bytes:
    """A safetensors file: a consistent layout, then mutated (entries, header text, length field, buffer)."""
    n = draw(st.integers(0, 3))
    header: dict = {}
    offset = 0
    for i in range(n):
        name = draw(st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL"]))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        nbytes = math.prod(shape) * np.dtype(_ST_DTYPES[name]).itemsize
        header[draw(st.text(min_size=1, max_size=5)) + str(i)] = {
            "dtype": name, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    for key in draw(st.lists(st.sampled_from(sorted(header)), max_size=2, unique=True)) if header else []:
        entry = header[key]
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "entry", "extra"]))
        if field == "dtype":
            entry["dtype"] = draw(DTYPE_NAMES | JSON)
        elif field == "shape":
            entry["shape"] = draw(st.lists(st.integers(-2, 4), max_size=3) | JSON)
        elif field == "data_offsets":
            entry["data_offsets"] = draw(st.lists(st.integers(-8, 64) | st.integers(0, 2**66), min_size=2,
                                                  max_size=2) | JSON)
        elif field == "drop":
            del entry[draw(st.sampled_from(sorted(entry)))]
        elif field == "entry":
            header[key] = draw(JSON)
        else:
            entry[draw(st.text(max_size=4))] = draw(JSON)
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2) | JSON)
    text = json.dumps(header).encode() if draw(st.integers(0, 9)) else draw(st.binary(max_size=40))
    if draw(st.integers(0, 9)) == 0:
        text = json.dumps(draw(JSON)).encode()  # a header that is not an object
    length = len(text) if draw(st.integers(0, 4)) else draw(st.integers(0, 2**64 - 1))
    buffer = draw(st.binary(min_size=offset, max_size=offset))
    cut = draw(st.integers(-3, 3)) if draw(st.integers(0, 3)) == 0 else 0
    buffer = buffer[:len(buffer) + cut] if cut < 0 else buffer + b"\0" * cut
    return struct.pack("<Q", length) + text + buffer


@FUZZ
@given(data=safetensors_bytes())
def test_fuzz_safetensors_reader(scratch, data):
    path = scratch / "fuzz.safetensors"
    path.write_bytes(data)
    try:
        tensors = read_state_dict(path)
    except CheckpointError as e:
        assert message_names(e, str(path)), e
        event("refused")
        return
    event("read")
    # Read: every tensor has its header's shape.
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    assert tensors.keys() == header.keys() - {"__metadata__"}
    for key, value in tensors.items():
        assert list(value.shape) == header[key]["shape"]
        assert value.dtype == np.dtype(_ST_DTYPES[header[key]["dtype"]])


@FUZZ
@given(data=st.binary(max_size=64))
def test_fuzz_safetensors_reader_on_noise(scratch, data):
    path = scratch / "noise.safetensors"
    path.write_bytes(data)
    try:
        read_state_dict(path)
    except CheckpointError as e:
        assert message_names(e, str(path)), e


# --- (b) config.json of every family ----------------------------------------------------------------------

# Values that pass or nearly pass each field's checks, so that examples reach the deeper validation.
NEAR_VALID = st.sampled_from([0, 1, 2, 3, 4, 8, 16, 32, -1, 2.5, 1e-6, True, False, None, "", "silu", "gelu",
                              "conv", "positional", "default", "ada_norm_zero", "gelu-approximate",
                              [], [8], [8, 16], [32, 32], ["DownBlock2D"], ["UpBlock2D"],
                              ["DownBlock2D", "AttnDownBlock2D"], ["AttnUpBlock2D", "UpBlock2D"],
                              {"a": 1}, float("nan"), float("inf"), 10**30])


@st.composite
def config_dicts(draw, family_name: str):
    """A config.json's parsed contents for `family_name`: the defaults with some keys changed, unknown
    keys added, the bookkeeping keys varied; or any JSON value at all."""
    family = get_family(family_name)
    cls = family.config_cls
    if draw(st.integers(0, 5)) == 0:
        return draw(JSON)
    cfg = cls().to_diffusers()
    keys = sorted({f.name for f in dataclasses.fields(cls)} - set(cls.runtime_fields))
    for key in draw(st.lists(st.sampled_from(keys), max_size=3)):
        value = draw(NEAR_VALID | JSON)
        if key in cls.extra_fields:
            cfg.setdefault("_diffax", {})[key] = value
        else:
            cfg[key] = value
    for key in draw(st.lists(st.text(max_size=6), max_size=2)):
        cfg[key] = draw(JSON)
    if draw(st.integers(0, 4)) == 0:
        cfg["_class_name"] = draw(st.sampled_from([*families(), "Transformer2DModel", "Nope"]) | JSON)
    if draw(st.integers(0, 4)) == 0:
        cfg["_diffax"] = draw(JSON)
    return cfg


@pytest.mark.parametrize("family_name", sorted(families()))
def test_fuzz_config_json(scratch, family_name):
    cls = get_family(family_name).config_cls
    path = scratch / family_name / "config.json"
    path.parent.mkdir(exist_ok=True)

    @FUZZ
    @given(cfg=config_dicts(family_name), raw=st.integers(0, 19), noise=st.binary(max_size=16))
    def check(cfg, raw, noise):
        path.write_bytes(noise if raw == 0 else json.dumps(cfg).encode())
        try:
            config = cls.from_diffusers(path.parent)
        except ValueError as e:
            assert message_names(e, str(path)), e
            event("refused")
            return
        event("accepted")
        assert isinstance(config, cls)
        hash(config)  # a flax module attribute and a static jit argument
        try:
            with warnings.catch_warnings():  # DiT warns of values diffusers reads differently
                warnings.simplefilter("ignore")
                stored = config.to_diffusers()
        except ValueError:  # DiT: a config diffusers cannot express is refused on export, by name
            return
        assert cls.from_diffusers(json.loads(json.dumps(stored))) == config

    check()


# --- (c) run configs and their model block ----------------------------------------------------------------

MODEL_BLOCKS = {"unet2d": dict(name="unet2d", sample_size=16, in_channels=1, out_channels=1,
                               block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4,
                               down_block_types=["DownBlock2D", "AttnDownBlock2D"],
                               up_block_types=["AttnUpBlock2D", "UpBlock2D"]),
                "dit": dict(name="dit", sample_size=8, patch_size=2, in_channels=4, num_layers=1,
                            num_attention_heads=2, attention_head_dim=8, num_embeds_ada_norm=10)}


def _leaves(tree: dict, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for key, value in tree.items():
        if isinstance(value, dict) and value and key != "model":
            out += _leaves(value, prefix + (key,))
        else:
            out.append(prefix + (key,))
    return out


RUN_KEYS = [path for path in _leaves(base_config().to_dict()) if path != ("model",)]
MODEL_KEYS = ("name", "preset", "dtype", "param_dtype", "attention_backend", "remat", "freq_shift",
              "sample_size", "in_channels", "num_class_embeds", "block_out_channels", "num_layers", "patch_size")


@st.composite
def run_configs(draw):
    """(a run config as a recipe would build it, the names of the keys changed)."""
    tree = base_config().to_dict()
    tree["model"] = dict(MODEL_BLOCKS[draw(st.sampled_from(sorted(MODEL_BLOCKS)))])
    changed = []
    for path in draw(st.lists(st.sampled_from(RUN_KEYS), max_size=2)):
        node = tree
        for seg in path[:-1]:
            node = node[seg]
        node[path[-1]] = draw(NEAR_VALID | JSON)
        changed.append(path[-1])
    for key in draw(st.lists(st.sampled_from(MODEL_KEYS) | st.text(min_size=1, max_size=6), max_size=2)):
        tree["model"][key] = draw(NEAR_VALID | JSON | st.sampled_from(["DiT-S/2", "bfloat16", "float64", "cudnn"]))
        changed.append(key)
    if draw(st.integers(0, 4)) == 0:
        block = draw(st.sampled_from(["", "data", "train", "sample", "mesh"]))
        key = draw(st.text(min_size=1, max_size=6).filter(lambda k: k not in tree.get(block, tree)))
        (tree[block] if block else tree)[key] = draw(JSON)
        changed.append(key)
    return tree, changed


@FUZZ
@given(case=run_configs())
def test_fuzz_run_config_and_model_block(case):
    tree, changed = case
    try:
        config = ml_collections.ConfigDict(tree)
    except (TypeError, ValueError, AttributeError):  # ml_collections refuses the tree itself (recipe time)
        return
    try:
        validate_config(config)
        module_config = config_from_block(config.model)
    except ValueError as e:
        assert message_names(e, *changed), (e, changed)
        event("refused")
        return
    event("accepted")
    hash(module_config)


# --- (d) key rules --------------------------------------------------------------------------------------

NAME = st.from_regex(r"[a-z][a-z0-9]{0,5}", fullmatch=True) | st.sampled_from(sorted(rules.LITERAL_NAMES))
DIGITS = st.from_regex(r"[0-9]{1,3}", fullmatch=True)


@st.composite
def torch_keys(draw) -> str:
    """A dotted torch key: module names (none ending in _<digits> but the literal ones) and indices."""
    parts = [draw(NAME)]
    for _ in range(draw(st.integers(0, 5))):
        parts.append(draw(NAME | DIGITS))
    return ".".join(parts)


@FUZZ
@given(key=torch_keys())
def test_fuzz_key_path_round_trip(key):
    path = rules.key_to_path(key)
    assert all(isinstance(seg, str) and seg for seg in path)
    assert rules.path_to_key(path) == key


@FUZZ
@given(key=st.text(max_size=20))
def test_fuzz_key_to_path_any_text(key):
    path = rules.key_to_path(key)
    assert ".".join(path).count(".") <= key.count(".")
    rules.path_to_key(path)


ARRAYS = st.tuples(st.lists(st.integers(0, 3), max_size=5), st.sampled_from(["float32", "float16", "int64"]))


@FUZZ
@given(items=st.lists(st.tuples(torch_keys() | st.text(max_size=8), ARRAYS), max_size=6))
def test_fuzz_torch_to_flax(items):
    state_dict = {key: np.zeros(shape, dtype) for key, (shape, dtype) in items}
    try:
        params = rules.torch_to_flax(state_dict, source="fuzz.bin")
    except CheckpointError as e:
        assert message_names(e, "fuzz.bin") and any(repr(k) in str(e) for k in state_dict), e
        return
    assert len(rules.flatten(params)) == len(state_dict)  # nothing silently merged


SEGMENTS = st.sampled_from(["a", "b", "kernel", "bias"])
TREES = st.dictionaries(SEGMENTS, st.recursive(ARRAYS.map(lambda a: np.zeros(*a)),
                                               lambda inner: st.dictionaries(SEGMENTS, inner, min_size=1, max_size=3),
                                               max_leaves=5), min_size=1, max_size=3)


@FUZZ
@given(params=TREES, reference=TREES)
def test_fuzz_check_against(params, reference):
    try:
        out = rules.check_against(params, reference, source="fuzz.pt")
    except CheckpointError as e:
        assert all(line.startswith("fuzz.pt: ") for line in str(e).splitlines()), e
        return
    for path, leaf in rules.flatten(reference).items():
        assert rules.flatten(out)[path].shape == leaf.shape and rules.flatten(out)[path].dtype == leaf.dtype


# --- (e) whole loads: shard indexes, mutated model folders, reference files ---------------------------------

@FUZZ
@given(index=JSON | st.fixed_dictionaries({"weight_map": st.dictionaries(
    st.sampled_from(["a", "b"]) | st.text(max_size=4),
    st.sampled_from(["s.safetensors", "missing.safetensors", "", ".", "s.bin"]) | JSON, max_size=3)}))
def test_fuzz_shard_index(scratch, index):
    from diffax.convert.io import write_safetensors
    folder = scratch / "sharded"
    folder.mkdir(exist_ok=True)
    write_safetensors(folder / "s.safetensors", {"a": np.ones(2, np.float32)})
    path = folder / "model.safetensors.index.json"
    path.write_text(json.dumps(index))
    try:
        tensors = read_state_dict(path)
    except CheckpointError as e:
        assert message_names(e, str(folder)), e
        event("refused")
        return
    event("read")
    assert set(tensors) <= {"a"}


TINY_UNET = dict(_class_name="UNet2DModel", sample_size=8, in_channels=1, out_channels=1, block_out_channels=[8],
                 layers_per_block=1, down_block_types=["DownBlock2D"], up_block_types=["UpBlock2D"],
                 norm_num_groups=4)
MUTATIONS = st.lists(st.tuples(st.sampled_from(["dtype", "shape", "nan", "drop", "extra", "rank"]),
                               st.integers(0, 10**6), st.sampled_from(["F32", "F16", "BF16", "I32", "I64", "BOOL"])),
                     min_size=1, max_size=3)


@pytest.fixture(scope="module")
def unet_state_dict():
    from diffax.models import UNet2DConfig, abstract_params
    rng = np.random.default_rng(0)
    config = UNet2DConfig.from_diffusers(TINY_UNET)
    params = {"/".join(p): (0.1 * rng.standard_normal(s.shape)).astype(np.float32)
              for p, s in rules.flatten(abstract_params(config)).items()}
    return rules.flax_to_torch(rules.unflatten({tuple(k.split("/")): v for k, v in params.items()}))


@LOADS
@given(mutations=MUTATIONS, allow_nonfinite=st.booleans())
def test_fuzz_load_mutated_folder(scratch, unet_state_dict, mutations, allow_nonfinite):
    """A tiny U-Net folder with tensors of other dtypes, shapes and ranks, NaNs, dropped or extra tensors."""
    from diffax import convert
    from diffax.convert.io import write_safetensors
    sd = {k: np.asarray(v) for k, v in unet_state_dict.items()}
    for op, pick, dtype in mutations:
        key = sorted(sd)[pick % len(sd)]
        if op == "dtype":
            sd[key] = sd[key].astype(_ST_DTYPES[dtype])
        elif op == "shape":
            sd[key] = np.zeros(sd[key].shape[:-1] + (sd[key].shape[-1] + 1,) if sd[key].ndim else (2,), np.float32)
        elif op == "nan":
            sd[key] = sd[key].astype(np.float32)  # an earlier dtype mutation may have made it integer
            sd[key].reshape(-1)[pick % sd[key].size] = np.nan
        elif op == "drop":
            del sd[key]
        elif op == "extra":
            sd[f"extra.{pick}.weight"] = np.zeros((2,) * (pick % 5), np.float32)
        else:
            sd[key] = sd[key].reshape((1,) * (pick % 3) + sd[key].shape)
    folder = scratch / "unet"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(TINY_UNET))
    write_safetensors(folder / "diffusion_pytorch_model.safetensors", sd)
    try:
        _, params = convert.load(folder, allow_nonfinite=allow_nonfinite)
    except CheckpointError as e:
        assert all(line.startswith(f"{folder}/") for line in str(e).splitlines()), e
        event("refused")
        return
    event("loaded")
    leaves = rules.flatten(params)
    assert len(leaves) == len(unet_state_dict)
    assert allow_nonfinite or all(np.isfinite(v).all() for v in leaves.values())


REFERENCE_SHAPES = {"x_embedder.proj.weight": (32, 4, 2, 2), "y_embedder.embedding_table.weight": (4, 32),
                    "final_layer.linear.weight": (16, 32), "blocks.0.mlp.fc1.weight": (128, 32),
                    "blocks.0.attn.qkv.weight": (96, 32), "pos_embed": (1, 4, 32)}
DIMS = st.lists(st.integers(0, 5) | st.sampled_from([16, 32, 96, 128]), max_size=4).map(tuple).filter(
    lambda shape: math.prod(shape) <= 2**14)  # small files: the shapes matter, not the bytes


@LOADS
@given(shapes=st.fixed_dictionaries({}, optional={k: DIMS for k in REFERENCE_SHAPES}),
       options=st.fixed_dictionaries({}, optional={"num_heads": st.integers(-1, 4),
                                                   "input_size": st.integers(-1, 8)}))
def test_fuzz_reference_dit_shapes(scratch, shapes, options):
    """A DiT reference-layout file whose tensors have other shapes: its config is read from them."""
    from diffax import convert
    from diffax.convert.io import write_safetensors
    path = scratch / "dit.safetensors"
    write_safetensors(path, {k: np.zeros(shapes.get(k, v), np.float32) for k, v in REFERENCE_SHAPES.items()})
    try:
        convert.load(path, **options)
    except ValueError as e:  # CheckpointError; the file is incomplete: missing tensors at best
        assert all(line.startswith(f"{path}: ") for line in str(e).splitlines()), e
        event(str(e).split(": ")[1][:30])
