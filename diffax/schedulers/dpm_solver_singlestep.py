"""Singlestep DPM-Solver / DPM-Solver++ (Lu et al. 2022, arXiv:2206.00927 and 2211.01095), diffusers'
DPMSolverSinglestepScheduler.

A k-th order singlestep update spans k consecutive inference steps: it starts from the sample at the block's
first step and uses the model outputs evaluated inside the block as intermediate stages. diffusers encodes
this as an order list ([1, 2, 1, 2, ...] for order 2, [1, 2, 3, ...] for order 3): at an order-1 entry the
block's starting sample is kept, and an order-k entry jumps from it to the next sigma using the last k
outputs. One model evaluation per inference step.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffax.schedulers import multistep_common as mc
from diffax.schedulers.base import StepOutput, at, buffer, check_options, gaussian


@flax.struct.dataclass
class DPMSolverSinglestepState(mc.SolverState):
    order_list: jax.Array    # [N] int32 the order of the update at each step
    block_sample: jax.Array  # the sample at the start of the current singlestep block


def singlestep_order_list(num_inference_steps: int, solver_order: int, lower_order_final: bool,
                          final_sigmas_type: str) -> list[int]:
    """The per-step update orders of diffusers' get_order_list: repeated [1, .., order] blocks, the last block
    shortened (lower_order_final) or dropped, and the final step first order when the final sigma is 0."""
    steps, order = num_inference_steps, solver_order
    if order == 1:
        orders = [1] * steps
    elif lower_order_final:
        if order == 3:
            orders = [1, 2, 3] * (steps // 3 - 1) + [1, 2, 1] if steps % 3 == 0 else \
                [1, 2, 3] * (steps // 3) + [1, 2][:steps % 3]
        else:
            orders = [1, 2] * (steps // 2 - 1) + [1, 1] if steps % 2 == 0 else [1, 2] * (steps // 2) + [1]
    else:
        orders = list(range(1, order + 1)) * (steps // order)
    if final_sigmas_type == "zero":
        orders[-1] = 1
    return orders


@dataclasses.dataclass(frozen=True)
class DPMSolverSinglestepScheduler(mc.DPMSolverBase):
    """diffusers' DPMSolverSinglestepScheduler config; fields and defaults are diffusers'.

    As in diffusers, lower_order_final is switched on whenever N is not a multiple of solver_order or the
    final sigma is 0 (the default). Not implemented (ValueError): use_beta_sigmas, use_flow_sigmas,
    use_dynamic_shifting, variance_type 'learned'/'learned_range'. rescale_betas_zero_snr is not a key of
    this diffusers class and must stay False. thresholding with algorithm_type 'dpmsolver' fails in diffusers
    (it indexes its tables with an undefined timestep); here it thresholds at the step's own alpha_t and
    sigma_t, as diffusers' multistep scheduler does.
    """
    diffusers_class: ClassVar[str] = "DPMSolverSinglestepScheduler"
    order: ClassVar[int] = 1
    state_class: ClassVar[type] = DPMSolverSinglestepState

    lower_order_final: bool = False

    def __post_init__(self):
        super().__post_init__()
        check_options(type(self).__name__, self, {"use_flow_sigmas": (False,), "rescale_betas_zero_snr": (False,)})

    def timesteps_and_sigmas(self, num_inference_steps: int, alphas_cumprod: np.ndarray
                             ) -> tuple[np.ndarray, np.ndarray]:
        """'linspace' timesteps within lambda_min_clipped, then Karras / exponential sigmas; the final sigma is
        0 or the least noisy training sigma."""
        timesteps = self.dpm_timesteps(num_inference_steps, alphas_cumprod, "linspace", 0)
        timesteps, sigmas = mc.solver_sigmas(alphas_cumprod, timesteps, num_inference_steps, self.sigma_schedule)
        return timesteps, self.with_final_sigma(sigmas, alphas_cumprod)

    def extra_state(self, timesteps: np.ndarray, sample: jax.Array | jax.ShapeDtypeStruct | None) -> dict:
        """The order list and the block's starting-sample buffer."""
        N = len(timesteps)
        lower_order_final = (self.lower_order_final or N % self.solver_order != 0
                             or self.final_sigmas_type == "zero")
        orders = singlestep_order_list(N, self.solver_order, lower_order_final, self.final_sigmas_type)
        return dict(order_list=np.asarray(orders, np.int32), block_sample=buffer(sample, type(self).__name__))

    def step(self, state: DPMSolverSinglestepState, model_output: jax.Array, sample: jax.Array, i: jax.Array,
             key: jax.Array | None = None) -> StepOutput:
        """Step i of its singlestep block: order 1 starts a block at sigmas[i]; order k ends it at
        sigmas[i + 1] from the block's starting sample (at sigmas[i - k + 1])."""
        converted, x0 = self.convert(state, model_output, sample, i, self.predicts_x0)
        history = mc.push_history(state.model_outputs, converted)
        noise = None
        if self.algorithm_type == "sde-dpmsolver++":
            noise = gaussian(key, sample, type(self).__name__)
        # diffusers lowers the order while fewer outputs than it needs have been seen (start of a run).
        available = jnp.minimum(state.lower_order_nums + 1, self.solver_order)
        order = jnp.minimum(at(state.order_list, i), available)
        block_sample = jnp.where(order == 1, sample, state.block_sample)

        alpha_t, sigma_t, lambda_t = state.coefficients(i + 1)
        d1_rule = "midpoint" if self.solver_type == "midpoint" else "taylor"

        def update(j, d0, d1=None, rule="taylor", d2=None):
            """From the block start at table index j to i + 1."""
            alpha_s, sigma_s, lambda_s = state.coefficients(j)
            return mc.dpm_solver_update(self.algorithm_type, block_sample, lambda_t - lambda_s, alpha_t, sigma_t,
                                        alpha_s, sigma_s, d0, d1, rule, d2, noise)

        def first(history):
            return update(i, history[-1])

        def second(history):
            m0, m1 = history[-1], history[-2]
            lambda_s0, lambda_s1 = at(state.lambda_t, i), at(state.lambda_t, i - 1)
            r0 = (lambda_s0 - lambda_s1) / (lambda_t - lambda_s1)
            return update(i - 1, m1, (m0 - m1) / r0, d1_rule)

        def third(history):
            m0, m1, m2 = history[-1], history[-2], history[-3]
            lambda_s0, lambda_s1, lambda_s2 = (at(state.lambda_t, j) for j in (i, i - 1, i - 2))
            h = lambda_t - lambda_s2
            r0, r1 = (lambda_s0 - lambda_s2) / h, (lambda_s1 - lambda_s2) / h
            d1_0, d1_1 = (m1 - m2) / r1, (m0 - m2) / r0
            if self.solver_type == "midpoint":
                return update(i - 2, m2, d1_1, "taylor")
            d1 = (r0 * d1_0 - r1 * d1_1) / (r0 - r1)
            d2 = 2.0 * (d1_1 - d1_0) / (r0 - r1)
            return update(i - 2, m2, d1, "taylor", d2)

        prev = jax.lax.switch(order - 1, [first, second, third][:self.solver_order], history)
        state = self.pushed(state, history, block_sample=block_sample.astype(sample.dtype))
        return StepOutput(prev.astype(sample.dtype), x0.astype(sample.dtype), state)
