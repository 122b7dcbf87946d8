"""UniPC (Zhao et al. 2023, arXiv:2302.04867), diffusers' UniPCMultistepScheduler: a multistep predictor
(UniP) and a corrector (UniC) that reuses the next step's model evaluation, so order p + 1 costs one model
evaluation per step. B(h) variants bh1 (B(h) = h) and bh2 (B(h) = e^h - 1); data (predict_x0) or noise
prediction; orders 1-3.

At loop index i the step first corrects the sample the previous step predicted (using this step's model
output, unless the corrector is disabled there), then predicts the next one. The per-order coefficients
solve tiny linear systems in lambda ratios, inside `lax.switch` branches of static size.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffax.schedulers import multistep_common as mc
from diffax.schedulers.base import StepOutput, at, buffer, check_options
from diffax.schedulers.sigma_common import FINAL_SIGMAS_TYPES


@flax.struct.dataclass
class UniPCMultistepState(mc.SolverState):
    last_sample: jax.Array        # the sample the previous step started from (the corrector's base)
    this_order: jax.Array         # int32: the previous step's predictor order (the corrector's order)
    corrector_enabled: jax.Array  # [N] bool: False at i = 0 and where i - 1 is in disable_corrector


def unipc_flow_sigmas(num_inference_steps: int, num_train_timesteps: int, shift: float,
                      shift_terminal: float | None) -> np.ndarray:
    """UniPC's rectified-flow sigmas: N points from 1 down to 1/T (the last of N + 1 dropped), shifted by
    shift * s / (1 + (shift - 1) s), optionally stretched so the last one is `shift_terminal`: [N]."""
    s = np.linspace(1, 1 / num_train_timesteps, num_inference_steps + 1)[:-1]
    s = shift * s / (1 + (shift - 1) * s)
    if shift_terminal:
        if num_inference_steps < 2:  # the stretch divides by 1 - s[-1] = 0 (NaN sigmas in diffusers)
            raise ValueError("UniPCMultistepScheduler: shift_terminal needs num_inference_steps >= 2")
        one_minus = 1 - s
        s = 1 - one_minus / (one_minus[-1] / (1 - shift_terminal))
    if abs(s[0] - 1) < 1e-6:  # t = 1 is pure noise, where the flow's x_0 conversion is singular
        s[0] -= 1e-6
    return s


def _phi_coefficients(h: jax.Array, order: int, predict_x0: bool, solver_type: str):
    """(hh, h*phi_1(hh), B(h), b [order]) of the UniPC linear systems (paper eq. 9, 10)."""
    hh = -h if predict_x0 else h
    h_phi_1 = jnp.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    B_h = hh if solver_type == "bh1" else jnp.expm1(hh)
    b, factorial = [], 1
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / B_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, B_h, jnp.stack(b)


def _det3(m):
    return (m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]))


def _solve(rks: list[jax.Array], b: jax.Array, size: int) -> list[jax.Array]:
    """rho solving R rho = b on the leading `size` (<= 3) rows / columns, R[k][j] = rks[j] ** k (Vandermonde),
    by Cramer's rule: exact for these tiny systems and far cheaper to compile than a pivoted LU."""
    R = [[rks[j] ** k for j in range(size)] for k in range(size)]
    b = [b[k] for k in range(size)]
    if size == 1:
        return [b[0] / R[0][0]]
    if size == 2:
        det = R[0][0] * R[1][1] - R[0][1] * R[1][0]
        return [(b[0] * R[1][1] - R[0][1] * b[1]) / det, (R[0][0] * b[1] - b[0] * R[1][0]) / det]
    det = _det3(R)
    replaced = lambda j: [[b[k] if c == j else R[k][c] for c in range(3)] for k in range(3)]  # noqa: E731
    return [_det3(replaced(j)) / det for j in range(3)]


