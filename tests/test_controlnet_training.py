"""ControlNet training (diffax.train.controlnet): the ControlNet made from the U-Net as diffusers'
`ControlNetModel.from_unet` makes it, train steps that move the ControlNet and leave every U-Net weight
bit-identical, the export that diffusers and diffax's pipeline load (same residuals as diffax's), the
latent cache's conditioning images aligned with their cropped and flipped images, and (slow) both stages of
configs/controlnet_sd15.py at toy size.

Tiny random models: a 2-block U-Net of width 16/32 on 8x8 latents, a ControlNet whose conditioning
embedding has two widths (images 2x the latents, the tiny VAE's factor).
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffax import convert  # noqa: E402
from diffax.data import LatentCacheSource  # noqa: E402
from diffax.data.cache import _crops, build_cache  # noqa: E402
from diffax.data.latent_cache import read_manifest  # noqa: E402
from diffax.models.controlnet import ControlNetConfig  # noqa: E402
from diffax.train import controlnet, finetune  # noqa: E402
from diffax.train.config import base_config  # noqa: E402
from diffax.convert.rules import flax_to_torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import config_files  # noqa: E402
from pipeline_fixtures import UNET, randomise, tiny_vae  # noqa: E402

EMBEDDING = (8, 16)  # conditioning_embedding_out_channels: conditioning images 2x the latents
SIDE, TOKENS, CROSS, BATCH = 8, 5, 32, 8  # BATCH: one row per simulated device


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory) -> Path:
    """A random UNet2DConditionModel saved as a pipeline's unet/ (what train.init_from points at)."""
    root = tmp_path_factory.mktemp("pipeline")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    randomise(diffusers.UNet2DConditionModel(**UNET), seed=3).save_pretrained(root / "unet")
    return root


