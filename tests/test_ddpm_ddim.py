"""DDPM and DDIM against diffusers' DDPMScheduler / DDIMScheduler: same config, same inputs, same noise.

Tolerances: fp32 trajectories within 1e-4 relative (max-abs-diff / max-abs-value): diffusers builds its
alpha_bar table by a float32 cumprod, diffax in float64, which alone moves x_0 predictions by ~1e-6
relative per step, and the fake model amplifies nothing. In float64 both sides are given the same float64
tables, so only the order of operations differs: 1e-10.
"""
from __future__ import annotations

import functools
import importlib

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from diffax.schedulers import DDIMScheduler, DDPMScheduler
from tests.sampler_harness import denoise_jax, denoise_torch, run_diffax, run_diffusers, step_noises

SHAPE = (2, 4, 4, 3)  # NHWC
FP32_TOL = 1e-4
FP64_TOL = 1e-10


def key(seed: int) -> jax.Array:
    """PRNG keys for parity runs: 'rbg' compiles in a fraction of threefry's ~3 s per XLA:CPU program, and
    the noise is handed to diffusers either way (test_sampling.py keeps the default threefry)."""
    return jax.random.key(seed, impl="rbg")


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def make_pair(cls_name: str, **cfg):
    """(diffax scheduler, diffusers scheduler) from one config; DDIM's eta / use_clipped_model_output are
    diffax fields and diffusers step arguments, so they are bound to the diffusers step here."""
    step_kw = {k: cfg.pop(k) for k in ("eta", "use_clipped_model_output") if k in cfg}
    ours = {"DDPMScheduler": DDPMScheduler, "DDIMScheduler": DDIMScheduler}[cls_name](**cfg, **step_kw)
    theirs = getattr(diffusers, cls_name)(**cfg)
    if step_kw:
        theirs.step = functools.partial(theirs.step, **step_kw)
    return ours, theirs


def to_float64(theirs, ours) -> None:
    """Give the diffusers scheduler diffax's float64 tables (diffusers keeps float32 tables even for
    float64 samples), so the x64 comparison tests the step arithmetic alone."""
    betas = torch.from_numpy(ours.noise_schedule.betas())
    theirs.betas = betas
    theirs.alphas = 1.0 - betas
    theirs.alphas_cumprod = torch.cumprod(theirs.alphas, dim=0)
    theirs.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(theirs, "final_alpha_cumprod"):
        theirs.final_alpha_cumprod = (torch.tensor(1.0, dtype=torch.float64) if ours.set_alpha_to_one
                                      else theirs.alphas_cumprod[0])


