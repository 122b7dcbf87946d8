"""Quantized weights per model family: weight memory, output difference and speed against fp32 and bf16.

    JAX_PLATFORMS=cpu python -m bench.quant                 # every family; writes bench/results/quant.json
    JAX_PLATFORMS=cpu python -m bench.quant --only dit_s2 --repeats 5

For each family it builds the model with random weights (the init, with constant leaves such as DiT's
zero-initialised adaLN and output layers replaced by N(0, 0.02) noise so the output is not trivially 0),
then for fp32, bf16 (params and compute), int8 (per output channel) and int4 (per channel and per group):
  bytes     the device bytes of the parameter tree (`diffax.quant.device_bytes`), and its ratio to fp32;
  error     relative L2 error ||y - y_fp32|| / ||y_fp32|| of the output on one random input batch, and the
            max-abs error relative to max |y_fp32|;
  time      median and interquartile range of `repeats` calls of the jitted forward pass (after a warm-up
            call), interleaved across the variants so that load from other work hits all alike.
Full-size models that are too large to run here (the SD 1.5 / SDXL U-Nets) get the byte ratios only, from
abstract shapes (`abstract_params` -> `abstract_quantized`): nothing is allocated.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import RESULTS_DIR
from diffax import xla_options
from diffax.models import (AutoencoderKLConfig, CLIPTextConfig, CLIPTextWithProjectionConfig, DiTConfig,
                           UNet2DConditionConfig, UNet2DConfig, abstract_params, init_params, make_module)
from diffax.quant import abstract_quantized, device_bytes, quantize_params

SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
SDXL_UNET = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
CLIP_H = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, projection_dim=1024, num_hidden_layers=23,
              num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu")  # SD 2.x
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, projection_dim=1280,
                 num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu")  # SDXL
DIGITS_UNET = dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64), layers_per_block=1,
                   down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                   up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                   attention_head_dim=16, norm_num_groups=8, num_class_embeds=11)
# A small SD-shaped U-Net (the SD 1.5 block structure at a quarter of the width) that runs here.
SD_SMALL_UNET = dict(sample_size=32, block_out_channels=(64, 128, 256, 256), layers_per_block=1,
                     cross_attention_dim=768, attention_head_dim=8)

VARIANTS = {"int8": dict(bits=8), "int4": dict(bits=4), "int4_g64": dict(bits=4, group_size=64),
            "int4_g128": dict(bits=4, group_size=128)}


def _random_inputs(config: Any, batch: int, key: jax.Array, spatial: int | None = None,
                   tokens: int | None = None) -> tuple[tuple, dict]:
    """The family's init inputs with batch `batch`, random values (timesteps in [0, 1000), ids < 1000,
    class labels < 10), image inputs of side `spatial` and text embeddings [B, L, D] of `tokens` tokens
    (init inputs are the smallest valid ones, e.g. 4x4 images and one token)."""
    args, kwargs = config.init_inputs()
    leaves, tree = jax.tree.flatten((args, kwargs))
    out = []
    for k, leaf in zip(jax.random.split(key, len(leaves)), leaves):
        leaf = jnp.asarray(leaf)
        shape = (batch,) + leaf.shape[1:] if leaf.ndim else ()
        if leaf.ndim == 4 and spatial:
            shape = (batch, spatial, spatial, leaf.shape[-1])
        if leaf.ndim == 3 and tokens and jnp.issubdtype(leaf.dtype, jnp.floating):
            shape = (batch, tokens, leaf.shape[-1])
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            out.append(jax.random.uniform(k, shape, leaf.dtype, 0, 999) if leaf.ndim == 1 else
                       jax.random.normal(k, shape, leaf.dtype))
        else:
            out.append(jax.random.randint(k, shape, 0, 10 if leaf.ndim == 1 else 1000).astype(leaf.dtype))
    return jax.tree.unflatten(tree, out)


def random_weights(config: Any, seed: int = 0) -> dict:
    """The init parameters, with constant leaves (zeros / ones) given N(0, 0.02) noise."""
    params = init_params(config, jax.random.key(seed))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [p + 0.02 * jax.random.normal(k, p.shape, p.dtype) if float(jnp.std(p)) == 0 else p
              for k, p in zip(keys, leaves)]
    return jax.tree.unflatten(tree, leaves)


def _errors(y: Any, ref: Any) -> dict[str, float]:
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return {"rel_l2": float(np.linalg.norm(y - ref) / np.linalg.norm(ref)),
            "rel_max": float(np.abs(y - ref).max() / np.abs(ref).max())}


def _output(out: Any) -> jax.Array:
    """The main output array of a family's forward pass (the first leaf: a U-Net's sample, CLIP's hidden states)."""
    return jax.tree.leaves(out)[0]


