"""LCM and PNDM against diffusers: whole trajectories with the same deterministic denoiser and, for LCM,
the same injected noise; their timestep tables for many more configs.

Tolerances: fp32 trajectories within 1e-4 relative (max-abs-diff / max-abs-value; measured <= ~1e-6: the
only difference is our float64 alpha_bar table against diffusers' float32 one); under jax x64 within 1e-5.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import LCMScheduler as TorchLCM
from diffusers import PNDMScheduler as TorchPNDM

from diffax.schedulers.lcm import LCMScheduler
from diffax.schedulers.pndm import PNDMScheduler
from sampler_harness import run_diffax, run_diffusers, step_noises

SHAPE = (2, 4, 4, 3)
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def parity(ours, theirs, n: int, monkeypatch, x64: bool = False) -> float:
    """Relative max error of the final sample; also checks the timestep table exactly."""
    dtype = jnp.float64 if x64 else jnp.float32
    key = jax.random.key(0)
    x = np.asarray(jax.random.normal(jax.random.key(1), SHAPE, dtype))
    state = ours.init(n, jax.ShapeDtypeStruct(SHAPE, dtype))
    noises = step_noises(key, SHAPE, len(state.timesteps), dtype) if isinstance(ours, LCMScheduler) else []
    a = run_diffax(ours, x, n, key)
    b = run_diffusers(theirs, x, n, noises, monkeypatch, dtype=torch.float64 if x64 else torch.float32)
    np.testing.assert_array_equal(np.asarray(state.timesteps), theirs.timesteps.numpy())
    assert a.dtype == x.dtype and np.isfinite(a).all()
    return float(np.abs(a - b).max() / np.abs(b).max())


def case_id(c):
    return str(c) if isinstance(c, int) else ",".join(f"{k}={v}" for k, v in c.items() if k not in SD) or "default"


LCM_CASES = [
    (dict(), 4),  # noise injected after every step but the last
    (dict(original_inference_steps=30, timestep_scaling=5.0, prediction_type="v_prediction",
          beta_schedule="linear", beta_start=1e-4, beta_end=0.02), 6),
    (dict(clip_sample=True, clip_sample_range=0.5, prediction_type="sample"), 1),
    (dict(thresholding=True, sample_max_value=2.0, rescale_betas_zero_snr=True, prediction_type="v_prediction",
          set_alpha_to_one=False), 8),
]


@pytest.mark.parametrize("config,n", LCM_CASES, ids=case_id)
def test_lcm_matches_diffusers(config, n, monkeypatch):
    err = parity(LCMScheduler(**config), TorchLCM(**config), n, monkeypatch)
    assert err < 1e-4, err


def test_lcm_noise_comes_from_the_key():
    """Each step but the last re-noises with the key's draw; the last returns the denoised sample."""
    sched = LCMScheduler()
    x = jnp.ones(SHAPE)
    state = sched.init(4, x)
    out = jnp.zeros(SHAPE)
    a, b = (sched.step(state, out, x, 1, jax.random.key(k)).prev_sample for k in (0, 1))
    assert float(jnp.abs(a - b).max()) > 0.1
    a, b = (sched.step(state, out, x, 3, jax.random.key(k)) for k in (0, 1))
    np.testing.assert_array_equal(a.prev_sample, b.prev_sample)
    np.testing.assert_array_equal(a.prev_sample, a.pred_original_sample)


PNDM_CASES = [
    (dict(), 10),  # PRK warm-up (12 evaluations) then PLMS
    (dict(skip_prk_steps=True), 10),
    (dict(skip_prk_steps=True, set_alpha_to_one=True, timestep_spacing="trailing"), 12),
    (dict(steps_offset=1, prediction_type="v_prediction", set_alpha_to_one=True, **SD), 15),
    (dict(skip_prk_steps=True, timestep_spacing="linspace", prediction_type="v_prediction"), 3),
]


