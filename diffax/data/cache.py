"""Writing a latent cache: a data set's images through the VAE and its captions through the text encoder, once.

    python -m diffax.data.cache --config=configs/ldm_digits.py [--config.cache.out=/data/digits-latents]

Training a latent diffusion model runs the frozen VAE encoder (and the text encoder) on every example of
every epoch; both give the same answer each time, so they run here once and training reads their outputs
(`data.source='latent_cache'`, diffax/data/latent_cache.py says what a cache holds). The VAE stores the
posterior mean and log-variance, not a sample, so training still draws a fresh latent each time; random
crops and flips are encoded as extra variants of each record (`cache.crops`, `cache.flip`), since a crop
or mirror of the latents is not the latents of the crop or mirror.

The encoders run jitted on fixed-size batches (the last one padded), rows split over the mesh of the
config's `mesh` block. The cache is written to a temporary folder beside `cache.out` and renamed into
place when complete, so a killed run leaves no half cache; an existing cache with the same fingerprint
(encoders, data, options) is kept as it is, a different one is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from diffax import parallel
from diffax.data.latent_cache import EMPTY_PROMPT, FORMAT, MANIFEST, VERSION, encode_record, read_manifest
from diffax.data import sdxl_cache
from diffax.data.encoders import (component, config_sha256, load_text_encoder, load_vae, max_text_length,
                                  tokenizer_folder)
from diffax.data.pipeline import make_source

MAX_GRID_PROMPTS = 10


def _variants(crops: int, flip: bool) -> list[dict[str, Any]]:
    return [{"crop": "center" if c == 0 else "random", "flip": f} for c in range(crops)
            for f in ((False, True) if flip else (False,))]


def crop_offsets(size: int, index: int, config: ml_collections.ConfigDict, side: int) -> list[tuple[int, int]]:
    """(top, left) of each of image `index`'s cache.crops crops of side `side` in its [size, size] square:
    crop 0 centered, the others drawn from (cache.seed, index, crop)."""
    offsets = [((size - side) // 2, (size - side) // 2)]
    for c in range(1, config.crops):
        top, left = np.random.default_rng([config.seed, index, c]).integers(0, size - side + 1, 2)
        offsets.append((int(top), int(left)))
    return offsets


def _crops(image: np.ndarray, index: int, config: ml_collections.ConfigDict, side: int) -> np.ndarray:
    """The variants of one image [S, S, C] -> [V, side, side, C]: the crops of `crop_offsets`, each followed
    by its mirror image with cache.flip."""
    out = []
    for top, left in crop_offsets(image.shape[0], index, config, side):
        crop = image[top:top + side, left:left + side]
        out.append(crop)
        if config.flip:
            out.append(crop[:, ::-1])
    return np.stack(out)


def _check_config(config: ml_collections.ConfigDict) -> None:
    cache = config.cache
    if not cache.out:
        raise ValueError("config key 'cache.out' is empty: name the cache folder to write "
                         "(--config.cache.out=/path/to/cache)")
    if not cache.vae:
        raise ValueError("config key 'cache.vae' is empty: name an AutoencoderKL folder or a diffusers "
                         "pipeline folder with vae/")
    if config.data.source == "latent_cache":
        raise ValueError("config key 'data.source' is 'latent_cache': the cache is made from an image source")
    if cache.crop_size > config.data.image_size:
        raise ValueError(f"config key 'cache.crop_size' is {cache.crop_size}, larger than data.image_size="
                         f"{config.data.image_size}")
    if cache.crops > 1 and cache.crop_size in (0, config.data.image_size):
        raise ValueError(f"config key 'cache.crops' is {cache.crops}, but crops of the whole image are all the "
                         f"same: set cache.crop_size below data.image_size={config.data.image_size}")
    if cache.dtype not in ("float32", "float16"):
        raise ValueError(f"config key 'cache.dtype' must be 'float32' or 'float16', got {cache.dtype!r}")


class _Encoders:
    """The VAE (and text encoder) jitted on fixed-size batches, rows split over the mesh."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: Any, rules: Any):
        cache = config.cache
        self.mesh = mesh
        vae_path, vae_sub = component(cache.vae, "vae", "cache.vae")
        self.vae, vae_params = load_vae(str(vae_path), vae_sub)
        rep, rows = parallel.replicated(mesh), parallel.batch_sharding(mesh)
        self.vae_params = jax.device_put(vae_params, rep)
        self.batch = -(-cache.batch_size // parallel.batch_divisor(mesh)) * parallel.batch_divisor(mesh)
        vae = self.vae

        def encode_images(params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
            x = images.astype(jnp.float32) / 127.5 - 1.0  # uint8 [B, S, S, C] -> [-1, 1]
            posterior = vae.apply({"params": params}, x, method=vae.encode)
            return posterior.mean.astype(jnp.float32), posterior.logvar.astype(jnp.float32)  # [B, h, w, c] each

        self._encode_images = parallel.jit_with_rules(encode_images, mesh, rules, in_shardings=(rep, rows),
                                                      out_shardings=(rows, rows))
        cfg = vae.config
        self.vae_info = {"path": str(vae_path), "subfolder": vae_sub,
                         "config_sha256": config_sha256([(vae_path, vae_sub)])}
        self.scaling = {"scaling_factor": cfg.scaling_factor, "shift_factor": cfg.shift_factor,
                        "latents_mean": None if cfg.latents_mean is None else list(cfg.latents_mean),
                        "latents_std": None if cfg.latents_std is None else list(cfg.latents_std)}
        self.text_info = self.pair = None
        if not cache.text_encoder:
            return
        if sdxl_cache.second_encoder(cache) is not None:  # SDXL's two text encoders (diffax/data/sdxl_cache.py)
            self.pair = sdxl_cache.PromptEncoder(cache, mesh, rules, self.batch)
            self.tokenizer, self.max_length = self.pair.tokenizer_1, self.pair.max_length  # tokens(): the first's
            self.text_info = self.pair.info
            return
        te_path, te_sub = component(cache.text_encoder, "text_encoder", "cache.text_encoder")
        tok_folder = tokenizer_folder(cache, te_path, te_sub)
        self.text, text_params, self.tokenizer = load_text_encoder(str(te_path), te_sub, str(tok_folder))
        self.text_params = jax.device_put(text_params, rep)
        self.max_length = max_text_length(self.tokenizer, self.text)
        text = self.text

        def encode_text(params: Any, ids: jax.Array) -> dict[str, jax.Array]:
            out = text.apply({"params": params}, ids)
            result = {"encoder_hidden_states": out.last_hidden_state.astype(jnp.float32)}  # [B, L, D]
            if out.text_embeds is not None:  # an encoder with a projection (SDXL's second): pooled [B, P]
                result["text_embeds"] = out.text_embeds.astype(jnp.float32)
            return result

        self._encode_text = parallel.jit_with_rules(encode_text, mesh, rules, in_shardings=(rep, rows),
                                                    out_shardings=rows)
        shapes = jax.eval_shape(encode_text, text_params, jax.ShapeDtypeStruct((1, self.max_length), jnp.int32))
        self.text_info = {
            "encoder": str(te_path), "subfolder": te_sub, "tokenizer": str(tok_folder),
            "config_sha256": config_sha256([(te_path, te_sub)], (tok_folder,)),
            "max_length": self.max_length,
            "shapes": {k: list(v.shape[1:]) for k, v in shapes.items()}}

    def _padded(self, x: np.ndarray) -> tuple[Any, int]:
        n = len(x)
        pad = np.zeros((self.batch - n, *x.shape[1:]), x.dtype)
        return parallel.global_array(np.concatenate([x, pad]), parallel.batch_sharding(self.mesh)), n

    def images(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images [N <= batch, S, S, C] -> posterior mean, logvar [N, h, w, c] (float32)."""
        x, n = self._padded(images)
        mean, logvar = jax.device_get(self._encode_images(self.vae_params, x))
        return np.asarray(mean)[:n], np.asarray(logvar)[:n]

    def tokens(self, captions: list[str]) -> np.ndarray:
        """Captions -> token ids [N, L] int32, stored beside the embeddings for runs that train the text
        encoder (train.text_encoder)."""
        from diffax.pipelines.text_encoding import tokenize_prompts
        return tokenize_prompts(self.tokenizer, captions, max_length=self.max_length)

    def tokens_2(self, captions: list[str]) -> np.ndarray | None:
        """SDXL: captions -> the second tokenizer's ids [N, L] int32 (text_encoder_2's input, for runs that
        train both encoders); None with one text encoder."""
        from diffax.pipelines.text_encoding import tokenize_prompts
        if self.pair is None:
            return None
        return tokenize_prompts(self.pair.tokenizer_2, captions, max_length=self.max_length)

    def captions(self, captions: list[str]) -> dict[str, np.ndarray]:
        """Captions -> {'encoder_hidden_states': [N, L, D] (, 'text_embeds': [N, P])} (float32)."""
        if self.pair is not None:
            return self.pair(captions)
        ids, n = self._padded(self.tokens(captions))
        out = jax.device_get(self._encode_text(self.text_params, ids))
        return {k: np.asarray(v)[:n] for k, v in out.items()}


def _fingerprint(config: ml_collections.ConfigDict, encoders: _Encoders) -> str:
    """What decides a cache's contents: the encoders' configs, the data block, the cache options."""
    options = {k: config.cache[k] for k in ("crops", "crop_size", "flip", "dtype", "seed")}
    what = {"vae": encoders.vae_info["config_sha256"],
            "text": encoders.text_info and encoders.text_info["config_sha256"],
            "data": config.data.to_dict(), "options": options}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def _existing(out: Path, fingerprint: str) -> bool:
    """True when `out` already holds this cache; False when it is free; ValueError when it holds another."""
    if not out.exists():
        return False
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
        return False
    if not (out / MANIFEST).is_file():
        raise ValueError(f"config key 'cache.out': {str(out)!r} exists and is not a latent cache; refusing to "
                         f"overwrite it")
    manifest = read_manifest(out)
    if manifest.get("fingerprint") != fingerprint:
        raise ValueError(f"{out / MANIFEST}: key 'fingerprint' differs: {str(out)!r} holds a cache of other "
                         f"encoders, data or options; remove it or choose another cache.out")
    return True


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def build_cache(config: ml_collections.ConfigDict, source: Any = None) -> Path:
    """Encodes `config.data`'s source into the cache folder `config.cache.out`; returns the folder.

    `source` replaces `make_source(config.data)` (DreamBooth's folders captioned with one prompt,
    diffax.train.dreambooth); `config.data` must then still say what it holds, as the fingerprint reads it.

    Records are written in the source's order, `cache.records_per_shard` per ArrayRecord file, with a
    manifest.json and the empty prompt's embedding (with a text encoder). An existing cache with the same
    fingerprint is kept (nothing is encoded).

    Raises:
        ValueError: missing or inconsistent cache keys, encoder folders that are not an AutoencoderKL / CLIP
            text encoder, a text encoder with a source that yields no captions, or a `cache.out` that holds
            something else.
    """
    from tqdm import tqdm

    _check_config(config)
    if jax.process_count() > 1:
        raise ValueError("python -m diffax.data.cache runs in one process (it uses all of that process's devices)")
    cache = config.cache
    out = Path(cache.out).expanduser().resolve()
    mesh, rules = parallel.mesh_from_config(config.mesh)
    micro = bool(cache.text_encoder) and sdxl_cache.second_encoder(cache) is not None  # SDXL's time ids
    if source is None:
        source = sdxl_cache.sized_source(config.data) if micro else make_source(config.data)
    encoders = _Encoders(config, mesh, rules)
    fingerprint = _fingerprint(config, encoders)
    if _existing(out, fingerprint):
        _log(f"{out}: already holds this cache (same fingerprint); nothing to do")
        return out
    first = source[0]
    if micro and "original_size" not in first:
        raise ValueError("config key 'cache.text_encoder_2': an SDXL cache needs each image's original size, which "
                         "this data source does not give (use data.source='folder')")
    channels = first["image"].shape[-1]
    if channels != encoders.vae.config.in_channels:
        raise ValueError(f"config key 'data.channels' is {channels}, but the VAE ({cache.vae}) takes "
                         f"in_channels={encoders.vae.config.in_channels}")
    text = encoders.text_info is not None
    if text and "caption" not in first:
        raise ValueError(f"config key 'cache.text_encoder' is set but data.source={config.data.source!r} yields no "
                         f"captions: set data.caption_template (digits), data.caption_key (tfds) or add captions (a "
                         f"folder's metadata.jsonl or .txt files)")
    conditioning = "conditioning_image" in first  # a ControlNet data set's (data.conditioning_column)
    side = cache.crop_size or config.data.image_size
    variants = _variants(cache.crops, cache.flip)
    dtype = np.dtype(cache.dtype)
    per_batch = max(1, encoders.batch // len(variants))  # examples per encoder call

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    shards, writer, prompts = [], None, []
    t0 = time.perf_counter()
    try:
        bar = tqdm(total=len(source), desc="cache", disable=not sys.stderr.isatty(), unit="image")
        for start in range(0, len(source), per_batch):
            records = [source[i] for i in range(start, min(start + per_batch, len(source)))]
            images = np.concatenate([_crops(r["image"], start + j, cache, side) for j, r in enumerate(records)])
            # each conditioning image cut and mirrored as its image is (the same index draws the same crops)
            control = np.stack([_crops(r["conditioning_image"], start + j, cache, side)
                                for j, r in enumerate(records)]) if conditioning else None  # [n, V, S, S, 3]
            mean, logvar = encoders.images(images)  # [n V, h, w, c] each
            mean = mean.reshape(len(records), len(variants), *mean.shape[1:])
            logvar = logvar.reshape(mean.shape)
            embeds = encoders.captions([r["caption"] for r in records]) if text else {}
            ids = encoders.tokens([r["caption"] for r in records]) if text else None  # [n, L] int32
            ids_2 = encoders.tokens_2([r["caption"] for r in records]) if text else None  # SDXL: [n, L] int32
            for j, record in enumerate(records):
                if writer is None or shards[-1]["count"] == cache.records_per_shard:
                    if writer is not None:
                        writer.close()
                    shards.append({"file": f"shard_{len(shards):05d}.array_record", "count": 0})
                    writer = ArrayRecordWriter(str(tmp / shards[-1]["file"]), "group_size:1")
                entry = {"mean": mean[j].astype(dtype), "logvar": logvar[j].astype(dtype),
                         "label": np.int64(record["label"])}
                entry.update({k: v[j].astype(dtype) for k, v in embeds.items()})
                if micro:  # each variant's original size, crop corner and target size [V, 6]
                    entry["time_ids"] = sdxl_cache.variant_time_ids(
                        record["original_size"], config.data.image_size,
                        crop_offsets(config.data.image_size, start + j, cache, side), side, cache.flip)
                if text:
                    entry["input_ids"] = ids[j]
                if ids_2 is not None:
                    entry["input_ids_2"] = ids_2[j]
                if control is not None:
                    entry["conditioning_image"] = control[j]
                if "caption" in record:
                    entry["caption"] = str(record["caption"])
                    if len(prompts) < MAX_GRID_PROMPTS and record["caption"] not in prompts:
                        prompts.append(str(record["caption"]))
                writer.write(encode_record(entry))
                shards[-1]["count"] += 1
            bar.update(len(records))
            if bar.disable and (start // per_batch) % 50 == 0:
                _log(f"cache: {start + len(records)}/{len(source)} images")
        bar.close()
        writer.close()
        writer = None
        manifest = {
            "format": FORMAT, "version": VERSION, "fingerprint": fingerprint, "count": len(source),
            "shards": shards, "num_classes": source.num_classes, "class_names": list(source.class_names),
            "data": config.data.to_dict(),
            "latent": {"shape": list(mean.shape[2:]), "dtype": cache.dtype, "image_size": side,
                       "channels": int(channels), "variants": variants},
            "scaling": encoders.scaling, "vae": encoders.vae_info, "text": None, "captions": prompts}
        if text:
            empty = encoders.captions([""])
            np.savez(tmp / EMPTY_PROMPT, **{k: v[0] for k, v in empty.items()})
            manifest["text"] = {**encoders.text_info, "dtype": cache.dtype,
                                "empty_input_ids": encoders.tokens([""])[0].tolist()}
            if encoders.pair is not None:
                manifest["text"]["empty_input_ids_2"] = encoders.tokens_2([""])[0].tolist()
        if micro:
            manifest["time_ids"] = {"shape": [len(variants), sdxl_cache.NUM_TIME_IDS], "target_size": [side, side]}
        if conditioning:
            manifest["conditioning"] = {"shape": [side, side, 3], "dtype": "uint8"}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():  # another process finished the same cache meanwhile
            raise ValueError(f"config key 'cache.out': {str(out)!r} appeared while caching; refusing to overwrite")
        os.rename(tmp, out)
    finally:
        if writer is not None:
            writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
    _log(f"wrote {len(source)} records ({len(variants)} variant(s) each, latents {manifest['latent']['shape']}"
         + (f", text {manifest['text']['shapes']}" if text else "") + f") to {out} in "
         f"{time.perf_counter() - t0:.1f} s")
    return out


def main(argv: list[str]) -> None:
    """The command line: `python -m diffax.data.cache --config=configs/x.py [--config.cache.out=...]`."""
    from absl import app, flags
    from ml_collections import config_flags

    from diffax.cli import parse_flags, run_reporting_errors
    from diffax.train.config import validate_config

    config_flags.DEFINE_config_file("config", None, "Recipe file whose data and cache blocks to use.",
                                    lock_config=True)
    flags.mark_flags_as_required(["config"])

    def run(args: list[str]) -> None:
        del args
        config = flags.FLAGS.config
        if "name" in config.model:
            validate_config(config)
        build_cache(config)

    app.run(run_reporting_errors(run), argv=argv, flags_parser=parse_flags)


if __name__ == "__main__":
    main(sys.argv)
