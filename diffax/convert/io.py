"""Reading and writing PyTorch-side weight files: safetensors (no torch needed), .bin / .pt / .ckpt (torch).

safetensors is parsed here directly (8-byte header length, JSON header, raw buffer) so that bf16 tensors
load as `ml_dtypes.bfloat16` without torch, and a truncated or corrupt file is reported with its path and
the offending key instead of a deep library traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
from pathlib import Path
from typing import Mapping

import ml_dtypes
import numpy as np

StateDict = dict[str, np.ndarray]

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}

# File names diffusers / transformers write, in the order we look for them inside a model folder.
WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors", "model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json",
    "diffusion_pytorch_model.bin", "pytorch_model.bin",
    "diffusion_pytorch_model.bin.index.json", "pytorch_model.bin.index.json",
)


class CheckpointError(ValueError):
    """A weight file is missing, corrupt, or does not match the model it is loaded into."""


def read_safetensors(path: str | os.PathLike) -> StateDict:
    """All tensors of one .safetensors file as numpy arrays (bf16 as ml_dtypes.bfloat16)."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 8:
        raise CheckpointError(f"{path}: not a safetensors file (only {len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    buf = memoryview(data)[8 + n:]
    out: StateDict = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        if end > len(buf):
            raise CheckpointError(f"{path}: tensor {key!r} runs past the end of the file (truncated?)")
        dtype = np.dtype(_ST_DTYPES[info["dtype"]])
        out[key] = np.frombuffer(buf[start:end], dtype=dtype).reshape(info["shape"]).copy()
    return out


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors as one .safetensors file, atomically (temp file + rename)."""
    path = Path(path)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset, blobs = 0, []
    for key in sorted(tensors):
        arr = np.asarray(tensors[key], order="C")  # ascontiguousarray would make 0-d arrays 1-d
        if arr.dtype not in _ST_NAMES:
            raise CheckpointError(f"{path}: cannot store {key!r} of dtype {arr.dtype} in safetensors")
        blob = arr.tobytes()
        header[key] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape),
                       "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format aligns the buffer to 8 bytes
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for blob in blobs:
            f.write(blob)
    os.replace(tmp, path)


def read_torch(path: str | os.PathLike) -> StateDict:
    """A torch pickle (.bin/.pt/.ckpt) as numpy arrays. Loads with `weights_only=True`, so a hostile
    pickle cannot run code; unwraps the usual {'ema': ...} / {'state_dict': ...} / {'model': ...} nesting, preferring the EMA weights."""
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: reading torch pickles needs PyTorch (`pip install torch==2.13.0`, "
                              f"extra `diffax[torch]`); safetensors files need no torch") from None
    try:
        # Training checkpoints (the DiT reference's) carry their argparse.Namespace: a plain attribute bag,
        # safe to allow; everything else stays under weights_only's allow-list.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for bad pickles; name the file either way.
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint ({type(e).__name__}: {e})") from None
    for wrapper in ("ema", "state_dict", "model", "module"):  # EMA weights are what sampling wants
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    out: StateDict = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            out[key] = value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            out[key] = value.numpy()
    return out


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """Weights from a file (.safetensors / .bin / .pt / .ckpt / sharded *.index.json) or a model folder."""
    path = Path(path)
    if path.is_dir():
        for name in WEIGHT_NAMES:
            if (path / name).exists():
                return read_state_dict(path / name)
        raise CheckpointError(f"{path}: no weight file found (looked for {', '.join(WEIGHT_NAMES)})")
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.name.endswith(".index.json"):
        index = json.loads(path.read_text())
        out: StateDict = {}
        for shard in sorted(set(index["weight_map"].values())):
            out.update(read_state_dict(path.parent / shard))
        return out
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    return read_torch(path)


def read_config(folder: str | os.PathLike, name: str = "config.json") -> dict:
    """A diffusers / transformers `config.json` as a dict, with a clear error when it is missing."""
    path = Path(folder) / name
    if not path.exists():
        raise CheckpointError(f"{path}: missing (a diffusers model folder holds config.json beside its weights)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
