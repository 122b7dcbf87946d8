"""diffax vs diffusers on a class-conditional UNet2DModel: one forward, and a whole DDIM sampling run with
classifier-free guidance.

    python -m bench.unet_sampling                                  # the digits recipe, CPU-sized
    python -m bench.unet_sampling --size=large --batch=16          # SD-channel U-Net at 64x64, for a GPU

The model is built in diffusers with random weights, saved as a diffusers folder and converted with
`diffax.convert.load`, so both libraries run the same weights. Two cases, both with `--batch`
rows per model evaluation:
  forward   one model call on [batch, H, W, C].
  sampling  `--steps` DDIM steps of batch/2 images with CFG: each step evaluates the model on the
            [unconditional; conditional] pair (batch rows). diffax: one jitted `diffax.sampling.sample`
            program (a lax.scan over steps). diffusers: the usual Python loop of UNet2DModel calls and
            `DDIMScheduler.step` under `torch.inference_mode()`, as its pipelines run it.
Outputs are compared before anything is timed.
"""
from __future__ import annotations

import argparse
import importlib.util
import tempfile
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bench import common  # importing the bench package first sets OMP_WAIT_POLICY for torch
from diffax import convert
from diffax.models import build_model
from diffax.models.unet2d import UNet2DConfig, UNet2DModel
from diffax.sampling import sample
from diffax.schedulers import to_diffusers_config
from diffax.schedulers.names import scheduler_for

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "digits.py"

# An SD-like U-Net without text conditioning: Stable Diffusion's channel widths, depth, head size and block
# layout (attention at the three finest resolutions), on 64x64x4 latents, class-conditional over 1000
# classes + the null class. For GPU runs: 643 M parameters.
LARGE = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D"),
    attention_head_dim=64, norm_num_groups=32, num_class_embeds=1001)


# diffax attention backends that run fp32 (cuDNN attention needs half precision).
ATTENTION = ("auto", "xla", "chunked")


