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
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffax import schedules
from diffax.schedulers.base import StepOutput
from diffax.schedulers.sigma_common import (SigmaScheduler, SigmaState, at, buffer, compute_dtype, gaussian,
                                            repeat_for_second_order, sigma_schedule_name, table, x0_from_sigma)


@flax.struct.dataclass
class KDPM2AncestralState(SigmaState):
    sigmas: jax.Array        # [2N + 2] repeated sigma table
    sigmas_mid: jax.Array    # [2N + 2] repeated log-midpoints sqrt(sigma_k sigma_down_k), 0 for the last step
    sigmas_up: jax.Array     # [2N + 2] repeated ancestral noise levels
    sigmas_down: jax.Array   # [2N + 2] repeated deterministic targets
    start_sample: jax.Array  # [*sample] x at the start of the step


@dataclasses.dataclass(frozen=True)
class KDPM2AncestralDiscreteScheduler(SigmaScheduler):
    """diffusers' KDPM2AncestralDiscreteScheduler ("DPM2 a" in A1111 / ComfyUI).

    With use_karras_sigmas the timesteps are rounded to integers, as diffusers does for this class.
    prediction_type 'sample' works here (diffusers raises NotImplementedError for it).
    """
    diffusers_class = "KDPM2AncestralDiscreteScheduler"
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

    def init(self, num_inference_steps: int, sample=None) -> KDPM2AncestralState:
        """Interleaved tables ([2N - 1] timesteps) and the step's starting-sample buffer."""
        schedule = sigma_schedule_name(self.use_karras_sigmas, self.use_exponential_sigmas, self.use_beta_sigmas,
                                       type(self).__name__)
        sigmas, timesteps = self.inference_sigmas(num_inference_steps, schedule,
                                                  round_timesteps=schedule == "karras")
        log_train = np.log(schedules.sigmas_from_alphas_cumprod(self.alphas_cumprod()))
        sigmas = np.concatenate([sigmas, [0.0]])  # [N + 1]
        sigmas_next = np.concatenate([sigmas[1:], [0.0]])
        up = np.zeros_like(sigmas)  # the entry for sigma = 0 is never used (0 there, NaN in diffusers)
        pos = sigmas > 0
        up[pos] = np.sqrt(sigmas_next[pos] ** 2 * (sigmas[pos] ** 2 - sigmas_next[pos] ** 2) / sigmas[pos] ** 2)
        down = np.sqrt(np.maximum(sigmas_next ** 2 - up ** 2, 0.0))
        mid = np.sqrt(sigmas * down)
        mid[-2:] = 0.0  # the last step is Euler to 0 (no midpoint)
        t_mid = schedules.sigma_to_t(mid[:-2], log_train)
        loop_t = np.concatenate([timesteps[:1], np.stack([t_mid, timesteps[1:]], axis=-1).reshape(-1)])
        sigmas_rep, mid_rep = repeat_for_second_order(sigmas), repeat_for_second_order(mid)
        # The model runs at sigma_k on even indices and at the step's midpoint (stored one entry back) on odd.
        n = len(loop_t)
        sigma_in = np.where(np.arange(n) % 2 == 0, sigmas_rep[:n], mid_rep[np.maximum(np.arange(n) - 1, 0)])
        return KDPM2AncestralState(
            timesteps=table(loop_t), sigma_in=table(sigma_in), sigmas=table(sigmas_rep),
            sigmas_mid=table(mid_rep), sigmas_up=table(repeat_for_second_order(up)),
            sigmas_down=table(repeat_for_second_order(down)), start_sample=buffer(sample, type(self).__name__))

    def step(self, state: KDPM2AncestralState, model_output: jax.Array, sample: jax.Array, i: jax.Array,
             key: jax.Array | None = None) -> StepOutput:
        dtype = compute_dtype(sample)
        x = sample.astype(dtype)
        first = i % 2 == 0
        j = jnp.where(first, i, i - 1)  # the step's entry in the repeated tables
        sigma = at(state.sigmas, j, dtype)
        sigma_mid = at(state.sigmas_mid, j, dtype)
        sigma_model = jnp.where(first, sigma, sigma_mid)
        x0 = x0_from_sigma(self.prediction_type, model_output.astype(dtype), x, sigma_model)
        derivative = (x - x0) / sigma_model
        dt = jnp.where(first, sigma_mid - sigma, at(state.sigmas_down, j, dtype) - sigma)
        start = jnp.where(first, x, state.start_sample.astype(dtype))
        prev = start + derivative * dt
        noise = gaussian(key, sample, type(self).__name__).astype(dtype)
        prev = jnp.where(first, prev, prev + noise * at(state.sigmas_up, j, dtype))
        state = state.replace(start_sample=start.astype(state.start_sample.dtype))
        return StepOutput(prev.astype(sample.dtype), x0.astype(sample.dtype), state)
