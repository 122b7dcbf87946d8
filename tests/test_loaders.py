"""Weight loaders on bad input: corrupt safetensors headers, malformed config.json files, integer and
non-finite tensors, hostile pickles, and every error path of `python -m diffax.convert`. Each case must end
in one `CheckpointError` / `ConfigFileError` (ValueError subclasses) naming the file and the tensor or key,
never a raw library traceback. Tiny one-block models keep the file fast: nothing here is compiled.
"""
from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from diffax import convert
from diffax.convert.__main__ import main as convert_main
from diffax.convert.io import CheckpointError, read_state_dict, write_safetensors
from diffax.models import DiT, DiTConfig, UNet2DConfig, UNet2DModel, abstract_params
from diffax.models.config_base import ConfigFileError

UNET = UNet2DConfig(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8,), layers_per_block=1,
                    down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=4)
REFERENCE_DIT = DiTConfig.from_reference(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=1,
                                         num_heads=2, num_classes=3)
WEIGHTS = "diffusion_pytorch_model.safetensors"


def random_params(config, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(s.dtype), abstract_params(config))


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("unet")
    convert.save(folder, UNet2DModel(UNET), random_params(UNET))
    return folder


def with_tensor(folder: Path, out: Path, key: str, value: np.ndarray) -> Path:
    """A copy of model folder `folder` at `out` with tensor `key` replaced by `value`; its weight file."""
    sd = read_state_dict(folder)
    assert key in sd
    sd[key] = value
    out.mkdir()
    (out / "config.json").write_text((folder / "config.json").read_text())
    write_safetensors(out / WEIGHTS, sd)
    return out / WEIGHTS


def write_raw(path: Path, header, buffer: bytes) -> Path:
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + buffer)
    return path


# --- safetensors headers --------------------------------------------------------------------------------

F32x2 = {"dtype": "F32", "shape": [2]}


@pytest.mark.parametrize("header, nbytes, message", [
    ({"w": {**F32x2, "data_offsets": [-8, 0]}}, 8, r"tensor 'w' has offsets \[-8, 0\] that do not fit"),
    ({"w": {**F32x2, "data_offsets": [8, 0]}}, 8, r"tensor 'w' has offsets \[8, 0\] that do not fit"),
    ({"a": {**F32x2, "data_offsets": [0, 8]}, "b": {**F32x2, "data_offsets": [4, 12]}}, 12,
     r"tensor 'b' at bytes \[4, 12\] overlaps 'a'"),
    ({"a": {**F32x2, "data_offsets": [0, 8]}, "b": {**F32x2, "data_offsets": [0, 8]}}, 8,
     r"tensor 'b' at bytes \[0, 8\] overlaps 'a'"),
    ({"a": {**F32x2, "data_offsets": [0, 8]}, "b": {**F32x2, "data_offsets": [12, 20]}}, 20,
     r"tensor 'b' at bytes \[12, 20\] leaves a gap after 'a'"),
    ({"a": {**F32x2, "data_offsets": [0, 8]}}, 16, r"corrupt safetensors file \(8 bytes after the last tensor\)"),
    ({"a": {**F32x2, "data_offsets": [2**70, 2**70 + 8]}}, 8, "tensor 'a' runs past the end of the file"),
])
def test_bad_offsets_name_file_and_tensor(tmp_path, header, nbytes, message):
    path = write_raw(tmp_path / "w.safetensors", header, b"\0" * nbytes)
    with pytest.raises(CheckpointError, match=rf"^{path}: {message}"):
        read_state_dict(path)  # refused when the header is read, before any tensor is


@pytest.mark.parametrize("entry", [
    {"shape": [2], "data_offsets": [0, 8]},                            # no dtype
    {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]},          # dtype not a string
    {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]},          # float dimension
    {"dtype": "F32", "shape": [-1, -2], "data_offsets": [0, 8]},       # negative dimensions, product 2
    {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]},            # shape not a list
    {"dtype": "F32", "shape": [2], "data_offsets": [0, True]},         # bool offset
    {"dtype": "F32", "shape": [2], "data_offsets": [0, 4, 8]},         # three offsets
    ["F32", [2], [0, 8]],                                              # entry not an object
])
def test_malformed_header_entries_name_file_and_tensor(tmp_path, entry):
    path = write_raw(tmp_path / "w.safetensors", {"w": entry}, b"\0" * 8)
    with pytest.raises(CheckpointError, match=rf"^{path}: tensor 'w' has a corrupt header entry"):
        read_state_dict(path)


