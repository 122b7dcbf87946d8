"""Sample a trained model (class-conditional or unconditional) into a PNG grid or an .npz file, or run a
diffusers pipeline folder (text-to-image, img2img, inpainting, ControlNet, SDXL + refiner, LoRA).

    python sample.py --model=sd-folder --prompt="a photo of a cat" --num_images=4 --steps=25 --out=cats/

    python sample.py --workdir=runs/digits --num_samples=100 --guidance_scale=3 --out=runs/digits/samples.png
    python sample.py --workdir=runs/digits --labels=3,3,7 --sampler=dpm++2m --steps=20 \
        --sampler_options=lambda_min_clipped=-5.1 --out=three.npz   # cosine-schedule model: docs/samplers.md
    python sample.py --workdir=runs/digits --out=grid.png,grid.npz      # the same samples, both forms
    python sample.py --workdir=runs/digits --quantize=int8 --out=int8.png  # int8 weights (diffax.quant)

    python sample.py --checkpoint=DiT-XL-2-256x256.pt --labels=207,360 --sampler=ddpm --steps=250 \
        --guidance_scale=4 --reference_guidance --out=latents.npz

--model writes one PNG per image, named by its seed (image k uses seed + k), with the call's arguments in
the PNG's `parameters` text chunk; docs/pipelines.md lists every pipeline's command. Otherwise sample.py
restores the EMA weights of the latest checkpoint (or --step) of a training workdir, or loads a converted
DiT checkpoint (--checkpoint: a reference .pt/.safetensors file or a diffusers folder; DiT's linear
schedule). A model whose images are not 1- or 3-channel (latent DiTs) writes `latents` float32 to .npz;
decoding them needs the VAE. With no --labels, labels cycle through the
classes. `.png` writes a grid with one row per label; `.npz` writes `images`
[N, H, W, C] uint8 and `labels` [N] int64. An unconditional model takes no --labels (and no guidance): `.png`
is a grid of 10 columns and `.npz` holds `images` only.

Compiled programs are kept in XLA's persistent cache (~/.cache/diffax/xla, or JAX_COMPILATION_CACHE_DIR), so
a second run with the same shapes skips XLA's compiler; DIFFAX_XLA_CACHE=0 turns that off.
"""
import sys
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax.traverse_util import flatten_dict
from tqdm import tqdm

from diffax import compilation, parallel
from diffax.cli import run_reporting_errors
from diffax.image_io import save_grid, save_npz
from diffax import convert
from diffax.models import abstract_params, build_model
from diffax.pipelines.generation import GenerationPipeline
from diffax.schedulers.names import parse_options, scheduler_for
from diffax.train.checkpoint import restore_for_sampling

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training workdir (holds checkpoints/).")
flags.DEFINE_string("checkpoint", None, "Instead of --workdir: a DiT checkpoint (reference file or diffusers folder).")
flags.DEFINE_bool("reference_guidance", False, "Guide only the first 3 of 4 latent channels, as the DiT reference.")
flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.")
flags.DEFINE_integer("num_samples", 100, "How many images.")
flags.DEFINE_integer("batch_size", 64, "Images sampled at once (one compiled program per batch size); image k "
                     "is the same whatever the batch size (for deterministic samplers).")
flags.DEFINE_list("labels", None, "Class labels, e.g. 0,1,2; default cycles 0..num_classes-1.")
flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance scale; default the config's sample block.")
flags.DEFINE_string("sampler", None, "Sampler name (docs/samplers.md); default the config's.")
flags.DEFINE_integer("steps", None, "Inference steps; default the config's.")
flags.DEFINE_list("sampler_options", [], "Sampler config fields as key=value,key=value (values without "
                  "commas), e.g. lambda_min_clipped=-5.1.")
flags.DEFINE_integer("seed", 0, "PRNG seed.")
flags.DEFINE_list("out", None, "Output file(s): .png (grid) and/or .npz (arrays), comma-separated; with --model "
                  "a directory for one PNG per image.")
flags.mark_flags_as_required(["out"])
# Pipelines (diffusers pipeline folders, single files, hub ids): diffax/pipelines/command.py, docs/pipelines.md.
flags.DEFINE_string("model", None, "Instead of --workdir: a diffusers pipeline folder, single-file checkpoint or "
                    "hub id.")
