"""EDM-style samplers, k-diffusion's DPM++ SDE samplers and flow matching.

* EDMEulerScheduler, EDMDPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler: full trajectories
  against diffusers with the same config, inputs and injected noise.
* DPMPP2MSDEScheduler / DPMPP3MSDEScheduler / DPMPP2SAncestralScheduler (k-diffusion only): against NumPy
  float64 references written here from k-diffusion's `sample_dpmpp_2m_sde`, `sample_dpmpp_3m_sde` and
  `sample_dpmpp_2s_ancestral` (Gaussian noise in place of the Brownian tree), and, where the formulations
  coincide, against diffusers: eta = 0 DPM++ 2M SDE is DPM-Solver++(2M) (DPMSolverMultistepScheduler,
  'dpmsolver++', Karras sigmas), eta = 1 is 'sde-dpmsolver++', 3M SDE with eta = 0 is the third-order
  'dpmsolver++' with solver_type 'heun' (k-diffusion's second step is the heun form).

Tolerances: fp32 within 1e-4 relative, as in test_euler_family.py (diffusers' float32 tables; measured
1e-7..8e-6). float64 within 1e-5: against diffusers handed diffax's float64 tables (measured 5e-16, or ~1e-7
where diffusers' step casts the sample to float32: EDM Euler, flow matching), and within 1e-9 against the
float64 NumPy references (only the order of operations differs; measured 7e-16).
"""
from __future__ import annotations

import functools
import importlib
import math

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import torch

from diffax import schedules
from diffax.sampling import sample
from diffax.schedulers.edm import EDMDPMSolverMultistepScheduler, EDMEulerScheduler
from diffax.schedulers.flow_match import FlowMatchEulerDiscreteScheduler, calculate_shift
from diffax.schedulers.k_diffusion import DPMPP2MSDEScheduler, DPMPP2SAncestralScheduler, DPMPP3MSDEScheduler
from diffax.schedulers.sigma_common import dpmpp_update
from tests.sampler_harness import denoise_jax, denoise_torch, run_diffax, run_diffusers, step_noises
from tests.test_euler_family import SHAPE, WithSample, give_float64_tables, rel_err, x_T

FP32_TOL = 1e-4
FP64_TOL = 1e-5
REF_FP64_TOL = 1e-9


def run_ours(scheduler, x, steps, key, dtype=jnp.float32):
    return run_diffax(WithSample(scheduler, SHAPE, dtype), x, steps, key)


def num_entries(scheduler, steps) -> int:
    return len(WithSample(scheduler).init(steps).timesteps)


# ---- diffusers' EDM schedulers ----

@pytest.mark.parametrize("cfg,step_kw", [
    ({}, {}),
    (dict(sigma_schedule="exponential", prediction_type="v_prediction", final_sigmas_type="sigma_min",
          sigma_data=1.0, rho=5.0), {}),
    ({}, dict(s_churn=2.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.01)),
])
def test_edm_euler_matches_diffusers(cfg, step_kw, monkeypatch):
    ours = EDMEulerScheduler(**cfg, **step_kw)
    theirs = diffusers.EDMEulerScheduler(**cfg)
    theirs.step = functools.partial(theirs.step, **step_kw)
    key = jax.random.key(1)
    err = rel_err(run_ours(ours, x_T(1), 10, key), run_diffusers(theirs, x_T(1), 10, step_noises(key, SHAPE, 10),
                                                                  monkeypatch))
    assert err < FP32_TOL, err


@pytest.mark.parametrize("cfg,steps", [
    ({}, 10),
    (dict(algorithm_type="sde-dpmsolver++", solver_type="heun", final_sigmas_type="sigma_min"), 10),
    (dict(solver_order=3, prediction_type="v_prediction", sigma_schedule="exponential"), 16),
    (dict(solver_order=3, lower_order_final=True, euler_at_final=True, thresholding=True,
          sample_max_value=1.5, dynamic_thresholding_ratio=0.9), 8),
    (dict(solver_order=1, algorithm_type="sde-dpmsolver++"), 6),
])
def test_edm_dpmsolver_matches_diffusers(cfg, steps, monkeypatch):
    ours = EDMDPMSolverMultistepScheduler(**cfg)
    theirs = diffusers.EDMDPMSolverMultistepScheduler(**cfg)
    key = jax.random.key(2)
    err = rel_err(run_ours(ours, x_T(2), steps, key),
                  run_diffusers(theirs, x_T(2), steps, step_noises(key, SHAPE, steps), monkeypatch))
    assert err < FP32_TOL, err


