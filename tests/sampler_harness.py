"""Runs a diffax sampler and its diffusers counterpart on the same inputs, with the same injected noise.

The denoiser is a fixed smooth function of (x, t), written once for torch and once for jax, so both
libraries see identical model outputs given identical inputs; any divergence is the sampler's.
Stochastic steps: diffax draws `jax.random.normal(fold_in(key, i), shape)`; the same arrays are handed to
diffusers by patching `randn_tensor` in the scheduler's module.
"""
from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import torch

from diffax.sampling import sample


def denoise_jax(x: jax.Array, t: jax.Array) -> jax.Array:
    """A deterministic stand-in for a model: bounded, smooth, depends on x and t."""
    t = jnp.asarray(t, x.dtype) / 1000.0
    return 0.8 * jnp.tanh(x) * jnp.cos(t) + 0.1 * jnp.sin(3.0 * x + t)


def denoise_torch(x: torch.Tensor, t) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=x.dtype) / 1000.0
    return 0.8 * torch.tanh(x) * torch.cos(t) + 0.1 * torch.sin(3.0 * x + t)


def step_noises(key: jax.Array, shape, n: int, dtype=jnp.float32) -> list[np.ndarray]:
    """The noise diffax's loop draws at loop index i, for i < n."""
    return [np.array(jax.random.normal(jax.random.fold_in(key, i), shape, dtype)) for i in range(n)]


def run_diffax(scheduler, x_T: np.ndarray, num_inference_steps: int, key: jax.Array, **kw) -> np.ndarray:
    """Final sample of diffax's jitted loop (x_T is standard normal; scaled by init_noise_sigma inside)."""
    fn = jax.jit(lambda x, k: sample(scheduler, denoise_jax, x, num_inference_steps=num_inference_steps,
                                     key=k, **kw))
    return np.asarray(fn(jnp.asarray(x_T), key))


def run_diffusers(torch_scheduler, x_T: np.ndarray, num_inference_steps: int, noises: list[np.ndarray],
                  monkeypatch, dtype=torch.float32) -> np.ndarray:
    """Final sample of the diffusers pipeline loop, with randn_tensor returning `noises` in order."""
    module = importlib.import_module(type(torch_scheduler).__module__)
    queue = [torch.from_numpy(np.asarray(n)).to(dtype) for n in noises]
    calls = {"i": 0}

    def fake_randn(shape, *args, **kwargs):
        out = queue[calls["i"]]
        calls["i"] += 1
        assert tuple(out.shape) == tuple(shape), (out.shape, shape)
        return out

    if hasattr(module, "randn_tensor"):
        monkeypatch.setattr(module, "randn_tensor", fake_randn)
    torch_scheduler.set_timesteps(num_inference_steps)
    x = torch.from_numpy(np.asarray(x_T)).to(dtype) * torch_scheduler.init_noise_sigma
    for i, t in enumerate(torch_scheduler.timesteps):
        # The noise diffax draws at loop index i: line the queue up with the step about to run.
        calls["i"] = i
        model_in = torch_scheduler.scale_model_input(x, t)
        out = denoise_torch(model_in, t)
        x = torch_scheduler.step(out, t, x).prev_sample
    return x.numpy()
