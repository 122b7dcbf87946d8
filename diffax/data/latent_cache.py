"""Reading a latent cache: VAE posteriors and text embeddings encoded once, served as training records.

    python -m diffax.data.cache --config=configs/x.py --config.cache.out=/data/cache   # writes it (cache.py)
    config.data.source = 'latent_cache'; config.data.path = '/data/cache'               # trains from it

A cache is a folder:

    manifest.json          what is stored: count, shapes, dtypes, the VAE's latent scaling, the encoders
                           (folders and a fingerprint of their configs), augmentation variants, the shards,
                           the empty prompt's token ids
    shard_00000.array_record ...   one record per example (msgpack of numpy arrays)
    empty_prompt.npz       the empty prompt's embedding: the null conditioning of classifier-free guidance

A record holds, for each of its V augmentation variants (crops and flips encoded separately, since the VAE
is not flip-equivariant), the posterior mean and log-variance [V, h, w, c]; its class label; and, with a
text encoder, the caption's hidden states [L, D] (and pooled embedding [P] for an encoder with a
projection) and its token ids `input_ids` [L] (int32), which a run that trains the text encoder feeds it
(diffax/train/text_encoder.py). A training example is a fresh draw: a random variant, then
latent = scale(mean + std * noise), scale being the VAE's `scaling_factor` (and shift), so epochs see different
latents as when the VAE runs every step. The draw is a function of (seed, position in the shuffled stream),
hence of epoch and index, and a resumed run draws exactly what an uninterrupted one would.

An SDXL cache (two text encoders, diffax/data/sdxl_cache.py) also stores each variant's micro-conditioning
`time_ids` float32 [V, 6] (original size, crop corner, target size); a draw puts the same variant's in
`cond['time_ids']` [6].

A ControlNet data set's records (data.conditioning_column) also hold each variant's conditioning image,
`conditioning_image` uint8 [V, H, W, 3], cut and mirrored as the image was; a draw takes the same variant's
as `cond['controlnet_cond']`, float32 [H, W, 3] in [0, 1] (the manifest's `conditioning` gives [H, W, 3]).
"""
from __future__ import annotations

import bisect
import json
from pathlib import Path
from typing import Any

import grain
import numpy as np
from flax import serialization

FORMAT = "diffax.latent_cache"
VERSION = 1
MANIFEST = "manifest.json"
EMPTY_PROMPT = "empty_prompt.npz"


class LatentCacheError(ValueError):
    """A cache folder that is missing, corrupt, or does not match its manifest; the message names the file."""


def encode_record(record: dict[str, Any]) -> bytes:
    """One example as the bytes of an ArrayRecord entry (msgpack of numpy arrays and strings)."""
    return serialization.msgpack_serialize(record)


