"""Start-up cost of a U-Net call, each measurement in a fresh process: cold compile, warm start from XLA's
persistent compilation cache, and an ahead-of-time (AOT) serialised executable; torch's first call beside.

    python -m bench.startup                   # SD 1.5's UNet, 64x64 latents, batch 2, 77 tokens (full size:
                                              # run under `flock /tmp/diffax-big.lock`)
    python -m bench.startup --quick           # a small UNet2DConditionModel and the digits U-Net
    python -m bench.startup --torch_compile   # also torch.compile's cold first call (slow on a CPU)

Per round (`--rounds`, each with a new empty cache folder), every step a new process:
  cold     empty `jax_compilation_cache_dir`: trace + lower, XLA compile (and write the cache entry), first
           call; then `--repeats` more calls (the steady state) and the executable serialised for `aot`.
  warm     the same program in a new process with the folder `cold` filled: trace + lower again (the cache
           key is the lowered program), the compile step reads the entry instead of compiling, first call.
  aot      `cold` wrote `jax.experimental.serialize_executable.serialize(compiled)` to a file; a new process
           reads it with `deserialize_and_load` (no tracing, lowering or compiling) and calls it.
  torch    `from_pretrained`, the first eager call and `--repeats` more (torch has no compile step).
Weight loading (diffax: `convert.load` + `bench.models.to_device`; torch: `from_pretrained`) and the first
call (one forward pass, the same work in every phase) are timed apart from compilation, so warm / cold and
AOT / cold are ratios of compilation alone; time to a first result is reported beside. The persistent
cache writes every entry here (`jax_persistent_cache_min_compile_time_secs=0`, min entry size off); diffax's
`compilation.enable_persistent_cache` keeps jax's defaults, under which a program that compiles in < 1 s is not cached.
The first calls' outputs of every phase are compared with torch's before anything is reported.
"""
from __future__ import annotations

import argparse
import json
import logging
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from bench import common, fresh, models  # importing the bench package first sets OMP_WAIT_POLICY for torch

MODULE = "bench.startup"


# ----------------------------------------------------------------------------- child phases


def _steady(call: Any, repeats: int) -> float:
    """Median seconds of `repeats` calls after the first: the steady state the start-up leads to."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _MissLog(logging.Handler):
    """Collects the names of the programs jax reports as persistent-cache misses."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.names: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "PERSISTENT COMPILATION CACHE MISS for" in message:
            self.names.append(message.split("'")[1])


