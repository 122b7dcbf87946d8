"""Peak resident memory of U-Net inference and of one training step, diffax against diffusers/torch, every
measurement in its own fresh process.

    python -m bench.memory            # SD 1.5's UNet, 64x64 latents, 77 tokens: inference b2 fp32 and bf16,
                                      # one AdamW step b1 (full size: run under `flock /tmp/diffax-big.lock`;
                                      # the train step needs ~20 GB)
    python -m bench.memory --quick    # a small UNet2DConditionModel and the digits U-Net
    python -m bench.memory --skip_train
    python -m bench.memory --skip_train --schedulers default memory   # diffax also with XLA:CPU's
                                      # memory-optimised scheduler (rows marked 'mem-sched')
    python -m bench.memory --xla_only --schedulers default memory     # XLA's buffer assignment of diffax's
                                      # programs only, compiled on abstract inputs: no weights, no torch

Each child process: imports, then `base` = its resident size (VmRSS) before any model exists; it loads the
weights (diffax: `convert.load(..., device=...)`, each tensor placed as it is converted; torch:
`from_pretrained`), compiles (diffax), and runs the
work once. The peak resident size (VmHWM, /proc/self/status) is read after each stage and reset between
them (`/proc/self/clear_refs`), so the table holds each stage's peak; `peak` is the process's whole peak,
`peak - base` what the model and the work added. diffax also reports XLA's buffer assignment of the
compiled program (`compiled.memory_analysis()`: arguments, outputs, the temporary arena).
Work:
  infer fp32 / bf16   one forward of `Case.batch` rows (weights and compute in that dtype; torch under
                      `inference_mode`).
  train               one step on batch 1: MSE of the predicted noise, gradients, AdamW (lr 1e-4, weight
                      decay 1e-2), fp32. diffax: one jitted program with the params and optimizer state
                      donated; torch: `loss.backward()` + `torch.optim.AdamW.step()` (its default
                      foreach implementation). With `remat` (diffax's config field, when the model has
                      one) the blocks are rematerialised ('full'), against torch's
                      `enable_gradient_checkpointing()`.
Scheduler: XLA:CPU's default instruction scheduler ('default', concurrency-optimised) may start independent
work early: in bf16 it converts every weight to fp32 at the start of the program and keeps all the copies
(a temporary arena of about the fp32 weights). 'memory' compiles diffax's program with
`compiler_options={'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'}` (the same as
`XLA_FLAGS=--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED`); torch's row is measured again
beside it.
diffax's process hands the compiler's freed memory back after each compile, as its train loop and pipelines
do (`diffax.host_memory.release_after_compiles`), and compiles with diffax's program options
(`diffax.xla_options`).
Outputs (inference) and losses (train) are compared between the libraries before anything is reported.
`--repeats` is accepted for the suite's sake; memory is measured once per case (it does not vary between
runs the way time does).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from bench import common, fresh  # importing the bench package first sets OMP_WAIT_POLICY for torch
from diffax import host_memory, xla_options

MODULE = "bench.memory"
MIB = 2.0 ** 20
LR, WEIGHT_DECAY = 1e-4, 1e-2
# --schedulers name -> XLA compiler options of diffax's program.
SCHEDULERS = {"default": {}, "memory": {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}}


# ----------------------------------------------------------------------------- child phases


class _Stages:
    """Peak resident size of each stage of this process (VmHWM read, then reset, at each stage's end)."""

    def __init__(self) -> None:
        self.base = fresh.rss_mib()
        self.resets = common.reset_peak_rss()
        self.out: dict[str, Any] = {"base_mib": self.base, "peak_resets": self.resets}
        self.peak = self.base
        self.start = time.perf_counter()

    def end(self, stage: str) -> None:
        """Records the peak since the last stage and the resident size now, and how long the stage took."""
        peak = fresh.rss_mib("VmHWM")
        self.peak = max(self.peak, peak)
        self.out[f"{stage}_peak_mib"] = peak
        self.out[f"{stage}_rss_mib"] = fresh.rss_mib()
        self.out[f"{stage}_s"] = time.perf_counter() - self.start
        if self.resets:
            common.reset_peak_rss()
        self.start = time.perf_counter()

    def result(self) -> dict[str, Any]:
        # Without resets VmHWM is the whole process's peak, the import's included.
        peak = self.peak if self.resets else fresh.rss_mib("VmHWM")
        # What the allocator holds but no object uses: glibc's malloc_trim hands freed pages back, so the
        # resident size after it is what is still live (weights, executable, caches).
        host_memory.release_freed()
        return {**self.out, "peak_mib": peak, "delta_mib": peak - self.base, "trimmed_rss_mib": fresh.rss_mib()}


def _compiler_options(spec: dict[str, Any]) -> dict[str, str]:
    """diffax's program options (`diffax.xla_options`) with the spec's scheduler's on top."""
    return {**xla_options.program_options(), **SCHEDULERS[spec.get("scheduler") or "default"]}


def _xla_stats(compiled: Any) -> dict[str, float]:
    stats = compiled.memory_analysis()
    return {"xla_args_mib": stats.argument_size_in_bytes / MIB, "xla_out_mib": stats.output_size_in_bytes / MIB,
            "xla_temp_mib": stats.temp_size_in_bytes / MIB, "xla_alias_mib": stats.alias_size_in_bytes / MIB,
            "xla_total_mib": (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
                              - stats.alias_size_in_bytes) / MIB,
            "xla_code_mib": stats.generated_code_size_in_bytes / MIB}


def _diffax_phase(spec: dict[str, Any]) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from diffax import convert

    jax.devices()
    case, work = fresh.CASES[spec["case"]], spec["work"]
    dtype = jnp.bfloat16 if work == "infer bf16" else None
    options = _compiler_options(spec)
    host_memory.release_after_compiles()  # as diffax's train loop and pipelines do
    stages = _Stages()
    # Each tensor is placed as it is converted: the host holds one tensor at a time beside the placed ones.
    module, params = convert.load(spec["folder"], dtype=dtype, param_dtype=dtype, device=jax.devices()[0])
    if spec.get("remat"):
        module = type(module)(dataclasses.replace(module.config, remat=spec["remat"]))
    params = jax.block_until_ready(params)
    batch = fresh.inputs(case, batch=1 if work == "train" else None)
    x, t, cond = (jax.device_put(batch[k].astype(dtype) if dtype and batch[k].dtype == np.float32 else batch[k])
                  for k in ("x", "t", "cond"))
    stages.end("load")
    if work == "train":
        apply = fresh.diffax_apply(module, case, train=True)
        tx = optax.adamw(LR, weight_decay=WEIGHT_DECAY)
        opt_state = jax.block_until_ready(jax.jit(tx.init)(params))
        stages.end("init")  # AdamW's two moments, apart from the compiler's memory
        target = jax.device_put(np.random.default_rng(1).standard_normal(batch["x"].shape).astype(np.float32))
        args = (params, opt_state, x, t, cond, target)
        compiled = jax.jit(_train_step(apply, tx), donate_argnums=(0, 1)).lower(*args).compile(
            compiler_options=options)
        stages.end("compile")
        _, _, y = jax.block_until_ready(compiled(*args))
    else:
        compiled = jax.jit(fresh.diffax_apply(module, case)).lower(params, x, t, cond).compile(
            compiler_options=options)
        stages.end("compile")
        y = jax.block_until_ready(compiled(params, x, t, cond))
    stages.end("run")
    np.save(spec["out"], np.asarray(y, np.float32))
    return {**stages.result(), **_xla_stats(compiled)}


def _train_step(apply: Any, tx: Any) -> Any:
    """(params, opt_state, x, t, cond, target) -> (params, opt_state, loss): MSE, gradients, one AdamW update."""
    import jax
    import jax.numpy as jnp
    import optax

    def step(params, opt_state, x, t, cond, target):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean((apply(p, x, t, cond) - target) ** 2))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def _xla_phase(spec: dict[str, Any]) -> dict[str, Any]:
    """XLA's buffer assignment of diffax's program for `spec`, compiled on abstract inputs (nothing is
    allocated, so a full-size train step fits any machine)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from diffax.models.registry import abstract_params, make_module

    case, work = fresh.CASES[spec["case"]], spec["work"]
    dtype = jnp.bfloat16 if work == "infer bf16" else None
    config = _config_cls(case).from_diffusers(case.diffusers_config(),
                                               **({"dtype": dtype, "param_dtype": dtype} if dtype else {}))
    if spec.get("remat"):
        config = dataclasses.replace(config, remat=spec["remat"])
    module, params = make_module(config), abstract_params(config)
    batch = fresh.inputs(case, batch=1 if work == "train" else None)
    x, t, cond = (jax.ShapeDtypeStruct(batch[k].shape, dtype if dtype and batch[k].dtype == np.float32
                                       else batch[k].dtype) for k in ("x", "t", "cond"))
    if work == "train":
        tx = optax.adamw(LR, weight_decay=WEIGHT_DECAY)
        step = _train_step(fresh.diffax_apply(module, case, train=True), tx)
        lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, jax.eval_shape(tx.init, params), x, t, cond,
                                                             jax.ShapeDtypeStruct(batch["x"].shape, jnp.float32))
    else:
        lowered = jax.jit(fresh.diffax_apply(module, case)).lower(params, x, t, cond)
    return _xla_stats(lowered.compile(compiler_options=_compiler_options(spec)))


def _torch_phase(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch

    common.setup_torch(spec.get("torch_threads"))
    case, work = fresh.CASES[spec["case"]], spec["work"]
    dtype = torch.bfloat16 if work == "infer bf16" else torch.float32
    stages = _Stages()
    model = fresh.load_torch_model(case, spec["folder"], dtype)
    batch = fresh.inputs(case, batch=1 if work == "train" else None)
    call = fresh.torch_apply(model, case, batch, dtype)
    stages.end("load")
    if work == "train":
        model.train()
        if spec.get("remat"):
            model.enable_gradient_checkpointing()
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        target = torch.from_numpy(np.ascontiguousarray(
            np.random.default_rng(1).standard_normal(batch["x"].shape).astype(np.float32).transpose(0, 3, 1, 2)))
        loss = torch.mean((call() - target) ** 2)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        y = loss.detach().numpy()
    else:
        with torch.inference_mode():
            y = fresh.nhwc(call())
    stages.end("run")
    np.save(spec["out"], np.asarray(y, np.float32))
    return stages.result()


def child(spec: dict[str, Any]) -> None:
    """Entry point of a child process: one phase of `spec`, reported on stdout."""
    if spec["phase"] == "build":
        fresh.save_torch_model(fresh.CASES[spec["case"]], spec["folder"])
        result = {}
    elif spec["phase"] == "torch":
        result = _torch_phase(spec)
    elif spec["phase"] == "xla":
        result = _xla_phase(spec)
    else:
        result = _diffax_phase(spec)
    fresh.report(result)


# ----------------------------------------------------------------------------- parent


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags; `parse_args(["--quick"])` gives the CPU-friendly sizes."""
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small UNet2DConditionModel and the digits U-Net")
    common.cases_flag(parser, sorted(fresh.CASES), help="default: sd15 (--quick: sd-small,digits)")
    parser.add_argument("--skip_train", action="store_true", help="inference only")
    parser.add_argument("--schedulers", nargs="+", choices=sorted(SCHEDULERS), default=["default"],
                        help="XLA:CPU schedulers diffax's programs are compiled with, a row each (module doc)")
    parser.add_argument("--xla_only", action="store_true",
                        help="only XLA's buffer assignment of diffax's programs, on abstract inputs (module doc)")
    parser.add_argument("--repeats", type=int, default=5, help="accepted and unused (see the module doc)")
    parser.add_argument("--torch_threads", type=int, default=None, help="default: the machine's cores")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.cases:
        args.cases = ["sd-small", "digits"] if args.quick else ["sd15"]
    return args


