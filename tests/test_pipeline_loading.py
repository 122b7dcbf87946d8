"""diffax.pipelines.load: dispatch on model_index.json, the conversion cache, single files, clear errors, and
the DiT / DDPM / DDIM pipelines against diffusers 0.42 on tiny random pipelines.

Parity tolerance: max abs difference 1e-3 on [0, 1] images, same noise and scheduler config on both sides
(measured: ~4e-5 for DiT through the VAE, ~3e-6 for the U-Nets).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings

import diffusers
import jax
import numpy as np
import pytest

import diffax.pipelines
from diffax import compilation, parallel
from diffax.convert import api
from diffax.convert.io import CheckpointError
from diffax.convert.rules import flatten
from diffax.convert import single_file
from diffax.convert.single_file import save_single_file
from diffax.pipelines.class_conditional import DDIMPipeline, DDPMPipeline, DiTPipeline
from diffax.pipelines.stable_diffusion import StableDiffusionPipeline
from tests.pipeline_fixtures import (build_dit_pipeline, build_sd_pipeline, build_unconditional_pipeline,
                                     diffusers_images)

ATOL = 1e-3


def assert_same_params(a, b):
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg="/".join(k))


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return build_sd_pipeline(tmp_path_factory.mktemp("load") / "sd")


@pytest.fixture
def count_conversions(monkeypatch):
    """The number of diffax.convert.load calls made (the cache calls it to convert)."""
    calls = []
    original = api.load

    def counting(path, **kw):
        calls.append(str(path))
        return original(path, **kw)

    monkeypatch.setattr(api, "load", counting)
    return calls


# ----------------------------------------------------------------------------- the conversion cache


def test_second_load_skips_conversion_and_changed_files_convert_again(sd_folder, tmp_path, count_conversions):
    first = diffax.pipelines.load(sd_folder, cache_dir=tmp_path)
    assert isinstance(first, StableDiffusionPipeline)
    assert sorted(os.path.basename(p) for p in count_conversions) == ["text_encoder", "unet", "vae"]
    count_conversions.clear()
    second = diffax.pipelines.load(sd_folder, cache_dir=tmp_path)
    assert count_conversions == []
    for name in ("unet", "vae", "text_encoder"):
        assert_same_params(second.params(name), first.params(name))
        assert second.module(name).config == first.module(name).config
    # A checkpoint that changed on disk (here only its mtime) is converted again; the others are not.
    weights = next((sd_folder / "vae").glob("*.safetensors"))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    diffax.pipelines.load(sd_folder, cache_dir=tmp_path)
    assert [os.path.basename(p) for p in count_conversions] == ["vae"]
    # Another dtype is another entry.
    count_conversions.clear()
    import jax.numpy as jnp
    bf16 = diffax.pipelines.load(sd_folder, cache_dir=tmp_path, dtype=jnp.bfloat16)
    assert len(count_conversions) == 3 and bf16.params("unet")["conv_in"]["kernel"].dtype == jnp.bfloat16


def test_corrupt_cache_entry_is_converted_again(sd_folder, tmp_path, count_conversions):
    first = diffax.pipelines.load(sd_folder, cache_dir=tmp_path)
    entries = sorted(p for p in tmp_path.iterdir() if p.name.startswith("unet-"))
    assert len(entries) == 1
    for f in entries[0].rglob("*"):  # every file of the entry truncated
        if f.is_file():
            f.write_bytes(b"\0" * 3)
    count_conversions.clear()
    with pytest.warns(UserWarning, match="unet unreadable"):
        again = diffax.pipelines.load(sd_folder, cache_dir=tmp_path)
    assert [os.path.basename(p) for p in count_conversions] == ["unet"]
    assert_same_params(again.params("unet"), first.params("unet"))
    shutil.rmtree(entries[0])  # a missing entry is just a miss
    count_conversions.clear()
    diffax.pipelines.load(sd_folder, cache_dir=tmp_path)
    assert [os.path.basename(p) for p in count_conversions] == ["unet"]


def test_placed_params_replace_the_host_trees(sd_folder, tmp_path):
    pipe = diffax.pipelines.load(sd_folder, cache_dir=tmp_path)
    host = {name: pipe.params(name) for name in pipe.components}
    placed = pipe.device_params()
    for name in pipe.components:  # one copy of the weights: the components hold the placed arrays themselves
        assert all(a is b for a, b in zip(jax.tree.leaves(pipe.params(name)), jax.tree.leaves(placed[name])))
        assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(pipe.params(name)))
        assert_same_params(pipe.params(name), host[name])
    assert pipe.device_params() is placed


def test_cache_hit_checks_the_entry_without_tracing_the_model(sd_folder, tmp_path, count_conversions, monkeypatch):
    from diffax.pipelines import cache
    first = diffax.pipelines.load(sd_folder, cache_dir=tmp_path)
    monkeypatch.setattr(cache, "abstract_params", lambda config: pytest.fail("traced the model's init"))
    count_conversions.clear()
    second = diffax.pipelines.load(sd_folder, cache_dir=tmp_path)
    assert count_conversions == []
    assert_same_params(second.params("unet"), first.params("unet"))
    # An entry whose arrays no longer match its shapes file is converted again.
    [entry] = sorted(p for p in tmp_path.iterdir() if p.name.startswith("vae-"))
    shapes = json.loads((entry / cache.SHAPES_FILE).read_text())
    shapes[next(iter(shapes))][0] = [1, 2, 3]
    (entry / cache.SHAPES_FILE).write_text(json.dumps(shapes))
    with pytest.warns(UserWarning, match="vae unreadable.*do not fit"):
        diffax.pipelines.load(sd_folder, cache_dir=tmp_path)
    assert [os.path.basename(p) for p in count_conversions] == ["vae"]


# ----------------------------------------------------------------------------- single files


def test_single_file_loads_the_same_weights_and_needs_a_tokenizer(sd_folder, tmp_path, monkeypatch):
    folder_pipe = diffax.pipelines.load(sd_folder, cache_dir=False)
    parts = {n: folder_pipe.components[n] for n in ("unet", "vae", "text_encoder")}
    path = save_single_file(tmp_path / "tiny.safetensors", parts, model_type="sd1")
    configs = {n: m.config for n, (m, _) in parts.items()}
    with pytest.raises(ValueError, match=r"tiny.safetensors: a single-file checkpoint holds no tokenizer; pass "
                                         r"tokenizer="):
        diffax.pipelines.load(path, model_type="sd1", single_file_configs=configs, cache_dir=tmp_path / "c")
    conversions = []
    original = single_file.load_single_file
    monkeypatch.setattr(single_file, "load_single_file", lambda *a, **kw: conversions.append(1) or original(*a, **kw))
    for expected in (1, 1):  # converted, then restored from the cache (no warning: the entry reads back)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            pipe = diffax.pipelines.load(path, model_type="sd1", single_file_configs=configs,
                                         cache_dir=tmp_path / "c", tokenizer=sd_folder / "tokenizer")
        assert len(conversions) == expected
        assert type(pipe) is StableDiffusionPipeline
        assert type(pipe.scheduler).__name__ == "PNDMScheduler"
        for name in parts:
            assert_same_params(pipe.params(name), folder_pipe.params(name))


# ----------------------------------------------------------------------------- errors


def test_clear_errors(sd_folder, tmp_path):
    with pytest.raises(CheckpointError, match="model_index.json: missing"):
        diffax.pipelines.load(sd_folder / "unet", cache_dir=False)
    with pytest.raises(CheckpointError, match="no-such-org/no-such-model: not a local file or folder, and "
                                              "downloading it from the hub failed"):
        diffax.pipelines.load("no-such-org/no-such-model", cache_dir=False)
    with pytest.raises(CheckpointError, match="no such file or folder"):
        diffax.pipelines.load(tmp_path / "nothing here", cache_dir=False)
    bad = tmp_path / "bad"
    shutil.copytree(sd_folder, bad)
    index = json.loads((bad / "model_index.json").read_text())
    (bad / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyPipeline"}))
    with pytest.raises(CheckpointError, match=r"model_index.json: _class_name 'KandinskyPipeline' is not a "
                                              r"pipeline diffax has"):
        diffax.pipelines.load(bad, cache_dir=False)
    (bad / "model_index.json").write_text(json.dumps(index))
    config = json.loads((bad / "unet" / "config.json").read_text())
    (bad / "unet" / "config.json").write_text(json.dumps({**config, "resnet_time_scale_shift": "scale_shift"}))
    with pytest.raises(ValueError, match=r"resnet_time_scale_shift") as err:
        diffax.pipelines.load(bad, cache_dir=False)
    assert "unet/config.json" in str(err.value)
    shutil.rmtree(bad / "vae")
    (bad / "unet" / "config.json").write_text(json.dumps(config))
    index.pop("vae")
    (bad / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="StableDiffusionPipeline needs component"):
        diffax.pipelines.load(bad, cache_dir=False)


def test_compilation_cache_is_turned_on_beside_the_conversion_cache(tmp_path, monkeypatch):
    turned_on = []
    monkeypatch.setattr(compilation, "enable_persistent_cache", turned_on.append)
    for off in (False, True):  # a missing path fails after the cache is (or is not) turned on
        with pytest.raises(CheckpointError, match="no such file or folder"):
            diffax.pipelines.load(tmp_path / "missing", cache_dir=tmp_path / "pipelines", compilation_cache=not off)
    assert turned_on == [tmp_path / "xla"]


# ----------------------------------------------------------------------------- DiT, DDPM, DDIM


def test_dit_pipeline_matches_diffusers(tmp_path):
    folder = build_dit_pipeline(tmp_path / "dit")
    pipe = diffax.pipelines.load(folder, cache_dir=tmp_path / "cache")
    assert isinstance(pipe, DiTPipeline)
    x = np.random.default_rng(0).standard_normal((2, 4, 4, 4)).astype(np.float32)
    kw = dict(class_labels=[1, 999], num_inference_steps=3, guidance_scale=4.0)
    got = pipe(latents=x, **kw).images
    want = diffusers_images(folder, noise=x, **kw)
    assert got.shape == (2, 8, 8, 3) and want.std() > 0.05
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    # 2 rows padded over the 8 devices of the default mesh, against one device; seeds instead of latents.
    one = DiTPipeline(pipe.components, pipe.scheduler, config=pipe.config,
                      mesh=parallel.make_mesh({"data": 1}, devices=jax.devices()[:1]))
    assert len(pipe.mesh.devices.flat) == 8
    np.testing.assert_allclose(one(seed=[3, 4], **kw).images, pipe(seed=[3, 4], **kw).images, atol=1e-5)
    with pytest.raises(ValueError, match="class_labels must be ids in 0..999"):
        pipe(class_labels=[1000])


def test_ddpm_and_ddim_pipelines_match_diffusers(tmp_path):
    x = np.random.default_rng(1).standard_normal((2, 8, 8, 3)).astype(np.float32)
    ddpm = build_unconditional_pipeline(tmp_path / "ddpm", "DDPMPipeline")
    pipe = diffax.pipelines.load(ddpm, cache_dir=tmp_path / "cache")
    assert isinstance(pipe, DDPMPipeline) and type(pipe.scheduler).__name__ == "DDPMScheduler"
    stochastic = pipe(batch_size=2, num_inference_steps=3, seed=[4, 5]).images  # DDPM draws noise every step
    assert stochastic.shape == (2, 8, 8, 3) and 0 <= stochastic.min() and stochastic.max() <= 1
    pipe.set_scheduler("ddim")  # deterministic, so diffusers' images can be compared
    got = pipe(batch_size=2, num_inference_steps=3, latents=x).images
    want = diffusers_images(ddpm, scheduler=diffusers.DDIMScheduler, noise=x, batch_size=2, num_inference_steps=3)
    assert want.std() > 0.05
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    ddim = build_unconditional_pipeline(tmp_path / "ddim", "DDIMPipeline")
    pipe = diffax.pipelines.load(ddim, cache_dir=tmp_path / "cache")
    assert isinstance(pipe, DDIMPipeline)
    np.testing.assert_allclose(pipe(batch_size=2, num_inference_steps=3, latents=x).images,
                               diffusers_images(ddim, noise=x, batch_size=2, num_inference_steps=3), rtol=0, atol=ATOL)


def test_scheduler_swaps_keep_the_folders_schedule(sd_folder, tmp_path):
    pipe = diffax.pipelines.load(sd_folder, cache_dir=tmp_path)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.scheduler.steps_offset == 1
    pipe._programs["x"] = None  # stands for a compiled program
    sched = pipe.set_scheduler("dpm++2m_karras", solver_order=3)
    assert pipe.scheduler is sched and not pipe._programs
    assert (type(sched).__name__, sched.use_karras_sigmas, sched.solver_order) == ("DPMSolverMultistepScheduler",
                                                                                  True, 3)
    assert (sched.beta_schedule, sched.beta_start, sched.steps_offset) == ("scaled_linear", 0.00085, 1)
    pipe.scheduler = "EulerDiscreteScheduler"
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler" and pipe.scheduler.beta_end == 0.012
    pipe.scheduler = {"_class_name": "DDPMScheduler", "num_train_timesteps": 500}
    assert pipe.scheduler.num_train_timesteps == 500
    with pytest.raises(ValueError, match="unknown sampler 'nope'"):
        pipe.set_scheduler("nope")
