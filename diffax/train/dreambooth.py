"""DreamBooth with prior preservation: class images from the pipeline itself, then the two caches.

    python -m diffax.train.dreambooth --config=configs/dreambooth_sd15.py:prepare   # class images + caches
    python train.py --config=configs/dreambooth_sd15.py --workdir=runs/dreambooth   # fine-tuning

As diffusers' examples/dreambooth/train_dreambooth.py (and train_dreambooth_lora.py) do it:

1. `generate_class_images`: the `train.init_from` pipeline draws images of `dreambooth.class_prompt` ("a
   photo of dog") into `dreambooth.class_data` until it holds `num_class_images`, `sample_batch_size` per
   call. Images already there count, so a rerun (or a killed run run again) only makes the missing ones;
   each is written under a temporary name and renamed, so none is ever half written. File k is
   `{k}-{sha1 of its pixels}.jpg`, drawn from seed `config.seed + k`.
2. `build_caches`: the instance images (`dreambooth.instance_data`, every one captioned
   `instance_prompt`, "a photo of sks dog") and the first `num_class_images` class images (captioned
   `class_prompt`) through the pipeline's VAE and frozen text encoder into `cache.out/instance` and
   `cache.out/class` (diffax/data/latent_cache.py).
3. train.py with `data.source='dreambooth'` on `cache.out` (diffax/data/dreambooth.py): every step trains
   `train.batch_size` instance examples and as many class examples, and its loss is the instance loss plus
   `train.prior_loss_weight` x the class loss (diffax.train.step.prior_preservation_loss); `train.finetune`
   'full' or 'lora' (the LoRA exported for diffusers' `load_lora_weights`).
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from diffax.data.dreambooth import CLASS, INSTANCE
from diffax.data.folder import IMAGE_EXTENSIONS, FolderSource

STAGES = ("class_images", "cache", "prepare")


class PromptedSource:
    """The first `count` records of `source` (all with None), each captioned `prompt` (DreamBooth's images
    share one prompt, whatever captions their folder has)."""

    def __init__(self, source: Any, prompt: str, count: int | None = None):
        self._source = source
        self.prompt = prompt
        self._count = len(source) if count is None else min(count, len(source))
        self.num_classes: int = 0
        self.class_names: list[str] = []

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self._count:
            raise IndexError(f"record {index} of {self._count}")
        record = self._source[index]
        return {"image": record["image"], "label": np.int64(0), "caption": self.prompt}


def _require(config: ml_collections.ConfigDict, *keys: str) -> None:
    for key in keys:
        block, name = key.split(".")
        if not config[block][name]:
            raise ValueError(f"config key {key!r} is empty: DreamBooth needs it (docs/training.md, DreamBooth)")


def count_images(folder: str | Path) -> int:
    """Images at the top level of `folder` (0 when it does not exist)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return 0
    return sum(1 for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
               and p.suffix.lower() in IMAGE_EXTENSIONS)


def generate_class_images(config: ml_collections.ConfigDict) -> int:
    """Fills `dreambooth.class_data` up to `dreambooth.num_class_images` images of `dreambooth.class_prompt`
    drawn by the `train.init_from` pipeline (its own scheduler, `sample.steps` steps, guidance
    `sample.guidance_scale`, its default size); returns how many it made (0 when the folder is full).

    Raises:
        ValueError: an empty key (train.init_from, dreambooth.class_data / class_prompt), or a pipeline
            folder that cannot be loaded.
    """
    from tqdm import tqdm

    from diffax import pipelines

    _require(config, "dreambooth.class_data", "dreambooth.class_prompt", "train.init_from")
    db = config.dreambooth
    folder = Path(db.class_data).expanduser()
    have = count_images(folder)
    missing = db.num_class_images - have
    if missing <= 0:
        print(f"{folder}: holds {have} class images (dreambooth.num_class_images={db.num_class_images}); "
              f"none to make", file=sys.stderr, flush=True)
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    pipe = pipelines.load(config.train.init_from)
    batch = db.sample_batch_size
    bar = tqdm(total=missing, desc="class images", disable=not sys.stderr.isatty(), unit="image")
    made = 0
    for start in range(have, db.num_class_images, batch):
        # Always a full batch (one compiled program); images past num_class_images are dropped.
        seeds = [config.seed + start + i for i in range(batch)]
        images = pipe([db.class_prompt] * batch, num_inference_steps=config.sample.steps,
                      guidance_scale=config.sample.guidance_scale, seed=seeds, output_type="pil").images
        for i, image in enumerate(images[:db.num_class_images - start]):
            digest = hashlib.sha1(image.tobytes()).hexdigest()
            tmp = folder / f".{start + i}-{digest}.partial-{os.getpid()}.jpg"
            image.save(tmp)
            os.replace(tmp, folder / f"{start + i}-{digest}.jpg")
            made += 1
        bar.update(min(batch, db.num_class_images - start))
        if bar.disable:
            print(f"class images: {have + made}/{db.num_class_images}", file=sys.stderr, flush=True)
    bar.close()
    return made


