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
"""
from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffax import schedules
from diffax.schedulers.base import DiscreteScheduler, SchedulerState

SIGMA_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SIGMA_BETA_SCHEDULES = schedules.BETA_SCHEDULES + ("exp",)
# diffusers clamps the zero-SNR end of a rescaled schedule to alpha_bar = 2^-24 (sigma about 4096) so that
# sigma stays finite; the sigma-space samplers need a finite first sigma.
ZERO_SNR_ALPHA_BAR = 2.0 ** -24


@flax.struct.dataclass
class SigmaState(SchedulerState):
    """Fields every sigma-space state has."""
    sigma_in: jax.Array  # [S] the sigma of the model input at each loop index


def exp_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Betas of alpha_bar(t) = exp(-12 t) (diffusers' 'exp' schedule, HeunDiscreteScheduler only)."""
    t = np.arange(num_train_timesteps + 1) / num_train_timesteps
    abar = np.exp(-12.0 * t)
    return np.minimum(1 - abar[1:] / abar[:-1], max_beta)


def sigma_schedule_name(use_karras_sigmas: bool, use_exponential_sigmas: bool, use_beta_sigmas: bool,
                        owner: str) -> str:
    """'karras', 'exponential' or 'none' from diffusers' three flags; beta sigmas are not supported."""
    if use_karras_sigmas + use_exponential_sigmas + use_beta_sigmas > 1:
        raise ValueError(f"{owner}: only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas "
                         "may be True")
    if use_beta_sigmas:
        # diffusers draws them from scipy.stats.beta.ppf; diffax core does not depend on scipy.
        raise ValueError(f"{owner}: use_beta_sigmas=True is not supported")
    if use_karras_sigmas:
        return "karras"
    return "exponential" if use_exponential_sigmas else "none"


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


def x0_from_sigma(prediction_type: str, model_output: jax.Array, sample: jax.Array,
                  sigma: jax.Array) -> jax.Array:
    """x_0 from a model output, with x the variance-exploding sample at noise level sigma."""
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        # v = a eps - s x0 with a = 1 / sqrt(sigma^2 + 1), s = sigma a, and x_vp = a x.
        return model_output * (-sigma / jnp.sqrt(sigma ** 2 + 1)) + sample / (sigma ** 2 + 1)
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"prediction_type must be one of {SIGMA_PREDICTION_TYPES}, got {prediction_type!r}")


def compute_dtype(sample: jax.Array) -> jnp.dtype:
    """The step arithmetic runs in at least float32, like diffusers' `sample.to(torch.float32)`."""
    return jnp.promote_types(sample.dtype, jnp.float32)


def gaussian(key: jax.Array | None, sample: jax.Array, owner: str) -> jax.Array:
    """The step's standard normal draw, shaped like `sample`."""
    if key is None:
        raise ValueError(f"{owner}.step draws noise: pass a PRNG key")
    return jax.random.normal(key, sample.shape, sample.dtype)


def buffer(sample, owner: str, *lead: int) -> jax.Array:
    """A zeroed history buffer [*lead, *sample.shape] for the scan carry; `sample` is an array or a
    jax.ShapeDtypeStruct shaped like x (the buffers must exist, with their final shape, before the loop)."""
    if sample is None:
        raise ValueError(f"{owner} keeps a history across loop indices: call init(num_inference_steps, sample) "
                         "with an array (or jax.ShapeDtypeStruct) shaped like x")
    return jnp.zeros(tuple(lead) + tuple(sample.shape), sample.dtype)


def table(values) -> np.ndarray:
    """A float64 NumPy table for a state: concrete, so the loop can slice by timestep outside jit; it becomes
    a traced array (float32, or float64 under x64) once carried through the sampling scan."""
    return np.asarray(values, dtype=np.float64)


def at(values, i: jax.Array, dtype) -> jax.Array:
    """values[i] in `dtype`, for a NumPy table (a state fresh from `init`) or a traced one (inside the loop)."""
    return jnp.asarray(values)[i].astype(dtype)


def repeat_for_second_order(values: np.ndarray) -> np.ndarray:
    """[v0, v1, v1, v2, v2, ...]: diffusers' layout of a per-step table for two evaluations per step."""
    return np.concatenate([values[:1], np.repeat(values[1:], 2), values[-1:]])


@dataclasses.dataclass(frozen=True)
class SigmaScheduler(DiscreteScheduler):
    """Config and methods shared by the sigma-space samplers on an alpha_bar training schedule.

    Model contract: denoise_fn(x / sqrt(sigma^2 + 1), t) returns the prediction named by `prediction_type`
    (epsilon, v_prediction or sample) for the training timestep t, exactly as a DDPM-trained network.
    """
    timestep_spacing: str = "linspace"
    steps_offset: int = 0

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        if self.prediction_type not in SIGMA_PREDICTION_TYPES:
            raise ValueError(f"{name}: prediction_type must be one of {SIGMA_PREDICTION_TYPES}, "
                             f"got {self.prediction_type!r}")
        if self.trained_betas is None and self.beta_schedule not in SIGMA_BETA_SCHEDULES:
            raise ValueError(f"{name}: beta_schedule must be one of {SIGMA_BETA_SCHEDULES}, "
                             f"got {self.beta_schedule!r}")
        if self.timestep_spacing not in schedules.TIMESTEP_SPACINGS:
            raise ValueError(f"{name}: timestep_spacing must be one of {schedules.TIMESTEP_SPACINGS}, "
                             f"got {self.timestep_spacing!r}")

    def alphas_cumprod(self) -> np.ndarray:
        """[T] float64 training alpha_bar, with diffusers' 2^-24 floor at the end of a zero-SNR schedule."""
        if self.trained_betas is None and self.beta_schedule == "exp":
            betas = exp_betas(self.num_train_timesteps)
            if self.rescale_betas_zero_snr:
                betas = schedules.rescale_zero_terminal_snr(betas)
            abar = np.cumprod(1.0 - betas)
        else:
            abar = super().alphas_cumprod()
        if self.rescale_betas_zero_snr:
            abar = abar.copy()
            abar[-1] = ZERO_SNR_ALPHA_BAR
        return abar

    def inference_sigmas(self, num_inference_steps: int, sigma_schedule: str = "none",
                         round_timesteps: bool = False, sigma_min: float | None = None,
                         sigma_max: float | None = None, rho: float = 7.0) -> tuple[np.ndarray, np.ndarray]:
        """(sigmas [N], timesteps [N]) for this config; see `spaced_sigmas`."""
        return spaced_sigmas(self.alphas_cumprod(), num_inference_steps, timestep_spacing=self.timestep_spacing,
                             steps_offset=self.steps_offset, sigma_schedule=sigma_schedule, sigma_min=sigma_min,
                             sigma_max=sigma_max, round_timesteps=round_timesteps, rho=rho)

    def init_noise_sigma(self, state: SigmaState) -> jax.Array:
        return initial_sigma(self.timestep_spacing, jnp.max(state.sigma_in))

    def scale_model_input(self, state: SigmaState, sample: jax.Array, i: jax.Array) -> jax.Array:
        return scale_input(sample, jnp.asarray(state.sigma_in)[i])

    def add_noise(self, state: SigmaState, original: jax.Array, noise: jax.Array, i: int) -> jax.Array:
        return (original + jnp.asarray(state.sigma_in)[i] * noise).astype(original.dtype)

