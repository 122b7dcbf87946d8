"""diffax.sampling.sample: one program under jit, vmap and batch sharding; classifier-free guidance; img2img
strength and the SDXL base -> refiner split, against diffusers' pipelines' own slicing and formulas.

Tolerances: diffax-vs-diffax comparisons of the same computation laid out differently (vmap, sharding,
split trajectories) within 1e-6 relative: XLA may fuse differently, nothing else changes. diffax vs
diffusers (torch fp32) within 1e-4 relative, as in tests/test_ddpm_ddim.py.
"""
from __future__ import annotations

import types

import chex
import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffax.sampling import loop_range, rescale_guidance, sample
from diffax.schedulers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from tests.sampler_harness import denoise_jax, denoise_torch

SHAPE = (2, 4, 4, 3)
TIGHT = 1e-6
PARITY = 1e-4


def key(seed: int) -> jax.Array:
    """rbg keys compile in a fraction of threefry's time on XLA:CPU. Their bits are not invariant under
    vmap or sharding, so the tests of those use the default threefry keys."""
    return jax.random.key(seed, impl="rbg")


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def normal(seed: int, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# A conditional model under CFG: rows [:B] are the unconditional batch, rows [B:] the conditional one.
def cfg_model_jax(x2, t):
    u, c = jnp.split(x2, 2)
    return jnp.concatenate([denoise_jax(u, t), 1.3 * denoise_jax(c, t) + 0.05 * jnp.sin(c)])


def cfg_model_torch(x2, t):
    u, c = x2.chunk(2)
    return torch.cat([denoise_torch(u, t), 1.3 * denoise_torch(c, t) + 0.05 * torch.sin(c)])


# ------------------------------------------------------------------------------- one program: vmap, shard

def test_vmap_matches_per_item_calls():
    sched = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9)
    run = lambda x, k: sample(sched, denoise_jax, x, num_inference_steps=8, key=k)  # noqa: E731
    xs = jnp.asarray(normal(0, (3,) + SHAPE))
    keys = jax.random.split(jax.random.key(0), 3)  # threefry: rbg bits change under vmap
    batched = np.asarray(jax.jit(jax.vmap(run))(xs, keys))
    single = jax.jit(run)
    for j in range(3):
        assert rel_err(batched[j], single(xs[j], keys[j])) < TIGHT
    assert rel_err(batched[0], batched[1]) > 0.1  # different noise and keys give different samples


def test_batch_sharded_over_devices_matches_unsharded(num_devices):
    assert num_devices == 8, "tests/conftest.py sets 8 fake CPU devices"
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    batch_sharding = NamedSharding(mesh, P("batch"))
    sched = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9)  # stochastic, per-example ops
    run = lambda x, k: sample(sched, cfg_model_jax, x, num_inference_steps=6, key=k,  # noqa: E731
                              guidance_scale=3.0, guidance_rescale=0.5)
    x = normal(1, (8, 4, 4, 3))
    k = jax.random.key(1)  # threefry: its bits do not depend on the sharding
    sharded = jax.jit(run, in_shardings=(batch_sharding, None), out_shardings=batch_sharding)(
        jax.device_put(x, batch_sharding), k)
    plain = jax.jit(run)(jnp.asarray(x), k)
    assert sharded.sharding.is_equivalent_to(batch_sharding, sharded.ndim)
    assert len(sharded.addressable_shards) == 8 and sharded.addressable_shards[0].data.shape == (1, 4, 4, 3)
    assert rel_err(sharded, plain) < TIGHT


def test_second_call_with_new_inputs_does_not_retrace():
    chex.clear_trace_counter()
    sched = DDIMScheduler(eta=0.5)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def generate(noise, k, scale):
        return sample(sched, cfg_model_jax, noise, num_inference_steps=5, key=k, guidance_scale=scale)

    a = generate(jnp.asarray(normal(2)), key(2), 3.0)
    b = generate(jnp.asarray(normal(3)), key(3), 5.0)  # new noise, key and guidance scale: same program
    assert rel_err(a, b) > 0.1


# -------------------------------------------------------------------------------------------- guidance

