"""Noise-schedule tables: betas, alpha_bar, sigmas, timestep spacings, SNR.

Everything here is NumPy in float64 and runs once, outside any jitted function: the tables are constants
of the sampling program, and their sizes depend only on Python ints, so a sampler's shapes stay static.
The formulas and their edge cases (rounding, offsets, the order of operations) are those of diffusers'
schedulers, so that the same config yields the same timesteps and sigmas; the float64 arithmetic differs
from diffusers' float32 tables by about 1e-7 relative.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

# The beta schedules of diffusers' schedulers. diffusers' HeunDiscreteScheduler (and diffax's sigma-space
# samplers) also take "exp" (alpha_bar(t) = exp(-12 t)).
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
EXP_BETA_SCHEDULE = "exp"
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
# alpha_bar_T of a zero-terminal-SNR schedule where a sampler needs a finite sigma_T and lambda_T (sigma_T
# about 4096), as diffusers' sigma-space and exponential-integrator samplers set it.
ZERO_SNR_ALPHA_BAR = 2.0 ** -24


def betas_for_alpha_bar(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Betas discretising the cosine alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2)^2 (Nichol & Dhariwal),
    each clipped to `max_beta` so the last steps stay invertible."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    t = np.arange(num_train_timesteps)
    return np.array([min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps),
                         max_beta) for i in t], dtype=np.float64)


def exp_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Betas discretising alpha_bar(t) = exp(-12 t), each clipped to `max_beta` (diffusers' 'exp' schedule)."""
    t = np.arange(num_train_timesteps + 1) / num_train_timesteps
    abar = np.exp(-12.0 * t)
    return np.minimum(1 - abar[1:] / abar[:-1], max_beta)


def make_betas(beta_schedule: str = "linear", num_train_timesteps: int = 1000, beta_start: float = 1e-4,
               beta_end: float = 0.02, trained_betas: Sequence[float] | None = None) -> np.ndarray:
    """beta_t for t = 0..T-1: [T] float64. `trained_betas`, when given, wins, as in diffusers."""
    if trained_betas is not None:
        return np.asarray(trained_betas, dtype=np.float64)
    T = num_train_timesteps
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, T, dtype=np.float64)
    if beta_schedule == "scaled_linear":  # Stable Diffusion's schedule
        return np.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=np.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(T)
    if beta_schedule == "sigmoid":  # GeoDiff
        x = np.linspace(-6, 6, T, dtype=np.float64)
        return 1 / (1 + np.exp(-x)) * (beta_end - beta_start) + beta_start
    if beta_schedule == EXP_BETA_SCHEDULE:
        return exp_betas(T)
    raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES + (EXP_BETA_SCHEDULE,)}, got {beta_schedule!r}")


def vp_sde_betas(beta_min: float, beta_max: float, n: int) -> np.ndarray:
    """The discrete betas of the VP SDE with beta(t) = beta_min + t (beta_max - beta_min) over n steps of
    1 / n (Song et al. 2021): beta_i = beta(i / (n - 1)) / n, [n]."""
    return np.linspace(beta_min / n, beta_max / n, n)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha_bar) so alpha_bar_T = 0 (zero terminal SNR)
    while alpha_bar_0 keeps its value. Needs v-prediction (epsilon is undefined at SNR 0)."""
    abar_sqrt = np.sqrt(np.cumprod(1.0 - betas))
    first, last = abar_sqrt[0], abar_sqrt[-1]
    abar_sqrt = (abar_sqrt - last) * first / (first - last)
    abar = abar_sqrt ** 2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """The training noise schedule of a diffusion model: diffusers' shared scheduler config keys."""
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    rescale_betas_zero_snr: bool = False

    def betas(self) -> np.ndarray:
        """[T] float64."""
        betas = make_betas(self.beta_schedule, self.num_train_timesteps, self.beta_start, self.beta_end,
                           self.trained_betas)
        return rescale_zero_terminal_snr(betas) if self.rescale_betas_zero_snr else betas

    def alphas_cumprod(self, finite_terminal_snr: bool = False) -> np.ndarray:
        """alpha_bar_t = prod_{s<=t} (1 - beta_s): [T] float64.

        finite_terminal_snr: with rescale_betas_zero_snr, end at ZERO_SNR_ALPHA_BAR instead of 0, for the
        samplers that need a finite sigma at the first step.
        """
        alphas_cumprod = np.cumprod(1.0 - self.betas())
        if finite_terminal_snr and self.rescale_betas_zero_snr:
            alphas_cumprod[-1] = ZERO_SNR_ALPHA_BAR
        return alphas_cumprod


def sigmas_from_alphas_cumprod(alphas_cumprod: np.ndarray) -> np.ndarray:
    """The variance-exploding view: sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), [T]."""
    return np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


def snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar), [T]."""
    return alphas_cumprod / (1.0 - alphas_cumprod)


def spaced_timesteps(num_inference_steps: int, num_train_timesteps: int, spacing: str = "leading",
                     steps_offset: int = 0) -> np.ndarray:
    """Integer inference timesteps, descending: [N] int64 (DDPM / DDIM / PNDM style).

    'linspace' spreads N points over [0, T-1]; 'leading' takes multiples of T // N (plus steps_offset);
    'trailing' counts down from T - 1 in steps of T / N (Lin et al. 2023, table 2).
    """
    N, T = num_inference_steps, num_train_timesteps
    if not 0 < N <= T:
        raise ValueError(f"num_inference_steps must be in [1, {T}] (num_train_timesteps), got {N}")
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, N).round()[::-1]
    elif spacing == "leading":
        ts = (np.arange(0, N) * (T // N)).round()[::-1] + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / N)) - 1
    else:
        raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}")
    return np.ascontiguousarray(ts).astype(np.int64)


def spaced_timesteps_float(num_inference_steps: int, num_train_timesteps: int, spacing: str = "linspace",
                           steps_offset: int = 0) -> np.ndarray:
    """Fractional inference timesteps, descending, as the sigma-space (Euler-family) schedulers space them:
    [N] float64. Unlike `spaced_timesteps`, 'linspace' is not rounded."""
    N, T = num_inference_steps, num_train_timesteps
    if not 0 < N <= T:
        raise ValueError(f"num_inference_steps must be in [1, {T}] (num_train_timesteps), got {N}")
    if spacing == "linspace":
        return np.linspace(0, T - 1, N, dtype=np.float64)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, N) * (T // N)).round()[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        return np.arange(T, 0, -T / N).round().astype(np.float64) - 1
    raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}")


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timesteps of `sigmas` by linear interpolation in log-sigma over the training table."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return ((1 - w) * low + w * high).reshape(np.shape(sigmas))


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 eq. 5: sigmas evenly spaced in sigma^(1/rho), descending, [n]."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """Sigmas evenly spaced in log-sigma, descending, [n]."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))
