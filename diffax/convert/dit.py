"""DiT weights between diffax and the two PyTorch layouts: the reference code's .pt state dict
(facebookresearch/DiT) and diffusers' `DiTTransformer2DModel` folders.

The diffax tree (see `diffax.models.dit`) is diffusers' naming with the timestep/label embedders stored
once under `emb/`. So the diffusers route is the generic rules of `diffax.convert.rules` plus one rename
(`transformer_blocks.0.norm1.emb.` <-> `emb.`) and de-duplication: diffusers repeats the embedders in every
block and only uses block 0's copy. A converted reference checkpoint has identical copies; a model whose
copies differ cannot be represented here and is refused, naming the first differing key.

The reference layout maps module by module (x_embedder -> pos_embed, blocks.N.attn.qkv split into
to_q/to_k/to_v, final_layer.adaLN_modulation.1 -> proj_out_1, ...); its `pos_embed` buffer (the fixed
sin-cos table) is checked against ours and used to read the training resolution.

    config, params = load_dit("DiT-XL-2-256x256.pt")        # reference
    config, params = load_dit("dit-xl-2-256/transformer")   # diffusers folder (or the pipeline folder)
    save_dit_diffusers("out/transformer", config, params)
    save_dit_reference("out/DiT-XL-2-256x256.pt", config, params)
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import numpy as np

from diffax.convert.io import CheckpointError, StateDict, read_state_dict, write_safetensors
from diffax.convert.rules import Params, apply_renames, check_against, flax_to_torch, torch_to_flax
from diffax.models.dit import SIZES, DiTConfig, sincos_pos_embed_2d
from diffax.models.registry import abstract_params

EMBEDDING_KEYS = (r"embedding_table\.weight$",)

# reference key prefix -> diffax torch-style key prefix (after the qkv split).
_REFERENCE_TO_DIFFAX = (
    (r"^x_embedder\.", "pos_embed."),
    (r"^t_embedder\.mlp\.0\.", "emb.timestep_embedder.linear_1."),
    (r"^t_embedder\.mlp\.2\.", "emb.timestep_embedder.linear_2."),
    (r"^y_embedder\.", "emb.class_embedder."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"transformer_blocks.\1.attn1.to_out.0."),
    (r"^blocks\.(\d+)\.attn\.(to_[qkv])\.", r"transformer_blocks.\1.attn1.\2."),
    (r"^blocks\.(\d+)\.mlp\.fc1\.", r"transformer_blocks.\1.ff.net.0.proj."),
    (r"^blocks\.(\d+)\.mlp\.fc2\.", r"transformer_blocks.\1.ff.net.2."),
    (r"^blocks\.(\d+)\.adaLN_modulation\.1\.", r"transformer_blocks.\1.norm1.linear."),
    (r"^final_layer\.adaLN_modulation\.1\.", "proj_out_1."),
    (r"^final_layer\.linear\.", "proj_out_2."),
)
_DIFFAX_TO_REFERENCE = (
    (r"^pos_embed\.", "x_embedder."),
    (r"^emb\.timestep_embedder\.linear_1\.", "t_embedder.mlp.0."),
    (r"^emb\.timestep_embedder\.linear_2\.", "t_embedder.mlp.2."),
    (r"^emb\.class_embedder\.", "y_embedder."),
    (r"^transformer_blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.attn.proj."),
    (r"^transformer_blocks\.(\d+)\.attn1\.(to_[qkv])\.", r"blocks.\1.attn.\2."),
    (r"^transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.", r"blocks.\1.mlp.fc1."),
    (r"^transformer_blocks\.(\d+)\.ff\.net\.2\.", r"blocks.\1.mlp.fc2."),
    (r"^transformer_blocks\.(\d+)\.norm1\.linear\.", r"blocks.\1.adaLN_modulation.1."),
    (r"^proj_out_1\.", "final_layer.adaLN_modulation.1."),
    (r"^proj_out_2\.", "final_layer.linear."),
)
_EMB_COPY = re.compile(r"^transformer_blocks\.(\d+)\.norm1\.emb\.(.+)$")
# hidden_size -> num_heads of the paper's sizes; num_heads cannot be read from tensor shapes.
_HEADS = {hidden: heads for hidden, _, heads in SIZES.values()}


def _plain(params: Params) -> Params:
    params = nn.meta.unbox(params)
    return params["params"] if set(params) == {"params"} else params


def _load_into(config: DiTConfig, sd: StateDict, source: str) -> Params:
    params = torch_to_flax(sd, embedding_keys=EMBEDDING_KEYS, source=source)
    return check_against(params, abstract_params(config), source=source)


# ----------------------------------------------------------------------------- reference layout


def reference_config(sd: Mapping[str, np.ndarray], *, source: str = "state dict", input_size: int | None = None,
                     num_heads: int | None = None) -> DiTConfig:
    """DiTConfig of a reference-layout state dict, read from tensor shapes.

    The training resolution comes from the `pos_embed` buffer when present, else from `input_size`;
    `num_heads` is needed only for a hidden size that is not one of the paper's (384, 768, 1024, 1152).
    The label table is taken to include the null class (the reference default class_dropout_prob 0.1).
    """
    required = ("x_embedder.proj.weight", "y_embedder.embedding_table.weight", "final_layer.linear.weight",
                "blocks.0.mlp.fc1.weight")
    for key in required:
        if key not in sd:
            raise CheckpointError(f"{source}: not a reference DiT state dict (no {key!r})")
    hidden, in_ch, patch, _ = sd["x_embedder.proj.weight"].shape
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    if num_heads is None:
        if hidden not in _HEADS:
            raise CheckpointError(f"{source}: hidden size {hidden} is not a paper size; pass num_heads "
                                  f"(the head count cannot be read from the weights)")
        num_heads = _HEADS[hidden]
    out_ch, rem = divmod(sd["final_layer.linear.weight"].shape[0], patch * patch)
    if rem or out_ch not in (in_ch, 2 * in_ch):
        raise CheckpointError(f"{source}: final_layer.linear.weight has {sd['final_layer.linear.weight'].shape[0]}"
                              f" outputs; expected {patch}*{patch}*{in_ch} or twice that (learned sigma)")
    if "pos_embed" in sd:
        grid = int(round(np.sqrt(sd["pos_embed"].shape[1])))
        if input_size is not None and input_size != grid * patch:
            raise CheckpointError(f"{source}: pos_embed is for input_size {grid * patch}, but input_size="
                                  f"{input_size} was given")
        input_size = grid * patch
    elif input_size is None:
        raise CheckpointError(f"{source}: no pos_embed buffer to read the training resolution from; pass "
                              f"input_size (latent size, e.g. 32 for 256x256 images)")
    return DiTConfig.from_reference(input_size=input_size, patch_size=patch, in_channels=in_ch, hidden_size=hidden,
                     depth=depth, num_heads=num_heads, mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
                     class_dropout_prob=0.1, num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1,
                     learn_sigma=out_ch == 2 * in_ch)


def reference_to_params(config: DiTConfig, sd: Mapping[str, np.ndarray], *, source: str = "state dict") -> Params:
    """diffax params from a reference-layout state dict (fused qkv split, pos_embed checked and dropped)."""
    sd = dict(sd)
    if "pos_embed" in sd:
        pos = np.asarray(sd.pop("pos_embed"), np.float32)[0]
        grid = config.input_size // config.patch_size
        want = sincos_pos_embed_2d(config.hidden_size, grid, grid, base_size=grid)
        if pos.shape != want.shape or not np.allclose(pos, want, atol=1e-5):
            raise CheckpointError(f"{source}: pos_embed is not the fixed 2-D sin-cos table this DiT uses "
                                  f"(shape {pos.shape}, expected {want.shape})")
    for key in [k for k in sd if re.search(r"\.attn\.qkv\.(weight|bias)$", k)]:
        fused = sd.pop(key)
        if fused.shape[0] % 3:
            raise CheckpointError(f"{source}: {key} has {fused.shape[0]} rows, not a multiple of 3")
        for name, part in zip(("to_q", "to_k", "to_v"), np.split(fused, 3, axis=0)):
            sd[key.replace(".qkv.", f".{name}.")] = part
    return _load_into(config, apply_renames(sd, _REFERENCE_TO_DIFFAX), source)


def params_to_reference(config: DiTConfig, params: Params) -> StateDict:
    """Reference-layout state dict (qkv fused, `pos_embed` buffer included) that the reference `DiT`
    loads with strict `load_state_dict`."""
    sd = apply_renames(flax_to_torch(_plain(params)), _DIFFAX_TO_REFERENCE)
    for i in range(config.depth):
        for leaf in ("weight", "bias"):
            parts = [sd.pop(f"blocks.{i}.attn.{name}.{leaf}") for name in ("to_q", "to_k", "to_v")]
            sd[f"blocks.{i}.attn.qkv.{leaf}"] = np.concatenate(parts, axis=0)
    grid = config.input_size // config.patch_size
    sd["pos_embed"] = sincos_pos_embed_2d(config.hidden_size, grid, grid, base_size=grid)[None]
    return sd


# ----------------------------------------------------------------------------- diffusers layout


def _dedupe_embedders(sd: Mapping[str, np.ndarray], depth: int, source: str) -> StateDict:
    """Keep block 0's copy of the per-block embedders, after checking every other block holds the same."""
    out: StateDict = {}
    copies: dict[int, dict[str, np.ndarray]] = {i: {} for i in range(depth)}
    for key, value in sd.items():
        m = _EMB_COPY.match(key)
        if m and int(m.group(1)) < depth:
            copies[int(m.group(1))][m.group(2)] = value
        else:
            out[key] = value
    first = copies[0]
    for i in range(1, depth):
        for name in sorted(first.keys() | copies[i].keys()):
            key = f"transformer_blocks.{i}.norm1.emb.{name}"
            if name not in copies[i] or name not in first:
                missing = key if name not in copies[i] else f"transformer_blocks.0.norm1.emb.{name}"
                raise CheckpointError(f"{source}: {missing} is missing; every block of a diffusers DiT holds "
                                      f"the same timestep/label embedders")
            a, b = np.asarray(first[name], np.float32), np.asarray(copies[i][name], np.float32)
            if a.shape != b.shape or not np.array_equal(a, b):
                diff = "shape differs" if a.shape != b.shape else f"max abs diff {np.abs(a - b).max():.3g}"
                raise CheckpointError(
                    f"{source}: {key} differs from transformer_blocks.0's copy ({diff}). diffusers keeps a copy "
                    f"of the timestep/label embedders in every block but only uses block 0's; diffax stores "
                    f"them once, so a model whose copies were trained apart cannot be converted")
    out.update({f"emb.{name}": value for name, value in first.items()})
    return out


