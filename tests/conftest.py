"""Test-wide set-up: 8 simulated CPU devices (before jax is imported) and small shared fixtures."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at test time

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def num_devices() -> int:
    return jax.device_count()