def test_rescale_guidance_matches_numpy_formula():
    guided, cond = normal(4), normal(5) * 0.5
    r = 0.7
    axes = (1, 2, 3)
    rescaled = guided * (cond.std(axis=axes, keepdims=True) / guided.std(axis=axes, keepdims=True))
    want = r * rescaled + (1 - r) * guided
    np.testing.assert_allclose(rescale_guidance(jnp.asarray(guided), jnp.asarray(cond), r), want,
                               rtol=1e-5, atol=1e-6)


def test_cfg_with_rescale_matches_diffusers_pipeline_loop():
    """[uncond; cond] halves combined as uncond + s (cond - uncond), then diffusers' rescale_noise_cfg,
    stepped with DDIM: the loop of diffusers' StableDiffusionPipeline."""
    cfg = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
               set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction",
               timestep_spacing="trailing", rescale_betas_zero_snr=True)
    n, scale, rescale = 8, 4.0, 0.7
    x_T = normal(6)
    got = jax.jit(lambda x: sample(DDIMScheduler(**cfg), cfg_model_jax, x, num_inference_steps=n,
                                   guidance_scale=scale, guidance_rescale=rescale))(jnp.asarray(x_T))
    theirs = diffusers.DDIMScheduler(**cfg)
    theirs.set_timesteps(n)
    x = torch.from_numpy(x_T)
    for t in theirs.timesteps:
        uncond, cond = cfg_model_torch(torch.cat([x, x]), t).chunk(2)
        guided = rescale_noise_cfg(uncond + scale * (cond - uncond), cond, guidance_rescale=rescale)
        x = theirs.step(guided, t, x).prev_sample
    assert rel_err(got, x.numpy()) < PARITY


def test_guided_channels_take_the_variance_from_the_conditional_half():
    """A learned-variance model (2C channels): only the first C are guided; the variance comes from the
    conditional half, as in diffusers' IF pipeline."""
    sched = DDPMScheduler(variance_type="learned_range")
    C, scale = SHAPE[-1], 3.0

    def model(x2, t):
        u, c = jnp.split(x2, 2)
        return jnp.concatenate([jnp.concatenate([denoise_jax(u, t), 0.2 * jnp.tanh(u)], -1),
                                jnp.concatenate([1.3 * denoise_jax(c, t), -0.6 * jnp.tanh(c)], -1)])

    def combined(x, t):  # what guidance must hand the scheduler
        u, c = jnp.split(model(jnp.concatenate([x, x]), t), 2)
        return jnp.concatenate([u[..., :C] + scale * (c[..., :C] - u[..., :C]), c[..., C:]], -1)

    x_T, k = jnp.asarray(normal(7)), key(7)
    got = jax.jit(lambda x: sample(sched, model, x, num_inference_steps=6, key=k, guidance_scale=scale,
                                   guided_channels=C))(x_T)
    want = jax.jit(lambda x: sample(sched, combined, x, num_inference_steps=6, key=k))(x_T)
    assert rel_err(got, want) < TIGHT


# ------------------------------------------------------------------------------- conditioning by keyword

COND = {"scale": jnp.array([1.3, 0.7]), "added": {"shift": jnp.arange(10.0).reshape(2, 5) / 10}}
UNCOND = {"scale": jnp.ones(2), "added": {"shift": jnp.zeros((2, 5))}}


def keyword_model(x, t, scale, added):  # a model whose keyword inputs ride along the rows: [N], [N, 5]
    return scale[:, None, None, None] * denoise_jax(x, t) + added["shift"].mean(-1)[:, None, None, None]


def test_cond_reaches_the_denoiser_by_keyword_and_guidance_puts_uncond_first():
    """Unguided, the denoiser gets `cond` as is; guided, every leaf of a nested cond is [uncond; cond],
    matching a denoiser that concatenates by hand (so the guided formula sees the halves the right way)."""
    sched, scale = DDIMScheduler(), 3.0
    x_T, k = jnp.asarray(normal(8)), key(8)

    def by_hand(x2, t):
        return keyword_model(x2, t, **jax.tree.map(lambda u, c: jnp.concatenate([u, c]), UNCOND, COND))

    run = lambda fn, **kw: jax.jit(lambda x: sample(sched, fn, x, num_inference_steps=5, key=k, **kw))(x_T)  # noqa: E731
    got = run(keyword_model, cond=COND, uncond=UNCOND, guidance_scale=scale)
    assert rel_err(got, run(by_hand, guidance_scale=scale)) < TIGHT
    plain = run(keyword_model, cond=COND)
    assert rel_err(plain, run(lambda x, t: keyword_model(x, t, **COND))) < TIGHT
    assert rel_err(plain, run(keyword_model, cond=UNCOND)) > 0.01  # the conditioning really is used
    assert rel_err(got, plain) > 0.01


