"""A small pixel-space DiT on scikit-learn's digits at 16x16: the DiT recipe at demo scale.

    python train.py --config=configs/dit_digits.py --workdir=runs/dit_digits
    python sample.py --workdir=runs/dit_digits --num_samples=100 --guidance_scale=3 --out=runs/dit_digits/samples.png

DiT-S-shaped but narrower and shallower (hidden 128, depth 4, 4 heads, patch 2: 64 tokens), with the reference's learned
variance (learn_sigma) and hybrid loss on the linear schedule. Any sampler works at sampling time; 'ddpm'
uses the learned variance (variance_type learned_range), the others use the eps channels.
"""
import ml_collections

from diffax.train.config import base_config


def get_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.data.source = "digits"
    c.data.image_size = 16
    c.data.channels = 1
    c.model = ml_collections.ConfigDict(dict(
        name="dit", input_size=16, patch_size=2, in_channels=1, hidden_size=128, depth=4, num_heads=4,
        mlp_ratio=4.0, num_classes=10, class_dropout_prob=0.1, learn_sigma=True, dtype="float32"))
    c.diffusion.beta_schedule = "linear"  # the DiT / ADM schedule: 1e-4 .. 0.02 over 1000 steps
    c.diffusion.prediction_type = "epsilon"
    c.train.steps = 1200
    c.train.batch_size = 64
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 100
    c.train.ema_decay = 0.995
    c.train.label_dropout = 0.1
    c.train.log_every = 100
    c.train.checkpoint_every = 300
    c.train.sample_every = 600
    c.sample.sampler = "ddim"
    c.sample.steps = 25
    c.sample.guidance_scale = 3.0
    return c