def measure(name: str, config: Any, *, batch: int, spatial: int | None, repeats: int, tokens: int | None = None,
            forward: Callable[[Any], Callable] | None = None) -> dict[str, Any]:
    """The table rows of one family: bytes, errors and times of fp32, bf16 and the quantized variants."""
    params = random_weights(config)
    args, kwargs = _random_inputs(config, batch, jax.random.key(7), spatial, tokens)
    bf16 = dataclasses.replace(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    runs = {"fp32": (make_module(config), params),
            "bf16": (make_module(bf16), jax.tree.map(lambda p: p.astype(jnp.bfloat16), params))}
    for variant, options in VARIANTS.items():
        runs[variant] = (make_module(config), quantize_params(params, **options).params)
    fns = {}
    for variant, (module, p) in runs.items():
        apply = (forward(module) if forward else
                 (lambda module: lambda p, a, k: module.apply({"params": p}, *a, **k))(module))
        fns[variant] = (xla_options.jit(apply), p)
    outputs = {v: _output(f(p, args, kwargs)) for v, (f, p) in fns.items()}  # also the warm-up (compile)
    jax.block_until_ready(outputs)
    times: dict[str, list[float]] = {v: [] for v in fns}
    for _ in range(repeats):
        for v, (f, p) in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(p, args, kwargs))
            times[v].append(time.perf_counter() - t0)
    fp32_bytes = device_bytes(params)
    rows = {}
    for v in fns:
        q = statistics.quantiles(times[v], n=4) if len(times[v]) > 1 else [times[v][0]] * 3
        rows[v] = {"bytes": device_bytes(runs[v][1]), "ratio": device_bytes(runs[v][1]) / fp32_bytes,
                   **_errors(outputs[v], outputs["fp32"]), "median_s": statistics.median(times[v]),
                   "iqr_s": q[2] - q[0]}
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    return {"family": name, "params": n_params, "batch": batch, "spatial": spatial, "tokens": tokens, "rows": rows}


def abstract_ratios(name: str, config: Any) -> dict[str, Any]:
    """Byte ratios of a full-size model from shapes alone."""
    abstract = abstract_params(config)
    fp32 = device_bytes(abstract)
    rows = {"fp32": {"bytes": fp32, "ratio": 1.0}, "bf16": {"bytes": fp32 // 2, "ratio": 0.5}}
    for variant, options in VARIANTS.items():
        b = device_bytes(abstract_quantized(abstract, **options))
        rows[variant] = {"bytes": b, "ratio": b / fp32}
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(abstract))
    return {"family": name, "params": n_params, "abstract": True, "rows": rows}


def _vae_decode(module: Any) -> Callable:
    """The VAE's decoder on random latents of the input's batch and side (the decode that sampling runs)."""
    def decode(p: Any, a: tuple, k: dict) -> jax.Array:
        z = jax.random.normal(jax.random.key(8), a[0].shape[:-1] + (module.config.latent_channels,))
        return module.apply({"params": p}, z, method=module.decode_raw)
    return decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", nargs="*", default=None, help="family names to run")
    opts = parser.parse_args()
    runs = {
        "unet_digits": lambda: measure("UNet2DModel digits (configs/digits.py), 16x16", UNet2DConfig(**DIGITS_UNET),
                                       batch=8, spatial=16, repeats=opts.repeats),
        "dit_s2": lambda: measure("DiT-S/2 (256px latents 32x32x4)", DiTConfig.preset("DiT-S/2"), batch=2,
                                  spatial=None, repeats=opts.repeats),
        "sd_small_unet": lambda: measure("SD-shaped UNet2DCondition, quarter width, 32x32 latents, 77 tokens",
                                         UNet2DConditionConfig.from_diffusers(SD_SMALL_UNET), batch=2, spatial=32,
                                         tokens=77, repeats=opts.repeats),
        "sd_vae_decode": lambda: measure("SD VAE decoder (AutoencoderKL, 8x8 latents -> 64x64)",
                                         AutoencoderKLConfig.from_diffusers(SD_VAE), batch=1, spatial=8,
                                         repeats=opts.repeats, forward=_vae_decode),
        "clip_l": lambda: measure("CLIP ViT-L/14 text encoder (77 tokens)", CLIPTextConfig.from_diffusers(CLIP_L),
                                  batch=2, spatial=None, repeats=opts.repeats),
        "sd15_unet_full": lambda: abstract_ratios("SD 1.5 UNet2DCondition (full size)",
                                                  UNet2DConditionConfig.from_diffusers(SD15_UNET)),
        "sdxl_unet_full": lambda: abstract_ratios("SDXL UNet2DCondition (full size)",
                                                  UNet2DConditionConfig.from_diffusers(SDXL_UNET)),
        "dit_xl2_full": lambda: abstract_ratios("DiT-XL/2 (full size)", DiTConfig.preset("DiT-XL/2")),
        "clip_h_full": lambda: abstract_ratios("CLIP ViT-H/14 text encoder (SD 2.x, full size)",
                                               CLIPTextConfig.from_diffusers(CLIP_H)),
        "clip_bigg_full": lambda: abstract_ratios("CLIP ViT-bigG/14 text encoder with projection (SDXL, full size)",
                                                  CLIPTextWithProjectionConfig.from_diffusers(CLIP_BIGG)),
    }
    results = []
    for key, run in runs.items():
        if opts.only and key not in opts.only:
            continue
        result = {"key": key, **run()}
        results.append(result)
        print(f"\n{result['family']}: {result['params'] / 1e6:.1f}M params")
        for v, r in result["rows"].items():
            line = f"  {v:10s} bytes {r['bytes'] / 2**20:9.1f} MiB  ratio {r['ratio']:.3f}"
            if "rel_l2" in r:
                line += (f"  rel_l2 {r['rel_l2']:.2e}  rel_max {r['rel_max']:.2e}  "
                         f"time {r['median_s'] * 1e3:8.1f} ms (IQR {r['iqr_s'] * 1e3:.1f})")
            print(line, flush=True)
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / ("quant.json" if not opts.only else f"quant_{'_'.join(opts.only)}.json")
    out.write_text(json.dumps({"device": str(jax.devices()[0]), "jax": jax.__version__, "results": results},
                              indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
