"""Rematerialisation policies (`model.remat`): same loss and gradients as no remat, the step's program
really holds the remat, the parameter tree does not depend on it, a bad name is a config error, and the key
may change when a run resumes."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffax.models import build_model
from diffax.models.registry import init_params
from diffax.models.remat import NAMES
from diffax.train.config import base_config
from diffax.train.loop import make_objective
from diffax.train.resume import is_fixed
from diffax.train.state import init_train_state
from diffax.train.step import diffusion_loss, make_train_step

# Two blocks (or block levels) each, so remat has something to wrap at every level.
BLOCKS = {
    "dit": dict(name="DiTTransformer2DModel", sample_size=8, patch_size=2, in_channels=1, out_channels=2,
                num_attention_heads=2, attention_head_dim=8, num_layers=2, num_embeds_ada_norm=4),
    "unet2d": dict(name="UNet2DModel", sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                   down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                   up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, attention_head_dim=8,
                   norm_num_groups=4, num_class_embeds=5),
    # dropout > 0: the static `train` flag reaches the rematerialised blocks and the recomputed forward
    # pass draws the same dropout masks.
    "unet2d_condition": dict(name="UNet2DConditionModel", sample_size=8, in_channels=1, out_channels=1,
                             block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                             attention_head_dim=2, cross_attention_dim=8, norm_num_groups=4, dropout=0.1),
}


def _batch(name: str) -> dict:
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (2, 8, 8, 1)).astype(np.float32)
    if name == "unet2d_condition":
        return {"image": image, "cond": {"encoder_hidden_states": rng.normal(size=(2, 3, 8)).astype(np.float32)}}
    return {"image": image, "cond": {"class_labels": np.array([1, 3], np.int32)}}


def _setup(name: str, policy: str):
    c = base_config()
    c.model.update(dict(BLOCKS[name], remat=policy))
    model = build_model(c.model)
    return model, make_objective(c, model)


@functools.cache
def _params(name: str):
    """Initialised by one jitted program (registry.init_params): the same values as an eager `model.init`,
    which compiles every operation on its own (13 s against 7 s for the conditional U-Net)."""
    model, _ = _setup(name, "none")
    return init_params(model.config, jax.random.key(0))


@functools.cache
def _loss_and_grad(name: str, policy: str):
    model, objective = _setup(name, policy)
    fn = jax.value_and_grad(lambda p: diffusion_loss(model, p, objective, _batch(name), jax.random.key(1))[0])
    return jax.device_get(jax.jit(fn)(_params(name)))


# The U-Nets' gradients take 20-45 s each to compile on 2 cores, so by default DiT runs 'full' and
# 'dots_no_batch' (the policies' code is shared by every family; test_step_program_holds_the_remat checks each
# family's step holds its remat); the U-Nets' policies with `-m slow`.
DEFAULT = {("dit", "full"), ("dit", "dots_no_batch")}
CASES = [pytest.param(name, policy, marks=[] if (name, policy) in DEFAULT else [pytest.mark.slow])
         for name in sorted(BLOCKS) for policy in NAMES if policy != "none"]


@pytest.mark.parametrize("name, policy", CASES)
def test_policy_keeps_loss_and_gradients(name, policy):
    """Recomputation may fuse differently, so the numbers agree to fp32 rounding, not bit for bit: loss
    within 1e-6 relative, the whole gradient within 1e-5 relative (a leaf-wise check would trip on leaves
    whose true gradient is 0, such as attention's key bias, where only rounding noise is left)."""
    loss, grads = _loss_and_grad(name, "none")
    loss_r, grads_r = _loss_and_grad(name, policy)
    assert jax.tree.structure(grads_r) == jax.tree.structure(grads)
    assert abs(loss_r - loss) <= 1e-6 * abs(loss)
    flat, flat_r = (np.concatenate([np.ravel(g) for g in jax.tree.leaves(t)]) for t in (grads, grads_r))
    assert np.linalg.norm(flat_r - flat) <= 1e-5 * np.linalg.norm(flat)
    assert np.linalg.norm(flat) > 0


def _step_jaxpr(name: str, policy: str) -> str:
    model, objective = _setup(name, policy)
    state = init_train_state(_params(name), optax.adam(1e-3))
    step = make_train_step(model, optax.adam(1e-3), objective)
    return str(jax.make_jaxpr(step)(state, _batch(name), jax.random.key(1)))


# Blocks each family wraps: DiT's transformer blocks; the U-Nets' down, mid and up blocks.
WRAPPED = {"dit": 2, "unet2d": 5, "unet2d_condition": 5}


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_step_program_holds_the_remat(name):
    """The train step's jaxpr has one remat equation (jax's `remat2`, the backward pass's recomputation)
    per wrapped block, with the chosen policy, and none without remat."""
    assert "remat2[" not in _step_jaxpr(name, "none")
    jaxpr = _step_jaxpr(name, "dots_no_batch")
    assert jaxpr.count("= remat2[") == WRAPPED[name]
    assert "policy=DotsSaveable(only_if_no_batch_dims=True)" in jaxpr


def test_bad_policy_is_a_config_error_naming_the_key():
    c = base_config()
    c.model.update(dict(BLOCKS["dit"], remat="dot"))
    with pytest.raises(ValueError, match=r"remat='dot' is not a rematerialisation policy") as e:
        build_model(c.model)
    assert "\n" not in str(e.value) and "full" in str(e.value)


def test_old_switch_and_resume():
    """`remat=True` (the earlier switch) reads as 'full'; the key may change when a run resumes, unlike the
    rest of the model block."""
    c = base_config()
    c.model.update(dict(BLOCKS["dit"], remat=True))
    assert build_model(c.model).config.remat == "full"
    assert not is_fixed("model.remat") and is_fixed("model.num_layers")
