"""DiT-XL/2 on ImageNet 256x256, class-conditional, as in the DiT paper (Peebles & Xie, 2023), in two stages:

    # 1. every ImageNet training image (center-cropped to 256, and its mirror) through SD's VAE, once
    python -m diffax.data.cache --config=configs/dit_xl2_imagenet.py:cache \
        --config.cache.vae=models/sd-vae-ft-ema --config.cache.out=data/imagenet256_sd_vae_ft_ema
    # 2. DiT-XL/2 on the cached 32x32x4 latents
    python train.py --config=configs/dit_xl2_imagenet.py --workdir=runs/dit_xl2_imagenet \
        --config.data.path=data/imagenet256_sd_vae_ft_ema

Stage 1 reads tfds' `imagenet2012` (prepared beforehand in the tfds data directory: `tfds build
imagenet2012` with the manually downloaded archives; diffax downloads nothing) and a local diffusers
`AutoencoderKL` folder, e.g. stabilityai/sd-vae-ft-ema saved with `save_pretrained` or fetched with
`huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir models/sd-vae-ft-ema`. Its config's
scaling_factor 0.18215 is stored in the cache's manifest and applied to every latent drawn. The cache holds
the posterior mean and log-variance of each image and of its mirror (the reference's random flip) in
float16: 1,281,167 x 2 x 2 x 32x32x4 x 2 bytes, about 42 GB.

Stage 2 is the paper's recipe: AdamW at a constant 1e-4, no weight decay, no gradient clipping, global batch
256, EMA 0.9999 from the first step, the linear 1000-step schedule (1e-4 .. 0.02), learned sigma with the
hybrid MSE + variational-bound loss, 1000 classes plus a null class (label 1000) that replaces a label with
probability 0.1 for classifier-free guidance; 400K steps (the paper's FID-50K 2.27 model trained 7M).
Matmuls run in bf16 with fp32 weights, Adam moments and EMA (the reference trains in fp32/TF32). Grids
sample 250 DDPM steps with the learned variance at guidance 4 (the reference's sample.py default; its FID
figures use 1.5).

Hardware. The default mesh is data parallelism over every device: the 675M fp32 weights, their gradients,
EMA and Adam moments (about 13.5 GB) fit on each chip of a v5p (95 GB) or H100 (80 GB), which also holds
the activations of 64 (v5p-8) or 32 (8 GPUs) images per step (not measured here). Where memory runs short,
split the weights FSDP-style with `--config.mesh.data=1 --config.mesh.fsdp=-1`, or add
`--config.model.remat=dots_no_batch`.

    # a TPU v5p-8 slice (4 chips, one host) or one host with 8 GPUs: the train command above as it is
    # a larger pod slice: the same command on every worker, the workdir and cache on shared storage
    gcloud compute tpus tpu-vm ssh my-v5p-64 --zone=us-east5-a --worker=all --command="cd ~/diffax && \
        python train.py --config=configs/dit_xl2_imagenet.py --workdir=/mnt/shared/runs/dit_xl2 \
        --config.data.path=/mnt/shared/imagenet256_sd_vae_ft_ema --config.train.peak_flops=459e12"

One train step at batch 256 is 1.83e14 FLOPs as XLA counts them (7.14e11 per image, 6x the paper's 118.6
GFLOPs forward multiply-adds; docs/training.md#recipes has the measurement). At an assumed 40% MFU a v5p-8
(4 x 459 TFLOP/s bf16) runs about 1,030 images/s (4.0 steps/s): 400K steps in 1.15 days, 7M in 20 days;
8 H100s (8 x 989 TFLOP/s dense bf16) about 4,430 images/s (17.3 steps/s): 400K steps in 6.4 hours, 7M in
4.7 days. `--config.train.peak_flops` (one device's peak) logs the MFU actually reached.
"""
import ml_collections

from diffax.train.config import base_config

VAE = "models/sd-vae-ft-ema"  # a diffusers AutoencoderKL folder the user supplies
CACHE = "data/imagenet256_sd_vae_ft_ema"


def get_config(stage: str = "train") -> ml_collections.ConfigDict:
    if stage not in ("train", "cache"):
        raise ValueError(f"configs/dit_xl2_imagenet.py: the argument must be 'train' or 'cache', got {stage!r}")
    c = base_config()
    if stage == "cache":
        c.data.source = "tfds"
        c.data.tfds_name = "imagenet2012"
        c.data.split = "train"
        c.data.image_size = 256
        c.data.channels = 3
        c.data.worker_count = 8
    else:
        c.data.source = "latent_cache"
        c.data.path = CACHE
        c.data.worker_count = 4
    c.cache.vae = VAE
    c.cache.out = CACHE
    c.cache.flip = True
    c.cache.dtype = "float16"
    c.cache.batch_size = 128
    c.model = ml_collections.ConfigDict(dict(
        name="DiTTransformer2DModel", preset="DiT-XL/2",  # 32x32x4 in, 8 out (learned sigma), 1000 classes
        dtype="bfloat16", param_dtype="float32"))
    c.diffusion.num_train_timesteps = 1000
    c.diffusion.beta_schedule = "linear"
    c.diffusion.beta_start = 0.0001
    c.diffusion.beta_end = 0.02
    c.diffusion.prediction_type = "epsilon"
    c.train.steps = 400_000
    c.train.batch_size = 256
    c.train.learning_rate = 1e-4
    c.train.lr_schedule = "constant"
    c.train.warmup_steps = 0
    c.train.weight_decay = 0.0
    c.train.grad_clip = 0.0
    c.train.ema_decay = 0.9999
    c.train.ema_warmup = False
    c.train.label_dropout = 0.1
    c.train.log_every = 100
    c.train.checkpoint_every = 50_000
    c.train.keep_checkpoints = 2
    c.train.sample_every = 50_000
    c.sample.sampler = "ddpm"  # with the learned variance, as the reference samples
    c.sample.steps = 250
    c.sample.guidance_scale = 4.0
    return c
