"""Convert a PyTorch checkpoint of any diffax model family between layouts.

    python -m diffax.convert DiT-XL-2-256x256.pt out/transformer                  # reference -> diffusers
    python -m diffax.convert dit-xl-2-256 DiT-XL-2-256x256.safetensors --to reference
    python -m diffax.convert ddpm-folder out/unet --dtype bfloat16                # diffusers re-save, bf16
    python -m diffax.convert my-pipeline out/unet --subfolder unet

SRC is anything `diffax.convert.load` reads (a diffusers model or pipeline folder, a weight file, a DiT
reference file, a hub id). DST is a folder for --to diffusers (the default), a .pt / .safetensors file for
--to reference. A checkpoint that does not fit its model is an error listing the missing, unexpected and
mis-shaped keys, unless --allow_partial (unexpected tensors dropped, missing or mis-shaped parameters
freshly initialised). A tensor with NaN or inf values is an error unless --allow_nonfinite. Every error
(bad flags included) is printed as `error: ...` lines and exits with status 1.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import NoReturn, Sequence

import jax
import numpy as np

from diffax.convert.api import read_checkpoint, save


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one `error:` line and status 1, like every other error here."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see python -m diffax.convert --help)", file=sys.stderr)
        sys.exit(1)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line's flags."""
    parser = _Parser(prog="python -m diffax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="diffusers model or pipeline folder, weight file, reference file or hub id")
    parser.add_argument("dst", help="output folder (--to diffusers) or .pt / .safetensors file (--to reference)")
    parser.add_argument("--to", choices=("diffusers", "reference"), default="diffusers")
    parser.add_argument("--subfolder", help="pipeline component to read: unet, transformer, ...")
    parser.add_argument("--variant", help="weight-file variant to read, e.g. fp16")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                        help="dtype of the written tensors (default float32)")
    parser.add_argument("--allow_partial", action="store_true",
                        help="drop unexpected tensors and initialise missing / mis-shaped parameters freshly")
    parser.add_argument("--allow_nonfinite", action="store_true",
                        help="load tensors holding NaN or inf values instead of refusing them")
    parser.add_argument("--input_size", type=int, help="DiT reference files without pos_embed: latent size")
    parser.add_argument("--num_heads", type=int, help="DiT reference files of a non-paper width: head count")
    return parser.parse_args(argv)


def convert(args: argparse.Namespace) -> None:
    """Loads `args.src` and writes `args.dst`; prints one summary line and any allow_partial warnings."""
    if args.to == "reference" and Path(args.dst).suffix not in (".pt", ".safetensors"):
        raise ValueError(f"{args.dst}: --to reference writes one file, ending in .pt or .safetensors")
    options = {k: getattr(args, k) for k in ("input_size", "num_heads") if getattr(args, k) is not None}
    loaded = read_checkpoint(args.src, subfolder=args.subfolder, variant=args.variant, param_dtype=args.dtype,
                             allow_partial=args.allow_partial, allow_nonfinite=args.allow_nonfinite, **options)
    for line in loaded.mismatch.lines(loaded.source):
        print(f"warning: {line} (--allow_partial: dropped or freshly initialised)", file=sys.stderr)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = save(args.dst, loaded.module, loaded.params, layout=args.to)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    leaves = jax.tree.leaves(loaded.params)
    count, nbytes = sum(int(np.size(a)) for a in leaves), sum(a.nbytes for a in leaves)
    print(f"{loaded.source} ({loaded.layout}) -> {path} ({args.to}): "
          f"{loaded.module.config.class_name}, {count:,} parameters, {nbytes / 1e9:.3g} GB")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; bad input ends with `error: ...` lines on stderr and exit status 1."""
    args = parse_args(argv)
    try:
        convert(args)
    except (ValueError, OSError) as e:  # OSError: an unreadable source or unwritable destination
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
