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

from configs.sd15_finetune import get_config as sd15_config
from diffax.train.config import base_config

PAIRS = "data/my_pairs"
CACHE = "data/my_pairs_sd15"


def get_config(stage: str = "train") -> ml_collections.ConfigDict:
    if stage not in ("train", "cache"):
        raise ValueError(f"configs/controlnet_sd15.py: the argument must be 'train' or 'cache', got {stage!r}")
    c = sd15_config(stage)  # SD 1.5's model, schedule, cache and optimizer; what differs follows
    if stage == "cache":
        c.data.path = PAIRS
        c.data.caption_column = "text"
        c.data.conditioning_column = "conditioning_image"
    else:
        c.data.path = CACHE
    c.cache.out = CACHE
    c.cache.flip = False  # the example does not flip: a mirrored edge map would still fit, a pose's left/right not
    c.train.finetune = "controlnet"
    c.train.controlnet_embedding_channels = (16, 32, 96, 256)  # images 8x the latents: SD's VAE factor
    c.train.steps = 5_000
    c.train.ema_decay = 0.0
    c.train.ema_warmup = base_config().train.ema_warmup
    c.train.label_dropout = 0.0
    c.train.checkpoint_every = 500
    # The example's validation images: every 500 steps WORKDIR/samples/step_*.png, a row per the first four
    # cached examples (the conditioning image, then 9 samples of its caption), UniPC, 20 steps, guidance 7.5.
    c.train.sample_every = 500
    c.sample.sampler = "unipc"
    c.sample.steps = 20
    return c
