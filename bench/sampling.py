"""diffax vs diffusers on whole Stable Diffusion sampling loops, and on a whole text-to-image pipeline call.

    python -m bench.sampling                   # SD 1.5's U-Net layout, narrowed, at 32x32 latents (CPU-sized)
    python -m bench.sampling --quick           # a tiny U-Net at 16x16 latents: seconds per case
    flock /tmp/diffax-big.lock python -m bench.sampling --full
                                               # SD 1.5's U-Net at 64x64 latents and a 512x512 SD 1.5 pipeline
                                               # (860 M + 84 M + 123 M parameters: 4.3 GB of fp32
                                               # weights per library): for a GPU
    python -m bench.sampling --skip_pipeline   # the two sampling loops only
    python -m bench.sampling --full --skip_loops   # the pipeline call only (writes sampling_full_pipeline.json)

Cases (group "sampling"), each compared for agreement before it is timed, both libraries interleaved:
  DDIM-50, DPM++2M-20  a whole sampling run of one image with classifier-free guidance (scale 7.5; the
      [uncond; cond] pair is one batched U-Net call per step) of a text-conditioned UNet2DConditionModel,
      from the same initial noise [1, h, w, 4] and the same random text embeddings [2, 77, D].
      diffax: one jitted `diffax.sampling.sample` program, its scheduler converted from the diffusers
      scheduler's config (`diffax.schedulers.from_diffusers_config`). diffusers: the loop
      StableDiffusionPipeline runs (set_timesteps, scale_model_input, unet, guidance, scheduler.step) under
      torch.inference_mode. Samplers: DDIMScheduler with SD 1.5's config (scaled_linear betas
      0.00085-0.012, steps_offset 1, "leading" spacing, eta 0) and DPMSolverMultistepScheduler with the same
      betas and its own defaults, as diffusers builds it for SD (dpmsolver++, order 2, midpoint,
      lower_order_final, "linspace" spacing). The same rounds time the model call alone in both libraries:
      one batched CFG call (x and the embeddings of one step, t = 500), 10 calls back to back per round
      (as a loop makes them: weights warm in the caches), their mean; and the row reports each loop's
      overhead = run time / (steps x model call time) - 1: what the loop costs beyond its model calls.
  pipeline  a whole prompt -> image call: tokenizer, CLIP text encoder (prompt and empty negative prompt),
      the DDIM-50 loop with guidance 7.5, VAE decode, output_type "np" (float images [1, H, W, 3]).
      diffax: `diffax.pipelines.load(folder)`; diffusers: `StableDiffusionPipeline.from_pretrained(folder)`,
      on one saved folder of random-weight components (safety checker none), with the same prompt and the
      same initial latents passed to both. diffax's compile time here is what jax's monitoring events
      record during the first call (tracing, lowering and XLA compilation of every program it runs).

Sizes. U-Nets keep SD 1.5's layout (CrossAttnDown x3 + Down, Up + CrossAttnUp x3, 2 layers per block,
8 heads, 32 norm groups, 77 text tokens):
  default  block_out_channels (64, 128, 256, 256), cross-attention width 768, 32x32 latents: 37.5 M
           parameters, 0.32 s per CFG call (2 rows) in torch on 2 idle CPU cores (~16 s per DDIM-50 run).
  quick    block_out_channels (32, 32, 64, 64), 1 layer per block, cross-attention width 64, 16x16 latents.
  full     SD 1.5's U-Net (bench.models.SD15_UNET) at 64x64 latents.
The pipeline (default and quick): the quick U-Net, bench.models.SMALL_SD_VAE (SD's VAE layout at widths
32-64: 16x16 latents -> 128x128 images) and SMALL_CLIP_TEXT (4 layers of width 64), tokenizer
`bench.models.word_tokenizer`; --full: SD 1.5's U-Net, VAE and CLIP-L text encoder (512x512 images).
Every model is built in torch with random weights (`bench.models`), saved with save_pretrained and read by
diffax from that folder. Agreement before timing: 1e-4 x steps max relative error on a CPU.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bench import common  # importing the bench package first sets OMP_WAIT_POLICY for torch
from bench import models
from diffax import compilation, pipelines
from diffax.sampling import sample
from diffax.schedulers import from_diffusers_config

GUIDANCE = 7.5
TOKENS = 77
PROMPT = "a photo of an astronaut riding a horse on the moon"
PIPELINE_STEPS = 50
MODEL_CALLS = 10  # back-to-back model calls per round that give the model call time

UNET_SIZES = {
    "default": dict(models.SD15_UNET, sample_size=32, block_out_channels=(64, 128, 256, 256)),
    "quick": dict(models.SD15_UNET, sample_size=16, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
                  cross_attention_dim=64),
    "full": models.SD15_UNET,
}
PIPELINE_SIZES = {  # (unet, vae, text encoder) configs
    "default": (UNET_SIZES["quick"], models.SMALL_SD_VAE, models.SMALL_CLIP_TEXT),
    "quick": (UNET_SIZES["quick"], models.SMALL_SD_VAE, models.SMALL_CLIP_TEXT),
    "full": (models.SD15_UNET, models.SD_VAE, models.CLIP_L_TEXT),
}
# SD 1.5's noise schedule, as its scheduler_config.json gives it.
SD15_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SD15_DDIM = dict(SD15_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
SAMPLERS = (  # (case name, diffusers scheduler class, its config, steps)
    ("DDIM", "DDIMScheduler", SD15_DDIM, 50),
    ("DPM++2M", "DPMSolverMultistepScheduler", SD15_BETAS, 20),
)

COLUMNS = (
    *common.SUMMARY_COLUMNS[:6],
    ("diffax model ms", "diffax_model_ms", "{:.1f}"),
    ("torch model ms", "torch_model_ms", "{:.1f}"),
    ("diffax overhead", "diffax_overhead_pct", "{:+.1f}%"),
    ("torch overhead", "torch_overhead_pct", "{:+.1f}%"),
    *common.SUMMARY_COLUMNS[6:],
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags; `parse_args([])` gives the defaults `bench.run_all` uses."""
    parser = argparse.ArgumentParser(prog="python -m bench.sampling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a tiny U-Net (seconds per case)")
    size.add_argument("--full", action="store_true", help="SD 1.5's sizes (for a GPU)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per library and case (median, spread)")
    parser.add_argument("--torch_threads", type=int, default=None, help="default: the machine's cores")
    skip = parser.add_mutually_exclusive_group()
    skip.add_argument("--skip_pipeline", action="store_true", help="time the sampling loops only")
    skip.add_argument("--skip_loops", action="store_true", help="time the whole pipeline call only")
    return parser.parse_args(argv)


