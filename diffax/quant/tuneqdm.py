"""TuneQDM (Ryu et al. 2024, arXiv 2401.04339): fine-tune a quantized model by training only its
quantization scales, with a separate scale set for each of K timestep groups; the integer weights stay
frozen and shared.

    qp = quantize_params(params, bits=8)                        # one shared quantized base
    scales = init_scales(qp, groups=4)                         # the only trainable tree (optimizer state too)
    view = lambda scales, t: apply_scales(qp, scales, timestep_group(t, 1000, 4))
    loss = lambda scales, x, t: mse(module.apply({"params": view(scales, t)}, x, t), target)
    save_scales("digits_7.safetensors", scales)                 # a few hundred kB per data set

Trainable tree: for every quantized layer (`qp.shapes`), a factor array [K, G, out] (per output channel)
or [K, 1, 1] (`per_channel=False`: per tensor), initialised to 1; the layer's scale for timestep group k
is `kernel_scale * factor[k]`. Training a factor rather than the scale itself keeps the update relative
(Adam's steps are about the learning rate in size, whatever a layer's scale is), which is the same
parameterisation up to the optimizer's step size.

Quantized embedding tables (CLIP's token and position tables, `embedding_scale` [N, G]) are not tuned:
their scales are per row, so a factor would retune single tokens (textual inversion rather than scale
tuning), and a text encoder runs once per prompt, outside the denoising steps the timestep groups split.
`init_scales` picks kernels only, and `apply_scales` / `load_scales` refuse a table's name.

A diffusion model's weights play different roles along the trajectory, hence K sets: group k covers
timesteps [k T / K, (k+1) T / K). One group is used per model call, so a training batch draws one group
and its timesteps inside it (`sample_group_timesteps`); a sampling step has one t for the whole batch.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from diffax.models.qtensor import KERNEL_SCALE
from diffax.quant.quantize import QuantizationError, QuantizedParams, flatten, selected, unflatten

Scales = dict[str, jax.Array]  # '/'-joined kernel path -> factors [K, G or 1, out or 1]
FORMAT = "diffax-tuneqdm"


def init_scales(qp: QuantizedParams, groups: int = 4, *, per_channel: bool = True,
                include: Iterable[str] | None = None, exclude: Iterable[str] | None = None) -> Scales:
    """Factors of 1 for the quantized layers' kernels (all, or those `include` / `exclude` pick by
    '/'-joined path, as in `quantize_params`), K = `groups` sets each; quantized embedding tables keep their
    scales (module docstring)."""
    if not isinstance(groups, int) or groups < 1:
        raise QuantizationError(f"init_scales: groups must be a positive int, got {groups!r}")
    flat = flatten(qp.params)
    quantized = {tuple(n.split("/")) for n, _ in qp.shapes}
    paths = [p for p in selected(flat, include, exclude) if p in quantized]
    if not paths:
        raise QuantizationError("init_scales: no quantized layer chosen (quantize the params first)")
    out = {}
    for path in paths:
        g, o = flat[path[:-1] + (KERNEL_SCALE,)].shape
        out["/".join(path)] = jnp.ones((groups, g, o) if per_channel else (groups, 1, 1), jnp.float32)
    return out


def timestep_group(timesteps: jax.Array, num_train_timesteps: int, groups: int) -> jax.Array:
    """The scale set of (integer or fractional) timesteps in [0, T): floor(t K / T), clipped to [0, K)."""
    k = jnp.floor(jnp.asarray(timesteps, jnp.float32) * groups / num_train_timesteps).astype(jnp.int32)
    return jnp.clip(k, 0, groups - 1)


def sample_group_timesteps(key: jax.Array, batch: int, num_train_timesteps: int, groups: int
                           ) -> tuple[jax.Array, jax.Array]:
    """(group [], timesteps [batch] int32): one group uniformly, then timesteps uniformly inside it, so
    the timesteps are uniform over [0, T) overall."""
    kg, kt = jax.random.split(key)
    group = jax.random.randint(kg, (), 0, groups)
    lo = (group * num_train_timesteps) // groups
    hi = ((group + 1) * num_train_timesteps) // groups
    return group, jax.random.randint(kt, (batch,), lo, hi)


def apply_scales(qp: QuantizedParams, scales: Scales, group: jax.Array | int) -> dict[str, Any]:
    """The parameter tree for `module.apply` with scale set `group` (a traced int is fine):
    kernel_scale * factor[group] for each tuned layer; every other leaf is `qp.params`'s own."""
    flat = dict(flatten(qp.params))
    for name, factor in scales.items():
        path = tuple(name.split("/"))[:-1] + (KERNEL_SCALE,)
        if path not in flat:
            raise QuantizationError(f"apply_scales: {name!r} is not a quantized layer of these params")
        flat[path] = flat[path] * factor[group]
    return unflatten(flat)


@dataclasses.dataclass(frozen=True)
class ScaleFile:
    """What `load_scales` returns: the factors and the base they were tuned on."""
    scales: Scales
    base: dict[str, Any]  # bits, group_size of the quantized base; free-form notes


def save_scales(path: str | os.PathLike, scales: Scales, qp: QuantizedParams | None = None,
                **notes: Any) -> Path:
    """Writes the factors as one small .safetensors file (key = kernel path, F32 [K, G, out]); metadata
    records the base's bits / group_size (when `qp` is given) and `notes` (JSON-able: data set, steps)."""
    from diffax.convert.io import write_safetensors
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = {"bits": qp.bits, "group_size": qp.group_size} if qp is not None else {}
    write_safetensors(path, {k: np.asarray(v) for k, v in scales.items()},
                      metadata={"format": FORMAT, "base": json.dumps({**base, **notes})})
    return path


def load_scales(path: str | os.PathLike, qp: QuantizedParams | None = None) -> ScaleFile:
    """The factors of `save_scales`'s file; with `qp`, checked against its layers (name and shape), so a
    scale file tuned on another base is an error naming the key."""
    from safetensors import safe_open

    from diffax.convert.io import read_safetensors
    path = Path(path)
    tensors = read_safetensors(path)
    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise QuantizationError(f"{path}: not a TuneQDM scale file (metadata format={metadata.get('format')!r})")
    base = json.loads(metadata.get("base", "{}"))
    if qp is not None:
        flat = flatten(qp.params)
        if base.get("bits") not in (None, qp.bits) or base.get("group_size", qp.group_size) != qp.group_size:
            raise QuantizationError(f"{path}: tuned on a {base.get('bits')}-bit base with group_size="
                                    f"{base.get('group_size')}, not this {qp.bits}-bit one with "
                                    f"group_size={qp.group_size}")
        for name, factor in tensors.items():
            scale = flat.get(tuple(name.split("/"))[:-1] + (KERNEL_SCALE,))
            if scale is None:
                raise QuantizationError(f"{path}: {name!r} is not a quantized layer of the base")
            if factor.ndim != 3 or factor.shape[1:] not in ((1, 1), tuple(scale.shape)):
                raise QuantizationError(f"{path}: {name!r} has factors {factor.shape}; the base's scale is "
                                        f"{tuple(scale.shape)} (expected [K, {scale.shape[0]}, {scale.shape[1]}] "
                                        f"or [K, 1, 1])")
    return ScaleFile({k: jnp.asarray(v) for k, v in tensors.items()}, base)
