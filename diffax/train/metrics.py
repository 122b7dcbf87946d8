"""Training metrics you can watch: TensorBoard event files and a JSON-lines file, written by process 0.

    WORKDIR/metrics.jsonl       one {"step": N, "loss": ..., ...} object per logged step (grep, pandas)
    WORKDIR/tensorboard/        event files: `tensorboard --logdir WORKDIR/tensorboard`

The event files come from tensorboardX, so writing them needs no TensorFlow. Model FLOP utilisation (MFU)
is the step's FLOPs, as XLA's cost analysis of the compiled step counts them, per second of training
against a peak FLOP/s the user states (`train.peak_flops`): the compiler knows the work, only the user
knows the chip.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import jax

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsWriter:
    """Scalars per step to `workdir/metrics.jsonl` and TensorBoard; a no-op on every process but 0.

    A resumed run passes `resume_step`: logged steps past it (written after the last checkpoint by the run
    that stopped) are dropped from the JSON-lines file, so it holds each step once.
    """

    def __init__(self, workdir: str | os.PathLike, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        workdir = Path(workdir)
        path = workdir / METRICS_FILE
        if resume_step and path.exists():
            kept = [line for line in path.read_text().splitlines() if _step_of(line, default=resume_step + 1)
                    <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        self._jsonl = open(path, "a" if resume_step else "w")
        self._tb = _tensorboardx().SummaryWriter(logdir=str(workdir / TENSORBOARD_DIR),
                                                 purge_step=resume_step + 1 if resume_step else None)

    def write(self, step: int, scalars: Mapping[str, float], section: str = "train") -> None:
        """Record `scalars` (name -> number) at `step`, in TensorBoard under `section/` ('train', or 'eval'
        for the evaluation hook's numbers)."""
        if not self.enabled:
            return
        values = {k: float(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        self._jsonl.flush()
        for name, value in values.items():
            self._tb.add_scalar(f"{section}/{name}", value, global_step=int(step))
        self._tb.flush()

    def close(self) -> None:
        """Flush and close the files."""
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def _tensorboardx():
    """The tensorboardX module, imported without torch unless torch is already loaded. tensorboardX imports
    torch whenever it is installed (diffax's conversion extra), only to accept torch tensors as values, and
    that import doubled a training process's start-up (3.5 s against 1.8 s) and its resident memory;
    diffax logs Python floats."""
    if "torch" in sys.modules:
        import tensorboardX
        return tensorboardX
    sys.modules["torch"] = None  # an ImportError for `import torch`, which tensorboardX catches
    try:
        import tensorboardX
    finally:
        del sys.modules["torch"]
    return tensorboardX


def _step_of(line: str, default: int) -> int:
    """The step of a metrics.jsonl line; `default` for a line a killed run left half-written."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return default


def compiled_flops(jitted: Any, *args: Any) -> float | None:
    """FLOPs of one call of `jitted(*args)` per device, from XLA's cost analysis; None where the backend
    reports none. The compile is the one the call itself uses (jax caches it), so this costs no second one."""
    analysis = jitted.lower(*args).compile().cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def step_scalars(metrics: Mapping[str, Any], *, steps: int, seconds: float, batch_size: int,
                 learning_rate: float, step_flops: float | None = None, peak_flops: float = 0.0
                 ) -> dict[str, float]:
    """What a log line shows: the step's metrics (loss, grad_norm; mse and vb for learned variance), the
    learning rate, throughput over the last `steps` steps that took `seconds`, and MFU (`step_flops`, per
    device, against `peak_flops` of one device) when both are known."""
    scalars = {k: float(v) for k, v in metrics.items()}
    scalars["learning_rate"] = float(learning_rate)
    steps_per_sec = steps / seconds
    scalars["steps_per_sec"] = steps_per_sec
    scalars["images_per_sec"] = steps_per_sec * batch_size
    if step_flops and peak_flops > 0:
        scalars["mfu"] = step_flops * steps_per_sec / peak_flops
    return scalars
