"""Learned reverse-process variance and the hybrid loss of improved DDPM (Nichol & Dhariwal 2021), as
DiT trains it.

A model with `learn_sigma` outputs 2C channels: eps, then v in [-1, 1] (unconstrained in practice) that
interpolates the reverse variance in log space between the two analytic choices,

    log Sigma_t = frac * log(beta_t) + (1 - frac) * log(beta~_t),   frac = (v + 1) / 2,

where beta~_t is the posterior variance of q(x_{t-1} | x_t, x_0) (clipped at t = 0, where it is 0).
The hybrid loss is

    loss = mean((eps - noise)^2) + L_vb,

with L_vb the variational-bound term for this t, in bits per dimension: KL(q(x_{t-1}|x_t,x_0) ||
p(x_{t-1}|x_t)) for t > 0 and the discretised-Gaussian decoder NLL of x_0 at t = 0. The mean of p is
computed from a stop-gradient copy of eps, so L_vb trains only the variance and the MSE alone trains the
mean (the reference's `frozen_out`). DiT uses the plain sum (its LossType.MSE); improved DDPM's
`rescale_learned_sigmas` (LossType.RESCALED_MSE) multiplies L_vb by T / 1000, which is `rescale_vb=True`
here and is a no-op at T = 1000. Everything runs in fp32; the tables are built in float64 first.

Arrays are NHWC like the rest of diffax; the eps / v split is on the last (channel) axis.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


def linear_betas(num_timesteps: int = 1000) -> np.ndarray:
    """The DDPM/ADM/DiT linear beta schedule, scaled so any T spans the same range as T = 1000 (float64)."""
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


@struct.dataclass
class VarianceTables:
    """Per-timestep fp32 tables [T] the hybrid loss and a learned-variance sampler index with t."""
    log_betas: jax.Array
    alphas_cumprod: jax.Array
    posterior_log_variance_clipped: jax.Array  # log beta~_t, with beta~_0 replaced by beta~_1
    posterior_mean_coef1: jax.Array            # mean of q(x_{t-1} | x_t, x_0) = coef1 * x_0 + coef2 * x_t
    posterior_mean_coef2: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array       # x_0 = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps
    sqrt_recipm1_alphas_cumprod: jax.Array

    @property
    def num_timesteps(self) -> int:
        return self.log_betas.shape[0]


def variance_tables(betas: np.ndarray) -> VarianceTables:
    """Tables from a beta schedule [T] (computed in float64, stored fp32 as the reference indexes them)."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.shape[0] < 2 or not np.all((betas > 0) & (betas <= 1)):
        raise ValueError(f"betas must be a 1-D table of at least 2 values in (0, 1], got shape {betas.shape}")
    alphas_cumprod = np.cumprod(1.0 - betas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    tables = dict(
        log_betas=np.log(betas),
        alphas_cumprod=alphas_cumprod,
        posterior_log_variance_clipped=np.log(np.append(posterior_variance[1], posterior_variance[1:])),
        posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
    )
    return VarianceTables(**{k: jnp.asarray(v, jnp.float32) for k, v in tables.items()})


def _at(table: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
    """table[t] for t [B], shaped [B, 1, ..., 1] to broadcast against an ndim-d batch."""
    return table[t].reshape(t.shape + (1,) * (ndim - 1))


def _mean_flat(x: jax.Array) -> jax.Array:
    return x.mean(axis=tuple(range(1, x.ndim)))


def learned_range_log_variance(tables: VarianceTables, var_values: jax.Array, t: jax.Array) -> jax.Array:
    """log Sigma_t from the model's variance channels v: frac * log beta_t + (1 - frac) * log beta~_t."""
    frac = (var_values.astype(jnp.float32) + 1.0) / 2.0
    max_log = _at(tables.log_betas, t, var_values.ndim)
    min_log = _at(tables.posterior_log_variance_clipped, t, var_values.ndim)
    return frac * max_log + (1.0 - frac) * min_log


def posterior_mean(tables: VarianceTables, x_start: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
    """Mean of q(x_{t-1} | x_t, x_0)."""
    return (_at(tables.posterior_mean_coef1, t, x_t.ndim) * x_start
            + _at(tables.posterior_mean_coef2, t, x_t.ndim) * x_t)


def predict_x_start(tables: VarianceTables, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """x_0 implied by an eps prediction at x_t."""
    return (_at(tables.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
            - _at(tables.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps)


def normal_kl(mean1: jax.Array, logvar1: jax.Array, mean2: jax.Array, logvar2: jax.Array) -> jax.Array:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
    """The tanh approximation of the standard normal CDF used by the reference decoder likelihood."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: jax.Array, means: jax.Array, log_scales: jax.Array) -> jax.Array:
    """log P(x) in nats of data on a 256-level grid in [-1, 1] under N(means, exp(log_scales)^2), each value
    owning a bin of width 2/255 and the two end bins extending to -inf / +inf."""
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def vb_terms_bpd(tables: VarianceTables, eps: jax.Array, var_values: jax.Array, x_start: jax.Array,
                 x_t: jax.Array, t: jax.Array) -> jax.Array:
    """The variational-bound term L_t in bits per dimension [B]: the decoder NLL at t = 0, the KL between
    the true and the model posterior for t > 0. No clipping of the predicted x_0 (as in training)."""
    true_mean = posterior_mean(tables, x_start, x_t, t)
    true_log_var = _at(tables.posterior_log_variance_clipped, t, x_t.ndim)
    model_mean = posterior_mean(tables, predict_x_start(tables, x_t, t, eps), x_t, t)
    model_log_var = learned_range_log_variance(tables, var_values, t)
    kl = _mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / math.log(2.0)
    nll = -_mean_flat(discretized_gaussian_log_likelihood(x_start, model_mean, 0.5 * model_log_var)) / math.log(2.0)
    return jnp.where(t == 0, nll, kl)


def hybrid_loss(tables: VarianceTables, model_output: jax.Array, x_start: jax.Array, x_t: jax.Array,
                noise: jax.Array, t: jax.Array, *, rescale_vb: bool = False) -> dict[str, jax.Array]:
    """DiT's training loss per example for a learned-sigma eps model.

    model_output: [B, ..., 2C] (eps, v); x_start, x_t, noise: [B, ..., C] with x_t = q_sample(x_start, t,
    noise); t: [B] int timesteps. Returns {'loss', 'mse', 'vb'}, each [B] fp32. The vb term sees eps through
    a stop-gradient, so its gradient reaches only the variance channels.
    """
    c = x_start.shape[-1]
    if model_output.shape[:-1] != x_start.shape[:-1] or model_output.shape[-1] != 2 * c:
        raise ValueError(f"hybrid_loss: model_output {model_output.shape} must be x_start {x_start.shape} with "
                         f"twice the channels (eps, variance values)")
    model_output, x_start, x_t, noise = (a.astype(jnp.float32) for a in (model_output, x_start, x_t, noise))
    t = jnp.asarray(t, jnp.int32)
    eps, var_values = model_output[..., :c], model_output[..., c:]
    mse = _mean_flat(jnp.square(noise - eps))
    vb = vb_terms_bpd(tables, jax.lax.stop_gradient(eps), var_values, x_start, x_t, t)
    if rescale_vb:
        vb = vb * (tables.num_timesteps / 1000.0)
    return {"loss": mse + vb, "mse": mse, "vb": vb}
