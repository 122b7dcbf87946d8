"""Multi-host: cluster detection at start-up, two local processes train exactly like one, the checkpoint
restores on any device and process count, and two processes on a hybrid (dcn) mesh survive a preemption."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from diffax import parallel
from diffax.image_io import read_parameters

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from test_train import TINY_FLAGS, tiny_config  # noqa: E402

CLUSTER_VARS = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                "SLURM_LOCALID", "OMPI_COMM_WORLD_SIZE", "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST",
                "JOB_COMPLETION_INDEX", "DIFFAX_COORDINATOR", "DIFFAX_NUM_PROCESSES", "DIFFAX_PROCESS_ID")
SLURM_TASK = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[001-002]", "SLURM_PROCID": "1",
              "SLURM_LOCALID": "0"}


@pytest.fixture
def calls(monkeypatch) -> list[dict]:
    """A clean environment and a recording stand-in for jax.distributed.initialize."""
    for name in CLUSTER_VARS:
        monkeypatch.delenv(name, raising=False)
    recorded: list[dict] = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: recorded.append(kwargs))
    monkeypatch.setattr(jax.config, "update", lambda *args: None)  # keep the session's CPU client settings
    return recorded


AUTO = dict(coordinator_address=None, num_processes=None, process_id=None)


@pytest.mark.parametrize("env, cluster", [
    ({}, None),
    ({**SLURM_TASK, "SLURM_NTASKS": "1"}, None),                 # one task: a plain process
    ({"SLURM_JOB_ID": "77", "SLURM_NTASKS": "8"}, None),         # an sbatch script outside srun
    ({**SLURM_TASK, "SLURM_NTASKS": "2"}, "SLURM"),
    ({"OMPI_COMM_WORLD_SIZE": "1", "OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1"}, None),
    ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1"}, "Open MPI"),
    ({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, None),             # any pod: not a training job
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "JAX_COORDINATOR_ADDRESS"),
])
def test_cluster_detection_calls_initialize_with_no_arguments(calls, monkeypatch, env, cluster):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert parallel.initialize_distributed() == cluster
    assert calls == ([] if cluster is None else [AUTO])


def test_cloud_tpu_vm_lets_jax_find_the_slice(calls, monkeypatch):
    from jax._src import cloud_tpu_init
    monkeypatch.setattr(cloud_tpu_init, "running_in_cloud_tpu_vm", True)
    assert parallel.initialize_distributed() == "Cloud TPU"
    assert calls == [AUTO]


def test_kubernetes_indexed_job(calls, monkeypatch):
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "3")
    import importlib.util
    if importlib.util.find_spec("kubernetes") is None:
        with pytest.raises(ValueError, match="kubernetes"):
            parallel.initialize_distributed()
        monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    assert parallel.initialize_distributed() == "Kubernetes"
    assert calls == [AUTO]


def test_explicit_variables_win_over_the_cluster(calls, monkeypatch):
    for name, value in {**SLURM_TASK, "SLURM_NTASKS": "2", "DIFFAX_COORDINATOR": "127.0.0.1:5555",
                        "DIFFAX_NUM_PROCESSES": "2", "DIFFAX_PROCESS_ID": "1"}.items():
        monkeypatch.setenv(name, value)
    assert parallel.initialize_distributed() == "DIFFAX_* variables"
    assert calls == [dict(coordinator_address="127.0.0.1:5555", num_processes=2, process_id=1)]


def test_incomplete_or_bad_explicit_variables_are_named(calls, monkeypatch):
    monkeypatch.setenv("DIFFAX_COORDINATOR", "127.0.0.1:5555")
    with pytest.raises(ValueError, match="DIFFAX_NUM_PROCESSES, DIFFAX_PROCESS_ID not set"):
        parallel.initialize_distributed()
    monkeypatch.setenv("DIFFAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="DIFFAX_NUM_PROCESSES must be a non-negative integer"):
        parallel.initialize_distributed()
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")  # Open MPI 5: no ORTE URI for jax to read
    monkeypatch.delenv("DIFFAX_COORDINATOR")
    monkeypatch.delenv("DIFFAX_NUM_PROCESSES")
    with pytest.raises(ValueError, match="OMPI_MCA_orte_hnp_uri"):
        parallel.initialize_distributed()
    assert calls == []


def test_detection_reads_the_variables_jax_reads():
    # jax has no public "is a cluster here" query, so the detection repeats the names its detectors read.
    from jax._src.clusters import ompi_cluster, slurm_cluster
    assert (slurm_cluster._JOBID_PARAM, slurm_cluster._NODE_LIST, slurm_cluster._PROCESS_COUNT,
            slurm_cluster._PROCESS_ID, slurm_cluster._LOCAL_PROCESS_ID) == (
                "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    assert (ompi_cluster._ORTE_URI, ompi_cluster._PROCESS_COUNT) == ("OMPI_MCA_orte_hnp_uri",
                                                                     "OMPI_COMM_WORLD_SIZE")


# ---------------------------------------------------------------------------------------------------------
# Two local processes (4 CPU devices each) through train.py's real start-up path.

TINY = [*TINY_FLAGS, "--config.train.log_every=2", "--config.train.checkpoint_every=2", "--config.sample.steps=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFAX_") and k != "XLA_FLAGS"}
    if "DIFFAX_NUM_PROCESSES" in extra:
        # Without the suite's persistent compilation cache: a process that finds a program there while the
        # other compiles it waits at the first collective past gloo's fixed 30 s and the run fails.
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return {**env, "JAX_PLATFORMS": "cpu", **extra}


def _train(workdir: Path, steps: int, *more: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs/digits.py'}",
                             f"--workdir={workdir}", *TINY, f"--config.train.steps={steps}", *more],
                            cwd=workdir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _finish(procs: list[subprocess.Popen]) -> list[str]:
    outs = []
    try:
        for proc in procs:
            outs.append(proc.communicate(timeout=300)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, out in zip(procs, outs):
        assert proc.returncode == 0, out[-3000:]
    return outs


def _tiny_config(steps: int):
    """The in-process twin of train.py with TINY."""
    config = tiny_config(steps)
    config.train.checkpoint_every = 2
    config.sample.steps = 2
    return config


def _params(workdir: Path) -> dict[str, np.ndarray]:
    """Params and EMA params of the latest checkpoint, saved on whatever topology: path -> host array."""
    import orbax.checkpoint as ocp
    from diffax.train import checkpoint
    manager = checkpoint.make_manager(workdir, read_only=True)
    step = manager.latest_step()
    targets = {name: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                                                  sharding=checkpoint.replicated_everywhere()),
                                  manager.item_metadata(step)[name]) for name in ("train_state", "ema_params")}
    restored = manager.restore(step, args=ocp.args.Composite(
        **{name: ocp.args.StandardRestore(t) for name, t in targets.items()}))
    trees = {"params": restored["train_state"]["params"], "ema": restored["ema_params"]}
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(trees)}


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    # Same global batches, noise and programs: only the order of the cross-device gradient sum may differ
    # (gloo against XLA:CPU's in-process all-reduce), ~1e-8 after a few steps. Attention's key bias is left
    # out: softmax ignores it, so its true gradient is 0 and Adam scales its rounding noise up to lr.
    assert a.keys() == b.keys()
    for name in a:
        if not name.endswith("['to_k']['bias']"):
            np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.slow  # two training processes (~3 min on 2 cores): `make test-slow`
def test_two_processes_train_like_one_and_restore_anywhere(tmp_path):
    from diffax.train.loop import train_and_evaluate

    assert jax.device_count() == 8  # tests/conftest.py
    two, one = tmp_path / "two", tmp_path / "one"
    port = _free_port()
    procs = [_train(two, 4, "--config.train.sample_every=4",
                    env=_env(4, DIFFAX_COORDINATOR=f"127.0.0.1:{port}", DIFFAX_NUM_PROCESSES="2",
                             DIFFAX_PROCESS_ID=str(i)))
             for i in range(2)]
    try:
        train_and_evaluate(_tiny_config(4), one)  # meanwhile: one process, 8 devices
    finally:
        out0, out1 = _finish(procs)
    _assert_same(_params(two), _params(one))

    # Process 0 alone logs and writes metrics and event files.
    assert "step 4/4" in out0 and "step " not in out1
    rows = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert len(list((two / "tensorboard").iterdir())) == 1
    # The grid written during training: both processes ran the sharded program, process 0 wrote the file.
    assert [p.name for p in (two / "samples").iterdir()] == ["step_000004.png"]
    # Each process saved its own data-iterator position.
    assert sorted(p.name for p in (two / "checkpoints" / "4" / "data").glob("*.json")) == [
        "process_0-of-2.json", "process_1-of-2.json"]

    # The two-process checkpoint samples on one device, in batches of at most 3, and the PNG says how.
    out = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--workdir={two}", "--num_samples=4",
                          "--batch_size=3", "--steps=2", "--seed=5", f"--out={two / 's.png'},{two / 's.npz'}"],
                         env=_env(None), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "compile " in out.stdout and " images/s" in out.stdout
    assert np.load(two / "s.npz")["images"].shape == (4, 16, 16, 1)
    made_with = read_parameters(two / "s.png")
    assert {k: made_with[k] for k in ("model", "sampler", "steps", "seed", "batch_size", "labels")} == dict(
        model="UNet2DModel", sampler="ddim", steps=2, seed=5, batch_size=3, labels=[0, 1, 2, 3])
    assert made_with["guidance_scale"] == 3.0  # the config's sample block
    # Image k is sample k of the seed whatever the batch size.
    out = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--workdir={two}", "--num_samples=4",
                          "--batch_size=4", "--steps=2", "--seed=5", f"--out={two / 'whole.npz'}"],
                         env=_env(None), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    np.testing.assert_array_equal(np.load(two / "whole.npz")["images"], np.load(two / "s.npz")["images"])

    # The two-process run resumes in one process of 4 devices, and ends where the 8-device run resumed in
    # place does: the state reshards, and the data iterator continues where the two processes left it.
    proc = _train(two, 6, env=_env(4))
    try:
        train_and_evaluate(_tiny_config(6), one)
    finally:
        (out,) = _finish([proc])
    assert f"resumed from {two / 'checkpoints'} at step 4" in out
    _assert_same(_params(two), _params(one))


@pytest.mark.slow  # three training processes: `make test-slow`
def test_two_processes_preempted_on_a_hybrid_mesh_resume_like_an_uninterrupted_run(tmp_path):
    """Two processes on a hybrid mesh, one per granule (dcn_data=2, fsdp 4 within each). SIGTERM to process
    1 alone after the step-2 checkpoint: the preemption service brings both to the same step, where they
    save and exit 0. Started again, they finish 10 steps at the weights of an uninterrupted one-process run
    on the same (data 2, fsdp 4) layout."""
    from diffax.train import checkpoint
    from diffax.train.loop import train_and_evaluate

    two, one = tmp_path / "two", tmp_path / "one"
    mesh_flags = ["--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.mesh.dcn_data=2"]

    def start() -> list[subprocess.Popen]:
        port = _free_port()
        return [_train(two, 10, *mesh_flags, env=_env(4, DIFFAX_COORDINATOR=f"127.0.0.1:{port}",
                                                      DIFFAX_NUM_PROCESSES="2", DIFFAX_PROCESS_ID=str(i)))
                for i in range(2)]

    procs = start()
    try:
        deadline = time.time() + 300
        while not (two / "checkpoints" / "2" / "_CHECKPOINT_METADATA").exists():
            assert all(p.poll() is None for p in procs), "training exited before its first checkpoint"
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGTERM)
    finally:
        outs = _finish(procs)
    stopped = checkpoint.make_manager(two, read_only=True).latest_step()
    assert 2 < stopped < 10, "the preemption must land mid-run"
    assert f"preempted: stopped after step {stopped}, the latest checkpoint is step {stopped}" in outs[0]

    config = _tiny_config(10)
    config.mesh.data, config.mesh.fsdp = 2, 4
    procs = start()
    try:
        train_and_evaluate(config, one)
    finally:
        out0, _ = _finish(procs)
    assert f"resumed from {two / 'checkpoints'} at step {stopped}" in out0
    _assert_same(_params(two), _params(one))
