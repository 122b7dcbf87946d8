"""Single-file Stable Diffusion checkpoints (the original CompVis / Stability layout), in and out.

    parts = diffax.convert.load_single_file("v1-5-pruned-emaonly.safetensors")   # or a .ckpt
    unet, unet_params = parts["unet"]                   # also "vae", "text_encoder", "text_encoder_2"
    diffax.convert.save_single_file("out.safetensors", parts, model_type="sd1")

One file holds every component under its own prefix:

  model.diffusion_model.*             U-Net (LDM `openaimodel` names)
  first_stage_model.*                 VAE (LDM `Encoder` / `Decoder` names)
  cond_stage_model.transformer.*      SD 1.x: CLIP ViT-L (transformers' names)
  cond_stage_model.model.*            SD 2.x: OpenCLIP ViT-H (OpenCLIP's names)
  conditioner.embedders.0.transformer.*, conditioner.embedders.1.model.*   SDXL: CLIP ViT-L, OpenCLIP bigG
  conditioner.embedders.0.model.*     SDXL refiner: OpenCLIP bigG

The model type (see `diffax.convert.single_file_configs.MODEL_TYPES`) is read from the tensor names and
shapes (`infer_model_type`); each component's architecture is that type's published config. Each
component's tensors are renamed to the diffusers layout by the tables below (module prefixes, built from
the config), then go through the family's converter like a diffusers folder, one tensor at a time.
Tensors under no component's prefix (EMA copies `model_ema.*`, the noise schedule `alphas_cumprod`, ...)
are not weights of the pipeline's models and are skipped.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

import flax.linen as nn
import numpy as np

from diffax.convert import rules
from diffax.convert.api import _converter_of, _dtype, _import, check_not_quantized
from diffax.convert.io import CheckpointError, StateDict, Tensors, open_tensors, write_safetensors
from diffax.convert.registry import Converter, ImportHook, Items
from diffax.convert.single_file_configs import MODEL_TYPES
from diffax.models.registry import abstract_params, get_family, make_module

Params = dict[str, Any]

UNET, VAE = "model.diffusion_model.", "first_stage_model."
# model type -> component -> (prefix in the file, key layout)
_SD1 = {"unet": (UNET, "unet"), "vae": (VAE, "vae"), "text_encoder": ("cond_stage_model.transformer.", "clip")}
_SD2 = {"unet": (UNET, "unet"), "vae": (VAE, "vae"), "text_encoder": ("cond_stage_model.model.", "openclip")}
_SDXL = {"unet": (UNET, "unet"), "vae": (VAE, "vae"),
         "text_encoder": ("conditioner.embedders.0.transformer.", "clip"),
         "text_encoder_2": ("conditioner.embedders.1.model.", "openclip")}
_REFINER = {"unet": (UNET, "unet"), "vae": (VAE, "vae"),
            "text_encoder_2": ("conditioner.embedders.0.model.", "openclip")}
LAYOUTS: dict[str, dict[str, tuple[str, str]]] = {
    "sd1": _SD1, "sd1_inpaint": _SD1, "sd2": _SD2, "sd2_base": _SD2, "sd2_inpaint": _SD2,
    "sdxl": _SDXL, "sdxl_inpaint": _SDXL, "sdxl_refiner": _REFINER}

# ----------------------------------------------------------------------------- the key tables

# LDM ResBlock -> diffusers ResnetBlock2D (in_layers = [GroupNorm, SiLU, conv], out_layers = [GroupNorm,
# SiLU, Dropout, conv], emb_layers = [SiLU, Linear]).
_RESBLOCK = (("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
             ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut."))


def _per_block(value: int | tuple[int, ...], n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def unet_table(config: Any) -> dict[str, str]:
    """LDM U-Net module prefix -> diffusers prefix, for `config`'s block layout.

    `input_blocks.0` is conv_in; then each down block's layers (`input_blocks.i.0` a ResBlock, `.1` its
    SpatialTransformer), then its downsampler (`input_blocks.i.0.op`). `output_blocks` run the up blocks
    with one layer more each, the upsampler after the last layer's ResBlock (and transformer, if any).
    The SpatialTransformer's inner names are diffusers' already."""
    table = {"time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
             "label_emb.0.0.": "add_embedding.linear_1.", "label_emb.0.2.": "add_embedding.linear_2.",
             "input_blocks.0.0.": "conv_in.", "out.0.": "conv_norm_out.", "out.2.": "conv_out."}

    def resnet(src: str, dst: str) -> None:
        table.update({src + a: dst + b for a, b in _RESBLOCK})

    n = len(config.block_out_channels)
    layers = _per_block(config.layers_per_block, n)
    i = 1
    for b, kind in enumerate(config.down_block_types):
        for j in range(layers[b]):
            resnet(f"input_blocks.{i}.0.", f"down_blocks.{b}.resnets.{j}.")
            if "CrossAttn" in kind:
                table[f"input_blocks.{i}.1."] = f"down_blocks.{b}.attentions.{j}."
            i += 1
        if b < n - 1:
            table[f"input_blocks.{i}.0.op."] = f"down_blocks.{b}.downsamplers.0.conv."
            i += 1
    if config.mid_block_type is not None:
        resnet("middle_block.0.", "mid_block.resnets.0.")
        if "CrossAttn" in config.mid_block_type:
            table["middle_block.1."] = "mid_block.attentions.0."
            resnet("middle_block.2.", "mid_block.resnets.1.")
        else:
            resnet("middle_block.1.", "mid_block.resnets.1.")
    i = 0
    for b, (kind, n_layers) in enumerate(zip(config.up_block_types, reversed(layers))):
        attention = "CrossAttn" in kind
        for j in range(n_layers + 1):
            resnet(f"output_blocks.{i}.0.", f"up_blocks.{b}.resnets.{j}.")
            if attention:
                table[f"output_blocks.{i}.1."] = f"up_blocks.{b}.attentions.{j}."
            i += 1
        if b < n - 1:
            table[f"output_blocks.{i - 1}.{2 if attention else 1}.conv."] = f"up_blocks.{b}.upsamplers.0.conv."
    return table


# LDM AttnBlock (1x1 convs q, k, v, proj_out) -> diffusers Attention (Linear layers).
_VAE_ATTENTION = (("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."),
                  ("proj_out.", "to_out.0."))


def vae_table(config: Any) -> dict[str, str]:
    """LDM VAE module prefix -> diffusers prefix: `encoder.down.i.block.j` -> `down_blocks.i.resnets.j`,
    `mid.block_1` / `attn_1` / `block_2` -> the mid block, and the decoder's `up.i` counted from the lowest
    resolution, so `up.i` is `up_blocks.{n-1-i}`."""
    table = {"quant_conv.": "quant_conv.", "post_quant_conv.": "post_quant_conv."}
    n, layers = len(config.block_out_channels), config.layers_per_block

    def resnet(src: str, dst: str) -> None:
        table[src] = dst
        table[src + "nin_shortcut."] = dst + "conv_shortcut."

    for part in ("encoder", "decoder"):
        for name in ("conv_in.", "conv_out."):
            table[f"{part}.{name}"] = f"{part}.{name}"
        table[f"{part}.norm_out."] = f"{part}.conv_norm_out."
        resnet(f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0.")
        resnet(f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1.")
        table.update({f"{part}.mid.attn_1.{a}": f"{part}.mid_block.attentions.0.{b}" for a, b in _VAE_ATTENTION})
    for i in range(n):
        for j in range(layers):
            resnet(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.")
        if i < n - 1:
            table[f"encoder.down.{i}.downsample.conv."] = f"encoder.down_blocks.{i}.downsamplers.0.conv."
        b = n - 1 - i
        for j in range(layers + 1):
            resnet(f"decoder.up.{i}.block.{j}.", f"decoder.up_blocks.{b}.resnets.{j}.")
        if i > 0:
            table[f"decoder.up.{i}.upsample.conv."] = f"decoder.up_blocks.{b}.upsamplers.0.conv."
    return table


_OPENCLIP_LAYER = (("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("attn.out_proj.", "self_attn.out_proj."),
                   ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2."))
# OpenCLIP tensors that are no weight of transformers' text model: the causal-mask buffer and the
# contrastive temperature.
_OPENCLIP_SKIP = ("attn_mask", "logit_scale")


def openclip_table(config: Any) -> dict[str, str]:
    """OpenCLIP text-tower prefix -> transformers CLIP prefix (the fused `attn.in_proj_*` and the bare
    `positional_embedding` / `text_projection` tensors are handled in the stream functions)."""
    table = {"token_embedding.": "text_model.embeddings.token_embedding.", "ln_final.": "text_model.final_layer_norm."}
    for i in range(config.num_hidden_layers):
        table.update({f"transformer.resblocks.{i}.{a}": f"text_model.encoder.layers.{i}.{b}"
                      for a, b in _OPENCLIP_LAYER})
    return table


def _rename(key: str, table: Mapping[str, str]) -> str | None:
    """`key` with its longest module prefix in `table` replaced; None if no prefix is in it."""
    i = len(key)
    while (i := key.rfind(".", 0, i)) > 0:
        new = table.get(key[:i + 1])
        if new is not None:
            return new + key[i + 1:]
    return None


def _unknown(source: str, key: str, component: str) -> CheckpointError:
    return CheckpointError(f"{source}: tensor {key!r} has no place in the {component} of this model type "
                           f"(wrong model_type=, or a config that does not fit the file)")


# ----------------------------------------------------------------------------- original -> diffusers streams


def _unet_in(config: Any, items: Items, prefix: str, source: str) -> Iterator[tuple[str, np.ndarray]]:
    table = unet_table(config)
    for key, value in items:
        new = _rename(key[len(prefix):], table)
        if new is None:
            raise _unknown(source, key, "U-Net")
        yield new, value


def _vae_in(config: Any, items: Items, prefix: str, source: str) -> Iterator[tuple[str, np.ndarray]]:
    table = vae_table(config)
    for key, value in items:
        new = _rename(key[len(prefix):], table)
        if new is None:
            raise _unknown(source, key, "VAE")
        if ".mid_block.attentions.0.to_" in new and new.endswith(".weight") and value.ndim == 4:
            value = value[:, :, 0, 0]  # a 1x1 conv [O, I, 1, 1] is diffusers' Linear [O, I]
        yield new, value


def _clip_in(config: Any, items: Items, prefix: str, source: str) -> Iterator[tuple[str, np.ndarray]]:
    del config, source  # transformers' own names: the CLIP converter's renames and hook do the rest
    for key, value in items:
        yield key[len(prefix):], value


def _openclip_in(config: Any, items: Items, prefix: str, source: str) -> Iterator[tuple[str, np.ndarray]]:
    table = openclip_table(config)
    # SD 2.x's file holds one layer more than its text encoder uses (see single_file_configs): dropped.
    unused = f"transformer.resblocks.{config.num_hidden_layers}."
    for key, value in items:
        name = key[len(prefix):]
        if name in _OPENCLIP_SKIP or name.startswith(unused):
            continue
        if name == "positional_embedding":
            yield "text_model.embeddings.position_embedding.weight", value
        elif name == "text_projection":
            if config.with_projection:
                yield "text_projection.weight", value.T  # x @ proj [D, P]; a Linear's weight is [P, D]
        elif m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", name):
            if int(m.group(1)) >= config.num_hidden_layers:
                raise _unknown(source, key, "text encoder")
            for part, chunk in zip("qkv", np.split(value, 3, axis=0)):  # fused [3D, ...]: q, k, v
                yield f"text_model.encoder.layers.{m.group(1)}.self_attn.{part}_proj.{m.group(2)}", chunk
        else:
            new = _rename(name, table)
            if new is None:
                raise _unknown(source, key, "text encoder")
            yield new, value


# ----------------------------------------------------------------------------- diffusers -> original


def _invert(table: Mapping[str, str]) -> dict[str, str]:
    return {v: k for k, v in table.items()}


def _renamed_out(sd: StateDict, table: Mapping[str, str], what: str) -> StateDict:
    inverse, out = _invert(table), {}
    for key, value in sd.items():
        new = _rename(key, inverse)
        if new is None:
            raise CheckpointError(f"save_single_file: the {what}'s tensor {key!r} has no place in the original "
                                  f"layout")
        out[new] = value
    return out


def _unet_out(config: Any, sd: StateDict) -> StateDict:
    return _renamed_out(sd, unet_table(config), "U-Net")


def _vae_out(config: Any, sd: StateDict) -> StateDict:
    out = _renamed_out(sd, vae_table(config), "VAE")
    for key in out:
        if re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight", key):
            out[key] = out[key][:, :, None, None]  # back to a 1x1 conv
    return out


def _clip_out(config: Any, sd: StateDict) -> StateDict:
    del config
    return dict(sd)


def _openclip_out(config: Any, sd: StateDict) -> StateDict:
    inverse, out = _invert(openclip_table(config)), {}
    qkv: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for key, value in sd.items():
        if m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T
        elif (new := _rename(key, inverse)) is not None:
            out[new] = value
        else:
            raise CheckpointError(f"save_single_file: the text encoder's tensor {key!r} has no place in the "
                                  f"OpenCLIP layout")
    for (layer, leaf), parts in qkv.items():  # one fused [3D, ...] tensor per layer
        out[f"transformer.resblocks.{layer}.attn.in_proj_{leaf}"] = np.concatenate([parts[p] for p in "qkv"])
    return out


_STREAMS = {"unet": (_unet_in, _unet_out), "vae": (_vae_in, _vae_out), "clip": (_clip_in, _clip_out),
            "openclip": (_openclip_in, _openclip_out)}


# ----------------------------------------------------------------------------- public API


def infer_model_type(path: str | os.PathLike) -> str:
    """The model type (a key of `MODEL_TYPES`) of a single-file checkpoint, from its tensor names and
    shapes; see `_infer` for the rules."""
    with open_tensors(path) as tensors:
        return _infer(tensors)


def _infer(tensors: Tensors) -> str:
    """SDXL by its second embedder, the refiner by OpenCLIP as its first, SD 2.x by OpenCLIP as the
    cond stage (or, in a U-Net-only file, 1024-wide cross-attention), else SD 1.x; inpainting by the U-Net's
    conv_in taking 9 channels (latents, mask, masked-image latents). SD 2.x 768-v and 512 base have the same
    shapes: the 768 one ('sd2') is inferred, model_type='sd2_base' picks the other."""
    keys = tensors.keys()

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    conv_in = UNET + "input_blocks.0.0.weight"
    inpaint = conv_in in tensors and len(tensors.shape(conv_in)) == 4 and tensors.shape(conv_in)[1] == 9
    cross = UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    if has("conditioner.embedders.1."):
        base = "sdxl"
    elif has("conditioner.embedders.0.model."):
        return "sdxl_refiner"
    elif has("cond_stage_model.model.") or (cross in tensors and tensors.shape(cross)[-1] == 1024):
        base = "sd2"
    elif has(UNET) or has(VAE) or has("cond_stage_model.transformer."):
        base = "sd1"
    else:
        raise CheckpointError(f"{tensors.source}: not a Stable Diffusion single-file checkpoint (no "
                              f"{UNET}*, {VAE}*, cond_stage_model.* or conditioner.* tensors)")
    return f"{base}_inpaint" if inpaint else base


def _check_model_type(model_type: str, source: str) -> None:
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{source}: model_type must be one of {', '.join(MODEL_TYPES)}, got {model_type!r}")


def load_single_file(path: str | os.PathLike, *, model_type: str | None = None, dtype: Any = None,
                     param_dtype: Any = None, configs: Mapping[str, Any] | None = None,
                     allow_nonfinite: bool = False) -> dict[str, tuple[nn.Module, Params]]:
    """The components of a single-file Stable Diffusion checkpoint (.safetensors, or .ckpt read with
    `torch.load(weights_only=True)`), each as (Flax module, params).

    Args:
        path: the checkpoint file.
        model_type: a key of `MODEL_TYPES` ('sd1', 'sd1_inpaint', 'sd2', 'sd2_base', 'sd2_inpaint', 'sdxl',
            'sdxl_inpaint', 'sdxl_refiner'); None infers it (`infer_model_type`).
        dtype, param_dtype: every component config's compute dtype and the dtype params are returned in.
        configs: component name -> diffax config, replacing that component's standard architecture (a
            fine-tune with another size, or tiny test models).
        allow_nonfinite: accept tensors holding NaN or inf, as in `diffax.convert.load`.
    Returns:
        {'unet', 'vae', 'text_encoder', 'text_encoder_2': (module, params)} for the components the file holds.
    Raises:
        CheckpointError (a ValueError) naming the file: not a Stable Diffusion file, a tensor with no place in
        its component, missing or mis-shaped tensors (one line per kind, as `diffax.convert.load`).
    """
    runtime = {k: v for k, v in dict(dtype=_dtype("dtype", dtype),
                                     param_dtype=_dtype("param_dtype", param_dtype)).items() if v is not None}
    configs = dict(configs or {})
    out = {}
    with open_tensors(path) as tensors:
        source = str(tensors.source)
        if model_type is None:
            model_type = _infer(tensors)
        _check_model_type(model_type, source)
        bad = sorted(configs.keys() - LAYOUTS[model_type].keys())
        if bad:
            raise ValueError(f"{source}: configs= names {bad}, which a {model_type!r} checkpoint has not "
                             f"(it has {', '.join(LAYOUTS[model_type])})")
        keys = tensors.keys()
        for component, (prefix, layout) in LAYOUTS[model_type].items():
            part = _Part(tensors, [k for k in keys if k.startswith(prefix)])
            if not len(part):
                continue
            config = configs.get(component)
            if config is None:
                class_name, values = MODEL_TYPES[model_type][component]
                config = get_family(class_name).config_cls.from_diffusers(values)
            config = dataclasses.replace(config, **runtime)
            converter = _converter_of(config)
            hook = _import_hook(layout, prefix, converter)
            params, _ = _import(converter, config, part, hook, converter.renames, source, False, allow_nonfinite)
            out[component] = (make_module(config), params)
    if not out:
        raise CheckpointError(f"{path}: holds no tensors of a {model_type!r} model's components")
    return out


def _import_hook(layout: str, prefix: str, converter: Converter) -> ImportHook:
    """The file's keys under `prefix` -> diffusers keys, then the family converter's own import hook."""
    to_diffusers = _STREAMS[layout][0]

    def hook(config: Any, items: Items, source: str) -> Iterator[tuple[str, np.ndarray]]:
        items = to_diffusers(config, items, prefix, source)
        return items if converter.import_hook is None else converter.import_hook(config, items, source)

    return hook


class _Part:
    """The tensors of one component (the file's keys under its prefix), each read when reached."""

    def __init__(self, tensors: Tensors, keys: list[str]):
        self._tensors, self._keys = tensors, keys

    def __len__(self) -> int:
        return len(self._keys)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for key in self._keys:
            yield key, self._tensors[key]


def save_single_file(path: str | os.PathLike, components: Mapping[str, tuple[nn.Module, Params]], *,
                     model_type: str) -> Path:
    """Writes `components` ({'unet': (module, params), ...}, as `load_single_file` returns) as one
    .safetensors file in the original layout of `model_type`; returns its path.

    Tensors keep the dtype of the params. An SD 2.x text encoder is written with the layers it has (23; the
    original file's unused 24th layer is not recreated). Params that do not fit their module's config raise
    CheckpointError before anything is written.
    """
    path = Path(path)
    _check_model_type(model_type, str(path))
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: save_single_file writes .safetensors files")
    layouts = LAYOUTS[model_type]
    bad = sorted(components.keys() - layouts.keys())
    if bad:
        raise ValueError(f"{path}: a {model_type!r} checkpoint has no component {bad} (it has {', '.join(layouts)})")
    sd: StateDict = {}
    for component, (module, params) in components.items():
        config = module.config
        converter = _converter_of(config)
        params = nn.meta.unbox(params)
        if set(params) == {"params"}:
            params = params["params"]
        what = f"params passed to save_single_file for {component} ({converter.class_name})"
        check_not_quantized(params, f"{path}: {component}")
        mismatch = rules.compare({p: np.shape(v) for p, v in rules.flatten(params).items()}, abstract_params(config))
        if mismatch:
            raise CheckpointError("\n".join(mismatch.lines(what)))
        part = rules.flax_to_torch(params, literal_names=converter.literal_names)
        if converter.export_hook is not None:
            part = converter.export_hook(config, part)
        prefix, layout = layouts[component]
        sd.update({prefix + k: v for k, v in _STREAMS[layout][1](config, part).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(path, sd)
    return path
