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
import math
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffax.schedulers import multistep_common as mc
from diffax.schedulers.base import DiscreteScheduler, StepOutput


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
class DPMSolverSinglestepScheduler(DiscreteScheduler):
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

    solver_order: int = 2
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = False
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_flow_sigmas: bool = False
    flow_shift: float = 1.0
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -math.inf
    variance_type: str | None = None
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        if self.solver_type in ("logrho", "bh1", "bh2"):  # diffusers' mapping when swapping configs
            object.__setattr__(self, "solver_type", "midpoint")
        if self.algorithm_type == "deis":
            object.__setattr__(self, "algorithm_type", "dpmsolver++")
        mc.check_options(name, self, {
            "solver_order": (1, 2, 3),
            "algorithm_type": ("dpmsolver++", "sde-dpmsolver++", "dpmsolver"),
            "solver_type": ("midpoint", "heun"),
            "final_sigmas_type": mc.FINAL_SIGMAS_TYPES,
            "use_beta_sigmas": (False,), "use_flow_sigmas": (False,), "use_dynamic_shifting": (False,),
            "variance_type": (None,), "rescale_betas_zero_snr": (False,),
        })
        mc.check_sigma_spacing(name, self.use_karras_sigmas, self.use_exponential_sigmas, self.use_beta_sigmas)
        if self.algorithm_type == "dpmsolver" and self.final_sigmas_type == "zero":
            raise ValueError(f"{name}: final_sigmas_type='zero' needs algorithm_type dpmsolver++ or "
                             "sde-dpmsolver++; use final_sigmas_type='sigma_min'")
        if self.algorithm_type == "dpmsolver" and self.prediction_type == "flow_prediction":
            raise ValueError(f"{name}: prediction_type='flow_prediction' needs algorithm_type dpmsolver++ or "
                             "sde-dpmsolver++")

    def init(self, num_inference_steps: int,
             sample: jax.Array | jax.ShapeDtypeStruct | None = None) -> DPMSolverSinglestepState:
        """Timesteps, sigma tables and order list for N steps, as diffusers' set_timesteps; `sample` (an
        array or ShapeDtypeStruct shaped like x) sizes the history buffers."""
        alphas_cumprod = mc.solver_alphas_cumprod(self.noise_schedule)
        T, N = self.num_train_timesteps, num_inference_steps
        last = mc.lambda_clip_timestep(alphas_cumprod, self.lambda_min_clipped)
        timesteps = mc.solver_timesteps(N, T, "linspace", 0, last)
        if self.use_karras_sigmas:
            timesteps, sigmas = mc.solver_sigmas(alphas_cumprod, timesteps, N, "karras", True)
        elif self.use_exponential_sigmas:
            timesteps, sigmas = mc.solver_sigmas(alphas_cumprod, timesteps, N, "exponential", False)
        else:
            timesteps, sigmas = mc.solver_sigmas(alphas_cumprod, timesteps, N)
        last_sigma = 0.0 if self.final_sigmas_type == "zero" else mc.vp_sigma_min(alphas_cumprod)
        tables = mc.solver_state_tables(timesteps, np.append(sigmas, last_sigma))
        lower_order_final = (self.lower_order_final or N % self.solver_order != 0
                             or self.final_sigmas_type == "zero")
        orders = singlestep_order_list(N, self.solver_order, lower_order_final, self.final_sigmas_type)
        return DPMSolverSinglestepState(
            **tables, model_outputs=mc.empty_history(self.solver_order, sample),
            lower_order_nums=np.zeros((), np.int32), order_list=np.asarray(orders, np.int32),
            block_sample=jnp.zeros(sample.shape, sample.dtype))

    def step(self, state: DPMSolverSinglestepState, model_output: jax.Array, sample: jax.Array, i: jax.Array,
             key: jax.Array | None = None) -> StepOutput:
        """Step i of its singlestep block: order 1 starts a block at sigmas[i]; order k ends it at
        sigmas[i + 1] from the block's starting sample (at sigmas[i - k + 1])."""
        converted, x0 = mc.convert_model_output(
            state, model_output, sample, i, self.prediction_type, self.algorithm_type.endswith("++"),
            self.thresholding, self.dynamic_thresholding_ratio, self.sample_max_value)
        history = mc.push_history(state.model_outputs, converted)
        noise = None
        if self.algorithm_type == "sde-dpmsolver++":
            noise = jax.random.normal(key, sample.shape, sample.dtype)
        # diffusers lowers the order while fewer outputs than it needs have been seen (start of a run).
        available = jnp.minimum(state.lower_order_nums + 1, self.solver_order)
        order = jnp.minimum(state.order_list[i], available)
        block_sample = jnp.where(order == 1, sample, state.block_sample)

        alpha_t, sigma_t, lambda_t = mc.table_at(state, i + 1)
        d1_rule = "midpoint" if self.solver_type == "midpoint" else "taylor"

        def update(j, d0, d1=None, rule="taylor", d2=None):
            """From the block start at table index j to i + 1."""
            alpha_s, sigma_s, lambda_s = mc.table_at(state, j)
            return mc.dpm_solver_update(self.algorithm_type, block_sample, lambda_t - lambda_s, alpha_t, sigma_t,
                                        alpha_s, sigma_s, d0, d1, rule, d2, noise)

        def first(history):
            return update(i, history[-1])

        def second(history):
            m0, m1 = history[-1], history[-2]
            lambda_s0, lambda_s1 = state.lambda_t[i], state.lambda_t[i - 1]
            r0 = (lambda_s0 - lambda_s1) / (lambda_t - lambda_s1)
            return update(i - 1, m1, (m0 - m1) / r0, d1_rule)

        def third(history):
            m0, m1, m2 = history[-1], history[-2], history[-3]
            lambda_s0, lambda_s1, lambda_s2 = state.lambda_t[i], state.lambda_t[i - 1], state.lambda_t[i - 2]
            h = lambda_t - lambda_s2
            r0, r1 = (lambda_s0 - lambda_s2) / h, (lambda_s1 - lambda_s2) / h
            d1_0, d1_1 = (m1 - m2) / r1, (m0 - m2) / r0
            if self.solver_type == "midpoint":
                return update(i - 2, m2, d1_1, "taylor")
            d1 = (r0 * d1_0 - r1 * d1_1) / (r0 - r1)
            d2 = 2.0 * (d1_1 - d1_0) / (r0 - r1)
            return update(i - 2, m2, d1, "taylor", d2)

        prev = jax.lax.switch(order - 1, [first, second, third][:self.solver_order], history)
        state = state.replace(model_outputs=history, block_sample=block_sample.astype(sample.dtype),
                              lower_order_nums=jnp.minimum(state.lower_order_nums + 1,
                                                           self.solver_order).astype(jnp.int32))
        return StepOutput(prev.astype(sample.dtype), x0.astype(sample.dtype), state)

    def add_noise(self, state: DPMSolverSinglestepState, original: jax.Array, noise: jax.Array,
                  i: int) -> jax.Array:
        return mc.add_noise_sigma_table(state, original, noise, i)
