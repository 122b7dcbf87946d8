"""Euler sampler for flow-matching (rectified-flow) models: diffusers' FlowMatchEulerDiscreteScheduler.

A flow model on x_sigma = (1 - sigma) x_0 + sigma noise predicts the velocity v = noise - x_0
(prediction type 'flow', implied), so dx/dsigma = v and an Euler step is x + (sigma_next - sigma) v.
The sigma schedule is diffusers': N sigmas evenly spaced in t between the training ends, then shifted
(SD3: sigma' = shift sigma / (1 + (shift - 1) sigma); Flux: resolution-dependent `mu` with
use_dynamic_shifting), optionally stretched to end at `shift_terminal` and respaced (Karras / exponential).
The model's timestep is sigma * num_train_timesteps.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import flax.struct
import jax
import numpy as np

from diffax import schedules
from diffax.schedulers.base import (SchedulerState, StepOutput, at, check_options, compute_dtype, gaussian,
                                    predict_x0_eps, table)
from diffax.schedulers.sigma_common import SigmaSpacingOptions


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Flux's mu: linear in the number of latent tokens, base_shift at base_seq_len, max_shift at
    max_seq_len (diffusers' pipelines compute it the same way)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


@flax.struct.dataclass
class FlowMatchState(SchedulerState):
    sigmas: jax.Array  # [N + 1] sigma at each step, then 0 (1 with invert_sigmas)


@dataclasses.dataclass(frozen=True)
class FlowMatchEulerDiscreteScheduler(SigmaSpacingOptions):
    """diffusers' FlowMatchEulerDiscreteScheduler (SD3, Flux, ...; ComfyUI "euler" on a flow model).

    Model contract: denoise_fn(x, sigma * num_train_timesteps) -> v = noise - x_0 (x is not rescaled).
    mu: the dynamic-shift exponent diffusers takes as a `set_timesteps` argument (required when
      use_dynamic_shifting); `with_image_seq_len` sets it from the latent token count as Flux's pipeline does.
    stochastic_sampling: instead of the Euler step, re-noise the x_0 estimate to sigma_next with fresh noise.
    """
    diffusers_class: ClassVar[str] = "FlowMatchEulerDiscreteScheduler"
    order: ClassVar[int] = 1
    diffax_extras: ClassVar[tuple[str, ...]] = ("mu",)

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float | None = 0.5
    max_shift: float | None = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    invert_sigmas: bool = False
    shift_terminal: float | None = None
    time_shift_type: str = "exponential"
    stochastic_sampling: bool = False
    mu: float | None = None

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        check_options(name, self, {"time_shift_type": ("exponential", "linear")})
        if self.shift_terminal is not None and not 0 <= self.shift_terminal < 1:
            raise ValueError(f"{name}: shift_terminal must be in [0, 1), got {self.shift_terminal}")

    def with_image_seq_len(self, image_seq_len: int) -> "FlowMatchEulerDiscreteScheduler":
        """A copy with mu for `image_seq_len` latent tokens (Flux: (H / 16) * (W / 16))."""
        mu = calculate_shift(image_seq_len, self.base_image_seq_len, self.max_image_seq_len, self.base_shift,
                             self.max_shift)
        return dataclasses.replace(self, mu=mu)

    def _shifted(self, sigmas: np.ndarray) -> np.ndarray:
        if self.use_dynamic_shifting:
            if self.time_shift_type == "exponential":
                return math.exp(self.mu) / (math.exp(self.mu) + (1 / sigmas - 1))
            return self.mu / (self.mu + (1 / sigmas - 1))
        return self.shift * sigmas / (1 + (self.shift - 1) * sigmas)

    def init(self, num_inference_steps: int, sample=None) -> FlowMatchState:
        """Sigmas [N + 1] and timesteps sigma * T [N]; no history (`sample` unused)."""
        name = type(self).__name__
        if self.use_dynamic_shifting and self.mu is None:
            raise ValueError(f"{name}: use_dynamic_shifting=True needs mu: set it with "
                             "dataclasses.replace(scheduler, mu=...) or scheduler.with_image_seq_len(n)")
        T = self.num_train_timesteps
        # The training table's ends bound the inference range (shifted unless the shift is dynamic).
        train = np.linspace(1, T, T)[::-1] / T
        if not self.use_dynamic_shifting:
            train = self._shifted(train)
        sigmas = np.linspace(train[0] * T, train[-1] * T, num_inference_steps) / T
        sigmas = self._shifted(sigmas)
        if self.shift_terminal:
            one_minus = 1 - sigmas
            sigmas = 1 - one_minus / (one_minus[-1] / (1 - self.shift_terminal))
        if self.sigma_schedule == "karras":
            sigmas = schedules.karras_sigmas(sigmas[-1], sigmas[0], num_inference_steps)
        elif self.sigma_schedule == "exponential":
            sigmas = schedules.exponential_sigmas(sigmas[-1], sigmas[0], num_inference_steps)
        if self.invert_sigmas:
            sigmas = np.concatenate([1.0 - sigmas, [1.0]])
        else:
            sigmas = np.concatenate([sigmas, [0.0]])
        return FlowMatchState(timesteps=table(sigmas[:-1] * T), sigmas=table(sigmas))

    def step(self, state: FlowMatchState, model_output: jax.Array, sample: jax.Array, i: jax.Array,
             key: jax.Array | None = None) -> StepOutput:
        dtype = compute_dtype(sample)
        x, v = sample.astype(dtype), model_output.astype(dtype)
        sigma, sigma_next = at(state.sigmas, i, dtype), at(state.sigmas, i + 1, dtype)
        x0, _ = predict_x0_eps("flow_prediction", v, x, 1 - sigma, sigma)
        if self.stochastic_sampling:
            noise = gaussian(key, sample, type(self).__name__).astype(dtype)
            prev = (1 - sigma_next) * x0 + sigma_next * noise
        else:
            prev = x + (sigma_next - sigma) * v
        return StepOutput(prev.astype(sample.dtype), x0.astype(sample.dtype), state)

    def add_noise(self, state: FlowMatchState, original: jax.Array, noise: jax.Array, i: int) -> jax.Array:
        """diffusers' `scale_noise`: sigma noise + (1 - sigma) x_0 at the sigma of loop index i."""
        sigma = at(state.sigmas, i)
        return (sigma * noise + (1 - sigma) * original).astype(original.dtype)
