"""Unconditional U-Net on the digits: the `configs/digits.py` recipe without the class table.

    python train.py --config=configs/digits_unconditional.py --workdir=runs/digits_uncond
    python sample.py --workdir=runs/digits_uncond --num_samples=100 --out=runs/digits_uncond/samples.png

The data's labels are ignored; sampling takes no labels and no guidance. Same size and time as the
class-conditional recipe.
"""
import ml_collections

from configs.digits import get_config as digits_config


def get_config() -> ml_collections.ConfigDict:
    c = digits_config()
    c.model.num_class_embeds = None  # no class input: the model sees only the noisy image and t
    c.train.label_dropout = 0.0      # nothing to drop
    c.sample.guidance_scale = 1.0    # 1: no guidance (an unconditional model has no null input to guide against)
    return c
