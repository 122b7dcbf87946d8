"""DDIM (Song et al. 2021) as a pure step over a pytree state, matching diffusers' DDIMScheduler.

One step from x_t to x_{t'} with t' = t - T // N (diffusers' rule, whatever the spacing):

    x_0, eps = prediction at t                       (clipped / thresholded x_0 if configured)
    sigma    = eta * sqrt((1 - abar_t') / (1 - abar_t) * (1 - abar_t / abar_t'))
    x_t'     = sqrt(abar_t') x_0 + sqrt(1 - abar_t' - sigma^2) eps + sigma z

eta = 0 is the deterministic DDIM sampler, eta = 1 the DDPM posterior. Past the last step abar_t' is 1
(set_alpha_to_one) or abar_0.

diffax extras: diffusers takes `eta` and `use_clipped_model_output` as arguments of every `step` call; here
they are fields of the scheduler, so one frozen config describes the whole sampler. They are not diffusers
config keys, so `to_diffusers_config` stores them under the "_diffax" key, which diffusers keeps in its
config without reading it. The old Flax DDIM in diffusers ignored eta; here eta > 0 really adds noise.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffax.schedulers.base import (SchedulerState, StepOutput, add_noise_alpha_bar, alpha_bar_coefficients, at,
                                    gaussian, predict_x0_eps)
from diffax.schedulers.ddpm import SpacedTimestepScheduler


@flax.struct.dataclass
class DDIMState(SchedulerState):
    """Per-loop-index tables: NumPy float64 from `init` (concrete, so the loop can slice by timestep);
    traced arrays once carried through the sampling scan; cast to the sample's dtype in `step`."""
    alpha_bar: jax.Array        # [S] abar_t
    alpha_bar_prev: jax.Array   # [S] abar_t' (final_alpha_cumprod past the end)
    sigma: jax.Array            # [S] eta * std of the DDPM posterior
    eps_coef: jax.Array         # [S] sqrt(1 - abar_t' - sigma^2), the weight of the predicted noise


@dataclasses.dataclass(frozen=True)
class DDIMScheduler(SpacedTimestepScheduler):
    """diffusers' DDIMScheduler config, plus `eta` and `use_clipped_model_output` (see the module doc)."""
    diffusers_class: ClassVar[str] = "DDIMScheduler"
    order: ClassVar[int] = 1
    # Fields that are not diffusers config keys (the registry stores them under "_diffax").
    diffax_extras: ClassVar[tuple[str, ...]] = ("eta", "use_clipped_model_output")

    set_alpha_to_one: bool = True
    eta: float = 0.0
    use_clipped_model_output: bool = False

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.eta <= 1.0:
            # Above 1, sigma^2 exceeds 1 - abar_t' and the noise direction's weight is the sqrt of a negative.
            raise ValueError(f"DDIMScheduler: eta must be in [0, 1], got {self.eta}")

    def init(self, num_inference_steps: int, sample=None) -> DDIMState:
        """Spaced timesteps, abar at t and t', and the step's noise and direction weights (no history:
        `sample` unused)."""
        T = self.num_train_timesteps
        timesteps = self.inference_timesteps(num_inference_steps)
        abar_table = self.alphas_cumprod()
        final = 1.0 if self.set_alpha_to_one else abar_table[0]
        # diffusers steps back by T // N even for 'linspace' / 'trailing', where t' is then not the next
        # inference timestep; kept, so trajectories match diffusers'.
        prev = timesteps - T // num_inference_steps
        abar = abar_table[timesteps]
        abar_prev = np.where(prev >= 0, abar_table[np.maximum(prev, 0)], final)
        variance = (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)
        sigma = self.eta * np.sqrt(variance)
        return DDIMState(
            timesteps=timesteps.astype(np.int32),
            alpha_bar=abar,
            alpha_bar_prev=abar_prev,
            sigma=sigma,
            eps_coef=np.sqrt(np.maximum(1 - abar_prev - sigma ** 2, 0.0)),
        )

    def step(self, state: DDIMState, model_output: jax.Array, sample: jax.Array, i: jax.Array,
             key: jax.Array | None = None) -> StepOutput:
        """x_t -> x_{t'} along the predicted noise direction, plus eta-scaled noise."""
        if model_output.shape != sample.shape:
            raise ValueError(f"DDIMScheduler: model output shape {model_output.shape} != sample shape {sample.shape}")
        dtype = sample.dtype
        alpha, sigma = alpha_bar_coefficients(at(state.alpha_bar, i, dtype))
        x0, eps = predict_x0_eps(self.prediction_type, model_output, sample, alpha, sigma)
        x0 = self.clip_x0(x0)
        if self.use_clipped_model_output:
            # The noise consistent with the clipped x_0 (equal to eps when nothing was clipped).
            _, eps = predict_x0_eps("sample", x0, sample, alpha, sigma)
        prev_sample = jnp.sqrt(at(state.alpha_bar_prev, i, dtype)) * x0 + at(state.eps_coef, i, dtype) * eps
        if self.eta > 0:
            prev_sample = prev_sample + at(state.sigma, i, dtype) * gaussian(key, sample, type(self).__name__)
        return StepOutput(prev_sample, x0, state)

    def add_noise(self, state: DDIMState, original: jax.Array, noise: jax.Array, i: int) -> jax.Array:
        """q(x_t | x_0) at the timestep of loop index i."""
        return add_noise_alpha_bar(state.alpha_bar, original, noise, i)
