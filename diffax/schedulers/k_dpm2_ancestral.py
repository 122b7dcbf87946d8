"""Ancestral DPM-Solver-2 in sigma space (k-diffusion `sample_dpm_2_ancestral`, eta = 1):
diffusers' KDPM2AncestralDiscreteScheduler.

Each step sigma -> sigma_next splits like ancestral Euler into a deterministic part down to
sigma_down = sigma_next^2 / sigma and fresh noise sigma_up. The deterministic part is a DPM-2 step: Euler to
the log-midpoint sqrt(sigma * sigma_down) (which equals sigma_next), a model evaluation there, and the full
step from the starting sample with the midpoint's derivative; then the noise. The final step is Euler to 0.
Loop layout as diffusers: [t_0, t(mid_0), t_1, t(mid_1), ..., t(mid_{N-2}), t_{N-1}] (2N - 1 evaluations);
noise is drawn on the odd (second-half) indices only.
"""
from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffax.schedulers.base import StepOutput, at, compute_dtype, gaussian, table
from diffax.schedulers.sigma_common import TwoEvaluationScheduler, TwoEvaluationState, repeat_for_second_order


@flax.struct.dataclass
class KDPM2AncestralState(TwoEvaluationState):
    sigmas_mid: jax.Array    # [2N + 2] repeated log-midpoints sqrt(sigma_k sigma_down_k), 0 for the last step
    sigmas_up: jax.Array     # [2N + 2] repeated ancestral noise levels
    sigmas_down: jax.Array   # [2N + 2] repeated deterministic targets


@dataclasses.dataclass(frozen=True)
class KDPM2AncestralDiscreteScheduler(TwoEvaluationScheduler):
    """diffusers' KDPM2AncestralDiscreteScheduler ("DPM2 a" in A1111 / ComfyUI)."""
    diffusers_class = "KDPM2AncestralDiscreteScheduler"

    def init(self, num_inference_steps: int, sample=None) -> KDPM2AncestralState:
        """Interleaved tables ([2N - 1] timesteps) and the step's starting-sample buffer."""
        sigmas, timesteps = self.step_sigmas(num_inference_steps)
        sigmas_next = np.concatenate([sigmas[1:], [0.0]])
        up = np.zeros_like(sigmas)  # the entry for sigma = 0 is never used (0 there, NaN in diffusers)
        pos = sigmas > 0
        up[pos] = np.sqrt(sigmas_next[pos] ** 2 * (sigmas[pos] ** 2 - sigmas_next[pos] ** 2) / sigmas[pos] ** 2)
        down = np.sqrt(np.maximum(sigmas_next ** 2 - up ** 2, 0.0))
        mid = np.sqrt(sigmas * down)
        mid[-2:] = 0.0  # the last step is Euler to 0 (no midpoint)
        # The second evaluation of step k runs at its own midpoint mid[k].
        tables = self.interleaved_tables(sigmas, timesteps, mid[:-2], self.sigma_timesteps(mid[:-2]), sample)
        return KDPM2AncestralState(**tables, sigmas_mid=table(repeat_for_second_order(mid)),
                                   sigmas_up=table(repeat_for_second_order(up)),
                                   sigmas_down=table(repeat_for_second_order(down)))

    def step(self, state: KDPM2AncestralState, model_output: jax.Array, sample: jax.Array, i: jax.Array,
             key: jax.Array | None = None) -> StepOutput:
        dtype = compute_dtype(sample)
        x = sample.astype(dtype)
        first, j, sigma, _ = self.step_entry(state, i, dtype)
        sigma_mid = at(state.sigmas_mid, j, dtype)
        sigma_model = jnp.where(first, sigma, sigma_mid)
        x0 = self.denoised(model_output.astype(dtype), x, sigma_model)
        derivative = (x - x0) / sigma_model
        dt = jnp.where(first, sigma_mid - sigma, at(state.sigmas_down, j, dtype) - sigma)
        prev, state = self.from_step_start(state, x, first, derivative, dt)
        noise = gaussian(key, sample, type(self).__name__).astype(dtype)
        prev = jnp.where(first, prev, prev + noise * at(state.sigmas_up, j, dtype))
        return StepOutput(prev.astype(sample.dtype), x0.astype(sample.dtype), state)
