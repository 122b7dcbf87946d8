"""`load` and `save`: one way in and one way out for every model family with a converter.

    module, params = load("path/to/model")          # diffusers folder, pipeline folder, weight file, hub id
    out = module.apply({"params": params}, x, t, class_labels=y)
    save("exported", module, params)                # a folder diffusers' from_pretrained loads

A diffusers folder is dispatched on its config.json `_class_name` through the converter registry
(`diffax.convert.registry`); a file in a family's reference layout (DiT's .pt) is recognised by its tensor
names. Tensors are converted one at a time into the parameter tree, so loading holds about one copy of the
weights in host memory.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffax.convert import rules
from diffax.convert.io import (CheckpointError, Tensors, host_array, open_tensors, weight_file, write_safetensors,
                               write_torch)
from diffax.convert.registry import Converter, converter_for, converters
from diffax.models.config_base import CONFIG_NAME, config_class_name, read_config_json
from diffax.models.qtensor import EMBEDDING_SCALE, KERNEL_SCALE
from diffax.models.registry import abstract_params, boxed_init, family_of, get_family, make_module

Params = dict[str, Any]
PIPELINE_INDEX = "model_index.json"
# 'org/name' with the characters hub repository ids allow.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclasses.dataclass
class Loaded:
    """What `read_checkpoint` found: the model, its params, and what `allow_partial` let through."""
    module: nn.Module
    params: Params
    mismatch: rules.Mismatch  # empty unless allow_partial was set and the file did not fit
    source: str               # the weight file (or shard index) read
    layout: str               # 'diffusers' or 'reference'


def load(path: str | os.PathLike, *, dtype: Any = None, param_dtype: Any = None, subfolder: str | None = None,
         attention_backend: str | None = None, variant: str | None = None, config: Any = None,
         allow_partial: bool = False, allow_nonfinite: bool = False, device: Any = None,
         **family_options: Any) -> tuple[nn.Module, Params]:
    """(Flax module, params) of a PyTorch checkpoint; the config is at `module.config`.

    Args:
        path: a diffusers model folder (config.json + safetensors or .bin weights, sharded or not); a
            pipeline folder (with `subfolder`, or alone when one component is a model diffax converts, as
            a DiT pipeline's `transformer/`); a weight file, read with the config.json beside it; a file in a
            family's reference layout (DiT's .pt / .safetensors, config read from tensor shapes); or a hub id
            'org/name' when no such path exists (needs `diffax[hub]`).
        dtype, param_dtype, attention_backend: the config's runtime fields (compute dtype, the dtype the
            params are returned in, the attention kernel); None keeps the defaults.
        subfolder: the pipeline component to read ('unet', 'transformer', ...).
        variant: the weight-file variant, e.g. 'fp16' for `diffusion_pytorch_model.fp16.safetensors`.
        config: the family config to load into instead of the one the checkpoint says (e.g. for a bare
            weight file with no config.json).
        allow_partial: instead of failing on a checkpoint that does not fit the model, drop its unexpected
            tensors and initialise missing or mis-shaped parameters freshly (`jax.random.key(0)`); a warning
            lists them.
        allow_nonfinite: accept tensors holding NaN or inf (by default the first such tensor is an error,
            since a model with them samples NaN images; a checkpoint that diverged in training has them).
        device: a `jax.Device` or `jax.sharding.Sharding` to put every parameter on as soon as it is
            converted, so host memory holds one tensor at a time instead of the whole model; the arrays are
            in buffers XLA owns, which a train step can donate (reuse for its outputs).
        family_options: what a reference layout cannot read from its shapes (DiT: `input_size`, `num_heads`).
    Returns:
        (module, params): params a nested dict in the config's `param_dtype`: jax arrays on `device`, or
        without it host numpy arrays ready for `module.apply({'params': params}, ...)` or `jax.device_put`
        with shardings. The host arrays are aligned so that on a CPU `jax.device_put` takes them over
        without a copy: loading then placing holds one copy of the weights either way.
    Raises:
        CheckpointError (a ValueError) naming the file: missing, corrupt, an unknown `_class_name`; one
        line per kind, the missing / unexpected / mis-shaped keys; the tensor that holds integers where the
        model has a float parameter, or (unless `allow_nonfinite`) NaN / inf values.
    """
    loaded = read_checkpoint(path, dtype=dtype, param_dtype=param_dtype, subfolder=subfolder,
                             attention_backend=attention_backend, variant=variant, config=config,
                             allow_partial=allow_partial, allow_nonfinite=allow_nonfinite, device=device,
                             **family_options)
    for line in loaded.mismatch.lines(loaded.source):
        warnings.warn(f"{line} (allow_partial: dropped or freshly initialised)", stacklevel=2)
    return loaded.module, loaded.params


def read_checkpoint(path: str | os.PathLike, *, dtype: Any = None, param_dtype: Any = None,
                    subfolder: str | None = None, attention_backend: str | None = None,
                    variant: str | None = None, config: Any = None, allow_partial: bool = False,
                    allow_nonfinite: bool = False, device: Any = None, **family_options: Any) -> Loaded:
    """`load`, returning also what `allow_partial` let through, the file read and its layout."""
    local = _locate(path, subfolder, variant)
    runtime = {k: v for k, v in dict(dtype=_dtype("dtype", dtype), param_dtype=_dtype("param_dtype", param_dtype),
                                     attention_backend=attention_backend).items() if v is not None}
    with open_tensors(local, variant) as tensors:
        source = str(tensors.source)
        converter = None if local.is_dir() else _reference_converter(tensors)
        if converter is not None:
            reference = converter.reference
            bad = sorted(family_options.keys() - set(reference.options))
            if bad:
                raise ValueError(f"{source}: unknown option(s) {bad} for a {converter.class_name} reference file "
                                 f"(it takes {', '.join(reference.options)})")
            if config is None:
                config = reference.read_config(tensors, source=source, **family_options)
            config = dataclasses.replace(config, **runtime)
            hook, renames, layout = reference.import_hook, (), "reference"
        else:
            if family_options:
                raise ValueError(f"{source}: {', '.join(sorted(family_options))} only apply to reference-layout "
                                 f"files; a diffusers model reads everything from its config.json")
            converter, config = _diffusers_config(local, source, config, runtime)
            hook, renames, layout = converter.import_hook, converter.renames, "diffusers"
        place = None if device is None else functools.partial(_place, device=device)
        params, mismatch = _import(converter, config, tensors, hook, renames, source, allow_partial,
                                   allow_nonfinite, place)
    return Loaded(make_module(config), params, mismatch, source, layout)


def check_not_quantized(params: Params, where: str) -> None:
    """CheckpointError when `params` hold quantized kernels or embedding tables (integers + `kernel_scale` /
    `embedding_scale`, `diffax.quant`).

    PyTorch layouts hold float weights. Writing the dequantised floats would make a file as large as the
    original whose weights are not the original's (rounded to 256 or 16 levels) without saying so, so the
    choice is left to the caller: keep the quantized form, or dequantise knowingly.
    """
    scales = [p for p in rules.flatten(params) if p[-1] in (KERNEL_SCALE, EMBEDDING_SCALE)]
    if scales:
        stored = "/".join(scales[0][:-1] + (scales[0][-1][:-len("_scale")],))
        raise CheckpointError(f"{where}: the params are quantized ({stored!r} and {len(scales) - 1} more weights are "
                              f"integers); save them with diffax.quant.save_safetensors, or export floats with "
                              f"diffax.quant.dequantize(qp) (rounded weights, fp32 size)")


def save(folder: str | os.PathLike, module: nn.Module, params: Params, *, layout: str = "diffusers") -> Path:
    """Writes `module.config` and `params` in a PyTorch layout; returns the weight file's path.

    layout='diffusers': `folder` gets config.json and diffusion_pytorch_model.safetensors, which the
        diffusers class's `from_pretrained(folder)` loads.
    layout='reference': the family's research-code layout (DiT only) as one file: `folder` is the file path,
        a torch state dict if it ends in .pt, else safetensors.
    Tensors keep the dtype of `params` (cast them first for an fp16 / bf16 file). Params that do not fit
    the config, or quantized params (`check_not_quantized`), raise CheckpointError before anything is written.
    """
    config = module.config
    converter = _converter_of(config)
    params = nn.meta.unbox(params)
    if set(params) == {"params"}:  # the {'params': ...} variables dict of module.init
        params = params["params"]
    check_not_quantized(params, f"save({str(folder)!r})")
    mismatch = rules.compare({p: np.shape(v) for p, v in rules.flatten(params).items()}, abstract_params(config))
    if mismatch:
        raise CheckpointError("\n".join(mismatch.lines(f"params passed to save for {converter.class_name}")))
    sd = rules.flax_to_torch(params, literal_names=converter.literal_names)
    if layout == "diffusers":
        if converter.export_hook is not None:
            sd = converter.export_hook(config, sd)
        folder = Path(folder)
        config.save_config(folder)  # first: it refuses configs diffusers cannot express
        write_safetensors(folder / converter.weights_name, sd, metadata={"format": "pt"})
        return folder / converter.weights_name
    if layout != "reference":
        raise ValueError(f"save: layout must be 'diffusers' or 'reference', got {layout!r}")
    if converter.reference is None:
        raise ValueError(f"save: {converter.class_name} has no reference layout (only 'diffusers')")
    path = Path(folder)
    if path.suffix not in (".pt", ".safetensors"):
        raise ValueError(f"{path}: a reference-layout file ends in .pt or .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = converter.reference.export_hook(config, sd)
    if path.suffix == ".pt":
        write_torch(path, sd)
    else:
        write_safetensors(path, sd)
    return path


# ----------------------------------------------------------------------------- where the files are


def _locate(path: str | os.PathLike, subfolder: str | None, variant: str | None) -> Path:
    """A local file or model folder for `path`: itself, or the snapshot of a hub id; a pipeline folder's
    component (`subfolder`, or its one model diffax converts)."""
    local = Path(path)
    if not local.exists():
        local = _download(str(path), subfolder, variant)
    if not local.is_dir():
        if subfolder:
            raise ValueError(f"{local}: subfolder={subfolder!r} needs a pipeline folder, not a file")
        return local
    if subfolder:
        local = local / subfolder
        if not local.is_dir():
            raise CheckpointError(f"{local}: no such folder (subfolder={subfolder!r})")
        return local
    if not (local / CONFIG_NAME).is_file() and (local / PIPELINE_INDEX).is_file():
        return local / _pipeline_component(local)
    return local


def _pipeline_component(folder: Path) -> str:
    """The one component of a pipeline folder that is a model diffax converts (a DiT pipeline's transformer)."""
    index, where = read_config_json(folder / PIPELINE_INDEX)
    found, components = [], []
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2:
            continue
        components.append(name)
        try:
            converter_for(spec[1], where)
            found.append(name)
        except CheckpointError:
            pass
    if len(found) == 1:
        return found[0]
    raise CheckpointError(f"{where}: a pipeline folder with {'several' if found else 'no'} models diffax converts; "
                          f"pass subfolder= (its components: {', '.join(components)})")


def _download(repo_id: str, subfolder: str | None, variant: str | None) -> Path:
    """The local snapshot of hub model `repo_id`: its JSON files, then the weights of the one component."""
    if not _HUB_ID.fullmatch(repo_id):
        raise CheckpointError(f"{repo_id}: no such file or folder")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{repo_id}: no such file or folder here; downloading it as a hub model id needs "
                              f"huggingface_hub: pip install 'diffax[hub]'") from None

    def fetch(patterns: list[str]) -> Path:
        try:
            return Path(snapshot_download(repo_id, allow_patterns=patterns))
        except Exception as e:  # offline, unknown repo, gated...: the hub library's many error types
            raise CheckpointError(f"{repo_id}: not a local file or folder, and downloading it from the hub "
                                  f"failed ({type(e).__name__}: {e})") from None

    root = fetch(["*.json"])  # configs, model_index.json, shard indexes: small
    folder = _locate(root, subfolder, variant)
    prefix = "" if folder == root else folder.relative_to(root).as_posix() + "/"
    stem = f"*.{variant}*" if variant else "*"
    fetch([f"{prefix}{stem}.safetensors"])
    try:
        weight_file(folder, variant)
    except CheckpointError:  # an older upload with .bin weights only
        fetch([f"{prefix}{stem}.bin"])
    return root


