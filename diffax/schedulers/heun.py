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
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffax.schedulers.base import StepOutput
from diffax.schedulers.sigma_common import (SigmaScheduler, SigmaState, buffer, compute_dtype,
                                            repeat_for_second_order, sigma_schedule_name, table, x0_from_sigma)


@flax.struct.dataclass
class HeunState(SigmaState):
    sigmas: jax.Array           # [2N] diffusers' repeated sigma table, ending with 0
    prev_derivative: jax.Array  # [*sample] the predictor's derivative (x - x_0) / sigma
    dt: jax.Array               # [] the predictor's step sigma_next - sigma
    start_sample: jax.Array     # [*sample] x at the start of the step


@dataclasses.dataclass(frozen=True)
class HeunDiscreteScheduler(SigmaScheduler):
    """diffusers' HeunDiscreteScheduler ("Heun" in A1111 / ComfyUI; k-diffusion `sample_heun`, churn 0).

    beta_schedule 'exp' (alpha_bar = exp(-12 t)) is accepted as diffusers does for this class.
    clip_sample clips x_0 to [-clip_sample_range, clip_sample_range].
    """
    diffusers_class = "HeunDiscreteScheduler"
    order = 2
    diffax_extras: ClassVar[tuple[str, ...]] = ("rescale_betas_zero_snr",)  # not a diffusers option here

    beta_start: float = 0.00085
    beta_end: float = 0.012
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    clip_sample: bool = False
    clip_sample_range: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        sigma_schedule_name(self.use_karras_sigmas, self.use_exponential_sigmas, self.use_beta_sigmas,
                            type(self).__name__)

    def init(self, num_inference_steps: int, sample=None) -> HeunState:
        """Repeated tables ([2N - 1] timesteps) and predictor buffers shaped like `sample`."""
        schedule = sigma_schedule_name(self.use_karras_sigmas, self.use_exponential_sigmas, self.use_beta_sigmas,
                                       type(self).__name__)
        sigmas, timesteps = self.inference_sigmas(num_inference_steps, schedule)
        sigmas = repeat_for_second_order(np.concatenate([sigmas, [0.0]]))  # [2N]
        timesteps = np.concatenate([timesteps[:1], np.repeat(timesteps[1:], 2)])  # [2N - 1]
        return HeunState(timesteps=table(timesteps), sigma_in=table(sigmas[:-1]), sigmas=table(sigmas),
                         prev_derivative=buffer(sample, type(self).__name__), dt=jnp.zeros((), sample.dtype),
                         start_sample=buffer(sample, type(self).__name__))

    def step(self, state: HeunState, model_output: jax.Array, sample: jax.Array, i: jax.Array,
             key: jax.Array | None = None) -> StepOutput:
        dtype = compute_dtype(sample)
        x = sample.astype(dtype)
        first = i % 2 == 0
        # Predictor at index i: sigma_i -> sigma_{i+1}; corrector at index i: the model ran at sigma_i.
        sigmas = jnp.asarray(state.sigmas).astype(dtype)
        sigma = jnp.where(first, sigmas[i], sigmas[i - 1])
        sigma_next = jnp.where(first, sigmas[i + 1], sigmas[i])
        sigma_model = jnp.where(first, sigma, sigma_next)
        x0 = x0_from_sigma(self.prediction_type, model_output.astype(dtype), x, sigma_model)
        if self.clip_sample:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        derivative = (x - x0) / sigma_model
        prev_derivative = state.prev_derivative.astype(dtype)
        derivative = jnp.where(first, derivative, (prev_derivative + derivative) / 2)
        dt = jnp.where(first, sigma_next - sigma, state.dt.astype(dtype))
        start = jnp.where(first, x, state.start_sample.astype(dtype))
        prev = start + derivative * dt
        state = state.replace(prev_derivative=derivative.astype(state.prev_derivative.dtype),
                              dt=dt.astype(state.dt.dtype), start_sample=start.astype(state.start_sample.dtype))
        return StepOutput(prev.astype(sample.dtype), x0.astype(sample.dtype), state)
