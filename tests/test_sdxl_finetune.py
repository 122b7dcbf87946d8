"""SDXL fine-tuning: the SDXL latent cache (diffax/data/sdxl_cache.py through diffax.data.cache), the train
step's SDXL inputs (diffax.train.loop.model_batch / make_objective, label dropout), configs/sdxl_finetune.py,
the grids' SDXL inputs (diffax.train.evaluate.Sampler with sdxl_cache.PromptEmbeddings), and the whole recipe
(cache, a few steps from init_from, diffax.train.pipeline_export) against diffusers.

The reference is a tiny random StableDiffusionXLPipeline saved with `save_pretrained`: SDXL's two CLIP text
encoders at 16 wide (a CLIPTextModel and a CLIPTextModelWithProjection padding with '!'), a two-level
'text_time' U-Net taking 6 time ids, the tiny VAE of tests/pipeline_fixtures.py (factor 2, posterior pinned),
so 16x16 images cache as 8x8 latents (12x12 crops as 6x6). The images have different sizes, so each one's
time ids differ. Embeddings are compared with transformers' encoders on the same prompts (fp32 on the CPU:
max abs difference 1e-4 on values of order 1); the exported U-Net with diffax's on the same input (1e-4).
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from diffax.data import sdxl_cache
from diffax.data.cache import _crops, build_cache, crop_offsets
from diffax.data.latent_cache import LatentCacheSource, StoredRecords, read_manifest
from diffax.train.config import base_config, validate_config
from diffax.train.loop import make_objective, model_batch
from diffax.train.step import diffusion_loss

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import config_files  # noqa: E402
from pipeline_fixtures import randomise, tiny_vae  # noqa: E402

VOCAB = ["!", *"abcdefghijklmnopqrstuvwxyz", *(c + "</w>" for c in "abcdefghijklmnopqrstuvwxyz"), "ca", "cat</w>",
         "ab</w>", "<|startoftext|>", "<|endoftext|>"]
WIDTH, PROJECTION, TIME_DIM = 16, 16, 8
UNET = dict(sample_size=6, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
            cross_attention_dim=2 * WIDTH, projection_class_embeddings_input_dim=6 * TIME_DIM + PROJECTION,
            norm_num_groups=8)
# (height, width) of the files; the cache resizes the short side to 16 and keeps 12x12 crops
SIZES = {"wide.png": (16, 24), "tall.png": (30, 20), "odd.png": (30, 51)}
CAPTIONS = {"wide.png": "a cat", "tall.png": "ab", "odd.png": "cab z"}


recipe = functools.partial(config_files.recipe, "sdxl_finetune")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """A tiny random StableDiffusionXLPipeline folder."""
    import diffusers
    import transformers

    tmp = tmp_path_factory.mktemp("sdxl_pipe")
    (tmp / "vocab").mkdir()
    (tmp / "vocab" / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(VOCAB)}))
    (tmp / "vocab" / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\na b</w>\n")
    toks = [transformers.CLIPTokenizer(str(tmp / "vocab" / "vocab.json"), str(tmp / "vocab" / "merges.txt"),
                                       model_max_length=77, pad_token=pad) for pad in ("<|endoftext|>", "!")]
    v = len(VOCAB)
    common = dict(vocab_size=v, hidden_size=WIDTH, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
                  max_position_embeddings=77, bos_token_id=v - 2, eos_token_id=v - 1, projection_dim=PROJECTION)
    te1 = transformers.CLIPTextModel(transformers.CLIPTextConfig(hidden_act="quick_gelu", pad_token_id=v - 1,
                                                                 **common))
    te2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(hidden_act="gelu", pad_token_id=0,
                                                                               **common))
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=tiny_vae(3, scaling_factor=0.13025), text_encoder=randomise(te1, 1, scale=0.2),
        text_encoder_2=randomise(te2, 2, scale=0.2), tokenizer=toks[0], tokenizer_2=toks[1],
        unet=randomise(diffusers.UNet2DConditionModel(**UNET), 4, scale=0.2),
        scheduler=diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                                   beta_schedule="scaled_linear", timestep_spacing="leading",
                                                   steps_offset=1),
        add_watermarker=False)
    pipe.save_pretrained(tmp / "pipe")
    for sub in ("tokenizer", "tokenizer_2"):  # vocab.json + merges.txt, as the released folders hold them
        for f in ("vocab.json", "merges.txt"):
            (tmp / "pipe" / sub / f).write_bytes((tmp / "vocab" / f).read_bytes())
    return tmp / "pipe"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A captioned image folder of three sizes (smooth images, so a resize keeps them recognisable)."""
    folder = tmp_path_factory.mktemp("sdxl_images")
    rng = np.random.default_rng(0)
    with open(folder / "metadata.jsonl", "w") as f:
        for name, (h, w) in SIZES.items():
            y, x = np.mgrid[0:h, 0:w]
            pixels = np.stack([x * 255 / w, y * 255 / h, rng.uniform(0, 255) + 0 * x], -1)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / name)
            f.write(json.dumps({"file_name": name, "text": CAPTIONS[name]}) + "\n")
    return folder