def run_config(unet_folder: Path, **train) -> ml_collections.ConfigDict:
    c = base_config()
    c.model = ml_collections.ConfigDict(dict(name="UNet2DConditionModel", **UNET))
    c.train.update({**dict(finetune="controlnet", init_from=str(unet_folder), controlnet_embedding_channels=EMBEDDING,
                           batch_size=BATCH), **train})
    c.diffusion.update(dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    return c


class Batches:
    """A stand-in latent-cache source: random latents, text and conditioning images in [0, 1]."""

    def __init__(self, seed: int = 0, side: int = SIDE * 2):
        rng = np.random.default_rng(seed)
        self.batch = {"image": rng.standard_normal((BATCH, SIDE, SIDE, 4)).astype(np.float32),
                      "label": np.zeros((BATCH,), np.int32),
                      "cond": {"encoder_hidden_states": rng.standard_normal((BATCH, TOKENS, CROSS)).astype(np.float32),
                               "controlnet_cond": rng.uniform(0, 1, (BATCH, side, side, 3)).astype(np.float32)}}

    def __getitem__(self, i: int) -> dict:
        return jax.tree.map(lambda a: a[i], self.batch)

    def __len__(self) -> int:
        return BATCH


@pytest.fixture(scope="module")
def prepared(unet_folder):
    """(U-Net module, the ControlNet run's setup from finetune.prepare)."""
    unet = convert.load(unet_folder / "unet")[0]
    return unet, finetune.prepare(run_config(unet_folder), unet)


def test_the_controlnet_starts_as_diffusers_from_unet(unet_folder, prepared):
    """The run's ControlNet equals diffusers' ControlNetModel.from_unet of the same U-Net: same config, the
    U-Net's encoder weights bit for bit, zero convolutions zero (only the conditioning embedding's inner
    convs are random on both sides); the U-Net is the frozen base, the ControlNet the trainable tree."""
    _, tuning = prepared
    reference = diffusers.ControlNetModel.from_unet(diffusers.UNet2DConditionModel.from_pretrained(
        unet_folder / "unet"), conditioning_embedding_out_channels=EMBEDDING)
    assert tuning.controlnet_config == ControlNetConfig.from_diffusers(dict(reference.config))
    ref_state = {k: v.numpy() for k, v in reference.state_dict().items()}
    ours = flax_to_torch(tuning.trainable)  # torch names and layouts
    assert sorted(ours) == sorted(ref_state)
    compared = 0
    for key, ref in ref_state.items():
        if key.startswith("controlnet_cond_embedding.") and not key.startswith("controlnet_cond_embedding.conv_out"):
            continue
        np.testing.assert_array_equal(np.asarray(ours[key]), ref, err_msg=key)
        compared += 1
    assert compared > len(ref_state) // 2
    zero = [k for k in ours if k.startswith(("controlnet_down_blocks", "controlnet_mid_block",
                                             "controlnet_cond_embedding.conv_out"))]
    assert len(zero) == 2 * (len(reference.controlnet_down_blocks) + 2)  # weight and bias of each
    assert all(not np.any(np.asarray(ours[k])) for k in zero)
    assert "up_blocks_0" in tuning.frozen and "up_blocks_0" not in tuning.trainable
    assert tuning.base_record["mode"] == "controlnet"


def test_controlnet_from_continues_a_saved_controlnet(unet_folder, prepared, tmp_path):
    """train.controlnet_from: the trainable tree is that ControlNet's weights, all of them (its random
    conditioning embedding too), in the run's dtypes; the U-Net stays the frozen base."""
    unet, fresh = prepared
    reference = diffusers.ControlNetModel.from_unet(diffusers.UNet2DConditionModel.from_pretrained(
        unet_folder / "unet"), conditioning_embedding_out_channels=EMBEDDING)
    reference.save_pretrained(tmp_path / "controlnet")
    tuning = finetune.prepare(run_config(unet_folder, controlnet_from=str(tmp_path / "controlnet")), unet)
    assert tuning.controlnet_config == fresh.controlnet_config
    ours = flax_to_torch(tuning.trainable)
    for key, ref in reference.state_dict().items():
        np.testing.assert_array_equal(np.asarray(ours[key]), ref.numpy(), err_msg=key)
    assert tuning.base_record["controlnet_from"] == str(tmp_path / "controlnet")
    assert tuning.base_record["fingerprint"] == fresh.base_record["fingerprint"]


def test_cache_stores_conditioning_images_aligned_with_their_images(tmp_path):
    """A folder whose metadata.jsonl names each image's conditioning image (here the image inverted, kept in
    a subfolder that is not read as a class): the cache stores it per crop / flip variant exactly as the
    image was cut, and a draw gives the variant its latent came from, in [0, 1]."""
    from PIL import Image

    folder = tmp_path / "images"
    (folder / "control").mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    with open(folder / "metadata.jsonl", "w") as f:
        for i, image in enumerate(images):
            Image.fromarray(image).save(folder / f"{i}.png")
            Image.fromarray(255 - image).save(folder / "control" / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "conditioning_image": f"control/{i}.png",
                                "text": "a square"}) + "\n")
    tiny_vae(scaling_factor=0.5).save_pretrained(tmp_path / "vae")
    c = base_config()
    c.data.update(dict(source="folder", path=str(folder), image_size=16, channels=3,
                       conditioning_column="conditioning_image"))
    c.cache.update(dict(vae=str(tmp_path / "vae"), out=str(tmp_path / "cache"), crops=2, crop_size=12, flip=True,
                        batch_size=8))
    out = build_cache(c)
    manifest = read_manifest(out)
    assert manifest["count"] == 3 and manifest["conditioning"] == {"shape": [12, 12, 3], "dtype": "uint8"}
    source = LatentCacheSource(out)
    for i, image in enumerate(images):
        stored = source.stored[i]
        variants = _crops(image, i, c.cache, 12)  # [V, 12, 12, 3]: centre, mirrored, random crop, mirrored
        assert stored["conditioning_image"].dtype == np.uint8
        np.testing.assert_array_equal(stored["conditioning_image"], 255 - variants)
        for seed in range(6):
            drawn = source.draw(stored, np.random.default_rng(seed))
            v = int(np.argmin([np.abs(drawn["image"] / 0.5 - m).mean() for m in stored["mean"]]))
            np.testing.assert_allclose(drawn["cond"]["controlnet_cond"], (255 - variants[v]) / 255.0, atol=1e-7)


