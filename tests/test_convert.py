"""Generic conversion pieces: key/tensor rules (diffax.convert.rules) and weight-file I/O (diffax.convert.io).

Tensor rules are checked by running the torch layer and the flax layer on the same input: a wrong
transpose gives O(1) differences, so fp32 agreement to 1e-5 of the output scale (summation order only)
is a real check.
"""
from __future__ import annotations

import json
import struct

import flax.linen as nn
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from diffax.convert import rules
from diffax.convert.io import (CheckpointError, read_config, read_safetensors, read_state_dict, read_torch,
                               write_safetensors)
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
    msg = str(err.value)
    assert msg.startswith("x.safetensors: checkpoint does not match the model")
    assert "missing: a/bias, b/scale" in msg and "unexpected: c/bias" in msg
    assert "shape mismatch: a/kernel: file (3, 2) vs model (2, 3)" in msg

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


def test_read_config(tmp_path):
    (tmp_path / "config.json").write_text('{"in_channels": 3}')
    assert read_config(tmp_path) == {"in_channels": 3}
    with pytest.raises(CheckpointError, match="config.json: missing"):
        read_config(tmp_path / "elsewhere")
    (tmp_path / "config.json").write_text('{"in_channels": 3,}')
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        read_config(tmp_path)


def test_reference_training_checkpoint_reads_ema(tmp_path):
    """DiT-reference training files hold model, ema, opt and an argparse.Namespace: read the EMA weights."""
    import argparse

    import torch

    from diffax.convert.io import read_torch

    path = tmp_path / "0050000.pt"
    torch.save({"model": {"w": torch.ones(2)}, "ema": {"w": torch.full((2,), 3.0)}, "opt": {},
                "args": argparse.Namespace(model="DiT-XL/2")}, path)
    np.testing.assert_array_equal(read_torch(path)["w"], [3.0, 3.0])