def size_name(args: argparse.Namespace) -> str:
    """'quick', 'full' or 'default'."""
    return "quick" if args.quick else "full" if args.full else "default"


def _nchw(x: np.ndarray, device: Any) -> Any:
    import torch

    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)


def _nhwc(x: Any) -> np.ndarray:
    return x.float().cpu().numpy().transpose(0, 2, 3, 1)


def torch_scheduler(class_name: str, config: dict[str, Any]) -> Any:
    """A diffusers scheduler of class `class_name` built from `config` (its other keys at their defaults)."""
    import diffusers

    return getattr(diffusers, class_name)(**config)


# ----------------------------------------------------------------------------- the sampling loops


def loop_case(args: argparse.Namespace, name: str, torch_sched: Any, steps: int, model: Any, unet: Any,
              params: Any, inputs: dict[str, np.ndarray], model_calls: dict[str, Any], model_flops: float | None,
              device: Any, peak: dict[str, Any]) -> dict[str, Any]:
    """One sampler's whole CFG run, timed in the same rounds as one model call alone; returns the row."""
    import torch

    scheduler = from_diffusers_config(dict(torch_sched.config), scheduler_class=type(torch_sched).__name__)

    def generate(p: Any, noise: jax.Array, cond: jax.Array, uncond: jax.Array) -> jax.Array:
        def denoise(x: jax.Array, t: jax.Array, **c: Any) -> jax.Array:
            return unet.apply({"params": p}, x, jnp.broadcast_to(t, x.shape[:1]), **c)

        return sample(scheduler, denoise, noise, num_inference_steps=steps, guidance_scale=GUIDANCE,
                      cond={"encoder_hidden_states": cond}, uncond={"encoder_hidden_states": uncond})

    jin = [jnp.asarray(inputs[k]) for k in ("noise", "cond", "uncond")]
    program = common.compile_jax(generate, params, *jin)

    tn = _nchw(inputs["noise"], device)
    embeds = torch.from_numpy(np.concatenate([inputs["uncond"], inputs["cond"]])).to(device)  # [2, 77, D]
    # diffusers' prepare_extra_step_kwargs: eta (0 by default) for the schedulers whose step takes it.
    step_kwargs = {"eta": 0.0} if name == "DDIM" else {}

    def torch_sample() -> Any:  # StableDiffusionPipeline.__call__'s denoising loop
        torch_sched.set_timesteps(steps, device=device)  # also resets a multistep solver's history
        latents = tn * torch_sched.init_noise_sigma
        for t in torch_sched.timesteps:
            model_in = torch_sched.scale_model_input(torch.cat([latents] * 2), t)
            noise_pred = model(model_in, t, encoder_hidden_states=embeds, return_dict=False)[0]
            uncond, cond = noise_pred.chunk(2)
            noise_pred = uncond + GUIDANCE * (cond - uncond)
            latents = torch_sched.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
        return latents

    diffax_call = common.jax_blocking(program.compiled, params, *jin)
    torch_call = common.torch_blocking(torch_sample, device)
    (got, d_first), (want, t_first) = common.timed(diffax_call), common.timed(torch_call)
    err = common.rel_err(got, _nhwc(want))
    common.check_agreement(f"{name}-{steps} with CFG", err, common.agreement_tolerance(device, steps=steps))
    # The checked calls above were each library's warm-up.
    timing = common.time_interleaved({"diffax": diffax_call, "torch": torch_call, **model_calls},
                                     repeats=args.repeats, warmup=0)
    model_s = {who: timing[f"{who}_model"].median / MODEL_CALLS for who in ("diffax", "torch")}
    side = inputs["noise"].shape[1]
    # XLA counts the loop body once, so the run's work is steps x one guided model call.
    return common.case_row(
        f"{size_name(args)} U-Net {side}x{side} {name}-{steps} CFG", diffax=timing["diffax"], torch=timing["torch"],
        program=program, flops=None if model_flops is None else steps * model_flops, peak=peak, max_rel_err=err,
        first_call_s=(d_first, t_first), torch_peak=common.torch_peak_bytes(torch_call, device), group="sampling",
        steps=steps, sampler=type(torch_sched).__name__,
        diffax_model_ms=1e3 * model_s["diffax"], torch_model_ms=1e3 * model_s["torch"],
        diffax_overhead_pct=100 * (timing["diffax"].median / (steps * model_s["diffax"]) - 1),
        torch_overhead_pct=100 * (timing["torch"].median / (steps * model_s["torch"]) - 1),
        diffax_model_times_s=[t / MODEL_CALLS for t in timing["diffax_model"].times],
        torch_model_times_s=[t / MODEL_CALLS for t in timing["torch_model"].times])


