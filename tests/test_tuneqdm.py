"""diffax.quant.tuneqdm: scale-only fine-tuning of a quantized model with K timestep-group scale sets."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffax.models import DiTConfig, init_params, make_module
from diffax.quant import QuantizationError, quantize_params
from diffax.quant.quantize import flatten
from diffax.quant.tuneqdm import (apply_scales, init_scales, load_scales, sample_group_timesteps, save_scales,
                                  timestep_group)

T, K = 1000, 2
CONFIG = DiTConfig.from_reference(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                                  num_classes=10)


def _setup():
    """A tiny DiT with non-trivial random weights (zero-initialised leaves given noise), its int4 base."""
    leaves, tree = jax.tree.flatten(init_params(CONFIG, jax.random.key(0)))
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.02 * jax.random.normal(k, p.shape) if float(jnp.std(p)) == 0 else p
                                       for k, p in zip(keys, leaves)])
    return make_module(CONFIG), params, quantize_params(params, bits=4, group_size=32)


MODULE, PARAMS, QP = _setup()


def _batch(key, group):
    kx, kt, ky = jax.random.split(key, 3)
    x = jax.random.normal(kx, (4, 8, 8, 4))
    lo, hi = group * T // K, (group + 1) * T // K
    return x, jax.random.randint(kt, (4,), lo, hi), jax.random.randint(ky, (4,), 0, 10)


@jax.jit
def _forward(scales, x, t, y):
    params = apply_scales(QP, scales, timestep_group(t[0], T, K))  # one group per call
    return MODULE.apply({"params": params}, x, t, class_labels=y)


def test_groups_and_timesteps():
    t = jnp.array([0, 499, 500, 999, 1000])
    np.testing.assert_array_equal(np.asarray(timestep_group(t, T, K)), [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(np.asarray(timestep_group(jnp.array([0.0, 250.0, 999.9]), T, 4)), [0, 1, 3])
    for seed in range(4):
        group, ts = sample_group_timesteps(jax.random.key(seed), 16, T, 4)
        assert bool(jnp.all(timestep_group(ts, T, 4) == group))


def test_initial_scales_give_the_quantized_model():
    scales = init_scales(QP, K)
    assert set(scales) == {name for name, _ in QP.shapes}
    for g in range(K):
        viewed = flatten(apply_scales(QP, scales, g))
        for path, leaf in flatten(QP.params).items():
            np.testing.assert_array_equal(np.asarray(viewed[path]), np.asarray(leaf), err_msg=str(path))
    per_tensor = init_scales(QP, 3, per_channel=False, include=[r"transformer_blocks_0/"])
    assert per_tensor and all(v.shape == (3, 1, 1) for v in per_tensor.values())
    assert all(n.startswith("transformer_blocks_0/") for n in per_tensor)


def test_each_group_uses_its_own_set():
    scales = init_scales(QP, K)
    changed = {n: v.at[1].set(0.5) for n, v in scales.items()}  # only group 1's set differs
    for group, same in ((0, True), (1, False)):
        x, t, y = _batch(jax.random.key(group), group)
        a, b = _forward(scales, x, t, y), _forward(changed, x, t, y)
        assert bool(jnp.array_equal(a, b)) == same


def test_training_changes_only_the_scales_and_recovers_accuracy():
    """Scale-only training toward the fp32 model's outputs (the TuneQDM objective with the fp32 model as
    teacher): the loss falls, and every integer kernel, bias and norm is untouched."""
    scales = init_scales(QP, K)
    teacher = jax.jit(lambda x, t, y: MODULE.apply({"params": PARAMS}, x, t, class_labels=y))
    opt = optax.adam(3e-2)
    state = opt.init(scales)
    # Optimizer state exists only for the scales: Adam's two moments, each of the scales' size.
    n_scales = sum(v.size for v in scales.values())
    assert sum(np.size(v) for v in jax.tree.leaves(state)) == 2 * n_scales + 1  # + the step count

    def loss_fn(s, x, t, y):
        return jnp.mean(jnp.square(_forward(s, x, t, y) - teacher(x, t, y)))

    @jax.jit
    def step(s, state, key):
        group, _ = sample_group_timesteps(key, 4, T, K)
        x, t, y = _batch(key, group)
        loss, grads = jax.value_and_grad(loss_fn)(s, x, t, y)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(s, updates), state, loss

    held_out = [_batch(jax.random.key(100 + g), g) for g in range(K)]
    before = float(np.mean([loss_fn(scales, *b) for b in held_out]))
    for i in range(40):
        scales, state, _ = step(scales, state, jax.random.key(i))
    after = float(np.mean([loss_fn(scales, *b) for b in held_out]))
    assert after < 0.8 * before, (before, after)
    for g in range(K):
        viewed = flatten(apply_scales(QP, scales, g))
        for path, leaf in flatten(QP.params).items():
            if path[-1] != "kernel_scale":
                np.testing.assert_array_equal(np.asarray(viewed[path]), np.asarray(leaf), err_msg=str(path))


def test_scale_file_round_trip_and_errors(tmp_path):
    scales = {n: v * (1 + 0.01 * i) for i, (n, v) in enumerate(init_scales(QP, K).items())}
    path = save_scales(tmp_path / "task.safetensors", scales, QP, dataset="digits 5-9")
    loaded = load_scales(path, QP)
    assert loaded.base == {"bits": 4, "group_size": 32, "dataset": "digits 5-9"}
    assert set(loaded.scales) == set(scales)
    for n in scales:
        np.testing.assert_array_equal(np.asarray(loaded.scales[n]), np.asarray(scales[n]))
    other = quantize_params(PARAMS, bits=8)
    with pytest.raises(QuantizationError, match="tuned on a 4-bit base"):
        load_scales(path, other)
    name = next(iter(scales))
    bad = dict(scales, **{name: jnp.ones((K, 1, 3))})
    with pytest.raises(QuantizationError, match=rf"'{name}' has factors \(2, 1, 3\)"):
        load_scales(save_scales(tmp_path / "bad.safetensors", bad, QP), QP)
    with pytest.raises(QuantizationError, match="no quantized layer chosen"):
        init_scales(quantize_params(PARAMS, 8, include=["proj_out_2"]), K, include=["proj_out_1"])