def cache_config(sdxl: Path, images: Path, out: Path) -> ml_collections.ConfigDict:
    c = recipe("cache")
    c.data.update(dict(path=str(images), image_size=16, worker_count=0))
    c.cache.update(dict(vae=str(sdxl), text_encoder=str(sdxl), out=str(out), batch_size=8, dtype="float32",
                        crops=2, crop_size=12))
    return c


@pytest.fixture(scope="module")
def cache(sdxl, images, tmp_path_factory):
    return build_cache(cache_config(sdxl, images, tmp_path_factory.mktemp("sdxl_cache") / "cache"))


# ----------------------------------------------------------------------------- micro-conditioning


def test_time_ids_name_each_stored_crop_in_the_resized_and_flipped_image():
    """A variant's pixels are the crop the ids name: rows top..top+12, columns left..left+12 of the image
    (resized to a short side of 16: here already so), mirrored first for a mirrored variant."""
    config = ml_collections.ConfigDict(dict(crops=3, flip=True, seed=5))
    rng = np.random.default_rng(1)
    for height, width in ((16, 24), (24, 16)):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        top, left = (height - 16) // 2, (width - 16) // 2
        square = image[top:top + 16, left:left + 16]  # the folder source's center square
        stored = _crops(square, 7, config, 12)  # [6, 12, 12, 3]: 3 crops, each then its mirror
        ids = sdxl_cache.variant_time_ids((height, width), 16, crop_offsets(16, 7, config, 12), 12, flip=True)
        assert ids.shape == (6, 6) and len({tuple(r) for r in ids}) > 2  # the random crops differ
        for v, row in enumerate(ids):
            frame = image[:, ::-1] if v % 2 else image
            y, x = int(row[2]), int(row[3])
            assert tuple(row[:2]) == (height, width) and tuple(row[4:]) == (12, 12)
            np.testing.assert_array_equal(stored[v], frame[y:y + 12, x:x + 12])


def test_time_ids_count_the_crop_after_the_short_side_resize():
    # 30x51 -> 16x27 as torchvision's Resize(16) (the long side truncated); the center crop's left edge is
    # round(11 / 2) = 6, its mirror's 27 - 6 - 16 = 5 (the mirrored image's crop holds the same pixels)
    ids = sdxl_cache.variant_time_ids((30, 51), 16, [(0, 0)], 16, flip=True)
    np.testing.assert_array_equal(ids, [[30, 51, 0, 6, 16, 16], [30, 51, 0, 5, 16, 16]])
    assert sdxl_cache.resized_size((51, 30), 16) == (27, 16)


# ----------------------------------------------------------------------------- the train step's inputs


class _Recorder:
    """A model stand-in that records the keyword inputs the train step calls it with."""
    config = ml_collections.ConfigDict(dict(learn_sigma=False, has_null_cond=False))

    def apply(self, variables, x, t, train=False, rngs=None, **cond):
        self.cond = cond
        return x * 0.0


