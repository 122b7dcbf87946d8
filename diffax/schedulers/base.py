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

Every sampler reads its tables with `at` and turns model outputs into x_0 (and eps) with `predict_x0_eps`;
PREDICTION_TYPES lists the outputs, each class's `prediction_types` those it accepts.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffax.schedules import BETA_SCHEDULES, NoiseSchedule

# What a model can predict: the noise, v (Salimans & Ho 2022), x_0, or a flow model's velocity eps - x_0.
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")


def prediction_types_except(*excluded: str) -> tuple[str, ...]:
    """PREDICTION_TYPES without `excluded`, for samplers whose model contract lacks some of them."""
    return tuple(p for p in PREDICTION_TYPES if p not in excluded)


def check_options(owner: str, config: Any, allowed: Mapping[str, tuple]) -> None:
    """ValueError naming each config key whose value is not among those the sampler implements."""
    for key, values in allowed.items():
        value = getattr(config, key)
        if value not in values:
            raise ValueError(f"{owner}: {key}={value!r} is not supported by diffax (supported: "
                             f"{', '.join(repr(v) for v in values)})")


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
    # Fields that are not keys of the diffusers class's config (`step()` arguments there, like DDIM's eta and
    # Euler's s_churn, or diffax-only options like DPM-Solver's third_order_fix): to_diffusers_config stores
    # them under "_diffax" so a config round-trips through diffusers.
    diffax_extras: ClassVar[tuple[str, ...]] = ()
    # The entries of PREDICTION_TYPES the sampler can turn into x_0.
    prediction_types: ClassVar[tuple[str, ...]] = PREDICTION_TYPES

    def __post_init__(self):
        """Config checks: subclasses and option mixins extend it, each calling super().__post_init__()."""

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
    """Shared config of samplers on diffusers' discrete training schedule (alpha_bar_t)."""
    # The beta_schedule values the sampler's diffusers class accepts (trained_betas, when given, wins).
    beta_schedules: ClassVar[tuple[str, ...]] = BETA_SCHEDULES

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    rescale_betas_zero_snr: bool = False

    def __post_init__(self):
        super().__post_init__()
        check_options(type(self).__name__, self, {"prediction_type": self.prediction_types})
        if self.trained_betas is None:
            check_options(type(self).__name__, self, {"beta_schedule": self.beta_schedules})
        elif not isinstance(self.trained_betas, tuple):
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))

    @property
    def noise_schedule(self) -> NoiseSchedule:
        return NoiseSchedule(self.num_train_timesteps, self.beta_start, self.beta_end, self.beta_schedule,
                             self.trained_betas, self.rescale_betas_zero_snr)

    def alphas_cumprod(self) -> np.ndarray:
        """[T] float64 training alpha_bar table."""
        return self.noise_schedule.alphas_cumprod()


@dataclasses.dataclass(frozen=True)
class ThresholdingOptions(Scheduler):
    """diffusers' dynamic-thresholding config of x_0 (see `threshold_sample`)."""
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0

    def threshold(self, x0: jax.Array) -> jax.Array:
        """x_0 thresholded when the config asks for it."""
        if self.thresholding:
            return threshold_sample(x0, self.dynamic_thresholding_ratio, self.sample_max_value)
        return x0


def at(table: np.ndarray | jax.Array, i: jax.Array | int, dtype: Any = None) -> jax.Array:
    """table[i] (in `dtype` when given), for a NumPy table (a state fresh from `init`, which the loop can
    slice on the host) or a traced one (carried through the sampling scan), and a traced or Python index."""
    value = jnp.asarray(table)[i]
    return value if dtype is None else value.astype(dtype)


def table(values: Any) -> np.ndarray:
    """A float64 NumPy table for a state: concrete, so the loop can slice by timestep outside jit; it becomes
    a traced array (float32, or float64 under x64) once carried through the sampling scan."""
    return np.asarray(values, dtype=np.float64)


