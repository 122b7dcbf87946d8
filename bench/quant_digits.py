"""Quantized weights on a trained model: sample quality of the digits U-Net in fp32, int8 and int4.

    JAX_PLATFORMS=cpu python train.py --config=configs/digits.py --workdir=runs/digits --config.train.steps=300
    JAX_PLATFORMS=cpu python -m bench.quant_digits --workdir=runs/digits

Loads the EMA weights of a digits workdir, quantizes them, and for each variant samples `--num_samples`
digits (DDIM, the config's steps and guidance, the same seed and labels for every variant), then reports
the real-digits classifier's accuracy on them (`diffax.evaluation.digits_classifier`), the weight bytes,
the relative L2 error of one model call against fp32 (random noisy inputs at random timesteps), and the
mean absolute pixel difference of the samples from the fp32 samples.
"""
from __future__ import annotations

import argparse

import jax
import numpy as np

from diffax import parallel
from diffax.evaluation.digits_classifier import class_accuracy
from diffax.models import build_model
from diffax.pipelines.generation import GenerationPipeline
from diffax.quant import device_bytes, quantize_params
from diffax.schedulers.names import scheduler_for
from diffax.train.checkpoint import restore_for_sampling

VARIANTS = {"fp32": None, "int8": dict(bits=8), "int4": dict(bits=4), "int4_g32": dict(bits=4, group_size=32)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--num_samples", type=int, default=200)
    opts = parser.parse_args()
    config, params, step = restore_for_sampling(opts.workdir)
    model = build_model(config.model)
    scheduler = scheduler_for("ddim", config.diffusion)
    pipe = GenerationPipeline(model, scheduler, parallel.make_mesh({"data": -1}), output_uint8=True)
    labels = np.arange(opts.num_samples) % 10
    sample, t = model.config.example_inputs(16)[:2]
    x = jax.random.normal(jax.random.key(1), sample.shape)
    t = jax.random.randint(jax.random.key(2), t.shape, 0, 1000)
    call = jax.jit(lambda p: model.apply({"params": p}, x, t, class_labels=labels[:16]))
    ref_out, ref_images = None, None
    print(f"digits U-Net step {step}, {opts.num_samples} samples, DDIM {config.sample.steps} steps, "
          f"guidance {config.sample.guidance_scale}")
    for name, options in VARIANTS.items():
        p = params if options is None else quantize_params(params, **options).params
        out = np.asarray(call(p), np.float64)
        images = pipe(p, jax.random.key(0), labels=labels, num_inference_steps=config.sample.steps,
                      guidance_scale=config.sample.guidance_scale)
        if options is None:
            ref_out, ref_images, fp32_bytes = out, images, device_bytes(params)
        err = np.linalg.norm(out - ref_out) / np.linalg.norm(ref_out)
        diff = np.abs(images.astype(np.float64) - ref_images).mean()
        print(f"  {name:9s} bytes ratio {device_bytes(p) / fp32_bytes:.3f}  model rel L2 {err:.4f}  "
              f"class accuracy {class_accuracy(images, labels):.3f}  mean |pixel - fp32 pixel| {diff:.2f} / 255",
              flush=True)


if __name__ == "__main__":
    main()