def decode_record(data: bytes, where: str) -> dict[str, Any]:
    """The record dict of `encode_record`'s bytes; LatentCacheError naming `where` when they do not parse."""
    try:
        record = serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises several unrelated types on bad bytes
        raise LatentCacheError(f"{where}: not a latent-cache record ({type(e).__name__}: {e})") from None
    if not isinstance(record, dict):
        raise LatentCacheError(f"{where}: not a latent-cache record (a {type(record).__name__})")
    return record


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the cache folder `path`, checked for the keys and values a reader relies on."""
    file = Path(path).expanduser() / MANIFEST
    if not file.is_file():
        raise LatentCacheError(f"{file}: missing; write the cache with `python -m diffax.data.cache "
                               f"--config=... --config.cache.out={path}`")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LatentCacheError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise LatentCacheError(f"{file}: key 'format' must be {FORMAT!r} (not a diffax latent cache)")
    if manifest.get("version") != VERSION:
        raise LatentCacheError(f"{file}: key 'version' is {manifest.get('version')!r}; this diffax reads "
                               f"version {VERSION}: rewrite the cache")
    for key in ("count", "shards", "latent", "scaling", "num_classes", "class_names"):
        if key not in manifest:
            raise LatentCacheError(f"{file}: key {key!r} missing")
    if sum(s["count"] for s in manifest["shards"]) != manifest["count"]:
        raise LatentCacheError(f"{file}: key 'count' is {manifest['count']} but the shards hold "
                               f"{sum(s['count'] for s in manifest['shards'])} records")
    return manifest


def read_empty_prompt(path: str | Path, manifest: dict[str, Any]) -> dict[str, np.ndarray] | None:
    """The empty prompt's conditioning {'encoder_hidden_states': [L, D] (, 'text_embeds': [P])} as float32,
    or None for a cache without text."""
    text = manifest.get("text")
    if not text:
        return None
    file = Path(path).expanduser() / EMPTY_PROMPT
    try:
        with np.load(file) as data:
            arrays = {k: np.asarray(data[k], np.float32) for k in data.files}
    except (OSError, ValueError) as e:
        raise LatentCacheError(f"{file}: cannot read it ({type(e).__name__}: {e})") from None
    for key, shape in text["shapes"].items():
        if key not in arrays or arrays[key].shape != tuple(shape):
            got = arrays[key].shape if key in arrays else "missing"
            raise LatentCacheError(f"{file}: key {key!r} is {got}, the manifest says {tuple(shape)}")
    return arrays


def scale_latents(z: np.ndarray, scaling: dict[str, Any]) -> np.ndarray:
    """Raw VAE latents [..., C] -> the diffusion model's latents, as `AutoencoderKLConfig.scale_latents`:
    (z - latents_mean) * scaling_factor / latents_std per channel when both are set, else
    (z - shift_factor) * scaling_factor."""
    if scaling.get("latents_mean") is not None and scaling.get("latents_std") is not None:
        mean = np.asarray(scaling["latents_mean"], np.float32)
        return (z - mean) * (scaling["scaling_factor"] / np.asarray(scaling["latents_std"], np.float32))
    return (z - (scaling.get("shift_factor") or 0.0)) * scaling["scaling_factor"]


class StoredRecords:
    """Random access to a cache's stored records (decoded and checked against the manifest)."""

    def __init__(self, path: str | Path, manifest: dict[str, Any]):
        self.path = Path(path).expanduser()
        self._files = [str(self.path / s["file"]) for s in manifest["shards"]]
        self._starts = list(np.cumsum([0] + [s["count"] for s in manifest["shards"]])[:-1])
        self._count = manifest["count"]
        variants = len(manifest["latent"]["variants"])
        self._shapes = {k: (variants, *manifest["latent"]["shape"]) for k in ("mean", "logvar")}
        if manifest.get("text"):
            self._shapes.update({k: tuple(v) for k, v in manifest["text"]["shapes"].items()})
            if "empty_input_ids" in manifest["text"]:
                self._shapes["input_ids"] = (len(manifest["text"]["empty_input_ids"]),)
            if "empty_input_ids_2" in manifest["text"]:  # SDXL: the second tokenizer's
                self._shapes["input_ids_2"] = (len(manifest["text"]["empty_input_ids_2"]),)
        if manifest.get("time_ids"):  # an SDXL cache's micro-conditioning, one row per variant
            self._shapes["time_ids"] = tuple(manifest["time_ids"]["shape"])
        if manifest.get("conditioning"):
            self._shapes["conditioning_image"] = (variants, *manifest["conditioning"]["shape"])
        self._sources = []
        for file, shard in zip(self._files, manifest["shards"]):
            if not Path(file).is_file():
                raise LatentCacheError(f"{file}: missing (listed in {MANIFEST} key 'shards')")
            try:
                source = grain.sources.ArrayRecordDataSource([file])
            except Exception as e:  # array_record: a RuntimeError, often without a message
                detail = f" ({type(e).__name__}: {e})" if str(e) else ""
                raise LatentCacheError(f"{file}: not a readable ArrayRecord file (truncated or corrupt){detail}"
                                       ) from None
            if len(source) != shard["count"]:
                raise LatentCacheError(f"{file}: holds {len(source)} records, manifest.json says {shard['count']}")
            self._sources.append(source)

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self._count:
            raise IndexError(f"record {index} of a cache of {self._count}")
        shard = bisect.bisect_right(self._starts, index) - 1
        offset = index - self._starts[shard]
        where = f"{self._files[shard]} (record {offset})"
        try:
            data = self._sources[shard][offset]
        except Exception as e:  # array_record: RuntimeError on a chunk whose hash does not match
            raise LatentCacheError(f"{where}: corrupt ({type(e).__name__}: {e})") from None
        record = decode_record(data, where)
        for key, shape in self._shapes.items():
            value = record.get(key)
            if not isinstance(value, np.ndarray) or value.shape != shape:
                got = "missing" if value is None else getattr(value, "shape", type(value).__name__)
                raise LatentCacheError(f"{where}: key {key!r} is {got}, manifest.json says {shape}")
        return record


