"""Samplers on explicit sigma lists (Karras et al. 2022, "EDM"): diffusers' EDMEulerScheduler and
EDMDPMSolverMultistepScheduler, and k-diffusion's DPM++ 2M SDE, DPM++ 3M SDE and DPM++ 2S ancestral.

Two model contracts, chosen by `model_type` on the k-diffusion samplers (the EDM* classes are always 'edm'):

* 'discrete': a network trained on an alpha_bar schedule (DDPM / Stable Diffusion). The model sees
  x / sqrt(sigma^2 + 1) and the fractional training timestep of sigma, and predicts `prediction_type`
  (epsilon / v_prediction / sample), as in k-diffusion's DiscreteEpsDDPMDenoiser / DiscreteVDDPMDenoiser.
* 'edm': a network with EDM preconditioning as diffusers' EDM schedulers define it: the model sees
  c_in x = x / sqrt(sigma^2 + sigma_data^2) and c_noise = 0.25 log(sigma), and x_0 = c_skip x + c_out F with
  c_skip = sigma_data^2 / (sigma^2 + sigma_data^2), c_out = +-sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
  (+ for 'epsilon', - for 'v_prediction').

The DPM++ samplers follow k-diffusion's formulas (Lu et al. 2022, DPM-Solver++; its SDE variants with
stochasticity `eta`) on the sigma list, with the ODE time lambda = -log(sigma). One difference: k-diffusion's
2M / 3M SDE samplers draw their noise from a Brownian tree (torchsde), which makes the noise consistent
across step counts; diffax draws plain Gaussian noise per step (`jax.random.normal`), so samples match
k-diffusion in distribution, not draw for draw.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffax import schedules
from diffax.schedulers.base import Scheduler, StepOutput, threshold_sample
from diffax.schedulers.sigma_common import (SigmaScheduler, SigmaState, at, buffer, compute_dtype, gaussian,
                                            scale_input, table, x0_from_sigma)

EDM_PREDICTION_TYPES = ("epsilon", "v_prediction")
SIGMA_SCHEDULES = ("karras", "exponential")


def edm_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float, schedule: str) -> np.ndarray:
    """EDM sigmas [n], descending: 'karras' (evenly spaced in sigma^(1/rho)) or 'exponential' (in log sigma)."""
    if schedule == "karras":
        return schedules.karras_sigmas(sigma_min, sigma_max, n, rho)
    if schedule == "exponential":
        return schedules.exponential_sigmas(sigma_min, sigma_max, n)
    raise ValueError(f"sigma_schedule must be one of {SIGMA_SCHEDULES}, got {schedule!r}")


def edm_c_in(sigma: jax.Array, sigma_data: float) -> jax.Array:
    """EDM input scaling 1 / sqrt(sigma^2 + sigma_data^2)."""
    return 1 / jnp.sqrt(sigma ** 2 + sigma_data ** 2)


def edm_x0(prediction_type: str, model_output: jax.Array, sample: jax.Array, sigma: jax.Array,
           sigma_data: float) -> jax.Array:
    """x_0 = c_skip x + c_out F (diffusers' EDM `precondition_outputs`)."""
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    c_out = sigma * sigma_data / jnp.sqrt(sigma ** 2 + sigma_data ** 2)
    if prediction_type == "v_prediction":
        c_out = -c_out
    elif prediction_type != "epsilon":
        raise ValueError(f"EDM preconditioning needs prediction_type in {EDM_PREDICTION_TYPES}, "
                         f"got {prediction_type!r}")
    return c_skip * sample + c_out * model_output


def dpmpp_update(x: jax.Array, d0: jax.Array, d1: jax.Array, d2: jax.Array, sigma: jax.Array,
                 sigma_next: jax.Array, h: jax.Array, h1: jax.Array, h2: jax.Array, order: jax.Array, *,
                 eta: float, second_order: str, noise: jax.Array | None, s_noise: float = 1.0) -> jax.Array:
    """One DPM-Solver++ multistep step in sigma space (alpha = 1), orders 1-3, stochasticity eta.

    d0, d1, d2: x_0 predictions at this and the two previous steps; h = log(sigma / sigma_next) and h1, h2
    the previous two steps' h. With eta = 0 this is DPM-Solver++(2M/3M) (diffusers' 'dpmsolver++'); eta = 1
    is diffusers' 'sde-dpmsolver++'; other eta interpolate as in k-diffusion's 2M/3M SDE samplers.
    second_order: 'midpoint' or 'heun' form of the second-order correction. A step to sigma_next = 0
    returns d0 (its limit). Branch results that are not selected may be non-finite; they are discarded.
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
    third = phi_2 * third_d1 - phi_3 * third_d2
    x_new = x_new + jnp.where(order >= 3, third, jnp.where(order == 2, second, 0.0))
    if eta and noise is not None:
        x_new = x_new + noise * s_noise * sigma_next * jnp.sqrt(-jnp.expm1(-2 * eta * h))
    return jnp.where(final, d0, x_new)


@flax.struct.dataclass
class EDMEulerState(SigmaState):
    sigmas: jax.Array  # [N + 1] sigma at each step, then the final sigma


@dataclasses.dataclass(frozen=True)
class EDMEulerScheduler(Scheduler):
    """diffusers' EDMEulerScheduler: Euler (optionally with churn) on EDM sigmas with EDM preconditioning.

    Model contract ('edm' above): denoise_fn(x / sqrt(sigma^2 + sigma_data^2), 0.25 log sigma) -> F.
    init_noise_sigma is sqrt(sigma_max^2 + 1), as diffusers has it (EDM itself starts at sigma_max).
    s_churn / s_tmin / s_tmax / s_noise are step arguments in diffusers, config fields here.
    """
    diffusers_class: ClassVar[str] = "EDMEulerScheduler"
    order: ClassVar[int] = 1
    diffax_extras: ClassVar[tuple[str, ...]] = ("s_churn", "s_tmin", "s_tmax", "s_noise")

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    sigma_schedule: str = "karras"
    num_train_timesteps: int = 1000
    prediction_type: str = "epsilon"
    rho: float = 7.0
    final_sigmas_type: str = "zero"
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = float("inf")
    s_noise: float = 1.0

    def __post_init__(self):
        name = type(self).__name__
        if self.sigma_schedule not in SIGMA_SCHEDULES:
            raise ValueError(f"{name}: sigma_schedule must be one of {SIGMA_SCHEDULES}, got {self.sigma_schedule!r}")
        if self.prediction_type not in EDM_PREDICTION_TYPES:
            raise ValueError(f"{name}: prediction_type must be one of {EDM_PREDICTION_TYPES}, "
                             f"got {self.prediction_type!r}")
        if self.final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"{name}: final_sigmas_type must be 'zero' or 'sigma_min', "
                             f"got {self.final_sigmas_type!r}")

    def init(self, num_inference_steps: int, sample=None) -> EDMEulerState:
        """Sigmas [N + 1] and timesteps 0.25 log sigma [N]; no history (`sample` unused)."""
        sigmas = edm_sigmas(self.sigma_min, self.sigma_max, num_inference_steps, self.rho, self.sigma_schedule)
        last = sigmas[-1] if self.final_sigmas_type == "sigma_min" else 0.0
        return EDMEulerState(timesteps=table(0.25 * np.log(sigmas)), sigma_in=table(sigmas),
                             sigmas=table(np.concatenate([sigmas, [last]])))

    def init_noise_sigma(self, state: EDMEulerState) -> float:
        return math.sqrt(self.sigma_max ** 2 + 1)

    def scale_model_input(self, state: EDMEulerState, sample: jax.Array, i: jax.Array) -> jax.Array:
        return (sample * edm_c_in(jnp.asarray(state.sigma_in)[i], self.sigma_data)).astype(sample.dtype)

    def add_noise(self, state: EDMEulerState, original: jax.Array, noise: jax.Array, i: int) -> jax.Array:
        return (original + jnp.asarray(state.sigma_in)[i] * noise).astype(original.dtype)

    def step(self, state: EDMEulerState, model_output: jax.Array, sample: jax.Array, i: jax.Array,
             key: jax.Array | None = None) -> StepOutput:
        dtype = compute_dtype(sample)
        x = sample.astype(dtype)
        sigma = at(state.sigmas, i, dtype)
        sigma_hat = sigma
        if self.s_churn > 0:
            num_steps = state.sigmas.shape[0] - 1
            churn = jnp.logical_and(self.s_tmin <= sigma, sigma <= self.s_tmax)
            sigma_hat = sigma * (1 + jnp.where(churn, min(self.s_churn / num_steps, 2 ** 0.5 - 1), 0.0))
            noise = gaussian(key, sample, type(self).__name__).astype(dtype) * self.s_noise
            # max: with gamma = 0, XLA may fuse the difference into an FMA that rounds to a tiny negative.
            x = x + noise * jnp.sqrt(jnp.maximum(sigma_hat ** 2 - sigma ** 2, 0.0))
        x0 = edm_x0(self.prediction_type, model_output.astype(dtype), x, sigma_hat, self.sigma_data)
        prev = x + (x - x0) / sigma_hat * (at(state.sigmas, i + 1, dtype) - sigma_hat)
        return StepOutput(prev.astype(sample.dtype), x0.astype(sample.dtype), state)


@flax.struct.dataclass
class EDMDPMSolverState(SigmaState):
    sigmas: jax.Array      # [N + 1] sigma at each step, then the final sigma
    h: jax.Array           # [N] log(sigma_k / sigma_{k+1}) (1 for a final step to 0)
    max_order: jax.Array   # [N] int32: the highest order diffusers allows at step k (lower_order_final)
    history: jax.Array     # [solver_order - 1, *sample] previous x_0 predictions, newest first
    count: jax.Array       # [] int32: steps taken so far


@dataclasses.dataclass(frozen=True)
class EDMDPMSolverMultistepScheduler(Scheduler):
    """diffusers' EDMDPMSolverMultistepScheduler (e.g. Playground v2.5): DPM-Solver++ (2M / 3M, or the
    first / second-order SDE variant) on EDM sigmas with EDM preconditioning (model contract 'edm' above).

    Same steps as DPMPP2MSDEScheduler / DPMPP3MSDEScheduler with model_type='edm' (eta 0 for 'dpmsolver++',
    1 for 'sde-dpmsolver++'), plus diffusers' lower_order_final / euler_at_final rules and thresholding.
    diffusers fails at run time on 'sde-dpmsolver++' with solver_order 3 (no such update); diffax rejects it
    up front. init_noise_sigma is sqrt(sigma_max^2 + 1), as in diffusers.
    """
    diffusers_class: ClassVar[str] = "EDMDPMSolverMultistepScheduler"
    order: ClassVar[int] = 1

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    sigma_schedule: str = "karras"
    num_train_timesteps: int = 1000
    prediction_type: str = "epsilon"
    rho: float = 7.0
    solver_order: int = 2
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    final_sigmas_type: str = "zero"

    def __post_init__(self):
        name = type(self).__name__
        checks = {"sigma_schedule": SIGMA_SCHEDULES, "prediction_type": EDM_PREDICTION_TYPES,
                  "solver_order": (1, 2, 3), "algorithm_type": ("dpmsolver++", "sde-dpmsolver++"),
                  "solver_type": ("midpoint", "heun"), "final_sigmas_type": ("zero", "sigma_min")}
        for key, allowed in checks.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{name}: {key} must be one of {allowed}, got {getattr(self, key)!r}")
        if self.algorithm_type == "sde-dpmsolver++" and self.solver_order == 3:
            raise ValueError(f"{name}: algorithm_type 'sde-dpmsolver++' supports solver_order 1 or 2, got 3")

    def init(self, num_inference_steps: int, sample=None) -> EDMDPMSolverState:
        """Sigma and step tables, the per-step order cap and the x_0 history shaped like `sample`."""
        N = num_inference_steps
        sigmas = edm_sigmas(self.sigma_min, self.sigma_max, N, self.rho, self.sigma_schedule)
        last = self.sigma_min if self.final_sigmas_type == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [last]])
        with np.errstate(divide="ignore"):
            h = np.where(sigmas[1:] > 0, np.log(sigmas[:-1] / np.maximum(sigmas[1:], 1e-300)), 1.0)
        few = self.lower_order_final and N < 15
        max_order = np.full(N, self.solver_order, np.int32)
        if few:
            max_order[-2:] = np.minimum(max_order[-2:], 2)
        if self.euler_at_final or few or self.final_sigmas_type == "zero":
            max_order[-1] = 1
        history = buffer(sample, type(self).__name__, max(self.solver_order - 1, 1))
        return EDMDPMSolverState(timesteps=table(0.25 * np.log(sigmas[:-1])), sigma_in=table(sigmas[:-1]),
                                 sigmas=table(sigmas), h=table(h), max_order=max_order, history=history,
                                 count=np.zeros((), np.int32))

    def init_noise_sigma(self, state: EDMDPMSolverState) -> float:
        return math.sqrt(self.sigma_max ** 2 + 1)

    def scale_model_input(self, state: EDMDPMSolverState, sample: jax.Array, i: jax.Array) -> jax.Array:
        return (sample * edm_c_in(jnp.asarray(state.sigma_in)[i], self.sigma_data)).astype(sample.dtype)

    def add_noise(self, state: EDMDPMSolverState, original: jax.Array, noise: jax.Array, i: int) -> jax.Array:
        return (original + jnp.asarray(state.sigma_in)[i] * noise).astype(original.dtype)

    def step(self, state: EDMDPMSolverState, model_output: jax.Array, sample: jax.Array, i: jax.Array,
             key: jax.Array | None = None) -> StepOutput:
        dtype = compute_dtype(sample)
        x = sample.astype(dtype)
        sigmas, h = jnp.asarray(state.sigmas).astype(dtype), jnp.asarray(state.h).astype(dtype)
        d0 = edm_x0(self.prediction_type, model_output.astype(dtype), x, sigmas[i], self.sigma_data)
        if self.thresholding:
            d0 = threshold_sample(d0, self.dynamic_thresholding_ratio, self.sample_max_value)
        hist = state.history.astype(dtype)
        d1, d2 = hist[0], hist[-1]
        order = jnp.minimum(jnp.asarray(state.max_order)[i], state.count + 1)
        sde = self.algorithm_type == "sde-dpmsolver++"
        noise = gaussian(key, sample, type(self).__name__).astype(dtype) if sde else None
        prev = dpmpp_update(x, d0, d1, d2, sigmas[i], sigmas[i + 1], h[i], h[i - 1], h[i - 2], order,
                            eta=1.0 if sde else 0.0, second_order=self.solver_type, noise=noise)
        history = jnp.concatenate([d0[None], hist[:-1]]).astype(state.history.dtype)
        state = state.replace(history=history, count=state.count + 1)
        return StepOutput(prev.astype(sample.dtype), d0.astype(sample.dtype), state)


@flax.struct.dataclass
class KDiffusionState(SigmaState):
    sigmas: jax.Array      # [N + 1] the sigma list, ending with 0


@dataclasses.dataclass(frozen=True)
class KDiffusionScheduler(SigmaScheduler):
    """Config shared by the k-diffusion samplers: the sigma list and the model contract.

    model_type: 'discrete' (an alpha_bar-trained model; the DiscreteScheduler fields describe its schedule) or
      'edm' (EDM preconditioning with sigma_data; prediction_type 'epsilon' or 'v_prediction').
    sigma_schedule: 'karras' (Karras et al. eq. 5 with rho), 'exponential', or 'discrete' (the training
      sigmas at `timestep_spacing`, like diffusers' Euler; 'discrete' model only).
    sigma_min / sigma_max: the ends of a karras / exponential list; None takes the training schedule's
      ends ('discrete' model) or EDM's 0.002 / 80 ('edm' model).
    quantize_timesteps: round the model's timestep to an integer ('discrete' model), as diffusers'
      DPMSolverMultistepScheduler does with Karras sigmas.
    eta, s_noise: stochasticity and noise scale of k-diffusion's samplers.
    """
    model_type: str = "discrete"
    sigma_schedule: str = "karras"
    sigma_min: float | None = None
    sigma_max: float | None = None
    rho: float = 7.0
    sigma_data: float = 0.5
    quantize_timesteps: bool = False
    eta: float = 1.0
    s_noise: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        if self.model_type not in ("discrete", "edm"):
            raise ValueError(f"{name}: model_type must be 'discrete' or 'edm', got {self.model_type!r}")
        allowed = SIGMA_SCHEDULES + (("discrete",) if self.model_type == "discrete" else ())
        if self.sigma_schedule not in allowed:
            raise ValueError(f"{name}: sigma_schedule must be one of {allowed} for model_type "
                             f"{self.model_type!r}, got {self.sigma_schedule!r}")
        if self.model_type == "edm" and self.prediction_type not in EDM_PREDICTION_TYPES:
            raise ValueError(f"{name}: model_type 'edm' needs prediction_type in {EDM_PREDICTION_TYPES}, "
                             f"got {self.prediction_type!r}")
        if self.eta < 0:
            raise ValueError(f"{name}: eta must be >= 0, got {self.eta}")

    def sigma_list(self, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """The k-diffusion sigma list [N + 1] (descending, ending with 0) and the model timesteps [N]."""
        if self.model_type == "edm":
            lo = self.sigma_min if self.sigma_min is not None else 0.002
            hi = self.sigma_max if self.sigma_max is not None else 80.0
            sigmas = edm_sigmas(lo, hi, num_inference_steps, self.rho, self.sigma_schedule)
            timesteps = 0.25 * np.log(sigmas)
        else:
            schedule = "none" if self.sigma_schedule == "discrete" else self.sigma_schedule
            sigmas, timesteps = self.inference_sigmas(num_inference_steps, schedule, sigma_min=self.sigma_min,
                                                      sigma_max=self.sigma_max, rho=self.rho)
            if self.quantize_timesteps:
                timesteps = np.round(timesteps)
        return np.concatenate([sigmas, [0.0]]), timesteps

    def model_timesteps(self, sigmas: np.ndarray) -> np.ndarray:
        """The model's timestep input at arbitrary positive sigmas (the 2S midpoints)."""
        if self.model_type == "edm":
            return 0.25 * np.log(sigmas)
        log_train = np.log(schedules.sigmas_from_alphas_cumprod(self.alphas_cumprod()))
        t = schedules.sigma_to_t(sigmas, log_train)
        return np.round(t) if self.quantize_timesteps else t

    def init_noise_sigma(self, state: KDiffusionState) -> jax.Array:
        return jnp.asarray(state.sigmas)[0]  # k-diffusion: x = randn * sigmas[0]

    def scale_model_input(self, state: KDiffusionState, sample: jax.Array, i: jax.Array) -> jax.Array:
        sigma = jnp.asarray(state.sigma_in)[i]
        if self.model_type == "edm":
            return (sample * edm_c_in(sigma, self.sigma_data)).astype(sample.dtype)
        return scale_input(sample, sigma)

    def denoised(self, model_output: jax.Array, sample: jax.Array, sigma: jax.Array) -> jax.Array:
        """x_0 from the model output at noise level sigma (k-diffusion's `denoised`)."""
        if self.model_type == "edm":
            return edm_x0(self.prediction_type, model_output, sample, sigma, self.sigma_data)
        return x0_from_sigma(self.prediction_type, model_output, sample, sigma)


@flax.struct.dataclass
class MultistepSDEState(KDiffusionState):
    h: jax.Array           # [N] log(sigma_k / sigma_{k+1}) (1 for the final step to 0)
    history: jax.Array     # [order - 1, *sample] previous x_0 predictions, newest first
    count: jax.Array       # [] int32: steps taken so far (how much history is valid)


@dataclasses.dataclass(frozen=True)
class _MultistepSDE(KDiffusionScheduler):
    """k-diffusion's DPM++ (2M|3M) SDE: one model evaluation per step, x_0 history in the state."""
    order: ClassVar[int] = 1
    multistep_order: ClassVar[int] = 2

    def second_order_form(self) -> str:
        """The form of the second-order correction: k-diffusion's 3M uses 'heun'."""
        return "heun"

    def init(self, num_inference_steps: int, sample=None) -> MultistepSDEState:
        """The sigma list, its step sizes h, and the x_0 history shaped like `sample`."""
        sigmas, timesteps = self.sigma_list(num_inference_steps)
        with np.errstate(divide="ignore"):
            h = np.where(sigmas[1:] > 0, np.log(sigmas[:-1] / np.maximum(sigmas[1:], 1e-300)), 1.0)
        return MultistepSDEState(
            timesteps=table(timesteps), sigma_in=table(sigmas[:-1]), sigmas=table(sigmas),
            h=table(h), history=buffer(sample, type(self).__name__, self.multistep_order - 1),
            count=np.zeros((), np.int32))

    def step(self, state: MultistepSDEState, model_output: jax.Array, sample: jax.Array, i: jax.Array,
             key: jax.Array | None = None) -> StepOutput:
        dtype = compute_dtype(sample)
        x = sample.astype(dtype)
        sigma, sigma_next = at(state.sigmas, i, dtype), at(state.sigmas, i + 1, dtype)
        d0 = self.denoised(model_output.astype(dtype), x, sigma)
        hist = state.history.astype(dtype)
        d1 = hist[0]
        d2 = hist[1] if self.multistep_order >= 3 else d1
        h = jnp.asarray(state.h).astype(dtype)
        order = jnp.minimum(state.count + 1, self.multistep_order)
        noise = gaussian(key, sample, type(self).__name__).astype(dtype) if self.eta else None
        prev = dpmpp_update(x, d0, d1, d2, sigma, sigma_next, h[i], h[i - 1], h[i - 2], order, eta=self.eta,
                            second_order=self.second_order_form(), noise=noise, s_noise=self.s_noise)
        history = jnp.concatenate([d0[None], hist[:-1]]).astype(state.history.dtype)
        state = state.replace(history=history, count=state.count + 1)
        return StepOutput(prev.astype(sample.dtype), d0.astype(sample.dtype), state)


@dataclasses.dataclass(frozen=True)
class DPMPP2MSDEScheduler(_MultistepSDE):
    """k-diffusion `sample_dpmpp_2m_sde` ("DPM++ 2M SDE" in A1111 / ComfyUI), Gaussian instead of Brownian-tree
    noise. eta = 0 is DPM++ 2M (diffusers' DPMSolverMultistepScheduler, 'dpmsolver++', order 2).
    solver_type: 'midpoint' (k-diffusion's default) or 'heun'."""
    multistep_order: ClassVar[int] = 2
    solver_type: str = "midpoint"

    def __post_init__(self):
        super().__post_init__()
        if self.solver_type not in ("midpoint", "heun"):
            raise ValueError(f"{type(self).__name__}: solver_type must be 'midpoint' or 'heun', "
                             f"got {self.solver_type!r}")

    def second_order_form(self) -> str:
        return self.solver_type


@dataclasses.dataclass(frozen=True)
class DPMPP3MSDEScheduler(_MultistepSDE):
    """k-diffusion `sample_dpmpp_3m_sde` ("DPM++ 3M SDE"), Gaussian instead of Brownian-tree noise. Its
    second step is the 'heun' form of second order. eta = 0 is DPM-Solver++(3M)."""
    multistep_order: ClassVar[int] = 3


@flax.struct.dataclass
class TwoStageState(KDiffusionState):
    stage: jax.Array         # [S] int32: 0 first half of a 2S step, 1 second half, 2 a single Euler step
    sigma_step: jax.Array    # [S] the step's starting sigma
    sigma_down: jax.Array    # [S] the deterministic target sigma of the step
    sigma_up: jax.Array      # [S] the ancestral noise added at the end of the step
    sigma_after: jax.Array   # [S] the next sigma in the list (noise is added only when it is > 0)
    start_sample: jax.Array  # [*sample] x at the start of the step


def ancestral_step(sigma_from: np.ndarray, sigma_to: np.ndarray, eta: float) -> tuple[np.ndarray, np.ndarray]:
    """(sigma_down, sigma_up) splitting sigma_from -> sigma_to into a deterministic step and fresh noise."""
    if not eta:
        return sigma_to, np.zeros_like(sigma_to)
    up = np.minimum(sigma_to, eta * np.sqrt(sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2))
    return np.sqrt(sigma_to ** 2 - up ** 2), up


@dataclasses.dataclass(frozen=True)
class DPMPP2SAncestralScheduler(KDiffusionScheduler):
    """k-diffusion `sample_dpmpp_2s_ancestral` ("DPM++ 2S a" in A1111 / ComfyUI).

    Each step: the ancestral split sigma -> (sigma_down, sigma_up); a DPM-Solver++(2S) step to sigma_down
    through the log-midpoint sqrt(sigma sigma_down) (two model evaluations), then noise sigma_up. A step
    whose sigma_down is 0 (the last) is one Euler step. Loop layout: [t_0, t(mid_0), t_1, t(mid_1), ...,
    t_{N-1}] (2N - 1 evaluations). eta must lie in [0, 1] so that only the last step is single.
    """
    order: ClassVar[int] = 2

    def __post_init__(self):
        super().__post_init__()
        if self.eta > 1:
            raise ValueError(f"{type(self).__name__}: eta must be in [0, 1], got {self.eta}")

    def init(self, num_inference_steps: int, sample=None) -> TwoStageState:
        """The per-evaluation tables and the step's starting-sample buffer."""
        sigmas, timesteps = self.sigma_list(num_inference_steps)
        down, up = ancestral_step(sigmas[:-1], sigmas[1:], self.eta)
        stage, loop_t, sigma_in, sigma_step, sigma_down, sigma_up, sigma_after = [], [], [], [], [], [], []
        for k in range(num_inference_steps):
            if down[k] > 0:
                mid = math.sqrt(sigmas[k] * down[k])
                entries = [(0, sigmas[k], timesteps[k]), (1, mid, self.model_timesteps(np.array([mid]))[0])]
            else:
                entries = [(2, sigmas[k], timesteps[k])]
            for s, sigma_model, t in entries:
                stage.append(s)
                loop_t.append(t)
                sigma_in.append(sigma_model)
                sigma_step.append(sigmas[k])
                sigma_down.append(down[k])
                sigma_up.append(up[k])
                sigma_after.append(sigmas[k + 1])
        return TwoStageState(
            timesteps=table(loop_t), sigma_in=table(sigma_in), sigmas=table(sigmas),
            stage=np.asarray(stage, np.int32), sigma_step=table(sigma_step), sigma_down=table(sigma_down),
            sigma_up=table(sigma_up), sigma_after=table(sigma_after), start_sample=buffer(sample, type(self).__name__))

    def step(self, state: TwoStageState, model_output: jax.Array, sample: jax.Array, i: jax.Array,
             key: jax.Array | None = None) -> StepOutput:
        dtype = compute_dtype(sample)
        x = sample.astype(dtype)
        stage = jnp.asarray(state.stage)[i]
        sigma, sigma_model = at(state.sigma_step, i, dtype), at(state.sigma_in, i, dtype)
        sigma_down = at(state.sigma_down, i, dtype)
        denoised = self.denoised(model_output.astype(dtype), x, sigma_model)
        start = jnp.where(stage == 1, state.start_sample.astype(dtype), x)
        # lambda = -log sigma; the 2S step goes from sigma to sigma_down through their log-midpoint, where
        # the second evaluation runs (sigma_model there).
        h = jnp.log(sigma / jnp.where(sigma_down > 0, sigma_down, sigma))
        first_half = jnp.exp(-h / 2) * x - jnp.expm1(-h / 2) * denoised  # to the midpoint sigma e^{-h/2}
        second_half = (sigma_down / sigma) * start - jnp.expm1(-h) * denoised
        euler = x + (x - denoised) / sigma * (sigma_down - sigma)
        prev = jnp.where(stage == 0, first_half, jnp.where(stage == 1, second_half, euler))
        if self.eta:
            sigma_up = at(state.sigma_up, i, dtype)
            noisy = prev + gaussian(key, sample, type(self).__name__).astype(dtype) * self.s_noise * sigma_up
            prev = jnp.where((stage != 0) & (at(state.sigma_after, i, dtype) > 0), noisy, prev)
        state = state.replace(start_sample=start.astype(state.start_sample.dtype))
        return StepOutput(prev.astype(sample.dtype), denoised.astype(sample.dtype), state)
