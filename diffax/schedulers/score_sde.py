"""Score-SDE samplers (Song et al. 2021, "Score-Based Generative Modeling through SDEs").

* ScoreSdeVeScheduler: diffusers' ScoreSdeVeScheduler with its pipeline's loop, the predictor-corrector
  sampler of the variance-exploding SDE: per inference step `correct_steps` Langevin corrector updates, then
  a reverse-diffusion predictor step.
* ScoreSdeVpScheduler: diffusers' ScoreSdeVpScheduler, Euler-Maruyama on the reverse variance-preserving SDE.
* ScoreSdeVpPredictorCorrectorScheduler: the same predictor with Song et al.'s Langevin corrector for VP.
* ScoreSdeVpProbabilityFlowScheduler: deterministic Euler on the VP probability-flow ODE (no diffusers
  counterpart; Song et al.'s predictor with probability_flow=True).

Model contracts (they differ, as in diffusers and Song et al.'s code):
  VE: denoise_fn(x, sigma) returns the score s(x, sigma) = grad_x log p_sigma(x), called with the noise
      level sigma itself (diffusers' pipeline passes `scheduler.sigmas[i]`).
  VP: denoise_fn(x, t) returns the noise prediction eps(x, t) at continuous time t in [sampling_eps, 1];
      the score is -eps / std(t), std(t)^2 = 1 - exp(-t^2 (beta_max - beta_min) / 2 - t beta_min), as
      diffusers' step_pred computes it. (Song et al.'s continuous VP models take 999 t as their time input:
      wrap denoise_fn accordingly.)

Corrector evaluations are loop entries of their own: `state.timesteps` has (correct_steps + 1) entries per
inference step, so `diffax.sampling.sample` runs the predictor-corrector loop unchanged. Every entry draws
one Gaussian; the last predictor step returns its noise-free mean, as the pipelines of diffusers (VE) and
Song et al. (`denoise=True`) output.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffax.schedulers.base import (Scheduler, SchedulerState, StepOutput, at, compute_dtype, gaussian, predict_x0_eps,
                                    table)
from diffax.schedules import vp_sde_betas


@flax.struct.dataclass
class ScoreSdeState(SchedulerState):
    corrector: jax.Array   # [S] bool: a Langevin corrector entry (else a predictor entry)
    last: jax.Array        # [S] bool: the final predictor entry (returns the noise-free mean)
    coef_a: jax.Array      # [S] VE: predictor sigma; VP: time t
    coef_b: jax.Array      # [S] VE: the previous discrete sigma; VP: the corrector's alpha


def langevin_step_size(score: jax.Array, noise: jax.Array, snr: float) -> jax.Array:
    """Song et al.'s Langevin step 2 (snr |z| / |score|)^2, norms averaged over the batch (as in their code
    and diffusers' step_correct: one step size for the whole batch)."""
    grad_norm = jnp.mean(jnp.linalg.norm(score.reshape(score.shape[0], -1), axis=-1))
    noise_norm = jnp.mean(jnp.linalg.norm(noise.reshape(noise.shape[0], -1), axis=-1))
    return 2 * (snr * noise_norm / grad_norm) ** 2


