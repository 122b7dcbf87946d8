"""LoRA adapters on a pipeline: load, weigh, fuse, unload, as diffusers' `load_lora_weights` family does.

    pipe.load_lora_weights("style.safetensors", adapter_name="style")          # diffusers / peft or kohya
    pipe.load_lora_weights("detail.safetensors", adapter_name="detail")
    pipe.set_adapters(["style", "detail"], [0.8, 0.5])                        # both, weighted
    pipe.fuse_lora(); pipe.unfuse_lora(); pipe.unload_lora_weights()

A loaded adapter is a set of `LoraLayer`s per component (`diffax.convert.lora`). The pipeline's params are
always plain weights: each LoRA'd kernel is `W + sum_i weight_i * scale_i * (down_i @ up_i)` over the active
adapters, computed from the base weights (kept aside) by one jitted function whose inputs are the weights,
so a new adapter weight costs one small merge and no retrace of anything, and the pipeline's programs, which
take params as arguments, run unchanged. Only the updated kernels are recomputed; the other parameters are
the base arrays themselves.

Semantics follow diffusers: a newly loaded adapter becomes the only active one (with `scale`) until
`set_adapters` activates several; `fuse_lora` folds the active adapters into the base weights (they stop
being applied on the fly) and `unfuse_lora` takes them out again; `unload_lora_weights` drops every adapter,
restoring the original params exactly, or keeping the fused weights if some are fused.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffax.convert import rules
from diffax.convert.lora import LoraLayer, read_lora
from diffax.models.qtensor import KERNEL_SCALE
from diffax.models.registry import abstract_params
from diffax.quant import is_quantized

Params = dict[str, Any]
Layers = Mapping[str, LoraLayer]  # 'a/b/kernel' -> LoraLayer: one adapter on one component


@functools.partial(jax.jit, static_argnums=3)
def _merge(kernels: dict[str, jax.Array], adapters: tuple[dict[str, LoraLayer], ...], weights: jax.Array,
           shardings: tuple[tuple[str, jax.sharding.Sharding], ...]) -> dict[str, jax.Array]:
    """kernels + sum_i weights[i] * scale * (down @ up), in fp32, cast back to each kernel's dtype and made
    with the sharding `shardings` gives its path (those it does not name: where XLA puts them)."""
    where = dict(shardings)
    out = {}
    for path, kernel in kernels.items():
        total = kernel.astype(jnp.float32)
        for i, layers in enumerate(adapters):
            layer = layers.get(path)
            if layer is not None:  # [..., I, r] @ [r, O] -> the kernel's shape
                delta = jnp.matmul(layer.down.astype(jnp.float32), layer.up.astype(jnp.float32))
                total = total + (weights[i] * layer.scale) * delta
        out[path] = total.astype(kernel.dtype)
        if path in where:
            out[path] = jax.lax.with_sharding_constraint(out[path], where[path])
    return out


def apply(params: Params, adapters: Sequence[Layers], weights: Sequence[float]) -> Params:
    """`params` with the LoRA layers of `adapters` added, adapter i at weight `weights[i]`.

    Each updated kernel is computed in fp32 and cast back to its dtype; a kernel placed on devices (a
    committed jax.Array: one device, or sharded over a mesh) comes back with its sharding, made so inside the
    merge, so a sharded kernel is never gathered whole on one device. Kernels on different sets of devices
    are merged by separate calls (one program cannot take arrays from two device sets). Every other leaf is
    the input's own array. The merge is one jitted function of the arrays and the weights: a new weight does
    not retrace, a new set of adapters (or of shardings) traces once. Inside a traced function (traced
    params), the merged kernels are left where the surrounding program puts them.
    """
    if len(adapters) != len(weights):
        raise ValueError(f"apply: {len(adapters)} adapters but {len(weights)} weights")
    flat = rules.flatten(params)
    touched = sorted({path for layers in adapters for path in layers})
    kernels = {}
    for path in touched:
        key = tuple(path.split("/"))
        if key not in flat:
            raise ValueError(f"apply: the params have no {path} for a LoRA layer")
        if key[:-1] + (KERNEL_SCALE,) in flat:  # integers + a scale: adding a float delta would corrupt them
            raise ValueError(f"apply: {path} is quantized; apply LoRA to the float params, then quantize "
                             f"(or diffax.quant.dequantize first)")
        kernels[path] = flat[key]
    if not kernels:
        return params
    adapters = tuple({p: LoraLayer(*layer) for p, layer in layers.items()} for layers in adapters)
    weights = jnp.asarray(weights, jnp.float32)
    by_devices: dict[Any, dict[str, Any]] = {}  # device set (None: host or uncommitted) -> kernels
    for path, kernel in kernels.items():
        placed = isinstance(kernel, jax.Array) and not isinstance(kernel, jax.core.Tracer) and kernel.committed
        by_devices.setdefault(frozenset(kernel.sharding.device_set) if placed else None, {})[path] = kernel
    for devices, group in by_devices.items():
        shardings = () if devices is None else tuple((path, k.sharding) for path, k in group.items())
        group_adapters = tuple({p: layer for p, layer in layers.items() if p in group} for layers in adapters)
        for path, value in _merge(group, group_adapters, weights, shardings).items():
            flat[tuple(path.split("/"))] = value
    return rules.unflatten(flat)


class Fused(NamedTuple):
    """What `fuse_lora` folded into the base weights, and the state it replaced."""
    base: dict[str, Params]     # component -> params before fusing
    active: dict[str, float]    # the active adapters before fusing
    weights: dict[str, float]   # name -> the weight each fused adapter was folded in with


@dataclasses.dataclass
class LoraAdapters:
    """Named adapters over a pipeline's components and the state of their use.

    base      component -> params without the adapters applied on the fly (with the fused ones, if fused);
    adapters  name -> component -> LoRA layers, in load order;
    active    name -> weight of the adapters applied on the fly;
    fused     what `fuse_lora` folded into `base`, or None;
    enabled   False while `disable_lora` holds the active adapters back.
    """
    base: dict[str, Params] = dataclasses.field(default_factory=dict)
    adapters: dict[str, dict[str, Layers]] = dataclasses.field(default_factory=dict)
    active: dict[str, float] = dataclasses.field(default_factory=dict)
    fused: Fused | None = None
    enabled: bool = True

    def params(self, component: str) -> Params:
        """The component's params with the active adapters applied on the fly (none while disabled)."""
        names = [n for n in self.active if component in self.adapters[n]] if self.enabled else []
        return apply(self.base[component], [self.adapters[n][component] for n in names],
                     [self.active[n] for n in names])

    def is_fused(self, name: str) -> bool:
        """Whether adapter `name` is folded into `base`."""
        return self.fused is not None and name in self.fused.weights