def loop_cases(args: argparse.Namespace, device: Any, peak: dict[str, Any]) -> list[dict[str, Any]]:
    """The DDIM and DPM-Solver++ rows."""
    import torch

    config = UNET_SIZES[size_name(args)]
    model = models.torch_unet(config).to(device)
    unet, params = models.to_diffax(model)
    params = models.to_device(params)

    rng = np.random.default_rng(0)
    side, dim = config["sample_size"], config["cross_attention_dim"]
    inputs = {"noise": rng.standard_normal((1, side, side, 4)).astype(np.float32),
              "cond": rng.standard_normal((1, TOKENS, dim)).astype(np.float32),
              "uncond": rng.standard_normal((1, TOKENS, dim)).astype(np.float32)}

    # One step's model call alone: the CFG batch [x; x] with the [uncond; cond] embeddings.
    x2 = np.concatenate([inputs["noise"]] * 2)
    e2 = np.concatenate([inputs["uncond"], inputs["cond"]])
    jx, je, jt = jnp.asarray(x2), jnp.asarray(e2), jnp.asarray(500, jnp.int32)

    def forward(p: Any, x: jax.Array, t: jax.Array, e: jax.Array) -> jax.Array:
        return unet.apply({"params": p}, x, jnp.broadcast_to(t, x.shape[:1]), encoder_hidden_states=e)

    forward_program = common.compile_jax(forward, params, jx, jt, je)
    tx, te, tt = _nchw(x2, device), torch.from_numpy(e2).to(device), torch.tensor(500, device=device)
    diffax_forward = common.jax_blocking(forward_program.compiled, params, jx, jt, je)
    torch_forward = common.torch_blocking(lambda: model(tx, tt, encoder_hidden_states=te, return_dict=False)[0],
                                          device)
    got, want = diffax_forward(), torch_forward()
    common.check_agreement("U-Net forward", common.rel_err(got, _nhwc(want)), common.agreement_tolerance(device))
    model_calls = {"diffax_model": lambda: [diffax_forward() for _ in range(MODEL_CALLS)],
                   "torch_model": lambda: [torch_forward() for _ in range(MODEL_CALLS)]}

    rows = []
    for name, class_name, sched_config, steps in SAMPLERS:
        print(f"  {name}-{steps} ...", flush=True)
        rows.append(loop_case(args, name, torch_scheduler(class_name, sched_config), steps, model, unet, params,
                              inputs, model_calls, forward_program.flops, device, peak))
    return rows


# ----------------------------------------------------------------------------- the pipeline call


