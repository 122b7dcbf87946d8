"""Euler sampler (Karras et al. 2022, algorithm 2) on an alpha_bar schedule: diffusers' EulerDiscreteScheduler.

One model evaluation per step: x_0 from the model, the ODE derivative d = (x - x_0) / sigma, and an Euler step
to the next sigma. With s_churn > 0 ("churn", Karras et al. section 4) each step first raises the noise level
from sigma to sigma_hat = sigma (1 + gamma) by adding fresh noise, for sigmas within [s_tmin, s_tmax].
diffusers takes s_churn / s_tmin / s_tmax / s_noise as `step` arguments; here they are config fields, so one
jitted program holds them as constants.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffax.schedulers.base import StepOutput
from diffax.schedulers.sigma_common import (SigmaScheduler, SigmaState, at, compute_dtype, gaussian,
                                            sigma_schedule_name, table, x0_from_sigma)


@flax.struct.dataclass
class EulerState(SigmaState):
    sigmas: jax.Array  # [N + 1] sigma at each step, then the final sigma (0 or the smallest training sigma)


@dataclasses.dataclass(frozen=True)
class EulerDiscreteScheduler(SigmaScheduler):
    """diffusers' EulerDiscreteScheduler ("Euler" in A1111 / ComfyUI, k-diffusion `sample_euler`).

    timestep_type 'continuous' (with v_prediction) feeds the model 0.25 log(sigma) instead of a training
    timestep, as EDM-style v models (e.g. SVD / Cosmos) expect. final_sigmas_type 'sigma_min' stops at the
    smallest training sigma instead of 0.
    """
    diffusers_class = "EulerDiscreteScheduler"
    order = 1
    diffax_extras: ClassVar[tuple[str, ...]] = ("s_churn", "s_tmin", "s_tmax", "s_noise")

    interpolation_type: str = "linear"
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    timestep_type: str = "discrete"
    final_sigmas_type: str = "zero"
    # Step arguments in diffusers; config here (see the module docstring).
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = float("inf")
    s_noise: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        sigma_schedule_name(self.use_karras_sigmas, self.use_exponential_sigmas, self.use_beta_sigmas, name)
        if self.interpolation_type != "linear":
            # diffusers' 'log_linear' returns N + 1 sigmas for N timesteps and never reaches the final sigma.
            raise ValueError(f"{name}: interpolation_type must be 'linear', got {self.interpolation_type!r}")
        if self.timestep_type not in ("discrete", "continuous"):
            raise ValueError(f"{name}: timestep_type must be 'discrete' or 'continuous', "
                             f"got {self.timestep_type!r}")
        if self.final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"{name}: final_sigmas_type must be 'zero' or 'sigma_min', "
                             f"got {self.final_sigmas_type!r}")
        if self.s_churn < 0:
            raise ValueError(f"{name}: s_churn must be >= 0, got {self.s_churn}")

    def init(self, num_inference_steps: int, sample=None) -> EulerState:
        """Sigmas [N + 1] and timesteps [N]; the Euler step keeps no history (`sample` unused)."""
        schedule = sigma_schedule_name(self.use_karras_sigmas, self.use_exponential_sigmas, self.use_beta_sigmas,
                                       type(self).__name__)
        sigmas, timesteps = self.inference_sigmas(num_inference_steps, schedule, sigma_min=self.sigma_min,
                                                  sigma_max=self.sigma_max)
        abar = self.alphas_cumprod()
        last = np.sqrt((1 - abar[0]) / abar[0]) if self.final_sigmas_type == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [last]])
        if self.timestep_type == "continuous" and self.prediction_type == "v_prediction":
            timesteps = 0.25 * np.log(sigmas[:-1])
        return EulerState(timesteps=table(timesteps), sigma_in=table(sigmas[:-1]), sigmas=table(sigmas))

    def step(self, state: EulerState, model_output: jax.Array, sample: jax.Array, i: jax.Array,
             key: jax.Array | None = None) -> StepOutput:
        dtype = compute_dtype(sample)
        x = sample.astype(dtype)
        out = model_output.astype(dtype)
        sigma = at(state.sigmas, i, dtype)
        sigma_hat = sigma
        if self.s_churn > 0:
            num_steps = state.sigmas.shape[0] - 1
            churn = jnp.logical_and(self.s_tmin <= sigma, sigma <= self.s_tmax)
            gamma = jnp.where(churn, min(self.s_churn / num_steps, 2 ** 0.5 - 1), 0.0)
            sigma_hat = sigma * (gamma + 1)
            noise = gaussian(key, sample, type(self).__name__).astype(dtype) * self.s_noise
            # max: with gamma = 0, XLA may fuse the difference into an FMA that rounds to a tiny negative.
            x = x + noise * jnp.sqrt(jnp.maximum(sigma_hat ** 2 - sigma ** 2, 0.0))
        # diffusers uses sigma_hat for epsilon but sigma for v-prediction (the model saw x at sigma).
        x0 = x0_from_sigma(self.prediction_type, out, x,
                           sigma_hat if self.prediction_type == "epsilon" else sigma)
        derivative = (x - x0) / sigma_hat
        prev = x + derivative * (at(state.sigmas, i + 1, dtype) - sigma_hat)
        return StepOutput(prev.astype(sample.dtype), x0.astype(sample.dtype), state)
