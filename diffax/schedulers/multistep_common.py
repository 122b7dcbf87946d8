"""Shared config and math of the exponential-integrator samplers: DPM-Solver (multistep and singlestep), UniPC, DEIS.

These samplers all work in the (alpha_t, sigma_t, lambda_t = log(alpha_t / sigma_t)) view of a VP diffusion
x_t = alpha_t x_0 + sigma_t eps, on a table of N + 1 sigmas (the VE view sigma = sigma_t / alpha_t, one per
inference step plus the final one). This file holds their common config fields (option mixins and the
`SolverScheduler` base), builds the tables the way diffusers' `set_timesteps` does, converts model outputs to
the data (x_0) or noise prediction the solvers integrate, keeps the model-output history, and has the
DPM-Solver update shared by the multistep and singlestep schedulers.

Tables are NumPy float64 (a final sigma of 0 gives lambda = +inf, and the updates then reduce to x_0
exactly, as in diffusers); they become constants of the compiled program.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffax.schedulers.base import (DiscreteScheduler, Scheduler, SchedulerState, ThresholdingOptions, at, buffer,
                                    check_options, predict_x0_eps)
from diffax.schedulers.sigma_common import FINAL_SIGMAS_TYPES, SigmaSpacingOptions
from diffax.schedules import (TIMESTEP_SPACINGS, exponential_sigmas, karras_sigmas, sigma_to_t,
                              sigmas_from_alphas_cumprod)


@flax.struct.dataclass
class SolverState(SchedulerState):
    """Tables on the N + 1 inference sigmas and the history of converted model outputs."""
    sigmas: jax.Array           # [N + 1] VE sigma (or the flow sigma) per step, then the final one
    alpha_t: jax.Array          # [N + 1]
    sigma_t: jax.Array          # [N + 1]
    lambda_t: jax.Array         # [N + 1] log(alpha_t / sigma_t); +inf at a final sigma of 0
    model_outputs: jax.Array    # [order, *sample.shape] converted outputs, oldest first, newest last
    lower_order_nums: jax.Array  # int32 scalar: steps taken so far, capped at the solver order

    def coefficients(self, j: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(alpha_t, sigma_t, lambda_t) at table index j."""
        return at(self.alpha_t, j), at(self.sigma_t, j), at(self.lambda_t, j)


@dataclasses.dataclass(frozen=True)
class SolverOrderOptions(ThresholdingOptions):
    """diffusers' solver-order and x_0-thresholding config of the multistep samplers (DPM-Solver, DEIS, UniPC,
    EDM DPM-Solver): orders 1-3, lower orders on the last steps with lower_order_final."""
    solver_order: int = 2
    lower_order_final: bool = True

    def __post_init__(self):
        super().__post_init__()
        check_options(type(self).__name__, self, {"solver_order": (1, 2, 3)})


@dataclasses.dataclass(frozen=True)
class SolverSigmaOptions(SigmaSpacingOptions):
    """diffusers' sigma-schedule switches of DPM-Solver, DEIS and UniPC: Karras / exponential spacing, and
    rectified-flow sigmas shifted by flow_shift. use_dynamic_shifting is not implemented (it needs a per-call
    shift `mu`); time_shift_type only matters with it."""
    use_flow_sigmas: bool = False
    flow_shift: float = 1.0
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"

    def __post_init__(self):
        super().__post_init__()
        check_options(type(self).__name__, self, {"use_dynamic_shifting": (False,)})


@dataclasses.dataclass(frozen=True)
class TimestepSpacingOptions(Scheduler):
    """diffusers' timestep spacing of DPM-Solver multistep, DEIS and UniPC (see `solver_timesteps`)."""
    timestep_spacing: str = "linspace"
    steps_offset: int = 0

    def __post_init__(self):
        super().__post_init__()
        check_options(type(self).__name__, self, {"timestep_spacing": TIMESTEP_SPACINGS})


