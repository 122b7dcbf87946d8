"""Stage 1 of the latent-diffusion digits recipe (`make demo-ldm`): a small AutoencoderKL on the digits.

    python train.py --config=configs/ldm_digits_vae.py --workdir=runs/ldm_digits/vae

16x16 RGB digits (the gray value repeated) <-> 8x8x4 latents, trained with L1 reconstruction plus a small KL
term (diffax/train/autoencoder.py). The run ends by writing the EMA weights as a diffusers AutoencoderKL
folder, runs/ldm_digits/vae/export, with `scaling_factor` = 1 / std of the digits' latents. Stage 2 is
configs/ldm_digits.py.

600 steps of 64 images, about 270 CPU-seconds (0.36 s a step plus ~1 minute of start-up, compilation and the
export); it reaches an L1 reconstruction error of 0.015 on the [-1, 1] range, latent std 4.4.
"""
import ml_collections

from diffax.train.config import base_config


def get_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.data.source = "digits"
    c.data.image_size = 16
    c.data.channels = 3
    c.model = ml_collections.ConfigDict(dict(
        name="AutoencoderKL", in_channels=3, out_channels=3, latent_channels=4, sample_size=16,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, dtype="float32"))
    c.autoencoder.reconstruction = "l1"
    c.autoencoder.kl_weight = 1e-5
    c.train.steps = 600
    c.train.batch_size = 64
    c.train.learning_rate = 2e-3
    c.train.warmup_steps = 50
    c.train.ema_decay = 0.99
    c.train.log_every = 100
    c.train.checkpoint_every = 300
    c.train.sample_every = 0
    return c