def _config_cls(case: fresh.Case) -> Any:
    from diffax.models.unet2d import UNet2DConfig
    from diffax.models.unet2d_condition import UNet2DConditionConfig

    return UNet2DConditionConfig if case.kind == "text" else UNet2DConfig


def _has_remat(case: fresh.Case) -> bool:
    return "remat" in {f.name for f in dataclasses.fields(_config_cls(case))}


def _works(args: argparse.Namespace, case: fresh.Case) -> list[tuple[str, str | None, str]]:
    works = [("infer fp32", None), ("infer bf16", None)]
    if not args.skip_train:
        works.append(("train", None))
        if _has_remat(case):
            works.append(("train", "full"))
    return [(work, remat, scheduler) for scheduler in args.schedulers for work, remat in works]


def _row_label(name: str, work: str, remat: str | None, scheduler: str) -> str:
    return f"{_label(name)} {work}{' remat' if remat else ''}{' mem-sched' if scheduler != 'default' else ''}"


def run_work(args: argparse.Namespace, name: str, work: str, remat: str | None, tmp: Path,
             scheduler: str = "default") -> dict[str, Any]:
    """One (case, work) pair: torch's process, then diffax's (compiled with `scheduler`); returns the row."""
    import numpy as np

    case = fresh.CASES[name]
    results, outs = {}, {}
    for phase in ("torch", "diffax"):
        spec = {"phase": phase, "case": name, "work": work, "remat": remat, "scheduler": scheduler,
                "folder": str(tmp / name),
                "out": str(tmp / f"{phase}.npy"), "torch_threads": args.torch_threads}
        results[phase] = fresh.run_child(MODULE, spec)
        outs[phase] = np.load(spec["out"])
    if work == "train":  # the losses of the same step
        err = abs(float(outs["diffax"]) - float(outs["torch"])) / abs(float(outs["torch"]))
        tol = 1e-4
    else:
        err = common.rel_err(outs["diffax"], outs["torch"])
        tol = 1e-4 if work == "infer fp32" else 5e-2  # bf16: 8 mantissa bits, rounded in different places
    common.check_agreement(f"{name} {work}", err, tol)
    d, t = results["diffax"], results["torch"]
    b = 1 if work == "train" else case.batch
    label = f"{_row_label(name, work, remat, scheduler)} b{b}"
    return {
        "case": label, "group": "memory", "work": work, "remat": remat, "scheduler": scheduler,
        "diffax_delta_mib": d["delta_mib"], "torch_delta_mib": t["delta_mib"],
        "ratio": d["delta_mib"] / t["delta_mib"],
        "diffax_peak_mib": d["peak_mib"], "torch_peak_mib": t["peak_mib"],
        "diffax_base_mib": d["base_mib"], "torch_base_mib": t["base_mib"],
        "diffax_load_mib": d["load_peak_mib"] - d["base_mib"],
        "torch_load_mib": t["load_peak_mib"] - t["base_mib"],
        "diffax_held_mib": d["load_rss_mib"] - d["base_mib"], "torch_held_mib": t["load_rss_mib"] - t["base_mib"],
        "diffax_opt_state_mib": d["init_rss_mib"] - d["load_rss_mib"] if "init_rss_mib" in d else None,
        "diffax_compile_mib": d["compile_peak_mib"] - d.get("init_rss_mib", d["load_rss_mib"]),
        "diffax_after_compile_mib": d["compile_rss_mib"] - d.get("init_rss_mib", d["load_rss_mib"]),
        "diffax_live_mib": d["trimmed_rss_mib"] - d["base_mib"], "torch_live_mib": t["trimmed_rss_mib"] - t["base_mib"],
        "diffax_run_mib": d["run_peak_mib"] - d["compile_rss_mib"],
        "torch_run_mib": t["run_peak_mib"] - t["load_rss_mib"],
        **{k: v for k, v in d.items() if k.startswith("xla_")},
        "max_rel_err": err, "diffax": d, "torch": t,
    }


