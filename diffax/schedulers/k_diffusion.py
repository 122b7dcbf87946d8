"""k-diffusion's DPM++ samplers on an explicit sigma list: DPM++ 2M SDE, DPM++ 3M SDE and DPM++ 2S ancestral.

Two model contracts, chosen by `model_type`:

* 'discrete': a network trained on an alpha_bar schedule (DDPM / Stable Diffusion). The model sees
  x / sqrt(sigma^2 + 1) and the fractional training timestep of sigma, and predicts `prediction_type`
  (epsilon / v_prediction / sample), as in k-diffusion's DiscreteEpsDDPMDenoiser / DiscreteVDDPMDenoiser.
* 'edm': EDM preconditioning as diffusers' EDM schedulers define it (diffax/schedulers/edm.py).

The samplers follow k-diffusion's formulas (Lu et al. 2022, DPM-Solver++; its SDE variants with
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

from diffax.schedulers.base import StepOutput, at, buffer, check_options, compute_dtype, gaussian, table
from diffax.schedulers.edm import EDM_PREDICTION_TYPES, SIGMA_SCHEDULES, edm_c_in, edm_sigmas, edm_x0
from diffax.schedulers.sigma_common import (DPMPPState, SigmaListState, SigmaScheduler, dpmpp_step, log_sigma_steps,
                                            scale_input)


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
        check_options(name, self, {"model_type": ("discrete", "edm")})
        edm = self.model_type == "edm"
        check_options(name, self, {"sigma_schedule": SIGMA_SCHEDULES + (() if edm else ("discrete",))})
        if edm:
            check_options(name, self, {"prediction_type": EDM_PREDICTION_TYPES})
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
        t = self.sigma_timesteps(sigmas)
        return np.round(t) if self.quantize_timesteps else t

    def init_noise_sigma(self, state: SigmaListState) -> jax.Array:
        return at(state.sigmas, 0)  # k-diffusion: x = randn * sigmas[0]

    def scale_model_input(self, state: SigmaListState, sample: jax.Array, i: jax.Array) -> jax.Array:
        sigma = at(state.sigma_in, i)
        if self.model_type == "edm":
            return (sample * edm_c_in(sigma, self.sigma_data)).astype(sample.dtype)
        return scale_input(sample, sigma)

    def denoised(self, model_output: jax.Array, sample: jax.Array, sigma: jax.Array) -> jax.Array:
        """x_0 from the model output at noise level sigma (k-diffusion's `denoised`)."""
        if self.model_type == "edm":
            return edm_x0(self.prediction_type, model_output, sample, sigma, self.sigma_data)
        return super().denoised(model_output, sample, sigma)


@dataclasses.dataclass(frozen=True)
class _MultistepSDE(KDiffusionScheduler):
    """k-diffusion's DPM++ (2M|3M) SDE: one model evaluation per step, x_0 history in the state."""
    order: ClassVar[int] = 1
    multistep_order: ClassVar[int] = 2

    def second_order_form(self) -> str:
        """The form of the second-order correction: k-diffusion's 3M uses 'heun'."""
        return "heun"

    def init(self, num_inference_steps: int, sample=None) -> DPMPPState:
        """The sigma list, its step sizes h, and the x_0 history shaped like `sample`."""
        sigmas, timesteps = self.sigma_list(num_inference_steps)
        return DPMPPState(
            timesteps=table(timesteps), sigma_in=table(sigmas[:-1]), sigmas=table(sigmas),
            h=table(log_sigma_steps(sigmas)), history=buffer(sample, type(self).__name__, self.multistep_order - 1),
            count=np.zeros((), np.int32))

    def step(self, state: DPMPPState, model_output: jax.Array, sample: jax.Array, i: jax.Array,
             key: jax.Array | None = None) -> StepOutput:
        dtype = compute_dtype(sample)
        x = sample.astype(dtype)
        d0 = self.denoised(model_output.astype(dtype), x, at(state.sigmas, i, dtype))
        order = jnp.minimum(state.count + 1, self.multistep_order)
        noise = gaussian(key, sample, type(self).__name__).astype(dtype) if self.eta else None
        prev, state = dpmpp_step(state, x, d0, i, order, eta=self.eta, second_order=self.second_order_form(),
                                 noise=noise, s_noise=self.s_noise)
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
        check_options(type(self).__name__, self, {"solver_type": ("midpoint", "heun")})

    def second_order_form(self) -> str:
        return self.solver_type


@dataclasses.dataclass(frozen=True)
class DPMPP3MSDEScheduler(_MultistepSDE):
    """k-diffusion `sample_dpmpp_3m_sde` ("DPM++ 3M SDE"), Gaussian instead of Brownian-tree noise. Its
    second step is the 'heun' form of second order. eta = 0 is DPM-Solver++(3M)."""
    multistep_order: ClassVar[int] = 3


@flax.struct.dataclass
class TwoStageState(SigmaListState):
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
        stage = at(state.stage, i)
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
