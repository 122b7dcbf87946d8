"""Tests for diffax.learned_variance: the hybrid loss against a float64 numpy transcription of the improved
DDPM formulas, gradient routing (stop-gradient on the mean), and limiting cases."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax.learned_variance import hybrid_loss, learned_range_log_variance, linear_betas, variance_tables

B, H, W, C = 6, 4, 4, 3
T_VALUES = np.array([0, 0, 1, 17, 500, 999])  # t = 0 twice: the decoder NLL branch is the odd one out


def numpy_hybrid_loss(betas, out, x0, xt, noise, t):
    """Direct float64 numpy computation of mse + L_vb (bits/dim), written from the paper's formulas."""
    betas = betas.astype(np.float64)
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    post_logvar = np.log(np.append(post_var[1], post_var[1:]))
    coef1 = betas * np.sqrt(abar_prev) / (1 - abar)
    coef2 = (1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar)
    eps, v = out[..., :C], out[..., C:]
    s = (slice(None), None, None, None)
    mse = ((noise - eps) ** 2).mean(axis=(1, 2, 3))
    true_mean = coef1[t][s] * x0 + coef2[t][s] * xt
    x0_pred = np.sqrt(1 / abar[t])[s] * xt - np.sqrt(1 / abar[t] - 1)[s] * eps
    model_mean = coef1[t][s] * x0_pred + coef2[t][s] * xt
    frac = (v + 1) / 2
    model_logvar = frac * np.log(betas[t])[s] + (1 - frac) * post_logvar[t][s]
    true_logvar = post_logvar[t][s]
    kl = 0.5 * (-1 + model_logvar - true_logvar + np.exp(true_logvar - model_logvar)
                + (true_mean - model_mean) ** 2 * np.exp(-model_logvar))
    kl = kl.mean(axis=(1, 2, 3)) / np.log(2)

    def cdf(z):
        return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))

    inv_std = np.exp(-0.5 * model_logvar)
    cdf_plus = cdf(inv_std * (x0 - model_mean + 1 / 255))
    cdf_min = cdf(inv_std * (x0 - model_mean - 1 / 255))
    logp = np.where(x0 < -0.999, np.log(np.maximum(cdf_plus, 1e-12)),
                    np.where(x0 > 0.999, np.log(np.maximum(1 - cdf_min, 1e-12)),
                             np.log(np.maximum(cdf_plus - cdf_min, 1e-12))))
    nll = -logp.mean(axis=(1, 2, 3)) / np.log(2)
    vb = np.where(t == 0, nll, kl)
    return mse + vb, mse, vb


def _batch(seed=0, t=T_VALUES):
    rng = np.random.default_rng(seed)
    betas = linear_betas(1000)
    abar = np.cumprod(1 - betas)[t][:, None, None, None]
    # x0 on the 256-level grid in [-1, 1], with exact +-1 pixels to reach the two end bins.
    x0 = rng.integers(0, 256, (len(t), H, W, C)) / 127.5 - 1.0
    x0[:, 0, 0, 0], x0[:, 0, 1, 0] = -1.0, 1.0
    noise = rng.standard_normal((len(t), H, W, C))
    xt = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise
    # eps near the true noise (a partly trained model), v anywhere in and a little beyond [-1, 1].
    out = np.concatenate([noise + 0.3 * rng.standard_normal(noise.shape),
                          rng.uniform(-1.2, 1.2, noise.shape)], axis=-1)
    return betas, out, x0, xt, noise, t


def test_matches_numpy():
    betas, out, x0, xt, noise, t = _batch()
    want_loss, want_mse, want_vb = numpy_hybrid_loss(betas, out, x0, xt, noise, t)
    f = jax.jit(lambda *a: hybrid_loss(variance_tables(betas), *a))
    got = f(*(jnp.asarray(a, jnp.float32) for a in (out, x0, xt, noise)), jnp.asarray(t))
    # fp32 against float64: KL is a difference of O(1) terms (-1 + log ratio + ratio), so its absolute
    # error is ~1e-6 even where the KL itself is small; 1e-5 absolute + 1e-4 relative covers fp32 rounding.
    np.testing.assert_allclose(got["mse"], want_mse, rtol=1e-5)
    np.testing.assert_allclose(got["vb"], want_vb, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["loss"], want_loss, rtol=1e-4, atol=1e-5)
    assert np.all(want_vb[t == 0] > 1.0), "the t = 0 rows must take the decoder-NLL branch"


