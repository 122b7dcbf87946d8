"""DreamBooth with prior preservation (diffax.train.dreambooth, diffax.data.dreambooth, the train step's
prior_preservation_loss) on a tiny random Stable Diffusion pipeline: class images made by the pipeline and
not made again, the instance and class caches drawn in pairs, the loss as diffusers' two halves, and (slow)
the recipe trained a few steps, full and LoRA, its LoRA loaded by diffusers."""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffax import objectives
from diffax.data import make_source, make_train_iterator
from diffax.data.dreambooth import DreamBoothSource
from diffax.train import dreambooth
from diffax.train.config import validate_config
from diffax.train.step import Objective, diffusion_loss, prior_preservation_loss

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import config_files  # noqa: E402


recipe = functools.partial(config_files.recipe, "dreambooth_sd15")


def _objective(**kw) -> Objective:
    abar = np.cumprod(1 - np.linspace(1e-4, 2e-2, 1000))
    return Objective(alphas_cumprod=abar, **kw)


def test_prior_preservation_loss_is_the_instance_half_plus_weight_times_the_class_half():
    """diffusers: mse(instance half) + prior_loss_weight x mse(class half), by hand in numpy; interleaved rows
    give the same; min-SNR weights the instance half only."""
    rng = np.random.default_rng(0)
    out, x0, noise = (rng.standard_normal((4, 3, 3, 2)).astype(np.float32) for _ in range(3))
    t = np.array([10, 500, 20, 900])
    prior = np.array([False, False, True, True])
    for weight in (0.0, 1.0, 2.5):
        loss, metrics = prior_preservation_loss(out, x0, noise, t, _objective(prior_loss_weight=weight), prior)
        err = (out - noise) ** 2  # epsilon prediction: the target is the noise
        want = err[:2].mean() + weight * err[2:].mean()
        np.testing.assert_allclose(float(loss), want, rtol=1e-6)
        np.testing.assert_allclose(float(metrics["prior_loss"]), err[2:].mean(), rtol=1e-6)
        order = np.array([0, 2, 1, 3])  # DreamBooth batches interleave the pairs' rows
        again, _ = prior_preservation_loss(out[order], x0[order], noise[order], t[order],
                                           _objective(prior_loss_weight=weight), prior[order])
        np.testing.assert_allclose(float(again), want, rtol=1e-6)
    obj = _objective(prior_loss_weight=1.0, snr_gamma=5.0)
    loss, metrics = prior_preservation_loss(out, x0, noise, t, obj, prior)
    snr = np.asarray(objectives.loss_weight("epsilon", obj.alphas_cumprod, jnp.asarray(t), 5.0))
    per_example = ((out - noise) ** 2).reshape(4, -1).mean(1)
    np.testing.assert_allclose(float(metrics["instance_loss"]), (per_example * snr)[:2].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(loss), (per_example * snr)[:2].mean() + per_example[2:].mean(), rtol=1e-5)


class _Tiny:
    """A stand-in denoiser: one Dense over the channels, conditioned on nothing."""

    def __init__(self):
        import flax.linen as nn

        class Model(nn.Module):
            @nn.compact
            def __call__(self, x, t, encoder_hidden_states=None, train=True):
                return nn.Dense(x.shape[-1])(x)

        self.module = Model()


def test_diffusion_loss_with_prior_flags_is_linear_in_the_prior_loss_weight():
    """Through the train step's diffusion_loss (same key: same timesteps and noise): loss(w) = instance + w x
    prior, so the weight changes the loss by exactly the class half's error."""
    model = _Tiny().module
    rng = np.random.default_rng(1)
    batch = {"image": jnp.asarray(rng.standard_normal((4, 4, 4, 2)), jnp.float32),
             "cond": {"encoder_hidden_states": jnp.zeros((4, 3, 8))},
             "prior": jnp.array([False, True, False, True])}
    params = model.init(jax.random.key(0), batch["image"], jnp.zeros(4, jnp.int32))["params"]
    key = jax.random.key(2)
    runs = {w: diffusion_loss(model, params, _objective(prior_loss_weight=w), batch, key) for w in (0.0, 3.0)}
    inst, prior = float(runs[3.0][1]["instance_loss"]), float(runs[3.0][1]["prior_loss"])
    assert prior > 0 and inst > 0 and abs(inst - prior) > 1e-4
    for w, (loss, _) in runs.items():
        np.testing.assert_allclose(float(loss), inst + w * prior, rtol=1e-6)
    plain, _ = diffusion_loss(model, params, _objective(), {k: v for k, v in batch.items() if k != "prior"}, key)
    np.testing.assert_allclose(float(plain), (inst + prior) / 2, rtol=1e-6)  # no flags: one mean over all rows


