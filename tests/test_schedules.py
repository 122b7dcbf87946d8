"""diffax.schedules against the tables of diffusers' DDPM / DDIM / Euler schedulers.

diffax builds its tables in float64, diffusers in float32, so betas agree to float32 rounding (rtol 1e-6)
and alpha_bar, a cumprod of up to 1000 float32 factors, to rtol 1e-5. Integer timesteps must agree exactly.
"""
from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as torch_rescale_zero_snr
from diffusers.training_utils import compute_snr

from diffax import schedules

SCHEDULES = [
    dict(beta_schedule="linear"),
    dict(beta_schedule="linear", beta_start=0.001, beta_end=0.03, num_train_timesteps=200),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="squaredcos_cap_v2", num_train_timesteps=50),
    dict(beta_schedule="sigmoid", beta_start=0.0001, beta_end=0.03),
]


def ids(cfg: dict) -> str:
    return "-".join(str(v) for v in cfg.values())


@pytest.mark.parametrize("cfg", SCHEDULES, ids=ids)
def test_betas_and_alphas_cumprod_match_diffusers(cfg):
    theirs = diffusers.DDPMScheduler(**cfg)
    ns = schedules.NoiseSchedule(**cfg)
    np.testing.assert_allclose(ns.betas(), theirs.betas.numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ns.alphas_cumprod(), theirs.alphas_cumprod.numpy(), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("cfg", SCHEDULES, ids=ids)
def test_rescale_zero_terminal_snr(cfg):
    ns = schedules.NoiseSchedule(**cfg, rescale_betas_zero_snr=True)
    abar = ns.alphas_cumprod()
    # diffusers' Algorithm 1 on the same float64 betas: only the order of operations may differ.
    raw = schedules.make_betas(cfg["beta_schedule"], cfg.get("num_train_timesteps", 1000),
                               cfg.get("beta_start", 1e-4), cfg.get("beta_end", 0.02))
    np.testing.assert_allclose(ns.betas(), torch_rescale_zero_snr(torch.from_numpy(raw)).numpy(),
                               rtol=1e-12, atol=1e-15)
    # And the whole float32 diffusers pipeline (betas -> rescale -> cumprod).
    theirs = diffusers.DDPMScheduler(**cfg, rescale_betas_zero_snr=True)
    np.testing.assert_allclose(abar, theirs.alphas_cumprod.numpy(), rtol=1e-5, atol=1e-7)
    # The point of the rescale: SNR 0 at the last step, the first step's alpha_bar kept.
    assert abar[-1] == 0.0
    np.testing.assert_allclose(abar[0], np.cumprod(1 - raw)[0], rtol=1e-12)
    assert np.all(np.diff(abar) < 0)


def test_trained_betas_win():
    betas = np.linspace(1e-3, 0.05, 100)
    ns = schedules.NoiseSchedule(num_train_timesteps=100, beta_schedule="scaled_linear",
                                 trained_betas=tuple(betas))
    np.testing.assert_array_equal(ns.betas(), betas)


SPACINGS = [(spacing, offset) for spacing in schedules.TIMESTEP_SPACINGS for offset in (0, 1)]
STEPS = [(1000, 1), (1000, 7), (1000, 10), (1000, 50), (1000, 999), (100, 30), (50, 50)]


@pytest.mark.parametrize("spacing,offset", SPACINGS)
def test_integer_spacing_matches_ddim_and_ddpm(spacing, offset):
    for T, N in STEPS:
        ours = schedules.spaced_timesteps(N, T, spacing, offset)
        for cls in (diffusers.DDIMScheduler, diffusers.DDPMScheduler):
            theirs = cls(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
            theirs.set_timesteps(N)
            np.testing.assert_array_equal(ours, theirs.timesteps.numpy(), err_msg=f"{cls.__name__} T={T} N={N}")
        assert ours.dtype == np.int64 and len(ours) == N


@pytest.mark.parametrize("spacing,offset", SPACINGS)
def test_float_spacing_matches_euler(spacing, offset):
    for T, N in STEPS:
        ours = schedules.spaced_timesteps_float(N, T, spacing, offset)
        theirs = diffusers.EulerDiscreteScheduler(num_train_timesteps=T, timestep_spacing=spacing,
                                                  steps_offset=offset)
        theirs.set_timesteps(N)
        # Euler stores float32 timesteps; linspace is not rounded there.
        np.testing.assert_allclose(ours, theirs.timesteps.numpy(), rtol=1e-6, err_msg=f"T={T} N={N}")


def test_sigma_tables_match_euler():
    cfg = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    theirs = diffusers.EulerDiscreteScheduler(**cfg)
    abar = schedules.NoiseSchedule(**cfg).alphas_cumprod()
    sigmas = schedules.sigmas_from_alphas_cumprod(abar)
    # Euler's initial table: the training sigmas, descending, then 0. rtol 1e-4: at t = 0 diffusers' float32
    # 1 - abar (abar = 1 - 0.00085) keeps only ~4 significant digits (6e-8 / 8.5e-4 = 7e-5 relative).
    np.testing.assert_allclose(sigmas[::-1], theirs.sigmas.numpy()[:-1], rtol=1e-4)

    log_sigmas = np.log(sigmas)
    probe = np.array([sigmas[0], 0.5, 1.0, 3.3, 9.0, sigmas[-1]])
    np.testing.assert_allclose(schedules.sigma_to_t(probe, log_sigmas),
                               theirs._sigma_to_t(probe, log_sigmas), rtol=1e-12, atol=1e-9)

    in_sigmas = torch.from_numpy(sigmas[::-1].copy())
    np.testing.assert_allclose(schedules.karras_sigmas(sigmas[0], sigmas[-1], 12),
                               theirs._convert_to_karras(in_sigmas, 12), rtol=1e-12)
    np.testing.assert_allclose(schedules.exponential_sigmas(sigmas[0], sigmas[-1], 12),
                               theirs._convert_to_exponential(in_sigmas, 12), rtol=1e-12)


def test_snr_matches_diffusers_compute_snr():
    theirs = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    abar = schedules.NoiseSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod()
    t = torch.tensor([0, 1, 250, 500, 999])
    # rtol 1e-4: diffusers' float32 1 - abar at t = 0 (see test_sigma_tables_match_euler).
    np.testing.assert_allclose(schedules.snr(abar)[t.numpy()], compute_snr(theirs, t).numpy(), rtol=1e-4)


@pytest.mark.parametrize("call,match", [
    (lambda: schedules.make_betas("cosine"), "beta_schedule"),
    (lambda: schedules.spaced_timesteps(10, 1000, "karras"), "timestep_spacing"),
    (lambda: schedules.spaced_timesteps_float(10, 1000, "karras"), "timestep_spacing"),
    (lambda: schedules.spaced_timesteps(1001, 1000), "num_inference_steps"),
    (lambda: schedules.spaced_timesteps_float(0, 1000), "num_inference_steps"),
])
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()
