"""DPM-Solver / DPM-Solver++ multistep (Lu et al. 2022, arXiv:2206.00927 and 2211.01095), diffusers'
DPMSolverMultistepScheduler: orders 1-3, ODE and SDE variants, one model evaluation per step.

Each step turns the model output into a data (x_0) or noise prediction, pushes it into a history buffer of
`solver_order` entries, and takes an exponential-integrator step in lambda = log(alpha / sigma) using as
many past predictions as are available (lower orders while warming up and, optionally, at the end).
The order is chosen from traced values with `lax.switch`, so one compiled program covers every step.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffax.schedulers import multistep_common as mc
from diffax.schedulers.base import DiscreteScheduler, StepOutput


@flax.struct.dataclass
class DPMSolverMultistepState(mc.SolverState):
    pass


@dataclasses.dataclass(frozen=True)
class DPMSolverMultistepScheduler(DiscreteScheduler):
    """diffusers' DPMSolverMultistepScheduler config; fields and defaults are diffusers'.

    Not implemented (ValueError): use_beta_sigmas, use_dynamic_shifting (needs a per-call shift `mu`),
    variance_type 'learned'/'learned_range', algorithm_type 'sde-dpmsolver' with solver_order 3 (diffusers
    has no such update either), use_flow_sigmas together with a Karras / exponential / Lu spacing.
    """
    diffusers_class: ClassVar[str] = "DPMSolverMultistepScheduler"
    order: ClassVar[int] = 1

    solver_order: int = 2
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_lu_lambdas: bool = False
    use_flow_sigmas: bool = False
    flow_shift: float = 1.0
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -math.inf
    variance_type: str | None = None
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        # diffusers maps the solver names of the sibling schedulers onto its own (config swapping).
        if self.solver_type in ("logrho", "bh1", "bh2"):
            object.__setattr__(self, "solver_type", "midpoint")
        if self.algorithm_type == "deis":
            object.__setattr__(self, "algorithm_type", "dpmsolver++")
        mc.check_options(name, self, {
            "solver_order": (1, 2, 3),
            "algorithm_type": ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver"),
            "solver_type": ("midpoint", "heun"),
            "final_sigmas_type": mc.FINAL_SIGMAS_TYPES,
            "timestep_spacing": ("linspace", "leading", "trailing"),
            "use_beta_sigmas": (False,), "use_dynamic_shifting": (False,), "variance_type": (None,),
        })
        mc.check_sigma_spacing(name, self.use_karras_sigmas, self.use_exponential_sigmas, self.use_beta_sigmas)
        data_pred = self.algorithm_type in ("dpmsolver++", "sde-dpmsolver++")
        if not data_pred and self.final_sigmas_type == "zero":
            raise ValueError(f"{name}: final_sigmas_type='zero' needs algorithm_type dpmsolver++ or "
                             f"sde-dpmsolver++, got {self.algorithm_type!r}; use final_sigmas_type='sigma_min'")
        if not data_pred and self.prediction_type == "flow_prediction":
            raise ValueError(f"{name}: prediction_type='flow_prediction' needs algorithm_type dpmsolver++ or "
                             "sde-dpmsolver++")
        if self.algorithm_type == "sde-dpmsolver" and self.solver_order == 3:
            raise ValueError(f"{name}: algorithm_type='sde-dpmsolver' has no third-order update; use "
                             "solver_order <= 2 or 'sde-dpmsolver++'")
        if self.use_flow_sigmas and (self.use_karras_sigmas or self.use_exponential_sigmas or self.use_lu_lambdas):
            raise ValueError(f"{name}: use_flow_sigmas cannot be combined with Karras / exponential / Lu spacing")

    def init(self, num_inference_steps: int,
             sample: jax.Array | jax.ShapeDtypeStruct | None = None) -> DPMSolverMultistepState:
        """Timesteps and sigma tables for N steps, as diffusers' set_timesteps; `sample` (an array or a
        ShapeDtypeStruct shaped like x) sizes the history buffer."""
        alphas_cumprod = mc.solver_alphas_cumprod(self.noise_schedule)
        T, N = self.num_train_timesteps, num_inference_steps
        last = mc.lambda_clip_timestep(alphas_cumprod, self.lambda_min_clipped)
        timesteps = mc.solver_timesteps(N, T, self.timestep_spacing, self.steps_offset, last)
        round_ts = self.beta_schedule != "squaredcos_cap_v2"
        if self.use_karras_sigmas:
            timesteps, sigmas = mc.solver_sigmas(alphas_cumprod, timesteps, N, "karras", round_ts)
        elif self.use_lu_lambdas:
            timesteps, sigmas = mc.solver_sigmas(alphas_cumprod, timesteps, N, "lu", round_ts)
        elif self.use_exponential_sigmas:
            timesteps, sigmas = mc.solver_sigmas(alphas_cumprod, timesteps, N, "exponential", False)
        elif self.use_flow_sigmas:
            sigmas = mc.flow_sigmas(N, T, self.flow_shift)
            timesteps = (sigmas * T).astype(np.int64)
        else:
            timesteps, sigmas = mc.solver_sigmas(alphas_cumprod, timesteps, N)
        last_sigma = 0.0 if self.final_sigmas_type == "zero" else mc.vp_sigma_min(alphas_cumprod)
        tables = mc.solver_state_tables(timesteps, np.append(sigmas, last_sigma), flow=self.use_flow_sigmas)
        return DPMSolverMultistepState(**tables, model_outputs=mc.empty_history(self.solver_order, sample),
                                       lower_order_nums=np.zeros((), np.int32))

    def step(self, state: DPMSolverMultistepState, model_output: jax.Array, sample: jax.Array, i: jax.Array,
             key: jax.Array | None = None) -> StepOutput:
        """One multistep update from sigmas[i] to sigmas[i + 1]."""
        N = state.timesteps.shape[0]
        converted, x0 = mc.convert_model_output(
            state, model_output, sample, i, self.prediction_type, self.algorithm_type.endswith("++"),
            self.thresholding, self.dynamic_thresholding_ratio, self.sample_max_value)
        history = mc.push_history(state.model_outputs, converted)
        noise = None
        if self.algorithm_type.startswith("sde"):
            noise = jax.random.normal(key, sample.shape, sample.dtype)

        # Which order this step runs at (diffusers' lower_order_final / lower_order_second rules).
        short = self.lower_order_final and N < 15
        first_final = self.euler_at_final or short or self.final_sigmas_type == "zero"
        lower_final = (i == N - 1) & first_final
        lower_second = (i == N - 2) & short
        nums = state.lower_order_nums
        order = jnp.where((self.solver_order == 1) | (nums < 1) | lower_final, 1,
                          jnp.where((self.solver_order == 2) | (nums < 2) | lower_second, 2, 3))

        alpha_t, sigma_t, lambda_t = mc.table_at(state, i + 1)
        alpha_s0, sigma_s0, lambda_s0 = mc.table_at(state, i)
        h = lambda_t - lambda_s0
        d1_rule = "midpoint" if self.solver_type == "midpoint" else "taylor"

        def update(d0, d1=None, rule="taylor", d2=None):
            return mc.dpm_solver_update(self.algorithm_type, sample, h, alpha_t, sigma_t, alpha_s0, sigma_s0,
                                        d0, d1, rule, d2, noise)

        def first(history):
            return update(history[-1])

        def second(history):
            m0, m1 = history[-1], history[-2]
            r0 = (lambda_s0 - state.lambda_t[i - 1]) / h
            return update(m0, (m0 - m1) / r0, d1_rule)

        def third(history):
            m0, m1, m2 = history[-1], history[-2], history[-3]
            lambda_s1, lambda_s2 = state.lambda_t[i - 1], state.lambda_t[i - 2]
            r0, r1 = (lambda_s0 - lambda_s1) / h, (lambda_s1 - lambda_s2) / h
            d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            return update(m0, d1, "taylor", d2)

        prev = jax.lax.switch(order - 1, [first, second, third][:self.solver_order], history)
        state = state.replace(model_outputs=history,
                              lower_order_nums=jnp.minimum(nums + 1, self.solver_order).astype(jnp.int32))
        return StepOutput(prev.astype(sample.dtype), x0.astype(sample.dtype), state)

    def add_noise(self, state: DPMSolverMultistepState, original: jax.Array, noise: jax.Array,
                  i: int) -> jax.Array:
        return mc.add_noise_sigma_table(state, original, noise, i)