@dataclasses.dataclass(frozen=True)
class SolverScheduler(SolverSigmaOptions, SolverOrderOptions, DiscreteScheduler):
    """Config and methods shared by DPM-Solver (multistep and singlestep), DEIS and UniPC. Subclasses give
    their sigma tables (`timesteps_and_sigmas`) and their state's own fields (`state_class`, `extra_state`)."""
    state_class: ClassVar[type] = SolverState

    def init(self, num_inference_steps: int,
             sample: jax.Array | jax.ShapeDtypeStruct | None = None) -> SolverState:
        """Timesteps and sigma tables for N steps, as diffusers' set_timesteps, and zeroed history buffers
        shaped like `sample` (an array or a ShapeDtypeStruct)."""
        timesteps, sigmas = self.timesteps_and_sigmas(num_inference_steps, self.solver_alphas_cumprod())
        return self.state_class(**solver_state_tables(timesteps, sigmas, flow=self.use_flow_sigmas),
                                model_outputs=buffer(sample, type(self).__name__, self.solver_order),
                                lower_order_nums=np.zeros((), np.int32), **self.extra_state(timesteps, sample))

    def timesteps_and_sigmas(self, num_inference_steps: int, alphas_cumprod: np.ndarray
                             ) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps [N'] int64, sigmas [N' + 1]: the VE (or flow) sigma of each step, then the final one)."""
        raise NotImplementedError

    def extra_state(self, timesteps: np.ndarray, sample: jax.Array | jax.ShapeDtypeStruct | None) -> dict:
        """The fields of `state_class` beyond SolverState's, for a run on `timesteps`."""
        return {}

    def solver_alphas_cumprod(self) -> np.ndarray:
        """[T] alpha_bar. With zero terminal SNR alpha_bar_T is 2^-24 instead of 0, so that sigma and lambda
        stay finite at the first step (diffusers' DPM-Solver and UniPC do the same)."""
        return self.noise_schedule.alphas_cumprod(finite_terminal_snr=True)

    def convert(self, state: SolverState, model_output: jax.Array, sample: jax.Array, i: jax.Array,
                predict_x0: bool) -> tuple[jax.Array, jax.Array]:
        """(the quantity the solver integrates at loop index i: x_0 if `predict_x0` else eps, the x_0 estimate).

        Thresholding clips the x_0 estimate; a noise-prediction solver then integrates the eps it implies.
        The noise-prediction path goes eps -> x_0 -> eps, as diffusers does."""
        alpha_t, sigma_t = at(state.alpha_t, i), at(state.sigma_t, i)
        if predict_x0:
            # diffusers converts a flow velocity with the table sigma (sigma_t itself on flow tables).
            sigma = at(state.sigmas, i) if self.prediction_type == "flow_prediction" else sigma_t
            x0, _ = predict_x0_eps(self.prediction_type, model_output, sample, alpha_t, sigma)
            x0 = self.threshold(x0)
            return x0, x0
        _, eps = predict_x0_eps(self.prediction_type, model_output, sample, alpha_t, sigma_t)
        x0, _ = predict_x0_eps("epsilon", eps, sample, alpha_t, sigma_t)
        if self.thresholding:
            x0 = self.threshold(x0)
            _, eps = predict_x0_eps("sample", x0, sample, alpha_t, sigma_t)
        return eps, x0

    def pushed(self, state: SolverState, history: jax.Array, **fields) -> SolverState:
        """The state after a step that pushed its converted output: the new history, one more step counted
        (up to solver_order), and the subclass's `fields`."""
        nums = jnp.minimum(state.lower_order_nums + 1, self.solver_order).astype(jnp.int32)
        return state.replace(model_outputs=history, lower_order_nums=nums, **fields)

    def add_noise(self, state: SolverState, original: jax.Array, noise: jax.Array, i: int) -> jax.Array:
        """alpha_t x_0 + sigma_t eps at loop index i (img2img's starting point)."""
        return at(state.alpha_t, i, original.dtype) * original + at(state.sigma_t, i, original.dtype) * noise


