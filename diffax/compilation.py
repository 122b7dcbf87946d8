"""XLA compilation as diffax sees it: the seconds it takes (`compile_seconds`, from jax's monitoring events)
and the persistent cache that lets a later process skip it (`enable_persistent_cache`)."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

import jax

# Beside the pipelines' conversion cache (~/.cache/diffax/pipelines).
DEFAULT_CACHE_DIR = "~/.cache/diffax/xla"

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


def enable_persistent_cache(folder: str | os.PathLike = DEFAULT_CACHE_DIR) -> str | None:
    """Turns on XLA's persistent compilation cache in `folder` (created on the first write), so that a later
    process with the same program reads the executable instead of compiling it; returns the folder in use.

    A cache the user set (`jax_compilation_cache_dir`, JAX_COMPILATION_CACHE_DIR) is kept and returned, and
    DIFFAX_XLA_CACHE=0 leaves it off (returns None). jax's defaults stay: programs that compile in under a
    second are not written. The cache is keyed by the lowered program, so a new process still traces and
    lowers; it skips XLA's compiler, most of a large program's start-up on an accelerator."""
    if jax.config.jax_compilation_cache_dir or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return jax.config.jax_compilation_cache_dir or os.environ["JAX_COMPILATION_CACHE_DIR"]
    if os.environ.get("DIFFAX_XLA_CACHE", "1") == "0":
        return None
    folder = str(Path(folder).expanduser())
    jax.config.update("jax_compilation_cache_dir", folder)
    return folder
