"""The run config's shape: every key a recipe may set, its default and its type, and the checks.

Recipes (configs/*.py) start from `base_config()` and override; `validate_config` rejects a key that is
not here (a typo would otherwise be silently ignored), a value of the wrong type and a value no run can use
(`RANGES`), naming the key.
The `model` block is family-specific and checked by `diffax.models.build_model`.
"""
from __future__ import annotations

import ml_collections

from diffax import parallel

SAMPLERS_HINT = "see docs/samplers.md"


def base_config() -> ml_collections.ConfigDict:
    """Defaults for every block but `model`."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = ml_collections.ConfigDict(dict(
        source="digits", image_size=16, channels=1, worker_count=0,
        tfds_name="", split="train", image_key="image", label_key="label", tfds_data_dir="", path="",
        # A resumed run refuses a latent cache whose manifest fingerprint differs from the one the run started
        # on (recorded in WORKDIR/data_cache.json); True trains on with the new one.
        allow_cache_change=False,
        # Captions (docs/data.md): digits yield caption_template.format(number word) when set, e.g.
        # "a handwritten {}"; folders read a .txt beside each image or metadata.jsonl's caption_column
        # ('': 'text', else 'caption').
        caption_template="", caption_column="",
        caption_key="",  # tfds: a Text feature (or a sequence of them: the first), nested as 'captions/text'
        # A folder's metadata.jsonl column naming each image's ControlNet conditioning image (a file name
        # relative to the folder, e.g. 'conditioning_image'); '': none. The latent cache stores them.
        conditioning_column="",
        classes=()))  # only the records of these labels, e.g. (0, 1, 2, 3, 4); (): all
    c.model = ml_collections.ConfigDict()
    c.diffusion = ml_collections.ConfigDict(dict(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
        prediction_type="epsilon", rescale_betas_zero_snr=False,
        snr_gamma=0.0))  # 0: plain MSE; >0: min-SNR-gamma weighting
    c.train = ml_collections.ConfigDict(dict(
        steps=1000, batch_size=64, learning_rate=1e-3, lr_schedule="cosine", warmup_steps=100,
        weight_decay=0.0, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8, grad_clip=1.0, grad_accum_steps=1,
        ema_decay=0.999, ema_warmup=True, label_dropout=0.1,
        # 'full' / 'lora' (with the same train.finetune): init_from's text encoder trains with the U-Net on the
        # latent cache's token ids (diffax.train.text_encoder); 'frozen': the cache's embeddings as they are.
        text_encoder="frozen",
        log_every=50, checkpoint_every=500, keep_checkpoints=3, sample_every=0,
        keep_every=0,  # also keep every checkpoint whose step is a multiple of this for good; 0: none
        # Updates skipped for a non-finite loss or gradient (the step keeps the old state) that the run
        # survives, counted over the whole run; one more stops it. 0: stop at the first.
        max_nonfinite_skips=10,
        # Peak FLOP/s of one device (e.g. 989e12: an H100's dense bf16) for the logged model FLOP
        # utilisation, mfu; 0: not logged.
        peak_flops=0.0,
        eval_every=0,  # steps between evaluations (the eval block); 0: none
        prior_loss_weight=1.0,  # data.source='dreambooth': the class (prior-preservation) loss's weight
        # Fine-tuning (diffax.train.finetune, docs/efficiency.md): start from init_from (a training workdir or a
        # diffusers folder) and train every weight ('full'), LoRA factors ('lora') or the quantization scales
        # of a frozen int8 / int4 base per timestep group ('tuneqdm'); 'controlnet' trains a ControlNet on the
        # frozen U-Net of init_from (diffax.train.controlnet): made from the U-Net, with
        # controlnet_embedding_channels (its conditioning_embedding_out_channels: 2^(n-1) = the VAE's factor),
        # or read from controlnet_from (a diffusers ControlNetModel folder).
        finetune="full", init_from="",
        controlnet_from="", controlnet_embedding_channels=(16, 32, 96, 256),
        lora=ml_collections.ConfigDict(dict(
            rank=4, alpha=4.0,
            targets="attention")),  # 'attention' (to_q/k/v/out), 'all' (every Dense / Conv) or a regex over kernel paths
        tuneqdm=ml_collections.ConfigDict(dict(
            bits=8, group_size=0,  # 0: one scale per output channel
            groups=4,  # timestep groups, each with its own scale set
            per_channel=True,  # False: one factor per tensor and group
            include="", exclude=""))))  # comma-separated regexes over kernel paths choosing the tuned layers
    # DreamBooth (diffax.train.dreambooth, docs/training.md): the subject's images in instance_data captioned
    # instance_prompt, and num_class_images of its class captioned class_prompt in class_data (generated there
    # by the init_from pipeline, sample_batch_size per call, when fewer). Trained with data.source='dreambooth'
    # on the two caches, each step's loss being the instance loss + train.prior_loss_weight x the class loss.
    c.dreambooth = ml_collections.ConfigDict(dict(
        instance_data="", instance_prompt="", class_data="", class_prompt="", num_class_images=100,
        sample_batch_size=4))
    # prompts: the grid's fixed prompts for a text-conditioned model trained from a latent cache (empty: up
    # to 10 of the cache's own captions). conditioning_images: a ControlNet run's validation images (files),
    # one per prompt (empty: the first cached examples' own; diffax/train/controlnet.py).
    c.sample = ml_collections.ConfigDict(dict(sampler="ddim", steps=50, guidance_scale=3.0, prompts=(),
                                              conditioning_images=()))
    # What train.eval_every logs (diffax/train/evaluate.py): kind '' (none), 'digits_accuracy' or
    # 'digits_fid', over num_samples images sampled as for the grids.
    c.eval = ml_collections.ConfigDict(dict(kind="", num_samples=200))
    # `python -m diffax.data.cache` (docs/data.md): data's images through a VAE (an AutoencoderKL folder or a
    # diffusers pipeline folder with vae/) and captions through a CLIP text encoder ('': labels only) into
    # ArrayRecord shards under `out`; `crops` crops of side crop_size (0: the whole image) per image, the
    # first centered, each also flipped with `flip`. SDXL (diffax/data/sdxl_cache.py): text_encoder_2 /
    # tokenizer_2 name the second text encoder (found in an SDXL pipeline folder given as text_encoder), and the
    # cache also stores each crop's micro-conditioning time ids.
    c.cache = ml_collections.ConfigDict(dict(
        vae="", text_encoder="", tokenizer="", text_encoder_2="", tokenizer_2="", out="", crops=1, crop_size=0,
        flip=False, batch_size=32, dtype="float32", records_per_shard=1024, seed=0))
    # An AutoencoderKL's objective (diffax/train/autoencoder.py): the 'l1' or 'mse' reconstruction error plus
    # kl_weight x the posterior's KL to N(0, I) per pixel.
    c.autoencoder = ml_collections.ConfigDict(dict(reconstruction="l1", kl_weight=1e-6))
    # Axis sizes within a slice (ici; -1: all remaining devices), across slices or hosts (dcn_*: the axis
    # size is ici x dcn) and the logical-axis rules, (logical name, mesh axes) pairs that lay out parameters
    # and activations (docs/training.md): FSDP and tensor parallelism are set here.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1,
                                            rules=parallel.DEFAULT_RULES))
    return c


def _check(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict, prefix: str) -> None:
    for key in config.keys():
        name = f"{prefix}{key}"
        if key not in reference:
            raise ValueError(f"unknown config key {name!r}; known keys here: {sorted(reference.keys())}")
        value, want = config[key], reference[key]
        if isinstance(want, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                raise ValueError(f"config key {name!r} must be a block of keys, got {value!r}")
            if key != "model":
                _check(value, want, name + ".")
        elif isinstance(want, tuple):  # the rule table: checked by parse_rules in validate_config
            continue
        elif isinstance(want, bool) != isinstance(value, bool) or (
                isinstance(want, (int, float)) and not isinstance(value, (int, float))) or (
                isinstance(want, int) and not isinstance(want, bool) and isinstance(value, float)) or (
                isinstance(want, str) and not isinstance(value, str)):
            raise ValueError(f"config key {name!r} must be {type(want).__name__}, got {value!r} "
                             f"({type(value).__name__})")


# Beta schedules whose tables are built from diffusion.beta_start / beta_end (diffax.schedules.make_betas).
BETA_RANGE_SCHEDULES = ("linear", "scaled_linear", "sigmoid")

# (key, allowed values in words, test): values a run cannot use, refused before anything is built. The tests
# are written so that NaN fails them.
RANGES = (
    ("data.image_size", ">= 1", lambda v: v >= 1),
    ("data.channels", "1 or 3", lambda v: v in (1, 3)),  # what every data source converts to
    ("data.worker_count", ">= 0", lambda v: v >= 0),
    ("diffusion.num_train_timesteps", ">= 2", lambda v: v >= 2),
    ("diffusion.snr_gamma", ">= 0 (0: plain MSE)", lambda v: v >= 0),
    ("train.steps", ">= 1", lambda v: v >= 1),
    ("train.batch_size", ">= 1", lambda v: v >= 1),
    ("train.learning_rate", "> 0", lambda v: v > 0),
    ("train.warmup_steps", ">= 0", lambda v: v >= 0),
    ("train.weight_decay", ">= 0", lambda v: v >= 0),
    ("train.adam_b1", "in [0, 1)", lambda v: 0 <= v < 1),
    ("train.adam_b2", "in [0, 1)", lambda v: 0 <= v < 1),
    ("train.adam_eps", "> 0", lambda v: v > 0),
    ("train.grad_clip", ">= 0 (0: no clipping)", lambda v: v >= 0),
    ("train.grad_accum_steps", ">= 1", lambda v: v >= 1),
    ("train.ema_decay", "in [0, 1]", lambda v: 0 <= v <= 1),
    ("train.label_dropout", "in [0, 1]", lambda v: 0 <= v <= 1),
    ("train.log_every", ">= 1", lambda v: v >= 1),
    ("train.checkpoint_every", ">= 1", lambda v: v >= 1),
    # 0 would let Orbax delete every checkpoint, those of the run being resumed included.
    ("train.keep_checkpoints", ">= 1", lambda v: v >= 1),
    ("train.sample_every", ">= 0 (0: no grids while training)", lambda v: v >= 0),
    ("train.keep_every", ">= 0 (0: keep only the last keep_checkpoints)", lambda v: v >= 0),
    ("train.max_nonfinite_skips", ">= 0 (0: stop at the first non-finite step)", lambda v: v >= 0),
    ("train.text_encoder", "'frozen', 'full' or 'lora'", lambda v: v in ("frozen", "full", "lora")),
    ("mesh.dcn_data", ">= 1", lambda v: v >= 1),
    ("mesh.dcn_fsdp", ">= 1", lambda v: v >= 1),
    ("mesh.dcn_tensor", ">= 1", lambda v: v >= 1),
    ("train.peak_flops", ">= 0 (0: no mfu)", lambda v: v >= 0),
    ("sample.steps", ">= 1", lambda v: v >= 1),
    ("train.eval_every", ">= 0 (0: no evaluation)", lambda v: v >= 0),
    ("train.prior_loss_weight", ">= 0", lambda v: v >= 0),
    ("dreambooth.num_class_images", ">= 1", lambda v: v >= 1),
    ("dreambooth.sample_batch_size", ">= 1", lambda v: v >= 1),
    ("eval.num_samples", ">= 1", lambda v: v >= 1),
    ("cache.crops", ">= 1", lambda v: v >= 1),
    ("cache.crop_size", ">= 0 (0: the whole image)", lambda v: v >= 0),
    ("cache.batch_size", ">= 1", lambda v: v >= 1),
    ("cache.dtype", "'float32' or 'float16'", lambda v: v in ("float32", "float16")),
    ("cache.records_per_shard", ">= 1", lambda v: v >= 1),
    ("autoencoder.reconstruction", "'l1' or 'mse'", lambda v: v in ("l1", "mse")),
    ("autoencoder.kl_weight", ">= 0", lambda v: v >= 0),
)


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the first unknown key, wrongly typed value or value out of its range."""
    _check(config, base_config(), "")
    if "name" not in config.model:
        raise ValueError("config key 'model.name' is required (a diffusers class name such as 'UNet2DModel' or "
                         "'DiTTransformer2DModel', or its alias 'unet2d' / 'dit')")
    parallel.parse_rules(config.mesh.rules)
    for name, allowed, ok in RANGES:
        block, key = name.split(".")
        value = config.get(block, {}).get(key)
        if value is not None and not ok(value):
            raise ValueError(f"config key {name!r} must be {allowed}, got {value!r}")
    d = config.diffusion
    if d.beta_schedule in BETA_RANGE_SCHEDULES and not 0 < d.beta_start < d.beta_end < 1:
        raise ValueError(f"config keys 'diffusion.beta_start' and 'diffusion.beta_end' must satisfy "
                         f"0 < beta_start < beta_end < 1 for the {d.beta_schedule!r} schedule, got "
                         f"{d.beta_start!r} and {d.beta_end!r}")
