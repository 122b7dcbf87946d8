"""LoRA files -> low-rank updates of diffax parameters, in diffusers / peft and kohya formats.

    layers = read_lora("style.safetensors", {"unet": (unet, unet_params), "text_encoder": (te, te_params)})
    layers["unet"]["down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q/kernel"]   # a LoraLayer

A LoRA adds `scale * up @ down` to a linear or conv weight (torch layout: down [r, I] or [r, I, kh, kw], up
[O, r] or [O, r, 1, 1]). `LoraLayer` holds the two factors in the diffax kernel's layout, so that
`down @ up` has the kernel's shape ([I, O] or HWIO [kh, kw, I, O]), and `scale` = alpha / rank.

Formats read (the key names of one LoRA'd module, `<m>` its torch module name):
  diffusers / peft   `unet.<m>.lora_A.weight`, `.lora_B.weight`; the older `.lora.down.weight` / `.lora.up.weight`,
                     `.lora_linear_layer.down/up.weight` and attention-processor names (`attn1.processor.to_q_lora.
                     down.weight`, the text encoder's `self_attn.to_q_lora`); component prefixes `unet.`,
                     `transformer.` (a DiT's), `text_encoder.`, `text_encoder_2.` (keys without one are the
                     U-Net's). Alpha: a `<m>.alpha` entry, else diffusers' `lora_adapter_metadata` in the
                     safetensors header (peft's LoraConfig: `lora_alpha`, `alpha_pattern`, `r`, `rank_pattern`,
                     `use_rslora`), else alpha = rank.
  kohya (sd-scripts) `lora_unet_<m with _ for .>.lora_down.weight`, `.lora_up.weight`, `.alpha` (alpha = rank when
                     absent); `lora_te_` / `lora_te1_` for the text encoder, `lora_te2_` for SDXL's second one. U-Net
                     names are diffusers' (`down_blocks_0_attentions_0_proj_in`) or the original LDM ones SDXL files
                     use (`input_blocks_1_1_proj_in`, mapped through the single-file tables).

Every entry maps to a parameter of the target model or the read fails naming the file and the key; variants
diffax does not apply (DoRA `dora_scale`, LyCORIS LoHa / LoKr / Tucker `lora_mid`, LoRA biases) fail the same
way instead of loading silently without them.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import numpy as np

from diffax.convert import rules
from diffax.convert.io import CheckpointError, read_state_dict
from diffax.convert.single_file import unet_table
from diffax.models.registry import family_of

Params = dict[str, Any]
# component name -> (Flax module, params): a pipeline's `components`. Only the params' shapes are read.
Targets = Mapping[str, tuple[Any, Params]]
# (component, flax kernel path) -> {'down' | 'up' | 'alpha': (the file's key, tensor)}
Groups = dict[tuple[str, tuple[str, ...]], dict[str, Any]]

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes in a folder
METADATA_KEY = "lora_adapter_metadata"           # diffusers' LoraConfig per component, in the safetensors header
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
_KOHYA = re.compile(r"^lora_(unet|te1|te2|te)_(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_KOHYA_PREFIX = re.compile(r"^lora_(unet|te1|te2|te)_")
_KOHYA_COMPONENT = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}
# diffusers / peft key tails -> ('down' | 'up' | 'alpha'), the module name in group 'm'.
_DIFFUSERS = (
    (re.compile(r"^(?P<m>.+)\.lora_(?P<part>A|B)(?:\.default)?\.weight$"), None),
    (re.compile(r"^(?P<m>.+)\.lora(?:_linear_layer)?\.(?P<part>down|up)\.weight$"), None),
    (re.compile(r"^(?P<m>.+?)(?:\.processor)?\.(?P<old>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight$"),
     "old"),
    (re.compile(r"^(?P<m>.+)\.alpha$"), "alpha"),
)
_PART = {"A": "down", "B": "up", "down": "down", "up": "up"}
# Attention-processor names of the old diffusers format -> module names, per model kind.
_OLD_UNET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_OLD_CLIP = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
# Parts of other adapter kinds, named in the error instead of "maps nowhere".
_UNSUPPORTED = {"dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "lora_mid": "LoCon Tucker (lora_mid)",
                "hada_": "LyCORIS LoHa", "lokr_": "LyCORIS LoKr", "lora_B.bias": "LoRA bias (lora_bias=True)"}


class LoraLayer(NamedTuple):
    """One module's low-rank update: the kernel gains `scale * (down @ up)` at adapter weight 1."""
    down: Any    # [..., I, r]: the kernel's layout with its out axis replaced by the rank ([I, r], [kh, kw, I, r])
    up: Any      # [r, O]
    scale: Any   # alpha / rank (alpha / sqrt(rank) for rank-stabilised LoRA)