def test_guiding_a_conditional_model_needs_a_matching_uncond():
    sched = DDIMScheduler()
    with pytest.raises(ValueError, match="needs `uncond`"):
        sample(sched, keyword_model, jnp.zeros(SHAPE), num_inference_steps=2, cond=COND, guidance_scale=2.0)
    with pytest.raises(ValueError, match="structure of cond"):
        sample(sched, keyword_model, jnp.zeros(SHAPE), num_inference_steps=2, cond=COND,
               uncond={"scale": jnp.ones(2)}, guidance_scale=2.0)


# ------------------------------------------------------------------------------------- img2img, refiner

def fake_pipeline(theirs, denoising_end=None):
    """The attributes diffusers' pipelines' get_timesteps reads from `self`."""
    return types.SimpleNamespace(scheduler=theirs, denoising_end=denoising_end)


@pytest.mark.parametrize("n", [10, 25, 50])
def test_strength_slices_like_diffusers_img2img(n):
    theirs = diffusers.DDIMScheduler(steps_offset=1)
    theirs.set_timesteps(n)
    state = DDIMScheduler(steps_offset=1).init(n)
    for strength in (0.3, 0.5, 0.75, 0.99, 1.0):
        want, _ = diffusers.StableDiffusionImg2ImgPipeline.get_timesteps(fake_pipeline(theirs), n, strength, "cpu")
        start, stop = loop_range(DDIMScheduler(), state, n, strength=strength)
        np.testing.assert_array_equal(np.asarray(state.timesteps)[start:stop], want.numpy(), err_msg=str(strength))


@pytest.mark.parametrize("n", [10, 25, 40])
def test_denoising_start_and_end_slice_like_sdxl(n):
    theirs = diffusers.DDIMScheduler(timestep_spacing="trailing")
    theirs.set_timesteps(n)
    sched = DDIMScheduler(timestep_spacing="trailing")
    state = sched.init(n)
    ts = np.asarray(state.timesteps)
    T = sched.num_train_timesteps
    for frac in (0.2, 0.5, 0.8, 0.93):
        # StableDiffusionXLPipeline.__call__'s denoising_end cut, as written there.
        cutoff = int(round(T - frac * T))
        want_end = theirs.timesteps[:len([t for t in theirs.timesteps if t >= cutoff])].numpy()
        start, stop = loop_range(sched, state, n, denoising_end=frac)
        np.testing.assert_array_equal(ts[start:stop], want_end, err_msg=f"denoising_end={frac}")
        want_start, _ = diffusers.StableDiffusionXLImg2ImgPipeline.get_timesteps(
            fake_pipeline(theirs), n, 0.3, "cpu", denoising_start=frac)
        if len(want_start) == 0:  # diffusers would run no step at all; diffax says so
            with pytest.raises(ValueError, match="no sampling steps left"):
                loop_range(sched, state, n, denoising_start=frac)
            continue
        start, stop = loop_range(sched, state, n, denoising_start=frac)
        np.testing.assert_array_equal(ts[start:stop], want_start.numpy(), err_msg=f"denoising_start={frac}")


def test_img2img_trajectory_matches_diffusers():
    """Start at strength 0.6: x_0 noised with add_noise at the first kept timestep, then the remaining
    DDIM steps, as StableDiffusionImg2ImgPipeline does."""
    n, strength = 10, 0.6
    init, noise = normal(8) * 0.5, normal(9)
    sched = DDIMScheduler(steps_offset=1, clip_sample=False)
    got = jax.jit(lambda x0, z: sample(sched, denoise_jax, z, num_inference_steps=n, init_sample=x0,
                                       strength=strength))(jnp.asarray(init), jnp.asarray(noise))
    theirs = diffusers.DDIMScheduler(steps_offset=1, clip_sample=False)
    theirs.set_timesteps(n)
    timesteps, _ = diffusers.StableDiffusionImg2ImgPipeline.get_timesteps(fake_pipeline(theirs), n, strength, "cpu")
    x = theirs.add_noise(torch.from_numpy(init), torch.from_numpy(noise), timesteps[:1])
    for t in timesteps:
        x = theirs.step(denoise_torch(x, t), t, x).prev_sample
    assert len(timesteps) == int(n * strength)
    assert rel_err(got, x.numpy()) < PARITY


