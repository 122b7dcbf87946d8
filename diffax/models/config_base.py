"""Model configs that are diffusers / transformers `config.json` files: reading them, and the shared
`from_diffusers` / `to_diffusers` of every family's config dataclass.

A family config is a frozen dataclass whose fields are the config.json keys, with the class's defaults,
plus two kinds of diffax-only fields:
  runtime_fields  how the model runs (dtype, param_dtype, attention_backend, remat): never written;
  extra_fields    what the model is but diffusers cannot say (DiT's timestep frequency shift): written under
                  the "_diffax" key, which diffusers keeps in its config without reading, so a config
                  round-trips through a diffusers folder.
Bookkeeping keys starting with "_" (`_class_name`, `_diffusers_version`, `_name_or_path`) are dropped; any
other unknown key is an error naming it and the file.
"""
from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Mapping

import jax.numpy as jnp
import ml_dtypes
import numpy as np

EXTRAS_KEY = "_diffax"
CONFIG_NAME = "config.json"


class ConfigFileError(ValueError):
    """A config.json is missing, not JSON, or not a JSON object."""


def read_config_json(config: Mapping[str, Any] | str | os.PathLike) -> tuple[dict[str, Any], str]:
    """(the config dict, where it came from) from a dict, a config.json path, or a folder holding one."""
    if isinstance(config, Mapping):
        return dict(config), "config"
    path = Path(config)
    path = path / CONFIG_NAME if path.is_dir() else path
    if not path.is_file():
        raise ConfigFileError(f"{path}: missing (a diffusers model folder holds config.json beside its weights)")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigFileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigFileError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg, str(path)


def config_class_name(cfg: Mapping[str, Any], default: Any = None) -> Any:
    """The model class a config.json names: diffusers' `_class_name`, else transformers' `architectures[0]`
    (transformers writes no `_class_name`), else `default`."""
    if "_class_name" in cfg:
        return cfg["_class_name"]
    architectures = cfg.get("architectures")
    if isinstance(architectures, list) and architectures:
        return architectures[0]
    return default


def _json_value(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_json_value(v) for v in value]
    return value


def _python_value(value: Any) -> Any:
    """JSON lists -> tuples, so configs stay hashable (flax module attributes, static jit arguments)."""
    if isinstance(value, list):
        return tuple(_python_value(v) for v in value)
    return value


