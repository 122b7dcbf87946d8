"""diffax.pipelines.executables: compiled pipeline programs stored on disk and loaded by a new process without
tracing, lowering or compiling; entries keyed by what decides the program, damaged entries recompiled."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import diffax.pipelines
from tests.pipeline_fixtures import build_sd_pipeline

ROOT = Path(__file__).resolve().parent.parent
CALL = dict(prompt=["a cat"], num_inference_steps=2, guidance_scale=3.0, seed=0)

# A new process: load the pipeline with the executable cache, make the same images, report what it did.
CHILD = """
import json, sys
import numpy as np
import diffax.pipelines
folder, cache_dir, out = sys.argv[1:4]
pipe = diffax.pipelines.load(folder, cache_dir=cache_dir, executable_cache=True, compilation_cache=False)
np.save(out, pipe(**json.loads(sys.argv[4])).images)
c = pipe.executable_cache
print(json.dumps({"hits": c.hits, "misses": c.misses, "traced": pipe.trace_count}))
"""


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return build_sd_pipeline(tmp_path_factory.mktemp("exe") / "sd")


def _load(folder: Path, cache_dir: Path):
    return diffax.pipelines.load(folder, cache_dir=cache_dir, executable_cache=True, compilation_cache=False)


def _entries(cache_dir: Path) -> list[Path]:
    return sorted((cache_dir.parent / "executables").glob("*.exe"))


def test_new_process_loads_the_executable_without_tracing(sd_folder, tmp_path):
    cache_dir = tmp_path / "pipelines"
    pipe = _load(sd_folder, cache_dir)
    first = pipe(**CALL).images
    assert (pipe.executable_cache.misses, pipe.executable_cache.hits) == (1, 0)
    assert pipe.trace_count == 1 and len(_entries(cache_dir)) == 1

    out = tmp_path / "child.npy"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(sd_folder), str(cache_dir), str(out), json.dumps(CALL)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    # The program came from disk: the new process never traced it (its identity does not depend on the process).
    assert report == {"hits": 1, "misses": 0, "traced": 0}
    np.testing.assert_array_equal(np.load(out), first)


@pytest.mark.slow  # two more compiled pipeline programs (about 16 s): `make test-slow`; the hit itself is tested above
def test_a_different_program_gets_its_own_entry(sd_folder, tmp_path):
    cache_dir = tmp_path / "pipelines"
    _load(sd_folder, cache_dir)(**CALL)
    pipe = _load(sd_folder, cache_dir)
    pipe.set_scheduler("euler")  # same shapes, another sampler: must not reuse the DDIM executable
    euler = pipe(**CALL).images
    assert (pipe.executable_cache.misses, pipe.executable_cache.hits) == (1, 0)
    assert len(_entries(cache_dir)) == 2
    plain = diffax.pipelines.load(sd_folder, cache_dir=cache_dir, compilation_cache=False)
    plain.set_scheduler("euler")
    np.testing.assert_allclose(euler, plain(**CALL).images, atol=1e-6)

    pipe(**{**CALL, "num_inference_steps": 3})  # another static choice: a third entry
    assert len(_entries(cache_dir)) == 3


def test_a_damaged_entry_is_compiled_again(sd_folder, tmp_path):
    cache_dir = tmp_path / "pipelines"
    want = _load(sd_folder, cache_dir)(**CALL).images
    [entry] = _entries(cache_dir)
    entry.write_bytes(b"not an executable")
    pipe = _load(sd_folder, cache_dir)
    with pytest.warns(UserWarning, match="could not be loaded"):
        got = pipe(**CALL).images
    assert pipe.executable_cache.misses == 1 and pipe.trace_count == 1
    np.testing.assert_array_equal(got, want)
    assert entry.stat().st_size > 1000  # rewritten with the fresh executable