def lora_file(path: str | os.PathLike, weight_name: str | None = None) -> Path:
    """The weight file of a LoRA: `path` itself, or inside a folder `weight_name`, diffusers'
    `pytorch_lora_weights.safetensors`, or the folder's only .safetensors file."""
    path = Path(path)
    if not path.is_dir():
        if not path.is_file():
            raise CheckpointError(f"{path}: no such LoRA file")
        return path
    if weight_name is not None or (path / WEIGHT_NAME).is_file():
        found = path / (weight_name or WEIGHT_NAME)
        if not found.is_file():
            raise CheckpointError(f"{found}: no such LoRA file")
        return found
    candidates = sorted(path.glob("*.safetensors"))
    if len(candidates) != 1:
        raise CheckpointError(f"{path}: holds {len(candidates)} .safetensors files and no {WEIGHT_NAME}; "
                              f"pass weight_name=")
    return candidates[0]


def read_metadata(path: Path) -> dict[str, Any]:
    """diffusers' LoRA metadata ('unet.lora_alpha' -> 8, ...) from a safetensors header; {} if none."""
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open
    with safe_open(str(path), framework="numpy") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
    if not raw:
        return {}
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt {METADATA_KEY} in the safetensors header ({e})") from None
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: {METADATA_KEY} in the safetensors header is not a JSON object")
    return metadata


def read_lora(path: str | os.PathLike, targets: Targets, *,
              weight_name: str | None = None) -> dict[str, dict[str, LoraLayer]]:
    """The LoRA layers of a file, per component of `targets`, keyed by the diffax parameter path they update.

    Args:
        path: a LoRA weight file (.safetensors, or a torch .bin / .pt), or a folder holding one.
        targets: component name ('unet', 'text_encoder', 'text_encoder_2') -> (Flax module, params), e.g. a
            pipeline's `components`; the params' shapes are checked, never their values.
        weight_name: the file inside a folder `path`.
    Returns:
        {component: {'a/b/kernel': LoraLayer}} in fp32 numpy, only for the components the file updates.
    Raises:
        CheckpointError (a ValueError) naming the file and the key: a key that maps to no parameter of the
        targets (or to a component they lack), an adapter kind diffax does not apply, a down / up pair that
        is incomplete or does not fit the parameter's shape, two keys for one parameter.
    """
    file = lora_file(path, weight_name)
    source = str(file)
    state = read_state_dict(file)
    if not state:
        raise CheckpointError(f"{source}: holds no tensors")
    for key in state:
        for marker, kind in _UNSUPPORTED.items():
            if marker in key:
                raise CheckpointError(f"{source}: {key!r} is a {kind} weight; diffax applies plain LoRA only")
    flat = {name: rules.flatten(params) for name, (_, params) in targets.items()}
    kohya = all(_KOHYA_PREFIX.match(key) for key in state)
    if kohya:
        groups = _kohya_groups(state, targets, source)
    else:
        groups = _diffusers_groups(state, targets, flat, source)
    metadata = {} if kohya else read_metadata(file)
    out: dict[str, dict[str, LoraLayer]] = {}
    for (component, param), parts in groups.items():
        shape = tuple(flat[component][param].shape)  # arrays or jax.ShapeDtypeStructs
        layer = _layer(parts, shape, param[:-1], _component_config(metadata, component), source)
        out.setdefault(component, {})["/".join(param)] = layer
    return out


# ----------------------------------------------------------------------------- key -> parameter


