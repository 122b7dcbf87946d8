"""The model-size study on the digits: five U-Net widths, one training budget, three samplers.

    JAX_PLATFORMS=cpu JAX_THREEFRY_PARTITIONABLE=0 python -m diffax.studies.scaling --config=configs/scaling_digits.py
    JAX_PLATFORMS=cpu python -m diffax.studies.scaling --config=configs/scaling_digits.py --quick   # smoke run
    python -m diffax.studies.scaling --config=configs/scaling_digits.py:large   # an accelerator's budget

Every width trains the `configs/digits.py` recipe (same data, learning rate, batch and number of images;
norm groups of 4 and attention heads of 8 channels, so that 4 channels is a valid width) with base
channels w, i.e. U-Net blocks of (w, 2w, 2w) channels, in its own workdir under `workdir`; a rerun skips
the widths that finished and the (sampler, steps) points already measured. Each trained model then
samples `num_samples` digits (classes in turn, guidance `guidance_scale`) with every sampler at every
step count, scored by FID on digit features and class accuracy, against the sampling cost: XLA's FLOPs
of one model evaluation times the evaluations per image (steps, x2 under guidance). The first command
gives docs/results/scaling_digits.json (JAX_THREEFRY_PARTITIONABLE=0 speeds up XLA:CPU's compilation of
the initialisers and fixes the random draws those numbers came from); it took about 45 minutes on a
shared 2-core CPU (load ~15). Every value can be overridden, e.g. `--config.images=51200
--config.widths='(8, 32)'`. `:large` is the same study at an accelerator's budget: seven widths up to 48
(2.6M parameters, 135x the smallest), 102,400 training images per width, 1000 samples per point and more
step counts.
"""
import ml_collections

from configs.digits import get_config as digits_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in (None, "large"):
        raise ValueError(f"configs/scaling_digits.py: unknown variant {arg!r}; use no suffix or ':large'")
    c = ml_collections.ConfigDict()
    c.recipe = digits_config()         # the recipe every width trains with (a train.py config)
    c.recipe.model.norm_num_groups = 4      # so that the narrowest width (4 channels) is valid
    c.recipe.model.attention_head_dim = 8   # heads of 8 channels at every width
    c.recipe.train.checkpoint_every = 50
    c.recipe.train.log_every = 50
    c.widths = (4, 8, 12, 16, 24)      # base channels: 19k .. 657k parameters (34x)
    c.channel_mults = (1, 2, 2)        # block_out_channels = w * mult, one per U-Net level
    c.images = 9_600                   # training images per width: train.steps = images / train.batch_size
    c.num_samples = 200                # digits per (model, sampler, steps) point, classes 0..9 in turn
    c.guidance_scale = 3.0             # classifier-free guidance: 2 model evaluations per step; 1: none
    c.seed = 0                         # the same noise and labels for every model
    # sampler name (diffax.schedulers.names) -> step counts and scheduler options. DPM-Solver++ needs
    # lambda_min_clipped on the cosine schedule (docs/samplers.md), and thresholding: DDPM and DDIM clip
    # x0 by default, and without a bound on x0 these briefly trained models' samples saturate.
    c.samplers = ml_collections.ConfigDict({
        "ddpm": ml_collections.ConfigDict(dict(steps=(10, 25), options={})),
        "ddim": ml_collections.ConfigDict(dict(steps=(5, 20), options={})),
        "dpm++2m": ml_collections.ConfigDict(dict(steps=(4, 10), options={"lambda_min_clipped": -5.1, "thresholding": True})),
    })
    c.workdir = "runs/scaling_digits"  # one workdir per width: WORKDIR/w8, WORKDIR/w16, ...
    c.results = "docs/results/scaling_digits.json"
    c.plot = "docs/images/scaling.png"
    c.extra_results = "docs/results/distill_digits.json"  # more points for the plot, if the file exists
    if arg == "large":
        c.widths = (4, 8, 12, 16, 24, 32, 48)
        c.images = 102_400
        c.num_samples = 1000
        c.samplers.ddpm.steps = (10, 25, 50)
        c.samplers.ddim.steps = (5, 10, 20)
        c.samplers["dpm++2m"].steps = (4, 8, 16)
        c.workdir = "runs/scaling_digits_large"
        c.results = "docs/results/scaling_digits_large.json"
        c.plot = "docs/images/scaling_large.png"
    return c
