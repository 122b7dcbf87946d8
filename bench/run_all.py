"""Every benchmark at its default, CPU-friendly size, and one summary table (`make bench`).

    python -m bench.run_all              # about 3 minutes on 2 CPU cores
    python -m bench.run_all --repeats=9       # steadier medians, longer

Runs the digits U-Net (one forward at batch 64, a 25-step DDIM run with CFG on 2x32 rows) and a DiT-S/2
forward on 32x32x4 latents at batch 8 with both of diffax's portable attention backends (xla, chunked),
each against diffusers on torch in the same process. The matmul peak is measured at the start and at the
end, and the better of the two is shared by every row. Writes bench/results/run_all.json (and each
benchmark's own JSON); docs/benchmarks.md explains the columns.
"""
from __future__ import annotations

import argparse
import time
from typing import Sequence

from bench import common, dit_forward, unet_sampling


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmarks, print the summary table and write bench/results/run_all.json."""
    parser = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per library and case (median)")
    args = parser.parse_args(argv)
    repeats = [f"--repeats={args.repeats}"]
    start = time.perf_counter()
    device = common.setup_torch()
    machine = common.machine_info()
    peak = common.matmul_peak(device)
    print(f"machine: {machine['cpu']} x{machine['cpu_count']}, jax {machine['jax']} on {machine['jax_device']}, "
          f"torch {machine['torch']} on {machine['torch_device']} ({machine['torch_threads']} threads)", flush=True)
    runs = (
        ("unet_sampling", unet_sampling, []),
        ("dit_forward", dit_forward, ["--attention=xla"]),
        ("dit_forward", dit_forward, ["--attention=chunked"]),
    )
    rows = []
    for name, module, flags in runs:
        print(f"running {' '.join([name, *flags])} ...", flush=True)
        rows += module.run(module.parse_args(flags + repeats), peak)
    # On a shared machine one measurement of the peak can fall in a busy moment: measure again at the end
    # and keep the better of the two for every row's '% of peak'.
    peak = max(peak, common.matmul_peak(device), key=lambda p: p["jax_gflops"])
    for row in rows:
        common.set_peak(row, peak)
    elapsed = time.perf_counter() - start
    print(f"\nfp32 matmul peak (n={peak['n']}, best of start and end): jax {peak['jax_gflops']:.1f} GFLOP/s, "
          f"torch {peak['torch_gflops']:.1f} GFLOP/s")
    print(f"speedup = torch time / diffax time (> 1: diffax faster); % peak = of jax's fp32 matmul peak "
          f"({peak['jax_gflops']:.0f} GFLOP/s); {elapsed:.0f} s in all\n")
    common.print_table(rows)
    path = common.write_json("run_all", {"benchmark": "run_all", "args": vars(args), "machine": machine,
                                         "matmul_peak": peak, "elapsed_s": elapsed, "rows": rows})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
