"""Linear multistep sampler in sigma space (k-diffusion `sample_lms`): diffusers' LMSDiscreteScheduler.

The probability-flow ODE dx/dsigma = d(x, sigma) is integrated with an Adams-Bashforth-type rule on the
non-uniform sigma grid: the last `lms_order` derivatives are interpolated by a Lagrange polynomial in sigma,
and the step integrates that polynomial from sigma_k to sigma_{k+1}. The coefficients depend only on the
sigmas, so they are computed once at `init`, in NumPy: each is the integral of a Lagrange basis polynomial of
degree < lms_order, which an n-point Gauss-Legendre rule integrates exactly for degree <= 2n - 1 (diffusers
calls scipy.integrate.quad per step; the results agree to float64 rounding).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffax.schedulers.base import StepOutput, at, buffer, compute_dtype, table
from diffax.schedulers.sigma_common import SigmaListState, SigmaScheduler, SigmaSpacingOptions


@flax.struct.dataclass
class LMSState(SigmaListState):
    coeffs: jax.Array        # [N, lms_order] coefficient of the j-th newest derivative at step k
    derivatives: jax.Array   # [lms_order, *sample] derivative history, newest first (zeros until filled)


def lms_coefficients(sigmas: np.ndarray, order: int) -> np.ndarray:
    """[N, order] integrals over [sigma_k, sigma_{k+1}] of the Lagrange basis polynomials on the nodes
    sigma_k, sigma_{k-1}, ..., sigma_{k-m+1}, m = min(k + 1, order); column j belongs to node sigma_{k-j}
    (the j-th newest derivative). Columns j >= m are 0."""
    nodes_01, weights = np.polynomial.legendre.leggauss(order + 1)  # exact for degree <= 2 order + 1
    num_steps = len(sigmas) - 1
    coeffs = np.zeros((num_steps, order))
    for k in range(num_steps):
        m = min(k + 1, order)
        a, b = sigmas[k], sigmas[k + 1]
        tau = (b - a) / 2 * nodes_01 + (a + b) / 2  # Gauss nodes mapped to [a, b]
        for j in range(m):
            basis = np.ones_like(tau)
            for l in range(m):
                if l != j:
                    basis *= (tau - sigmas[k - l]) / (sigmas[k - j] - sigmas[k - l])
            coeffs[k, j] = (b - a) / 2 * np.sum(weights * basis)
    return coeffs


@dataclasses.dataclass(frozen=True)
class LMSDiscreteScheduler(SigmaSpacingOptions, SigmaScheduler):
    """diffusers' LMSDiscreteScheduler ("LMS" in A1111 / ComfyUI; k-diffusion `sample_lms`).

    lms_order is diffusers' `step(..., order=4)` argument, a config field here.
    """
    diffusers_class = "LMSDiscreteScheduler"
    order = 1
    # lms_order is a step argument in diffusers; rescale_betas_zero_snr is not an LMS option there.
    diffax_extras: ClassVar[tuple[str, ...]] = ("rescale_betas_zero_snr", "lms_order")

    lms_order: int = 4

    def __post_init__(self):
        super().__post_init__()
        if self.lms_order < 1:
            raise ValueError(f"{type(self).__name__}: lms_order must be >= 1, got {self.lms_order}")

    def init(self, num_inference_steps: int, sample=None) -> LMSState:
        """Sigmas, the LMS coefficient table and a zeroed derivative history shaped like `sample`."""
        sigmas, timesteps = self.inference_sigmas(num_inference_steps, self.sigma_schedule)
        sigmas = np.concatenate([sigmas, [0.0]])
        return LMSState(timesteps=table(timesteps), sigma_in=table(sigmas[:-1]), sigmas=table(sigmas),
                        coeffs=table(lms_coefficients(sigmas, self.lms_order)),
                        derivatives=buffer(sample, type(self).__name__, self.lms_order))

    def step(self, state: LMSState, model_output: jax.Array, sample: jax.Array, i: jax.Array,
             key: jax.Array | None = None) -> StepOutput:
        dtype = compute_dtype(sample)
        x = sample.astype(dtype)
        sigma = at(state.sigmas, i, dtype)
        x0 = self.denoised(model_output.astype(dtype), x, sigma)
        derivative = (x - x0) / sigma
        history = jnp.concatenate([derivative[None], state.derivatives[:-1].astype(dtype)])  # newest first
        # Starting part-way (img2img), the history holds fewer derivatives than the coefficients expect; the
        # zeros drop those terms exactly as diffusers' zip over the shorter list does.
        coeffs = at(state.coeffs, i, dtype)
        prev = x + jnp.tensordot(coeffs, history, axes=1)
        state = state.replace(derivatives=history.astype(state.derivatives.dtype))
        return StepOutput(prev.astype(sample.dtype), x0.astype(sample.dtype), state)
