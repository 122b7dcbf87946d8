"""The sampling loop: every step, classifier-free guidance and img2img / refiner slicing in one `lax.scan`.

`sample` is a pure, traceable function; callers jit it once around their model, e.g.

    @jax.jit
    def generate(params, noise, labels, key):
        def denoise(x, t, **cond):              # under CFG x is [x; x] and cond is [uncond; cond]
            return model.apply({"params": params}, x, jnp.full(x.shape[:1], t), **cond)
        cond = {"class_labels": labels}          # [B]: diffusers' keyword names
        return sample(scheduler, denoise, noise, num_inference_steps=50, key=key, guidance_scale=4.0,
                      cond=cond, uncond=model.config.null_cond(cond))

so the model, every sampler step and the guidance combine into one XLA program with no host round trip.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffax.schedulers.base import Scheduler, SchedulerState

DenoiseFn = Callable[..., jax.Array]  # denoise_fn(x, t, **cond) -> model output
AfterStepFn = Callable[[jax.Array, jax.Array, SchedulerState], jax.Array]  # after_step(x, i, state) -> x


def rescale_guidance(guided: jax.Array, cond: jax.Array, guidance_rescale: float) -> jax.Array:
    """Lin et al. 2023 section 3.4: rescale the guided output to the std of the conditional one (per example,
    over all other axes), then blend with weight `guidance_rescale`, against over-exposure at high scales."""
    axes = tuple(range(1, guided.ndim))
    std_cond = jnp.std(cond, axis=axes, keepdims=True)
    std_guided = jnp.std(guided, axis=axes, keepdims=True)
    rescaled = guided * (std_cond / std_guided)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


def loop_range(scheduler: Scheduler, state: SchedulerState, num_inference_steps: int, *,
               strength: float = 1.0, denoising_start: float | None = None,
               denoising_end: float | None = None) -> tuple[int, int]:
    """Static [start, stop) loop indices into `state.timesteps`, as diffusers' pipelines slice them.

    strength < 1 (img2img) skips the first (1 - strength) of the inference steps; denoising_start /
    denoising_end (SDXL base -> refiner hand-off) keep the timesteps below / at-or-above
    round(T * (1 - fraction)).
    """
    timesteps = np.asarray(state.timesteps)
    start, stop = 0, len(timesteps)
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    T = getattr(scheduler, "num_train_timesteps", 1000)
    if denoising_start is not None:
        if not 0.0 < denoising_start < 1.0:
            raise ValueError(f"denoising_start must be in (0, 1), got {denoising_start}")
        cutoff = int(round(T - denoising_start * T))
        n = int((timesteps < cutoff).sum())
        if scheduler.order == 2 and n % 2 == 0:
            n += 1  # a second-order sampler must not start on the corrector half of a step
        start = len(timesteps) - n
    elif strength < 1.0:
        init_steps = min(int(num_inference_steps * strength), num_inference_steps)
        start = max(num_inference_steps - init_steps, 0) * scheduler.order
    if denoising_end is not None:
        if not 0.0 < denoising_end < 1.0:
            raise ValueError(f"denoising_end must be in (0, 1), got {denoising_end}")
        cutoff = int(round(T - denoising_end * T))
        stop = int((timesteps >= cutoff).sum())
    if start >= stop:
        raise ValueError(f"no sampling steps left: loop indices [{start}, {stop}) "
                         f"(strength={strength}, denoising_start={denoising_start}, denoising_end={denoising_end})")
    return start, stop


def sample(scheduler: Scheduler, denoise_fn: DenoiseFn, noise: jax.Array, *, num_inference_steps: int,
           key: jax.Array | None = None, cond: dict[str, Any] | None = None, uncond: dict[str, Any] | None = None,
           guidance_scale: float | jax.Array | None = None,
           guidance_rescale: float | jax.Array = 0.0, guided_channels: int | None = None,
           init_sample: jax.Array | None = None, strength: float = 1.0,
           denoising_start: float | None = None, denoising_end: float | None = None,
           start_index: int | jax.Array | None = None, pass_step_index: bool = False,
           after_step: AfterStepFn | None = None) -> jax.Array:
    """Runs a whole sampling trajectory; returns x at the end, same shape as `noise` [B, ...].

    noise: standard normal [B, ...]; scaled by the scheduler's initial sigma (text-to-image), or used to
      noise `init_sample` to the starting level (img2img with `strength` < 1).
    denoise_fn(x, t, **cond) -> model output, called with the scheduler-scaled input, the scalar timestep t
      and the conditioning inputs by keyword (a denoiser of (x, t) alone serves an empty `cond`).
      With `guidance_scale` set it is called once per step on [x; x] (2B rows) with every leaf of `cond`
      as [uncond; cond] and must return the [unconditional; conditional] outputs, like diffusers' pipelines.
    cond: the model's keyword inputs, a pytree whose leaves have B leading rows (`class_labels` [B],
      `encoder_hidden_states` [B, L, D], `added_cond_kwargs`, ...); default none.
    uncond: the same structure for the unconditional half of classifier-free guidance (the model config's
      `null_cond(cond)`); required when guiding a non-empty `cond`.
    guided_channels: guide only the first channels (last axis) and take the rest (e.g. a learned variance)
      from the conditional half; None guides every channel.
    init_sample: x_0 for img2img (noised here to the first step's level), or, with `denoising_start`, an
      already-noisy latent handed over by a base model (used as is).
    key: PRNG key for stochastic samplers (required by them; ignored by deterministic ones), or one typed key
      per row ([B]): each row's step noise then comes from its own key, whatever the batch it is in.
    guidance_rescale: a Python float (0 skips the rescale) or a traced scalar (always rescaled, by its value).
    start_index: the first loop index, overriding the one `strength` gives; an int32 scalar array makes it a
      traced input, so a pipeline computes it on the host with `loop_range` and a new img2img strength reuses
      the compiled program (`init_sample`, when given, is noised to that index's level).
    pass_step_index: call `denoise_fn(x, t, step_index=i, **cond)` with the traced loop index i (ControlNet's
      control_guidance_start / end).
    after_step: `after_step(x, i, state) -> x`, applied to x after the step at loop index i (inpainting's
      latent blending for a 4-channel U-Net; progress callbacks).
    """
    cond = {} if cond is None else cond
    guided = guidance_scale is not None
    if guided and jax.tree.leaves(cond):
        if uncond is None:
            raise ValueError("classifier-free guidance of a conditional model needs `uncond` (the model config's "
                             "null_cond(cond)) beside `cond`")
        if jax.tree.structure(uncond) != jax.tree.structure(cond):
            raise ValueError(f"uncond must have the structure of cond: {jax.tree.structure(uncond)} vs "
                             f"{jax.tree.structure(cond)}")
    # The model's keyword inputs for every step: under guidance [uncond; cond] rows, to match [x; x].
    model_cond = jax.tree.map(lambda u, c: jnp.concatenate([u, c]), uncond, cond) if (
        guided and jax.tree.leaves(cond)) else cond
    state = scheduler.init(num_inference_steps, noise)
    start, stop = loop_range(scheduler, state, num_inference_steps, strength=strength,
                             denoising_start=denoising_start, denoising_end=denoising_end)
    if start_index is not None:
        start = start_index
    if key is None:
        key = jax.random.key(0)  # deterministic samplers never read it
    if init_sample is None:
        if strength < 1.0 or denoising_start is not None:
            raise ValueError("strength < 1 and denoising_start need init_sample")
        x = noise * jnp.asarray(scheduler.init_noise_sigma(state), noise.dtype)
    elif denoising_start is not None:
        x = init_sample
    else:
        x = scheduler.add_noise(state, init_sample, noise, start)

    rescaled = not isinstance(guidance_rescale, (int, float)) or guidance_rescale > 0
    per_row = key.ndim == 1

    def step_key(i: jax.Array) -> jax.Array:
        return jax.vmap(lambda k: jax.random.fold_in(k, i))(key) if per_row else jax.random.fold_in(key, i)

    def model_output(x_in: jax.Array, t: jax.Array, i: jax.Array) -> jax.Array:
        step_kw = {"step_index": i} if pass_step_index else {}
        if not guided:
            return denoise_fn(x_in, t, **step_kw, **model_cond)
        out_u, out_c = jnp.split(denoise_fn(jnp.concatenate([x_in, x_in]), t, **step_kw, **model_cond), 2)
        c = guided_channels if guided_channels is not None else out_c.shape[-1]
        mixed = out_u[..., :c] + guidance_scale * (out_c[..., :c] - out_u[..., :c])
        if rescaled:
            mixed = rescale_guidance(mixed, out_c[..., :c], guidance_rescale)
        return jnp.concatenate([mixed, out_c[..., c:]], axis=-1)

    def body(i, carry):
        x, state = carry
        out = model_output(scheduler.scale_model_input(state, x, i), state.timesteps[i], i)
        x, _, state = scheduler.step(state, out.astype(x.dtype), x, i, step_key(i))
        if after_step is not None:
            x = after_step(x, i, state)
        return x, state

    # Python bounds make this a scan; a traced start (start_index) a while loop.
    x, _ = jax.lax.fori_loop(start, stop, body, (x, state))
    return x
