"""Euler, Euler a, Heun, DPM2, DPM2 a and LMS against diffusers: same config, same inputs, same noise.

Each test runs a whole trajectory through diffax's jitted `sampling.sample` and through diffusers' pipeline
loop (tests/sampler_harness.py) and compares the final samples.

Tolerances: fp32 within 1e-4 relative (max-abs-diff / max-abs-value). diffusers builds its sigma tables in
float32 (alpha_bar by a float32 cumprod), diffax in float64: the sigmas differ by ~1e-7 relative, and the
model timesteps derived from them by up to ~1e-2 (sigma_to_t of float32 sigmas), which moves the fake
model's output by ~1e-6; measured errors are 1e-7..1e-5 (2e-5 for LMS img2img). float64: within 1e-5,
with diffusers handed diffax's float64 tables (it keeps float32 tables even for float64 samples); what remains
is the order of operations, and for Euler and Euler a diffusers' cast of the sample to float32 in `step`
(~1e-7).
"""
from __future__ import annotations

import functools
import importlib

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import torch

from diffax.schedulers.euler import EulerDiscreteScheduler
from diffax.schedulers.euler_ancestral import EulerAncestralDiscreteScheduler
from diffax.schedulers.heun import HeunDiscreteScheduler
from diffax.schedulers.k_dpm2 import KDPM2DiscreteScheduler
from diffax.schedulers.k_dpm2_ancestral import KDPM2AncestralDiscreteScheduler
from diffax.schedulers.lms import LMSDiscreteScheduler, lms_coefficients
from diffax.sampling import sample
from tests.sampler_harness import denoise_jax, denoise_torch, run_diffax, run_diffusers, step_noises

SHAPE = (2, 4, 4, 3)  # NHWC
FP32_TOL = 1e-4
FP64_TOL = 1e-5
CLASSES = {c.__name__: c for c in (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, HeunDiscreteScheduler,
                                   KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler, LMSDiscreteScheduler)}
# diffax config fields that are `step` arguments in diffusers.
STEP_ARGS = {"s_churn": "s_churn", "s_tmin": "s_tmin", "s_tmax": "s_tmax", "s_noise": "s_noise",
             "lms_order": "order"}


class WithSample:
    """A scheduler whose `init` gets a ShapeDtypeStruct of the sample when called without one, so that the
    tests can build the states of samplers that keep history buffers from the step count alone."""

    def __init__(self, scheduler, shape=SHAPE, dtype=jnp.float32):
        self.scheduler, self.spec = scheduler, jax.ShapeDtypeStruct(shape, dtype)

    def init(self, num_inference_steps, sample=None):
        return self.scheduler.init(num_inference_steps, self.spec if sample is None else sample)

    def __getattr__(self, name):
        return getattr(self.scheduler, name)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def make_pair(cls_name: str, **cfg):
    """(diffax scheduler, diffusers scheduler) from one config; diffax-only step fields go to diffusers' step."""
    ours = CLASSES[cls_name](**cfg)
    step_kw = {STEP_ARGS[k]: cfg.pop(k) for k in list(cfg) if k in STEP_ARGS}
    theirs = getattr(diffusers, cls_name)(**cfg)
    if step_kw:
        theirs.step = functools.partial(theirs.step, **step_kw)
    return ours, theirs


# diffusers' table attribute -> the diffax state field with the same layout.
TABLES = {"sigmas": "sigmas", "sigmas_interpol": "sigmas_mid", "sigmas_up": "sigmas_up",
          "sigmas_down": "sigmas_down"}


def give_float64_tables(theirs, ours, steps: int) -> None:
    """diffusers keeps float32 tables even for float64 samples: after its set_timesteps, swap in diffax's
    float64 tables so that a float64 run compares the step arithmetic (and LMS's quadrature) alone."""
    state = WithSample(ours).init(steps)
    original = theirs.set_timesteps

    def set_timesteps(num_inference_steps, *args, **kwargs):
        original(num_inference_steps, *args, **kwargs)
        theirs.timesteps = torch.from_numpy(np.asarray(state.timesteps, np.float64))
        for name, field in TABLES.items():
            if hasattr(theirs, name) and hasattr(state, field):
                setattr(theirs, name, torch.from_numpy(np.asarray(getattr(state, field), np.float64)))

    theirs.set_timesteps = set_timesteps