def test_malformed_headers_name_the_file(tmp_path):
    path = write_raw(tmp_path / "list.safetensors", [1, 2], b"")
    with pytest.raises(CheckpointError, match=rf"^{path}: corrupt safetensors header \(not a JSON object\)"):
        read_state_dict(path)
    path = write_raw(tmp_path / "meta.safetensors", {"__metadata__": {"format": 1}}, b"")
    with pytest.raises(CheckpointError, match=rf"^{path}: corrupt safetensors header \(__metadata__"):
        read_state_dict(path)
    path = write_raw(tmp_path / "f8.safetensors", {"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}},
                     b"\0" * 2)
    with pytest.raises(CheckpointError, match=rf"^{path}: tensor 'w' has unsupported dtype 'F8_E4M3'"):
        read_state_dict(path)


# --- config.json ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "expected a JSON object, got list"), ("3", "expected a JSON object, got int"),
    ('{"_class_name": ', "not valid JSON"), ('\xff\xfe', "not valid JSON"),
])
def test_config_json_not_an_object_names_the_file(tmp_path, unet_folder, text, message):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / WEIGHTS).write_bytes((unet_folder / WEIGHTS).read_bytes())
    (folder / "config.json").write_bytes(text.encode("latin-1"))
    for load in (convert.load, UNet2DConfig.from_diffusers):
        with pytest.raises(ConfigFileError, match=rf"^{folder / 'config.json'}: {message}"):
            load(folder)


@pytest.mark.parametrize("key, value, expected", [
    ("add_attention", {"a": 1}, "bool"), ("in_channels", True, "int"), ("in_channels", 2.0, "int"),
    ("block_out_channels", [8, [16]], r"tuple\[int, \.\.\.\]"), ("sample_size", [8, 8, 8], "int | tuple"),
    ("act_fn", 1, "str"), ("norm_eps", "1e-5", "float"),
])
def test_config_json_wrong_types_name_file_and_key(tmp_path, key, value, expected):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**UNET.to_diffusers(), key: value}))
    with pytest.raises(ValueError, match=rf"^{path}: {key}=.* has the wrong type \(expected {expected}"):
        UNet2DConfig.from_diffusers(path)


