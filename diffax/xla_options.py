"""XLA compiler options diffax compiles its model programs with.

On a CPU, XLA hands matmuls, convolutions and the elementwise work and reductions around them to YNNPACK.
For convolutions XLA's own kernels are faster at most of the shapes diffusion models run: one 3x3
convolution at [1, 16, 16, 1280 -> 1280] takes 17.5 ms against YNNPACK's 46.4, at [1, 64, 64, 320 -> 320]
15.4 against 18.4, and SD 1.5's UNet forward went from 1.11x to 1.64x torch's speed (docs/performance.md).
So diffax's programs keep YNNPACK's fusion types except the individual convolution. The option is passed
per program (`jax.jit(..., compiler_options=program_options(platform))`), so nothing else in the process
changes; `XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution` does the same for every
program of a process.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax

# jaxlib's default YNNPACK fusion types less LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION. jaxlib 0.10's
# default is individual convolution, individual dot and reduce (its optimised HLO is the same with these
# three given); tests/test_xla_options.py checks that convolutions leave YNNPACK and dots stay.
_CPU = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


@functools.cache
def program_options(platform: str | None = None) -> dict[str, str]:
    """The compiler options of diffax's model programs on `platform` (default: jax's default backend):
    convolutions out of YNNPACK on a CPU, nothing elsewhere. Empty where this jaxlib rejects the option
    (a version with other fusion type names), so programs still compile there, with XLA's defaults."""
    if (platform or jax.default_backend()) != "cpu":
        return {}
    try:
        jax.jit(lambda x: x + 1, compiler_options=_CPU).lower(1.0).compile()
    except Exception:  # the option's name or values are unknown to this jaxlib
        return {}
    return dict(_CPU)


def jit(fn: Callable[..., Any]) -> Any:
    """`jax.jit(fn)` compiled with `program_options()` of jax's default backend: for a model program that
    is not sharded through `parallel.jit_with_rules` (which adds the options for its mesh's platform)."""
    return jax.jit(fn, compiler_options=program_options())
