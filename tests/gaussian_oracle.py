"""Closed-form denoisers for Gaussian data: the ground truth of tests/test_gaussian_samplers.py.

The data are x0 ~ N(mu, s^2) independently per coordinate (mu and s broadcast against the last axis of x).
Under any Gaussian corruption x = a x0 + b eps, eps ~ N(0, 1), the pair (x0, x) is jointly Gaussian, so

    E[x0 | x]  = mu + a s^2 (x - a mu) / (a^2 s^2 + b^2)
    E[eps | x] = (x - a E[x0 | x]) / b
    grad_x log p(x) = -(x - a mu) / (a^2 s^2 + b^2)

A network trained to convergence outputs exactly these conditional means, so each factory below returns the
perfect model under one of diffax's model contracts (how the sampler scales x and what it passes as t):

  * `discrete_denoiser`: an alpha_bar-trained (DDPM-style) network. Its input is the variance-preserving
    sample x = a x0 + b eps with a = 1 / sqrt(1 + sigma^2), b = sigma a, where sigma is the VE noise level
    sqrt((1 - abar) / abar) of the timestep t it is given. Both kinds of sampler fit: DDIM / DDPM / PNDM / the
    DPM-Solver family feed x itself at abar_t; the sigma-space family (Euler, Heun, DPM2, LMS, k-diffusion)
    feeds x_ve / sqrt(sigma^2 + 1), which is the same thing. `sigma_of_t` maps the timestep to sigma:
      - `training_sigma`: integer timesteps, looked up in the training table (exact for every sampler whose
        timesteps are integers: a trained network sees nothing else);
      - `scheduler_sigma`: the sigma the scheduler itself paired with each (possibly fractional) timestep,
        read from its state. diffusers' sigma-space samplers do not map t to sigma by one rule: Euler's
        spaced sigmas are linear in t between training entries, its Karras sigmas and DPM2's midpoints are
        placed in t by log-sigma interpolation, and KDPM2 / DPM-Solver with Karras sigmas round t to an
        integer that no longer matches sigma at all. Looking the pair up makes the oracle exact for all of
        them; tests/test_gaussian_samplers.py checks separately that the pairs agree with the training table.
  * `edm_denoiser`: EDM preconditioning (diffusers' EDM schedulers, k-diffusion model_type 'edm'):
    input x / sqrt(sigma^2 + sigma_data^2), t = 0.25 log sigma, x0 = c_skip x + c_out F.
  * `flow_denoiser`: rectified flow x = (1 - sigma) x0 + sigma eps, t = sigma T, output v = eps - x0.
  * `ve_score`: the score-SDE VE contract, the score itself at noise level sigma (passed as t).
  * `vp_sde_eps`: the score-SDE VP contract, eps at continuous time t with the scheduler's alpha(t), std(t).
  * `consistency_denoiser`, `flow_consistency_denoiser`: consistency models (an LCM; a flow model sampled
    with stochastic_sampling). They are not trained to the posterior mean: their x0 estimate is the
    probability-flow ODE's end point from x, which the samplers then re-noise with fresh noise. With a
    posterior-mean model these samplers shrink the variance (the mean of x0 given x is narrower than x0).

`transport` is that end point in general: for Gaussian data the probability-flow ODE maps the marginal
N(a0 mu, a0^2 s^2 + b0^2) at one level onto N(a1 mu, a1^2 s^2 + b1^2) at another by the unique increasing
affine map, i.e. it keeps the standardised coordinate (x - a mu) / sqrt(a^2 s^2 + b^2) fixed.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]
SigmaOfT = Callable[[jax.Array], jax.Array]


def posterior_x0(x: jax.Array, a, b, mu, s) -> jax.Array:
    """E[x0 | x] for x = a x0 + b eps."""
    return mu + a * s ** 2 * (x - a * mu) / (a ** 2 * s ** 2 + b ** 2)


def posterior_eps(x: jax.Array, a, b, mu, s) -> jax.Array:
    """E[eps | x] for x = a x0 + b eps (b > 0)."""
    return (x - a * mu) * b / (a ** 2 * s ** 2 + b ** 2)


def transport(x: jax.Array, mu, s, a0, b0, a1, b1) -> jax.Array:
    """The probability-flow ODE's exact solution map from level (a0, b0) to level (a1, b1)."""
    return a1 * mu + jnp.sqrt(a1 ** 2 * s ** 2 + b1 ** 2) * (x - a0 * mu) / jnp.sqrt(a0 ** 2 * s ** 2 + b0 ** 2)


