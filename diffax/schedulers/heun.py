"""Heun's second-order sampler (Karras et al. 2022, algorithm 1): diffusers' HeunDiscreteScheduler.

Each step sigma -> sigma_next takes two model evaluations: an Euler predictor to sigma_next, then the
trapezoidal corrector that averages the derivatives at both ends. The final step to sigma = 0 is a plain
Euler step (the derivative at 0 is undefined). The loop layout is diffusers': timesteps
[t_0, t_1, t_1, t_2, t_2, ..., t_{N-1}, t_{N-1}] (2N - 1 evaluations); even loop indices are predictor
evaluations, odd ones correctors, and the predictor's derivative, step size and starting sample travel in
the state.
"""
from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from diffax.schedulers.base import StepOutput, buffer, compute_dtype
from diffax.schedulers.sigma_common import TwoEvaluationScheduler, TwoEvaluationState


@flax.struct.dataclass
class HeunState(TwoEvaluationState):
    prev_derivative: jax.Array  # [*sample] the predictor's derivative (x - x_0) / sigma
    dt: jax.Array               # [] the predictor's step sigma_next - sigma


@dataclasses.dataclass(frozen=True)
class HeunDiscreteScheduler(TwoEvaluationScheduler):
    """diffusers' HeunDiscreteScheduler ("Heun" in A1111 / ComfyUI; k-diffusion `sample_heun`, churn 0).

    beta_schedule 'exp' (alpha_bar = exp(-12 t)) is accepted as diffusers does for this class.
    clip_sample clips x_0 to [-clip_sample_range, clip_sample_range].
    """
    diffusers_class = "HeunDiscreteScheduler"
    round_karras_timesteps = False

    clip_sample: bool = False
    clip_sample_range: float = 1.0

    def init(self, num_inference_steps: int, sample=None) -> HeunState:
        """Repeated tables ([2N - 1] timesteps) and predictor buffers shaped like `sample`."""
        sigmas, timesteps = self.step_sigmas(num_inference_steps)
        # The corrector of step k runs the model at the step's end, sigma_{k+1}.
        tables = self.interleaved_tables(sigmas, timesteps, sigmas[1:-1], timesteps[1:], sample)
        return HeunState(**tables, prev_derivative=buffer(sample, type(self).__name__),
                         dt=jnp.zeros((), sample.dtype))

    def step(self, state: HeunState, model_output: jax.Array, sample: jax.Array, i: jax.Array,
             key: jax.Array | None = None) -> StepOutput:
        dtype = compute_dtype(sample)
        x = sample.astype(dtype)
        # The predictor steps from sigma to sigma_next; the corrector ran the model at sigma_next.
        first, _, sigma, sigma_next = self.step_entry(state, i, dtype)
        sigma_model = jnp.where(first, sigma, sigma_next)
        x0 = self.denoised(model_output.astype(dtype), x, sigma_model)
        if self.clip_sample:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        derivative = (x - x0) / sigma_model
        prev_derivative = state.prev_derivative.astype(dtype)
        derivative = jnp.where(first, derivative, (prev_derivative + derivative) / 2)
        dt = jnp.where(first, sigma_next - sigma, state.dt.astype(dtype))
        prev, state = self.from_step_start(state, x, first, derivative, dt)
        state = state.replace(prev_derivative=derivative.astype(state.prev_derivative.dtype),
                              dt=dt.astype(state.dt.dtype))
        return StepOutput(prev.astype(sample.dtype), x0.astype(sample.dtype), state)
