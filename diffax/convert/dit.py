"""DiT's conversion table: diffusers' `DiTTransformer2DModel` folders and the reference code's .pt state
dict (facebookresearch/DiT), both to and from the diffax tree.

    module, params = diffax.convert.load("DiT-XL-2-256x256.pt")          # reference (recognised by its keys)
    module, params = diffax.convert.load("dit-xl-2-256")                 # diffusers pipeline: transformer/
    diffax.convert.save("out/transformer", module, params)
    diffax.convert.save("out/DiT-XL-2-256x256.pt", module, params, layout="reference")

The diffax tree (see `diffax.models.dit`) is diffusers' naming with the timestep/label embedders stored
once under `emb/`. So the diffusers route is the generic rules of `diffax.convert.rules` plus two hooks:
import keeps one copy of the embedders (`transformer_blocks.N.norm1.emb.` -> `emb.`) after checking that
every block holds the same (diffusers repeats them in every block and only uses block 0's; a model whose
copies differ cannot be represented here and is refused, naming the first differing key), and export
copies them back into every block.

The reference layout maps module by module (x_embedder -> pos_embed, blocks.N.attn.qkv split into
to_q/to_k/to_v, final_layer.adaLN_modulation.1 -> proj_out_1, ...); its `pos_embed` buffer (the fixed
sin-cos table) is checked against ours and used to read the training resolution.
"""
from __future__ import annotations

import math
import re
from typing import Collection, Iterator

import numpy as np

from diffax.convert.io import CheckpointError, StateDict, Tensors
from diffax.convert.registry import Converter, Items, ReferenceLayout, register
from diffax.convert.rules import apply_renames, rename
from diffax.models.dit import SIZES, DiTConfig, sincos_pos_embed_2d

EMBEDDING_KEYS = (r"embedding_table\.weight$",)

# reference key prefix <-> diffax torch-style key prefix (after the qkv split); {i} is a block index, {qkv}
# one of to_q / to_k / to_v. One table, read in both directions, so import and export cannot drift apart.
_PREFIXES = (
    ("x_embedder.", "pos_embed."),
    ("t_embedder.mlp.0.", "emb.timestep_embedder.linear_1."),
    ("t_embedder.mlp.2.", "emb.timestep_embedder.linear_2."),
    ("y_embedder.", "emb.class_embedder."),
    ("blocks.{i}.attn.proj.", "transformer_blocks.{i}.attn1.to_out.0."),
    ("blocks.{i}.attn.{qkv}.", "transformer_blocks.{i}.attn1.{qkv}."),
    ("blocks.{i}.mlp.fc1.", "transformer_blocks.{i}.ff.net.0.proj."),
    ("blocks.{i}.mlp.fc2.", "transformer_blocks.{i}.ff.net.2."),
    ("blocks.{i}.adaLN_modulation.1.", "transformer_blocks.{i}.norm1.linear."),
    ("final_layer.adaLN_modulation.1.", "proj_out_1."),
    ("final_layer.linear.", "proj_out_2."),
)
_PLACEHOLDERS = (("{i}", r"(\d+)"), ("{qkv}", r"(to_[qkv])"))


def _prefix_rename(source: str, target: str) -> tuple[str, str]:
    """A (regex, replacement) pair renaming the `source` prefix template to the `target` one."""
    pattern, replacement, group = "^" + re.escape(source), target, 0
    for name, regex in _PLACEHOLDERS:
        if name in source:
            group += 1
            pattern = pattern.replace(re.escape(name), regex)
            replacement = replacement.replace(name, f"\\{group}")
    return pattern, replacement


_REFERENCE_TO_DIFFAX = tuple(_prefix_rename(ref, ours) for ref, ours in _PREFIXES)
_DIFFAX_TO_REFERENCE = tuple(_prefix_rename(ours, ref) for ref, ours in _PREFIXES)

_EMB_COPY = re.compile(r"^transformer_blocks\.(\d+)\.norm1\.emb\.(.+)$")
# hidden_size -> num_heads of the paper's sizes; num_heads cannot be read from tensor shapes.
_HEADS = {hidden: heads for hidden, _, heads in SIZES.values()}
_QKV = re.compile(r"\.attn\.qkv\.(weight|bias)$")


