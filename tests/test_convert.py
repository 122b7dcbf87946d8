"""Conversion: key/tensor rules (diffax.convert.rules), weight-file I/O (diffax.convert.io), and the one
entry point `diffax.convert.load` / `save` / `python -m diffax.convert` for every family.

Tensor rules are checked by running the torch layer and the flax layer on the same input: a wrong
transpose gives O(1) differences, so fp32 agreement to 1e-5 of the output scale (summation order only)
is a real check. Family parity with diffusers lives in test_unet2d.py and test_dit.py; here tiny configs
with random weights check dispatch, folders, the command line and error reports.
"""
from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from diffax import convert
from diffax.convert import rules
from diffax.convert.__main__ import main as convert_main
from diffax.convert.io import (CheckpointError, open_tensors, read_safetensors, read_state_dict, read_torch,
                               write_safetensors)
from diffax.models import DiT, DiTConfig, UNet2DConfig, UNet2DModel, abstract_params, make_module
from diffax.models.layers import GroupNorm, conv, dense

torch = pytest.importorskip("torch")


def _close(a, b, tol: float = 1e-5) -> None:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.abs(a - b).max() <= tol * np.abs(b).max()


# --- key rules --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, path", [
    ("down_blocks.0.resnets.1.conv1.weight", ("down_blocks_0", "resnets_1", "conv1", "weight")),
    ("time_embedding.linear_1.bias", ("time_embedding", "linear_1", "bias")),
    ("mid_block.attentions.0.to_out.0.weight", ("mid_block", "attentions_0", "to_out_0", "weight")),
    ("conv_norm_out.weight", ("conv_norm_out", "weight")),
])
def test_key_path_round_trip(key, path):
    assert rules.key_to_path(key) == path
    assert rules.path_to_key(path) == key  # 'linear_1' is a literal torch name, 'to_out_0' is to_out.0


def test_key_rules_edge_cases():
    # Consecutive indices, and an index after a name that itself ends in _<digits>.
    for key in ("a.0.1.weight", "linear_1.0.0.bias", "proj_out_2.3.weight"):
        assert rules.path_to_key(rules.key_to_path(key)) == key
    assert rules.key_to_path("a.²") == ("a", "²")  # '²'.isdigit(), but no torch index
    with pytest.raises(CheckpointError, match=r"^f.bin: 'a.weight' and 'a.kernel' both convert to a/kernel"):
        rules.torch_to_flax({"a.weight": np.zeros((2, 2)), "a.kernel": np.zeros((2, 2))}, source="f.bin")
    with pytest.raises(CheckpointError, match=r"^f.bin: 'a.bias' is a tensor, but 'a.bias.weight' puts tensors"):
        rules.torch_to_flax({"a.bias": np.zeros(2), "a.bias.weight": np.zeros(2)}, source="f.bin")


def test_tensor_rules_match_torch_layers():
    torch.manual_seed(0)
    tconv, tlin = torch.nn.Conv2d(3, 5, 3, padding=1), torch.nn.Linear(4, 6)
    tnorm, temb = torch.nn.GroupNorm(2, 6, eps=1e-6), torch.nn.Embedding(7, 6)
    with torch.no_grad():
        tnorm.weight.normal_(), tnorm.bias.normal_()
    sd = {f"{name}.{k}": v.numpy() for name, mod in (("c", tconv), ("l", tlin), ("n", tnorm), ("e", temb))
          for k, v in mod.state_dict().items()}
    params = rules.torch_to_flax(sd, embedding_keys=[r"^e\.weight$"])
    assert params["c"]["kernel"].shape == (3, 3, 3, 5) and params["l"]["kernel"].shape == (4, 6)
    assert set(params["n"]) == {"scale", "bias"} and params["e"]["embedding"].shape == (7, 6)

    x = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32)
    with torch.no_grad():
        want = tconv(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    _close(conv(5, 3, padding=1).apply({"params": params["c"]}, x), want)

    v = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    with torch.no_grad():
        want = tlin(torch.from_numpy(v)).numpy()
    _close(dense(6).apply({"params": params["l"]}, v), want)

    h = np.random.default_rng(2).standard_normal((2, 4, 4, 6)).astype(np.float32) + 3.0
    with torch.no_grad():
        want = tnorm(torch.from_numpy(h).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    _close(GroupNorm(2, 1e-6).apply({"params": params["n"]}, h), want)

    ids = np.array([0, 6, 3])
    with torch.no_grad():
        want = temb(torch.from_numpy(ids)).numpy()
    np.testing.assert_array_equal(nn.Embed(7, 6).apply({"params": params["e"]}, ids), want)

    # Export inverts import exactly (same bytes back).
    back = rules.flax_to_torch(params)
    assert back.keys() == sd.keys()
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])


