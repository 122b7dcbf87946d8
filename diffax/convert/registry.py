"""The converter registry: for each model family (keyed by its diffusers class name, as in
`diffax.models.registry`) the small table and hooks that, on top of the generic rules of
`diffax.convert.rules`, map its PyTorch state dicts to the diffax parameter tree and back.

    register(Converter("UNet2DModel", renames=RENAMES, embedding_keys=EMBEDDING_KEYS))

Import runs, tensor by tensor: read -> `import_hook` -> `renames` -> generic rule -> cast into the tree.
Export runs: tree -> generic rules (`literal_names`) -> `export_hook` -> write. A hook sees the stream of
(torch key, tensor) pairs, so it can drop, split or merge tensors without holding a second copy of the
weights. A family whose original research code saves another layout (DiT's reference .pt) adds a
`ReferenceLayout`: how to recognise such a file, read its config from tensor shapes, and map its keys.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Collection, Iterable, Iterator

import numpy as np

from diffax.convert.io import CheckpointError, StateDict
from diffax.convert.rules import LITERAL_NAMES
from diffax.models.registry import families, get_family

Items = Iterable[tuple[str, np.ndarray]]
# (config, (torch key, tensor) stream, source for errors) -> the stream in the diffax tree's torch-style keys
ImportHook = Callable[[Any, Items, str], Iterator[tuple[str, np.ndarray]]]
# (config, state dict in the diffax tree's torch-style keys) -> the state dict to write
ExportHook = Callable[[Any, StateDict], StateDict]


@dataclasses.dataclass(frozen=True)
class ReferenceLayout:
    """A family's state-dict layout in its original research code, read from and written to one file.

    detect       (tensor names) -> whether a file is in this layout;
    read_config  (tensors, source, **options) -> the family config, from tensor shapes (and `options`,
                 keyword arguments of `diffax.convert.load` for what the shapes cannot tell);
    import_hook  the reference stream -> the diffax tree's torch-style keys (renames included);
    export_hook  the diffax tree's torch-style state dict -> the reference state dict.
    """
    detect: Callable[[Collection[str]], bool]
    read_config: Callable[..., Any]
    import_hook: ImportHook
    export_hook: ExportHook
    options: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Converter:
    """What one family adds to the generic rules.

    renames         regex substitutions on the diffusers state dict's keys (import direction), e.g. old
                    attention names; export writes the current names and needs none;
    embedding_keys  regexes for nn.Embedding weights (kept [N, C] as 'embedding');
    literal_names   torch module names that end in _<digits> themselves ('linear_1'), for export;
    import_hook / export_hook  what regexes cannot say (see the module docstring);
    reference       the research code's layout, if the family has one;
    weights_name    the weight file `save` writes ('model.safetensors' for transformers' models).
    """
    class_name: str
    renames: tuple[tuple[str, str], ...] = ()
    embedding_keys: tuple[str, ...] = ()
    literal_names: frozenset[str] = LITERAL_NAMES
    import_hook: ImportHook | None = None
    export_hook: ExportHook | None = None
    reference: ReferenceLayout | None = None
    weights_name: str = "diffusion_pytorch_model.safetensors"


_CONVERTERS: dict[str, Converter] = {}


def register(converter: Converter) -> Converter:
    """Adds `converter` under its class name, which must be a registered model family's."""
    get_family(converter.class_name)  # ValueError for a class with no model
    _CONVERTERS[converter.class_name] = converter
    return converter


def converters() -> dict[str, Converter]:
    """class name -> Converter for every family that has one."""
    return dict(_CONVERTERS)


def converter_for(class_name: str, source: str = "config") -> Converter:
    """The converter for a config.json `_class_name`, older names a family accepts included
    (DiT's 'Transformer2DModel'); CheckpointError naming `source` and the known names otherwise."""
    for family in families().values():
        names = (family.class_name, *getattr(family.config_cls, "accepted_class_names", ()))
        if class_name in names and family.class_name in _CONVERTERS:
            return _CONVERTERS[family.class_name]
    raise CheckpointError(f"{source}: _class_name {class_name!r} is not a model diffax converts "
                          f"(it converts {', '.join(sorted(_CONVERTERS))})")
