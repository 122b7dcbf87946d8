"""Peak host memory of loading: the converter places tensor by tensor, its host arrays are aligned so a CPU
device array takes them over without a copy, and a conversion-cache hit does the same. Resident sizes are
measured in fresh processes (VmHWM, /proc/self/status) against the weights' bytes."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from diffax import convert
from diffax.convert import io
from diffax.models.registry import abstract_params, make_module
from diffax.models.unet2d import UNet2DConfig
from diffax.pipelines import cache

# About 70 MiB of fp32 weights, the largest tensor 10 MiB: large enough that one extra copy of the
# weights stands far above the allocator's and the interpreter's noise, small enough to convert in a second.
CONFIG = UNet2DConfig(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(96, 384), layers_per_block=1,
                      down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                      norm_num_groups=8)
MIB = 2 ** 20


def _save(config: UNet2DConfig, out: Path) -> Path:
    """A diffusers folder of `config` with random weights."""
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), abstract_params(config))
    convert.save(out, make_module(config), params)
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save(CONFIG, tmp_path_factory.mktemp("memory") / "unet")


def weight_bytes() -> int:
    return sum(math.prod(s.shape) * 4 for s in jax.tree.leaves(abstract_params(CONFIG)))


def test_host_array_is_aligned_and_shared_by_the_cpu_device() -> None:
    value = np.arange(12, dtype=np.float32).reshape(3, 4).T  # a transposed view, like a converted kernel
    out = io.host_array(value, "bfloat16")
    assert out.ctypes.data % io.HOST_ALIGNMENT == 0 and out.flags.c_contiguous
    assert out.dtype == np.dtype("bfloat16") and out.shape == (4, 3)
    np.testing.assert_array_equal(out.astype(np.float32), value)
    placed = jax.device_put(out, jax.devices("cpu")[0])
    # The device array is the host buffer itself: placing it costs no second copy.
    assert placed.unsafe_buffer_pointer() == out.ctypes.data


def test_load_places_each_tensor_before_reading_the_next(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events = []
    read, put = io.Tensors.__getitem__, jax.device_put
    monkeypatch.setattr(io.Tensors, "__getitem__", lambda self, key: events.append("read") or read(self, key))
    monkeypatch.setattr(jax, "device_put", lambda *a, **kw: events.append("place") or put(*a, **kw))
    device = jax.devices("cpu")[0]
    _, placed = convert.load(folder, device=device)
    monkeypatch.undo()
    n = len(jax.tree.leaves(placed))
    # Never two host tensors waiting for their placement (on a CPU each placement is two device_puts).
    collapsed = [e for i, e in enumerate(events) if i == 0 or e != events[i - 1]]
    assert collapsed == ["read", "place"] * n
    _, host = convert.load(folder)
    for a, b in zip(jax.tree.leaves(placed), jax.tree.leaves(host)):
        assert isinstance(a, jax.Array) and a.devices() == {device}
        np.testing.assert_array_equal(np.asarray(a), b)
    assert all(b.ctypes.data % io.HOST_ALIGNMENT == 0 for b in jax.tree.leaves(host))
    # XLA owns the placed buffers: a donated step writes its output in place instead of holding the params
    # twice (a buffer device_put from the host is not reused).
    big = max(jax.tree.leaves(placed), key=lambda a: a.size)
    pointer = big.unsafe_buffer_pointer()
    assert jax.jit(lambda a: a * 2, donate_argnums=0)(big).unsafe_buffer_pointer() == pointer


# Runs in a fresh process: the resident size's peak (VmHWM, reset after imports) of converting `folder` and
# placing every array on the CPU device, in MiB above the size before.
_PROBE = """
import json, sys
import jax
from diffax import convert
from diffax.convert import io
from diffax.models.registry import abstract_params
from diffax.models.unet2d import UNet2DConfig
io._REMAP_BYTES = 4 << 20  # the default maps 64 MiB of the file at a time, about this whole test file
jax.devices()
# Not the weights' cost: tracing the model for its shapes (~50 MiB of Python objects).
abstract_params(UNet2DConfig.from_diffusers(sys.argv[1] + "/config.json"))

def rss(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":")) / 1024

base = rss("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
_, params = convert.load(sys.argv[1])
params = jax.block_until_ready(jax.device_put(params, jax.devices()[0]))
print(json.dumps({"peak": rss("VmHWM") - base, "held": rss("VmRSS") - base}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's VmHWM reset")
def test_load_then_place_peaks_near_one_copy_of_the_weights(folder: Path) -> None:
    """Before the host arrays were aligned, placing them copied every weight: a peak of about twice the
    weights (127 MiB here)."""
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(folder)], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300, check=True)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    weights = weight_bytes() / MIB
    # One copy of the weights, plus a few tensors in flight, the file map (4 MiB) and the allocator's slack
    # (measured: 85 MiB for 70.5 MiB of weights).
    assert got["peak"] < 1.25 * weights + 16, (got, weights)


def test_cache_hit_is_placed_without_a_copy(tmp_path: Path) -> None:
    """A conversion-cache hit hands back arrays a CPU device shares, like the converter's (Orbax's own are
    not aligned, and placing them copied every weight)."""
    folder = _save(dataclasses.replace(CONFIG, block_out_channels=(8, 16), norm_num_groups=4), tmp_path / "unet")
    cache.load_component(folder, cache_dir=tmp_path / "cache")  # converts and writes the entry
    _, params = cache.load_component(folder, cache_dir=tmp_path / "cache")
    host = jax.tree.leaves(params)
    assert all(isinstance(a, np.ndarray) and a.ctypes.data % io.HOST_ALIGNMENT == 0 for a in host)
    placed = jax.device_put(params, jax.devices("cpu")[0])
    assert [a.unsafe_buffer_pointer() for a in jax.tree.leaves(placed)] == [a.ctypes.data for a in host]
