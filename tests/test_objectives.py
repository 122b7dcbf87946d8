"""diffax.objectives against diffusers' DDPMScheduler.add_noise / get_velocity, its training scripts' min-SNR
weighting (diffusers.training_utils.compute_snr), and direct NumPy formulas.

Tolerance 1e-5 relative for fp32 comparisons with diffusers: its alpha_bar table is a float32 cumprod
(~1e-6 relative off float64), the rest is elementwise float32 arithmetic.
"""
from __future__ import annotations

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.training_utils import compute_snr

from diffax import objectives
from diffax.schedules import NoiseSchedule

SHAPE = (4, 5, 5, 3)
CFG = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
T_BATCH = np.array([0, 17, 500, 999])


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    out = rng.standard_normal(SHAPE).astype(np.float32)
    return x0, noise, out


@pytest.fixture(scope="module")
def tables():
    return NoiseSchedule(**CFG).alphas_cumprod(), diffusers.DDPMScheduler(**CFG)


def test_q_sample_and_v_target_match_diffusers(data, tables):
    x0, noise, _ = data
    abar, theirs = tables
    t = torch.from_numpy(T_BATCH)
    # diffusers' tensors are NCHW; add_noise / get_velocity are per-example scalars times elementwise terms,
    # so NHWC arrays can be passed as they are.
    want_xt = theirs.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), t).numpy()
    want_v = theirs.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), t).numpy()
    got_xt = objectives.q_sample(abar, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(T_BATCH))
    got_v = objectives.target("v_prediction", jnp.asarray(x0), jnp.asarray(noise), abar, jnp.asarray(T_BATCH))
    np.testing.assert_allclose(got_xt, want_xt, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_v, want_v, rtol=1e-5, atol=1e-6)
    # A scalar timestep broadcasts over the batch.
    np.testing.assert_allclose(objectives.q_sample(abar, x0, noise, 500),
                               theirs.add_noise(torch.from_numpy(x0), torch.from_numpy(noise),
                                                torch.tensor([500])).numpy(), rtol=1e-5, atol=1e-6)


def test_targets_and_flow_interpolant(data, tables):
    x0, noise, _ = data
    abar, _ = tables
    np.testing.assert_array_equal(objectives.target("epsilon", x0, noise), noise)
    np.testing.assert_array_equal(objectives.target("sample", x0, noise), x0)
    np.testing.assert_allclose(objectives.target("flow_prediction", x0, noise), noise - x0, rtol=1e-6)
    s = np.array([0.0, 0.25, 0.7, 1.0], np.float32)
    xt = np.asarray(objectives.noisy_sample("flow_prediction", jnp.asarray(x0), jnp.asarray(noise), s))
    np.testing.assert_allclose(xt, (1 - s[:, None, None, None]) * x0 + s[:, None, None, None] * noise,
                               rtol=1e-6, atol=1e-7)
    # The flow target is the velocity of the straight path: x_s' - x_s = (s' - s) * target.
    xt2 = np.asarray(objectives.flow_sample(x0, noise, s + 0.1))
    np.testing.assert_allclose(xt2 - xt, 0.1 * (noise - x0), rtol=1e-4, atol=1e-5)
    # v is the rotation of (x_0, eps): x_0 = sqrt(abar) x_t - sqrt(1 - abar) v.
    t = jnp.asarray(T_BATCH[1:3])
    xt_v = objectives.noisy_sample("v_prediction", x0[1:3], noise[1:3], t, abar)
    v = objectives.target("v_prediction", x0[1:3], noise[1:3], abar, t)
    a = abar[T_BATCH[1:3]][:, None, None, None]
    np.testing.assert_allclose(np.sqrt(a) * np.asarray(xt_v) - np.sqrt(1 - a) * np.asarray(v), x0[1:3],
                               rtol=1e-5, atol=1e-5)


