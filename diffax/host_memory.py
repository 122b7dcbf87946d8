"""Host memory the process's allocator keeps after it is freed.

XLA's compiler works in host memory: compiling SD 1.5's train step on a CPU takes a few GiB, which glibc's
allocator keeps once they are freed, so a process that compiles and then runs holds the compiler's peak
and the program's at once (1.4 GiB of SD 1.5's train step, 227 MiB of its fp32 forward: `bench.memory`).
`release_freed` hands such pages back; `release_after_compiles`, which the train loop and the pipelines
call, does it after every long compile.
"""
from __future__ import annotations

import ctypes
import sys

import jax

from diffax import compilation

_min_seconds: list[float] = []  # the threshold of the registered listener; empty until registered


def release_freed() -> None:
    """Hands the pages glibc's allocator holds but no object uses back to the system (`malloc_trim(0)`).
    It frees nothing that is in use; a no-op off Linux, or where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl and other C libraries without this file name
        return
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def _after_event(event: str, seconds: float, **_: object) -> None:
    if event == compilation.COMPILE_EVENT and seconds >= _min_seconds[0]:
        release_freed()


def release_after_compiles(min_seconds: float = 1.0) -> None:
    """From now on, in this process, `release_freed` runs after every XLA compile of at least `min_seconds`
    (a trim costs milliseconds; a compile that short frees little). Idempotent: a later call only changes
    the threshold."""
    if not _min_seconds:
        _min_seconds.append(min_seconds)
        jax.monitoring.register_event_duration_secs_listener(_after_event)
    _min_seconds[0] = min_seconds