class LatentCacheSource:
    """A grain source over a latent cache: `{'image': float32 latent [h, w, c], 'label': int64,
    'cond': {'encoder_hidden_states': float32 [L, D] (, 'text_embeds': [P])}, 'input_ids': int32 [L]}`
    ('cond' and 'input_ids' only with text; 'input_ids' in caches that store token ids, and an SDXL cache's
    'input_ids_2' too, the second tokenizer's). A ControlNet cache's
    'cond' also holds 'controlnet_cond', the conditioning image of the drawn variant ([H, W, 3] in [0, 1]).

    `source[i]` draws with the generator of (seed, i); `make_train_iterator` shuffles `stored` and calls
    `draw` after repeating, so each epoch draws afresh. `null_cond` is the empty prompt's conditioning (one
    example's, no batch axis) for classifier-free guidance dropout; None without text. `null_input_ids`
    [L] int32: the empty prompt's token ids, None in a cache without token ids (`null_input_ids_2`: the second
    tokenizer's, in an SDXL cache).
    """

    def __init__(self, path: str | Path, *, seed: int = 0):
        """Opens the cache folder `path` and checks every shard against the manifest.

        Raises:
            LatentCacheError (a ValueError): a missing or corrupt manifest, shard or empty-prompt file, or a
                shard whose record count differs from the manifest's.
        """
        self.path = Path(path).expanduser()
        self.seed = seed
        self.manifest = read_manifest(self.path)
        self.stored = StoredRecords(self.path, self.manifest)
        self.null_cond = read_empty_prompt(self.path, self.manifest)
        self.num_classes: int = self.manifest["num_classes"]
        self.class_names: list[str] = list(self.manifest["class_names"])
        self._scaling = self.manifest["scaling"]
        self._text_keys = sorted(self.manifest["text"]["shapes"]) if self.manifest.get("text") else []
        empty_ids = (self.manifest.get("text") or {}).get("empty_input_ids")
        self.null_input_ids = None if empty_ids is None else np.asarray(empty_ids, np.int32)
        empty_ids_2 = (self.manifest.get("text") or {}).get("empty_input_ids_2")
        self.null_input_ids_2 = None if empty_ids_2 is None else np.asarray(empty_ids_2, np.int32)

    def __len__(self) -> int:
        return len(self.stored)

    def draw(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """A training example from a stored record: a random variant, a posterior sample, scaled."""
        v = int(rng.integers(len(record["mean"])))
        mean = record["mean"][v].astype(np.float32)
        std = np.exp(0.5 * record["logvar"][v].astype(np.float32))
        z = mean + std * rng.standard_normal(mean.shape, np.float32)  # [h, w, c]
        out = {"image": scale_latents(z, self._scaling).astype(np.float32), "label": np.int64(record["label"])}
        if self._text_keys:
            out["cond"] = {k: record[k].astype(np.float32) for k in self._text_keys}
        if "time_ids" in record:  # SDXL: the drawn variant's size and crop ids [6] (diffax/data/sdxl_cache.py)
            out["cond"]["time_ids"] = record["time_ids"][v].astype(np.float32)
        if "conditioning_image" in record:  # the ControlNet's input, in [0, 1]; the prompt's dropout spares it
            control = record["conditioning_image"][v].astype(np.float32) / 255.0  # [H, W, 3]
            out.setdefault("cond", {})["controlnet_cond"] = control
        if self.null_input_ids is not None:
            out["input_ids"] = record["input_ids"].astype(np.int32)
        if self.null_input_ids_2 is not None:
            out["input_ids_2"] = record["input_ids_2"].astype(np.int32)
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.draw(self.stored[index], np.random.default_rng([self.seed, index]))

    def __repr__(self) -> str:
        latent = self.manifest["latent"]
        return (f"LatentCacheSource(path={str(self.path)!r}, num_records={len(self)}, latent={latent['shape']}, "
                f"variants={len(latent['variants'])}, text={bool(self._text_keys)})")