def pc_layout(num_inference_steps: int, correct_steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(step index [S], corrector flag [S], last-predictor flag [S]) with S = N (correct_steps + 1)."""
    per_step = correct_steps + 1
    step = np.repeat(np.arange(num_inference_steps), per_step)
    corrector = np.tile(np.arange(per_step) < correct_steps, num_inference_steps)
    last = np.zeros(len(step), bool)
    last[-1] = True
    return step, corrector, last


@dataclasses.dataclass(frozen=True)
class LangevinCorrectorOptions(Scheduler):
    """Song et al.'s Langevin corrector: `correct_steps` corrector evaluations before each predictor step,
    each with step size 2 (snr |z| / |score|)^2 (scaled by alpha_i on the VP SDE)."""
    snr: float = 0.15
    correct_steps: int = 1

    def __post_init__(self):
        super().__post_init__()
        if self.correct_steps < 0:
            raise ValueError(f"{type(self).__name__}: correct_steps must be >= 0, got {self.correct_steps}")

    @property
    def order(self) -> int:
        """Model evaluations per inference step: the correctors and the predictor."""
        return self.correct_steps + 1


@dataclasses.dataclass(frozen=True)
class ScoreSdeVeScheduler(LangevinCorrectorOptions):
    """diffusers' ScoreSdeVeScheduler, run as its ScoreSdeVePipeline runs it (see the module docstring).

    The model sees sigma_k = sigma_min (sigma_max / sigma_min)^{t_k}, t_k = linspace(1, sampling_eps, N);
    the predictor moves between the geometric discrete sigmas exp(linspace(log sigma_min, log sigma_max,
    N)) at index floor(t_k (N - 1)), as diffusers' step_pred does.
    """
    diffusers_class: ClassVar[str] = "ScoreSdeVeScheduler"

    num_train_timesteps: int = 2000
    sigma_min: float = 0.01
    sigma_max: float = 1348.0
    sampling_eps: float = 1e-5

    def init(self, num_inference_steps: int, sample=None) -> ScoreSdeState:
        """Per-entry tables for N (correct_steps + 1) model evaluations; no history (`sample` unused)."""
        N = num_inference_steps
        t = np.linspace(1, self.sampling_eps, N)
        sigmas = self.sigma_min * (self.sigma_max / self.sigma_min) ** t
        discrete = np.exp(np.linspace(np.log(self.sigma_min), np.log(self.sigma_max), N))
        index = np.floor(t * (N - 1)).astype(np.int64)
        adjacent = np.where(index == 0, 0.0, discrete[np.maximum(index - 1, 0)])
        step, corrector, last = pc_layout(N, self.correct_steps)
        return ScoreSdeState(timesteps=table(sigmas[step]), corrector=corrector, last=last,
                             coef_a=table(discrete[index][step]), coef_b=table(adjacent[step]))

    def init_noise_sigma(self, state: ScoreSdeState) -> float:
        return self.sigma_max

    def add_noise(self, state: ScoreSdeState, original: jax.Array, noise: jax.Array, i: int) -> jax.Array:
        """x_0 + sigma noise at the model sigma of loop index i."""
        return (original + at(state.timesteps, i) * noise).astype(original.dtype)

    def step(self, state: ScoreSdeState, model_output: jax.Array, sample: jax.Array, i: jax.Array,
             key: jax.Array | None = None) -> StepOutput:
        dtype = compute_dtype(sample)
        x, score = sample.astype(dtype), model_output.astype(dtype)
        noise = gaussian(key, sample, type(self).__name__).astype(dtype)
        # Langevin corrector.
        size = langevin_step_size(score, noise, self.snr)
        corrected = x + size * score + jnp.sqrt(2 * size) * noise
        # Reverse-diffusion predictor between consecutive discrete sigmas.
        sigma, adjacent = at(state.coef_a, i, dtype), at(state.coef_b, i, dtype)
        diffusion_sq = sigma ** 2 - adjacent ** 2
        mean = x + diffusion_sq * score
        predicted = jnp.where(at(state.last, i), mean, mean + jnp.sqrt(diffusion_sq) * noise)
        prev = jnp.where(at(state.corrector, i), corrected, predicted)
        sigma_model = at(state.timesteps, i, dtype)
        x0 = x + sigma_model ** 2 * score  # Tweedie's formula, for previews
        return StepOutput(prev.astype(sample.dtype), x0.astype(sample.dtype), state)


@dataclasses.dataclass(frozen=True)
class ScoreSdeVpScheduler(Scheduler):
    """diffusers' ScoreSdeVpScheduler: Euler-Maruyama on the reverse VP SDE with beta(t) linear in t.

    Model contract: denoise_fn(x, t) -> eps (see the module docstring). The step size is 1 / N while the
    model times are linspace(1, sampling_eps, N), as in diffusers and Song et al.'s EulerMaruyamaPredictor.
    """
    diffusers_class: ClassVar[str] = "ScoreSdeVpScheduler"
    order: ClassVar[int] = 1

    num_train_timesteps: int = 2000
    beta_min: float = 0.1
    beta_max: float = 20.0
    sampling_eps: float = 1e-3

    def beta(self, t: jax.Array) -> jax.Array:
        """beta(t) = beta_min + t (beta_max - beta_min)."""
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def std(self, t: jax.Array) -> jax.Array:
        """Marginal standard deviation of the noise at time t."""
        log_mean_coeff = -0.25 * t ** 2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
        return jnp.sqrt(1.0 - jnp.exp(2.0 * log_mean_coeff))

    def _layout(self, num_inference_steps: int, correct_steps: int) -> ScoreSdeState:
        N = num_inference_steps
        t = np.linspace(1, self.sampling_eps, N)
        # Song et al.'s corrector scales VP steps by the discrete alpha_i = 1 - beta_i at i = floor(t (N - 1)).
        alpha = 1.0 - vp_sde_betas(self.beta_min, self.beta_max, N)[np.floor(t * (N - 1)).astype(np.int64)]
        step, corrector, last = pc_layout(N, correct_steps)
        return ScoreSdeState(timesteps=table(t[step]), corrector=corrector, last=last, coef_a=table(t[step]),
                             coef_b=table(alpha[step]))

    def init(self, num_inference_steps: int, sample=None) -> ScoreSdeState:
        """Times t [N] and per-entry tables; no history (`sample` unused)."""
        return self._layout(num_inference_steps, 0)

    def predictor(self, x: jax.Array, eps: jax.Array, t: jax.Array, num_steps: int,
                  noise: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """(x_next, its mean): an Euler-Maruyama step of the reverse SDE with dt = -1 / num_steps, or of the
        probability-flow ODE when noise is None (drift f - g^2 score / 2, no diffusion)."""
        score = -eps / self.std(t)
        beta = self.beta(t)
        dt = -1.0 / num_steps
        g2_factor = 1.0 if noise is not None else 0.5
        mean = x + (-0.5 * beta * x - g2_factor * beta * score) * dt
        if noise is None:
            return mean, mean
        return mean + jnp.sqrt(beta) * jnp.sqrt(-dt) * noise, mean

    def x0_preview(self, x: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
        """x_0 = (x - std eps) / alpha at time t."""
        std = self.std(t)
        x0, _ = predict_x0_eps("epsilon", eps, x, jnp.sqrt(1 - std ** 2), std)
        return x0

    def step(self, state: ScoreSdeState, model_output: jax.Array, sample: jax.Array, i: jax.Array,
             key: jax.Array | None = None) -> StepOutput:
        dtype = compute_dtype(sample)
        x, eps = sample.astype(dtype), model_output.astype(dtype)
        t = at(state.coef_a, i, dtype)
        num_steps = jnp.asarray(state.coef_a).shape[0]
        noise = gaussian(key, sample, type(self).__name__).astype(dtype)
        prev, mean = self.predictor(x, eps, t, num_steps, noise)
        prev = jnp.where(at(state.last, i), mean, prev)
        return StepOutput(prev.astype(sample.dtype), self.x0_preview(x, eps, t).astype(sample.dtype), state)

    def add_noise(self, state: ScoreSdeState, original: jax.Array, noise: jax.Array, i: int) -> jax.Array:
        """alpha(t) x_0 + std(t) noise at the time of loop index i."""
        std = self.std(at(state.coef_a, i))
        return (jnp.sqrt(1 - std ** 2) * original + std * noise).astype(original.dtype)


@dataclasses.dataclass(frozen=True)
class ScoreSdeVpPredictorCorrectorScheduler(LangevinCorrectorOptions, ScoreSdeVpScheduler):
    """Song et al.'s PC sampler for the VP SDE: `correct_steps` Langevin corrector updates (step size
    2 alpha_i (snr |z| / |score|)^2) before each Euler-Maruyama predictor step. No diffusers counterpart."""
    snr: float = 0.16

    def init(self, num_inference_steps: int, sample=None) -> ScoreSdeState:
        """Per-entry tables for N (correct_steps + 1) model evaluations; no history (`sample` unused)."""
        return self._layout(num_inference_steps, self.correct_steps)

    def step(self, state: ScoreSdeState, model_output: jax.Array, sample: jax.Array, i: jax.Array,
             key: jax.Array | None = None) -> StepOutput:
        dtype = compute_dtype(sample)
        x, eps = sample.astype(dtype), model_output.astype(dtype)
        t = at(state.coef_a, i, dtype)
        num_steps = jnp.asarray(state.coef_a).shape[0] // self.order  # inference steps (static)
        noise = gaussian(key, sample, type(self).__name__).astype(dtype)
        score = -eps / self.std(t)
        size = langevin_step_size(score, noise, self.snr) * at(state.coef_b, i, dtype)
        corrected = x + size * score + jnp.sqrt(2 * size) * noise
        predicted, mean = self.predictor(x, eps, t, num_steps, noise)
        prev = jnp.where(at(state.corrector, i), corrected, jnp.where(at(state.last, i), mean, predicted))
        return StepOutput(prev.astype(sample.dtype), self.x0_preview(x, eps, t).astype(sample.dtype), state)


@dataclasses.dataclass(frozen=True)
class ScoreSdeVpProbabilityFlowScheduler(ScoreSdeVpScheduler):
    """Deterministic Euler on the VP probability-flow ODE dx/dt = -beta(t) (x + score) / 2, with diffusers'
    VP time grid and step 1 / N. No noise, no diffusers counterpart."""

    def step(self, state: ScoreSdeState, model_output: jax.Array, sample: jax.Array, i: jax.Array,
             key: jax.Array | None = None) -> StepOutput:
        dtype = compute_dtype(sample)
        x, eps = sample.astype(dtype), model_output.astype(dtype)
        t = at(state.coef_a, i, dtype)
        prev, _ = self.predictor(x, eps, t, jnp.asarray(state.coef_a).shape[0], None)
        return StepOutput(prev.astype(sample.dtype), self.x0_preview(x, eps, t).astype(sample.dtype), state)
