"""The latent-diffusion digits recipe end to end at tiny sizes: the AutoencoderKL trains and exports a diffusers
folder, the frozen text encoder and tokenizer load in transformers, the latent cache feeds a text-conditioned
U-Net with empty-prompt label dropout, and the exported StableDiffusionPipeline folder samples the same images
in diffusers (torch) and in diffax."""
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import ldm_digits, ldm_digits_vae  # noqa: E402

from diffax.data.cache import build_cache  # noqa: E402
from diffax.data.tokenizer import TokenizerError, caption_words, word_tokenizer  # noqa: E402
from diffax.models import build_model  # noqa: E402
from diffax.models.registry import init_params  # noqa: E402
from diffax.train import autoencoder, latent_diffusion  # noqa: E402
from diffax.train.checkpoint import restore_for_sampling  # noqa: E402
from diffax.train.loop import train_and_evaluate  # noqa: E402

TEMPLATE = "a handwritten {}"


def tiny_vae_config(workdir: Path, steps: int = 16) -> ml_collections.ConfigDict:
    """configs/ldm_digits_vae.py at 8x8 digits and 8 / 16 channels: 4x4x4 latents."""
    c = ldm_digits_vae.get_config()
    c.data.image_size = 8
    c.model.block_out_channels = (8, 16)
    c.model.norm_num_groups = 4
    c.model.sample_size = 8
    c.train.steps = steps
    c.train.batch_size = 16
    c.train.warmup_steps = 2
    c.train.log_every = 2
    c.train.checkpoint_every = steps
    return c


def tiny_unet_config(root: Path, steps: int = 4) -> ml_collections.ConfigDict:
    """configs/ldm_digits.py on the tiny VAE's 4x4x4 latents, a 16-wide text encoder, paths under `root`,
    with one cross-attention level of two (half the compile), a grid of two prompts and a digits-accuracy
    evaluation at the last step."""
    c = ldm_digits.get_config()
    c.data.path = str(root / "cache")
    c.cache.vae = str(root / "vae" / autoencoder.EXPORT_DIR)
    c.cache.text_encoder = str(root / "text" / "text_encoder")
    c.cache.tokenizer = str(root / "text" / "tokenizer")
    c.cache.out = str(root / "cache")
    c.model.sample_size = 4
    c.model.block_out_channels = (16, 32)
    c.model.norm_num_groups = 8
    c.model.cross_attention_dim = 16
    c.model.down_block_types = ("CrossAttnDownBlock2D", "DownBlock2D")
    c.model.up_block_types = ("UpBlock2D", "CrossAttnUpBlock2D")
    c.train.steps = steps
    c.train.batch_size = 16
    c.train.warmup_steps = 1
    c.train.log_every = 2
    c.train.checkpoint_every = steps
    c.train.label_dropout = 0.5
    c.train.sample_every = c.train.eval_every = steps
    c.sample.update(dict(steps=2, prompts=("a handwritten one", "a handwritten two")))
    c.eval.update(dict(kind="digits_accuracy", num_samples=20))  # the grid's count: the same programs
    return c


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    """The whole chain at tiny sizes under one folder: vae/, text/, cache/, unet/, export/."""
    root = tmp_path_factory.mktemp("ldm")
    train_and_evaluate(tiny_vae_config(root), root / "vae")
    config = tiny_unet_config(root)
    latent_diffusion.write_text_encoder(root / "text", latent_diffusion.digit_captions(TEMPLATE), hidden_size=16,
                                        num_layers=1, num_heads=2, max_length=6)
    cache_config = tiny_unet_config(root)
    cache_config.data.source, cache_config.data.image_size, cache_config.data.channels = "digits", 8, 3
    build_cache(cache_config)
    train_and_evaluate(config, root / "unet")
    saved, params, _ = restore_for_sampling(root / "unet")
    latent_diffusion.export_pipeline(root / "export", (build_model(saved.model), params), vae=config.cache.vae,
                                     text_encoder=config.cache.text_encoder, tokenizer=config.cache.tokenizer,
                                     scheduler=latent_diffusion.scheduler_config(saved))
    return root


