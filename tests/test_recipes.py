"""The full-size recipes: each config validates and builds its model abstractly (no weights), and its stages
run end to end at toy size: the cache stage through `diffax.data.cache` with a tiny random VAE, the train
stage through `train_and_evaluate` on that cache with the model shrunk."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from diffax.data.cache import build_cache
from diffax.models import build_model
from diffax.models.registry import boxed_init
from diffax.train.config import validate_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from config_files import recipe  # noqa: E402
from test_latent_cache import _few_digits, encoders  # noqa: E402,F401  (fixtures: a tiny VAE; the first digits)




def test_dit_xl2_imagenet_is_the_papers_recipe():
    for stage in ("train", "cache"):
        validate_config(recipe("dit_xl2_imagenet", stage))
    c = recipe("dit_xl2_imagenet")
    model = build_model(c.model)
    params = jax.eval_shape(lambda k: boxed_init(model.config, k), jax.random.key(0))
    # The paper's DiT-XL/2 count includes the fixed position table (256 patches x 1152), which is no parameter here.
    assert sum(np.prod(x.shape) for x in jax.tree.leaves(params)) + 256 * 1152 == 675_129_632
    assert model.config.sample_shape == (32, 32, 4) and model.config.out_channels == 8  # learned sigma
    assert model.config.num_classes == 1000 and model.config.has_null_cond
    assert (c.train.batch_size, c.train.learning_rate, c.train.lr_schedule, c.train.weight_decay) == (
        256, 1e-4, "constant", 0.0)
    assert (c.train.ema_decay, c.train.ema_warmup, c.train.label_dropout) == (0.9999, False, 0.1)
    assert (c.diffusion.beta_schedule, c.diffusion.num_train_timesteps) == ("linear", 1000)
    cache = recipe("dit_xl2_imagenet", "cache")
    assert (cache.data.source, cache.data.tfds_name, cache.data.image_size) == ("tfds", "imagenet2012", 256)
    assert c.data.source == "latent_cache" and c.data.path == cache.cache.out
    with pytest.raises(ValueError, match="dit_xl2_imagenet.py: the argument"):
        recipe("dit_xl2_imagenet", "sample")


def test_dit_xl2_imagenet_trains_two_steps_at_toy_size(encoders, tmp_path):
    from diffax.train.loop import train_and_evaluate

    # Stage 1: the recipe's cache block with the first digits and a 16x16 -> 8x8x4 random VAE.
    c = recipe("dit_xl2_imagenet", "cache")
    c.data.update(dict(source="digits", image_size=16, channels=1, worker_count=0))
    c.cache.update(dict(vae=str(encoders["vae"]), out=str(tmp_path / "cache"), batch_size=8))
    cache = build_cache(c)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert len(manifest["latent"]["variants"]) == 2  # the image and its mirror

    # Stage 2: the recipe's training on that cache, DiT-XL/2 shrunk to one block of width 16 at 8x8.
    c = recipe("dit_xl2_imagenet")
    c.data.update(dict(path=str(cache), worker_count=0))
    c.model.update(dict(sample_size=8, num_layers=1, num_attention_heads=2, attention_head_dim=8))
    c.train.update(dict(steps=2, batch_size=8, log_every=1, checkpoint_every=2, sample_every=0))
    state = train_and_evaluate(c, tmp_path / "run")
    assert int(state.step) == 2 and int(state.skipped) == 0
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    for line in lines:  # the learned-sigma hybrid loss, at the recipe's constant rate
        assert np.isfinite(line["loss"]) and np.isfinite(line["vb"]) and line["learning_rate"] == pytest.approx(1e-4)


def test_sd15_finetune_is_sd15s_unet_from_a_pipeline():
    for stage in ("train", "cache"):
        validate_config(recipe("sd15_finetune", stage))
    c = recipe("sd15_finetune")
    model = build_model(c.model)
    params = jax.eval_shape(lambda k: boxed_init(model.config, k), jax.random.key(0))
    assert sum(np.prod(x.shape) for x in jax.tree.leaves(params)) == 859_520_964  # SD 1.5's UNet
    assert c.train.init_from == c.cache.vae == c.cache.text_encoder  # one pipeline folder: unet/, vae/, text_encoder/
    cache = recipe("sd15_finetune", "cache")
    assert (cache.data.source, cache.data.image_size, cache.cache.flip) == ("folder", 512, True)
    assert c.data.source == "latent_cache" and c.data.path == cache.cache.out


def test_sd2_finetune_is_sd21s_unet_with_v_prediction():
    """SD 2.1's UNet (per-level heads, 1024-wide text embeddings, linear projections) at 96x96 latents,
    v-prediction, 768px cache; the rest is SD 1.5's recipe."""
    for stage in ("train", "cache"):
        validate_config(recipe("sd2_finetune", stage))
    c, sd15 = recipe("sd2_finetune"), recipe("sd15_finetune")
    model = build_model(c.model)
    params = jax.eval_shape(lambda k: boxed_init(model.config, k), jax.random.key(0))
    assert sum(np.prod(x.shape) for x in jax.tree.leaves(params)) == 865_910_724  # SD 2.x's UNet
    assert (c.diffusion.prediction_type, c.model.sample_size, recipe("sd2_finetune", "cache").data.image_size) == (
        "v_prediction", 96, 768)
    assert c.train.init_from == c.cache.vae == c.cache.text_encoder and c.data.path == c.cache.out
    assert c.train.to_dict() | {"init_from": None} == sd15.train.to_dict() | {"init_from": None}


@pytest.mark.slow  # a pipeline, a cache and a U-Net compile (about 2 minutes on 2 cores): `make test-slow`
def test_sd15_finetune_trains_two_steps_at_toy_size(tmp_path):
    """The recipe's stages on a tiny random SD pipeline and four captioned images, its model block swapped for
    the tiny pipeline's UNet: the weights start from the pipeline's unet/."""
    from PIL import Image
    from pipeline_fixtures import UNET, build_sd_pipeline

    from diffax.train.loop import train_and_evaluate

    pipe = build_sd_pipeline(tmp_path / "sd")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    with open(images / "metadata.jsonl", "w") as f:
        for i, word in enumerate(("red", "green", "blue", "gray")):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(images / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"a {word} square"}) + "\n")
    c = recipe("sd15_finetune", "cache")
    c.data.update(dict(path=str(images), image_size=16, worker_count=0))
    c.cache.update(dict(vae=str(pipe), text_encoder=str(pipe), out=str(tmp_path / "cache"), batch_size=8))
    cache = build_cache(c)

    c = recipe("sd15_finetune")
    c.data.update(dict(path=str(cache), worker_count=0))
    c.model.update(UNET, remat="none")  # rematerialisation only slows a toy compile
    c.train.update(dict(init_from=str(pipe), steps=2, batch_size=8, log_every=1, checkpoint_every=2,
                        sample_every=0))
    state = train_and_evaluate(c, tmp_path / "run")
    assert int(state.step) == 2 and int(state.skipped) == 0
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2] and all(np.isfinite(line["loss"]) for line in lines)