def x_T(seed: int = 0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(dtype)


def compare(ours, theirs, steps: int, seed: int, monkeypatch, dtype=np.float32) -> float:
    """Relative error between the final samples of both loops."""
    key = jax.random.key(seed)
    jdtype = jnp.float64 if dtype == np.float64 else jnp.float32
    wrapped = WithSample(ours, SHAPE, jdtype)
    num_entries = len(wrapped.init(steps).timesteps)
    ours_x = run_diffax(wrapped, x_T(seed, dtype), steps, key)
    noises = step_noises(key, SHAPE, num_entries, jdtype)
    theirs_x = run_diffusers(theirs, x_T(seed, dtype), steps, noises, monkeypatch,
                             dtype=torch.float64 if dtype == np.float64 else torch.float32)
    assert ours_x.dtype == dtype and np.isfinite(ours_x).all()
    return rel_err(ours_x, theirs_x)


CONFIGS = [
    ("EulerDiscreteScheduler", {}),
    ("EulerDiscreteScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    use_karras_sigmas=True, prediction_type="v_prediction",
                                    final_sigmas_type="sigma_min")),
    ("EulerDiscreteScheduler", dict(timestep_spacing="leading", steps_offset=1, use_exponential_sigmas=True,
                                    sigma_min=0.05, sigma_max=20.0, prediction_type="sample")),
    ("EulerDiscreteScheduler", dict(timestep_spacing="trailing", rescale_betas_zero_snr=True,
                                    prediction_type="v_prediction", timestep_type="continuous")),
    ("EulerDiscreteScheduler", dict(beta_schedule="squaredcos_cap_v2", s_churn=1.0, s_tmin=0.5, s_tmax=20.0,
                                    s_noise=1.003)),
    ("EulerAncestralDiscreteScheduler", {}),
    ("EulerAncestralDiscreteScheduler", dict(beta_schedule="scaled_linear", timestep_spacing="leading",
                                             steps_offset=1)),
    ("EulerAncestralDiscreteScheduler", dict(timestep_spacing="trailing", rescale_betas_zero_snr=True,
                                             prediction_type="v_prediction")),
    ("HeunDiscreteScheduler", {}),
    ("HeunDiscreteScheduler", dict(use_karras_sigmas=True, prediction_type="v_prediction", clip_sample=True,
                                   clip_sample_range=0.5)),
    ("HeunDiscreteScheduler", dict(beta_schedule="exp", use_exponential_sigmas=True, prediction_type="sample",
                                   timestep_spacing="trailing")),
    ("HeunDiscreteScheduler", dict(timestep_spacing="leading", steps_offset=1, trained_betas=tuple(
        np.linspace(2e-4, 0.03, 1000).tolist()))),
    ("KDPM2DiscreteScheduler", {}),
    ("KDPM2DiscreteScheduler", dict(use_karras_sigmas=True, prediction_type="v_prediction")),
    ("KDPM2DiscreteScheduler", dict(use_exponential_sigmas=True, timestep_spacing="leading", steps_offset=1)),
    ("KDPM2AncestralDiscreteScheduler", {}),
    ("KDPM2AncestralDiscreteScheduler", dict(use_karras_sigmas=True, beta_schedule="scaled_linear",
                                             timestep_spacing="leading", steps_offset=1)),
    ("KDPM2AncestralDiscreteScheduler", dict(use_exponential_sigmas=True, prediction_type="v_prediction",
                                             timestep_spacing="trailing")),
    ("LMSDiscreteScheduler", {}),
    ("LMSDiscreteScheduler", dict(use_karras_sigmas=True, prediction_type="v_prediction",
                                  beta_schedule="scaled_linear")),
    ("LMSDiscreteScheduler", dict(use_exponential_sigmas=True, prediction_type="sample",
                                  timestep_spacing="leading", steps_offset=1)),
    ("LMSDiscreteScheduler", dict(lms_order=2, timestep_spacing="trailing")),
]