@dataclasses.dataclass(frozen=True)
class UniPCMultistepScheduler(mc.TimestepSpacingOptions, mc.SolverScheduler):
    """diffusers' UniPCMultistepScheduler config; fields and defaults are diffusers'. `disable_corrector`
    is a tuple of step indices whose following step skips the corrector.

    Not implemented (ValueError): solver_p (an external predictor scheduler), use_beta_sigmas,
    use_dynamic_shifting (needs a per-call shift `mu`), use_flow_sigmas with exponential sigmas, and
    thresholding with predict_x0=False (diffusers silently ignores it there).
    """
    diffusers_class: ClassVar[str] = "UniPCMultistepScheduler"
    order: ClassVar[int] = 1
    state_class: ClassVar[type] = UniPCMultistepState

    predict_x0: bool = True
    solver_type: str = "bh2"
    disable_corrector: tuple[int, ...] = ()
    solver_p: Any = None
    final_sigmas_type: str = "zero"
    sigma_min: float | None = None
    sigma_max: float | None = None
    shift_terminal: float | None = None

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        object.__setattr__(self, "disable_corrector", tuple(int(j) for j in self.disable_corrector))
        if self.solver_type in ("midpoint", "heun", "logrho"):  # diffusers' mapping when swapping configs
            object.__setattr__(self, "solver_type", "bh2")
        check_options(name, self, {
            "solver_type": ("bh1", "bh2"), "final_sigmas_type": FINAL_SIGMAS_TYPES, "solver_p": (None,),
        })
        if self.use_flow_sigmas and self.use_exponential_sigmas:
            raise ValueError(f"{name}: use_flow_sigmas cannot be combined with use_exponential_sigmas")
        if self.shift_terminal is not None and not self.use_flow_sigmas:
            raise ValueError(f"{name}: shift_terminal needs use_flow_sigmas=True")
        if not self.predict_x0 and (self.thresholding or self.prediction_type == "flow_prediction"):
            raise ValueError(f"{name}: thresholding and prediction_type='flow_prediction' need predict_x0=True")
        if not self.predict_x0 and self.final_sigmas_type == "zero":
            # The noise-prediction update ends on log(sigma = 0): 0 * inf, NaN images (also in diffusers).
            raise ValueError(f"{name}: predict_x0=False cannot step to sigma 0; use final_sigmas_type='sigma_min'")

    def timesteps_and_sigmas(self, num_inference_steps: int, alphas_cumprod: np.ndarray
                             ) -> tuple[np.ndarray, np.ndarray]:
        """Spaced timesteps, then Karras / exponential sigmas (mapped to flow sigmas with use_flow_sigmas),
        flow sigmas, or the training sigmas; the final sigma is 0 or (sigma_min) the last respaced sigma, or
        the least noisy training sigma."""
        T, N = self.num_train_timesteps, num_inference_steps
        timesteps = mc.solver_timesteps(N, T, self.timestep_spacing, self.steps_offset)
        if self.sigma_schedule != "none":
            timesteps, sigmas = mc.solver_sigmas(alphas_cumprod, timesteps, N, self.sigma_schedule,
                                                 sigma_min=self.sigma_min, sigma_max=self.sigma_max)
            if self.use_flow_sigmas:  # Karras spacing of the VE sigmas, mapped to flow sigmas
                sigmas = sigmas / (sigmas + 1)
                timesteps = (sigmas * T).astype(np.int64)
            last_sigma = sigmas[-1]
        elif self.use_flow_sigmas:
            sigmas = unipc_flow_sigmas(N, T, self.flow_shift, self.shift_terminal)
            timesteps = (sigmas * T).astype(np.int64)
            last_sigma = sigmas[-1]
        else:
            timesteps, sigmas = mc.solver_sigmas(alphas_cumprod, timesteps, N)
            last_sigma = mc.vp_sigma_min(alphas_cumprod)
        return timesteps, np.append(sigmas, 0.0 if self.final_sigmas_type == "zero" else last_sigma)

    def extra_state(self, timesteps: np.ndarray, sample: jax.Array | jax.ShapeDtypeStruct | None) -> dict:
        """The corrector's base sample and order, and where the corrector runs."""
        enabled = np.array([j > 0 and (j - 1) not in self.disable_corrector for j in range(len(timesteps))])
        return dict(last_sample=buffer(sample, type(self).__name__), this_order=np.ones((), np.int32),
                    corrector_enabled=enabled)

    def _update(self, x: jax.Array, m0: jax.Array, D1s: list[jax.Array], rhos: list[jax.Array], t: jax.Array,
                s0: jax.Array, state: UniPCMultistepState) -> jax.Array:
        """x_t = (first-order step from table index s0 to t) - B(h) * sum_k rho_k D1_k, in the solver's
        parameterisation (x_0 or eps); rhos and D1s have equal length."""
        alpha_t, sigma_t, lambda_t = state.coefficients(t)
        alpha_s0, sigma_s0, lambda_s0 = state.coefficients(s0)
        h_phi_1, B_h, _ = _phi_coefficients(lambda_t - lambda_s0, 1, self.predict_x0, self.solver_type)
        if self.predict_x0:
            x_t, scale = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0, alpha_t * B_h
        else:
            x_t, scale = alpha_t / alpha_s0 * x - sigma_t * h_phi_1 * m0, sigma_t * B_h
        if not D1s:
            # A first-order predictor has no correction term. diffusers still adds B(h) * 0, which is NaN on
            # the last step to sigma = 0 with bh1 (B(h) = h = -inf there); we return x_0 as the solver should.
            return x_t
        return x_t - scale * sum(r * d for r, d in zip(rhos, D1s))

    def _differences(self, history: jax.Array, state: UniPCMultistepState, order: int, s0: jax.Array,
                     h: jax.Array) -> tuple[list[jax.Array], list[jax.Array]]:
        """Lambda ratios r_k and divided differences (m_k - m_0) / r_k of the order - 1 older outputs."""
        m0 = history[-1]
        rks, D1s = [], []
        for k in range(1, order):
            rk = (at(state.lambda_t, s0 - k) - at(state.lambda_t, s0)) / h
            rks.append(rk)
            D1s.append((history[-(k + 1)] - m0) / rk)
        rks.append(jnp.ones((), h.dtype))
        return rks, D1s

    def _predictor(self, order: int, history: jax.Array, sample: jax.Array, state: UniPCMultistepState,
                   i: jax.Array) -> jax.Array:
        """UniP-order: from sigmas[i] to sigmas[i + 1] with the last `order` converted outputs."""
        h = at(state.lambda_t, i + 1) - at(state.lambda_t, i)
        rks, D1s = self._differences(history, state, order, i, h)
        if order == 1:
            rhos = []
        elif order == 2:
            rhos = [jnp.asarray(0.5, h.dtype)]
        else:
            _, _, b = _phi_coefficients(h, order, self.predict_x0, self.solver_type)
            rhos = _solve(rks, b, order - 1)
        return self._update(sample, history[-1], D1s, rhos, i + 1, i, state)

    def _corrector(self, order: int, state: UniPCMultistepState, model_t: jax.Array, sample: jax.Array,
                   i: jax.Array) -> jax.Array:
        """UniC-order: redo the previous step (sigmas[i - 1] -> sigmas[i]) from last_sample, adding this
        step's converted output model_t to the previous step's history."""
        history = state.model_outputs
        h = at(state.lambda_t, i) - at(state.lambda_t, i - 1)
        rks, D1s = self._differences(history, state, order, i - 1, h)
        if order == 1:
            rhos = [jnp.asarray(0.5, h.dtype)]
        else:
            _, _, b = _phi_coefficients(h, order, self.predict_x0, self.solver_type)
            rhos = _solve(rks, b, order)
        D1s = D1s + [model_t - history[-1]]
        return self._update(state.last_sample, history[-1], D1s, rhos, i, i - 1, state).astype(sample.dtype)

    def step(self, state: UniPCMultistepState, model_output: jax.Array, sample: jax.Array, i: jax.Array,
             key: jax.Array | None = None) -> StepOutput:
        """Correct the sample at index i (UniC), then predict index i + 1 (UniP)."""
        N = state.timesteps.shape[0]
        converted, x0 = self.convert(state, model_output, sample, i, self.predict_x0)
        orders = range(1, self.solver_order + 1)

        use_corrector = at(state.corrector_enabled, i) & (state.lower_order_nums > 0)
        correctors = [lambda: sample] + [functools.partial(self._corrector, k, state, converted, sample, i)
                                         for k in orders]
        sample = jax.lax.switch(jnp.where(use_corrector, state.this_order, 0), correctors)

        history = mc.push_history(state.model_outputs, converted)
        this_order = jnp.minimum(self.solver_order, N - i) if self.lower_order_final else self.solver_order
        this_order = jnp.minimum(this_order, state.lower_order_nums + 1).astype(jnp.int32)
        predictors = [functools.partial(self._predictor, k, history, sample, state, i) for k in orders]
        prev = jax.lax.switch(this_order - 1, predictors)
        state = self.pushed(state, history, last_sample=sample, this_order=this_order)
        return StepOutput(prev.astype(sample.dtype), x0.astype(sample.dtype), state)