@dataclasses.dataclass(frozen=True)
class DPMSolverBase(SolverScheduler):
    """diffusers' DPM-Solver config shared by the multistep and singlestep schedulers.

    algorithm_type: 'dpmsolver++' integrates the data prediction, 'dpmsolver' the noise prediction (it cannot
    step to sigma 0 nor convert a flow velocity), 'sde-' variants add the SDE's fresh noise.
    lambda_min_clipped: the noisiest timesteps whose lambda falls below it are never visited.
    variance_type: only None (the learned-variance outputs are not implemented).
    """
    algorithm_types: ClassVar[tuple[str, ...]] = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver")

    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -math.inf
    variance_type: str | None = None

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        # diffusers maps the solver names of the sibling schedulers onto its own (config swapping).
        if self.solver_type in ("logrho", "bh1", "bh2"):
            object.__setattr__(self, "solver_type", "midpoint")
        if self.algorithm_type == "deis":
            object.__setattr__(self, "algorithm_type", "dpmsolver++")
        check_options(name, self, {"algorithm_type": self.algorithm_types, "solver_type": ("midpoint", "heun"),
                                   "final_sigmas_type": FINAL_SIGMAS_TYPES, "variance_type": (None,)})
        if not self.predicts_x0 and self.final_sigmas_type == "zero":
            raise ValueError(f"{name}: final_sigmas_type='zero' needs algorithm_type dpmsolver++ or "
                             f"sde-dpmsolver++, got {self.algorithm_type!r}; use final_sigmas_type='sigma_min'")
        if not self.predicts_x0 and self.prediction_type == "flow_prediction":
            raise ValueError(f"{name}: prediction_type='flow_prediction' needs algorithm_type dpmsolver++ or "
                             "sde-dpmsolver++")

    @property
    def predicts_x0(self) -> bool:
        """Whether the solver integrates the data prediction (the '++' algorithms)."""
        return self.algorithm_type.endswith("++")

    def dpm_timesteps(self, num_inference_steps: int, alphas_cumprod: np.ndarray, timestep_spacing: str,
                      steps_offset: int) -> np.ndarray:
        """The spaced timesteps [N'] within lambda_min_clipped."""
        last = lambda_clip_timestep(alphas_cumprod, self.lambda_min_clipped)
        return solver_timesteps(num_inference_steps, self.num_train_timesteps, timestep_spacing, steps_offset, last)

    def with_final_sigma(self, sigmas: np.ndarray, alphas_cumprod: np.ndarray) -> np.ndarray:
        """sigmas [N] followed by the final sigma: 0, or the least noisy training sigma."""
        return np.append(sigmas, 0.0 if self.final_sigmas_type == "zero" else vp_sigma_min(alphas_cumprod))


def lambda_clip_timestep(alphas_cumprod: np.ndarray, lambda_min_clipped: float) -> int:
    """The number of training timesteps kept by `lambda_min_clipped`: timesteps whose lambda falls below it
    (the noisiest end, where cosine schedules are numerically unstable) are never visited."""
    lambdas = np.log(np.sqrt(alphas_cumprod)) - np.log(np.sqrt(1.0 - alphas_cumprod))
    return len(alphas_cumprod) - int(np.searchsorted(lambdas[::-1], lambda_min_clipped))


