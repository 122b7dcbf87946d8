"""Shared machinery of the sigma-space samplers (Euler, Heun, DPM2, LMS and the k-diffusion family).

These samplers see a model trained on a discrete alpha_bar schedule through the variance-exploding change of
variables x_ve = x_vp / sqrt(alpha_bar), sigma = sqrt((1 - alpha_bar) / alpha_bar) (Karras et al. 2022,
k-diffusion). In that view:

  * the model input is x / sqrt(sigma^2 + 1) (back to the scale the model was trained on),
  * the model's timestep is the fractional training timestep of sigma (log-sigma interpolation),
  * x_0 = x - sigma * eps for epsilon models, and the ODE derivative is (x - x_0) / sigma,
  * img2img noising is x_0 + sigma * noise,
  * the initial noise has standard deviation sigma_max (diffusers: sqrt(sigma_max^2 + 1) with 'leading'
    spacing, where the first timestep is not the last training one).

Tables are NumPy float64, built once per `init`, with the order of operations of diffusers' `set_timesteps`
so the sigmas and timesteps agree with diffusers' float32 tables to about 1e-7 relative.

Besides `SigmaScheduler`, this file holds the option mixins of the sigma schedules (Karras / exponential
spacing, churn), the layout of the samplers with two model evaluations per step (Heun, DPM2), and the
sigma-space DPM-Solver++ multistep update of the EDM and k-diffusion samplers.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffax import schedules
from diffax.schedulers.base import (DiscreteScheduler, Scheduler, SchedulerState, at, buffer, check_options,
                                    gaussian, predict_x0_eps, prediction_types_except, table)

FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


@flax.struct.dataclass
class SigmaState(SchedulerState):
    """Fields every sigma-space state has."""
    sigma_in: jax.Array  # [S] the sigma of the model input at each loop index


@dataclasses.dataclass(frozen=True)
class SigmaSpacingOptions(Scheduler):
    """diffusers' switches that respace the inference sigmas: Karras et al. (eq. 5, rho = 7) or evenly in
    log sigma. At most one may be on; use_beta_sigmas is not implemented (diffusers draws them from
    scipy.stats.beta.ppf, and diffax does not depend on scipy)."""
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        if self.use_karras_sigmas + self.use_exponential_sigmas + self.use_beta_sigmas > 1:
            raise ValueError(f"{name}: only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas "
                             "may be True")
        if self.use_beta_sigmas:
            raise ValueError(f"{name}: use_beta_sigmas=True is not supported")

    @property
    def sigma_schedule(self) -> str:
        """'karras', 'exponential' or 'none' (the sigmas at the spaced timesteps)."""
        if self.use_karras_sigmas:
            return "karras"
        return "exponential" if self.use_exponential_sigmas else "none"


@dataclasses.dataclass(frozen=True)
class ChurnOptions(Scheduler):
    """Karras et al.'s churn (section 4): raise the noise level of steps whose sigma lies in
    [s_tmin, s_tmax] by the factor 1 + min(s_churn / N, sqrt(2) - 1) with fresh noise scaled by s_noise.
    diffusers takes these as `step` arguments; here they are config fields, so one jitted program holds
    them as constants."""
    diffax_extras: ClassVar[tuple[str, ...]] = ("s_churn", "s_tmin", "s_tmax", "s_noise")

    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = float("inf")
    s_noise: float = 1.0

    def churn(self, x: jax.Array, sigma: jax.Array, num_steps: int, key: jax.Array | None,
              sample: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(x raised to sigma_hat, sigma_hat), x itself when s_churn is 0; the noise is drawn in the dtype of
        the step's input `sample` (x may be wider)."""
        if self.s_churn <= 0:
            return x, sigma
        churn = jnp.logical_and(self.s_tmin <= sigma, sigma <= self.s_tmax)
        gamma = jnp.where(churn, min(self.s_churn / num_steps, 2 ** 0.5 - 1), 0.0)
        sigma_hat = sigma * (gamma + 1)
        noise = gaussian(key, sample, type(self).__name__).astype(x.dtype) * self.s_noise
        # max: with gamma = 0, XLA may fuse the difference into an FMA that rounds to a tiny negative.
        return x + noise * jnp.sqrt(jnp.maximum(sigma_hat ** 2 - sigma ** 2, 0.0)), sigma_hat


