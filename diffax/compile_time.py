"""Seconds jax spends turning Python functions into XLA executables, from jax's monitoring events."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import jax

TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
# One XLA compile (jax._src.dispatch.BACKEND_COMPILE_EVENT), recorded when it returns.
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_KINDS = {TRACE_EVENT: "trace", LOWER_EVENT: "lower", COMPILE_EVENT: "compile"}


@contextlib.contextmanager
def compile_seconds() -> Iterator[dict[str, float]]:
    """Within the block, yields {'trace', 'lower', 'compile'}: seconds jax spent tracing to jaxprs, lowering
    to MLIR and in XLA's compiler, summed over every program built inside it (a persistent-cache hit counts
    as its read). Traces nest, one event per inner jit inside its outer one's, so 'trace' can count a second
    twice; 'lower' + 'compile' is the part of a first call that is not tracing or running."""
    totals = {kind: 0.0 for kind in _KINDS.values()}

    def listen(event: str, seconds: float, **_: Any) -> None:
        if event in _KINDS:
            totals[_KINDS[event]] += seconds

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield totals
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