flags.DEFINE_string("prompt", None, "Text prompt (--model).")
flags.DEFINE_string("negative_prompt", None, "Negative prompt (--model).")
flags.DEFINE_string("image", None, "Init image file: img2img, or inpainting with --mask.")
flags.DEFINE_string("mask", None, "Inpainting mask file (white repaints).")
flags.DEFINE_float("strength", None, "img2img / inpainting strength in (0, 1].")
flags.DEFINE_string("control_image", None, "ControlNet conditioning image file.")
flags.DEFINE_bool("canny", False, "Run the built-in Canny edge detector on --control_image first.")
flags.DEFINE_multi_string("controlnet", [], "ControlNet folder; repeat for several.")
flags.DEFINE_float("controlnet_scale", 1.0, "controlnet_conditioning_scale.")
flags.DEFINE_string("refiner", None, "SDXL refiner folder: takes over after --high_noise_frac of the schedule.")
flags.DEFINE_float("high_noise_frac", 0.8, "Base -> refiner hand-off (denoising_end / denoising_start).")
flags.DEFINE_multi_string("lora", [], "LoRA file, optionally PATH:SCALE; repeat for several.")
flags.DEFINE_integer("height", None, "Image height (--model); default the model's.")
flags.DEFINE_integer("width", None, "Image width (--model); default the model's.")
flags.DEFINE_integer("num_images", 1, "Images to generate (--model); image k uses seed + k.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Compute dtype (--model).")
flags.DEFINE_bool("safety_checker", True, "Run the folder's safety checker (--model).")
flags.DEFINE_string("attention_backend", "auto", "auto, xla, cudnn, chunked or splash (--model).")
flags.DEFINE_enum("quantize", None, ["int8", "int4"], "Weight-only quantization (diffax.quant) of the model (with "
                  "--model: the denoiser, ControlNets and text encoders) before sampling.")
flags.DEFINE_integer("quantize_group_size", None, "With --quantize: the most input rows one scale covers; default "
                     "one scale per output channel.")


def load(workdir: str | None, checkpoint: str | None):
    """(model, params, diffusion schedule, sample defaults, where, param view) from a workdir or a DiT
    checkpoint. A LoRA run's workdir gives the merged weights; a TuneQDM run's gives (quantized base, scales)
    and the view that applies the scale set of each call's timestep group (diffax.train.finetune)."""
    if (workdir is None) == (checkpoint is None):
        raise ValueError("give exactly one of --workdir, --checkpoint and --model")
    if workdir is not None:
        config, params, step = restore_for_sampling(workdir, FLAGS.step)
        model = build_model(config.model)
        view = None
        if config.train.get("finetune", "full") == "full":
            check_params_match(params, model.config, f"{workdir} step {step}")
        else:
            from diffax.train import finetune
            params, view = finetune.sampling_params(config, params, model, workdir)
        return model, params, config.diffusion, config.sample, f"step {step}", view
    model, params = convert.load(checkpoint)
    schedule = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                    prediction_type="epsilon")  # what every DiT checkpoint was trained with
    defaults = ml_collections.ConfigDict(dict(sampler="ddpm", steps=250, guidance_scale=4.0))
    return model, params, schedule, defaults, checkpoint, None


def check_params_match(params: Any, model_config: Any, where: str) -> None:
    """ValueError naming the first keys whose shapes differ between `params` and the parameters that
    `model_config` builds (`diffax.models.abstract_params`): a checkpoint whose config was edited, or whose
    weights come from another model, fails here in one line instead of deep inside Flax."""
    want = flatten_dict(abstract_params(model_config), sep="/")
    have = flatten_dict(params, sep="/")
    differ = ([f"{k} missing" for k in want if k not in have] + [f"{k} unexpected" for k in have if k not in want]
              + [f"{k} {tuple(np.shape(have[k]))} vs {tuple(want[k].shape)}"
                 for k in want if k in have and tuple(np.shape(have[k])) != tuple(want[k].shape)])
    if differ:
        raise ValueError(f"{where}: the weights do not match the model of the saved config ({len(differ)} keys "
                         f"differ, weights vs config: {'; '.join(differ[:3])}{'; ...' if len(differ) > 3 else ''})")


def quantize_for_sampling(params: Any, mode: str, group_size: int | None) -> Any:
    """`params` with every Dense / Conv kernel quantized (`diffax.quant.quantize_params`), as the model's
    layers run them; prints the parameter bytes before and after."""
    from diffax.quant import device_bytes, mode_bits, quantize_params
    qp = quantize_params(params, mode_bits(mode, "--quantize"), group_size)
    if jax.process_index() == 0:
        print(f"quantized {len(qp.shapes)} kernels to {mode}: parameters {device_bytes(params) / 2**20:.2f} -> "
              f"{device_bytes(qp.params) / 2**20:.2f} MiB")
    return qp.params