def test_model_batch_and_dropout_give_the_sdxl_unet_its_inputs():
    from diffax.models.unet2d_condition import UNet2DConditionConfig
    spec = UNet2DConditionConfig(**{**UNET, "block_out_channels": (16, 32)})
    model = type("M", (), {"config": spec})()
    rng = np.random.default_rng(0)
    batch = {"image": np.zeros((4, 6, 6, 4), np.float32), "label": np.zeros(4, np.int32),
             "cond": {"encoder_hidden_states": rng.normal(size=(4, 77, 32)).astype(np.float32),
                      "text_embeds": rng.normal(size=(4, 16)).astype(np.float32),
                      "time_ids": rng.uniform(0, 64, (4, 6)).astype(np.float32)}}
    out = model_batch(batch, model)
    assert set(out["cond"]) == {"encoder_hidden_states", "added_cond_kwargs"}
    np.testing.assert_array_equal(out["cond"]["added_cond_kwargs"]["time_ids"], batch["cond"]["time_ids"])
    np.testing.assert_array_equal(out["cond"]["added_cond_kwargs"]["text_embeds"], batch["cond"]["text_embeds"])

    null = {"encoder_hidden_states": np.full((77, 32), 3.0, np.float32), "text_embeds": np.full(16, 5.0, np.float32)}
    config = base_config()
    config.train.label_dropout = 1.0  # every example dropped: prompt and pooled embedding, never the time ids
    recorder = _Recorder()
    objective = make_objective(config, type("M", (), {"config": spec})(), null)
    diffusion_loss(recorder, {}, objective, out, jax.random.key(0))
    seen = jax.device_get(recorder.cond)
    assert np.all(seen["encoder_hidden_states"] == 3.0) and np.all(seen["added_cond_kwargs"]["text_embeds"] == 5.0)
    np.testing.assert_array_equal(seen["added_cond_kwargs"]["time_ids"], batch["cond"]["time_ids"])

    sd = UNet2DConditionConfig(**{k: v for k, v in UNET.items() if "addition" not in k and "projection" not in k})
    assert set(model_batch(batch, type("M", (), {"config": sd})())["cond"]) == {"encoder_hidden_states"}
    del batch["cond"]["time_ids"]
    with pytest.raises(ValueError, match="no time_ids"):
        model_batch(batch, model)


# ----------------------------------------------------------------------------- the cache


def _torch_ids(tokenizer: Path, prompts: list[str]) -> np.ndarray:
    """transformers' token ids [N, 77] of `prompts`, as diffusers' training scripts tokenize them."""
    import transformers
    tok = transformers.CLIPTokenizer.from_pretrained(tokenizer)
    return tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids


def _torch_prompt_embeds(folder: Path, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(penultimate hidden states of both encoders concatenated, text_encoder_2's text_embeds) from
    transformers, as diffusers' training script computes them."""
    import torch
    import transformers

    states, pooled = [], None
    for enc, tok, cls in (("text_encoder", "tokenizer", transformers.CLIPTextModel),
                          ("text_encoder_2", "tokenizer_2", transformers.CLIPTextModelWithProjection)):
        tokenizer = transformers.CLIPTokenizer.from_pretrained(folder / tok)
        model = cls.from_pretrained(folder / enc).eval()
        ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2].numpy())
        pooled = out[0].numpy()
    return np.concatenate(states, -1), pooled