@pytest.mark.parametrize("ours,theirs", [
    (EDMEulerScheduler(s_churn=1.0), diffusers.EDMEulerScheduler()),
    (EDMDPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"),
     diffusers.EDMDPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")),
], ids=["euler", "dpmsolver"])
def test_edm_float64(ours, theirs, monkeypatch):
    if getattr(ours, "s_churn", 0):
        theirs.step = functools.partial(theirs.step, s_churn=ours.s_churn)
    give_float64_tables(theirs, ours, 8)
    key = jax.random.key(3)
    with jax.enable_x64(True):
        mine = run_ours(ours, x_T(3, np.float64), 8, key, jnp.float64)
        noises = step_noises(key, SHAPE, 8, jnp.float64)
    assert mine.dtype == np.float64
    err = rel_err(mine, run_diffusers(theirs, x_T(3, np.float64), 8, noises, monkeypatch, dtype=torch.float64))
    assert err < FP64_TOL, err


# ---- k-diffusion DPM++ samplers: NumPy references ----

def denoise_np(x, t):
    """NumPy twin of sampler_harness.denoise_jax."""
    t = t / 1000.0
    return 0.8 * np.tanh(x) * np.cos(t) + 0.1 * np.sin(3.0 * x + t)


def edm_denoiser(sigma_data=0.5, prediction_type="epsilon"):
    """D(x, sigma) with EDM preconditioning around the fake model."""
    def D(x, sigma):
        c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
        c_out = sigma * sigma_data / math.sqrt(sigma ** 2 + sigma_data ** 2)
        c_out = -c_out if prediction_type == "v_prediction" else c_out
        F = denoise_np(x / math.sqrt(sigma ** 2 + sigma_data ** 2), 0.25 * math.log(sigma))
        return c_skip * x + c_out * F
    return D


def discrete_eps_denoiser(alphas_cumprod):
    """D(x, sigma) = x - sigma eps(x / sqrt(sigma^2 + 1), t(sigma)) for an alpha_bar-trained epsilon model."""
    log_sigmas = np.log(schedules.sigmas_from_alphas_cumprod(alphas_cumprod))

    def D(x, sigma):
        t = float(schedules.sigma_to_t(np.array([sigma]), log_sigmas)[0])
        return x - sigma * denoise_np(x / math.sqrt(sigma ** 2 + 1), t)
    return D


def karras(n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """Karras et al. eq. 5 with a final 0, as k-diffusion's get_sigmas_karras."""
    ramp = np.linspace(0, 1, n)
    return np.append((sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho, 0.0)


def ref_dpmpp_2m_sde(D, x, sigmas, noises, eta, s_noise, solver_type):
    """DPM-Solver++(2M) SDE (k-diffusion): noises[i] is the noise of step i."""
    prev_denoised, prev_h = None, None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = D(x, s)
        h = None
        if s_next == 0:
            x = denoised
        else:
            h = math.log(s / s_next)          # lambda_next - lambda, lambda = -log sigma
            phi_1 = -math.expm1(-h * (1 + eta))
            x = (s_next / s) * math.exp(-eta * h) * x + phi_1 * denoised
            if prev_denoised is not None:
                diff = (denoised - prev_denoised) * h / prev_h
                if solver_type == "heun":
                    x = x + (1 - phi_1 / (h * (1 + eta))) * diff
                else:
                    x = x + 0.5 * phi_1 * diff
            if eta:
                x = x + noises[i] * s_next * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise
        prev_denoised, prev_h = denoised, h
    return x


def ref_dpmpp_3m_sde(D, x, sigmas, noises, eta, s_noise):
    """DPM-Solver++(3M) SDE (k-diffusion)."""
    d_1 = d_2 = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = D(x, s)
        h = None
        if s_next == 0:
            x = denoised
        else:
            h = math.log(s / s_next)
            he = h * (eta + 1)
            x = math.exp(-he) * x - math.expm1(-he) * denoised
            phi_2 = math.expm1(-he) / he + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                a = (denoised - d_1) / r0
                b = (d_1 - d_2) / r1
                x = x + phi_2 * (a + (a - b) * r0 / (r0 + r1)) - (phi_2 / he - 0.5) * (a - b) / (r0 + r1)
            elif h_1 is not None:
                x = x + phi_2 * (denoised - d_1) * h / h_1
            if eta:
                x = x + noises[i] * s_next * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise
        d_1, d_2, h_1, h_2 = denoised, d_1, h, h_1
    return x


def ref_dpmpp_2s_ancestral(D, x, sigmas, noises, eta, s_noise):
    """DPM-Solver++(2S) ancestral (k-diffusion); noises are indexed by model evaluation, and a step's noise
    is the one drawn at its last evaluation."""
    entry = 0
    for i in range(len(sigmas) - 1):
        s, s_to = sigmas[i], sigmas[i + 1]
        up = min(s_to, eta * math.sqrt(s_to ** 2 * (s ** 2 - s_to ** 2) / s ** 2)) if eta else 0.0
        down = math.sqrt(s_to ** 2 - up ** 2)
        denoised = D(x, s)
        if down == 0:
            x = x + (x - denoised) / s * (down - s)
        else:
            h = math.log(s / down)
            mid = s * math.exp(-h / 2)
            x_mid = (mid / s) * x - math.expm1(-h / 2) * denoised
            entry += 1
            x = (down / s) * x - math.expm1(-h) * D(x_mid, mid)
        if s_to > 0:
            x = x + noises[entry] * s_noise * up
        entry += 1
    return x


REF_CASES = [
    ("2m", DPMPP2MSDEScheduler(model_type="edm", eta=0.7, s_noise=0.9), dict(eta=0.7, s_noise=0.9,
                                                                               solver_type="midpoint")),
    ("2m", DPMPP2MSDEScheduler(model_type="edm", eta=1.0, solver_type="heun", prediction_type="v_prediction",
                               sigma_data=1.0), dict(eta=1.0, s_noise=1.0, solver_type="heun")),
    ("3m", DPMPP3MSDEScheduler(model_type="edm", eta=1.0, sigma_min=0.01, sigma_max=50.0, rho=5.0),
     dict(eta=1.0, s_noise=1.0)),
    ("3m", DPMPP3MSDEScheduler(model_type="edm", eta=0.0, sigma_schedule="exponential"), dict(eta=0.0,
                                                                                             s_noise=1.0)),
    ("2s", DPMPP2SAncestralScheduler(model_type="edm"), dict(eta=1.0, s_noise=1.0)),
    ("2s", DPMPP2SAncestralScheduler(model_type="edm", eta=0.5, s_noise=1.1), dict(eta=0.5, s_noise=1.1)),
    ("2s", DPMPP2SAncestralScheduler(sigma_schedule="discrete", timestep_spacing="trailing"),
     dict(eta=1.0, s_noise=1.0)),
]
REFS = {"2m": ref_dpmpp_2m_sde, "3m": ref_dpmpp_3m_sde, "2s": ref_dpmpp_2s_ancestral}


def reference(kind, ours, kw, x, steps, key, dtype):
    state = WithSample(ours).init(steps)
    sigmas = np.asarray(state.sigmas, np.float64)
    if ours.model_type == "edm":
        lo, hi = ours.sigma_min or 0.002, ours.sigma_max or 80.0
        want = karras(steps, lo, hi, ours.rho) if ours.sigma_schedule == "karras" else np.append(
            np.exp(np.linspace(math.log(hi), math.log(lo), steps)), 0.0)
        np.testing.assert_allclose(sigmas, want, rtol=1e-12)
        D = edm_denoiser(ours.sigma_data, ours.prediction_type)
    else:
        D = discrete_eps_denoiser(ours.alphas_cumprod())
    noises = [n.astype(np.float64) for n in step_noises(key, SHAPE, len(state.timesteps), dtype)]
    return REFS[kind](D, x.astype(np.float64) * sigmas[0], sigmas, noises, **kw)


@pytest.mark.parametrize("kind,ours,kw", REF_CASES, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(REF_CASES)])
def test_kdiffusion_matches_reference(kind, ours, kw):
    key = jax.random.key(4)
    err = rel_err(run_ours(ours, x_T(4), 8, key), reference(kind, ours, kw, x_T(4), 8, key, jnp.float32))
    assert err < FP32_TOL, err


@pytest.mark.parametrize("idx", [0, 2, 4])
def test_kdiffusion_matches_reference_float64(idx):
    kind, ours, kw = REF_CASES[idx]
    key = jax.random.key(5)
    with jax.enable_x64(True):
        mine = run_ours(ours, x_T(5, np.float64), 8, key, jnp.float64)
        want = reference(kind, ours, kw, x_T(5, np.float64), 8, key, jnp.float64)
    err = rel_err(mine, want)
    assert err < REF_FP64_TOL, err


SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@pytest.mark.parametrize("ours,theirs_cfg,steps", [
    (DPMPP2MSDEScheduler(eta=0.0, quantize_timesteps=True, **SD_BETAS),
     dict(algorithm_type="dpmsolver++", solver_order=2), 10),
    (DPMPP2MSDEScheduler(eta=0.0, quantize_timesteps=True, solver_type="heun", prediction_type="v_prediction"),
     dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="heun", prediction_type="v_prediction"), 10),
    (DPMPP2MSDEScheduler(eta=1.0, quantize_timesteps=True, **SD_BETAS),
     dict(algorithm_type="sde-dpmsolver++", solver_order=2), 10),
    (DPMPP3MSDEScheduler(eta=0.0, quantize_timesteps=True, **SD_BETAS),
     dict(algorithm_type="dpmsolver++", solver_order=3, solver_type="heun"), 16),
], ids=["2m", "2m-heun-v", "2m-sde", "3m"])
def test_kdiffusion_matches_diffusers_dpmsolver(ours, theirs_cfg, steps, monkeypatch):
    """Where the formulations coincide. diffusers' DPMSolverMultistepScheduler runs in the VP view
    (x_vp = x / sqrt(sigma^2 + 1), unit initial noise): the same trajectory, so the VE start is scaled."""
    cfg = {k: getattr(ours, k) for k in ("beta_schedule", "beta_start", "beta_end", "prediction_type")}
    theirs = diffusers.DPMSolverMultistepScheduler(use_karras_sigmas=True, **{**cfg, **theirs_cfg})
    key = jax.random.key(6)
    sigma_max = float(WithSample(ours).init(steps).sigmas[0])
    start = (x_T(6) * math.sqrt(sigma_max ** 2 + 1) / sigma_max).astype(np.float32)
    err = rel_err(run_ours(ours, start, steps, key),
                  run_diffusers(theirs, x_T(6), steps, step_noises(key, SHAPE, steps), monkeypatch))
    assert err < FP32_TOL, err


def test_kdiffusion_edm_model_matches_edm_dpmsolver(monkeypatch):
    """DPM++ 2M SDE (eta = 1) with model_type='edm' is diffusers' EDMDPMSolverMultistepScheduler
    ('sde-dpmsolver++'); diffusers starts at sqrt(sigma_max^2 + 1), k-diffusion at sigma_max."""
    ours = DPMPP2MSDEScheduler(model_type="edm", eta=1.0)
    theirs = diffusers.EDMDPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")
    key = jax.random.key(7)
    start = (x_T(7) * math.sqrt(80.0 ** 2 + 1) / 80.0).astype(np.float32)
    err = rel_err(run_ours(ours, start, 10, key),
                  run_diffusers(theirs, x_T(7), 10, step_noises(key, SHAPE, 10), monkeypatch))
    assert err < FP32_TOL, err


def test_kdiffusion_layouts():
    """2S a evaluates twice per step except the last (2N - 1 entries, order 2); the multistep SDEs once."""
    s = DPMPP2SAncestralScheduler(model_type="edm", eta=0.0)
    state = WithSample(s).init(5)
    assert s.order == 2 and list(state.stage) == [0, 1] * 4 + [2]
    # The second entry of a step evaluates at the log-midpoint of sigma and sigma_down (= sigma_next, eta 0).
    np.testing.assert_allclose(state.sigma_in[1], math.sqrt(state.sigmas[0] * state.sigmas[1]), rtol=1e-12)
    assert len(WithSample(DPMPP3MSDEScheduler()).init(5).timesteps) == 5
    with pytest.raises(ValueError, match="eta"):
        DPMPP2SAncestralScheduler(eta=1.5)
    with pytest.raises(ValueError, match="sigma_schedule"):
        DPMPP2MSDEScheduler(model_type="edm", sigma_schedule="discrete")
    with pytest.raises(ValueError, match="solver_order"):
        EDMDPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=3)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_third_order_fix_is_exact_for_quadratic_x0(eta):
    """In sigma space (alpha = 1, lambda = -log sigma) the step's mean is
    (sigma_next / sigma) e^{-eta h} x + (1 + eta) * integral of e^{(1 + eta)(lambda - lambda_next)} x_0(lambda):
    the third-order update with third_order_fix reproduces it for a quadratic x_0(lambda); the default
    (diffusers' and k-diffusion's -phi_3) does not."""
    lambdas = np.array([-1.3, -0.9, -0.55, -0.2])  # two previous steps, this step, the next one
    sigmas = np.exp(-lambdas)
    x0 = np.polynomial.Polynomial([0.7, -1.3, 2.1])
    x, h, (h2, h1) = 0.4, lambdas[3] - lambdas[2], np.diff(lambdas[:3])

    def integrand(lam):
        return (1 + eta) * np.exp((1 + eta) * (lam - lambdas[3])) * x0(lam)

    exact = (sigmas[3] / sigmas[2] * np.exp(-eta * h) * x
             + scipy.integrate.quad(integrand, lambdas[2], lambdas[3], epsabs=1e-14)[0])
    errors = []
    with jax.enable_x64(True):
        for fix in (True, False):
            ours = dpmpp_update(x, x0(lambdas[2]), x0(lambdas[1]), x0(lambdas[0]), sigmas[2], sigmas[3], h, h1, h2,
                                3, eta=eta, second_order="heun", noise=None, third_order_fix=fix)
            errors.append(abs(float(ours) - exact))
    assert errors[0] < 1e-12 and errors[1] > 1e-4, errors