def test_config_types_checked_before_older_layouts_are_read(tmp_path):
    """DiT's Transformer2DModel layout compares sample_size while translating it: a null is named first."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**DiTConfig().to_diffusers(), "_class_name": "Transformer2DModel",
                                "sample_size": None}))
    with pytest.raises(ValueError, match=rf"^{path}: sample_size=None has the wrong type \(expected int\)"):
        DiTConfig.from_diffusers(path)


@pytest.mark.parametrize("dtype", [[], "int8", None, 3])
def test_model_block_dtype_must_be_a_float_dtype(dtype):
    from diffax.models import config_from_block
    with pytest.raises(ValueError, match=r"dtype=.* is not a floating-point dtype"):
        config_from_block({"name": "unet2d", "param_dtype": "float32", "dtype": dtype})
    assert config_from_block({"name": "unet2d", "dtype": "bfloat16"}).dtype == np.dtype("bfloat16")


# --- what the tensors hold ------------------------------------------------------------------------------

def test_integer_tensor_for_a_float_parameter_is_refused(tmp_path, unet_folder):
    weights = with_tensor(unet_folder, tmp_path / "int", "conv_in.weight", np.ones((8, 1, 3, 3), np.int32))
    with pytest.raises(CheckpointError, match=rf"^{weights}: tensor 'conv_in.weight' is int32, but the model's "
                                              r"parameter is float32"):
        convert.load(weights.parent)
    weights = with_tensor(unet_folder, tmp_path / "bool", "conv_in.bias", np.ones(8, np.bool_))
    with pytest.raises(CheckpointError, match=rf"^{weights}: tensor 'conv_in.bias' is bool"):
        convert.load(weights.parent)


def test_nonfinite_weights_are_refused_unless_allowed(tmp_path, unet_folder):
    bad = np.zeros((8, 1, 3, 3), np.float32)
    bad[0, 0, 1, 1], bad[1, 0, 0, 0] = np.nan, np.inf
    weights = with_tensor(unet_folder, tmp_path / "nan", "conv_in.weight", bad)
    with pytest.raises(CheckpointError, match=rf"^{weights}: tensor 'conv_in.weight' holds NaN or inf \(2 of 72 "
                                              r"values non-finite\); pass allow_nonfinite=True"):
        convert.load(weights.parent)
    _, params = convert.load(weights.parent, allow_nonfinite=True)
    np.testing.assert_array_equal(params["conv_in"]["kernel"], bad.transpose(2, 3, 1, 0))
    # Finite in the file, but past float16's range once cast to the requested param_dtype.
    weights = with_tensor(unet_folder, tmp_path / "big", "conv_in.bias", np.full(8, 1e6, np.float32))
    with pytest.raises(CheckpointError, match=r"tensor 'conv_in.bias' overflows float16 \(8 of 8"):
        convert.load(weights.parent, param_dtype="float16")
    assert np.isfinite(convert.load(weights.parent)[1]["conv_in"]["bias"]).all()


def test_nonfinite_reference_tensor_is_named_as_in_the_file(tmp_path):
    """A family hook renames and splits tensors (DiT's fused qkv); the error still names the file's key."""
    ref = convert.save(tmp_path / "dit.safetensors", DiT(REFERENCE_DIT), random_params(REFERENCE_DIT),
                       layout="reference")
    sd = read_state_dict(ref)
    sd["blocks.0.attn.qkv.weight"][40, 3] = np.nan  # a row of to_k after the split
    write_safetensors(ref, sd)
    with pytest.raises(CheckpointError, match=rf"^{ref}: tensor 'blocks.0.attn.qkv.weight' holds NaN"):
        convert.load(ref, num_heads=2)


class _Payload:
    """Unpickling this would create the file `marker`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_hostile_pickle_is_refused_and_never_runs(tmp_path, unet_folder):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "pwned"
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text((unet_folder / "config.json").read_text())
    torch.save({"conv_in.weight": torch.zeros(8, 1, 3, 3), "x": _Payload(str(marker))},
               folder / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match=rf"^{folder / 'diffusion_pytorch_model.bin'}: cannot be read as a "
                                              r"torch checkpoint \(UnpicklingError"):
        convert.load(folder)
    assert not marker.exists()  # weights_only=True refused the call; the payload never ran


# --- python -m diffax.convert -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_sources(tmp_path_factory, unet_folder) -> Path:
    root = tmp_path_factory.mktemp("bad")
    weights = (unet_folder / WEIGHTS).read_bytes()
    for name, config, data in (("noconfig", None, weights), ("corrupt", "same", weights[:-100]),
                               ("garbage", "same", b"\x00" * 40),
                               ("unknown", '{"_class_name": "NoSuchModel"}', weights),
                               ("listconfig", "[1]", weights)):
        (root / name).mkdir()
        (root / name / WEIGHTS).write_bytes(data)
        if config is not None:
            (root / name / "config.json").write_text((unet_folder / "config.json").read_text()
                                                     if config == "same" else config)
    (root / "a_file").write_text("")
    return root


@pytest.mark.parametrize("args, message", [
    (["{bad}/nowhere", "{out}"], "{bad}/nowhere: no such file or folder"),
    (["{bad}/noconfig", "{out}"], "{bad}/noconfig/config.json: missing; a diffusers model folder holds it"),
    (["{bad}/corrupt", "{out}"], f"{{bad}}/corrupt/{WEIGHTS}: tensor '.*' runs past the end of the file"),
    (["{bad}/garbage", "{out}"], f"{{bad}}/garbage/{WEIGHTS}: corrupt safetensors header"),
    (["{bad}/unknown", "{out}"], "{bad}/unknown/config.json: _class_name 'NoSuchModel' is not a model"),
    (["{bad}/listconfig", "{out}"], "{bad}/listconfig/config.json: expected a JSON object, got list"),
    (["{good}", "{out}", "--to", "torch"], "argument --to: invalid choice: 'torch'"),
    (["{good}", "{out}", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["{good}", "{out}", "--num_heads", "two"], "argument --num_heads: invalid int value: 'two'"),
    (["{good}"], "the following arguments are required: dst"),
    (["{good}", "{bad}/a_file"], r"\[Errno 17\] File exists: '{bad}/a_file'"),
    (["{good}", "{out}.pt", "--to", "reference"], "save: UNet2DModel has no reference layout"),
])
def test_command_line_errors_are_one_line(tmp_path, unet_folder, bad_sources, capsys, args, message):
    fill = dict(bad=bad_sources, good=unet_folder, out=tmp_path / "out")
    args = [a.format(**fill) for a in args]
    try:
        status = convert_main(args)
    except SystemExit as e:  # a bad flag: argparse's exit, with our one line
        status = e.code
    err = capsys.readouterr().err
    assert status == 1
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and re.match("error: " + message.format(**fill), err), err
    assert not (tmp_path / "out").exists()


def test_command_line_corrupt_file_in_a_fresh_process(tmp_path, bad_sources):
    """The real `python -m diffax.convert`: one line on stderr, status 1, no traceback."""
    result = subprocess.run([sys.executable, "-m", "diffax.convert", str(bad_sources / "corrupt"), str(tmp_path)],
                            capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert re.fullmatch(rf"error: {bad_sources / 'corrupt' / WEIGHTS}: tensor '[\w.]+' runs past the end of the "
                        r"file \(truncated\?\)", line), line


def test_two_tensors_for_one_parameter_are_refused(tmp_path, unet_folder):
    """'conv_in.kernel' converts to the same parameter as 'conv_in.weight'; neither silently wins."""
    sd = read_state_dict(unet_folder)
    sd["conv_in.kernel"] = sd["conv_in.weight"].transpose(2, 3, 1, 0)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text((unet_folder / "config.json").read_text())
    write_safetensors(tmp_path / "m" / WEIGHTS, sd)
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'm' / WEIGHTS}: tensors 'conv_in.kernel' and "
                                              r"'conv_in.weight' both convert to conv_in/kernel"):
        convert.load(tmp_path / "m")


@pytest.mark.parametrize("index, message", [
    ({"weight_map": ["a"]}, "not a shard index"), ([1], "not a shard index"),
    ({"weight_map": {"a": 3}}, "not a shard index"), ({"metadata": {}}, "not a shard index"),
])
def test_malformed_shard_index_names_the_file(tmp_path, index, message):
    path = tmp_path / "model.safetensors.index.json"
    path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"^{path}: {message}"):
        read_state_dict(path)


