"""Score-SDE samplers (Song et al. 2021): VE predictor-corrector and VP reverse SDE against diffusers, and the
VP probability-flow ODE / predictor-corrector samplers on Gaussian data, where the exact score is known.

Tolerances: trajectories against diffusers within 1e-4 relative in fp32 (diffusers builds its sigma and
time tables with float32 torch ops; measured ~1e-6) and 1e-5 in float64. Gaussian tests: data N(0, s^2 I)
has the VP marginal N(0, v(t) I), v(t) = alpha(t)^2 s^2 + 1 - alpha(t)^2, so the exact noise prediction is
eps = std(t) x / v(t) (score -x / v(t)); for VE the marginal is N(0, s^2 + sigma^2) and the score
-x / (s^2 + sigma^2). The PF-ODE with an exact score maps x_1 to x_1 sqrt(v(eps) / v(1)); the Euler
discretisation with 100 steps is within 1e-3 of that factor (measured 6e-5 to 1.4e-3 for N = 50..200, so
1% leaves room). The SDE samplers are checked statistically: 16384 samples estimate a variance within
~1.1% (one standard error); the measured bias at 100-200 steps is below 3%; the bound is 7%.
"""
from __future__ import annotations

import importlib

import diffusers
from diffusers.schedulers.deprecated.scheduling_sde_vp import ScoreSdeVpScheduler as ScoreSdeVpTorch
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from diffax.sampling import sample
from diffax.schedulers.score_sde import (ScoreSdeVeScheduler, ScoreSdeVpPredictorCorrectorScheduler,
                                         ScoreSdeVpProbabilityFlowScheduler, ScoreSdeVpScheduler)
from tests.sampler_harness import denoise_torch, run_diffax, step_noises

SHAPE = (2, 4, 4, 3)
FP32_TOL = 1e-4
FP64_TOL = 1e-5


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def x_T(seed: int, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(dtype)


def score_jax(x: jax.Array, sigma: jax.Array) -> jax.Array:
    """A fake VE score model: near the score of N(0, I) data, with a smooth x- and sigma-dependent part. It
    sees x / sqrt(1 + sigma^2), so it stays well conditioned at sigma ~ 1e3 (the harness's
    sin(3x) is not: float32 rounding of |x| ~ 1e5 would change it completely)."""
    sigma = jnp.asarray(sigma, x.dtype)
    scale = jnp.sqrt(1 + sigma ** 2)
    return (-x / scale + 0.3 * jnp.tanh(x / scale) * jnp.cos(jnp.log(sigma))) / scale


def score_torch(x: torch.Tensor, sigma) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=x.dtype)
    scale = torch.sqrt(1 + sigma ** 2)
    return (-x / scale + 0.3 * torch.tanh(x / scale) * torch.cos(torch.log(sigma))) / scale


def patch_noise(theirs, noises, monkeypatch, dtype):
    """randn_tensor in the scheduler's module returns noises[pos['i']]."""
    module = importlib.import_module(type(theirs).__module__)
    queue = [torch.from_numpy(np.asarray(n)).to(dtype) for n in noises]
    pos = {"i": 0}
    monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: queue[pos["i"]])
    return pos


def run_diffusers_ve(theirs, x, steps, noises, monkeypatch, dtype=torch.float32):
    """diffusers' ScoreSdeVePipeline loop (model called with sigma), returning the final mean."""
    pos = patch_noise(theirs, noises, monkeypatch, dtype)
    theirs.set_timesteps(steps)
    theirs.set_sigmas(steps)
    x = torch.from_numpy(x).to(dtype) * theirs.init_noise_sigma
    entry = 0
    for i, t in enumerate(theirs.timesteps):
        sigma = theirs.sigmas[i]
        for _ in range(theirs.config.correct_steps):
            pos["i"] = entry
            x = theirs.step_correct(score_torch(x, sigma), x).prev_sample
            entry += 1
        pos["i"] = entry
        out = theirs.step_pred(score_torch(x, sigma), t, x)
        x, mean = out.prev_sample, out.prev_sample_mean
        entry += 1
    return mean.numpy()


@pytest.mark.parametrize("cfg,steps", [
    ({}, 8),
    (dict(correct_steps=2, snr=0.2, sigma_max=50.0, sigma_min=0.05, sampling_eps=1e-3), 6),
    (dict(correct_steps=0), 10),
], ids=["default", "two-correctors", "predictor-only"])
def test_ve_matches_diffusers_pipeline(cfg, steps, monkeypatch):
    ours, theirs = ScoreSdeVeScheduler(**cfg), diffusers.ScoreSdeVeScheduler(**cfg)
    key = jax.random.key(0)
    state = ours.init(steps)
    assert ours.order == ours.correct_steps + 1 and len(state.timesteps) == steps * ours.order
    mine = np.asarray(jax.jit(lambda x, k: sample(ours, score_jax, x, num_inference_steps=steps, key=k))(
        jnp.asarray(x_T(0)), key))
    err = rel_err(mine, run_diffusers_ve(theirs, x_T(0), steps, step_noises(key, SHAPE, len(state.timesteps)),
                                         monkeypatch))
    assert err < FP32_TOL, err


def test_ve_float64(monkeypatch):
    ours, theirs = ScoreSdeVeScheduler(sigma_max=100.0), diffusers.ScoreSdeVeScheduler(sigma_max=100.0)
    key = jax.random.key(1)
    with jax.enable_x64(True):
        mine = np.asarray(jax.jit(lambda x, k: sample(ours, score_jax, x, num_inference_steps=6, key=k))(
            jnp.asarray(x_T(1, np.float64)), key))
        noises = step_noises(key, SHAPE, 12, jnp.float64)
    assert mine.dtype == np.float64
    err = rel_err(mine, run_diffusers_ve(theirs, x_T(1, np.float64), 6, noises, monkeypatch, torch.float64))
    assert err < FP64_TOL, err