def alpha_bar_output(prediction_type: str, x: jax.Array, a, b, mu, s) -> jax.Array:
    """The exact output of an alpha_bar model whose input is x = a x0 + b eps (a^2 + b^2 = 1)."""
    if prediction_type == "epsilon":
        return posterior_eps(x, a, b, mu, s)
    if prediction_type == "sample":
        return posterior_x0(x, a, b, mu, s)
    if prediction_type == "v_prediction":  # v = a eps - b x0
        return a * posterior_eps(x, a, b, mu, s) - b * posterior_x0(x, a, b, mu, s)
    raise ValueError(f"alpha_bar models predict epsilon, sample or v_prediction, got {prediction_type!r}")


def training_sigma(alphas_cumprod: np.ndarray) -> SigmaOfT:
    """sigma(t) for integer timesteps t: the training table's sqrt((1 - abar_t) / abar_t)."""
    sigmas = np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)

    def sigma_of_t(t: jax.Array) -> jax.Array:
        return jnp.asarray(sigmas)[jnp.round(t).astype(jnp.int32)]
    return sigma_of_t


def scheduler_sigma(timesteps: np.ndarray, sigmas: np.ndarray) -> SigmaOfT:
    """sigma(t) read from a scheduler's own (timestep, sigma) pairs (e.g. `state.timesteps, state.sigma_in`):
    the entry whose timestep is nearest to t. Raises ValueError if one timestep is paired with two sigmas."""
    timesteps, sigmas = np.asarray(timesteps, np.float64), np.asarray(sigmas, np.float64)
    if timesteps.shape != sigmas.shape:
        raise ValueError(f"timesteps {timesteps.shape} and sigmas {sigmas.shape} must pair up one to one")
    for t in np.unique(timesteps):
        paired = sigmas[timesteps == t]
        if np.ptp(paired) > 1e-9 * paired.max():
            raise ValueError(f"timestep {t} is paired with several sigmas {paired}: t does not determine sigma")

    def sigma_of_t(t: jax.Array) -> jax.Array:
        table_t = jnp.asarray(timesteps, t.dtype if jnp.issubdtype(t.dtype, jnp.floating) else jnp.float32)
        return jnp.asarray(sigmas)[jnp.argmin(jnp.abs(table_t - t))]
    return sigma_of_t


def discrete_denoiser(mu, s, prediction_type: str, sigma_of_t: SigmaOfT) -> DenoiseFn:
    """The perfect alpha_bar-trained network: input a x0 + b eps at the sigma of t, a = 1 / sqrt(1 + sigma^2)."""
    def denoise(x: jax.Array, t: jax.Array) -> jax.Array:
        sigma = sigma_of_t(t).astype(x.dtype)
        a = 1 / jnp.sqrt(1 + sigma ** 2)
        return alpha_bar_output(prediction_type, x, a, sigma * a, mu, s).astype(x.dtype)
    return denoise


def edm_denoiser(mu, s, prediction_type: str, sigma_data: float) -> DenoiseFn:
    """The perfect EDM-preconditioned network: input x / sqrt(sigma^2 + sigma_data^2) with x = x0 + sigma eps,
    t = 0.25 log sigma, output F with E[x0 | x] = c_skip x + c_out F (c_out negated for v_prediction)."""
    def denoise(x_in: jax.Array, t: jax.Array) -> jax.Array:
        sigma = jnp.exp(4 * t.astype(x_in.dtype))
        x = x_in * jnp.sqrt(sigma ** 2 + sigma_data ** 2)
        c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
        c_out = sigma * sigma_data / jnp.sqrt(sigma ** 2 + sigma_data ** 2)
        if prediction_type == "v_prediction":
            c_out = -c_out
        elif prediction_type != "epsilon":
            raise ValueError(f"EDM models predict epsilon or v_prediction, got {prediction_type!r}")
        return ((posterior_x0(x, 1.0, sigma, mu, s) - c_skip * x) / c_out).astype(x_in.dtype)
    return denoise


