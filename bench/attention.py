"""diffax's attention against torch's scaled_dot_product_attention, shape by shape.

    python -m bench.attention                                   # every shape below (needs the memory lock:)
    flock /tmp/diffax-big.lock python -m bench.attention        # the 4096-token cases hold ~3 GB of scores
    python -m bench.attention --quick                           # the short shapes, well under a minute
    python -m bench.attention --cases=dit,sd15_32 --repeats=9
    python -m bench.attention --cases=sd15_64 --blocks=1024x1024,4096x512   # 'chunked' at other block sizes

Each shape is one attention call of a model diffax ships, fp32, in diffax's [B, L, H, D] layout; torch gets
the same arrays as diffusers' attention processor hands them over (a [B, H, L, D] view of [B, L, H, D]).
Every diffax backend is checked against torch, then all of them and torch are timed interleaved. One row per
backend: 'auto' (what the models run), 'xla' (one shot), 'chunked' (blocked online softmax) and 'einsum
[B,L,H,D]', the formulation diffax used before its CPU attention work (kept here as the baseline);
`--blocks` adds 'chunked' rows at the given query x key block sizes (its defaults are sized for a CPU).
"""
from __future__ import annotations

import argparse
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bench import common  # importing the bench package first sets OMP_WAIT_POLICY for torch
from diffax.models.attention import dot_product_attention

# name -> (what it is, B, Lq, Lk, H, D, causal)
CASES = {
    "dit": ("DiT-S/2 256x256 self", 8, 256, 256, 6, 64, False),
    "clip": ("CLIP-L text causal", 2, 77, 77, 12, 64, True),
    "sd15_32": ("SD1.5 32x32 latents self", 2, 1024, 1024, 8, 40, False),
    "sd15_64_cross": ("SD1.5 64x64 latents cross", 2, 4096, 77, 8, 40, False),
    "sd15_64": ("SD1.5 64x64 latents self", 2, 4096, 4096, 8, 40, False),
    "sd15_64_l2": ("SD1.5 64x64 level 2 self", 2, 1024, 1024, 8, 80, False),
    "sd15_64_l3": ("SD1.5 64x64 level 3 self", 2, 256, 256, 8, 160, False),
    "sd15_64_mid": ("SD1.5 64x64 mid self", 2, 64, 64, 8, 160, False),
    "sd2_64": ("SD2 64x64 latents, 5 heads", 2, 4096, 4096, 5, 64, False),
    "sdxl_128": ("SDXL 128x128 level 2 self", 2, 4096, 4096, 10, 64, False),
    "sdxl_128_l3": ("SDXL 128x128 level 3 self", 2, 1024, 1024, 20, 64, False),
    "vae_512": ("VAE mid-block 512x512", 1, 4096, 4096, 1, 512, False),
}
QUICK = ("dit", "clip", "sd15_32", "sd15_64_l3")
BACKENDS = ("auto", "xla", "chunked")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags; `parse_args([])` gives the defaults `bench.run_all` uses."""
    parser = argparse.ArgumentParser(prog="python -m bench.attention", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.cases_flag(parser, tuple(CASES), help="default: all (--quick: " + ", ".join(QUICK) + ")")
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--repeats", type=int, default=5, help="timed interleaved calls per variant (median)")
    parser.add_argument("--blocks", type=block_sizes, default=(),
                        help="comma-separated QxK: one more 'chunked' row per pair, with chunk_size=Q and "
                             "key_chunk_size=K (e.g. 1024x1024)")
    parser.add_argument("--torch_threads", type=int, default=None, help="default: the machine's cores")
    return parser.parse_args(argv)


def block_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """'1024x1024,4096x512' -> ((1024, 1024), (4096, 512)): the --blocks flag."""
    try:
        pairs = tuple(tuple(int(n) for n in item.split("x")) for item in text.split(",") if item)
    except ValueError:
        pairs = ((),)
    if any(len(pair) != 2 or min(pair) < 1 for pair in pairs):
        raise argparse.ArgumentTypeError(f"expected positive QxK pairs such as 1024x512, got {text!r}")
    return pairs


def einsum_blhd(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """The formulation diffax used before: einsums straight on [B, L, H, D], scale and normalise on the scores."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1).astype(v.dtype), v)


