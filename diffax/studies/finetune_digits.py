"""Fine-tuning comparison on a digits transfer task: pretrain on digits 0-4, adapt to 5-9.

    JAX_PLATFORMS=cpu python -m diffax.studies.finetune_digits                 # writes docs/ table and plot
    JAX_PLATFORMS=cpu python -m diffax.studies.finetune_digits --quick --workdir=/tmp/ft --nowrite_docs

The digits U-Net of configs/digits.py is pretrained on digits 0-4 (`data.classes`), then adapted to 5-9 with
the same number of steps by each mode of `train.finetune` (diffax.train.finetune): full fine-tuning, LoRA
(rank 8 on every Dense / Conv) and TuneQDM (int8 per-channel base, K = 4 timestep groups). "No tuning" is the
pretrained model quantized to int8 as TuneQDM's base, sampled on 5-9 as it is. Each training runs
`train.py` in its own process, so its peak resident memory is its own. Per mode:

  trainable     parameters the optimizer updates (Adam keeps two moments of each)
  step MiB      the train step's XLA buffer assignment: arguments + outputs + temporaries - aliased (donated)
  RSS MiB       the training process's peak resident memory (getrusage), which includes the runtime itself
  saved         bytes of what a task keeps: full: the weights (safetensors, fp32); LoRA: the exported
                pytorch_lora_weights.safetensors; TuneQDM: the scale file (the int8 base is shared)
  wall s        the training process, start to exit (start-up and compilation included)
  accuracy      class accuracy of `samples` images of 5-9 (diffax.evaluation.digits_classifier)
  FID           Frechet distance of their digits features to the real 5-9 digits' (diffax.evaluation.fid)

Workdirs are kept under --workdir; a mode whose export (or checkpoint) is there is not retrained.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging

from diffax import parallel
from diffax.cli import run_reporting_errors
from diffax.data.digits import load_digits_arrays
from diffax.evaluation.digits_classifier import class_accuracy
from diffax.evaluation.digits_features import digits_features
from diffax.evaluation.fid import feature_stats, frechet_distance
from diffax.models import build_model
from diffax.pipelines.generation import GenerationPipeline
from diffax.quant import quantize_params
from diffax.schedulers.names import scheduler_for
from diffax.train import finetune
from diffax.train.checkpoint import restore_for_sampling
from diffax.train.loop import jit_train_step, make_objective
from diffax.train.state import make_optimizer

ROOT = Path(__file__).resolve().parents[2]
PRETRAIN, ADAPT = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
MODES = ("full", "lora", "tuneqdm")
# Per mode: train block overrides. Adapters and scales take a larger learning rate than the whole network.
MODE_OPTIONS = {
    "full": {"learning_rate": 1e-3},
    "lora": {"learning_rate": 3e-3, "lora.rank": 8, "lora.alpha": 8.0, "lora.targets": "all"},
    "tuneqdm": {"learning_rate": 3e-3, "tuneqdm.bits": 8, "tuneqdm.groups": 4},
}
DOC_BEGIN, DOC_END = "<!-- finetune_digits:begin -->", "<!-- finetune_digits:end -->"

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags, defined only when run as a program: the studies import side by side."""
    flags.DEFINE_string("workdir", "runs/finetune_digits", "Workdirs of the pretraining and of each mode.")
    flags.DEFINE_bool("quick", False, "A tiny U-Net and a few steps: checks the whole study in minutes.")
    flags.DEFINE_integer("pretrain_steps", 500, "Steps on digits 0-4.")
    flags.DEFINE_integer("adapt_steps", 200, "Steps of each mode on digits 5-9.")
    flags.DEFINE_integer("batch_size", 32, "Batch size of every run.")
    flags.DEFINE_integer("samples", 200, "Samples of 5-9 per mode for accuracy and FID.")
    flags.DEFINE_bool("write_docs", True, "Write the table into docs/efficiency.md and the plot to docs/images/.")


