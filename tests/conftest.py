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


# Modules whose module-scoped fixture took 8-140 s to build in a run from an empty compilation cache on 2
# cores, heaviest first. `make test` runs `-n 2 --dist worksteal`, which hands each worker a contiguous half
# of the collection and later moves the tail of one worker's queue to the other: a module cut in two builds
# its fixture on both workers. At the front of the collection these modules stay whole on the first worker,
# and their long set-ups start first.
HEAVY_FIXTURE_MODULES = (
    "test_ldm_digits.py",
    "test_checkpoints.py",
    "test_metrics.py",
    "test_sample_cli.py",
    "test_finetune.py",
    "test_single_file.py",
    "test_controlnet_training.py",
    "test_distill.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Moves the modules of HEAVY_FIXTURE_MODULES to the front, in that order; the rest keep theirs."""
    rank = {name: i for i, name in enumerate(HEAVY_FIXTURE_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a module kept