def solver_timesteps(num_inference_steps: int, num_train_timesteps: int, spacing: str = "linspace",
                     steps_offset: int = 0, last_timestep: int | None = None) -> np.ndarray:
    """Integer timesteps of the exponential-integrator samplers, descending: [N'] int64.

    Unlike DDIM's spacing these space N + 1 points and drop the final one (t = 0 is the solver's end point,
    not a model evaluation): 'linspace' over [0, last_timestep - 1], 'leading' in steps of
    last_timestep // (N + 1), 'trailing' down from last_timestep in steps of T / N. `last_timestep` (T unless
    lambda_min_clipped removes the noisiest ones) can make 'trailing' yield fewer than N timesteps, as in
    diffusers.
    """
    N, T = num_inference_steps, num_train_timesteps
    if not 0 < N <= T:
        raise ValueError(f"num_inference_steps must be in [1, {T}] (num_train_timesteps), got {N}")
    last = T if last_timestep is None else last_timestep
    if spacing == "linspace":
        ts = np.linspace(0, last - 1, N + 1).round()[::-1][:-1]
    elif spacing == "leading":
        ts = (np.arange(0, N + 1) * (last // (N + 1))).round()[::-1][:-1] + steps_offset
    elif spacing == "trailing":
        ts = np.arange(last, 0, -T / N).round() - 1
    else:
        raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}")
    return np.ascontiguousarray(ts).astype(np.int64)


def solver_sigmas(alphas_cumprod: np.ndarray, timesteps: np.ndarray, num_inference_steps: int,
                  sigma_schedule: str = "none", round_timesteps: bool = True, sigma_min: float | None = None,
                  sigma_max: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps [N] int64, sigmas [N] float64) for one of the sigma schedules:

    'none': the training sigmas interpolated at `timesteps`;
    'karras' (Karras et al. 2022, rho = 7) / 'exponential' (even in log sigma) between the training
    schedule's ends (or `sigma_min` / `sigma_max`), with timesteps mapped back by log-sigma interpolation;
    'lu' (Lu et al. 2022, even in lambda): the exponential sigmas, timesteps like Karras'.
    Fractional Karras / Lu timesteps are rounded when `round_timesteps`, else truncated, as diffusers' int64
    cast does; exponential ones are always truncated (diffusers never rounds them).
    """
    train_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod)  # [T] ascending in t
    if sigma_schedule == "none":
        sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
        return np.asarray(timesteps, np.int64), sigmas
    lo = train_sigmas[0] if sigma_min is None else sigma_min
    hi = train_sigmas[-1] if sigma_max is None else sigma_max
    if sigma_schedule == "karras":
        sigmas = karras_sigmas(lo, hi, num_inference_steps)
    elif sigma_schedule in ("exponential", "lu"):
        sigmas = exponential_sigmas(lo, hi, num_inference_steps)
    else:
        raise ValueError(f"unknown sigma schedule {sigma_schedule!r}")
    ts = sigma_to_t(sigmas, np.log(train_sigmas))
    if round_timesteps and sigma_schedule != "exponential":
        ts = ts.round()
    return ts.astype(np.int64), sigmas


def vp_sigma_min(alphas_cumprod: np.ndarray) -> float:
    """The VE sigma of the least noisy training timestep (final_sigmas_type='sigma_min')."""
    return float(np.sqrt((1.0 - alphas_cumprod[0]) / alphas_cumprod[0]))


def flow_sigmas(num_inference_steps: int, num_train_timesteps: int, shift: float) -> np.ndarray:
    """Rectified-flow sigmas as DPM-Solver spaces them: N + 1 points in [0, 1 - 1/T], shifted by
    shift * s / (1 + (shift - 1) s), descending, the 0 dropped: [N]."""
    s = 1.0 - np.linspace(1, 1 / num_train_timesteps, num_inference_steps + 1)
    s = shift * s / (1 + (shift - 1) * s)
    return s[::-1][:-1].copy()


def solver_state_tables(timesteps: np.ndarray, sigmas: np.ndarray, flow: bool = False) -> dict[str, np.ndarray]:
    """The SolverState table fields from timesteps [N] and sigmas [N + 1] (VE sigma, or flow sigma).

    They stay NumPy arrays: `sampling.loop_range` reads the timesteps on the host, and the loop turns them
    into constants of the compiled program (float32 unless jax_enable_x64)."""
    sigmas = np.asarray(sigmas, np.float64)
    if flow:  # x_t = (1 - s) x_0 + s eps
        alpha_t, sigma_t = 1.0 - sigmas, sigmas
    else:
        alpha_t = 1.0 / np.sqrt(sigmas ** 2 + 1.0)
        sigma_t = sigmas * alpha_t
    with np.errstate(divide="ignore"):
        lambda_t = np.log(alpha_t) - np.log(sigma_t)
    return dict(timesteps=np.asarray(timesteps, np.int64), sigmas=sigmas, alpha_t=alpha_t, sigma_t=sigma_t,
                lambda_t=lambda_t)


def push_history(history: jax.Array, value: jax.Array) -> jax.Array:
    """Drops the oldest entry and appends `value` as the newest: [order, ...]."""
    return jnp.concatenate([history[1:], value[None].astype(history.dtype)])


def dpm_solver_update(algorithm_type: str, sample: jax.Array, h: jax.Array, alpha_t: jax.Array,
                      sigma_t: jax.Array, alpha_s: jax.Array, sigma_s: jax.Array, d0: jax.Array,
                      d1: jax.Array | None = None, d1_rule: str = "taylor", d2: jax.Array | None = None,
                      noise: jax.Array | None = None, third_order_fix: bool = False) -> jax.Array:
    """One DPM-Solver step from (alpha_s, sigma_s) to (alpha_t, sigma_t), h = lambda_t - lambda_s.

    d0, d1, d2 are the model-output value and its first / second divided differences in lambda (d1, d2
    optional: first order without them). d1_rule 'midpoint' weights d1 by half the first-order coefficient
    (Lu et al. 2022, DPM-Solver-2 midpoint); 'taylor' uses the exact phi_2 integral weight (the 'heun'
    solver_type, and every third-order step). Algorithms (Lu et al. 2022a/b): 'dpmsolver++' integrates the
    data prediction, 'dpmsolver' the noise prediction, 'sde-' variants add the SDE's fresh noise.

    d2 gets diffusers' weight, exact for a second difference d2 ~ h^2 m'' (the singlestep form) in the ODE
    variants. The multistep form (D1_0 - D1_1) / (r0 + r1) is ~ h^2 m'' / 2, so that weight leaves the
    multistep third-order update second order; third_order_fix gives d2 the exact weight of that form: twice
    diffusers' in the ODE variants (-2 phi_3 instead of -phi_3), and for 'sde-dpmsolver++', whose diffusers
    weight also has the sign of its constant term flipped, alpha_t ((1 - e^{-2h} - 2h) / (2h^2) + 1).
    """
    if algorithm_type == "dpmsolver++":
        phi1 = jnp.exp(-h) - 1.0
        x = (sigma_t / sigma_s) * sample - (alpha_t * phi1) * d0
        c1_mid, c1_taylor = -0.5 * (alpha_t * phi1), alpha_t * (phi1 / h + 1.0)
        c2 = -alpha_t * ((phi1 + h) / h ** 2 - 0.5)
        c2_exact = 2.0 * c2
    elif algorithm_type == "dpmsolver":
        phi1 = jnp.exp(h) - 1.0
        x = (alpha_t / alpha_s) * sample - (sigma_t * phi1) * d0
        c1_mid, c1_taylor = -0.5 * (sigma_t * phi1), -sigma_t * (phi1 / h - 1.0)
        c2 = -sigma_t * ((phi1 - h) / h ** 2 - 0.5)
        c2_exact = 2.0 * c2
    elif algorithm_type == "sde-dpmsolver++":
        one_minus = 1.0 - jnp.exp(-2.0 * h)
        x = (sigma_t / sigma_s * jnp.exp(-h)) * sample + (alpha_t * one_minus) * d0
        c1_mid, c1_taylor = 0.5 * (alpha_t * one_minus), alpha_t * (one_minus / (-2.0 * h) + 1.0)
        c2 = alpha_t * ((one_minus - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
        c2_exact = alpha_t * ((one_minus - 2.0 * h) / (2.0 * h ** 2) + 1.0)
        x = x + sigma_t * jnp.sqrt(one_minus) * noise
    elif algorithm_type == "sde-dpmsolver":
        phi1 = jnp.exp(h) - 1.0
        x = (alpha_t / alpha_s) * sample - 2.0 * (sigma_t * phi1) * d0
        c1_mid, c1_taylor = -(sigma_t * phi1), -2.0 * (sigma_t * (phi1 / h - 1.0))
        c2 = c2_exact = None  # diffusers has no third-order SDE-DPM-Solver (noise prediction); the schedulers reject it
        x = x + sigma_t * jnp.sqrt(jnp.exp(2.0 * h) - 1.0) * noise
    else:
        raise ValueError(f"unknown algorithm_type {algorithm_type!r}")
    if d1 is not None:
        x = x + (c1_mid if d1_rule == "midpoint" else c1_taylor) * d1
    if d2 is not None:
        x = x + (c2_exact if third_order_fix else c2) * d2
    return x
