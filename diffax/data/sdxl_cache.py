"""SDXL's conditioning in a latent cache: the prompt through both text encoders and the micro-conditioning ids
of every stored crop (Podell et al. 2023, sections 2.1 and 2.2), as diffusers'
examples/text_to_image/train_text_to_image_sdxl.py computes them before training.

    python -m diffax.data.cache --config=configs/sdxl_finetune.py:cache \
        --config.cache.vae=models/sdxl-base --config.cache.text_encoder=models/sdxl-base ...

A cache is an SDXL cache when `cache.text_encoder_2` names SDXL's second text encoder (a
CLIPTextModelWithProjection folder, or a pipeline folder's text_encoder_2/), or when `cache.text_encoder` is
a StableDiffusionXLPipeline folder (its model_index.json says so), whose text_encoder_2/ and tokenizer_2/ are
then taken. Its records hold, besides the latents:

  encoder_hidden_states [77, D1 + D2]  the penultimate hidden states of text_encoder and text_encoder_2,
                                       concatenated along the features (diffax.pipelines.text_encoding)
  text_embeds [P]                      text_encoder_2's projected end-of-text state, the pooled embedding
  time_ids [V, 6]                      per stored variant: original_size (h, w) + crops_coords_top_left
                                       (top, left) + target_size (h, w)

The empty prompt (`empty_prompt.npz`, the null conditioning of label dropout) is the caption "" through both
encoders, hidden states and pooled embedding alike: what the diffusers script trains on with
`--proportion_empty_prompts` (it replaces the caption by "" before encoding; it does not zero the embeddings,
although the released base pipeline samples its unconditional branch from zeros,
`force_zeros_for_empty_prompt`). Dropout never touches the time ids: they describe the image, not the
caption, and diffusers' pipeline gives the unconditional branch the same ids.

Micro-conditioning frame. original_size is the image file's (height, width) before any resize. The crop's
top-left corner is counted in the image resized so that its short side is `data.image_size` (diffusers'
`Resize(resolution)`: the long side becomes int(image_size * long / short)), after the horizontal flip for
a mirrored variant (diffusers flips before it crops). The cache's first crop is the center of that frame
(round((h - image_size) / 2), round((w - image_size) / 2)), as diffusers' --center_crop computes it, and
`cache.crops` > 1 adds crops of side `cache.crop_size` inside that center square. target_size is the stored
crop's side, (crop_size, crop_size).

Sampling while training (diffax.train.evaluate's grids and evaluations) gives the U-Net the same inputs:
`PromptEmbeddings` (a cache caption's stored embeddings, another prompt through the two encoders the manifest
names) and `sample_time_ids` (the cache's image size as original and target, no crop).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from diffax import parallel
from diffax.data.encoders import component, config_sha256, load_text_encoder, max_text_length, tokenizer_folder
from diffax.data.folder import FolderSource
from diffax.pipelines.stable_diffusion_xl import time_ids
from diffax.pipelines.text_encoding import encode_prompt_sdxl, tokenize_prompts

SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")
NUM_TIME_IDS = 6  # original_size, crops_coords_top_left, target_size: the base model's (a refiner's are 5)


# ----------------------------------------------------------------------------- which encoders


def _sdxl_pipeline_folder(path: str) -> Path | None:
    """`path` when it is a diffusers SDXL pipeline folder with text_encoder_2/, else None."""
    folder = Path(path).expanduser()
    index = folder / "model_index.json"
    if not index.is_file():
        return None
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    return folder if name in SDXL_PIPELINES and (folder / "text_encoder_2").is_dir() else None


def second_encoder(cache: ml_collections.ConfigDict) -> tuple[Path, str | None, str] | None:
    """(folder, subfolder or None, config key) of SDXL's second text encoder: `cache.text_encoder_2`, or the
    text_encoder_2/ of the SDXL pipeline folder `cache.text_encoder`; None for a one-encoder cache."""
    if cache.get("text_encoder_2"):
        return (*component(cache.text_encoder_2, "text_encoder_2", "cache.text_encoder_2"), "cache.text_encoder_2")
    if cache.text_encoder and _sdxl_pipeline_folder(cache.text_encoder) is not None:
        return Path(cache.text_encoder).expanduser().resolve(), "text_encoder_2", "cache.text_encoder"
    return None


class PromptEncoder:
    """SDXL's two frozen CLIP text encoders, jitted on fixed-size batches with rows split over the mesh:
    captions -> {'encoder_hidden_states': [N, L, D1 + D2], 'text_embeds': [N, P]} (float32)."""

    def __init__(self, cache: ml_collections.ConfigDict, mesh: Any, rules: Any, batch: int):
        """Loads cache.text_encoder (and its tokenizer) and the second encoder of `second_encoder(cache)`.

        Raises:
            ValueError: a folder that holds no CLIP text encoder or tokenizer, a second encoder without a
                projection, or tokenizers of different lengths.
        """
        self.mesh, self.batch = mesh, batch
        path_1, sub_1 = component(cache.text_encoder, "text_encoder", "cache.text_encoder")
        tok_1 = tokenizer_folder(cache, path_1, sub_1)
        path_2, sub_2, key_2 = second_encoder(cache)
        tok_2 = tokenizer_folder(cache, path_2, sub_2, "tokenizer_2")
        module_1, params_1, self.tokenizer_1 = load_text_encoder(str(path_1), sub_1, str(tok_1))
        module_2, params_2, self.tokenizer_2 = load_text_encoder(str(path_2), sub_2, str(tok_2))
        if not module_2.config.with_projection:
            raise ValueError(f"config key {key_2!r}: {path_2 / (sub_2 or '')} holds a {module_2.config.class_name}; "
                             f"SDXL's second text encoder is a CLIPTextModelWithProjection (its pooled embedding)")
        self.max_length = max_text_length(self.tokenizer_1, module_1)
        if max_text_length(self.tokenizer_2, module_2) != self.max_length:
            raise ValueError(f"config key {key_2!r}: its tokenizer makes {max_text_length(self.tokenizer_2, module_2)} "
                             f"tokens, text_encoder's {self.max_length}; their hidden states are concatenated")
        rep, rows = parallel.replicated(mesh), parallel.batch_sharding(mesh)
        self.params = jax.device_put((params_1, params_2), rep)

        def encode(params: Any, ids_1: jax.Array, ids_2: jax.Array) -> dict[str, jax.Array]:
            context, pooled = encode_prompt_sdxl([(module_1, params[0]), (module_2, params[1])], [ids_1, ids_2])
            return {"encoder_hidden_states": context.astype(jnp.float32),  # [B, L, D1 + D2]
                    "text_embeds": pooled.astype(jnp.float32)}  # [B, P]

        self._encode = parallel.jit_with_rules(encode, mesh, rules, in_shardings=(rep, rows, rows),
                                               out_shardings=rows)
        ids = jax.ShapeDtypeStruct((1, self.max_length), jnp.int32)
        shapes = jax.eval_shape(encode, (params_1, params_2), ids, ids)
        self.info = {
            "encoder": str(path_1), "subfolder": sub_1, "tokenizer": str(tok_1),
            "encoder_2": str(path_2), "subfolder_2": sub_2, "tokenizer_2": str(tok_2),
            "config_sha256": config_sha256([(path_1, sub_1), (path_2, sub_2)], (tok_1, tok_2)),
            "max_length": self.max_length,
            "shapes": {k: list(v.shape[1:]) for k, v in shapes.items()}}

    def __call__(self, captions: list[str]) -> dict[str, np.ndarray]:
        """Up to `batch` captions -> {'encoder_hidden_states': [N, L, D1 + D2], 'text_embeds': [N, P]}."""
        n = len(captions)
        padded = list(captions) + [""] * (self.batch - n)
        ids = [tokenize_prompts(t, padded, max_length=self.max_length) for t in (self.tokenizer_1, self.tokenizer_2)]
        ids = parallel.global_array(tuple(ids), parallel.batch_sharding(self.mesh))
        out = jax.device_get(self._encode(self.params, *ids))
        return {k: np.asarray(v)[:n] for k, v in out.items()}


# ----------------------------------------------------------------------------- micro-conditioning


class SizedFolderSource(FolderSource):
    """A FolderSource whose records also hold 'original_size': int64 [2], the file's (height, width)."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = super().__getitem__(index)
        path, _ = self._items[index]
        with Image.open(path) as image:  # reads the header only
            record["original_size"] = np.array([image.height, image.width], np.int64)
        return record