def test_cache_stores_both_encoders_and_each_images_size_and_crops(sdxl, images, cache):
    manifest = read_manifest(cache)
    assert manifest["text"]["shapes"] == {"encoder_hidden_states": [77, 2 * WIDTH], "text_embeds": [PROJECTION]}
    assert manifest["text"]["subfolder_2"] == "text_encoder_2"  # found through model_index.json
    assert manifest["time_ids"] == {"shape": [4, 6], "target_size": [12, 12]}
    records = StoredRecords(cache, manifest)
    names = sorted(SIZES)  # the folder source's order
    hidden, pooled = _torch_prompt_embeds(sdxl, [CAPTIONS[n] for n in names] + [""])
    for i, name in enumerate(names):
        record = records[i]
        with Image.open(images / name) as image:  # the real size, read apart from the cache
            size = (image.height, image.width)
        ids = record["time_ids"]  # [4 variants, 6]
        np.testing.assert_array_equal(ids[:, :2], np.tile(size, (4, 1)))
        np.testing.assert_array_equal(ids[:, 4:], 12)
        resized = sdxl_cache.resized_size(size, 16)
        # variant 0: the 12x12 center of the center 16x16 square, in the resized frame
        center = (round((resized[0] - 16) / 2) + 2, round((resized[1] - 16) / 2) + 2)
        np.testing.assert_array_equal(ids[0, 2:4], center)
        np.testing.assert_array_equal(ids[1, 2:4], (center[0], resized[1] - center[1] - 12))  # its mirror
        np.testing.assert_allclose(record["encoder_hidden_states"], hidden[i], atol=1e-4)
        np.testing.assert_allclose(record["text_embeds"], pooled[i], atol=1e-4)
    assert len({tuple(records[i]["time_ids"][0]) for i in range(3)}) == 3
    # both tokenizers' ids, which a run training both text encoders feeds them ('!' pads the second's)
    for key, tok in (("input_ids", "tokenizer"), ("input_ids_2", "tokenizer_2")):
        ids = _torch_ids(sdxl / tok, [CAPTIONS[n] for n in names] + [""])
        np.testing.assert_array_equal(np.stack([records[i][key] for i in range(3)]), ids[:3])
        np.testing.assert_array_equal(manifest["text"]["empty_" + key], ids[3])
    empty = np.load(cache / "empty_prompt.npz")  # the caption "" through both encoders, not zeros
    np.testing.assert_allclose(empty["encoder_hidden_states"], hidden[3], atol=1e-4)
    np.testing.assert_allclose(empty["text_embeds"], pooled[3], atol=1e-4)
    assert np.abs(empty["text_embeds"]).max() > 0.1

    source = LatentCacheSource(cache)
    example = source[0]
    assert example["image"].shape == (6, 6, 4)
    assert set(example["cond"]) == {"encoder_hidden_states", "text_embeds", "time_ids"}
    assert example["input_ids_2"].shape == (77,) and source.null_input_ids_2.shape == (77,)
    assert any(np.array_equal(example["cond"]["time_ids"], row) for row in records[0]["time_ids"])


def test_cache_refuses_a_source_without_sizes_and_a_second_encoder_without_projection(sdxl, images, tmp_path):
    c = cache_config(sdxl, images, tmp_path / "c")
    c.data.update(dict(source="digits", channels=3, caption_template="a {}"))
    with pytest.raises(ValueError, match="data.source"):
        build_cache(c)
    c = cache_config(sdxl, images, tmp_path / "c")
    c.cache.text_encoder_2, c.cache.tokenizer_2 = str(sdxl / "text_encoder"), str(sdxl / "tokenizer")
    with pytest.raises(ValueError, match="CLIPTextModelWithProjection"):
        build_cache(c)


# ----------------------------------------------------------------------------- the recipe


def test_recipe_is_sdxls_unet_from_a_pipeline():
    for stage in ("train", "cache"):
        validate_config(recipe(stage))
    c = recipe()
    assert c.model.cross_attention_dim == 2048 and c.model.sample_size == 128  # 1024 px through the VAE's 8
    assert c.train.init_from == c.cache.vae == c.cache.text_encoder and c.data.path == recipe("cache").cache.out
    assert (c.mesh.data, c.mesh.fsdp, c.train.sample_every, c.train.label_dropout) == (1, -1, 0, 0.2)


@pytest.mark.slow  # the counting traces SDXL's 2.6B-parameter U-Net abstractly (about 15 s on 2 loaded cores)
def test_recipe_unet_has_sdxls_parameter_count():
    from diffax.models import build_model
    from diffax.models.registry import boxed_init
    model = build_model(recipe().model)
    params = jax.eval_shape(lambda k: boxed_init(model.config, k), jax.random.key(0))
    assert sum(np.prod(x.shape) for x in jax.tree.leaves(params)) == 2_567_463_684


def test_export_refuses_an_existing_folder(tmp_path):
    from diffax.train.pipeline_export import export_pipeline

    (tmp_path / "run").mkdir()
    (tmp_path / "taken").mkdir()
    with pytest.raises(ValueError, match="--out"):
        export_pipeline(tmp_path / "run", tmp_path / "taken")


