"""Benchmark phases that must run in a fresh Python process (start-up and memory), and the U-Net cases they
share.

A fresh process is the only honest place to measure what a user pays on start-up (nothing compiled or
cached in memory) and a peak resident size (nothing left over from another library or an earlier case).
The parent runs `python -m <module> --child '<json spec>'`; the child does one phase and prints one line
`RESULT <json>`, which `run_child` returns as a dict.

Cases (one model call each, the work both modules measure):
  sd15      Stable Diffusion 1.5's UNet2DConditionModel (`bench.models.SD15_UNET`, 860 M parameters) on
            64x64x4 latents, batch 2, 77 tokens of 768-wide text states.
  sd-small  the same layout at small widths (`bench.models.SMALL_SD15_UNET`), 32x32 latents, 77 tokens.
  digits    the `make demo` recipe's class-conditional UNet2DModel (configs/digits.py), batch 2 at 16x16x1.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from bench import common  # importing the bench package first sets OMP_WAIT_POLICY for torch
from bench import models

MARKER = "RESULT "



@dataclasses.dataclass(frozen=True)
class Case:
    """One model call: a diffusers U-Net config and the inputs it is called on."""
    name: str
    kind: str               # "text": UNet2DConditionModel; "class": UNet2DModel with class labels
    side: int               # latent side
    batch: int = 2
    tokens: int = 77        # text states per example ("text" only)

    def diffusers_config(self) -> dict[str, Any]:
        """The diffusers config.json keys of this case's model."""
        if self.name == "sd15":
            return dict(models.SD15_UNET)
        if self.name == "sd-small":
            return dict(models.SMALL_SD15_UNET)
        from diffax.models import build_model
        from bench.unet_sampling import load_recipe

        config = build_model(load_recipe().model).config.to_diffusers()
        return {k: v for k, v in config.items() if not k.startswith("_")}


CASES = {"sd15": Case("sd15", "text", 64), "sd-small": Case("sd-small", "text", 32),
         "digits": Case("digits", "class", 16)}


def torch_model(case: Case) -> Any:
    """diffusers' model for `case` with random weights (`bench.models.perturb`)."""
    import diffusers
    import torch

    if case.kind == "text":
        return models.torch_unet(case.diffusers_config())
    torch.manual_seed(0)
    return models.perturb(diffusers.UNet2DModel(**case.diffusers_config()), 1)


def save_torch_model(case: Case, folder: str | os.PathLike) -> None:
    """Builds `torch_model(case)` and writes it as a diffusers folder (safetensors)."""
    torch_model(case).save_pretrained(folder, max_shard_size=models.MAX_SHARD_SIZE)


def load_torch_model(case: Case, folder: str | os.PathLike, dtype: Any = None) -> Any:
    """The diffusers model saved in `folder`, in eval mode, its weights in `dtype` (default float32)."""
    import diffusers

    cls = diffusers.UNet2DConditionModel if case.kind == "text" else diffusers.UNet2DModel
    return cls.from_pretrained(folder, torch_dtype=dtype).eval()


def inputs(case: Case, batch: int | None = None) -> dict[str, np.ndarray]:
    """The call's inputs, NHWC: x [B, S, S, C], t [B] int32, and text [B, tokens, D] or labels [B]."""
    config = case.diffusers_config()
    b = batch or case.batch
    rng = np.random.default_rng(0)
    channels = config.get("in_channels", 4)
    out = {"x": rng.standard_normal((b, case.side, case.side, channels)).astype(np.float32),
           "t": rng.integers(0, 1000, b).astype(np.int32)}
    if case.kind == "text":
        out["cond"] = rng.standard_normal((b, case.tokens, config["cross_attention_dim"])).astype(np.float32)
    else:
        out["cond"] = rng.integers(0, config["num_class_embeds"], b).astype(np.int32)
    return out


def diffax_apply(module: Any, case: Case, train: bool = False):
    """(params, x, t, cond) -> output [B, S, S, C] of the diffax module converted from `case`'s folder."""
    key = "encoder_hidden_states" if case.kind == "text" else "class_labels"

    def apply(params: Any, x: Any, t: Any, cond: Any) -> Any:
        return module.apply({"params": params}, x, t, **{key: cond}, train=train)

    return apply


def torch_apply(model: Any, case: Case, batch: Mapping[str, np.ndarray], dtype: Any = None):
    """() -> output [B, C, S, S] of the torch model on `batch` (moved to NCHW, cast to `dtype`)."""
    import torch

    dtype = dtype or torch.float32
    x = torch.from_numpy(np.ascontiguousarray(batch["x"].transpose(0, 3, 1, 2))).to(dtype)
    t = torch.from_numpy(batch["t"].astype(np.int64))
    if case.kind == "text":
        cond = torch.from_numpy(batch["cond"]).to(dtype)
        return lambda: model(x, t, encoder_hidden_states=cond).sample
    cond = torch.from_numpy(batch["cond"].astype(np.int64))
    return lambda: model(x, t, cond).sample


def nhwc(y: Any) -> np.ndarray:
    """A torch NCHW output as a float32 NHWC numpy array."""
    return y.detach().float().cpu().numpy().transpose(0, 2, 3, 1)


def rss_mib(field: str = "VmRSS") -> float:
    """This process's resident size (`VmRSS`) or its peak so far (`VmHWM`) from /proc/self/status, MiB."""
    kib = common.proc_kib("/proc/self/status", field)
    if kib is None:
        raise RuntimeError(f"/proc/self/status has no {field} line (Linux only)")
    return kib / 1024


def run_child(module: str, spec: Mapping[str, Any], timeout: float = 3600) -> dict[str, Any]:
    """Runs `python -m <module> --child <spec as json>` in a fresh process and returns its RESULT dict.
    `spec['spawned_at']` is set to the wall clock just before the process starts."""
    spec = {**spec, "spawned_at": time.time()}
    proc = subprocess.run([sys.executable, "-m", module, "--child", json.dumps(spec)], capture_output=True,
                          text=True, timeout=timeout, cwd=Path(__file__).resolve().parent.parent)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    raise RuntimeError(f"{module} child {spec.get('phase')} failed (exit {proc.returncode}):\n"
                       f"{proc.stderr[-3000:]}")


def report(result: Mapping[str, Any]) -> None:
    """A child's last act: print its RESULT line."""
    print(MARKER + json.dumps(result, default=float), flush=True)