def run_case(name: str, args: argparse.Namespace, peak: dict[str, Any], device: Any) -> list[dict[str, Any]]:
    """Checks and times one shape; one row per diffax variant, each against the same torch timings."""
    import torch

    what, b, lq, lk, h, d, causal = CASES[name]
    rng = np.random.default_rng(0)
    q = rng.standard_normal((b, lq, h, d)).astype(np.float32)
    k, v = (rng.standard_normal((b, lk, h, d)).astype(np.float32) for _ in range(2))
    mask = np.tril(np.ones((lq, lk), bool))[None, None] if causal else None
    jq, jk, jv = (jnp.asarray(x) for x in (q, k, v))
    jmask = None if mask is None else jnp.asarray(mask)

    variants = {f"diffax {backend}": (lambda q, k, v, backend=backend: dot_product_attention(
        q, k, v, backend=backend, mask=jmask)) for backend in BACKENDS}
    for qc, kc in args.blocks:
        variants[f"diffax chunked {qc}x{kc}"] = lambda q, k, v, qc=qc, kc=kc: dot_product_attention(
            q, k, v, backend="chunked", chunk_size=qc, key_chunk_size=kc, mask=jmask)
    variants["einsum [B,L,H,D] (before)"] = lambda q, k, v: einsum_blhd(q, k, v, jmask)
    programs = {label: common.compile_jax(fn, jq, jk, jv) for label, fn in variants.items()}
    calls = {label: common.jax_blocking(p.compiled, jq, jk, jv) for label, p in programs.items()}

    tq, tk, tv = (torch.from_numpy(x).to(device).transpose(1, 2) for x in (q, k, v))  # [B, H, L, D] views
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls["torch"] = common.torch_blocking(lambda: sdpa(tq, tk, tv, is_causal=causal).transpose(1, 2), device)

    firsts = {label: common.timed(call) for label, call in calls.items()}
    want = firsts["torch"][0].float().cpu().numpy()
    errors = {label: common.rel_err(np.asarray(out), want) for label, (out, _) in firsts.items() if label != "torch"}
    for label, err in errors.items():
        common.check_agreement(f"{name} {label}", err, common.agreement_tolerance(device))
    timing = common.time_interleaved(calls, repeats=args.repeats)
    try:
        flops = common.count_flops(lambda q, k, v: einsum_blhd(q, k, v, jmask), jq, jk, jv)
    except RuntimeError:  # XLA:GPU's cost analysis of the unoptimised program can be empty: the two matmuls
        flops = 4.0 * b * h * lq * lk * d
    shape = f"[{b},{lq},{h},{d}]" + (f"/{lk}" if lk != lq else "")
    return [common.case_row(f"{what} {shape} {label}", diffax=timing[label], torch=timing["torch"],
                            program=programs[label], flops=flops, peak=peak, max_rel_err=errors[label],
                            first_call_s=(firsts[label][1], firsts["torch"][1]), group="attention",
                            shape_name=name, variant=label, score_mib=4 * b * h * lq * lk / 2 ** 20)
            for label in programs]


def run(args: argparse.Namespace, peak: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Runs the chosen shapes, writes bench/results/attention.json (attention_blocks.json with --blocks) and
    returns the rows."""
    device = common.setup_torch(args.torch_threads)
    peak = peak or common.matmul_peak(device)
    names = args.cases or (QUICK if args.quick else tuple(CASES))
    watch = common.Stopwatch("attention")
    rows = []
    for name in names:
        rows += run_case(name, args, peak, device)
        watch.lap(name)
        # Rewritten after each shape: a run stopped by a time limit keeps the shapes it finished.
        common.write_json("attention_blocks" if args.blocks else "attention", {
            "benchmark": "attention", "args": vars(args), "machine": common.machine_info(), "matmul_peak": peak,
            "rows": rows})
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    """Run from the command line and print the table."""
    common.print_table(run(parse_args(argv)))


if __name__ == "__main__":
    main()
