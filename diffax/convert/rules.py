"""Generic torch <-> flax state-dict rules, shared by import and export of every model family.

A diffax parameter tree mirrors the diffusers state dict: `down_blocks.0.resnets.1.conv1.weight` is
`params['down_blocks_0']['resnets_1']['conv1']['kernel']`. The generic rules are:

  torch                         flax                 tensor
  <conv>.weight   [O, I, kh, kw] <conv>/kernel        [kh, kw, I, O]
  <linear>.weight [O, I]         <linear>/kernel      [I, O]
  <norm>.weight   [C]            <norm>/scale         [C]
  <embedding>.weight [N, C]      <embedding>/embedding [N, C]   (keys matched by `embedding_keys`)
  *.bias                         */bias

A family converter adds only its exceptions: `renames` (regex substitutions on torch keys applied before
the generic rules, e.g. a fused qkv split or a reference-layout name) and the embedding key patterns.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import numpy as np

from diffax.convert.io import CheckpointError, StateDict

Params = dict[str, Any]

# torch module names that themselves end in _<digits>; every other `name_<N>` flax segment is `name.<N>`.
LITERAL_NAMES = frozenset({"linear_1", "linear_2", "linear_3", "proj_out_1", "proj_out_2"})


def key_to_path(key: str) -> tuple[str, ...]:
    """'down_blocks.0.resnets.1.conv1.weight' -> ('down_blocks_0', 'resnets_1', 'conv1', 'weight')."""
    path: list[str] = []
    for part in key.split("."):
        if part.isdigit() and path:
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    return tuple(path)


def path_to_key(path: Iterable[str], literal_names: frozenset[str] = LITERAL_NAMES) -> str:
    """Inverse of `key_to_path`: ('down_blocks_0', 'conv1', 'weight') -> 'down_blocks.0.conv1.weight'."""
    parts = []
    for seg in path:
        m = re.fullmatch(r"(.+)_(\d+)", seg)
        parts.append(f"{m.group(1)}.{m.group(2)}" if m and seg not in literal_names else seg)
    return ".".join(parts)


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(re.search(p, key) for p in patterns)


def torch_to_flax(state_dict: Mapping[str, np.ndarray], *, embedding_keys: Iterable[str] = (),
                  source: str = "state dict") -> Params:
    """Nested flax params from a torch state dict using the generic rules (see module docstring).

    `embedding_keys`: regexes for keys of nn.Embedding weights (kept [N, C], named 'embedding').
    `source` names the file in error messages.
    """
    params: Params = {}
    embedding_keys = tuple(embedding_keys)
    for key, value in state_dict.items():
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
        node = params
        for seg in path:
            node = node.setdefault(seg, {})
        node[leaf] = np.asarray(value, order="C")  # keeps 0-d (ascontiguousarray does not)
    return params


def flax_to_torch(params: Params, *, literal_names: frozenset[str] = LITERAL_NAMES) -> StateDict:
    """A torch state dict (numpy values) from nested flax params; inverse of `torch_to_flax`."""
    out: StateDict = {}
    for path, value in flatten(params).items():
        *prefix, leaf = path
        value = np.asarray(value)
        if leaf == "kernel":
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
            leaf = "weight"
        elif leaf in ("scale", "embedding"):
            leaf = "weight"
        out[path_to_key((*prefix, leaf), literal_names)] = np.asarray(value, order="C")
    return out


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


def apply_renames(state_dict: Mapping[str, np.ndarray], renames: Iterable[tuple[str, str]]) -> StateDict:
    """Regex substitutions on every key, in order; the family-specific part of a conversion."""
    renames = tuple(renames)
    out: StateDict = {}
    for key, value in state_dict.items():
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def check_against(params: Params, reference: Params, *, source: str) -> Params:
    """Checks converted `params` has exactly the keys and shapes of `reference` (initialised arrays or
    `jax.eval_shape` structs) and casts to the reference dtypes. Errors name the file and every mismatched key."""
    got, want = flatten(params), flatten(reference)
    missing = sorted("/".join(p) for p in want.keys() - got.keys())
    unexpected = sorted("/".join(p) for p in got.keys() - want.keys())
    shapes = [f"{'/'.join(p)}: file {tuple(np.shape(got[p]))} vs model {tuple(want[p].shape)}"
              for p in sorted(want.keys() & got.keys()) if tuple(np.shape(got[p])) != tuple(want[p].shape)]
    if missing or unexpected or shapes:
        lines = [f"{source}: checkpoint does not match the model"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
                lines.append(f"  {title}: {shown}")
        raise CheckpointError("\n".join(lines))
    return unflatten({p: np.asarray(got[p]).astype(want[p].dtype) for p in want})
