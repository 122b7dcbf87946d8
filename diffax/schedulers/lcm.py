"""Latent Consistency Model sampling (Luo et al. 2023, arXiv:2310.04378), diffusers' LCMScheduler.

A consistency model maps x_t straight to x_0 through the boundary-condition parameterisation
f(x, t) = c_skip(t) x + c_out(t) x0_pred(x, t), with c_skip(0) = 1, c_out(0) = 0. Multistep sampling
alternates that jump with re-noising to the next timestep's level (fresh noise every step but the last).
The timesteps are a subset of the `original_inference_steps`-point schedule the model was distilled on.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffax.schedulers.base import (DiscreteScheduler, SchedulerState, StepOutput, add_noise_alpha_bar,
                                    alpha_bar_coefficients, at, gaussian, predict_x0_eps, prediction_types_except)
from diffax.schedulers.ddpm import ClipSampleOptions

SIGMA_DATA = 0.5  # the data standard deviation in the consistency-model boundary condition


@flax.struct.dataclass
class LCMState(SchedulerState):
    alphas_cumprod: jax.Array    # [T] training alpha_bar (img2img noising)
    alpha_prod_t: jax.Array      # [N] alpha_bar at each step's timestep
    alpha_prod_prev: jax.Array   # [N] alpha_bar at the next step's timestep (re-noising level)
    c_skip: jax.Array            # [N]
    c_out: jax.Array             # [N]


def lcm_timesteps(num_inference_steps: int, original_inference_steps: int, num_train_timesteps: int) -> np.ndarray:
    """[N] int64 descending: N evenly strided picks from the distillation schedule k - 1, 2k - 1, ..., T - 1
    (k = T // original_inference_steps), starting from its noisiest end."""
    N, M, T = num_inference_steps, original_inference_steps, num_train_timesteps
    if M > T:
        raise ValueError(f"LCMScheduler: original_inference_steps ({M}) cannot exceed num_train_timesteps ({T})")
    if not 0 < N <= M:
        raise ValueError(f"LCMScheduler: num_inference_steps must be in [1, {M}] (original_inference_steps), "
                         f"got {N}")
    origin = (np.arange(1, M + 1) * (T // M) - 1)[::-1]
    picks = np.floor(np.linspace(0, M, num=N, endpoint=False)).astype(np.int64)
    return origin[picks].astype(np.int64)


@dataclasses.dataclass(frozen=True)
class LCMScheduler(ClipSampleOptions, DiscreteScheduler):
    """diffusers' LCMScheduler config; fields and defaults are diffusers'.

    As in diffusers, timestep_spacing and steps_offset are accepted but do not change the schedule (the
    timesteps always come from original_inference_steps). diffusers' `strength` argument of set_timesteps
    (img2img that re-spaces the schedule) is not part of `init`; img2img here slices the full schedule.
    """
    diffusers_class: ClassVar[str] = "LCMScheduler"
    order: ClassVar[int] = 1
    prediction_types: ClassVar[tuple[str, ...]] = prediction_types_except("flow_prediction")

    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    original_inference_steps: int = 50
    clip_sample: bool = False
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    timestep_spacing: str = "leading"
    timestep_scaling: float = 10.0

    def init(self, num_inference_steps: int,
             sample: jax.Array | jax.ShapeDtypeStruct | None = None) -> LCMState:
        """Timesteps and per-step coefficients for N steps (`sample` is unused: LCM keeps no history)."""
        alphas_cumprod = self.alphas_cumprod()
        ts = lcm_timesteps(num_inference_steps, self.original_inference_steps, self.num_train_timesteps)
        # The last step returns the denoised sample; its re-noising level (diffusers: its own timestep) is unused.
        prev_ts = np.append(ts[1:], ts[-1])
        scaled = ts * self.timestep_scaling
        c_skip = SIGMA_DATA ** 2 / (scaled ** 2 + SIGMA_DATA ** 2)
        c_out = scaled / np.sqrt(scaled ** 2 + SIGMA_DATA ** 2)
        return LCMState(timesteps=ts, alphas_cumprod=alphas_cumprod, alpha_prod_t=alphas_cumprod[ts],
                        alpha_prod_prev=alphas_cumprod[prev_ts], c_skip=c_skip, c_out=c_out)

    def step(self, state: LCMState, model_output: jax.Array, sample: jax.Array, i: jax.Array,
             key: jax.Array | None = None) -> StepOutput:
        """Consistency jump to x_0, then (except at the last step) re-noise to the next timestep."""
        alpha, sigma = alpha_bar_coefficients(at(state.alpha_prod_t, i))
        x0, _ = predict_x0_eps(self.prediction_type, model_output, sample, alpha, sigma)
        x0 = self.clip_x0(x0)
        denoised = at(state.c_out, i) * x0 + at(state.c_skip, i) * sample
        noise = gaussian(key, sample, type(self).__name__)
        alpha_prev, sigma_prev = alpha_bar_coefficients(at(state.alpha_prod_prev, i))
        renoised = alpha_prev * denoised + sigma_prev * noise
        prev = jnp.where(i == state.timesteps.shape[0] - 1, denoised, renoised)
        return StepOutput(prev.astype(sample.dtype), denoised.astype(sample.dtype), state)

    def add_noise(self, state: LCMState, original: jax.Array, noise: jax.Array, i: int) -> jax.Array:
        return add_noise_alpha_bar(state.alphas_cumprod, original, noise, state.timesteps[i])
