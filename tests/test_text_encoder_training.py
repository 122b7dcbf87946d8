"""Training the text encoder with the U-Net (diffax.train.text_encoder), the latent cache's fingerprint checked
on resume (diffax.train.resume.check_cache), and a DiT's LoRA export read back.

Fast: one train step of `WithTextEncoder` (a tiny CLIP under a one-layer stand-in denoiser) moves the text
encoder (full) or only its LoRA factors (lora); label dropout feeds the empty prompt's token ids; an exported
text-encoder LoRA reads back onto the encoder; bad options and a changed cache are refused in one line.
Slow (`make test-slow`): the loop on a tiny random SD pipeline's cache, full and LoRA, with the exports loaded
by diffusers and compared with diffax; a DiT LoRA export read back by diffax's DiTPipeline and by peft on
diffusers' DiT.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from diffax.convert.lora import read_lora
from diffax.models import init_params
from diffax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextWithProjectionConfig
from diffax.pipelines.lora import apply as apply_lora
from diffax.quant.quantize import flatten
from diffax.schedules import make_betas
from diffax.train import finetune, resume, text_encoder
from diffax.train.config import base_config, validate_config
from diffax.train.state import init_train_state
from diffax.train.step import Objective, diffusion_loss, make_train_step

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

LENGTH = 8  # tokens per caption in the fast tests
EMPTY = np.array([0, 1] + [1] * (LENGTH - 2), np.int32)  # the stand-in tokenizer's empty prompt: BOS, EOS, pad


class Denoiser(nn.Module):
    """A stand-in U-Net reading the text: x + Dense(mean of the hidden states over tokens), per pixel."""
    config: Any = None

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array, *, encoder_hidden_states: jax.Array,
                 train: bool = False) -> jax.Array:
        del timesteps, train
        return sample + nn.Dense(sample.shape[-1])(encoder_hidden_states.mean(1))[:, None, None, :]


@functools.lru_cache(maxsize=1)
def _models() -> tuple[text_encoder.WithTextEncoder, dict[str, Any]]:
    te_config = CLIPTextConfig(vocab_size=20, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                               num_attention_heads=2, max_position_embeddings=LENGTH, bos_token_id=0, eos_token_id=1,
                               pad_token_id=1)
    te = CLIPTextModel(te_config)
    model = text_encoder.WithTextEncoder(Denoiser(), te)
    unet_params = Denoiser().init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)), jnp.zeros((1,)),
                                  encoder_hidden_states=jnp.zeros((1, LENGTH, 16)))["params"]
    params = {"unet": unet_params, "text_encoder": init_params(te_config, jax.random.key(1))}
    return model, jax.device_get(params)


def _batch(rows: int = 4) -> dict[str, Any]:
    ids = np.tile(np.array([0, 5, 6, 7, 1, 1, 1, 1], np.int32), (rows, 1))
    ids[:, 1] += np.arange(rows)  # a different caption per row
    return {"image": np.random.default_rng(0).standard_normal((rows, 4, 4, 3)).astype(np.float32),
            "cond": {"input_ids": ids}}


def _objective(dropout: float) -> Objective:
    abar = np.cumprod(1.0 - make_betas("linear", 1000, 1e-4, 0.02))
    return Objective(alphas_cumprod=abar, label_dropout=dropout, null_cond={"input_ids": EMPTY})


def _moved(before: Any, after: Any) -> set[str]:
    a, b = flatten(jax.device_get(before)), flatten(jax.device_get(after))
    return {"/".join(p) for p in a if not np.array_equal(np.asarray(a[p]), np.asarray(b[p]))}


def test_full_step_moves_both_models_and_dropout_feeds_the_empty_prompt():
    model, params = _models()
    tx = optax.sgd(0.5)
    step = jax.jit(make_train_step(model, tx, _objective(0.0), ema_max_decay=0.0))
    state, metrics = step(init_train_state(params, tx), _batch(), jax.random.key(3))
    moved = _moved(params, state.params)
    assert "text_encoder/text_model/encoder/layers_0/self_attn/q_proj/kernel" in moved
    assert "text_encoder/text_model/embeddings/token_embedding/embedding" in moved
    assert "unet/Dense_0/kernel" in moved and np.isfinite(metrics["loss"])

    # Dropping every caption is the loss of the empty prompt's token ids; keeping them is another loss.
    key = jax.random.key(4)  # the same timesteps and noise in the three losses
    dropping, keeping = (jax.jit(functools.partial(diffusion_loss, model, params, _objective(rate), key=key))
                         for rate in (1.0, 0.0))
    empty = {**_batch(), "cond": {"input_ids": np.tile(EMPTY, (4, 1))}}
    dropped, of_empty, kept = dropping(batch=_batch())[0], keeping(batch=empty)[0], keeping(batch=_batch())[0]
    np.testing.assert_allclose(dropped, of_empty, rtol=1e-6)
    assert abs(float(kept) - float(of_empty)) > 1e-4 * abs(float(of_empty))


def test_lora_step_moves_only_the_factors_and_the_export_reads_back(tmp_path):
    model, params = _models()
    te_paths = finetune.lora_targets(params["text_encoder"], text_encoder.LORA_TARGETS)
    assert len(te_paths) == 4  # q, k, v, out
    lora = {"unet": finetune.init_lora(params["unet"], finetune.lora_targets(params["unet"], "all"), 2,
                                       jax.random.key(0)),
            "text_encoder": finetune.init_lora(params["text_encoder"], te_paths, 2, jax.random.key(1))}
    view = functools.partial(finetune.lora_view, scale=4.0 / 2)
    tx = optax.sgd(0.5)
    state = init_train_state(lora, tx).replace(frozen=params)
    step = jax.jit(make_train_step(model, tx, _objective(0.0), ema_max_decay=0.0, view=view))
    state, _ = step(state, _batch(), jax.random.key(3))
    assert not _moved(params, state.frozen)  # the bases stay
    moved = _moved(lora, state.params)
    assert "text_encoder/text_model/encoder/layers_0/self_attn/out_proj/lora_up" in moved
    assert "unet/Dense_0/lora_up" in moved

    # The text encoder's factors exported with diffusers' `text_encoder.` keys read back onto the encoder.
    trained = jax.tree.map(lambda x: x + 0.1, jax.device_get(state.params))  # lora_down moved too
    file = finetune.export_lora_components(tmp_path / finetune.LORA_FILE, {"text_encoder": trained["text_encoder"]},
                                           alpha=4.0)
    header = json.loads(json.loads(_header(file))["__metadata__"]["lora_adapter_metadata"])
    # peft's target names without `text_model.`: they match transformers 4's and 5's CLIP module names
    assert header["text_encoder.r"] == 2 and "encoder.layers.0.self_attn.q_proj" in \
        header["text_encoder.target_modules"]
    layers = read_lora(file, {"text_encoder": (model.text_encoder, params["text_encoder"])})["text_encoder"]
    from_file = jax.device_get(apply_lora(params["text_encoder"], [layers], [1.0]))
    merged = finetune.merge_lora(params, trained, 4.0 / 2)["text_encoder"]
    for path, value in flatten(merged).items():
        np.testing.assert_allclose(flatten(from_file)[path], value, rtol=1e-5, atol=1e-6, err_msg="/".join(path))
    assert _moved(params["text_encoder"], merged)


class SDXLDenoiser(nn.Module):
    """A stand-in SDXL U-Net reading the concatenated hidden states, the pooled embedding and the time ids."""
    config: Any = None

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array, *, encoder_hidden_states: jax.Array,
                 added_cond_kwargs: dict[str, jax.Array], train: bool = False) -> jax.Array:
        del timesteps, train
        text = jnp.concatenate([encoder_hidden_states.mean(1), added_cond_kwargs["text_embeds"],
                                added_cond_kwargs["time_ids"]], -1)  # [B, D1 + D2 + P + 6]
        return sample + nn.Dense(sample.shape[-1])(text)[:, None, None, :]


@functools.lru_cache(maxsize=1)
def _sdxl_models() -> tuple[text_encoder.WithTextEncoders, dict[str, Any]]:
    fields = dict(vocab_size=20, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=LENGTH, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    c1, c2 = CLIPTextConfig(hidden_size=16, **fields), CLIPTextWithProjectionConfig(hidden_size=8, projection_dim=4,
                                                                                    **fields)
    model = text_encoder.WithTextEncoders(SDXLDenoiser(), CLIPTextModel(c1), CLIPTextModel(c2))
    unet = SDXLDenoiser().init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)), jnp.zeros((1,)),
                               encoder_hidden_states=jnp.zeros((1, LENGTH, 24)),
                               added_cond_kwargs={"text_embeds": jnp.zeros((1, 4)), "time_ids": jnp.zeros((1, 6))})
    params = {"unet": unet["params"], "text_encoder": init_params(c1, jax.random.key(1)),
              "text_encoder_2": init_params(c2, jax.random.key(2))}
    return model, jax.device_get(params)


def test_sdxl_lora_step_moves_only_both_encoders_and_the_unets_factors(tmp_path):
    """SDXL with both text encoders trained: the U-Net gets the penultimate hidden states of both encoders side
    by side and text_encoder_2's pooled embedding, as the pipelines encode prompts; a LoRA step moves the
    factors of the U-Net and of both encoders' q/k/v/out_proj and nothing else; dropout feeds both empty
    prompts and keeps the time ids; the file has `text_encoder_2.` keys that read back onto that encoder."""
    from diffax.pipelines.text_encoding import encode_prompt_sdxl
    model, params = _sdxl_models()
    batch = _batch()
    batch["cond"].update(input_ids_2=batch["cond"]["input_ids"][:, ::-1].copy(),
                         time_ids=np.tile(np.arange(6, dtype=np.float32), (4, 1)))
    ids, ids_2 = batch["cond"]["input_ids"], batch["cond"]["input_ids_2"]
    x, t = batch["image"], jnp.zeros((4,))
    context, pooled = encode_prompt_sdxl([(model.text_encoder, params["text_encoder"]),
                                          (model.text_encoder_2, params["text_encoder_2"])], [ids, ids_2])
    expected = SDXLDenoiser().apply({"params": params["unet"]}, x, t, encoder_hidden_states=context,
                                    added_cond_kwargs={"text_embeds": pooled, "time_ids": batch["cond"]["time_ids"]})
    np.testing.assert_allclose(model.apply({"params": params}, x, t, **batch["cond"]), expected, rtol=1e-5)

    lora = {name: finetune.init_lora(p, finetune.lora_targets(p, "all" if name == "unet" else
                                                              text_encoder.LORA_TARGETS), 2, jax.random.key(i))
            for i, (name, p) in enumerate(params.items())}
    assert len(finetune.lora_targets(params["text_encoder_2"], text_encoder.LORA_TARGETS)) == 8  # 2 layers x 4
    tx = optax.sgd(0.5)
    state = init_train_state(lora, tx).replace(frozen=params)
    objective = Objective(alphas_cumprod=_objective(0.0).alphas_cumprod, label_dropout=0.0,
                          null_cond={"input_ids": EMPTY, "input_ids_2": EMPTY})
    view = functools.partial(finetune.lora_view, scale=1.0)
    state, metrics = jax.jit(make_train_step(model, tx, objective, ema_max_decay=0.0, view=view))(
        state, batch, jax.random.key(3))
    assert not _moved(params, state.frozen) and np.isfinite(metrics["loss"])
    moved = _moved(lora, state.params)
    assert {p.split("/")[0] for p in moved} == {"unet", "text_encoder", "text_encoder_2"}
    assert "text_encoder_2/text_model/encoder/layers_0/self_attn/q_proj/lora_up" in moved

    # Dropping every caption is the loss of both empty prompts at the examples' own time ids.
    dropping = dataclasses.replace(objective, label_dropout=1.0)
    empty = {**batch, "cond": {**batch["cond"], "input_ids": np.tile(EMPTY, (4, 1)),
                               "input_ids_2": np.tile(EMPTY, (4, 1))}}
    key = jax.random.key(4)
    dropped = diffusion_loss(model, params, dropping, key=key, batch=batch)[0]
    np.testing.assert_allclose(dropped, diffusion_loss(model, params, objective, key=key, batch=empty)[0], rtol=1e-6)

    trained = jax.tree.map(lambda v: v + 0.1, jax.device_get(state.params))
    file = finetune.export_lora_components(tmp_path / "all.safetensors", trained, alpha=2.0)
    keys = set(json.loads(_header(file))) - {"__metadata__"}
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    file = finetune.export_lora_components(tmp_path / finetune.LORA_FILE,
                                           {"text_encoder_2": trained["text_encoder_2"]}, alpha=2.0)
    layers = read_lora(file, {"text_encoder_2": (model.text_encoder_2, params["text_encoder_2"])})["text_encoder_2"]
    from_file = flatten(jax.device_get(apply_lora(params["text_encoder_2"], [layers], [1.0])))
    merged = flatten(finetune.merge_lora(params, trained, 1.0)["text_encoder_2"])
    for path, value in merged.items():
        np.testing.assert_allclose(from_file[path], value, rtol=1e-5, atol=1e-6, err_msg="/".join(path))


def _header(file: Path) -> str:
    data = file.read_bytes()
    return data[8:8 + int.from_bytes(data[:8], "little")].decode()


class _Cache:
    """What check_cache and check_options read of a LatentCacheSource."""

    def __init__(self, path: Path, fingerprint: str, ids: np.ndarray | None = EMPTY):
        self.path, self.manifest, self.null_input_ids = path, {"fingerprint": fingerprint}, ids


def test_a_resumed_run_refuses_another_cache_naming_both(tmp_path):
    config = base_config()
    first, moved, other = _Cache(tmp_path / "a", "f" * 64), _Cache(tmp_path / "b", "f" * 64), _Cache(
        tmp_path / "c", "0" * 64)
    resume.check_cache(tmp_path, first, config, resuming=False)
    assert json.loads((tmp_path / resume.CACHE_FILE).read_text())["path"] == str(tmp_path / "a")
    resume.check_cache(tmp_path, moved, config, resuming=True)  # the same cache elsewhere: fine
    with pytest.raises(resume.CacheChangeError) as e:
        resume.check_cache(tmp_path, other, config, resuming=True)
    message = str(e.value)
    assert "\n" not in message and str(tmp_path / "a") in message and str(tmp_path / "c") in message
    assert "data.allow_cache_change" in message
    config.data.allow_cache_change = True
    resume.check_cache(tmp_path, other, config, resuming=True)
    assert json.loads((tmp_path / resume.CACHE_FILE).read_text())["fingerprint"] == "0" * 64
    resume.check_cache(tmp_path, object(), config, resuming=True)  # not a latent cache: nothing to check


def test_bad_options_are_refused_naming_the_key(tmp_path):
    config = base_config()
    config.model = ml_collections.ConfigDict({"name": "unet2d"})
    config.train.text_encoder = "yes"
    with pytest.raises(ValueError, match="train.text_encoder"):
        validate_config(config)
    (tmp_path / "sd" / "text_encoder").mkdir(parents=True)
    config.train.update(text_encoder="full", finetune="lora", init_from=str(tmp_path / "sd"))
    with pytest.raises(text_encoder.TextEncoderError, match="train.finetune is 'lora'"):
        text_encoder.check_options(config, _Cache(tmp_path, "f"))
    config.train.update(finetune="full", init_from=str(tmp_path))
    with pytest.raises(text_encoder.TextEncoderError, match="text_encoder/"):
        text_encoder.check_options(config, _Cache(tmp_path, "f"))
    config.train.init_from = str(tmp_path / "sd")
    with pytest.raises(text_encoder.TextEncoderError, match="token ids"):
        text_encoder.check_options(config, _Cache(tmp_path, "f", ids=None))
    text_encoder.check_options(config, _Cache(tmp_path, "f"))
    # SDXL: both encoders' folders, both tokenizers' ids, no grids while training
    with pytest.raises(text_encoder.TextEncoderError, match="text_encoder_2/"):
        text_encoder.check_sdxl_options(config, _Cache(tmp_path, "f"))
    (tmp_path / "sd" / "text_encoder_2").mkdir()
    with pytest.raises(text_encoder.TextEncoderError, match="second tokenizer's token ids"):
        text_encoder.check_sdxl_options(config, _Cache(tmp_path, "f"))
    cache = _Cache(tmp_path, "f")
    cache.null_input_ids_2 = EMPTY
    config.train.sample_every = 100
    with pytest.raises(text_encoder.TextEncoderError, match="train.sample_every"):
        text_encoder.check_sdxl_options(config, cache)
    config.train.sample_every = 0
    text_encoder.check_sdxl_options(config, cache)


# ----------------------------------------------------------------------------- the loop, diffusers (slow)


@pytest.fixture(scope="module")
def sd_cache(tmp_path_factory) -> tuple[Path, Path]:
    """(a tiny random SD pipeline folder, the latent cache of four captioned images through it)."""
    from PIL import Image
    from pipeline_fixtures import build_sd_pipeline

    from diffax.data.cache import build_cache
    root = tmp_path_factory.mktemp("te")
    pipe = build_sd_pipeline(root / "sd")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    with open(images / "metadata.jsonl", "w") as f:
        for i, word in enumerate(("red", "green", "blue", "gray")):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(images / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"a {word} cat"}) + "\n")
    c = _recipe("cache")
    c.data.update(dict(path=str(images), image_size=16, worker_count=0))
    c.cache.update(dict(vae=str(pipe), text_encoder=str(pipe), out=str(root / "cache"), batch_size=8, flip=False))
    return pipe, build_cache(c)


def _recipe(stage: str = "train") -> ml_collections.ConfigDict:
    sys.path.insert(0, str(ROOT))
    from configs.sd15_finetune import get_config
    return get_config(stage)


def _train(pipe: Path, cache: Path, workdir: Path, mode: str, steps: int, sample_every: int = 0):
    from pipeline_fixtures import UNET

    from diffax.train.loop import train_and_evaluate
    c = _recipe()
    c.data.update(dict(path=str(cache), worker_count=0))
    c.model.update(UNET, remat="none", dtype="float32")
    c.train.update(dict(init_from=str(pipe), steps=steps, batch_size=8, log_every=1, checkpoint_every=2,
                        sample_every=sample_every, finetune=mode, text_encoder=mode, learning_rate=1e-3,
                        ema_decay=0.0))
    c.train.lora.update(dict(rank=2, alpha=4.0))
    c.sample.steps = 2
    return c, train_and_evaluate(c, workdir)


def _ids(pipe: Path, prompts: list[str]) -> np.ndarray:
    from diffax.pipelines.loading import load_tokenizer
    from diffax.pipelines.text_encoding import tokenize_prompts
    return tokenize_prompts(load_tokenizer(pipe / "tokenizer"), prompts, max_length=77)


def _te_outputs(pipe_or_te: Any, ids: np.ndarray) -> np.ndarray:
    import torch
    with torch.no_grad():
        return pipe_or_te(torch.from_numpy(ids.astype(np.int64)))[0].numpy()


@pytest.mark.slow  # a cache and two compilations of the tiny U-Net under CLIP: minutes on 2 loaded cores
def test_full_run_trains_the_text_encoder_and_exports_a_pipeline_diffusers_runs(sd_cache, tmp_path):
    import diffusers
    import torch

    from diffax import convert
    from diffax.data import LatentCacheSource
    pipe, cache = sd_cache
    source = LatentCacheSource(cache)
    # The cache stores each caption's token ids, and the empty prompt's.
    record = source.stored[0]
    np.testing.assert_array_equal(record["input_ids"], _ids(pipe, [record["caption"]])[0])
    np.testing.assert_array_equal(source.null_input_ids, _ids(pipe, [""])[0])

    c, state = _train(pipe, cache, tmp_path / "run", "full", 2, sample_every=2)
    assert (tmp_path / "run" / "samples" / "step_000002.png").is_file()  # the grid, through the trained encoder
    _, base = convert.load(pipe, subfolder="text_encoder")
    assert "text_model/encoder/layers_0/self_attn/q_proj/kernel" in _moved(base, state.params["text_encoder"])

    # The exported pipeline folder: diffusers' text encoder and U-Net give diffax's outputs of the EMA weights.
    export = tmp_path / "run" / "export"
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(export)
    ids = _ids(pipe, ["a red cat", "a dog"])
    unet, _ = convert.load(pipe, subfolder="unet")
    model = text_encoder.WithTextEncoder(unet, convert.load(pipe, subfolder="text_encoder")[0])
    ema = jax.device_get(state.ema_params)
    ours = np.asarray(model.text_encoder.apply({"params": ema["text_encoder"]}, ids).last_hidden_state)
    got = _te_outputs(theirs.text_encoder, ids)
    assert np.abs(ours - got).max() <= 1e-4 * np.abs(got).max()
    assert np.abs(ours - _te_outputs(diffusers.StableDiffusionPipeline.from_pretrained(pipe).text_encoder, ids)
                  ).max() > 1e-3 * np.abs(got).max()  # the trained encoder differs from the base
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    eps = np.asarray(model.apply({"params": ema}, x, jnp.array([10, 500]), input_ids=ids))
    with torch.no_grad():
        ref = theirs.unet(torch.from_numpy(x).permute(0, 3, 1, 2), torch.tensor([10, 500]),
                          encoder_hidden_states=torch.from_numpy(got)).sample.permute(0, 2, 3, 1).numpy()
    assert np.abs(eps - ref).max() <= 1e-4 * np.abs(ref).max()

    # Resuming on a cache with another fingerprint stops, naming both caches.
    other = tmp_path / "other_cache"
    shutil.copytree(cache, other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "fingerprint": "0" * 64}))
    c.data.path = str(other)
    c.train.steps = 3
    from diffax.train.loop import train_and_evaluate
    with pytest.raises(resume.CacheChangeError, match=f"{re.escape(str(cache.resolve()))}.*"
                                                      f"{re.escape(str(other.resolve()))}"):
        train_and_evaluate(c, tmp_path / "run")


@pytest.mark.slow  # as above, with LoRA factors
def test_lora_run_trains_only_factors_and_diffusers_loads_both_components(sd_cache, tmp_path):
    pytest.importorskip("peft")
    import diffusers

    from diffax import convert
    pipe, cache = sd_cache
    _, state = _train(pipe, cache, tmp_path / "run", "lora", 2, sample_every=2)
    assert (tmp_path / "run" / "samples" / "step_000002.png").is_file()  # through the merged encoder
    _, te_base = convert.load(pipe, subfolder="text_encoder")
    assert not _moved(te_base, state.frozen["text_encoder"])
    assert "text_encoder/text_model/encoder/layers_0/self_attn/q_proj/lora_up" in _moved(
        jax.tree.map(np.zeros_like, jax.device_get(state.params)), state.params)

    file = tmp_path / "run" / "export" / finetune.LORA_FILE
    keys = json.loads(_header(file)).keys()
    assert any(k.startswith("unet.") for k in keys) and any(k.startswith("text_encoder.") for k in keys)
    merged = finetune.merge_lora(jax.device_get(state.frozen), jax.device_get(state.ema_params), 4.0 / 2)
    te, _ = convert.load(pipe, subfolder="text_encoder")
    ids = _ids(pipe, ["a red cat", "a dog"])
    ours = np.asarray(te.apply({"params": merged["text_encoder"]}, ids).last_hidden_state)
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(pipe)
    before = _te_outputs(theirs.text_encoder, ids)
    theirs.load_lora_weights(str(file.parent), adapter_name="tuned")
    after = _te_outputs(theirs.text_encoder, ids)
    assert np.abs(ours - before).max() > 1e-3 * np.abs(before).max()  # the LoRA changes the encoder
    assert np.abs(ours - after).max() <= 1e-4 * np.abs(after).max()


@pytest.mark.slow  # a torch DiT pipeline, its diffax load and peft: about a minute on loaded cores
def test_dit_lora_export_reads_back_in_diffax_and_peft(tmp_path):
    """diffusers 0.42 has no LoRA loading for DiTPipeline / DiTTransformer2DModel: the exported
    `transformer.` file is read by diffax's DiTPipeline.load_lora_weights and, on the torch side, by peft's
    inject_adapter_in_model + set_peft_model_state_dict with the file's LoraConfig."""
    peft = pytest.importorskip("peft")
    import safetensors.numpy
    import torch
    from pipeline_fixtures import build_dit_pipeline, diffusers_pipeline

    from diffax import convert, pipelines
    folder = build_dit_pipeline(tmp_path / "dit")
    module, params = convert.load(folder / "transformer")
    params = jax.device_get(params)
    lora = finetune.init_lora(params, finetune.lora_targets(params, "attention"), 2, jax.random.key(0))
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), lora)
    config = base_config()
    config.train.lora.update(dict(rank=2, alpha=6.0))
    tuning = finetune.Finetune("lora", params, lora, None, None, 1, {})
    file = tuning.export(tmp_path / "run", lora, config, module)
    merged = finetune.merge_lora(params, lora, 6.0 / 2)

    dit = pipelines.load(folder)
    dit.load_lora_weights(str(file.parent), adapter_name="tuned")
    got = flatten(jax.device_get(dit.components["transformer"][1]))
    for path, value in flatten(merged).items():
        np.testing.assert_allclose(got[path], value, rtol=1e-5, atol=1e-6, err_msg="/".join(path))

    torch_dit = diffusers_pipeline(str(folder)).transformer
    header = json.loads(json.loads(_header(file))["__metadata__"]["lora_adapter_metadata"])
    lora_config = peft.LoraConfig(r=header["transformer.r"], lora_alpha=header["transformer.lora_alpha"],
                                  target_modules=header["transformer.target_modules"])
    peft.inject_adapter_in_model(lora_config, torch_dit, adapter_name="tuned")
    state = {k.removeprefix("transformer."): torch.from_numpy(v) for k, v in safetensors.numpy.load_file(file).items()}
    assert not peft.set_peft_model_state_dict(torch_dit, state, adapter_name="tuned").unexpected_keys
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    t, labels = np.array([10, 700]), np.array([3, 999])
    ours = np.asarray(module.apply({"params": merged}, x, jnp.asarray(t), class_labels=jnp.asarray(labels)))
    plain = np.asarray(module.apply({"params": params}, x, jnp.asarray(t), class_labels=jnp.asarray(labels)))
    with torch.no_grad():
        theirs = torch_dit(torch.from_numpy(x).permute(0, 3, 1, 2), timestep=torch.from_numpy(t),
                           class_labels=torch.from_numpy(labels)).sample.permute(0, 2, 3, 1).numpy()
    assert np.abs(ours - plain).max() > 1e-2 * np.abs(plain).max()  # the LoRA changes the output
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()