def test_bad_setups_are_refused(unet_folder, prepared, tmp_path):
    """One line naming the key: a source without conditioning images, a conditioning factor that is not the
    cache's, a ControlNet from another U-Net, grids asked of a ControlNet run, controlnet_from without the
    mode, sampling the workdir instead of the export, a metadata.jsonl line without the column."""
    from diffax.data import FolderSource
    unet, tuning = prepared
    plain = Batches()
    plain.batch["cond"].pop("controlnet_cond")
    with pytest.raises(finetune.FinetuneError, match="data.conditioning_column"):
        tuning.training_model(unet, plain)
    big = Batches(side=SIDE * 8)
    with pytest.raises(finetune.FinetuneError, match="train.controlnet_embedding_channels"):
        tuning.training_model(unet, big)
    with pytest.raises(finetune.FinetuneError, match="train.eval_every"):
        finetune.prepare(run_config(unet_folder, eval_every=10), unet)
    with pytest.raises(finetune.FinetuneError, match="train.controlnet_from"):
        finetune.prepare(run_config(unet_folder, finetune="full", controlnet_from=str(unet_folder)), unet)
    with pytest.raises(finetune.FinetuneError, match="export/controlnet"):  # what sample.py --workdir calls
        finetune.sampling_params(run_config(unet_folder), tuning.trainable, unet, tmp_path / "run")
    other = diffusers.ControlNetModel(**{**{k: v for k, v in UNET.items() if k not in ("sample_size", "out_channels",
                                                                                     "up_block_types")},
                                         "block_out_channels": (16, 48)})
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(finetune.FinetuneError, match="block_out_channels"):
        finetune.prepare(run_config(unet_folder, controlnet_from=str(tmp_path / "other")), unet)
    folder = tmp_path / "images"
    folder.mkdir()
    from PIL import Image
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "a.png")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "x"}) + "\n")
    with pytest.raises(ValueError, match="metadata.jsonl: line 1 .*conditioning_image"):
        FolderSource(folder, image_size=8, channels=3, conditioning_column="conditioning_image")


def with_signal(trainable: dict, seed: int = 0) -> dict:
    """The ControlNet with random zero convolutions and conditioning embedding (as after training), so the
    conditioning image reaches its residuals and they reach the U-Net."""
    rng = np.random.default_rng(seed)
    return {k: jax.tree.map(lambda a: 0.3 * rng.standard_normal(a.shape).astype(a.dtype), v)
            if k.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding")) else v
            for k, v in trainable.items()}


