"""Few-step distillation (diffax.train.distill, diffax.studies.distill): the targets' algebra, the losses at
known optima, the consistency boundary condition against LCMScheduler, the LCM-LoRA file through the
pipelines, and the whole study at its --quick size."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.distill_digits import get_config
from diffax.models import build_model, init_params
from diffax.pipelines.base import default_mesh
from diffax.pipelines.class_conditional import DDPMPipeline
from diffax.pipelines.generation import GenerationPipeline
from diffax.schedulers.names import scheduler_for
from diffax.studies import distill as study
from diffax.train import distill, finetune

T = 1024
SCHEDULE = dict(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")


def _abar() -> np.ndarray:
    return scheduler_for("ddpm", SCHEDULE).alphas_cumprod()


@pytest.fixture(scope="module")
def tiny():
    """A tiny class-conditional digits U-Net (the --quick study's) and its random weights."""
    config = study.quick_config(get_config()).teacher
    model = build_model(config.model)
    return model, init_params(model.config, jax.random.key(0))


def _batch(n: int = 4) -> dict:
    x0 = jax.random.uniform(jax.random.key(1), (n, 16, 16, 1), minval=-1, maxval=1)
    return {"image": x0, "cond": {"class_labels": jnp.arange(n) % 10}}


def test_grid_needs_whole_spacing():
    assert distill.grid_spacing(1024, 64) == 16
    with pytest.raises(ValueError, match="multiple"):
        distill.grid_spacing(1000, 64)


def test_ddim_target_lands_on_the_teacher_result():
    """One DDIM step from x_t with the target x_0 reproduces x_s exactly, for noisy and clean ends."""
    k1, k2 = jax.random.split(jax.random.key(0))
    x_t, x_s = jax.random.normal(k1, (3, 4, 4, 1)), jax.random.normal(k2, (3, 4, 4, 1))
    abar = _abar()
    abar_t = jnp.asarray(abar[[1023, 511, 255]], jnp.float32)
    abar_s = jnp.asarray([abar[767], abar[255], 1.0], jnp.float32)  # the last one ends on clean data
    x0 = distill.ddim_target_x0(x_t, x_s, abar_t, abar_s)
    landed, _ = distill.ddim_step("sample", x0, x_t, abar_t, abar_s)
    np.testing.assert_allclose(landed, x_s, rtol=1e-4, atol=1e-4)


def test_progressive_loss_is_zero_where_one_step_equals_two(tiny):
    """A model predicting a constant x_0 (zeroed output layer, sample prediction) takes the same path in one
    DDIM step as in two, so a student equal to its teacher has zero loss; random weights do not."""
    model, params = tiny
    zeroed = jax.tree.map(jnp.zeros_like, params["conv_out"])
    constant = {**params, "conv_out": zeroed}
    loss = distill.progressive_loss(model, constant, _abar(), student_steps=4, prediction_type="sample",
                                    guidance_scale=3.0)
    value, metrics = loss(constant, _batch(), jax.random.key(2))
    assert float(value) < 1e-8 and metrics["loss"] == value
    random_loss = distill.progressive_loss(model, params, _abar(), student_steps=4, prediction_type="sample")
    assert float(random_loss(params, _batch(), jax.random.key(2))[0]) > 1e-3
    with pytest.raises(ValueError, match="v- or x0"):
        distill.progressive_loss(model, params, _abar(), student_steps=4, prediction_type="epsilon")


def test_consistency_boundary_matches_lcm_scheduler():
    """The f(x, t) the consistency loss trains is the `denoised` LCMScheduler's step returns."""
    scheduler = scheduler_for("lcm", SCHEDULE, original_inference_steps=64)
    state = scheduler.init(4)
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 1))
    out = jax.random.normal(jax.random.key(1), (2, 4, 4, 1))
    for i, t in enumerate(np.asarray(state.timesteps)):
        denoised = scheduler.step(state, out, x, i, jax.random.key(3)).pred_original_sample
        abar = jnp.asarray([_abar()[t]] * 2, jnp.float32)
        _, x0 = distill.ddim_step("v_prediction", out, x, abar, abar)
        c_skip, c_out = distill.consistency_coefficients(jnp.asarray(t))
        np.testing.assert_allclose(denoised, c_skip * x + c_out * x0, rtol=1e-5, atol=1e-6)
    c_skip, c_out = distill.consistency_coefficients(jnp.asarray(0))
    assert float(c_skip) == 1.0 and float(c_out) == 0.0