def _jax_phase(spec: dict[str, Any]) -> dict[str, Any]:
    """cold (which then serialises its executable) / warm / aot: one diffax start-up in this (fresh) process."""
    import jax
    import numpy as np

    from diffax import convert, xla_options

    imported_at = time.time()
    if spec["cache_dir"]:
        jax.config.update("jax_compilation_cache_dir", spec["cache_dir"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    events: list[str] = []
    jax.monitoring.register_event_listener(lambda name, **_: events.append(name))
    misses = _MissLog()
    jax.config.update("jax_explain_cache_misses", True)
    logging.getLogger("jax._src.compiler").addHandler(misses)
    case = fresh.CASES[spec["case"]]
    out: dict[str, Any] = {"imports_s": imported_at - spec["spawned_at"]}
    start = time.perf_counter()
    jax.devices()
    out["backend_s"] = time.perf_counter() - start

    start = time.perf_counter()
    module, params = convert.load(spec["folder"])
    params = jax.block_until_ready(models.to_device(params))  # one leaf at a time: never two copies
    out["load_s"] = time.perf_counter() - start
    batch = {k: jax.device_put(v) for k, v in fresh.inputs(case).items()}
    args = (params, batch["x"], batch["t"], batch["cond"])
    xla_options.program_options()  # its one-off check compiles a tiny program: run (and cached) untimed

    if spec["phase"] == "aot":
        start = time.perf_counter()
        payload, in_tree, out_tree = pickle.loads(Path(spec["exe"]).read_bytes())
        from jax.experimental.serialize_executable import deserialize_and_load
        compiled = deserialize_and_load(payload, in_tree, out_tree)
        out["deserialize_s"] = time.perf_counter() - start
    else:
        start = time.perf_counter()
        lowered = xla_options.jit(fresh.diffax_apply(module, case)).lower(*args)
        out["lower_s"] = time.perf_counter() - start
        start = time.perf_counter()
        compiled = lowered.compile()
        out["compile_s"] = time.perf_counter() - start
    start = time.perf_counter()
    y = jax.block_until_ready(compiled(*args))
    out["first_run_s"] = time.perf_counter() - start
    if spec["phase"] == "cold":  # the same executable in every phase: its steady state is measured once
        out["steady_s"] = _steady(lambda: jax.block_until_ready(compiled(*args)), spec["repeats"])
    np.save(spec["out"], np.asarray(y))
    if spec["phase"] == "cold":  # after the timed calls, so writing the file costs them nothing
        from jax.experimental.serialize_executable import serialize
        start = time.perf_counter()
        blob = pickle.dumps(serialize(compiled))
        Path(spec["exe"]).write_bytes(blob)
        out["serialize_s"] = time.perf_counter() - start
        out["exe_mib"] = len(blob) / 2 ** 20
    out["cache_hits"] = events.count("/jax/compilation_cache/cache_hits")
    out["cache_misses"] = events.count("/jax/compilation_cache/cache_misses")
    out["missed"] = misses.names
    return out


def _torch_phase(spec: dict[str, Any]) -> dict[str, Any]:
    """torch / torch_compile: from_pretrained, the first call and `repeats` more in this (fresh) process."""
    import numpy as np
    import diffusers  # noqa: F401
    import torch

    imported_at = time.time()
    common.setup_torch(spec.get("torch_threads"))
    case = fresh.CASES[spec["case"]]
    out: dict[str, Any] = {"imports_s": imported_at - spec["spawned_at"]}
    start = time.perf_counter()
    model = fresh.load_torch_model(case, spec["folder"])
    out["load_s"] = time.perf_counter() - start
    if spec["phase"] == "torch_compile":
        model = torch.compile(model)
    call = fresh.torch_apply(model, case, fresh.inputs(case))
    with torch.inference_mode():
        start = time.perf_counter()
        y = call()
        out["first_run_s"] = time.perf_counter() - start
        out["steady_s"] = _steady(call, spec["repeats"])
    np.save(spec["out"], fresh.nhwc(y))
    return out


def child(spec: dict[str, Any]) -> None:
    """Entry point of a child process: one phase of `spec`, reported on stdout."""
    phase = spec["phase"]
    if phase == "build":
        fresh.save_torch_model(fresh.CASES[spec["case"]], spec["folder"])
        result = {}
    elif phase in ("torch", "torch_compile"):
        result = _torch_phase(spec)
    else:
        result = _jax_phase(spec)
    fresh.report(result)


# ----------------------------------------------------------------------------- parent


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags; `parse_args(["--quick"])` gives the CPU-friendly sizes."""
    parser = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small UNet2DConditionModel and the digits U-Net")
    common.cases_flag(parser, sorted(fresh.CASES), help="default: sd15 (--quick: sd-small,digits)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds of fresh processes per case, each with a new cache (median; default 1: "
                             "a round is four processes, ~30 s for a --quick case on an idle 2-core machine, "
                             "minutes at full size)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="calls after the first in the cold and torch processes (median: the steady-state "
                             "columns; each is a whole forward pass, ~30 s for sd15 on 2 CPU cores)")
    parser.add_argument("--torch_compile", action="store_true", help="also time torch.compile's first call")
    parser.add_argument("--torch_threads", type=int, default=None, help="default: the machine's cores")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.cases:
        args.cases = ["sd-small", "digits"] if args.quick else ["sd15"]
    if args.rounds < 1 or args.repeats < 1:
        parser.error(f"--rounds and --repeats must be >= 1, got {args.rounds}, {args.repeats}")
    return args


def _median(results: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in results if r.get(key) is not None]
    return statistics.median(values) if values else None


def run_case(args: argparse.Namespace, name: str, work: Path) -> dict[str, Any]:
    """All phases of one case, `args.rounds` rounds of fresh processes; returns its row (medians over rounds)."""
    import numpy as np

    folder = work / name
    fresh.run_child(MODULE, {"phase": "build", "case": name, "folder": str(folder)})
    phases = ["cold", "warm", "aot", "torch"] + (["torch_compile"] if args.torch_compile else [])
    results: dict[str, list[dict[str, Any]]] = {p: [] for p in phases}
    err = 0.0
    for r in range(args.rounds):
        cache = work / f"{name}-cache-{r}"
        cache.mkdir()
        outs = {}
        for phase in phases:
            spec = {"phase": phase, "case": name, "folder": str(folder), "out": str(work / f"{phase}.npy"),
                    "cache_dir": str(cache) if phase in ("cold", "warm") else None,
                    "exe": str(work / f"{name}.exe"), "torch_threads": args.torch_threads,
                    "repeats": args.repeats}
            results[phase].append(fresh.run_child(MODULE, spec))
            outs[phase] = np.load(spec["out"])
        for phase in phases:
            if phase != "torch":
                err = max(err, common.rel_err(outs[phase], outs["torch"]))
        common.check_agreement(f"{name} first calls", err, 1e-4)
        cold, warm = results["cold"][-1], results["warm"][-1]
        # Loading compiles a few small programs too (their time is in the load column); the model's must
        # miss when cold and hit when warm, or the warm column would time a compile.
        if "jit_apply" not in cold["missed"] or "jit_apply" in warm["missed"]:
            raise RuntimeError(f"{name}: the model's program was not compiled cold and read warm (cold missed "
                               f"{cold['missed']}, warm missed {warm['missed']})")

    cache_mib = sum(f.stat().st_size for f in (work / f"{name}-cache-0").rglob("*") if f.is_file()) / 2 ** 20
    return summarise(name, results, cache_mib=cache_mib, max_rel_err=err)


def summarise(name: str, results: dict[str, list[dict[str, Any]]], *, cache_mib: float,
              max_rel_err: float) -> dict[str, Any]:
    """The row of one case from its phases' results (phase -> one dict per round; medians over rounds).

    The ratios compare compilation alone: cold = trace + lower + XLA compile; warm = trace + lower + the cache
    read; AOT = deserialize_and_load. The first call after each runs the model (the same work in all
    three), so time to a first result, reported beside, also holds one forward pass.
    """
    med = {p: {k: _median(rs, k) for k in rs[0]} for p, rs in results.items()}
    c, w, a, t = med["cold"], med["warm"], med["aot"], med["torch"]
    cold_compile = c["lower_s"] + c["compile_s"]
    warm_compile = w["lower_s"] + w["compile_s"]
    return {
        "case": _label(name), "group": "startup", "rounds": len(results["cold"]),
        "cold_compile_s": cold_compile, "warm_compile_s": warm_compile, "aot_load_s": a["deserialize_s"],
        "warm_pct": 100 * warm_compile / cold_compile, "aot_pct": 100 * a["deserialize_s"] / cold_compile,
        "lower_compile": f"{c['lower_s']:.2f} / {c['compile_s']:.2f}",
        "warm_lower_read": f"{w['lower_s']:.2f} / {w['compile_s']:.2f}",
        "lower_s": c["lower_s"], "xla_compile_s": c["compile_s"], "warm_lower_s": w["lower_s"],
        "cache_read_s": w["compile_s"], "deserialize_s": a["deserialize_s"],
        "cold_first_result_s": cold_compile + c["first_run_s"], "warm_first_result_s": warm_compile + w["first_run_s"],
        "aot_first_result_s": a["deserialize_s"] + a["first_run_s"],
        "first_run_s": c["first_run_s"], "steady_run_s": c["steady_s"],
        "serialize_s": c["serialize_s"], "exe_mib": c["exe_mib"], "cache_mib": cache_mib,
        "diffax_load_s": c["load_s"], "torch_load_s": t["load_s"],
        "jax_imports_s": c["imports_s"], "jax_backend_s": c["backend_s"], "torch_imports_s": t["imports_s"],
        "torch_first_s": t["first_run_s"], "torch_steady_s": t["steady_s"],
        "torch_compile_first_s": med["torch_compile"]["first_run_s"] if "torch_compile" in med else None,
        "warm_misses": sorted({m for r in results["warm"] for m in r["missed"]}),
        "max_rel_err": max_rel_err, "rounds_results": results,
    }


def _label(name: str) -> str:
    return {"sd15": "SD1.5 UNet 64x64 b2 77 tok", "sd-small": "small SD UNet 32x32 b2 77 tok",
            "digits": "digits UNet 16x16 b2"}[name]


# (header, row key, format) of the start-up table. Compilation columns (cold, warm, AOT, the ratios) hold no
# model execution; "1st result" columns add the first call, which runs one forward pass.
COLUMNS = (
    ("case", "case", "{}"),
    ("cold compile s", "cold_compile_s", "{:.2f}"),
    ("(lower / XLA)", "lower_compile", "{}"),
    ("warm s", "warm_compile_s", "{:.2f}"),
    ("(lower / cache read)", "warm_lower_read", "{}"),
    ("warm/cold", "warm_pct", "{:.0f}%"),
    ("AOT load s", "aot_load_s", "{:.2f}"),
    ("AOT/cold", "aot_pct", "{:.0f}%"),
    ("cold 1st result s", "cold_first_result_s", "{:.1f}"),
    ("warm 1st result s", "warm_first_result_s", "{:.1f}"),
    ("AOT 1st result s", "aot_first_result_s", "{:.1f}"),
    ("steady call s", "steady_run_s", "{:.2f}"),
    ("diffax load s", "diffax_load_s", "{:.1f}"),
    ("torch load s", "torch_load_s", "{:.1f}"),
    ("torch 1st call s", "torch_first_s", "{:.2f}"),
    ("torch steady s", "torch_steady_s", "{:.2f}"),
    ("torch.compile 1st s", "torch_compile_first_s", "{:.1f}"),
    ("max rel err", "max_rel_err", "{:.1e}"),
)


def run(args: argparse.Namespace, peak: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Runs every case, writes bench/results/startup.json and returns the rows. `peak` is not used (start-up
    is not a FLOP/s measure); it is stored when given."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="diffax-startup-") as work:
        for name in args.cases:
            start = time.perf_counter()
            row = run_case(args, name, Path(work))
            row["bench_s"] = time.perf_counter() - start
            rows.append(row)
    common.write_json("startup" + ("_quick" if args.quick else ""), {
        "benchmark": "startup", "args": vars(args), "machine": common.machine_info(), "matmul_peak": peak,
        "rows": rows})
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    """Run from the command line and print the table."""
    args = parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return
    common.print_table(run(args), COLUMNS)


if __name__ == "__main__":
    main(sys.argv[1:])