def test_grid_rows_show_conditioning_images_beside_their_samples(unet_folder, prepared, tmp_path, monkeypatch):
    """A ControlNet run's grid (train.sample_every): one row per validation example, its conditioning image
    first, then GRID_COLUMNS - 1 samples of its stored caption embedding; the conditioning image reaches the
    model (another image, other samples), and write_grid writes the PNG. (A 2 x 3 grid: the test's cost.)"""
    from diffax import parallel
    from diffax.image_io import make_grid
    from diffax.train import evaluate
    from pipeline_fixtures import tiny_vae
    from PIL import Image

    monkeypatch.setattr(controlnet, "GRID_ROWS", 2)
    monkeypatch.setattr(evaluate, "GRID_COLUMNS", 3)
    GRID_COLUMNS, write_grid = evaluate.GRID_COLUMNS, evaluate.write_grid
    unet, tuning = prepared
    tiny_vae().save_pretrained(tmp_path / "vae")
    source = Batches(4)
    source.manifest = {"vae": {"path": str(tmp_path / "vae"), "subfolder": None}, "text": {}}
    source.null_cond = {"encoder_hidden_states": np.zeros((TOKENS, CROSS), np.float32)}
    c = run_config(unet_folder, sample_every=1)
    c.sample.update(dict(steps=2, guidance_scale=3.0))
    mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])  # one device: replicated sampling runs once
    sampler = controlnet.Sampler(tuning.training_model(unet, source), c, mesh, parallel.DEFAULT_RULES, source,
                                 param_view=lambda p, t: tuning.view(p[0], p[1], t))
    params = (tuning.frozen, with_signal(tuning.trainable))
    key = jax.random.key(0)
    inputs = sampler.grid_inputs()
    grid = sampler.images(params, key, **inputs)
    rows = controlnet.GRID_ROWS
    assert grid.shape == (rows * GRID_COLUMNS, SIDE * 2, SIDE * 2, 3) and grid.dtype == np.uint8
    shown = grid.reshape(rows, GRID_COLUMNS, *grid.shape[1:])[:, 0]  # [R, 16, 16, 3]
    want = np.round(source.batch["cond"]["controlnet_cond"][:rows] * 255)
    np.testing.assert_allclose(shown, want, atol=1)
    samples = sampler.images(params, key, cond=inputs["cond"])
    np.testing.assert_array_equal(samples.reshape(rows, GRID_COLUMNS - 1, *samples.shape[1:]),
                                  grid.reshape(rows, GRID_COLUMNS, *grid.shape[1:])[:, 1:])
    other = {**inputs["cond"], "controlnet_cond": 1.0 - inputs["cond"]["controlnet_cond"]}
    assert np.abs(sampler.images(params, key, cond=other).astype(int) - samples).max() > 0
    write_grid(sampler, params, tmp_path / "samples" / "step_000001.png", key)
    with Image.open(tmp_path / "samples" / "step_000001.png") as png:
        assert png.size[::-1] == tuple(np.array(make_grid(grid, GRID_COLUMNS).shape[:2]) * (64 // (SIDE * 2)))


def controlnet_loss(config: ControlNetConfig, policy: str):
    """A scalar of a ControlNet's residuals on fixed inputs, as a function of its params, under `policy`;
    and the residuals as aux."""
    import dataclasses

    from diffax.models.controlnet import ControlNetModel

    model = ControlNetModel(dataclasses.replace(config, remat=policy))
    inp = Batches(5).batch
    x, ctx, image = inp["image"][:2], inp["cond"]["encoder_hidden_states"][:2], inp["cond"]["controlnet_cond"][:2]
    t = jnp.array([10, 700])

    def loss(p):
        down, mid = model.apply({"params": p}, x, t, encoder_hidden_states=ctx, controlnet_cond=image)
        return sum(jnp.sum(d ** 2) for d in down) + jnp.sum(mid ** 2), (down, mid)

    return loss


def test_user_conditioning_images_make_the_grid_rows(unet_folder, prepared, tmp_path):
    """sample.conditioning_images with sample.prompts: the rows are those files (RGB, resized to the cache's
    conditioning size, in [0, 1]) with their prompts' embeddings; a count that differs from the prompts' or
    an unreadable file is refused naming the key, before training."""
    from PIL import Image

    from diffax import parallel
    from diffax.train.evaluate import GRID_COLUMNS

    unet, tuning = prepared
    source = Batches(4)
    source.manifest, source.null_cond = {"text": {}}, {"encoder_hidden_states": np.zeros((TOKENS, CROSS))}
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2, 20, 24, 3), dtype=np.uint8)
    paths = [str(tmp_path / f"{i}.png") for i in range(2)]
    for path, image in zip(paths, pixels):
        Image.fromarray(image).save(path)
    c = run_config(unet_folder, sample_every=1)
    c.sample.update(dict(conditioning_images=paths, prompts=["a", "b"]))
    mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
    model = tuning.training_model(unet, source)
    sampler = controlnet.Sampler(model, c, mesh, parallel.DEFAULT_RULES, source)
    hidden = {"a": np.full((TOKENS, CROSS), 1.0, np.float32), "b": np.full((TOKENS, CROSS), 2.0, np.float32)}
    sampler.embed = lambda prompts: {"encoder_hidden_states": np.stack([hidden[p] for p in prompts])}  # no encoder
    cond = sampler.grid_inputs()["cond"]
    want = np.stack([np.asarray(Image.fromarray(p).resize((SIDE * 2, SIDE * 2), Image.Resampling.BILINEAR))
                     for p in pixels]) / 255.0
    np.testing.assert_allclose(cond["controlnet_cond"], np.repeat(want, GRID_COLUMNS - 1, axis=0), atol=1e-6)
    np.testing.assert_array_equal(cond["encoder_hidden_states"][:, 0, 0], [1.0] * 9 + [2.0] * 9)
    c.sample.prompts = ["a"]
    with pytest.raises(ValueError, match="sample.conditioning_images"):
        controlnet.Sampler(model, c, mesh, parallel.DEFAULT_RULES, source)
    (tmp_path / "bad.png").write_text("not an image")
    c.sample.update(dict(conditioning_images=[str(tmp_path / "bad.png")], prompts=["a"]))
    with pytest.raises(ValueError, match="sample.conditioning_images.*bad.png"):
        controlnet.Sampler(model, c, mesh, parallel.DEFAULT_RULES, source)


def test_remat_reaches_the_controlnets_blocks(prepared):
    """ControlNetConfig.remat: copied from the U-Net's config by from_unet (the recipe's remat applies to both
    halves), never written to config.json; 'full' puts the down and mid blocks under jax.checkpoint, 'none'
    nothing. (The slow test below compares the numbers.)"""
    import dataclasses

    unet, tuning = prepared
    assert ControlNetConfig.from_unet(dataclasses.replace(unet.config, remat="dots")).remat == "dots"
    assert "remat" not in tuning.controlnet_config.to_diffusers()

    def checkpoints(policy: str) -> int:  # jax.checkpoint's equations in the traced forward pass
        return str(jax.make_jaxpr(controlnet_loss(tuning.controlnet_config, policy))(tuning.trainable)).count("remat")

    assert checkpoints("none") == 0
    assert checkpoints("full") >= len(unet.config.block_out_channels) + 1  # every down block and the mid block


