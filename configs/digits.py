"""Class-conditional U-Net on scikit-learn's 8x8 digits, upscaled to 16x16: the `make demo` recipe.

    python train.py --config=configs/digits.py --workdir=runs/digits
    python sample.py --workdir=runs/digits --num_samples=100 --guidance_scale=3 --out=runs/digits/samples.png

Sized to train in about 2 minutes on a 2-core CPU (800 steps of 64 images, 0.15-0.25 s a step as `make demo`
runs it). Every value can be overridden from the command line, e.g. `--config.train.steps=200
--config.model.block_out_channels='(32, 64)'`.
"""
import ml_collections

from diffax.train.config import base_config


def get_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.data.source = "digits"
    c.data.image_size = 16
    c.data.channels = 1
    c.model = ml_collections.ConfigDict(dict(
        name="UNet2DModel", sample_size=16, in_channels=1, out_channels=1,
        block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=16, norm_num_groups=8, num_class_embeds=11,  # 10 digits + the null class
        dtype="float32"))
    c.diffusion.beta_schedule = "squaredcos_cap_v2"
    c.diffusion.prediction_type = "epsilon"
    c.diffusion.snr_gamma = 5.0
    c.train.steps = 800
    c.train.batch_size = 64
    c.train.learning_rate = 2e-3
    c.train.warmup_steps = 100
    c.train.ema_decay = 0.995
    c.train.label_dropout = 0.1
    c.train.log_every = 100
    c.train.checkpoint_every = 200
    c.train.sample_every = 0  # sample.py writes the grid at the end; set e.g. 200 for grids while training
    c.sample.sampler = "ddim"
    c.sample.steps = 25
    c.sample.guidance_scale = 3.0
    return c