def sized_source(config: ml_collections.ConfigDict) -> SizedFolderSource:
    """The `data` block's image folder with each image's original size; ValueError for another source."""
    if config.source != "folder" or tuple(config.get("classes", ())):
        what = f"data.source={config.source!r}" if config.source != "folder" else "data.classes"
        raise ValueError(f"config key {what.split('=')[0]!r}: an SDXL cache (two text encoders) stores each image's "
                         f"size before resizing, which only an image folder keeps: use data.source='folder' and no "
                         f"data.classes (got {what})")
    return SizedFolderSource(config.path, image_size=config.image_size, channels=config.channels,
                             caption_column=config.get("caption_column", ""))


def resized_size(original_size: tuple[int, int], short_side: int) -> tuple[int, int]:
    """(height, width) of an image of `original_size` resized so that its short side is `short_side`, the long
    side truncated as torchvision's Resize(int) (diffusers' scripts) does."""
    h, w = int(original_size[0]), int(original_size[1])
    if w <= h:
        return int(short_side * h / w), short_side
    return short_side, int(short_side * w / h)


def variant_time_ids(original_size: tuple[int, int], image_size: int, offsets: list[tuple[int, int]], side: int,
                     flip: bool) -> np.ndarray:
    """float32 [V, 6] time ids of an image's stored variants, in the cache's order (each crop, then its mirror
    with `flip`). `offsets`: each crop's (top, left) inside the center image_size square (diffax.data.cache's
    crop_offsets); `side`: the crops' side."""
    height, width = resized_size(original_size, image_size)
    top_0, left_0 = int(round((height - image_size) / 2.0)), int(round((width - image_size) / 2.0))
    rows = []
    for top, left in offsets:
        top, left = top_0 + int(top), left_0 + int(left)
        for mirrored in ((False, True) if flip else (False,)):
            # The mirror of the crop at `left` lies at width - left - side in the mirrored image.
            x = width - left - side if mirrored else left
            rows.append(time_ids(original_size=tuple(original_size), crops_coords_top_left=(top, x),
                                 target_size=(side, side)))
    return np.stack(rows)  # [V, 6]


