"""Samplers on explicit EDM sigma lists with EDM preconditioning (Karras et al. 2022): diffusers'
EDMEulerScheduler and EDMDPMSolverMultistepScheduler.

Model contract ('edm'), as diffusers' EDM schedulers define it: the model sees
c_in x = x / sqrt(sigma^2 + sigma_data^2) and c_noise = 0.25 log(sigma), and x_0 = c_skip x + c_out F with
c_skip = sigma_data^2 / (sigma^2 + sigma_data^2), c_out = +-sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
(+ for 'epsilon', - for 'v_prediction'). k-diffusion's samplers (diffax/schedulers/k_diffusion.py) offer the
same contract as model_type='edm'.
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
from diffax.schedulers.base import (Scheduler, StepOutput, at, buffer, check_options, compute_dtype, gaussian,
                                    prediction_types_except, table)
from diffax.schedulers.multistep_common import SolverOrderOptions
from diffax.schedulers.sigma_common import (FINAL_SIGMAS_TYPES, ChurnOptions, DPMPPState, SigmaListState, dpmpp_step,
                                            log_sigma_steps)

EDM_PREDICTION_TYPES = prediction_types_except("sample", "flow_prediction")
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


@dataclasses.dataclass(frozen=True)
class EDMScheduler(Scheduler):
    """Config and methods shared by diffusers' EDM samplers: the sigma list and EDM preconditioning.

    init_noise_sigma is sqrt(sigma_max^2 + 1), as diffusers has it (EDM itself starts at sigma_max).
    """
    prediction_types: ClassVar[tuple[str, ...]] = EDM_PREDICTION_TYPES

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    sigma_schedule: str = "karras"
    num_train_timesteps: int = 1000
    prediction_type: str = "epsilon"
    rho: float = 7.0
    final_sigmas_type: str = "zero"

    def __post_init__(self):
        super().__post_init__()
        check_options(type(self).__name__, self, {"sigma_schedule": SIGMA_SCHEDULES,
                                                  "prediction_type": self.prediction_types,
                                                  "final_sigmas_type": FINAL_SIGMAS_TYPES})

    def sigma_tables(self, num_inference_steps: int, final_sigma_min: float | None = None) -> dict[str, np.ndarray]:
        """SigmaListState tables: c_noise timesteps [N], sigma_in [N] and sigmas [N + 1], the last 0 or, with
        final_sigmas_type 'sigma_min', `final_sigma_min` (None: the list's last sigma, as diffusers'
        EDMEulerScheduler has it; its EDMDPMSolverMultistepScheduler ends at the sigma_min field)."""
        sigmas = edm_sigmas(self.sigma_min, self.sigma_max, num_inference_steps, self.rho, self.sigma_schedule)
        last = 0.0
        if self.final_sigmas_type == "sigma_min":
            last = sigmas[-1] if final_sigma_min is None else final_sigma_min
        return dict(timesteps=table(0.25 * np.log(sigmas)), sigma_in=table(sigmas),
                    sigmas=table(np.concatenate([sigmas, [last]])))

    def denoised(self, model_output: jax.Array, sample: jax.Array, sigma: jax.Array) -> jax.Array:
        """x_0 from the preconditioned model output at noise level sigma."""
        return edm_x0(self.prediction_type, model_output, sample, sigma, self.sigma_data)

    def init_noise_sigma(self, state: SigmaListState) -> float:
        return math.sqrt(self.sigma_max ** 2 + 1)

    def scale_model_input(self, state: SigmaListState, sample: jax.Array, i: jax.Array) -> jax.Array:
        return (sample * edm_c_in(at(state.sigma_in, i), self.sigma_data)).astype(sample.dtype)

    def add_noise(self, state: SigmaListState, original: jax.Array, noise: jax.Array, i: int) -> jax.Array:
        return (original + at(state.sigma_in, i) * noise).astype(original.dtype)


@dataclasses.dataclass(frozen=True)
class EDMEulerScheduler(ChurnOptions, EDMScheduler):
    """diffusers' EDMEulerScheduler: Euler (optionally with churn) on EDM sigmas with EDM preconditioning.

    Model contract ('edm' above): denoise_fn(x / sqrt(sigma^2 + sigma_data^2), 0.25 log sigma) -> F.
    s_churn / s_tmin / s_tmax / s_noise are step arguments in diffusers, config fields here.
    """
    diffusers_class: ClassVar[str] = "EDMEulerScheduler"
    order: ClassVar[int] = 1

    def init(self, num_inference_steps: int, sample=None) -> SigmaListState:
        """Sigmas [N + 1] and timesteps 0.25 log sigma [N]; no history (`sample` unused)."""
        return SigmaListState(**self.sigma_tables(num_inference_steps))

    def step(self, state: SigmaListState, model_output: jax.Array, sample: jax.Array, i: jax.Array,
             key: jax.Array | None = None) -> StepOutput:
        dtype = compute_dtype(sample)
        sigma = at(state.sigmas, i, dtype)
        x, sigma_hat = self.churn(sample.astype(dtype), sigma, state.sigmas.shape[0] - 1, key, sample)
        x0 = self.denoised(model_output.astype(dtype), x, sigma_hat)
        prev = x + (x - x0) / sigma_hat * (at(state.sigmas, i + 1, dtype) - sigma_hat)
        return StepOutput(prev.astype(sample.dtype), x0.astype(sample.dtype), state)


@flax.struct.dataclass
class EDMDPMSolverState(DPMPPState):
    max_order: jax.Array   # [N] int32: the highest order diffusers allows at step k (lower_order_final)


@dataclasses.dataclass(frozen=True)
class EDMDPMSolverMultistepScheduler(SolverOrderOptions, EDMScheduler):
    """diffusers' EDMDPMSolverMultistepScheduler (e.g. Playground v2.5): DPM-Solver++ (2M / 3M, or the
    first / second-order SDE variant) on EDM sigmas with EDM preconditioning (model contract 'edm' above).

    Same steps as DPMPP2MSDEScheduler / DPMPP3MSDEScheduler with model_type='edm' (eta 0 for 'dpmsolver++',
    1 for 'sde-dpmsolver++'), plus diffusers' lower_order_final / euler_at_final rules and thresholding.
    diffusers fails at run time on 'sde-dpmsolver++' with solver_order 3 (no such update); diffax rejects it
    up front. third_order_fix (diffax only, stored under "_diffax" in configs): the exact weight of the
    order-3 step's second divided difference, as DPMSolverMultistepScheduler's; False matches diffusers.
    """
    diffusers_class: ClassVar[str] = "EDMDPMSolverMultistepScheduler"
    order: ClassVar[int] = 1
    diffax_extras: ClassVar[tuple[str, ...]] = ("third_order_fix",)

    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    euler_at_final: bool = False
    third_order_fix: bool = False

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        check_options(name, self, {"algorithm_type": ("dpmsolver++", "sde-dpmsolver++"),
                                   "solver_type": ("midpoint", "heun")})
        if self.algorithm_type == "sde-dpmsolver++" and self.solver_order == 3:
            raise ValueError(f"{name}: algorithm_type 'sde-dpmsolver++' supports solver_order 1 or 2, got 3")

    def init(self, num_inference_steps: int, sample=None) -> EDMDPMSolverState:
        """Sigma and step tables, the per-step order cap and the x_0 history shaped like `sample`."""
        N = num_inference_steps
        tables = self.sigma_tables(N, self.sigma_min)
        few = self.lower_order_final and N < 15
        max_order = np.full(N, self.solver_order, np.int32)
        if few:
            max_order[-2:] = np.minimum(max_order[-2:], 2)
        if self.euler_at_final or few or self.final_sigmas_type == "zero":
            max_order[-1] = 1
        history = buffer(sample, type(self).__name__, max(self.solver_order - 1, 1))
        return EDMDPMSolverState(**tables, h=table(log_sigma_steps(tables["sigmas"])), history=history,
                                 count=np.zeros((), np.int32), max_order=max_order)

    def step(self, state: EDMDPMSolverState, model_output: jax.Array, sample: jax.Array, i: jax.Array,
             key: jax.Array | None = None) -> StepOutput:
        dtype = compute_dtype(sample)
        x = sample.astype(dtype)
        d0 = self.threshold(self.denoised(model_output.astype(dtype), x, at(state.sigmas, i, dtype)))
        order = jnp.minimum(at(state.max_order, i), state.count + 1)
        sde = self.algorithm_type == "sde-dpmsolver++"
        noise = gaussian(key, sample, type(self).__name__).astype(dtype) if sde else None
        prev, state = dpmpp_step(state, x, d0, i, order, eta=1.0 if sde else 0.0, second_order=self.solver_type,
                                 noise=noise, third_order_fix=self.third_order_fix)
        return StepOutput(prev.astype(sample.dtype), d0.astype(sample.dtype), state)