def _dtype(key: str, value: Any) -> Any:
    if value is None:
        return None
    try:
        return jnp.dtype(value)
    except TypeError:
        raise ValueError(f"{key}={value!r} is not a dtype (use 'float32', 'bfloat16' or 'float16')") from None


def _reference_converter(tensors: Tensors) -> Converter | None:
    keys = tensors.keys()
    for converter in converters().values():
        if converter.reference is not None and converter.reference.detect(keys):
            return converter
    return None


def _converter_of(config: Any) -> Converter:
    class_name = family_of(config).class_name
    return converter_for(class_name, f"{type(config).__name__}")


def _diffusers_config(local: Path, source: str, config: Any, runtime: dict[str, Any]) -> tuple[Converter, Any]:
    """(converter, config) of a diffusers-layout checkpoint: `config` if given, else its config.json."""
    if config is not None:
        return _converter_of(config), dataclasses.replace(config, **runtime)
    config_path = (local if local.is_dir() else local.parent) / CONFIG_NAME
    if not config_path.is_file():
        what = "a diffusers model folder holds it beside its weights" if local.is_dir() else \
            f"{source} is a bare weight file: load the folder holding it and its config.json"
        raise CheckpointError(f"{config_path}: missing; {what}, or pass config=")
    cfg, where = read_config_json(config_path)
    name = config_class_name(cfg)
    if not isinstance(name, str):
        raise CheckpointError(f"{where}: no _class_name (nor transformers' architectures), so the model class "
                              f"is unknown (diffusers writes it)")
    converter = converter_for(name, where)
    return converter, get_family(converter.class_name).config_cls.from_diffusers(config_path, **runtime)


