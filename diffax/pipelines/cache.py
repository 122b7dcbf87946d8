"""The on-disk cache of converted pipeline components: convert once, restore with Orbax afterwards.

    module, params = load_component("sd-folder/unet", cache_dir=None)   # converts on the first call only

An entry is keyed by the source files' names, sizes and modification times, the load options (dtype,
attention backend) and `CACHE_VERSION`, so an edited or replaced checkpoint is converted again. The module
is always rebuilt from the source's config.json (cheap); only the parameters are cached. An entry that
cannot be read back, or whose arrays do not fit the config, is deleted and converted again with a warning:
a damaged cache never stops a load.

The cache lives under `cache_dir`, else $DIFFAX_CACHE_DIR, else ~/.cache/diffax/pipelines.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import numpy as np

from diffax.convert import api
from diffax.convert.io import host_array
from diffax.convert.rules import flatten
from diffax.models.registry import abstract_params, make_module

CACHE_VERSION = 2  # bump when conversion changes the arrays it writes or the entry layout
PARAMS_DIR = "params"       # an entry: the Orbax params tree, and
SHAPES_FILE = "shapes.json"  # its paths, shapes and dtypes, checked on restore without tracing the model
ENV_VAR = "DIFFAX_CACHE_DIR"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where converted components are kept: `cache_dir`, $DIFFAX_CACHE_DIR, or ~/.cache/diffax/pipelines."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    return Path("~/.cache/diffax/pipelines").expanduser()


def source_key(sources: list[Path], options: dict[str, Any]) -> str:
    """A hex digest of every file under `sources` (path, size, mtime) and the load options."""
    entries = []
    for source in sources:
        files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
        for p in files:
            st = p.stat()
            entries.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    blob = json.dumps({"files": entries, "options": options, "version": CACHE_VERSION}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def param_shapes(params: Any) -> dict[str, list[Any]]:
    """{'a/b': [shape, dtype name]} of a params tree: what an entry's arrays must read back as."""
    return {"/".join(k): [list(np.shape(v)), np.dtype(v.dtype).name] for k, v in sorted(flatten(params).items())}


def params_fit(params: Any, config: Any, entry: Path | None = None) -> bool:
    """Whether restored params have exactly the parameter paths, shapes and dtypes they were stored with:
    those in the entry's shapes file, which were checked against the model when the entry was converted;
    an entry without one is checked against the config's parameters, which traces the model's init."""
    shapes_file = None if entry is None else entry / SHAPES_FILE
    if shapes_file is not None and shapes_file.is_file():
        return param_shapes(params) == json.loads(shapes_file.read_text())
    want = flatten(abstract_params(config))
    got = flatten(params)
    return set(want) == set(got) and all(
        tuple(np.shape(got[k])) == tuple(want[k].shape) and np.dtype(got[k].dtype) == np.dtype(want[k].dtype)
        for k in want)


def restore_params(entry: Path) -> Any:
    """The params tree stored at `entry` (host numpy arrays, aligned like the converter's: `_align`)."""
    import orbax.checkpoint as ocp
    return _align(ocp.PyTreeCheckpointer().restore((entry / PARAMS_DIR).absolute()))


def _align(tree: Any) -> Any:
    """Replaces every array of a nested dict, in place and one at a time, by an aligned copy
    (`diffax.convert.io.host_array`). Orbax's arrays are not aligned, so placing them on a CPU would copy
    each one and hold the weights twice; one array at a time, this costs one array's copy."""
    for key, value in tree.items():
        if isinstance(value, dict):
            _align(value)
        elif isinstance(value, np.ndarray):
            tree[key] = host_array(value, value.dtype)
    return tree