def test_scalars_keep_their_shape():
    # e.g. CLIP's logit_scale is a 0-d tensor; it must not come back as shape (1,).
    params = rules.torch_to_flax({"logit_scale": np.array(4.6, np.float32)})
    assert params["logit_scale"].shape == ()
    assert rules.flax_to_torch(params)["logit_scale"].shape == ()


def test_unconvertible_weight_names_key_and_source():
    with pytest.raises(CheckpointError, match=r"model\.bin: 'blocks\.0\.odd\.weight' has a 3-d weight"):
        rules.torch_to_flax({"blocks.0.odd.weight": np.zeros((2, 3, 4))}, source="model.bin")


def test_apply_renames_in_order():
    sd = {"attentions.0.query.weight": 1, "attentions.0.proj_attn.bias": 2, "query.weight": 3}
    out = rules.apply_renames(sd, [(r"(attentions\.\d+)\.query\.", r"\1.to_q."),
                                   (r"(attentions\.\d+)\.proj_attn\.", r"\1.to_out.0.")])
    assert out == {"attentions.0.to_q.weight": 1, "attentions.0.to_out.0.bias": 2, "query.weight": 3}


def test_check_against_messages_and_cast():
    reference = {"a": {"kernel": jnp.zeros((2, 3), jnp.bfloat16), "bias": jnp.zeros((3,))},
                 "b": {"scale": jnp.zeros((4,))}}
    good = {"a": {"kernel": np.ones((2, 3), np.float32), "bias": np.ones(3, np.float32)},
            "b": {"scale": np.ones(4, np.float32)}}
    out = rules.check_against(good, reference, source="x.safetensors")
    assert out["a"]["kernel"].dtype == jnp.bfloat16 and out["a"]["bias"].dtype == np.float32

    bad = {"a": {"kernel": np.ones((3, 2), np.float32)}, "c": {"bias": np.ones(1)}}
    with pytest.raises(CheckpointError) as err:
        rules.check_against(bad, reference, source="x.safetensors")
    # One line per kind, each naming the file.
    assert str(err.value).splitlines() == ["x.safetensors: missing: a/bias, b/scale",
                                           "x.safetensors: unexpected: c/bias",
                                           "x.safetensors: shape mismatch: a/kernel: file (3, 2) vs model (2, 3)"]

    many = {f"k{i:02d}": {"w": jnp.zeros(1)} for i in range(12)}
    with pytest.raises(CheckpointError, match=r"missing: k00/w, .*k07/w, \.\.\. \(12 in all\)"):
        rules.check_against({}, many, source="f")


# --- safetensors ------------------------------------------------------------------------------------------

def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"f32": rng.standard_normal((3, 4)).astype(np.float32),
            "bf16": rng.standard_normal((5,)).astype(ml_dtypes.bfloat16),
            "f16": rng.standard_normal((2, 2, 2)).astype(np.float16),
            "i64": np.arange(6, dtype=np.int64).reshape(2, 3), "flag": np.array([True, False]),
            "scalar": np.array(2.5, np.float32)}


def test_safetensors_round_trip_and_interop(tmp_path):
    from safetensors.torch import load_file, save_file
    tensors = _tensors()
    path = tmp_path / "a.safetensors"
    write_safetensors(path, tensors, metadata={"format": "pt"})
    back = read_safetensors(path)
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v)
    # The reference implementation reads our file, bf16 included...
    theirs = load_file(path)
    assert theirs["bf16"].dtype == torch.bfloat16
    np.testing.assert_array_equal(theirs["bf16"].float().numpy(), tensors["bf16"].astype(np.float32))
    # ... and we read its file.
    save_file({k: v.contiguous() for k, v in theirs.items()}, tmp_path / "b.safetensors")
    again = read_safetensors(tmp_path / "b.safetensors")
    for k, v in tensors.items():
        np.testing.assert_array_equal(again[k], v)


