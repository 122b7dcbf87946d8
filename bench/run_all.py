"""The whole benchmark suite: every case against diffusers/torch, one table per group, a plot (`make bench`).

    python -m bench.run_all                  # every case at its full size (about 35 minutes on 2 CPU cores)
    python -m bench.run_all --quick          # the small sizes of every case (a few minutes)
    python -m bench.run_all --only=forward,sampling --repeats=9
    python -m bench.run_all --docs           # also rewrite the results section of docs/benchmarks.md and
                                             # docs/images/benchmarks.png
    python -m bench.run_all --only=train_step --merge --docs   # rerun one module into the last whole run
    python -m bench.run_all --only=forward --cases=sd15 --merge --docs   # rerun some cases of one module

Each benchmark module runs in its own Python process (`python -m bench.run_all --child=NAME ...`), one after
the other, so that one module's memory (a full-size SDXL UNet holds 10 GB of fp32 weights) is gone before the
next starts and a failing case does not lose the others. Each child measures the matmul peak before its cases;
the best peak of the run is then shared by every row's '% of peak' (a --merge rerun's rows keep the peak of
their own session). Results: bench/results/<module>.json from
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

# (module, flags at full size, flags for --quick), in the order they run: small cases first. A module's
# flags come after the suite's --repeats, so they may override it (start-up's full-size repeats are whole
# SD 1.5 forwards in fresh processes, and the medians there are of compile and load times, not calls).
MODULES: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("attention", ("--cases=dit,sd15_32,sd2_64,sd15_64,sdxl_128,vae_512",), ("--quick",)),
    ("unet_sampling", (), ()),
    ("dit_forward", ("--attention=auto",), ("--attention=auto",)),
    ("forward", ("--cases=dit,sd15,vae,clip,controlnet",), ("--quick",)),
    ("sampling", (), ("--quick",)),
    ("train_step", ("--cases=digits,dit-s",), ("--quick",)),
    # The full-size train steps in processes of their own: one that does not fit in memory is refused
    # before anything is allocated, and must not take the rows above with it.
    ("train_step", ("--cases=dit-xl",), ()),
    # SD 1.5's step needs about 19 GB; in the process that ran DiT-XL/2's it would not find them.
    ("train_step", ("--cases=sd15",), ()),
    ("startup", ("--repeats=1",), ("--quick",)),
    ("memory", (), ("--quick",)),
    # SDXL's UNet last, in a process of its own: 10.3 GB of fp32 weights per library (one library at a time,
    # 22.5 GiB resident at the peak) and 6 TFLOP a call, about 7 minutes on 2 CPU cores.
    ("forward", ("--cases=sdxl",), ()),
)
# The modules that take `--cases=a,b`, the form `--cases` here passes on.
CASED = ("attention", "forward", "train_step", "startup", "memory")
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
    parser.add_argument("--merge", action="store_true",
                        help="with --only: the modules run replace their own rows in bench/results/run_all.json "
                             "(a rerun after a change); the other modules' rows are kept")
    parser.add_argument("--cases", default="",
                        help="with --only naming one module of " + ", ".join(CASED) + ": run only these of its "
                             "cases (comma-separated, the module's own names), in one process; with --merge only "
                             "their rows are replaced")
    parser.add_argument("--docs_only", action="store_true",
                        help="rewrite them from the last run's bench/results/run_all.json, running nothing")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--rows_out", default="", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    args.module_flags = rest
    if args.child:  # the module's own flags, `--cases` among them
        args.module_flags += [f"--cases={args.cases}"] if args.cases else []
        return args
    names = [m for m, _, _ in MODULES]
    args.only = [n for n in args.only.split(",") if n]
    if args.merge and not args.only:
        parser.error("--merge replaces the rows of the modules named by --only")
    unknown = [n for n in args.only if n not in names]
    if unknown:
        parser.error(f"--only: unknown module(s) {unknown}; known: {', '.join(names)}")
    if args.cases and (len(args.only) != 1 or args.only[0] not in CASED):
        parser.error(f"--cases needs --only naming one module of {', '.join(CASED)}")
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


def planned_runs(args: argparse.Namespace) -> list[tuple[str, str, list[str]]]:
    """(module, label, flags) of each child process to run, in MODULES order. A module with several entries
    (forward, train_step) is labelled by its entry's flags after the first. With `--cases` the one module
    named by --only runs once, with those cases in place of its entries' own."""
    runs, seen = [], set()
    for name, full, quick in MODULES:
        if (args.only and name not in args.only) or (args.cases and name in seen):
            continue
        if args.quick and not quick and name in seen:
            continue  # a full-size-only entry
        own = [f"--cases={args.cases}"] if args.cases else list(quick if args.quick else full)
        label = name if name not in seen else f"{name} {' '.join(own)}"
        runs.append((name, label, [f"--repeats={args.repeats}", *own, *args.module_flags]))
        seen.add(name)
    return runs


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
    """Markdown: one section per group, in GROUPS order, holding a table per module with that module's own
    columns if it has them (the sampling module's overhead, the train step's images/s)."""
    parts = []
    for group in GROUPS + tuple(sorted({r.get("group", "other") for r in rows} - set(GROUPS))):
        members = [r for r in rows if r.get("group", "other") == group]
        if not members:
            continue
        tables = []
        for module in dict.fromkeys(r["_module"] for r in members):
            cols = columns.get(module) or common.SUMMARY_COLUMNS
            tables.append(common.format_table([r for r in members if r["_module"] == module],
                                              [tuple(c) for c in cols]))
        parts.append(f"### {group}\n\n" + "\n\n".join(tables))
    return "\n\n".join(parts)


def plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """A horizontal bar per timed case: torch time / diffax time, log scale, the line at 1 = parity."""
    import matplotlib
    import matplotlib.ticker
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
    # Plain ratios as ticks: matplotlib's log-scale minor labels ('2x10^-1', ...) overlap at this width.
    ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator([0.25, 0.5, 1, 2, 4, 8]))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("torch time / diffax time (> 1: diffax faster)")
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.2f}x", va="center", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarise(record: dict[str, Any]) -> str:
    """Markdown: the run's command, machine, versions, peak and seconds per module, then the group tables."""
    machine, peak = record["machine"], record["matmul_peak"]
    seconds = ", ".join(f"{k} {v:.0f}" for k, v in record["seconds"].items())
    failed = f" Failed: {', '.join(record['failed'])}." if record["failed"] else ""
    reruns = "".join(f"; rows of the rerun of {m}: jax {p['jax_gflops']:.0f}, torch {p['torch_gflops']:.0f}"
                     for m, p in record.get("rerun_peaks", {}).items())
    header = (f"Run of {record['date']}: `{record['command']}`, {record['elapsed_s'] / 60:.0f} min. Machine: "
              f"{machine['cpu']}, {machine['cpu_count']} cores; jax {machine['jax']} ({machine['jax_device']}), "
              f"torch {machine['torch']} ({machine['torch_device']}, {machine['torch_threads']} threads), "
              f"diffusers {machine['diffusers']}. fp32 matmul peak (n={peak['n']}, best of the run): jax "
              f"{peak['jax_gflops']:.0f} GFLOP/s, torch {peak['torch_gflops']:.0f} GFLOP/s{reruns}. Seconds per "
              f"module: {seconds}.{failed}")
    return f"{header}\n\n{group_tables(record['rows'], record['columns'])}"


def write_docs(record: dict[str, Any]) -> None:
    """Rewrites the text between the results markers of docs/benchmarks.md and the plot."""
    machine = record["machine"]
    plot(record["rows"], PLOT, f"diffax vs diffusers/torch\n{machine['cpu']} x{machine['cpu_count']}, "
                               f"{record['date']}")
    text = DOCS.read_text()
    if BEGIN not in text or END not in text:
        raise RuntimeError(f"{DOCS} has no {BEGIN} ... {END} section to rewrite")
    head, rest = text.split(BEGIN, 1)
    summary = summarise(record) + "\n\n![speedups](images/benchmarks.png)"
    DOCS.write_text(f"{head}{BEGIN}\n{summary}\n{END}{rest.split(END, 1)[1]}")
    print(f"wrote {DOCS} and {PLOT}")