def x_T(seed: int = 0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(dtype)


# A model predicting the variance too: 2C channels, the extra C on the last axis in diffax and on axis 1 in
# diffusers. "learned" reads them as a variance (positive), "learned_range" as a value in [-1, 1].
def variance_jax(x, t, variance_type):
    v = jnp.tanh(x + jnp.asarray(t, x.dtype) / 1000.0)
    return 0.9 * v if variance_type == "learned_range" else 1e-3 * (1.5 + v)


def variance_torch(x, t, variance_type):
    v = torch.tanh(x + torch.as_tensor(t, dtype=x.dtype) / 1000.0)
    return 0.9 * v if variance_type == "learned_range" else 1e-3 * (1.5 + v)


def stepwise(ours, theirs, n, k, monkeypatch, *, dtype=np.float32, learned=False):
    """Both samplers one step at a time from the same x_T, each on its own trajectory; returns the worst
    relative error of prev_sample and of pred_original_sample over all steps. diffusers runs NCHW, so this
    also checks that the learned-variance split is on diffax's last axis and diffusers' channel axis."""
    module = importlib.import_module(type(theirs).__module__)
    noise = {"z": None}
    monkeypatch.setattr(module, "randn_tensor", lambda shape, *a, **kw: noise["z"])
    tdtype = torch.float64 if dtype == np.float64 else torch.float32
    state = ours.init(n)
    theirs.set_timesteps(n)
    np.testing.assert_array_equal(np.asarray(state.timesteps), theirs.timesteps.numpy())
    xj = jnp.asarray(x_T(1, dtype))
    xt = torch.from_numpy(x_T(1, dtype).transpose(0, 3, 1, 2))
    worst_prev = worst_x0 = 0.0
    for i, t in enumerate(theirs.timesteps):
        ki = jax.random.fold_in(k, i)
        noise["z"] = torch.from_numpy(np.asarray(jax.random.normal(ki, SHAPE, xj.dtype)).transpose(0, 3, 1, 2))
        out_j = denoise_jax(xj, state.timesteps[i])
        out_t = denoise_torch(xt, t)
        if learned:
            out_j = jnp.concatenate([out_j, variance_jax(xj, state.timesteps[i], ours.variance_type)], -1)
            out_t = torch.cat([out_t, variance_torch(xt, t, ours.variance_type)], 1)
        # Eager: op-by-op dispatch reuses compiled primitives across tests, a jit per config would not.
        res_j = ours.step(state, out_j, xj, i, ki)
        res_t = theirs.step(out_t.to(tdtype), t, xt)
        prev_t = res_t.prev_sample.numpy().transpose(0, 2, 3, 1)
        x0_t = res_t.pred_original_sample.numpy().transpose(0, 2, 3, 1)
        worst_prev = max(worst_prev, rel_err(res_j.prev_sample, prev_t))
        worst_x0 = max(worst_x0, rel_err(res_j.pred_original_sample, x0_t))
        xj, xt = res_j.prev_sample, res_t.prev_sample
    assert np.isfinite(np.asarray(xj)).all()
    return worst_prev, worst_x0


# ------------------------------------------------------------------------------------------------ DDPM

DDPM_CONFIGS = [
    dict(),  # diffusers' defaults: linear, fixed_small, epsilon, clip_sample, leading
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, variance_type="fixed_small_log",
         prediction_type="v_prediction", clip_sample=False, timestep_spacing="trailing",
         rescale_betas_zero_snr=True),
    dict(beta_schedule="squaredcos_cap_v2", variance_type="fixed_large", prediction_type="sample",
         clip_sample_range=0.8, timestep_spacing="linspace"),
    dict(beta_schedule="sigmoid", thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5,
         steps_offset=1),
    dict(num_train_timesteps=100, trained_betas=np.linspace(1e-3, 0.05, 100).tolist(), clip_sample=False),
]


@pytest.mark.parametrize("cfg", DDPM_CONFIGS, ids=["default", "v_zero_snr_trailing", "sample_cos_linspace",
                                                   "sigmoid_threshold_offset", "trained_betas"])
def test_ddpm_full_loop_matches_diffusers(cfg, monkeypatch):
    ours, theirs = make_pair("DDPMScheduler", **cfg)
    n, k = 10, key(3)
    got = run_diffax(ours, x_T(), n, k)
    want = run_diffusers(theirs, x_T(), n, step_noises(k, SHAPE, n), monkeypatch)
    assert rel_err(got, want) < FP32_TOL


@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
def test_ddpm_learned_variance_stepwise(variance_type, monkeypatch):
    ours, theirs = make_pair("DDPMScheduler", variance_type=variance_type, timestep_spacing="trailing")
    prev_err, x0_err = stepwise(ours, theirs, 8, key(5), monkeypatch, learned=True)
    assert prev_err < FP32_TOL and x0_err < FP32_TOL


def test_ddpm_stepwise_float64(monkeypatch):
    ours, theirs = make_pair("DDPMScheduler", **DDPM_CONFIGS[1])
    to_float64(theirs, ours)
    with jax.enable_x64(True):
        prev_err, x0_err = stepwise(ours, theirs, 12, key(6), monkeypatch, dtype=np.float64)
    assert prev_err < FP64_TOL and x0_err < FP64_TOL


def test_ddpm_fixed_large_log_is_fixed_large(monkeypatch):
    """diffusers' fixed_large_log adds sqrt(log beta) * z, NaN since log beta < 0; diffax uses the intended
    std exp(0.5 log beta) = sqrt(beta), so it matches diffusers' fixed_large step for step."""
    ours, _ = make_pair("DDPMScheduler", variance_type="fixed_large_log")
    _, theirs = make_pair("DDPMScheduler", variance_type="fixed_large")
    prev_err, x0_err = stepwise(ours, theirs, 6, key(4), monkeypatch)
    assert prev_err < FP32_TOL and x0_err < FP32_TOL
    _, broken = make_pair("DDPMScheduler", variance_type="fixed_large_log")
    assert np.isnan(run_diffusers(broken, x_T(), 6, step_noises(key(4), SHAPE, 6), monkeypatch)).any()