def _fits(value: Any, hint: Any) -> bool:
    """Whether `value` has the type a config field's annotation says (JSON's int counts as a float, bool is
    no int); annotations this does not know (Any, a dtype) accept everything, leaving them to the family."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float, str):
        ok = (int, float) if hint is float else hint
        return isinstance(value, ok) and not isinstance(value, bool)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
    return True


def _is_float_dtype(value: Any) -> bool:
    """Whether `value` names a floating dtype: 'bfloat16', jnp.float32, np.dtype('float16'), ..."""
    if not isinstance(value, (str, type, np.dtype)):
        return False
    try:
        dtype = np.dtype(value)
    except (TypeError, ValueError):
        return False
    return np.issubdtype(dtype, np.floating) or dtype == ml_dtypes.bfloat16


class DiffusersConfig:
    """Mixin for family configs (frozen dataclasses): `from_diffusers` and `to_diffusers`."""
    class_name: ClassVar[str] = ""
    accepted_class_names: ClassVar[tuple[str, ...]] = ()  # older class names read as this family
    runtime_fields: ClassVar[tuple[str, ...]] = ("dtype", "param_dtype", "attention_backend")
    extra_fields: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def _translate(cls, cfg: dict[str, Any], source: str) -> dict[str, Any]:
        """Family hook: rewrite an accepted older layout into this class's keys (default: unchanged)."""
        return cfg

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any] | str | os.PathLike, **runtime: Any):
        """The config from a diffusers `config.json`: a folder holding it, the file, or the parsed dict.

        Missing keys take the class defaults; `runtime` sets the diffax-only runtime fields. An unknown key,
        an unsupported value or a wrong `_class_name` raises ValueError naming the key and the file.
        """
        cfg, source = read_config_json(config)
        name = config_class_name(cfg, cls.class_name)
        if name not in (cls.class_name, *cls.accepted_class_names):
            key = "_class_name" if "_class_name" in cfg else "architectures[0]"
            raise ValueError(f"{source}: {key} is {name!r}, not {cls.class_name!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        # Checked before _translate too: it compares the values of an older layout's keys.
        cls._check_types({k: _python_value(v) for k, v in cfg.items() if k in fields}, source)
        cfg = cls._translate(cfg, source)
        persistent = fields - set(cls.runtime_fields) - set(cls.extra_fields)
        kwargs = {k: _python_value(v) for k, v in cfg.items() if not k.startswith("_")}
        unknown = sorted(kwargs.keys() - persistent)
        if unknown:
            raise ValueError(f"{source}: unknown {cls.class_name} config key(s) {unknown}; "
                             f"diffax supports {sorted(persistent)}")
        extras = cfg.get(EXTRAS_KEY) or {}
        if not isinstance(extras, Mapping) or set(extras) - set(cls.extra_fields):
            raise ValueError(f"{source}: {EXTRAS_KEY} must be an object with keys among {list(cls.extra_fields)}, "
                             f"got {extras!r}")
        bad = sorted(runtime.keys() - set(cls.runtime_fields))
        if bad:
            raise ValueError(f"{cls.class_name}.from_diffusers: only the runtime fields {cls.runtime_fields} "
                             f"may be passed, got {bad}")
        for key in ("dtype", "param_dtype"):
            if key in runtime and not _is_float_dtype(runtime[key]):
                raise ValueError(f"{cls.class_name}: {key}={runtime[key]!r} is not a floating-point dtype "
                                 f"(use 'float32', 'bfloat16' or 'float16')")
        values = {**kwargs, **{k: _python_value(v) for k, v in extras.items()}, **runtime}
        cls._check_types(values, source)
        try:
            return cls(**values)
        except (TypeError, ValueError) as e:  # TypeError: a value a family check cannot compare
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def _check_types(cls, values: Mapping[str, Any], source: str) -> None:
        """ValueError naming the first field whose value is not of its annotated type."""
        hints = typing.get_type_hints(cls)
        for key, value in values.items():
            if not _fits(value, hints[key]):
                annotation = next(f.type for f in dataclasses.fields(cls) if f.name == key)
                raise ValueError(f"{source}: {key}={value!r} has the wrong type (expected {annotation})")

    def to_diffusers(self) -> dict[str, Any]:
        """The config.json dict (`_class_name` set, runtime fields left out, extras under "_diffax") that
        the torch class's `from_config` accepts and `from_diffusers` reads back to an equal config."""
        out: dict[str, Any] = {"_class_name": self.class_name}
        extras = {}
        for f in dataclasses.fields(self):
            if f.name in self.runtime_fields:
                continue
            value = _json_value(getattr(self, f.name))
            if f.name in self.extra_fields:
                extras[f.name] = value
            else:
                out[f.name] = value
        if extras:
            out[EXTRAS_KEY] = extras
        return out

    def save_config(self, folder: str | os.PathLike) -> Path:
        """Writes `to_diffusers()` to `folder/config.json` (the folder is created); returns the path."""
        path = Path(folder) / CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_diffusers(), indent=2, sort_keys=True) + "\n")
        return path


class DenoiserConfigBase(DiffusersConfig):
    """What denoisers' configs (U-Nets, DiT) share: their init inputs are `example_inputs()`'s sample,
    timesteps and keyword conditioning; a class-conditional model's null conditioning is the null class."""

    def init_inputs(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        sample, timesteps, cond = self.example_inputs()
        return (sample, timesteps), cond

    def null_cond(self, cond: dict[str, Any]) -> dict[str, Any]:
        """Every class label replaced by the null class (`self.null_class`)."""
        return {**cond, "class_labels": jnp.full_like(cond["class_labels"], self.null_class)}