def _losses(workdir: Path, key: str) -> list[float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def test_autoencoder_trains_and_exports_a_diffusers_vae(recipe):
    import diffusers
    import torch

    rec = _losses(recipe / "vae", "reconstruction")
    assert len(rec) >= 4 and rec[-1] < 0.7 * rec[0], rec  # 16 steps from random weights
    folder = recipe / "vae" / autoencoder.EXPORT_DIR
    vae = diffusers.AutoencoderKL.from_pretrained(folder).eval()
    # scaling_factor is 1 / std of the digits' latents: the scaled latents of real digits have std ~1.
    from diffax.data.digits import load_digits_arrays
    images, _ = load_digits_arrays(8, 3)
    x = torch.from_numpy(images[:256].transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(0))
    std = float((z * vae.config.scaling_factor).std())
    assert 0.8 < std < 1.25, std


def test_autoencoder_objective_terms():
    """The loss is the L1 reconstruction error of a posterior sample plus kl_weight x the per-pixel KL."""
    config = tiny_vae_config(Path("unused"))
    model = build_model(config.model)
    params = init_params(model.config, jax.random.key(0))
    x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3), minval=-1.0, maxval=1.0)
    key = jax.random.key(2)
    loss, metrics = autoencoder.AutoencoderObjective("l1", kl_weight=0.5).loss(model, params, {"image": x}, key)
    posterior = model.apply({"params": params}, x, method="encode")
    rec = model.apply({"params": params}, posterior.sample(key), method="decode")
    np.testing.assert_allclose(metrics["reconstruction"], jnp.abs(rec - x).mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["kl"], posterior.kl().mean() / (8 * 8 * 3), rtol=1e-5)
    np.testing.assert_allclose(loss, metrics["reconstruction"] + 0.5 * metrics["kl"], rtol=1e-6)
    with pytest.raises(ValueError, match="autoencoder.reconstruction"):
        autoencoder.AutoencoderObjective("l2")
    config.train.sample_every = 10
    with pytest.raises(ValueError, match="train.sample_every"):
        autoencoder.make_loss_fn(model, config)


def test_text_encoder_and_tokenizer_load_in_transformers(recipe):
    import torch
    import transformers

    folder = recipe / "text"
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer")
    assert tokenizer.tokenize("a handwritten seven") == ["a</w>", "handwritten</w>", "seven</w>"]
    captions = [*latent_diffusion.digit_captions(TEMPLATE), ""]
    ids = tokenizer(captions, padding="max_length", max_length=6, return_tensors="pt").input_ids
    encoder = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    with torch.no_grad():
        states = encoder(ids).last_hidden_state.numpy().reshape(len(captions), -1)
    distances = np.linalg.norm(states[:, None] - states[None], axis=-1)[np.triu_indices(len(captions), 1)]
    assert distances.min() > 0.1  # every caption, the empty one included, reaches the U-Net distinctly


def test_word_tokenizer_refuses_non_words(tmp_path):
    assert caption_words(["a handwritten two", "A handwritten nine"]) == ("a", "handwritten", "nine", "two")
    with pytest.raises(TokenizerError, match="'seven7'"):
        word_tokenizer(tmp_path, ["seven7"])


def test_unet_trains_on_the_cache_with_empty_prompt_dropout(recipe):
    from diffax.data.latent_cache import LatentCacheSource
    from diffax.train.loop import make_objective

    source = LatentCacheSource(recipe / "cache")
    assert source[0]["cond"]["encoder_hidden_states"].shape == (6, 16)
    config = tiny_unet_config(recipe)
    objective = make_objective(config, build_model(config.model), source.null_cond)
    assert objective.label_dropout == 0.5 and objective.null_cond["encoder_hidden_states"].shape == (6, 16)
    losses = _losses(recipe / "unet", "loss")
    assert losses and np.isfinite(losses).all()


def test_unet_run_writes_prompt_grids_and_evaluates_its_samples(recipe):
    from PIL import Image

    lines = [json.loads(line) for line in (recipe / "unet" / "metrics.jsonl").read_text().splitlines()]
    (evaluation,) = [line for line in lines if "digits_accuracy" in line]
    assert evaluation["step"] == 4 and 0.0 <= evaluation["digits_accuracy"] <= 1.0
    grid = np.asarray(Image.open(recipe / "unet" / "samples" / "step_000004.png"))
    # Two prompts x 10 samples, decoded by the VAE to 8 px, 1 px apart, upscaled 8x.
    assert grid.shape == ((2 * 9 + 1) * 8, (10 * 9 + 1) * 8, 3)


def test_exported_pipeline_samples_the_same_in_diffusers_and_diffax(recipe):
    folder = recipe / "export"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["safety_checker"] == [None, None]
    prompts = latent_diffusion.digit_captions(TEMPLATE)[:3]
    noise = latent_diffusion.prompt_noise(folder, len(prompts), 2, seed=0)
    call = dict(steps=3, guidance_scale=3.0)
    ours = latent_diffusion.diffax_images(folder, prompts, noise, **call)
    theirs = latent_diffusion.diffusers_images(folder, prompts, noise, **call)
    assert ours.shape == theirs.shape == (6, 8, 8, 3)
    # fp32 on both sides through text encoder, 3 guided U-Net steps and the VAE decode: the same images up to
    # float32 rounding (the differences measured are ~1e-6 of the [0, 1] range).
    np.testing.assert_allclose(ours, theirs, atol=2e-4)
    assert np.abs(ours[0] - ours[2]).max() > 1e-3  # different prompts and noise give different images
