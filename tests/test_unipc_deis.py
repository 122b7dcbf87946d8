"""UniPC and DEIS against diffusers: whole trajectories with the same deterministic denoiser, plus the
timestep / sigma tables for more configs.

Tolerances: fp32 trajectories within 1e-4 relative (max-abs-diff / max-abs-value; measured <= 9e-6, from
our float64 tables against diffusers' float32 ones); under jax x64 within 1e-5 (measured <= 5e-6, from DEIS,
whose Lagrange coefficients are differences of nearly equal terms that diffusers computes from float32
tables even for float64 samples). Sigma tables: see SIGMA_RTOL.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DEISMultistepScheduler as TorchDEIS
from diffusers import UniPCMultistepScheduler as TorchUniPC

from diffax.schedulers.deis import DEISMultistepScheduler
from diffax.schedulers.unipc import UniPCMultistepScheduler
from sampler_harness import run_diffax, run_diffusers

SHAPE = (2, 4, 4, 3)
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
# diffusers' alpha_bar is a float32 cumprod: near t = 0, where 1 - alpha_bar ~ beta_0, its sigmas are off by
# up to ~5e-5 relative (~2e-6 absolute). Timesteps must match exactly.
SIGMA_RTOL, SIGMA_ATOL = 1e-4, 1e-5


def parity(ours, theirs, n: int, monkeypatch, x64: bool = False) -> float:
    """Relative max error of the final sample; also checks the timestep and sigma tables."""
    dtype = jnp.float64 if x64 else jnp.float32
    x = np.asarray(jax.random.normal(jax.random.key(1), SHAPE, dtype))
    state = ours.init(n, jax.ShapeDtypeStruct(SHAPE, dtype))
    a = run_diffax(ours, x, n, jax.random.key(0))
    b = run_diffusers(theirs, x, n, [], monkeypatch, dtype=torch.float64 if x64 else torch.float32)
    np.testing.assert_array_equal(np.asarray(state.timesteps), theirs.timesteps.numpy())
    np.testing.assert_allclose(np.asarray(state.sigmas), theirs.sigmas.numpy(), rtol=SIGMA_RTOL, atol=SIGMA_ATOL)
    assert a.dtype == x.dtype and np.isfinite(a).all()
    return float(np.abs(a - b).max() / np.abs(b).max())


def case_id(c):
    return str(c) if isinstance(c, int) else ",".join(f"{k}={v}" for k, v in c.items() if k not in SD) or "default"


UNIPC_CASES = [
    (dict(), 10),  # order 2, bh2, data prediction, corrector everywhere
    (dict(solver_order=3, prediction_type="v_prediction", timestep_spacing="leading", steps_offset=1, **SD), 20),
    (dict(solver_order=3, solver_type="bh1", predict_x0=False, final_sigmas_type="sigma_min",
          disable_corrector=(0, 3), lower_order_final=False), 12),
    (dict(solver_order=3, use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0, final_sigmas_type="sigma_min",
          **SD), 12),
    (dict(timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction",
          thresholding=True, sample_max_value=2.0), 10),
    (dict(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"), 10),
    (dict(solver_order=1, prediction_type="sample", use_exponential_sigmas=True), 8),
]


@pytest.mark.parametrize("config,n", UNIPC_CASES, ids=case_id)
def test_unipc_matches_diffusers(config, n, monkeypatch):
    theirs = TorchUniPC(**{**config, "disable_corrector": list(config.get("disable_corrector", []))})
    err = parity(UniPCMultistepScheduler(**config), theirs, n, monkeypatch)
    assert err < 1e-4, err


def test_unipc_bh1_last_step_to_zero(monkeypatch):
    """bh1 with final sigma 0: diffusers' first-order predictor adds B(h) * 0 with B(h) = -inf on the last step
    and returns NaN; ours returns x_0, the first-order step's exact limit. Compared against diffusers with just
    that step replaced by x_0."""
    config = dict(solver_order=3, solver_type="bh1", **SD)
    theirs = TorchUniPC(**config)
    predictor = theirs.multistep_uni_p_bh_update

    def fixed_predictor(model_output, *args, sample=None, order=None, **kwargs):
        if order == 1 and float(theirs.sigmas[theirs.step_index + 1]) == 0.0:
            return theirs.model_outputs[-1]
        return predictor(model_output, *args, sample=sample, order=order, **kwargs)

    monkeypatch.setattr(theirs, "multistep_uni_p_bh_update", fixed_predictor)
    err = parity(UniPCMultistepScheduler(**config), theirs, 12, monkeypatch)
    assert err < 1e-4, err


DEIS_CASES = [
    (dict(), 10),
    (dict(solver_order=3, prediction_type="v_prediction", timestep_spacing="leading", steps_offset=1, **SD), 20),
    (dict(solver_order=3, use_karras_sigmas=True, lower_order_final=False, thresholding=True,
          sample_max_value=2.0), 12),
    (dict(solver_order=1, use_exponential_sigmas=True, timestep_spacing="trailing", prediction_type="sample"), 8),
]


@pytest.mark.parametrize("config,n", DEIS_CASES, ids=case_id)
def test_deis_matches_diffusers(config, n, monkeypatch):
    err = parity(DEISMultistepScheduler(**config), TorchDEIS(**config), n, monkeypatch)
    assert err < 1e-4, err


def test_float64_trajectories(monkeypatch):
    config = dict(solver_order=3, prediction_type="v_prediction", **SD)
    with jax.enable_x64(True):
        err = parity(UniPCMultistepScheduler(**config), TorchUniPC(**config), 20, monkeypatch, x64=True)
        assert err < 1e-5, err
        err = parity(DEISMultistepScheduler(**config), TorchDEIS(**config), 20, monkeypatch, x64=True)
        assert err < 1e-5, err
    assert jnp.zeros(1).dtype == jnp.float32  # x64 does not leak into the other tests


@pytest.mark.parametrize("cls,torch_cls,config", [
    (UniPCMultistepScheduler, TorchUniPC, dict(use_karras_sigmas=True, use_flow_sigmas=True)),
    (UniPCMultistepScheduler, TorchUniPC, dict(use_flow_sigmas=True, flow_shift=5.0, shift_terminal=0.1,
                                               final_sigmas_type="sigma_min")),
    (UniPCMultistepScheduler, TorchUniPC, dict(use_exponential_sigmas=True, sigma_min=0.05, sigma_max=20.0)),
    (UniPCMultistepScheduler, TorchUniPC, dict(rescale_betas_zero_snr=True, timestep_spacing="trailing")),
    (DEISMultistepScheduler, TorchDEIS, dict(use_karras_sigmas=True, **SD)),
    (DEISMultistepScheduler, TorchDEIS, dict(timestep_spacing="leading", steps_offset=1)),
])
def test_tables(cls, torch_cls, config):
    for n in (2, 7, 25):
        theirs = torch_cls(**config)
        theirs.set_timesteps(n)
        state = cls(**config).init(n, jax.ShapeDtypeStruct(SHAPE, jnp.float32))
        np.testing.assert_array_equal(np.asarray(state.timesteps), theirs.timesteps.numpy())
        np.testing.assert_allclose(np.asarray(state.sigmas), theirs.sigmas.numpy(), rtol=SIGMA_RTOL, atol=SIGMA_ATOL)


def test_order_and_solver_name_mapping_match_diffusers():
    for ours, theirs in [(UniPCMultistepScheduler, TorchUniPC), (DEISMultistepScheduler, TorchDEIS)]:
        assert ours.order == theirs.order
        assert ours.diffusers_class == theirs.__name__
        # Configs of sibling schedulers map onto this one's solver, as in diffusers.
        for solver_type in ("midpoint", "heun"):
            assert ours(solver_type=solver_type).solver_type == theirs(solver_type=solver_type).config.solver_type
    assert DEISMultistepScheduler(algorithm_type="dpmsolver++").algorithm_type == "deis"
    assert UniPCMultistepScheduler(disable_corrector=[1, 2]).disable_corrector == (1, 2)  # hashable


@pytest.mark.parametrize("cls,config,match", [
    (UniPCMultistepScheduler, dict(solver_p=TorchDEIS()), "solver_p"),
    (UniPCMultistepScheduler, dict(use_beta_sigmas=True), "use_beta_sigmas"),
    (UniPCMultistepScheduler, dict(use_dynamic_shifting=True), "use_dynamic_shifting"),
    (UniPCMultistepScheduler, dict(predict_x0=False, thresholding=True), "predict_x0"),
    (UniPCMultistepScheduler, dict(predict_x0=False), "final_sigmas_type='sigma_min'"),
    (UniPCMultistepScheduler, dict(shift_terminal=0.1), "shift_terminal"),
    (UniPCMultistepScheduler, dict(solver_type="bh3"), "solver_type"),
    (DEISMultistepScheduler, dict(use_flow_sigmas=True), "use_flow_sigmas"),
    (DEISMultistepScheduler, dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr"),
    (DEISMultistepScheduler, dict(solver_order=4), "solver_order"),
    (DEISMultistepScheduler, dict(use_karras_sigmas=True, use_exponential_sigmas=True), "only one"),
])
def test_unsupported_options_raise(cls, config, match):
    with pytest.raises(ValueError, match=match):
        cls(**config)


@pytest.mark.parametrize("ours,theirs", [(UniPCMultistepScheduler, TorchUniPC), (DEISMultistepScheduler, TorchDEIS)])
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
