"""Pseudo numerical methods for diffusion models (Liu et al. 2022, arXiv:2202.09778), diffusers'
PNDMScheduler: three Runge-Kutta warm-up steps (PRK, four model evaluations each) then linear multistep
(PLMS, one evaluation each, Adams-Bashforth on the noise prediction). With skip_prk_steps the warm-up is a
single Heun-like pair of evaluations at repeated timesteps, as Stable Diffusion's PNDM config uses.

diffusers dispatches on an internal counter of model evaluations; so does this step, with the counter and
the running sums in the state, so a run that starts part-way (img2img) behaves as diffusers does too.
`state.timesteps` repeats timesteps exactly as diffusers' table does (one entry per model evaluation).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffax.schedulers.base import (DiscreteScheduler, SchedulerState, StepOutput, add_noise_alpha_bar,
                                    alpha_bar_coefficients, at, buffer, check_options, predict_x0_eps,
                                    prediction_types_except)

PNDM_ORDER = 4  # PLMS keeps the last four noise predictions; PRK warms up over the top four timesteps


@flax.struct.dataclass
class PNDMState(SchedulerState):
    alphas_cumprod: jax.Array      # [T]
    final_alpha_cumprod: jax.Array  # alpha_bar "before" t = 0
    prk_timesteps: jax.Array       # [12] (or [1] unused with skip_prk_steps) the PRK table
    step_ratio: jax.Array          # int32 T // N, the PLMS step in timesteps (PRK half-steps: half of it)
    counter: jax.Array             # int32 model evaluations so far
    ets: jax.Array                 # [4, ...] past noise predictions, oldest first
    num_ets: jax.Array             # int32 how many of `ets` are filled
    cur_sample: jax.Array          # the sample at the start of the current PRK / Heun step
    cur_model_output: jax.Array    # the running RK4 combination of the current PRK step


def pndm_timesteps(num_inference_steps: int, num_train_timesteps: int, spacing: str, steps_offset: int,
                   skip_prk_steps: bool) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps [S], prk_timesteps [12 or 0]) as diffusers' set_timesteps: S = N + 9 with PRK (each of the
    top three intervals evaluated at t, t - h/2 twice, t - h), S = N + 1 with skip_prk_steps (the
    second-highest timestep twice)."""
    N, T = num_inference_steps, num_train_timesteps
    if spacing == "linspace":
        base = np.linspace(0, T - 1, N).round()
    elif spacing == "leading":
        base = (np.arange(0, N) * (T // N)).round() + steps_offset
    elif spacing == "trailing":
        base = np.round(np.arange(T, 0, -T / N))[::-1] - 1
    else:
        raise ValueError(f"PNDMScheduler: timestep_spacing must be linspace, leading or trailing, got {spacing!r}")
    base = base.astype(np.int64)  # ascending
    if skip_prk_steps:
        prk = np.array([], np.int64)
        plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1]
    else:
        top = base[-PNDM_ORDER:].repeat(2) + np.tile(np.array([0, T // N // 2]), PNDM_ORDER)
        prk = top[:-1].repeat(2)[1:-1][::-1]
        plms = base[:-3][::-1]
    return np.concatenate([prk, plms]).astype(np.int64), np.ascontiguousarray(prk)


@dataclasses.dataclass(frozen=True)
class PNDMScheduler(DiscreteScheduler):
    """diffusers' PNDMScheduler config; fields and defaults are diffusers'. prediction_type 'epsilon' or
    'v_prediction'; rescale_betas_zero_snr is not a key of this diffusers class and must stay False."""
    diffusers_class: ClassVar[str] = "PNDMScheduler"
    order: ClassVar[int] = 1
    prediction_types: ClassVar[tuple[str, ...]] = prediction_types_except("sample", "flow_prediction")

    skip_prk_steps: bool = False
    set_alpha_to_one: bool = False
    timestep_spacing: str = "leading"
    steps_offset: int = 0

    def __post_init__(self):
        super().__post_init__()
        # Not a key of diffusers' PNDMScheduler.
        check_options(type(self).__name__, self, {"rescale_betas_zero_snr": (False,)})

    def init(self, num_inference_steps: int,
             sample: jax.Array | jax.ShapeDtypeStruct | None = None) -> PNDMState:
        """Timestep tables for N inference steps; `sample` (an array or ShapeDtypeStruct shaped like x) sizes
        the PLMS history."""
        N = num_inference_steps
        lowest = 1 if self.skip_prk_steps else PNDM_ORDER  # PRK warms up over the top four timesteps
        if not lowest <= N <= self.num_train_timesteps:
            raise ValueError(f"PNDMScheduler: num_inference_steps must be in [{lowest}, "
                             f"{self.num_train_timesteps}] with skip_prk_steps={self.skip_prk_steps}, got {N}")
        alphas_cumprod = self.alphas_cumprod()
        timesteps, prk = pndm_timesteps(N, self.num_train_timesteps, self.timestep_spacing, self.steps_offset,
                                        self.skip_prk_steps)
        if timesteps.max() >= self.num_train_timesteps:
            raise ValueError(f"PNDMScheduler: the PRK warm-up would evaluate timestep {timesteps.max()} >= "
                             f"num_train_timesteps with timestep_spacing={self.timestep_spacing!r} (diffusers "
                             "fails there too); use skip_prk_steps=True or timestep_spacing='leading'")
        zeros = buffer(sample, type(self).__name__)
        return PNDMState(
            timesteps=timesteps, alphas_cumprod=alphas_cumprod,
            final_alpha_cumprod=np.float64(1.0 if self.set_alpha_to_one else alphas_cumprod[0]),
            prk_timesteps=prk if len(prk) else np.zeros(1, np.int64),
            step_ratio=np.int32(self.num_train_timesteps // N), counter=np.zeros((), np.int32),
            ets=buffer(sample, type(self).__name__, PNDM_ORDER), num_ets=np.zeros((), np.int32),
            cur_sample=zeros, cur_model_output=zeros)

    def _prev_sample(self, state: PNDMState, sample: jax.Array, t: jax.Array, t_prev: jax.Array,
                     model_output: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(x at t_prev, x_0 estimate) from x at t (PNDM paper eq. 11: the DDIM transfer of the noise
        prediction)."""
        a_t = at(state.alphas_cumprod, t)
        a_prev = jnp.where(t_prev >= 0, at(state.alphas_cumprod, jnp.maximum(t_prev, 0)), state.final_alpha_cumprod)
        b_t, b_prev = 1 - a_t, 1 - a_prev
        alpha, sigma = alpha_bar_coefficients(a_t)
        # The transfer integrates the noise prediction; the x_0 estimate comes from it, as in diffusers.
        _, eps = predict_x0_eps(self.prediction_type, model_output, sample, alpha, sigma)
        x0, _ = predict_x0_eps("epsilon", eps, sample, alpha, sigma)
        denom = a_t * jnp.sqrt(b_prev) + jnp.sqrt(a_t * b_t * a_prev)
        return jnp.sqrt(a_prev / a_t) * sample - (a_prev - a_t) * eps / denom, x0

    def _push(self, state: PNDMState, model_output: jax.Array, push: jax.Array) -> PNDMState:
        ets = jnp.where(push, jnp.concatenate([state.ets[1:], model_output[None]]), state.ets)
        return state.replace(ets=ets, num_ets=jnp.where(push, jnp.minimum(state.num_ets + 1, PNDM_ORDER),
                                                        state.num_ets))

    def _prk(self, state: PNDMState, model_output: jax.Array, sample: jax.Array, t_in: jax.Array):
        """One of the four evaluations of an RK4 step over [t, t - h] (h = T // N)."""
        c = state.counter
        half = state.step_ratio // 2
        t_prev = t_in - jnp.where(c % 2 == 1, 0, half)
        t = at(state.prk_timesteps, c // 4 * 4)
        r = c % 4
        weight = jnp.where((r == 1) | (r == 2), 1 / 3, 1 / 6)
        acc = state.cur_model_output + weight * model_output
        combined = jnp.where(r == 3, acc, model_output)
        cur_sample = jnp.where(r == 0, sample, state.cur_sample)
        state = self._push(state, model_output, r == 0)
        state = state.replace(cur_sample=cur_sample, cur_model_output=jnp.where(r == 3, 0.0, acc).astype(acc.dtype))
        prev, x0 = self._prev_sample(state, cur_sample, t, t_prev, combined)
        return prev, x0, state

    def _plms(self, state: PNDMState, model_output: jax.Array, sample: jax.Array, t_in: jax.Array):
        """A linear multistep step over [t, t - h] with the last 1-4 noise predictions; with skip_prk_steps
        the second evaluation (counter 1) instead averages with the first and redoes that step (Heun)."""
        c = state.counter
        ratio = state.step_ratio
        redo = c == 1
        t = jnp.where(redo, t_in + ratio, t_in)
        t_prev = jnp.where(redo, t_in, t_in - ratio)
        state = self._push(state, model_output, ~redo)
        e = state.ets  # newest last
        n = state.num_ets
        combined = jnp.select(
            [(n == 1) & (c == 0), (n == 1) & redo, n == 2, n == 3],
            [model_output, (model_output + e[-1]) / 2, (3 * e[-1] - e[-2]) / 2,
             (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12],
            (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4]) / 24)
        base = jnp.where(redo, state.cur_sample, sample)
        state = state.replace(cur_sample=jnp.where((n == 1) & (c == 0), sample, state.cur_sample))
        prev, x0 = self._prev_sample(state, base, t, t_prev, combined)
        return prev, x0, state

    def step(self, state: PNDMState, model_output: jax.Array, sample: jax.Array, i: jax.Array,
             key: jax.Array | None = None) -> StepOutput:
        """One model evaluation: a PRK stage while counter < 12 (without skip_prk_steps), else PLMS."""
        t_in = at(state.timesteps, i)
        if self.skip_prk_steps:
            prev, x0, state = self._plms(state, model_output, sample, t_in)
        else:
            prev, x0, state = jax.lax.cond(state.counter < 3 * PNDM_ORDER, self._prk, self._plms,
                                           state, model_output, sample, t_in)
        state = state.replace(counter=state.counter + 1)
        return StepOutput(prev.astype(sample.dtype), x0.astype(sample.dtype), state)

    def add_noise(self, state: PNDMState, original: jax.Array, noise: jax.Array, i: int) -> jax.Array:
        return add_noise_alpha_bar(state.alphas_cumprod, original, noise, state.timesteps[i])
