"""Generic torch <-> flax state-dict rules, shared by import and export of every model family.

A diffax parameter tree mirrors the diffusers state dict: `down_blocks.0.resnets.1.conv1.weight` is
`params['down_blocks_0']['resnets_1']['conv1']['kernel']`. The generic rules are:

  torch                         flax                 tensor
  <conv>.weight   [O, I, kh, kw] <conv>/kernel        [kh, kw, I, O]
  <linear>.weight [O, I]         <linear>/kernel      [I, O]
  <norm>.weight   [C]            <norm>/scale         [C]
  <embedding>.weight [N, C]      <embedding>/embedding [N, C]   (keys matched by `embedding_keys`)
  *.bias                         */bias

A family converter (`diffax.convert.registry.Converter`) adds only its exceptions: `renames` (regex
substitutions on torch keys applied before the generic rules), the embedding key patterns, and hooks for
what regexes cannot say (a fused qkv split, tensors repeated per block).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Mapping

import numpy as np

from diffax.convert.io import CheckpointError, StateDict

Params = dict[str, Any]

# torch module names that themselves end in _<digits>; every other `name_<N>` flax segment is `name.<N>`.
LITERAL_NAMES = frozenset({"linear_1", "linear_2", "linear_3", "proj_out_1", "proj_out_2"})
# A module index in a torch key ('down_blocks.0'); ASCII only, as str.isdigit would take '²'.
_INDEX = re.compile(r"[0-9]+")


def key_to_path(key: str) -> tuple[str, ...]:
    """'down_blocks.0.resnets.1.conv1.weight' -> ('down_blocks_0', 'resnets_1', 'conv1', 'weight')."""
    path: list[str] = []
    for part in key.split("."):
        if _INDEX.fullmatch(part) and path:
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    return tuple(path)


def path_to_key(path: Iterable[str], literal_names: frozenset[str] = LITERAL_NAMES) -> str:
    """Inverse of `key_to_path`: ('down_blocks_0', 'conv1', 'weight') -> 'down_blocks.0.conv1.weight'."""
    parts = []
    for seg in path:
        indices = []  # 'to_out_0_1' is to_out.0.1: peel indices until a literal name or none is left
        while seg not in literal_names and (m := re.fullmatch(r"(.+)_([0-9]+)", seg)):
            seg = m.group(1)
            indices.insert(0, m.group(2))
        parts.extend([seg, *indices])
    return ".".join(parts)


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(re.search(p, key) for p in patterns)


def tensor_to_flax(key: str, value: np.ndarray, *, embedding_keys: Iterable[str] = (),
                   source: str = "state dict") -> tuple[tuple[str, ...], np.ndarray]:
    """(flax path, tensor) of one torch tensor by the generic rules; the tensor may be a transposed view."""
    *path, leaf = key_to_path(key)
    if leaf == "weight":
        if _matches(key, embedding_keys):
            leaf = "embedding"
        elif value.ndim == 4:
            leaf, value = "kernel", value.transpose(2, 3, 1, 0)
        elif value.ndim == 2:
            leaf, value = "kernel", value.T
        elif value.ndim == 1:
            leaf = "scale"
        else:
            raise CheckpointError(f"{source}: {key!r} has a {value.ndim}-d weight {value.shape}; "
                                  f"no generic rule converts it")
    return (*path, leaf), value


def tensor_to_torch(path: Iterable[str], value: Any, *,
                    literal_names: frozenset[str] = LITERAL_NAMES) -> tuple[str, np.ndarray]:
    """(torch key, tensor) of one flax leaf; inverse of `tensor_to_flax` (the tensor may be a view)."""
    *prefix, leaf = path
    value = np.asarray(value)
    if leaf == "kernel":
        value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        leaf = "weight"
    elif leaf in ("scale", "embedding"):
        leaf = "weight"
    return path_to_key((*prefix, leaf), literal_names), value


def torch_to_flax(state_dict: Mapping[str, np.ndarray], *, embedding_keys: Iterable[str] = (),
                  source: str = "state dict") -> Params:
    """Nested flax params from a torch state dict using the generic rules (see module docstring).

    `embedding_keys`: regexes for keys of nn.Embedding weights (kept [N, C], named 'embedding').
    `source` names the file in error messages.
    """
    embedding_keys = tuple(embedding_keys)
    flat, keys = {}, {}
    for key, value in state_dict.items():
        path, value = tensor_to_flax(key, value, embedding_keys=embedding_keys, source=source)
        if path in keys:
            raise CheckpointError(f"{source}: {keys[path]!r} and {key!r} both convert to {'/'.join(path)}")
        flat[path], keys[path] = np.asarray(value, order="C"), key  # keeps 0-d (ascontiguousarray does not)
    for path, key in keys.items():  # a tensor's path cannot also be a module holding other tensors
        for i in range(1, len(path)):
            if path[:i] in keys:
                raise CheckpointError(f"{source}: {keys[path[:i]]!r} is a tensor, but {key!r} puts tensors "
                                      f"under it")
    return unflatten(flat)


def flax_to_torch(params: Params, *, literal_names: frozenset[str] = LITERAL_NAMES) -> StateDict:
    """A torch state dict from nested flax params; inverse of `torch_to_flax`. Values are numpy views of
    the params where a transpose suffices (writers make each contiguous as they write it)."""
    return dict(tensor_to_torch(path, value, literal_names=literal_names) for path, value in flatten(params).items())


def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """{('a', 'b'): leaf} from a nested dict."""
    out: dict[tuple[str, ...], Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> Params:
    """Nested dict from {('a', 'b'): leaf}."""
    out: Params = {}
    for path, v in flat.items():
        node = out
        for seg in path[:-1]:
            node = node.setdefault(seg, {})
        node[path[-1]] = v
    return out


def rename(key: str, renames: Iterable[tuple[str, str]]) -> str:
    """`key` after the regex substitutions `renames`, applied in order."""
    for pattern, repl in renames:
        key = re.sub(pattern, repl, key)
    return key


def apply_renames(state_dict: Mapping[str, np.ndarray], renames: Iterable[tuple[str, str]]) -> StateDict:
    """Regex substitutions on every key, in order; the family-specific part of a conversion."""
    renames = tuple(renames)
    return {rename(key, renames): value for key, value in state_dict.items()}


@dataclasses.dataclass
class Mismatch:
    """How a checkpoint differs from a model: model parameters it lacks, tensors the model has no place
    for, and tensors of the wrong shape (all as flax paths 'a/b/kernel')."""
    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    shapes: list[str] = dataclasses.field(default_factory=list)  # 'path: file (..) vs model (..)'

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.shapes)

    def lines(self, source: str) -> list[str]:
        """One line per kind of mismatch, each naming `source` (up to eight keys shown per kind)."""
        out = []
        for title, items in (("missing", self.missing), ("unexpected", self.unexpected),
                             ("shape mismatch", self.shapes)):
            if items:
                items = sorted(items)
                shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
                out.append(f"{source}: {title}: {shown}")
        return out


def compare(shapes: Mapping[tuple[str, ...], tuple[int, ...]], reference: Params) -> Mismatch:
    """The `Mismatch` of flat {path: shape} against a reference tree (arrays or `jax.ShapeDtypeStruct`s)."""
    want = flatten(reference)
    return Mismatch(
        missing=["/".join(p) for p in want.keys() - shapes.keys()],
        unexpected=["/".join(p) for p in shapes.keys() - want.keys()],
        shapes=[f"{'/'.join(p)}: file {tuple(shapes[p])} vs model {tuple(want[p].shape)}"
                for p in want.keys() & shapes.keys() if tuple(shapes[p]) != tuple(want[p].shape)])


def check_against(params: Params, reference: Params, *, source: str) -> Params:
    """Checks converted `params` has exactly the keys and shapes of `reference` (initialised arrays or
    `jax.eval_shape` structs) and casts to the reference dtypes. The error names the file and, one line
    per kind, every mismatched key."""
    got, want = flatten(params), flatten(reference)
    mismatch = compare({p: np.shape(v) for p, v in got.items()}, reference)
    if mismatch:
        raise CheckpointError("\n".join(mismatch.lines(source)))
    return unflatten({p: np.asarray(got[p]).astype(want[p].dtype) for p in want})