@pytest.mark.slow  # a train step, the grid and the evaluation compiled: about 3 minutes on the loaded 2-core machine
def test_sdxl_run_writes_grids_and_evaluates(sdxl, cache, tmp_path):
    from diffax.train.loop import train_and_evaluate

    c = _sampler_config(cache)
    c.train.update(dict(init_from=str(sdxl), steps=1, batch_size=8, log_every=1, checkpoint_every=1,
                        sample_every=1, eval_every=1))
    c.eval.update(dict(kind="digits_fid", num_samples=4))
    train_and_evaluate(c, tmp_path / "run")
    with Image.open(tmp_path / "run" / "samples" / "step_000001.png") as grid:
        assert grid.size[0] > 10 * 12
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("digits_fid" in r and np.isfinite(r["digits_fid"]) for r in records)


def _torch_unet(unet, sample: np.ndarray, t: float, cond: dict) -> np.ndarray:
    """A diffusers U-Net's output NHWC on NHWC numpy inputs."""
    import torch

    with torch.no_grad():
        return unet(torch.tensor(sample.transpose(0, 3, 1, 2)), t,
                    encoder_hidden_states=torch.tensor(cond["encoder_hidden_states"]),
                    added_cond_kwargs={k: torch.tensor(v) for k, v in cond["added_cond_kwargs"].items()}
                    ).sample.numpy().transpose(0, 2, 3, 1)


def _unet_outputs(folder: Path, sample: np.ndarray, t: float, cond: dict) -> tuple[np.ndarray, np.ndarray]:
    """(diffusers' unet/ of the pipeline `folder`, diffax's) outputs NHWC on the same inputs."""
    import diffusers

    from diffax import convert
    want = _torch_unet(diffusers.StableDiffusionXLPipeline.from_pretrained(folder).unet, sample, t, cond)
    module, params = convert.load(str(folder), subfolder="unet")
    got = module.apply({"params": params}, sample, np.full((len(sample),), t, np.float32), **cond)
    return want, np.asarray(got)


@pytest.mark.slow  # train + export per mode: 1 to 18 minutes each on the loaded 2-core machine; make test-slow
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_recipe_trains_from_the_pipeline_and_exports_what_diffusers_loads(sdxl, cache, tmp_path, mode):
    from diffax.train.loop import train_and_evaluate
    from diffax.train.pipeline_export import export_pipeline

    c = recipe()
    c.data.update(dict(path=str(cache), worker_count=0))
    c.model = ml_collections.ConfigDict(dict(name="UNet2DConditionModel", **UNET))  # the tiny pipeline's U-Net
    c.mesh.update(dict(data=-1, fsdp=1))
    c.train.update(dict(init_from=str(sdxl), finetune=mode, steps=2, batch_size=8, log_every=1, checkpoint_every=2,
                        learning_rate=1e-2))
    state = train_and_evaluate(c, tmp_path / "run")
    assert int(state.step) == 2 and int(state.skipped) == 0
    out = export_pipeline(tmp_path / "run", tmp_path / "export")

    rng = np.random.default_rng(0)
    record = StoredRecords(cache, read_manifest(cache))[0]
    cond = {"encoder_hidden_states": np.repeat(record["encoder_hidden_states"][None], 2, 0),
            "added_cond_kwargs": {"text_embeds": np.repeat(record["text_embeds"][None], 2, 0),
                                  "time_ids": record["time_ids"][:2]}}
    sample = rng.normal(size=(2, 6, 6, 4)).astype(np.float32)
    want, got = _unet_outputs(out, sample, 500.0, cond)
    np.testing.assert_allclose(got, want, atol=1e-4)
    before, _ = _unet_outputs(sdxl, sample, 500.0, cond)
    assert np.abs(want - before).max() > 1e-3  # the export holds the trained weights, not the base's
    if mode == "lora":  # diffusers puts the run's LoRA file on the base pipeline: the merged export's U-Net
        import diffusers
        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl)
        pipe.load_lora_weights(str(tmp_path / "run" / "export"), weight_name="pytorch_lora_weights.safetensors")
        np.testing.assert_allclose(_torch_unet(pipe.unet, sample, 500.0, cond), want, atol=1e-4)