# ---- flow matching ----

def run_diffusers_flow(theirs, x, steps, noises, monkeypatch, mu=None, dtype=torch.float32):
    """diffusers' flow pipelines: no input scaling, unit initial noise, set_timesteps(mu=...)."""
    module = importlib.import_module(type(theirs).__module__)
    queue = [torch.from_numpy(np.asarray(n)).to(dtype) for n in noises]
    pos = {"i": 0}
    monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: queue[pos["i"]])
    theirs.set_timesteps(steps, mu=mu)
    x = torch.from_numpy(x).to(dtype)
    for i, t in enumerate(theirs.timesteps):
        pos["i"] = i
        x = theirs.step(denoise_torch(x, t), t, x).prev_sample
    return x.numpy()


FLOW_CONFIGS = [
    {},
    dict(shift=3.0, use_karras_sigmas=True),
    dict(use_dynamic_shifting=True, mu=0.8, shift_terminal=0.1),
    dict(use_dynamic_shifting=True, mu=1.3, time_shift_type="linear", invert_sigmas=True),
    dict(shift=2.0, use_exponential_sigmas=True, stochastic_sampling=True),
]


@pytest.mark.parametrize("cfg", FLOW_CONFIGS, ids=range(len(FLOW_CONFIGS)))
def test_flow_match_matches_diffusers(cfg, monkeypatch):
    ours = FlowMatchEulerDiscreteScheduler(**cfg)
    theirs = diffusers.FlowMatchEulerDiscreteScheduler(**{k: v for k, v in cfg.items() if k != "mu"})
    key = jax.random.key(8)
    theirs.set_timesteps(9, mu=cfg.get("mu"))
    state = ours.init(9)
    np.testing.assert_allclose(state.timesteps, theirs.timesteps.numpy(), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(state.sigmas, theirs.sigmas.numpy(), rtol=1e-5, atol=1e-6)
    err = rel_err(run_diffax(ours, x_T(8), 9, key),
                  run_diffusers_flow(theirs, x_T(8), 9, step_noises(key, SHAPE, 9), monkeypatch, cfg.get("mu")))
    assert err < FP32_TOL, err


def test_flow_match_float64_and_img2img(monkeypatch):
    ours = FlowMatchEulerDiscreteScheduler(shift=3.0)
    theirs = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    key = jax.random.key(9)
    with jax.enable_x64(True):
        mine = run_diffax(ours, x_T(9, np.float64), 7, key)
    err = rel_err(mine, run_diffusers_flow(theirs, x_T(9, np.float64), 7, [], monkeypatch, dtype=torch.float64))
    assert mine.dtype == np.float64 and err < FP64_TOL, err
    # img2img: diffusers' scale_noise at a loop index's timestep.
    state, x0, noise = ours.init(7), x_T(10), x_T(11)
    want = theirs.scale_noise(torch.from_numpy(x0), theirs.timesteps[3:4], torch.from_numpy(noise)).numpy()
    assert rel_err(ours.add_noise(state, jnp.asarray(x0), jnp.asarray(noise), 3), want) < 1e-6


def test_flow_match_dynamic_shift_mu():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift as flux_shift
    assert calculate_shift(1024) == pytest.approx(flux_shift(1024), rel=1e-12)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).with_image_seq_len(1024)
    assert sched.mu == pytest.approx(flux_shift(1024, 256, 4096, 0.5, 1.15))
    with pytest.raises(ValueError, match="mu"):
        FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).init(4)
    with pytest.raises(ValueError, match="use_beta_sigmas"):
        FlowMatchEulerDiscreteScheduler(use_beta_sigmas=True)
    # The jitted loop runs the dynamic-shift schedule as one program.
    out = jax.jit(lambda x: sample(sched, denoise_jax, x, num_inference_steps=4))(jnp.asarray(x_T(12)))
    assert np.isfinite(np.asarray(out)).all()
