"""Host memory the process's allocator keeps after it is freed.

XLA's compiler works in host memory: compiling SD 1.5's train step on a CPU takes a few GiB that glibc's
allocator keeps once they are freed, so a process that compiles and then runs its step holds both peaks
at once (1.4 GiB above torch's train step, measured in `bench.memory`). `release_freed` hands such pages
back; the train loop calls it after compiling its step.
"""
from __future__ import annotations

import ctypes
import sys


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