def load_recipe() -> Any:
    """The `make demo` recipe's ConfigDict (configs/digits.py), which sets the digits model and sampler."""
    spec = importlib.util.spec_from_file_location("digits_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def torch_unet(config: UNet2DConfig, seed: int = 0) -> Any:
    """diffusers' UNet2DModel for `config` with random weights.

    Weight matrices keep diffusers' default initialisation (sane activation scales at any depth); every
    vector (norm scales, biases) is perturbed, so that a swapped scale/bias or a dropped bias would show
    up in the agreement check instead of hiding behind 1s and 0s.
    """
    import diffusers
    import torch

    torch.manual_seed(seed)
    kwargs = {k: v for k, v in config.to_diffusers().items() if not k.startswith("_")}
    model = diffusers.UNet2DModel(**kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _nchw(x: np.ndarray, device: Any) -> Any:
    import torch

    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)


def _nhwc(x: Any) -> np.ndarray:
    return x.float().cpu().numpy().transpose(0, 2, 3, 1)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags; `parse_args([])` gives the defaults `bench.run_all` uses."""
    parser = argparse.ArgumentParser(prog="python -m bench.unet_sampling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("digits", "large"), default="digits",
                        help="digits: configs/digits.py's model (16x16x1); large: SD channel widths at 64x64x4")
    parser.add_argument("--batch", type=int, default=64, help="rows per model evaluation (sampling: batch/2 "
                                                              "images, unconditional + conditional)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the recipe's, 25)")
    parser.add_argument("--guidance_scale", type=float, default=None, help="CFG scale (default: the recipe's, 3)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per library and case (median)")
    parser.add_argument("--attention", choices=ATTENTION, default="auto", help="diffax attention backend")
    parser.add_argument("--torch_threads", type=int, default=None, help="default: the machine's cores")
    parser.add_argument("--skip_sampling", action="store_true", help="time the forward only")
    args = parser.parse_args(argv)
    if args.batch < 2 or args.batch % 2:
        parser.error(f"--batch must be even and >= 2 (CFG evaluates batch/2 images twice), got {args.batch}")
    return args


def forward_case(args: argparse.Namespace, model: Any, config: UNet2DConfig, params: Any, device: Any,
                 peak: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """(a) One model call on [batch, H, W, C], timesteps and labels drawn at random (null labels too)."""
    import torch

    net, side, channels = UNet2DModel(config), config.sample_size, config.in_channels
    x = rng.standard_normal((args.batch, side, side, channels)).astype(np.float32)
    t = rng.integers(0, 1000, args.batch).astype(np.int32)
    y = rng.integers(0, config.num_class_embeds, args.batch).astype(np.int32)
    jx, jt, jy = jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)
    program = common.compile_jax(lambda p, x, t, y: net.apply({"params": p}, x, t, class_labels=y), params, jx, jt, jy)
    tx = _nchw(x, device)
    tt, ty = (torch.from_numpy(a.astype(np.int64)).to(device) for a in (t, y))
    diffax_call = common.jax_blocking(program.compiled, params, jx, jt, jy)
    torch_call = common.torch_blocking(lambda: model(tx, tt, ty).sample, device)
    (got, d_first), (want, t_first) = common.timed(diffax_call), common.timed(torch_call)
    err = common.rel_err(got, _nhwc(want))
    common.check_agreement("UNet forward", err, common.agreement_tolerance(device))
    timing = common.time_interleaved({"diffax": diffax_call, "torch": torch_call}, repeats=args.repeats)
    return common.case_row(
        f"unet-{args.size} forward b{args.batch}", diffax=timing["diffax"], torch=timing["torch"],
        program=program, flops=program.flops, peak=peak, max_rel_err=err, first_call_s=(d_first, t_first),
        torch_peak=common.torch_peak_bytes(torch_call, device), group="forward")


def sampling_case(args: argparse.Namespace, model: Any, config: UNet2DConfig, params: Any, device: Any,
                  peak: dict[str, Any], rng: np.random.Generator, recipe: Any, steps: int, guidance: float,
                  step_flops: float | None) -> dict[str, Any]:
    """(b) A whole DDIM run with CFG on batch/2 images; `step_flops` is one model evaluation's work."""
    import diffusers
    import torch

    net, side, channels, null = UNet2DModel(config), config.sample_size, config.in_channels, config.null_class
    half = args.batch // 2
    scheduler = scheduler_for(recipe.sample.sampler, recipe.diffusion)
    noise = rng.standard_normal((half, side, side, channels)).astype(np.float32)
    labels = rng.integers(0, null, half).astype(np.int32)  # real classes only

    def generate(p: Any, noise: jax.Array, labels: jax.Array) -> jax.Array:
        cond = jnp.concatenate([jnp.full_like(labels, null), labels])  # [uncond; cond] rows

        def denoise(x: jax.Array, t: jax.Array) -> jax.Array:
            return net.apply({"params": p}, x, jnp.full(x.shape[:1], t), class_labels=cond)

        return sample(scheduler, denoise, noise, num_inference_steps=steps, guidance_scale=guidance)

    jn, jl = jnp.asarray(noise), jnp.asarray(labels)
    program = common.compile_jax(generate, params, jn, jl)
    torch_sched = diffusers.DDIMScheduler.from_config(
        {k: v for k, v in to_diffusers_config(scheduler).items() if k != "_diffax"})
    eta = getattr(scheduler, "eta", 0.0)
    tn = _nchw(noise, device)
    tcond = torch.from_numpy(np.concatenate([np.full(half, null), labels]).astype(np.int64)).to(device)

    def torch_sample() -> Any:  # the loop of diffusers' class-conditional pipelines
        torch_sched.set_timesteps(steps, device=device)
        x = tn * torch_sched.init_noise_sigma
        for t in torch_sched.timesteps:
            model_in = torch_sched.scale_model_input(torch.cat([x, x]), t)
            uncond, cond = model(model_in, t, tcond).sample.chunk(2)
            x = torch_sched.step(uncond + guidance * (cond - uncond), t, x, eta=eta).prev_sample
        return x

    diffax_call = common.jax_blocking(program.compiled, params, jn, jl)
    torch_call = common.torch_blocking(torch_sample, device)
    (got, d_first), (want, t_first) = common.timed(diffax_call), common.timed(torch_call)
    err = common.rel_err(got, _nhwc(want))
    common.check_agreement(f"DDIM sampling ({steps} steps)", err, common.agreement_tolerance(device, steps=steps))
    timing = common.time_interleaved({"diffax": diffax_call, "torch": torch_call}, repeats=args.repeats)
    # XLA counts the scan body once, so the run's work is steps x one guided model evaluation.
    return common.case_row(
        f"unet-{args.size} DDIM-{steps} CFG 2x{half}", diffax=timing["diffax"], torch=timing["torch"],
        program=program, flops=None if step_flops is None else steps * step_flops, peak=peak, max_rel_err=err,
        first_call_s=(d_first, t_first), torch_peak=common.torch_peak_bytes(torch_call, device), group="sampling")


def run(args: argparse.Namespace, peak: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Runs both cases, writes bench/results/unet_<size>.json and returns the table rows.
    `peak` is `common.matmul_peak(device)` when the caller has measured it already."""
    device = common.setup_torch(args.torch_threads)
    peak = peak or common.matmul_peak(device)
    recipe = load_recipe()
    steps = args.steps or recipe.sample.steps
    guidance = recipe.sample.guidance_scale if args.guidance_scale is None else args.guidance_scale
    base = build_model(recipe.model).config if args.size == "digits" else UNet2DConfig(**LARGE)

    model = torch_unet(base).to(device)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        module, params = convert.load(folder, attention_backend=args.attention)
    config = module.config
    params = jax.device_put(params)
    rng = np.random.default_rng(0)
    rows = [forward_case(args, model, config, params, device, peak, rng)]
    if not args.skip_sampling:
        # A sampling step evaluates the model on `batch` rows, the forward case's shape.
        rows.append(sampling_case(args, model, config, params, device, peak, rng, recipe, steps, guidance,
                                  step_flops=None if rows[0]["gflop"] is None else rows[0]["gflop"] * 1e9))
    common.write_json(f"unet_{args.size}", {
        "benchmark": "unet_sampling", "args": vars(args), "steps": steps, "guidance_scale": guidance,
        "model_config": config.to_diffusers(),
        "parameters": int(sum(np.prod(a.shape) for a in jax.tree.leaves(params))),
        "machine": common.machine_info(), "matmul_peak": peak, "rows": rows})
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    """Run from the command line and print the table."""
    common.print_table(run(parse_args(argv)))


if __name__ == "__main__":
    main()
