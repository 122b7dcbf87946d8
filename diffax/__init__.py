"""diffax: diffusion models in JAX/Flax.

Train image diffusion models on TPU pods and GPU clusters, sample from them with one XLA-compiled
program, and bring PyTorch weights across and back. The main entry points:

    diffax.sampling.sample        one jitted sampling run with any scheduler, CFG, img2img
    diffax.schedulers             every sampler users know, config-compatible with diffusers
    diffax.models                 UNet2DModel, DiT (Flax Linen, NHWC, logical axis names)
    diffax.convert                PyTorch <-> diffax weights (safetensors, .bin, .pt)
    diffax.train                  the train step, loop and Orbax checkpoints behind train.py
    diffax.data                   grain input pipelines (digits, tfds, image folders)
"""
__version__ = "0.1.0"
