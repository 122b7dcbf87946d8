"""Convert a PyTorch checkpoint of any diffax model family between layouts.

    python -m diffax.convert DiT-XL-2-256x256.pt out/transformer                  # reference -> diffusers
    python -m diffax.convert dit-xl-2-256 DiT-XL-2-256x256.safetensors --to reference
    python -m diffax.convert ddpm-folder out/unet --dtype bfloat16                # diffusers re-save, bf16
    python -m diffax.convert my-pipeline out/unet --subfolder unet
    python -m diffax.convert v1-5-pruned.safetensors out/sd15                     # single file -> pipeline
    python -m diffax.convert out/sd15 sd15.safetensors --to single_file

SRC is anything `diffax.convert.load` reads (a diffusers model or pipeline folder, a weight file, a DiT
reference file, a hub id). DST is a folder for --to diffusers (the default), a .pt / .safetensors file for
--to reference.

A single-file Stable Diffusion checkpoint (.safetensors / .ckpt in the CompVis / Stability layout) as SRC
becomes a pipeline folder DST with one diffusers folder per component (unet/, vae/, text_encoder/,
text_encoder_2/), each built with its model type's standard architecture. --to single_file goes back: SRC
is such a pipeline folder (or one component's folder), DST one .safetensors file. --model_type
(sd1, sd2, sdxl, ...) overrides the type inferred from the tensors or the components. A checkpoint that does not fit its model is an error listing the missing, unexpected and
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

from diffax.convert.api import load, read_checkpoint, save
from diffax.convert.single_file import infer_model_type, load_single_file, save_single_file
from diffax.convert.single_file_configs import MODEL_TYPES

# pipeline folder's component subfolders, in the order a single file holds them
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
# a lone component folder's config class -> the component it is
_COMPONENT_OF_CLASS = {"UNet2DConditionModel": "unet", "AutoencoderKL": "vae", "CLIPTextModel": "text_encoder",
                       "CLIPTextModelWithProjection": "text_encoder_2"}


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
    parser.add_argument("--to", choices=("diffusers", "reference", "single_file"), default="diffusers")
    parser.add_argument("--model_type", choices=tuple(MODEL_TYPES),
                        help="Stable Diffusion single files: the model type instead of the inferred one")
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


def _single_file_type(src: str) -> str | None:
    """The model type of a Stable Diffusion single-file checkpoint, None for any other source."""
    path = Path(src)
    if not path.is_file() or path.suffix not in (".safetensors", ".ckpt", ".pt", ".pth"):
        return None
    try:
        return infer_model_type(path)
    except ValueError:  # not a Stable Diffusion file (or unreadable): the other readers report it
        return None


def _summary(params_list: Sequence[object]) -> str:
    leaves = jax.tree.leaves(list(params_list))
    count, nbytes = sum(int(np.size(a)) for a in leaves), sum(a.nbytes for a in leaves)
    return f"{count:,} parameters, {nbytes / 1e9:.3g} GB"


def _refuse_options(args: argparse.Namespace, what: str) -> None:
    """Flags of the one-model readers have no meaning for single files."""
    for flag in ("subfolder", "variant", "input_size", "num_heads", "allow_partial"):
        if getattr(args, flag):
            raise ValueError(f"{args.src}: --{flag} does not apply to {what}")


def from_single_file(args: argparse.Namespace, model_type: str) -> None:
    """A single-file checkpoint -> a pipeline folder with one diffusers folder per component."""
    _refuse_options(args, "a single-file checkpoint")
    if args.to != "diffusers":
        raise ValueError(f"{args.src}: a single-file checkpoint converts to a pipeline folder (--to diffusers)")
    components = load_single_file(args.src, model_type=model_type, param_dtype=args.dtype,
                                  allow_nonfinite=args.allow_nonfinite)
    for component, (module, params) in components.items():
        save(Path(args.dst) / component, module, params)
    print(f"{args.src} (single file, {model_type}) -> {args.dst} (diffusers): {', '.join(components)}, "
          f"{_summary([p for _, p in components.values()])}")


def _infer_pipeline_type(components: dict[str, tuple]) -> str:
    """The model type whose single-file layout fits `components`, mirroring `infer_model_type`: SDXL by a
    second text encoder (the refiner by it alone), SD 2.x by an OpenCLIP (gelu) text encoder or 1024-wide
    cross-attention, else SD 1.x; inpainting by a 9-channel U-Net input."""
    config = {name: module.config for name, (module, _) in components.items()}
    if "text_encoder_2" in config:
        if "text_encoder" not in config:
            return "sdxl_refiner"
        base = "sdxl"
    elif "text_encoder" in config:
        base = "sd2" if config["text_encoder"].hidden_act == "gelu" else "sd1"
    elif "unet" in config:
        base = "sd2" if config["unet"].per_block("cross_attention_dim")[0] == 1024 else "sd1"
    else:
        base = "sd1"
    inpaint = "unet" in config and config["unet"].in_channels == 9
    return f"{base}_inpaint" if inpaint else base


def to_single_file(args: argparse.Namespace) -> None:
    """A pipeline folder (or one component's folder) -> one .safetensors file in the original layout."""
    _refuse_options(args, "--to single_file")
    if Path(args.dst).suffix != ".safetensors":
        raise ValueError(f"{args.dst}: --to single_file writes one file, ending in .safetensors")
    src = Path(args.src)
    names = [name for name in COMPONENTS if (src / name / "config.json").is_file()]
    components = {name: load(src, subfolder=name, param_dtype=args.dtype,
                             allow_nonfinite=args.allow_nonfinite) for name in names}
    if not components and (src / "config.json").is_file():
        module, params = load(src, param_dtype=args.dtype, allow_nonfinite=args.allow_nonfinite)
        name = _COMPONENT_OF_CLASS.get(module.config.class_name)
        if name is None:
            raise ValueError(f"{src / 'config.json'}: a {module.config.class_name} is no component of a "
                             f"Stable Diffusion single file ({', '.join(_COMPONENT_OF_CLASS)})")
        components = {name: (module, params)}
    if not components:
        raise ValueError(f"{src}: no pipeline folder (no {'/, '.join(COMPONENTS)}/ with a config.json) and no "
                         f"model folder (no config.json)")
    model_type = args.model_type or _infer_pipeline_type(components)
    path = save_single_file(args.dst, components, model_type=model_type)
    print(f"{src} (diffusers) -> {path} (single file, {model_type}): {', '.join(components)}, "
          f"{_summary([p for _, p in components.values()])}")


def convert(args: argparse.Namespace) -> None:
    """Loads `args.src` and writes `args.dst`; prints one summary line and any allow_partial warnings."""
    if (Path(args.src) / "checkpoints").is_dir():  # a training run's Orbax state, not a PyTorch layout
        raise ValueError(f"{args.src} is a diffax training workdir: export it with `python -m "
                         f"diffax.train.pipeline_export --workdir={args.src} --out={args.dst}`")
    if args.to == "single_file":
        return to_single_file(args)
    model_type = args.model_type or _single_file_type(args.src)
    if model_type is not None:
        return from_single_file(args, model_type)
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