# ----------------------------------------------------------------------------- reference layout


def is_reference(keys: Collection[str]) -> bool:
    """Whether tensor names are the reference layout's (diffusers' DiT says `pos_embed.proj`)."""
    return "x_embedder.proj.weight" in keys


def reference_config(tensors: Tensors, *, source: str = "state dict", input_size: int | None = None,
                     num_heads: int | None = None) -> DiTConfig:
    """DiTConfig of a reference-layout checkpoint, read from tensor shapes.

    The training resolution comes from the `pos_embed` buffer when present, else from `input_size`;
    `num_heads` is needed only for a hidden size that is not one of the paper's (384, 768, 1024, 1152).
    The label table is taken to include the null class (the reference default class_dropout_prob 0.1).
    """
    required = ("x_embedder.proj.weight", "y_embedder.embedding_table.weight", "final_layer.linear.weight",
                "blocks.0.mlp.fc1.weight")
    for key in required:
        if key not in tensors:
            raise CheckpointError(f"{source}: not a reference DiT state dict (no {key!r})")
    for name, value in (("input_size", input_size), ("num_heads", num_heads)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{source}: {name}={value!r} is not a positive int")

    def shape(key: str, rank: int) -> tuple[int, ...]:
        value = tensors.shape(key)
        if len(value) != rank or 0 in value:
            raise CheckpointError(f"{source}: {key} has shape {value}; a reference DiT's is {rank}-d and non-empty")
        return value

    hidden, in_ch, patch, patch_w = shape("x_embedder.proj.weight", 4)
    if patch != patch_w:
        raise CheckpointError(f"{source}: x_embedder.proj.weight has a {patch}x{patch_w} patch; DiT's is square")
    depth = 1 + max(int(m.group(1)) for k in tensors.keys() if (m := re.match(r"blocks\.(\d+)\.", k)))
    if num_heads is None:
        if hidden not in _HEADS:
            raise CheckpointError(f"{source}: hidden size {hidden} is not a paper size; pass num_heads "
                                  f"(the head count cannot be read from the weights)")
        num_heads = _HEADS[hidden]
    outputs = shape("final_layer.linear.weight", 2)[0]
    out_ch, rem = divmod(outputs, patch * patch)
    if rem or out_ch not in (in_ch, 2 * in_ch):
        raise CheckpointError(f"{source}: final_layer.linear.weight has {outputs} outputs; expected "
                              f"{patch}*{patch}*{in_ch} or twice that (learned sigma)")
    if "pos_embed" in tensors:
        tokens = shape("pos_embed", 3)[1]
        grid = math.isqrt(tokens)
        if grid * grid != tokens:
            raise CheckpointError(f"{source}: pos_embed has {tokens} positions, not a square grid")
        if input_size is not None and input_size != grid * patch:
            raise CheckpointError(f"{source}: pos_embed is for input_size {grid * patch}, but input_size="
                                  f"{input_size} was given")
        input_size = grid * patch
    elif input_size is None:
        raise CheckpointError(f"{source}: no pos_embed buffer to read the training resolution from; pass "
                              f"input_size (latent size, e.g. 32 for 256x256 images)")
    try:
        return DiTConfig.from_reference(
            input_size=input_size, patch_size=patch, in_channels=in_ch, hidden_size=hidden, depth=depth,
            num_heads=num_heads, mlp_ratio=shape("blocks.0.mlp.fc1.weight", 2)[0] / hidden,
            class_dropout_prob=0.1, num_classes=shape("y_embedder.embedding_table.weight", 2)[0] - 1,
            learn_sigma=out_ch == 2 * in_ch)
    except CheckpointError:
        raise
    except ValueError as e:  # the config's own checks: name the file they came from
        raise CheckpointError(f"{source}: {e}") from None


def import_reference(config: DiTConfig, items: Items, source: str) -> Iterator[tuple[str, np.ndarray]]:
    """Reference keys -> the diffax tree's torch-style keys: fused qkv split, `pos_embed` checked and dropped."""
    for key, value in items:
        if key == "pos_embed":
            pos = np.asarray(value, np.float32)[0]
            grid = config.input_size // config.patch_size
            want = sincos_pos_embed_2d(config.hidden_size, grid, grid, base_size=grid)
            if pos.shape != want.shape or not np.allclose(pos, want, atol=1e-5):
                raise CheckpointError(f"{source}: pos_embed is not the fixed 2-D sin-cos table this DiT uses "
                                      f"(shape {pos.shape}, expected {want.shape})")
        elif _QKV.search(key):
            if value.ndim == 0 or value.shape[0] % 3:
                raise CheckpointError(f"{source}: {key} has shape {value.shape}, not rows of q, k and v")
            for name, part in zip(("to_q", "to_k", "to_v"), np.split(value, 3, axis=0)):
                yield rename(key.replace(".qkv.", f".{name}."), _REFERENCE_TO_DIFFAX), part
        else:
            yield rename(key, _REFERENCE_TO_DIFFAX), value


def export_reference(config: DiTConfig, sd: StateDict) -> StateDict:
    """The reference state dict (qkv fused, `pos_embed` buffer included) that the reference `DiT` loads
    with strict `load_state_dict`."""
    sd = apply_renames(sd, _DIFFAX_TO_REFERENCE)
    for i in range(config.depth):
        for leaf in ("weight", "bias"):
            parts = [sd.pop(f"blocks.{i}.attn.{name}.{leaf}") for name in ("to_q", "to_k", "to_v")]
            sd[f"blocks.{i}.attn.qkv.{leaf}"] = np.concatenate(parts, axis=0)
    grid = config.input_size // config.patch_size
    sd["pos_embed"] = sincos_pos_embed_2d(config.hidden_size, grid, grid, base_size=grid)[None]
    return sd


# ----------------------------------------------------------------------------- diffusers layout


def import_diffusers(config: DiTConfig, items: Items, source: str) -> Iterator[tuple[str, np.ndarray]]:
    """Keeps the first copy of the per-block embedders (as `emb.*`) after checking that every block
    holds the same; drops the `pos_embed.pos_embed` buffer should a file hold it."""
    first: dict[str, tuple[str, np.ndarray]] = {}  # embedder tensor name -> (key, value) of its first copy
    seen: dict[int, set[str]] = {i: set() for i in range(config.depth)}
    for key, value in items:
        m = _EMB_COPY.match(key)
        if key == "pos_embed.pos_embed":
            continue
        if not (m and int(m.group(1)) < config.depth):
            yield key, value
            continue
        block, name = int(m.group(1)), m.group(2)
        seen[block].add(name)
        if name not in first:
            first[name] = key, value
            yield f"emb.{name}", value
            continue
        first_key, a = first[name]
        a, b = np.asarray(a, np.float32), np.asarray(value, np.float32)
        if a.shape != b.shape or not np.array_equal(a, b):
            diff = "shape differs" if a.shape != b.shape else f"max abs diff {np.abs(a - b).max():.3g}"
            raise CheckpointError(
                f"{source}: {key} differs from {first_key} ({diff}). diffusers keeps a copy of the "
                f"timestep/label embedders in every block but only uses block 0's; diffax stores them once, "
                f"so a model whose copies were trained apart cannot be converted")
    for block in range(config.depth):
        for name in sorted(first.keys() - seen[block]):
            raise CheckpointError(f"{source}: transformer_blocks.{block}.norm1.emb.{name} is missing; every "
                                  f"block of a diffusers DiT holds the same timestep/label embedders")


def export_diffusers(config: DiTConfig, sd: StateDict) -> StateDict:
    """Copies the embedders into every block, as `DiTTransformer2DModel` holds them (the same arrays, so
    no memory is added)."""
    sd = dict(sd)
    for key in [k for k in sd if k.startswith("emb.")]:
        value = sd.pop(key)
        for i in range(config.depth):
            sd[f"transformer_blocks.{i}.norm1.{key}"] = value
    return sd


CONVERTER = register(Converter(
    "DiTTransformer2DModel", embedding_keys=EMBEDDING_KEYS, import_hook=import_diffusers,
    export_hook=export_diffusers,
    reference=ReferenceLayout(detect=is_reference, read_config=reference_config, import_hook=import_reference,
                              export_hook=export_reference, options=("input_size", "num_heads"))))
