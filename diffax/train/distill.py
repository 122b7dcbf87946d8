"""Few-step distillation objectives: progressive distillation and latent consistency distillation.

Both are `LossFn`s (`loss_fn(params, batch, key) -> (loss, metrics)`) for the train loop
(`diffax.train.loop.train_and_evaluate(..., init_params=, loss_fn=)`), built around a frozen teacher whose
weights are constants of the compiled step. Both work on the discrete timesteps of the training schedule
(T = len(alphas_cumprod)) and on a grid of N + 1 levels t_n = n T / N - 1 (n = 1..N) plus the clean data
(t_0 = -1, alpha_bar = 1): the 'trailing' timesteps of diffusers' DDIM (`timestep_spacing='trailing'`) and
the schedule LCMScheduler picks from (`original_inference_steps` = N), so T / N must be an integer.

Progressive distillation (Salimans & Ho 2022, arXiv:2202.00512): the student, initialised from the teacher,
learns to do in one DDIM step from t_n to t_{n-1} what two DDIM steps of the teacher do on the grid twice as
fine; each round halves N. The target is the x_0 that makes the student's single DDIM step land on the
teacher's two-step result; the loss is the x_0 error weighted by max(SNR, 1) ("truncated SNR"), for an
x_0- or v-parameterised model. With `guidance_scale` the teacher's steps use classifier-free guidance against
the model's null conditioning, so the student learns the guided result and samples with one evaluation per
step (guidance distilled into the student, as in Meng et al. 2023, here in the first halving round).

Latent consistency distillation (Luo et al. 2023, arXiv:2310.04378; LCM-LoRA, arXiv:2311.05556): the
student f(x, t) = c_skip(t) x + c_out(t) x0_pred(x, t) (LCMScheduler's boundary condition) must give the
same answer at t_{n+1} as at t_n along the teacher's guided DDIM step between them. The target side is the
student itself under stop_gradient (LCM-LoRA's choice; the full LCM uses an EMA copy), and `to_model_params`
maps the trained parameters to the model's (the identity, or `diffax.train.finetune.lora_view`).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffax.schedulers.base import alpha_bar_coefficients, predict_x0_eps
from diffax.schedulers.lcm import SIGMA_DATA
from diffax.train.step import LossFn

Params = Any


def grid_spacing(num_train_timesteps: int, num_steps: int) -> int:
    """T / N, the timesteps between grid levels; ValueError unless it is a whole number."""
    if num_steps < 1 or num_train_timesteps % num_steps:
        raise ValueError(f"a {num_steps}-step distillation grid needs num_train_timesteps "
                         f"({num_train_timesteps}) to be a multiple of it (e.g. 1024 for 64, 32, ..., 1)")
    return num_train_timesteps // num_steps


def _levels(alphas_cumprod: np.ndarray) -> jax.Array:
    """[T + 1] float32 alpha_bar at t = -1 (clean, 1.0), 0, ..., T - 1: index with t + 1."""
    return jnp.asarray(np.concatenate([[1.0], alphas_cumprod]), jnp.float32)


def _per_example(v: jax.Array, x: jax.Array) -> jax.Array:
    return v.reshape(v.shape + (1,) * (x.ndim - 1))  # [B] -> [B, 1, 1, 1]


def model_output(model: nn.Module, params: Params, x: jax.Array, t: jax.Array, cond: dict[str, Any],
                 guidance_scale: float | None = None, train: bool = False, key: jax.Array | None = None
                 ) -> jax.Array:
    """The model's output at x [B, H, W, C], timesteps t [B] (clamped to >= 0), classifier-free guided
    against `model.config.null_cond(cond)` when `guidance_scale` is set (one call on 2B rows)."""
    t = jnp.maximum(t, 0)
    rngs = {"dropout": key} if key is not None else {}
    if guidance_scale is None or not jax.tree.leaves(cond):
        return model.apply({"params": params}, x, t, **cond, train=train, rngs=rngs)
    both = jax.tree.map(lambda u, c: jnp.concatenate([u, c]), model.config.null_cond(cond), cond)
    out = model.apply({"params": params}, jnp.concatenate([x, x]), jnp.concatenate([t, t]), **both, train=train,
                      rngs=rngs)
    out_u, out_c = jnp.split(out, 2)
    return out_u + guidance_scale * (out_c - out_u)


def ddim_step(prediction_type: str, out: jax.Array, x: jax.Array, abar_t: jax.Array, abar_s: jax.Array
              ) -> tuple[jax.Array, jax.Array]:
    """(x_s, x0): the deterministic DDIM step from x at level abar_t [B] to abar_s [B] along the model output
    `out`, and the x_0 it predicts."""
    alpha_t, sigma_t = alpha_bar_coefficients(_per_example(abar_t, x))
    alpha_s, sigma_s = alpha_bar_coefficients(_per_example(abar_s, x))
    x0, eps = predict_x0_eps(prediction_type, out, x, alpha_t, sigma_t)
    return alpha_s * x0 + sigma_s * eps, x0


def ddim_target_x0(x_t: jax.Array, x_s: jax.Array, abar_t: jax.Array, abar_s: jax.Array) -> jax.Array:
    """The x_0 whose DDIM step from x_t (level abar_t [B]) to level abar_s [B] lands on x_s:
    solves x_s = alpha_s x_0 + sigma_s (x_t - alpha_t x_0) / sigma_t (Salimans & Ho 2022, algorithm 2)."""
    (alpha_t, sigma_t), (alpha_s, sigma_s) = (alpha_bar_coefficients(_per_example(a, x_t)) for a in (abar_t, abar_s))
    ratio = sigma_s / sigma_t
    return (x_s - ratio * x_t) / (alpha_s - ratio * alpha_t)


def _noisy(levels: jax.Array, x0: jax.Array, t: jax.Array, key: jax.Array) -> jax.Array:
    alpha, sigma = alpha_bar_coefficients(_per_example(levels[t + 1], x0))
    return alpha * x0 + sigma * jax.random.normal(key, x0.shape, x0.dtype)


def progressive_loss(model: nn.Module, teacher_params: Params, alphas_cumprod: np.ndarray, *, student_steps: int,
                     prediction_type: str = "v_prediction", guidance_scale: float | None = None) -> LossFn:
    """The progressive-distillation loss of a student sampling in `student_steps` DDIM steps, taught by two
    DDIM steps of the teacher (`teacher_params`, classifier-free guided at `guidance_scale` if set) per
    student step. `prediction_type` is the student's and the teacher's ('v_prediction' or 'sample': an
    epsilon model cannot express x_0 at the noisiest level, where alpha is ~0). Metrics: loss."""
    if prediction_type not in ("v_prediction", "sample"):
        raise ValueError(f"progressive distillation needs a v- or x0-parameterised model (Salimans & Ho 2022, "
                         f"section 4), got prediction_type {prediction_type!r}")
    half = grid_spacing(len(alphas_cumprod), 2 * student_steps)
    levels = _levels(alphas_cumprod)

    def loss_fn(params: Params, batch: dict[str, Any], key: jax.Array):
        x0 = batch["image"]  # [B, H, W, C]
        cond = batch.get("cond", {})
        k_n, k_noise, k_dropout = jax.random.split(key, 3)
        n = jax.random.randint(k_n, (x0.shape[0],), 1, student_steps + 1)  # [B] student step n -> n - 1
        t = 2 * half * n - 1
        mid, end = t - half, t - 2 * half
        x_t = _noisy(levels, x0, t, k_noise)

        def teacher_step(x, a, b):
            out = model_output(model, teacher_params, x, a, cond, guidance_scale)
            return ddim_step(prediction_type, out, x, levels[a + 1], levels[b + 1])[0]

        x_end = jax.lax.stop_gradient(teacher_step(teacher_step(x_t, t, mid), mid, end))
        target = ddim_target_x0(x_t, x_end, levels[t + 1], levels[end + 1])
        abar_t = _per_example(levels[t + 1], x0)
        alpha_t, sigma_t = alpha_bar_coefficients(abar_t)
        out = model_output(model, params, x_t, t, cond, train=True, key=k_dropout)
        x0_student, _ = predict_x0_eps(prediction_type, out, x_t, alpha_t, sigma_t)
        weight = jnp.maximum(abar_t / (1.0 - abar_t), 1.0)  # truncated SNR
        loss = jnp.mean(weight * (x0_student - target) ** 2)
        return loss, {"loss": loss}

    return loss_fn


def consistency_coefficients(t: jax.Array, timestep_scaling: float = 10.0) -> tuple[jax.Array, jax.Array]:
    """(c_skip, c_out) of LCMScheduler's boundary condition at integer timesteps t."""
    scaled = t.astype(jnp.float32) * timestep_scaling
    return SIGMA_DATA ** 2 / (scaled ** 2 + SIGMA_DATA ** 2), scaled / jnp.sqrt(scaled ** 2 + SIGMA_DATA ** 2)


