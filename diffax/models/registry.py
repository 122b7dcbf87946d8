"""The model registry: every family under its diffusers (or transformers) class name, one way to build it.

    module = build_model({"name": "UNet2DModel", "sample_size": 16, ...})   # a run config's model block
    config = get_family("DiTTransformer2DModel").config_cls.from_diffusers("dit/transformer")
    shapes = abstract_params(config)                                        # nothing allocated

A family is three things, with the same names everywhere:
  config_cls  a frozen dataclass whose fields are the diffusers `config.json` keys (plus diffax's runtime
              fields such as `dtype`), with `from_diffusers(dict | path, **runtime)`, `to_diffusers() -> dict`
              and `init_inputs()` (the `ModelConfig` protocol below); a denoiser's config also answers what
              training and sampling ask (`DenoiserConfig`);
  module_cls  the Flax module, `module_cls(config)`; a denoiser is called as
              `module.apply({"params": p}, sample, timesteps, **cond, train=False)` with `sample` NHWC and
              `cond` holding diffusers' keyword names (`class_labels`, `encoder_hidden_states`, ...);
  abstract_params(config)  the parameter shapes, from `jax.eval_shape` (generic, below).
Families register themselves when `diffax.models` is imported; a run config's `model.name` is the class
name or one of its short aliases.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, Mapping, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffax.models.config_base import EXTRAS_KEY

Cond = dict[str, Any]


class ModelConfig(Protocol):
    """What every family's config class provides."""
    class_name: ClassVar[str]           # the diffusers / transformers class name
    runtime_fields: ClassVar[tuple[str, ...]]  # diffax-only fields that never go into config.json

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any] | str, **runtime: Any) -> "ModelConfig": ...

    def to_diffusers(self) -> dict[str, Any]: ...

    def init_inputs(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The smallest valid (positional, keyword) inputs of the module's `__call__`, for init and shape
        inference."""


class DenoiserConfig(ModelConfig, Protocol):
    """What the configs of denoising models (U-Nets, DiT) add for training and sampling."""

    def example_inputs(self, batch: int = 1) -> tuple[jax.Array, jax.Array, Cond]:
        """The smallest valid (sample, timesteps, cond); `init_inputs` is ((sample, timesteps), cond)."""

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """[H, W, C] of the inputs the model was configured for (trained or sampled at)."""

    @property
    def learn_sigma(self) -> bool:
        """Whether the output holds [prediction, variance interpolation] (2C channels)."""

    @property
    def num_classes(self) -> int:
        """Real classes of a class-conditional model; 0 for other models."""

    @property
    def has_null_cond(self) -> bool:
        """Whether `null_cond` exists: the model was built for classifier-free guidance."""

    def null_cond(self, cond: Cond) -> Cond:
        """The 'no conditioning' inputs with the structure and batch size of `cond` (the null class for
        class labels, the empty-prompt embedding for text). Label dropout and guidance use it."""


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """A registered model family: its config class and Flax module, keyed by `class_name`."""
    class_name: str
    config_cls: type
    module_cls: type[nn.Module]
    aliases: tuple[str, ...] = ()


_FAMILIES: dict[str, ModelFamily] = {}
_ALIASES: dict[str, str] = {}


def register(family: ModelFamily) -> ModelFamily:
    """Adds `family` under its class name and aliases; a name taken by another family is an error."""
    for name in (family.class_name, *family.aliases):
        owner = _ALIASES.get(name)
        if owner is not None and owner != family.class_name:
            raise ValueError(f"model name {name!r} is already registered for {owner}")
        _ALIASES[name] = family.class_name
    _FAMILIES[family.class_name] = family
    return family


def families() -> dict[str, ModelFamily]:
    """class name -> ModelFamily for every registered family."""
    return dict(_FAMILIES)


def get_family(name: str) -> ModelFamily:
    """The family registered under a class name or alias; ValueError listing the known names."""
    if not isinstance(name, str) or name not in _ALIASES:
        known = ", ".join(f"{c} ({', '.join(f.aliases)})" if f.aliases else c for c, f in sorted(_FAMILIES.items()))
        raise ValueError(f"unknown model {name!r}; diffax has {known}")
    return _FAMILIES[_ALIASES[name]]


def family_of(config: Any) -> ModelFamily:
    """The family whose config class `config` is an instance of."""
    for family in _FAMILIES.values():
        if isinstance(config, family.config_cls):
            return family
    raise TypeError(f"{type(config).__name__} is not the config of a registered model family")


def make_module(config: Any) -> nn.Module:
    """The Flax module of a family config."""
    return family_of(config).module_cls(config)


def _dtype(key: str, name: Any) -> Any:
    """A floating compute / parameter dtype from its name (or a dtype), naming the key otherwise."""
    try:
        dtype = None if name is None else jnp.dtype(name)  # numpy reads None as float64
    except (TypeError, ValueError):  # a dict or list reads as a structured dtype spec
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"model.{key}: dtype={name!r} is not a floating-point dtype "
                         f"(use 'float32', 'bfloat16' or 'float16')")
    return dtype


def config_from_block(block: Mapping[str, Any]) -> Any:
    """A family config from a run config's `model` block (also the JSON saved in a checkpoint).

    The block holds `name` (class name or alias), the family's diffusers config keys, its diffax-only
    fields (DiT's `freq_shift`, ...) and runtime fields (`dtype` / `param_dtype` as strings). A family with
    named sizes (DiT) also takes `preset`.
    """
    fields = dict(block.to_dict() if hasattr(block, "to_dict") else block)
    try:
        family = get_family(fields.pop("name", None))
    except ValueError as e:
        raise ValueError(f"model.name: {e}") from None
    cls = family.config_cls
    runtime = {k: fields.pop(k) for k in list(fields) if k in cls.runtime_fields}
    for key in ("dtype", "param_dtype"):
        if key in runtime:
            runtime[key] = _dtype(key, runtime[key])
    preset = fields.pop("preset", None)
    if preset is not None:
        if not hasattr(cls, "preset"):
            raise ValueError(f"model.preset: {family.class_name} has no named presets")
        return cls.preset(preset, **fields, **runtime)
    extras = {k: fields.pop(k) for k in list(fields) if k in cls.extra_fields}
    return cls.from_diffusers({**fields, EXTRAS_KEY: extras} if extras else fields, **runtime)


def build_model(block: Mapping[str, Any]) -> nn.Module:
    """The Flax module for a run config's `model` block (see `config_from_block`); config at `.config`."""
    return make_module(config_from_block(block))


def boxed_init(config: Any, key: jax.Array) -> Any:
    """Freshly initialised parameters still in their logical-partitioning boxes (`nn.Partitioned`).
    Run it under `jax.eval_shape` for shapes, or under `jax.jit` with out_shardings to place them."""
    args, kwargs = config.init_inputs()
    return make_module(config).init(key, *args, **kwargs)["params"]


def abstract_params(config: Any) -> Any:
    """The parameter tree as `jax.ShapeDtypeStruct`s (unboxed); nothing is computed or allocated."""
    return nn.meta.unbox(jax.eval_shape(functools.partial(boxed_init, config), jax.random.key(0)))


def logical_specs(config: Any) -> Any:
    """The parameter tree's logical PartitionSpecs (axis names such as 'embed', 'heads'), for
    `diffax.parallel` to map onto a mesh."""
    return nn.get_partition_spec(jax.eval_shape(functools.partial(boxed_init, config), jax.random.key(0)))


def init_params(config: Any, key: jax.Array) -> Any:
    """Randomly initialised parameters as a plain nested dict of arrays."""
    return nn.meta.unbox(jax.jit(boxed_init, static_argnums=0)(config, key))
