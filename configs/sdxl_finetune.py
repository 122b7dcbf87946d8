"""Text-to-image fine-tuning of Stable Diffusion XL's UNet on your captioned images, at 1024x1024 (128x128
latents), as diffusers' examples/text_to_image/train_text_to_image_sdxl.py does it, in two stages and an
export:

    # 1. every image (resized to a short side of 1024, center-cropped, and its mirror) through SDXL's VAE, its
    #    caption through both text encoders, and each crop's micro-conditioning ids, once
    python -m diffax.data.cache --config=configs/sdxl_finetune.py:cache \
        --config.data.path=data/my_images --config.cache.vae=models/sdxl-base \
        --config.cache.text_encoder=models/sdxl-base --config.cache.out=data/my_images_sdxl
    # 2. the UNet, starting from the pipeline's weights, FSDP over every device
    python train.py --config=configs/sdxl_finetune.py --workdir=runs/sdxl_finetune \
        --config.train.init_from=models/sdxl-base --config.data.path=data/my_images_sdxl
    # 3. the pipeline folder with the trained unet/ (diffusers' StableDiffusionXLPipeline loads it)
    python -m diffax.train.pipeline_export --workdir=runs/sdxl_finetune --out=exports/sdxl_finetune

The pipeline folder is a local diffusers StableDiffusionXLPipeline folder (model_index.json, unet/, vae/,
text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/), e.g.
stabilityai/stable-diffusion-xl-base-1.0 downloaded beforehand. Given as cache.text_encoder, its
model_index.json makes the cache take text_encoder_2/ and tokenizer_2/ too (or name them with
cache.text_encoder_2 / cache.tokenizer_2); `--config.cache.vae=models/sdxl-vae-fp16-fix` swaps the VAE, as
the example's --pretrained_vae_model_name_or_path (the cache runs the VAE in fp32 either way). The images are
a folder read as diffusers' script reads one (docs/data.md): a `metadata.jsonl` with `file_name` and a
`text` (or `caption`) column, or a `.txt` caption beside each image. The cache stores per record the
concatenated penultimate hidden states of both encoders [77, 2048], the second's pooled embedding [1280], and
per variant the time ids (original size, crop corner, target size 1024x1024) diffax/data/sdxl_cache.py
describes.

The recipe is the example's README command at the script's default 1024 resolution: AdamW at a constant
1e-6 (no warm-up), weight decay 1e-2, gradient clipping at 1, center crops and random flips, 20% of captions
dropped to the empty prompt (its --proportion_empty_prompts=0.2: the encoded "" for both encoders; the time
ids stay), SDXL's scaled-linear schedule (0.00085 .. 0.012) with epsilon prediction, rematerialised blocks
(its --gradient_checkpointing), bf16 matmuls with fp32 weights (its fp16 mixed precision), 10,000 steps, a
checkpoint every 1000; at global batch 32 instead of its 1 x 4 accumulated. The README runs without
--use_ema, hence `train.ema_decay=0`: the EMA weights that checkpoints, exports and sample.py read are then
the trained ones (`--config.train.ema_decay=0.9999` is the example's --use_ema). Grids are off by default
(`--config.train.sample_every=500` draws them from the cache's captions, encoded as stored; not while the
text encoders train): the exported folder samples at full quality. `--config.diffusion.snr_gamma=5`
turns on min-SNR weighting.

`--config.train.finetune=lora --config.train.learning_rate=1e-4` trains LoRA factors (rank 4 on the attention
projections) instead, as diffusers' train_text_to_image_lora_sdxl.py (its constant 1e-4); the run ends by
writing WORKDIR/export/pytorch_lora_weights.safetensors, which diffusers' `load_lora_weights` puts on the base
pipeline, and the export merges them into unet/.

Memory. The UNet has 2,567,463,684 parameters (10.3 GB in fp32). Full fine-tuning keeps the weights,
gradients, two Adam moments and the EMA (unused at ema_decay=0, still allocated) in fp32: 51.3 GB before
activations. The default mesh here is FSDP over every device (`mesh.data=1, mesh.fsdp=-1`): on 8 devices
6.4 GB of that per device. On one 80 GB device it fits only with a small per-step batch
(`--config.train.batch_size=4`, or `--config.train.grad_accum_steps` for a larger one); LoRA keeps the
frozen base (10.3 GB fp32) and small factors.
"""
import ml_collections

from diffax.train.config import base_config

PIPELINE = "models/sdxl-base"  # a diffusers StableDiffusionXLPipeline folder the user supplies
IMAGES = "data/my_images"
CACHE = "data/my_images_sdxl"
RESOLUTION = 1024


def get_config(stage: str = "train") -> ml_collections.ConfigDict:
    if stage not in ("train", "cache"):
        raise ValueError(f"configs/sdxl_finetune.py: the argument must be 'train' or 'cache', got {stage!r}")
    c = base_config()
    if stage == "cache":
        c.data.source = "folder"
        c.data.path = IMAGES
        c.data.image_size = RESOLUTION
        c.data.channels = 3
        c.data.worker_count = 4
    else:
        c.data.source = "latent_cache"
        c.data.path = CACHE
        c.data.worker_count = 4
    c.cache.vae = PIPELINE
    c.cache.text_encoder = PIPELINE  # an SDXL pipeline folder: text_encoder_2/, tokenizer/ and tokenizer_2/ too
    c.cache.out = CACHE
    c.cache.flip = True
    c.cache.dtype = "float16"
    c.cache.batch_size = 8  # the VAE encoder at 1024x1024
    c.model = ml_collections.ConfigDict(dict(
        name="UNet2DConditionModel", sample_size=RESOLUTION // 8, in_channels=4, out_channels=4,
        block_out_channels=(320, 640, 1280), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816, norm_num_groups=32,
        dtype="bfloat16", param_dtype="float32", remat="full"))
    c.diffusion.num_train_timesteps = 1000
    c.diffusion.beta_schedule = "scaled_linear"
    c.diffusion.beta_start = 0.00085
    c.diffusion.beta_end = 0.012
    c.diffusion.prediction_type = "epsilon"
    c.train.init_from = PIPELINE
    c.train.finetune = "full"
    c.train.steps = 10_000
    c.train.batch_size = 32
    c.train.learning_rate = 1e-6
    c.train.lr_schedule = "constant"
    c.train.warmup_steps = 0
    c.train.weight_decay = 1e-2
    c.train.grad_clip = 1.0
    c.train.ema_decay = 0.0  # the example's README trains without --use_ema
    c.train.label_dropout = 0.2
    c.train.log_every = 50
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 2
    c.train.sample_every = 0  # grids at 1024x1024 cost minutes each; turn them on with --config.train.sample_every
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.sample.sampler = "euler"
    c.sample.steps = 30
    c.sample.guidance_scale = 7.5
    return c
