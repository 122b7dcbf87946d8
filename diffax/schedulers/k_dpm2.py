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

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffax.schedulers.base import StepOutput, at, compute_dtype, table
from diffax.schedulers.sigma_common import TwoEvaluationScheduler, TwoEvaluationState, repeat_for_second_order


@flax.struct.dataclass
class KDPM2State(TwoEvaluationState):
    sigmas_mid: jax.Array  # [2N + 2] the repeated layout of the log-midpoints sqrt(sigma_{k-1} sigma_k)


@dataclasses.dataclass(frozen=True)
class KDPM2DiscreteScheduler(TwoEvaluationScheduler):
    """diffusers' KDPM2DiscreteScheduler ("DPM2" in A1111 / ComfyUI; k-diffusion `sample_dpm_2`)."""
    diffusers_class = "KDPM2DiscreteScheduler"

    def init(self, num_inference_steps: int, sample=None) -> KDPM2State:
        """Interleaved tables ([2N - 1] timesteps) and the step's starting-sample buffer."""
        sigmas, timesteps = self.step_sigmas(num_inference_steps)
        mid = np.zeros_like(sigmas)
        mid[1:-1] = np.sqrt(sigmas[1:-1] * sigmas[:-2])  # mid[k] lies between sigma_{k-1} and sigma_k; mid[N] = 0
        # The second evaluation of step k runs at the midpoint towards sigma_{k+1}, mid[k + 1].
        tables = self.interleaved_tables(sigmas, timesteps, mid[1:-1], self.sigma_timesteps(mid[1:-1]), sample)
        return KDPM2State(**tables, sigmas_mid=table(repeat_for_second_order(mid)))

    def step(self, state: KDPM2State, model_output: jax.Array, sample: jax.Array, i: jax.Array,
             key: jax.Array | None = None) -> StepOutput:
        dtype = compute_dtype(sample)
        x = sample.astype(dtype)
        first, j, sigma, sigma_next = self.step_entry(state, i, dtype)
        sigma_mid = at(state.sigmas_mid, j + 1, dtype)
        sigma_model = jnp.where(first, sigma, sigma_mid)
        x0 = self.denoised(model_output.astype(dtype), x, sigma_model)
        derivative = (x - x0) / sigma_model
        prev, state = self.from_step_start(state, x, first, derivative,
                                           jnp.where(first, sigma_mid - sigma, sigma_next - sigma))
        return StepOutput(prev.astype(sample.dtype), x0.astype(sample.dtype), state)