def min_snr_weights_like_diffusers(theirs, t: np.ndarray, gamma: float, prediction_type: str) -> np.ndarray:
    """diffusers/examples/text_to_image/train_text_to_image.py's weighting, with its compute_snr."""
    snr = compute_snr(theirs, torch.from_numpy(t))
    w = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    if prediction_type == "epsilon":
        w = w / snr
    elif prediction_type == "v_prediction":
        w = w / (snr + 1)
    return w.numpy()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_match_diffusers(prediction_type, tables):
    abar, theirs = tables
    got = objectives.loss_weight(prediction_type, abar, jnp.asarray(T_BATCH), 5.0)
    want = min_snr_weights_like_diffusers(theirs, T_BATCH, 5.0, prediction_type)
    # rtol 1e-4: diffusers' float32 1 - abar near t = 0 (see tests/test_schedules.py).
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert got.dtype == jnp.float32


@pytest.mark.parametrize("prediction_type,snr_gamma", [("epsilon", None), ("epsilon", 5.0),
                                                        ("v_prediction", 1.0), ("sample", 5.0),
                                                        ("flow_prediction", None)])
def test_diffusion_loss_matches_numpy(prediction_type, snr_gamma, data, tables):
    x0, noise, out = data
    abar, theirs = tables
    if prediction_type == "flow_prediction":
        t = np.array([0.1, 0.4, 0.6, 0.95], np.float32)
        goal = noise - x0
    else:
        t = T_BATCH
        a = abar[t][:, None, None, None]
        v = np.sqrt(a) * noise - np.sqrt(1 - a) * x0
        goal = {"epsilon": noise, "sample": x0, "v_prediction": v}[prediction_type]
    per_example = ((out.astype(np.float64) - goal) ** 2).mean(axis=(1, 2, 3))
    if snr_gamma is not None:
        per_example = per_example * min_snr_weights_like_diffusers(theirs, t, snr_gamma, prediction_type)
    loss = objectives.diffusion_loss(jnp.asarray(out), jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t),
                                     None if prediction_type == "flow_prediction" else abar, prediction_type,
                                     snr_gamma)
    assert loss.shape == () and loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), per_example.mean(), rtol=1e-4)


def test_loss_is_fp32_for_bf16_inputs(data, tables):
    x0, noise, out = data
    abar, _ = tables
    t = jnp.asarray(T_BATCH)
    bf = lambda a: jnp.asarray(a, jnp.bfloat16)  # noqa: E731
    lo = objectives.diffusion_loss(bf(out), bf(x0), bf(noise), t, abar, "v_prediction", 5.0)
    hi = objectives.diffusion_loss(jnp.asarray(np.asarray(bf(out), np.float32)),
                                   jnp.asarray(np.asarray(bf(x0), np.float32)),
                                   jnp.asarray(np.asarray(bf(noise), np.float32)), t, abar, "v_prediction", 5.0)
    assert lo.dtype == jnp.float32
    # Same bf16-rounded inputs; the target and the loss are computed in fp32 either way.
    np.testing.assert_allclose(float(lo), float(hi), rtol=1e-6)


def test_zero_terminal_snr_weights_are_finite():
    abar = NoiseSchedule(rescale_betas_zero_snr=True).alphas_cumprod()
    t = jnp.asarray([0, 999])
    for pt in ("epsilon", "v_prediction", "sample"):
        w = np.asarray(objectives.loss_weight(pt, abar, t, 5.0))
        assert np.isfinite(w).all(), pt
    # min(snr, gamma) / snr -> 1 as snr -> 0.
    assert float(objectives.loss_weight("epsilon", abar, t, 5.0)[1]) == 1.0


def test_loss_is_jittable_and_differentiable(data, tables):
    x0, noise, out = data
    abar, _ = tables
    grad = jax.jit(jax.grad(lambda o: objectives.diffusion_loss(o, x0, noise, jnp.asarray(T_BATCH), abar,
                                                                  "epsilon", 5.0)))(jnp.asarray(out))
    assert grad.shape == SHAPE and np.isfinite(np.asarray(grad)).all()


@pytest.mark.parametrize("call,match", [
    (lambda a: objectives.target("x0", a, a), "prediction_type"),
    (lambda a: objectives.target("v_prediction", a, a), "alphas_cumprod"),
    (lambda a: objectives.noisy_sample("epsilon", a, a, 3), "alphas_cumprod"),
    (lambda a: objectives.loss_weight("flow_prediction", np.ones(3), 1, 5.0), "flow_prediction"),
    (lambda a: objectives.loss_weight("epsilon", np.full(3, 0.5), 1, 0.0), "snr_gamma"),
])
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call(jnp.zeros((1, 2)))
