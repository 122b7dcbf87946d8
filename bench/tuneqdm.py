"""TuneQDM on a tiny DiT: how far scale-only training brings an int4 model back toward its fp32 original.

    JAX_PLATFORMS=cpu python -m bench.tuneqdm            # ~1 minute on 2 CPU cores

A 182k-parameter class-conditional DiT (8x8x4 inputs, width 64, depth 2) with random weights (constant
leaves given N(0, 0.02) noise) is quantized to int4 with groups of 32 rows; K = 2 timestep groups of
scale factors (per output channel) are trained with Adam (3e-2, batches of 4 random inputs, one group
per batch) to match the fp32 model's outputs. Printed: the relative L2 error against fp32 on one held-out
batch per group, before and after 40 and 200 steps, and the count of trainable factors.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffax.models import DiTConfig, init_params, make_module
from diffax.quant import apply_scales, init_scales, quantize_params, sample_group_timesteps, timestep_group

T, K = 1000, 2


def main() -> None:
    config = DiTConfig.from_reference(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2,
                                      num_heads=4, num_classes=10)
    leaves, tree = jax.tree.flatten(init_params(config, jax.random.key(0)))
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.02 * jax.random.normal(k, p.shape) if float(jnp.std(p)) == 0 else p
                                       for k, p in zip(keys, leaves)])
    module = make_module(config)
    qp = quantize_params(params, bits=4, group_size=32)

    def batch(key, group):
        kx, kt, ky = jax.random.split(key, 3)
        lo, hi = group * T // K, (group + 1) * T // K
        return (jax.random.normal(kx, (4, 8, 8, 4)), jax.random.randint(kt, (4,), lo, hi),
                jax.random.randint(ky, (4,), 0, 10))

    @jax.jit
    def student(scales, x, t, y):
        return module.apply({"params": apply_scales(qp, scales, timestep_group(t[0], T, K))}, x, t, class_labels=y)

    teacher = jax.jit(lambda x, t, y: module.apply({"params": params}, x, t, class_labels=y))
    opt = optax.adam(3e-2)

    @jax.jit
    def step(scales, state, key):
        group, _ = sample_group_timesteps(key, 4, T, K)
        x, t, y = batch(key, group)
        grads = jax.grad(lambda s: jnp.mean(jnp.square(student(s, x, t, y) - teacher(x, t, y))))(scales)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(scales, updates), state

    held_out = [batch(jax.random.key(100 + g), g) for g in range(K)]

    def error(scales):
        return np.mean([float(jnp.linalg.norm(student(scales, *b) - teacher(*b)) / jnp.linalg.norm(teacher(*b)))
                        for b in held_out])

    scales = init_scales(qp, K)
    state = opt.init(scales)
    n = sum(v.size for v in scales.values())
    print(f"trainable factors {n} of {sum(p.size for p in jax.tree.leaves(params))} parameters")
    print(f"int4 g32, step 0: rel L2 vs fp32 {error(scales):.3f}")
    for i in range(200):
        scales, state = step(scales, state, jax.random.key(i))
        if i + 1 in (40, 200):
            print(f"step {i + 1}: rel L2 vs fp32 {error(scales):.3f}")


if __name__ == "__main__":
    main()
