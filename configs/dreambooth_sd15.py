"""DreamBooth with prior preservation on Stable Diffusion 1.5's UNet at 512x512, as diffusers'
examples/dreambooth/train_dreambooth.py (full) and train_dreambooth_lora.py (LoRA) do it:

    # 1. 200 images of "a photo of dog" from the pipeline itself (those already in data/dog_class count), then
    #    the instance and class images through its VAE and CLIP text encoder (frozen), once
    python -m diffax.train.dreambooth --config=configs/dreambooth_sd15.py:prepare \
        --config.train.init_from=models/stable-diffusion-v1-5 --config.dreambooth.instance_data=data/dog
    # 2a. every UNet weight, 800 steps at 5e-6
    python train.py --config=configs/dreambooth_sd15.py --workdir=runs/dreambooth \
        --config.train.init_from=models/stable-diffusion-v1-5
    # 2b. or LoRA factors (rank 4 on the attention projections), 500 steps at 1e-4; the result is
    #     runs/dreambooth_lora/export/pytorch_lora_weights.safetensors, for diffusers' load_lora_weights
    python train.py --config=configs/dreambooth_sd15.py:lora --workdir=runs/dreambooth_lora \
        --config.train.init_from=models/stable-diffusion-v1-5

`python -m diffax.train.dreambooth ... --stage=class_images` (or `--stage=cache`) runs one half of step 1.
The pipeline folder is a local diffusers StableDiffusionPipeline folder (stable-diffusion-v1-5 downloaded
beforehand); the instance folder holds the subject's few images (diffusers' example: 5 photos of one dog),
all captioned "a photo of sks dog"; the class images land in data/dog_class as `{k}-{sha1}.jpg`.

The recipe is the examples' (their READMEs' commands): batch 1 (each step trains one instance and one class
image, so 2 rows), AdamW with weight decay 1e-2, a constant learning rate without warm-up (5e-6 full, 1e-4
LoRA), gradient clipping at 1, prior_loss_weight 1, 200 class images drawn with the pipeline's scheduler at
50 steps and guidance 7.5, centered 512-pixel crops without flips, no caption dropout, no EMA (train.ema_decay
0: the exported weights are the trained ones), the text encoder frozen. bf16 matmuls over fp32 weights and
rematerialised blocks (the examples' --mixed_precision and --gradient_checkpointing) as configs/sd15_finetune.py.
Full fine-tuning holds the 860M-parameter UNet's weights, gradients and Adam moments (about 14 GB); on several
devices raise train.batch_size to a multiple of the device count or split the weights with
`--config.mesh.data=1 --config.mesh.fsdp=-1`.
"""
import ml_collections

from configs.sd15_finetune import get_config as sd15_config
from diffax.train.config import base_config

PIPELINE = "models/stable-diffusion-v1-5"  # a diffusers StableDiffusionPipeline folder the user supplies
INSTANCE_IMAGES = "data/dog"
CLASS_IMAGES = "data/dog_class"
CACHE = "data/dog_dreambooth_sd15"


def get_config(stage: str = "full") -> ml_collections.ConfigDict:
    if stage not in ("full", "lora", "prepare"):
        raise ValueError(f"configs/dreambooth_sd15.py: the argument must be 'full', 'lora' or 'prepare', got "
                         f"{stage!r}")
    c = base_config()
    sd15 = sd15_config()
    c.model, c.diffusion = sd15.model, sd15.diffusion
    c.dreambooth.instance_data = INSTANCE_IMAGES
    c.dreambooth.instance_prompt = "a photo of sks dog"
    c.dreambooth.class_data = CLASS_IMAGES
    c.dreambooth.class_prompt = "a photo of dog"
    c.dreambooth.num_class_images = 200
    c.dreambooth.sample_batch_size = 4
    if stage == "prepare":  # data: how each folder's images are read (diffax.train.dreambooth.build_caches)
        c.data.source = "folder"
        c.data.image_size = 512
        c.data.channels = 3
    else:
        c.data.source = "dreambooth"
        c.data.path = CACHE
    c.cache.vae = PIPELINE
    c.cache.text_encoder = PIPELINE  # its tokenizer/ too
    c.cache.out = CACHE
    c.cache.dtype = "float16"
    c.cache.batch_size = 8
    c.train.init_from = PIPELINE
    c.train.finetune = "lora" if stage == "lora" else "full"
    c.train.lora.rank = 4
    c.train.lora.alpha = 4.0
    c.train.lora.targets = "attention"
    c.train.steps = 500 if stage == "lora" else 800
    c.train.batch_size = 1  # instance images per step; as many class images join them
    c.train.learning_rate = 1e-4 if stage == "lora" else 5e-6
    c.train.lr_schedule = "constant"
    c.train.warmup_steps = 0
    c.train.weight_decay = 1e-2
    c.train.grad_clip = 1.0
    c.train.ema_decay = 0.0
    c.train.label_dropout = 0.0
    c.train.prior_loss_weight = 1.0
    c.train.log_every = 50
    c.train.checkpoint_every = 200
    c.train.keep_checkpoints = 2
    c.sample.sampler = "ddim"  # grids (train.sample_every); class images use the pipeline's own scheduler
    c.sample.steps = 50
    c.sample.guidance_scale = 7.5
    return c