@pytest.mark.slow  # two compiles of the ControlNet's gradient
def test_remat_keeps_the_controlnets_output_and_gradients(prepared):
    """'full' rematerialisation gives the residuals and the gradients of 'none' (fp32, within 1e-5 of the
    largest)."""
    _, tuning = prepared
    params = with_signal(tuning.trainable)

    def run(policy):
        return jax.jit(jax.value_and_grad(controlnet_loss(tuning.controlnet_config, policy), has_aux=True))(params)

    (_, out_none), grad_none = run("none")
    (_, out_full), grad_full = run("full")
    for a, b in zip(jax.tree.leaves((out_full, grad_full)), jax.tree.leaves((out_none, grad_none))):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5 * max(np.abs(np.asarray(b)).max(), 1e-6)
    assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grad_none["down_blocks_0"]))


def test_resume_refuses_a_changed_controlnet(unet_folder, tmp_path):
    """train.controlnet_from and train.controlnet_embedding_channels choose the ControlNet a checkpoint holds:
    resuming with another is refused in one line naming the key."""
    from diffax.train import resume

    saved = run_config(unet_folder)
    for key, value in (("controlnet_from", str(tmp_path / "other")), ("controlnet_embedding_channels", (8, 16, 32))):
        with pytest.raises(resume.ConfigChangeError, match=f"train.{key} "):
            resume.check_config(saved, run_config(unet_folder, **{key: value}), tmp_path)


# ----------------------------------------------------------------------------- slow: the recipe's two stages


recipe = functools.partial(config_files.recipe, "controlnet_sd15")


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """configs/controlnet_sd15.py's cache and train stages on a tiny random SD pipeline (VAE factor 2) and four
    (image, conditioning image, caption) triples, its model block swapped for the tiny U-Net; three steps at
    a learning rate that moves the weights visibly. (pipeline folder, workdir, config, final state)."""
    from PIL import Image
    from pipeline_fixtures import build_sd_pipeline

    from diffax.train.loop import train_and_evaluate

    root = tmp_path_factory.mktemp("toy")
    pipe = build_sd_pipeline(root / "sd")
    pairs = root / "pairs"
    (pairs / "conditioning").mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(pairs / "metadata.jsonl", "w") as f:
        for i, word in enumerate(("red", "green", "blue", "gray")):
            image = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(image).save(pairs / f"{i}.png")
            Image.fromarray(255 - image).save(pairs / "conditioning" / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "conditioning_image": f"conditioning/{i}.png",
                                "text": f"a {word} square"}) + "\n")
    c = recipe("cache")
    c.data.update(dict(path=str(pairs), image_size=16, worker_count=0))
    c.cache.update(dict(vae=str(pipe), text_encoder=str(pipe), out=str(root / "cache"), batch_size=8))
    cache = build_cache(c)
    c = recipe("train")
    c.data.update(dict(path=str(cache), worker_count=0))
    c.model.update(UNET, remat="none")  # rematerialisation only slows a toy compile
    c.train.update(dict(init_from=str(pipe), controlnet_embedding_channels=EMBEDDING, steps=3, batch_size=BATCH,
                        log_every=1, checkpoint_every=3, learning_rate=1e-3, label_dropout=0.5))
    c.sample.steps = 2  # the recipe's grid at the last step, cheaply
    state = train_and_evaluate(c, root / "run")
    return pipe, root / "run", c, jax.device_get(state)