def spaced_sigmas(alphas_cumprod: np.ndarray, num_inference_steps: int, *, timestep_spacing: str,
                  steps_offset: int = 0, sigma_schedule: str = "none", sigma_min: float | None = None,
                  sigma_max: float | None = None, round_timesteps: bool = False,
                  rho: float = 7.0) -> tuple[np.ndarray, np.ndarray]:
    """Inference sigmas and model timesteps, both descending [N] float64, as diffusers' Euler family sets them.

    The timesteps are spaced over the training range, their sigmas interpolated linearly in t over the
    training table. 'karras' / 'exponential' then respace the sigmas between sigma_min and sigma_max (the
    spaced sigmas' ends when None) and map them back to fractional timesteps (rounded when
    `round_timesteps`, as KDPM2 and DPM-Solver do for Karras sigmas).
    """
    train_sigmas = schedules.sigmas_from_alphas_cumprod(alphas_cumprod)  # [T] ascending in t
    T = len(train_sigmas)
    timesteps = schedules.spaced_timesteps_float(num_inference_steps, T, timestep_spacing, steps_offset)
    sigmas = np.interp(timesteps, np.arange(T), train_sigmas)
    if sigma_schedule == "none":
        return sigmas, timesteps
    lo = sigma_min if sigma_min is not None else float(sigmas[-1])
    hi = sigma_max if sigma_max is not None else float(sigmas[0])
    if sigma_schedule == "karras":
        sigmas = schedules.karras_sigmas(lo, hi, num_inference_steps, rho)
    elif sigma_schedule == "exponential":
        sigmas = schedules.exponential_sigmas(lo, hi, num_inference_steps)
    else:
        raise ValueError(f"sigma schedule must be 'none', 'karras' or 'exponential', got {sigma_schedule!r}")
    timesteps = schedules.sigma_to_t(sigmas, np.log(train_sigmas))
    return sigmas, (np.round(timesteps) if round_timesteps else timesteps)


def initial_sigma(timestep_spacing: str, max_sigma: jax.Array) -> jax.Array:
    """diffusers' `init_noise_sigma` of the Euler family: sigma_max, or sqrt(sigma_max^2 + 1) for 'leading'
    spacing (whose first timestep is below T - 1)."""
    if timestep_spacing in ("linspace", "trailing"):
        return max_sigma
    return jnp.sqrt(max_sigma ** 2 + 1)


def scale_input(sample: jax.Array, sigma: jax.Array) -> jax.Array:
    """x / sqrt(sigma^2 + 1): the variance-exploding sample at the scale the model was trained on."""
    return (sample / jnp.sqrt(sigma ** 2 + 1)).astype(sample.dtype)


def log_sigma_steps(sigmas: np.ndarray) -> np.ndarray:
    """[N] h_k = log(sigma_k / sigma_{k+1}) of a sigma list [N + 1]; 1 for a final step to sigma 0 (a
    placeholder that keeps the discarded branches of that step finite)."""
    with np.errstate(divide="ignore"):
        return np.where(sigmas[1:] > 0, np.log(sigmas[:-1] / np.maximum(sigmas[1:], 1e-300)), 1.0)


def repeat_for_second_order(values: np.ndarray) -> np.ndarray:
    """[v0, v1, v1, v2, v2, ...]: diffusers' layout of a per-step table for two evaluations per step."""
    return np.concatenate([values[:1], np.repeat(values[1:], 2), values[-1:]])


