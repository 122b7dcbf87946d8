"""Ancestral Euler sampler on an alpha_bar schedule: diffusers' EulerAncestralDiscreteScheduler.

Each step goes from sigma to sigma_next in two moves: a deterministic Euler step down to
sigma_down = sigma_next^2 / sigma, then fresh noise of standard deviation
sigma_up = sqrt(sigma_next^2 - sigma_down^2), so the marginal noise level lands on sigma_next while the
sample forgets part of its past (k-diffusion `sample_euler_ancestral` with eta = 1).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from diffax.schedulers.base import StepOutput, at, compute_dtype, gaussian, table
from diffax.schedulers.sigma_common import SigmaListState, SigmaScheduler


@dataclasses.dataclass(frozen=True)
class EulerAncestralDiscreteScheduler(SigmaScheduler):
    """diffusers' EulerAncestralDiscreteScheduler ("Euler a"; k-diffusion `sample_euler_ancestral`).

    prediction_type 'sample' works here (diffusers raises NotImplementedError for it): x_0 is the output.
    """
    diffusers_class = "EulerAncestralDiscreteScheduler"
    order = 1

    def init(self, num_inference_steps: int, sample=None) -> SigmaListState:
        """Sigmas [N + 1] and timesteps [N]; no history (`sample` unused)."""
        sigmas, timesteps = self.inference_sigmas(num_inference_steps)
        sigmas = np.concatenate([sigmas, [0.0]])
        return SigmaListState(timesteps=table(timesteps), sigma_in=table(sigmas[:-1]), sigmas=table(sigmas))

    def step(self, state: SigmaListState, model_output: jax.Array, sample: jax.Array, i: jax.Array,
             key: jax.Array | None = None) -> StepOutput:
        dtype = compute_dtype(sample)
        x = sample.astype(dtype)
        sigma, sigma_next = at(state.sigmas, i, dtype), at(state.sigmas, i + 1, dtype)
        x0 = self.denoised(model_output.astype(dtype), x, sigma)
        sigma_up = jnp.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2)
        sigma_down = jnp.sqrt(jnp.maximum(sigma_next ** 2 - sigma_up ** 2, 0.0))  # >= 0 despite rounding
        prev = x + (x - x0) / sigma * (sigma_down - sigma)
        prev = prev + gaussian(key, sample, type(self).__name__).astype(dtype) * sigma_up
        return StepOutput(prev.astype(sample.dtype), x0.astype(sample.dtype), state)
