"""DEIS multistep (Zhang & Chen 2022, arXiv:2204.13902), diffusers' DEISMultistepScheduler: the 'logrho'
variant, which integrates the noise prediction with polynomial (Lagrange) extrapolation in log(rho),
rho = sigma_t / alpha_t. Orders 1-3, one model evaluation per step.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffax.schedulers import multistep_common as mc
from diffax.schedulers.base import StepOutput, at, check_options, predict_x0_eps


@flax.struct.dataclass
class DEISMultistepState(mc.SolverState):
    pass


def _lagrange_2(t, b, c):
    """Integral in rho of the order-2 Lagrange basis through log-rho nodes b, c (DEIS eq. 15)."""
    return t * (-jnp.log(c) + jnp.log(t) - 1) / (jnp.log(b) - jnp.log(c))


def _lagrange_3(t, b, c, d):
    """Integral in rho of the order-3 Lagrange basis through log-rho nodes b, c, d."""
    lt, lc, ld = jnp.log(t), jnp.log(c), jnp.log(d)
    numerator = t * (lc * (ld - lt + 1) - ld * lt + ld + lt ** 2 - 2 * lt + 2)
    return numerator / ((jnp.log(b) - lc) * (jnp.log(b) - ld))


@dataclasses.dataclass(frozen=True)
class DEISMultistepScheduler(mc.TimestepSpacingOptions, mc.SolverScheduler):
    """diffusers' DEISMultistepScheduler config; fields and defaults are diffusers'.

    With Karras / exponential sigmas the final sigma repeats the last one, so the last step is the identity
    (diffusers does the same). Not implemented (ValueError): use_beta_sigmas, use_flow_sigmas,
    use_dynamic_shifting. rescale_betas_zero_snr is not a key of this diffusers class and must stay False.
    """
    diffusers_class: ClassVar[str] = "DEISMultistepScheduler"
    order: ClassVar[int] = 1
    state_class: ClassVar[type] = DEISMultistepState

    algorithm_type: str = "deis"
    solver_type: str = "logrho"

    def __post_init__(self):
        super().__post_init__()
        # diffusers' mapping of the sibling schedulers' names when swapping configs.
        if self.algorithm_type in ("dpmsolver", "dpmsolver++"):
            object.__setattr__(self, "algorithm_type", "deis")
        if self.solver_type in ("midpoint", "heun", "bh1", "bh2"):
            object.__setattr__(self, "solver_type", "logrho")
        check_options(type(self).__name__, self, {"algorithm_type": ("deis",), "solver_type": ("logrho",),
                                                  "use_flow_sigmas": (False,), "rescale_betas_zero_snr": (False,)})

    def timesteps_and_sigmas(self, num_inference_steps: int, alphas_cumprod: np.ndarray
                             ) -> tuple[np.ndarray, np.ndarray]:
        """Spaced timesteps, then Karras / exponential sigmas, whose last one the final sigma repeats; on the
        training sigmas the final sigma is the least noisy one."""
        N = num_inference_steps
        timesteps = mc.solver_timesteps(N, self.num_train_timesteps, self.timestep_spacing, self.steps_offset)
        timesteps, sigmas = mc.solver_sigmas(alphas_cumprod, timesteps, N, self.sigma_schedule)
        last_sigma = mc.vp_sigma_min(alphas_cumprod) if self.sigma_schedule == "none" else sigmas[-1]
        return timesteps, np.append(sigmas, last_sigma)

    def step(self, state: DEISMultistepState, model_output: jax.Array, sample: jax.Array, i: jax.Array,
             key: jax.Array | None = None) -> StepOutput:
        """One multistep DEIS update from sigmas[i] to sigmas[i + 1]."""
        N = state.timesteps.shape[0]
        alpha_s0, sigma_s0, lambda_s0 = state.coefficients(i)
        x0, _ = self.convert(state, model_output, sample, i, predict_x0=True)
        _, eps = predict_x0_eps("sample", x0, sample, alpha_s0, sigma_s0)
        history = mc.push_history(state.model_outputs, eps)

        short = self.lower_order_final and N < 15
        nums = state.lower_order_nums
        order = jnp.where((self.solver_order == 1) | (nums < 1) | ((i == N - 1) & short), 1,
                          jnp.where((self.solver_order == 2) | (nums < 2) | ((i == N - 2) & short), 2, 3))
        alpha_t, sigma_t, lambda_t = state.coefficients(i + 1)

        def rho(j):  # the VE sigma at table index j, DEIS's time variable
            return at(state.sigma_t, j) / at(state.alpha_t, j)

        rho_t, rho_s0 = sigma_t / alpha_t, sigma_s0 / alpha_s0

        def first(history):
            return mc.dpm_solver_update("dpmsolver", sample, lambda_t - lambda_s0, alpha_t, sigma_t, alpha_s0,
                                        sigma_s0, history[-1])

        def second(history):
            rho_s1 = rho(i - 1)
            coef1 = _lagrange_2(rho_t, rho_s0, rho_s1) - _lagrange_2(rho_s0, rho_s0, rho_s1)
            coef2 = _lagrange_2(rho_t, rho_s1, rho_s0) - _lagrange_2(rho_s0, rho_s1, rho_s0)
            return alpha_t * (sample / alpha_s0 + coef1 * history[-1] + coef2 * history[-2])

        def third(history):
            rho_s1, rho_s2 = rho(i - 1), rho(i - 2)
            coef1 = _lagrange_3(rho_t, rho_s0, rho_s1, rho_s2) - _lagrange_3(rho_s0, rho_s0, rho_s1, rho_s2)
            coef2 = _lagrange_3(rho_t, rho_s1, rho_s2, rho_s0) - _lagrange_3(rho_s0, rho_s1, rho_s2, rho_s0)
            coef3 = _lagrange_3(rho_t, rho_s2, rho_s0, rho_s1) - _lagrange_3(rho_s0, rho_s2, rho_s0, rho_s1)
            return alpha_t * (sample / alpha_s0 + coef1 * history[-1] + coef2 * history[-2]
                              + coef3 * history[-3])

        prev = jax.lax.switch(order - 1, [first, second, third][:self.solver_order], history)
        return StepOutput(prev.astype(sample.dtype), x0.astype(sample.dtype), self.pushed(state, history))