def flow_denoiser(mu, s, num_train_timesteps: int) -> DenoiseFn:
    """The perfect flow-matching network: x = (1 - sigma) x0 + sigma eps, t = sigma T, output E[eps - x0 | x]."""
    def denoise(x: jax.Array, t: jax.Array) -> jax.Array:
        sigma = t.astype(x.dtype) / num_train_timesteps
        a = 1 - sigma
        return (posterior_eps(x, a, sigma, mu, s) - posterior_x0(x, a, sigma, mu, s)).astype(x.dtype)
    return denoise


def flow_consistency_denoiser(mu, s, num_train_timesteps: int) -> DenoiseFn:
    """A flow model whose x0 estimate x - sigma v is the probability-flow ODE's end point from x (a
    consistency-distilled flow model): the contract of FlowMatchEulerDiscreteScheduler(stochastic_sampling=True),
    which re-noises that estimate with fresh noise every step."""
    def denoise(x: jax.Array, t: jax.Array) -> jax.Array:
        sigma = t.astype(x.dtype) / num_train_timesteps
        return ((x - transport(x, mu, s, 1 - sigma, sigma, 1.0, 0.0)) / sigma).astype(x.dtype)
    return denoise


def ve_score(mu, s) -> DenoiseFn:
    """The exact score of x = x0 + sigma eps, called with the noise level sigma as t (ScoreSdeVeScheduler)."""
    def denoise(x: jax.Array, sigma: jax.Array) -> jax.Array:
        return (-(x - mu) / (s ** 2 + sigma.astype(x.dtype) ** 2)).astype(x.dtype)
    return denoise


def vp_sde_eps(mu, s, std_of_t: Callable[[jax.Array], jax.Array]) -> DenoiseFn:
    """The exact eps at continuous VP time t, x = alpha(t) x0 + std(t) eps, alpha = sqrt(1 - std^2)
    (the ScoreSdeVp* schedulers; pass `scheduler.std`)."""
    def denoise(x: jax.Array, t: jax.Array) -> jax.Array:
        b = std_of_t(t.astype(x.dtype))
        return posterior_eps(x, jnp.sqrt(1 - b ** 2), b, mu, s).astype(x.dtype)
    return denoise


def consistency_denoiser(mu, s, prediction_type: str, alphas_cumprod: np.ndarray, timestep_scaling: float,
                         sigma_data: float = 0.5) -> DenoiseFn:
    """The perfect latent consistency model (LCMScheduler): at integer timestep t its boundary-condition
    output c_skip(t) x + c_out(t) x0_pred equals the probability-flow ODE's end point transport(x -> x0).
    The prediction is expressed in `prediction_type` through abar_t, as the scheduler decodes it."""
    abar_table = np.asarray(alphas_cumprod)

    def denoise(x: jax.Array, t: jax.Array) -> jax.Array:
        abar = jnp.asarray(abar_table)[jnp.round(t).astype(jnp.int32)].astype(x.dtype)
        a, b = jnp.sqrt(abar), jnp.sqrt(1 - abar)
        scaled = t.astype(x.dtype) * timestep_scaling
        c_skip = sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2)
        c_out = scaled / jnp.sqrt(scaled ** 2 + sigma_data ** 2)
        x0 = (transport(x, mu, s, a, b, 1.0, 0.0) - c_skip * x) / c_out
        eps = (x - a * x0) / b
        if prediction_type == "epsilon":
            return eps.astype(x.dtype)
        if prediction_type == "sample":
            return x0.astype(x.dtype)
        if prediction_type == "v_prediction":
            return (a * eps - b * x0).astype(x.dtype)
        raise ValueError(f"LCM models predict epsilon, sample or v_prediction, got {prediction_type!r}")
    return denoise
