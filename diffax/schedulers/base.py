"""The protocol every diffax sampler follows: a frozen config object with pure `init` and `step`.

A scheduler is a frozen, hashable dataclass whose fields are exactly its diffusers config keys (so it can
be a static argument of `jax.jit`, and `from_diffusers_config` is a field-by-field copy). It holds no
arrays and no mutable state. Its methods are pure functions:

    state = scheduler.init(num_inference_steps, noise)   # tables and buffers, a pytree
    x = noise * scheduler.init_noise_sigma(state)
    for i in range(len(state.timesteps)):                # a lax.scan in diffax.sampling.sample
        t = state.timesteps[i]
        out = model(scheduler.scale_model_input(state, x, i), t)
        x, x0_pred, state = scheduler.step(state, out, x, i, key_i)

`state.timesteps` lists one entry per model evaluation: a second-order sampler (Heun, DPM2, PRK) repeats
timesteps exactly as diffusers does, so the loop is uniform and the trajectories line up step for step.
`i` is the loop index into `state.timesteps`; samplers that need more history (multistep buffers, the
Heun predictor, a step counter when starting part-way for img2img) keep it in their state.

Randomness: a stochastic step draws its noise as `jax.random.normal(key, sample.shape, sample.dtype)`,
at most once per step, from the key it is given; `sample` passes `jax.random.fold_in(key, i)`. Tests
reproduce diffusers' trajectories by handing it the same noise.

Tables (`init`) are built in NumPy: they depend only on the config and Python ints, so their shapes and
values are constants of the compiled program, and `denoising_end`-style slicing can look at them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffax.schedules import NoiseSchedule

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")


@flax.struct.dataclass
class SchedulerState:
    """Fields every state has. Subclasses add their own tables and buffers."""
    timesteps: jax.Array  # [S] the model's timestep input at each loop index (S model evaluations)


class StepOutput(NamedTuple):
    prev_sample: jax.Array            # x at the next loop index, same shape as the input sample
    pred_original_sample: jax.Array   # the step's estimate of x_0 (for previews and refiners)
    state: Any                        # the updated scheduler state


@dataclasses.dataclass(frozen=True)
class Scheduler:
    """Base class: subclasses are frozen dataclasses of their diffusers config keys."""

    # diffusers' class name, for config interop.
    diffusers_class: ClassVar[str] = ""
    # Model evaluations per inference step, as diffusers' `scheduler.order` (used to start img2img part-way).
    order: ClassVar[int] = 1
    # Fields diffusers passes to `step()` rather than keeping in its config (DDIM's eta, Euler's s_churn):
    # to_diffusers_config stores them under "_diffax" so a config round-trips through diffusers.
    diffax_extras: ClassVar[tuple[str, ...]] = ()

    def init(self, num_inference_steps: int, sample: jax.Array | jax.ShapeDtypeStruct | None = None
             ) -> SchedulerState:
        """Tables and zeroed buffers for a run of `num_inference_steps` inference steps. `sample` (an array
        or a ShapeDtypeStruct) gives history buffers their shape and dtype; samplers with no buffers ignore
        it, the others raise without it."""
        raise NotImplementedError

    def init_noise_sigma(self, state: SchedulerState) -> jax.Array | float:
        """Standard deviation of the initial noise: 1 for DDPM-style samplers, sigma_max for sigma-space ones."""
        return 1.0

    def scale_model_input(self, state: SchedulerState, sample: jax.Array, i: jax.Array) -> jax.Array:
        """The model input at loop index `i` (identity except for sigma-space samplers)."""
        return sample

    def step(self, state: SchedulerState, model_output: jax.Array, sample: jax.Array, i: jax.Array,
             key: jax.Array | None = None) -> StepOutput:
        """One loop index: x at index i -> x at index i + 1."""
        raise NotImplementedError

    def add_noise(self, state: SchedulerState, original: jax.Array, noise: jax.Array, i: int) -> jax.Array:
        """x_0 noised to the level of loop index `i` (img2img's starting point)."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class DiscreteScheduler(Scheduler):
    """Shared config and helpers of samplers on diffusers' discrete training schedule (alpha_bar_t)."""
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    rescale_betas_zero_snr: bool = False

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"{type(self).__name__}: prediction_type must be one of {PREDICTION_TYPES}, "
                             f"got {self.prediction_type!r}")
        if self.trained_betas is not None and not isinstance(self.trained_betas, tuple):
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))

    @property
    def noise_schedule(self) -> NoiseSchedule:
        return NoiseSchedule(self.num_train_timesteps, self.beta_start, self.beta_end, self.beta_schedule,
                             self.trained_betas, self.rescale_betas_zero_snr)

    def alphas_cumprod(self) -> np.ndarray:
        """[T] float64 training alpha_bar table."""
        return self.noise_schedule.alphas_cumprod()


def add_noise_alpha_bar(alphas_cumprod: jax.Array, original: jax.Array, noise: jax.Array,
                        t: jax.Array) -> jax.Array:
    """q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps for a scalar or per-example t."""
    abar = jnp.asarray(alphas_cumprod)[t].astype(original.dtype)
    abar = abar.reshape(abar.shape + (1,) * (original.ndim - abar.ndim))
    return jnp.sqrt(abar) * original + jnp.sqrt(1 - abar) * noise


def predict_x0_eps(prediction_type: str, model_output: jax.Array, sample: jax.Array,
                   alpha_prod_t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x_0, eps) from a model output under the alpha_bar parameterisation x_t = a x_0 + s eps."""
    a, s = jnp.sqrt(alpha_prod_t), jnp.sqrt(1 - alpha_prod_t)
    if prediction_type == "epsilon":
        return (sample - s * model_output) / a, model_output
    if prediction_type == "sample":
        return model_output, (sample - a * model_output) / s
    if prediction_type == "v_prediction":
        return a * sample - s * model_output, a * model_output + s * sample
    raise ValueError(f"prediction_type {prediction_type!r} is not defined on an alpha_bar schedule")


def threshold_sample(x0: jax.Array, ratio: float, max_value: float) -> jax.Array:
    """Dynamic thresholding (Imagen, Saharia et al. 2022): per example, clip x_0 to the `ratio` quantile s
    of |x_0| (at least 1, at most `max_value`) and divide by s."""
    flat = jnp.abs(x0.reshape(x0.shape[0], -1)).astype(jnp.float32)
    s = jnp.clip(jnp.quantile(flat, ratio, axis=1), 1.0, max_value)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
    return (jnp.clip(x0, -s, s) / s).astype(x0.dtype)
