"""Multi-host: cluster detection at start-up, two local processes train exactly like one, and the
checkpoint restores on any device and process count."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from diffax import parallel

ROOT = Path(__file__).resolve().parents[1]

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
