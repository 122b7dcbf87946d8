"""The whole benchmark suite: every case against diffusers/torch, one table per group, a plot (`make bench`).

    python -m bench.run_all                  # every case at its full size (about 30 minutes on 2 CPU cores)
    python -m bench.run_all --quick          # the small sizes of every case (a few minutes)
    python -m bench.run_all --only=forward,sampling --repeats=9
    python -m bench.run_all --docs           # also rewrite the results section of docs/benchmarks.md and
                                             # docs/images/benchmarks.png

Each benchmark module runs in its own Python process (`python -m bench.run_all --child=NAME ...`), one after
the other, so that one module's memory (a full-size SDXL UNet holds 10 GB of fp32 weights) is gone before the
next starts and a failing case does not lose the others. Each child measures the matmul peak before its cases;
the best peak of the run is then shared by every row's '% of peak'. Results: bench/results/<module>.json from
each module, bench/results/run_all.json with every row, the machine and the peak.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from bench import common

# (module, flags at full size, flags for --quick), in the order they run: small cases first.
MODULES: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("attention", (), ("--quick",)),
    ("unet_sampling", (), ()),
    ("dit_forward", ("--attention=auto",), ("--attention=auto",)),
    ("forward", (), ("--quick",)),
    ("sampling", (), ("--quick",)),
    ("train_step", (), ("--quick",)),
    ("startup", (), ("--quick",)),
    ("memory", (), ("--quick",)),
)
GROUPS = ("attention", "forward", "sampling", "train", "startup", "memory")
ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
PLOT = ROOT / "docs" / "images" / "benchmarks.png"
BEGIN, END = "<!-- bench:results:begin -->", "<!-- bench:results:end -->"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags of the suite."""
    parser = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the small size of every case")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per library and case (median, spread)")
    parser.add_argument("--only", default="", help="comma-separated module names (default: all)")
    parser.add_argument("--docs", action="store_true", help="rewrite docs/benchmarks.md's results and the plot")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--rows_out", default="", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    args.module_flags = rest
    names = [m for m, _, _ in MODULES]
    args.only = [n for n in args.only.split(",") if n]
    unknown = [n for n in args.only if n not in names]
    if unknown:
        parser.error(f"--only: unknown module(s) {unknown}; known: {', '.join(names)}")
    return args


def run_child(name: str, flags: Sequence[str], rows_out: str) -> None:
    """Inside a child process: measure the peak, run one module's cases, write {peak, rows} to rows_out."""
    module = importlib.import_module(f"bench.{name}")
    device = common.setup_torch()
    peak = common.matmul_peak(device)
    rows = module.run(module.parse_args(list(flags)), peak)
    columns = getattr(module, "COLUMNS", None)
    Path(rows_out).write_text(json.dumps({"peak": peak, "rows": rows,
                                          "columns": columns and [list(c) for c in columns]}, default=str))


def run_module(name: str, flags: Sequence[str]) -> dict[str, Any]:
    """Runs one module in a fresh process; returns {peak, rows, columns, seconds} or {error, seconds}."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "bench.run_all", f"--child={name}", f"--rows_out={out}",
                               *flags], cwd=ROOT)
        seconds = time.perf_counter() - start
        if proc.returncode != 0 or not out.exists():
            return {"error": f"exit status {proc.returncode}", "seconds": seconds}
        return {**json.loads(out.read_text()), "seconds": seconds}


def group_tables(rows: Sequence[dict[str, Any]], columns: dict[str, Any]) -> str:
    """Markdown: one table per group, in GROUPS order, each with its module's own columns if it has them."""
    parts = []
    for group in GROUPS + tuple(sorted({r.get("group", "other") for r in rows} - set(GROUPS))):
        members = [r for r in rows if r.get("group", "other") == group]
        if members:
            cols = columns.get(members[0]["_module"]) or common.SUMMARY_COLUMNS
            parts.append(f"### {group}\n\n{common.format_table(members, [tuple(c) for c in cols])}")
    return "\n\n".join(parts)


def plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """A horizontal bar per timed case: torch time / diffax time, log scale, the line at 1 = parity."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r.get("speedup")]
    colors = dict(zip(GROUPS, ("tab:purple", "tab:blue", "tab:green", "tab:orange", "tab:gray", "tab:brown")))
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(timed) + 1.5))
    names = [r["case"] for r in timed][::-1]
    values = [r["speedup"] for r in timed][::-1]
    ax.barh(names, values, color=[colors.get(r.get("group"), "black") for r in timed][::-1])
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("speedup over diffusers/torch (torch time / diffax time; > 1: diffax faster)")
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.2f}x", va="center", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_docs(summary: str) -> None:
    """Replaces the text between the results markers of docs/benchmarks.md."""
    text = DOCS.read_text()
    if BEGIN not in text or END not in text:
        raise RuntimeError(f"{DOCS} has no {BEGIN} ... {END} section to rewrite")
    head, rest = text.split(BEGIN, 1)
    DOCS.write_text(f"{head}{BEGIN}\n{summary}\n{END}{rest.split(END, 1)[1]}")


def main(argv: Sequence[str] | None = None) -> None:
    """Run the suite (or, with --child, one module inside its own process)."""
    args = parse_args(argv)
    if args.child:
        run_child(args.child, args.module_flags, args.rows_out)
        return
    start = time.perf_counter()
    machine = common.machine_info()
    print(f"machine: {machine['cpu']} x{machine['cpu_count']}, jax {machine['jax']} on {machine['jax_device']}, "
          f"torch {machine['torch']} on {machine['torch_device']} ({machine['torch_threads']} threads)", flush=True)
    rows, columns, seconds, failed, peaks = [], {}, {}, [], []
    for name, full, quick in MODULES:
        if args.only and name not in args.only:
            continue
        flags = [*(quick if args.quick else full), f"--repeats={args.repeats}", *args.module_flags]
        print(f"\n== {name} {' '.join(flags)}", flush=True)
        result = run_module(name, flags)
        seconds[name] = result["seconds"]
        if "error" in result:
            failed.append(name)
            print(f"!! {name} failed ({result['error']}) after {result['seconds']:.0f} s", flush=True)
            continue
        peaks.append(result["peak"])
        columns[name] = result["columns"]
        rows += [{**row, "_module": name} for row in result["rows"]]
        print(f"== {name}: {len(result['rows'])} rows in {result['seconds']:.0f} s", flush=True)
    if not peaks:
        sys.exit("every benchmark module failed")
    # Each module measured the peak at its start; on a shared machine one of them can fall in a busy
    # moment, so the best of the run is the machine's peak for every row.
    peak = max(peaks, key=lambda p: p["jax_gflops"])
    for row in rows:
        if "diffax_gflops" in row:
            common.set_peak(row, peak)
    elapsed = time.perf_counter() - start
    date = datetime.date.today().isoformat()
    header = (f"Run of {date}: `python -m bench.run_all{' --quick' if args.quick else ''} --repeats={args.repeats}`, "
              f"{elapsed / 60:.0f} min. Machine: {machine['cpu']}, {machine['cpu_count']} cores; jax "
              f"{machine['jax']} ({machine['jax_device']}), torch {machine['torch']} ({machine['torch_device']}, "
              f"{machine['torch_threads']} threads), diffusers {machine.get('diffusers', '?')}. fp32 matmul peak "
              f"(n={peak['n']}): jax {peak['jax_gflops']:.0f} GFLOP/s, torch {peak['torch_gflops']:.0f} GFLOP/s. "
              f"Seconds per module: {', '.join(f'{k} {v:.0f}' for k, v in seconds.items())}.")
    summary = f"{header}\n\n{group_tables(rows, columns)}"
    print("\n" + summary)
    path = common.write_json("run_all", {"benchmark": "run_all", "args": {k: v for k, v in vars(args).items()},
                                         "machine": machine, "matmul_peak": peak, "elapsed_s": elapsed,
                                         "seconds": seconds, "failed": failed, "rows": rows})
    print(f"\nwrote {path}")
    if args.docs:
        plot(rows, PLOT, f"diffax vs diffusers/torch, {machine['cpu']} x{machine['cpu_count']}, {date}")
        write_docs(summary + "\n\n![speedups](images/benchmarks.png)")
        print(f"wrote {DOCS} and {PLOT}")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