def _stage_config(config: ml_collections.ConfigDict, folder: str, prompt: str, out: Path
                  ) -> ml_collections.ConfigDict:
    """The cache config of one of the two folders: its path and prompt in `data` (so the cache's
    fingerprint and manifest name them), `cache.out` under the DreamBooth cache folder."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.data.source = "folder"
    c.data.path = str(Path(folder).expanduser())
    c.data.caption_template = prompt  # the one caption of every image (PromptedSource)
    c.cache.out = str(out)
    return c


def build_caches(config: ml_collections.ConfigDict) -> Path:
    """Writes `cache.out/instance` (every instance image with `instance_prompt`) and `cache.out/class` (the
    first `num_class_images` class images with `class_prompt`). A cache already there from the same
    folders, prompts, encoders and options is kept as it is (as `build_cache` keeps one), so after changing
    the images themselves remove `cache.out` first.
    Returns `cache.out`, the folder `data.source='dreambooth'` trains on.

    Raises:
        ValueError: an empty key, a folder without images, fewer class images than `num_class_images`
            (run the class_images stage first), a cache already there of another number of images, or what
            `diffax.data.cache.build_cache` refuses.
    """
    from diffax.data.cache import build_cache
    from diffax.data.latent_cache import MANIFEST, read_manifest

    _require(config, "dreambooth.instance_data", "dreambooth.instance_prompt", "dreambooth.class_data",
             "dreambooth.class_prompt", "cache.out")
    db = config.dreambooth
    out = Path(config.cache.out).expanduser()
    have = count_images(db.class_data)
    if have < db.num_class_images:
        raise ValueError(f"config key 'dreambooth.class_data': {db.class_data!r} holds {have} images, fewer than "
                         f"dreambooth.num_class_images={db.num_class_images}: run the class_images stage first")
    size, channels = config.data.image_size, config.data.channels
    stages = []
    for name, folder, prompt, count in ((INSTANCE, db.instance_data, db.instance_prompt, None),
                                        (CLASS, db.class_data, db.class_prompt, db.num_class_images)):
        stage = _stage_config(config, folder, prompt, out / name)
        source = PromptedSource(FolderSource(stage.data.path, image_size=size, channels=channels), prompt, count)
        # The fingerprint reads the config, not the images: a cache of another number of them is refused here.
        if (out / name / MANIFEST).is_file() and read_manifest(out / name)["count"] != len(source):
            raise ValueError(f"{out / name / MANIFEST}: key 'count' is {read_manifest(out / name)['count']}, but "
                             f"{stage.data.path!r} now gives {len(source)} images: remove {str(out / name)!r} to "
                             f"encode them again")
        stages.append((stage, source))
    for stage, source in stages:
        build_cache(stage, source)
    return out


def main(argv: list[str]) -> None:
    """`python -m diffax.train.dreambooth --config=configs/x.py:prepare [--stage=class_images|cache]`."""
    from absl import app, flags
    from ml_collections import config_flags

    from diffax.cli import parse_flags, run_reporting_errors
    from diffax.train.config import validate_config

    config_flags.DEFINE_config_file("config", None, "DreamBooth recipe (its prepare stage).", lock_config=True)
    flags.DEFINE_enum("stage", "prepare", STAGES, "class_images: make the missing class images; cache: encode "
                      "both folders; prepare: both, in that order.")
    flags.mark_flags_as_required(["config"])

    def run(args: list[str]) -> None:
        del args
        config, stage = flags.FLAGS.config, flags.FLAGS.stage
        validate_config(config)
        if stage in ("class_images", "prepare"):
            made = generate_class_images(config)
            print(f"made {made} class images in {config.dreambooth.class_data}", flush=True)
        if stage in ("cache", "prepare"):
            print(f"DreamBooth caches in {build_caches(config)}", flush=True)

    app.run(run_reporting_errors(run), argv=argv, flags_parser=parse_flags)


if __name__ == "__main__":
    main(sys.argv)