def interleave(firsts: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """[f_0, s_0, f_1, s_1, ..., s_{N-2}, f_{N-1}] from firsts [N] and seconds [N - 1]: the per-evaluation
    layout (2N - 1 entries) of a sampler that evaluates the model twice per step, once on the last step."""
    return np.concatenate([firsts[:1], np.stack([seconds, firsts[1:]], axis=-1).reshape(-1)])


@flax.struct.dataclass
class SigmaListState(SigmaState):
    """A state on one sigma per step."""
    sigmas: jax.Array  # [N + 1] sigma at each step, then the final sigma


@flax.struct.dataclass
class DPMPPState(SigmaListState):
    """The sigma list and the x_0 history of a sigma-space DPM-Solver++ multistep sampler."""
    h: jax.Array        # [N] log(sigma_k / sigma_{k+1}) (1 for a final step to 0)
    history: jax.Array  # [max(order - 1, 1), *sample] previous x_0 predictions, newest first
    count: jax.Array    # [] int32: steps taken so far (how much history is valid)


def dpmpp_update(x: jax.Array, d0: jax.Array, d1: jax.Array, d2: jax.Array, sigma: jax.Array,
                 sigma_next: jax.Array, h: jax.Array, h1: jax.Array, h2: jax.Array, order: jax.Array, *,
                 eta: float, second_order: str, noise: jax.Array | None, s_noise: float = 1.0,
                 third_order_fix: bool = False) -> jax.Array:
    """One DPM-Solver++ multistep step in sigma space (alpha = 1), orders 1-3, stochasticity eta.

    d0, d1, d2: x_0 predictions at this and the two previous steps; h = log(sigma / sigma_next) and h1, h2
    the previous two steps' h. With eta = 0 this is DPM-Solver++(2M/3M) (diffusers' 'dpmsolver++'); eta = 1
    is diffusers' 'sde-dpmsolver++'; other eta interpolate as in k-diffusion's 2M/3M SDE samplers.
    second_order: 'midpoint' or 'heun' form of the second-order correction. The third-order step weights
    its second divided difference (~ h^2 x_0'' / 2) by -phi_3 as diffusers and k-diffusion do, which leaves
    it second order; third_order_fix uses the exact weight -2 phi_3. A step to sigma_next = 0 returns d0
    (its limit). Branch results that are not selected may be non-finite; they are discarded.
    """
    final = sigma_next == 0
    h = jnp.where(final, 1.0, h)  # keep the discarded final-step branch finite
    h_eta = h * (1 + eta)
    phi_1 = -jnp.expm1(-h_eta)
    phi_2 = 1 - phi_1 / h_eta
    decay = sigma_next / sigma * (jnp.exp(-eta * h) if eta else 1.0)
    x_new = decay * x + phi_1 * d0
    r0, r1 = h1 / h, h2 / h
    d1_0 = (d0 - d1) / r0
    if second_order == "midpoint":
        second = 0.5 * phi_1 * d1_0
    elif second_order == "heun":
        second = phi_2 * d1_0
    else:
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {second_order!r}")
    d1_1 = (d1 - d2) / r1
    third_d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
    third_d2 = (d1_0 - d1_1) / (r0 + r1)
    phi_3 = phi_2 / h_eta - 0.5
    if third_order_fix:
        phi_3 = 2 * phi_3
    third = phi_2 * third_d1 - phi_3 * third_d2
    x_new = x_new + jnp.where(order >= 3, third, jnp.where(order == 2, second, 0.0))
    if eta and noise is not None:
        x_new = x_new + noise * s_noise * sigma_next * jnp.sqrt(-jnp.expm1(-2 * eta * h))
    return jnp.where(final, d0, x_new)


def dpmpp_step(state: DPMPPState, x: jax.Array, d0: jax.Array, i: jax.Array, order: jax.Array,
               **update_options) -> tuple[jax.Array, DPMPPState]:
    """(x at sigmas[i + 1], the state with d0 pushed into the history): `dpmpp_update` from loop index i,
    in the dtype of x; `update_options` are its keyword arguments."""
    dtype = x.dtype
    # On the first steps i - 1 and i - 2 wrap around; the orders that read them are not selected there.
    h = [at(state.h, j, dtype) for j in (i, i - 1, i - 2)]
    hist = state.history.astype(dtype)
    prev = dpmpp_update(x, d0, hist[0], hist[-1], at(state.sigmas, i, dtype), at(state.sigmas, i + 1, dtype),
                        *h, order, **update_options)
    history = jnp.concatenate([d0[None], hist[:-1]]).astype(state.history.dtype)
    return prev, state.replace(history=history, count=state.count + 1)


@dataclasses.dataclass(frozen=True)
class SigmaScheduler(DiscreteScheduler):
    """Config and methods shared by the sigma-space samplers on an alpha_bar training schedule.

    Model contract: denoise_fn(x / sqrt(sigma^2 + 1), t) returns the prediction named by `prediction_type`
    (epsilon, v_prediction or sample) for the training timestep t, exactly as a DDPM-trained network.
    """
    prediction_types: ClassVar[tuple[str, ...]] = prediction_types_except("flow_prediction")
    beta_schedules: ClassVar[tuple[str, ...]] = schedules.BETA_SCHEDULES + (schedules.EXP_BETA_SCHEDULE,)

    timestep_spacing: str = "linspace"
    steps_offset: int = 0

    def __post_init__(self):
        super().__post_init__()
        check_options(type(self).__name__, self, {"timestep_spacing": schedules.TIMESTEP_SPACINGS})

    def alphas_cumprod(self) -> np.ndarray:
        """[T] float64 training alpha_bar, ending at 2^-24 rather than 0 on a zero-SNR schedule."""
        return self.noise_schedule.alphas_cumprod(finite_terminal_snr=True)

    def inference_sigmas(self, num_inference_steps: int, sigma_schedule: str = "none",
                         round_timesteps: bool = False, sigma_min: float | None = None,
                         sigma_max: float | None = None, rho: float = 7.0) -> tuple[np.ndarray, np.ndarray]:
        """(sigmas [N], timesteps [N]) for this config; see `spaced_sigmas`."""
        return spaced_sigmas(self.alphas_cumprod(), num_inference_steps, timestep_spacing=self.timestep_spacing,
                             steps_offset=self.steps_offset, sigma_schedule=sigma_schedule, sigma_min=sigma_min,
                             sigma_max=sigma_max, round_timesteps=round_timesteps, rho=rho)

    def sigma_timesteps(self, sigmas: np.ndarray) -> np.ndarray:
        """The fractional training timesteps of arbitrary positive sigmas (log-sigma interpolation)."""
        log_train = np.log(schedules.sigmas_from_alphas_cumprod(self.alphas_cumprod()))
        return schedules.sigma_to_t(sigmas, log_train)

    def denoised(self, model_output: jax.Array, sample: jax.Array, sigma: jax.Array) -> jax.Array:
        """x_0 from the model output at noise level sigma, x the variance-exploding sample."""
        x0, _ = predict_x0_eps(self.prediction_type, model_output, sample, 1.0, sigma, sigma ** 2 + 1)
        return x0

    def init_noise_sigma(self, state: SigmaState) -> jax.Array:
        return initial_sigma(self.timestep_spacing, jnp.max(state.sigma_in))

    def scale_model_input(self, state: SigmaState, sample: jax.Array, i: jax.Array) -> jax.Array:
        return scale_input(sample, at(state.sigma_in, i))

    def add_noise(self, state: SigmaState, original: jax.Array, noise: jax.Array, i: int) -> jax.Array:
        return (original + at(state.sigma_in, i) * noise).astype(original.dtype)


@flax.struct.dataclass
class TwoEvaluationState(SigmaState):
    """A state of a sampler with two model evaluations per step (diffusers' repeated tables)."""
    sigmas: jax.Array        # [2N + 2] the repeated sigma table (sigma_0, sigma_1, sigma_1, ..., 0, 0, 0)
    start_sample: jax.Array  # [*sample] x at the start of the step


@dataclasses.dataclass(frozen=True)
class TwoEvaluationScheduler(SigmaSpacingOptions, SigmaScheduler):
    """Config shared by diffusers' Heun, KDPM2 and KDPM2-ancestral samplers: two model evaluations per step
    (one on the last, which ends at sigma 0), Stable Diffusion's beta range by default. rescale_betas_zero_snr
    is a diffax extra here (not a key of these diffusers classes). Their states keep diffusers' repeated
    per-step tables (`repeat_for_second_order`), which loop index i reads at its step's entry (`step_entry`).

    The DPM2 samplers round their Karras timesteps to integers, as diffusers does for them, and take
    prediction_type 'sample', for which diffusers raises NotImplementedError.
    """
    order: ClassVar[int] = 2
    diffax_extras: ClassVar[tuple[str, ...]] = ("rescale_betas_zero_snr",)
    # diffusers rounds the DPM2 samplers' Karras timesteps to integers (not Heun's).
    round_karras_timesteps: ClassVar[bool] = True

    beta_start: float = 0.00085
    beta_end: float = 0.012

    def step_sigmas(self, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """(sigmas [N + 1], the last 0; the model timesteps of the first N [N])."""
        round_timesteps = self.round_karras_timesteps and self.use_karras_sigmas
        sigmas, timesteps = self.inference_sigmas(num_inference_steps, self.sigma_schedule,
                                                  round_timesteps=round_timesteps)
        return np.concatenate([sigmas, [0.0]]), timesteps

    def interleaved_tables(self, sigmas: np.ndarray, timesteps: np.ndarray, second_sigmas: np.ndarray,
                           second_timesteps: np.ndarray, sample: jax.Array | jax.ShapeDtypeStruct | None
                           ) -> dict[str, np.ndarray | jax.Array]:
        """The TwoEvaluationState fields for step sigmas [N + 1] and timesteps [N]: the loop's timesteps and
        model sigmas [2N - 1], each step's first evaluation at (sigma_k, t_k) followed by its second at
        (second_sigmas[k], second_timesteps[k]) ([N - 1]: the last step has none); the repeated sigma table;
        the starting-sample buffer shaped like `sample`."""
        return dict(timesteps=table(interleave(timesteps, second_timesteps)),
                    sigma_in=table(interleave(sigmas[:-1], second_sigmas)),
                    sigmas=table(repeat_for_second_order(sigmas)), start_sample=buffer(sample, type(self).__name__))

    @staticmethod
    def step_entry(state: TwoEvaluationState, i: jax.Array, dtype: Any
                   ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """(first, j, sigma, sigma_next): whether loop index i is its step's first evaluation, the step's entry
        in the repeated tables (i on the first evaluation, i - 1 on the second), and the step's sigmas."""
        first = i % 2 == 0
        j = jnp.where(first, i, i - 1)
        return first, j, at(state.sigmas, j, dtype), at(state.sigmas, j + 1, dtype)

    @staticmethod
    def from_step_start(state: TwoEvaluationState, x: jax.Array, first: jax.Array, derivative: jax.Array,
                        dt: jax.Array) -> tuple[jax.Array, TwoEvaluationState]:
        """(start + derivative dt, the state holding start): a move from the step's starting sample, which is
        x itself on the step's first evaluation."""
        start = jnp.where(first, x, state.start_sample.astype(x.dtype))
        return start + derivative * dt, state.replace(start_sample=start.astype(state.start_sample.dtype))
