"""DPM-Solver-2 in sigma space (Karras et al. 2022, appendix; k-diffusion `sample_dpm_2`):
diffusers' KDPM2DiscreteScheduler.

Each step sigma -> sigma_next evaluates the model at sigma, takes an Euler step to the log-midpoint
sigma_mid = sqrt(sigma * sigma_next), evaluates there, and takes the full step from the starting sample with
the midpoint's derivative. The final step to 0 is Euler (the midpoint of sigma and 0 is 0). Loop layout as
diffusers: timesteps [t_0, t(mid_1), t_1, t(mid_2), t_2, ..., t(mid_{N-1}), t_{N-1}] (2N - 1 evaluations);
even loop indices take the first half-step, odd ones the second.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffax import schedules
from diffax.schedulers.base import StepOutput
from diffax.schedulers.sigma_common import (SigmaScheduler, SigmaState, buffer, compute_dtype,
                                            repeat_for_second_order, sigma_schedule_name, table, x0_from_sigma)


@flax.struct.dataclass
class KDPM2State(SigmaState):
    sigmas: jax.Array         # [2N + 2] diffusers' repeated sigma table (sigma_0, sigma_1, sigma_1, ..., 0, 0, 0)
    sigmas_mid: jax.Array     # [2N + 2] the same layout for the log-midpoints sqrt(sigma_{k-1} sigma_k)
    start_sample: jax.Array   # [*sample] x at the start of the step


def kdpm2_tables(sigmas: np.ndarray, timesteps: np.ndarray,
                 log_train_sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Repeated sigma / midpoint tables [2N + 2], loop timesteps [2N - 1] and model sigmas [2N - 1]."""
    sigmas = np.concatenate([sigmas, [0.0]])  # [N + 1]
    mid = np.zeros_like(sigmas)
    mid[1:-1] = np.sqrt(sigmas[1:-1] * sigmas[:-2])  # mid[k] lies between sigma_{k-1} and sigma_k; mid[N] = 0
    sigmas_rep, mid_rep = repeat_for_second_order(sigmas), repeat_for_second_order(mid)
    t_mid = schedules.sigma_to_t(mid[1:-1], log_train_sigmas)
    loop_t = np.concatenate([timesteps[:1], np.stack([t_mid, timesteps[1:]], axis=-1).reshape(-1)])
    # The model runs at sigma_k on even indices, at the midpoint on odd ones.
    first = np.arange(len(loop_t)) % 2 == 0
    sigma_in = np.where(first, sigmas_rep[:len(loop_t)], mid_rep[:len(loop_t)])
    return sigmas_rep, mid_rep, loop_t, sigma_in


@dataclasses.dataclass(frozen=True)
class KDPM2DiscreteScheduler(SigmaScheduler):
    """diffusers' KDPM2DiscreteScheduler ("DPM2" in A1111 / ComfyUI; k-diffusion `sample_dpm_2`).

    With use_karras_sigmas the timesteps are rounded to integers, as diffusers does for this class.
    prediction_type 'sample' works here (diffusers raises NotImplementedError for it).
    """
    diffusers_class = "KDPM2DiscreteScheduler"
    order = 2
    diffax_extras: ClassVar[tuple[str, ...]] = ("rescale_betas_zero_snr",)  # not a diffusers option here

    beta_start: float = 0.00085
    beta_end: float = 0.012
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False

    def __post_init__(self):
        super().__post_init__()
        sigma_schedule_name(self.use_karras_sigmas, self.use_exponential_sigmas, self.use_beta_sigmas,
                            type(self).__name__)

    def init(self, num_inference_steps: int, sample=None) -> KDPM2State:
        """Interleaved tables ([2N - 1] timesteps) and the step's starting-sample buffer."""
        schedule = sigma_schedule_name(self.use_karras_sigmas, self.use_exponential_sigmas, self.use_beta_sigmas,
                                       type(self).__name__)
        sigmas, timesteps = self.inference_sigmas(num_inference_steps, schedule,
                                                  round_timesteps=schedule == "karras")
        log_train = np.log(schedules.sigmas_from_alphas_cumprod(self.alphas_cumprod()))
        sigmas_rep, mid_rep, loop_t, sigma_in = kdpm2_tables(sigmas, timesteps, log_train)
        return KDPM2State(timesteps=table(loop_t), sigma_in=table(sigma_in), sigmas=table(sigmas_rep),
                          sigmas_mid=table(mid_rep), start_sample=buffer(sample, type(self).__name__))

    def step(self, state: KDPM2State, model_output: jax.Array, sample: jax.Array, i: jax.Array,
             key: jax.Array | None = None) -> StepOutput:
        dtype = compute_dtype(sample)
        x = sample.astype(dtype)
        first = i % 2 == 0
        sigmas, mids = jnp.asarray(state.sigmas).astype(dtype), jnp.asarray(state.sigmas_mid).astype(dtype)
        sigma = jnp.where(first, sigmas[i], sigmas[i - 1])
        sigma_mid = jnp.where(first, mids[i + 1], mids[i])
        sigma_next = jnp.where(first, sigmas[i + 1], sigmas[i])
        sigma_model = jnp.where(first, sigma, sigma_mid)
        x0 = x0_from_sigma(self.prediction_type, model_output.astype(dtype), x, sigma_model)
        derivative = (x - x0) / sigma_model
        dt = jnp.where(first, sigma_mid - sigma, sigma_next - sigma)
        start = jnp.where(first, x, state.start_sample.astype(dtype))
        prev = start + derivative * dt
        state = state.replace(start_sample=start.astype(state.start_sample.dtype))
        return StepOutput(prev.astype(sample.dtype), x0.astype(sample.dtype), state)
