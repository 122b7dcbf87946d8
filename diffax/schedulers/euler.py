"""Euler sampler (Karras et al. 2022, algorithm 2) on an alpha_bar schedule: diffusers' EulerDiscreteScheduler.

One model evaluation per step: x_0 from the model, the ODE derivative d = (x - x_0) / sigma, and an Euler step
to the next sigma. With s_churn > 0 ("churn", Karras et al. section 4) each step first raises the noise level
from sigma to sigma_hat = sigma (1 + gamma) by adding fresh noise, for sigmas within [s_tmin, s_tmax].
diffusers takes s_churn / s_tmin / s_tmax / s_noise as `step` arguments; here they are config fields
(`ChurnOptions`).
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from diffax.schedulers.base import StepOutput, at, check_options, compute_dtype, table
from diffax.schedulers.sigma_common import (FINAL_SIGMAS_TYPES, ChurnOptions, SigmaListState, SigmaScheduler,
                                            SigmaSpacingOptions)


@dataclasses.dataclass(frozen=True)
class EulerDiscreteScheduler(ChurnOptions, SigmaSpacingOptions, SigmaScheduler):
    """diffusers' EulerDiscreteScheduler ("Euler" in A1111 / ComfyUI, k-diffusion `sample_euler`).

    timestep_type 'continuous' (with v_prediction) feeds the model 0.25 log(sigma) instead of a training
    timestep, as EDM-style v models (e.g. SVD / Cosmos) expect. final_sigmas_type 'sigma_min' stops at the
    smallest training sigma instead of 0.
    """
    diffusers_class = "EulerDiscreteScheduler"
    order = 1

    interpolation_type: str = "linear"
    sigma_min: float | None = None
    sigma_max: float | None = None
    timestep_type: str = "discrete"
    final_sigmas_type: str = "zero"

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        # diffusers' 'log_linear' returns N + 1 sigmas for N timesteps and never reaches the final sigma.
        check_options(name, self, {"interpolation_type": ("linear",), "timestep_type": ("discrete", "continuous"),
                                   "final_sigmas_type": FINAL_SIGMAS_TYPES})
        if self.s_churn < 0:
            raise ValueError(f"{name}: s_churn must be >= 0, got {self.s_churn}")

    def init(self, num_inference_steps: int, sample=None) -> SigmaListState:
        """Sigmas [N + 1] and timesteps [N]; the Euler step keeps no history (`sample` unused)."""
        sigmas, timesteps = self.inference_sigmas(num_inference_steps, self.sigma_schedule, sigma_min=self.sigma_min,
                                                  sigma_max=self.sigma_max)
        abar = self.alphas_cumprod()
        last = np.sqrt((1 - abar[0]) / abar[0]) if self.final_sigmas_type == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [last]])
        if self.timestep_type == "continuous" and self.prediction_type == "v_prediction":
            timesteps = 0.25 * np.log(sigmas[:-1])
        return SigmaListState(timesteps=table(timesteps), sigma_in=table(sigmas[:-1]), sigmas=table(sigmas))

    def step(self, state: SigmaListState, model_output: jax.Array, sample: jax.Array, i: jax.Array,
             key: jax.Array | None = None) -> StepOutput:
        dtype = compute_dtype(sample)
        sigma = at(state.sigmas, i, dtype)
        x, sigma_hat = self.churn(sample.astype(dtype), sigma, state.sigmas.shape[0] - 1, key, sample)
        # diffusers uses sigma_hat for epsilon but sigma for v-prediction (the model saw x at sigma).
        x0 = self.denoised(model_output.astype(dtype), x, sigma_hat if self.prediction_type == "epsilon" else sigma)
        derivative = (x - x0) / sigma_hat
        prev = x + derivative * (at(state.sigmas, i + 1, dtype) - sigma_hat)
        return StepOutput(prev.astype(sample.dtype), x0.astype(sample.dtype), state)