@pytest.mark.parametrize("cls_name,cfg", CONFIGS, ids=[f"{c[:-18]}-{i}" for i, (c, _) in enumerate(CONFIGS)])
def test_trajectory_matches_diffusers(cls_name, cfg, monkeypatch):
    ours, theirs = make_pair(cls_name, **cfg)
    err = compare(ours, theirs, 8, len(cfg), monkeypatch)
    assert err < FP32_TOL, err


@pytest.mark.parametrize("cls_name,cfg", [
    ("EulerDiscreteScheduler", dict(use_karras_sigmas=True, s_churn=0.5, s_tmax=10.0)),
    ("EulerAncestralDiscreteScheduler", {}),
    ("HeunDiscreteScheduler", dict(use_karras_sigmas=True)),
    ("KDPM2DiscreteScheduler", {}),
    ("KDPM2AncestralDiscreteScheduler", dict(prediction_type="v_prediction")),
    ("LMSDiscreteScheduler", dict(use_karras_sigmas=True)),
], ids=lambda v: v if isinstance(v, str) else "")
def test_trajectory_float64(cls_name, cfg, monkeypatch):
    ours, theirs = make_pair(cls_name, **cfg)
    give_float64_tables(theirs, ours, 6)
    with jax.enable_x64(True):
        err = compare(ours, theirs, 6, 3, monkeypatch, dtype=np.float64)
    assert err < FP64_TOL, err


@pytest.mark.parametrize("cls_name,cfg", [(c, cfg) for c, cfg in CONFIGS if "s_churn" not in cfg])
def test_tables_match_diffusers(cls_name, cfg):
    """Loop timesteps (one per model evaluation), sigmas and the initial noise scale, for 7 steps."""
    ours, theirs = make_pair(cls_name, **cfg)
    theirs.set_timesteps(7)
    state = WithSample(ours).init(7)
    np.testing.assert_allclose(state.timesteps, theirs.timesteps.numpy(), rtol=1e-5, atol=2e-2)
    assert len(state.timesteps) == 7 * ours.order - (ours.order - 1)
    # rtol: diffusers' float32 cumprod over 1000 betas leaves ~1e-5 relative error in sigma_max.
    np.testing.assert_allclose(float(ours.init_noise_sigma(state)), float(theirs.init_noise_sigma), rtol=1e-4)
    if ours.order == 1:  # the first-order samplers' sigma tables are diffusers' sigmas without the final one
        # rtol: diffusers' float32 1 - alpha_bar near 0 leaves ~1e-4 relative error in its smallest sigma.
        np.testing.assert_allclose(state.sigma_in, theirs.sigmas.numpy()[:-1], rtol=2e-4)


def test_lms_coefficients_match_quadrature():
    """The Gauss-Legendre LMS coefficients equal adaptive quadrature of the Lagrange basis (diffusers' way)."""
    sigmas = np.concatenate([LMSDiscreteScheduler(use_karras_sigmas=True).inference_sigmas(9, "karras")[0], [0.0]])
    coeffs = lms_coefficients(sigmas, 4)
    for k in range(9):
        m = min(k + 1, 4)
        for j in range(m):
            def basis(tau):
                return np.prod([(tau - sigmas[k - l]) / (sigmas[k - j] - sigmas[k - l]) for l in range(m) if l != j])
            want = scipy.integrate.quad(basis, sigmas[k], sigmas[k + 1], epsabs=0, epsrel=1e-13)[0]
            np.testing.assert_allclose(coeffs[k, j], want, rtol=1e-11, atol=1e-13)
        assert np.all(coeffs[k, m:] == 0)
    # Row sums integrate the constant 1: sigma_{k+1} - sigma_k.
    np.testing.assert_allclose(coeffs.sum(1), np.diff(sigmas), rtol=1e-12)


