"""The frozen encoders a latent cache is written with: where each one's folder is, loading it, and a checksum
of the files that define it.

A config key such as `cache.vae` or `cache.text_encoder` names a model folder (`config.json` beside its
weights) or a diffusers pipeline folder (`model_index.json`), whose component lives in a subfolder.
`component` resolves either to (folder, subfolder or None), which is what `diffax.convert.load` takes. Both
cache writers (`diffax.data.cache` for one text encoder, `diffax.data.sdxl_cache` for SDXL's two) and the
evaluation's decoders load their encoders here.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import ml_collections

from diffax.models.config_base import CONFIG_NAME

PIPELINE_INDEX = "model_index.json"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def component(path: str, subfolder: str, key: str) -> tuple[Path, str | None]:
    """(folder, subfolder or None): a model folder as it is, a diffusers pipeline folder's `subfolder`.

    Raises:
        ValueError: naming config key `key` when `path` is no folder, or a pipeline folder without `subfolder`.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ValueError(f"config key {key!r}: {str(folder)!r} is not a folder")
    if (folder / PIPELINE_INDEX).is_file() and not (folder / CONFIG_NAME).is_file():
        if not (folder / subfolder).is_dir():
            raise ValueError(f"config key {key!r}: pipeline folder {str(folder)!r} has no {subfolder}/")
        return folder.resolve(), subfolder
    return folder.resolve(), None


def config_sha256(components: list[tuple[Path, str | None]], tokenizers: tuple[Path, ...] = ()) -> str:
    """sha256 over the `config.json` of each (folder, subfolder) and the tokenizer files each tokenizer folder
    holds, in that order: what a cache's fingerprint records of its encoders (their configs, not their
    weights)."""
    files = [(folder / (sub or "")) / CONFIG_NAME for folder, sub in components]
    files += [t / n for t in tokenizers for n in TOKENIZER_FILES if (t / n).is_file()]
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def load_vae(path: str, subfolder: str | None = None) -> tuple[Any, Any]:
    """(AutoencoderKL module, params) of a diffusers AutoencoderKL folder or a pipeline folder's vae/."""
    from diffax.convert import load
    module, params = load(path, subfolder=subfolder)
    if type(module).__name__ != "AutoencoderKL":
        raise ValueError(f"{path}: holds a {module.config.class_name}, not an AutoencoderKL (cache.vae)")
    return module, params


def load_text_encoder(path: str, subfolder: str | None, tokenizer: str) -> tuple[Any, Any, Any]:
    """(CLIP text module, params, tokenizer) of a transformers CLIP text folder (or a pipeline's
    text_encoder/) and a tokenizer folder."""
    from diffax.convert import load
    from diffax.pipelines.loading import load_tokenizer
    module, params = load(path, subfolder=subfolder)
    if not type(module).__name__.startswith("CLIPText"):
        raise ValueError(f"{path}: holds a {module.config.class_name}, not a CLIP text encoder (cache.text_encoder)")
    return module, params, load_tokenizer(tokenizer)


def tokenizer_folder(cache: ml_collections.ConfigDict, encoder: Path, subfolder: str | None,
                     key: str = "tokenizer") -> Path:
    """The CLIP tokenizer folder of an encoder: `cache.<key>` ('tokenizer', or SDXL's second 'tokenizer_2'),
    else the pipeline's `<key>/` when the encoder came from a pipeline folder (`subfolder` not None), else the
    encoder's own folder.

    Raises:
        ValueError: naming 'cache.<key>' when the folder holds no CLIP tokenizer.
    """
    if cache.get(key):
        folder = Path(cache[key]).expanduser()
    else:
        folder = encoder / key if subfolder is not None else encoder
    if not any((folder / name).is_file() for name in ("vocab.json", "tokenizer.json")):
        raise ValueError(f"config key 'cache.{key}': {str(folder)!r} holds no CLIP tokenizer (vocab.json + "
                         f"merges.txt, or tokenizer.json); set cache.{key} to the tokenizer's folder")
    return folder.resolve()


def max_text_length(tokenizer: Any, module: Any) -> int:
    """Tokens per caption: the tokenizer's model_max_length (77 for Stable Diffusion's), at most what the
    text encoder's position table holds."""
    length = int(getattr(tokenizer, "model_max_length", 77))
    if length > 4096:  # transformers' "no limit" sentinel for a tokenizer saved without one
        length = 77
    return min(length, module.config.max_position_embeddings)