@pytest.mark.slow  # LCM-LoRA training steps (about 20 s): `make test-slow`; the LoRA file's loading is tested fast below
def test_consistency_loss_trains_only_through_the_lora(tiny):
    """The LCM-LoRA loss is finite, starts at the teacher (up factors zero) and has a gradient for the
    factors alone."""
    model, params = tiny
    lora = finetune.init_lora(params, finetune.lora_targets(params, get_config().lcm.targets), 2,
                              jax.random.key(0))
    view = lambda p: finetune.lora_view(params, p, None, scale=1.0)  # noqa: E731
    loss = distill.consistency_loss(model, params, _abar(), original_steps=8, guidance_scale=3.0,
                                    to_model_params=view)
    value, grads = jax.value_and_grad(lambda p: loss(p, _batch(), jax.random.key(1))[0])(lora)
    assert np.isfinite(float(value)) and float(value) > 0
    assert jax.tree.structure(grads) == jax.tree.structure(lora)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_lcm_lora_file_loads_in_the_pipelines(tiny, tmp_path):
    """The exported file, read by GenerationPipeline.with_lora and by a LoraMixin pipeline's
    load_lora_weights, gives the weights the training view merged."""
    model, params = tiny
    params = jax.device_get(params)  # host weights, as restore_for_sampling gives them
    lora = finetune.init_lora(params, finetune.lora_targets(params, get_config().lcm.targets), 2,
                              jax.random.key(0))
    lora = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(5), x.shape), lora)  # up nonzero
    path = finetune.export_lora(tmp_path / "lora.safetensors", lora, alpha=3.0)
    merged = finetune.lora_view(params, lora, None, scale=1.5)
    scheduler = scheduler_for("lcm", SCHEDULE, original_inference_steps=8)
    pipe = GenerationPipeline(model, scheduler, default_mesh())
    loaded = pipe.with_lora(params, path)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(merged)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    mixin = DDPMPipeline({"unet": (model, params)}, scheduler)
    mixin.load_lora_weights(path)
    for a, b in zip(jax.tree.leaves(mixin.params("unet")), jax.tree.leaves(merged)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(pipe(loaded, jax.random.key(0), labels=[3], num_inference_steps=2).shape[0]) == 1


@pytest.mark.slow  # the whole study (teacher, two progressive rounds, an LCM-LoRA): each piece is tested above
def test_quick_study(tmp_path):
    """The whole study at --quick size: every stage trains through the train loop and every point is
    measured with its cost."""
    config = get_config()
    config.workdir = str(tmp_path)
    config = study.quick_config(config)
    points = study.run_study(config)
    assert json.loads((tmp_path / "quick" / "distill_digits.json").read_text()) == points
    got = {(p["model"], p["sampler"]) for p in points}
    assert got == {("teacher", "ddim-2"), ("progressive", "progressive-4"),
                   ("progressive", "progressive-2"), ("lcm-lora", "lcm-2")}
    for p in points:
        assert p["evals"] == p["steps"] * (2 if p["model"] == "teacher" else 1)
        assert p["cost_flops"] == p["flops_per_eval"] * p["evals"] > 0
        assert 0.0 <= p["accuracy"] <= 1.0 and np.isfinite(p["fid"])
    assert (tmp_path / "quick" / "lcm_lora" / study.LORA_FILE).is_file()
    for n in (4, 2):
        assert (tmp_path / "quick" / "progressive" / str(n) / "checkpoints" / "2").is_dir()