def _kernels(params: Params) -> dict[str, tuple[str, ...]]:
    """torch module name -> flax module path, for every module with a kernel (linear and conv layers)."""
    return {rules.path_to_key(p[:-1]): p[:-1] for p in rules.flatten(params) if p[-1] == "kernel"}


def kohya_names(module: Any, params: Params) -> dict[str, tuple[str, ...]]:
    """kohya module name (the torch name with '_' for '.') -> flax module path. A UNet2DConditionModel also
    answers to its original LDM names (`input_blocks_1_1_proj_in`, `middle_block_0_in_layers_2`, ...)."""
    names = _kernels(params)
    table = {name.replace(".", "_"): path for name, path in names.items()}
    if family_of(module.config).class_name == "UNet2DConditionModel":
        for ldm, diffusers in unet_table(module.config).items():
            for name, path in names.items():
                if (name + ".").startswith(diffusers):
                    table[(ldm + (name + ".")[len(diffusers):]).rstrip(".").replace(".", "_")] = path
    return table


def _kohya_groups(state: Mapping[str, np.ndarray], targets: Targets, source: str) -> Groups:
    """The `Groups` of a kohya file."""
    tables: dict[str, dict[str, tuple[str, ...]]] = {}
    groups: dict[tuple[str, tuple[str, ...]], dict[str, Any]] = {}
    for key, value in state.items():
        m = _KOHYA.match(key)
        if m is None:
            raise CheckpointError(f"{source}: {key!r} is no kohya LoRA entry (expected <name>.lora_down.weight, "
                                  f".lora_up.weight or .alpha)")
        component = _KOHYA_COMPONENT[m.group(1)]
        if component not in targets:
            raise CheckpointError(f"{source}: {key!r} is for the {component}, which this pipeline has not")
        if component not in tables:
            tables[component] = kohya_names(*targets[component])
        path = tables[component].get(m.group(2))
        if path is None:
            raise CheckpointError(f"{source}: {key!r} maps to no linear or conv layer of the {component} "
                                  f"({m.group(2)!r} names no module)")
        part = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[m.group(3)]
        _put(groups, (component, (*path, "kernel")), part, key, value, source)
    return groups


def _diffusers_groups(state: Mapping[str, np.ndarray], targets: Targets,
                      flat: Mapping[str, Mapping[tuple[str, ...], Any]], source: str) -> Groups:
    """The `Groups` of a diffusers / peft file."""
    prefixed = any(key.split(".", 1)[0] in COMPONENTS for key in state)
    groups: dict[tuple[str, tuple[str, ...]], dict[str, Any]] = {}
    for key, value in state.items():
        component, rest = key.split(".", 1) if prefixed else ("unet", key)
        if component not in COMPONENTS:
            raise CheckpointError(f"{source}: {key!r} names no component (expected a {', '.join(COMPONENTS)} "
                                  f"prefix)")
        if component not in targets:
            raise CheckpointError(f"{source}: {key!r} is for the {component}, which this pipeline has not")
        for pattern, kind in _DIFFUSERS:
            m = pattern.match(rest)
            if m is not None:
                break
        else:
            raise CheckpointError(f"{source}: {key!r} is no LoRA entry (expected <module>.lora_A.weight / "
                                  f".lora_B.weight, .lora.down.weight / .lora.up.weight or .alpha)")
        name = m.group("m")
        if kind == "old":
            old = _OLD_CLIP if component.startswith("text_encoder") else _OLD_UNET
            name = f"{name}.{old[m.group('old')]}"
        part = "alpha" if kind == "alpha" else _PART[m.group("part")]
        params = flat[component]
        path = (*rules.key_to_path(name), "kernel")
        if path not in params and ("text_model", *path) in params:  # transformers 5 drops `text_model.`
            path = ("text_model", *path)
        if path not in params:
            raise CheckpointError(f"{source}: {key!r} maps to no linear or conv layer of the {component} "
                                  f"(no parameter {'/'.join(path)})")
        _put(groups, (component, path), part, key, value, source)
    return groups


def _put(groups: dict, where: tuple[str, tuple[str, ...]], part: str, key: str, value: np.ndarray,
         source: str) -> None:
    entry = groups.setdefault(where, {})
    if part in entry:
        raise CheckpointError(f"{source}: {entry[part][0]!r} and {key!r} are both the {part} of "
                              f"{where[0]} {'/'.join(where[1])}")
    entry[part] = (key, value)


