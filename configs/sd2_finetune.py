"""Text-to-image fine-tuning of Stable Diffusion 2.x's UNet on your captioned images: configs/sd15_finetune.py's
recipe (diffusers' examples/text_to_image/train_text_to_image.py) with SD 2.1's UNet, its OpenCLIP-H text
encoder's 1024-wide embeddings and its v-prediction objective at 768x768, in the same two stages:

    # 1. every image (center-cropped to 768, and its mirror) through SD 2.1's VAE, its caption through its
    #    text encoder, once: the text encoder stays frozen
    python -m diffax.data.cache --config=configs/sd2_finetune.py:cache \
        --config.data.path=data/my_images --config.cache.vae=models/stable-diffusion-2-1 \
        --config.cache.text_encoder=models/stable-diffusion-2-1 --config.cache.out=data/my_images_sd2
    # 2. the UNet, starting from the pipeline's weights, on the cached latents and caption embeddings
    python train.py --config=configs/sd2_finetune.py --workdir=runs/sd2_finetune \
        --config.train.init_from=models/stable-diffusion-2-1 --config.data.path=data/my_images_sd2

The pipeline folder is a local diffusers StableDiffusionPipeline folder of stabilityai/stable-diffusion-2-1
(768x768, v-prediction). For stable-diffusion-2-1-base (512x512, epsilon prediction) add
`--config.model.sample_size=64 --config.diffusion.prediction_type=epsilon` to the training command and
`--config.data.image_size=512` to the cache command. Everything else (optimizer, EMA, caption dropout,
LoRA with `--config.train.finetune=lora`, a trained text encoder with `--config.train.text_encoder=full`,
memory) is SD 1.5's recipe: see configs/sd15_finetune.py and docs/training.md.
"""
import ml_collections

from configs.sd15_finetune import get_config as sd15_config

PIPELINE = "models/stable-diffusion-2-1"  # a diffusers StableDiffusionPipeline folder the user supplies
CACHE = "data/my_images_sd2"


def get_config(stage: str = "train") -> ml_collections.ConfigDict:
    if stage not in ("train", "cache"):
        raise ValueError(f"configs/sd2_finetune.py: the argument must be 'train' or 'cache', got {stage!r}")
    c = sd15_config(stage)
    if stage == "cache":
        c.data.image_size = 768
    else:
        c.data.path = CACHE
    c.cache.vae = c.cache.text_encoder = c.train.init_from = PIPELINE
    c.cache.out = CACHE
    # SD 2.1's unet/config.json: per-level head counts, linear projections in and out of the transformers.
    c.model = ml_collections.ConfigDict(dict(
        c.model.to_dict(), sample_size=96, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
        use_linear_projection=True))
    c.diffusion.prediction_type = "v_prediction"
    return c
