"""DPM-Solver multistep and singlestep against diffusers: whole trajectories with the same deterministic
denoiser and the same injected noise, plus the timestep / sigma / order tables for many more configs.

Tolerances: fp32 trajectories within 1e-4 relative (max-abs-diff / max-abs-value). Our tables are float64,
diffusers' float32, so coefficients differ by ~1e-7; measured errors are 2e-7 to 3e-5, the largest where
diffusers' float32 sigma_min (1 - alpha_bar_0 = beta_0 is tiny) sets the exponential spacing, and for the
noise-prediction solver, whose first steps cancel terms of size alpha_t / alpha_s ~ 50. Under jax x64 within
1e-5 (measured ~3e-7; diffusers keeps float32 tables, and its multistep casts the sample to float32 every
step).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import torch
from diffusers import DPMSolverMultistepScheduler as TorchMultistep
from diffusers import DPMSolverSinglestepScheduler as TorchSinglestep

from diffax.schedulers import from_diffusers_config, to_diffusers_config
from diffax.schedulers import multistep_common as mc
from diffax.schedulers.dpm_solver_multistep import DPMSolverMultistepScheduler
from diffax.schedulers.dpm_solver_singlestep import DPMSolverSinglestepScheduler
from sampler_harness import run_diffax, run_diffusers, step_noises

SHAPE = (2, 4, 4, 3)
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
# diffusers builds alpha_bar in float32 (absolute error ~1e-7); near t = 0, 1 - alpha_bar is as small as beta_0
# (8.5e-4 for SD, 4e-5 for the cosine schedule), so its smallest sigmas are off by up to ~3e-4 relative,
# ~2e-6 absolute. Timesteps must match exactly.
SIGMA_RTOL, SIGMA_ATOL = 1e-4, 1e-5


def parity(ours, theirs, n: int, monkeypatch, x64: bool = False) -> float:
    """Relative max error of the final sample; also checks the timestep and sigma tables exactly."""
    dtype = jnp.float64 if x64 else jnp.float32
    key = jax.random.key(0)
    x = np.asarray(jax.random.normal(jax.random.key(1), SHAPE, dtype))
    state = ours.init(n, jax.ShapeDtypeStruct(SHAPE, dtype))
    stochastic = "sde" in getattr(ours, "algorithm_type", "")
    noises = step_noises(key, SHAPE, len(state.timesteps), dtype) if stochastic else []
    a = run_diffax(ours, x, n, key)
    b = run_diffusers(theirs, x, n, noises, monkeypatch, dtype=torch.float64 if x64 else torch.float32)
    np.testing.assert_array_equal(np.asarray(state.timesteps), theirs.timesteps.numpy())
    np.testing.assert_allclose(np.asarray(state.sigmas), theirs.sigmas.numpy(), rtol=SIGMA_RTOL, atol=SIGMA_ATOL)
    assert a.dtype == x.dtype and np.isfinite(a).all()
    return float(np.abs(a - b).max() / np.abs(b).max())


MULTISTEP_CASES = [
    (dict(), 10),  # order 2, dpmsolver++, midpoint, lower-order final steps (N < 15)
    (dict(solver_order=3, solver_type="heun", prediction_type="v_prediction", timestep_spacing="leading",
          steps_offset=1, **SD), 20),
    (dict(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True, **SD), 12),
    (dict(algorithm_type="sde-dpmsolver++", solver_order=3, use_exponential_sigmas=True,
          lower_order_final=False), 16),
    (dict(algorithm_type="dpmsolver", solver_type="heun", solver_order=3, final_sigmas_type="sigma_min",
          prediction_type="sample"), 12),
    (dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min", thresholding=True,
          dynamic_thresholding_ratio=0.9, sample_max_value=3.0), 10),
    (dict(solver_order=3, use_lu_lambdas=True, euler_at_final=True, lower_order_final=False,
          timestep_spacing="trailing"), 16),
    (dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1, solver_type="heun",
          timestep_spacing="trailing"), 10),
    (dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", thresholding=True, sample_max_value=2.0,
          timestep_spacing="trailing", **SD), 10),
    (dict(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"), 10),
    (dict(solver_order=1, final_sigmas_type="sigma_min"), 6),
]


@pytest.mark.parametrize("config,n", MULTISTEP_CASES, ids=lambda c: str(c) if isinstance(c, int) else
                         ",".join(f"{k}={v}" for k, v in c.items() if k not in SD) or "default")
def test_multistep_matches_diffusers(config, n, monkeypatch):
    err = parity(DPMSolverMultistepScheduler(**config), TorchMultistep(**config), n, monkeypatch)
    assert err < 1e-4, err


SINGLESTEP_CASES = [
    (dict(), 10),
    (dict(solver_order=3, solver_type="heun", prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2",
          lambda_min_clipped=-5.1), 11),  # N % 3 != 0
    (dict(solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min", use_karras_sigmas=True, **SD),
     12),
    (dict(algorithm_type="sde-dpmsolver++", solver_type="heun", use_exponential_sigmas=True), 9),
    (dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", prediction_type="sample"), 10),
    (dict(solver_order=1, thresholding=True, sample_max_value=2.0), 6),
]


@pytest.mark.parametrize("config,n", SINGLESTEP_CASES, ids=lambda c: str(c) if isinstance(c, int) else
                         ",".join(f"{k}={v}" for k, v in c.items() if k not in SD) or "default")
def test_singlestep_matches_diffusers(config, n, monkeypatch):
    err = parity(DPMSolverSinglestepScheduler(**config), TorchSinglestep(**config), n, monkeypatch)
    assert err < 1e-4, err


def test_float64_trajectories(monkeypatch):
    with jax.enable_x64(True):
        for ours, theirs, n in [
            (DPMSolverMultistepScheduler, TorchMultistep, 20),
            (DPMSolverSinglestepScheduler, TorchSinglestep, 11),
        ]:
            config = dict(solver_order=3, solver_type="heun", prediction_type="v_prediction")
            err = parity(ours(**config), theirs(**config), n, monkeypatch, x64=True)
            assert err < 1e-5, (ours.__name__, err)
    assert jnp.zeros(1).dtype == jnp.float32  # x64 does not leak into the other tests


@pytest.mark.parametrize("config", [
    dict(), dict(timestep_spacing="leading", steps_offset=1), dict(timestep_spacing="trailing"),
    dict(lambda_min_clipped=-5.1, beta_schedule="squaredcos_cap_v2"),
    dict(lambda_min_clipped=-5.1, beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing"),
    dict(lambda_min_clipped=-3.0, timestep_spacing="leading"),
    dict(use_karras_sigmas=True, final_sigmas_type="sigma_min", **SD),
    dict(use_exponential_sigmas=True), dict(use_lu_lambdas=True, **SD),
    dict(rescale_betas_zero_snr=True, timestep_spacing="trailing"),
    dict(use_flow_sigmas=True, flow_shift=5.0, final_sigmas_type="sigma_min"),
    dict(trained_betas=tuple(np.linspace(1e-4, 0.03, 1000))),
])
def test_multistep_tables(config):
    for n in (1, 7, 25, 50):
        theirs = TorchMultistep(**config)
        theirs.set_timesteps(n)
        state = DPMSolverMultistepScheduler(**config).init(n, jax.ShapeDtypeStruct(SHAPE, jnp.float32))
        np.testing.assert_array_equal(np.asarray(state.timesteps), theirs.timesteps.numpy())
        np.testing.assert_allclose(np.asarray(state.sigmas), theirs.sigmas.numpy(), rtol=SIGMA_RTOL, atol=SIGMA_ATOL)


def test_karras_cosine_truncated_timesteps():
    """With the cosine schedule diffusers truncates (does not round) the Karras timesteps, so a fractional
    one within float32 rounding of an integer (t = 999 for sigma_max exactly) can land one apart from its
    float32 tables and from our float64 ones. The sigmas, which drive the solver, agree to 1e-3: the cosine
    schedule's beta_0 = 4e-5, so diffusers' float32 sigma_min (the Karras end point) is off by ~7e-4."""
    config = dict(use_karras_sigmas=True, beta_schedule="squaredcos_cap_v2")
    for n in (1, 7, 25):
        theirs = TorchMultistep(**config)
        theirs.set_timesteps(n)
        state = DPMSolverMultistepScheduler(**config).init(n, jax.ShapeDtypeStruct(SHAPE, jnp.float32))
        diff = np.asarray(state.timesteps) - theirs.timesteps.numpy()
        assert np.abs(diff).max() <= 1 and (diff != 0).sum() <= 2, diff
        assert state.timesteps[0] == 999
        np.testing.assert_allclose(np.asarray(state.sigmas), theirs.sigmas.numpy(), rtol=1e-3)


def test_singlestep_tables_and_order_lists():
    like = jax.ShapeDtypeStruct(SHAPE, jnp.float32)
    for order in (1, 2, 3):
        for lower_order_final in (False, True):
            for final in ("zero", "sigma_min"):
                for n in range(1, 14):
                    config = dict(solver_order=order, lower_order_final=lower_order_final,
                                  final_sigmas_type=final, use_karras_sigmas=n % 2 == 0)
                    theirs = TorchSinglestep(**config)
                    theirs.set_timesteps(n)
                    state = DPMSolverSinglestepScheduler(**config).init(n, like)
                    assert list(np.asarray(state.order_list)) == theirs.order_list, (config, n)
                    np.testing.assert_array_equal(np.asarray(state.timesteps), theirs.timesteps.numpy())
                    np.testing.assert_allclose(np.asarray(state.sigmas), theirs.sigmas.numpy(), rtol=SIGMA_RTOL,
                                               atol=SIGMA_ATOL)


def test_order_and_solver_name_mapping_match_diffusers():
    for ours, theirs in [(DPMSolverMultistepScheduler, TorchMultistep),
                         (DPMSolverSinglestepScheduler, TorchSinglestep)]:
        assert ours.order == theirs.order
        assert ours.diffusers_class == theirs.__name__
        # Configs of sibling schedulers (UniPC's bh2, DEIS's logrho) map onto midpoint, as in diffusers.
        for solver_type in ("bh2", "logrho"):
            assert ours(solver_type=solver_type).solver_type == theirs(solver_type=solver_type).config.solver_type


def quadratic_update_error(algorithm_type: str, third_order_fix: bool) -> float:
    """|order-3 multistep update - exact step| from lambda_s0 to lambda_t when the integrated prediction m
    (x_0, or eps for 'dpmsolver') is quadratic in lambda, the SDE's noise left out. The exact step is
    x_t = w_x x_s + integral of w(lambda) m(lambda) over [lambda_s0, lambda_t] (variation of constants)."""
    lambdas = np.array([-1.3, -0.9, -0.55, -0.2])  # lambda_s2, lambda_s1, lambda_s0, lambda_t
    alphas = 1 / np.sqrt(1 + np.exp(-2 * lambdas))
    sigmas = alphas * np.exp(-lambdas)
    (l2, l1, l0, lt), (a0, at), (s0, st) = lambdas, alphas[2:], sigmas[2:]
    m = np.polynomial.Polynomial([0.7, -1.3, 2.1])
    x_s, h = 0.4, lt - l0
    if algorithm_type == "dpmsolver++":
        x_weight, weight = st / s0, lambda lam: st * np.exp(lam)
    elif algorithm_type == "dpmsolver":
        x_weight, weight = at / a0, lambda lam: -at * np.exp(-lam)
    else:  # sde-dpmsolver++
        x_weight, weight = st / s0 * np.exp(-h), lambda lam: 2 * at * np.exp(2 * (lam - lt))
    exact = x_weight * x_s + scipy.integrate.quad(lambda lam: weight(lam) * m(lam), l0, lt, epsabs=1e-14)[0]
    r0, r1 = (l0 - l1) / h, (l1 - l2) / h
    d1_0, d1_1 = (m(l0) - m(l1)) / r0, (m(l1) - m(l2)) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    with jax.enable_x64(True):
        ours = mc.dpm_solver_update(algorithm_type, x_s, h, at, st, a0, s0, m(l0), d1, "taylor", d2,
                                    noise=0.0, third_order_fix=third_order_fix)
        return abs(float(ours) - exact)


@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "dpmsolver", "sde-dpmsolver++"])
def test_third_order_fix_is_exact_for_quadratic_predictions(algorithm_type):
    """With third_order_fix the multistep order-3 update integrates a quadratic prediction exactly; diffusers'
    weights (the default) do not (a factor 2 on D2, and for 'sde-dpmsolver++' also the sign of its 1/2)."""
    assert quadratic_update_error(algorithm_type, third_order_fix=True) < 1e-12
    assert quadratic_update_error(algorithm_type, third_order_fix=False) > 1e-4


def test_third_order_fix_is_a_diffax_extra():
    sched = DPMSolverMultistepScheduler(solver_order=3, third_order_fix=True)
    cfg = to_diffusers_config(sched)
    assert "third_order_fix" not in cfg and cfg["_diffax"] == {"third_order_fix": True}
    assert from_diffusers_config(cfg) == sched
    assert TorchMultistep.from_config(cfg).config.solver_order == 3  # diffusers keeps "_diffax" unread


@pytest.mark.parametrize("cls,config,match", [
    (DPMSolverMultistepScheduler, dict(use_beta_sigmas=True), "use_beta_sigmas"),
    (DPMSolverMultistepScheduler, dict(use_dynamic_shifting=True), "use_dynamic_shifting"),
    (DPMSolverMultistepScheduler, dict(variance_type="learned_range"), "variance_type"),
    (DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver", solver_order=3,
                                       final_sigmas_type="sigma_min"), "third-order"),
    (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver"), "final_sigmas_type"),
    (DPMSolverMultistepScheduler, dict(use_karras_sigmas=True, use_exponential_sigmas=True), "only one"),
    (DPMSolverMultistepScheduler, dict(use_flow_sigmas=True, use_karras_sigmas=True), "use_flow_sigmas"),
    (DPMSolverMultistepScheduler, dict(solver_order=4), "solver_order"),
    (DPMSolverMultistepScheduler, dict(timestep_spacing="even"), "timestep_spacing"),
    (DPMSolverSinglestepScheduler, dict(algorithm_type="sde-dpmsolver"), "algorithm_type"),
    (DPMSolverSinglestepScheduler, dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr"),
    (DPMSolverSinglestepScheduler, dict(use_flow_sigmas=True), "use_flow_sigmas"),
])
def test_unsupported_options_raise(cls, config, match):
    with pytest.raises(ValueError, match=match):
        cls(**config)


def test_history_needs_a_sample_shape():
    with pytest.raises(ValueError, match="init\\(num_inference_steps, sample\\)"):
        DPMSolverMultistepScheduler().init(10)


@pytest.mark.parametrize("ours,theirs", [(DPMSolverMultistepScheduler, TorchMultistep),
                                         (DPMSolverSinglestepScheduler, TorchSinglestep)])
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
