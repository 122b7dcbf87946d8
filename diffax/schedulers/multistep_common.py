"""Shared math of the exponential-integrator samplers: DPM-Solver (multistep and singlestep), UniPC, DEIS.

These samplers all work in the (alpha_t, sigma_t, lambda_t = log(alpha_t / sigma_t)) view of a VP diffusion
x_t = alpha_t x_0 + sigma_t eps, on a table of N + 1 sigmas (the VE view sigma = sigma_t / alpha_t, one per
inference step plus the final one). This file builds those tables the way diffusers' `set_timesteps` does,
converts model outputs to the data (x_0) or noise prediction the solvers integrate, holds the model-output
history buffer, and has the DPM-Solver update shared by the multistep and singlestep schedulers.

Tables are NumPy float64 (a final sigma of 0 gives lambda = +inf, and the updates then reduce to x_0
exactly, as in diffusers); they become constants of the compiled program.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffax.schedulers.base import SchedulerState, threshold_sample
from diffax.schedules import (NoiseSchedule, TIMESTEP_SPACINGS, exponential_sigmas, karras_sigmas, sigma_to_t,
                              sigmas_from_alphas_cumprod)

FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


@flax.struct.dataclass
class SolverState(SchedulerState):
    """Tables on the N + 1 inference sigmas and the history of converted model outputs."""
    sigmas: jax.Array           # [N + 1] VE sigma (or the flow sigma) per step, then the final one
    alpha_t: jax.Array          # [N + 1]
    sigma_t: jax.Array          # [N + 1]
    lambda_t: jax.Array         # [N + 1] log(alpha_t / sigma_t); +inf at a final sigma of 0
    model_outputs: jax.Array    # [order, *sample.shape] converted outputs, oldest first, newest last
    lower_order_nums: jax.Array  # int32 scalar: steps taken so far, capped at the solver order


def check_options(name: str, config: Any, allowed: Mapping[str, tuple]) -> None:
    """ValueError naming each config key whose value is not among those this sampler implements."""
    for key, values in allowed.items():
        value = getattr(config, key)
        if value not in values:
            raise ValueError(f"{name}: {key}={value!r} is not supported by diffax (supported: "
                             f"{', '.join(repr(v) for v in values)})")


def check_sigma_spacing(name: str, use_karras_sigmas: bool, use_exponential_sigmas: bool,
                        use_beta_sigmas: bool = False) -> None:
    """ValueError when more than one sigma spacing is switched on (diffusers' rule)."""
    if use_karras_sigmas + use_exponential_sigmas + use_beta_sigmas > 1:
        raise ValueError(f"{name}: only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas "
                         "can be set")


def solver_alphas_cumprod(noise_schedule: NoiseSchedule) -> np.ndarray:
    """[T] alpha_bar. With zero terminal SNR it sets alpha_bar_T = 2^-24 instead of 0 so that sigma and
    lambda stay finite at the first step (diffusers' DPM-Solver and UniPC do the same)."""
    alphas_cumprod = noise_schedule.alphas_cumprod()
    if noise_schedule.rescale_betas_zero_snr:
        alphas_cumprod = alphas_cumprod.copy()
        alphas_cumprod[-1] = 2.0 ** -24
    return alphas_cumprod


def lambda_clip_timestep(alphas_cumprod: np.ndarray, lambda_min_clipped: float) -> int:
    """The number of training timesteps kept by `lambda_min_clipped`: timesteps whose lambda falls below it
    (the noisiest end, where cosine schedules are numerically unstable) are never visited."""
    lambdas = np.log(np.sqrt(alphas_cumprod)) - np.log(np.sqrt(1.0 - alphas_cumprod))
    return len(alphas_cumprod) - int(np.searchsorted(lambdas[::-1], lambda_min_clipped))


def solver_timesteps(num_inference_steps: int, num_train_timesteps: int, spacing: str = "linspace",
                     steps_offset: int = 0, last_timestep: int | None = None) -> np.ndarray:
    """Integer timesteps of the exponential-integrator samplers, descending: [N'] int64.

    Unlike DDIM's spacing these space N + 1 points and drop the final one (t = 0 is the solver's end point,
    not a model evaluation): 'linspace' over [0, last_timestep - 1], 'leading' in steps of
    last_timestep // (N + 1), 'trailing' down from last_timestep in steps of T / N. `last_timestep` (T unless
    lambda_min_clipped removes the noisiest ones) can make 'trailing' yield fewer than N timesteps, as in
    diffusers.
    """
    N, T = num_inference_steps, num_train_timesteps
    if not 0 < N <= T:
        raise ValueError(f"num_inference_steps must be in [1, {T}] (num_train_timesteps), got {N}")
    last = T if last_timestep is None else last_timestep
    if spacing == "linspace":
        ts = np.linspace(0, last - 1, N + 1).round()[::-1][:-1]
    elif spacing == "leading":
        ts = (np.arange(0, N + 1) * (last // (N + 1))).round()[::-1][:-1] + steps_offset
    elif spacing == "trailing":
        ts = np.arange(last, 0, -T / N).round() - 1
    else:
        raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}")
    return np.ascontiguousarray(ts).astype(np.int64)


def solver_sigmas(alphas_cumprod: np.ndarray, timesteps: np.ndarray, num_inference_steps: int,
                  sigma_spacing: str = "timesteps", round_timesteps: bool = True,
                  sigma_min: float | None = None, sigma_max: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps [N] int64, sigmas [N] float64) for one of the sigma spacings:

    'timesteps': the training sigmas interpolated at `timesteps`;
    'karras' (Karras et al. 2022, rho = 7) / 'exponential' (even in log sigma) between the training
    schedule's ends (or `sigma_min` / `sigma_max`), with timesteps mapped back by log-sigma interpolation;
    'lu' (Lu et al. 2022, even in lambda): the exponential sigmas, timesteps rounded like Karras'.
    Fractional timesteps are rounded when `round_timesteps`, else truncated, as diffusers' int64 cast does.
    """
    train_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod)  # [T] ascending in t
    if sigma_spacing == "timesteps":
        sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
        return np.asarray(timesteps, np.int64), sigmas
    lo = train_sigmas[0] if sigma_min is None else sigma_min
    hi = train_sigmas[-1] if sigma_max is None else sigma_max
    if sigma_spacing == "karras":
        sigmas = karras_sigmas(lo, hi, num_inference_steps)
    elif sigma_spacing in ("exponential", "lu"):
        sigmas = exponential_sigmas(lo, hi, num_inference_steps)
    else:
        raise ValueError(f"unknown sigma spacing {sigma_spacing!r}")
    ts = sigma_to_t(sigmas, np.log(train_sigmas))
    if round_timesteps:
        ts = ts.round()
    return ts.astype(np.int64), sigmas


def vp_sigma_min(alphas_cumprod: np.ndarray) -> float:
    """The VE sigma of the least noisy training timestep (final_sigmas_type='sigma_min')."""
    return float(np.sqrt((1.0 - alphas_cumprod[0]) / alphas_cumprod[0]))


def flow_sigmas(num_inference_steps: int, num_train_timesteps: int, shift: float) -> np.ndarray:
    """Rectified-flow sigmas as DPM-Solver spaces them: N + 1 points in [0, 1 - 1/T], shifted by
    shift * s / (1 + (shift - 1) s), descending, the 0 dropped: [N]."""
    s = 1.0 - np.linspace(1, 1 / num_train_timesteps, num_inference_steps + 1)
    s = shift * s / (1 + (shift - 1) * s)
    return s[::-1][:-1].copy()


def solver_state_tables(timesteps: np.ndarray, sigmas: np.ndarray, flow: bool = False) -> dict[str, np.ndarray]:
    """The SolverState table fields from timesteps [N] and sigmas [N + 1] (VE sigma, or flow sigma).

    They stay NumPy arrays: `sampling.loop_range` reads the timesteps on the host, and the loop turns them
    into constants of the compiled program (float32 unless jax_enable_x64)."""
    sigmas = np.asarray(sigmas, np.float64)
    if flow:  # x_t = (1 - s) x_0 + s eps
        alpha_t, sigma_t = 1.0 - sigmas, sigmas
    else:
        alpha_t = 1.0 / np.sqrt(sigmas ** 2 + 1.0)
        sigma_t = sigmas * alpha_t
    with np.errstate(divide="ignore"):
        lambda_t = np.log(alpha_t) - np.log(sigma_t)
    return dict(timesteps=np.asarray(timesteps, np.int64), sigmas=sigmas, alpha_t=alpha_t, sigma_t=sigma_t,
                lambda_t=lambda_t)


def empty_history(solver_order: int, sample: Any) -> jax.Array:
    """Zeroed model-output history [order, *sample.shape]; `sample` is an array or a ShapeDtypeStruct."""
    if sample is None:
        raise ValueError("multistep samplers keep a history of model outputs: call "
                         "init(num_inference_steps, sample) with an array (or jax.ShapeDtypeStruct) shaped like x")
    return jnp.zeros((solver_order,) + tuple(sample.shape), sample.dtype)


def push_history(history: jax.Array, value: jax.Array) -> jax.Array:
    """Drops the oldest entry and appends `value` as the newest: [order, ...]."""
    return jnp.concatenate([history[1:], value[None].astype(history.dtype)])


def data_prediction(prediction_type: str, model_output: jax.Array, sample: jax.Array, alpha_t: jax.Array,
                    sigma_t: jax.Array, sigma: jax.Array) -> jax.Array:
    """x_0 from a model output at a step with coefficients (alpha_t, sigma_t) and table sigma `sigma`."""
    if prediction_type == "epsilon":
        return (sample - sigma_t * model_output) / alpha_t
    if prediction_type == "sample":
        return model_output
    if prediction_type == "v_prediction":
        return alpha_t * sample - sigma_t * model_output
    if prediction_type == "flow_prediction":  # velocity eps - x_0 on x = (1 - s) x_0 + s eps
        return sample - sigma * model_output
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def noise_prediction(prediction_type: str, model_output: jax.Array, sample: jax.Array, alpha_t: jax.Array,
                     sigma_t: jax.Array) -> jax.Array:
    """eps from a model output (the noise-prediction solvers: DPM-Solver 'dpmsolver', UniPC predict_x0=False)."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "sample":
        return (sample - alpha_t * model_output) / sigma_t
    if prediction_type == "v_prediction":
        return alpha_t * model_output + sigma_t * sample
    raise ValueError(f"prediction_type {prediction_type!r} has no noise-prediction form here")


def maybe_threshold(x0: jax.Array, thresholding: bool, ratio: float, max_value: float) -> jax.Array:
    """Dynamic thresholding of x_0 when the config asks for it."""
    return threshold_sample(x0, ratio, max_value) if thresholding else x0


def convert_model_output(state: SolverState, model_output: jax.Array, sample: jax.Array, i: jax.Array,
                         prediction_type: str, predict_x0: bool, thresholding: bool = False, ratio: float = 0.995,
                         max_value: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """(the quantity the solver integrates at loop index i: x_0 if `predict_x0` else eps, the x_0 estimate).

    Thresholding clips the x_0 estimate; a noise-prediction solver then integrates the eps it implies."""
    alpha_t, sigma_t = state.alpha_t[i], state.sigma_t[i]
    if predict_x0:
        x0 = data_prediction(prediction_type, model_output, sample, alpha_t, sigma_t, state.sigmas[i])
        x0 = maybe_threshold(x0, thresholding, ratio, max_value)
        return x0, x0
    eps = noise_prediction(prediction_type, model_output, sample, alpha_t, sigma_t)
    x0 = (sample - sigma_t * eps) / alpha_t
    if thresholding:
        x0 = threshold_sample(x0, ratio, max_value)
        eps = (sample - alpha_t * x0) / sigma_t
    return eps, x0


def table_at(state: SolverState, j: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(alpha_t, sigma_t, lambda_t) at table index j."""
    return state.alpha_t[j], state.sigma_t[j], state.lambda_t[j]


def dpm_solver_update(algorithm_type: str, sample: jax.Array, h: jax.Array, alpha_t: jax.Array,
                      sigma_t: jax.Array, alpha_s: jax.Array, sigma_s: jax.Array, d0: jax.Array,
                      d1: jax.Array | None = None, d1_rule: str = "taylor", d2: jax.Array | None = None,
                      noise: jax.Array | None = None) -> jax.Array:
    """One DPM-Solver step from (alpha_s, sigma_s) to (alpha_t, sigma_t), h = lambda_t - lambda_s.

    d0, d1, d2 are the model-output value and its first / second divided differences in lambda (d1, d2
    optional: first order without them). d1_rule 'midpoint' weights d1 by half the first-order coefficient
    (Lu et al. 2022, DPM-Solver-2 midpoint); 'taylor' uses the exact phi_2 integral weight (the 'heun'
    solver_type, and every third-order step). Algorithms (Lu et al. 2022a/b): 'dpmsolver++' integrates the
    data prediction, 'dpmsolver' the noise prediction, 'sde-' variants add the SDE's fresh noise.
    """
    if algorithm_type == "dpmsolver++":
        phi1 = jnp.exp(-h) - 1.0
        x = (sigma_t / sigma_s) * sample - (alpha_t * phi1) * d0
        c1_mid, c1_taylor = -0.5 * (alpha_t * phi1), alpha_t * (phi1 / h + 1.0)
        c2 = -alpha_t * ((phi1 + h) / h ** 2 - 0.5)
    elif algorithm_type == "dpmsolver":
        phi1 = jnp.exp(h) - 1.0
        x = (alpha_t / alpha_s) * sample - (sigma_t * phi1) * d0
        c1_mid, c1_taylor = -0.5 * (sigma_t * phi1), -sigma_t * (phi1 / h - 1.0)
        c2 = -sigma_t * ((phi1 - h) / h ** 2 - 0.5)
    elif algorithm_type == "sde-dpmsolver++":
        one_minus = 1.0 - jnp.exp(-2.0 * h)
        x = (sigma_t / sigma_s * jnp.exp(-h)) * sample + (alpha_t * one_minus) * d0
        c1_mid, c1_taylor = 0.5 * (alpha_t * one_minus), alpha_t * (one_minus / (-2.0 * h) + 1.0)
        c2 = alpha_t * ((one_minus - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
        x = x + sigma_t * jnp.sqrt(one_minus) * noise
    elif algorithm_type == "sde-dpmsolver":
        phi1 = jnp.exp(h) - 1.0
        x = (alpha_t / alpha_s) * sample - 2.0 * (sigma_t * phi1) * d0
        c1_mid, c1_taylor = -(sigma_t * phi1), -2.0 * (sigma_t * (phi1 / h - 1.0))
        c2 = None  # diffusers has no third-order SDE-DPM-Solver (noise prediction); the schedulers reject it
        x = x + sigma_t * jnp.sqrt(jnp.exp(2.0 * h) - 1.0) * noise
    else:
        raise ValueError(f"unknown algorithm_type {algorithm_type!r}")
    if d1 is not None:
        x = x + (c1_mid if d1_rule == "midpoint" else c1_taylor) * d1
    if d2 is not None:
        x = x + c2 * d2
    return x


def add_noise_sigma_table(state: SolverState, original: jax.Array, noise: jax.Array, i: int) -> jax.Array:
    """alpha_t x_0 + sigma_t eps at loop index i (img2img's starting point)."""
    a = state.alpha_t[i].astype(original.dtype)
    s = state.sigma_t[i].astype(original.dtype)
    return a * original + s * noise