def run_diffusers_vp(theirs, x, steps, noises, monkeypatch, dtype=torch.float32):
    """Euler-Maruyama with diffusers' ScoreSdeVpScheduler.step_pred (model output = eps), final mean."""
    pos = patch_noise(theirs, noises, monkeypatch, dtype)
    theirs.set_timesteps(steps)
    x = torch.from_numpy(x).to(dtype)
    for i, t in enumerate(theirs.timesteps):
        pos["i"] = i
        x, mean = theirs.step_pred(denoise_torch(x, t.to(dtype)), x, t.to(dtype))
    return mean.numpy()


@pytest.mark.parametrize("cfg", [{}, dict(beta_min=0.2, beta_max=10.0, sampling_eps=1e-2)], ids=["default", "cfg"])
def test_vp_matches_diffusers(cfg, monkeypatch):
    ours, theirs = ScoreSdeVpScheduler(**cfg), ScoreSdeVpTorch(**cfg)
    key = jax.random.key(2)
    err = rel_err(run_diffax(ours, x_T(2), 10, key),
                  run_diffusers_vp(theirs, x_T(2), 10, step_noises(key, SHAPE, 10), monkeypatch))
    assert err < FP32_TOL, err


def test_vp_float64(monkeypatch):
    ours, theirs = ScoreSdeVpScheduler(), ScoreSdeVpTorch()
    key = jax.random.key(3)
    with jax.enable_x64(True):
        mine = run_diffax(ours, x_T(3, np.float64), 10, key)
        noises = step_noises(key, SHAPE, 10, jnp.float64)
    err = rel_err(mine, run_diffusers_vp(theirs, x_T(3, np.float64), 10, noises, monkeypatch, torch.float64))
    assert mine.dtype == np.float64 and err < FP64_TOL, err


# ---- Gaussian data: exact scores ----

GAUSS_SHAPE = (4096, 2, 2, 1)  # 16384 scalar samples


def vp_variance(sched: ScoreSdeVpScheduler, t, data_var: float):
    alpha_sq = 1 - sched.std(t) ** 2
    return alpha_sq * data_var + 1 - alpha_sq


def vp_exact_eps(sched: ScoreSdeVpScheduler, data_var: float):
    """eps(x, t) = std(t) x / v(t): the noise prediction of N(0, data_var I) data."""
    return lambda x, t: sched.std(t) * x / vp_variance(sched, t, data_var)


@pytest.mark.parametrize("data_var", [1.0, 0.25])
def test_vp_probability_flow_maps_gaussians(data_var):
    """x ~ N(0, 1) at t = 1 goes to N(0, v(eps)) at t = sampling_eps: for N(0, I) data the ODE's drift
    vanishes (identity map), for N(0, 0.25 I) every sample is scaled by sqrt(v(eps) / v(1)) ~ 0.5."""
    sched = ScoreSdeVpProbabilityFlowScheduler()
    x = jax.random.normal(jax.random.key(4), GAUSS_SHAPE)
    out = jax.jit(lambda x: sample(sched, vp_exact_eps(sched, data_var), x, num_inference_steps=100))(x)
    gain = np.asarray(out / x)
    exact = float(np.sqrt(vp_variance(sched, sched.sampling_eps, data_var) / vp_variance(sched, 1.0, data_var)))
    assert np.ptp(gain) < 1e-4  # deterministic and linear: one gain for every sample
    if data_var == 1.0:
        np.testing.assert_allclose(np.asarray(out), np.asarray(x), rtol=1e-5, atol=1e-6)
    assert abs(gain.mean() / exact - 1) < 1e-2, (gain.mean(), exact)
    assert abs(float(jnp.var(out)) / data_var - 1) < 0.07


@pytest.mark.parametrize("sched,steps", [
    (ScoreSdeVpScheduler(), 100),
    (ScoreSdeVpPredictorCorrectorScheduler(), 100),
    (ScoreSdeVeScheduler(sigma_max=50.0, snr=0.16), 200),
], ids=["vp-sde", "vp-pc", "ve-pc"])
def test_sde_samplers_reach_data_variance(sched, steps):
    data_var = 0.25
    if isinstance(sched, ScoreSdeVeScheduler):
        model = lambda x, sigma: -x / (data_var + sigma ** 2)  # the VE model outputs the score
    else:
        model = vp_exact_eps(sched, data_var)
    x = jax.random.normal(jax.random.key(5), GAUSS_SHAPE)
    out = jax.jit(lambda x, k: sample(sched, model, x, num_inference_steps=steps, key=k))(x, jax.random.key(6))
    assert abs(float(jnp.mean(out))) < 0.03
    assert abs(float(jnp.var(out)) / data_var - 1) < 0.07, float(jnp.var(out))


def test_pc_layout_and_errors():
    pc = ScoreSdeVpPredictorCorrectorScheduler(correct_steps=2)
    state = pc.init(3)
    assert pc.order == 3 and list(state.corrector) == [True, True, False] * 3
    assert list(state.last) == [False] * 8 + [True]
    np.testing.assert_allclose(state.timesteps, np.repeat(np.linspace(1, 1e-3, 3), 3))
    with pytest.raises(ValueError, match="correct_steps"):
        ScoreSdeVeScheduler(correct_steps=-1)
    with pytest.raises(ValueError, match="PRNG key"):
        ScoreSdeVpScheduler().step(state, jnp.zeros(2), jnp.zeros(2), jnp.int32(0), None)
    # The VE scheduler's denoise_fn receives sigma (not t): the first loop entry is sigma_max.
    assert ScoreSdeVeScheduler().init(4).timesteps[0] == pytest.approx(1348.0)
