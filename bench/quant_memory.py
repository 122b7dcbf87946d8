"""Peak memory of a quantized forward pass: XLA's buffer assignment for the compiled program.

    JAX_PLATFORMS=cpu python -m bench.quant_memory

For DiT-S/2 and the SD-shaped U-Net of bench/quant.py (batch 2), fp32 / int8 / int4 weights: the bytes of
the program's arguments (the weights and inputs) and of its temporary arena (`memory_analysis()`), in MiB.
"""
from __future__ import annotations

import jax

from bench.quant import SD_SMALL_UNET, _random_inputs, random_weights
from diffax import xla_options
from diffax.models import DiTConfig, UNet2DConditionConfig, make_module
from diffax.quant import quantize_params


def main() -> None:
    for name, config, spatial, tokens in [
            ("DiT-S/2", DiTConfig.preset("DiT-S/2"), None, None),
            ("SD-shaped U-Net", UNet2DConditionConfig.from_diffusers(SD_SMALL_UNET), 32, 77)]:
        module, params = make_module(config), random_weights(config)
        args, kwargs = _random_inputs(config, 2, jax.random.key(0), spatial, tokens)
        forward = xla_options.jit(lambda p, a, k: module.apply({"params": p}, *a, **k))
        for variant, p in [("fp32", params), ("int8", quantize_params(params, 8).params),
                           ("int4", quantize_params(params, 4).params)]:
            m = forward.lower(p, args, kwargs).compile().memory_analysis()
            print(f"{name:16s} {variant}: arguments {m.argument_size_in_bytes / 2**20:6.1f} MiB  "
                  f"temporaries {m.temp_size_in_bytes / 2**20:6.1f} MiB", flush=True)


if __name__ == "__main__":
    main()