class LoraMixin:
    """diffusers' LoRA methods for a pipeline holding `components` = {name: (module, params)}.

    The methods replace the params of the components a LoRA touches (the U-Net, the text encoders) through
    the pipeline's `set_component(name, params=...)` where it has one (so it drops params it placed on
    devices), else by assigning `components[name]`; then call `self._params_changed()` if it is defined.
    """
    components: dict[str, tuple[Any, Params]]

    @property
    def _lora(self) -> LoraAdapters:
        state = self.__dict__.get("_lora_state")
        if state is None:
            state = self.__dict__["_lora_state"] = LoraAdapters()
        return state

    def load_lora_weights(self, path: str | os.PathLike, adapter_name: str | None = None, scale: float = 1.0, *,
                          weight_name: str | None = None) -> str:
        """Loads a LoRA file (diffusers / peft or kohya format, see `diffax.convert.lora`) as adapter
        `adapter_name` (default 'default_<n>') and makes it the only active adapter, at weight `scale`.
        Returns the adapter's name. ValueError naming the file and the key for an entry that fits no
        parameter of this pipeline; ValueError for a name already loaded."""
        state = self._lora
        if adapter_name is None:  # diffusers' default names, skipping ones still taken
            adapter_name = next(f"default_{n}" for n in range(len(state.adapters) + 1)
                                if f"default_{n}" not in state.adapters)
        if adapter_name in state.adapters:
            raise ValueError(f"{path}: adapter name {adapter_name!r} is already loaded (pass another adapter_name, "
                             f"or delete_adapters first)")
        # Quantized components are read against their float shapes, so that a LoRA for them is named below
        # rather than failing as a shape mismatch on the integer kernels.
        quantized = {name for name, (_, params) in self.components.items()
                     if isinstance(params, Mapping) and is_quantized(params)}
        targets = {name: (module, abstract_params(module.config) if name in quantized else params)
                   for name, (module, params) in self.components.items()}
        layers = read_lora(path, targets, weight_name=weight_name)
        hit = sorted(quantized & set(layers))
        if hit:
            raise ValueError(f"{path}: LoRA for the quantized {' and '.join(hit)}; load it into the float pipeline, "
                             f"fuse_lora() and unload_lora_weights(), then quantize")
        for component in layers:
            if component not in state.base:
                state.base[component] = self.components[component][1]
        state.adapters[adapter_name] = layers
        state.active = {adapter_name: float(scale)}
        self._apply_lora()
        return adapter_name

    def set_adapters(self, adapter_names: str | Sequence[str], adapter_weights: float | Sequence[float] | None = None
                     ) -> None:
        """Applies exactly the adapters `adapter_names`, each at its weight (1.0 by default; one number for
        all). Fused adapters are part of the base weights and cannot be named here (unfuse_lora first)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if adapter_weights is None:
            adapter_weights = 1.0
        weights = [adapter_weights] * len(names) if np.ndim(adapter_weights) == 0 else list(adapter_weights)
        if len(weights) != len(names):
            raise ValueError(f"set_adapters: {len(names)} adapter names but {len(weights)} weights")
        state = self._lora
        for name in names:
            if name not in state.adapters:
                raise ValueError(f"set_adapters: no adapter {name!r} (loaded: {', '.join(state.adapters) or 'none'})")
            if state.is_fused(name):
                raise ValueError(f"set_adapters: adapter {name!r} is fused; unfuse_lora() first")
        state.active = {name: float(w) for name, w in zip(names, weights)}
        self._apply_lora()

    def disable_lora(self) -> None:
        """Stops applying the active adapters (fused ones stay in the weights) until `enable_lora`."""
        self._lora.enabled = False
        self._apply_lora()

    def enable_lora(self) -> None:
        """Applies the active adapters again after `disable_lora`."""
        self._lora.enabled = True
        self._apply_lora()

    def get_active_adapters(self) -> list[str]:
        """The names of the adapters applied on the fly."""
        return list(self._lora.active)

    def get_list_adapters(self) -> dict[str, list[str]]:
        """component -> the names of the loaded adapters that update it."""
        state = self._lora
        return {c: [n for n, layers in state.adapters.items() if c in layers] for c in state.base}

    def delete_adapters(self, adapter_names: str | Sequence[str]) -> None:
        """Removes loaded adapters (not fused ones: unfuse_lora first)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        state = self._lora
        for name in names:
            if name not in state.adapters:
                raise ValueError(f"delete_adapters: no adapter {name!r}")
            if state.is_fused(name):
                raise ValueError(f"delete_adapters: adapter {name!r} is fused; unfuse_lora() first")
        for name in names:
            del state.adapters[name]
            state.active.pop(name, None)
        self._apply_lora()

    def fuse_lora(self, lora_scale: float = 1.0, adapter_names: Sequence[str] | None = None) -> None:
        """Folds adapters into the base weights: the active ones (or `adapter_names`, at their active weight
        or 1.0), each weight times `lora_scale`. The params are the same as applied on the fly; the fused
        adapters stop being applied on the fly, `unfuse_lora` restores the state before."""
        state = self._lora
        if state.fused is not None:
            raise ValueError("fuse_lora: adapters are fused already; unfuse_lora() first")
        names = list(state.active) if adapter_names is None else list(adapter_names)
        for name in names:
            if name not in state.adapters:
                raise ValueError(f"fuse_lora: no adapter {name!r} (loaded: {', '.join(state.adapters) or 'none'})")
        if not names:
            return
        weights = {name: state.active.get(name, 1.0) * lora_scale for name in names}
        state.fused = Fused(dict(state.base), dict(state.active), weights)
        for component in state.base:
            fused = [n for n in names if component in state.adapters[n]]
            state.base[component] = apply(state.base[component], [state.adapters[n][component] for n in fused],
                                          [weights[n] for n in fused])
        state.active = {n: w for n, w in state.active.items() if n not in weights}
        self._apply_lora()

    def unfuse_lora(self) -> None:
        """Takes fused adapters out of the base weights again: the state before `fuse_lora` (no-op if none)."""
        state = self._lora
        if state.fused is None:
            return
        fused = state.fused
        # Components and adapters loaded since fusing stay as they are.
        state.base = {**state.base, **fused.base}
        state.active = {**fused.active, **state.active}
        state.fused = None
        self._apply_lora()

    def unload_lora_weights(self) -> None:
        """Drops every adapter. The components get their original params back (the very arrays), or, while
        adapters are fused, keep the fused weights as their new params."""
        base = self._lora.base
        self.__dict__["_lora_state"] = LoraAdapters()
        self._set_params(base)

    def _apply_lora(self) -> None:
        state = self._lora
        self._set_params({component: state.params(component) for component in state.base})

    def _set_params(self, params: Mapping[str, Params]) -> None:
        set_component = getattr(self, "set_component", None)
        for component, value in params.items():
            if set_component is not None:
                set_component(component, params=value)
            else:
                self.components[component] = (self.components[component][0], value)
        changed = getattr(self, "_params_changed", None)
        if changed is not None:
            changed()
