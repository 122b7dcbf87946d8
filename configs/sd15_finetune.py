"""Text-to-image fine-tuning of Stable Diffusion 1.5's UNet on your captioned images, at 512x512, as diffusers'
examples/text_to_image/train_text_to_image.py does it, in two stages:

    # 1. every image (center-cropped to 512, and its mirror) through SD 1.5's VAE, its caption through its
    #    CLIP text encoder, once: the text encoder stays frozen
    python -m diffax.data.cache --config=configs/sd15_finetune.py:cache \
        --config.data.path=data/my_images --config.cache.vae=models/stable-diffusion-v1-5 \
        --config.cache.text_encoder=models/stable-diffusion-v1-5 --config.cache.out=data/my_images_sd15
    # 2. the UNet, starting from the pipeline's weights, on the cached latents and caption embeddings
    python train.py --config=configs/sd15_finetune.py --workdir=runs/sd15_finetune \
        --config.train.init_from=models/stable-diffusion-v1-5 --config.data.path=data/my_images_sd15

The pipeline folder is a local diffusers StableDiffusionPipeline folder (model_index.json, unet/, vae/,
text_encoder/, tokenizer/, scheduler/), e.g. stable-diffusion-v1-5/stable-diffusion-v1-5 downloaded
beforehand; the cache takes its vae/, text_encoder/ and tokenizer/, training its unet/ (checked key by key
against the model block below, SD 1.5's UNet config). The images are a folder read as diffusers'
script reads one (docs/data.md): a `metadata.jsonl` with `file_name` and a `text` (or `caption`) column, or
a `.txt` caption beside each image.

Every 1000 steps WORKDIR/samples/ gets a grid of the EMA weights' samples for up to 10 of the cache's
captions (or `--config.sample.prompts`). The recipe is the diffusers example's: AdamW at a constant 1e-5 with weight decay 1e-2, gradient clipping
at 1, the EMA with diffusers' warm-up (decay up to 0.9999), SD's scaled-linear schedule (0.00085 .. 0.012)
with epsilon prediction, random flips, rematerialised blocks (its --gradient_checkpointing) and bf16
matmuls with fp32 weights, 15,000 steps; at global batch 32 instead of its one GPU's 4. Unlike the example
(whose default drops no captions), 10% of captions become the empty prompt, as in SD's own training, so
classifier-free guidance keeps working. `--config.diffusion.snr_gamma=5` turns on the example's min-SNR
weighting; `--config.train.finetune=lora` trains LoRA factors instead of every weight (docs/efficiency.md).
The 860M-parameter UNet's fp32 weights, gradients, EMA and Adam moments take about 14 GB: data parallelism
(the default mesh) fits on 80 GB devices; `--config.mesh.data=1 --config.mesh.fsdp=-1` splits them.
"""
import ml_collections

from diffax.train.config import base_config

PIPELINE = "models/stable-diffusion-v1-5"  # a diffusers StableDiffusionPipeline folder the user supplies
IMAGES = "data/my_images"
CACHE = "data/my_images_sd15"


def get_config(stage: str = "train") -> ml_collections.ConfigDict:
    if stage not in ("train", "cache"):
        raise ValueError(f"configs/sd15_finetune.py: the argument must be 'train' or 'cache', got {stage!r}")
    c = base_config()
    if stage == "cache":
        c.data.source = "folder"
        c.data.path = IMAGES
        c.data.image_size = 512
        c.data.channels = 3
        c.data.worker_count = 4
    else:
        c.data.source = "latent_cache"
        c.data.path = CACHE
        c.data.worker_count = 4
    c.cache.vae = PIPELINE
    c.cache.text_encoder = PIPELINE  # its tokenizer/ too
    c.cache.out = CACHE
    c.cache.flip = True
    c.cache.dtype = "float16"
    c.cache.batch_size = 32
    c.model = ml_collections.ConfigDict(dict(
        name="UNet2DConditionModel", sample_size=64, in_channels=4, out_channels=4,
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
        dtype="bfloat16", param_dtype="float32", remat="full"))
    c.diffusion.num_train_timesteps = 1000
    c.diffusion.beta_schedule = "scaled_linear"
    c.diffusion.beta_start = 0.00085
    c.diffusion.beta_end = 0.012
    c.diffusion.prediction_type = "epsilon"
    c.train.init_from = PIPELINE
    c.train.finetune = "full"
    c.train.steps = 15_000
    c.train.batch_size = 32
    c.train.learning_rate = 1e-5
    c.train.lr_schedule = "constant"
    c.train.warmup_steps = 0
    c.train.weight_decay = 1e-2
    c.train.grad_clip = 1.0
    c.train.ema_decay = 0.9999
    c.train.ema_warmup = True
    c.train.label_dropout = 0.1
    c.train.log_every = 50
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 2
    c.train.sample_every = 1000  # 10 samples of each of up to 10 of the cache's captions
    c.sample.sampler = "ddim"
    c.sample.steps = 50
    c.sample.guidance_scale = 7.5
    return c
