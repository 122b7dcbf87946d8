"""The latent cache: captions from the sources, `python -m diffax.data.cache` with a tiny random VAE and CLIP
saved as diffusers / transformers folders, its records, determinism, augmentation variants, refusals of a
corrupt or different cache, and a text-conditioned U-Net trained from it by the loop."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

from diffax.data import FolderSource, LatentCacheError, LatentCacheSource, make_source, make_train_iterator
from diffax.data.cache import build_cache
from diffax.data.encoders import load_text_encoder, load_vae, tokenizer_folder
from diffax.data.digits import DigitsSource
from diffax.data.latent_cache import MANIFEST, StoredRecords, read_manifest
from diffax.train.config import base_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from pipeline_fixtures import write_tokenizer  # noqa: E402

NUM = 24  # digits cached: the first NUM of scikit-learn's 1797
CROSS = 32


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> dict[str, Path]:
    """A tiny grayscale VAE (16x16 -> 8x8x4) and a 2-layer CLIP of width 32, random, saved with
    save_pretrained as diffusers and transformers write them; a tokenizer folder."""
    import diffusers
    from pipeline_fixtures import randomise, tiny_clip

    root = tmp_path_factory.mktemp("encoders")
    vae = randomise(diffusers.AutoencoderKL(
        in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, latent_channels=4, sample_size=16, scaling_factor=0.5), seed=1)
    vae.save_pretrained(root / "vae")
    tokenizer = write_tokenizer(root / "tokenizer")
    tiny_clip(tokenizer, seed=2).save_pretrained(root / "text_encoder")
    return {"vae": root / "vae", "text_encoder": root / "text_encoder", "tokenizer": tokenizer}


class FirstDigits(DigitsSource):
    """The first NUM digits: a cache the tests write in seconds."""

    def __len__(self) -> int:
        return NUM


def cache_config(encoders: dict[str, Path], out: Path, text: bool = True, **cache) -> ml_collections.ConfigDict:
    c = base_config()
    c.data.source, c.data.image_size, c.data.channels = "digits", 16, 1
    if text:
        c.data.caption_template = "a handwritten {}"
        c.cache.text_encoder, c.cache.tokenizer = str(encoders["text_encoder"]), str(encoders["tokenizer"])
    c.cache.vae, c.cache.out, c.cache.batch_size, c.cache.records_per_shard = str(encoders["vae"]), str(out), 8, 10
    for k, v in cache.items():
        c.cache[k] = v
    return c


@pytest.fixture(autouse=True)
def _few_digits(monkeypatch):
    import diffax.data.pipeline as pipeline
    monkeypatch.setattr(pipeline, "DigitsSource", FirstDigits)


@pytest.fixture(scope="module")
def text_cache(encoders, tmp_path_factory) -> Path:
    import diffax.data.pipeline as pipeline
    with pytest.MonkeyPatch.context() as m:
        m.setattr(pipeline, "DigitsSource", FirstDigits)
        return build_cache(cache_config(encoders, tmp_path_factory.mktemp("caches") / "text"))


# ----------------------------------------------------------------------------- captions


def test_digits_captions():
    source = DigitsSource(image_size=8, caption_template="a handwritten {}")
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    assert [source[i]["caption"] for i in range(12)] == [f"a handwritten {words[source[i]['label']]}"
                                                         for i in range(12)]
    assert "caption" not in DigitsSource(image_size=8)[0]
    with pytest.raises(ValueError, match="caption_template"):
        DigitsSource(image_size=8, caption_template="a {} and {}")


def test_folder_captions(tmp_path):
    from PIL import Image
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(flat / f"{i}.png")
    assert "caption" not in FolderSource(flat, image_size=8, channels=1)[0]
    for i in range(2):
        (flat / f"{i}.txt").write_text(f"picture {i}\n")
    with pytest.raises(ValueError, match=r"2\.txt.*missing"):
        FolderSource(flat, image_size=8, channels=1)
    (flat / "2.txt").write_text("picture 2")
    assert [r["caption"] for r in FolderSource(flat, image_size=8, channels=1)] == [f"picture {i}" for i in range(3)]

    classes = tmp_path / "classes"
    for name in ("cat", "dog"):
        (classes / name).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(classes / name / "a.png")
    rows = [{"file_name": "cat/a.png", "text": "a cat", "caption": "x"}, {"file_name": "dog/a.png", "text": "a dog"}]
    (classes / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = FolderSource(classes, image_size=8, channels=1)
    assert [(r["caption"], int(r["label"])) for r in source] == [("a cat", 0), ("a dog", 1)]
    with pytest.raises(ValueError, match=r"metadata\.jsonl: line 2 needs 'file_name' and a string caption under"):
        FolderSource(classes, image_size=8, channels=1, caption_column="caption")


# ----------------------------------------------------------------------------- the cache and its records


def _encode_reference(encoders, images: np.ndarray, captions: list[str]):
    """The VAE posterior and the CLIP hidden states computed directly, not through the cache."""
    from diffax.pipelines.text_encoding import tokenize_prompts
    vae, vae_params = load_vae(str(encoders["vae"]))
    posterior = vae.apply({"params": vae_params}, images.astype(np.float32) / 127.5 - 1.0, method=vae.encode)
    text, text_params, tokenizer = load_text_encoder(str(encoders["text_encoder"]), None, str(encoders["tokenizer"]))
    hidden = text.apply({"params": text_params}, tokenize_prompts(tokenizer, captions)).last_hidden_state
    return np.asarray(posterior.mean), np.asarray(posterior.logvar), np.asarray(hidden)


def test_records_hold_the_encoders_outputs(encoders, text_cache):
    manifest = read_manifest(text_cache)
    assert manifest["count"] == NUM and [s["count"] for s in manifest["shards"]] == [10, 10, 4]
    assert manifest["latent"]["shape"] == [8, 8, 4] and manifest["scaling"]["scaling_factor"] == 0.5
    assert manifest["text"]["shapes"] == {"encoder_hidden_states": [77, CROSS]}
    assert manifest["captions"][:2] == ["a handwritten zero", "a handwritten one"]
    source = LatentCacheSource(text_cache)
    digits = FirstDigits(image_size=16, channels=1, caption_template="a handwritten {}")
    index = [3, 12, 23]  # one record in each shard
    mean, logvar, hidden = _encode_reference(encoders, np.stack([digits[i]["image"] for i in index]),
                                             [digits[i]["caption"] for i in index] + [""])
    for row, i in enumerate(index):
        stored = source.stored[i]
        assert stored["caption"] == digits[i]["caption"] and stored["label"] == digits[i]["label"]
        # Same program, other batch composition: XLA:CPU may sum in another order (fp32 rounding).
        np.testing.assert_allclose(stored["mean"][0], mean[row], atol=1e-5)
        np.testing.assert_allclose(stored["logvar"][0], logvar[row], atol=1e-5)
        np.testing.assert_allclose(stored["encoder_hidden_states"], hidden[row], atol=1e-5)
        # The training record: a posterior draw, scaled, from the generator of (seed 0, index).
        rng = np.random.default_rng([0, i])
        assert rng.integers(1) == 0  # the one variant
        z = stored["mean"][0] + np.exp(0.5 * stored["logvar"][0]) * rng.standard_normal((8, 8, 4), np.float32)
        record = source[i]
        assert record["image"].dtype == np.float32 and int(record["label"]) == int(digits[i]["label"])
        np.testing.assert_allclose(record["image"], 0.5 * z, rtol=1e-6)
        assert set(record["cond"]) == {"encoder_hidden_states"}
    np.testing.assert_allclose(source.null_cond["encoder_hidden_states"], hidden[-1], atol=1e-5)
    assert source.num_classes == 10 and source.class_names[3] == "3"


def test_batches_are_deterministic_fresh_each_epoch_and_resume_exactly(text_cache):
    source = make_source(ml_collections.ConfigDict(dict(source="latent_cache", path=str(text_cache))))

    def batches(n: int, state=None):
        it = make_train_iterator(source, global_batch_size=NUM, seed=5)
        if state is not None:
            it.set_state(state)
        return [next(it) for _ in range(n)], it.get_state()

    (b0, b1), _ = batches(2)
    assert b0["image"].shape == (NUM, 8, 8, 4) and b0["image"].dtype == np.float32
    assert b0["cond"]["encoder_hidden_states"].shape == (NUM, 77, CROSS) and b0["label"].dtype == np.int32
    again, state = batches(2)
    for key in ("image", "label"):
        np.testing.assert_array_equal(again[0][key], b0[key])
    # One batch is one epoch here: epoch 1 holds the same examples, drawn afresh.
    np.testing.assert_array_equal(np.sort(b0["label"]), np.sort(b1["label"]))
    assert not np.allclose(b0["image"], b1["image"])
    # Each example keeps its own caption through the shuffle: one embedding per digit, ten in all.
    labels = np.concatenate([b0["label"], b1["label"]])
    hidden = np.concatenate([b0["cond"]["encoder_hidden_states"], b1["cond"]["encoder_hidden_states"]])
    first = {label: hidden[list(labels).index(label)] for label in set(labels.tolist())}
    for label, h in zip(labels, hidden):
        np.testing.assert_array_equal(h, first[label])
    assert len({first[label][-1, :4].tobytes() for label in first}) == 10
    (resumed,), _ = batches(1, state=batches(1)[1])
    np.testing.assert_array_equal(resumed["image"], b1["image"])


def test_crop_and_flip_variants(encoders, tmp_path):
    out = build_cache(cache_config(encoders, tmp_path / "crops", text=False, crops=2, crop_size=12, flip=True,
                                   dtype="float16"))
    manifest = read_manifest(out)
    assert manifest["text"] is None and manifest["latent"]["shape"] == [6, 6, 4]
    assert manifest["latent"]["variants"] == [{"crop": "center", "flip": False}, {"crop": "center", "flip": True},
                                              {"crop": "random", "flip": False}, {"crop": "random", "flip": True}]
    source = LatentCacheSource(out)
    assert source.null_cond is None and "cond" not in source[0]
    image = FirstDigits(image_size=16, channels=1)[7]["image"]
    center = image[2:14, 2:14]
    mean, _, _ = _encode_reference(encoders, np.stack([center, center[:, ::-1]]), [""])
    stored = source.stored[7]
    assert stored["mean"].shape == (4, 6, 6, 4) and stored["mean"].dtype == np.float16
    np.testing.assert_allclose(stored["mean"][:2], mean, rtol=1e-3, atol=1e-3)  # float16 storage: 11 bits
    assert source[7]["image"].dtype == np.float32
    # The random crop sits elsewhere (else it would equal the centre's encoding), and is mirrored too.
    assert not np.allclose(stored["mean"][2], stored["mean"][0], atol=1e-3)
    # Draws pick every variant: compare each draw's distance to the four scaled means.
    chosen = set()
    for seed in range(40):
        z = source.draw(stored, np.random.default_rng(seed))["image"] / 0.5
        chosen.add(int(np.argmin([np.abs(z - m).mean() for m in stored["mean"]])))
    assert chosen == {0, 1, 2, 3}


def test_existing_cache_is_kept_different_one_refused(encoders, text_cache):
    before = (text_cache / MANIFEST).stat().st_mtime_ns
    assert build_cache(cache_config(encoders, text_cache)) == text_cache
    assert (text_cache / MANIFEST).stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="fingerprint"):
        build_cache(cache_config(encoders, text_cache, flip=True))
    assert not list(text_cache.parent.glob(".*partial*"))  # no temporary folder left behind


def test_corrupt_or_mismatched_cache_is_refused(text_cache, tmp_path):
    import shutil
    cache = tmp_path / "cache"
    shutil.copytree(text_cache, cache)
    shard = cache / "shard_00001.array_record"
    data = bytearray(shard.read_bytes())
    data[200:260] = bytes(60)
    shard.write_bytes(bytes(data))
    source = LatentCacheSource(cache)
    with pytest.raises(LatentCacheError, match=r"shard_00001\.array_record \(record \d\): corrupt"):
        [source[i] for i in range(10, 20)]
    shard.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(LatentCacheError, match=r"shard_00001\.array_record: not a readable ArrayRecord file"):
        LatentCacheSource(cache)
    shutil.copy(text_cache / "shard_00001.array_record", shard)
    manifest = json.loads((cache / MANIFEST).read_text())
    manifest["latent"]["shape"] = [4, 4, 4]
    (cache / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(LatentCacheError, match=r"shard_00000\.array_record \(record 0\): key 'mean' is \(1, 8, 8, 4\)"):
        LatentCacheSource(cache)[0]
    manifest["latent"]["shape"] = [8, 8, 4]
    manifest["shards"][2]["count"] = 5
    manifest["count"] = NUM + 1
    (cache / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(LatentCacheError, match=r"shard_00002\.array_record: holds 4 records, manifest.json says 5"):
        LatentCacheSource(cache)
    (cache / MANIFEST).unlink()
    with pytest.raises(LatentCacheError, match=r"manifest\.json: missing"):
        LatentCacheSource(cache)


def test_command_line_caches_a_captioned_folder(encoders, tmp_path):
    from PIL import Image
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (20, 20), np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(["a cat", "a dog"][i % 2])
    config = tmp_path / "config.py"
    config.write_text(
        "from diffax.train.config import base_config\n\n\ndef get_config():\n    c = base_config()\n"
        f"    c.data.source, c.data.path, c.data.image_size = 'folder', {str(folder)!r}, 16\n"
        f"    c.cache.vae, c.cache.text_encoder = {str(encoders['vae'])!r}, {str(encoders['text_encoder'])!r}\n"
        f"    c.cache.tokenizer = {str(encoders['tokenizer'])!r}\n    return c\n")
    out = tmp_path / "cache"
    run = subprocess.run([sys.executable, "-m", "diffax.data.cache", f"--config={config}",
                          f"--config.cache.out={out}"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "wrote 5 records" in run.stderr
    source = LatentCacheSource(out)
    assert len(source) == 5 and [source.stored[i]["caption"] for i in range(2)] == ["a cat", "a dog"]
    bad = subprocess.run([sys.executable, "-m", "diffax.data.cache", f"--config={config}",
                          f"--config.cache.out={out}", "--config.cache.crops=2"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith("error: config key 'cache.crops'")


# ----------------------------------------------------------------------------- training from the cache


def text_unet_config(cache: Path, steps: int = 2) -> ml_collections.ConfigDict:
    c = base_config()
    c.data.source, c.data.path = "latent_cache", str(cache)
    c.model = ml_collections.ConfigDict(dict(
        name="UNet2DConditionModel", sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=CROSS, attention_head_dim=2,
        norm_num_groups=4))
    c.train.update(dict(steps=steps, batch_size=8, warmup_steps=1, log_every=1, checkpoint_every=steps,
                        sample_every=steps, eval_every=steps, label_dropout=0.5))
    c.sample.update(dict(steps=2, prompts=("a handwritten one", "a handwritten two")))
    c.eval.update(dict(kind="digits_accuracy", num_samples=20))  # the grid's count: the same programs
    return c


# The same run at the latent-diffusion recipe's sizes (a text U-Net from a cache, prompt grid, digits accuracy)
# is tests/test_ldm_digits.py's, by default; this one (about 80 s of compiles on 2 cores) with `-m slow`.
@pytest.mark.slow
def test_loop_trains_a_text_unet_from_the_cache_with_grids_and_evaluation(text_cache, tmp_path):
    from PIL import Image

    from diffax.train.loop import train_and_evaluate

    config = text_unet_config(text_cache)
    state = train_and_evaluate(config, tmp_path)
    assert int(state.step) == 2 and int(state.skipped) == 0
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "loss" in line] == [1, 2]
    assert all(np.isfinite(line["loss"]) for line in lines if "loss" in line)
    (evaluation,) = [line for line in lines if "digits_accuracy" in line]
    assert evaluation["step"] == 2 and 0.0 <= evaluation["digits_accuracy"] <= 1.0
    grid = np.asarray(Image.open(tmp_path / "samples" / "step_000002.png"))
    # Two prompts x 10 samples of 16 px, 1 px apart, upscaled 4x.
    assert grid.shape[:2] == ((2 * 17 + 1) * 4, (10 * 17 + 1) * 4)


def test_a_text_model_without_text_is_refused(tmp_path):
    from diffax.train.loop import train_and_evaluate
    config = text_unet_config(tmp_path)
    config.data.source, config.data.image_size, config.data.channels = "digits", 8, 1
    config.model.in_channels = config.model.out_channels = 1
    with pytest.raises(ValueError, match="is text-conditioned: train it from a latent cache written with a text"):
        train_and_evaluate(config, tmp_path / "run")


def test_tokenizer_folders_of_both_encoders(tmp_path):
    """cache.tokenizer / cache.tokenizer_2 when set, else the pipeline's tokenizer/ / tokenizer_2/, else the
    encoder's own folder; a folder without a tokenizer is refused naming the key."""
    pipeline, model = tmp_path / "pipe", tmp_path / "model"
    for folder in (pipeline / "tokenizer", pipeline / "tokenizer_2", model, tmp_path / "own"):
        write_tokenizer(folder)
    cache = ml_collections.ConfigDict({"tokenizer": "", "tokenizer_2": ""})
    assert tokenizer_folder(cache, pipeline, "text_encoder") == (pipeline / "tokenizer").resolve()
    assert tokenizer_folder(cache, pipeline, "text_encoder_2", "tokenizer_2") == (pipeline / "tokenizer_2").resolve()
    assert tokenizer_folder(cache, model, None, "tokenizer_2") == model.resolve()
    cache.tokenizer_2 = str(tmp_path / "own")
    assert tokenizer_folder(cache, pipeline, "text_encoder_2", "tokenizer_2") == (tmp_path / "own").resolve()
    for key in ("tokenizer", "tokenizer_2"):
        with pytest.raises(ValueError, match=f"config key 'cache.{key}': .* holds no CLIP tokenizer"):
            tokenizer_folder(ml_collections.ConfigDict({key: str(tmp_path)}), pipeline, None, key)