def _label(name: str) -> str:
    return {"sd15": "SD1.5 UNet 64x64", "sd-small": "small SD UNet 32x32", "digits": "digits UNet 16x16"}[name]


# (header, row key, format) of the memory table, MiB. peak: the process's peak above its resident size
# before the model; weights: resident after loading; compile +: the compiler's peak above that (retained
# after: the allocator keeps most of it); run +: the work's peak above what was resident before it; live:
# resident at the end after malloc_trim (what is still in use), above the base.
COLUMNS = (
    ("case", "case", "{}"),
    ("diffax peak", "diffax_delta_mib", "{:.0f}"),
    ("torch peak", "torch_delta_mib", "{:.0f}"),
    ("diffax/torch", "ratio", "{:.2f}x"),
    ("diffax weights", "diffax_held_mib", "{:.0f}"),
    ("torch weights", "torch_held_mib", "{:.0f}"),
    ("diffax load peak", "diffax_load_mib", "{:.0f}"),
    ("torch load peak", "torch_load_mib", "{:.0f}"),
    ("compile +", "diffax_compile_mib", "{:.0f}"),
    ("retained", "diffax_after_compile_mib", "{:.0f}"),
    ("diffax run +", "diffax_run_mib", "{:.0f}"),
    ("torch run +", "torch_run_mib", "{:.0f}"),
    ("diffax live", "diffax_live_mib", "{:.0f}"),
    ("torch live", "torch_live_mib", "{:.0f}"),
    ("XLA args", "xla_args_mib", "{:.0f}"),
    ("XLA temp", "xla_temp_mib", "{:.0f}"),
    ("diffax abs", "diffax_peak_mib", "{:.0f}"),
    ("torch abs", "torch_peak_mib", "{:.0f}"),
    ("max rel err", "max_rel_err", "{:.1e}"),
)