@pytest.mark.slow  # two steps of the tiny SDXL U-Net under both encoders, then diffusers: a minute or more
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_run_trains_both_text_encoders_and_diffusers_loads_them(sdxl, cache, tmp_path, mode):
    """train.text_encoder on SDXL: lora: the file's `text_encoder.` and `text_encoder_2.` keys, put on the base
    pipeline by diffusers' load_lora_weights, give both encoders' outputs of diffax's merged weights; full: the
    exported folder's text_encoder/ and text_encoder_2/ give those of the trained weights."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from diffax import convert
    from diffax.train import finetune
    from diffax.train.loop import train_and_evaluate

    c = recipe()
    c.data.update(dict(path=str(cache), worker_count=0))
    c.model = ml_collections.ConfigDict(dict(name="UNet2DConditionModel", **UNET))
    c.mesh.update(dict(data=-1, fsdp=1))
    c.train.update(dict(init_from=str(sdxl), finetune=mode, text_encoder=mode, steps=2, batch_size=8,
                        log_every=1, checkpoint_every=2, learning_rate=1e-1 if mode == "lora" else 1e-2))
    state = train_and_evaluate(c, tmp_path / "run")
    assert int(state.step) == 2 and int(state.skipped) == 0
    trained = jax.device_get(state.params)  # the recipe keeps no EMA: the trained weights are the result
    if mode == "lora":
        trained = finetune.merge_lora(jax.device_get(state.frozen), trained, c.train.lora.alpha / c.train.lora.rank)

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl)
    ids = {"text_encoder": _torch_ids(sdxl / "tokenizer", ["a cat"]),
           "text_encoder_2": _torch_ids(sdxl / "tokenizer_2", ["a cat"])}

    def outputs(name: str) -> list[np.ndarray]:
        with torch.no_grad():
            out = getattr(pipe, name)(torch.from_numpy(ids[name]), output_hidden_states=True)
        return [out.hidden_states[-2].numpy(), out[0].numpy()]

    before = {name: outputs(name) for name in ids}
    if mode == "lora":
        pipe.load_lora_weights(str(tmp_path / "run" / "export"), weight_name="pytorch_lora_weights.safetensors")
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "run" / "export")
    for name in ids:
        module, _ = convert.load(sdxl, subfolder=name)
        out = module.apply({"params": trained[name]}, ids[name], output_hidden_states=True)
        got = outputs(name)
        np.testing.assert_allclose(got[0], np.asarray(out.hidden_states[-2]), atol=1e-4, err_msg=name)
        if name == "text_encoder_2":  # the pooled text_embeds the U-Net gets
            np.testing.assert_allclose(got[1], np.asarray(out.text_embeds), atol=1e-4, err_msg=name)
        assert np.abs(got[0] - before[name][0]).max() > 1e-3, name  # the run moved this encoder


# ----------------------------------------------------------------------------- grids while training


class _Probe:
    """The U-Net with the sampler's calls recorded: keyword input shapes at trace time, (x, t, output) of each
    call at run time."""

    def __init__(self, model):
        self.model, self.config, self.shapes, self.calls = model, model.config, [], []

    def apply(self, variables, x, t, **cond):
        out = self.model.apply(variables, x, t, **cond)
        self.shapes.append(jax.tree.map(lambda a: a.shape, cond))
        jax.debug.callback(lambda *a: self.calls.append([np.asarray(v) for v in a]), x, t, out)
        return out


def _sampler_config(cache: Path) -> ml_collections.ConfigDict:
    c = recipe()
    c.data.update(dict(path=str(cache), worker_count=0))
    c.model = ml_collections.ConfigDict(dict(name="UNet2DConditionModel", **UNET))
    c.mesh.update(dict(data=-1, fsdp=1))
    c.sample.update(dict(steps=1, guidance_scale=7.5))
    return c


def test_grid_gives_the_sdxl_unet_stored_prompts_pooled_embeds_and_time_ids(sdxl, cache, tmp_path):
    """The grid (10 rows per cache caption) is written, and its first model call is the U-Net on [uncond; cond]
    rows: the empty prompt's hidden states and pooled embedding, then each caption's stored ones, all at time
    ids (12, 12, 0, 0, 12, 12), the cache's image size as original and target with no crop."""
    from diffax import convert, parallel
    from diffax.train.evaluate import Sampler, write_grid

    c = _sampler_config(cache)
    model, params = convert.load(str(sdxl), subfolder="unet")  # no initialisation to compile
    source = LatentCacheSource(cache)
    probe = _Probe(model)
    sampler = Sampler(probe, c, *parallel.mesh_from_config(c.mesh), source)
    write_grid(sampler, params, tmp_path / "grid.png", jax.random.key(1))
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size[0] > 10 * 12 and grid.size[1] > 3 * 12  # 10 columns, a row per caption
    n = 10 * len(CAPTIONS)
    assert probe.shapes[0] == {"encoder_hidden_states": (2 * n, 77, 2 * WIDTH),
                               "added_cond_kwargs": {"text_embeds": (2 * n, PROJECTION), "time_ids": (2 * n, 6)}}

    stored = StoredRecords(cache, source.manifest)
    by_caption = {str(stored[i]["caption"]): stored[i] for i in range(len(stored))}
    rows = [by_caption[p] for p in source.manifest["captions"] for _ in range(10)]
    null = source.null_cond
    hidden = np.stack([null["encoder_hidden_states"]] * n + [r["encoder_hidden_states"] for r in rows])
    pooled = np.stack([null["text_embeds"]] * n + [r["text_embeds"] for r in rows])
    ids = np.tile(np.array([12, 12, 0, 0, 12, 12], np.float32), (2 * n, 1))
    cond = {"encoder_hidden_states": hidden.astype(np.float32),
            "added_cond_kwargs": {"text_embeds": pooled.astype(np.float32), "time_ids": ids}}
    x, t, out = probe.calls[0]
    want = jax.jit(lambda p, x, t, cond: model.apply({"params": p}, x, t, **cond))(params, x, t, cond)
    np.testing.assert_allclose(out, np.asarray(want), atol=1e-5)