@pytest.mark.slow  # a whole run (train, sample, decode, classify): `make test-slow`; the text run above is the default
def test_loop_trains_a_class_conditional_latent_model_and_decodes_its_grid(encoders, tmp_path):
    from PIL import Image

    from diffax.train.loop import train_and_evaluate

    cache = build_cache(cache_config(encoders, tmp_path / "labels", text=False))
    config = base_config()
    config.data.source, config.data.path = "latent_cache", str(cache)
    config.model = ml_collections.ConfigDict(dict(
        name="UNet2DModel", sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D",) * 2,
        norm_num_groups=4, num_class_embeds=11))
    config.train.update(dict(steps=1, batch_size=8, warmup_steps=1, log_every=1, checkpoint_every=1,
                             sample_every=1, eval_every=1))
    config.sample.steps = 2
    config.eval.update(dict(kind="digits_accuracy", num_samples=100))  # the class grid's count
    train_and_evaluate(config, tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert 0.0 <= [line for line in lines if "digits_accuracy" in line][0]["digits_accuracy"] <= 1.0
    # Ten classes x 10 samples, decoded by the cache's VAE to 16 px grayscale, 1 px apart, upscaled 4x.
    grid = np.asarray(Image.open(tmp_path / "run" / "samples" / "step_000001.png"))
    assert grid.shape[:2] == ((10 * 17 + 1) * 4, (10 * 17 + 1) * 4)