def test_truncated_safetensors_names_file_and_key(tmp_path):
    path = tmp_path / "w.safetensors"
    write_safetensors(path, {"first": np.zeros(4, np.float32), "second.weight": np.ones(8, np.float32)})
    path.write_bytes(path.read_bytes()[:-5])  # keys are laid out sorted, so 'second.weight' is cut
    with pytest.raises(CheckpointError, match=rf"{path}: tensor 'second.weight' runs past the end"):
        read_safetensors(path)
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="tiny.safetensors: not a safetensors file"):
        read_state_dict(tmp_path / "tiny.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(struct.pack("<Q", 4) + b"\xff{{{" + b"\0" * 8)
    with pytest.raises(CheckpointError, match="junk.safetensors: corrupt safetensors header"):
        read_state_dict(tmp_path / "junk.safetensors")
    (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(CheckpointError, match=r"huge.safetensors: not a safetensors file \(header length \d+ for a 10-byte file"):
        read_state_dict(tmp_path / "huge.safetensors")


def test_bad_offsets_name_file_and_key(tmp_path):
    head = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}).encode()
    (tmp_path / "odd.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"odd.safetensors: tensor 'w' has offsets \[0, 12\] that do not fit"):
        read_state_dict(tmp_path / "odd.safetensors")
    head = json.dumps({"w": {"dtype": "F32", "shape": [2]}}).encode()
    (tmp_path / "noff.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + b"\0" * 8)
    with pytest.raises(CheckpointError, match="noff.safetensors: tensor 'w' has a corrupt header entry"):
        read_state_dict(tmp_path / "noff.safetensors")


def test_tensors_read_one_at_a_time(tmp_path):
    # Names and shapes come from the header; each read is a fresh array in natural key order.
    tensors = {f"blocks.{i}.w": np.full((2, i + 1), i, np.float32) for i in (10, 2, 1)}
    write_safetensors(tmp_path / "m.safetensors", tensors)
    with open_tensors(tmp_path / "m.safetensors") as t:
        assert t.keys() == ["blocks.1.w", "blocks.2.w", "blocks.10.w"]
        assert t.shape("blocks.10.w") == (2, 11)
        a = t["blocks.2.w"]
        a += 1  # a private copy: the file is unchanged
        np.testing.assert_array_equal(t["blocks.2.w"], tensors["blocks.2.w"])


# --- torch pickles ----------------------------------------------------------------------------------------

def test_torch_bin_load(tmp_path):
    sd = {"w": torch.randn(3, 2), "h": torch.randn(4).to(torch.bfloat16), "n": torch.tensor(3)}
    torch.save({"state_dict": {**sd, "note": "not a tensor"}, "epoch": 3}, tmp_path / "m.ckpt")
    back = read_state_dict(tmp_path / "m.ckpt")
    assert back.keys() == sd.keys()  # wrapper unwrapped, non-tensors dropped
    assert back["h"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(back["h"].astype(np.float32), sd["h"].float().numpy())
    np.testing.assert_array_equal(back["w"], sd["w"].numpy())


class _Hostile:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_torch_bad_pickles_name_the_file(tmp_path):
    torch.save({"x": _Hostile()}, tmp_path / "evil.bin")
    with pytest.raises(CheckpointError, match="evil.bin: cannot be read as a torch checkpoint"):
        read_torch(tmp_path / "evil.bin")  # weights_only refuses to call print
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="list.pt: expected a state dict, found list"):
        read_torch(tmp_path / "list.pt")
    (tmp_path / "garbage.bin").write_bytes(b"\x00not a pickle")
    with pytest.raises(CheckpointError, match="garbage.bin"):
        read_state_dict(tmp_path / "garbage.bin")


# --- folders, shards, config ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_sharded_index(tmp_path, fmt):
    parts = [{"a.weight": np.ones((2, 2), np.float32)}, {"b.weight": np.zeros(3, np.float32),
                                                          "b.bias": np.arange(3, dtype=np.float32)}]
    weight_map = {}
    for i, part in enumerate(parts):
        name = f"diffusion_pytorch_model-0000{i + 1}-of-00002.{fmt}"
        if fmt == "safetensors":
            write_safetensors(tmp_path / name, part)
        else:
            torch.save({k: torch.from_numpy(v) for k, v in part.items()}, tmp_path / name)
        weight_map.update({k: name for k in part})
    index = tmp_path / f"diffusion_pytorch_model.{fmt}.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for source in (index, tmp_path):  # the index file itself, or the folder holding it
        back = read_state_dict(source)
        assert back.keys() == weight_map.keys()
        np.testing.assert_array_equal(back["b.bias"], parts[1]["b.bias"])


def test_folder_prefers_safetensors_and_reports_missing(tmp_path):
    write_safetensors(tmp_path / "diffusion_pytorch_model.safetensors", {"x": np.ones(1, np.float32)})
    torch.save({"x": torch.zeros(1)}, tmp_path / "diffusion_pytorch_model.bin")
    assert read_state_dict(tmp_path)["x"][0] == 1.0
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"empty: no weight file found \(looked for diffusion_pytorch"):
        read_state_dict(empty)
    with pytest.raises(CheckpointError, match="nope.safetensors: no such file"):
        read_state_dict(tmp_path / "nope.safetensors")


def test_reference_training_checkpoint_reads_ema(tmp_path):
    """DiT-reference training files hold model, ema, opt and an argparse.Namespace: read the EMA weights."""
    import argparse

    import torch

    from diffax.convert.io import read_torch

    path = tmp_path / "0050000.pt"
    torch.save({"model": {"w": torch.ones(2)}, "ema": {"w": torch.full((2,), 3.0)}, "opt": {},
                "args": argparse.Namespace(model="DiT-XL/2")}, path)
    np.testing.assert_array_equal(read_torch(path)["w"], [3.0, 3.0])


# --- diffax.convert.load / save -----------------------------------------------------------------------------

TINY_UNET = UNet2DConfig(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                         down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                         up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, num_class_embeds=3)
TINY_DIT = DiTConfig(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_attention_heads=2,
                     attention_head_dim=16, num_layers=2, num_embeds_ada_norm=10)
REFERENCE_DIT = DiTConfig.from_reference(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2,
                                         num_heads=2, num_classes=10)


def random_params(config, seed: int = 0) -> dict:
    """Random values in the model's parameter shapes (no init, nothing compiled)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(s.dtype), abstract_params(config))


def assert_same(a, b) -> None:
    fa, fb = rules.flatten(a), rules.flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg="/".join(k))


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unet")
    params = random_params(TINY_UNET)
    convert.save(folder, UNet2DModel(TINY_UNET), params)
    return folder, params


@pytest.mark.parametrize("config, torch_class", [(TINY_UNET, "UNet2DModel"), (TINY_DIT, "DiTTransformer2DModel")])
def test_load_save_dispatch_on_class_name(tmp_path, config, torch_class):
    import diffusers
    params = random_params(config)
    weights = convert.save(tmp_path, make_module(config), params)
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["_class_name"] == torch_class
    # The file holds exactly the state dict of the diffusers class built from the written config.
    torch_model = getattr(diffusers, torch_class).from_config(stored)
    want = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
    with open_tensors(weights) as tensors:
        assert {k: tensors.shape(k) for k in tensors.keys()} == want
    module, back = convert.load(tmp_path)  # dispatched on config.json's _class_name
    assert type(module) is type(make_module(config)) and module.config == config
    assert_same(back, params)
    module, half = convert.load(tmp_path, param_dtype="bfloat16", dtype="bfloat16")
    assert module.config.dtype == jnp.bfloat16
    assert {a.dtype for a in jax.tree.leaves(half)} == {np.dtype(jnp.bfloat16)}


def test_pipeline_folder_subfolder_and_variant(tmp_path, unet_folder):
    folder, params = unet_folder
    pipe = tmp_path / "pipe"
    (pipe / "scheduler").mkdir(parents=True)
    convert.save(pipe / "unet", UNet2DModel(TINY_UNET), params)
    index = {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
             "scheduler": ["diffusers", "DDPMScheduler"]}
    (pipe / "model_index.json").write_text(json.dumps(index))
    assert_same(convert.load(pipe, subfolder="unet")[1], params)
    assert_same(convert.load(pipe)[1], params)  # the pipeline's one model is found
    with pytest.raises(CheckpointError, match=r"pipe/vae: no such folder \(subfolder='vae'\)"):
        convert.load(pipe, subfolder="vae")
    (pipe / "model_index.json").write_text(json.dumps({**index, "unet_2": ["diffusers", "UNet2DModel"]}))
    with pytest.raises(CheckpointError, match=r"model_index.json: a pipeline folder with several models .*"
                                              r"pass subfolder= \(its components: unet, scheduler, unet_2\)"):
        convert.load(pipe)

    # A variant: diffusion_pytorch_model.fp16.safetensors, read (and cast to the params' fp32) on request.
    variant = tmp_path / "variant"
    variant.mkdir()
    (variant / "config.json").write_text((folder / "config.json").read_text())
    half = {k: v.astype(np.float16) for k, v in read_state_dict(folder).items()}
    write_safetensors(variant / "diffusion_pytorch_model.fp16.safetensors", half)
    _, loaded = convert.load(variant, variant="fp16")
    assert_same(loaded, jax.tree.map(lambda a: a.astype(np.float16).astype(np.float32), params))
    with pytest.raises(CheckpointError, match="no weight file found"):
        convert.load(variant)


def test_command_line_subfolder_and_dtype(tmp_path, unet_folder, capsys):
    folder, params = unet_folder
    pipe = tmp_path / "pipe"
    convert.save(pipe / "unet", UNet2DModel(TINY_UNET), params)
    assert convert_main([str(pipe), str(tmp_path / "half"), "--subfolder", "unet", "--dtype", "bfloat16"]) == 0
    assert "(diffusers) ->" in capsys.readouterr().out
    half = read_state_dict(tmp_path / "half")
    assert {v.dtype for v in half.values()} == {np.dtype(jnp.bfloat16)}
    np.testing.assert_array_equal(half["conv_in.bias"], params["conv_in"]["bias"].astype(jnp.bfloat16))
    assert convert_main([str(folder), str(tmp_path / "folder"), "--to", "reference"]) == 1
    assert capsys.readouterr().err == (f"error: {tmp_path / 'folder'}: --to reference writes one file, ending in "
                                       f".pt or .safetensors\n")
    assert convert_main([str(folder), str(tmp_path / "u.pt"), "--to", "reference"]) == 1
    assert "error: save: UNet2DModel has no reference layout" in capsys.readouterr().err


def test_unknown_class_name_names_the_file(tmp_path, unet_folder):
    folder, _ = unet_folder
    other = tmp_path / "vae"
    other.mkdir()
    (other / "diffusion_pytorch_model.safetensors").write_bytes(
        (folder / "diffusion_pytorch_model.safetensors").read_bytes())
    (other / "config.json").write_text(json.dumps({"_class_name": "NoSuchModel", "in_channels": 3}))
    with pytest.raises(CheckpointError, match=rf"{other / 'config.json'}: _class_name 'NoSuchModel' is not a model "
                                              r"diffax converts \(it converts .*DiTTransformer2DModel.*UNet2DModel"):
        convert.load(other)
    (other / "config.json").write_text(json.dumps({"in_channels": 3}))
    with pytest.raises(CheckpointError, match=rf"{other / 'config.json'}: no _class_name"):
        convert.load(other)
    with pytest.raises(ValueError, match="num_heads only apply to reference-layout files"):
        convert.load(folder, num_heads=2)


def test_save_checks_params_and_layout(tmp_path, unet_folder):
    _, params = unet_folder
    with pytest.raises(ValueError, match="UNet2DModel has no reference layout"):
        convert.save(tmp_path / "u.pt", UNet2DModel(TINY_UNET), params, layout="reference")
    bad = {**params, "conv_in": {"kernel": np.zeros((3, 3, 1, 4), np.float32), "bias": params["conv_in"]["bias"]}}
    with pytest.raises(CheckpointError, match=r"params passed to save for UNet2DModel: shape mismatch: "
                                              r"conv_in/kernel: file \(3, 3, 1, 4\) vs model \(3, 3, 1, 8\)"):
        convert.save(tmp_path / "bad", UNet2DModel(TINY_UNET), bad)
    assert not (tmp_path / "bad").exists()  # nothing written


def test_mismatch_report_and_allow_partial(tmp_path, unet_folder, capsys):
    folder, params = unet_folder
    sd = read_state_dict(folder)
    del sd["conv_out.bias"]
    sd["extra.weight"] = np.ones((2, 2), np.float32)
    sd["class_embedding.weight"] = np.ones((5, 32), np.float32)  # 5 classes, the model has 3
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((folder / "config.json").read_text())
    weights = broken / "diffusion_pytorch_model.safetensors"
    write_safetensors(weights, sd)

    assert convert_main([str(broken), str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: {weights}: missing: conv_out/bias",
        f"error: {weights}: unexpected: extra/kernel",
        f"error: {weights}: shape mismatch: class_embedding/embedding: file (5, 32) vs model (3, 32)"]
    assert not (tmp_path / "out").exists()

    # --allow_partial: unexpected tensors dropped, missing and mis-shaped parameters freshly initialised.
    assert convert_main([str(broken), str(tmp_path / "out"), "--allow_partial"]) == 0
    err = capsys.readouterr().err
    assert f"warning: {weights}: missing: conv_out/bias (--allow_partial" in err
    _, out = convert.load(tmp_path / "out")  # a complete checkpoint now
    assert out["conv_out"]["bias"].shape == (1,) and out["class_embedding"]["embedding"].shape == (3, 32)
    assert not np.array_equal(out["class_embedding"]["embedding"], np.ones((3, 32)))
    np.testing.assert_array_equal(out["conv_in"]["kernel"], params["conv_in"]["kernel"])
    with pytest.warns(UserWarning) as caught:
        _, partial = convert.load(broken, allow_partial=True)
    assert [str(w.message).split(": ")[1] for w in caught] == ["missing", "unexpected", "shape mismatch"]
    assert_same(partial, out)  # the same fresh initialisation (key 0) as the command line's


def test_command_line_reference_to_diffusers(tmp_path):
    """`python -m diffax.convert` turns a DiT reference .pt into a folder diffusers loads, with the same
    weights: diffusers' forward equals diffax's with diffusers' timestep frequencies."""
    import dataclasses

    import diffusers
    params = random_params(REFERENCE_DIT, seed=3)
    ref = convert.save(tmp_path / "dit.pt", DiT(REFERENCE_DIT), params, layout="reference")
    assert read_torch(ref)["blocks.0.attn.qkv.weight"].shape == (96, 32)
    result = subprocess.run([sys.executable, "-m", "diffax.convert", str(ref), str(tmp_path / "out"),
                             "--num_heads", "2"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert "warning: DiTConfig.to_diffusers: freq_shift=0.0" in result.stderr  # said, not hidden
    assert "(reference) ->" in result.stdout and "DiTTransformer2DModel" in result.stdout

    model = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "out").eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t, y = np.array([999, 3]), np.array([1, 10])
    with torch.no_grad():
        want = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                     torch.from_numpy(y)).sample.numpy().transpose(0, 2, 3, 1)
    module, loaded = convert.load(tmp_path / "out")
    assert module.config == REFERENCE_DIT  # freq_shift 0 travels under "_diffax"
    assert_same(loaded, params)
    as_diffusers = DiT(dataclasses.replace(REFERENCE_DIT, freq_shift=1.0))
    got = np.asarray(jax.jit(as_diffusers.apply)({"params": loaded}, x, t, class_labels=y))
    _close(got, want, tol=1e-4)


def test_hub_id(tmp_path, unet_folder, monkeypatch):
    folder, params = unet_folder
    import huggingface_hub
    calls = []

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    module, loaded = convert.load("someone/tiny-unet")
    assert module.config == TINY_UNET
    assert_same(loaded, params)
    # The JSON files first (config, pipeline index), then only the weights of the model.
    assert calls == [("someone/tiny-unet", ["*.json"]), ("someone/tiny-unet", ["*.safetensors"])]

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    with pytest.raises(CheckpointError, match=r"someone/tiny-unet: no such file or folder here; .*"
                                              r"pip install 'diffax\[hub\]'"):
        convert.load("someone/tiny-unet")
    with pytest.raises(CheckpointError, match="no/such/path: no such file or folder$"):
        convert.load("no/such/path")  # not a hub id