@pytest.mark.parametrize("shapes, options, message", [
    ({"x_embedder.proj.weight": (32, 4)}, {}, r"x_embedder.proj.weight has shape \(32, 4\); a reference DiT's is 4-d"),
    ({"x_embedder.proj.weight": (32, 4, 0, 0)}, {}, "x_embedder.proj.weight has shape"),
    ({"pos_embed": (4,)}, {}, r"pos_embed has shape \(4,\); a reference DiT's is 3-d"),
    ({"pos_embed": (1, 5, 32)}, {}, "pos_embed has 5 positions, not a square grid"),
    ({"y_embedder.embedding_table.weight": (1, 32)}, {}, "num_embeds_ada_norm=0 is not supported"),
    ({}, {"num_heads": 0}, "num_heads=0 is not a positive int"),
])
def test_reference_dit_shapes_name_file_and_tensor(tmp_path, shapes, options, message):
    """The reference layout's config is read from tensor shapes; odd shapes are named, not divided by."""
    base = {"x_embedder.proj.weight": (32, 4, 2, 2), "y_embedder.embedding_table.weight": (4, 32),
            "final_layer.linear.weight": (16, 32), "blocks.0.mlp.fc1.weight": (128, 32), "pos_embed": (1, 4, 32)}
    path = tmp_path / "dit.safetensors"
    write_safetensors(path, {k: np.zeros(v, np.float32) for k, v in {**base, **shapes}.items()})
    with pytest.raises(ValueError, match=rf"^{path}: {message}"):
        convert.load(path, **{"num_heads": 2, **options})


def test_torch_tensor_numpy_cannot_hold_names_file_and_tensor(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({"w": torch.zeros(2, dtype=torch.float8_e4m3fn)}, tmp_path / "f8.pt")
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'f8.pt'}: tensor 'w' has dtype torch.float8_e4m3fn"):
        read_state_dict(tmp_path / "f8.pt")