def test_sdxl_sample_prompts_go_through_both_encoders_or_are_refused(cache, tmp_path):
    """A prompt outside the cache's captions is encoded by the encoders the manifest names, which are the
    cache's own (they give a caption its stored embeddings back); unreachable encoders are refused before
    training, naming the manifest key."""
    import shutil

    from diffax import parallel
    from diffax.train.evaluate import Sampler

    mesh, rules = parallel.mesh_from_config({"data": -1, "fsdp": 1})
    source = LatentCacheSource(cache)
    embeddings = sdxl_cache.PromptEmbeddings(source, mesh, rules)
    got = embeddings(["zz top", "a cat"])  # "a cat" is a caption: stored
    assert set(got) == {"zz top", "a cat"} and got["zz top"]["encoder_hidden_states"].shape == (77, 2 * WIDTH)
    again = sdxl_cache.PromptEncoder(embeddings.encoder_config(), mesh, rules, 8)(["a cat", "zz top"])
    for key in ("encoder_hidden_states", "text_embeds"):
        np.testing.assert_allclose(again[key][0], got["a cat"][key], atol=1e-5)
        np.testing.assert_allclose(again[key][1], got["zz top"][key], atol=1e-5)
    assert np.abs(got["zz top"]["text_embeds"] - got["a cat"]["text_embeds"]).max() > 1e-3

    moved = tmp_path / "cache"
    shutil.copytree(cache, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["text"]["encoder_2"] = str(tmp_path / "gone")
    (moved / "manifest.json").write_text(json.dumps(manifest))
    c = _sampler_config(moved)
    c.sample.prompts = ("a dog",)
    c.train.sample_every = 10
    from diffax.models.unet2d_condition import UNet2DConditionConfig
    model = type("M", (), {"config": UNet2DConditionConfig(**UNET)})()
    with pytest.raises(ValueError, match="key 'text.encoder_2'"):
        Sampler(model, c, mesh, rules, LatentCacheSource(moved))
    c.sample.prompts = ()  # the cache's captions need no encoder
    Sampler(model, c, mesh, rules, LatentCacheSource(moved))
