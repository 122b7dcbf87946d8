"""diffax vs diffusers on a DiT forward (class-conditional Diffusion Transformer).

    python -m bench.dit_forward                                   # DiT-S/2 on 32x32x4 latents, batch 8
    python -m bench.dit_forward --attention=chunked               # diffax's memory-efficient attention
    python -m bench.dit_forward --preset=DiT-XL/2 --batch=32      # for a GPU

The model is built as diffusers' `DiTTransformer2DModel` with random weights, saved as a diffusers folder
and converted with `diffax.convert.load`, so both libraries run the same weights. It takes diffusers'
conventions (timestep frequency shift 1, pre-MLP LayerNorm eps 1e-5), which the converted config carries.
Outputs are compared before anything is timed.
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bench import common  # importing the bench package first sets OMP_WAIT_POLICY for torch
from bench.models import torch_dit
from diffax import convert
from diffax.models.dit import PRESETS, DiT, DiTConfig


# diffax attention backends that run fp32 (cuDNN attention needs half precision).
ATTENTION = ("auto", "xla", "chunked")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags; `parse_args([])` gives the defaults `bench.run_all` uses."""
    parser = argparse.ArgumentParser(prog="python -m bench.dit_forward", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="DiT-S/2")
    parser.add_argument("--input_size", type=int, default=32, help="latent side (32 = 256x256 images)")
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per library (median)")
    parser.add_argument("--attention", choices=ATTENTION, default="xla", help="diffax attention backend")
    parser.add_argument("--torch_threads", type=int, default=None, help="default: the machine's cores")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, peak: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Runs the forward case, writes bench/results/dit_<preset>_<attention>.json and returns the table row.
    `peak` is `common.matmul_peak(device)` when the caller has measured it already."""
    import torch

    device = common.setup_torch(args.torch_threads)
    peak = peak or common.matmul_peak(device)
    base = DiTConfig.preset(args.preset, sample_size=args.input_size, num_embeds_ada_norm=args.num_classes,
                            freq_shift=1.0, norm_eps=1e-5)  # diffusers' values: exportable without a warning
    model = torch_dit(base).to(device)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        module, params = convert.load(folder)
    config = dataclasses.replace(module.config, attention_backend=args.attention)
    params = jax.device_put(params)
    net = DiT(config)

    rng = np.random.default_rng(0)
    b, side, channels = args.batch, config.input_size, config.in_channels
    x = rng.standard_normal((b, side, side, channels)).astype(np.float32)
    t = rng.integers(0, 1000, b).astype(np.int32)
    y = rng.integers(0, config.num_classes + 1, b).astype(np.int32)  # num_classes = the null class
    jx, jt, jy = jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)
    program = common.compile_jax(lambda p, x, t, y: net.apply({"params": p}, x, t, class_labels=y), params, jx, jt, jy)

    tx = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)
    tt, ty = (torch.from_numpy(a.astype(np.int64)).to(device) for a in (t, y))
    diffax_forward = common.jax_blocking(program.compiled, params, jx, jt, jy)
    torch_forward = common.torch_blocking(lambda: model(tx, timestep=tt, class_labels=ty).sample, device)
    (got, d_first), (want, t_first) = common.timed(diffax_forward), common.timed(torch_forward)
    err = common.rel_err(got, want.float().cpu().numpy().transpose(0, 2, 3, 1))
    common.check_agreement(f"{args.preset} forward", err, common.agreement_tolerance(device))
    timing = common.time_interleaved({"diffax": diffax_forward, "torch": torch_forward}, repeats=args.repeats)
    # The model's arithmetic, counted on the plain attention path: the chunked path pads queries to whole
    # chunks, and that extra work should show as a lower diffax rate, not as more work done by torch.
    plain = DiT(dataclasses.replace(config, attention_backend="xla"))
    flops = common.count_flops(lambda p, x, t, y: plain.apply({"params": p}, x, t, class_labels=y), params, jx, jt, jy)
    row = common.case_row(
        f"{args.preset} {side}x{side} forward b{b} ({args.attention})", diffax=timing["diffax"],
        torch=timing["torch"], program=program, flops=flops, peak=peak,
        max_rel_err=err, first_call_s=(d_first, t_first), torch_peak=common.torch_peak_bytes(torch_forward, device),
        group="forward")
    name = f"dit_{args.preset.replace('DiT-', '').replace('/', '_')}_{args.attention}"
    common.write_json(name, {
        "benchmark": "dit_forward", "args": vars(args), "model_config": config.to_diffusers(),
        "parameters": int(sum(np.prod(a.shape) for a in jax.tree.leaves(params))),
        "machine": common.machine_info(), "matmul_peak": peak, "rows": [row]})
    return [row]


def main(argv: Sequence[str] | None = None) -> None:
    """Run from the command line and print the table."""
    common.print_table(run(parse_args(argv)))


if __name__ == "__main__":
    main()