# ----------------------------------------------------------------------------- tensor by tensor


def _progress(items: Iterable[Any], total: int, desc: str) -> Iterable[Any]:
    if not sys.stderr.isatty():
        return items
    from tqdm import tqdm
    return tqdm(items, total=total, desc=desc, unit="tensor", leave=False)


def _import(converter: Converter, config: Any, tensors: Tensors, hook: Any, renames: Iterable[tuple[str, str]],
            source: str, allow_partial: bool, allow_nonfinite: bool,
            place: Callable[[np.ndarray], Any] | None = None) -> tuple[Params, rules.Mismatch]:
    """Reads, converts and casts one tensor at a time into the parameter tree; returns the tree and the
    mismatch, which is an error unless `allow_partial` (then missing and mis-shaped parameters are freshly
    initialised). With `place` (e.g. `jax.device_put` to a device), each converted tensor is replaced by
    `place(tensor)` before the next is read, so only the placed copies accumulate. A tensor of integers for
    a float parameter, one with NaN / inf values (unless `allow_nonfinite`), or two tensors for one parameter
    are an error naming them."""
    want = rules.flatten(abstract_params(config))
    got: dict[tuple[str, ...], Any] = {}  # host arrays, or placed ones
    mismatch, refill = rules.Mismatch(), []
    read: list[str] = []  # the file's key last read: hooks rename keys, errors name the file's
    owner: dict[tuple[str, ...], str] = {}  # parameter -> the file's key it was read from

    def stream() -> Iterator[tuple[str, np.ndarray]]:
        for key, value in _progress(tensors.items(), len(tensors), Path(source).name):
            read[:] = [key]
            yield key, value

    items = stream() if hook is None else hook(config, stream(), source)
    for key, value in items:
        path, value = rules.tensor_to_flax(rules.rename(key, renames), value,
                                           embedding_keys=converter.embedding_keys, source=source)
        spec = want.get(path)
        if spec is not None and path in owner:  # e.g. 'conv.weight' and 'conv.kernel', or qkv and to_q
            raise CheckpointError(f"{source}: tensors {owner[path]!r} and {read[0]!r} both convert to "
                                  f"{'/'.join(path)}")
        if spec is None:
            mismatch.unexpected.append("/".join(path))
        elif tuple(value.shape) != tuple(spec.shape):
            mismatch.shapes.append(f"{'/'.join(path)}: file {tuple(value.shape)} vs model {tuple(spec.shape)}")
            refill.append(path)
        else:
            value = _cast(value, spec.dtype, read[0], source, allow_nonfinite)
            got[path] = value if place is None else place(value)
        del value  # the host copy of a placed tensor goes before the next read
        if spec is not None:
            owner[path] = read[0]
    missing = [p for p in want if p not in got and p not in refill]
    mismatch.missing = ["/".join(p) for p in missing]
    if mismatch and not allow_partial:
        raise CheckpointError("\n".join(mismatch.lines(source)))
    if mismatch.missing or mismatch.shapes:
        got.update({p: v if place is None else place(v) for p, v in _fresh(config, missing + refill).items()})
    return rules.unflatten({p: got[p] for p in want if p in got}), mismatch