def consistency_loss(model: nn.Module, teacher_params: Params, alphas_cumprod: np.ndarray, *,
                     original_steps: int, prediction_type: str = "v_prediction",
                     guidance_scale: float | None = None, timestep_scaling: float = 10.0,
                     to_model_params: Callable[[Params], Params] = lambda p: p) -> LossFn:
    """The latent-consistency-distillation loss on the `original_steps`-level grid (LCMScheduler's
    `original_inference_steps`): one guided DDIM step of the teacher from t_{n+1} to t_n gives x_n, and
    f(x_{n+1}, t_{n+1}) is pulled towards stop_gradient(f(x_n, t_n)) (squared error). The student's model
    weights are `to_model_params(params)`. Metrics: loss."""
    gap = grid_spacing(len(alphas_cumprod), original_steps)
    levels = _levels(alphas_cumprod)

    def f(weights: Params, x: jax.Array, t: jax.Array, cond: dict[str, Any], train: bool, key=None) -> jax.Array:
        out = model_output(model, weights, x, t, cond, train=train, key=key)
        alpha, sigma = alpha_bar_coefficients(_per_example(levels[jnp.maximum(t, 0) + 1], x))
        x0, _ = predict_x0_eps(prediction_type, out, x, alpha, sigma)
        c_skip, c_out = consistency_coefficients(jnp.maximum(t, 0), timestep_scaling)
        return _per_example(c_skip, x) * x + _per_example(c_out, x) * x0

    def loss_fn(params: Params, batch: dict[str, Any], key: jax.Array):
        x0 = batch["image"]  # [B, H, W, C]
        cond = batch.get("cond", {})
        k_n, k_noise, k_dropout = jax.random.split(key, 3)
        n = jax.random.randint(k_n, (x0.shape[0],), 1, original_steps + 1)  # [B] grid level of x_{n+1}
        t = gap * n - 1
        s = t - gap  # the next level down; -1 (clean) below the lowest
        x_t = _noisy(levels, x0, t, k_noise)
        out = model_output(model, teacher_params, x_t, t, cond, guidance_scale)
        x_s, _ = ddim_step(prediction_type, out, x_t, levels[t + 1], levels[s + 1])
        weights = to_model_params(params)
        target = jax.lax.stop_gradient(jnp.where(_per_example(s, x0) < 0, x_s,
                                                 f(weights, x_s, s, cond, train=False)))
        pred = f(weights, x_t, t, cond, train=True, key=k_dropout)
        loss = jnp.mean((pred - target) ** 2)
        return loss, {"loss": loss}

    return loss_fn