def sample_in_batches(pipe, params, key: jax.Array, labels: np.ndarray | None, num_samples: int,
                      batch_size: int, **options) -> tuple[np.ndarray, float, float]:
    """(images [N, ...], compile seconds, sampling seconds): `pipe` called on `batch_size` images at a time
    (the last batch may be smaller), with a progress bar on a terminal. Image k is sample number k of `key`
    whatever the batch size (for deterministic samplers)."""
    if batch_size < 1:
        raise ValueError(f"--batch_size must be positive, got {batch_size}")
    n = len(labels) if labels is not None else num_samples
    start_time, chunks = time.perf_counter(), []
    with compilation.compile_seconds() as seconds:
        starts = range(0, n, batch_size)
        for start in tqdm(starts, desc="sample", unit="batch", dynamic_ncols=True,
                          disable=not sys.stderr.isatty() or jax.process_index() != 0):
            stop = min(start + batch_size, n)
            chunks.append(pipe(params, key, num_samples=stop - start, first_index=start,
                               labels=None if labels is None else labels[start:stop], **options))
    total = time.perf_counter() - start_time
    # Lowering and XLA's compile: the part of the first batch that is not sampling (traces nest, so not them).
    compile_seconds = seconds["lower"] + seconds["compile"]
    return np.concatenate(chunks), compile_seconds, total - compile_seconds


def main_pipeline() -> None:
    """--model: a pipeline call per batch, one PNG per image named by its seed."""
    from diffax.pipelines import command
    if FLAGS.workdir or FLAGS.checkpoint:
        raise ValueError("give one of --model, --workdir and --checkpoint")
    if not FLAGS.prompt:
        raise ValueError("--model needs --prompt")
    if FLAGS.steps is not None and FLAGS.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {FLAGS.steps}")
    batch_size = FLAGS.batch_size if FLAGS["batch_size"].present else min(FLAGS.num_images, 4)
    request = command.Request(
        prompt=FLAGS.prompt, negative_prompt=FLAGS.negative_prompt, image=FLAGS.image, mask=FLAGS.mask,
        strength=FLAGS.strength, control_image=FLAGS.control_image, canny=FLAGS.canny,
        controlnet_scale=FLAGS.controlnet_scale, num_inference_steps=FLAGS.steps,
        guidance_scale=FLAGS.guidance_scale, height=FLAGS.height, width=FLAGS.width, seed=FLAGS.seed,
        num_images=FLAGS.num_images, batch_size=batch_size, high_noise_frac=FLAGS.high_noise_frac)
    dtype = None if FLAGS.dtype == "float32" else FLAGS.dtype
    pipe, refiner = command.build_pipeline(
        FLAGS.model, request, controlnets=FLAGS.controlnet, refiner=FLAGS.refiner, loras=FLAGS.lora,
        sampler=FLAGS.sampler, sampler_options=parse_options(FLAGS.sampler_options), dtype=dtype,
        safety_checker=FLAGS.safety_checker, attention_backend=FLAGS.attention_backend,
        quantize=FLAGS.quantize, quantize_group_size=FLAGS.quantize_group_size)
    made_with = dict(model=FLAGS.model, pipeline=type(pipe).__name__, refiner=FLAGS.refiner,
                     controlnet=FLAGS.controlnet, lora=FLAGS.lora, sampler=type(pipe.scheduler).__name__,
                     sampler_options=list(FLAGS.sampler_options), dtype=FLAGS.dtype, quantize=FLAGS.quantize,
                     quantize_group_size=FLAGS.quantize_group_size,
                     **{k: v for k, v in vars(request).items() if k not in ("seed", "num_images", "batch_size")})
    result = command.generate(pipe, request, FLAGS.out[0], refiner=refiner, made_with=made_with)
    if jax.process_index() == 0:
        flagged = sum(result["nsfw"])
        print(f"wrote {len(result['paths'])} images to {FLAGS.out[0]} (seeds {FLAGS.seed}.."
              f"{FLAGS.seed + FLAGS.num_images - 1})" + (f"; {flagged} flagged by the safety checker and blacked out"
                                                         if flagged else ""))
        print(f"compile {result['compile_seconds']:.1f} s, sampling {result['sample_seconds']:.1f} s "
              f"({len(result['paths']) / max(result['sample_seconds'], 1e-9):.2f} images/s)")