def compute_dtype(sample: jax.Array) -> jnp.dtype:
    """The step arithmetic runs in at least float32, like diffusers' `sample.to(torch.float32)`."""
    return jnp.promote_types(sample.dtype, jnp.float32)


def gaussian(key: jax.Array | None, sample: jax.Array, owner: str) -> jax.Array:
    """The step's standard normal draw, shaped like `sample`. `key` is one key, or one typed key per row
    ([B], from `diffax.sampling.sample` with per-row keys): then row b is drawn from key b alone, so it does
    not depend on the batch it is in."""
    if key is None:
        raise ValueError(f"{owner}.step draws noise: pass a PRNG key")
    if key.ndim == 1 and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.vmap(lambda k: jax.random.normal(k, sample.shape[1:], sample.dtype))(key)
    return jax.random.normal(key, sample.shape, sample.dtype)


def buffer(sample: jax.Array | jax.ShapeDtypeStruct | None, owner: str, *lead: int) -> jax.Array:
    """A zeroed history buffer [*lead, *sample.shape] for the scan carry; `sample` is an array or a
    jax.ShapeDtypeStruct shaped like x (the buffers must exist, with their final shape, before the loop)."""
    if sample is None:
        raise ValueError(f"{owner} keeps a history across loop indices: call init(num_inference_steps, sample) "
                         "with an array (or jax.ShapeDtypeStruct) shaped like x")
    return jnp.zeros(tuple(lead) + tuple(sample.shape), sample.dtype)


def alpha_bar_coefficients(alpha_bar: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(alpha, sigma) = (sqrt(alpha_bar), sqrt(1 - alpha_bar)): x_t = alpha x_0 + sigma eps."""
    return jnp.sqrt(alpha_bar), jnp.sqrt(1 - alpha_bar)


def add_noise_alpha_bar(alphas_cumprod: jax.Array, original: jax.Array, noise: jax.Array,
                        t: jax.Array) -> jax.Array:
    """q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps for a scalar or per-example t."""
    abar = at(alphas_cumprod, t, original.dtype)
    alpha, sigma = alpha_bar_coefficients(abar.reshape(abar.shape + (1,) * (original.ndim - abar.ndim)))
    return alpha * original + sigma * noise


def predict_x0_eps(prediction_type: str, model_output: jax.Array, sample: jax.Array, alpha: jax.Array | float,
                   sigma: jax.Array, input_variance: jax.Array | float = 1.0) -> tuple[jax.Array, jax.Array]:
    """(x_0, eps) from a model output at a noise level where x = alpha x_0 + sigma eps.

    input_variance: alpha^2 + sigma^2, which the model input x / sqrt(input_variance) divides out: 1 for
    the variance-preserving samplers (pass their (alpha, sigma) pair), sigma^2 + 1 for the variance-exploding
    x of the sigma-space samplers (alpha = 1). v is defined on that input: v = (alpha eps - sigma x_0) /
    sqrt(input_variance). flow_prediction is the velocity eps - x_0 of x = (1 - sigma) x_0 + sigma eps.
    """
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha, model_output
    if prediction_type == "sample":
        return model_output, (sample - alpha * model_output) / sigma
    if prediction_type == "v_prediction":
        scale = jnp.sqrt(input_variance)
        x0 = alpha * sample / input_variance - sigma / scale * model_output
        return x0, alpha / scale * model_output + sigma * sample / input_variance
    if prediction_type == "flow_prediction":
        x0 = sample - sigma * model_output
        return x0, x0 + model_output
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def threshold_sample(x0: jax.Array, ratio: float, max_value: float) -> jax.Array:
    """Dynamic thresholding (Imagen, Saharia et al. 2022): per example, clip x_0 to the `ratio` quantile s
    of |x_0| (at least 1, at most `max_value`) and divide by s."""
    flat = jnp.abs(x0.reshape(x0.shape[0], -1)).astype(jnp.float32)
    s = jnp.clip(jnp.quantile(flat, ratio, axis=1), 1.0, max_value)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
    return (jnp.clip(x0, -s, s) / s).astype(x0.dtype)
