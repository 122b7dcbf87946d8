"""Measuring tools shared by the benchmarks: timing, jax compile time, FLOP/s, memory, results I/O.

What is measured, and how (docs/benchmarks.md says the same for readers of the tables):
  steady-state time  median of `repeats` timed calls after untimed warm-up calls; diffax and torch calls are
                     interleaved (d, t, d, t, ...) so a burst of load from other work hits both alike.
                     Every call blocks until its result exists (`jax.block_until_ready`, CUDA synchronize).
  compile time       diffax only: `jax.jit(f).lower(*args)` (tracing) and `.compile()` (XLA), timed apart;
                     the steady-state calls then run the compiled executable directly.
  FLOP/s             the FLOPs XLA's cost analysis counts for the diffax program (a multiply-add counts as
                     2) divided by each library's time. Both libraries do the same arithmetic, so one count
                     serves both. XLA counts a loop body once, so loops are counted per iteration by the caller.
  peak               a large fp32 matmul timed in jax on this machine (fastest of several calls): the
                     achievable rate the FLOP/s figures are a percentage of (torch's rate on the same matmul
                     is reported beside it).
  memory             diffax: XLA's buffer assignment for the compiled program (`memory_analysis()`: arguments,
                     which include the weights, + outputs + the temporary arena). torch: `torch.cuda.max_memory_allocated` on a GPU;
                     on a CPU nothing cheap and comparable exists, so it is not reported.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffax import xla_options

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------- torch set-up


def setup_torch(threads: int | None = None) -> Any:
    """The torch device to compare on, with settings that match what XLA does on the same hardware.

    CPU: torch may use every core (intra-op threads = the machine's cores, or `threads`), as XLA does.
    GPU (only when jax runs on one too): TF32 for fp32 matmuls and convolutions, which is XLA's default
    precision for fp32 on GPUs, so both libraries run the same arithmetic.
    Returns a `torch.device`.
    """
    import torch

    torch.set_num_threads(threads or os.cpu_count() or 1)
    device = torch_device()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def torch_device() -> Any:
    """CUDA when jax runs on a GPU too (and torch sees one), else the CPU: both libraries on one device."""
    import torch

    return torch.device("cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu")


def agreement_tolerance(device: Any, *, steps: int = 1) -> float:
    """Largest max-relative error accepted between diffax and torch outputs before timing.

    fp32 on a CPU: 1e-4 for one forward (DESIGN principle 4; measured errors are ~1e-6). TF32 on a GPU keeps
    10 mantissa bits (~5e-4 per op), so 1e-2. A sampling run carries each step's error into the next
    (guidance amplifies it), so the bound grows linearly with `steps` (25 steps measured 2e-4 on a CPU).
    A real mismatch (a wrong timestep, scale or guidance) moves the output by O(1).
    """
    base = 1e-4 if device.type == "cpu" else 1e-2
    return base * max(1, steps)


def one_library_at_a_time(device: Any) -> bool:
    """Whether the biggest cases (SDXL's forward, the DiT-XL/2 and SD 1.5 train steps) hold one library's
    model at a time, each timed on its own: on a CPU machine's memory they do not fit twice. A GPU holds
    both, so there they are timed interleaved like every other case."""
    return device.type == "cpu"


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """max|got - want| / max|want|: the error measure of diffax's parity tests."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def check_agreement(what: str, err: float, tol: float) -> None:
    """Refuse to time two programs that compute different things."""
    if not np.isfinite(err) or err > tol:
        raise RuntimeError(f"{what}: diffax and diffusers disagree (max relative error {err:.2e} > {tol:.0e}); "
                           f"timing them would compare different computations")


# ----------------------------------------------------------------------------- timing


@dataclasses.dataclass
class Timing:
    """Wall-clock seconds of the timed calls, and of the untimed warm-up calls before them; and the
    process's system CPU seconds and minor page faults during each timed call. A library whose buffers
    come fresh from the kernel on every call pays for them in system time, which moves with the machine's
    state far more than the arithmetic does."""
    times: list[float]
    warmup: list[float]
    system_s: list[float] = dataclasses.field(default_factory=list)
    faults: list[int] = dataclasses.field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def spread(self) -> float:
        """(slowest - fastest) / median of the timed calls: how much one measurement can be trusted."""
        return (max(self.times) - min(self.times)) / self.median


def cases_flag(parser: argparse.ArgumentParser, known: Sequence[str], default: str = "", help: str = "") -> None:
    """Adds a module's `--cases=a,b` flag: comma-separated case names, checked against `known` when parsed.
    Every module that has cases takes them in this one form, so `bench.run_all --cases` can pass them on."""
    def names(text: str) -> list[str]:
        chosen = [c for c in text.split(",") if c]
        unknown = sorted(set(chosen) - set(known))
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; known: {', '.join(known)}")
        return chosen
    parser.add_argument("--cases", type=names, default=default,
                        help=f"comma-separated, of {', '.join(known)}" + (f"; {help}" if help else ""))


def jax_blocking(fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    """A no-argument call of fn(*args) that returns only once every output array is computed."""
    return lambda: jax.block_until_ready(fn(*args))


def torch_blocking(fn: Callable[[], Any], device: Any) -> Callable[[], Any]:
    """A no-argument call of fn() under `torch.inference_mode`, synchronised on a GPU."""
    import torch

    def call():
        with torch.inference_mode():
            out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    return call


class Stopwatch:
    """Prints each stage of a long case as it ends, with its seconds: a run stopped by a time limit (the
    device scripts give every module one) still says where its time went."""

    def __init__(self, case: str):
        self.case, self.last = case, time.perf_counter()

    def lap(self, stage: str) -> None:
        """Print the seconds since the last lap (or since the case began) under the name of the stage."""
        now = time.perf_counter()
        print(f"  {self.case}: {stage} {now - self.last:.1f} s", flush=True)
        self.last = now


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    """(result, seconds) of one blocking call: the first call of each library, which pays torch's kernel
    selection and allocator warm-up (jax has paid compilation before it)."""
    start = time.perf_counter()
    out = call()
    return out, time.perf_counter() - start


def time_interleaved(calls: Mapping[str, Callable[[], Any]], *, repeats: int, warmup: int = 1) -> dict[str, Timing]:
    """Times every call `repeats` times after `warmup` untimed calls each, in rounds (a, b, a, b, ...).

    Each call must block until its result exists (see `jax_blocking`, `torch_blocking`). Interleaving makes
    the ratio of two medians robust to load that other processes put on a shared machine.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    results = {name: Timing([], []) for name in calls}
    for phase, n in (("warmup", warmup), ("times", repeats)):
        for _ in range(n):
            for name, call in calls.items():
                before = resource.getrusage(resource.RUSAGE_SELF)
                start = time.perf_counter()
                call()
                getattr(results[name], phase).append(time.perf_counter() - start)
                if phase == "times":
                    after = resource.getrusage(resource.RUSAGE_SELF)
                    results[name].system_s.append(after.ru_stime - before.ru_stime)
                    results[name].faults.append(after.ru_minflt - before.ru_minflt)
    return results


# ----------------------------------------------------------------------------- jax programs


@dataclasses.dataclass
class CompiledProgram:
    """A compiled jax program and what XLA says about it."""
    compiled: Any           # jax.stages.Compiled: call it like the jitted function
    lower_s: float          # tracing + lowering to StableHLO
    compile_s: float        # XLA optimisation and code generation
    flops: float | None     # XLA cost analysis; loop bodies counted once
    peak_bytes: int | None  # XLA buffer assignment: arguments + outputs + temporary arena

    @property
    def compile_total_s(self) -> float:
        return self.lower_s + self.compile_s


def _cost(analysis: Any) -> dict[str, float]:
    # Older jax returned one dict per device in a list.
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return dict(analysis or {})


def _peak_bytes(compiled: Any) -> int | None:
    # The buffers XLA assigns: arguments, outputs and the temporary arena (aliased outputs counted once).
    # Not `peak_memory_in_bytes`: on the CPU backend of jax 0.10 it reports the arguments alone.
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
               - stats.alias_size_in_bytes)


def compile_jax(fn: Callable[..., Any], *args: Any) -> CompiledProgram:
    """jit, lower and compile fn for these arguments (arrays or pytrees of arrays), timing each stage; with
    the compiler options diffax's own programs get (`diffax.xla_options.jit`), so that a benchmark times the
    program a user's pipeline or train step runs."""
    return compile_jitted(xla_options.jit(fn), *args)


def count_flops(fn: Callable[..., Any], *args: Any) -> float:
    """FLOPs of fn(*args) from XLA's cost analysis of the lowered program (no compilation)."""
    flops = _cost(jax.jit(fn).lower(*args).cost_analysis()).get("flops")
    if flops is None:
        raise RuntimeError("XLA's cost analysis reported no 'flops' for this program")
    return float(flops)


def torch_peak_bytes(call: Callable[[], Any], device: Any) -> int | None:
    """Peak GPU memory torch allocates during one call; None on a CPU (see the module docstring)."""
    if device.type != "cuda":
        return None
    import torch

    torch.cuda.reset_peak_memory_stats(device)
    call()
    return int(torch.cuda.max_memory_allocated(device))


def compile_jitted(jitted: Any, *args: Any) -> CompiledProgram:
    """`compile_jax` for a function that is jitted already (anything with `.lower`, such as the train loop's
    step), so that its shardings and donated arguments are part of the compiled program."""
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
    flops = _cost(compiled.cost_analysis()).get("flops")
    return CompiledProgram(compiled, lowered_at - start, compiled_at - lowered_at,
                           None if flops is None else float(flops), _peak_bytes(compiled))


def proc_kib(path: str, field: str) -> int | None:
    """The kB value of `field` in a /proc file (`/proc/self/status`' VmRSS / VmHWM, `/proc/meminfo`'s
    MemAvailable); None off Linux."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Restart this process's peak resident memory (VmHWM) from its current size (Linux: /proc/self/clear_refs),
    so that `peak_rss_bytes` measures one phase of a run. False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """This process's peak resident memory (VmHWM) since it started or since `reset_peak_rss`; None off Linux."""
    kib = proc_kib("/proc/self/status", "VmHWM")
    return None if kib is None else kib * 1024


def available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo: what a new allocation can take without swapping; None off Linux."""
    kib = proc_kib("/proc/meminfo", "MemAvailable")
    return None if kib is None else kib * 1024


# ----------------------------------------------------------------------------- machine


def matmul_peak(device: Any, n: int | None = None, repeats: int = 10) -> dict[str, Any]:
    """Measured fp32 matmul rate of this machine in GFLOP/s: jax's (the reference for '% of peak') and
    torch's, each from the fastest of `repeats` calls: a peak is what the machine can do, and on a shared
    machine the fastest call is the one least disturbed by other work.

    torch runs on `device` (see `setup_torch`). n defaults to 2048 on a CPU (0.1-0.3 s a call on 2 cores)
    and 8192 on a GPU (large enough to fill it).
    """
    import torch

    n = n or (8192 if device.type == "cuda" else 2048)
    flops = 2.0 * n ** 3
    a, b = (jax.random.normal(k, (n, n), jnp.float32) for k in jax.random.split(jax.random.key(0)))
    program = compile_jax(jnp.matmul, a, b)
    ta, tb = (torch.randn(n, n, device=device) for _ in range(2))
    timing = time_interleaved({"jax": jax_blocking(program.compiled, a, b),
                               "torch": torch_blocking(lambda: ta @ tb, device)}, repeats=repeats)
    return {"n": n, "jax_gflops": flops / timing["jax"].min / 1e9, "torch_gflops": flops / timing["torch"].min / 1e9,
            "jax_median_gflops": flops / timing["jax"].median / 1e9,
            "torch_median_gflops": flops / timing["torch"].median / 1e9}


def _cpu_model() -> str:
    """The CPU's model name, with its family and model numbers where /proc/cpuinfo has them: cloud machines
    name different generations alike ("AMD EPYC" is family 25 for Zen 3/4 and 26 for Zen 5), and the
    ratios move with the generation (docs/benchmarks.md)."""
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]  # the first processor's block
        fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first.splitlines() if ":" in line)}
        if "model name" in fields:
            numbers = f" (family {fields['cpu family']}, model {fields['model']})" if "cpu family" in fields else ""
            return fields["model name"] + numbers
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """Versions, devices and settings that a result depends on, stored with every result."""
    import diffusers
    import torch

    return {
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "jax": jax.__version__, "jax_backend": jax.default_backend(),
        "jax_device": jax.devices()[0].device_kind,
        "torch": torch.__version__, "torch_device": str(torch_device()), "torch_threads": torch.get_num_threads(),
        "diffusers": diffusers.__version__, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
    }


# ----------------------------------------------------------------------------- reporting


def case_row(case: str, *, diffax: Timing, torch: Timing, program: CompiledProgram, flops: float | None,
             peak: Mapping[str, Any], max_rel_err: float, first_call_s: tuple[float, float],
             torch_peak: int | None = None, **extra: Any) -> dict[str, Any]:
    """One result row: times, the speed ratio, compile time, achieved FLOP/s and memory of one case.

    `flops` is the work of one timed call (for a sampling loop: steps x one model evaluation); `peak` is
    `matmul_peak()`'s result; `first_call_s` the (diffax, torch) seconds of each library's first call of
    the case (see `timed`). speedup = torch time / diffax time, so > 1 means diffax is faster.
    """
    def rate(t: Timing) -> float | None:
        return None if flops is None else flops / t.median / 1e9

    d_rate, t_rate = rate(diffax), rate(torch)
    mib = 2.0 ** 20
    row = {
        "case": case, **extra,
        "diffax_ms": 1e3 * diffax.median, "torch_ms": 1e3 * torch.median,
        "speedup": torch.median / diffax.median,
        "diffax_spread_pct": 100 * diffax.spread, "torch_spread_pct": 100 * torch.spread,
        "spread": f"{100 * diffax.spread:.0f}%/{100 * torch.spread:.0f}%",
        "compile_s": program.compile_total_s, "lower_s": program.lower_s, "xla_compile_s": program.compile_s,
        "diffax_first_call_ms": 1e3 * first_call_s[0], "torch_first_call_ms": 1e3 * first_call_s[1],
        "gflop": None if flops is None else flops / 1e9,
        "diffax_gflops": d_rate, "torch_gflops": t_rate,
        "diffax_peak_mib": None if program.peak_bytes is None else program.peak_bytes / mib,
        "torch_peak_mib": None if torch_peak is None else torch_peak / mib,
        "max_rel_err": max_rel_err,
        "diffax_times_s": diffax.times, "torch_times_s": torch.times,
        "diffax_system_s": _median_or_none(diffax.system_s), "torch_system_s": _median_or_none(torch.system_s),
        "diffax_faults": _median_or_none(diffax.faults), "torch_faults": _median_or_none(torch.faults),
    }
    if row["diffax_system_s"] is not None and row["torch_system_s"] is not None:
        row["system_s"] = f"{row['diffax_system_s']:.2f}/{row['torch_system_s']:.2f}"
    set_peak(row, peak)
    return row


def _median_or_none(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def set_peak(row: dict[str, Any], peak: Mapping[str, Any]) -> None:
    """(Re)computes a row's '% of peak' columns against `peak['jax_gflops']`."""
    for who in ("diffax", "torch"):
        rate = row[f"{who}_gflops"]
        row[f"{who}_pct_peak"] = None if rate is None else 100 * rate / peak["jax_gflops"]


# (header, row key, format) of the summary table.
SUMMARY_COLUMNS = (
    ("case", "case", "{}"),
    ("diffax ms", "diffax_ms", "{:.1f}"),
    ("torch ms", "torch_ms", "{:.1f}"),
    ("spread d/t", "spread", "{}"),
    ("system s d/t", "system_s", "{}"),
    ("speedup", "speedup", "{:.2f}x"),
    ("compile s", "compile_s", "{:.1f}"),
    ("GFLOP", "gflop", "{:.1f}"),
    ("diffax GFLOP/s", "diffax_gflops", "{:.1f}"),
    ("% peak", "diffax_pct_peak", "{:.0f}%"),
    ("torch GFLOP/s", "torch_gflops", "{:.1f}"),
    ("% peak", "torch_pct_peak", "{:.0f}%"),
    ("diffax MiB", "diffax_peak_mib", "{:.0f}"),
    ("torch MiB", "torch_peak_mib", "{:.0f}"),
    ("max rel err", "max_rel_err", "{:.1e}"),
)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str, str]] = SUMMARY_COLUMNS) -> str:
    """A plain-text table (Markdown pipe syntax, so it pastes into docs); '-' marks a missing value."""
    cells = [[header for header, _, _ in columns]]
    for row in rows:
        cells.append(["-" if row.get(key) is None else fmt.format(row[key]) for _, key, fmt in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]

    def line(r: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str, str]] = SUMMARY_COLUMNS) -> None:
    """Print `format_table(rows, columns)`."""
    print(format_table(rows, columns), flush=True)


def write_json(name: str, record: Mapping[str, Any]) -> Path:
    """Write bench/results/<name>.json (through a .tmp file, so a crash never leaves half a result)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    tmp = RESULTS_DIR / f"{name}.tmp"
    tmp.write_text(json.dumps(record, indent=2, default=float) + "\n")
    os.replace(tmp, path)
    return path
