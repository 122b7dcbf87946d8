"""Quantized checkpoints on disk: integers + scales, in safetensors or Orbax, read back bit-exact.

safetensors (one file, `save_safetensors` / `load_safetensors`):
    tensors   one per parameter, named by its '/'-joined path in the diffax tree:
                `down_blocks_0/resnets_0/conv1/kernel`        I8 [Kp, out]  (bits=8)
                                                               U8 [Kp/2, out] (bits=4, two per byte)
                `down_blocks_0/resnets_0/conv1/kernel_scale`  F32 [G, out]
                `down_blocks_0/resnets_0/conv1/bias`          the float parameter as it was
                `text_model/embeddings/token_embedding/embedding`        I8 [N, Dp] / U8 [N, Dp/2]
                `text_model/embeddings/token_embedding/embedding_scale`  F32 [N, G]
              (the integer layout is diffax's [rows, out], not torch's, so the names stay diffax's)
    metadata  "format": "diffax-quant"; "diffax_quant": JSON {"version": 1, "bits", "group_size",
              "shapes": {path: float kernel or table shape}}; "config": JSON {"class_name", "config": the diffusers
              config.json dict} when the model config was given.

Orbax (a folder, `save_orbax` / `load_orbax`): items `params` (the same tree, StandardCheckpointHandler)
and `quant` (the same JSON, with the config under "config").
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from diffax.quant.quantize import (SCALES, QuantizationError, QuantizedParams, dequantize_leaf, flatten, scale_path,
                                   unflatten)

FORMAT = "diffax-quant"
VERSION = 1


def _meta(qp: QuantizedParams, config: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"version": VERSION, "bits": qp.bits, "group_size": qp.group_size,
                            "shapes": {name: list(shape) for name, shape in qp.shapes}}
    if config is not None:
        from diffax.models.registry import family_of
        with warnings.catch_warnings():  # what diffusers would compute differently: diffax reads this back
            warnings.simplefilter("ignore")
            meta["config"] = {"class_name": family_of(config).class_name, "config": config.to_diffusers()}
    return meta


def _from_meta(meta: Any, flat: dict[tuple[str, ...], Any], where: str) -> tuple[QuantizedParams, Any]:
    """QuantizedParams (and the model config, or None) from the stored JSON and tensors; every quantized
    kernel and table is checked against its recorded shape, so a file that does not hold what it says fails
    here."""
    if not (isinstance(meta, dict) and meta.get("version") == VERSION and meta.get("bits") in (4, 8)
            and isinstance(meta.get("shapes"), dict)):
        raise QuantizationError(f"{where}: not a diffax quantized checkpoint (its quantization record is "
                                f"missing or of another version: {str(meta)[:120]})")
    want = np.int8 if meta["bits"] == 8 else np.uint8
    shapes = []
    for name, shape in meta["shapes"].items():
        path = tuple(name.split("/"))
        kernel, scale = flat.get(path), flat.get(scale_path(path))
        if kernel is None or scale is None:
            raise QuantizationError(f"{where}: {name!r} is listed as quantized but the file lacks it or its "
                                    f"{scale_path(path)[-1]}")
        if np.dtype(kernel.dtype) != want or np.dtype(scale.dtype) != np.float32:
            raise QuantizationError(f"{where}: {name!r} is {kernel.dtype} with a {scale.dtype} scale; "
                                    f"{meta['bits']}-bit weights are {np.dtype(want)} with a float32 scale")
        try:
            dequantize_leaf(path, kernel, scale, shape)  # checks the shapes only; the result is dropped
        except ValueError as e:
            raise QuantizationError(f"{where}: {name!r}: {e}") from None
        shapes.append((name, tuple(int(d) for d in shape)))
    stray = ["/".join(p) for p in flat if p[-1] in SCALES and "/".join(p)[:-len("_scale")] not in meta["shapes"]]
    if stray:
        raise QuantizationError(f"{where}: {stray[0]!r} has no entry in the quantization record")
    qp = QuantizedParams(unflatten(flat), meta["bits"], meta.get("group_size"), tuple(shapes))
    config = None
    if meta.get("config") is not None:
        from diffax.models.registry import get_family
        cfg = meta["config"]
        config = get_family(cfg["class_name"]).config_cls.from_diffusers(cfg["config"])
    return qp, config


def save_safetensors(path: str | os.PathLike, qp: QuantizedParams, *, config: Any = None) -> Path:
    """Writes `qp` (and the model `config`, when given) as one .safetensors file; returns its path."""
    from diffax.convert.io import write_safetensors
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"/".join(p): np.asarray(v) for p, v in flatten(qp.params).items()}
    write_safetensors(path, tensors, metadata={"format": FORMAT, "diffax_quant": json.dumps(_meta(qp, config))})
    return path


def load_safetensors(path: str | os.PathLike) -> tuple[QuantizedParams, Any]:
    """(QuantizedParams with host numpy arrays, the model config or None) from `save_safetensors`'s file.

    Raises QuantizationError (a ValueError) naming the file, and the key where one is at fault.
    """
    from safetensors import safe_open

    from diffax.convert.io import read_safetensors
    path = Path(path)
    tensors = read_safetensors(path)  # checks the file and header first, with errors naming the file
    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise QuantizationError(f"{path}: not a diffax quantized file (metadata format={metadata.get('format')!r}, "
                                f"expected {FORMAT!r}); a float checkpoint loads with diffax.convert.load")
    try:
        meta = json.loads(metadata.get("diffax_quant", ""))
    except json.JSONDecodeError as e:
        raise QuantizationError(f"{path}: corrupt quantization record in the metadata ({e})") from None
    return _from_meta(meta, {tuple(k.split("/")): v for k, v in tensors.items()}, str(path))


def save_orbax(folder: str | os.PathLike, qp: QuantizedParams, *, config: Any = None) -> Path:
    """Writes `qp` (and the model `config`) as an Orbax checkpoint folder (which must not exist yet)."""
    import orbax.checkpoint as ocp
    folder = Path(folder).absolute()
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(folder, args=ocp.args.Composite(params=ocp.args.StandardSave(qp.params),
                                                   quant=ocp.args.JsonSave(_meta(qp, config))))
    return folder


def load_orbax(folder: str | os.PathLike) -> tuple[QuantizedParams, Any]:
    """(QuantizedParams, the model config or None) from `save_orbax`'s folder."""
    import orbax.checkpoint as ocp
    folder = Path(folder).absolute()
    if not (folder / "quant").is_dir() or not (folder / "params").is_dir():
        raise QuantizationError(f"{folder}: not a diffax quantized Orbax checkpoint (needs items 'params' and "
                                f"'quant')")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        restored = ckptr.restore(folder, args=ocp.args.Composite(params=ocp.args.StandardRestore(),
                                                                 quant=ocp.args.JsonRestore()))
    flat = {p: np.asarray(v) for p, v in flatten(restored["params"]).items()}
    return _from_meta(restored["quant"], flat, str(folder))