def test_base_then_refiner_is_the_whole_trajectory():
    """sample(denoising_end=f) handed to sample(denoising_start=f) runs exactly the steps of one full run,
    noise included: loop indices, and so the per-step keys, line up."""
    sched = DDPMScheduler(timestep_spacing="trailing", clip_sample=False)
    n, f, k = 12, 0.75, key(10)
    x_T = jnp.asarray(normal(10))
    full = jax.jit(lambda x: sample(sched, denoise_jax, x, num_inference_steps=n, key=k))(x_T)
    base = jax.jit(lambda x: sample(sched, denoise_jax, x, num_inference_steps=n, key=k, denoising_end=f))(x_T)
    refined = jax.jit(lambda x, z: sample(sched, denoise_jax, z, num_inference_steps=n, key=k, init_sample=x,
                                          denoising_start=f))(base, jnp.zeros_like(x_T))
    assert rel_err(refined, full) < TIGHT
    assert rel_err(base, full) > 0.01  # the base really stopped early


def test_bad_slicing_arguments_raise():
    sched = DDIMScheduler()
    state = sched.init(10)
    with pytest.raises(ValueError, match="strength"):
        loop_range(sched, state, 10, strength=1.5)
    with pytest.raises(ValueError, match="no sampling steps left"):
        loop_range(sched, state, 10, strength=0.05)
    with pytest.raises(ValueError, match="init_sample"):
        sample(sched, denoise_jax, jnp.zeros(SHAPE), num_inference_steps=10, strength=0.5)


@pytest.mark.parametrize("sched", [DDIMScheduler(steps_offset=1, clip_sample=False),
                                   DPMSolverMultistepScheduler(steps_offset=1)], ids=["ddim", "dpm++2m"])
def test_traced_start_step_index_and_after_step(sched):
    """start_index as a traced scalar runs the same trajectory as the static strength slice (one program for
    every strength); pass_step_index hands the loop index to the denoiser; after_step edits x after a step."""
    n, strength = 10, 0.6
    init, z = jnp.asarray(normal(8) * 0.5), jnp.asarray(normal(9))
    static = jax.jit(lambda x0, z: sample(sched, denoise_jax, z, num_inference_steps=n, init_sample=x0,
                                          strength=strength))(init, z)
    start, _ = loop_range(sched, sched.init(n, z), n, strength=strength)
    seen = []

    timesteps = jnp.asarray(sched.init(n, z).timesteps)

    def denoise(x, t, step_index):  # reads the timestep through the index: a wrong index changes the result
        seen.append(step_index)
        return denoise_jax(x, timesteps[step_index])

    traced = jax.jit(lambda x0, z, s: sample(sched, denoise, z, num_inference_steps=n, init_sample=x0,
                                             start_index=s, pass_step_index=True))
    assert rel_err(traced(init, z, jnp.int32(start)), static) < TIGHT
    assert rel_err(traced(init, z, jnp.int32(0)), static) > 1e-3  # the start reached the loop, same program
    assert traced._cache_size() == 1 and len(seen) == 1
    clamped = jax.jit(lambda z: sample(sched, denoise_jax, z, num_inference_steps=3,
                                       after_step=lambda x, i, state: jnp.clip(x, -0.1 * i, 0.1 * i)))(z)
    assert float(jnp.abs(clamped).max()) <= 0.2 + 1e-6  # the last step (i = 2) clamped to [-0.2, 0.2]


def test_per_row_keys_make_each_rows_step_noise_its_own():
    """With one key per row, a stochastic sampler's row b depends on key b only: the same in any batch."""
    sched = DDPMScheduler(clip_sample=False)
    x_T = jnp.asarray(normal(11))
    keys = jax.vmap(jax.random.key)(jnp.arange(4, 4 + SHAPE[0]))
    run = jax.jit(lambda x, k: sample(sched, denoise_jax, x, num_inference_steps=5, key=k))
    batch = run(x_T, keys)
    alone = run(x_T[1:2], keys[1:2])
    assert rel_err(alone[0], batch[1]) < TIGHT
    assert rel_err(run(x_T, keys[::-1]), batch) > 0.01  # the keys drive the noise