# ----------------------------------------------------------------------------- alphas and layouts


def _component_config(metadata: Mapping[str, Any], component: str) -> dict[str, Any]:
    """The LoraConfig fields diffusers stored for `component` ('unet.lora_alpha' -> 'lora_alpha')."""
    prefix = component + "."
    return {k[len(prefix):]: v for k, v in metadata.items() if k.startswith(prefix)}


def _pattern_value(patterns: Mapping[str, Any] | None, module: str, default: Any) -> Any:
    """peft's `get_pattern_key`: the first pattern that matches a dotted suffix of `module`, else `default`.
    A text encoder's module is tried without its `text_model.` too, the name transformers 5 gives it."""
    names = (module.removeprefix("text_model."), module) if module.startswith("text_model.") else (module,)
    for pattern, value in (patterns or {}).items():
        if any(re.match(rf"(.*\.)?({pattern})$", name) for name in names):
            return value
    return default


def _layer(parts: Mapping[str, tuple[str, np.ndarray]], kernel_shape: tuple[int, ...], module: tuple[str, ...],
           config: Mapping[str, Any], source: str) -> LoraLayer:
    """One LoraLayer from the file's down / up (torch layouts) and alpha (the entry, else `config`, diffusers'
    metadata, else the rank), checked against the kernel of flax module `module`."""
    for need in ("down", "up"):
        if need not in parts:
            have = next(iter(parts.values()))[0]
            peft = "lora_A" if need == "down" else "lora_B"
            raise CheckpointError(f"{source}: {have!r} has no matching {need} weight ({peft} / lora_{need})")
    (down_key, down), (up_key, up) = parts["down"], parts["up"]
    down, up = np.asarray(down, np.float32), np.asarray(up, np.float32)
    rank = down.shape[0] if down.ndim in (2, 4) else -1
    if rank < 0 or up.ndim not in (2, 4) or up.shape[1] != rank or up.shape[2:] not in ((), (1, 1)):
        raise CheckpointError(f"{source}: {down_key!r} {down.shape} and {up_key!r} {up.shape} are no LoRA pair "
                              f"(down [r, in(, kh, kw)], up [out, r(, 1, 1)])")
    # torch [r, I, kh, kw] -> [kh, kw, I, r] (HWIO with out = r); [r, I] -> [I, r]
    down = down.transpose(2, 3, 1, 0) if down.ndim == 4 else down.T
    want = (*kernel_shape[:-1], rank)
    if down.size != math.prod(want) or up.shape[0] != kernel_shape[-1] or \
            (down.ndim == 4 and len(kernel_shape) == 4 and down.shape != want):
        raise CheckpointError(f"{source}: {down_key!r} {parts['down'][1].shape} and {up_key!r} "
                              f"{parts['up'][1].shape} do not fit the parameter {'/'.join(module)}/kernel "
                              f"{tuple(kernel_shape)}")
    down = down.reshape(want)  # a 1x1 conv's LoRA on a linear layer or the other way round
    up = np.ascontiguousarray(up.reshape(up.shape[0], rank).T)  # [r, O]
    torch_module = rules.path_to_key(module)
    alpha = parts.get("alpha")
    if alpha is not None:
        value = np.asarray(alpha[1])
        if value.size != 1:
            raise CheckpointError(f"{source}: {alpha[0]!r} holds {value.size} values; an alpha is one number")
        return LoraLayer(np.ascontiguousarray(down), up, float(value.reshape(())) / rank)
    r = _pattern_value(config.get("rank_pattern"), torch_module, config.get("r", rank))
    if r != rank:
        raise CheckpointError(f"{source}: {down_key!r} has rank {rank}, but the file's {METADATA_KEY} says {r}")
    lora_alpha = _pattern_value(config.get("alpha_pattern"), torch_module, config.get("lora_alpha", rank))
    scale = lora_alpha / math.sqrt(rank) if config.get("use_rslora") else lora_alpha / rank
    return LoraLayer(np.ascontiguousarray(down), up, float(scale))
