"""`host_memory`: pages the allocator keeps after they are freed go back to the system, by hand or after
each long compile."""
from __future__ import annotations

import ctypes
import os
import sys

import jax
import jax.numpy as jnp
import pytest

from diffax import host_memory


def _glibc() -> bool:
    try:
        return sys.platform.startswith("linux") and hasattr(ctypes.CDLL("libc.so.6"), "gnu_get_libc_version")
    except OSError:
        return False


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not _glibc(), reason="malloc_trim is glibc's")
def test_release_freed_returns_freed_heap_pages():
    # 100 KiB blocks come from the heap (under glibc's mmap threshold); keeping every 16th alive stops
    # free() from shrinking the heap by itself, as the compiler's scattered allocations do.
    blocks = [bytearray(100 * 1024) for _ in range(3000)]  # 293 MiB, each page written
    kept = blocks[::16]
    del blocks
    before = _resident_bytes()
    host_memory.release_freed()
    after = _resident_bytes()
    assert before - after > 150 * 2**20, (before, after)
    assert all(len(b) == 100 * 1024 and not any(b[:64]) for b in kept)  # live blocks untouched


def test_release_after_compiles_trims_after_each_long_compile(monkeypatch):
    x = jax.block_until_ready(jnp.zeros(7))  # made first: making it compiles a program too
    calls = []
    monkeypatch.setattr(host_memory, "release_freed", lambda: calls.append(1))
    host_memory.release_after_compiles(min_seconds=0.0)
    try:
        jax.jit(lambda x: jnp.sin(x) * 3.0).lower(x).compile()
        assert len(calls) == 1
        host_memory.release_after_compiles(min_seconds=3600.0)  # a later call changes the threshold only
        jax.jit(lambda x: jnp.cos(x) * 5.0).lower(x).compile()
        assert len(calls) == 1
    finally:
        host_memory.release_after_compiles()