@pytest.mark.parametrize("cls_name,cfg", [
    ("HeunDiscreteScheduler", {}),
    ("KDPM2AncestralDiscreteScheduler", {}),
    ("LMSDiscreteScheduler", dict(use_karras_sigmas=True)),
], ids=lambda v: v if isinstance(v, str) else "")
def test_img2img_matches_diffusers(cls_name, cfg, monkeypatch):
    """strength < 1: the loop starts part-way (order-aware), the history starts empty, and x_0 is noised to
    the first remaining sigma, as diffusers' img2img pipelines do with set_begin_index."""
    steps, strength = 8, 0.6
    ours, theirs = make_pair(cls_name, **cfg)
    key = jax.random.key(4)
    init_image = 0.5 * x_T(5)
    wrapped = WithSample(ours)
    ours_x = np.asarray(jax.jit(lambda x0, n, k: sample(
        wrapped, denoise_jax, n, num_inference_steps=steps, key=k, init_sample=x0, strength=strength))(
        jnp.asarray(init_image), jnp.asarray(x_T(6)), key))

    module = importlib.import_module(type(theirs).__module__)
    entries = len(wrapped.init(steps).timesteps)
    queue = [torch.from_numpy(n) for n in step_noises(key, SHAPE, entries)]
    pos = {"i": 0}
    if hasattr(module, "randn_tensor"):
        monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: queue[pos["i"]])
    theirs.set_timesteps(steps)
    start = (steps - int(steps * strength)) * theirs.order
    theirs.set_begin_index(start)
    x = theirs.add_noise(torch.from_numpy(init_image), torch.from_numpy(x_T(6)), theirs.timesteps[start:start + 1])
    for i in range(start, len(theirs.timesteps)):
        pos["i"] = i
        t = theirs.timesteps[i]
        x = theirs.step(denoise_torch(theirs.scale_model_input(x, t), t), t, x).prev_sample
    err = rel_err(ours_x, x.numpy())
    assert err < FP32_TOL, err


def test_sample_prediction_where_diffusers_lacks_it():
    """Euler a / DPM2 / DPM2 a take prediction_type='sample' (diffusers raises); they share
    SigmaScheduler.denoised, so one check: a DPM2 model that predicts x_0 = x - sigma eps reproduces the
    epsilon trajectory."""
    eps_sched = WithSample(KDPM2DiscreteScheduler())
    x0_sched = WithSample(KDPM2DiscreteScheduler(prediction_type="sample"))
    state = eps_sched.init(6)
    sigma_in, ts = jnp.asarray(state.sigma_in), jnp.asarray(state.timesteps)

    def x0_model(x_in, t):
        sigma = sigma_in[jnp.argmin(jnp.abs(ts - t))]  # the loop's timesteps are distinct here
        x = x_in * jnp.sqrt(sigma ** 2 + 1)
        return x - sigma * denoise_jax(x_in, t)

    def run(sched, model):
        return jax.jit(lambda x: sample(sched, model, x, num_inference_steps=6))(jnp.asarray(x_T(1)))

    err = rel_err(run(x0_sched, x0_model), run(eps_sched, denoise_jax))
    assert err < 1e-5, err


def test_bad_options_raise():
    with pytest.raises(ValueError, match="use_beta_sigmas"):
        EulerDiscreteScheduler(use_beta_sigmas=True)
    with pytest.raises(ValueError, match="only one of"):
        HeunDiscreteScheduler(use_karras_sigmas=True, use_exponential_sigmas=True)
    with pytest.raises(ValueError, match="interpolation_type"):
        EulerDiscreteScheduler(interpolation_type="log_linear")
    with pytest.raises(ValueError, match="prediction_type"):
        LMSDiscreteScheduler(prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="timestep_spacing"):
        KDPM2DiscreteScheduler(timestep_spacing="uniform")
    with pytest.raises(ValueError, match="beta_schedule"):
        EulerAncestralDiscreteScheduler(beta_schedule="cosine")
    with pytest.raises(ValueError, match="init\\(num_inference_steps, sample\\)"):
        HeunDiscreteScheduler().init(5)