@pytest.mark.parametrize("config,n", PNDM_CASES, ids=case_id)
def test_pndm_matches_diffusers(config, n, monkeypatch):
    err = parity(PNDMScheduler(**config), TorchPNDM(**config), n, monkeypatch)
    assert err < 1e-4, err


def test_float64_trajectories(monkeypatch):
    with jax.enable_x64(True):
        config = dict(original_inference_steps=30, prediction_type="v_prediction")
        err = parity(LCMScheduler(**config), TorchLCM(**config), 6, monkeypatch, x64=True)
        assert err < 1e-5, err
        err = parity(PNDMScheduler(steps_offset=1), TorchPNDM(steps_offset=1), 10, monkeypatch, x64=True)
        assert err < 1e-5, err
    assert jnp.zeros(1).dtype == jnp.float32  # x64 does not leak into the other tests


def test_lcm_timesteps():
    """timestep_spacing and steps_offset are LCM config keys that diffusers never reads; neither do we."""
    for config in (dict(), dict(original_inference_steps=30), dict(timestep_spacing="trailing", steps_offset=1),
                   dict(num_train_timesteps=500, original_inference_steps=17)):
        for n in (1, 2, 4, 8, 13, 17):
            theirs = TorchLCM(**config)
            theirs.set_timesteps(n)
            np.testing.assert_array_equal(np.asarray(LCMScheduler(**config).init(n).timesteps),
                                          theirs.timesteps.numpy())


def test_pndm_timesteps():
    like = jax.ShapeDtypeStruct(SHAPE, jnp.float32)
    for skip in (False, True):
        for spacing in ("leading", "linspace", "trailing"):
            for offset in (0, 1):
                for n in ((1, 2, 3) if skip else ()) + (4, 5, 10, 17, 50):
                    config = dict(skip_prk_steps=skip, timestep_spacing=spacing, steps_offset=offset)
                    theirs = TorchPNDM(**config)
                    theirs.set_timesteps(n)
                    if not skip and theirs.timesteps.max() >= 1000:
                        with pytest.raises(ValueError, match="skip_prk_steps"):
                            PNDMScheduler(**config).init(n, like)
                        continue
                    np.testing.assert_array_equal(np.asarray(PNDMScheduler(**config).init(n, like).timesteps),
                                                  theirs.timesteps.numpy())


def test_order_matches_diffusers():
    for ours, theirs in [(LCMScheduler, TorchLCM), (PNDMScheduler, TorchPNDM)]:
        assert ours.order == theirs.order and ours.diffusers_class == theirs.__name__


@pytest.mark.parametrize("cls,config,match", [
    (LCMScheduler, dict(prediction_type="flow_prediction"), "prediction_type"),
    (PNDMScheduler, dict(prediction_type="sample"), "prediction_type"),
    (PNDMScheduler, dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr"),
])
def test_unsupported_options_raise(cls, config, match):
    with pytest.raises(ValueError, match=match):
        cls(**config)


def test_lcm_step_count_limits():
    with pytest.raises(ValueError, match="original_inference_steps"):
        LCMScheduler().init(51)


@pytest.mark.parametrize("ours,theirs", [(LCMScheduler, TorchLCM), (PNDMScheduler, TorchPNDM)])
def test_add_noise_matches_diffusers(ours, theirs):
    """img2img's starting point alpha_t x_0 + sigma_t eps at loop index i."""
    x0, noise = (np.asarray(jax.random.normal(jax.random.key(k), SHAPE)) for k in (2, 3))
    torch_sched = theirs(**SD)
    torch_sched.set_timesteps(10)
    state = ours(**SD).init(10, x0)
    for i in (0, 4, 9):
        expected = torch_sched.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch_sched.timesteps[i:i + 1])
        got = np.asarray(ours(**SD).add_noise(state, jnp.asarray(x0), jnp.asarray(noise), i))
        # float64 vs float32 tables: ~1e-6 of the O(1) inputs (elementwise relative error is larger where
        # the two terms cancel).
        assert np.abs(got - expected.numpy()).max() < 1e-5