def _place(value: np.ndarray, device: Any) -> jax.Array:
    """`value` on `device` in a buffer XLA owns. On a CPU `jax.device_put` of a host array gives an external
    buffer (the host array itself when aligned), which a jitted step cannot reuse for its output when the
    params are donated: a train step would hold the params twice. A device-to-device copy (no compilation)
    gives a buffer the runtime owns; it costs one tensor at a time."""
    placed = jax.device_put(value, device)
    if any(d.platform == "cpu" for d in placed.devices()):
        placed = jax.device_put(placed, device, may_alias=False)
    return placed


def _cast(value: np.ndarray, dtype: Any, key: str, source: str, allow_nonfinite: bool) -> np.ndarray:
    """`value` as a contiguous, aligned array of parameter dtype `dtype` (`io.host_array`): the one copy each
    tensor keeps, which a CPU device array then shares."""
    if value.dtype.kind in "biuc" and np.dtype(dtype).kind not in "biuc":
        raise CheckpointError(f"{source}: tensor {key!r} is {value.dtype}, but the model's parameter is "
                              f"{np.dtype(dtype)}; integer weights are not a float model's (wrong file?)")
    out = host_array(value, dtype)  # an overflowing cast is reported below, naming the tensor
    if not allow_nonfinite and not np.isfinite(out).all():
        cause = "holds NaN or inf" if not np.isfinite(value).all() else f"overflows {np.dtype(dtype)}"
        raise CheckpointError(f"{source}: tensor {key!r} {cause} ({int((~np.isfinite(out)).sum())} of "
                              f"{out.size} values non-finite); pass allow_nonfinite=True (--allow_nonfinite) "
                              f"to load it anyway")
    return out


def _fresh(config: Any, paths: list[tuple[str, ...]]) -> dict[tuple[str, ...], np.ndarray]:
    """Freshly initialised values of some parameters; XLA drops the rest of the init, so this costs only
    what it returns."""
    names = ["/".join(p) for p in paths]

    def init(key: jax.Array) -> dict[str, jax.Array]:
        flat = rules.flatten(nn.meta.unbox(boxed_init(config, key)))
        return {name: flat[p] for name, p in zip(names, paths)}

    out = jax.jit(init)(jax.random.key(0))
    return {p: np.asarray(out[name]) for name, p in zip(names, paths)}