def diffusers_to_params(config: DiTConfig, sd: Mapping[str, np.ndarray], *, source: str = "state dict") -> Params:
    """diffax params from a `DiTTransformer2DModel` state dict (embedder copies checked and merged)."""
    sd = {k: v for k, v in sd.items() if k != "pos_embed.pos_embed"}  # a buffer, if ever saved
    return _load_into(config, _dedupe_embedders(sd, config.depth, source), source)


def params_to_diffusers(config: DiTConfig, params: Params) -> StateDict:
    """A `DiTTransformer2DModel` state dict: the embedders are copied into every block."""
    sd = flax_to_torch(_plain(params))
    for key in [k for k in sd if k.startswith("emb.")]:
        value = sd.pop(key)
        for i in range(config.depth):
            sd[f"transformer_blocks.{i}.norm1.{key}"] = value
    return sd


# ----------------------------------------------------------------------------- files


def load_dit(path: str | os.PathLike, *, input_size: int | None = None,
             num_heads: int | None = None) -> tuple[DiTConfig, Params]:
    """(config, params) from a diffusers DiT folder (config.json + weights; a pipeline folder's
    `transformer/` is found) or a reference .pt / .safetensors file. `input_size` and `num_heads` are only
    read for reference files that lack the information (see `reference_config`)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").exists() and (path / "transformer" / "config.json").exists():
            path = path / "transformer"
        config = DiTConfig.from_diffusers(path)
        return config, diffusers_to_params(config, read_state_dict(path), source=str(path))
    sd = read_state_dict(path)
    if "pos_embed.proj.weight" in sd:
        raise CheckpointError(f"{path}: a diffusers DiT state dict; pass the folder holding it and its "
                              f"config.json instead")
    config = reference_config(sd, source=str(path), input_size=input_size, num_heads=num_heads)
    return config, reference_to_params(config, sd, source=str(path))


def save_dit_diffusers(folder: str | os.PathLike, config: DiTConfig, params: Params) -> None:
    """Write a diffusers `DiTTransformer2DModel` folder: config.json and
    diffusion_pytorch_model.safetensors, loadable with `DiTTransformer2DModel.from_pretrained(folder)`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = config.to_diffusers()
    write_safetensors(folder / "diffusion_pytorch_model.safetensors", params_to_diffusers(config, params),
                      metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def save_dit_reference(path: str | os.PathLike, config: DiTConfig, params: Params) -> None:
    """Write the reference layout: a torch .pt state dict if the suffix is .pt, else .safetensors."""
    path = Path(path)
    sd = params_to_reference(config, params)
    if path.suffix != ".pt":
        write_safetensors(path, sd)
        return
    import torch

    def to_torch(a: np.ndarray) -> Any:
        if a.dtype.name == "bfloat16":  # numpy has no bf16; reinterpret the bits
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(np.ascontiguousarray(a))

    torch.save({k: to_torch(v) for k, v in sd.items()}, path)


def main(argv: list[str] | None = None) -> None:
    """Command line: convert a DiT checkpoint between the reference and diffusers layouts (and diffax's
    plain numpy tree, which `load_dit` returns)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m diffax.convert.dit", description=main.__doc__)
    parser.add_argument("src", help="reference .pt/.safetensors file, or diffusers DiT (or pipeline) folder")
    parser.add_argument("dst", help="output: a folder for --to diffusers, a .pt/.safetensors file for reference")
    parser.add_argument("--to", choices=("diffusers", "reference"), required=True)
    parser.add_argument("--input_size", type=int, help="latent size, for reference files without pos_embed")
    parser.add_argument("--num_heads", type=int, help="head count, for non-paper hidden sizes")
    args = parser.parse_args(argv)
    config, params = load_dit(args.src, input_size=args.input_size, num_heads=args.num_heads)
    if args.to == "diffusers":
        save_dit_diffusers(args.dst, config, params)
    else:
        save_dit_reference(args.dst, config, params)
    print(f"{args.src} -> {args.dst} ({args.to}): {config}")


if __name__ == "__main__":
    main()