# ----------------------------------------------------------------------------- the U-Net's inputs


def unet_cond(cond: dict[str, Any], model_config: Any, *, null: bool = False) -> dict[str, Any]:
    """A latent cache's text conditioning as the U-Net's keyword inputs: an SDXL U-Net (addition_embed_type
    'text_time') takes {'encoder_hidden_states', 'added_cond_kwargs': {'text_embeds', 'time_ids'}}, another
    text U-Net the hidden states alone.

    `cond`: {'encoder_hidden_states': [B, L, D], 'text_embeds': [B, P], 'time_ids': [B, 6]} (a batch), or with
    `null` the empty prompt's (no batch axis, no time ids): its 'time_ids' are None, which label dropout
    (diffax.train.step) reads as "keep each example's own".
    """
    out = {"encoder_hidden_states": cond["encoder_hidden_states"]}
    if getattr(model_config, "addition_embed_type", None) != "text_time":
        return out
    missing = [k for k in ("text_embeds",) + (() if null else ("time_ids",)) if k not in cond]
    if missing:
        raise ValueError(f"model.addition_embed_type is 'text_time' (an SDXL U-Net) but the latent cache holds no "
                         f"{' or '.join(missing)}: write it with SDXL's two text encoders (cache.text_encoder_2, "
                         f"docs/data.md)")
    out["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"], "time_ids": None if null else cond["time_ids"]}
    return out


