"""A fine-tuned U-Net as a whole diffusers pipeline folder: the pipeline the run started from
(`train.init_from`) with its unet/ replaced by the run's weights; a run trained from scratch (no init_from)
as its model's diffusers folder (config.json and the weights, e.g. `UNet2DModel.from_pretrained`).

    python -m diffax.train.pipeline_export --workdir=runs/sdxl_finetune --out=exports/sdxl_finetune

The weights are the EMA weights of the workdir's newest good checkpoint (`--step` picks another), which with
`train.ema_decay=0` are the trained weights themselves. A LoRA run's factors are merged into the base
(scaled by train.lora.alpha / rank), so the folder holds a plain U-Net; its
`WORKDIR/export/pytorch_lora_weights.safetensors` stays the small file to load onto the base with diffusers'
`load_lora_weights`. Everything else (text encoders, tokenizers, VAE, scheduler, model_index.json) is copied
from init_from, so the folder loads wherever the original did: diffusers' `DiffusionPipeline.from_pretrained`
and `diffax.pipelines.load`. The folder is written beside `--out` and renamed into place when complete.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

from diffax import convert
from diffax.models import build_model
from diffax.train import finetune
from diffax.train.checkpoint import restore_for_sampling

PIPELINE_INDEX = "model_index.json"


def export_pipeline(workdir: str | Path, out: str | Path, step: int | None = None) -> Path:
    """Writes the pipeline folder `out` of the run in `workdir` (see the module docstring); returns it.

    Raises:
        ValueError: `out` exists, train.init_from is set but not a diffusers pipeline folder with unet/, or the run
            trained TuneQDM scales (a quantized base has no float U-Net to write).
        NoCheckpointError / CorruptCheckpointError: no checkpoint in `workdir` reads back.
    """
    out = Path(out).expanduser().resolve()
    if out.exists():
        raise ValueError(f"--out: {str(out)!r} exists; remove it or choose another folder")
    config, trainable, saved_step = restore_for_sampling(workdir, step)
    if not config.train.init_from:  # trained from scratch: nothing else to copy
        model = build_model(config.model)
        _write_atomically(out, lambda tmp: convert.save(tmp, model, trainable))
        print(f"exported step {saved_step} of {workdir} as the model folder {out}", file=sys.stderr, flush=True)
        return out
    source = Path(config.train.init_from).expanduser()
    if not (source / PIPELINE_INDEX).is_file() or not (source / "unet").is_dir():
        raise ValueError(f"config key 'train.init_from' of {workdir}: {str(source)!r} is not a diffusers pipeline "
                         f"folder (model_index.json and unet/), which the export copies")
    model = build_model(config.model)
    mode = config.train.finetune
    if mode == "full":
        params = trainable
    elif mode == "lora":
        params, _ = finetune.sampling_params(config, trainable, model, workdir)
    else:
        raise ValueError(f"config key 'train.finetune' of {workdir} is {mode!r}: only 'full' and 'lora' runs export "
                         f"a float U-Net (a TuneQDM run's result is {finetune.EXPORT_DIR}/{finetune.SCALES_FILE})")

    def fill(tmp: Path) -> None:
        shutil.copytree(source, tmp, ignore=lambda folder, names: ["unet"] if Path(folder) == source else [])
        convert.save(tmp / "unet", model, params)

    _write_atomically(out, fill)
    print(f"exported step {saved_step} of {workdir} ({mode}) as {out}", file=sys.stderr, flush=True)
    return out


def _write_atomically(out: Path, fill: Callable[[Path], Any]) -> None:
    """`fill(tmp)` writes a folder beside `out`, renamed to `out` once complete (no half-written export)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        fill(tmp)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str]) -> None:
    """The command line: `python -m diffax.train.pipeline_export --workdir=RUN --out=FOLDER [--step=N]`."""
    from absl import app, flags

    from diffax.cli import parse_flags, run_reporting_errors

    flags.DEFINE_string("workdir", None, "The run's workdir (with train.init_from: a pipeline folder is written).")
    flags.DEFINE_string("out", None, "The pipeline folder to write (must not exist).")
    flags.DEFINE_integer("step", None, "The checkpoint step to export (default: the newest good one).")
    flags.mark_flags_as_required(["workdir", "out"])

    def run(args: list[str]) -> None:
        del args
        export_pipeline(flags.FLAGS.workdir, flags.FLAGS.out, flags.FLAGS.step)

    app.run(run_reporting_errors(run), argv=argv, flags_parser=parse_flags)


if __name__ == "__main__":
    main(sys.argv)
