"""DPM-Solver / DPM-Solver++ multistep (Lu et al. 2022, arXiv:2206.00927 and 2211.01095), diffusers'
DPMSolverMultistepScheduler: orders 1-3, ODE and SDE variants, one model evaluation per step.

Each step turns the model output into a data (x_0) or noise prediction, pushes it into a history buffer of
`solver_order` entries, and takes an exponential-integrator step in lambda = log(alpha / sigma) using as
many past predictions as are available (lower orders while warming up and, optionally, at the end).
The order is chosen from traced values with `lax.switch`, so one compiled program covers every step.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffax.schedulers import multistep_common as mc
from diffax.schedulers.base import StepOutput, at, gaussian


@flax.struct.dataclass
class DPMSolverMultistepState(mc.SolverState):
    pass


@dataclasses.dataclass(frozen=True)
class DPMSolverMultistepScheduler(mc.TimestepSpacingOptions, mc.DPMSolverBase):
    """diffusers' DPMSolverMultistepScheduler config; fields and defaults are diffusers', plus
    `third_order_fix` (diffax only, stored under "_diffax" in configs).

    third_order_fix: weight the second divided difference of the order-3 update exactly (see
    `multistep_common.dpm_solver_update`). diffusers' weight makes DPM-Solver++(3M) second order; with the
    fix it is third order. False (the default) matches diffusers step for step.
    Not implemented (ValueError): use_beta_sigmas, use_dynamic_shifting (needs a per-call shift `mu`),
    variance_type 'learned'/'learned_range', algorithm_type 'sde-dpmsolver' with solver_order 3 (diffusers
    has no such update either), use_flow_sigmas together with a Karras / exponential / Lu spacing.
    """
    diffusers_class: ClassVar[str] = "DPMSolverMultistepScheduler"
    order: ClassVar[int] = 1
    algorithm_types: ClassVar[tuple[str, ...]] = mc.DPMSolverBase.algorithm_types + ("sde-dpmsolver",)
    diffax_extras: ClassVar[tuple[str, ...]] = ("third_order_fix",)
    state_class: ClassVar[type] = DPMSolverMultistepState

    euler_at_final: bool = False
    use_lu_lambdas: bool = False
    third_order_fix: bool = False

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        if self.algorithm_type == "sde-dpmsolver" and self.solver_order == 3:
            raise ValueError(f"{name}: algorithm_type='sde-dpmsolver' has no third-order update; use "
                             "solver_order <= 2 or 'sde-dpmsolver++'")
        if self.use_flow_sigmas and (self.use_karras_sigmas or self.use_exponential_sigmas or self.use_lu_lambdas):
            raise ValueError(f"{name}: use_flow_sigmas cannot be combined with Karras / exponential / Lu spacing")

    def timesteps_and_sigmas(self, num_inference_steps: int, alphas_cumprod: np.ndarray
                             ) -> tuple[np.ndarray, np.ndarray]:
        """Spaced timesteps within lambda_min_clipped, then Karras / Lu / exponential / flow sigmas; the final
        sigma is 0 or the least noisy training sigma."""
        T, N = self.num_train_timesteps, num_inference_steps
        timesteps = self.dpm_timesteps(N, alphas_cumprod, self.timestep_spacing, self.steps_offset)
        if self.use_flow_sigmas:
            sigmas = mc.flow_sigmas(N, T, self.flow_shift)
            timesteps = (sigmas * T).astype(np.int64)
        else:
            # Lu's lambda spacing yields to Karras', and wins over the exponential one.
            schedule = "lu" if self.use_lu_lambdas and not self.use_karras_sigmas else self.sigma_schedule
            round_ts = self.beta_schedule != "squaredcos_cap_v2"
            timesteps, sigmas = mc.solver_sigmas(alphas_cumprod, timesteps, N, schedule, round_ts)
        return timesteps, self.with_final_sigma(sigmas, alphas_cumprod)

    def step(self, state: DPMSolverMultistepState, model_output: jax.Array, sample: jax.Array, i: jax.Array,
             key: jax.Array | None = None) -> StepOutput:
        """One multistep update from sigmas[i] to sigmas[i + 1]."""
        N = state.timesteps.shape[0]
        converted, x0 = self.convert(state, model_output, sample, i, self.predicts_x0)
        history = mc.push_history(state.model_outputs, converted)
        noise = None
        if self.algorithm_type.startswith("sde"):
            noise = gaussian(key, sample, type(self).__name__)

        # Which order this step runs at (diffusers' lower_order_final / lower_order_second rules).
        short = self.lower_order_final and N < 15
        first_final = self.euler_at_final or short or self.final_sigmas_type == "zero"
        lower_final = (i == N - 1) & first_final
        lower_second = (i == N - 2) & short
        nums = state.lower_order_nums
        order = jnp.where((self.solver_order == 1) | (nums < 1) | lower_final, 1,
                          jnp.where((self.solver_order == 2) | (nums < 2) | lower_second, 2, 3))

        alpha_t, sigma_t, lambda_t = state.coefficients(i + 1)
        alpha_s0, sigma_s0, lambda_s0 = state.coefficients(i)
        h = lambda_t - lambda_s0
        d1_rule = "midpoint" if self.solver_type == "midpoint" else "taylor"

        def update(d0, d1=None, rule="taylor", d2=None):
            return mc.dpm_solver_update(self.algorithm_type, sample, h, alpha_t, sigma_t, alpha_s0, sigma_s0,
                                        d0, d1, rule, d2, noise, self.third_order_fix)

        def first(history):
            return update(history[-1])

        def second(history):
            m0, m1 = history[-1], history[-2]
            r0 = (lambda_s0 - at(state.lambda_t, i - 1)) / h
            return update(m0, (m0 - m1) / r0, d1_rule)

        def third(history):
            m0, m1, m2 = history[-1], history[-2], history[-3]
            lambda_s1, lambda_s2 = at(state.lambda_t, i - 1), at(state.lambda_t, i - 2)
            r0, r1 = (lambda_s0 - lambda_s1) / h, (lambda_s1 - lambda_s2) / h
            d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            return update(m0, d1, "taylor", d2)

        prev = jax.lax.switch(order - 1, [first, second, third][:self.solver_order], history)
        return StepOutput(prev.astype(sample.dtype), x0.astype(sample.dtype), self.pushed(state, history))