def save_pipeline(folder: Path, size: str) -> Path:
    """Saves a StableDiffusionPipeline of random-weight components of `size` (PIPELINE_SIZES), the DDIM
    scheduler of SD 1.5 and no safety checker to `folder`; returns it."""
    import diffusers

    unet, vae, text = PIPELINE_SIZES[size]
    pipe = diffusers.StableDiffusionPipeline(
        unet=models.torch_unet(unet, seed=0), vae=models.torch_vae(vae, seed=1),
        text_encoder=models.torch_clip_text(text, seed=2), tokenizer=models.word_tokenizer(folder.parent / "words"),
        scheduler=torch_scheduler("DDIMScheduler", SD15_DDIM), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(folder, max_shard_size=models.MAX_SHARD_SIZE)
    return folder


def pipeline_case(args: argparse.Namespace, device: Any, peak: dict[str, Any]) -> dict[str, Any]:
    """Prompt -> image with both libraries' StableDiffusionPipeline on one saved folder; returns the row."""
    import diffusers

    size = size_name(args)
    watch = common.Stopwatch("pipeline")
    with tempfile.TemporaryDirectory(prefix="diffax-bench-sd-") as tmp:
        folder = save_pipeline(Path(tmp) / "sd", size)
        watch.lap("torch pipeline built and saved")
        # No parameter cache and no persistent compilation cache: the first call compiles, as on a fresh
        # machine, and nothing is written outside the temporary folder.
        dpipe = pipelines.load(folder, safety_checker=False, cache_dir=False, compilation_cache=False)
        tpipe = diffusers.StableDiffusionPipeline.from_pretrained(folder).to(device)
        watch.lap("both pipelines loaded")
    tpipe.set_progress_bar_config(disable=True)
    h, w = dpipe.default_size()
    latents = np.random.default_rng(1).standard_normal(
        (1, h // dpipe.vae_scale_factor, w // dpipe.vae_scale_factor, 4)).astype(np.float32)
    tlatents = _nchw(latents, device)
    call = dict(num_inference_steps=PIPELINE_STEPS, guidance_scale=GUIDANCE, output_type="np")

    def diffax_call() -> np.ndarray:  # host numpy images: the call has finished when it returns
        return dpipe(PROMPT, latents=latents, **call).images

    torch_call = common.torch_blocking(lambda: tpipe(PROMPT, latents=tlatents, **call).images, device)
    with compilation.compile_seconds() as jit_s:
        got, d_first = common.timed(diffax_call)
    watch.lap("diffax first call (compiles)")
    want, t_first = common.timed(torch_call)
    watch.lap("torch first call")
    err = common.rel_err(got, want)
    common.check_agreement(f"pipeline call ({PIPELINE_STEPS} DDIM steps)", err,
                           common.agreement_tolerance(device, steps=PIPELINE_STEPS))
    timing = common.time_interleaved({"diffax": diffax_call, "torch": torch_call}, repeats=args.repeats, warmup=0)
    program = common.CompiledProgram(None, jit_s["trace"] + jit_s["lower"], jit_s["compile"], None, None)
    return common.case_row(
        f"{size} SD pipeline {h}x{w} DDIM-{PIPELINE_STEPS} CFG", diffax=timing["diffax"], torch=timing["torch"],
        program=program, flops=None, peak=peak, max_rel_err=err, first_call_s=(d_first, t_first),
        torch_peak=common.torch_peak_bytes(torch_call, device), group="sampling", steps=PIPELINE_STEPS,
        sampler="DDIMScheduler", prompt=PROMPT)


def run(args: argparse.Namespace, peak: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Runs every case, writes bench/results/sampling[_quick|_full][_pipeline].json and returns the table rows.
    `peak` is `common.matmul_peak(device)` when the caller has measured it already."""
    device = common.setup_torch(args.torch_threads)
    peak = peak or common.matmul_peak(device)
    rows = [] if args.skip_loops else loop_cases(args, device, peak)
    models.free()  # the loops' models are gone before the pipeline's are built
    if not args.skip_pipeline:
        print("  pipeline ...", flush=True)
        rows.append(pipeline_case(args, device, peak))
    size = size_name(args)
    unet, vae, text = PIPELINE_SIZES[size]
    name = "sampling" if size == "default" else f"sampling_{size}"
    common.write_json(name + ("_pipeline" if args.skip_loops else ""), {
        "benchmark": "sampling", "args": vars(args), "guidance_scale": GUIDANCE, "unet_config": UNET_SIZES[size],
        "pipeline_configs": {"unet": unet, "vae": vae, "text_encoder": text}, "prompt": PROMPT,
        "machine": common.machine_info(), "matmul_peak": peak, "rows": rows})
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    """Run from the command line and print the table."""
    common.print_table(run(parse_args(argv)), COLUMNS)


if __name__ == "__main__":
    main()