def test_stop_gradient_routes_vb_to_variance_only():
    betas, out, x0, xt, noise, t = (np.asarray(a) for a in _batch(1))
    tables = variance_tables(betas)
    args = [jnp.asarray(a, jnp.float32) for a in (x0, xt, noise)]

    def part(name):
        return jax.grad(lambda o: hybrid_loss(tables, o, *args, jnp.asarray(t))[name].sum())

    g_vb, g_mse = jax.jit(lambda o: (part("vb")(o), part("mse")(o)))(jnp.asarray(out, jnp.float32))
    assert np.all(g_vb[..., :C] == 0), "vb must not train the mean (eps) channels"
    assert np.all(g_mse[..., C:] == 0), "mse must not train the variance channels"
    assert np.abs(g_vb[..., C:]).min(axis=(1, 2, 3)).min() > 0, "vb must train the variance channels"


def test_exact_posterior_gives_zero_kl():
    # eps = the true noise gives the true posterior mean; v = -1 gives the posterior variance: KL = 0.
    betas, _, x0, xt, noise, t = _batch(2, t=np.array([1, 2, 300, 999]))
    out = np.concatenate([noise, -np.ones_like(noise)], axis=-1)
    got = jax.jit(hybrid_loss)(variance_tables(betas), *(jnp.asarray(a, jnp.float32) for a in (out, x0, xt, noise)),
                               jnp.asarray(t))
    np.testing.assert_allclose(got["vb"], 0.0, atol=1e-5)  # fp32 cancellation only
    np.testing.assert_allclose(got["mse"], 0.0, atol=0)


def test_rescale_vb_and_log_variance_range():
    betas = linear_betas(2000)
    tables = variance_tables(betas)
    _, out, x0, xt, noise, _ = _batch(3)
    t = np.array([0, 5, 100, 1000, 1500, 1999])
    a = [jnp.asarray(v, jnp.float32) for v in (out, x0, xt, noise)] + [jnp.asarray(t)]
    plain, rescaled = hybrid_loss(tables, *a), hybrid_loss(tables, *a, rescale_vb=True)
    np.testing.assert_allclose(rescaled["vb"], 2.0 * plain["vb"], rtol=1e-6)  # T / 1000 = 2
    # v = +1 / -1 select log beta_t / the clipped log posterior variance exactly.
    ones = jnp.ones((len(t), 1))
    np.testing.assert_allclose(learned_range_log_variance(tables, ones, jnp.asarray(t))[:, 0],
                               np.log(betas[t]), rtol=1e-6)
    post = betas * (1 - np.append(1, np.cumprod(1 - betas)[:-1])) / (1 - np.cumprod(1 - betas))
    np.testing.assert_allclose(learned_range_log_variance(tables, -ones, jnp.asarray(t))[:, 0],
                               np.log(np.append(post[1], post[1:]))[t], rtol=1e-6)


def test_linear_betas_and_bad_input():
    betas = linear_betas(1000)
    assert betas.dtype == np.float64 and betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    assert math.isclose(linear_betas(250)[-1], 0.08)  # scaled so a short chain covers the same noise range
    with pytest.raises(ValueError, match="betas"):
        variance_tables(np.array([0.1, 1.5]))
    tables = variance_tables(betas)
    with pytest.raises(ValueError, match="twice the channels"):
        hybrid_loss(tables, jnp.zeros((2, 4, 4, 3)), jnp.zeros((2, 4, 4, 3)), jnp.zeros((2, 4, 4, 3)),
                    jnp.zeros((2, 4, 4, 3)), jnp.zeros((2,), jnp.int32))


def test_min_snr_weights_only_the_eps_term_in_training():
    from diffax import objectives
    from diffax.schedulers.names import scheduler_for
    from diffax.train.step import Objective, diffusion_loss

    abar = scheduler_for("ddpm", {"beta_schedule": "linear"}).alphas_cumprod()
    out = jax.random.normal(jax.random.key(1), (1, 4, 4, 2))  # one example: its loss is the batch mean
    seen = {}

    class Model:  # stands in for a Flax module: what diffusion_loss calls
        config = None

        @staticmethod
        def apply(variables, x_t, t, **kwargs):
            seen["t"] = t
            return out

    batch = {"image": jax.random.normal(jax.random.key(2), (1, 4, 4, 1))}
    for seed in range(200):  # a key that draws a low-noise step, where min-SNR changes the weight
        key = jax.random.key(seed)
        _, plain = diffusion_loss(Model, {}, Objective(abar, learn_sigma=True), batch, key)
        if int(seen["t"][0]) < 50:
            break
    weighted_loss, weighted = diffusion_loss(Model, {}, Objective(abar, learn_sigma=True, snr_gamma=5.0),
                                             batch, key)
    w = objectives.loss_weight("epsilon", abar, seen["t"], 5.0)[0]
    assert float(w) < 0.5
    np.testing.assert_allclose(weighted_loss, plain["mse"] * w + plain["vb"], rtol=1e-6)
    np.testing.assert_allclose(weighted["mse"], plain["mse"], rtol=1e-6)  # the metric stays the plain MSE
    with pytest.raises(ValueError, match="hybrid loss, which predicts epsilon.*v_prediction"):
        Objective(abar, prediction_type="v_prediction", learn_sigma=True)
