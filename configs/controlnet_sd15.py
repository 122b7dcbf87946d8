"""A ControlNet for Stable Diffusion 1.5, trained on your (image, conditioning image, caption) triples at 512x512
as diffusers' examples/controlnet/train_controlnet.py trains one, in two stages:

    # 1. every image (center-cropped to 512) through SD 1.5's VAE, its caption through its CLIP text encoder,
    #    and its conditioning image (cropped the same way) stored beside them, once
    python -m diffax.data.cache --config=configs/controlnet_sd15.py:cache \
        --config.data.path=data/my_pairs --config.cache.vae=models/stable-diffusion-v1-5 \
        --config.cache.text_encoder=models/stable-diffusion-v1-5 --config.cache.out=data/my_pairs_sd15
    # 2. the ControlNet, made from the pipeline's UNet (diffusers' ControlNetModel.from_unet), the UNet frozen
    python train.py --config=configs/controlnet_sd15.py --workdir=runs/controlnet_sd15 \
        --config.train.init_from=models/stable-diffusion-v1-5 --config.data.path=data/my_pairs_sd15
    # the result, a diffusers ControlNetModel folder: runs/controlnet_sd15/export/controlnet

The pipeline folder is a local diffusers StableDiffusionPipeline folder (model_index.json, unet/, vae/,
text_encoder/, tokenizer/, scheduler/) downloaded beforehand. The data is a folder read as the example reads
one (docs/data.md): a `metadata.jsonl` with `file_name` (the target image), `conditioning_image` (its
conditioning image's file, e.g. an edge map made with diffax.pipelines.canny) and `text` (the caption):

    {"file_name": "images/0001.png", "conditioning_image": "conditioning/0001.png", "text": "a red circle"}

`--config.train.controlnet_from=FOLDER` continues training an existing ControlNet (the example's
--controlnet_model_name_or_path) instead of starting from the UNet.

The recipe is the example's: AdamW at a constant 1e-5 (its README's rate) with weight decay 1e-2, no warm-up,
gradient clipping at 1, no EMA (train.ema_decay=0: the exported weights are the trained ones), no flips, no
caption dropout (its --proportion_empty_prompts=0; the ControlNet paper replaced 50% of the prompts by the
empty one: --config.train.label_dropout=0.5), SD's scaled-linear schedule with epsilon prediction, bf16
matmuls with fp32 weights and the UNet's blocks rematerialised; at global batch 32 (the example's 4 per
GPU on 8 devices) for 5,000 steps, three epochs of 50,000 pairs (the example's fill50k runs one epoch at
its one GPU's batch of 4: set train.steps for your data). The ControlNet's 361M parameters train (fp32
weights, their EMA copy, gradients and Adam moments: about 7 GB); the 860M-parameter UNet is held frozen in fp32 beside
them, with no optimizer state (3.4 GB). The UNet's `remat` policy applies to the ControlNet's blocks too.
"""
import ml_collections

from diffax.train.config import base_config

PIPELINE = "models/stable-diffusion-v1-5"  # a diffusers StableDiffusionPipeline folder the user supplies
PAIRS = "data/my_pairs"
CACHE = "data/my_pairs_sd15"


def get_config(stage: str = "train") -> ml_collections.ConfigDict:
    if stage not in ("train", "cache"):
        raise ValueError(f"configs/controlnet_sd15.py: the argument must be 'train' or 'cache', got {stage!r}")
    c = base_config()
    if stage == "cache":
        c.data.source = "folder"
        c.data.path = PAIRS
        c.data.image_size = 512
        c.data.channels = 3
        c.data.caption_column = "text"
        c.data.conditioning_column = "conditioning_image"
        c.data.worker_count = 4
    else:
        c.data.source = "latent_cache"
        c.data.path = CACHE
        c.data.worker_count = 4
    c.cache.vae = PIPELINE
    c.cache.text_encoder = PIPELINE  # its tokenizer/ too
    c.cache.out = CACHE
    c.cache.flip = False  # the example does not flip: a mirrored edge map would still fit, a pose's left/right not
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
    c.train.finetune = "controlnet"
    c.train.controlnet_embedding_channels = (16, 32, 96, 256)  # images 8x the latents: SD's VAE factor
    c.train.steps = 5_000
    c.train.batch_size = 32
    c.train.learning_rate = 1e-5
    c.train.lr_schedule = "constant"
    c.train.warmup_steps = 0
    c.train.weight_decay = 1e-2
    c.train.grad_clip = 1.0
    c.train.ema_decay = 0.0
    c.train.label_dropout = 0.0
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 2
    # The example's validation images: every 500 steps WORKDIR/samples/step_*.png, a row per the first four
    # cached examples (the conditioning image, then 9 samples of its caption), UniPC, 20 steps, guidance 7.5.
    c.train.sample_every = 500
    c.sample.sampler = "unipc"
    c.sample.steps = 20
    c.sample.guidance_scale = 7.5
    return c
