"""Training objectives: the forward process, regression targets and loss weights.

Two parameterisations of x_t:
  alpha_bar (DDPM family):  x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,  t an integer training timestep.
  rectified flow:           x_t = (1 - s) x_0 + s eps,                      s in [0, 1] a float.

The model regresses one of (prediction_type, as diffusers' schedulers name them):
  "epsilon"          eps
  "v_prediction"     v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0   (Salimans & Ho 2022)
  "sample"           x_0
  "flow_prediction"  eps - x_0, the velocity dx_t/ds of the straight path (rectified flow, SD3 / Flux)

Min-SNR-gamma weighting (Hang et al. 2023) caps each timestep's weight at gamma in x_0-error units:
the per-example loss on target `prediction_type` is weighted by min(snr, gamma) / snr (epsilon),
min(snr, gamma) / (snr + 1) (v), or min(snr, gamma) (x_0), with snr = abar / (1 - abar), as diffusers'
training scripts do.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffax.schedulers.base import PREDICTION_TYPES, add_noise_alpha_bar


def _check(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def _per_example(values: jax.Array, ndim: int, dtype) -> jax.Array:
    """[B] (or scalar) -> [B, 1, ..., 1] broadcastable against an [B, ...] array of rank `ndim`."""
    values = jnp.asarray(values).astype(dtype)
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def q_sample(alphas_cumprod: jax.Array, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t ~ q(x_t | x_0) for integer timesteps t (scalar or [B]): same shape as x0."""
    return add_noise_alpha_bar(alphas_cumprod, x0, noise, t)


def flow_sample(x0: jax.Array, noise: jax.Array, s: jax.Array) -> jax.Array:
    """Rectified-flow interpolant (1 - s) x_0 + s eps for s in [0, 1] (scalar or [B])."""
    s = _per_example(s, x0.ndim, x0.dtype)
    return (1 - s) * x0 + s * noise


def noisy_sample(prediction_type: str, x0: jax.Array, noise: jax.Array, t: jax.Array,
                 alphas_cumprod: jax.Array | None = None) -> jax.Array:
    """x_t for the parameterisation `prediction_type` implies: `flow_sample` for flow_prediction (t = s),
    else `q_sample` (alphas_cumprod required)."""
    _check(prediction_type)
    if prediction_type == "flow_prediction":
        return flow_sample(x0, noise, t)
    if alphas_cumprod is None:
        raise ValueError(f"prediction_type {prediction_type!r} needs alphas_cumprod")
    return q_sample(alphas_cumprod, x0, noise, t)


def target(prediction_type: str, x0: jax.Array, noise: jax.Array, alphas_cumprod: jax.Array | None = None,
           t: jax.Array | None = None) -> jax.Array:
    """The regression target for `prediction_type`: same shape as x0. v needs alphas_cumprod and t."""
    _check(prediction_type)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    if prediction_type == "flow_prediction":
        return noise - x0
    if alphas_cumprod is None or t is None:
        raise ValueError("prediction_type 'v_prediction' needs alphas_cumprod and t")
    abar = _per_example(jnp.asarray(alphas_cumprod)[t], x0.ndim, x0.dtype)
    return jnp.sqrt(abar) * noise - jnp.sqrt(1 - abar) * x0


def snr(alphas_cumprod: jax.Array, t: jax.Array) -> jax.Array:
    """abar_t / (1 - abar_t) at integer timesteps t, float32, same shape as t."""
    abar = jnp.asarray(alphas_cumprod, jnp.float32)[t]
    return abar / (1 - abar)


def loss_weight(prediction_type: str, alphas_cumprod: jax.Array, t: jax.Array, snr_gamma: float) -> jax.Array:
    """Min-SNR-gamma weights [B] (float32) for the loss on `prediction_type`'s target at timesteps t [B]."""
    _check(prediction_type)
    if prediction_type == "flow_prediction":
        raise ValueError("min-SNR-gamma weighting is defined for alpha_bar schedules, not flow_prediction")
    if snr_gamma <= 0:
        raise ValueError(f"snr_gamma must be > 0, got {snr_gamma}")
    ratio = snr(alphas_cumprod, t)
    clipped = jnp.minimum(ratio, snr_gamma)
    if prediction_type == "epsilon":
        # At zero terminal SNR (rescale_betas_zero_snr) min(snr, gamma) / snr -> 1 as snr -> 0.
        return jnp.where(ratio > 0, clipped / jnp.where(ratio > 0, ratio, 1.0), 1.0)
    if prediction_type == "v_prediction":
        return clipped / (ratio + 1)
    return clipped


def diffusion_loss(model_output: jax.Array, x0: jax.Array, noise: jax.Array, t: jax.Array,
                   alphas_cumprod: jax.Array | None, prediction_type: str,
                   snr_gamma: float | None = None) -> jax.Array:
    """Mean squared error between the model output and the target, float32 scalar.

    model_output, x0, noise: [B, ...]; t: [B] integer timesteps (for flow_prediction, s in [0, 1], and
    alphas_cumprod may be None). With snr_gamma, each example's mean error is weighted by `loss_weight`
    before the batch mean; without, the mean is over every element.
    """
    per_example = per_example_error(model_output, x0, noise, t, alphas_cumprod, prediction_type)
    if snr_gamma is not None:
        per_example = per_example * loss_weight(prediction_type, alphas_cumprod, t, snr_gamma)
    return per_example.mean()


def per_example_error(model_output: jax.Array, x0: jax.Array, noise: jax.Array, t: jax.Array,
                      alphas_cumprod: jax.Array | None, prediction_type: str) -> jax.Array:
    """Each example's mean squared error between the model output and the target, float32 [B] (unweighted;
    `diffusion_loss`'s arguments)."""
    goal = target(prediction_type, x0.astype(jnp.float32), noise.astype(jnp.float32), alphas_cumprod, t)
    err = jnp.square(model_output.astype(jnp.float32) - goal)
    return err.reshape(err.shape[0], -1).mean(axis=1)  # [B]