def settings(mode: str | None, quick: bool, base: Path | None, steps: int) -> dict[str, Any]:
    """{dotted config key: value} over configs/digits.py of the pretraining (mode None) or of one mode."""
    out = {"train.batch_size": FLAGS.batch_size, "train.log_every": 50, "train.sample_every": 0,
           "train.keep_checkpoints": 1, "train.steps": steps, "train.checkpoint_every": steps}
    if quick:  # the tiny U-Net of the tests
        out.update({"model.block_out_channels": (8, 16), "model.down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
                    "model.up_block_types": ("AttnUpBlock2D", "UpBlock2D"), "model.attention_head_dim": 8,
                    "model.norm_num_groups": 4})
    if mode is None:
        return {**out, "data.classes": PRETRAIN}
    out.update({"data.classes": ADAPT, "train.init_from": str(base), "train.finetune": mode,
                "train.warmup_steps": max(1, steps // 10)})
    return {**out, **{f"train.{k}": v for k, v in MODE_OPTIONS[mode].items()}}


def overrides(values: dict[str, Any]) -> list[str]:
    """`settings` as train.py flags (tuples as Python literals, as config_flags parses them)."""
    return [f"--config.{k}={v!r}" if isinstance(v, tuple) else f"--config.{k}={v}" for k, v in values.items()]


def make_config(values: dict[str, Any]) -> ml_collections.ConfigDict:
    """configs/digits.py with `settings` applied: the config train.py runs with those flags."""
    from configs.digits import get_config  # the recipe lives beside train.py
    c = get_config()
    for key, value in values.items():
        *blocks, last = key.split(".")
        node = c
        for b in blocks:
            node = node[b]
        node[last] = value
    return c


def run_train(workdir: Path, overrides: list[str]) -> dict[str, float]:
    """train.py in a child process: {'wall_s', 'rss_mib'} (its own peak resident memory)."""
    cmd = [sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs/digits.py'}", f"--workdir={workdir}",
           *overrides]
    start = time.perf_counter()
    with open(workdir.with_suffix(".log"), "w") as log:
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {child.returncode}); see {workdir.with_suffix('.log')}")
    return {"wall_s": time.perf_counter() - start, "rss_mib": usage.ru_maxrss / 1024}  # ru_maxrss is in KiB


def step_memory(config: ml_collections.ConfigDict) -> tuple[int, float]:
    """(trainable parameters, the train step's XLA buffer assignment in MiB) of a fine-tuning config."""
    mesh, rules = parallel.mesh_from_config(config.mesh)
    model = build_model(config.model)
    tuning = finetune.prepare(config, model)
    tx = make_optimizer(config.train)
    state, shardings = tuning.create_state(model, tx, mesh, rules)
    step_fn = jit_train_step(model, tx, make_objective(config, model), mesh, rules, shardings, config.train,
                             view=tuning.view)
    b, shape = config.train.batch_size, model.config.sample_shape
    batch = {"image": jnp.zeros((b, *shape)), "cond": {"class_labels": jnp.zeros((b,), jnp.int32)}}
    memory = step_fn.lower(state, batch, jax.random.key(0)).compile().memory_analysis()
    total = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
             - memory.alias_size_in_bytes)
    trainable = int(sum(np.size(x) for x in jax.tree.leaves(state.params)))
    return trainable, total / 2**20


def saved_bytes(mode: str, workdir: Path, params: Any) -> int:
    """Bytes of what one task keeps (see the module docstring)."""
    if mode == "full":
        from diffax.convert.io import write_safetensors
        from diffax.quant.quantize import flatten
        path = workdir / finetune.EXPORT_DIR / "weights.safetensors"
        path.parent.mkdir(exist_ok=True)
        write_safetensors(path, {"/".join(k): np.asarray(v) for k, v in flatten(params).items()})
        return path.stat().st_size
    name = finetune.LORA_FILE if mode == "lora" else finetune.SCALES_FILE
    return (workdir / finetune.EXPORT_DIR / name).stat().st_size


def evaluate(workdir: Path, count: int, quick: bool, untuned: str | None = None) -> dict[str, float]:
    """Class accuracy and FID (against the real 5-9 digits) of `count` samples of 5-9 from a workdir: its
    own weights, or with `untuned` ('float' / 'int8') the pretrained model as it is."""
    config, params, _ = restore_for_sampling(workdir)
    model = build_model(config.model)
    view = None
    if untuned == "int8":
        params = quantize_params(params, 8).params
    elif untuned is None and config.train.finetune != "full":
        params, view = finetune.sampling_params(config, params, model, workdir)
    pipe = GenerationPipeline(model, scheduler_for("ddim", config.diffusion), parallel.make_mesh({"data": -1}),
                              param_view=view)
    labels = np.resize(np.asarray(ADAPT), count)
    images = pipe(params, jax.random.key(1), labels=labels, num_inference_steps=2 if quick else 25,
                  guidance_scale=config.sample.guidance_scale)
    real, real_labels = load_digits_arrays(images.shape[1], 1)
    real = real[np.isin(real_labels, ADAPT)]
    fid = frechet_distance(feature_stats(digits_features(images)), feature_stats(digits_features(real)))
    return {"accuracy": class_accuracy(images, labels), "fid": fid}


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of the study's rows."""
    head = ("| mode | trainable params | train step MiB (XLA) | peak RSS MiB | saved per task | wall s | "
            "class accuracy | FID (5-9) |\n|---|---:|---:|---:|---:|---:|---:|---:|\n")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines = [f"| {r['mode']} | {fmt(r.get('trainable'), ',')} | {fmt(r.get('step_mib'), '.1f')} | "
             f"{fmt(r.get('rss_mib'), '.0f')} | {_size(r.get('saved_bytes'))} | {fmt(r.get('wall_s'), '.0f')} | "
             f"{r['accuracy']:.1%} | {r['fid']:.2f} |" for r in rows]
    return head + "\n".join(lines) + "\n"


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy, FID, saved bytes and step memory per mode, one panel each."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [r["mode"] for r in rows]
    panels = [("class accuracy (5-9)", [r["accuracy"] for r in rows], False),
              ("FID to real 5-9 (lower is better)", [r["fid"] for r in rows], False),
              ("saved per task (bytes, log)", [r.get("saved_bytes") or 0 for r in rows], True),
              ("train step MiB (XLA)", [r.get("step_mib") or 0 for r in rows], False)]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    colors = ["#4c72b0", "#55a868", "#c44e52", "#8172b2", "#937860"][:len(rows)]
    for ax, (title, values, log) in zip(axes, panels):
        ax.bar(names, values, color=colors)
        ax.set_title(title, fontsize=10)
        if log:
            ax.set_yscale("log")
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle("digits transfer: pretrained on 0-4, adapted to 5-9 (same steps per mode)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_doc(doc: Path, text: str) -> None:
    """Replace the text between the study's markers in `doc`."""
    content = doc.read_text()
    if DOC_BEGIN not in content:
        raise ValueError(f"{doc}: no {DOC_BEGIN} marker to write the table at")
    pattern = re.compile(re.escape(DOC_BEGIN) + ".*?" + re.escape(DOC_END), re.S)
    doc.write_text(pattern.sub(lambda _: f"{DOC_BEGIN}\n{text}{DOC_END}", content))


def run_study(workdir: Path, quick: bool, pretrain_steps: int, adapt_steps: int, samples: int) -> list[dict]:
    """Pretrain, adapt with each mode, measure; returns one row per mode (no tuning first)."""
    workdir.mkdir(parents=True, exist_ok=True)
    base = (workdir / "pretrain").absolute()
    if not (base / "checkpoints").is_dir():
        print(f"pretraining on digits {PRETRAIN} for {pretrain_steps} steps", flush=True)
        info = run_train(base, overrides(settings(None, quick, None, pretrain_steps)))
        print(f"  {info['wall_s']:.0f} s", flush=True)
    rows = []
    for untuned, name in (("float", "pretrained, no tuning (fp32)"), ("int8", "no tuning (int8 base)")):
        results = workdir / f"untuned_{untuned}.json"
        if not results.exists():
            results.write_text(json.dumps({"mode": name, **evaluate(base, samples, quick, untuned)}, indent=1))
        rows.append(json.loads(results.read_text()))
    for mode in MODES:
        run = workdir / mode
        results = workdir / f"{mode}.json"
        if results.exists():
            rows.append(json.loads(results.read_text()))
            continue
        print(f"{mode}: adapting to digits {ADAPT} for {adapt_steps} steps", flush=True)
        values = settings(mode, quick, base, adapt_steps)
        info = run_train(run, overrides(values))
        trainable, step_mib = step_memory(make_config(values))
        _, ema, _ = restore_for_sampling(run)
        row = {"mode": mode, "trainable": trainable, "step_mib": step_mib, **info,
               "saved_bytes": saved_bytes(mode, run, ema), **evaluate(run, samples, quick)}
        results.write_text(json.dumps(row, indent=1))
        print(f"  {row}", flush=True)
        rows.append(row)
    return rows


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    quick = FLAGS.quick
    pre, adapt, samples = (4, 3, 20) if quick else (FLAGS.pretrain_steps, FLAGS.adapt_steps, FLAGS.samples)
    workdir = Path(FLAGS.workdir)
    rows = run_study(workdir, quick, pre, adapt, samples)
    text = table(rows)
    (workdir / "table.md").write_text(text)
    plot(rows, workdir / "finetune_digits.png")
    print(text, flush=True)
    if FLAGS.write_docs:
        plot(rows, ROOT / "docs" / "images" / "finetune_digits.png")
        settings = (f"Pretrained {pre} steps on digits 0-4, then {adapt} steps per mode on 5-9, batch "
                    f"{FLAGS.batch_size}; {samples} samples (DDIM, 25 steps, guidance 3) per row.\n\n")
        write_doc(ROOT / "docs" / "efficiency.md", settings + text)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # configs/ beside train.py
    define_flags()
    app.run(run_reporting_errors(main))
