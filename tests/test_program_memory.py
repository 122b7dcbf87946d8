"""XLA's buffer assignment of diffax's compiled programs (nothing run): the temporaries they hold beside
their arguments.

- A train step holds about one copy of the gradients beside the donated state: clipping multiplies by one
  scalar (optax's per-element division was kept as a second copy of every gradient), and on XLA:CPU a
  convolution's backward pass neither transposes its kernel up front nor keeps its kernel gradient in two
  memory layouts (`layers.conv_kernel_waits`).
- Rematerialised blocks recompute their activations in the backward pass when it reaches them, so the
  temporaries shrink (`remat._tied_to_cotangent`); XLA:CPU's scheduler used to recompute them all early.
- bf16 inference on XLA:CPU converts each convolution weight to fp32 when its layer is reached, not all at
  the start (`layers.one_after` in the layers' `param`); dense layers keep theirs in bf16
  (`layers.dot_general_f32`)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffax.models import layers
from diffax.models.unet2d import UNet2DConfig, UNet2DModel
from diffax.train.config import base_config
from diffax.train.state import clip_by_global_norm, init_train_state, make_optimizer
from diffax.train.step import Objective, make_train_step


class _Mlp(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, 512]
        for _ in range(6):
            x = jnp.tanh(layers.dense(512)(x))
        return x


class _ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, 8, 8, 128]
        for _ in range(6):
            x = jax.nn.silu(layers.conv(128, 3, padding=1)(x))
        return x


def _temporaries_over_weights(net: nn.Module, x: jax.Array) -> float:
    """XLA's temporary arena of diffax's train step (AdamW, clipping at norm 1, EMA, non-finite guard) over
    the weights' bytes. Weights are far larger than activations here, so ~1 is the gradients alone."""
    params = net.init(jax.random.key(0), x)["params"]

    def loss_fn(p, batch, key):
        loss = jnp.mean(net.apply({"params": p}, batch["image"]) ** 2)
        return loss, {"loss": loss}

    config = base_config().train
    assert config.grad_clip == 1.0
    tx = make_optimizer(config)
    step = make_train_step(None, tx, Objective(alphas_cumprod=np.linspace(0.99, 0.01, 10)), loss_fn=loss_fn)
    state = jax.eval_shape(lambda: init_train_state(params, tx))
    compiled = jax.jit(step, donate_argnums=0).lower(state, {"image": x}, jax.random.key(0)).compile()
    weights = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params))
    return compiled.memory_analysis().temp_size_in_bytes / weights


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the buffer assignment measured is XLA:CPU's")
@pytest.mark.parametrize("net, x", [(_Mlp(), jnp.zeros((2, 512))), (_ConvNet(), jnp.zeros((1, 8, 8, 128)))],
                         ids=["dense", "conv"])
def test_train_step_temporaries_hold_one_copy_of_the_gradients(net: nn.Module, x: jax.Array):
    # Both were 2.0 before: the clipped gradients (dense), the transposed kernels and the kernel gradients'
    # second layout (conv).
    assert _temporaries_over_weights(net, x) < 1.35


def _gradient_temporaries(policy: str) -> int:
    """Bytes of XLA's temporary arena for the loss gradient of a small pixel U-Net, its blocks under `policy`.
    Batch 16 at 16x16: activations are most of the memory."""
    config = UNet2DConfig(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 32),
                          layers_per_block=2, down_block_types=("DownBlock2D",) * 2,
                          up_block_types=("UpBlock2D",) * 2, norm_num_groups=8, remat=policy)
    model = UNet2DModel(config)
    x, t = jnp.zeros((16, 16, 16, 3)), jnp.zeros((16,), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t)["params"])
    grad = jax.grad(lambda p: jnp.mean(model.apply({"params": p}, x, t) ** 2))
    return jax.jit(grad).lower(params).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the buffer assignment measured is XLA:CPU's")
def test_full_remat_shrinks_the_gradients_temporaries():
    # 58.5 against 57.7 MiB (no saving at all) before the recomputation waited for the cotangent; 31.2 now.
    assert _gradient_temporaries("full") < 0.7 * _gradient_temporaries("none")


def _conv_pair(strides: int, padding):
    kwargs = dict(window_strides=(strides, strides), padding=padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    plain = lambda x, w: jax.lax.conv_general_dilated(x, w, **kwargs)
    waits = lambda x, w: layers.conv_kernel_waits(x, w, **kwargs)
    return plain, waits


@pytest.mark.parametrize("strides, padding", [(1, ((1, 1), (1, 1))), (2, ((1, 1), (1, 1))), (1, "SAME")])
def test_conv_kernel_waits_is_the_convolution_in_value_and_gradient(strides, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 16, 24)), jnp.float32)
    plain, waits = _conv_pair(strides, padding)
    y, vjp_plain = jax.vjp(plain, x, w)
    y_waits, vjp_waits = jax.vjp(waits, x, w)
    np.testing.assert_array_equal(np.asarray(y_waits), np.asarray(y))
    dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    for got, want in zip(jax.jit(vjp_waits)(dy), jax.jit(vjp_plain)(dy)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-5)
    # and through rematerialisation, as the models' blocks run it
    loss = lambda f: (lambda x, w: jnp.sum(jax.checkpoint(f)(x, w) ** 2))
    for got, want in zip(jax.grad(loss(waits), (0, 1))(x, w), jax.grad(loss(plain), (0, 1))(x, w)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-4)


def test_clip_by_global_norm_scales_as_torch_and_leaves_small_gradients_alone():
    rng = np.random.default_rng(0)
    grads = {"a": jnp.asarray(rng.standard_normal((4, 5)), jnp.float32), "b": jnp.asarray(rng.standard_normal(7))}
    norm = float(optax.global_norm(grads))
    clipped, _ = clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    assert float(optax.global_norm(clipped)) == pytest.approx(1.0, rel=1e-6)
    reference, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    for got, want in zip(jax.tree.leaves(clipped), jax.tree.leaves(reference)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
    untouched, _ = clip_by_global_norm(2 * norm).update(grads, optax.EmptyState())
    for got, want in zip(jax.tree.leaves(untouched), jax.tree.leaves(grads)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    zeros = jax.tree.map(jnp.zeros_like, grads)
    for leaf in jax.tree.leaves(clip_by_global_norm(1.0).update(zeros, optax.EmptyState())[0]):
        np.testing.assert_array_equal(np.asarray(leaf), 0.0)


class _Bf16Net(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, 8, 8, 64]
        kw = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
        for _ in range(4):
            x = jax.nn.silu(layers.conv(64, 3, padding=1, **kw)(x))
        for _ in range(4):
            x = jnp.tanh(layers.dense(64, **kw)(x))
        return x


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the buffer assignment measured is XLA:CPU's")
def test_bf16_inference_converts_each_weight_when_its_layer_runs():
    x = jnp.zeros((1, 8, 8, 64), jnp.bfloat16)
    params = jax.eval_shape(_Bf16Net().init, jax.random.key(0), x)["params"]
    compiled = jax.jit(lambda p, x: _Bf16Net().apply({"params": p}, x)).lower(params, x).compile()
    fp32_weights = sum(a.size * 4 for a in jax.tree.leaves(params))
    # All eight fp32 copies at once before (1.0x the fp32 weights); now about one layer's at a time.
    assert compiled.memory_analysis().temp_size_in_bytes < 0.4 * fp32_weights