@pytest.mark.slow  # a pipeline, a cache, the pair's train step on 8 simulated devices: about 3 minutes on 2 cores
def test_recipe_trains_the_controlnet_only(toy_run):
    """The run's state holds the ControlNet alone (params, EMA, Adam moments); every part of it moved (the
    zero convolutions, and through them the copied encoder and the conditioning embedding); every U-Net
    leaf is bit-identical to the pipeline's unet/; the recipe's sample grid was written at the last step."""
    pipe, _, _, state = toy_run
    assert int(state.step) == 3 and int(state.skipped) == 0
    unet = convert.load(pipe, subfolder="unet")[1]
    fresh = controlnet.init_controlnet(convert.load(pipe, subfolder="unet")[0].config, unet, jax.random.key(0),
                                       EMBEDDING)[1]
    tree = jax.tree.structure(fresh)
    assert jax.tree.structure(state.params) == tree == jax.tree.structure(state.ema_params)
    assert jax.tree.structure(state.opt_state[1][0].mu) == tree  # chain(clip, adamw): Adam's first moments
    for part in ("controlnet_down_blocks_0", "controlnet_mid_block", "down_blocks_0", "mid_block"):
        assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(state.params[part]),
                                                                         jax.tree.leaves(unet.get(part, fresh[part])))), part
    assert any(np.any(leaf) for leaf in jax.tree.leaves(state.params["controlnet_mid_block"]))
    frozen = jax.tree_util.tree_flatten_with_path(state.frozen)[0]
    loaded = dict(jax.tree_util.tree_flatten_with_path(unet)[0])
    assert len(frozen) == len(loaded)
    for path, leaf in frozen:
        np.testing.assert_array_equal(leaf, np.asarray(loaded[path]), err_msg=str(path))
    metrics = [json.loads(line) for line in (toy_run[1] / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(np.isfinite(m["loss"]) for m in metrics)
    from PIL import Image
    with Image.open(toy_run[1] / "samples" / "step_000003.png") as grid:  # 4 rows of 1 + 9 images at 16 px, x4
        assert grid.size == (10 * 17 * 4 + 4, 4 * 17 * 4 + 4)


@pytest.mark.slow  # uses toy_run
def test_recipe_export_loads_in_diffusers_and_diffax_with_the_same_residuals(toy_run):
    """WORKDIR/export/controlnet holds the trained weights; diffusers' ControlNetModel.from_pretrained and
    diffax's loader read it, and their residuals agree (fp32, within 1e-4 of the largest); diffax's
    ControlNet pipeline runs it on the pipeline folder."""
    from diffax import pipelines
    from diffax.pipelines.controlnet import load_controlnet, with_controlnet

    pipe, workdir, _, state = toy_run
    folder = workdir / "export" / "controlnet"
    module, params = load_controlnet(folder)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.ema_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    reference = diffusers.ControlNetModel.from_pretrained(folder).eval()
    inp = Batches(2).batch
    t = np.array([10, 900] * (BATCH // 2), np.int64)
    with torch.no_grad():
        down, mid = reference(torch.from_numpy(inp["image"]).permute(0, 3, 1, 2), torch.from_numpy(t),
                              torch.from_numpy(inp["cond"]["encoder_hidden_states"]),
                              controlnet_cond=torch.from_numpy(inp["cond"]["controlnet_cond"]).permute(0, 3, 1, 2),
                              return_dict=False)
    ours = jax.jit(lambda p, x, t, c, img: module.apply({"params": p}, x, t, encoder_hidden_states=c,
                                                        controlnet_cond=img))(
        params, inp["image"], t, inp["cond"]["encoder_hidden_states"], inp["cond"]["controlnet_cond"])
    for a, b in zip([*ours[0], ours[1]], [*down, mid]):
        b = b.permute(0, 2, 3, 1).numpy()
        assert np.abs(b).max() > 1e-4  # trained zero convolutions: the residuals carry signal
        assert np.abs(np.asarray(a) - b).max() <= 1e-4 * np.abs(b).max()
    sd = with_controlnet(pipelines.load(pipe), folder)
    out = sd("a red square", image=np.zeros((16, 16, 3), np.uint8), num_inference_steps=2)
    assert out.images.shape == (1, 16, 16, 3) and np.all(np.isfinite(out.images))


@pytest.mark.slow  # the pair's forward compile
def test_a_fresh_pair_predicts_what_the_unet_alone_does(unet_folder, prepared):
    """At step 0 the ControlNet's residuals are zero, so ControlNetUNet's output is the U-Net's, bit for bit."""
    unet, tuning = prepared
    source = Batches(1)
    model = tuning.training_model(unet, source)
    x, ctx, image = (source.batch["image"], source.batch["cond"]["encoder_hidden_states"],
                     source.batch["cond"]["controlnet_cond"])
    t = jnp.arange(BATCH) * 100
    pair = jax.jit(lambda p: model.apply({"params": p}, x, t, encoder_hidden_states=ctx, controlnet_cond=image))(
        tuning.view(tuning.frozen, tuning.trainable, t))
    alone = jax.jit(lambda p: unet.apply({"params": p}, x, t, encoder_hidden_states=ctx))(tuning.frozen)
    assert np.abs(np.asarray(alone)).max() > 0
    np.testing.assert_array_equal(np.asarray(pair), np.asarray(alone))