def merged(previous: dict[str, Any], rerun: dict[str, Any], modules: Sequence[str], cases: str = "") -> dict[str, Any]:
    """`previous` (a whole run's record) with the rows of `modules` replaced by `rerun`'s, in the suite's
    order; with `cases` (a rerun of some cases of one module) only the rows with the same case names, each
    in its place. The command, date and seconds say what was rerun. Each row keeps the '% of peak' of its
    own session: this machine's peak moves from hour to hour, so a rerun's rows are set against the peak the
    rerun measured (kept in `rerun_peaks`) and the other rows against the whole run's."""
    order = [name for name, _, _ in MODULES]
    if cases:
        new = {(r["_module"], r["case"]): r for r in rerun["rows"]}
        rows = [new.pop((r["_module"], r["case"]), r) for r in previous["rows"]] + list(new.values())
    else:
        rows = [r for r in previous["rows"] if r["_module"] not in modules] + rerun["rows"]
    rows.sort(key=lambda r: order.index(r["_module"]))
    date = rerun["date"]
    rerun_of = ",".join(modules) + (f" --cases={cases}" if cases else "")
    # A whole module's rerun replaces its rows and so the peaks of its earlier reruns, cases' included.
    peaks = {k: v for k, v in previous.get("rerun_peaks", {}).items() if cases or k.split()[0] not in modules}
    peaks.update({rerun_of: rerun["matmul_peak"]} if cases else {m: rerun["matmul_peak"] for m in modules})
    return {**previous, "rows": rows, "rerun_peaks": peaks,
            "command": f"{previous['command']}; rerun {date}: {rerun['command']} --only={rerun_of}",
            "seconds": {**previous["seconds"], **{f"{k} (rerun {date})": v for k, v in rerun["seconds"].items()}},
            "failed": [f for f in previous["failed"] if f.split()[0] not in modules] + rerun["failed"],
            "columns": {**previous["columns"], **rerun["columns"]}}


def main(argv: Sequence[str] | None = None) -> None:
    """Run the suite (or, with --child, one module inside its own process)."""
    args = parse_args(argv)
    if args.child:
        run_child(args.child, args.module_flags, args.rows_out)
        return
    if args.docs_only:
        write_docs(json.loads((common.RESULTS_DIR / "run_all.json").read_text()))
        return
    start = time.perf_counter()
    machine = common.machine_info()
    print(f"machine: {machine['cpu']} x{machine['cpu_count']}, jax {machine['jax']} on {machine['jax_device']}, "
          f"torch {machine['torch']} on {machine['torch_device']} ({machine['torch_threads']} threads)", flush=True)
    rows, columns, seconds, failed, peaks = [], {}, {}, [], []
    for name, label, flags in planned_runs(args):
        print(f"\n== {name} {' '.join(flags)}", flush=True)
        result = run_module(name, flags)
        seconds[label] = result["seconds"]
        if "error" in result:
            failed.append(label)
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
    command = f"python -m bench.run_all{' --quick' if args.quick else ''} --repeats={args.repeats}"
    record = {"benchmark": "run_all", "date": datetime.date.today().isoformat(), "command": command,
              "machine": machine, "matmul_peak": peak, "elapsed_s": elapsed, "seconds": seconds,
              "failed": failed, "columns": columns, "rows": rows}
    if args.merge:
        record = merged(json.loads((common.RESULTS_DIR / "run_all.json").read_text()), record, args.only,
                        args.cases)
    print("\n" + summarise(record))
    path = common.write_json("run_all", record)
    print(f"\nwrote {path}")
    if args.docs:
        write_docs(record)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
