"""DDPM ancestral sampling (Ho et al. 2020) as a pure step over a pytree state, matching diffusers'
DDPMScheduler number for number.

One step from x_t to x_{t'} (t' the next inference timestep, -1 after the last) samples the posterior
q(x_{t'} | x_t, x_0) with x_0 predicted by the model:

    mean = sqrt(abar_t') beta / (1 - abar_t) * x_0 + sqrt(alpha) (1 - abar_t') / (1 - abar_t) * x_t
    x_t' = mean + std * z,      alpha = abar_t / abar_t',  beta = 1 - alpha

where std comes from `variance_type`: the posterior variance beta~ = (1 - abar_t') / (1 - abar_t) beta
("fixed_small"), the forward variance beta ("fixed_large"), or a per-pixel value the model predicts in
extra channels ("learned", "learned_range": Nichol & Dhariwal 2021 interpolate log beta~ and log beta).
As in diffusers, no noise is added at training timestep 0, and with fewer inference steps than training
steps t' is simply the next entry of the spaced timesteps.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffax.schedulers.base import (DiscreteScheduler, SchedulerState, StepOutput, ThresholdingOptions,
                                    add_noise_alpha_bar, alpha_bar_coefficients, at, check_options, gaussian,
                                    predict_x0_eps, prediction_types_except)
from diffax.schedules import TIMESTEP_SPACINGS, spaced_timesteps

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned",
                  "learned_range")


@dataclasses.dataclass(frozen=True)
class ClipSampleOptions(ThresholdingOptions):
    """diffusers' x_0 clipping config of DDPM, DDIM and LCM: dynamic thresholding if enabled, else clipping
    to +-clip_sample_range if enabled (diffusers' order)."""
    clip_sample: bool = True
    clip_sample_range: float = 1.0

    def clip_x0(self, x0: jax.Array) -> jax.Array:
        """x_0 thresholded or clipped as configured."""
        if self.thresholding:
            return self.threshold(x0)
        if self.clip_sample:
            return jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        return x0


@dataclasses.dataclass(frozen=True)
class SpacedTimestepScheduler(ClipSampleOptions, DiscreteScheduler):
    """Config shared by DDPM and DDIM: integer timesteps spaced over the training range, x_0 clipping."""
    prediction_types: ClassVar[tuple[str, ...]] = prediction_types_except("flow_prediction")

    timestep_spacing: str = "leading"
    steps_offset: int = 0

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        check_options(name, self, {"timestep_spacing": TIMESTEP_SPACINGS})
        if not 0.0 < self.dynamic_thresholding_ratio <= 1.0:
            raise ValueError(f"{name}: dynamic_thresholding_ratio must be in (0, 1], "
                             f"got {self.dynamic_thresholding_ratio}")
        if self.clip_sample_range <= 0:
            raise ValueError(f"{name}: clip_sample_range must be > 0, got {self.clip_sample_range}")

    def inference_timesteps(self, num_inference_steps: int) -> np.ndarray:
        """The spaced timesteps [N] int64, descending; ValueError where the offset pushes them past T - 1."""
        T = self.num_train_timesteps
        timesteps = spaced_timesteps(num_inference_steps, T, self.timestep_spacing, self.steps_offset)
        if timesteps.max() >= T or timesteps.min() < 0:
            raise ValueError(f"{type(self).__name__}: timesteps {timesteps.tolist()} leave [0, {T}) "
                             f"(timestep_spacing={self.timestep_spacing!r}, steps_offset={self.steps_offset})")
        return timesteps


@flax.struct.dataclass
class DDPMState(SchedulerState):
    """Per-loop-index tables: NumPy float64 from `init` (concrete, so the loop can slice by timestep);
    traced arrays once carried through the sampling scan; cast to the sample's dtype in `step`."""
    alpha_bar: jax.Array        # [S] abar_t
    x0_coef: jax.Array          # [S] coefficient of x_0 in the posterior mean
    sample_coef: jax.Array      # [S] coefficient of x_t in the posterior mean
    log_var_small: jax.Array    # [S] log beta~ (clamped at 1e-20 as diffusers does)
    log_beta: jax.Array         # [S] log beta
    noise_mask: jax.Array       # [S] bool: noise is added (training timestep t > 0)


@dataclasses.dataclass(frozen=True)
class DDPMScheduler(SpacedTimestepScheduler):
    """diffusers' DDPMScheduler config; `step` is the ancestral sampler.

    With variance_type "learned" / "learned_range" the model output has 2C channels on the last axis
    ([..., :C] the prediction, [..., C:] the variance: the variance itself for "learned", a value in
    [-1, 1] interpolating log beta~ .. log beta for "learned_range").
    """
    diffusers_class: ClassVar[str] = "DDPMScheduler"
    order: ClassVar[int] = 1

    variance_type: str = "fixed_small"

    def __post_init__(self):
        super().__post_init__()
        check_options(type(self).__name__, self, {"variance_type": VARIANCE_TYPES})

    @property
    def learned_variance(self) -> bool:
        """Whether the model predicts the variance in a second set of C channels."""
        return self.variance_type in ("learned", "learned_range")

    def init(self, num_inference_steps: int, sample=None) -> DDPMState:
        """Spaced timesteps and the posterior coefficients of each step (no history: `sample` unused)."""
        timesteps = self.inference_timesteps(num_inference_steps)
        abar_table = self.alphas_cumprod()
        abar = abar_table[timesteps]
        # The previous timestep is the next inference timestep; after the last one, abar = 1 (x_0 itself).
        abar_prev = np.concatenate([abar_table[timesteps[1:]], [1.0]])
        alpha = abar / abar_prev
        beta = 1.0 - alpha
        var_small = np.maximum((1.0 - abar_prev) / (1.0 - abar) * beta, 1e-20)
        return DDPMState(
            timesteps=timesteps.astype(np.int32),
            alpha_bar=abar,
            x0_coef=np.sqrt(abar_prev) * beta / (1.0 - abar),
            sample_coef=np.sqrt(alpha) * (1.0 - abar_prev) / (1.0 - abar),
            log_var_small=np.log(var_small),
            log_beta=np.log(beta),
            noise_mask=timesteps > 0,
        )

    def _std(self, state: DDPMState, i: jax.Array, predicted_variance: jax.Array | None,
             dtype) -> jax.Array:
        """Standard deviation of the noise added at loop index i: a scalar or per pixel (learned)."""
        log_small, log_beta = at(state.log_var_small, i, dtype), at(state.log_beta, i, dtype)
        vt = self.variance_type
        if vt in ("fixed_small", "fixed_small_log"):
            return jnp.exp(0.5 * log_small)
        if vt in ("fixed_large", "fixed_large_log"):
            # diffusers' fixed_large_log takes sqrt(log beta), which is NaN (log beta < 0): we use the
            # intended exp(0.5 log beta) = sqrt(beta), i.e. the same noise as fixed_large.
            return jnp.exp(0.5 * log_beta)
        if vt == "learned":
            return jnp.sqrt(predicted_variance)
        frac = (predicted_variance + 1) / 2  # learned_range
        return jnp.exp(0.5 * (frac * log_beta + (1 - frac) * log_small))

    def step(self, state: DDPMState, model_output: jax.Array, sample: jax.Array, i: jax.Array,
             key: jax.Array | None = None) -> StepOutput:
        """x_t -> x_{t'}: posterior mean from the predicted x_0, plus noise unless t == 0."""
        channels = sample.shape[-1]
        predicted_variance = None
        if self.learned_variance:
            if model_output.shape[-1] != 2 * channels:
                raise ValueError(f"DDPMScheduler(variance_type={self.variance_type!r}) needs a model output "
                                 f"with 2 * {channels} channels on the last axis, got {model_output.shape}")
            model_output, predicted_variance = model_output[..., :channels], model_output[..., channels:]
        elif model_output.shape != sample.shape:
            raise ValueError(f"DDPMScheduler: model output shape {model_output.shape} != sample shape "
                             f"{sample.shape} (variance_type={self.variance_type!r})")
        noise = gaussian(key, sample, type(self).__name__)
        dtype = sample.dtype
        alpha, sigma = alpha_bar_coefficients(at(state.alpha_bar, i, dtype))
        x0, _ = predict_x0_eps(self.prediction_type, model_output, sample, alpha, sigma)
        x0 = self.clip_x0(x0)
        mean = at(state.x0_coef, i, dtype) * x0 + at(state.sample_coef, i, dtype) * sample
        std = self._std(state, i, predicted_variance, dtype)
        # where, not a product: a learned variance may be invalid at t == 0, where diffusers never reads it.
        prev_sample = jnp.where(at(state.noise_mask, i), mean + std * noise, mean)
        return StepOutput(prev_sample, x0, state)

    def add_noise(self, state: DDPMState, original: jax.Array, noise: jax.Array, i: int) -> jax.Array:
        """q(x_t | x_0) at the timestep of loop index i."""
        return add_noise_alpha_bar(state.alpha_bar, original, noise, i)
