"""Device mesh, logical-axis rules and shardings: how the same code runs on 1 CPU or a TPU pod.

Models name their parameter axes logically ('embed', 'mlp', 'heads', 'conv_out', ...; see
diffax/models/layers.py). A rule table maps each logical name to a mesh axis, so data parallelism, FSDP
and tensor parallelism are a choice of mesh shape and rules, not a code change:

    mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})       # -1: all remaining devices
    param_shardings = logical_shardings(logical_specs, mesh)   # NamedSharding per parameter
    batch = shard_batch(local_batch, mesh)                     # global jax.Array, rows over data x fsdp

Multi-host: call `initialize_distributed()` first; each process feeds its own rows (see diffax.data) and
`shard_batch` assembles the global array with `jax.make_array_from_process_local_data`.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes. Batch rows go over data and fsdp; FSDP shards weights on their input ('embed'
# / 'conv_in') dimension; tensor parallelism splits the hidden / head / output-channel dimension.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("conv_in", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("conv_out", "tensor"),
    ("norm", None),
    ("activation_channels", None),  # channels of NHWC feature maps: replicated, every conv reads them all
)


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all, across hosts) with axes `MESH_AXES`; one size may be -1."""
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh axes must be among {MESH_AXES}, got unknown {sorted(unknown)}")
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                         f"have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_shardings(logical_specs: Any, mesh: Mesh,
                      rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
    """NamedShardings for a tree of logical PartitionSpecs (from `nn.get_partition_spec`)."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
    """A sharding that keeps a full copy on every device (scalars, RNG keys, small tables)."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the data and fsdp mesh axes."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def batch_divisor(mesh: Mesh) -> int:
    """Global batch sizes must be multiples of this (the number of batch shards)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def shard_batch(local_batch: Any, mesh: Mesh) -> Any:
    """This process's rows of a batch (numpy tree) -> global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                        local_batch)


def _detected_cluster(environ: Mapping[str, str]) -> str | None:
    """The multi-process cluster `jax.distributed.initialize()` can configure by itself here, or None.

    jax has no public "is a cluster present" query, and its private detectors have side effects (GCE
    metadata requests, Kubernetes API clients) and say nothing of the process count. So this reads only
    the variables jax 0.10's detectors (jax._src.clusters) read, and asks for more than one process where
    the launcher says how many: a one-task `sbatch` script or a plain `mpirun -n 1` stays single-process.
    """
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    # A Cloud TPU VM (jax found libtpu and TPU chips when it was imported): jax reads the slice's workers
    # from TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES (GKE), MEGASCALE_* (multislice) or the VM's
    # metadata (GCE); one host is a cluster of one process.
    from jax._src import cloud_tpu_init  # private: jax has no public query for this
    if getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False):
        return "Cloud TPU"
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(v in environ for v in slurm) and int(environ["SLURM_NTASKS"]) > 1:
        return "SLURM"
    if int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        if "OMPI_MCA_orte_hnp_uri" not in environ:  # Open MPI 5 dropped ORTE, which jax reads
            raise ValueError("Open MPI launched this process without OMPI_MCA_orte_hnp_uri (Open MPI >= 5), "
                             "which jax cannot read: set DIFFAX_COORDINATOR=host:port, DIFFAX_NUM_PROCESSES "
                             "and DIFFAX_PROCESS_ID (e.g. from OMPI_COMM_WORLD_RANK)")
        return "Open MPI"
    # An indexed Job (JobSet's workers): jax finds its peers through the Kubernetes API.
    if "KUBERNETES_SERVICE_HOST" in environ and "JOB_COMPLETION_INDEX" in environ:
        if importlib.util.find_spec("kubernetes") is None:
            raise ValueError("a Kubernetes indexed Job needs the `kubernetes` package for jax to find its "
                             "peers: pip install 'jax[k8s]', or set DIFFAX_COORDINATOR / DIFFAX_NUM_PROCESSES / "
                             "DIFFAX_PROCESS_ID")
        return "Kubernetes"
    return None


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> str | None:
    """Starts multi-host JAX when this process is one of several; returns what started it, or None.

    Explicit values win: the arguments, else DIFFAX_COORDINATOR (host:port of process 0) /
    DIFFAX_NUM_PROCESSES / DIFFAX_PROCESS_ID; jax fills in any left out from the cluster. Without them, a
    cluster jax can configure by itself (Cloud TPU VMs, SLURM or Open MPI with more than one task, a
    Kubernetes indexed Job, JAX_COORDINATOR_ADDRESS) gets `jax.distributed.initialize()` with no arguments.
    A single process outside a cluster does nothing. On CPU, collectives go through gloo.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("DIFFAX_COORDINATOR") or None
    for name, value in (("DIFFAX_NUM_PROCESSES", num_processes), ("DIFFAX_PROCESS_ID", process_id)):
        if value is None and env.get(name) and not env[name].strip().isdigit():
            raise ValueError(f"environment variable {name} must be a non-negative integer, got {env[name]!r}")
    if num_processes is None and env.get("DIFFAX_NUM_PROCESSES"):
        num_processes = int(env["DIFFAX_NUM_PROCESSES"])
    if process_id is None and env.get("DIFFAX_PROCESS_ID"):
        process_id = int(env["DIFFAX_PROCESS_ID"])
    given = {"DIFFAX_COORDINATOR": coordinator_address, "DIFFAX_NUM_PROCESSES": num_processes,
             "DIFFAX_PROCESS_ID": process_id}
    missing = [k for k, v in given.items() if v is None]
    cluster = _detected_cluster(env) if missing else "DIFFAX_* variables"
    if cluster is None and len(missing) < len(given):
        raise ValueError(f"multi-process start-up needs DIFFAX_COORDINATOR, DIFFAX_NUM_PROCESSES and "
                         f"DIFFAX_PROCESS_ID together; {', '.join(missing)} not set")
    if cluster is None:
        return None
    # Only the CPU client reads this; querying the backend here would start it too early.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return cluster