def run(args: argparse.Namespace, peak: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Runs every case, writes bench/results/memory.json (memory_quick.json) and returns the rows. `peak` is
    not used (memory is not a FLOP/s measure); it is stored when given. With --xla_only: `run_xla`."""
    if args.xla_only:
        return run_xla(args, peak)
    rows = []
    with tempfile.TemporaryDirectory(prefix="diffax-memory-") as tmp:
        for name in args.cases:
            fresh.run_child(MODULE, {"phase": "build", "case": name, "folder": str(Path(tmp) / name)})
            for work, remat, scheduler in _works(args, fresh.CASES[name]):
                start = time.perf_counter()
                try:
                    row = run_work(args, name, work, remat, Path(tmp), scheduler)
                except RuntimeError as e:  # e.g. a child killed for memory: keep the other rows
                    row = {"case": _row_label(name, work, remat, scheduler), "group": "memory", "work": work,
                           "remat": remat, "scheduler": scheduler, "error": str(e).splitlines()[0]}
                    print(row["error"], flush=True)
                row["bench_s"] = time.perf_counter() - start
                rows.append(row)
                print(f"{row['case']}: {row['bench_s']:.0f} s", flush=True)
                # After every row: a full-size run takes long enough that a partial result is worth keeping.
                common.write_json("memory" + ("_quick" if args.quick else ""), {
                    "benchmark": "memory", "args": vars(args), "machine": common.machine_info(),
                    "matmul_peak": peak, "rows": rows})
    return rows


# (header, row key, format) of the --xla_only table, MiB.
XLA_COLUMNS = (
    ("case", "case", "{}"),
    ("XLA args", "xla_args_mib", "{:.0f}"),
    ("XLA out", "xla_out_mib", "{:.0f}"),
    ("aliased", "xla_alias_mib", "{:.0f}"),
    ("XLA temp", "xla_temp_mib", "{:.0f}"),
    ("XLA total", "xla_total_mib", "{:.0f}"),
)


def run_xla(args: argparse.Namespace, peak: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """XLA's buffer assignment of diffax's program for every (case, work, scheduler), each compiled in a
    fresh process on abstract inputs; writes bench/results/memory_xla.json (memory_xla_quick.json)."""
    rows = []
    for name in args.cases:
        for work, remat, scheduler in _works(args, fresh.CASES[name]):
            b = 1 if work == "train" else fresh.CASES[name].batch
            spec = {"phase": "xla", "case": name, "work": work, "remat": remat, "scheduler": scheduler}
            row = {"case": f"{_row_label(name, work, remat, scheduler)} b{b}", "group": "memory", "work": work,
                   "remat": remat, "scheduler": scheduler, **fresh.run_child(MODULE, spec)}
            rows.append(row)
            print(f"{row['case']}: temp {row['xla_temp_mib']:.0f} MiB", flush=True)
            common.write_json("memory_xla" + ("_quick" if args.quick else ""), {
                "benchmark": "memory_xla", "args": vars(args), "machine": common.machine_info(),
                "matmul_peak": peak, "rows": rows})
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    """Run from the command line and print the table."""
    args = parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return
    common.print_table(run(args), XLA_COLUMNS if args.xla_only else COLUMNS)


if __name__ == "__main__":
    main(sys.argv[1:])
