"""Test-wide set-up: 8 simulated CPU devices (before jax is imported), a shared compilation cache."""
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at test time
# Many tests build the same small programs (and subprocesses rebuild them): XLA:CPU compiles dominate the
# suite's time, so share one persistent cache across the session, its xdist workers and subprocesses.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "diffax-test-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# XLA:CPU compiles each partitionable-threefry draw slowly (a tiny U-Net's init: ~50 s against ~13 s).
# The tests compare runs made in the same configuration, never fixed random values, so the classic
# threefry lowering changes no assertion; the library keeps jax's default.
os.environ.setdefault("JAX_THREEFRY_PARTITIONABLE", "0")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def num_devices() -> int:
    return jax.device_count()
