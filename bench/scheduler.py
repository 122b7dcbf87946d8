"""XLA:CPU's default (concurrency-optimised) against its memory-optimised instruction scheduler: the speed of
the same lowered SD 1.5 UNet forward compiled both ways in one process (docs/performance.md, Memory).

    python -m bench.scheduler --dtype=float32     # SD 1.5 sizes, batch 2 at 64x64 latents
    python -m bench.scheduler --dtype=bfloat16    # weights and compute in bf16 (XLA:CPU computes in fp32)

The memory scheduler keeps far fewer temporaries alive (bench.memory --schedulers default memory); this
measures what it costs in time: both executables of one lowering, called interleaved, median and range of
`--repeats` calls after one untimed call each. Random weights: the speed does not depend on them. Diffax
against diffax, so no torch row; run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from bench.models import SD15_UNET
from diffax.models import UNet2DConditionConfig, init_params, make_module

SCHEDULERS = {"default": {}, "memory": {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}}


def main() -> None:
    """Compiles the forward with each scheduler and prints compile time and call times per scheduler."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config = UNet2DConditionConfig.from_diffusers(SD15_UNET, dtype=args.dtype, param_dtype=args.dtype)
    module = make_module(config)
    params = init_params(config, jax.random.key(0))
    dtype = jnp.dtype(args.dtype)
    x = jnp.ones((args.batch, 64, 64, 4), dtype)  # [B, H, W, C] latents
    t = jnp.full((args.batch,), 500)
    context = jnp.ones((args.batch, 77, 768), dtype)  # [B, L, D] text embeddings
    lowered = jax.jit(lambda p, x, t, c: module.apply({"params": p}, x, t, encoder_hidden_states=c)).lower(
        params, x, t, context)
    compiled = {}
    for name, options in SCHEDULERS.items():
        start = time.perf_counter()
        compiled[name] = lowered.compile(compiler_options=options)
        print(f"{name}: compiled in {time.perf_counter() - start:.1f} s", flush=True)
        jax.block_until_ready(compiled[name](params, x, t, context))
    times: dict[str, list[float]] = {name: [] for name in compiled}
    for _ in range(args.repeats):
        for name, program in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(program(params, x, t, context))
            times[name].append(time.perf_counter() - start)
    for name, ts in times.items():
        print(f"{name}: median {statistics.median(ts):.3f} s (range {min(ts):.3f}-{max(ts):.3f})")
    print(f"memory / default: {statistics.median(times['memory']) / statistics.median(times['default']):.3f}")


if __name__ == "__main__":
    main()
