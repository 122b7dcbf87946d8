"""Reading and writing PyTorch-side weight files: safetensors (no torch needed), .bin / .pt / .ckpt (torch).

Reading is tensor by tensor: `open_tensors(path)` gives the names and shapes of every tensor of a file, a
sharded checkpoint (*.index.json) or a model folder, and reads one tensor per `tensors[key]`, so a converter
that turns each tensor into its diffax form before reading the next holds one copy of the weights, not two.

safetensors files are read through `safetensors.safe_open` (memory-mapped; bf16 comes back as
`ml_dtypes.bfloat16` in safetensors >= 0.8). Its header is checked here first, so a truncated or corrupt
file is reported with its path and the offending tensor instead of a library error.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Any, Iterator, Mapping

import ml_dtypes
import numpy as np

StateDict = dict[str, np.ndarray]

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
# A real header is a few hundred bytes per tensor; a larger length field means a corrupt file.
_MAX_HEADER = 100 * 2**20
# safe_open maps the whole file and every page a read touches stays in the process's resident set until
# the map is closed, so a file read in full through one map counts twice (the map plus the converted copy).
# Re-opening the map after this many bytes keeps the resident set near one copy of the weights.
_REMAP_BYTES = 64 * 2**20
# XLA:CPU's buffer alignment: `jax.device_put` on a CPU aliases a host array aligned to it instead of copying.
HOST_ALIGNMENT = 64

# File names diffusers / transformers write, in the order we look for them inside a model folder.
WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors", "model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json",
    "diffusion_pytorch_model.bin", "pytorch_model.bin",
    "diffusion_pytorch_model.bin.index.json", "pytorch_model.bin.index.json",
)


class CheckpointError(ValueError):
    """A weight file is missing, corrupt, or does not match the model it is loaded into."""


def with_variant(name: str, variant: str | None) -> str:
    """diffusers' variant file name: ('diffusion_pytorch_model.safetensors', 'fp16') ->
    'diffusion_pytorch_model.fp16.safetensors' (an index: '...safetensors.index.fp16.json')."""
    if not variant:
        return name
    parts = name.split(".")
    return ".".join([*parts[:-1], variant, parts[-1]])


def weight_file(folder: str | os.PathLike, variant: str | None = None) -> Path:
    """The weight file (or shard index) of a model folder: the first of WEIGHT_NAMES (with `variant`)."""
    folder = Path(folder)
    names = [with_variant(n, variant) for n in WEIGHT_NAMES]
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder}: no weight file found (looked for {', '.join(names)})")


# ----------------------------------------------------------------------------- reading


class _SafetensorsFile:
    """One .safetensors file: header checked on open, tensors read one at a time through safe_open."""

    def __init__(self, path: Path):
        self.path = path
        self.entries = _read_header(path)  # key -> (dtype, shape)
        self._handle: Any = None
        self._since_open = 0

    def __getitem__(self, key: str) -> np.ndarray:
        if self._handle is None:
            from safetensors import safe_open
            try:
                self._handle = safe_open(str(self.path), framework="numpy")
            except Exception as e:  # SafetensorError for layouts our header check lets through
                raise CheckpointError(f"{self.path}: cannot be read as safetensors ({e})") from None
        # A fresh host copy of this tensor alone; safetensors >= 0.8 gives BF16 as ml_dtypes.bfloat16 with
        # framework="numpy", so no np.memmap fallback is needed.
        value = self._handle.get_tensor(key)
        self._since_open += value.nbytes
        if self._since_open >= _REMAP_BYTES:
            self.close()
        return value

    def close(self) -> None:
        self._handle, self._since_open = None, 0  # dropping the handle unmaps the file


def _read_header(path: Path) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {len(head)} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            raise CheckpointError(f"{path}: not a safetensors file (header length {n} for a {size}-byte file)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    buffer = size - 8 - n
    metadata = header.get("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ is not an object of strings)")
    entries, spans = {}, []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype_name, shape, offsets = _header_entry(info)
        if dtype_name is None:
            raise CheckpointError(f"{path}: tensor {key!r} has a corrupt header entry {_short(info)} (expected "
                                  f"{{'dtype': str, 'shape': [int >= 0, ...], 'data_offsets': [start, end]}})")
        if dtype_name not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {dtype_name!r} "
                                  f"(diffax reads {', '.join(_ST_DTYPES)})")
        dtype = np.dtype(_ST_DTYPES[dtype_name])
        start, end = offsets
        if end > buffer:
            raise CheckpointError(f"{path}: tensor {key!r} runs past the end of the file (truncated?)")
        if not 0 <= start <= end or end - start != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {key!r} has offsets [{start}, {end}] that do not fit its "
                                  f"shape {list(shape)} of {dtype_name}")
        entries[key] = (dtype, shape)
        spans.append((start, end, key))
    # The format lays tensors end to end over the whole buffer; safe_open refuses anything else, so say
    # which tensor breaks the layout rather than let it fail on the first read.
    at, previous = 0, None
    for start, end, key in sorted(spans):
        if start != at:
            where = f"overlaps {previous!r}" if start < at else f"leaves a gap after {previous!r}"
            raise CheckpointError(f"{path}: tensor {key!r} at bytes [{start}, {end}] {where} (corrupt offsets)")
        at, previous = end, key
    if at != buffer:
        raise CheckpointError(f"{path}: corrupt safetensors file ({buffer - at} bytes after the last tensor)")
    return entries


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _header_entry(info: Any) -> tuple[Any, tuple[int, ...], tuple[int, int]]:
    """(dtype name, shape, (start, end)) of one header entry; dtype name None if the entry is malformed."""
    def is_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    malformed = None, (), (0, 0)
    if not isinstance(info, dict):
        return malformed
    dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not (isinstance(dtype_name, str) and isinstance(shape, list) and isinstance(offsets, list)
            and len(offsets) == 2 and all(map(is_int, offsets)) and all(is_int(d) and d >= 0 for d in shape)):
        return malformed
    return dtype_name, tuple(shape), (offsets[0], offsets[1])


def _torch_state_dict(path: Path) -> tuple[dict[str, Any], bool]:
    """(the tensors of a torch pickle, whether they are memory-mapped: files in torch's zip format are,
    legacy ones are read whole). Loads with
    `weights_only=True`, so a hostile pickle cannot run code; unwraps the usual {'ema': ...} /
    {'state_dict': ...} / {'model': ...} nesting, preferring the EMA weights."""
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: reading torch pickles needs PyTorch (`pip install torch==2.13.0`, "
                              f"extra `diffax[torch]`); safetensors files need no torch") from None

    def read(mmap: bool) -> Any:
        # Training checkpoints (the DiT reference's) carry their argparse.Namespace: a plain attribute bag,
        # safe to allow; everything else stays under weights_only's allow-list.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    mapped = True
    try:
        try:
            obj = read(mmap=True)
        except RuntimeError as e:  # files in torch's legacy (pre-zip) format cannot be mapped
            if "mmap" not in str(e):
                raise
            obj, mapped = read(mmap=False), False
    except Exception as e:  # torch raises many types for bad pickles; name the file either way.
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint ({type(e).__name__}: {e})") from None
    for wrapper in ("ema", "state_dict", "model", "module"):  # EMA weights are what sampling wants
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, mapped


def _torch_to_numpy(value: Any, path: Path, key: str) -> np.ndarray:
    """A host numpy copy of a torch tensor (bf16 as ml_dtypes.bfloat16). A copy, because the tensor may
    be a view of a memory-mapped file that a later save could replace."""
    import torch
    value = value.detach().cpu()
    if value.dtype == torch.bfloat16:
        return value.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    try:
        return value.numpy().copy()
    except TypeError:  # float8 and the quantized dtypes have no numpy equivalent here
        raise CheckpointError(f"{path}: tensor {key!r} has dtype {value.dtype}, which diffax does not read") from None


class _TorchFile:
    """One torch pickle. A memory-mapped one is re-loaded after every _REMAP_BYTES read, for the reason
    safetensors files are (see _REMAP_BYTES): its tensors share one map of the file."""

    def __init__(self, path: Path):
        self.path = path
        self._tensors, self._mapped = _torch_state_dict(path)
        self.entries = {k: (None, tuple(v.shape)) for k, v in self._tensors.items()}
        self._since_open = 0

    def __getitem__(self, key: str) -> np.ndarray:
        if self._tensors is None:
            self._tensors, _ = _torch_state_dict(self.path)
        value = _torch_to_numpy(self._tensors[key], self.path, key)
        self._since_open += value.nbytes
        if self._mapped and self._since_open >= _REMAP_BYTES:
            self.close()
        return value

    def close(self) -> None:
        self._tensors, self._since_open = None, 0


def _natural(key: str) -> tuple:
    """Sort key that puts 'blocks.2.' before 'blocks.10.'."""
    return tuple(int(p) if p.isdecimal() else p for p in re.split(r"(\d+)", key))


class Tensors:
    """The tensors of one checkpoint (a file, or the shards of an index): names, shapes, and one tensor
    read per `tensors[key]` as a fresh host numpy array. Use as a context manager, or call `close()`."""

    def __init__(self, source: Path, files: Mapping[str, Any]):
        self.source = source  # the path errors name: the weight file or the shard index
        self._files = files   # key -> the file object holding it

    def keys(self) -> list[str]:
        """Every tensor name, in natural order (block 2 before block 10)."""
        return sorted(self._files, key=_natural)

    def __contains__(self, key: str) -> bool:
        return key in self._files

    def __len__(self) -> int:
        return len(self._files)

    def shape(self, key: str) -> tuple[int, ...]:
        """The tensor's shape, from the file's header: nothing is read."""
        return self._files[key].entries[key][1]

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._files:
            raise CheckpointError(f"{self.source}: no tensor {key!r}")
        return self._files[key][key]

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        """(key, tensor) in natural key order, each read when it is reached."""
        for key in self.keys():
            yield key, self[key]

    def close(self) -> None:
        """Releases the files' memory maps."""
        for f in set(self._files.values()):
            f.close()

    def __enter__(self) -> "Tensors":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _open_file(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    return _SafetensorsFile(path) if path.suffix == ".safetensors" else _TorchFile(path)


def open_tensors(path: str | os.PathLike, variant: str | None = None) -> Tensors:
    """The tensors of a weight file (.safetensors / .bin / .pt / .ckpt), a shard index (*.index.json), or a
    model folder (its first WEIGHT_NAMES file, with `variant` e.g. 'fp16'); nothing is read yet."""
    path = Path(path)
    if path.is_dir():
        path = weight_file(path, variant)
    if not path.name.endswith(".json"):
        f = _open_file(path)
        return Tensors(path, {k: f for k in f.entries})
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a shard index ({e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not (isinstance(weight_map, dict) and all(isinstance(v, str) and v for v in weight_map.values())):
        raise CheckpointError(f"{path}: not a shard index (expected {{'weight_map': {{tensor name: shard file}}}})")
    shards = {name: _open_file(path.parent / name) for name in sorted(set(weight_map.values()))}
    files = {}
    for key, name in weight_map.items():
        if key not in shards[name].entries:
            raise CheckpointError(f"{path}: lists {key!r} in {name}, which does not hold it")
        files[key] = shards[name]
    return Tensors(path, files)


def host_array(value: np.ndarray, dtype: Any) -> np.ndarray:
    """`value` cast to `dtype` in a fresh C-ordered array whose data start on a HOST_ALIGNMENT boundary.

    XLA's CPU client takes such a buffer as the device array's memory (`jax.device_put` aliases it), while
    numpy's own allocations (16-byte aligned) are copied, which holds a second copy of every weight until
    the host tree is dropped, and its freed pages often stay in the allocator after that. Overflow in the
    cast is left to the caller to check (values become inf)."""
    dtype = np.dtype(dtype)
    size = math.prod(value.shape) * dtype.itemsize
    raw = np.empty(size + HOST_ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % HOST_ALIGNMENT
    out = raw[start:start + size].view(dtype).reshape(value.shape)
    with np.errstate(over="ignore", invalid="ignore"):
        np.copyto(out, value, casting="unsafe")
    return out


def read_state_dict(path: str | os.PathLike, variant: str | None = None) -> StateDict:
    """Every tensor of a file, shard index or model folder (see `open_tensors`) as numpy arrays."""
    with open_tensors(path, variant) as tensors:
        return dict(tensors.items())


def read_safetensors(path: str | os.PathLike) -> StateDict:
    """All tensors of one .safetensors file as numpy arrays (bf16 as ml_dtypes.bfloat16)."""
    f = _SafetensorsFile(Path(path))
    try:
        return {k: f[k] for k in sorted(f.entries, key=_natural)}
    finally:
        f.close()


def read_torch(path: str | os.PathLike) -> StateDict:
    """A torch pickle (.bin/.pt/.ckpt) as numpy arrays; see `_torch_state_dict` for what is accepted."""
    return {k: _torch_to_numpy(v, Path(path), k) for k, v in _torch_state_dict(Path(path))[0].items()}


# ----------------------------------------------------------------------------- writing


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors (numpy or jax arrays, views allowed) as one .safetensors file, atomically (temp file +
    rename). Tensors are laid out by sorted key and made contiguous one at a time, so writing needs no
    second copy of the weights."""
    path = Path(path)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    keys = sorted(tensors)
    offset = 0
    for key in keys:
        arr = tensors[key]
        dtype = np.dtype(arr.dtype) if hasattr(arr, "dtype") else np.asarray(arr).dtype
        if dtype not in _ST_NAMES:
            raise CheckpointError(f"{path}: cannot store {key!r} of dtype {dtype} in safetensors")
        nbytes = math.prod(np.shape(arr)) * dtype.itemsize
        header[key] = {"dtype": _ST_NAMES[dtype], "shape": list(np.shape(arr)),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format aligns the buffer to 8 bytes
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for key in keys:
            f.write(np.asarray(tensors[key]).tobytes(order="C"))  # one tensor's copy at a time
    os.replace(tmp, path)


def write_torch(path: str | os.PathLike, tensors: Mapping[str, Any]) -> None:
    """Write tensors as a torch .pt state dict (`torch.load` + `load_state_dict` read it)."""
    import torch

    def to_torch(a: Any) -> Any:
        a = np.asarray(a, order="C")
        if a.dtype == ml_dtypes.bfloat16:  # numpy has no bf16; reinterpret the bits
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)

    torch.save({k: to_torch(v) for k, v in tensors.items()}, path)