def main(argv):
    del argv
    parallel.initialize_distributed()
    logging.set_verbosity(logging.WARNING)
    if FLAGS.quantize_group_size is not None and not FLAGS.quantize:
        raise ValueError("--quantize_group_size needs --quantize=int8 or int4")
    if FLAGS.model:
        return main_pipeline()  # pipelines.load turns on XLA's persistent cache
    compilation.enable_persistent_cache()
    for name, value in (("num_samples", FLAGS.num_samples), ("batch_size", FLAGS.batch_size),
                        ("steps", FLAGS.steps)):  # steps None: the config's default
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    outs = [Path(p) for p in FLAGS.out]
    for out in outs:
        if out.suffix not in (".png", ".npz"):
            raise ValueError(f"--out must end in .png or .npz, got {out}")
    model, params, schedule, defaults, source, view = load(FLAGS.workdir, FLAGS.checkpoint)
    if FLAGS.quantize and view is not None:
        raise ValueError(f"--quantize: {FLAGS.workdir} is a TuneQDM run, already quantized as it was tuned")
    if FLAGS.quantize:
        params = quantize_for_sampling(params, FLAGS.quantize, FLAGS.quantize_group_size)
    sampler = FLAGS.sampler or defaults.sampler
    scheduler = scheduler_for(sampler, schedule, **parse_options(FLAGS.sampler_options))
    n_cls = model.config.num_classes
    if not n_cls:
        if FLAGS.labels:
            raise ValueError("--labels: this model is unconditional: it takes no labels")
        labels = None
    elif FLAGS.labels:
        labels = np.array([int(s) for s in FLAGS.labels])
        if len(labels) != FLAGS.num_samples:  # a short list repeats to fill num_samples
            labels = np.resize(labels, FLAGS.num_samples)
    else:
        labels = np.arange(FLAGS.num_samples) % n_cls
    channels = model.config.sample_shape[-1]
    pixels = channels in (1, 3)
    if not pixels and any(out.suffix == ".png" for out in outs):
        raise ValueError(f"this model makes {channels}-channel latents: write them to .npz (a PNG needs the VAE)")
    pipe = GenerationPipeline(model, scheduler, parallel.make_mesh({"data": -1}), output_uint8=pixels,
                              guide_first_channels=3 if FLAGS.reference_guidance else None, param_view=view)
    guidance = FLAGS.guidance_scale if FLAGS.guidance_scale is not None else defaults.guidance_scale
    if not model.config.has_null_cond and FLAGS.guidance_scale is None:
        guidance = None  # the config's default scale is for a guidable model
    steps = FLAGS.steps if FLAGS.steps is not None else defaults.steps
    images, compile_seconds, sample_seconds = sample_in_batches(
        pipe, params, jax.random.key(FLAGS.seed), labels, FLAGS.num_samples, FLAGS.batch_size,
        num_inference_steps=steps, guidance_scale=guidance)
    # How the PNG was made, in its `parameters` text chunk (diffax.image_io.read_parameters).
    made_with = dict(model=type(model).__name__, checkpoint=FLAGS.workdir or FLAGS.checkpoint, source=source,
                     sampler=sampler, sampler_options=list(FLAGS.sampler_options), steps=steps,
                     guidance_scale=guidance, seed=FLAGS.seed, batch_size=FLAGS.batch_size,
                     labels=None if labels is None else [int(x) for x in labels], quantize=FLAGS.quantize,
                     quantize_group_size=FLAGS.quantize_group_size)
    if jax.process_index() == 0:
        for out in outs:
            if out.suffix == ".png" and labels is None:
                save_grid(out, images, ncols=min(10, len(images)), upscale=max(1, 64 // images.shape[1]),
                          parameters=made_with)
            elif out.suffix == ".png":  # one row per label: images sorted by label, as many columns as repeats
                order = np.argsort(labels, kind="stable")
                ncols = -(-len(labels) // len(np.unique(labels)))
                save_grid(out, images[order], ncols=ncols, upscale=max(1, 64 // images.shape[1]),
                          parameters=made_with)
            elif labels is None:
                np.savez(out, **{"images" if pixels else "latents": images})
            elif pixels:
                save_npz(out, images, labels)
            else:
                np.savez(out, latents=images, labels=labels.astype(np.int64))
        print(f"wrote {len(images)} samples from {source} ({sampler}, {steps} steps, guidance {guidance}) "
              f"to {', '.join(map(str, outs))}")
        print(f"compile {compile_seconds:.1f} s, sampling {sample_seconds:.1f} s "
              f"({len(images) / max(sample_seconds, 1e-9):.1f} images/s)")


if __name__ == "__main__":
    app.run(run_reporting_errors(main))