def test_ddpm_noise_only_above_t0():
    """With 'leading' spacing the last timestep is 0, where diffusers adds no noise: that step is the
    posterior mean whatever the key."""
    sched = DDPMScheduler()
    state = sched.init(5)
    assert int(state.timesteps[-1]) == 0
    x = jnp.asarray(x_T())
    out = denoise_jax(x, 0)
    a = sched.step(state, out, x, 4, key(0)).prev_sample
    b = sched.step(state, out, x, 4, key(1)).prev_sample
    np.testing.assert_array_equal(a, b)
    c = sched.step(state, out, x, 3, key(0)).prev_sample
    d = sched.step(state, out, x, 3, key(1)).prev_sample
    assert np.abs(np.asarray(c) - np.asarray(d)).max() > 1e-3


# ------------------------------------------------------------------------------------------------ DDIM

DDIM_CONFIGS = [
    dict(eta=0.0, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False,
         steps_offset=1),
    dict(eta=0.5, prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True,
         clip_sample=False),
    dict(eta=1.0, prediction_type="sample", timestep_spacing="linspace", thresholding=True,
         dynamic_thresholding_ratio=0.9, sample_max_value=1.2),
    dict(eta=0.5, beta_schedule="squaredcos_cap_v2", use_clipped_model_output=True, clip_sample_range=0.5),
    dict(eta=1.0, clip_sample=False),
]


@pytest.mark.parametrize("cfg", DDIM_CONFIGS, ids=["eta0_sd_offset", "eta.5_v_zero_snr_trailing",
                                                   "eta1_sample_linspace_threshold", "eta.5_clipped_output",
                                                   "eta1_eps"])
def test_ddim_full_loop_matches_diffusers(cfg, monkeypatch):
    ours, theirs = make_pair("DDIMScheduler", **cfg)
    n, k = 10, key(7)
    got = run_diffax(ours, x_T(), n, k)
    want = run_diffusers(theirs, x_T(), n, step_noises(k, SHAPE, n), monkeypatch)
    assert rel_err(got, want) < FP32_TOL


def test_ddim_stepwise(monkeypatch):
    ours, theirs = make_pair("DDIMScheduler", **DDIM_CONFIGS[3])
    prev_err, x0_err = stepwise(ours, theirs, 10, key(8), monkeypatch)
    assert prev_err < FP32_TOL and x0_err < FP32_TOL


def test_ddim_stepwise_float64(monkeypatch):
    ours, theirs = make_pair("DDIMScheduler", **DDIM_CONFIGS[1])
    to_float64(theirs, ours)
    with jax.enable_x64(True):
        prev_err, x0_err = stepwise(ours, theirs, 12, key(9), monkeypatch, dtype=np.float64)
    assert prev_err < FP64_TOL and x0_err < FP64_TOL


def test_ddim_eta_adds_noise():
    """eta > 0 draws noise from the key (the old Flax DDIM in diffusers ignored eta); eta = 0 never reads it."""
    x = jnp.asarray(x_T())
    out = denoise_jax(x, 500)
    for eta, differs in ((0.0, False), (0.5, True)):
        sched = DDIMScheduler(eta=eta)
        state = sched.init(10)
        a = sched.step(state, out, x, 3, key(0)).prev_sample
        b = sched.step(state, out, x, 3, key(1)).prev_sample
        assert (np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-2) == differs, eta


# ---------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("cls,kwargs,match", [
    (DDPMScheduler, dict(variance_type="learned_log"), "variance_type"),
    (DDPMScheduler, dict(prediction_type="flow_prediction"), "prediction_type"),
    (DDPMScheduler, dict(beta_schedule="cosine"), "beta_schedule"),
    (DDIMScheduler, dict(timestep_spacing="karras"), "timestep_spacing"),
    (DDIMScheduler, dict(eta=1.5), "eta"),
    (DDIMScheduler, dict(dynamic_thresholding_ratio=0.0), "dynamic_thresholding_ratio"),
])
def test_bad_options_raise(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_bad_runtime_inputs_raise():
    with pytest.raises(ValueError, match="steps_offset"):
        DDIMScheduler(steps_offset=1).init(1000)  # leading spacing + offset reaches t = 1000
    sched = DDPMScheduler(variance_type="learned_range")
    state = sched.init(4)
    x = jnp.zeros(SHAPE)
    with pytest.raises(ValueError, match="2 \\* 3 channels"):
        sched.step(state, x, x, 0, key(0))
    with pytest.raises(ValueError, match="PRNG key"):
        DDPMScheduler().step(DDPMScheduler().init(4), x, x, 0)