def save_params(entry: Path, params: Any) -> None:
    """Writes a params tree and its shapes file to `entry` atomically (a temporary folder renamed into
    place)."""
    import orbax.checkpoint as ocp
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.with_name(entry.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    # Uncompressed: with compression Orbax holds about two extra copies of the weights while it writes, one
    # without (measured on 375 MiB of fp32 arrays: +707 against +363 MiB).
    ocp.PyTreeCheckpointer(use_compression=False).save((tmp / PARAMS_DIR).absolute(), params)
    (tmp / SHAPES_FILE).write_text(json.dumps(param_shapes(params)))
    shutil.rmtree(entry, ignore_errors=True)
    os.replace(tmp, entry)  # readers see a whole entry or none


def cached(name: str, sources: list[Path], options: dict[str, Any], cache_dir: str | os.PathLike | None,
           convert: Callable[[], tuple[nn.Module, Any]], config: Callable[[], Any] | None = None
           ) -> tuple[nn.Module, Any]:
    """(module, params) of one component: restored from the cache entry of (sources, options) when it is
    whole, else `convert()` and stored. `config()` gives the component's config without converting (for a
    cache hit); without it every load converts. cache_dir=False disables the cache."""
    if cache_dir is False or config is None:
        return convert()
    entry = cache_root(cache_dir) / f"{name}-{source_key(sources, options)}"
    if entry.is_dir():
        try:
            cfg = config()
            params = restore_params(entry)
            if not params_fit(params, cfg, entry):
                raise ValueError("its arrays do not fit the component's config")
            return make_module(cfg), params
        except Exception as e:  # noqa: BLE001 - Orbax and tensorstore raise many types for damaged files
            warnings.warn(f"{entry}: cached {name} unreadable ({type(e).__name__}: {str(e)[:200]}); converting "
                          f"again", stacklevel=3)
            shutil.rmtree(entry, ignore_errors=True)
    module, params = convert()
    try:
        save_params(entry, params)
    except OSError as e:  # a read-only or full disk: the load still succeeds, uncached
        warnings.warn(f"{entry}: could not write the conversion cache ({e})", stacklevel=3)
    return module, params


def cached_components(path: Path, options: dict[str, Any], cache_dir: str | os.PathLike | None | bool,
                      convert: Callable[[], dict[str, tuple[nn.Module, Any]]],
                      config_from: Callable[[str, dict[str, Any]], Any]) -> dict[str, tuple[nn.Module, Any]]:
    """Several components converted from one file (a single-file checkpoint): {name: (module, params)},
    restored from one cache entry (each component's params and a configs.json) when it is whole, else
    `convert()` and stored. `config_from(class_name, config_json)` rebuilds a config."""
    if cache_dir is False:
        return convert()
    entry = cache_root(cache_dir) / f"{path.stem}-{source_key([path], options)}"
    configs_file = entry / "configs.json"
    if configs_file.is_file():
        try:
            out = {}
            for name, (class_name, cfg) in json.loads(configs_file.read_text()).items():
                config = config_from(class_name, cfg)
                params = restore_params(entry / name)
                if not params_fit(params, config, entry / name):
                    raise ValueError(f"{name}: its arrays do not fit the component's config")
                out[name] = (make_module(config), params)
            return out
        except Exception as e:  # noqa: BLE001 - a damaged entry is converted again
            warnings.warn(f"{entry}: cached conversion unreadable ({type(e).__name__}: {str(e)[:200]}); "
                          f"converting again", stacklevel=3)
    shutil.rmtree(entry, ignore_errors=True)
    components = convert()
    try:
        for name, (_, params) in components.items():
            save_params(entry / name, params)
        configs = {name: (m.config.class_name, m.config.to_diffusers()) for name, (m, _) in components.items()}
        (entry / "configs.json").write_text(json.dumps(configs))
    except (OSError, TypeError, ValueError) as e:  # unwritable, or a config JSON cannot hold: stay uncached
        warnings.warn(f"{entry}: could not write the conversion cache ({e})", stacklevel=3)
        shutil.rmtree(entry, ignore_errors=True)
    return components


def load_component(folder: str | os.PathLike, *, dtype: Any = None, param_dtype: Any = None,
                   attention_backend: str | None = None, cache_dir: str | os.PathLike | None | bool = None
                   ) -> tuple[nn.Module, Any]:
    """`diffax.convert.load(folder, ...)` through the cache: a diffusers or transformers model folder."""
    folder = Path(folder)
    options = {"dtype": str(dtype), "param_dtype": str(param_dtype), "attention_backend": attention_backend}
    runtime = {k: v for k, v in dict(dtype=api._dtype("dtype", dtype),
                                     param_dtype=api._dtype("param_dtype", param_dtype),
                                     attention_backend=attention_backend).items() if v is not None}

    def config() -> Any:
        _, cfg = api._diffusers_config(folder, str(folder), None, runtime)
        return cfg

    def convert() -> tuple[nn.Module, Any]:
        return api.load(folder, dtype=dtype, param_dtype=param_dtype, attention_backend=attention_backend)

    return cached(folder.name, [folder], options, cache_dir, convert, config)