# ----------------------------------------------------------------------------- sampling while training


def sample_time_ids(manifest: dict[str, Any], n: int) -> np.ndarray:
    """float32 [N, 6] time ids of images sampled at the cache's image size: original = target = (side, side),
    crop corner (0, 0), the defaults of SDXL's pipeline at that size."""
    side = int(manifest["latent"]["image_size"])
    row = time_ids(original_size=(side, side), crops_coords_top_left=(0, 0), target_size=(side, side))
    return np.tile(row, (n, 1))


class PromptEmbeddings:
    """The conditioning of prompts for an SDXL run's grids and evaluations: a caption of the cache's grid
    (manifest 'captions') takes its stored embeddings, any other prompt goes through the cache's two text
    encoders (`PromptEncoder`, loaded for one batch of prompts and let go, so they hold no memory while
    training)."""

    def __init__(self, source: Any, mesh: Any, rules: Any):
        """`source`: a LatentCacheSource of an SDXL cache (its path, manifest and stored records)."""
        self.path, self.manifest, self.stored = source.path, source.manifest, source.stored
        self.mesh, self.rules = mesh, rules

    def encoder_config(self) -> ml_collections.ConfigDict:
        """The `cache` block that names the encoders and tokenizers the cache was written with.

        Raises:
            ValueError: one of them is no longer a folder (one line, naming manifest.json's key).
        """
        text = self.manifest["text"]
        folders = {}
        for key, sub in (("encoder", "subfolder"), ("encoder_2", "subfolder_2"), ("tokenizer", None),
                         ("tokenizer_2", None)):
            folder = Path(text.get(key) or "") / ((sub and text.get(sub)) or "")
            if not text.get(key) or not folder.is_dir():
                raise ValueError(f"{self.path / 'manifest.json'}: key 'text.{key}': {str(folder)!r} is not a folder; "
                                 f"prompts other than the cache's captions (sample.prompts, eval) are encoded with "
                                 f"the cache's two text encoders: make them reachable there, or leave sample.prompts "
                                 f"empty and eval.kind ''")
            folders[key] = str(folder)
        return ml_collections.ConfigDict(dict(text_encoder=folders["encoder"], tokenizer=folders["tokenizer"],
                                              text_encoder_2=folders["encoder_2"], tokenizer_2=folders["tokenizer_2"]))

    def _stored(self, prompts: list[str]) -> dict[str, dict[str, np.ndarray]]:
        """{caption: its stored arrays} for those of `prompts` among the cache's grid captions; these are the
        first distinct captions of the cache, so the scan ends within its first records."""
        wanted = {p for p in prompts if p in (self.manifest.get("captions") or [])}
        found: dict[str, dict[str, np.ndarray]] = {}
        for i in range(len(self.stored)):
            if len(found) == len(wanted):
                break
            record = self.stored[i]
            caption = str(record.get("caption", ""))
            if caption in wanted and caption not in found:
                found[caption] = {k: np.asarray(record[k], np.float32)
                                  for k in ("encoder_hidden_states", "text_embeds")}
        return found

    def __call__(self, prompts: list[str]) -> dict[str, dict[str, np.ndarray]]:
        """{prompt: {'encoder_hidden_states': [L, D1 + D2], 'text_embeds': [P]}} (float32) for distinct `prompts`."""
        out = self._stored(prompts)
        rest = [p for p in prompts if p not in out]
        if rest:
            shards = parallel.batch_divisor(self.mesh)
            batch = -(-len(rest) // shards) * shards  # rows split evenly over the batch shards
            encoder = PromptEncoder(self.encoder_config(), self.mesh, self.rules, batch)
            arrays = encoder(rest)
            out.update({p: {k: v[i] for k, v in arrays.items()} for i, p in enumerate(rest)})
        return out
