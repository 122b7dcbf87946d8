"""Where one diffax train step spends its time: XLA:CPU's operations from a profile, grouped by kind.

    python -m bench.profile_step --case=dit-xl --layers=12      # DiT-XL/2's width, 12 blocks
    python -m bench.profile_step --case=dit-xl                  # all 28 blocks (13 GB of XLA buffers)
    python -m bench.profile_step --case=digits --steps=3
    flock /tmp/diffax-big.lock python -m bench.profile_step --case=sd15 --steps=1   # SD 1.5, remat='full'

Builds a case of `bench.train_step` (its diffax side only, as `train.py` builds the step; `--layers` cuts a
DiT to that many blocks), times `--steps` steps with the process's CPU time and page faults, then runs them
again under `jax.profiler.trace(..., create_perfetto_trace=True)`. XLA's CPU runtime records every
operation (thunk) it runs; their durations are summed per step by name, with the trailing `.N` dropped, so
`ynn_fusion` is every YNNPACK matmul and reduction fusion and `add_multiply_fusion` every elementwise
fusion XLA named so. Convolutions on XLA's own kernels (`diffax.xla_options`) run asynchronously on the
thread pool: their events (`convolution`, `conv_general_dilated`) last only as long as the launch, so their
time is the CPU time the table does not account for (user + system CPU seconds less the operations' sum).
It also prints the largest fusions of the compiled program by operand count: a fusion whose operands grow
with the depth recomputes a chain of producers (docs/performance.md, "Train step on CPU").
Random weights; nothing is compared with torch. Not part of `make bench`.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import json
import re
import resource
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from bench import common  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)
import jax
import numpy as np

from bench import models
from bench.train_step import DiffaxTrainer, cases, make_batch, rematerialised, run_config, torch_model
from diffax import convert
from diffax.models.dit import DiTConfig

# Runtime bookkeeping in the trace, not operations of the program.
_NOT_OPS = ("$", "Thunk", "Pjit", "Common", "Slinky")


def largest_fusions(compiled_text: str, n: int = 5) -> list[tuple[int, str, str]]:
    """The `n` fusions of an optimised HLO module with the most operands, as (operands, name, output shape).
    Scalar outputs with many operands are reductions over every leaf (the non-finite guard's), not chains."""
    found = [(m.group(3).count("%"), m.group(1), m.group(2))
             for m in re.finditer(r"\n\s*%?([\w.\-]+) = (\S+) fusion\((.*?)\), kind=", compiled_text)]
    return sorted(found, reverse=True)[:n]


def op_times(trace_dir: Path, steps: int) -> tuple[collections.Counter, collections.Counter]:
    """(ms per step, calls per step) by operation kind, from the perfetto trace jax wrote under `trace_dir`."""
    trace = json.load(gzip.open(next(trace_dir.rglob("*perfetto_trace.json.gz"))))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    ms, calls = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith(_NOT_OPS):
            kind = re.sub(r"\.\d+$", "", e["name"])
            ms[kind] += e.get("dur", 0) / 1e3 / steps
            calls[kind] += 1 / steps
    return ms, calls


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(prog="python -m bench.profile_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="dit-xl", help="a bench.train_step case: digits, dit-s, dit-xl, sd15")
    parser.add_argument("--layers", type=int, default=0, help="DiT only: keep this many blocks (0: all)")
    parser.add_argument("--steps", type=int, default=3, help="steps timed, then steps profiled")
    parser.add_argument("--top", type=int, default=12, help="operation kinds listed")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Profile one case and print its table."""
    args = parse_args(argv)
    case = {c.name: c for c in cases(False)}[args.case]
    if args.layers:
        if not isinstance(case.config, DiTConfig):
            raise ValueError(f"--layers applies to DiT cases, not {args.case!r}")
        case = dataclasses.replace(case, config=dataclasses.replace(case.config, num_layers=args.layers))
    config = run_config(case)
    with tempfile.TemporaryDirectory() as folder:
        model = torch_model(case.config)
        model.save_pretrained(folder, max_shard_size=models.MAX_SHARD_SIZE)
        del model
        module, params = convert.load(folder)
    module = rematerialised(case, module)  # as bench.train_step times it
    x0, cond = make_batch(case, module.config, np.random.default_rng(0))
    trainer = DiffaxTrainer(module, models.to_device(params), config, x0, cond)
    del params
    trainer.step()  # first call: buffers allocated, caches warm
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(args.steps):
        trainer.step()
    after, wall = resource.getrusage(resource.RUSAGE_SELF), (time.perf_counter() - start) / args.steps
    print(f"{args.case}{f' ({args.layers} blocks)' if args.layers else ''}: {wall * 1e3:.0f} ms a step; CPU user "
          f"{(after.ru_utime - before.ru_utime) / args.steps:.2f} s, system {(after.ru_stime - before.ru_stime) / args.steps:.2f} s, "
          f"{(after.ru_minflt - before.ru_minflt) / args.steps:.0f} page faults a step; XLA buffers "
          f"{(trainer.program.peak_bytes or 0) / 2**30:.2f} GiB")
    print("largest fusions (operands, name, shape):", largest_fusions(trainer.program.compiled.as_text()))
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(args.steps):
                trainer.step()
        ms, calls = op_times(Path(trace_dir), args.steps)
    print(f"operations: {sum(ms.values()):.0f} ms a step (summed over threads; not counting the time of "
          f"convolutions on XLA's own kernels, which run asynchronously)")
    print("| operation kind | ms a step | calls a step |\n|---|---|---|")
    for kind, value in ms.most_common(args.top):
        print(f"| {kind} | {value:.1f} | {calls[kind]:.0f} |")


if __name__ == "__main__":
    main()