def test_recipe_configs_validate_and_keep_the_examples_defaults():
    for stage in ("full", "lora", "prepare"):
        validate_config(recipe(stage))
    full, lora = recipe(), recipe("lora")
    assert (full.train.learning_rate, full.train.steps, full.train.finetune) == (5e-6, 800, "full")
    assert (lora.train.learning_rate, lora.train.steps, lora.train.finetune) == (1e-4, 500, "lora")
    assert full.train.prior_loss_weight == 1.0 and full.dreambooth.num_class_images == 200
    assert full.data.source == "dreambooth" and full.data.path == recipe("prepare").cache.out
    assert recipe("prepare").data.image_size == 512


class _FakePipeline:
    """diffax.pipelines.load's stand-in: images of the seed's colour, and the calls it got."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompt, *, num_inference_steps, guidance_scale, seed, output_type):
        from PIL import Image
        self.calls.append((list(prompt), list(seed)))
        images = [Image.fromarray(np.full((12, 12, 3), 10 * s, np.uint8)) for s in seed]
        return type("Output", (), {"images": images})


def test_class_images_are_made_once_in_full_batches_and_a_rerun_makes_none(tmp_path, monkeypatch):
    from PIL import Image

    import diffax.pipelines
    fake = _FakePipeline()
    monkeypatch.setattr(diffax.pipelines, "load", lambda path: fake)
    c = recipe("prepare")
    c.dreambooth.update(dict(class_data=str(tmp_path / "class"), class_prompt="a dog", num_class_images=3,
                             sample_batch_size=2))
    Image.new("RGB", (12, 12)).save(tmp_path / "unrelated.png")  # not in the class folder: not counted
    assert dreambooth.generate_class_images(c) == 3
    assert fake.calls == [(["a dog"] * 2, [0, 1]), (["a dog"] * 2, [2, 3])]  # the last image of 4 dropped
    files = sorted(p.name for p in (tmp_path / "class").iterdir())
    assert [f.split("-")[0] for f in files] == ["0", "1", "2"] and all(f.endswith(".jpg") for f in files)
    assert dreambooth.generate_class_images(c) == 0 and len(fake.calls) == 2  # a rerun loads nothing
    c.dreambooth.num_class_images = 4  # one more wanted: image 3 only, from seed 3
    assert dreambooth.generate_class_images(c) == 1 and fake.calls[-1] == (["a dog"] * 2, [3, 4])
    assert dreambooth.count_images(tmp_path / "class") == 4


def _write_cache(folder: Path, count: int, text_value: float, token: int | None = None) -> None:
    """A latent cache written as diffax.data.cache writes one: `count` records of 2x2x4 latents, each with the
    text embedding `text_value` everywhere (a prompt's stand-in); with `token`, each record's token ids
    [token, 1, 1] and the empty prompt's [0, 1, 1], as a cache for text-encoder training stores them."""
    from array_record.python.array_record_module import ArrayRecordWriter

    from diffax.data.latent_cache import FORMAT, VERSION, encode_record
    folder.mkdir(parents=True)
    writer = ArrayRecordWriter(str(folder / "shard_00000.array_record"), "group_size:1")
    for i in range(count):
        writer.write(encode_record({"mean": np.full((1, 2, 2, 4), i, np.float32),
                                    "logvar": np.full((1, 2, 2, 4), -30.0, np.float32), "label": np.int64(0),
                                    "encoder_hidden_states": np.full((3, 8), text_value, np.float32),
                                    **({} if token is None else {"input_ids": np.array([token, 1, 1], np.int32)})}))
    writer.close()
    np.savez(folder / "empty_prompt.npz", encoder_hidden_states=np.zeros((3, 8), np.float32))
    (folder / "manifest.json").write_text(json.dumps({
        "format": FORMAT, "version": VERSION, "count": count,
        "shards": [{"file": "shard_00000.array_record", "count": count}], "num_classes": 0, "class_names": [],
        "latent": {"shape": [2, 2, 4], "variants": [{"crop": "center", "flip": False}]},
        "scaling": {"scaling_factor": 1.0, "shift_factor": None, "latents_mean": None, "latents_std": None},
        "text": {"shapes": {"encoder_hidden_states": [3, 8]},
                 **({} if token is None else {"empty_input_ids": [0, 1, 1]})},
        "captions": [f"prompt {text_value}"]}))


def test_dreambooth_source_pairs_every_instance_with_a_class_image(tmp_path):
    """Two instances, five class images: five pairs per epoch, (k mod 2, k mod 5), each pair's rows next to each
    other in a batch, flagged; the instance rows carry the instance prompt."""
    _write_cache(tmp_path / "db" / "instance", 2, 1.0)
    _write_cache(tmp_path / "db" / "class", 5, -1.0)
    source = make_source(ml_collections.ConfigDict(dict(source="dreambooth", path=str(tmp_path / "db"))))
    assert isinstance(source, DreamBoothSource) and len(source) == 10 and len(source.stored) == 5
    assert source.manifest["captions"] == ["prompt 1.0"]  # grids show the instance prompt
    pairs = [(float(a["mean"].flat[0]), float(b["mean"].flat[0])) for a, b in
             (source.stored[k] for k in range(5))]
    assert pairs == [(0, 0), (1, 1), (0, 2), (1, 3), (0, 4)]
    it = make_train_iterator(source, global_batch_size=5, seed=0, shard_index=0, shard_count=1)
    batch = next(it)
    assert batch["image"].shape == (10, 2, 2, 4) and batch["prior"].tolist() == [False, True] * 5
    text = batch["cond"]["encoder_hidden_states"][:, 0, 0]
    np.testing.assert_array_equal(text, np.where(batch["prior"], -1.0, 1.0))
    latent = batch["image"][:, 0, 0, 0]  # posterior std 3e-7: the stored index itself
    assert sorted(np.round(latent[1::2]).tolist()) == [0, 1, 2, 3, 4]  # an epoch: every class image once
    np.testing.assert_array_equal(np.round(latent[0::2]), np.round(latent[1::2]) % 2)  # pair k: (k % 2, k % 5)
    row = source[3]
    assert bool(row["prior"]) and row["image"].shape == (2, 2, 4)


def test_a_text_encoder_run_gets_the_token_ids_and_prior_flags_of_dreambooth_rows(tmp_path):
    """train.text_encoder with DreamBooth: the batch the step sees holds each row's token ids and the 'prior'
    flags, so the prior-preservation loss applies as with a frozen encoder."""
    import flax.linen as nn

    from diffax.train import text_encoder
    from diffax.train.loop import model_batch
    _write_cache(tmp_path / "db" / "instance", 2, 1.0, token=7)
    _write_cache(tmp_path / "db" / "class", 3, -1.0, token=9)
    source = DreamBoothSource(tmp_path / "db")
    batch = next(make_train_iterator(source, global_batch_size=3, seed=0, shard_index=0, shard_count=1))
    class Unet(nn.Dense):  # model_batch reads the model's type and its U-Net's config only
        config: Any = None
    model = text_encoder.WithTextEncoder(Unet(1), nn.Dense(1))
    out = model_batch(batch, model)
    assert out["prior"].tolist() == [False, True] * 3
    np.testing.assert_array_equal(out["cond"]["input_ids"][:, 0], np.where(out["prior"], 9, 7))
    assert source.null_input_ids.tolist() == [0, 1, 1]  # what label dropout feeds the text encoder


def test_dreambooth_source_names_a_missing_cache(tmp_path):
    _write_cache(tmp_path / "db" / "instance", 2, 1.0)
    with pytest.raises(ValueError, match=r"class/manifest.json: missing.*diffax.train.dreambooth"):
        DreamBoothSource(tmp_path / "db")


def test_build_caches_refuses_a_cache_of_another_number_of_images(tmp_path):
    """The class cache holds 5 records but the run now asks for 3 class images: refused before any encoding."""
    from PIL import Image
    for name, n in (("instance", 2), ("class", 3)):
        (tmp_path / name).mkdir()
        for i in range(n):
            Image.new("RGB", (8, 8)).save(tmp_path / name / f"{i}.png")
    _write_cache(tmp_path / "cache" / "instance", 2, 1.0)
    _write_cache(tmp_path / "cache" / "class", 5, -1.0)
    c = recipe("prepare")
    c.dreambooth.update(dict(instance_data=str(tmp_path / "instance"), class_data=str(tmp_path / "class"),
                             num_class_images=3))
    c.cache.out = str(tmp_path / "cache")
    with pytest.raises(ValueError, match=r"class/manifest.json: key 'count' is 5.*gives 3 images: remove"):
        dreambooth.build_caches(c)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict:
    """A tiny SD pipeline, three instance images, three class images made by it, and the two caches."""
    from PIL import Image
    from pipeline_fixtures import build_sd_pipeline

    root = tmp_path_factory.mktemp("dreambooth")
    pipe = build_sd_pipeline(root / "sd")
    instance = root / "instance"
    instance.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(instance / f"{i}.png")
    c = recipe("prepare")
    c.train.init_from = str(pipe)
    c.dreambooth.update(dict(instance_data=str(instance), instance_prompt="a cat", class_data=str(root / "class"),
                             class_prompt="a dog", num_class_images=3, sample_batch_size=2))
    c.data.update(dict(image_size=16))
    c.sample.steps = 2
    c.cache.update(dict(vae=str(pipe), text_encoder=str(pipe), out=str(root / "cache"), dtype="float32"))
    made = dreambooth.generate_class_images(c)
    again = dreambooth.generate_class_images(c)
    cache = dreambooth.build_caches(c)
    return dict(config=c, pipe=pipe, made=made, again=again, cache=cache, root=root)


@pytest.mark.slow  # the tiny pipeline's sampling loop, VAE and CLIP compile (about 30 s on 2 cores)
def test_the_pipeline_makes_the_class_images_and_both_caches(prepared):
    from PIL import Image
    assert prepared["made"] == 3 and prepared["again"] == 0
    files = sorted((prepared["root"] / "class").iterdir())
    assert len(files) == 3
    with Image.open(files[0]) as image:
        assert image.size == (16, 16)  # the tiny pipeline's default size
    manifests = [json.loads((prepared["cache"] / n / "manifest.json").read_text()) for n in ("instance", "class")]
    assert [m["captions"] for m in manifests] == [["a cat"], ["a dog"]] and [m["count"] for m in manifests] == [3, 3]
    source = DreamBoothSource(prepared["cache"])
    batch = next(make_train_iterator(source, global_batch_size=2, seed=0, shard_index=0, shard_count=1))
    assert batch["image"].shape == (4, 8, 8, 4)
    ehs = batch["cond"]["encoder_hidden_states"]
    np.testing.assert_array_equal(ehs[0], ehs[2])
    assert np.abs(ehs[0] - ehs[1]).max() > 1e-3  # the encoded prompts differ


@pytest.mark.slow
def test_build_caches_refuses_a_class_folder_with_too_few_images(prepared, tmp_path):
    c = prepared["config"].copy_and_resolve_references()
    c.dreambooth.num_class_images = 10
    c.cache.out = str(tmp_path / "cache")
    with pytest.raises(ValueError, match="dreambooth.class_data.*holds 3 images.*class_images stage"):
        dreambooth.build_caches(c)


def _train_config(prepared, stage: str, steps: int):
    from pipeline_fixtures import UNET
    c = recipe(stage)
    c.data.update(dict(path=str(prepared["cache"])))
    c.model.update(UNET, remat="none")
    c.train.update(dict(init_from=str(prepared["pipe"]), steps=steps, batch_size=8, log_every=1,
                        checkpoint_every=steps))
    return c


@pytest.mark.slow  # two U-Net compiles with gradients (minutes on 2 cores; 22 on a heavily loaded machine)
def test_recipe_trains_full_and_lora_and_diffusers_loads_the_lora(prepared, tmp_path):
    import torch
    from pipeline_fixtures import diffusers_pipeline

    from diffax.train.loop import train_and_evaluate

    c = _train_config(prepared, "full", 2)
    state = train_and_evaluate(c, tmp_path / "full")
    lines = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert int(state.step) == 2 and int(state.skipped) == 0
    for line in lines:  # the logged loss is instance + 1.0 x class
        np.testing.assert_allclose(line["loss"], line["instance_loss"] + line["prior_loss"], rtol=1e-5)

    c = _train_config(prepared, "lora", 3)
    c.train.learning_rate = 1e-2  # a visible change in three steps
    train_and_evaluate(c, tmp_path / "lora")
    file = tmp_path / "lora" / "export" / "pytorch_lora_weights.safetensors"
    assert file.is_file()
    pipe = diffusers_pipeline(str(prepared["pipe"]))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = pipe.unet(x, torch.tensor([500]), encoder_hidden_states=text).sample
        pipe.load_lora_weights(str(file.parent), adapter_name="dreambooth")
        after = pipe.unet(x, torch.tensor([500]), encoder_hidden_states=text).sample
    pipe.unload_lora_weights()
    assert (after - before).abs().max() > 1e-4 * before.abs().max()
